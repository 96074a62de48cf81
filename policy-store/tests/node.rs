//! Runs a policy-store node in-process on 127.0.0.1:0 with a temporary data dir, and talks to it
//! over gRPC like the CLI and the proxies do.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use policy_store::client::{PolicyClient, follow};
use policy_store::{PolicyStoreConfig, StoreError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DOC_1: &str = "rules:\n  - name: no-drop\n    match: { operations: [drop] }\n    action: deny\n";
const DOC_2: &str = "rules:\n  - name: no-ddl\n    match: { operations: [drop, alter] }\n    action: deny\n";
const DOC_3: &str = "defaults: { no_match: deny }\n";
/// `dney` is not an action: the error is at `rules[0].action`, line 4.
const INVALID: &str = "rules:\n  - name: no-drop\n    match: { operations: [drop] }\n    action: dney\n";

struct Node {
    endpoint: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StoreError>>,
}

impl Node {
    async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let cfg = PolicyStoreConfig {
            listen: listener.local_addr()?,
            data_dir: data_dir.to_path_buf(),
            node_id: 1,
            ..PolicyStoreConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(policy_store::run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self { endpoint, stop, task })
    }

    async fn client(&self) -> anyhow::Result<PolicyClient> {
        // The listener is bound already; tonic serves once raft has a leader.
        for _ in 0..100 {
            if let Ok(c) = PolicyClient::connect(&self.endpoint).await {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("policy store at {} never answered", self.endpoint)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("node did not stop within 10s")??
            .context("node run failed")?;
        Ok(())
    }
}

#[tokio::test]
async fn apply_creates_versions_and_skips_unchanged_documents() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;

    let first = client.apply(DOC_1, "alice").await?;
    assert_eq!((first.version, first.changed), (1, true));
    let same = client.apply(DOC_1, "bob").await?;
    assert_eq!((same.version, same.changed), (1, false));
    let second = client.apply(DOC_2, "bob").await?;
    assert_eq!((second.version, second.changed), (2, true));

    let latest = client.get(0).await?;
    assert_eq!(latest.version, 2);
    assert_eq!(latest.document_yaml, DOC_2);
    assert_eq!(latest.author, "bob");
    assert_eq!(latest.digest, policy_store::version::digest(DOC_2));
    assert!(latest.applied_at_unix_ms > 0);
    let v1 = client.get(1).await?;
    assert_eq!((v1.document_yaml.as_str(), v1.author.as_str()), (DOC_1, "alice"));

    let history = client.history().await?;
    let listed: Vec<(u64, &str)> = history.iter().map(|v| (v.version, v.author.as_str())).collect();
    assert_eq!(listed, vec![(1, "alice"), (2, "bob")]);

    // Applying the first document again after a different one is a change.
    let back = client.apply(DOC_1, "carol").await?;
    assert_eq!((back.version, back.changed), (3, true));
    node.stop().await
}

#[tokio::test]
async fn invalid_document_is_rejected_with_field_and_line_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;

    let err = client.apply(INVALID, "mallory").await.expect_err("invalid document accepted");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    let message = err.to_string();
    assert!(message.contains("rules[0].action"), "{message}");
    assert!(message.contains("line 4"), "{message}");
    assert_eq!(message, proto::policy::parse(INVALID).expect_err("invalid").to_string());

    let garbage = client.apply("{{{ :\n\t- [", "mallory").await.expect_err("garbage accepted");
    assert_eq!(garbage.code(), Some(tonic::Code::InvalidArgument));

    let history = client.history().await?;
    assert_eq!(history.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1]);
    node.stop().await
}

#[tokio::test]
async fn get_unknown_version_is_not_found() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;

    let empty = client.get(0).await.expect_err("latest of an empty store");
    assert_eq!(empty.code(), Some(tonic::Code::NotFound));
    assert!(client.history().await?.is_empty());
    client.apply(DOC_1, "alice").await?;
    let missing = client.get(7).await.expect_err("version 7 does not exist");
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
    assert!(missing.to_string().contains('7'), "{missing}");
    node.stop().await
}

