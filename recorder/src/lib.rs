//! The recorder: consumes every session event from the event bus and writes each session to
//! object storage (S3, GCS, Azure or a local directory, through `object_store`) as a hash chain of
//! compressed chunks, with a signed manifest per session, an archive-wide log of manifests, and a
//! Parquet index for auditors' own tools; [`audit`] reads it all back and verifies it.
//!
//! # Key layout
//!
//! ```text
//! sessions/date=YYYY-MM-DD/{session}/{index:08}.mpk.zst   chunk `index` of the session's chain
//! sessions/date=YYYY-MM-DD/{session}/manifest.json        chain head, counts, incomplete, signature
//! archive/log/{seq:020}.json                              one entry per manifest written, chained
//! index/date=YYYY-MM-DD/{session}.parquet                 one row per request (Hive partitioning)
//! ```
//!
//! - A chunk is zstd-compressed MessagePack (field names) of `{format, session, index, prev_hash,
//!   events}`; `prev_hash` is the SHA-256 of the previous chunk's stored bytes. Chunk keys are
//!   created with a conditional put, so an index is written once, by one writer.
//! - Exactly once: for every session it writes, the recorder knows the ids in its chain (read back
//!   from storage after a restart, or when another replica extended the chain, which the
//!   conditional put reveals) and writes only events not in it. Deliveries are acked only after
//!   their chunk is stored, so a crash at any point loses nothing and duplicates nothing.
//! - Sharding ([`shard`]): with `shard = "K/N"` a recorder writes only the sessions whose shard
//!   (a stable hash of the session id, modulo N) is K, through its own durable consumer
//!   `recorder-K-of-N` over every session event; deliveries of other shards are acked at once,
//!   unwritten (their shard's consumer sees every message too). N recorders with shards 0..N
//!   split the sessions, and no session is written by two of them.
//! - Several replicas may share one durable consumer (the same shard, for redundancy): a
//!   conflicting chunk write makes the loser read the winner's chunk, drop the events already in
//!   it, and write the rest as the next link.
//! - A session's manifest is written when `SessionEnded` is recorded, or, marked `incomplete`,
//!   after [`RecorderConfig::session_timeout`] without events; late events extend the chain and
//!   rewrite it. Order per session end: index file, archive log entry, manifest.
//! - Manifests only move forward, whichever replica writes last: a manifest's content is a
//!   function of the chain, and it is created (`PutMode::Create`) or replaced only if unchanged
//!   since read (`PutMode::Update`); a replica that finds a longer chain's manifest, or loses the
//!   conditional write, follows the chain and compares again. After writing, the next chunk index
//!   is checked, and the chain followed and the manifest rewritten if a chunk appeared there. A
//!   store without conditional replacement (a local directory) gets a plain overwrite, made right
//!   by that check. Replicas that lose a race may append log entries for shorter chains after
//!   longer ones: [`audit`] holds a manifest to the session's entry with the most chunks.
//! - Format 1 chunks (`{first_stream_seq:020}-{digest}.mpk`, the walking skeleton's) are still
//!   read by [`audit`], for sessions without a chain.
//! - Only the exact names above count: any other object in a session's folder is a stray, which
//!   [`audit`] never reads and `verify` reports as tampering.
//! - With a signing key ([`RecorderConfig::signing_key_file`]), manifests, archive log entries
//!   and the retention marker are signed ([`signed`]), so rewriting the log without a deleted
//!   session, or moving the retention cutoff, needs the key. Log entries written by other
//!   recorders are followed, not checked: `verify` checks them.
//!
//! # Layout
//! - this file: [`RecorderConfig`] and [`run`], the consume-write-ack loop.
//! - [`storage`]: [`StorageConfig`] and [`open_store`].
//! - [`shard`]: [`Shard`], which sessions a recorder writes.
//! - `chunk`: the key layout and chunk encoding.
//! - `session`: the per-session writer state.
//! - [`signed`]: the Ed25519 signature scheme shared by manifests, log entries and the marker.
//! - [`manifest`]: session manifests.
//! - [`archive`]: the archive log of manifests.
//! - [`index`]: the Parquet index.
//! - [`retention`]: deleting expired date partitions.
//! - [`audit`]: reading sessions back, listing, searching, rendering and verifying them.
//! - [`error`]: the error types.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use eventbus::{Delivery, EventBus};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use proto::events::{Envelope, Timestamp};
use proto::subjects;
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

