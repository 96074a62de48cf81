//! The tamper-evident archive: chains, manifests and the archive log detect edits, reorders and
//! deletions; replicas share the work without writing an event twice; sharded recorders split
//! the sessions so that each is written by one of them; sessions without an end are closed as
//! incomplete; the Parquet index answers an auditor's DuckDB query.
//! Real NATS and a real S3 server (testkit), or the in-process bus with a local directory.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use common::store::{Hooked, PutHook};
use common::{
    agent, approved_hold, envelopes, local_setup, nats_bus, policy_decided, response_sent, session_started,
    start_recorder,
};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, PutResult};
use proto::events::{Decision, Envelope, Event, Timestamp};
use proto::subjects;
use recorder::archive::LogEntry;
use recorder::audit::{self, Verdict, VerifyReport};
use recorder::manifest::Manifest;
use recorder::{RecorderConfig, Shard};
use sha2::{Digest, Sha256};
use testkit::sessions::interleave;
use uuid::Uuid;

/// A session of `requests` statements: every third denied, every fifth held (approved by
/// alice), with `SessionEnded` unless `ended` is false. Times are 1ms apart from `start`.
fn session(principal: &str, requests: u64, start: i64, ended: bool) -> Vec<Envelope> {
    session_with_id(Uuid::now_v7(), principal, requests, start, ended)
}

fn session_with_id(id: Uuid, principal: &str, requests: u64, start: i64, ended: bool) -> Vec<Envelope> {
    let p = agent(principal);
    let mut events = vec![session_started(&p)];
    for seq in 1..=requests {
        events.push(Event::RequestReceived {
            seq,
            statement: format!("select * from users where email = 'user{seq}@example.com'").into(),
            parameters: Default::default(),
        });
        let decision = match seq {
            s if s % 3 == 0 => Decision::Deny,
            s if s % 5 == 0 => Decision::Hold,
            _ => Decision::Allow,
        };
        events.push(policy_decided(seq, decision, "users", ""));
        if decision == Decision::Hold {
            let (request, decided) = approved_hold(&p, seq, start);
            events.push(Event::HoldRequested(Box::new(request)));
            events.push(Event::HoldDecided(decided));
        }
        if decision != Decision::Deny {
            events.push(response_sent(seq, 900, None));
        }
    }
    if ended {
        events.push(Event::SessionEnded { reason: "client closed".into() });
    }
    envelopes(id, events, start)
}

fn small_batches() -> RecorderConfig {
    RecorderConfig { batch_max: 7, batch_wait: Duration::from_millis(50), ..Default::default() }
}

/// The archive's store in `s3`.
fn s3_store(s3: &testkit::S3) -> Result<Arc<dyn ObjectStore>> {
    common::s3_store(s3, "archive")
}

