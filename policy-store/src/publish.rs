//! Every committed policy version, published as a `PolicyApplied` event, so the archive shows
//! who changed what and when.
//!
//! Each store node's process runs [`publish_versions`] against its own node. Event and session
//! ids are derived from the version and its digest, so the same version published by several
//! nodes, or again after a restart, is one event: JetStream deduplicates the message id and the
//! recorder deduplicates by event id.

use std::time::Duration;

use eventbus::EventBus;
use proto::events::{Envelope, Event, Timestamp};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use uuid::Uuid;

use crate::client::PolicyClient;

/// A UUIDv7 at `ms` whose other bits come from `seed`: stable for the same inputs.
fn derived_v7(ms: u64, seed: &[u8]) -> Uuid {
    let digest = Sha256::digest(seed);
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&digest[..10]);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid()
}

/// The event for one version.
pub fn event_for(v: &proto::pb::PolicyVersion) -> Envelope {
    let ms = u64::try_from(v.applied_at_unix_ms).unwrap_or(0);
    let seed = format!("{}:{}", v.version, v.digest);
    Envelope {
        v: proto::events::ENVELOPE_VERSION,
        id: derived_v7(ms, format!("event:{seed}").as_bytes()),
        session: derived_v7(ms, format!("session:{seed}").as_bytes()),
        at: Timestamp(i64::try_from(ms).unwrap_or(i64::MAX).saturating_mul(1000)),
        event: Event::PolicyApplied {
            version: v.version,
            author: v.author.clone(),
            digest: v.digest.clone(),
        },
    }
}

/// Follow the store at `endpoint` (checked as `tls` says) with `token` (the read token, or the
/// admin token) and publish each version, from the first, until `shutdown`. Failures are
/// retried; nothing is skipped.
pub async fn publish_versions(
    endpoint: String,
    tls: crate::ClientTls,
    token: String,
    bus: EventBus,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut published = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let round = async {
            let mut client =
                PolicyClient::connect_with(&endpoint, &token, &tls).await.map_err(|e| e.to_string())?;
            let mut stream = client.watch(published).await.map_err(|e| e.to_string())?;
            while let Some(v) = stream.next().await {
                let v = v.map_err(|e| e.to_string())?;
                let env = event_for(&v);
                // Retry this version until it is acknowledged.
                loop {
                    match bus.publish(&env).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, policy.version = v.version, "publishing a policy event failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                published = v.version;
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            _ = &mut shutdown => return,
            r = round => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "policy event publisher reconnecting");
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_version_always_gets_the_same_ids() {
        let v = proto::pb::PolicyVersion {
            version: 3,
            document_yaml: String::new(),
            author: "dana".into(),
            applied_at_unix_ms: 1_764_288_000_000,
            digest: "ab".into(),
        };
        let (a, b) = (event_for(&v), event_for(&v));
        assert_eq!((a.id, a.session), (b.id, b.session));
        assert_ne!(a.id, a.session);
        assert_eq!(a.session.get_version_num(), 7);
        assert_eq!(a.at.date(), "2025-11-28");
        let mut w = v.clone();
        w.version = 4;
        assert_ne!(event_for(&w).id, a.id);
    }
}