pub mod archive;
pub mod audit;
mod chunk;
pub mod error;
pub mod index;
pub mod manifest;
pub mod retention;
mod session;
pub mod shard;
pub mod signed;
pub mod storage;
#[cfg(test)]
mod tests;

/// The storage interface every function here takes, re-exported for callers.
pub use object_store::ObjectStore;

pub use error::{AuditError, ChunkError, IndexError, RecorderError, StorageError};
pub use shard::{Shard, ShardError};
pub use storage::{StorageConfig, open_store};

use archive::{ArchiveLog, LogEntry};
use session::SessionState;
use signed::Signed;

/// How many sessions of a batch are written at once.
const PUT_CONCURRENCY: usize = 16;
/// First retry delay after a failed write or fetch; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// While writes are slow or retried, tell the bus we are still working this often, so that the
/// batch is not redelivered meanwhile (the NATS consumer's ack wait is 30s).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often open sessions are checked for the timeout, and finished ones forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The largest batch, in bus messages (the durable consumer allows
/// [`eventbus::nats::MAX_ACK_PENDING`] out unacked; each fetch is also bounded by
/// [`eventbus::nats::FETCH_BYTES`]).
const MAX_BATCH: usize = 10_000;
/// How often retention runs (when configured).
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// A finished session's state is kept this long after its last event (late events are cheap).
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// The recorder's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecorderConfig {
    /// Max bus messages per fetch (a batch message on [`subjects::BATCH`] holds many events);
    /// larger batches make larger chunks (fewer writes). At most 10,000; each fetch is also
    /// bounded to 32 MiB. Default 10,000.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Max wait for a batch. Default 200ms.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub batch_wait: Duration,
    /// A session with no event for this long and no `SessionEnded` (its proxy crashed) is closed:
    /// its manifest is written with `incomplete: true`. Default 10m.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// A file holding an Ed25519 seed as 64 hex digits: manifests, archive log entries and the
    /// retention marker are signed with it.
    /// Default none (manifests unsigned; chains and the archive log still detect tampering).
    #[serde(default)]
    pub signing_key_file: Option<String>,
    /// At start, sessions of the last this many days that have chunks but no manifest are picked
    /// up again, so that they time out even if their proxy never comes back. Default 2.
    #[serde(default = "default_recover_days")]
    pub recover_days: u32,
    /// Delete recordings (and index files) whose session date is older than this, checked
    /// hourly; e.g. `400d`. Default none: keep everything (or use storage lifecycle rules).
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// `"K/N"`: write only the sessions of shard K of N, through the durable consumer
    /// `recorder-K-of-N` (see [`shard`]). Run one or more recorders for each K in 0..N. Default
    /// `"0/1"`: every session, through the durable `recorder`.
    #[serde(default)]
    pub shard: Shard,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            batch_max: default_batch_max(),
            batch_wait: default_batch_wait(),
            session_timeout: default_session_timeout(),
            signing_key_file: None,
            recover_days: default_recover_days(),
            retention: None,
            shard: Shard::ALL,
        }
    }
}

fn default_batch_max() -> usize {
    MAX_BATCH
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(200)
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_recover_days() -> u32 {
    2
}

impl RecorderConfig {
    /// The signing key, if one is configured.
    pub fn signing_key(&self) -> Result<Option<SigningKey>, RecorderError> {
        let Some(path) = &self.signing_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|source| RecorderError::SigningKey { path: path.clone(), source })?;
        manifest::parse_signing_key(&text)
            .map(Some)
            .ok_or_else(|| RecorderError::SigningKeyFormat { path: path.clone() })
    }
}

