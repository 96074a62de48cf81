//! The recorder: consumes every session event from the event bus and writes each session to
//! object storage (S3-compatible or a local directory), and reads recordings back for audits.
//!
//! # Key layout
//!
//! ```text
//! sessions/date=YYYY-MM-DD/{session_uuid}/{first_stream_seq:020}-{digest}.mpk
//! ```
//!
//! - `date` is the session's start date (UTC), taken from the session id (a UUIDv7 carries its
//!   creation time), or from the chunk's first event when the id is not a UUIDv7.
//! - Each object is a *chunk*: a MessagePack array of [`proto::events::Envelope`]s (written with
//!   field names, `rmp_serde::to_vec_named`), all of one session, taken from one fetched batch, in
//!   stream order. `first_stream_seq` is the stream position of its first event, so listing a
//!   session's folder in key order gives its chunks in stream order.
//! - `digest` is 16 hex digits of the SHA-256 of the chunk's envelope ids: redelivering the same
//!   events rewrites the same key with the same bytes, and different events never overwrite an
//!   earlier chunk.
//! - Delivery is at least once: a batch's events are acked only after all of its chunks are
//!   stored. A crash (or a failed ack) before that means redelivery and possibly a second chunk
//!   with some of the same events; readers ([`audit::read_session`]) deduplicate by envelope id.
//!   A failed write is retried with backoff, forever; events are never dropped.
//! - With the in-process bus (`airlock up`), the recorder only sees events published after its
//!   durable consumer was created: start it before the proxy.
//!
//! Later versions add compression, per-session hash chains and manifests, and a Parquet index
//! next to `sessions/`; readers must keep reading this layout.
//!
//! # Layout
//! - this file: [`RecorderConfig`] and [`run`], the consume-write-ack loop.
//! - [`storage`]: [`StorageConfig`] and [`open_store`].
//! - `chunk`: the key layout and chunk encoding.
//! - [`audit`]: reading sessions back, listing them, and rendering them for people.
//! - [`error`]: the error types.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventbus::{Delivery, EventBus};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use proto::events::Envelope;
use proto::subjects;
use serde::Deserialize;
use tracing::{debug, info, warn};
use uuid::Uuid;

pub mod audit;
mod chunk;
pub mod error;
pub mod storage;

pub use error::{AuditError, RecorderError, StorageError};
pub use storage::{StorageConfig, open_store};

/// How many chunk writes run at once.
const PUT_CONCURRENCY: usize = 8;
/// First retry delay after a failed write or fetch; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// While writes are slow or retried, tell the bus we are still working this often, so that the
/// batch is not redelivered meanwhile (the NATS consumer's ack wait is 30s).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The recorder's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecorderConfig {
    /// Max events per fetch. Default 500.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Max wait for a batch. Default 200ms.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub batch_wait: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self { batch_max: default_batch_max(), batch_wait: default_batch_wait() }
    }
}

fn default_batch_max() -> usize {
    500
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(200)
}

