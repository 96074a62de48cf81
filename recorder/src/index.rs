//! The Parquet index for auditors' own tools (DuckDB, Athena, Trino): one row per request.
//!
//! `index/date=YYYY-MM-DD/{session}.parquet` (Hive-style partition key `date`, the session's
//! date), written when the session's manifest is, and rewritten with it. Columns (see
//! [`SCHEMA`]): `time`, `session`, `principal`, `groups`, `connection`, `seq`, `operations`,
//! `tables`, `statement` (literals masked as `?`), `rule`, `decision` (allow/hold/deny),
//! `hold_outcome` (approved/denied/expired), `approver`, `rows`, `bytes` (of the captured result
//! as the agent saw it), `duration_us`, `error`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use object_store::path::Path;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use proto::events::{Envelope, Event, HoldDecision, Timestamp};
use uuid::Uuid;

use crate::error::IndexError;

/// The folder of the index.
pub(crate) const INDEX_ROOT: &str = "index";

/// The Parquet schema of the index.
pub const SCHEMA: &str = "
message request {
  required int64 time (TIMESTAMP(MICROS,true));
  required binary session (UTF8);
  optional binary principal (UTF8);
  optional group groups (LIST) { repeated group list { optional binary element (UTF8); } }
  optional binary connection (UTF8);
  required int64 seq;
  optional group operations (LIST) { repeated group list { optional binary element (UTF8); } }
  optional group tables (LIST) { repeated group list { optional binary element (UTF8); } }
  optional binary statement (UTF8);
  optional binary rule (UTF8);
  optional binary decision (UTF8);
  optional binary hold_outcome (UTF8);
  optional binary approver (UTF8);
  optional int64 rows;
  optional int64 bytes;
  optional int64 duration_us;
  optional binary error (UTF8);
}
";

/// The key of a session's index file.
pub(crate) fn index_path(date: &str, session: Uuid) -> Path {
    Path::from_iter([INDEX_ROOT.to_string(), format!("date={date}"), format!("{session}.parquet")])
}

#[derive(Debug, Default, Clone)]
struct Row {
    time: Option<Timestamp>,
    statement: Option<String>,
    operations: Vec<String>,
    tables: Vec<String>,
    rule: Option<String>,
    decision: Option<String>,
    hold_outcome: Option<String>,
    approver: Option<String>,
    rows: Option<i64>,
    bytes: Option<i64>,
    duration_us: Option<i64>,
    error: Option<String>,
}

/// Collects a session's requests as its events are recorded (in any order).
#[derive(Debug, Default)]
pub(crate) struct IndexBuilder {
    principal: Option<String>,
    groups: Vec<String>,
    connection: Option<String>,
    rows: BTreeMap<u64, Row>,
    hold_seq: HashMap<Uuid, u64>,
    /// Decisions seen before their hold request.
    early_decisions: HashMap<Uuid, HoldDecision>,
}

impl IndexBuilder {
    pub(crate) fn add(&mut self, env: &Envelope) {
        match &env.event {
            Event::SessionStarted { principal, connection, .. } => {
                self.principal = Some(principal.subject.clone());
                self.groups = principal.groups.clone();
                self.connection = Some(connection.clone());
            }
            Event::SessionEnded { .. } => {}
            Event::RequestReceived { seq, statement, .. } => {
                let row = self.row(*seq, env.at);
                row.time = Some(env.at);
                row.statement = Some(mask_literals(statement));
            }
            Event::PolicyDecided { seq, decision, rule, operations, tables, .. } => {
                let row = self.row(*seq, env.at);
                row.decision = Some(decision.to_string());
                row.rule = rule.as_deref().map(str::to_string);
                row.operations = operations.to_vec();
                row.tables = tables.to_vec();
            }
            Event::HoldRequested(h) => {
                self.hold_seq.insert(h.hold_id, h.seq);
                self.row(h.seq, env.at);
                if let Some(d) = self.early_decisions.remove(&h.hold_id) {
                    self.apply_decision(h.seq, &d);
                }
            }
            Event::HoldDecided(d) => match self.hold_seq.get(&d.hold_id) {
                Some(&seq) => self.apply_decision(seq, d),
                None => {
                    self.early_decisions.insert(d.hold_id, d.clone());
                }
            },
            Event::ResponseSent { seq, rows, duration_us, error, result, .. } => {
                let row = self.row(*seq, env.at);
                row.rows = Some(i64::try_from(*rows).unwrap_or(i64::MAX));
                row.duration_us = Some(i64::try_from(*duration_us).unwrap_or(i64::MAX));
                row.error = error.as_ref().map(|e| format!("{}: {}", e.code, e.message));
                row.bytes = result.as_ref().map(|r| {
                    let cells: usize =
                        r.rows.iter().flatten().map(|v| v.as_ref().map_or(0, String::len)).sum();
                    i64::try_from(cells).unwrap_or(i64::MAX)
                });
            }
            // Grants are not requests: the replay shows them, the request index does not.
            Event::GrantDecided(_) | Event::GrantRevoked(_) | Event::PolicyApplied { .. } => {}
        }
    }

