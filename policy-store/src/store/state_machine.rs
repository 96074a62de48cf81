//! The state machine: the list of policy versions, persisted in redb and published on a watch
//! channel for the gRPC `Watch` stream.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use super::{STATE_META, VERSIONS, Versions, blocking, decode, encode, get_json};
use crate::command::{ApplyOutcome, Command};
use crate::error::DbError;
use crate::version::{StoredVersion, digest};
use crate::{NodeId, TypeConfig};

const APPLIED: &str = "applied";
const MEMBERSHIP: &str = "membership";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

type Membership = StoredMembership<NodeId, BasicNode>;

/// What a snapshot holds: every version (raft's metadata travels beside it).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    versions: Vec<StoredVersion>,
}

/// The state machine. Versions are kept in memory too, behind a watch channel.
#[derive(Debug)]
pub struct StateMachineStore {
    db: Arc<Database>,
    applied: Option<LogId<NodeId>>,
    membership: Membership,
    versions: watch::Sender<Versions>,
}

impl StateMachineStore {
    /// Load the last applied state from the storage file.
    pub(crate) fn load(db: Arc<Database>) -> Result<Self, DbError> {
        let txn = db.begin_read()?;
        let meta = txn.open_table(STATE_META)?;
        let applied: Option<Option<LogId<NodeId>>> = get_json(&meta, APPLIED)?;
        let membership: Option<Membership> = get_json(&meta, MEMBERSHIP)?;
        let mut versions = Vec::new();
        for row in txn.open_table(VERSIONS)?.iter()? {
            let (_, bytes) = row?;
            versions.push(Arc::new(decode::<StoredVersion>("policy version", bytes.value())?));
        }
        drop(meta);
        drop(txn);
        let (versions, _) = watch::channel(Arc::new(versions));
        Ok(Self { db, applied: applied.flatten(), membership: membership.unwrap_or_default(), versions })
    }

    /// Follow the versions: the receiver holds all of them and changes on every new one.
    pub fn subscribe(&self) -> watch::Receiver<Versions> {
        self.versions.subscribe()
    }

    /// The versions as last applied.
    pub fn versions(&self) -> Versions {
        self.versions.borrow().clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut versions: Vec<Arc<StoredVersion>> = self.versions.borrow().as_ref().clone();
        let mut applied = self.applied;
        let mut membership = self.membership.clone();
        let mut added: Vec<Arc<StoredVersion>> = Vec::new();
        let mut replies = Vec::new();

        for entry in entries {
            applied = Some(entry.log_id);
            let latest = versions.last().map_or(0, |v| v.version);
            let outcome = match entry.payload {
                EntryPayload::Blank => ApplyOutcome { version: latest, changed: false },
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyOutcome { version: latest, changed: false }
                }
                EntryPayload::Normal(Command::Apply { document_yaml, author, applied_at_unix_ms }) => {
                    let digest = digest(&document_yaml);
                    if versions.last().is_some_and(|v| v.digest == digest) {
                        ApplyOutcome { version: latest, changed: false }
                    } else {
                        let version = Arc::new(StoredVersion {
                            version: latest + 1,
                            document_yaml,
                            author,
                            applied_at_unix_ms,
                            digest,
                        });
                        versions.push(version.clone());
                        added.push(version);
                        ApplyOutcome { version: latest + 1, changed: true }
                    }
                }
            };
            replies.push(outcome);
        }
        if replies.is_empty() {
            return Ok(replies);
        }