/// Consume every session event ([`subjects::ALL_SESSION_EVENTS`], through the durable consumer
/// [`Shard::durable_name`] of [`RecorderConfig::shard`]: [`subjects::RECORDER_DURABLE`] unless
/// sharded) and write the sessions of the configured shard to `store` until `shutdown`
/// completes. Recorders of different shards split the sessions; several recorders of one shard
/// share its consumer.
///
/// Returns `Err` only if the durable consumer cannot be created at start, the signing key cannot
/// be read, or a chunk cannot be encoded; outages of the bus or the store are waited out.
pub async fn run(
    cfg: RecorderConfig,
    bus: EventBus,
    store: Arc<dyn ObjectStore>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RecorderError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let signer = cfg.signing_key()?;
    let batch_max = cfg.batch_max.clamp(1, MAX_BATCH);
    let shard = cfg.shard;
    let durable_name = shard.durable_name();
    let mut durable =
        bus.durable(&durable_name, subjects::ALL_SESSION_EVENTS).await.map_err(RecorderError::Consumer)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::default();
    let ctx = Ctx {
        store: store.clone(),
        log: Mutex::new(None),
        signer,
        cfg: cfg.clone(),
        conditional_update: AtomicBool::new(true),
    };
    let mut sessions: HashMap<Uuid, SessionState> = HashMap::new();
    let mut recovered = false;
    let mut last_sweep = Instant::now();
    let mut last_retention: Option<Instant> = None;
    info!(
        store = %store,
        signed = ctx.signer.is_some(),
        %shard,
        consumer = %durable_name,
        "recorder started"
    );
    loop {
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            if !recovered {
                recovered = recover_open_sessions(&ctx, &mut sessions).await;
            }
            sweep(&ctx, &mut sessions).await;
            if let Some(retention) = cfg.retention
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                match retention::expire(store.as_ref(), retention, ctx.signer.as_ref()).await {
                    Ok(removed) => {
                        last_retention = Some(Instant::now());
                        info!(removed, "expired recordings removed");
                    }
                    Err(e) => warn!(error = %e, "removing expired recordings failed"),
                }
            }
        }
        let batch = tokio::select! {
            biased;
            () = &mut shutdown => break,
            batch = durable.next_batch(batch_max, cfg.batch_wait) => batch,
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
        // Other shards' sessions: acked unwritten, at once (a batch message is acked by the bus
        // once all its envelopes are, so they must be acked, not dropped).
        let (batch, others): (Vec<Delivery>, Vec<Delivery>) =
            batch.into_iter().partition(|d| shard.owns(d.envelope.session));
        ack_all(&others).await;
        if batch.is_empty() {
            continue;
        }
        if !store_batch(&ctx, &mut sessions, &batch, &mut shutdown).await? {
            break;
        }
        ack_all(&batch).await;
        metrics::counter!("airlock_recorder_events_stored_total").increment(batch.len() as u64);
    }
    info!("recorder stopped");
    Ok(())
}

/// What every session writer shares.
struct Ctx {
    store: Arc<dyn ObjectStore>,
    /// The archive log's end, loaded on first use.
    log: Mutex<Option<ArchiveLog>>,
    signer: Option<SigningKey>,
    cfg: RecorderConfig,
    /// The store can replace an object conditionally (`PutMode::Update`); cleared when it says
    /// it cannot (a local directory).
    conditional_update: AtomicBool,
}

/// Why writing a session's events failed.
enum StepError {
    /// Retry later.
    Store(object_store::Error),
    /// A bug: give up.
    Encode(RecorderError),
}

impl From<object_store::Error> for StepError {
    fn from(e: object_store::Error) -> Self {
        StepError::Store(e)
    }
}

/// Split a batch by session, each in delivery order.
fn by_session(batch: &[Delivery]) -> Vec<(Uuid, Vec<Envelope>)> {
    let mut order: Vec<Uuid> = Vec::new();
    let mut groups: HashMap<Uuid, Vec<Envelope>> = HashMap::new();
    for d in batch {
        groups
            .entry(d.envelope.session)
            .or_insert_with(|| {
                order.push(d.envelope.session);
                Vec::new()
            })
            .push(d.envelope.clone());
    }
    order.into_iter().filter_map(|id| groups.remove(&id).map(|envs| (id, envs))).collect()
}

