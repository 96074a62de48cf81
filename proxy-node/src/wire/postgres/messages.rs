//! The messages the proxy writes itself, and readers for the ones it inspects.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{Frame, take_cstr};

/// Severity of an error or notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// SQLSTATEs the proxy uses.
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const QUERY_CANCELED: &str = "57014";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const WARNING: &str = "01000";
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the client: replace it.
    out.put_slice(s.replace('\0', "\u{FFFD}").as_bytes());
    out.put_u8(0);
}

fn frame(tag: u8, body: BytesMut) -> Frame {
    Frame { tag, body: body.freeze() }
}

/// ErrorResponse or NoticeResponse.
pub fn error_or_notice(severity: Severity, code: &str, message: &str, hint: Option<&str>) -> Frame {
    let mut b = BytesMut::with_capacity(64 + message.len());
    for t in [b'S', b'V'] {
        b.put_u8(t);
        put_cstr(&mut b, severity.as_str());
    }
    b.put_u8(b'C');
    put_cstr(&mut b, code);
    b.put_u8(b'M');
    put_cstr(&mut b, message);
    if let Some(h) = hint {
        b.put_u8(b'H');
        put_cstr(&mut b, h);
    }
    b.put_u8(0);
    frame(if severity == Severity::Notice { b'N' } else { b'E' }, b)
}

pub fn error(code: &str, message: &str) -> Frame {
    error_or_notice(Severity::Error, code, message, None)
}

pub fn fatal(code: &str, message: &str) -> Frame {
    error_or_notice(Severity::Fatal, code, message, None)
}

pub fn notice(message: &str) -> Frame {
    error_or_notice(Severity::Notice, sqlstate::WARNING, message, None)
}

pub fn auth_cleartext_request() -> Frame {
    Frame { tag: b'R', body: Bytes::from_static(&[0, 0, 0, 3]) }
}

pub fn auth_ok() -> Frame {
    Frame { tag: b'R', body: Bytes::from_static(&[0, 0, 0, 0]) }
}

pub fn ready_for_query(status: u8) -> Frame {
    Frame { tag: b'Z', body: Bytes::copy_from_slice(&[status]) }
}

pub fn command_complete(tag: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, tag);
    frame(b'C', b)
}

pub fn query(sql: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, sql);
    frame(b'Q', b)
}

pub fn copy_fail(message: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, message);
    frame(b'f', b)
}

/// The string body of Query ('Q') or PasswordMessage ('p').
pub fn read_cstr_body(body: &[u8]) -> Option<&str> {
    let mut b = body;
    let s = take_cstr(&mut b)?;
    b.is_empty().then_some(s)
}

/// The fields of an ErrorResponse or NoticeResponse: (code, message).
pub fn read_error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut b = body;
    while let Some((&t, rest)) = b.split_first() {
        if t == 0 {
            break;
        }
        b = rest;
        let Some(v) = take_cstr(&mut b) else { break };
        match t {
            b'C' => code = v.to_string(),
            b'M' => message = v.to_string(),
            _ => {}
        }
    }
    (code, message)
}

/// The column names of a RowDescription.
pub fn read_row_description(body: &[u8]) -> Option<Vec<String>> {
    let (n, mut b) = split_i16(body)?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = take_cstr(&mut b)?;
        cols.push(name.to_string());
        b = b.get(18..)?;
    }
    Some(cols)
}

/// The values of a DataRow (`None` = NULL).
pub fn read_data_row(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let (n, mut b) = split_i16(body)?;
    let mut vals = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        b = &b[4..];
        if len < 0 {
            vals.push(None);
        } else {
            let len = len as usize;
            vals.push(Some(b.get(..len)?));
            b = &b[len..];
        }
    }
    Some(vals)
}

fn split_i16(b: &[u8]) -> Option<(i16, &[u8])> {
    Some((i16::from_be_bytes(b.get(..2)?.try_into().ok()?), &b[2..]))
}

/// A Parse message: (statement name, query text, the parameter types it declares, each an OID
/// of 4 bytes).
pub fn read_parse(body: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut b = body;
    let name = take_cstr(&mut b)?;
    let query = take_cstr(&mut b)?;
    let (n, rest) = split_i16(b)?;
    (n >= 0 && rest.len() == n as usize * 4).then_some((name, query, rest))
}

/// The first of a Parse message's declared parameter types ([`read_parse`]) that is not built
/// in (PostgreSQL's built-in objects have OIDs below 16384, `FirstNormalObjectId`): a domain, an
/// extension's or a user's type, whose input function or `CHECK` runs when a value is bound.
pub fn declared_user_type(types: &[u8]) -> Option<u32> {
    types.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).find(|&oid| oid >= 16384)
}

/// A Bind message's names and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// Each parameter: `None` is NULL; the flag is true for binary format.
    pub params: Vec<(Option<&'a [u8]>, bool)>,
}

pub fn read_bind(body: &[u8]) -> Option<Bind<'_>> {
    let mut b = body;
    let portal = take_cstr(&mut b)?;
    let statement = take_cstr(&mut b)?;
    // The server reads the counts as unsigned: one past i16::MAX would be read differently here.
    let (nf, mut b) = split_i16(b).filter(|(n, _)| *n >= 0)?;
    let mut formats = Vec::with_capacity(nf as usize);
    for _ in 0..nf {
        let (f, rest) = split_i16(b)?;
        formats.push(f == 1);
        b = rest;
    }
    let (np, mut b) = split_i16(b).filter(|(n, _)| *n >= 0)?;
    if nf > 1 && nf != np {
        return None;
    }
    let mut params = Vec::with_capacity(np as usize);
    for i in 0..np as usize {
        let len = i32::from_be_bytes(b.get(..4)?.try_into().ok()?);
        b = &b[4..];
        let binary = match formats.len() {
            0 => false,
            1 => formats[0],
            _ => formats[i],
        };
        if len < 0 {
            params.push((None, binary));
        } else {
            let len = len as usize;
            params.push((Some(b.get(..len)?), binary));
            b = &b[len..];
        }
    }
    let (nr, b) = split_i16(b)?;
    (nr >= 0 && b.len() == nr as usize * 2).then_some(Bind { portal, statement, params })
}