    fn row(&mut self, seq: u64, at: Timestamp) -> &mut Row {
        let row = self.rows.entry(seq).or_default();
        if row.time.is_none() {
            row.time = Some(at);
        }
        row
    }

    fn apply_decision(&mut self, seq: u64, d: &HoldDecision) {
        let row = self.rows.entry(seq).or_default();
        row.hold_outcome = Some(d.outcome.to_string());
        row.approver = Some(d.decided_by.clone());
    }

    /// The index file of session `session`.
    pub(crate) fn to_parquet(&self, session: Uuid) -> Result<Vec<u8>, IndexError> {
        let schema = Arc::new(parse_message_type(SCHEMA)?);
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(parquet::basic::ZstdLevel::default()))
                .set_created_by(format!("airlock-recorder {}", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let mut writer = SerializedFileWriter::new(Vec::new(), schema, props)?;
        let rows: Vec<(u64, &Row)> = self.rows.iter().map(|(s, r)| (*s, r)).collect();
        let n = rows.len();
        let mut group = writer.next_row_group()?;
        let mut col = 0;
        while let Some(mut column) = group.next_column()? {
            match col {
                0 => {
                    let v: Vec<i64> =
                        rows.iter().map(|(_, r)| r.time.map_or(0, Timestamp::as_micros)).collect();
                    column.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                1 => {
                    let v = vec![ByteArray::from(session.to_string().as_str()); n];
                    column.typed::<ByteArrayType>().write_batch(&v, None, None)?;
                }
                2 => write_opt_str(&mut column, rows.iter().map(|_| self.principal.as_deref()))?,
                3 => write_list(&mut column, rows.iter().map(|_| self.groups.as_slice()))?,
                4 => write_opt_str(&mut column, rows.iter().map(|_| self.connection.as_deref()))?,
                5 => {
                    let v: Vec<i64> =
                        rows.iter().map(|(s, _)| i64::try_from(*s).unwrap_or(i64::MAX)).collect();
                    column.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                6 => write_list(&mut column, rows.iter().map(|(_, r)| r.operations.as_slice()))?,
                7 => write_list(&mut column, rows.iter().map(|(_, r)| r.tables.as_slice()))?,
                8 => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.statement.as_deref()))?,
                9 => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.rule.as_deref()))?,
                10 => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.decision.as_deref()))?,
                11 => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.hold_outcome.as_deref()))?,
                12 => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.approver.as_deref()))?,
                13 => write_opt_i64(&mut column, rows.iter().map(|(_, r)| r.rows))?,
                14 => write_opt_i64(&mut column, rows.iter().map(|(_, r)| r.bytes))?,
                15 => write_opt_i64(&mut column, rows.iter().map(|(_, r)| r.duration_us))?,
                _ => write_opt_str(&mut column, rows.iter().map(|(_, r)| r.error.as_deref()))?,
            }
            column.close()?;
            col += 1;
        }
        group.close()?;
        Ok(writer.into_inner()?)
    }
}

type Column<'a> = parquet::file::writer::SerializedColumnWriter<'a>;

fn write_opt_str<'s>(
    column: &mut Column<'_>,
    values: impl Iterator<Item = Option<&'s str>>,
) -> Result<(), IndexError> {
    let mut data = Vec::new();
    let mut def = Vec::new();
    for v in values {
        def.push(i16::from(v.is_some()));
        if let Some(v) = v {
            data.push(ByteArray::from(v));
        }
    }
    column.typed::<ByteArrayType>().write_batch(&data, Some(&def), None)?;
    Ok(())
}

fn write_opt_i64(
    column: &mut Column<'_>,
    values: impl Iterator<Item = Option<i64>>,
) -> Result<(), IndexError> {
    let mut data = Vec::new();
    let mut def = Vec::new();
    for v in values {
        def.push(i16::from(v.is_some()));
        data.extend(v);
    }
    column.typed::<Int64Type>().write_batch(&data, Some(&def), None)?;
    Ok(())
}

/// A three-level LIST of strings: an empty list has definition level 1, an element 3.
fn write_list<'s>(
    column: &mut Column<'_>,
    values: impl Iterator<Item = &'s [String]>,
) -> Result<(), IndexError> {
    let mut data = Vec::new();
    let mut def = Vec::new();
    let mut rep = Vec::new();
    for list in values {
        if list.is_empty() {
            def.push(1);
            rep.push(0);
        }
        for (i, v) in list.iter().enumerate() {
            def.push(3);
            rep.push(i16::from(i > 0));
            data.push(ByteArray::from(v.as_str()));
        }
    }
    column.typed::<ByteArrayType>().write_batch(&data, Some(&def), Some(&rep))?;
    Ok(())
}

