//! Runs a policy-store node in-process on 127.0.0.1:0 with a temporary data dir, and talks to it
//! over gRPC like the CLI and the proxies do.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use policy_store::client::{ClientError, PolicyClient, follow};
use policy_store::{PolicyStoreConfig, StoreError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const ADMIN: &str = "test-admin-token";
const READ: &str = "test-read-token";

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

/// A single node's config with both tokens.
fn config(listen: std::net::SocketAddr, data_dir: &Path) -> PolicyStoreConfig {
    PolicyStoreConfig {
        listen,
        data_dir: data_dir.to_path_buf(),
        node_id: 1,
        admin_token: Some(ADMIN.into()),
        read_token: Some(READ.into()),
        ..PolicyStoreConfig::default()
    }
}

impl Node {
    async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let cfg = config(listener.local_addr()?, data_dir);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(policy_store::run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self { endpoint, stop, task })
    }

    /// A client with the admin token.
    async fn client(&self) -> anyhow::Result<PolicyClient> {
        self.client_with(ADMIN).await
    }

    async fn client_with(&self, token: &str) -> anyhow::Result<PolicyClient> {
        // The listener is bound already; tonic serves once raft has a leader.
        for _ in 0..100 {
            if let Ok(c) = PolicyClient::connect(&self.endpoint, token).await {
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
    // The author is the role that applied it, then the caller's claim.
    assert_eq!(latest.author, "admin-token:bob");
    assert_eq!(latest.digest, policy_store::version::digest(DOC_2));
    assert!(latest.applied_at_unix_ms > 0);
    let v1 = client.get(1).await?;
    assert_eq!((v1.document_yaml.as_str(), v1.author.as_str()), (DOC_1, "admin-token:alice"));

    let history = client.history().await?;
    let listed: Vec<(u64, &str)> = history.iter().map(|v| (v.version, v.author.as_str())).collect();
    assert_eq!(listed, vec![(1, "admin-token:alice"), (2, "admin-token:bob")]);

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

/// The next version of a [`PolicyClient::watch`] stream (heartbeats are left out).
async fn next(
    stream: &mut (impl tokio_stream::Stream<Item = Result<proto::pb::PolicyVersion, ClientError>> + Unpin),
) -> anyhow::Result<Option<proto::pb::PolicyVersion>> {
    use tokio_stream::StreamExt;
    Ok(tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.transpose()?)
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

    let follower = follow(vec![node.endpoint.clone()], READ)?;
    let mut policy = follower.policy.clone();
    assert!(policy.borrow().is_none());
    let first =
        tokio::time::timeout(Duration::from_secs(5), policy.wait_for(Option::is_some)).await??.clone();
    assert_eq!(first.as_ref().map(|p| p.version), Some(1));
    // Contact comes with the Watch stream's first heartbeat, right after the version.
    tokio::time::timeout(Duration::from_secs(2), async {
        while follower.last_contact().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("no heartbeat")?;

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
    let follower = follow(vec![dead_endpoint, node.endpoint.clone()], READ)?;
    let mut policy = follower.policy.clone();
    tokio::time::timeout(Duration::from_secs(5), policy.wait_for(|p| p.is_some())).await??;

    // Restart the node from the same data dir; the follower resumes and sees the next version.
    let endpoint = node.endpoint.clone();
    node.stop().await?;
    let addr: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let cfg = config(addr, dir.path());
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

/// A raw client of the `PolicyStore` service, to send requests with any (or no) token.
async fn raw(
    endpoint: &str,
) -> anyhow::Result<proto::pb::policy_store_client::PolicyStoreClient<tonic::transport::Channel>> {
    Ok(proto::pb::policy_store_client::PolicyStoreClient::connect(endpoint.to_string()).await?)
}

/// The code of a refused call.
fn code<T>(answer: Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
    answer.err().map(|s| s.code())
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    }
    request
}

#[tokio::test]
async fn every_call_needs_a_token_and_only_the_admin_token_writes() -> anyhow::Result<()> {
    use proto::pb::{ApplyRequest, GetRequest, HistoryRequest, WatchRequest};
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    node.client().await?.apply(DOC_1, "alice").await?;
    let mut c = raw(&node.endpoint).await?;
    let apply = || ApplyRequest { document_yaml: DOC_2.into(), author: "mallory".into() };

    // No token, a wrong one, or one that is not a bearer token: refused before anything is read.
    let longer = format!("{ADMIN}x");
    for token in [None, Some("wrong"), Some(longer.as_str()), Some("")] {
        let unauthenticated = Some(tonic::Code::Unauthenticated);
        assert_eq!(code(c.apply(with_token(apply(), token)).await), unauthenticated, "apply {token:?}");
        assert_eq!(code(c.get(with_token(GetRequest { version: 0 }, token)).await), unauthenticated);
        assert_eq!(code(c.history(with_token(HistoryRequest {}, token)).await), unauthenticated);
        assert_eq!(code(c.watch(with_token(WatchRequest { from_version: 0 }, token)).await), unauthenticated);
    }
    let mut no_bearer = tonic::Request::new(GetRequest { version: 0 });
    no_bearer.metadata_mut().insert("authorization", ADMIN.parse()?);
    assert_eq!(c.get(no_bearer).await.expect_err("no Bearer").code(), tonic::Code::Unauthenticated);
    // The policy client with a wrong token gets the same answer.
    let mut wrong = PolicyClient::connect(&node.endpoint, "wrong").await?;
    assert_eq!(wrong.get(0).await.expect_err("wrong token").code(), Some(tonic::Code::Unauthenticated));

    // The read token reads, but does not write.
    let mut reader = node.client_with(READ).await?;
    let refused = reader.apply(DOC_2, "mallory").await.expect_err("reader applied");
    assert_eq!(refused.code(), Some(tonic::Code::PermissionDenied), "{refused}");
    assert!(refused.to_string().contains("admin token"), "{refused}");
    assert_eq!(reader.get(0).await?.version, 1);
    assert_eq!(reader.history().await?.len(), 1);
    let mut stream = reader.watch(0).await?;
    assert_eq!(next(&mut stream).await?.expect("version 1").version, 1);

    // The admin token writes; the history never shows a write that was refused.
    let mut admin = node.client().await?;
    assert_eq!(admin.apply(DOC_2, "alice").await?.version, 2);
    let authors: Vec<String> = admin.history().await?.into_iter().map(|v| v.author).collect();
    assert_eq!(authors, vec!["admin-token:alice", "admin-token:alice"]);
    // Control characters cannot fake a second line in the history.
    let forged = admin.apply(DOC_3, "alice\nadmin-token:bob").await.expect_err("control characters");
    assert_eq!(forged.code(), Some(tonic::Code::InvalidArgument));
    node.stop().await
}

#[tokio::test]
async fn raft_rpcs_need_the_admin_token() -> anyhow::Result<()> {
    use proto::pb::RaftPayload;
    use proto::pb::raft_client::RaftClient;
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    node.client().await?.apply(DOC_1, "alice").await?;
    let mut raft = RaftClient::connect(node.endpoint.clone()).await?.max_encoding_message_size(64 << 20);
    // A vote for the highest term would depose the leader for good; without the token it is
    // refused before the payload is read, however large.
    let vote = br#"{"vote":{"leader_id":{"term":18446744073709551615,"node_id":9},"committed":false},"last_log_id":null}"#;
    let payload = |bytes: &[u8]| RaftPayload { payload: bytes.to_vec() };
    assert_eq!(code(raft.vote(with_token(payload(vote), None)).await), Some(tonic::Code::Unauthenticated));
    assert_eq!(
        code(raft.append_entries(with_token(payload(&vec![b'x'; 8 << 20]), Some("wrong"))).await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(raft.install_snapshot(with_token(payload(b"{}"), Some(READ))).await),
        Some(tonic::Code::PermissionDenied)
    );
    // With the admin token the RPC reaches raft (and this payload is not valid).
    assert_eq!(
        code(raft.append_entries(with_token(payload(b"{"), Some(ADMIN))).await),
        Some(tonic::Code::InvalidArgument)
    );
    // The node still leads and writes.
    assert_eq!(node.client().await?.apply(DOC_2, "alice").await?.version, 2);
    node.stop().await
}

#[tokio::test]
async fn a_store_without_an_admin_token_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cfg = PolicyStoreConfig {
        admin_token: None,
        read_token: Some(READ.into()),
        ..config(listener.local_addr()?, dir.path())
    };
    let refused = tokio::time::timeout(Duration::from_secs(5), policy_store::run(cfg, listener, async {}))
        .await
        .context("a store without an admin token kept running")?
        .expect_err("a store without an admin token started");
    let message = refused.to_string();
    assert!(
        message.contains("policy_store.admin_token or policy_store.admin_token_file must be set"),
        "{message}"
    );
    // Nothing was created in the data dir.
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
    Ok(())
}

/// A valid document of exactly `len` bytes: a comment, then an empty rule list.
fn padded(len: usize) -> String {
    let tail = "\nrules: []\n";
    format!("#{}{tail}", "x".repeat(len - 1 - tail.len()))
}

#[tokio::test]
async fn a_follower_receives_a_version_over_4_mib_and_an_oversized_apply_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;
    let follower = follow(vec![node.endpoint.clone()], READ)?;
    let mut policy = follower.policy.clone();
    tokio::time::timeout(Duration::from_secs(5), policy.wait_for(|p| p.is_some())).await??;

    // A document at the cap: stored with its author and digest it is over tonic's default 4 MiB.
    let big = padded(policy_store::MAX_DOCUMENT_BYTES);
    assert!(big.len() >= 4 * 1024 * 1024);
    let applied = client.apply(&big, "alice").await?;
    assert_eq!(applied.version, 2);
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 2)),
    )
    .await
    .context("the follower did not receive the large version")??
    .clone()
    .expect("a policy");
    assert_eq!(seen.digest, policy_store::version::digest(&big));
    let stored = client.get(2).await?;
    assert!(prost::Message::encoded_len(&stored) > 4 * 1024 * 1024);
    // A new follower (Get, then Watch) takes it too.
    let second = follow(vec![node.endpoint.clone()], READ)?;
    let mut second_policy = second.policy.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        second_policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 2)),
    )
    .await
    .context("a new follower did not receive the large version")??;

    // One byte more is refused, saying why; nothing changes.
    let over = padded(policy_store::MAX_DOCUMENT_BYTES + 1);
    let refused = client.apply(&over, "alice").await.expect_err("oversized document accepted");
    assert_eq!(refused.code(), Some(tonic::Code::InvalidArgument), "{refused}");
    let message = refused.to_string();
    assert!(message.contains("accepts at most 4194304 bytes"), "{message}");
    assert_eq!(client.get(0).await?.version, 2);
    assert!(follower.current(Duration::from_secs(5)).is_ok());
    node.stop().await
}

