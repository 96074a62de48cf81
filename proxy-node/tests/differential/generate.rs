//! A generated corpus for the differential test: every way the hand-written corpus hides a
//! write, crossed with every write, and then recombined at random with the lexical tricks an
//! agent would try (comments, whitespace, case, quoting, literals that swallow or end the text).
//!
//! The statements are built from pieces:
//! - a **payload**: something that writes (a DML statement, a call of a writing function, a
//!   query that locks or reads through a writing view, a utility statement), or that only
//!   reads, so both sides of the classifier are exercised;
//! - a **context** that embeds it where that kind of payload can stand (a CTE, `EXPLAIN
//!   ANALYZE`, a subquery, a `WHERE`, `ORDER BY` or `LIMIT`, `PREPARE` then `EXECUTE`, `COPY
//!   (...) TO STDOUT`, a second statement of the message, a transaction block, ...);
//! - for the random part, a **trick** placed before it (a literal or comment that a careless
//!   lexer reads as swallowing the rest) and **surface** changes (the spaces between tokens
//!   replaced by other whitespace or comments, letters recased, names qualified or quoted,
//!   written with `U&` escapes).
//!
//! Any text is a fair test: whatever the server makes of it, a statement the classifier calls
//! read-only must not write. The generator is deterministic for a seed, so a failure can be
//! reproduced; `DIFFERENTIAL_SEED` and `DIFFERENTIAL_RANDOM` choose another seed and size.

use crate::common::Rng;

/// Where a payload can stand.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// INSERT, UPDATE or DELETE: takes `RETURNING`, can be a CTE.
    Dml,
    /// A scalar expression (a function call, an operator, a cast).
    Expr,
    /// A whole query (`SELECT ...`).
    Query,
    /// Any other statement: stands alone only.
    Stmt,
}

