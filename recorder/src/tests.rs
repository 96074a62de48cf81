//! Replicas racing on one session's manifest, interleaved deterministically: replica A finishes
//! the session first but its manifest write is held back until replica B has appended a chunk
//! and written its own manifest.

#[path = "../tests/common/store.rs"]
mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, ensure};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use proto::events::{Envelope, Event};
use tokio::sync::{Mutex, Notify};
use uuid::Uuid;

use self::store::{Hooked, PutHook};
use crate::archive::{self, LogEntry};
use crate::audit;
use crate::manifest::Manifest;
use crate::session::SessionState;
use crate::signed::Signed;
use crate::{Ctx, RecorderConfig, chunk, finalize, record_session};

/// Holds back the first manifest write, once armed, until released.
#[derive(Debug)]
struct Gate {
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

impl Gate {
    /// `inner`, its first manifest write held back.
    fn new(inner: Arc<dyn ObjectStore>) -> Arc<Hooked<Self>> {
        Hooked::new(
            inner,
            Self { armed: AtomicBool::new(true), reached: Notify::new(), release: Notify::new() },
        )
    }
}

impl PutHook for Gate {
    fn before<'a>(&'a self, location: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if location.filename() == Some("manifest.json") && self.armed.swap(false, Ordering::SeqCst) {
                self.reached.notify_one();
                self.release.notified().await;
            }
        })
    }
}

fn ctx(store: Arc<dyn ObjectStore>) -> Ctx {
    Ctx {
        store,
        log: Mutex::new(None),
        signer: None,
        cfg: RecorderConfig::default(),
        conditional_update: AtomicBool::new(true),
    }
}

fn request(id: Uuid, seq: u64) -> Envelope {
    Envelope::new(
        id,
        Event::RequestReceived {
            seq,
            statement: format!("select {seq}").into(),
            parameters: Default::default(),
        },
    )
}

async fn stored_manifest(store: &dyn ObjectStore, state: &SessionState) -> Result<Manifest> {
    let path = chunk::manifest_path(&state.date, state.id);
    let bytes = store.get(&path).await.context("manifest")?.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// A records the session's end and starts writing the manifest, held back while B appends the
/// rest (learning of the end from A's chunk) and writes the longer chain's manifest; then A's
/// write goes ahead. With `prior`, an incomplete manifest (as a timeout writes) is there first, so
/// that both replace a manifest rather than create one.
async fn race(store: Arc<dyn ObjectStore>, prior: bool) -> Result<()> {
    let id = Uuid::now_v7();
    let events: Vec<Envelope> = (1..=3)
        .map(|seq| request(id, seq))
        .chain([Envelope::new(id, Event::SessionEnded { reason: "client closed".into() })])
        .collect();
    let plain = ctx(store.clone());
    if prior {
        let mut state = None;
        record_session(&plain, id, &events[..1], &mut state).await.map_err(step)?;
        let mut state = state.context("state")?;
        finalize(&plain, &mut state).await?;
        ensure!(stored_manifest(store.as_ref(), &state).await?.incomplete, "an incomplete manifest first");
    }

    let gated = Gate::new(store.clone());
    let a = ctx(gated.clone());
    let a_events = vec![events[0].clone(), events[1].clone(), events[3].clone()];
    let a_task = async {
        let mut state = None;
        record_session(&a, id, &a_events, &mut state).await.map_err(step)?;
        state.context("A's state")
    };
    let b_task = async {
        gated.hook.reached.notified().await;
        let mut state = None;
        record_session(&plain, id, &events[2..3], &mut state).await.map_err(step)?;
        gated.hook.release.notify_one();
        state.context("B's state")
    };
    let (a_state, b_state) = tokio::try_join!(a_task, b_task)?;

    let chunks = if prior { 3 } else { 2 };
    ensure!(b_state.next_index == chunks, "B appended after A: {b_state:?}");
    let m = stored_manifest(store.as_ref(), &b_state).await?;
    ensure!(
        m.chunks == chunks && m.events == 4 && !m.incomplete,
        "the manifest names the chain's end: {m:?}"
    );
    ensure!(a_state.next_index == chunks, "A followed the chain to its end");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok(), "{}", report.render());
    ensure!(audit::read_session(store.as_ref(), id).await?.len() == 4, "every event once");
    Ok(())
}

