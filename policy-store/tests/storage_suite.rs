//! openraft's storage test suite against the redb log store and state machine.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use policy_store::store::{LogStore, StateMachineStore};
use policy_store::{NodeId, TypeConfig};
use tempfile::TempDir;

struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new().expect("a temporary directory");
        let (log_store, state_machine) = policy_store::store::open(dir.path()).expect("fresh storage opens");
        Ok((dir, log_store, state_machine))
    }
}

#[test]
fn redb_storage_passes_the_openraft_suite() -> anyhow::Result<()> {
    Suite::test_all(RedbStoreBuilder)?;
    Ok(())
}

fn apply_entry(index: u64, yaml: &str) -> openraft::Entry<TypeConfig> {
    openraft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(policy_store::Command::Apply {
            document_yaml: yaml.to_string(),
            author: "alice".into(),
            applied_at_unix_ms: 1_700_000_000_000,
        }),
    }
}

#[tokio::test]
async fn snapshot_carries_every_version_to_another_state_machine() -> anyhow::Result<()> {
    use openraft::{RaftSnapshotBuilder, storage::RaftStateMachine};

    let leader_dir = TempDir::new()?;
    let (_, mut leader) = policy_store::store::open(leader_dir.path())?;
    let outcomes = leader
        .apply([
            apply_entry(1, "rules: []\n"),
            apply_entry(2, "rules: []\n"),
            apply_entry(3, "defaults: {}\n"),
        ])
        .await?;
    let summary: Vec<(u64, bool)> = outcomes.iter().map(|o| (o.version, o.changed)).collect();
    assert_eq!(summary, vec![(1, true), (1, false), (2, true)]);

    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(3));

    let follower_dir = TempDir::new()?;
    let (_, mut follower) = policy_store::store::open(follower_dir.path())?;
    let mut watcher = follower.subscribe();
    let mut received = follower.begin_receiving_snapshot().await?;
    *received = *snapshot.snapshot;
    follower.install_snapshot(&snapshot.meta, received).await?;

    assert!(watcher.has_changed()?, "installing a snapshot notifies watchers");
    assert_eq!(watcher.borrow_and_update().as_slice(), leader.versions().as_slice());
    assert_eq!(follower.applied_state().await?.0.map(|l| l.index), Some(3));
    assert_eq!(follower.get_current_snapshot().await?.map(|s| s.meta), Some(snapshot.meta));

    // The installed state is durable: reopening the follower's storage finds the same versions.
    drop(follower);
    let (_, reopened) = policy_store::store::open(follower_dir.path())?;
    assert_eq!(reopened.versions().as_slice(), leader.versions().as_slice());
    Ok(())
}
