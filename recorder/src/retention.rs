//! Retention: the recorder deletes date partitions older than [`crate::RecorderConfig::retention`]
//! (`sessions/date=D/` and `index/date=D/`), after recording the cutoff in
//! `archive/retention.json`, so that `audit verify` reports those sessions as expired rather than
//! deleted. The archive log is kept (it is small, and it is what proves nothing else went missing).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use proto::events::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{chunk, index};

/// The marker's key.
pub(crate) const MARKER: &str = "archive/retention.json";

/// What retention has removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionMarker {
    /// Date partitions before this date (`YYYY-MM-DD`) are expired.
    pub expired_before: String,
}

/// The marker, if retention ever ran.
pub async fn read_marker(store: &dyn ObjectStore) -> Result<Option<RetentionMarker>, object_store::Error> {
    match store.get(&Path::from(MARKER)).await {
        Ok(got) => Ok(serde_json::from_slice(&got.bytes().await?).ok()),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Delete every date partition older than `retention`; returns how many objects went.
pub(crate) async fn expire(
    store: &dyn ObjectStore,
    retention: Duration,
) -> Result<usize, object_store::Error> {
    let retention_us = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    let cutoff = Timestamp(Timestamp::now().as_micros().saturating_sub(retention_us)).date();
    let marker = read_marker(store).await?;
    if marker.as_ref().is_none_or(|m| m.expired_before < cutoff) {
        let m = RetentionMarker { expired_before: cutoff.clone() };
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
