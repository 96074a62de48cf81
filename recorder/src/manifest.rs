//! Session manifests: the head of a session's chain, optionally signed with Ed25519.
//!
//! `sessions/date=D/{session}/manifest.json`, written when the session ends (or times out,
//! `incomplete: true`) and rewritten if late events extend the chain. Its content depends only on
//! the chain (and the key), so replicas and retries write the same bytes.

use proto::events::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::signed::{SignatureCheck, Signed, parse_public_key, parse_signing_key};

/// The manifest format.
pub const MANIFEST_FORMAT: u16 = 1;

/// The manifest of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u16,
    pub session: Uuid,
    /// The date partition the session lives in.
    pub date: String,
    /// Number of chained chunks (`00000000` to `chunks - 1`).
    pub chunks: u64,
    /// Hex SHA-256 of the last chunk's stored bytes: the head of the chain.
    pub head: String,
    /// Events in the chain.
    pub events: u64,
    pub first_at: Option<Timestamp>,
    pub last_at: Option<Timestamp>,
    /// No `SessionEnded` was recorded: closed after the recorder's `session_timeout`.
    pub incomplete: bool,
    /// Hex Ed25519 public key that signed this manifest.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Hex Ed25519 signature over the manifest's JSON with `signature` = null
    /// ([`Signed::signed_bytes`]).
    #[serde(default)]
    pub signature: Option<String>,
}

impl Signed for Manifest {
    fn signature_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.public_key.as_deref(), self.signature.as_deref())
    }

    fn set_signature_fields(&mut self, public_key: Option<String>, signature: Option<String>) {
        self.public_key = public_key;
        self.signature = signature;
    }
}

impl Manifest {
    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            session: Uuid::now_v7(),
            date: "2026-11-28".into(),
            chunks: 3,
            head: "ab".repeat(32),
            events: 10,
            first_at: Some(Timestamp(1)),
            last_at: Some(Timestamp(2)),
            incomplete: false,
            public_key: None,
            signature: None,
        }
    }

    #[test]
    fn signed_manifests_verify_and_any_edit_breaks_the_signature() {
        let key = parse_signing_key(&"07".repeat(32)).expect("key");
        let mut m = manifest();
        assert_eq!(m.check_signature(), SignatureCheck::Unsigned);
        m.sign(&key);
        assert_eq!(m.check_signature(), SignatureCheck::Valid);
        let back: Manifest = serde_json::from_slice(&m.to_bytes()).expect("parse");
        assert_eq!(back.check_signature(), SignatureCheck::Valid);
        m.chunks = 2;
        assert_eq!(m.check_signature(), SignatureCheck::Invalid);
        assert!(parse_signing_key("nothex").is_none());
        assert!(parse_public_key(&hex::encode(key.verifying_key().as_bytes())).is_some());
    }
}
