//! Masking in the data path: which masking entries of the policy apply to a session
//! ([`Rules`]), what each result column becomes ([`RowPlan`]), and the rewriting of the messages
//! that carry data toward the client: RowDescription, DataRow, CopyData rows, and the text fields
//! of ErrorResponse, NoticeResponse and NotificationResponse.
//!
//! Which columns are masked is decided in `session::relay` (it needs the catalog); this module
//! only applies the decisions. Everything here fails closed: a value that cannot be masked is an
//! error, never the raw value.

use bytes::{BufMut, Bytes, BytesMut};
use masking::detect::Detectors;
use masking::strategy::{Masker, Strategy};
use masking::value::{self, Format, MaskError};
use proto::events::Principal;
use proto::policy::{ColumnPattern, MaskedPredicates, PolicyDocument, UnknownLineage};
use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, Statement};

/// The masking entries that apply to one session, compiled.
pub struct Rules {
    columns: Vec<(ColumnPattern, Masker)>,
    detect: Option<(Detectors, Masker)>,
    /// Redaction: for values whose origin cannot be told, and values computed from masked
    /// columns, whatever strategy those columns have (`partial` of `lpad(substr(card, 1, 4),
    /// 9, '0')` would keep the four chosen digits).
    fallback: Masker,
    pub unknown: UnknownLineage,
    /// How masked columns may choose rows (`defaults.masked_predicates`).
    pub predicates: MaskedPredicates,
}

/// How strict a strategy is, for choosing one when entries disagree.
fn strictness(s: &Strategy) -> u8 {
    match s {
        Strategy::Redact => 3,
        Strategy::Hash => 2,
        Strategy::Partial { .. } => 1,
    }
}

impl Rules {
    /// The entries of `doc` for connection `conn` that `who` is not exempt from; `None` when
    /// nothing is masked for this session.
    pub fn compile(doc: &PolicyDocument, conn: &str, who: &Principal, key: &[u8]) -> Option<Self> {
        let mut columns = Vec::new();
        let mut detectors = Vec::new();
        let mut detect_strategy: Option<Strategy> = None;
        let mut any = false;
        for m in &doc.masking {
            if !(m.connections.is_empty() || m.connections.iter().any(|c| c == conn)) {
                continue;
            }
            if let Some(e) = &m.exempt
                && (who.in_any_group(&e.groups) || e.subjects.contains(&who.subject))
            {
                continue;
            }
            // The document was validated when applied; an entry that no longer parses masks
            // with the strictest strategy rather than not at all.
            let strategy = m
                .strategy
                .as_deref()
                .map_or(Ok(Strategy::Redact), Strategy::parse)
                .unwrap_or(Strategy::Redact);
            any = true;
            for c in &m.columns {
                match ColumnPattern::parse(c) {
                    Ok(p) => columns.push((p, Masker::new(strategy, key))),
                    Err(e) => {
                        tracing::warn!(pattern = %c, error = %e, "masking pattern does not parse; ignored")
                    }
                }
            }
            if !m.detectors.is_empty() {
                for d in &m.detectors {
                    match d.parse() {
                        Ok(d) => detectors.push(d),
                        Err(e) => tracing::warn!(detector = %d, error = %e, "unknown detector; ignored"),
                    }
                }
                if detect_strategy.as_ref().is_none_or(|s| strictness(&strategy) > strictness(s)) {
                    detect_strategy = Some(strategy);
                }
            }
        }
        if !any {
            return None;
        }
        detectors.sort_by_key(|d: &masking::detect::Detector| d.as_str());
        detectors.dedup();
        let detect = (!detectors.is_empty()).then(|| {
            (Detectors::new(&detectors), Masker::new(detect_strategy.unwrap_or(Strategy::Redact), key))
        });
        Some(Self {
            columns,
            detect,
            fallback: Masker::new(Strategy::Redact, key),
            unknown: doc.defaults.unknown_lineage,
            predicates: doc.defaults.masked_predicates,
        })
    }

    /// Are any columns masked by origin (so lineage and the catalog matter)?
    pub fn has_columns(&self) -> bool {
        !self.columns.is_empty()
    }

