//! `airlock audit verify`: check sessions' hash chains against their manifests, and the
//! manifests against the archive log, and report by session what was edited, reordered or deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use ed25519_dalek::VerifyingKey;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use uuid::Uuid;

use super::stored::{self, SessionObjects};
use crate::archive::{self, LogEntry};
use crate::chunk::{self, GENESIS, sha256_hex};
use crate::error::AuditError;
use crate::manifest::Manifest;
use crate::retention::{self, RetentionMarker};
use crate::signed::{SignatureCheck, SignatureProblem, Signed};

/// How many objects are read at once.
const READ_CONCURRENCY: usize = 16;

/// The outcome for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Chain, manifest and archive log agree.
    Intact,
    /// No manifest yet (still being recorded, or not yet timed out), or only format-1 chunks:
    /// what is there is consistent, but a deleted tail cannot be detected yet.
    Open,
    /// Something was edited, reordered or deleted: see the problems.
    Tampered,
    /// Removed by retention (its date is before the retention cutoff).
    Expired,
}

/// One session's verification.
#[derive(Debug, Clone)]
pub struct SessionVerdict {
    pub id: Uuid,
    pub verdict: Verdict,
    /// What is wrong (or, for [`Verdict::Open`], why it cannot be fully checked), one per line.
    pub problems: Vec<String>,
    pub chunks: u64,
    pub events: u64,
    /// The manifest carries a valid signature.
    pub signed: bool,
}

/// The whole verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub sessions: Vec<SessionVerdict>,
    /// Problems with the archive log itself.
    pub archive_problems: Vec<String>,
    pub log_entries: u64,
    /// Problems with the retention marker (`archive/retention.json`); its cutoff is not applied
    /// then.
    pub retention_problems: Vec<String>,
    /// The retention cutoff applied (from `archive/retention.json` or the caller).
    pub expired_before: Option<String>,
    /// The newest log entry: keep it outside the bucket and pass it back as a checkpoint, and a
    /// later removal of it (or of any entry before it) is detected.
    pub log_head: Option<Checkpoint>,
    /// The checkpoint given was found and matched.
    pub checkpoint_matched: Option<Checkpoint>,
}

/// An archive log entry as someone outside the bucket saw it: its seq and the hex SHA-256 of its
/// stored bytes, written `SEQ:SHA256`. Each entry's hash covers the one before it, so a
/// checkpoint vouches for the whole log up to it. Removing the newest entries together with
/// their sessions is otherwise undetectable from the bucket alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub sha256: String,
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.sha256)
    }
}

impl std::str::FromStr for Checkpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected SEQ:SHA256 (as `audit verify` prints the archive log head)");
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self { seq, sha256: hash.to_ascii_lowercase() })
    }
}

impl VerifyReport {
    /// Nothing was tampered with.
    pub fn ok(&self) -> bool {
        self.archive_problems.is_empty()
            && self.retention_problems.is_empty()
            && self.sessions.iter().all(|s| s.verdict != Verdict::Tampered)
    }