/// The statement with its literals (strings, dollar-quoted strings, numbers) replaced by `?`,
/// so that values typed into a statement do not reach the index. Identifiers, keywords,
/// comments and `$1` parameters stay.
///
/// Scanned as PostgreSQL's lexer does: a quote inside a comment (`--`, or `/* */`, which nest),
/// a dollar-quoted string or a quoted identifier opens nothing, and `E'...'` strings take
/// backslash escapes; otherwise a quote there would mask the statements after it.
pub fn mask_literals(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' {
            // '...' with '' escapes (also E'...' with backslash escapes: the prefix stays).
            let escapes = i > 0 && matches!(b[i - 1], b'E' | b'e') && (i < 2 || !ident(b[i - 2]));
            i += 1;
            while i < b.len() {
                if escapes && b[i] == b'\\' {
                    i += 2;
                } else if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                    } else {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            i += 1;
            out.push('?');
        } else if c == b'$'
            && (i == 0 || !ident(b[i - 1]))
            && b.get(i + 1).is_some_and(|d| !d.is_ascii_digit())
        {
            // $tag$ ... $tag$
            let tag_end = sql[i + 1..].find('$').map(|e| i + 1 + e);
            match tag_end {
                Some(end) if sql[i + 1..end].bytes().all(ident) => {
                    let tag = &sql[i..=end];
                    match sql[end + 1..].find(tag) {
                        Some(close) => {
                            i = end + 1 + close + tag.len();
                            out.push('?');
                        }
                        None => {
                            out.push('?');
                            i = b.len();
                        }
                    }
                }
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
        } else if c == b'"' {
            // A quoted identifier: kept.
            let end = sql[i + 1..].find('"').map_or(b.len(), |e| i + 2 + e);
            out.push_str(&sql[i..end]);
            i = end;
        } else if c.is_ascii_digit() && (i == 0 || !(ident(b[i - 1]) || b[i - 1] == b'$')) {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            out.push('?');
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            // A block comment, nested as PostgreSQL nests them: kept whole, so that a quote in it
            // does not open a "string" that would swallow the statements after it.
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            out.push_str(&sql[i..j]);
            i = j;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            let end = sql[i..].find('\n').map_or(b.len(), |e| i + e);
            out.push_str(&sql[i..end]);
            i = end;
        } else {
            let len = sql[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&sql[i..i + len]);
            i += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_masked_and_identifiers_kept() {
        assert_eq!(
            mask_literals("SELECT * FROM users WHERE email = 'a@b.c' AND id = 42 AND t2.x = $1"),
            "SELECT * FROM users WHERE email = ? AND id = ? AND t2.x = $1"
        );
        assert_eq!(mask_literals("select 'it''s', E'a\\'b', $$x$$, $q$y$q$, 1.5e3"), "select ?, E?, ?, ?, ?");
        assert_eq!(mask_literals("select \"col1\" from t -- 'c'"), "select \"col1\" from t -- 'c'");
        assert_eq!(mask_literals("select 'unterminated"), "select ?");
        assert_eq!(mask_literals("select 'é', 'ü' || 'ö'"), "select ?, ? || ?");
    }

    /// Quotes inside comments, dollar quotes, escape strings and quoted identifiers open nothing:
    /// the statements after them stay in the index, as PostgreSQL runs them.
    #[test]
    fn quotes_that_open_nothing_do_not_hide_the_statements_after_them() {
        for (sql, masked) in [
            ("select 1 /* ' */; drop table users", "select ? /* ' */; drop table users"),
            ("select 1 /* /* */ ' */; drop table users", "select ? /* /* */ ' */; drop table users"),
            ("select 1 /* a /* b */ c */ + 2 /* ' */", "select ? /* a /* b */ c */ + ? /* ' */"),
            ("select 1 /* unterminated '", "select ? /* unterminated '"),
            ("select 1 -- ' \n; drop table users", "select ? -- ' \n; drop table users"),
            ("select $$ ' $$; drop table users", "select ?; drop table users"),
            ("select $a$ $$ ' $a$, 2; drop table users", "select ?, ?; drop table users"),
            ("select $1, a$b$c from t; drop table users", "select $1, a$b$c from t; drop table users"),
            ("select E'\\' ', 1; drop table users", "select E?, ?; drop table users"),
            ("select e'it\\'s', 1; drop table users", "select e?, ?; drop table users"),
            ("select 'a\\', 1; drop table users", "select ?, ?; drop table users"),
            ("select \"a'b\", 2; drop table users", "select \"a'b\", ?; drop table users"),
            ("select \"x\"\"'\" from t; drop table users", "select \"x\"\"'\" from t; drop table users"),
            ("select '/* ', 1; drop table users", "select ?, ?; drop table users"),
        ] {
            assert_eq!(mask_literals(sql), masked, "{sql}");
        }
    }

    #[test]
    fn an_index_file_is_valid_parquet() {
        let session = Uuid::now_v7();
        let mut b = IndexBuilder::default();
        b.add(&Envelope::new(
            session,
            Event::RequestReceived { seq: 1, statement: "select 1".into(), parameters: Default::default() },
        ));
        let bytes = b.to_parquet(session).expect("write");
        assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    }
}