    /// The masker of the first entry covering `schema.table.column` (`column` `None`: any
    /// column of the table, for whole-row references).
    pub fn masker_for(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> Option<&Masker> {
        self.columns.iter().find(|(p, _)| p.covers(schema, table, column)).map(|(_, m)| m)
    }

    /// The masker for a column whose origin cannot be told, or that is computed from masked
    /// columns: redaction.
    pub fn fallback(&self) -> &Masker {
        &self.fallback
    }

    /// Run the detectors over a text (error fields, statements in events); `None` = unchanged.
    pub fn scrub(&self, text: &str) -> Option<String> {
        let (detectors, masker) = self.detect.as_ref()?;
        let hits = detectors.scan(text);
        if hits.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for h in hits {
            // Hits are on character boundaries; if one were not, mask the whole text rather
            // than return it unchanged.
            let (Some(before), Some(hit)) = (text.get(at..h.start), text.get(h.start..h.end)) else {
                return Some(masker.mask_text(text));
            };
            out.push_str(before);
            out.push_str(&masker.mask_hit(h.detector, hit));
            at = h.end;
        }
        out.push_str(text.get(at..).unwrap_or_default());
        Some(out)
    }

    fn detect(&self) -> Option<&(Detectors, Masker)> {
        self.detect.as_ref()
    }
}

/// One field of a RowDescription.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Bytes,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub typlen: i16,
    pub typmod: i32,
    pub format: i16,
}

/// Parse a RowDescription body.
pub fn read_fields(body: &[u8]) -> Option<Vec<Field>> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut b = body.get(2..)?;
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let end = b.iter().position(|&c| c == 0)?;
        let name = Bytes::copy_from_slice(&b[..end]);
        b = b.get(end + 1..)?;
        let f = b.get(..18)?;
        out.push(Field {
            name,
            table_oid: u32::from_be_bytes(f[0..4].try_into().ok()?),
            attnum: i16::from_be_bytes(f[4..6].try_into().ok()?),
            type_oid: u32::from_be_bytes(f[6..10].try_into().ok()?),
            typlen: i16::from_be_bytes(f[10..12].try_into().ok()?),
            typmod: i32::from_be_bytes(f[12..16].try_into().ok()?),
            format: i16::from_be_bytes(f[16..18].try_into().ok()?),
        });
        b = &b[18..];
    }
    Some(out)
}

/// Encode a RowDescription body.
pub fn write_fields(fields: &[Field]) -> Bytes {
    let mut b = BytesMut::with_capacity(2 + fields.len() * 32);
    b.put_i16(i16::try_from(fields.len()).unwrap_or(i16::MAX));
    for f in fields {
        b.put_slice(&f.name);
        b.put_u8(0);
        b.put_u32(f.table_oid);
        b.put_i16(f.attnum);
        b.put_u32(f.type_oid);
        b.put_i16(f.typlen);
        b.put_i32(f.typmod);
        b.put_i16(f.format);
    }
    b.freeze()
}

fn format_of(code: i16) -> Format {
    if code == 1 { Format::Binary } else { Format::Text }
}

/// What happens to each column of a result.
pub struct RowPlan {
    cols: Vec<Col>,
    detect: Option<(Detectors, Masker)>,
}

struct Col {
    oid: u32,
    format: Format,
    whole: Option<Masker>,
}

impl RowPlan {
    /// A plan for `fields`, where `whole[i]` is the masker of column `i` if it is masked as a
    /// whole. Detectors of `rules` run on every other column.
    pub fn new(rules: &Rules, fields: &[Field], whole: Vec<Option<Masker>>) -> Self {
        let cols = fields
            .iter()
            .zip(whole.into_iter().chain(std::iter::repeat(None)))
            .map(|(f, whole)| Col { oid: f.type_oid, format: format_of(f.format), whole })
            .collect();
        Self { cols, detect: rules.detect().cloned() }
    }

    /// Does the plan change anything?
    pub fn is_noop(&self) -> bool {
        self.detect.is_none() && self.cols.iter().all(|c| c.whole.is_none())
    }

    /// The RowDescription the client sees: whole-masked columns change type to what the masked
    /// value is (text, unless they were text already).
    pub fn describe(&self, fields: &[Field]) -> Option<Bytes> {
        if self.cols.iter().all(|c| c.whole.is_none()) {
            return None;
        }
        let mut out = fields.to_vec();
        for (f, c) in out.iter_mut().zip(&self.cols) {
            if c.whole.is_some() {
                let masked = value::masked_type(f.type_oid);
                if masked != f.type_oid {
                    f.type_oid = masked;
                    f.typlen = -1;
                    f.typmod = -1;
                }
            }
        }
        Some(write_fields(&out))
    }