fn step(e: crate::StepError) -> anyhow::Error {
    match e {
        crate::StepError::Store(e) => e.into(),
        crate::StepError::Encode(e) => e.into(),
    }
}

#[tokio::test]
async fn a_stale_manifest_never_replaces_a_longer_chains_when_creating() -> Result<()> {
    race(Arc::new(InMemory::new()), false).await
}

#[tokio::test]
async fn a_stale_manifest_never_replaces_a_longer_chains_when_updating() -> Result<()> {
    race(Arc::new(InMemory::new()), true).await
}

#[tokio::test]
async fn a_local_directory_without_conditional_updates_ends_at_the_chains_end() -> Result<()> {
    for prior in [false, true] {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path())?);
        race(store, prior).await?;
    }
    Ok(())
}

/// A manifest claiming a trillion chunks, planted before the session ends, does not keep the
/// recorder from writing the chain's own manifest and archive log entry: a recorder writes chunks
/// before their manifest, so one ahead of the chain that is not signed with our key was forged,
/// and is replaced. One signed with our key is genuine (its chunks were deleted since) and stays,
/// as evidence for `audit verify`.
#[tokio::test]
async fn a_manifest_ahead_of_the_chain_is_replaced_unless_signed_with_our_key() -> Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let id = Uuid::now_v7();
    let key = crate::manifest::parse_signing_key(&"5c".repeat(32)).context("key")?;
    let signing = Ctx { signer: Some(key), ..ctx(store.clone()) };
    let mut state = None;
    record_session(&signing, id, &[request(id, 1)], &mut state).await.map_err(step)?;
    let date = state.as_ref().context("state")?.date.clone();
    let mut forged = state.as_ref().context("state")?.manifest();
    forged.chunks = 1_000_000_000_000;
    let path = chunk::manifest_path(&date, id);
    store.put(&path, forged.to_bytes().into()).await?;

    let end = Envelope::new(id, Event::SessionEnded { reason: "client closed".into() });
    record_session(&signing, id, &[end], &mut state).await.map_err(step)?;
    let state = state.context("state")?;
    let m = stored_manifest(store.as_ref(), &state).await?;
    ensure!(m.chunks == 2 && !m.incomplete, "the chain's own manifest replaced the forged one: {m:?}");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok() && report.log_entries == 1, "{}", report.render());

    // Chunk 1 deleted: a recorder picking the session up again leaves the signed manifest be.
    store.delete(&chunk::chained_path(&date, id, 1)).await?;
    let mut again = SessionState::new(id, date);
    again.catch_up(store.as_ref()).await?;
    finalize(&signing, &mut again).await?;
    let kept = stored_manifest(store.as_ref(), &again).await?;
    ensure!(kept == m, "the signed manifest stays: {kept:?}");
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.render().contains("chunk 1 deleted from the end of the chain"), "{}", report.render());
    Ok(())
}

// --- Signed archive log entries and retention marker -----------------------------------------

/// A session id dated `days` ago (its UUIDv7 timestamp decides its date partition).
fn id_days_ago(days: u64) -> Uuid {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
        .saturating_sub(days * 86_400);
    Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0))
}

fn key(byte: &str) -> Result<ed25519_dalek::SigningKey> {
    crate::manifest::parse_signing_key(&byte.repeat(32)).context("key")
}

/// Record and end a session of two requests with `ctx` (index file, log entry, manifest).
async fn ended_session(ctx: &Ctx, id: Uuid) -> Result<()> {
    let events = [
        request(id, 1),
        request(id, 2),
        Envelope::new(id, Event::SessionEnded { reason: "client closed".into() }),
    ];
    let mut state = None;
    record_session(ctx, id, &events, &mut state).await.map_err(step)?;
    ensure!(state.context("state")?.finalized.is_some(), "the session was finalized");
    Ok(())
}

