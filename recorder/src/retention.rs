//! Retention: the recorder deletes date partitions older than [`crate::RecorderConfig::retention`]
//! (`sessions/date=D/` and `index/date=D/`), after recording the cutoff in
//! `archive/retention.json`, so that `audit verify` reports those sessions as expired rather than
//! deleted. The archive log is kept (it is small, and it is what proves nothing else went missing).
//!
//! With a signing key the marker is signed ([`Signed`]), so that a forged marker moving the cutoff
//! forward cannot pass sessions deleted from the bucket off as expired: `audit verify` with a
//! required key trusts only a marker signed by it. A recorder with a key rewrites a stored marker
//! not signed by it with its own cutoff.

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use proto::events::Timestamp;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::signed::{SignatureCheck, Signed};
use crate::{chunk, index};

/// The marker's key.
pub(crate) const MARKER: &str = "archive/retention.json";

/// What retention has removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionMarker {
    /// Date partitions before this date (`YYYY-MM-DD`) are expired.
    pub expired_before: String,
    /// Hex Ed25519 public key that signed this marker (absent when the recorder has no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Hex Ed25519 signature over the marker's JSON without `signature` ([`Signed::signed_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Signed for RetentionMarker {
    fn signature_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.public_key.as_deref(), self.signature.as_deref())
    }

    fn set_signature_fields(&mut self, public_key: Option<String>, signature: Option<String>) {
        self.public_key = public_key;
        self.signature = signature;
    }
}

/// The marker's stored bytes, if retention ever ran.
pub(crate) async fn read_marker_bytes(store: &dyn ObjectStore) -> Result<Option<Bytes>, object_store::Error> {
    match store.get(&Path::from(MARKER)).await {
        Ok(got) => Ok(Some(got.bytes().await?)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The marker, if retention ever ran (and it parses). Its signature is not checked.
pub async fn read_marker(store: &dyn ObjectStore) -> Result<Option<RetentionMarker>, object_store::Error> {
    Ok(read_marker_bytes(store).await?.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Delete every date partition older than `retention`; returns how many objects went. The marker
/// is written first (signed with `signer`, if given), so that nothing is ever deleted before it
/// records the cutoff.
pub(crate) async fn expire(
    store: &dyn ObjectStore,
    retention: Duration,
    signer: Option<&SigningKey>,
) -> Result<usize, object_store::Error> {
    let retention_us = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    let cutoff = Timestamp(Timestamp::now().as_micros().saturating_sub(retention_us)).date();
    let stored = read_marker(store).await?;
    // A marker this recorder cannot vouch for (not signed with its key, or edited) is replaced
    // by its own cutoff, never signed as it stands.
    let trusted = stored.as_ref().filter(|m| match signer {
        Some(key) => m.is_signed_by(&key.verifying_key()),
        None => m.check_signature() != SignatureCheck::Invalid,
    });
    if let Some(m) = stored.as_ref().filter(|_| trusted.is_none()) {
        warn!(
            expired_before = %m.expired_before,
            "the stored retention marker is not signed with this recorder's key (or its signature is invalid): replacing it"
        );
    }
    if trusted.is_none_or(|m| m.expired_before < cutoff) {
        let mut m = RetentionMarker { expired_before: cutoff.clone(), public_key: None, signature: None };
        if let Some(key) = signer {
            m.sign(key);
        }
        let bytes = serde_json::to_vec(&m).expect("a marker always serializes");
        store.put(&Path::from(MARKER), PutPayload::from(bytes)).await?;
    }
    let mut removed = 0;
    for root in [chunk::ROOT, index::INDEX_ROOT] {
        let listing = store.list_with_delimiter(Some(&Path::from(root))).await?;
        for prefix in listing.common_prefixes {
            let Some(date) = prefix.filename().and_then(|f| f.strip_prefix("date=")) else { continue };
            if date >= cutoff.as_str() {
                continue;
            }
            let locations = store.list(Some(&prefix)).map_ok(|m| m.location).boxed();
            removed += store.delete_stream(locations).try_collect::<Vec<Path>>().await?.len();
        }
    }
    Ok(removed)
}