/// The versions the followers of this thread activated, from their "policy version active" log
/// lines, and the versions they refused as not newer.
#[derive(Clone, Default)]
struct Activations {
    active: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    refused: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Activations {
    /// Capture on this thread (a `#[tokio::test]` runs its tasks on it) until the guard drops.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn active(&self) -> Vec<u64> {
        self.active.lock().expect("lock").clone()
    }

    fn refused(&self) -> Vec<u64> {
        self.refused.lock().expect("lock").clone()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Activations {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            version: Option<u64>,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.message = format!("{value:?}");
                }
            }
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "policy.version" {
                    self.version = Some(value);
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(version) = fields.version else { return };
        if fields.message == "policy version active" {
            self.active.lock().expect("lock").push(version);
        } else if fields.message.starts_with("refused a policy version not newer") {
            self.refused.lock().expect("lock").push(version);
        }
    }
}

#[tokio::test]
async fn a_new_follower_activates_only_the_newest_version() -> anyhow::Result<()> {
    let log = Activations::default();
    let _capture = log.capture();
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    for doc in [DOC_1, DOC_2, DOC_3] {
        client.apply(doc, "alice").await?;
    }
    let follower = follow(vec![node.endpoint.clone()], READ)?;
    let mut policy = follower.policy.clone();
    let first = tokio::time::timeout(Duration::from_secs(5), policy.wait_for(|p| p.is_some()))
        .await??
        .clone()
        .expect("a policy");
    assert_eq!(first.version, 3);
    // Later versions still arrive, one by one.
    client.apply(DOC_1, "alice").await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 4)),
    )
    .await??;
    assert_eq!(log.active(), vec![3, 4], "versions 1 and 2 must never be enforced");
    node.stop().await
}