/// Poll `verify` until every one of `sessions` is intact (manifests are written just after the
/// last chunk).
async fn wait_intact(
    store: &dyn ObjectStore,
    sessions: &[Vec<Envelope>],
    within: Duration,
) -> Result<VerifyReport> {
    let until = Instant::now() + within;
    loop {
        let report = audit::verify(store, None, None).await?;
        let intact = sessions
            .iter()
            .all(|s| report.sessions.iter().any(|v| v.id == s[0].session && v.verdict == Verdict::Intact));
        if intact && report.ok() {
            return Ok(report);
        }
        if Instant::now() > until {
            bail!("not all sessions intact in time:\n{}", report.render());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn keys_of(store: &dyn ObjectStore, session: Uuid) -> Result<Vec<Path>> {
    let all: Vec<_> = store.list(Some(&Path::from("sessions"))).try_collect().await?;
    let mut keys: Vec<Path> =
        all.into_iter().map(|m| m.location).filter(|p| p.as_ref().contains(&session.to_string())).collect();
    keys.sort();
    Ok(keys)
}

async fn chunk_key(store: &dyn ObjectStore, session: Uuid, index: u64) -> Result<Path> {
    let name = format!("{index:08}.mpk.zst");
    keys_of(store, session)
        .await?
        .into_iter()
        .find(|p| p.filename() == Some(name.as_str()))
        .with_context(|| format!("chunk {index} of {session}"))
}

async fn get(store: &dyn ObjectStore, path: &Path) -> Result<Vec<u8>> {
    Ok(store.get(path).await?.bytes().await?.to_vec())
}

fn problems_of(report: &VerifyReport, session: Uuid) -> Result<String> {
    let v = report.sessions.iter().find(|v| v.id == session).context("session missing from the report")?;
    ensure!(v.verdict == Verdict::Tampered, "{session} should be tampered:\n{}", report.render());
    Ok(v.problems.join("\n"))
}

#[tokio::test]
async fn edits_deletions_and_swaps_fail_verify_and_are_named_by_session() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    let key_dir = tempfile::tempdir()?;
    let key_file = key_dir.path().join("signing.key");
    std::fs::write(&key_file, "2a".repeat(32))?;
    let cfg = RecorderConfig { signing_key_file: Some(key_file.display().to_string()), ..small_batches() };
    let public = cfg.signing_key()?.context("key configured")?.verifying_key();

    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..6).map(|i| session(&format!("agent-{i}"), 6, base + i * 1_000_000, true)).collect();
    let running = start_recorder(&bus, &store, cfg);
    bus.publish_all(&interleave(&sessions)).await?;
    let clean = wait_intact(store.as_ref(), &sessions, Duration::from_secs(30)).await?;
    running.shutdown().await?;
    ensure!(
        clean.sessions.iter().all(|s| s.signed && s.chunks >= 3),
        "signed, several chunks:\n{}",
        clean.render()
    );
    ensure!(
        audit::verify(store.as_ref(), None, Some(&public)).await?.ok(),
        "verifies against the public key"
    );

    let [edited, deleted_chunk, swapped, deleted_session, edited_manifest, untouched] =
        std::array::from_fn(|i| sessions[i][0].session);
    let s = store.as_ref();

    // Edit one byte in the middle of chunk 1.
    let path = chunk_key(s, edited, 1).await?;
    let mut bytes = get(s, &path).await?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    s.put(&path, PutPayload::from(bytes)).await?;
    // Delete chunk 1.
    s.delete(&chunk_key(s, deleted_chunk, 1).await?).await?;
    // Swap chunks 1 and 2.
    let (one, two) = (chunk_key(s, swapped, 1).await?, chunk_key(s, swapped, 2).await?);
    let (b1, b2) = (get(s, &one).await?, get(s, &two).await?);
    s.put(&one, PutPayload::from(b2)).await?;
    s.put(&two, PutPayload::from(b1)).await?;
    // Delete a whole session: every chunk and the manifest.
    for path in keys_of(s, deleted_session).await? {
        s.delete(&path).await?;
    }
    // Rewrite a manifest to hide the last chunk.
    let manifest_key = keys_of(s, edited_manifest)
        .await?
        .into_iter()
        .find(|p| p.filename() == Some("manifest.json"))
        .context("manifest")?;
    let mut m: Manifest = serde_json::from_slice(&get(s, &manifest_key).await?)?;
    m.chunks -= 1;
    s.put(&manifest_key, PutPayload::from(m.to_bytes())).await?;

    let report = audit::verify(s, None, None).await?;
    ensure!(!report.ok(), "tampering must fail verify:\n{}", report.render());
    let text = report.render();
    for (session, needle) in [
        (edited, "chunk 1 edited"),
        (deleted_chunk, "chunk 1 deleted"),
        (swapped, "swapped or reordered"),
        (deleted_session, "session deleted"),
        (edited_manifest, "manifest signature invalid"),
    ] {
        let problems = problems_of(&report, session)?;
        ensure!(problems.contains(needle), "{session}: expected {needle:?}, got:\n{text}");
    }
    let clean = report.sessions.iter().find(|v| v.id == untouched).context("untouched session")?;
    ensure!(clean.verdict == Verdict::Intact, "an untouched session stays intact:\n{text}");
    ensure!(report.archive_problems.is_empty(), "the archive log itself is intact:\n{text}");

    // One session at a time.
    ensure!(audit::verify(s, Some(untouched), None).await?.ok(), "the untouched session verifies alone");
    let one = audit::verify(s, Some(deleted_session), None).await?;
    ensure!(!one.ok() && one.render().contains("session deleted"), "{}", one.render());

    // Deleting an archive log entry (to hide a deleted session) breaks the log's chain.
    s.delete(&Path::from("archive/log/00000000000000000000.json")).await?;
    let report = audit::verify(s, None, None).await?;
    ensure!(report.archive_problems.iter().any(|p| p.contains("entry 0 deleted")), "{}", report.render());
    Ok(())
}

/// A chained chunk as stored (zstd of MessagePack with field names), for forging one.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredChunk {
    format: u16,
    session: Uuid,
    index: u64,
    prev_hash: String,
    events: Vec<Envelope>,
}

