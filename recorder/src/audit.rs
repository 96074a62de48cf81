//! Reading recordings back: one session's events, a summary of every session, renderings for
//! people (`airlock audit sessions|show|replay|search`), and verification (`airlock audit verify`).
//!
//! Everything here reads the bucket alone. Chunks of both formats (chained `.mpk.zst` and the
//! walking skeleton's `.mpk`) are read, by their exact names only: a chained session is read
//! along its chain, links checked, so that no other object in its folder can change what an
//! auditor sees.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use proto::events::{Decision, Envelope, Event, Timestamp};
use uuid::Uuid;

use crate::chunk;
use crate::error::AuditError;

mod render;
mod stored;
mod verify;

pub use render::{render_replay, render_sessions};
pub use verify::{Checkpoint, SessionVerdict, Verdict, VerifyReport, verify, verify_with};

/// How many chunks are read at once.
const READ_CONCURRENCY: usize = 16;

/// One recorded session, summarized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub id: Uuid,
    /// The principal's subject (empty if the session's start was not recorded).
    pub principal: String,
    pub groups: Vec<String>,
    pub connection: String,
    /// When the session started (its first event if the start was not recorded).
    pub started_at: Timestamp,
    /// `None` while the session is open (or its end was not recorded).
    pub ended_at: Option<Timestamp>,
    /// Statements (requests) received.
    pub requests: u64,
    /// Requests whose policy decision was allow.
    pub allowed: u64,
    /// Requests whose policy decision was deny.
    pub denied: u64,
    /// Requests whose policy decision was hold (whatever the approvers decided).
    pub held: u64,
}

impl SessionSummary {
    /// Summarize a session's events (as returned by [`read_session`]).
    pub fn from_events(id: Uuid, events: &[Envelope]) -> Self {
        let mut s = SessionSummary {
            id,
            principal: String::new(),
            groups: Vec::new(),
            connection: String::new(),
            started_at: events.iter().map(|e| e.at).min().unwrap_or(Timestamp(0)),
            ended_at: None,
            requests: 0,
            allowed: 0,
            denied: 0,
            held: 0,
        };
        for env in events {
            match &env.event {
                Event::SessionStarted { principal, connection, .. } => {
                    s.principal = principal.subject.clone();
                    s.groups = principal.groups.clone();
                    s.connection = connection.clone();
                    s.started_at = env.at;
                }
                Event::SessionEnded { .. } => s.ended_at = Some(env.at),
                Event::RequestReceived { .. } => s.requests += 1,
                Event::PolicyDecided { decision: Decision::Allow, .. } => s.allowed += 1,
                Event::PolicyDecided { decision: Decision::Deny, .. } => s.denied += 1,
                Event::PolicyDecided { decision: Decision::Hold, .. } => s.held += 1,
                _ => {}
            }
        }
        s
    }
}

/// Every recorded session, newest first.
pub async fn list_sessions(store: &dyn ObjectStore) -> Result<Vec<SessionSummary>, AuditError> {
    let paths = stored::list(store, &Path::from(chunk::ROOT)).await?;
    let sessions = stored::group(paths, stored::known_date);
    let with_chunks = sessions.into_iter().filter(|(_, o)| !o.chained.is_empty() || !o.legacy.is_empty());
    let mut out: Vec<SessionSummary> = futures::stream::iter(with_chunks)
        .map(|(id, objects)| async move {
            read_objects(store, id, &objects).await.map(|events| SessionSummary::from_events(id, &events))
        })
        .buffer_unordered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    out.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    Ok(out)
}

/// Every recorded event of session `id`, ordered by time (ties in recording order), each once.
///
/// Only the session's chain is read, from chunk 0, each link checked
/// ([`AuditError::Tampered`] if one is broken); objects the recorder never writes are not read.
/// A session of format-1 chunks alone (not chained) is read from those.
pub async fn read_session(store: &dyn ObjectStore, id: Uuid) -> Result<Vec<Envelope>, AuditError> {
    let mut paths = Vec::new();
    if let Some(date) = stored::known_date(id) {
        paths = stored::list(store, &chunk::session_prefix(&date, id)).await?;
    }
    if paths.is_empty() {
        // Not a UUIDv7, or filed under its first event's date: look everywhere.
        paths = stored::list(store, &Path::from(chunk::ROOT))
            .await?
            .into_iter()
            .filter(|p| chunk::parse_key(p).is_some_and(|(s, _, _)| s == id))
            .collect();
    }
    let objects = stored::group(paths, stored::known_date).remove(&id).unwrap_or_default();
    if objects.chained.is_empty() && objects.legacy.is_empty() {
        return Err(AuditError::NotFound(id));
    }
    read_objects(store, id, &objects).await
}

/// A session's events: its checked chain if it has one, else its format-1 chunks; deduplicated
/// by envelope id (format 1 could store an event twice), sorted by time (stable).
async fn read_objects(
    store: &dyn ObjectStore,
    id: Uuid,
    objects: &stored::SessionObjects,
) -> Result<Vec<Envelope>, AuditError> {
    let events = if objects.is_chained() {
        stored::read_chain(store, id, objects).await?
    } else {
        let mut legacy = objects.legacy.clone();
        legacy.sort();
        let reads = stored::read_all(store, legacy.into_iter().map(|p| (p.clone(), p))).await?;
        let mut events = Vec::new();
        for (path, bytes) in reads {
            events
                .extend(chunk::decode_legacy(&bytes).map_err(|source| AuditError::Decode { path, source })?);
        }
        events
    };
    let mut seen = HashSet::new();
    let mut events: Vec<Envelope> = events.into_iter().filter(|e| seen.insert(e.id)).collect();
    events.sort_by_key(|e| e.at);
    Ok(events)
}

/// Which sessions `airlock audit sessions` lists.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Started at or after.
    pub since: Option<Timestamp>,
    /// Started before.
    pub until: Option<Timestamp>,
    pub principal: Option<String>,
    pub connection: Option<String>,
    /// Has at least one request with this policy decision.
    pub decision: Option<Decision>,
}

impl SessionFilter {
    pub fn matches(&self, s: &SessionSummary) -> bool {
        self.since.is_none_or(|t| s.started_at >= t)
            && self.until.is_none_or(|t| s.started_at < t)
            && self.principal.as_ref().is_none_or(|p| *p == s.principal)
            && self.connection.as_ref().is_none_or(|c| *c == s.connection)
            && self.decision.is_none_or(|d| match d {
                Decision::Allow => s.allowed > 0,
                Decision::Hold => s.held > 0,
                Decision::Deny => s.denied > 0,
            })
    }
}

/// Parse `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time (`2026-11-28T10:00:00Z`).
pub fn parse_time(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_string() };
    humantime::parse_rfc3339_weak(full.trim_end_matches('Z')).ok().map(Timestamp::from)
}

/// Every line of every session's transcript that contains `text` (case-insensitive), as
/// `(session, line)`, newest session first.
pub async fn search(store: &dyn ObjectStore, text: &str) -> Result<Vec<(Uuid, String)>, AuditError> {
    let needle = text.to_lowercase();
    let sessions = list_sessions(store).await?;
    let found: Vec<Vec<(Uuid, String)>> = futures::stream::iter(sessions)
        .map(|s| {
            let needle = &needle;
            async move {
                let events = read_session(store, s.id).await?;
                let replay = render_replay(&events);
                Ok::<_, AuditError>(
                    replay
                        .lines()
                        .skip(1)
                        .filter(|l| l.to_lowercase().contains(needle))
                        .map(|l| (s.id, l.trim().to_string()))
                        .collect(),
                )
            }
        })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}
