//! Durable raft storage in one redb file (`policy-store.redb` in the data directory).
//!
//! Pattern: openraft 0.9's `examples/raft-kv-rocksdb/src/store.rs`, with a separate log store and
//! state machine (storage v2). The state machine persists each applied batch (new versions, last
//! applied log id, membership) in one transaction, so a restart needs no replay of applied entries.
//!
//! Tables:
//! - `raft_log`: log index → JSON of the entry;
//! - `raft_log_meta`: `vote`, `committed`, `last_purged` → JSON;
//! - `policy_versions`: version → JSON of [`StoredVersion`];
//! - `state_meta`: `applied`, `membership`, `snapshot_meta` → JSON; `snapshot_data` → raw bytes.

mod log_store;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use log_store::LogStore;
pub use state_machine::{SnapshotBuilder, StateMachineStore};

use crate::error::DbError;
use crate::version::StoredVersion;

/// The file inside the data directory.
pub const FILE_NAME: &str = "policy-store.redb";

/// All versions, oldest first, as the state machine last applied them.
pub type Versions = Arc<Vec<Arc<StoredVersion>>>;

pub(crate) const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const LOG_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_log_meta");
pub(crate) const VERSIONS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("policy_versions");
pub(crate) const STATE_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state_meta");

/// Open (or create) the storage in `data_dir` and load the state machine from it.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), DbError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|source| DbError::CreateDir { path: data_dir.to_path_buf(), source })?;
    let path = data_dir.join(FILE_NAME);
    let db = Database::create(&path).map_err(|source| DbError::Open { path, source })?;
    let txn = db.begin_write()?;
    txn.open_table(LOG)?;
    txn.open_table(LOG_META)?;
    txn.open_table(VERSIONS)?;
    txn.open_table(STATE_META)?;
    txn.commit()?;
    let db = Arc::new(db);
    let state_machine = StateMachineStore::load(db.clone())?;
    Ok((LogStore::new(db), state_machine))
}

/// Run a blocking storage operation (a commit waits for fsync) off the async workers.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, DbError>
where
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    serde_json::to_vec(value).map_err(|source| DbError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|source| DbError::Decode { what, source })
}

/// Read and decode one JSON value from a `&str`-keyed table.
pub(crate) fn get_json<T, Tbl>(table: &Tbl, key: &'static str) -> Result<Option<T>, DbError>
where
    T: DeserializeOwned,
    Tbl: redb::ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key)? {
        Some(bytes) => Ok(Some(decode(key, bytes.value())?)),
        None => Ok(None),
    }
}