        let write = || -> Result<_, DbError> {
            let rows = added
                .iter()
                .map(|v| Ok((v.version, encode("policy version", v.as_ref())?)))
                .collect::<Result<Vec<(u64, Vec<u8>)>, DbError>>()?;
            Ok((rows, encode(APPLIED, &applied)?, encode(MEMBERSHIP, &membership)?))
        };
        let (rows, applied_bytes, membership_bytes) =
            write().map_err(|e| e.into_raft(ErrorSubject::StateMachine, ErrorVerb::Write))?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(VERSIONS)?;
                for (version, bytes) in &rows {
                    table.insert(*version, bytes.as_slice())?;
                }
                let mut meta = txn.open_table(STATE_META)?;
                meta.insert(APPLIED, applied_bytes.as_slice())?;
                meta.insert(MEMBERSHIP, membership_bytes.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::StateMachine, ErrorVerb::Write))?;

        self.applied = applied;
        self.membership = membership;
        if !added.is_empty() {
            for v in &added {
                info!(policy.version = v.version, policy.digest = %v.digest, author = %v.author, "policy version committed");
            }
            self.versions.send_replace(Arc::new(versions));
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let read_err =
            |e: DbError| e.into_raft(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read);
        let write_err =
            |e: DbError| e.into_raft(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write);
        let payload: SnapshotPayload = decode("snapshot", &data).map_err(read_err)?;
        let rows = payload
            .versions
            .iter()
            .map(|v| Ok((v.version, encode("policy version", v)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, DbError>>()
            .map_err(write_err)?;
        let applied = encode(APPLIED, &meta.last_log_id).map_err(write_err)?;
        let membership = encode(MEMBERSHIP, &meta.last_membership).map_err(write_err)?;
        let snapshot_meta = encode(SNAPSHOT_META, meta).map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(VERSIONS)?;
                table.retain(|_, _| false)?;
                for (version, bytes) in &rows {
                    table.insert(*version, bytes.as_slice())?;
                }
                let mut meta = txn.open_table(STATE_META)?;
                meta.insert(APPLIED, applied.as_slice())?;
                meta.insert(MEMBERSHIP, membership.as_slice())?;
                meta.insert(SNAPSHOT_META, snapshot_meta.as_slice())?;
                meta.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(write_err)?;

        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let versions: Vec<Arc<StoredVersion>> = payload.versions.into_iter().map(Arc::new).collect();
        info!(
            policy.version = versions.last().map_or(0, |v| v.version),
            snapshot.id = %meta.snapshot_id,
            "installed a policy-store snapshot"
        );
        self.versions.send_replace(Arc::new(versions));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        read_snapshot(&self.db).map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }
}

fn read_snapshot(db: &Database) -> Result<Option<Snapshot<TypeConfig>>, DbError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(STATE_META)?;
    let Some(meta) = get_json::<SnapshotMeta<NodeId, BasicNode>, _>(&table, SNAPSHOT_META)? else {
        return Ok(None);
    };
    let data = table.get(SNAPSHOT_DATA)?.map(|d| d.value().to_vec()).unwrap_or_default();
    Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
}

/// Builds a snapshot from one consistent read of the storage file.
#[derive(Debug)]
pub struct SnapshotBuilder {
    db: Arc<Database>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let db = self.db.clone();
        let (meta, data) = blocking(move || {
            let txn = db.begin_read()?;
            let state = txn.open_table(STATE_META)?;
            let applied: Option<LogId<NodeId>> = get_json::<Option<_>, _>(&state, APPLIED)?.flatten();
            let membership: Membership = get_json(&state, MEMBERSHIP)?.unwrap_or_default();
            let mut versions = Vec::new();
            for row in txn.open_table(VERSIONS)?.iter()? {
                let (_, bytes) = row?;
                versions.push(decode::<StoredVersion>("policy version", bytes.value())?);
            }
            drop(state);
            drop(txn);

            let data = encode("snapshot", &SnapshotPayload { versions })?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let snapshot_id = match applied {
                Some(last) => format!("{}-{}-{now_ms}", last.leader_id, last.index),
                None => format!("--{now_ms}"),
            };
            let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };

            let txn = db.begin_write()?;
            {
                let mut state = txn.open_table(STATE_META)?;
                state.insert(SNAPSHOT_META, encode(SNAPSHOT_META, &meta)?.as_slice())?;
                state.insert(SNAPSHOT_DATA, data.as_slice())?;
            }
            txn.commit()?;
            Ok((meta, data))
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        info!(snapshot.id = %meta.snapshot_id, "built a policy-store snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}
