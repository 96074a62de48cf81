//! A raw PostgreSQL wire client, for tests that must see every byte a proxy sends (a driver
//! hides rows that come before an error, and picks its own message sequence).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for the next bytes before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect, send a v3 startup packet for `user`/`database`, answer a cleartext password
/// request with `password`, and read up to the first ReadyForQuery.
pub async fn connect(port: u16, user: &str, database: &str, password: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let mut startup = vec![0, 3, 0, 0];
    for (k, v) in [("user", user), ("database", database)] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut pkt = len_prefix(startup.len() + 4).to_vec();
    pkt.extend(startup);
    s.write_all(&pkt).await.expect("startup");
    s.write_all(&message(b'p', &[password.as_bytes(), b"\0"].concat())).await.expect("password");
    read_until_ready(&mut s).await;
    s
}

fn len_prefix(n: usize) -> [u8; 4] {
    i32::try_from(n).expect("message fits").to_be_bytes()
}

/// A frontend message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len_prefix(body.len() + 4));
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    [s.as_bytes(), b"\0"].concat()
}

/// A simple-protocol Query.
pub fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

/// Parse `sql` as statement `name`, with no parameter types given.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    message(b'P', &[cstr(name), cstr(sql), vec![0, 0]].concat())
}

/// Bind statement `stmt` to `portal` with text parameters, all results in text.
pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
    bind_results(portal, stmt, params, &[])
}

/// Bind statement `stmt` to `portal` with text parameters, asking for results in `formats`
/// (0 text, 1 binary; none: all in text, one: all in that format).
pub fn bind_results(portal: &str, stmt: &str, params: &[&str], formats: &[u16]) -> Vec<u8> {
    let mut b = [cstr(portal), cstr(stmt)].concat();
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&u16::try_from(params.len()).expect("few parameters").to_be_bytes());
    for p in params {
        b.extend_from_slice(&len_prefix(p.len()));
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&u16::try_from(formats.len()).expect("few formats").to_be_bytes());
    for f in formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    message(b'B', &b)
}

/// Describe a portal (`b'P'`) or a statement (`b'S'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    message(b'D', &[vec![kind], cstr(name)].concat())
}

/// Close a portal (`b'P'`) or a statement (`b'S'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    message(b'C', &[vec![kind], cstr(name)].concat())
}

/// Execute `portal` with no row limit.
pub fn execute(portal: &str) -> Vec<u8> {
    message(b'E', &[cstr(portal), vec![0, 0, 0, 0]].concat())
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// What the server sends up to the next ReadyForQuery.
pub async fn read_until_ready(s: &mut TcpStream) -> Vec<u8> {
    read_until(s, b'Z').await
}

/// What the server sends up to a whole message tagged `tag` (an ErrorResponse `E`, a
/// CopyInResponse `G`, ...).
pub async fn read_until(s: &mut TcpStream, tag: u8) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !tags(&seen).contains(&tag) {
        let n = tokio::time::timeout(READ_TIMEOUT, s.read(&mut buf)).await.expect("an answer").expect("read");
        assert!(n > 0, "the server closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// What the server sends up to its `n`th ReadyForQuery (pipelined messages get one each; a
/// read can carry several).
pub async fn read_answers(s: &mut TcpStream, n: usize) -> String {
    let mut seen = Vec::new();
    while tags(&seen).iter().filter(|&&t| t == b'Z').count() < n {
        seen.extend(read_until_ready(s).await);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Everything the server sends until it closes the connection.
pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.expect("closed");
    out
}

/// The tags of the messages in `bytes`, the last one's too once its length has come.
pub fn tags(bytes: &[u8]) -> Vec<u8> {
    let (mut out, rest) = whole_tags(bytes);
    if rest >= 5 {
        out.push(bytes[bytes.len() - rest]);
    }
    out
}

/// The tags of the whole messages in `bytes`, and how many bytes of a message follow them.
pub fn whole_tags(bytes: &[u8]) -> (Vec<u8>, usize) {
    let (mut out, mut i) = (Vec::new(), 0);
    while i + 5 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]) as usize;
        if i + 1 + len > bytes.len() {
            break;
        }
        out.push(bytes[i]);
        i += 1 + len;
    }
    (out, bytes.len() - i)
}

/// Does `needle` occur anywhere in `hay`?
pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}
