//! The key layout and encoding of recorded chunks.
//!
//! Current format (2), one hash chain per session:
//!
//! ```text
//! sessions/date=YYYY-MM-DD/{session}/{index:08}.mpk.zst   a chunk: zstd(MessagePack ChainedChunk)
//! sessions/date=YYYY-MM-DD/{session}/manifest.json        the session's manifest
//! ```
//!
//! A [`ChainedChunk`] carries its own index and the SHA-256 (hex) of the previous chunk's stored
//! bytes ([`GENESIS`] for chunk 0), so editing, deleting or swapping chunks breaks the chain.
//! Chunk keys are created with a conditional put (`PutMode::Create`): an index is written once,
//! whoever writes it first.
//!
//! Format 1 (the walking skeleton), still read: `{first_stream_seq:020}-{digest}.mpk`, an
//! uncompressed MessagePack array of envelopes, not chained.
//!
//! Only these exact names count: `0.mpk.zst`, `+0.mpk.zst` or `000000000.mpk.zst` would parse as
//! chunk 0 too, so a forged second copy of a chunk could sit beside the real one. Any other object
//! in a session's folder is a [`Key::Stray`], which `audit verify` reports as tampering and the
//! readers never read.
//!
//! The date comes from the session id (a UUIDv7 carries its creation time), or from the first
//! event when the id is not a UUIDv7.

use object_store::path::Path;
use proto::events::{Envelope, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ChunkError;

/// The top folder of all session recordings.
pub(crate) const ROOT: &str = "sessions";
/// The file extension of a format-1 (legacy) chunk.
const LEGACY_EXTENSION: &str = ".mpk";
/// The file extension of a chained chunk.
const EXTENSION: &str = ".mpk.zst";
/// The manifest's file name.
pub(crate) const MANIFEST: &str = "manifest.json";
/// The chained chunk format.
pub(crate) const CHUNK_FORMAT: u16 = 2;
/// `prev_hash` of chunk 0.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// zstd level: fast, still about 5x on events.
const ZSTD_LEVEL: i32 = 3;

/// One link of a session's chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChainedChunk {
    /// [`CHUNK_FORMAT`].
    pub(crate) format: u16,
    pub(crate) session: Uuid,
    /// Position in the chain, from 0; also in the key.
    pub(crate) index: u64,
    /// Hex SHA-256 of the previous chunk's stored bytes, [`GENESIS`] for chunk 0.
    pub(crate) prev_hash: String,
    /// Events in arrival order (readers sort by time).
    pub(crate) events: Vec<Envelope>,
}

/// What a key in a session's folder under [`ROOT`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    /// A format-1 chunk.
    Legacy,
    /// A chained chunk with its index.
    Chained(u64),
    Manifest,
    /// Anything else: a name the recorder never writes (or a deeper path).
    Stray,
}

/// The date folder of a session: from its UUIDv7, else from `fallback`.
pub(crate) fn session_date(session: Uuid, fallback: Timestamp) -> String {
    match session.get_version_num() {
        7 => match session.get_timestamp() {
            Some(ts) => {
                let (secs, nanos) = ts.to_unix();
                let micros = i64::try_from(secs).unwrap_or(i64::MAX / 1_000_000) * 1_000_000
                    + i64::from(nanos / 1_000);
                Timestamp(micros).date()
            }
            None => fallback.date(),
        },
        _ => fallback.date(),
    }
}

/// `sessions/date=D/{session}`.
pub(crate) fn session_prefix(date: &str, session: Uuid) -> Path {
    Path::from_iter([ROOT.to_string(), format!("date={date}"), session.to_string()])
}

/// The key of chunk `index` of a session.
pub(crate) fn chained_path(date: &str, session: Uuid, index: u64) -> Path {
    session_prefix(date, session).join(format!("{index:08}{EXTENSION}"))
}

/// The key of a session's manifest.
pub(crate) fn manifest_path(date: &str, session: Uuid) -> Path {
    session_prefix(date, session).join(MANIFEST)
}

/// `(session, date, kind)` of a key in a session's folder (`sessions/date=D/{session}/...`),
/// `None` for keys elsewhere.
pub(crate) fn parse_key(path: &Path) -> Option<(Uuid, String, Key)> {
    let parts: Vec<_> = path.parts().collect();
    let [root, date, session, rest @ ..] = parts.as_slice() else { return None };
    if root.as_ref() != ROOT || rest.is_empty() {
        return None;
    }
    let date = date.as_ref().strip_prefix("date=")?.to_string();
    let session: Uuid = session.as_ref().parse().ok()?;
    let key = match rest {
        [file] if file.as_ref() == MANIFEST => Key::Manifest,
        [file] => match chained_index(file.as_ref()) {
            Some(index) => Key::Chained(index),
            None if is_legacy_name(file.as_ref()) => Key::Legacy,
            None => Key::Stray,
        },
        _ => Key::Stray,
    };
    Some((session, date, key))
}

/// The index of a chained chunk's file name: exactly what [`chained_path`] writes.
fn chained_index(file: &str) -> Option<u64> {
    let digits = file.strip_suffix(EXTENSION)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: u64 = digits.parse().ok()?;
    (format!("{index:08}") == digits).then_some(index)
}