/// Delete every object of session `id`: chunks, manifest and index file.
async fn delete_session(store: &dyn ObjectStore, id: Uuid) -> Result<()> {
    for root in [chunk::ROOT, crate::index::INDEX_ROOT] {
        let all: Vec<_> = store.list(Some(&Path::from(root))).try_collect().await?;
        for meta in all.into_iter().filter(|m| m.location.as_ref().contains(&id.to_string())) {
            store.delete(&meta.location).await?;
        }
    }
    Ok(())
}

/// The attacker's rewrite of the archive log without session `id`'s entries: every later entry
/// moved down, its `prev` recomputed, and signed with `resign` (else left unsigned); the
/// leftover entries at the end deleted. Returns the first seq rewritten.
async fn rewrite_log_without(
    store: &dyn ObjectStore,
    id: Uuid,
    resign: Option<&ed25519_dalek::SigningKey>,
) -> Result<u64> {
    let mut paths: Vec<Path> =
        store.list(Some(&Path::from(archive::LOG_ROOT))).map_ok(|m| m.location).try_collect().await?;
    paths.sort();
    let mut entries = Vec::new();
    for path in &paths {
        let bytes = store.get(path).await?.bytes().await?;
        entries.push((serde_json::from_slice::<LogEntry>(&bytes)?, bytes));
    }
    let first = entries.iter().position(|(e, _)| e.session == id).context("the session's entry")?;
    let mut prev = match first {
        0 => chunk::GENESIS.to_string(),
        n => chunk::sha256_hex(&entries[n - 1].1),
    };
    let kept: Vec<LogEntry> =
        entries[first..].iter().map(|(e, _)| e.clone()).filter(|e| e.session != id).collect();
    let mut seq = u64::try_from(first)?;
    for mut e in kept {
        e.seq = seq;
        e.prev = prev;
        e.public_key = None;
        e.signature = None;
        if let Some(k) = resign {
            e.sign(k);
        }
        let mut bytes = serde_json::to_vec(&e)?;
        bytes.push(b'\n');
        prev = chunk::sha256_hex(&bytes);
        store.put(&archive::entry_path(seq), bytes.into()).await?;
        seq += 1;
    }
    for path in &paths[usize::try_from(seq)?..] {
        store.delete(path).await?;
    }
    Ok(u64::try_from(first)?)
}

/// Attack 1: with write access to the bucket but not the key, a whole session is deleted and the
/// archive log rewritten from its entry on without it, every `prev` recomputed. The chain is
/// consistent and every manifest validly signed; what gives it away is that the rewritten entries
/// are not signed by the recorder's key (unsigned, or signed by the attacker's).
#[tokio::test]
async fn a_log_rewritten_without_a_deleted_session_is_not_signed_by_the_key() -> Result<()> {
    for attacker in [None, Some(key("66")?)] {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let recorder_key = key("5c")?;
        let public = recorder_key.verifying_key();
        let signing = Ctx { signer: Some(recorder_key), ..ctx(store.clone()) };
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        for &id in &ids {
            ended_session(&signing, id).await?;
        }
        let report = audit::verify(store.as_ref(), None, Some(&public)).await?;
        ensure!(report.ok() && report.log_entries == 4, "the genuine archive verifies:\n{}", report.render());
        let text = String::from_utf8(store.get(&archive::entry_path(0)).await?.bytes().await?.to_vec())?;
        ensure!(text.contains("\"signature\""), "log entries are signed: {text}");

        delete_session(store.as_ref(), ids[1]).await?;
        let first = rewrite_log_without(store.as_ref(), ids[1], attacker.as_ref()).await?;
        ensure!(first == 1, "the session's entry was entry 1");

        let report = audit::verify(store.as_ref(), None, Some(&public)).await?;
        let text = report.render();
        ensure!(!report.ok(), "the rewritten log must fail verify:\n{text}");
        ensure!(report.log_entries == 3 && !report.sessions.iter().any(|s| s.id == ids[1]), "{text}");
        for seq in 1..3 {
            let want = format!("archive log entry {seq} is not signed by the required key");
            ensure!(report.archive_problems.iter().any(|p| p.starts_with(&want)), "want {want:?}:\n{text}");
        }
        ensure!(
            !report.archive_problems.iter().any(|p| p.starts_with("archive log entry 0 ")),
            "entry 0 is genuine:\n{text}"
        );
        ensure!(
            report.sessions.iter().all(|s| s.verdict == audit::Verdict::Intact),
            "the remaining sessions are intact:\n{text}"
        );
        // Without a required key the rewrite cannot be told from an archive that is unsigned or
        // signed with another key: that is what the key is for.
        let keyless = audit::verify(store.as_ref(), None, None).await?;
        ensure!(keyless.ok(), "{}", keyless.render());
    }
    Ok(())
}