fn decode_chunk(bytes: &[u8]) -> Result<StoredChunk> {
    Ok(rmp_serde::from_slice(&zstd::stream::decode_all(bytes)?)?)
}

fn encode_chunk(chunk: &StoredChunk) -> Result<Vec<u8>> {
    Ok(zstd::bulk::compress(&rmp_serde::to_vec_named(chunk)?, 3)?)
}

/// The chunk with its texts (statements, principal, reasons; the same event ids) rewritten to
/// `text`: what a forger who wants the auditor to read something else stores.
fn forge(bytes: &[u8], text: &str) -> Result<Vec<u8>> {
    let mut chunk = decode_chunk(bytes)?;
    let mut forged = false;
    for env in &mut chunk.events {
        match &mut env.event {
            Event::RequestReceived { statement, .. } => *statement = text.into(),
            Event::SessionStarted { principal, .. } => principal.subject = text.into(),
            Event::PolicyDecided { reason, .. } => *reason = text.into(),
            Event::SessionEnded { reason } => *reason = text.into(),
            _ => continue,
        }
        forged = true;
    }
    ensure!(forged, "chunk {} has no text to forge", chunk.index);
    encode_chunk(&chunk)
}

/// `dir/name` beside `path`.
fn sibling(path: &Path, name: &str) -> Path {
    let mut parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
    parts.pop();
    parts.push(name.to_string());
    Path::from_iter(parts)
}