    /// Mask a DataRow body; `Ok(None)` when nothing changed.
    pub fn mask_row(&self, body: &[u8]) -> Result<Option<Bytes>, MaskError> {
        let malformed = || MaskError::Decode { oid: 0, reason: "malformed DataRow".into() };
        let n = i16::from_be_bytes(body.get(..2).ok_or_else(malformed)?.try_into().map_err(|_| malformed())?);
        let n = usize::try_from(n).map_err(|_| malformed())?;
        if n != self.cols.len() {
            return Err(MaskError::Decode {
                oid: 0,
                reason: format!("a row of {n} values for {} columns", self.cols.len()),
            });
        }
        let mut b = &body[2..];
        let mut out: Option<BytesMut> = None;
        let mut copied_upto = 0usize;
        for col in &self.cols {
            let at = body.len() - b.len();
            let len =
                i32::from_be_bytes(b.get(..4).ok_or_else(malformed)?.try_into().map_err(|_| malformed())?);
            b = &b[4..];
            if len < 0 {
                continue;
            }
            let len = usize::try_from(len).map_err(|_| malformed())?;
            let v = b.get(..len).ok_or_else(malformed)?;
            b = &b[len..];
            let replaced = match (&col.whole, &self.detect) {
                (Some(m), _) => Some(value::mask_whole(m, col.oid, col.format, v)?),
                (None, Some((d, m))) => value::mask_detected(d, m, col.oid, col.format, v)?,
                (None, None) => None,
            };
            if let Some(new) = replaced {
                let o = out.get_or_insert_with(|| {
                    let mut o = BytesMut::with_capacity(body.len() + 64);
                    o.put_slice(&body[..2]);
                    o
                });
                o.put_slice(&body[copied_upto.max(2)..at]);
                o.put_i32(i32::try_from(new.len()).map_err(|_| malformed())?);
                o.put_slice(&new);
                copied_upto = body.len() - b.len();
            }
        }
        Ok(out.map(|mut o| {
            o.put_slice(&body[copied_upto.max(2)..]);
            o.freeze()
        }))
    }

    /// Mask one row of COPY TO output in `text` (tab-separated, backslash escapes) or `csv`.
    pub fn mask_copy_row(
        &self,
        row: &[u8],
        csv: Option<CsvShape>,
        delimiter: u8,
    ) -> Result<Option<Vec<u8>>, MaskError> {
        let fields = match csv {
            None => copy::split_text(row, delimiter),
            Some(shape) => copy::split_csv(row, delimiter, shape),
        }
        .ok_or_else(|| MaskError::Decode { oid: 0, reason: "malformed COPY row".into() })?;
        if fields.len() != self.cols.len() {
            return Err(MaskError::Decode {
                oid: 0,
                reason: format!("a COPY row of {} values for {} columns", fields.len(), self.cols.len()),
            });
        }
        let mut changed = false;
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(fields.len());
        for (v, col) in fields.into_iter().zip(&self.cols) {
            let Some(v) = v else {
                out.push(None);
                continue;
            };
            let replaced = match (&col.whole, &self.detect) {
                (Some(m), _) => Some(value::mask_whole(m, col.oid, Format::Text, &v)?),
                (None, Some((d, m))) => value::mask_detected(d, m, col.oid, Format::Text, &v)?,
                (None, None) => None,
            };
            changed |= replaced.is_some();
            out.push(Some(replaced.unwrap_or(v)));
        }
        if !changed {
            return Ok(None);
        }
        Ok(Some(match csv {
            None => copy::join_text(&out, delimiter),
            Some(shape) => copy::join_csv(&out, delimiter, shape),
        }))
    }
}

/// CSV quoting of a COPY.
#[derive(Debug, Clone, Copy)]
pub struct CsvShape {
    pub quote: u8,
    pub escape: u8,
}

/// The text fields of ErrorResponse and NoticeResponse that can echo data.
const DATA_FIELDS: &[u8] = b"MDHWq";