/// A Describe or Close message: (b'S' or b'P', name).
pub fn read_target(body: &[u8]) -> Option<(u8, &str)> {
    let (&kind, mut b) = body.split_first()?;
    let name = take_cstr(&mut b)?;
    (matches!(kind, b'S' | b'P') && b.is_empty()).then_some((kind, name))
}

/// An Execute message's portal name.
pub fn read_execute(body: &[u8]) -> Option<&str> {
    let mut b = body;
    let portal = take_cstr(&mut b)?;
    (b.len() == 4).then_some(portal)
}

/// Execute a portal by name.
pub fn execute(portal: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, portal);
    b.put_i32(0);
    frame(b'E', b)
}

/// Describe of a portal (`P`) or statement (`S`).
pub fn describe(kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    put_cstr(&mut b, name);
    frame(b'D', b)
}

pub fn sync() -> Frame {
    Frame { tag: b'S', body: Bytes::new() }
}

/// Flush: the target sends what it holds back (an error in the extended protocol waits for
/// the next Sync or Flush otherwise); nothing answers it.
pub fn flush() -> Frame {
    Frame { tag: b'H', body: Bytes::new() }
}

/// The row count at the end of a CommandComplete tag (`SELECT 3`, `INSERT 0 1`, `DELETE 2`).
pub fn rows_in_tag(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trips_through_reader() {
        let f = error(sqlstate::INSUFFICIENT_PRIVILEGE, "denied by rule `x`");
        assert_eq!(f.tag, b'E');
        assert_eq!(read_error_fields(&f.body), ("42501".into(), "denied by rule `x`".into()));
    }

    #[test]
    fn nul_in_message_cannot_truncate_fields() {
        let f = error("42501", "a\0b");
        assert_eq!(read_error_fields(&f.body).1, "a\u{FFFD}b");
    }

    #[test]
    fn data_row_reader_handles_nulls_and_rejects_truncation() {
        let mut b = BytesMut::new();
        b.put_i16(2);
        b.put_i32(-1);
        b.put_i32(2);
        b.put_slice(b"hi");
        assert_eq!(read_data_row(&b), Some(vec![None, Some(&b"hi"[..])]));
        assert_eq!(read_data_row(&b[..b.len() - 1]), None);
        assert_eq!(read_data_row(&[]), None);
    }

    #[test]
    fn bind_reads_params_in_both_formats_and_rejects_garbage() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "p1");
        put_cstr(&mut b, "s1");
        b.put_i16(2);
        b.put_i16(0);
        b.put_i16(1);
        b.put_i16(2);
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_i32(-1);
        b.put_i16(0);
        let bind = read_bind(&b).expect("valid");
        assert_eq!((bind.portal, bind.statement), ("p1", "s1"));
        assert_eq!(bind.params, vec![(Some(&b"42"[..]), false), (None, true)]);
        for cut in 0..b.len() {
            assert!(read_bind(&b[..cut]).is_none(), "truncated at {cut}");
        }
        // Counts past i16::MAX, which the server reads as unsigned: 65535 format codes there,
        // none here.
        for (at, what) in [(6, "format codes"), (12, "parameters")] {
            let mut odd = b.to_vec();
            odd[at..at + 2].copy_from_slice(&(-1i16).to_be_bytes());
            assert!(read_bind(&odd).is_none(), "a negative count of {what}");
        }
    }

    #[test]
    fn parse_describe_close_execute_readers() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "");
        put_cstr(&mut b, "select $1");
        b.put_i16(1);
        b.put_i32(23);
        assert_eq!(read_parse(&b).map(|(n, q, _)| (n, q)), Some(("", "select $1")));
        assert_eq!(read_parse(&b[..b.len() - 1]), None);
        let types = read_parse(&b).unwrap().2;
        assert_eq!(declared_user_type(types), None, "int4 is built in");
        assert_eq!(declared_user_type(&[0, 0, 0, 23, 0, 0, 0x40, 0x01]), Some(16385));
        assert_eq!(read_target(b"Sname"), None, "unterminated");
        assert_eq!(read_target(&[b'S', b'n', 0]), Some((b'S', "n")));
        assert_eq!(read_target(&[b'X', b'n', 0]), None);
        assert_eq!(read_execute(&execute("p").body), Some("p"));
    }

    #[test]
    fn tags_give_row_counts() {
        assert_eq!(rows_in_tag("SELECT 3"), Some(3));
        assert_eq!(rows_in_tag("INSERT 0 7"), Some(7));
        assert_eq!(rows_in_tag("CREATE TABLE"), None);
    }

    #[test]
    fn query_body_requires_exactly_one_string() {
        assert_eq!(read_cstr_body(b"select 1\0"), Some("select 1"));
        assert_eq!(read_cstr_body(b"select 1"), None);
        assert_eq!(read_cstr_body(b"a\0b\0"), None);
        // The proxy forwards a client's Query frame as it came once its body reads as one
        // string: that body is exactly the Query the gateway would build from the text it
        // decided on.
        for body in [&b"select 1\0"[..], b"\0", "select 'é';\0".as_bytes()] {
            let sql = read_cstr_body(body).expect("one string");
            assert_eq!(&query(sql).body[..], body);
        }
    }
}
