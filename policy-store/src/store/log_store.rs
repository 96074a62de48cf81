//! The raft log, the vote and the committed log id, in redb.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Weak};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{LOG, LOG_META, blocking, decode, encode, get_json};
use crate::error::DbError;
use crate::{NodeId, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The raft log store. Clones share the same file.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Self {
        Self { db }
    }

    /// A handle that dies when every clone of the storage is dropped.
    pub(crate) fn database(&self) -> Weak<Database> {
        Arc::downgrade(&self.db)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, DbError> {
        let txn = self.db.begin_read()?;
        get_json(&txn.open_table(LOG_META)?, key)
    }

    async fn write_meta<T: serde::Serialize>(&self, key: &'static str, value: &T) -> Result<(), DbError> {
        let bytes = encode(key, value)?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG_META)?.insert(key, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    fn read_entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry<TypeConfig>>, DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut entries = Vec::new();
        for row in table.range(range)? {
            let (_, bytes) = row?;
            entries.push(decode("raft log entry", bytes.value())?);
        }
        Ok(entries)
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, DbError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        match table.last()? {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> = decode("raft log entry", bytes.value())?;
                Ok(Some(*entry.get_log_id()))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.read_entries(range).map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> =
            self.read_meta(LAST_PURGED).map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))?;
        let last = self.last_log_id().map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))?;
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_meta(VOTE, vote).await.map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.read_meta(VOTE).map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.write_meta(COMMITTED, &committed)
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let committed: Option<Option<LogId<NodeId>>> =
            self.read_meta(COMMITTED).map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, encode("raft log entry", &entry)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, DbError>>()
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))?;
        let db = self.db.clone();
        let written = blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &rows {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await;
        match written {
            Ok(()) => {
                // The commit returned, so the entries are on disk.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(message)));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(raft.log_index = log_id.index, "truncating the raft log from this index");
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        tracing::debug!(raft.log_index = log_id.index, "purging the raft log up to this index");
        let purged =
            encode(LAST_PURGED, &log_id).map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(LOG_META)?.insert(LAST_PURGED, purged.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}