/// An archive log entry edited after signing (here: to drop the `incomplete` flag) fails verify
/// even without a required key.
#[tokio::test]
async fn an_edited_signed_log_entry_fails_verify_without_a_key() -> Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let signing = Ctx { signer: Some(key("5c")?), ..ctx(store.clone()) };
    ended_session(&signing, Uuid::now_v7()).await?;
    let path = archive::entry_path(0);
    let mut e: LogEntry = serde_json::from_slice(&store.get(&path).await?.bytes().await?)?;
    e.chunks += 1;
    let mut bytes = serde_json::to_vec(&e)?;
    bytes.push(b'\n');
    store.put(&path, bytes.into()).await?;
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(
        report.archive_problems.iter().any(|p| p.starts_with("archive log entry 0 has an invalid signature")),
        "{}",
        report.render()
    );
    Ok(())
}

/// Attack 2: a forged retention marker moves the cutoff past a session that is then deleted. With
/// the key required, a marker not signed by it is tampering and its cutoff is not applied: the
/// session is reported deleted, not expired. A marker edited after signing is tampering even
/// without a key.
#[tokio::test]
async fn a_forged_retention_marker_does_not_pass_deleted_sessions_off_as_expired() -> Result<()> {
    let retention = std::time::Duration::from_secs(30 * 86_400);
    let forged_cutoff =
        proto::events::Timestamp(proto::events::Timestamp::now().as_micros() - 5 * 86_400_000_000).date();
    for forgery in ["unsigned", "another key", "edited"] {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let recorder_key = key("5c")?;
        let public = recorder_key.verifying_key();
        let signing = Ctx { signer: Some(recorder_key.clone()), ..ctx(store.clone()) };
        let (old, mid, new) = (id_days_ago(400), id_days_ago(10), Uuid::now_v7());
        for id in [old, mid, new] {
            ended_session(&signing, id).await?;
        }
        crate::retention::expire(store.as_ref(), retention, Some(&recorder_key)).await?;
        let report = audit::verify(store.as_ref(), None, Some(&public)).await?;
        let verdict =
            |r: &audit::VerifyReport, id: Uuid| r.sessions.iter().find(|v| v.id == id).map(|v| v.verdict);
        ensure!(report.ok(), "the genuine archive with retention verifies:\n{}", report.render());
        ensure!(verdict(&report, old) == Some(audit::Verdict::Expired), "{}", report.render());
        ensure!(verdict(&report, mid) == Some(audit::Verdict::Intact), "{}", report.render());

        let marker_path = Path::from(crate::retention::MARKER);
        let mut marker: crate::retention::RetentionMarker =
            serde_json::from_slice(&store.get(&marker_path).await?.bytes().await?)?;
        marker.expired_before = forged_cutoff.clone();
        match forgery {
            "unsigned" => (marker.public_key, marker.signature) = (None, None),
            "another key" => marker.sign(&key("66")?),
            _ => {} // the genuine signature kept over an edited date
        }
        store.put(&marker_path, serde_json::to_vec(&marker)?.into()).await?;
        delete_session(store.as_ref(), mid).await?;

        let report = audit::verify(store.as_ref(), None, Some(&public)).await?;
        let text = report.render();
        ensure!(!report.ok(), "{forgery}: the forged marker must fail verify:\n{text}");
        ensure!(
            report.retention_problems.iter().any(|p| p.contains("retention marker archive/retention.json")),
            "{forgery}:\n{text}"
        );
        ensure!(report.expired_before.is_none(), "{forgery}: no cutoff applied:\n{text}");
        for id in [old, mid] {
            ensure!(
                verdict(&report, id) == Some(audit::Verdict::Tampered),
                "{forgery}: {id} deleted:\n{text}"
            );
            ensure!(problems(&report, id).contains("session deleted"), "{forgery}:\n{text}");
        }
        ensure!(verdict(&report, new) == Some(audit::Verdict::Intact), "{forgery}:\n{text}");

        let keyless = audit::verify(store.as_ref(), None, None).await?;
        if forgery == "edited" {
            ensure!(
                keyless.retention_problems.iter().any(|p| p.contains("has an invalid signature")),
                "an edited marker fails without a key too:\n{}",
                keyless.render()
            );
            ensure!(verdict(&keyless, mid) == Some(audit::Verdict::Tampered), "{}", keyless.render());
        }

        // The recorder does not vouch for a marker it did not sign: its next run replaces it.
        crate::retention::expire(store.as_ref(), retention, Some(&recorder_key)).await?;
        let report = audit::verify(store.as_ref(), None, Some(&public)).await?;
        ensure!(report.retention_problems.is_empty(), "{forgery}:\n{}", report.render());
        ensure!(verdict(&report, old) == Some(audit::Verdict::Expired), "{}", report.render());
        ensure!(verdict(&report, mid) == Some(audit::Verdict::Tampered), "{}", report.render());
    }
    Ok(())
}