/// Rewrite an ErrorResponse or NoticeResponse body: detectors run on its text fields, and when
/// `withhold` (the statement reads masked columns, whose values the text may echo) the message
/// is replaced and detail, hint, context and internal query are dropped. `None` = unchanged.
pub fn mask_error(rules: &Rules, body: &[u8], withhold: bool) -> Option<Bytes> {
    let mut fields: Vec<(u8, String)> = Vec::new();
    let mut b = body;
    while let Some((&t, rest)) = b.split_first() {
        if t == 0 {
            break;
        }
        let Some(end) = rest.iter().position(|&c| c == 0) else {
            // Malformed: never relay text that could not be scanned.
            fields = vec![
                (b'S', "ERROR".into()),
                (b'C', "XX000".into()),
                (b'M', "airlock: a malformed error message from the target was withheld".into()),
            ];
            break;
        };
        fields.push((t, String::from_utf8_lossy(&rest[..end]).into_owned()));
        b = &rest[end + 1..];
    }
    let mut changed = b.first() != Some(&0);
    let code = fields.iter().find(|(t, _)| *t == b'C').map(|(_, v)| v.clone()).unwrap_or_default();
    if withhold {
        fields.retain(|(t, _)| !b"DHWqp".contains(t));
        for (t, v) in &mut fields {
            if *t == b'M' {
                *v = format!(
                    "airlock: the error text is withheld because the statement reads masked columns (SQLSTATE {code})"
                );
            }
        }
        changed = true;
    }
    for (t, v) in &mut fields {
        if DATA_FIELDS.contains(t)
            && let Some(s) = rules.scrub(v)
        {
            *v = s;
            changed = true;
        }
    }
    if !changed {
        return None;
    }
    let mut out = BytesMut::with_capacity(body.len());
    for (t, v) in fields {
        out.put_u8(t);
        out.put_slice(v.replace('\0', "").as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    Some(out.freeze())
}

/// Rewrite a ParameterStatus body: `application_name` is scrubbed by the detectors, or masked
/// as a whole when `withhold` (the running statement reads masked columns).
pub fn mask_parameter_status(rules: &Rules, body: &[u8], withhold: bool) -> Option<Bytes> {
    let end = body.iter().position(|&c| c == 0)?;
    let (name, rest) = (&body[..end], &body[end + 1..]);
    if name != b"application_name" {
        return None;
    }
    let value = String::from_utf8_lossy(rest.strip_suffix(b"\0").unwrap_or(rest));
    let masked = if withhold { Some(rules.fallback().mask_text(&value)) } else { rules.scrub(&value) }?;
    let mut out = BytesMut::new();
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(masked.replace('\0', "").as_bytes());
    out.put_u8(0);
    Some(out.freeze())
}

/// Rewrite a NotificationResponse (LISTEN/NOTIFY) body: the payload can carry any value, so it
/// is masked as a whole when columns are masked, else scrubbed by the detectors.
pub fn mask_notification(rules: &Rules, body: &[u8]) -> Option<Bytes> {
    let parsed = (|| {
        let pid = body.get(..4)?;
        let rest = body.get(4..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        let (channel, rest) = (&rest[..end], &rest[end + 1..]);
        let end = rest.iter().position(|&c| c == 0)?;
        Some((pid, channel, String::from_utf8_lossy(&rest[..end])))
    })();
    // Malformed: relay an empty notification rather than unscanned bytes.
    let Some((pid, channel, payload)) = parsed else { return Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0])) };
    let masked =
        if rules.has_columns() { Some(rules.fallback().mask_text(&payload)) } else { rules.scrub(&payload) }?;
    let mut out = BytesMut::new();
    out.put_slice(pid);
    out.put_slice(channel);
    out.put_u8(0);
    out.put_slice(masked.as_bytes());
    out.put_u8(0);
    Some(out.freeze())
}

mod copy {
    //! COPY TO rows: PostgreSQL's text format (delimiter-separated, backslash escapes, `\N` for
    //! NULL) and CSV (quoted fields, unquoted empty = NULL), split into values and joined back.

    use super::CsvShape;

    /// The raw fields of a text-format row: split at each delimiter that is not escaped (the
    /// server writes a delimiter inside a value as a backslash and the delimiter).
    fn raw_fields(row: &[u8], delim: u8) -> impl Iterator<Item = &[u8]> {
        let mut start = Some(0);
        std::iter::from_fn(move || {
            let s = start?;
            let mut i = s;
            while let Some(&c) = row.get(i)
                && c != delim
            {
                i += if c == b'\\' { 2 } else { 1 };
            }
            let end = i.min(row.len());
            start = (end < row.len()).then_some(end + 1);
            row.get(s..end)
        })
    }