    /// A report for people: one line per session, problems indented below it, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.sessions {
            let verdict = match s.verdict {
                Verdict::Intact => "OK",
                Verdict::Open => "OPEN",
                Verdict::Tampered => "TAMPERED",
                Verdict::Expired => "EXPIRED",
            };
            let signed = if s.signed { ", signed" } else { "" };
            let _ = writeln!(out, "{} {verdict} ({} chunks, {} events{signed})", s.id, s.chunks, s.events);
            for p in &s.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        if self.archive_problems.is_empty() {
            let _ = writeln!(out, "archive log: {} entries, chain OK", self.log_entries);
            if let Some(c) = &self.checkpoint_matched {
                let _ = writeln!(out, "archive log checkpoint {c}: present and unchanged");
            }
            if let Some(head) = &self.log_head {
                let _ = writeln!(
                    out,
                    "archive log head: {head} (keep it outside the bucket; `--checkpoint {head}` \
                     later detects its removal)"
                );
            }
        } else {
            let _ = writeln!(out, "archive log: {} entries, TAMPERED", self.log_entries);
            for p in &self.archive_problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        let count = |v| self.sessions.iter().filter(|s| s.verdict == v).count();
        if !self.retention_problems.is_empty() {
            let _ = writeln!(out, "retention marker: TAMPERED");
            for p in &self.retention_problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        if let Some(before) = &self.expired_before {
            let _ = writeln!(out, "retention: sessions dated before {before} are expired");
        }
        let _ = writeln!(
            out,
            "{}: {} sessions intact, {} open, {} tampered, {} expired",
            if self.ok() { "verified" } else { "FAILED" },
            count(Verdict::Intact),
            count(Verdict::Open),
            count(Verdict::Tampered),
            count(Verdict::Expired),
        );
        out
    }
}

/// Verify session `only` (else every session and the whole archive log). With `key`, every
/// manifest, every archive log entry and the retention marker must be signed by it (an invalid
/// signature is tampering either way). Sessions the recorder's retention removed are reported as
/// expired, if the retention marker passes that check.
pub async fn verify(
    store: &dyn ObjectStore,
    only: Option<Uuid>,
    key: Option<&VerifyingKey>,
) -> Result<VerifyReport, AuditError> {
    verify_with(store, only, key, None, None).await
}

/// [`verify`], also treating sessions dated before `expired_before` (`YYYY-MM-DD`) as expired
/// (for archives whose retention is done by storage lifecycle rules), and requiring the archive
/// log to hold `checkpoint` unchanged.
pub async fn verify_with(
    store: &dyn ObjectStore,
    only: Option<Uuid>,
    key: Option<&VerifyingKey>,
    expired_before: Option<String>,
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport::default();
    let marker = read_retention(store, key, &mut report).await?;
    report.expired_before = marker.max(expired_before);
    let log = read_log(store, key, checkpoint, &mut report).await?;

    let paths = match only {
        // Every date folder: a copy of the session filed under another date is tampering too.
        Some(id) => {
            let dates = match store.list_with_delimiter(Some(&Path::from(chunk::ROOT))).await {
                Ok(listing) => listing.common_prefixes,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(AuditError::List(e)),
            };
            let found: Vec<Vec<Path>> = futures::stream::iter(dates)
                .map(|date| async move { stored::list(store, &date.join(id.to_string())).await })
                .buffered(READ_CONCURRENCY)
                .try_collect()
                .await?;
            found.into_iter().flatten().collect()
        }
        None => stored::list(store, &Path::from(chunk::ROOT)).await?,
    };
    let date_of = |id: Uuid| log.get(&id).map(|e| e.date.clone()).or_else(|| stored::known_date(id));
    let mut keys = stored::group(paths, date_of);
    let mut ids: Vec<Uuid> = keys.keys().copied().collect();
    ids.extend(log.keys().filter(|id| only.is_none_or(|o| o == **id) && !keys.contains_key(id)));
    if let Some(id) = only
        && !ids.contains(&id)
    {
        return Err(AuditError::NotFound(id));
    }
    ids.sort();
    let log = &log;
    let expired_before = report.expired_before.clone();
    let expired_before = expired_before.as_deref();
    let jobs: Vec<(Uuid, SessionObjects)> =
        ids.into_iter().map(|id| (id, keys.remove(&id).unwrap_or_default())).collect();
    report.sessions = futures::stream::iter(jobs)
        .map(|(id, k)| async move { verify_session(store, id, k, log.get(&id), key, expired_before).await })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(report)
}

/// The retention cutoff of `archive/retention.json`, if there is one and it passes the signature
/// check (else the problem is reported, and sessions it would expire count as deleted).
async fn read_retention(
    store: &dyn ObjectStore,
    key: Option<&VerifyingKey>,
    report: &mut VerifyReport,
) -> Result<Option<String>, AuditError> {
    let Some(bytes) = retention::read_marker_bytes(store).await.map_err(AuditError::List)? else {
        return Ok(None);
    };
    let problem = match serde_json::from_slice::<RetentionMarker>(&bytes) {
        Err(_) => format!("retention marker {} edited (unreadable): no cutoff applied", retention::MARKER),
        Ok(m) => match m.signature_problem(key) {
            None => return Ok(Some(m.expired_before)),
            Some(p) => format!(
                "retention marker {} {p}: forged or edited; its cutoff {} is ignored, so sessions \
                 missing before it count as deleted",
                retention::MARKER,
                m.expired_before
            ),
        },
    };
    report.retention_problems.push(problem);
    Ok(None)
}

/// Read and check the archive log (with `key`, every entry must be signed by it); per session,
/// the entry with the most chunks (the latest of those).
async fn read_log(
    store: &dyn ObjectStore,
    key: Option<&VerifyingKey>,
    checkpoint: Option<&Checkpoint>,
    report: &mut VerifyReport,
) -> Result<HashMap<Uuid, LogEntry>, AuditError> {
    let mut seqs = BTreeMap::new();
    let mut listing = store.list(Some(&Path::from(archive::LOG_ROOT)));
    while let Some(meta) = listing.next().await {
        match meta {
            Ok(meta) => {
                if let Some(seq) = archive::seq_of(&meta.location) {
                    seqs.insert(seq, meta.location);
                }
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(AuditError::List(e)),
        }
    }
    report.log_entries = u64::try_from(seqs.len()).unwrap_or(u64::MAX);
    let entries = stored::read_all(store, seqs).await?;
    let mut latest: HashMap<Uuid, LogEntry> = HashMap::new();
    let mut prev: Option<(u64, String)> = None;
    let mut expected = 0;
    for (seq, bytes) in entries {
        if seq > expected {
            let missing = if seq - expected == 1 {
                format!("entry {expected}")
            } else {
                format!("entries {expected} to {}", seq - 1)
            };
            report.archive_problems.push(format!("archive log {missing} deleted"));
        }
        expected = seq + 1;
        let hash = sha256_hex(&bytes);
        match serde_json::from_slice::<LogEntry>(&bytes) {
            Err(_) => report.archive_problems.push(format!("archive log entry {seq} edited (unreadable)")),
            Ok(e) => {
                if e.seq != seq {
                    report.archive_problems.push(format!(
                        "archive log entry {seq} holds entry {}: entries reordered or replaced",
                        e.seq
                    ));
                }
                let want = match &prev {
                    Some((p, h)) if *p + 1 == seq => Some(h.as_str()),
                    None if seq == 0 => Some(GENESIS),
                    _ => None,
                };
                if let Some(want) = want
                    && e.prev != want
                {
                    report.archive_problems.push(format!(
                        "archive log entry {seq}: link to entry {} broken (that entry edited or replaced)",
                        seq.saturating_sub(1)
                    ));
                }
                // Without a signature by the key, a log re-chained from some entry on (a session's
                // entry dropped, the rest re-hashed) would pass the checks above.
                if let Some(p) = e.signature_problem(key) {
                    let why = match p {
                        SignatureProblem::Invalid => "edited or forged",
                        _ => "forged, or the log rewritten from here",
                    };
                    report.archive_problems.push(format!("archive log entry {seq} {p}: {why}"));
                }
                // A replica that lost a race may log a shorter chain after a longer one: the
                // furthest head logged (the latest of equals) is the one the manifest must match.
                if latest.get(&e.session).is_none_or(|l| l.chunks <= e.chunks) {
                    latest.insert(e.session, e);
                }
            }
        }
        if let Some(c) = checkpoint.filter(|c| c.seq == seq) {
            if c.sha256 == hash {
                report.checkpoint_matched = Some(c.clone());
            } else {
                report.archive_problems.push(format!(
                    "archive log entry {seq} differs from the checkpoint {c}: the log was rewritten"
                ));
            }
        }
        prev = Some((seq, hash));
    }
    if let Some(c) = checkpoint
        && prev.as_ref().is_none_or(|(last, _)| *last < c.seq)
    {
        report.archive_problems.push(format!(
            "archive log entry {} of the checkpoint {c} is gone: the newest entries (and their sessions) \
             were deleted",
            c.seq
        ));
    }
    report.log_head = prev.map(|(seq, sha256)| Checkpoint { seq, sha256 });
    Ok(latest)
}

async fn verify_session(
    store: &dyn ObjectStore,
    id: Uuid,
    keys: SessionObjects,
    logged: Option<&LogEntry>,
    key: Option<&VerifyingKey>,
    expired_before: Option<&str>,
) -> Result<SessionVerdict, AuditError> {
    let mut v = SessionVerdict {
        id,
        verdict: Verdict::Intact,
        problems: Vec::new(),
        chunks: 0,
        events: 0,
        signed: false,
    };
    let tampered = |v: &mut SessionVerdict, p: String| {
        v.verdict = Verdict::Tampered;
        v.problems.push(p);
    };
    for stray in &keys.strays {
        tampered(
            &mut v,
            format!("unexpected object {stray}: not a name the recorder writes (a forged or copied chunk?)"),
        );
    }
    if keys.chained.is_empty() && keys.legacy.is_empty() && keys.manifest.is_none() {
        if let Some(e) = logged
            && expired_before.is_some_and(|before| e.date.as_str() < before)
        {
            v.verdict = Verdict::Expired;
            v.problems.push(format!("expired by retention (dated {})", e.date));
        } else if let Some(e) = logged {
            tampered(
                &mut v,
                format!(
                    "session deleted: the archive log records it ({} chunks, date {}) but nothing is stored",
                    e.chunks, e.date
                ),
            );
        }
        return Ok(v);
    }

    // The manifest, if any.
    let mut manifest: Option<Manifest> = None;
    if let Some(path) = &keys.manifest {
        let bytes = stored::read(store, path).await?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Err(_) => tampered(&mut v, "manifest edited (unreadable)".into()),
            Ok(m) => {
                v.signed = m.check_signature() == SignatureCheck::Valid;
                match m.signature_problem(key) {
                    Some(SignatureProblem::Invalid) => {
                        tampered(&mut v, "manifest signature invalid: manifest edited".into())
                    }
                    Some(_) => tampered(&mut v, "manifest not signed by the expected key".into()),
                    None => {}
                }
                manifest = Some(m);
            }
        }
        match logged {
            Some(e) if e.manifest_sha256 != sha256_hex(&bytes) => tampered(
                &mut v,
                "manifest differs from the one the archive log records: manifest edited or replaced".into(),
            ),
            Some(_) => {}
            None => tampered(
                &mut v,
                "manifest missing from the archive log (forged, or its log entry deleted)".into(),
            ),
        }
    } else if let Some(e) = logged {
        tampered(&mut v, format!("manifest deleted (the archive log records one with {} chunks)", e.chunks));
    }

    // The chain. Only stored chunks are looked at one by one: the recorded count comes from the
    // manifest or the log, which could be forged, so the gaps are reported as ranges.
    let recorded = manifest.as_ref().map(|m| m.chunks).or(logged.map(|e| e.chunks)).unwrap_or(0);
    v.chunks = u64::try_from(keys.chained.len()).unwrap_or(u64::MAX);
    let mut next = Some(0u64);
    for &i in keys.chained.keys() {
        if let Some(n) = next
            && i > n
        {
            tampered(&mut v, missing(n, i - 1, "deleted"));
        }
        next = i.checked_add(1);
    }
    if let Some(n) = next
        && recorded > n
    {
        tampered(&mut v, missing(n, recorded - 1, "deleted from the end of the chain"));
    }
    let reads = stored::read_all(store, keys.chained.iter().map(|(i, p)| (*i, p.clone()))).await?;
    let hashes: HashMap<u64, String> = reads.iter().map(|(i, bytes)| (*i, sha256_hex(bytes))).collect();
    let mut seen = HashSet::new();
    for (i, bytes) in &reads {
        let i = *i;
        let c = match chunk::decode_chained(bytes) {
            Ok(c) => c,
            Err(_) => {
                tampered(&mut v, format!("chunk {i} edited (does not decode)"));
                continue;
            }
        };
        if c.index != i {
            tampered(&mut v, format!("chunk {i} holds chunk {}: chunks swapped or reordered", c.index));
        }
        if c.session != id {
            tampered(
                &mut v,
                format!("chunk {i} belongs to session {}: moved from another session", c.session),
            );
        }
        let want = if i == 0 { Some(GENESIS.to_string()) } else { hashes.get(&(i - 1)).cloned() };
        if let Some(want) = want
            && c.prev_hash != want
            && c.index == i
        {
            let what = if i == 0 {
                "chunk 0 does not start the chain".to_string()
            } else {
                format!("chunk {} edited or replaced (chunk {i}'s link to it is broken)", i - 1)
            };
            tampered(&mut v, what);
        }
        for e in &c.events {
            if !seen.insert(e.id) {
                tampered(&mut v, format!("event {} recorded twice (chunk {i})", e.id));
            }
        }
    }
    v.events = u64::try_from(seen.len()).unwrap_or(u64::MAX);
    if let Some(m) = &manifest {
        let after = keys.chained.range(m.chunks..).count();
        if after > 0 {
            tampered(
                &mut v,
                format!("{after} chunk(s) after the manifest's head (inserted, or still being written)"),
            );
        }
        let head = match m.chunks {
            0 => Some(GENESIS.to_string()),
            n => hashes.get(&(n - 1)).cloned(),
        };
        if let Some(head) = head
            && head != m.head
        {
            tampered(
                &mut v,
                format!(
                    "chunk {} edited or replaced: the chain head differs from the manifest",
                    m.chunks.saturating_sub(1)
                ),
            );
        }
    }
    if keys.is_chained() || logged.is_some() {
        // Format 1 predates chains: the recorder never writes one into a chained session, and
        // the readers would not read it.
        for path in &keys.legacy {
            tampered(&mut v, format!("format-1 chunk {path} beside the hash chain (forged?)"));
        }
    } else if !keys.legacy.is_empty() {
        v.problems
            .push(format!("{} format-1 chunks: not hash-chained, cannot be verified", keys.legacy.len()));
        if v.verdict == Verdict::Intact {
            v.verdict = Verdict::Open;
        }
    }
    if manifest.is_none() && logged.is_none() && v.verdict == Verdict::Intact {
        v.verdict = Verdict::Open;
        v.problems.push(
            "no manifest yet (open, or not yet timed out): a deleted last chunk cannot be detected".into(),
        );
    }
    Ok(v)
}

/// "chunk 3 deleted", or "chunks 3 to 9 deleted".
fn missing(first: u64, last: u64, why: &str) -> String {
    if first == last { format!("chunk {first} {why}") } else { format!("chunks {first} to {last} {why}") }
}
