//! The archive log: one entry per written manifest, itself hash-chained, so that deleting a whole
//! session (chunks and manifest) is detected. An entry is appended just before its manifest is
//! written; a replica that then loses the manifest write to a longer chain leaves an entry for a
//! shorter one, so a session's manifest must match its entry with the most chunks.
//!
//! `archive/log/{seq:020}.json`, each a [`LogEntry`] whose `prev` is the hex SHA-256 of the
//! previous entry's stored bytes ([`crate::chunk::GENESIS`] for entry 0). Entries are created with
//! a conditional put, so several recorders append to one chain without overwriting each other.
//!
//! With a signing key, each entry is signed ([`Signed`]; the signature covers `seq` and `prev`),
//! so that rewriting the log from some entry on (to drop a deleted session and re-chain the rest)
//! needs the key. Only the newest entries can still be removed unnoticed from the bucket alone,
//! together with their sessions; the recorder logs each entry's checkpoint (`SEQ:SHA256`), and
//! `audit verify --checkpoint` checks the log still holds one kept outside the bucket.

use ed25519_dalek::SigningKey;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::chunk::{GENESIS, sha256_hex};
use crate::signed::Signed;

/// The folder of the log.
pub(crate) const LOG_ROOT: &str = "archive/log";

/// One entry of the archive log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    /// Hex SHA-256 of entry `seq - 1`'s stored bytes.
    pub prev: String,
    pub session: Uuid,
    pub date: String,
    /// The manifest's chain head and chunk count.
    pub head: String,
    pub chunks: u64,
    pub incomplete: bool,
    /// Hex SHA-256 of the manifest's stored bytes.
    pub manifest_sha256: String,
    /// Hex Ed25519 public key that signed this entry (absent when the recorder has no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Hex Ed25519 signature over the entry's JSON without `signature` ([`Signed::signed_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Signed for LogEntry {
    fn signature_fields(&self) -> (Option<&str>, Option<&str>) {
        (self.public_key.as_deref(), self.signature.as_deref())
    }

    fn set_signature_fields(&mut self, public_key: Option<String>, signature: Option<String>) {
        self.public_key = public_key;
        self.signature = signature;
    }
}

pub(crate) fn entry_path(seq: u64) -> Path {
    Path::from(format!("{LOG_ROOT}/{seq:020}.json"))
}

/// The seq of a log entry key.
pub(crate) fn seq_of(path: &Path) -> Option<u64> {
    path.filename()?.strip_suffix(".json")?.parse().ok()
}

/// The writer's view of the log's end.
#[derive(Debug)]
pub(crate) struct ArchiveLog {
    next_seq: u64,
    head: String,
}

impl ArchiveLog {
    /// Find the end of the log.
    pub(crate) async fn load(store: &dyn ObjectStore) -> Result<Self, object_store::Error> {
        let mut last = None;
        let mut listing = store.list(Some(&Path::from(LOG_ROOT)));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if let Some(seq) = seq_of(&meta.location) {
                last = last.max(Some(seq));
            }
        }
        let mut log = ArchiveLog { next_seq: 0, head: GENESIS.to_string() };
        if let Some(seq) = last {
            let bytes = store.get(&entry_path(seq)).await?.bytes().await?;
            log.next_seq = seq + 1;
            log.head = sha256_hex(&bytes);
        }
        log.catch_up(store).await?;
        Ok(log)
    }

    /// Follow entries written by others since we last looked. They are not checked here (not even
    /// their signatures): `audit verify` does that; the recorder only needs the chain's end.
    async fn catch_up(&mut self, store: &dyn ObjectStore) -> Result<(), object_store::Error> {
        loop {
            match store.get(&entry_path(self.next_seq)).await {
                Ok(got) => {
                    let bytes = got.bytes().await?;
                    self.head = sha256_hex(&bytes);
                    self.next_seq += 1;
                }
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Append an entry for a manifest (`seq` and `prev` are filled in, and it is signed with
    /// `signer` if given); returns its seq and the hash of its stored bytes.
    pub(crate) async fn append(
        &mut self,
        store: &dyn ObjectStore,
        mut entry: LogEntry,
        signer: Option<&SigningKey>,
    ) -> Result<crate::audit::Checkpoint, object_store::Error> {
        loop {
            entry.seq = self.next_seq;
            entry.prev = self.head.clone();
            entry.set_signature_fields(None, None);
            if let Some(key) = signer {
                entry.sign(key);
            }
            let mut bytes = serde_json::to_vec(&entry).expect("a log entry always serializes");
            bytes.push(b'\n');
            let hash = sha256_hex(&bytes);
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match store.put_opts(&entry_path(entry.seq), PutPayload::from(bytes), opts).await {
                Ok(_) => {
                    self.head.clone_from(&hash);
                    self.next_seq += 1;
                    return Ok(crate::audit::Checkpoint { seq: entry.seq, sha256: hash });
                }
                Err(object_store::Error::AlreadyExists { .. }) => self.catch_up(store).await?,
                Err(e) => return Err(e),
            }
        }
    }
}
