//! What the recorder knows about one session it writes: the end of its chain, the ids already
//! recorded (for exactly-once), and its index rows. Rebuilt from storage when unknown (after a
//! restart, or when another replica extended the chain).

use std::collections::HashSet;
use std::time::Instant;

use object_store::{ObjectStore, ObjectStoreExt};
use proto::events::{Envelope, Event, Timestamp};
use tracing::warn;
use uuid::Uuid;

use crate::chunk::{self, ChainedChunk, GENESIS};
use crate::index::IndexBuilder;
use crate::manifest::{MANIFEST_FORMAT, Manifest};

#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) id: Uuid,
    pub(crate) date: String,
    /// The index the next chunk gets.
    pub(crate) next_index: u64,
    /// Hex SHA-256 of the last chunk's bytes ([`GENESIS`] before the first).
    pub(crate) head: String,
    /// Every event id in the chain.
    pub(crate) ids: HashSet<Uuid>,
    pub(crate) first_at: Option<Timestamp>,
    pub(crate) last_at: Option<Timestamp>,
    /// `SessionEnded` is in the chain.
    pub(crate) ended: bool,
    /// The head and completeness the last manifest we wrote (or found) was for.
    pub(crate) finalized: Option<(String, bool)>,
    /// When we last saw an event for it (or looked at storage).
    pub(crate) last_activity: Instant,
    pub(crate) index: IndexBuilder,
}

impl SessionState {
    pub(crate) fn new(id: Uuid, date: String) -> Self {
        Self {
            id,
            date,
            next_index: 0,
            head: GENESIS.to_string(),
            ids: HashSet::new(),
            first_at: None,
            last_at: None,
            ended: false,
            finalized: None,
            last_activity: Instant::now(),
            index: IndexBuilder::default(),
        }
    }

    /// Take a chunk written at `next_index` (by us or anyone) into account.
    pub(crate) fn absorb(&mut self, chunk: &ChainedChunk, hash: String) {
        for env in &chunk.events {
            if !self.ids.insert(env.id) {
                continue;
            }
            self.first_at = self.first_at.min(Some(env.at)).or(Some(env.at));
            self.last_at = self.last_at.max(Some(env.at));
            if matches!(env.event, Event::SessionEnded { .. }) {
                self.ended = true;
            }
            self.index.add(env);
        }
        self.head = hash;
        self.next_index += 1;
    }

    /// Read chunks written since `next_index` (by an earlier run, or another replica).
    /// `Ok(true)` if there were any.
    pub(crate) async fn catch_up(&mut self, store: &dyn ObjectStore) -> Result<bool, object_store::Error> {
        let mut found = false;
        loop {
            let path = chunk::chained_path(&self.date, self.id, self.next_index);
            let bytes = match store.get(&path).await {
                Ok(got) => got.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(found),
                Err(e) => return Err(e),
            };
            found = true;
            let hash = chunk::sha256_hex(&bytes);
            match chunk::decode_chained(&bytes) {
                Ok(c) => self.absorb(&c, hash),
                Err(e) => {
                    // Damaged in storage: chain on past it; `audit verify` reports it.
                    warn!(session.id = %self.id, path = %path, error = %e, "undecodable chunk in chain");
                    self.head = hash;
                    self.next_index += 1;
                }
            }
            self.last_activity = Instant::now();
        }
    }

    /// The manifest for the chain as it stands (unsigned).
    pub(crate) fn manifest(&self) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            session: self.id,
            date: self.date.clone(),
            chunks: self.next_index,
            head: self.head.clone(),
            events: u64::try_from(self.ids.len()).unwrap_or(u64::MAX),
            first_at: self.first_at,
            last_at: self.last_at,
            incomplete: !self.ended,
            public_key: None,
            signature: None,
        }
    }

    /// The events of `envs` not yet in the chain, each once, in the given order.
    pub(crate) fn fresh(&self, envs: &[Envelope]) -> Vec<Envelope> {
        let mut seen = HashSet::new();
        envs.iter().filter(|e| !self.ids.contains(&e.id) && seen.insert(e.id)).cloned().collect()
    }
}
