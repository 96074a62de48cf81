//! Framing. After startup every message is `tag: u8, len: i32 (including itself), body`.
//! The startup phase has no tag: `len: i32, code: i32, body`.

use bytes::{Buf, Bytes, BytesMut};

/// Protocol 3.0.
pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// One tagged message. `body` excludes the tag and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// The frame's bytes as they go on the wire.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.extend_from_slice(&[self.tag]);
        out.extend_from_slice(&((self.body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// A startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupFrame {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: Bytes },
    Startup { version: i32, params: Vec<(String, String)> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message length {len} is invalid")]
    BadLength { len: i64 },
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed startup packet: {0}")]
    BadStartup(&'static str),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: i32, minor: i32 },
}

/// Decode one tagged frame. `Ok(None)` means more bytes are needed.
/// How much [`decode_frame`] reserves at a time for a message still arriving.
const RESERVE_STEP: usize = 256 * 1024;

pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength { len: len.into() });
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 1 + len {
        // Room for what may come next, not for the whole declared length: a peer that only
        // announces a large message does not make the proxy allocate it.
        buf.reserve((1 + len - buf.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    let tag = buf[0];
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

/// The largest startup packet accepted (PostgreSQL's own limit is 10000).
pub const MAX_STARTUP: usize = 10_000;

/// Decode one startup-phase packet. `Ok(None)` means more bytes are needed.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupFrame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadLength { len: len.into() });
    }
    let len = len as usize;
    if len > MAX_STARTUP {
        return Err(FrameError::TooLarge { len, max: MAX_STARTUP });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut pkt = buf.split_to(len).freeze();
    pkt.advance(4);
    let code = pkt.get_i32();
    match code {
        SSL_REQUEST if pkt.is_empty() => Ok(Some(StartupFrame::Ssl)),
        GSSENC_REQUEST if pkt.is_empty() => Ok(Some(StartupFrame::GssEnc)),
        CANCEL_REQUEST => {
            if pkt.len() < 8 {
                return Err(FrameError::BadStartup("cancel request too short"));
            }
            let pid = pkt.get_i32();
            Ok(Some(StartupFrame::Cancel { pid, secret: pkt }))
        }
        v if v >> 16 == 3 => {
            let params = parse_params(&pkt)?;
            Ok(Some(StartupFrame::Startup { version: v, params }))
        }
        v => Err(FrameError::UnsupportedVersion { major: v >> 16, minor: v & 0xffff }),
    }
}

fn parse_params(mut b: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let mut out = Vec::new();
    loop {
        let key = take_cstr(&mut b).ok_or(FrameError::BadStartup("unterminated parameter name"))?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut b).ok_or(FrameError::BadStartup("unterminated parameter value"))?;
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Take a NUL-terminated UTF-8 string off the front of `b`.
pub fn take_cstr<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
    let nul = b.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(&b[..nul]).ok()?;
    *b = &b[nul + 1..];
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn startup_decodes_params_and_waits_for_more() {
        let bytes = startup_bytes(&[("user", "u"), ("database", "shop")]);
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert_eq!(decode_startup(&mut buf), Ok(None));
        buf.extend_from_slice(&bytes[bytes.len() - 1..]);
        let f = decode_startup(&mut buf).expect("ok").expect("frame");
        assert_eq!(
            f,
            StartupFrame::Startup {
                version: PROTOCOL_V3,
                params: vec![("user".into(), "u".into()), ("database".into(), "shop".into())]
            }
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn ssl_request_is_recognised() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 47][..]);
        assert_eq!(decode_startup(&mut buf), Ok(Some(StartupFrame::Ssl)));
    }

    #[test]
    fn frames_split_across_reads() {
        let f = Frame { tag: b'Q', body: Bytes::from_static(b"select 1\0") };
        let mut wire = BytesMut::new();
        f.encode_into(&mut wire);
        f.encode_into(&mut wire);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(fr) = decode_frame(&mut buf, 1024).expect("valid") {
                got.push(fr);
            }
        }
        assert_eq!(got, vec![f.clone(), f]);
    }

    #[test]
    fn bad_and_huge_lengths_are_errors() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert!(matches!(decode_frame(&mut buf, 1024), Err(FrameError::BadLength { .. })));
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode_frame(&mut buf, 1024), Err(FrameError::TooLarge { .. })));
        // A message announced as 16 MiB: allowed, but room is made as it arrives, not at once.
        let mut buf = BytesMut::from(&[b'Q', 0x01, 0, 0, 0][..]);
        assert!(matches!(decode_frame(&mut buf, 32 << 20), Ok(None)));
        assert!(buf.capacity() <= 5 + RESERVE_STEP, "reserved {}", buf.capacity());
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0][..]);
        assert!(decode_startup(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 9, 0, 3, 0, 0, b'x'][..]);
        assert!(decode_startup(&mut buf).is_err(), "unterminated params");
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0, 9, 0, 0][..]);
        assert!(matches!(decode_startup(&mut buf), Err(FrameError::UnsupportedVersion { .. })));
    }

    #[test]
    fn split_reads_feed_the_decoder() {
        // A socket that delivers one frame in three reads.
        let mut buf = BytesMut::new();
        for chunk in [&b"Q\0\0"[..], &b"\0\x0dsel"[..], &b"ect 1\0"[..]] {
            buf.extend_from_slice(chunk);
        }
        let f = decode_frame(&mut buf, 100).expect("ok").expect("frame");
        assert_eq!(&f.body[..], b"select 1\0");
    }
}