/// Write every session of the batch, retrying failed ones with backoff until all are stored.
/// `Ok(false)` when shutdown came first (nothing is acked then; the bus redelivers).
async fn store_batch(
    ctx: &Ctx,
    sessions: &mut HashMap<Uuid, SessionState>,
    batch: &[Delivery],
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<bool, RecorderError> {
    let mut pending = by_session(batch);
    let mut backoff = Backoff::default();
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        let work: Vec<_> = pending.into_iter().map(|(id, envs)| (id, envs, sessions.remove(&id))).collect();
        let writes = futures::stream::iter(work)
            .map(|(id, envs, mut state)| async move {
                let result = record_session(ctx, id, &envs, &mut state).await;
                (id, envs, state, result)
            })
            .buffer_unordered(PUT_CONCURRENCY)
            .collect::<Vec<_>>();
        let mut writes = std::pin::pin!(writes);
        let results = loop {
            tokio::select! {
                biased;
                () = &mut *shutdown => return Ok(false),
                results = &mut writes => break results,
                _ = progress.tick() => in_progress(batch).await,
            }
        };
        pending = Vec::new();
        let mut fatal = None;
        for (id, envs, state, result) in results {
            if let Some(state) = state {
                sessions.insert(id, state);
            }
            match result {
                Ok(()) => {}
                Err(StepError::Store(e)) => {
                    warn!(session.id = %id, error = %e, "storing session events failed");
                    pending.push((id, envs));
                }
                Err(StepError::Encode(e)) => fatal = Some(e),
            }
        }
        if let Some(e) = fatal {
            return Err(e);
        }
        if pending.is_empty() {
            return Ok(true);
        }
        let delay = backoff.next_delay();
        metrics::counter!("airlock_recorder_write_retries_total").increment(1);
        warn!(sessions = pending.len(), retry_in = ?delay, "retrying session writes");
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

/// Append the events of `envs` not yet in the session's chain as its next chunk, then write the
/// manifest if the session has ended.
async fn record_session(
    ctx: &Ctx,
    id: Uuid,
    envs: &[Envelope],
    state: &mut Option<SessionState>,
) -> Result<(), StepError> {
    let store = ctx.store.as_ref();
    if state.is_none() {
        let fallback = envs.first().map_or_else(Timestamp::now, |e| e.at);
        let mut fresh = SessionState::new(id, chunk::session_date(id, fallback));
        fresh.catch_up(store).await?;
        *state = Some(fresh);
    }
    let s = state.as_mut().expect("set just above");
    loop {
        let events = s.fresh(envs);
        if events.is_empty() {
            break;
        }
        let c = chunk::ChainedChunk {
            format: chunk::CHUNK_FORMAT,
            session: id,
            index: s.next_index,
            prev_hash: s.head.clone(),
            events,
        };
        let bytes = chunk::encode_chained(&c)
            .map_err(|source| StepError::Encode(RecorderError::Encode { session: id, source }))?;
        let hash = chunk::sha256_hex(&bytes);
        let path = chunk::chained_path(&s.date, id, c.index);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match store.put_opts(&path, PutPayload::from(bytes), opts).await {
            Ok(_) => {
                debug!(session.id = %id, path = %path, events = c.events.len(), "chunk stored");
                s.absorb(&c, hash);
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Written by an earlier run or another replica: learn it, keep only what is new.
                debug!(session.id = %id, path = %path, "chunk index taken, catching up");
                s.catch_up(store).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    s.last_activity = Instant::now();
    if s.ended {
        finalize(ctx, s).await?;
    }
    Ok(())
}

/// Write the index file, the archive log entry and the manifest of the chain as it stands,
/// unless a manifest at least as far along is already stored; the chain is followed to its true
/// end first if another replica extended it. A stored manifest that claims more chunks than are
/// stored is logged as an error, and replaced unless it is signed with our key.
///
/// Replicas race here when a session's events are split between them: the manifest is replaced
/// only conditionally (on the version read just before), so a replica that finished earlier with
/// a shorter chain cannot overwrite a longer chain's manifest. After writing, the next chunk index
/// is checked: if a chunk appeared there meanwhile, the chain is followed and the manifest
/// rewritten. A loser of the race that already wrote the index file rewrites it once it has caught
/// up, so that the index file matches the manifest.
async fn finalize(ctx: &Ctx, s: &mut SessionState) -> Result<(), object_store::Error> {
    if s.finalized.as_ref().is_some_and(|(head, inc)| *head == s.head && *inc != s.ended) {
        return Ok(());
    }
    let store = ctx.store.as_ref();
    let path = chunk::manifest_path(&s.date, s.id);
    // The chain length the index file was last written for by this call.
    let mut index_for: Option<u64> = None;
    loop {
        let incomplete = !s.ended;
        let mut manifest = s.manifest();
        if let Some(key) = &ctx.signer {
            manifest.sign(key);
        }
        let bytes = manifest.to_bytes();
        let stored = read_manifest(store, &path).await?;
        if let Some(stored) = &stored {
            if let Some(ahead) = stored.manifest.as_ref().filter(|m| m.chunks > s.next_index) {
                // Another replica recorded further: follow the chain, then compare again.
                if s.catch_up(store).await? {
                    continue;
                }
                // It names chunks that are not stored. Signed with our key, it is genuine and the
                // chunks were deleted since: it stays, as the evidence `audit verify` reports.
                // Anything else was forged (a recorder writes chunks before their manifest), and
                // leaving it would leave the chain without a manifest or log entry, its tail
                // deletable unnoticed: it is replaced.
                if signed_by(ahead, ctx.signer.as_ref()) {
                    error!(
                        session.id = %s.id,
                        chunks = s.next_index,
                        manifest.chunks = ahead.chunks,
                        "chunks named by the session's signed manifest were deleted from storage; manifest left as evidence"
                    );
                    s.finalized = Some((s.head.clone(), incomplete));
                    return Ok(());
                }
                error!(
                    session.id = %s.id,
                    chunks = s.next_index,
                    manifest.chunks = ahead.chunks,
                    "the stored manifest names chunks never stored and is not signed with this recorder's key: forged; replacing it"
                );
            }
            if stored.bytes == bytes.as_slice() {
                if index_for.is_some_and(|chunks| chunks != s.next_index) {
                    write_index(store, s).await?;
                }
                s.finalized = Some((s.head.clone(), incomplete));
                return Ok(());
            }
        }
        write_index(store, s).await?;
        index_for = Some(s.next_index);
        {
            let mut log = ctx.log.lock().await;
            if log.is_none() {
                *log = Some(ArchiveLog::load(store).await?);
            }
            let entry = LogEntry {
                seq: 0,
                prev: String::new(),
                session: s.id,
                date: s.date.clone(),
                head: s.head.clone(),
                chunks: s.next_index,
                incomplete,
                manifest_sha256: chunk::sha256_hex(&bytes),
                public_key: None,
                signature: None,
            };
            let logged =
                log.as_mut().expect("loaded just above").append(store, entry, ctx.signer.as_ref()).await?;
            // Outside the bucket (the recorder's log), a checkpoint for `audit verify --checkpoint`.
            info!(session.id = %s.id, archive.checkpoint = %logged, "archive log entry written");
            metrics::counter!("airlock_recorder_sessions_archived_total").increment(1);
            metrics::gauge!("airlock_recorder_archive_log_seq").set(logged.seq as f64);
        }
        match put_manifest(ctx, &path, bytes, stored.map(|m| m.version)).await {
            Ok(()) => {}
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                debug!(session.id = %s.id, "manifest replaced meanwhile, reading it again");
                continue;
            }
            Err(e) => return Err(e),
        }
        info!(session.id = %s.id, chunks = s.next_index, incomplete, "session manifest written");
        s.finalized = Some((s.head.clone(), incomplete));
        // A chunk after the head just written: its writer may have finished before our write
        // (or the store cannot replace conditionally). Follow it; an ended session's manifest is
        // rewritten now, a revived one is closed again by the sweep.
        if !s.catch_up(store).await? || !s.ended {
            return Ok(());
        }
        debug!(session.id = %s.id, chunks = s.next_index, "chain grew past the manifest, rewriting it");
    }
}

/// A manifest as stored.
struct StoredManifest {
    bytes: bytes::Bytes,
    /// Parsed (`None` if it does not parse).
    manifest: Option<manifest::Manifest>,
    /// What a conditional replacement must match.
    version: UpdateVersion,
}

async fn read_manifest(
    store: &dyn ObjectStore,
    path: &Path,
) -> Result<Option<StoredManifest>, object_store::Error> {
    let got = match store.get(path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let version = UpdateVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
    let bytes = got.bytes().await?;
    let manifest = serde_json::from_slice::<manifest::Manifest>(&bytes).ok();
    Ok(Some(StoredManifest { bytes, manifest, version }))
}

/// `m` carries a valid signature by `signer`'s key.
fn signed_by(m: &manifest::Manifest, signer: Option<&SigningKey>) -> bool {
    signer.is_some_and(|key| m.is_signed_by(&key.verifying_key()))
}

/// Store a manifest: created if none was stored, else replaced only if still at `stored`
/// (`AlreadyExists` or `Precondition` otherwise). A store that cannot replace conditionally (a
/// local directory) gets a plain overwrite; [`finalize`]'s check for a longer chain covers it.
async fn put_manifest(
    ctx: &Ctx,
    path: &Path,
    bytes: Vec<u8>,
    stored: Option<UpdateVersion>,
) -> Result<(), object_store::Error> {
    let store = ctx.store.as_ref();
    let payload = PutPayload::from(bytes);
    let mode = match stored {
        None => PutMode::Create,
        Some(version) if ctx.conditional_update.load(Ordering::Relaxed) => PutMode::Update(version),
        Some(_) => PutMode::Overwrite,
    };
    let conditional = matches!(mode, PutMode::Update(_));
    match store.put_opts(path, payload.clone(), PutOptions { mode, ..Default::default() }).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotImplemented { .. }) if conditional => {
            info!(store = %store, "the store cannot replace objects conditionally: manifests are overwritten");
            ctx.conditional_update.store(false, Ordering::Relaxed);
            store.put(path, payload).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Write the session's Parquet index file (a failure to build it is logged and skipped).
async fn write_index(store: &dyn ObjectStore, s: &SessionState) -> Result<(), object_store::Error> {
    match s.index.to_parquet(s.id) {
        Ok(parquet) => {
            store.put(&index::index_path(&s.date, s.id), PutPayload::from(parquet)).await?;
        }
        Err(e) => warn!(session.id = %s.id, error = %e, "building the index file failed; skipped"),
    }
    Ok(())
}

/// Close sessions that timed out (checking storage first: another replica may be writing them),
/// and forget finished ones.
async fn sweep(ctx: &Ctx, sessions: &mut HashMap<Uuid, SessionState>) {
    let timeout = ctx.cfg.session_timeout;
    let mut forget = Vec::new();
    for s in sessions.values_mut() {
        let done = s.finalized.as_ref().is_some_and(|(head, inc)| *head == s.head && *inc != s.ended);
        if done {
            if s.last_activity.elapsed() >= FORGET_AFTER.min(timeout) {
                forget.push(s.id);
            }
            continue;
        }
        if s.ended || s.last_activity.elapsed() < timeout {
            continue;
        }
        match s.catch_up(ctx.store.as_ref()).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(session.id = %s.id, error = %e, "checking a quiet session failed");
                continue;
            }
        }
        info!(session.id = %s.id, "session timed out without SessionEnded: closing it as incomplete");
        if let Err(e) = finalize(ctx, s).await {
            warn!(session.id = %s.id, error = %e, "closing a timed-out session failed");
        }
    }
    for id in forget {
        sessions.remove(&id);
    }
}

/// Pick up sessions of the last `recover_days` days (of this recorder's shard) that have chunks
/// but no manifest, so that they time out even when nothing more arrives for them. `true` once
/// done.
async fn recover_open_sessions(ctx: &Ctx, sessions: &mut HashMap<Uuid, SessionState>) -> bool {
    let store = ctx.store.as_ref();
    let now = Timestamp::now();
    for day in 0..ctx.cfg.recover_days {
        let date = now.as_micros() - i64::from(day) * 86_400_000_000;
        let date = Timestamp(date).date();
        let prefix = Path::from_iter([chunk::ROOT.to_string(), format!("date={date}")]);
        let mut open: HashMap<Uuid, bool> = HashMap::new();
        let mut listing = store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            match meta {
                Ok(meta) => match chunk::parse_key(&meta.location) {
                    Some((id, _, chunk::Key::Manifest)) => {
                        open.insert(id, false);
                    }
                    Some((id, _, chunk::Key::Chained(_))) => {
                        open.entry(id).or_insert(true);
                    }
                    _ => {}
                },
                Err(e) => {
                    warn!(error = %e, "listing sessions to recover failed");
                    return false;
                }
            }
        }
        for (id, is_open) in open {
            if !is_open || sessions.contains_key(&id) || !ctx.cfg.shard.owns(id) {
                continue;
            }
            let mut s = SessionState::new(id, date.clone());
            if let Err(e) = s.catch_up(store).await {
                warn!(session.id = %id, error = %e, "reading a session to recover failed");
                return false;
            }
            debug!(session.id = %id, chunks = s.next_index, "recovered an open session");
            sessions.insert(id, s);
        }
    }
    true
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
            // It will be redelivered; the session's chain already holds it, so it is not rewritten.
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