    /// Split a text-format row (with its trailing newline) into unescaped values.
    pub(super) fn split_text(row: &[u8], delim: u8) -> Option<Vec<Option<Vec<u8>>>> {
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        let mut out = Vec::new();
        for raw in raw_fields(row, delim) {
            if raw == b"\\N" {
                out.push(None);
                continue;
            }
            let mut v = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                let c = raw[i];
                if c != b'\\' {
                    v.push(c);
                    i += 1;
                    continue;
                }
                let n = *raw.get(i + 1)?;
                i += 2;
                match n {
                    b'b' => v.push(8),
                    b'f' => v.push(12),
                    b'n' => v.push(b'\n'),
                    b'r' => v.push(b'\r'),
                    b't' => v.push(b'\t'),
                    b'v' => v.push(11),
                    b'0'..=b'7' => {
                        let mut x = u32::from(n - b'0');
                        for _ in 0..2 {
                            match raw.get(i) {
                                Some(d @ b'0'..=b'7') => {
                                    x = x * 8 + u32::from(d - b'0');
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        v.push(u8::try_from(x & 0xff).ok()?);
                    }
                    b'x' => {
                        let mut x = 0u32;
                        let mut digits = 0;
                        while digits < 2
                            && let Some(d) = raw.get(i).and_then(|d| char::from(*d).to_digit(16))
                        {
                            x = x * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        if digits == 0 {
                            v.push(b'x');
                        } else {
                            v.push(u8::try_from(x).ok()?);
                        }
                    }
                    other => v.push(other),
                }
            }
            out.push(Some(v));
        }
        Some(out)
    }

    /// Join values into a text-format row, escaped as the server escapes them
    /// (`CopyAttributeOutText`).
    pub(super) fn join_text(vals: &[Option<Vec<u8>>], delim: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            if i > 0 {
                out.push(delim);
            }
            match v {
                None => out.extend_from_slice(b"\\N"),
                Some(v) => {
                    for &c in v {
                        let escaped = match c {
                            8 => b'b',
                            12 => b'f',
                            b'\n' => b'n',
                            b'\r' => b'r',
                            b'\t' => b't',
                            11 => b'v',
                            b'\\' => b'\\',
                            c if c == delim => c,
                            c => {
                                out.push(c);
                                continue;
                            }
                        };
                        out.extend_from_slice(&[b'\\', escaped]);
                    }
                }
            }
        }
        out.push(b'\n');
        out
    }

    /// Split a CSV row; an unquoted empty field is NULL.
    pub(super) fn split_csv(row: &[u8], delim: u8, shape: CsvShape) -> Option<Vec<Option<Vec<u8>>>> {
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            if row.get(i) == Some(&shape.quote) {
                i += 1;
                let mut v = Vec::new();
                loop {
                    let c = *row.get(i)?;
                    if c == shape.escape && row.get(i + 1) == Some(&shape.quote) {
                        v.push(shape.quote);
                        i += 2;
                    } else if shape.escape != shape.quote
                        && c == shape.escape
                        && row.get(i + 1) == Some(&shape.escape)
                    {
                        v.push(shape.escape);
                        i += 2;
                    } else if c == shape.quote {
                        i += 1;
                        break;
                    } else {
                        v.push(c);
                        i += 1;
                    }
                }
                out.push(Some(v));
                match row.get(i) {
                    None => return Some(out),
                    Some(&c) if c == delim => i += 1,
                    Some(_) => return None,
                }
            } else {
                let end = row[i..].iter().position(|&c| c == delim).map_or(row.len(), |p| i + p);
                let v = &row[i..end];
                out.push(if v.is_empty() { None } else { Some(v.to_vec()) });
                if end == row.len() {
                    return Some(out);
                }
                i = end + 1;
            }
        }
    }

    pub(super) fn join_csv(vals: &[Option<Vec<u8>>], delim: u8, shape: CsvShape) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            if i > 0 {
                out.push(delim);
            }
            if let Some(v) = v {
                out.push(shape.quote);
                for &c in v {
                    if c == shape.quote || c == shape.escape {
                        out.push(shape.escape);
                    }
                    out.push(c);
                }
                out.push(shape.quote);
            }
        }
        out.push(b'\n');
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn text_rows_round_trip() {
            let row = b"1\talice@example.com\ta\\tb\\\\c\\nd\t\\N\n";
            let vals = split_text(row, b'\t').expect("valid");
            assert_eq!(vals[2].as_deref(), Some(&b"a\tb\\c\nd"[..]));
            assert_eq!(vals[3], None);
            assert_eq!(split_text(&join_text(&vals, b'\t'), b'\t').expect("valid"), vals);
            assert_eq!(split_text(b"\\x41\\101\n", b'\t').expect("valid")[0].as_deref(), Some(&b"AA"[..]));
        }

        #[test]
        fn escaped_delimiters_stay_in_their_value() {
            // `COPY ... (DELIMITER ',')` of ('a,b', 'c\,', NULL): the server escapes the commas.
            let row = b"a\\,b,c\\\\\\,,\\N\n";
            let vals = split_text(row, b',').expect("valid");
            assert_eq!(vals, vec![Some(b"a,b".to_vec()), Some(b"c\\,".to_vec()), None]);
            assert_eq!(join_text(&vals, b','), row.to_vec(), "joined back as the server wrote it");
            let row = b"tab\\there\tx\n";
            assert_eq!(join_text(&split_text(row, b'\t').expect("valid"), b'\t'), row.to_vec());
        }

        #[test]
        fn csv_rows_round_trip() {
            let shape = CsvShape { quote: b'"', escape: b'"' };
            let row = b"1,\"a,\"\"b\"\"\",,\"\"\n";
            let vals = split_csv(row, b',', shape).expect("valid");
            assert_eq!(vals, vec![Some(b"1".to_vec()), Some(b"a,\"b\"".to_vec()), None, Some(vec![])]);
            assert_eq!(split_csv(&join_csv(&vals, b',', shape), b',', shape).expect("valid"), vals);
            assert!(split_csv(b"\"open", b',', shape).is_none());
        }
    }
}