/// A policy store that answers `Get` with `latest` and streams whatever the test sends on
/// `Watch`, ignoring `from_version`: a store gone back, or a misbehaving node.
/// Serve `fake` on a free loopback port: its endpoint, and the server's task.
async fn serve_fake(
    fake: std::sync::Arc<FakeStore>,
) -> anyhow::Result<(String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::pb::policy_store_server::PolicyStoreServer::from_arc(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((endpoint, server))
}

struct FakeStore {
    latest: std::sync::Mutex<proto::pb::PolicyVersion>,
    watch:
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Result<proto::pb::WatchEvent, tonic::Status>>>>,
    tokens: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeStore {
    fn token<T>(&self, request: &tonic::Request<T>) {
        let token = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        self.tokens.lock().expect("lock").push(token.to_string());
    }
}

#[tonic::async_trait]
impl proto::pb::policy_store_server::PolicyStore for FakeStore {
    async fn apply(
        &self,
        _: tonic::Request<proto::pb::ApplyRequest>,
    ) -> Result<tonic::Response<proto::pb::ApplyResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn get(
        &self,
        request: tonic::Request<proto::pb::GetRequest>,
    ) -> Result<tonic::Response<proto::pb::PolicyVersion>, tonic::Status> {
        self.token(&request);
        Ok(tonic::Response::new(self.latest.lock().expect("lock").clone()))
    }

    async fn history(
        &self,
        _: tonic::Request<proto::pb::HistoryRequest>,
    ) -> Result<tonic::Response<proto::pb::HistoryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<proto::pb::WatchEvent, tonic::Status>>;

    async fn watch(
        &self,
        request: tonic::Request<proto::pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.token(&request);
        let rx = self.watch.lock().expect("lock").take().ok_or_else(|| tonic::Status::unavailable("once"))?;
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

fn stored(version: u64, yaml: &str) -> proto::pb::PolicyVersion {
    proto::pb::PolicyVersion {
        version,
        document_yaml: yaml.into(),
        author: "admin-token:alice".into(),
        applied_at_unix_ms: 1,
        digest: policy_store::version::digest(yaml),
    }
}

/// `v` as a Watch event.
fn event(v: proto::pb::PolicyVersion) -> proto::pb::WatchEvent {
    proto::pb::WatchEvent { event: Some(proto::pb::watch_event::Event::Version(v)) }
}

/// A heartbeat naming `version`, confirmed just now.
fn beat(version: u64) -> proto::pb::WatchEvent {
    let heartbeat = proto::pb::Heartbeat { version, confirmed_ms_ago: 0 };
    proto::pb::WatchEvent { event: Some(proto::pb::watch_event::Event::Heartbeat(heartbeat)) }
}

#[tokio::test]
async fn a_follower_never_activates_a_version_lower_than_it_has() -> anyhow::Result<()> {
    let log = Activations::default();
    let _capture = log.capture();
    let (versions, rx) = tokio::sync::mpsc::channel(16);
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake = FakeStore {
        latest: std::sync::Mutex::new(stored(5, DOC_1)),
        watch: std::sync::Mutex::new(Some(rx)),
        tokens: tokens.clone(),
    };
    let (endpoint, server) = serve_fake(std::sync::Arc::new(fake)).await?;

    let follower = follow(vec![endpoint], READ)?;
    let mut policy = follower.policy.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 5)),
    )
    .await
    .context("the follower did not take the newest version from Get")??;
    // Older and equal versions on the stream are refused; the next newer one is taken.
    for v in [stored(3, DOC_2), stored(5, DOC_3), stored(4, DOC_2), stored(6, DOC_3)] {
        versions.send(Ok(event(v))).await?;
    }
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 6)),
    )
    .await
    .context("the follower did not take version 6")??
    .clone()
    .expect("a policy");
    assert_eq!(seen.digest, policy_store::version::digest(DOC_3));
    assert_eq!(log.active(), vec![5, 6]);
    assert_eq!(log.refused(), vec![3, 5, 4]);
    let tokens = tokens.lock().expect("lock").clone();
    assert!(!tokens.is_empty() && tokens.iter().all(|t| t == &format!("Bearer {READ}")), "{tokens:?}");
    server.abort();
    Ok(())
}