#[tokio::test]
async fn a_forged_copy_of_a_chunk_under_another_name_fails_verify_and_is_never_read() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    let key_dir = tempfile::tempdir()?;
    let key_file = key_dir.path().join("signing.key");
    std::fs::write(&key_file, "2b".repeat(32))?;
    let cfg = RecorderConfig { signing_key_file: Some(key_file.display().to_string()), ..small_batches() };
    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..7).map(|i| session(&format!("agent-{i}"), 6, base + i * 1_000_000, true)).collect();
    let running = start_recorder(&bus, &store, cfg);
    bus.publish_all(&interleave(&sessions)).await?;
    let clean = wait_intact(store.as_ref(), &sessions, Duration::from_secs(30)).await?;
    running.shutdown().await?;
    ensure!(clean.sessions.iter().all(|s| s.signed && s.chunks >= 3), "{}", clean.render());

    let s = store.as_ref();
    let forged_text = "select 'nothing to see here'";
    let ids: Vec<Uuid> = sessions.iter().map(|e| e[0].session).collect();
    // Second copies of chunk 0 under names that parse to index 0, holding the real event ids
    // with other statements; S3 lists them before the real `00000000.mpk.zst`.
    let mut strays = Vec::new();
    for (id, name) in ids.iter().zip(["0.mpk.zst", "+0.mpk.zst", "000000000.mpk.zst"]) {
        let real = chunk_key(s, *id, 0).await?;
        let stray = sibling(&real, name);
        s.put(&stray, PutPayload::from(forge(&get(s, &real).await?, forged_text)?)).await?;
        strays.push((*id, name));
    }
    // A format-1 name beside a chain.
    let real = chunk_key(s, ids[3], 0).await?;
    let chunk = decode_chunk(&get(s, &real).await?)?;
    let legacy = sibling(&real, "00000000000000000000-0123456789abcdef.mpk");
    s.put(&legacy, PutPayload::from(rmp_serde::to_vec_named(&chunk.events)?)).await?;
    // An index whose successor overflows.
    let real = chunk_key(s, ids[4], 0).await?;
    let last = sibling(&real, "18446744073709551615.mpk.zst");
    s.put(&last, PutPayload::from(get(s, &real).await?)).await?;
    // A copy of the session in another date folder.
    let real = chunk_key(s, ids[5], 0).await?;
    let elsewhere = Path::from_iter(
        real.parts()
            .enumerate()
            .map(|(i, p)| if i == 1 { "date=2000-01-01".to_string() } else { p.as_ref().to_string() }),
    );
    s.put(&elsewhere, PutPayload::from(forge(&get(s, &real).await?, forged_text)?)).await?;
    // Chunk 1 re-encoded with other statements, its own link intact: chunk 2's link breaks.
    let one = chunk_key(s, ids[6], 1).await?;
    s.put(&one, PutPayload::from(forge(&get(s, &one).await?, forged_text)?)).await?;

    let report = audit::verify(s, None, None).await?;
    let text = report.render();
    ensure!(!report.ok() && text.contains("FAILED"), "verify must fail:\n{text}");
    for (id, name) in &strays {
        let problems = problems_of(&report, *id)?;
        ensure!(problems.contains("unexpected object") && problems.contains(name), "{id}:\n{text}");
    }
    ensure!(problems_of(&report, ids[3])?.contains("format-1 chunk"), "{text}");
    ensure!(problems_of(&report, ids[4])?.contains("holds chunk 0"), "{text}");
    ensure!(problems_of(&report, ids[5])?.contains("date=2000-01-01"), "{text}");
    ensure!(problems_of(&report, ids[6])?.contains("chunk 1 edited or replaced"), "{text}");
    for id in &ids[..6] {
        ensure!(!audit::verify(s, Some(*id), None).await?.ok(), "{id} alone fails verify too");
    }

    // The readers show what was recorded, or nothing: never the forged statements.
    for (id, events) in ids.iter().zip(&sessions).take(6) {
        if *id != ids[4] {
            ensure!(audit::read_session(s, *id).await? == *events, "{id} reads back as recorded");
        }
    }
    for id in [ids[4], ids[6]] {
        let broken = audit::read_session(s, id).await;
        ensure!(
            matches!(broken, Err(recorder::AuditError::Tampered { session, .. }) if session == id),
            "a broken chain is not shown: {:?}",
            broken.map(|events| events.len())
        );
    }
    s.delete(&last).await?;
    s.delete(&chunk_key(s, ids[6], 1).await?).await?;
    s.delete(&chunk_key(s, ids[6], 2).await?).await?;
    let gap = audit::read_session(s, ids[6]).await;
    ensure!(
        matches!(gap, Err(recorder::AuditError::Tampered { .. })),
        "a gap is not skipped: {:?}",
        gap.map(|events| events.len())
    );
    for id in &ids[6..] {
        for path in keys_of(s, *id).await? {
            s.delete(&path).await?;
        }
    }
    let listed = audit::list_sessions(s).await?;
    ensure!(listed.len() == 6 && listed.iter().all(|l| l.requests == 6), "{listed:?}");
    ensure!(audit::search(s, "nothing to see").await?.is_empty(), "search reads no forged chunk");
    ensure!(audit::search(s, "user6@example.com").await?.len() == 6, "search reads the real chunks");
    Ok(())
}

