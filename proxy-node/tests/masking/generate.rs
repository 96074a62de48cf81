//! A generated leak corpus for masking: a masked column, put through chains of the functions an
//! agent would use to disguise it (case, substrings, reversal, encodings, JSON, XML, arrays,
//! aggregates, casts that fail and quote their input), in every query shape that carries a value
//! out (subqueries, CTEs, UNIONs, LATERAL, row values, COPY, cursors, errors). The test runs each
//! through the gateway as the agent, whose values are masked, and as an exempt principal, whose
//! are not: the second shows that the shape carries the raw value out, the first that the
//! gateway does not let it.
//!
//! Deterministic for a seed (`MASKING_SEED`, `MASKING_RANDOM` for another seed and size).

use crate::common::Rng;

/// Masked columns, as a query over `users u` and `customers c` names them.
const SOURCES: &[&str] = &["u.email", "email", "u.phone", "c.ssn", "c.iban", "\"u\".\"email\"", "(u).email"];

/// Functions that keep enough of a text value to give it away; `{}` is the value.
const DISGUISES: &[&str] = &[
    "upper({})",
    "lower({})",
    "initcap({})",
    "{} || ''",
    "'<' || {} || '>'",
    "concat({}, '')",
    "concat_ws(',', {}, 'x')",
    "format('%s', {})",
    "format('%I', {})",
    "substr({}, 2)",
    "substring({} from 2 for 30)",
    "left({}, 30)",
    "right({}, 30)",
    "reverse({})",
    "replace({}, '@', ' at ')",
    "translate({}, '@.-', '#,_')",
    "regexp_replace({}, '(.)', '\\1 ', 'g')",
    "split_part({}, '@', 1)",
    "btrim({})",
    "lpad({}, 40, '*')",
    "overlay({} placing 'Q' from 1 for 1)",
    "encode(convert_to({}, 'UTF8'), 'hex')",
    "encode(convert_to({}, 'UTF8'), 'base64')",
    "encode(convert_to({}, 'UTF8'), 'escape')",
    "convert_to({}, 'UTF8')",
    "{}::bytea",
    "to_json({})",
    "to_jsonb({})::text",
    "json_build_object('k', {})",
    "jsonb_build_array({})",
    "row({}, 1)",
    "array[{}]",
    "(array[{}])[1]",
    "xmlelement(name e, {})",
    "quote_literal({})",
    "quote_ident({})",
    "{}::varchar(100)",
    "{}::char(60)",
    "{} COLLATE \"C\"",
    "CASE WHEN true THEN {} END",
    "coalesce(NULL, {})",
    "nullif({}, '')",
    "greatest({}, '')",
    "string_to_array({}, '@')",
    "regexp_split_to_array({}, '')",
    "unnest(array[{}])",
    "(SELECT {})",
    "md5({}) || {}",
    "(SELECT string_agg(ascii(ch)::text, ',') FROM regexp_split_to_table({}, '') ch)",
    "(SELECT string_agg(ch, '' ORDER BY n DESC) FROM regexp_split_to_table({}, '') WITH ORDINALITY AS t(ch, n))",
    "regexp_split_to_table({}, '')",
    "({})::bytea::text",
    "(jsonb_populate_record(NULL::users, jsonb_build_object('name', {}))).name",
    "(json_populate_record(NULL::customers, json_build_object('id', 1, 'ssn', 'x'))).ssn || {}",
    "jsonb_build_object('k', {}) ->> 'k'",
    "(xpath('/e/text()', xmlelement(name e, {})))[1]::text",
];

/// Aggregates, for the shapes that group.
const AGGREGATES: &[&str] = &[
    "min({})",
    "max({})",
    "string_agg({}, ',')",
    "array_agg({})",
    "json_agg({})",
    "jsonb_object_agg('k', {})",
    "xmlagg(xmlelement(name e, {}))",
    "mode() WITHIN GROUP (ORDER BY {})",
];