#[tokio::test]
async fn a_follower_that_cannot_decode_the_store_never_counts_it_as_reached() -> anyhow::Result<()> {
    // The newest version is larger than any follower accepts: every connection fails to decode
    // it, so the follower must go stale instead of looking healthy on the version it has.
    let (_versions, rx) = tokio::sync::mpsc::channel(1);
    let fake = FakeStore {
        latest: std::sync::Mutex::new(stored(5, &padded(policy_store::MAX_VERSION_BYTES + 1024))),
        watch: std::sync::Mutex::new(Some(rx)),
        tokens: std::sync::Arc::default(),
    };
    let (endpoint, server) = serve_fake(std::sync::Arc::new(fake)).await?;
    let follower = follow(vec![endpoint], READ)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(follower.last_contact(), None);
    assert!(follower.policy.borrow().is_none());
    assert!(follower.current(Duration::from_secs(60)).is_err());
    server.abort();
    Ok(())
}

/// `follower.last_contact()` becomes `Some` within `within`.
async fn contact_within(follower: &policy_store::client::Follower, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while follower.last_contact().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn only_heartbeats_and_versions_are_contact_and_a_heartbeat_ahead_makes_the_follower_resync()
-> anyhow::Result<()> {
    let (events, rx) = tokio::sync::mpsc::channel(16);
    let fake = std::sync::Arc::new(FakeStore {
        latest: std::sync::Mutex::new(stored(5, DOC_1)),
        watch: std::sync::Mutex::new(Some(rx)),
        tokens: std::sync::Arc::default(),
    });
    let (endpoint, server) = serve_fake(fake.clone()).await?;
    let follower = follow(vec![endpoint], READ)?;
    let mut policy = follower.policy.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 5)),
    )
    .await
    .context("the follower did not take the newest version from Get")??;
    // `Get` answered and the Watch stream is open, but no node said it is current: no contact.
    assert!(!contact_within(&follower, Duration::from_millis(1500)).await, "contact without a heartbeat");
    assert!(follower.current(Duration::from_secs(60)).is_err());
    // A heartbeat for the version it has is contact.
    events.send(Ok(beat(5))).await?;
    assert!(contact_within(&follower, Duration::from_secs(2)).await, "a heartbeat was not contact");
    assert_eq!(follower.current(Duration::from_secs(60)).map(|p| p.version), Ok(5));
    // A heartbeat naming version 6, which never came on the stream: the follower asks again.
    *fake.latest.lock().expect("lock") = stored(6, DOC_2);
    let before = follower.last_contact();
    events.send(Ok(beat(6))).await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 6)),
    )
    .await
    .context("the follower did not resync after a heartbeat ahead of it")??;
    assert_eq!(follower.last_contact(), before, "a heartbeat ahead of the follower counted as contact");
    server.abort();
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_a_follower_of_a_single_node_fresh_while_no_version_is_applied() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut client = node.client().await?;
    client.apply(DOC_1, "alice").await?;

    // The raw stream: the backlog, then a heartbeat naming the newest version, then more.
    let mut events = client.watch_events(0).await?;
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event =
            tokio::time::timeout(Duration::from_secs(3), events.message()).await??.context("ended")?;
        kinds.push(match event.event.context("an event")? {
            proto::pb::watch_event::Event::Version(v) => format!("version {}", v.version),
            proto::pb::watch_event::Event::Heartbeat(h) => format!("heartbeat {}", h.version),
        });
    }
    assert_eq!(kinds, vec!["version 1", "heartbeat 1", "heartbeat 1"]);

    // A follower stays fresh for three times its staleness limit with no new version.
    let max_staleness = Duration::from_secs(2);
    let follower = follow(vec![node.endpoint.clone()], READ)?;
    assert!(contact_within(&follower, Duration::from_secs(5)).await, "no heartbeat");
    let until = std::time::Instant::now() + 3 * max_staleness;
    while std::time::Instant::now() < until {
        let current = follower.current(max_staleness).map(|p| p.version);
        assert_eq!(current, Ok(1), "stale while the store was up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Without the store the same follower goes stale once the limit has passed.
    node.stop().await?;
    tokio::time::sleep(max_staleness + Duration::from_millis(1500)).await;
    let stale = follower.current(max_staleness).expect_err("fresh with the store gone");
    assert!(matches!(stale, policy_store::client::StalePolicy::Stale { version: 1, .. }), "{stale}");
    Ok(())
}