/// What a COPY TO writes: `None` for binary.
pub(crate) struct CopyShape {
    pub(crate) csv: Option<CsvShape>,
    pub(crate) delimiter: u8,
}

/// Is this encoding name UTF-8 (or SQL_ASCII, which the server does not convert), as
/// PostgreSQL spells it in any of its accepted forms?
pub(crate) fn utf8_like(name: &str) -> bool {
    matches!(name.to_ascii_uppercase().replace(['-', '_'], "").as_str(), "UTF8" | "UNICODE" | "SQLASCII")
}

/// The output shape of a COPY TO statement; `None` when it is binary or uses options that
/// change the shape in ways the gateway does not parse (then it refuses).
pub(crate) fn copy_shape(st: &Statement) -> Option<CopyShape> {
    let Statement::Copy { options, legacy_options, .. } = st else { return None };
    let mut csv = false;
    let mut binary = false;
    let mut delimiter = None;
    let mut quote = b'"';
    let mut escape = None;
    let byte = |c: char| u8::try_from(c).ok().filter(u8::is_ascii);
    for o in options {
        match o {
            CopyOption::Format(f) => match f.value.to_ascii_lowercase().as_str() {
                "text" => csv = false,
                "csv" => csv = true,
                _ => binary = true,
            },
            CopyOption::Delimiter(c) => delimiter = Some(byte(*c)?),
            CopyOption::Quote(c) => quote = byte(*c)?,
            CopyOption::Escape(c) => escape = Some(byte(*c)?),
            // Rows are split into fields byte by byte, which is how the server writes them only
            // in UTF-8 (and SQL_ASCII): in SJIS, BIG5, GBK and the like the second byte of a
            // character can be a quote or a delimiter, which the server does not escape.
            CopyOption::Encoding(e) if !utf8_like(e) => return None,
            CopyOption::Null(_) | CopyOption::Header(_) | CopyOption::Encoding(_) | CopyOption::Freeze(_) => {
            }
            CopyOption::ForceQuote(_) | CopyOption::ForceNotNull(_) | CopyOption::ForceNull(_) => {}
        }
    }
    for o in legacy_options {
        match o {
            CopyLegacyOption::Binary => binary = true,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(byte(*c)?),
            CopyLegacyOption::Null(_) | CopyLegacyOption::Header => {}
            CopyLegacyOption::Csv(opts) => {
                csv = true;
                for c in opts {
                    match c {
                        CopyLegacyCsvOption::Quote(c) => quote = byte(*c)?,
                        CopyLegacyCsvOption::Escape(c) => escape = Some(byte(*c)?),
                        CopyLegacyCsvOption::Header
                        | CopyLegacyCsvOption::ForceQuote(_)
                        | CopyLegacyCsvOption::ForceNotNull(_) => {}
                    }
                }
            }
            _ => return None,
        }
    }
    if binary {
        return Some(CopyShape { csv: None, delimiter: 0 });
    }
    Some(if csv {
        CopyShape {
            csv: Some(CsvShape { quote, escape: escape.unwrap_or(quote) }),
            delimiter: delimiter.unwrap_or(b','),
        }
    } else {
        CopyShape { csv: None, delimiter: delimiter.unwrap_or(b'\t') }
    })
}

/// What masking must know of a message's statements before they run, whatever the rules
/// (0-based statement indexes): the first COPY TO whose output cannot be masked (binary, or
/// options the gateway does not parse), and the first whose result columns' origins cannot
/// all be told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrecheckFacts {
    pub unmaskable_copy: Option<usize>,
    pub unclear_lineage: Option<usize>,
    /// What the values the statements store derive from ([`masking::lineage::Lineage::written`]).
    pub written: Vec<masking::lineage::ColumnRef>,
    /// The first statement that stores values whose sources cannot be told.
    pub unclear_writes: Option<usize>,
    /// The columns that choose rows other than by equality lookups, each with the first
    /// statement that uses it so ([`masking::lineage::Lineage::chooses`]): checked against
    /// `defaults.masked_predicates`.
    pub chooses: Vec<(masking::lineage::ColumnRef, usize)>,
    /// The columns that choose rows by equality lookups only, across the statements
    /// ([`masking::lineage::Lineage::looked_up`]), each with the first statement that does.
    pub looked_up: Vec<(masking::lineage::ColumnRef, usize)>,
    /// The first statement naming tables whose row-choosing columns cannot all be told (its
    /// lineage cannot be analysed, or part of it).
    pub unclear_choice: Option<usize>,
}

