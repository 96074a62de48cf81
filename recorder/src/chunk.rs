//! The key layout and encoding of recorded chunks.
//!
//! `sessions/date=YYYY-MM-DD/{session}/{first_stream_seq:020}-{digest}.mpk`, where a chunk is a
//! MessagePack array (with field names) of the envelopes of one session taken from one fetched
//! batch, in stream order. The date comes from the session id (a UUIDv7 carries its creation
//! time), or from the first event when the id is not a UUIDv7. `digest` is 16 hex digits of the
//! SHA-256 of the chunk's envelope ids: a redelivered batch with the same events rewrites the same
//! key with the same bytes, and a batch with different events never overwrites an earlier chunk.

use object_store::path::Path;
use proto::events::{Envelope, Timestamp};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The top folder of all session recordings.
pub(crate) const ROOT: &str = "sessions";
/// The file extension of a chunk.
const EXTENSION: &str = ".mpk";

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

/// The key of a chunk holding `envs` (non-empty, all of `session`), the first at `first_seq`.
pub(crate) fn chunk_path(session: Uuid, first_seq: u64, envs: &[Envelope]) -> Path {
    let fallback = envs.first().map_or_else(Timestamp::now, |e| e.at);
    let mut digest = Sha256::new();
    for env in envs {
        digest.update(env.id.as_bytes());
    }
    let digest = hex::encode(&digest.finalize()[..8]);
    session_prefix(&session_date(session, fallback), session)
        .join(format!("{first_seq:020}-{digest}{EXTENSION}"))
}

/// The session a chunk key belongs to, if `path` is a chunk key.
pub(crate) fn session_of(path: &Path) -> Option<Uuid> {
    let parts: Vec<_> = path.parts().collect();
    match parts.as_slice() {
        [root, date, session, file]
            if root.as_ref() == ROOT
                && date.as_ref().starts_with("date=")
                && file.as_ref().ends_with(EXTENSION) =>
        {
            session.as_ref().parse().ok()
        }
        _ => None,
    }
}

pub(crate) fn encode(envs: &[Envelope]) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(envs)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<Envelope>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::Event;

    #[test]
    fn keys_follow_the_documented_layout() {
        let session = Uuid::parse_str("019ac7a0-0000-7000-8000-000000000000").expect("uuid");
        let env = Envelope::new(session, Event::SessionEnded { reason: "x".into() });
        let path = chunk_path(session, 42, std::slice::from_ref(&env));
        let s = path.to_string();
        let date = session_date(session, Timestamp(0));
        assert!(s.starts_with(&format!("sessions/date={date}/{session}/00000000000000000042-")), "{s}");
        assert!(s.ends_with(".mpk"));
        assert_eq!(session_of(&path), Some(session));
        assert_eq!(session_of(&Path::from("sessions/other")), None);
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
    fn different_events_get_different_keys() {
        let session = Uuid::now_v7();
        let a = Envelope::new(session, Event::SessionEnded { reason: "a".into() });
        let b = Envelope::new(session, Event::SessionEnded { reason: "b".into() });
        let one = chunk_path(session, 1, &[a.clone(), b.clone()]);
        assert_eq!(one, chunk_path(session, 1, &[a.clone(), b]));
        assert_ne!(one, chunk_path(session, 1, &[a]));
    }

    #[test]
    fn chunks_round_trip() {
        let session = Uuid::now_v7();
        let envs = vec![
            Envelope::new(session, Event::RequestReceived { seq: 1, statement: "select 1".into() }),
            Envelope::new(session, Event::SessionEnded { reason: "bye".into() }),
        ];
        assert_eq!(decode(&encode(&envs).expect("encode")).expect("decode"), envs);
        assert!(decode(b"\xc1garbage").is_err());
    }
}