/// Consume every session event ([`subjects::ALL_SESSION_EVENTS`], durable
/// [`subjects::RECORDER_DURABLE`]) and write it to `store` until `shutdown` completes. Several
/// recorders may run against NATS: they share the work.
///
/// Returns `Err` only if the durable consumer cannot be created at start, or a chunk cannot be
/// encoded; outages of the bus or the store are waited out.
pub async fn run(
    cfg: RecorderConfig,
    bus: EventBus,
    store: Arc<dyn ObjectStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RecorderError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut durable = bus
        .durable(subjects::RECORDER_DURABLE, subjects::ALL_SESSION_EVENTS)
        .await
        .map_err(RecorderError::Consumer)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::default();
    info!(store = %store, "recorder started");
    loop {
        let batch = tokio::select! {
            biased;
            () = &mut shutdown => break,
            batch = durable.next_batch(cfg.batch_max, cfg.batch_wait) => batch,
        };
        let batch = match batch {
            Ok(batch) => {
                backoff.reset();
                batch
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "fetching events failed");
                if sleep_or_shutdown(delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        if !store_batch(store.as_ref(), &batch, &mut shutdown).await? {
            break;
        }
        ack_all(&batch).await;
    }
    info!("recorder stopped");
    Ok(())
}

/// One object to write.
struct Chunk {
    session: Uuid,
    path: Path,
    events: usize,
    bytes: Bytes,
}

/// Split a batch into one chunk per session, each in stream order.
fn chunks(batch: &[Delivery]) -> Result<Vec<Chunk>, RecorderError> {
    let mut order: Vec<Uuid> = Vec::new();
    let mut by_session: HashMap<Uuid, (u64, Vec<Envelope>)> = HashMap::new();
    for d in batch {
        let entry = by_session.entry(d.envelope.session).or_insert_with(|| {
            order.push(d.envelope.session);
            (d.stream_seq, Vec::new())
        });
        entry.0 = entry.0.min(d.stream_seq);
        entry.1.push(d.envelope.clone());
    }
    order
        .into_iter()
        .filter_map(|session| by_session.remove(&session).map(|v| (session, v)))
        .map(|(session, (first_seq, envs))| {
            let bytes = chunk::encode(&envs).map_err(|source| RecorderError::Encode { session, source })?;
            Ok(Chunk {
                session,
                path: chunk::chunk_path(session, first_seq, &envs),
                events: envs.len(),
                bytes: bytes.into(),
            })
        })
        .collect()
}

/// Write every chunk of the batch, retrying failed ones with backoff until all are stored.
/// `Ok(false)` when shutdown came first (nothing is acked then; the bus redelivers).
async fn store_batch(
    store: &dyn ObjectStore,
    batch: &[Delivery],
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<bool, RecorderError> {
    let mut pending = chunks(batch)?;
    let mut backoff = Backoff::default();
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        let puts = futures::stream::iter(pending)
            .map(|c| async move {
                let result = store.put(&c.path, PutPayload::from_bytes(c.bytes.clone())).await;
                (c, result)
            })
            .buffer_unordered(PUT_CONCURRENCY)
            .collect::<Vec<_>>();
        let mut puts = std::pin::pin!(puts);
        let results = loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => return Ok(false),
                results = &mut puts => break results,
                _ = progress.tick() => in_progress(batch).await,
            }
        };
        pending = Vec::new();
        for (c, result) in results {
            match result {
                Ok(_) => debug!(session.id = %c.session, path = %c.path, events = c.events, "chunk stored"),
                Err(e) => {
                    warn!(session.id = %c.session, path = %c.path, error = %e, "storing chunk failed");
                    pending.push(c);
                }
            }
        }
        if pending.is_empty() {
            return Ok(true);
        }
        let delay = backoff.next_delay();
        warn!(chunks = pending.len(), retry_in = ?delay, "retrying chunk writes");
        let wait = sleep_or_shutdown(delay, shutdown);
        let mut wait = std::pin::pin!(wait);
        loop {
            tokio::select! {
                stop = &mut wait => if stop { return Ok(false) } else { break },
                _ = progress.tick() => in_progress(batch).await,
            }
        }
    }
}

async fn in_progress(batch: &[Delivery]) {
    for d in batch {
        if let Err(e) = d.progress().await {
            debug!(error = %e, "progress signal failed");
        }
    }
}

async fn ack_all(batch: &[Delivery]) {
    for d in batch {
        if let Err(e) = d.ack().await {
            // It will be redelivered and stored again; readers deduplicate.
            warn!(session.id = %d.envelope.session, stream.seq = d.stream_seq, error = %e, "ack failed");
        }
    }
}

/// Sleep for `delay`; `true` if shutdown completed first.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        biased;
        () = shutdown => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Exponential backoff from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`].
#[derive(Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(self.attempts.min(16))).min(MAX_BACKOFF);
        self.attempts += 1;
        delay
    }

    fn reset(&mut self) {
        self.attempts = 0;
    }
}