impl PrecheckFacts {
    /// Does any statement choose rows by a column, or may it?
    pub fn chooses_rows(&self) -> bool {
        !self.chooses.is_empty() || !self.looked_up.is_empty() || self.unclear_choice.is_some()
    }
}

/// [`PrecheckFacts`] of parsed statements.
pub(crate) fn precheck_facts(stmts: &[Statement]) -> PrecheckFacts {
    let mut facts = PrecheckFacts::default();
    for (i, st) in stmts.iter().enumerate() {
        if facts.unmaskable_copy.is_none()
            && let Statement::Copy { to: true, .. } = st
            && copy_shape(st).is_none_or(|s| s.csv.is_none() && s.delimiter == 0)
        {
            facts.unmaskable_copy = Some(i);
        }
        let lineage = masking::lineage::lineage(st);
        if facts.unclear_lineage.is_none() {
            let unclear = match &lineage {
                Ok(l) => {
                    !l.exact
                        || l.outputs
                            .iter()
                            .any(|o| matches!(o, masking::lineage::Output::Column { opaque: true, .. }))
                }
                Err(_) => true,
            };
            if unclear {
                facts.unclear_lineage = Some(i);
            }
        }
        match lineage {
            Ok(l) => {
                for r in l.written {
                    if !facts.written.contains(&r) {
                        facts.written.push(r);
                    }
                }
                for r in l.chooses {
                    if !facts.chooses.iter().any(|(c, _)| *c == r) {
                        facts.chooses.push((r, i));
                    }
                }
                for r in l.looked_up {
                    if !facts.looked_up.iter().any(|(c, _)| *c == r) {
                        facts.looked_up.push((r, i));
                    }
                }
                if l.chooses_unknown {
                    facts.unclear_choice.get_or_insert(i);
                }
            }
            Err(e) => {
                if stores_values(st) {
                    facts.unclear_writes.get_or_insert(i);
                }
                // What a statement naming no table chooses rows by (`SHOW`, `FETCH`, `EXECUTE`
                // of a statement checked when prepared) is no table's column.
                if names_tables(st) {
                    tracing::debug!(error = %e, "the columns choosing a statement's rows cannot be told");
                    facts.unclear_choice.get_or_insert(i);
                }
            }
        }
    }
    facts
}

/// Does the statement name a table, view or function in FROM anywhere?
fn names_tables(st: &Statement) -> bool {
    sqlparser::ast::visit_relations(st, |_| std::ops::ControlFlow::Break(())).is_break()
}