/// Query shapes; `{}` is an expression over `users u` (and `customers c`, joined).
const SHAPES: &[&str] = &[
    "SELECT {} FROM users u, customers c",
    "SELECT {} AS v FROM users u, customers c ORDER BY 1",
    "SELECT DISTINCT {} FROM users u, customers c",
    "WITH t AS (SELECT {} AS v FROM users u, customers c) SELECT v FROM t",
    "WITH t AS MATERIALIZED (SELECT {} AS v FROM users u, customers c) SELECT * FROM t",
    "SELECT * FROM (SELECT {} AS v FROM users u, customers c) s",
    "SELECT (SELECT {} FROM users u, customers c LIMIT 1)",
    "SELECT 'x' UNION ALL SELECT ({})::text FROM users u, customers c",
    "SELECT ({})::text FROM users u, customers c UNION SELECT 'x'",
    "SELECT ({})::text FROM users u, customers c INTERSECT SELECT ({})::text FROM users u, customers c",
    "VALUES ((SELECT {} FROM users u, customers c LIMIT 1))",
    "SELECT row_to_json(s) FROM (SELECT {} AS v FROM users u, customers c) s",
    "SELECT json_agg(s) FROM (SELECT {} AS v FROM users u, customers c) s",
    "SELECT s FROM (SELECT {} AS v FROM users u, customers c) s",
    "SELECT s::text FROM (SELECT {} AS v FROM users u, customers c) s",
    "SELECT * FROM users u CROSS JOIN customers c CROSS JOIN LATERAL (SELECT {} AS v) l",
    "SELECT ARRAY(SELECT ({})::text FROM users u, customers c)",
    "SELECT EXISTS (SELECT 1 FROM users u, customers c WHERE ({})::text IS NOT NULL), ({})::text FROM users u, customers c",
    "COPY (SELECT {} FROM users u, customers c) TO STDOUT",
    "COPY (SELECT {} FROM users u, customers c) TO STDOUT (FORMAT csv)",
    "BEGIN; DECLARE gc CURSOR FOR SELECT {} FROM users u, customers c; FETCH ALL gc; COMMIT",
    "PREPARE gp AS SELECT {} FROM users u, customers c; EXECUTE gp; DEALLOCATE gp",
    "SELECT ({})::int FROM users u, customers c",
    "SELECT ({})::date FROM users u, customers c",
    "SELECT ({})::json FROM users u, customers c",
    "SELECT ({})::inet FROM users u, customers c",
    "SELECT ({})::text::xml FROM users u, customers c",
    "SELECT to_number(({})::text, '999') FROM users u, customers c",
    "SELECT jsonb_path_query('{}', ({})::text::jsonpath) FROM users u, customers c",
    "SELECT 1 FROM users u, customers c WHERE ({})::text::int > 0",
    "SELECT v FROM users u, customers c, LATERAL regexp_split_to_table(({})::text, '') v",
    "SELECT * FROM regexp_split_to_table((SELECT string_agg(({})::text, ',') FROM users u, customers c), '') s",
    "SELECT * FROM jsonb_each_text((SELECT jsonb_build_object('k', {}) FROM users u, customers c LIMIT 1))",
    "SELECT * FROM json_populate_record(NULL::users, (SELECT json_build_object('name', {}) FROM users u, customers c LIMIT 1))",
    "SELECT * FROM unnest((SELECT array_agg(({})::text) FROM users u, customers c)) WITH ORDINALITY",
];

/// Shapes that aggregate; `{}` is an aggregate.
const GROUPED: &[&str] = &[
    "SELECT {} FROM users u, customers c",
    "SELECT u.id, {} FROM users u, customers c GROUP BY u.id",
    "SELECT (SELECT {} FROM users u, customers c)",
];

/// Each disguise of `u.email` in each shape, and each aggregate in each grouping shape.
pub(crate) fn systematic() -> Vec<String> {
    let mut out: Vec<String> = SHAPES
        .iter()
        .flat_map(|s| DISGUISES.iter().map(move |d| s.replace("{}", &d.replace("{}", "u.email"))))
        .collect();
    out.extend(
        GROUPED
            .iter()
            .flat_map(|s| AGGREGATES.iter().map(move |a| s.replace("{}", &a.replace("{}", "u.email")))),
    );
    out
}

/// `n` queries: a random source under one to three random disguises (or an aggregate), in a
/// random shape.
pub(crate) fn random(rng: &mut Rng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut e = rng.pick(SOURCES).to_string();
            for _ in 0..=rng.below(3) {
                e = rng.pick(DISGUISES).replace("{}", &e);
            }
            if rng.chance(20) {
                let a = rng.pick(AGGREGATES).replace("{}", &e);
                rng.pick(GROUPED).replace("{}", &a)
            } else {
                rng.pick(SHAPES).replace("{}", &e)
            }
        })
        .collect()
}

/// `text` as compared with a secret: lower case, letters and digits only, so that spacing,
/// punctuation and case put in by a disguise do not hide a value.
pub(crate) fn normalized(text: &str) -> String {
    text.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// The forms in which a secret can be given away by the disguises: as it is, reversed,
/// hex-encoded, and as its characters' codes (base64 is looked for by decoding the answer's base64-looking words, see
/// [`decoded_words`]); each [`normalized`].
pub(crate) fn forms(secret: &str) -> Vec<String> {
    let plain = normalized(secret);
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let codes: String = secret.bytes().map(|b| b.to_string()).collect();
    vec![plain.clone(), plain.chars().rev().collect(), hex, codes]
}

/// Words of `text` that decode as base64 (as `encode(..., 'base64')` writes it), decoded.
pub(crate) fn decoded_words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
        .filter(|w| w.len() >= 8)
        .filter_map(decode_base64)
        .collect()
}

/// `word` decoded as base64, padded or not (PostgreSQL pads; a word cut out of a longer text
/// need not be).
fn decode_base64(word: &str) -> Option<String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    let bytes = GeneralPurpose::new(&base64::alphabet::STANDARD, config).decode(word).ok()?;
    String::from_utf8(bytes).ok()
}

#[test]
fn the_generator_and_the_leak_forms_work() {
    assert_eq!(random(&mut Rng::new(3), 50), random(&mut Rng::new(3), 50));
    assert!(systematic().len() > 1000);
    assert_eq!(normalized("Alice.L iddell@Example"), "aliceliddellexample");
    assert!(forms("ab").contains(&"ba".to_string()) && forms("ab").contains(&"6162".to_string()));
    assert_eq!(decoded_words("x YWxpY2UubGlkZGVsbEBleGFtcGxlLmNvbQ== y"), ["alice.liddell@example.com"]);
}