/// A format-1 chunk's file name: `{first_stream_seq:020}-{16 lowercase hex digits}.mpk`.
fn is_legacy_name(file: &str) -> bool {
    let Some((seq, digest)) = file.strip_suffix(LEGACY_EXTENSION).and_then(|stem| stem.split_once('-'))
    else {
        return false;
    };
    seq.len() == 20
        && seq.bytes().all(|b| b.is_ascii_digit())
        && digest.len() == 16
        && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn encode_chained(chunk: &ChainedChunk) -> Result<Vec<u8>, ChunkError> {
    let raw = rmp_serde::to_vec_named(chunk)?;
    zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(ChunkError::Compress)
}

pub(crate) fn decode_chained(bytes: &[u8]) -> Result<ChainedChunk, ChunkError> {
    let raw = zstd::stream::decode_all(bytes).map_err(ChunkError::Decompress)?;
    Ok(rmp_serde::from_slice(&raw)?)
}

/// Decode a format-1 chunk.
pub(crate) fn decode_legacy(bytes: &[u8]) -> Result<Vec<Envelope>, ChunkError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::events::Event;

    /// A format-1 key, as the walking skeleton wrote it.
    pub(crate) fn legacy_path(session: Uuid, first_seq: u64, envs: &[Envelope]) -> Path {
        let mut digest = Sha256::new();
        for env in envs {
            digest.update(env.id.as_bytes());
        }
        let digest = hex::encode(&digest.finalize()[..8]);
        let date = session_date(session, envs.first().map_or(Timestamp(0), |e| e.at));
        session_prefix(&date, session).join(format!("{first_seq:020}-{digest}{LEGACY_EXTENSION}"))
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let session = Uuid::parse_str("019ac7a0-0000-7000-8000-000000000000").expect("uuid");
        let date = session_date(session, Timestamp(0));
        let path = chained_path(&date, session, 42);
        assert_eq!(path.to_string(), format!("sessions/date={date}/{session}/00000042.mpk.zst"));
        assert_eq!(parse_key(&path), Some((session, date.clone(), Key::Chained(42))));
        assert_eq!(parse_key(&manifest_path(&date, session)), Some((session, date.clone(), Key::Manifest)));
        let env = Envelope::new(session, Event::SessionEnded { reason: "x".into() });
        let legacy = legacy_path(session, 42, std::slice::from_ref(&env));
        assert_eq!(parse_key(&legacy), Some((session, date, Key::Legacy)));
        assert_eq!(parse_key(&Path::from("sessions/other")), None);
    }

    /// Only the exact names the recorder writes are chunks: anything that merely parses to an
    /// index, or merely ends in `.mpk`, is a stray (a second copy of chunk 0 otherwise).
    #[test]
    fn only_canonical_names_are_chunks() {
        let session = Uuid::parse_str("019ac7a0-0000-7000-8000-000000000000").expect("uuid");
        let key =
            |file: &str| parse_key(&session_prefix("2026-11-28", session).join(file)).map(|(_, _, k)| k);
        assert_eq!(key("00000000.mpk.zst"), Some(Key::Chained(0)));
        assert_eq!(key("123456789.mpk.zst"), Some(Key::Chained(123_456_789)));
        assert_eq!(key("18446744073709551615.mpk.zst"), Some(Key::Chained(u64::MAX)));
        assert_eq!(key("00000000000000000001-0123456789abcdef.mpk"), Some(Key::Legacy));
        for stray in [
            "0.mpk.zst",
            "+0.mpk.zst",
            "000000000.mpk.zst",
            "0000000a.mpk.zst",
            "-0000001.mpk.zst",
            "18446744073709551616.mpk.zst",
            "x.mpk",
            "1-0123456789abcdef.mpk",
            "00000000000000000001-0123456789ABCDEF.mpk",
            "00000000000000000001-0123456789abcdef0.mpk",
            "manifest.json.bak",
        ] {
            assert_eq!(key(stray), Some(Key::Stray), "{stray}");
        }
        let deeper = session_prefix("2026-11-28", session).join("x").join("00000000.mpk.zst");
        assert_eq!(parse_key(&deeper).map(|(_, _, k)| k), Some(Key::Stray));
    }

    #[test]
    fn date_comes_from_uuid_v7_else_from_the_event() {
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, 1_764_288_000, 0);
        let v7 = Uuid::new_v7(ts);
        assert_eq!(session_date(v7, Timestamp(0)), "2025-11-28");
        let v4 = Uuid::new_v4();
        assert_eq!(session_date(v4, Timestamp(1_764_288_000_000_000)), "2025-11-28");
    }

    #[test]
    fn chained_chunks_round_trip_and_legacy_chunks_still_decode() {
        let session = Uuid::now_v7();
        let envs = vec![
            Envelope::new(
                session,
                Event::RequestReceived {
                    seq: 1,
                    statement: "select 1".into(),
                    parameters: Default::default(),
                },
            ),
            Envelope::new(session, Event::SessionEnded { reason: "bye".into() }),
        ];
        let chunk = ChainedChunk {
            format: CHUNK_FORMAT,
            session,
            index: 0,
            prev_hash: GENESIS.into(),
            events: envs.clone(),
        };
        let bytes = encode_chained(&chunk).expect("encode");
        assert_eq!(decode_chained(&bytes).expect("decode"), chunk);
        let legacy = rmp_serde::to_vec_named(&envs).expect("encode legacy");
        assert_eq!(decode_legacy(&legacy).expect("decode legacy"), envs);
        assert!(decode_chained(b"\xc1garbage").is_err());
        assert!(decode_legacy(b"\xc1garbage").is_err());
    }
}