/// A chunk count in a manifest or an archive log entry can be forged by anyone who can write to
/// the bucket: verify looks at the chunks stored and reports the missing ones as one range, so a
/// huge count costs one line, not one per missing chunk (and never a stall).
#[tokio::test]
async fn a_forged_chunk_count_is_reported_once_and_does_not_stall_verify() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..2).map(|i| session(&format!("agent-{i}"), 4, base + i * 1_000_000, true)).collect();
    let running = start_recorder(&bus, &store, small_batches());
    bus.publish_all(&interleave(&sessions)).await?;
    wait_intact(store.as_ref(), &sessions, Duration::from_secs(30)).await?;
    running.shutdown().await?;
    let s = store.as_ref();
    let (in_manifest, in_log) = (sessions[0][0].session, sessions[1][0].session);
    const FORGED: u64 = 2_000_000;

    // The manifest's count.
    let key = keys_of(s, in_manifest)
        .await?
        .into_iter()
        .find(|p| p.filename() == Some("manifest.json"))
        .context("manifest")?;
    let mut m: Manifest = serde_json::from_slice(&get(s, &key).await?)?;
    let stored = m.chunks;
    m.chunks = FORGED;
    s.put(&key, PutPayload::from(m.to_bytes())).await?;
    // The log's count: the manifest deleted, and a well-chained entry appended for it.
    let key = keys_of(s, in_log)
        .await?
        .into_iter()
        .find(|p| p.filename() == Some("manifest.json"))
        .context("manifest")?;
    let mine: Manifest = serde_json::from_slice(&get(s, &key).await?)?;
    s.delete(&key).await?;
    let log: Vec<_> = s.list(Some(&Path::from("archive/log"))).try_collect().await?;
    let last = log.iter().map(|m| m.location.clone()).max().context("log entries")?;
    let last_bytes = get(s, &last).await?;
    let last_entry: LogEntry = serde_json::from_slice(&last_bytes)?;
    let entry = LogEntry {
        seq: last_entry.seq + 1,
        prev: hex::encode(Sha256::digest(&last_bytes)),
        session: in_log,
        date: mine.date.clone(),
        head: mine.head.clone(),
        chunks: FORGED,
        incomplete: false,
        manifest_sha256: "00".repeat(32),
        public_key: None,
        signature: None,
    };
    let mut bytes = serde_json::to_vec(&entry)?;
    bytes.push(b'\n');
    s.put(&Path::from(format!("archive/log/{:020}.json", entry.seq)), PutPayload::from(bytes)).await?;

    let started = Instant::now();
    let report = audit::verify(s, None, None).await?;
    ensure!(started.elapsed() < Duration::from_secs(10), "verify took {:?}", started.elapsed());
    ensure!(report.archive_problems.is_empty(), "the appended entry is well chained:\n{}", report.render());
    for (id, first) in [(in_manifest, stored), (in_log, mine.chunks)] {
        let v = report.sessions.iter().find(|v| v.id == id).context("in the report")?;
        ensure!(v.verdict == Verdict::Tampered && v.problems.len() <= 3, "{id}:\n{}", report.render());
        let want = format!("chunks {first} to {} deleted from the end of the chain", FORGED - 1);
        ensure!(
            v.problems.iter().filter(|p| p.contains("deleted from the end")).count() == 1,
            "{:?}",
            v.problems
        );
        ensure!(v.problems.contains(&want), "want {want:?}, got {:?}", v.problems);
    }
    Ok(())
}

#[tokio::test]
async fn two_recorders_share_the_sessions_and_write_every_event_once() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..12).map(|i| session(&format!("agent-{i}"), 10, base + i * 1_000_000, true)).collect();
    let cfg = RecorderConfig { batch_max: 10, batch_wait: Duration::from_millis(20), ..Default::default() };
    let a = start_recorder(&bus, &store, cfg.clone());
    let b = start_recorder(&bus, &store, cfg);
    let all = interleave(&sessions);
    for part in all.chunks(40) {
        bus.publish_all(part).await?;
    }
    // Generous: moto is slow under CPU load, and a fetch one replica gave up on can hold
    // deliveries until the consumer's ack wait redelivers them.
    let report = wait_intact(store.as_ref(), &sessions, Duration::from_secs(120)).await?;
    a.shutdown().await?;
    b.shutdown().await?;
    for s in &sessions {
        let v = report.sessions.iter().find(|v| v.id == s[0].session).context("in report")?;
        ensure!(v.events == s.len() as u64, "{}: {} of {} events", v.id, v.events, s.len());
        ensure!(audit::read_session(store.as_ref(), s[0].session).await? == *s, "read back exactly");
    }
    Ok(())
}

/// One replica's view of the store: notes the sessions it wrote chunks of, and how many chunk
/// writes found their index already taken (by another replica).
#[derive(Debug, Default)]
struct Witness {
    wrote: std::sync::Mutex<BTreeSet<Uuid>>,
    conflicts: AtomicUsize,
}

impl Witness {
    fn new(inner: Arc<dyn ObjectStore>) -> Arc<Hooked<Self>> {
        Hooked::new(inner, Self::default())
    }

    fn wrote(&self) -> BTreeSet<Uuid> {
        self.wrote.lock().expect("not poisoned").clone()
    }
}

/// The session of a chunk key (`.../{session}/{index:08}.mpk.zst`).
fn chunk_session(location: &Path) -> Option<Uuid> {
    if !location.filename()?.ends_with(".mpk.zst") {
        return None;
    }
    let parts: Vec<_> = location.parts().collect();
    Uuid::parse_str(parts.get(parts.len().checked_sub(2)?)?.as_ref()).ok()
}