async fn next(
    stream: &mut tonic::Streaming<proto::pb::PolicyVersion>,
) -> anyhow::Result<Option<proto::pb::PolicyVersion>> {
    Ok(tokio::time::timeout(Duration::from_secs(5), stream.message()).await??)
}

#[tokio::test]
async fn watch_delivers_the_backlog_then_new_versions_live() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;
    client.apply(DOC_2, "alice").await?;

    let mut stream = client.watch(0).await?;
    let one = next(&mut stream).await?.expect("version 1");
    let two = next(&mut stream).await?.expect("version 2");
    assert_eq!((one.version, one.document_yaml.as_str()), (1, DOC_1));
    assert_eq!((two.version, two.document_yaml.as_str()), (2, DOC_2));

    client.apply(DOC_3, "alice").await?;
    let three = next(&mut stream).await?.expect("version 3");
    assert_eq!((three.version, three.document_yaml.as_str()), (3, DOC_3));

    // Resuming from a version sends only the later ones.
    let mut resumed = client.watch(2).await?;
    assert_eq!(next(&mut resumed).await?.expect("version 3").version, 3);
    node.stop().await
}

#[tokio::test]
async fn follower_sees_a_new_version_within_a_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;

    let follower = follow(vec![node.endpoint.clone()]);
    let mut policy = follower.policy.clone();
    assert!(policy.borrow().is_none());
    let first =
        tokio::time::timeout(Duration::from_secs(5), policy.wait_for(Option::is_some)).await??.clone();
    assert_eq!(first.as_ref().map(|p| p.version), Some(1));
    assert!(follower.last_contact().is_some());

    client.apply(DOC_2, "alice").await?;
    let applied = std::time::Instant::now();
    let second = tokio::time::timeout(
        Duration::from_secs(1),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 2)),
    )
    .await
    .context("follower did not see version 2 within 1s")??
    .clone()
    .expect("some policy");
    assert!(applied.elapsed() < Duration::from_secs(1));
    assert_eq!(second.digest, policy_store::version::digest(DOC_2));
    assert_eq!(second.document.rules[0].name, "no-ddl");
    node.stop().await
}

#[tokio::test]
async fn follower_reconnects_to_another_endpoint_and_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    node.client().await?.apply(DOC_1, "alice").await?;

    // The first endpoint refuses connections; the follower cycles to the live one.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let dead_endpoint = format!("http://{}", dead.local_addr()?);
    drop(dead);
    let follower = follow(vec![dead_endpoint, node.endpoint.clone()]);
    let mut policy = follower.policy.clone();
    tokio::time::timeout(Duration::from_secs(5), policy.wait_for(|p| p.is_some())).await??;

    // Restart the node from the same data dir; the follower resumes and sees the next version.
    let endpoint = node.endpoint.clone();
    node.stop().await?;
    let addr: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let cfg = PolicyStoreConfig {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        node_id: 1,
        ..PolicyStoreConfig::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(policy_store::run(cfg, listener, async move {
        let _ = stopped.await;
    }));
    let restarted = Node { endpoint, stop, task };
    restarted.client().await?.apply(DOC_2, "alice").await?;
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 2)),
    )
    .await
    .context("follower did not resume after the restart")??
    .clone();
    assert_eq!(seen.map(|p| p.version), Some(2));
    restarted.stop().await
}

#[tokio::test]
async fn restart_from_the_same_data_dir_keeps_the_history() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;
    client.apply(DOC_2, "bob").await?;
    let before = client.history().await?;
    drop(client);
    node.stop().await?;

    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    assert_eq!(client.history().await?, before);
    assert_eq!(client.get(0).await?.document_yaml, DOC_2);
    // Numbering and the unchanged check carry on from the stored state.
    let same = client.apply(DOC_2, "bob").await?;
    assert_eq!((same.version, same.changed), (2, false));
    let next = client.apply(DOC_3, "carol").await?;
    assert_eq!((next.version, next.changed), (3, true));
    node.stop().await
}