/// Does the statement store values it computes (so they could come from masked columns), or
/// give stored values another identity (a rename; see [`masking::lineage::Lineage::written`])?
fn stores_values(st: &Statement) -> bool {
    use sqlparser::ast::{AlterTableOperation as T, AlterViewOperation as V};
    match st {
        Statement::Insert(_) | Statement::Update(_) | Statement::Merge(_) => true,
        Statement::CreateTable(ct) => ct.query.is_some(),
        Statement::AlterTable(at) => at.operations.iter().any(|op| {
            matches!(
                op,
                T::RenameColumn { .. }
                    | T::ChangeColumn { .. }
                    | T::RenameTable { .. }
                    | T::NoInherit { .. }
                    | T::DetachPartitionOf { .. }
                    | T::SwapWith { .. }
            )
        }),
        Statement::AlterView(av) => {
            matches!(av.operation, V::RenameColumn { .. } | V::RenameTo { .. } | V::SetSchema { .. })
        }
        Statement::AlterSchema(a) => masking::lineage::renames_schema(a),
        // SELECT INTO, or a writing CTE: the query's text says which.
        Statement::Query(q) => {
            let text = q.to_string().to_ascii_lowercase();
            [" into ", "insert ", "update ", "merge "].iter().any(|w| text.contains(w))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml_masking: &str) -> Rules {
        let doc = proto::policy::parse(&format!(
            "connections:\n  - {{ name: shop, kind: postgres, upstream: {{ host: h, port: 5432, database: d }}, \
             credentials: {{ user: u, password_env: P }} }}\nmasking:\n{yaml_masking}"
        ))
        .expect("valid policy");
        let who = Principal { subject: "agent".into(), groups: vec!["agents".into()], kind: "oidc".into() };
        Rules::compile(&doc, "shop", &who, b"0123456789abcdef0123456789abcdef").expect("rules apply")
    }

    fn fields(body: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        let mut b = body;
        while let Some((&t, rest)) = b.split_first() {
            if t == 0 {
                break;
            }
            let end = rest.iter().position(|&c| c == 0).expect("terminated");
            out.push((t, String::from_utf8_lossy(&rest[..end]).into_owned()));
            b = &rest[end + 1..];
        }
        out
    }

    fn error_body(parts: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in parts {
            b.push(*t);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn errors_are_scrubbed_and_withheld_and_malformed_ones_replaced() {
        let r = rules("  - { columns: [users.email], detectors: [email] }\n");
        let body = error_body(&[
            (b'S', "ERROR"),
            (b'C', "22P02"),
            (b'M', "invalid input syntax for type integer: \"bob@example.com\""),
            (b'D', "Key (email)=(bob@example.com)"),
        ]);
        let scrubbed = fields(&mask_error(&r, &body, false).expect("changed"));
        assert!(scrubbed.iter().all(|(_, v)| !v.contains("bob@")), "{scrubbed:?}");
        assert!(scrubbed.iter().any(|(t, _)| *t == b'D'));
        let withheld = fields(&mask_error(&r, &body, true).expect("changed"));
        assert!(withheld.iter().all(|(t, _)| *t != b'D'), "{withheld:?}");
        assert!(withheld.iter().any(|(t, v)| *t == b'M' && v.contains("withheld") && v.contains("22P02")));
        let clean = error_body(&[(b'S', "ERROR"), (b'C', "42601"), (b'M', "syntax error")]);
        assert!(mask_error(&r, &clean, false).is_none());
        let malformed = b"SERROR\0Mbob@example.com never ends";
        let replaced = fields(&mask_error(&r, malformed, false).expect("replaced"));
        assert!(replaced.iter().all(|(_, v)| !v.contains("bob@")), "{replaced:?}");
    }

    #[test]
    fn notifications_and_application_name_are_masked() {
        let r = rules("  - { columns: [users.email] }\n");
        let mut body = vec![0, 0, 0, 7];
        body.extend_from_slice(b"chan\0alice@example.com\0");
        let out = mask_notification(&r, &body).expect("masked");
        assert!(!String::from_utf8_lossy(&out).contains("alice@"));
        assert_eq!(&out[..4], &[0, 0, 0, 7]);
        assert!(mask_notification(&r, b"\0\0").is_some_and(|b| b.len() == 6), "malformed becomes empty");
        let d = rules("  - { detectors: [email] }\n");
        let status = b"application_name\0mail alice@example.com\0";
        let out = mask_parameter_status(&d, status, false).expect("scrubbed");
        assert!(!String::from_utf8_lossy(&out).contains("alice@"));
        assert!(mask_parameter_status(&d, b"TimeZone\0UTC\0", true).is_none());
        let out = mask_parameter_status(&d, b"application_name\0psql\0", true).expect("withheld");
        assert!(!String::from_utf8_lossy(&out).contains("psql"));
    }

    #[test]
    fn precheck_facts_tell_what_chooses_rows_per_statement() {
        let parse = |sql: &str| {
            sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql).unwrap()
        };
        let email = masking::lineage::ColumnRef::column(None, "users", "email");
        let f = precheck_facts(&parse(
            "SELECT 1; SELECT id FROM users WHERE email = $1; SELECT id FROM users ORDER BY email",
        ));
        assert_eq!(f.looked_up, [(email.clone(), 1)]);
        assert!(f.chooses.contains(&(email, 2)), "{f:?}");
        assert!(f.unclear_choice.is_none() && f.chooses_rows());
        // A statement naming tables whose lineage cannot be told; one naming none is clear.
        let f = precheck_facts(&parse("SHOW search_path; EXECUTE p((SELECT email FROM users LIMIT 1))"));
        assert_eq!(f.unclear_choice, Some(1), "{f:?}");
        assert!(!precheck_facts(&parse("SELECT email FROM users; FETCH 1 FROM c")).chooses_rows());
    }

    #[test]
    fn exempt_principals_and_other_connections_get_no_rules() {
        let doc = proto::policy::parse(
            "connections:\n  - { name: shop, kind: postgres, upstream: { host: h, port: 5432, database: d }, \
             credentials: { user: u, password_env: P } }\nmasking:\n  - { connections: [shop], columns: [users.email], \
             exempt: { groups: [dba] } }\n",
        )
        .expect("valid");
        let dba = Principal { subject: "d".into(), groups: vec!["dba".into()], kind: "oidc".into() };
        let agent = Principal { subject: "a".into(), groups: vec![], kind: "oidc".into() };
        assert!(Rules::compile(&doc, "shop", &dba, b"k").is_none());
        assert!(Rules::compile(&doc, "other", &agent, b"k").is_none());
        let r = Rules::compile(&doc, "shop", &agent, b"k").expect("applies");
        assert!(r.masker_for(Some("public"), "users", Some("email")).is_some());
        assert!(r.masker_for(Some("public"), "users", Some("name")).is_none());
    }
}