impl PutHook for Witness {
    fn after(&self, location: &Path, result: &object_store::Result<PutResult>) {
        if let Some(session) = chunk_session(location) {
            self.wrote.lock().expect("not poisoned").insert(session);
            if matches!(result, Err(object_store::Error::AlreadyExists { .. })) {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Wait until the durable consumer `name` has nothing pending and nothing unacked.
async fn wait_consumed(nats: &testkit::Nats, name: &str, within: Duration) -> Result<()> {
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await?);
    let stream = js.get_stream(subjects::STREAM).await?;
    let until = Instant::now() + within;
    loop {
        let info = stream.consumer_info(name).await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "consumer {name}: {} pending, {} unacked",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sharded_recorders_split_batched_sessions_and_each_session_is_written_by_one_shard() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let store = s3_store(&s3)?;
    let base = Timestamp::now().as_micros();
    // Sessions started in one burst, as a busy proxy starts them.
    let sessions: Vec<_> =
        (0..24).map(|i| session(&format!("agent-{i}"), 10, base + i * 1_000_000, true)).collect();
    let shards = [Shard::new(0, 2)?, Shard::new(1, 2)?];
    let owned: Vec<BTreeSet<Uuid>> = shards
        .iter()
        .map(|shard| sessions.iter().map(|s| s[0].session).filter(|id| shard.owns(*id)).collect())
        .collect();
    ensure!(owned.iter().all(|o| !o.is_empty()), "both shards have sessions: {owned:?}");

    let mut running = Vec::new();
    let mut witnesses = Vec::new();
    for shard in shards {
        // Each replica on its own connection, as separate processes would be.
        let bus = nats_bus(&nats).await?;
        let witness = Witness::new(store.clone());
        let cfg = RecorderConfig {
            batch_max: 10,
            batch_wait: Duration::from_millis(20),
            shard,
            ..Default::default()
        };
        running.push(start_recorder(&bus, &(witness.clone() as Arc<dyn ObjectStore>), cfg));
        witnesses.push(witness);
    }
    // As proxies publish: batch messages mixing the sessions (holds go alone on their subjects).
    let bus = nats_bus(&nats).await?;
    let all = interleave(&sessions);
    for part in all.chunks(50) {
        bus.publish_batch(part).await?;
    }
    let report = wait_intact(store.as_ref(), &sessions, Duration::from_secs(120)).await?;
    // Every delivery is acked, the other shard's too: nothing waits for a redelivery.
    for shard in shards {
        wait_consumed(&nats, &shard.durable_name(), Duration::from_secs(20)).await?;
    }
    for r in running {
        r.shutdown().await?;
    }

    for s in &sessions {
        let v = report.sessions.iter().find(|v| v.id == s[0].session).context("in report")?;
        ensure!(v.events == s.len() as u64, "{}: {} of {} events", v.id, v.events, s.len());
        ensure!(audit::read_session(store.as_ref(), s[0].session).await? == *s, "read back exactly");
    }
    ensure!(report.sessions.len() == sessions.len(), "nothing else recorded:\n{}", report.render());
    let wrote: Vec<BTreeSet<Uuid>> = witnesses.iter().map(|w| w.hook.wrote()).collect();
    ensure!(
        wrote[0].is_disjoint(&wrote[1]),
        "a session written by both shards: {:?}",
        wrote[0].intersection(&wrote[1]).collect::<Vec<_>>()
    );
    for (k, (wrote, owned)) in wrote.iter().zip(&owned).enumerate() {
        ensure!(wrote == owned, "shard {k}/2 wrote {wrote:?}, owns {owned:?}");
    }
    for (k, w) in witnesses.iter().enumerate() {
        ensure!(w.hook.conflicts.load(Ordering::SeqCst) == 0, "shard {k}/2 lost chunk writes");
    }
    ensure!(audit::verify(store.as_ref(), None, None).await?.ok(), "the archive verifies");
    Ok(())
}

#[tokio::test]
async fn a_session_that_never_ends_is_closed_as_incomplete_after_the_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bus, store) = local_setup(dir.path()).await?;
    let cfg = RecorderConfig { session_timeout: Duration::from_secs(1), ..small_batches() };
    let running = start_recorder(&bus, &store, cfg);
    let events = session("agent-crashed", 4, Timestamp::now().as_micros(), false);
    let id = events[0].session;
    bus.publish_all(&events).await?;

    let manifest = |store: Arc<dyn ObjectStore>| async move {
        let key =
            keys_of(store.as_ref(), id).await?.into_iter().find(|p| p.filename() == Some("manifest.json"));
        match key {
            Some(key) => Ok::<_, anyhow::Error>(Some(serde_json::from_slice::<Manifest>(
                &get(store.as_ref(), &key).await?,
            )?)),
            None => Ok(None),
        }
    };
    // The recorder may write a manifest before it has every event: wait for the one that closes
    // the session with all four.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let m = manifest(store.clone()).await?;
        if let Some(m) = &m
            && m.incomplete
            && m.events == events.len() as u64
        {
            break;
        }
        ensure!(Instant::now() < until, "no incomplete manifest of every event after the timeout: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(audit::verify(store.as_ref(), Some(id), None).await?.ok(), "an incomplete session verifies");

    // The end arrives late: the chain grows and the manifest is rewritten, complete.
    let mut end = Envelope::new(id, Event::SessionEnded { reason: "late".into() });
    end.at = Timestamp(events.last().expect("events").at.as_micros() + 1_000);
    bus.publish(&end).await?;
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(m) = manifest(store.clone()).await?
            && !m.incomplete
        {
            ensure!(m.events == events.len() as u64 + 1, "{m:?}");
            break;
        }
        ensure!(Instant::now() < until, "manifest not rewritten after the late end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await?;
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok() && report.sessions.len() == 1, "{}", report.render());
    Ok(())
}

#[tokio::test]
async fn retention_removes_old_sessions_and_verify_reports_them_expired_not_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bus, store) = local_setup(dir.path()).await?;
    let now = Timestamp::now().as_micros();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(400 * 86_400);
    let secs = long_ago.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let old_id = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));
    let sessions =
        vec![session_with_id(old_id, "agent-old", 3, now, true), session("agent-new", 3, now, true)];
    let running = start_recorder(&bus, &store, small_batches());
    bus.publish_all(&interleave(&sessions)).await?;
    wait_intact(store.as_ref(), &sessions, Duration::from_secs(20)).await?;
    running.shutdown().await?;

    let cfg = RecorderConfig { retention: Some(Duration::from_secs(30 * 86_400)), ..small_batches() };
    let running = start_recorder(&bus, &store, cfg);
    let until = Instant::now() + Duration::from_secs(15);
    while !keys_of(store.as_ref(), old_id).await?.is_empty() {
        ensure!(Instant::now() < until, "the old session was not removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await?;
    let report = audit::verify(store.as_ref(), None, None).await?;
    ensure!(report.ok(), "{}", report.render());
    let verdict = |id: Uuid| report.sessions.iter().find(|v| v.id == id).map(|v| v.verdict);
    ensure!(verdict(old_id) == Some(Verdict::Expired), "{}", report.render());
    ensure!(verdict(sessions[1][0].session) == Some(Verdict::Intact), "{}", report.render());
    Ok(())
}

#[tokio::test]
async fn the_parquet_index_answers_an_auditors_duckdb_query() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bus, store) = local_setup(dir.path()).await?;
    let base = Timestamp::now().as_micros();
    let sessions = vec![session("agent-a", 7, base, true), session("agent-b", 4, base + 1_000_000, true)];
    let running = start_recorder(&bus, &store, small_batches());
    bus.publish_all(&interleave(&sessions)).await?;
    wait_intact(store.as_ref(), &sessions, Duration::from_secs(20)).await?;
    running.shutdown().await?;

    // The auditor's question: who was denied what, with the statement as recorded (masked)?
    let query = format!(
        "SELECT principal, seq, statement, decision, rule, date \
         FROM read_parquet('{}/index/*/*.parquet', hive_partitioning = true) \
         WHERE decision = 'deny' AND list_contains(groups, 'agents') ORDER BY principal, seq",
        dir.path().display()
    );
    let rows = duckdb(&query)?;
    let date = Timestamp(base).date();
    let expected: Vec<String> = [("agent-a", 3), ("agent-a", 6), ("agent-b", 3)]
        .iter()
        .map(|(p, seq)| format!("{p}|{seq}|select * from users where email = ?|deny|rule-deny|{date}"))
        .collect();
    ensure!(rows == expected, "duckdb returned:\n{}", rows.join("\n"));

    let held = duckdb(&format!(
        "SELECT count(*), min(approver), sum(rows) FROM read_parquet('{}/index/*/*.parquet', hive_partitioning = true) \
         WHERE hold_outcome = 'approved'",
        dir.path().display()
    ))?;
    ensure!(held == vec!["1|alice|1".to_string()], "holds: {held:?}");
    Ok(())
}

