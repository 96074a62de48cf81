//! What a session has in storage, sorted out the same way for the readers and for `verify`: its
//! chunks by exact name in its one date folder, and everything else there as strays.
//!
//! Both need the same answer to "which objects are this session": readers that took every file
//! with a chunk-like name showed a forged second copy of a chunk that `verify` never looked at.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use proto::events::{Envelope, Timestamp};
use uuid::Uuid;

use crate::chunk::{self, GENESIS, Key};
use crate::error::AuditError;

/// How many objects are read at once.
const READ_CONCURRENCY: usize = 16;

/// The stored objects of one session.
#[derive(Debug, Default)]
pub(crate) struct SessionObjects {
    /// The date folder the session lives in.
    pub(crate) date: String,
    pub(crate) chained: BTreeMap<u64, Path>,
    pub(crate) legacy: Vec<Path>,
    pub(crate) manifest: Option<Path>,
    /// Objects the recorder never writes: other names in the session's folder, or a folder of the
    /// session under another date.
    pub(crate) strays: Vec<Path>,
}

impl SessionObjects {
    /// The session has a hash chain (then format-1 chunks beside it are not part of it).
    pub(crate) fn is_chained(&self) -> bool {
        !self.chained.is_empty() || self.manifest.is_some()
    }
}

/// The date folder a session is known to live in without looking at storage: its UUIDv7's.
pub(crate) fn known_date(id: Uuid) -> Option<String> {
    (id.get_version_num() == 7).then(|| chunk::session_date(id, Timestamp(0)))
}

/// Sort keys (of any sessions, in any order, duplicates ignored) into sessions. A session's date
/// is `date_of(id)` when known, else the folder holding its manifest, else its earliest folder;
/// objects in its other date folders are strays.
pub(crate) fn group(
    paths: impl IntoIterator<Item = Path>,
    date_of: impl Fn(Uuid) -> Option<String>,
) -> BTreeMap<Uuid, SessionObjects> {
    let mut by_session: BTreeMap<Uuid, BTreeMap<Path, (String, Key)>> = BTreeMap::new();
    for path in paths {
        if let Some((id, date, key)) = chunk::parse_key(&path) {
            by_session.entry(id).or_default().insert(path, (date, key));
        }
    }
    by_session
        .into_iter()
        .map(|(id, keys)| {
            let date = date_of(id)
                .or_else(|| keys.values().find(|(_, k)| *k == Key::Manifest).map(|(d, _)| d.clone()))
                .or_else(|| keys.values().map(|(d, _)| d.clone()).min())
                .unwrap_or_default();
            let mut objects = SessionObjects { date, ..Default::default() };
            for (path, (date, key)) in keys {
                match key {
                    _ if date != objects.date => objects.strays.push(path),
                    Key::Chained(i) => {
                        objects.chained.insert(i, path);
                    }
                    Key::Legacy => objects.legacy.push(path),
                    Key::Manifest => objects.manifest = Some(path),
                    Key::Stray => objects.strays.push(path),
                }
            }
            (id, objects)
        })
        .collect()
}

/// Every key in session folders under `prefix`, in listing order.
pub(crate) async fn list(store: &dyn ObjectStore, prefix: &Path) -> Result<Vec<Path>, AuditError> {
    let mut paths = Vec::new();
    let mut listing = store.list(Some(prefix));
    while let Some(meta) = listing.next().await {
        match meta {
            Ok(meta) if chunk::parse_key(&meta.location).is_some() => paths.push(meta.location),
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(AuditError::List(e)),
        }
    }
    Ok(paths)
}

/// Read objects, `READ_CONCURRENCY` at a time, in the given order.
pub(crate) async fn read_all<K: Send>(
    store: &dyn ObjectStore,
    objects: impl IntoIterator<Item = (K, Path)>,
) -> Result<Vec<(K, Bytes)>, AuditError> {
    futures::stream::iter(objects)
        .map(|(k, path)| async move { read(store, &path).await.map(|b| (k, b)) })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await
}

pub(crate) async fn read(store: &dyn ObjectStore, path: &Path) -> Result<Bytes, AuditError> {
    match store.get(path).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    }
    .map_err(|source| AuditError::Read { path: path.clone(), source })
}

/// The events of a chained session, chunk by chunk from 0, each link checked: every stored chunk
/// must decode, belong to the session, sit at its index and hold the previous chunk's hash.
/// Anything else is [`AuditError::Tampered`]: what the readers would show is then not what was
/// recorded. (A deleted last chunk, or a stray, is left to `verify`: it changes nothing shown.)
pub(crate) async fn read_chain(
    store: &dyn ObjectStore,
    id: Uuid,
    objects: &SessionObjects,
) -> Result<Vec<Envelope>, AuditError> {
    let tampered = |problem: String| AuditError::Tampered { session: id, problem };
    let reads = read_all(store, objects.chained.iter().map(|(i, p)| (*i, p.clone()))).await?;
    let mut prev = GENESIS.to_string();
    let mut events = Vec::new();
    for (expected, (i, bytes)) in (0u64..).zip(reads) {
        if i != expected {
            return Err(tampered(format!("chunk {expected} deleted")));
        }
        let c = chunk::decode_chained(&bytes).map_err(|_| tampered(format!("chunk {i} does not decode")))?;
        if c.session != id {
            return Err(tampered(format!("chunk {i} belongs to session {}", c.session)));
        }
        if c.index != i {
            return Err(tampered(format!("chunk {i} holds chunk {}", c.index)));
        }
        if c.prev_hash != prev {
            return Err(tampered(format!("chunk {i} does not link to the chunk before it")));
        }
        prev = chunk::sha256_hex(&bytes);
        events.extend(c.events);
    }
    Ok(events)
}