/// (kind, text). `{file}` is a CSV file the server can read.
const PAYLOADS: &[(Kind, &str)] = &[
    // Writes.
    (Kind::Dml, "DELETE FROM orders WHERE id = 1"),
    (Kind::Dml, "UPDATE orders SET item = 'u' WHERE id = 2"),
    (Kind::Dml, "INSERT INTO orders VALUES (91, 'i')"),
    (Kind::Dml, "INSERT INTO orders VALUES (1, 'c') ON CONFLICT (id) DO UPDATE SET item = 'c'"),
    (Kind::Dml, "INSERT INTO orders SELECT id + 100, item FROM orders"),
    (Kind::Dml, "DELETE FROM payments USING orders WHERE payments.order_id = orders.id"),
    (Kind::Dml, r#"UPDATE "MixedCase" SET id = 5"#),
    (Kind::Dml, r#"INSERT INTO app."Audit" (note) VALUES ('a')"#),
    (Kind::Expr, "w_insert()"),
    (Kind::Expr, "s_sneaky()"),
    (Kind::Expr, "nextval('order_seq')"),
    (Kind::Expr, "setval('order_seq', 7)"),
    (Kind::Expr, "lower(1)"),
    (Kind::Expr, "op_write(1, 2)"),
    (Kind::Expr, "(1 ### 2)"),
    (Kind::Expr, "CAST(1 AS sneaky_int)"),
    (Kind::Expr, "1::sneaky_int"),
    (Kind::Expr, "'1'::sneaky_int"),
    (Kind::Expr, "sneaky_int '1'"),
    (Kind::Expr, "CAST('1' AS public.sneaky_int)"),
    (Kind::Expr, "ARRAY[1]::sneaky_int[]"),
    (Kind::Expr, "(1 OPERATOR(public.###) 2)"),
    (Kind::Expr, "w_touch(NULL::orders)"),
    (Kind::Expr, "(SELECT w_touch(o) FROM orders o LIMIT 1)"),
    (Kind::Expr, "(SELECT (o).w_touch FROM orders o LIMIT 1)"),
    (Kind::Expr, "lo_create(0)"),
    (Kind::Query, "SELECT * FROM orders FOR UPDATE"),
    (Kind::Query, "SELECT id FROM orders FOR NO KEY UPDATE SKIP LOCKED"),
    (Kind::Query, "SELECT * FROM v_sneaky"),
    (Kind::Query, "SELECT * FROM v_touch"),
    (Kind::Query, "SELECT o.w_touch FROM orders o"),
    (
        Kind::Stmt,
        "MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id WHEN MATCHED THEN UPDATE SET item = 'm'",
    ),
    (Kind::Stmt, "TRUNCATE payments"),
    (Kind::Stmt, "CALL p_insert()"),
    (Kind::Stmt, "DO $$BEGIN DELETE FROM orders; END$$"),
    (Kind::Stmt, "COPY orders FROM '{file}' WITH (FORMAT csv)"),
    (Kind::Stmt, "CREATE TABLE g_t (id int)"),
    (Kind::Stmt, "DROP TABLE payments"),
    (Kind::Stmt, "ALTER TABLE orders ADD COLUMN g int"),
    (Kind::Stmt, "REFRESH MATERIALIZED VIEW mv_orders"),
    (Kind::Stmt, "COMMENT ON TABLE orders IS 'g'"),
    (Kind::Stmt, "SELECT * INTO g_copy FROM orders"),
    (Kind::Stmt, "CREATE TABLE g_as AS SELECT * FROM orders"),
    (Kind::Stmt, "EXPLAIN ANALYZE CREATE TABLE g_ex AS SELECT 1"),
    (Kind::Stmt, "EXPLAIN ANALYZE SELECT * INTO g_ei FROM orders"),
    (Kind::Stmt, "CREATE TEMP TABLE g_tmp AS SELECT w_insert()"),
    (Kind::Stmt, "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"),
    (Kind::Stmt, "SECURITY LABEL ON TABLE orders IS 'g'"),
    (Kind::Stmt, "CLUSTER orders USING orders_pkey"),
    (Kind::Stmt, "NOTIFY g, 'x'"),
    (Kind::Stmt, "TABLE v_sneaky"),
    (Kind::Stmt, "TABLE v_touch"),
    (Kind::Stmt, "SELECT 1 FROM orders FOR UPDATE OF orders"),
    (Kind::Stmt, "VALUES ((SELECT count(*) FROM v_sneaky))"),
    // Reads.
    (Kind::Expr, "s_count()"),
    (Kind::Expr, "i_double(3)"),
    (Kind::Expr, "length('x')"),
    (Kind::Query, "SELECT * FROM orders"),
    (Kind::Query, "SELECT count(*) FROM payments"),
    (Kind::Stmt, "TABLE orders"),
    (Kind::Stmt, "SHOW search_path"),
];

/// Contexts by kind; `{}` is the payload.
fn contexts(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Dml => &[
            "{}",
            "{} RETURNING *",
            "WITH g AS ({} RETURNING *) SELECT * FROM g",
            "WITH g AS ({}) SELECT 1",
            "WITH r AS (SELECT 1) {}",
            "EXPLAIN ANALYZE {}",
            "EXPLAIN (ANALYZE) {}",
            "EXPLAIN (ANALYZE TRUE, COSTS OFF) {}",
            "EXPLAIN (FORMAT JSON, ANALYSE) {}",
            "explain analyse verbose {}",
            "PREPARE gp AS {}; EXECUTE gp",
            "PREPARE gp AS {}; EXPLAIN ANALYZE EXECUTE gp",
            "COPY ({} RETURNING *) TO STDOUT",
            "SELECT 1; {}",
            "BEGIN; {}; COMMIT",
            "BEGIN; SAVEPOINT s; {}; RELEASE s; COMMIT",
        ],
        Kind::Expr => &[
            "SELECT {}",
            "SELECT 1 WHERE {} IS NOT NULL",
            "SELECT * FROM orders WHERE id = {}",
            "VALUES ({})",
            "SELECT (SELECT {})",
            "SELECT * FROM (SELECT {}) s",
            "WITH g AS MATERIALIZED (SELECT {}) SELECT * FROM g",
            "SELECT {} FROM orders LIMIT 1",
            "SELECT CASE WHEN true THEN {} END",
            "SELECT coalesce(NULL, {})",
            "SELECT ARRAY[{}]",
            "SELECT row({})",
            "SELECT 1 ORDER BY {}",
            "SELECT 1 GROUP BY 1 HAVING {} IS NOT NULL",
            "SELECT * FROM orders o JOIN payments p ON {} IS NOT NULL",
            "SELECT count({}) FROM orders",
            "SELECT * FROM orders, LATERAL (SELECT {}) l",
            "TABLE orders LIMIT {}",
            "EXPLAIN ANALYZE SELECT {}",
            "PREPARE gp AS SELECT {}; EXECUTE gp",
            "COPY (SELECT {}) TO STDOUT",
            "SELECT format('%s', {})",
            "SELECT * FROM {} f",
            "SELECT * FROM ROWS FROM ({}) f",
            "SELECT * FROM COALESCE({}) f",
            "SELECT * FROM LEAST({}, 0) f",
            "SELECT * FROM TRIM(({})::text) f",
            "SELECT * FROM SUBSTRING(({})::text FROM 1) f",
            "SELECT * FROM OVERLAY('abc' PLACING ({})::text FROM 1) f",
            "SELECT * FROM POSITION('a' IN ({})::text) f",
            "SELECT * FROM EXTRACT(DAY FROM now() + ({}) * interval '1 day') f",
            "SELECT * FROM NORMALIZE(({})::text) f",
            "SELECT * FROM XMLPARSE(CONTENT ({})::text) f",
            "SELECT * FROM XMLELEMENT(NAME e, {}) f",
            "SELECT * FROM XMLFOREST({} AS a) f",
            "SELECT * FROM TREAT({} AS int) f",
            "SELECT xmlforest({} AS a)",
            "SELECT xmlelement(name e, xmlattributes({} AS a))",
            "SELECT XMLEXISTS('//x' PASSING BY REF ('<x>' || ({})::text || '</x>')::xml)",
            "SELECT {} IS DISTINCT FROM 1",
            "SELECT {} BETWEEN 0 AND 1",
            "SELECT (ROW({})).f1",
            "SELECT * FROM orders WHERE id = ANY (SELECT {})",
            "SELECT sum(1) OVER (PARTITION BY {})",
            "SELECT 1 GROUP BY ROLLUP ({})",
            "SELECT 1 GROUP BY GROUPING SETS (({}), ())",
            "SELECT count(*) OVER w FROM orders WINDOW w AS (ORDER BY {})",
            "SELECT format(VARIADIC ARRAY[({})::text])",
            "SELECT i_double(({})::int)",
            "SELECT s_count() + {}",
            "SELECT * FROM GREATEST({}, 0) f",
            "SELECT * FROM NULLIF({}, 0) f",
            "SELECT * FROM generate_series(1, {}) g",
            "SELECT row_number() OVER (ORDER BY {})",
            "SELECT count(*) FILTER (WHERE {} IS NOT NULL) FROM orders",
            "SELECT DISTINCT ON ({}) 1",
            "SELECT 1 OFFSET {} - {}",
            "SELECT 1 FETCH FIRST {} ROWS ONLY",
            "SELECT {} = ANY (ARRAY[1])",
            "SELECT {} IN (1, 2)",
            "SELECT (({}))::text",
            "SELECT * FROM orders TABLESAMPLE BERNOULLI ({})",
            "BEGIN; DECLARE gc CURSOR FOR SELECT {}; FETCH gc; COMMIT",
            "DECLARE gc CURSOR WITH HOLD FOR SELECT {}",
            "SELECT 1 UNION SELECT {}",
            "SELECT * FROM orders WHERE EXISTS (SELECT {})",
        ],
        Kind::Query => &[
            "{}",
            "WITH g AS MATERIALIZED ({}) SELECT * FROM g",
            "SELECT * FROM ({}) q",
            "SELECT EXISTS ({})",
            "EXPLAIN ANALYZE {}",
            "PREPARE gp AS {}; EXECUTE gp",
            "COPY ({}) TO STDOUT",
            "DECLARE gc CURSOR WITH HOLD FOR {}",
            "BEGIN; DECLARE gc CURSOR FOR {}; FETCH ALL gc; COMMIT",
            "SELECT 1 WHERE EXISTS ({})",
        ],
        Kind::Stmt => &["{}", "SELECT 1; {}", "{}; SELECT 1", "BEGIN; {}; COMMIT", "SELECT 1;{};"],
    }
}

/// Placed before a statement: each makes a lexer that reads literals or comments differently
/// from PostgreSQL see less (or more) than the server runs.
const TRICKS: &[&str] = &[
    "",
    "SELECT 'a\\'; ",
    "SELECT e'\\''; ",
    "SELECT E'x\\\\'; ",
    "SELECT $a$ $ $a$; ",
    "SELECT $a$$$a$; ",
    "SELECT U&'\\0041' UESCAPE '\\'; ",
    "SELECT U&\"a\" FROM (SELECT 1 AS \"a\") s; ",
    "SELECT 1 /* /* nested */ */; ",
    "SELECT 1 /* ; */; ",
    "SELECT 1; --\r",
    "SELECT 1; -- x\n",
    "SELECT '--'; ",
    "SELECT '/*'; ",
    "SELECT \"/*\" FROM (SELECT 1 AS \"/*\") s; ",
    "SELECT 1 \\; ",
    ";",
    "; ; ",
    "SELECT 1 /* unterminated ",
    "SELECT $$ unterminated ",
    "SELECT 'it''s'; ",
    "SELECT \"a\"\"b\" FROM (SELECT 1 AS \"a\"\"b\") s; ",
    "SELECT E'\\x27'; ",
    "SELECT 1 -- \u{2028} not a line end\n; ",
];

/// What a single space between tokens may be replaced by.
const SPACES: &[&str] =
    &[" ", "\t", "\n", "\r\n", "\x0c", "/**/", " /* ; */ ", "/* /* */ */", " --c\n", " --c\r"];

/// Spellings of the names the payloads use.
const NAMES: &[(&str, &[&str])] = &[
    (
        "orders",
        &[
            "public.orders",
            "\"orders\"",
            "public.\"orders\"",
            "\"public\".orders",
            "U&\"\\006frders\"",
            "ORDERS",
        ],
    ),
    ("payments", &["public.payments", "\"payments\"", "U&\"pay!006dents\" UESCAPE '!'", "Payments"]),
    ("w_insert", &["public.w_insert", "\"w_insert\"", "U&\"w\\005finsert\"", "W_INSERT"]),
    ("nextval", &["pg_catalog.nextval", "\"nextval\"", "NEXTVAL"]),
    ("lower", &["public.lower", "\"lower\""]),
    ("p_insert", &["public.p_insert", "\"p_insert\""]),
];

/// Every payload in every context of its kind.
pub(crate) fn systematic() -> Vec<String> {
    PAYLOADS.iter().flat_map(|(kind, p)| contexts(*kind).iter().map(move |c| c.replace("{}", p))).collect()
}

/// `n` statements: a random payload in a random context, after a random trick, with random
/// surface changes.
pub(crate) fn random(rng: &mut Rng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let (kind, payload) = rng.pick(PAYLOADS);
            let mut sql = rng.pick(contexts(kind)).replace("{}", payload);
            if rng.chance(50) {
                sql = respell_names(rng, &sql);
            }
            if rng.chance(30) {
                sql = recase(rng, &sql);
            }
            if rng.chance(60) {
                sql = respace(rng, &sql);
            }
            format!("{}{sql}", rng.pick(TRICKS))
        })
        .collect()
}