/// Run a query with DuckDB's Python package; rows as `a|b|c`.
fn duckdb(query: &str) -> Result<Vec<String>> {
    let script = "import duckdb, sys\n\
                  for row in duckdb.sql(sys.argv[1]).fetchall():\n    print('|'.join(str(v) for v in row))\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script, query])
        .output()
        .context("running python3 (scripts/test.sh installs the duckdb package)")?;
    ensure!(out.status.success(), "duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_string).collect())
}

/// Deleting the newest sessions together with their archive log entries leaves a shorter log
/// that is consistent in itself: only a checkpoint kept outside the bucket shows it.
#[tokio::test]
async fn a_checkpoint_kept_outside_the_bucket_detects_the_newest_sessions_deleted_with_their_log_entries()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bus, store) = local_setup(dir.path()).await?;
    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..3).map(|i| session(&format!("agent-{i}"), 3, base + i * 1_000, true)).collect();
    let running = start_recorder(&bus, &store, small_batches());
    bus.publish_all(&interleave(&sessions)).await?;
    let clean = wait_intact(store.as_ref(), &sessions, Duration::from_secs(20)).await?;
    running.shutdown().await?;
    let head = clean.log_head.clone().context("a log head")?;
    ensure!(head.seq == 2, "three sessions, three entries:\n{}", clean.render());
    ensure!(clean.render().contains(&format!("archive log head: {head}")), "{}", clean.render());
    let parsed: audit::Checkpoint = head.to_string().parse().map_err(anyhow::Error::msg)?;
    ensure!(parsed == head, "a printed head parses back");
    let s = store.as_ref();
    let checked = audit::verify_with(s, None, None, None, Some(&head)).await?;
    ensure!(checked.ok() && checked.checkpoint_matched == Some(head.clone()), "{}", checked.render());

    // Remove the newest entry and the session it names: the bucket alone still verifies.
    let last = Path::from(format!("archive/log/{:020}.json", head.seq));
    let entry: LogEntry = serde_json::from_slice(&get(s, &last).await?)?;
    for path in keys_of(s, entry.session).await? {
        s.delete(&path).await?;
    }
    s.delete(&last).await?;
    let unanchored = audit::verify(s, None, None).await?;
    ensure!(unanchored.ok(), "without a checkpoint the cut is invisible:\n{}", unanchored.render());
    let anchored = audit::verify_with(s, None, None, None, Some(&head)).await?;
    ensure!(!anchored.ok(), "{}", anchored.render());
    ensure!(
        anchored
            .archive_problems
            .iter()
            .any(|p| p.contains(&format!("entry {} of the checkpoint", head.seq))),
        "{}",
        anchored.render()
    );

    // Put a different entry in its place (an unsigned log is re-chained as easily): it is not
    // the one the checkpoint saw.
    let forged = LogEntry { chunks: entry.chunks + 1, ..entry };
    let mut bytes = serde_json::to_vec(&forged)?;
    bytes.push(b'\n');
    s.put(&last, PutPayload::from(bytes)).await?;
    let rewritten = audit::verify_with(s, None, None, None, Some(&head)).await?;
    ensure!(
        rewritten.archive_problems.iter().any(|p| p.contains("differs from the checkpoint")),
        "{}",
        rewritten.render()
    );
    // A malformed checkpoint is refused with what is expected.
    let bad = "2:nothex".parse::<audit::Checkpoint>().expect_err("not a checkpoint");
    ensure!(bad.contains("SEQ:SHA256"), "{bad}");
    Ok(())
}