fn problems(report: &audit::VerifyReport, id: Uuid) -> String {
    report.sessions.iter().find(|v| v.id == id).map(|v| v.problems.join("\n")).unwrap_or_default()
}

/// Without a key nothing changes: entries and markers are written without signature fields, so
/// archives written before signing existed parse and hash the same, and verify clean without a
/// key (and with retention).
#[tokio::test]
async fn an_unsigned_archive_with_retention_still_verifies_without_a_key() -> Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let plain = ctx(store.clone());
    let (old, new) = (id_days_ago(400), Uuid::now_v7());
    for id in [old, new] {
        ended_session(&plain, id).await?;
    }
    crate::retention::expire(store.as_ref(), std::time::Duration::from_secs(30 * 86_400), None).await?;
    for path in [archive::entry_path(0), Path::from(crate::retention::MARKER)] {
        let text = String::from_utf8(store.get(&path).await?.bytes().await?.to_vec())?;
        ensure!(!text.contains("public_key") && !text.contains("signature"), "{path}: {text}");
    }
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok(), "{}", report.render());
    let verdict = |id: Uuid| report.sessions.iter().find(|v| v.id == id).map(|v| v.verdict);
    ensure!(verdict(old) == Some(audit::Verdict::Expired), "{}", report.render());
    ensure!(verdict(new) == Some(audit::Verdict::Intact), "{}", report.render());

    // An entry as written before signed entries existed parses, and re-serializes to its bytes.
    let old_entry = format!(
        r#"{{"seq":0,"prev":"{}","session":"{new}","date":"2026-01-01","head":"{}","chunks":1,"incomplete":false,"manifest_sha256":"{}"}}"#,
        chunk::GENESIS,
        "ab".repeat(32),
        "cd".repeat(32)
    );
    let parsed: LogEntry = serde_json::from_str(&old_entry)?;
    ensure!(serde_json::to_string(&parsed)? == old_entry, "same bytes, same hash");
    Ok(())
}