/// Replace whole-word occurrences of the known names with another spelling of them.
fn respell_names(rng: &mut Rng, sql: &str) -> String {
    let mut out = sql.to_string();
    for (name, spellings) in NAMES {
        if rng.chance(70) {
            out = replace_word(&out, name, rng.pick(spellings));
        }
    }
    out
}

fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        // Not part of a longer name, nor already qualified or quoted.
        if before.is_none_or(|c| !is_word(c) && c != '.' && c != '"')
            && after.is_none_or(|c| !is_word(c) && c != '"')
        {
            out.push_str(with);
        } else {
            out.push_str(word);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Change the case of letters outside quotes (inside them it would change the literal or the
/// name, which is fine but less interesting).
fn recase(rng: &mut Rng, sql: &str) -> String {
    let upper = rng.chance(50);
    let mut quote: Option<char> = None;
    sql.chars()
        .map(|c| {
            match (quote, c) {
                (None, '\'' | '"' | '$') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                _ => {}
            }
            if quote.is_some() || !c.is_ascii_alphabetic() || !rng.chance(40) {
                c
            } else if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Replace some single spaces outside quotes with other whitespace or comments.
fn respace(rng: &mut Rng, sql: &str) -> String {
    let mut quote: Option<char> = None;
    let mut out = String::with_capacity(sql.len() * 2);
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"' | '$') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
        if c == ' ' && quote.is_none() && rng.chance(30) {
            out.push_str(rng.pick(SPACES));
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_generator_is_deterministic_and_varied() {
    let a = random(&mut Rng::new(7), 200);
    let b = random(&mut Rng::new(7), 200);
    assert_eq!(a, b);
    let distinct: std::collections::HashSet<&String> = a.iter().collect();
    assert!(distinct.len() > 150, "{} distinct of 200", distinct.len());
    assert!(a.iter().any(|s| s.contains("/**/") || s.contains('\t')));
    assert!(a.iter().any(|s| s.contains("U&\"")));
    assert!(systematic().len() > 300);
    assert_eq!(replace_word("orders o, payments", "orders", "public.orders"), "public.orders o, payments");
    assert_eq!(replace_word("public.orders, orders_x", "orders", "X"), "public.orders, orders_x");
}
