//! A three-node cluster in one process: raft RPCs over tonic between real listeners.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use policy_store::client::{AdminClient, ClientError, PolicyClient, StalePolicy, follow};
use policy_store::{ClientTls, PolicyStoreConfig, StoreError};
use testkit::pki::{Pki, make_pki};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TOKEN: &str = "test-admin-token";
const READ: &str = "test-read-token";

struct Node {
    id: u64,
    endpoint: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StoreError>>,
}

async fn start_cluster(dirs: &[tempfile::TempDir]) -> anyhow::Result<Vec<Node>> {
    start_cluster_with(dirs, None).await
}

/// [`start_cluster`], serving TLS with `pki`'s certificate (every node the same one, made for
/// 127.0.0.1) and checking peers against its CA.
async fn start_cluster_with(dirs: &[tempfile::TempDir], pki: Option<&Pki>) -> anyhow::Result<Vec<Node>> {
    let mut listeners = Vec::new();
    for _ in dirs {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let addrs: Vec<String> =
        listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for (i, (listener, dir)) in listeners.into_iter().zip(dirs).enumerate() {
        let id = i as u64 + 1;
        let peers: BTreeMap<u64, String> = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, a)| (j as u64 + 1, a.clone()))
            .collect();
        let cfg = PolicyStoreConfig {
            listen: listener.local_addr()?,
            data_dir: dir.path().to_path_buf(),
            node_id: id,
            peers,
            admin_token: Some(TOKEN.into()),
            read_token: Some(READ.into()),
            tls_cert_file: pki.map(|p| p.cert.clone()),
            tls_key_file: pki.map(|p| p.key.clone()),
            tls_ca_file: pki.map(|p| p.ca.clone()),
            ..PolicyStoreConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(policy_store::run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        let scheme = if pki.is_some() { "https" } else { "http" };
        nodes.push(Node { id, endpoint: format!("{scheme}://{}", addrs[i]), stop, task });
    }
    Ok(nodes)
}

/// The leader some node reports, other than `not` (a leader that was just stopped).
async fn leader_of(nodes: &[Node], not: Option<u64>) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for n in nodes {
            if let Ok(mut admin) = AdminClient::connect(&n.endpoint, TOKEN).await
                && let Ok(status) = admin.status().await
                && status.leader_id != 0
                && Some(status.leader_id) != not
            {
                return Ok(status.leader_id);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader elected within 10s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `op` on `client`, again while it fails as Unavailable (an election may be under way), for up
/// to 10 s.
async fn while_unavailable<T>(
    client: &mut PolicyClient,
    mut op: impl AsyncFnMut(&mut PolicyClient) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match op(client).await {
            Err(e) if Instant::now() < deadline && e.code() == Some(tonic::Code::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

#[tokio::test]
async fn three_nodes_replicate_writes_sent_to_any_node_and_survive_losing_the_leader() -> anyhow::Result<()> {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let mut nodes = start_cluster(&dirs).await?;
    let leader = leader_of(&nodes, None).await?;
    let follower = nodes.iter().find(|n| n.id != leader).context("a follower")?;

    // A write sent to a follower is forwarded to the leader.
    let mut client = PolicyClient::connect(&follower.endpoint, TOKEN).await?;
    let applied =
        while_unavailable(&mut client, async |c| c.apply("defaults: { no_match: deny }\n", "alice").await)
            .await?;
    assert_eq!((applied.version, applied.changed), (1, true));
    // A linearizable read on any node sees it at once, with the read token (forwarded to the
    // leader with the caller's token).
    for n in &nodes {
        let mut c = PolicyClient::connect(&n.endpoint, READ).await?;
        let v = while_unavailable(&mut c, async |c| c.get_linearizable(0).await).await?;
        assert_eq!((v.version, v.author.as_str()), (1, "admin-token:alice"));
    }
    // The read token does not write, on the leader or through a follower.
    for n in &nodes {
        let mut c = PolicyClient::connect(&n.endpoint, READ).await?;
        let refused = c.apply("defaults: { no_match: allow }\n", "mallory").await.expect_err("reader wrote");
        assert_eq!(refused.code(), Some(tonic::Code::PermissionDenied), "{refused}");
    }

    // The admin API refuses a wrong token.
    let mut wrong = AdminClient::connect(&follower.endpoint, "nope").await?;
    assert_eq!(wrong.status().await.expect_err("wrong token").code(), Some(tonic::Code::Unauthenticated));

    // Stop the leader: the other two elect a new one and keep accepting writes.
    let index = nodes.iter().position(|n| n.id == leader).context("leader node")?;
    let old = nodes.remove(index);
    let _ = old.stop.send(());
    tokio::time::timeout(Duration::from_secs(10), old.task).await.context("leader did not stop")???;
    let new_leader = leader_of(&nodes, Some(leader)).await?;
    assert_ne!(new_leader, leader);
    let mut client = PolicyClient::connect(&nodes[0].endpoint, TOKEN).await?;
    let second =
        while_unavailable(&mut client, async |c| c.apply("defaults: { no_match: allow }\n", "bob").await)
            .await?;
    assert_eq!((second.version, second.changed), (2, true));
    let history = while_unavailable(&mut client, async |c| c.history_linearizable().await).await?;
    assert_eq!(
        history.iter().map(|v| v.author.as_str()).collect::<Vec<_>>(),
        vec!["admin-token:alice", "admin-token:bob"]
    );

    for n in nodes {
        let _ = n.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), n.task).await.context("node did not stop")???;
    }
    Ok(())
}

#[tokio::test]
async fn a_follower_of_a_node_cut_off_from_the_majority_goes_stale_and_the_node_ends_its_watch()
-> anyhow::Result<()> {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let mut nodes = start_cluster(&dirs).await?;
    let leader = leader_of(&nodes, None).await?;
    let mut client = PolicyClient::connect(&nodes[0].endpoint, TOKEN).await?;
    while_unavailable(&mut client, async |c| c.apply("defaults: { no_match: deny }\n", "alice").await)
        .await?;

    // A proxy that reaches only one node, a raft follower (it confirms through the leader's read
    // index; a leader cut off fails its own quorum round the same way).
    let cut_off = nodes.remove(nodes.iter().position(|n| n.id != leader).context("a follower")?);
    let max_staleness = Duration::from_secs(2);
    let follower = follow(vec![cut_off.endpoint.clone()], READ)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while follower.current(max_staleness).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the follower never got version 1 and a heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With the cluster whole, heartbeats keep it fresh though no version is applied for three
    // times the staleness limit.
    let until = Instant::now() + 3 * max_staleness;
    while Instant::now() < until {
        let current = follower.current(max_staleness).map(|p| p.version);
        assert_eq!(current, Ok(1), "stale while the node was part of the majority");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Cut the node off: the other two are gone, it still serves its state machine.
    for n in nodes {
        let _ = n.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), n.task).await.context("node did not stop")???;
    }
    let cut = Instant::now();
    let stale = loop {
        match follower.current(max_staleness) {
            Err(e) => break e,
            Ok(_) => {
                anyhow::ensure!(
                    cut.elapsed() < max_staleness + Duration::from_secs(4),
                    "the follower of a cut-off node still looks fresh after {:?}",
                    cut.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(matches!(stale, StalePolicy::Stale { version: 1, .. }), "{stale}");
    // The node still answers reads from its own state, but serves no Watch once it has not been
    // confirmed for 5 s, saying why.
    let mut reader = PolicyClient::connect(&cut_off.endpoint, READ).await?;
    assert_eq!(reader.get(0).await?.version, 1);
    tokio::time::sleep((cut + Duration::from_secs(6)).saturating_duration_since(Instant::now())).await;
    let refused = match reader.watch_events(1).await {
        Err(e) => e,
        Ok(mut events) => {
            let status = loop {
                match tokio::time::timeout(Duration::from_secs(5), events.message()).await? {
                    Ok(Some(_)) => continue,
                    Ok(None) => anyhow::bail!("the watch ended without an error"),
                    Err(status) => break status,
                }
            };
            ClientError::from(status)
        }
    };
    assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
    assert!(refused.to_string().contains("cannot reach a raft quorum"), "{refused}");
    assert!(follower.current(max_staleness).is_err());

    let _ = cut_off.stop.send(());
    tokio::time::timeout(Duration::from_secs(10), cut_off.task)
        .await
        .context("the cut-off node did not stop")???;
    Ok(())
}

#[tokio::test]
async fn a_cluster_serves_tls_between_its_nodes_and_to_clients_that_trust_its_ca() -> anyhow::Result<()> {
    testkit::init_crypto();
    let certs = tempfile::tempdir()?;
    let pki = make_pki(certs.path(), "store");
    let wrong = make_pki(certs.path(), "wrong");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let nodes = start_cluster_with(&dirs, Some(&pki)).await?;
    let tls = ClientTls::new(Some(&pki.ca))?;
    // An election needs the peers' votes: raft RPCs go over TLS. Then a write sent to a
    // follower is forwarded to the leader over TLS, and every node reads it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let mut found = None;
        for n in &nodes {
            if let Ok(mut admin) = AdminClient::connect_with(&n.endpoint, TOKEN, &tls).await
                && let Ok(status) = admin.status().await
                && status.leader_id != 0
            {
                found = Some(status.leader_id);
            }
        }
        match found {
            Some(id) => break id,
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            None => anyhow::bail!("no leader elected over TLS within 10s"),
        }
    };
    let follower = nodes.iter().find(|n| n.id != leader).context("a follower")?;
    let mut client = PolicyClient::connect_with(&follower.endpoint, TOKEN, &tls).await?;
    let applied =
        while_unavailable(&mut client, async |c| c.apply("defaults: { no_match: deny }\n", "alice").await)
            .await?;
    assert_eq!(applied.version, 1);
    for n in &nodes {
        let mut c = PolicyClient::connect_with(&n.endpoint, READ, &tls).await?;
        assert_eq!(while_unavailable(&mut c, async |c| c.get_linearizable(0).await).await?.version, 1);
    }
    // A proxy follows over TLS.
    let follower_of = policy_store::client::follow_with(vec![nodes[0].endpoint.clone()], READ, tls.clone())?;
    let mut policy = follower_of.policy.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.version == 1)),
    )
    .await
    .context("the follower did not get version 1 over TLS")??;

    // No TLS, a CA that did not sign the certificate, the system's roots: no answer, and the
    // token is never sent in clear.
    let plain = nodes[0].endpoint.replace("https://", "http://");
    let refused = match PolicyClient::connect(&plain, READ).await {
        Ok(mut c) => c.get(0).await.map(|_| ()).expect_err("a plaintext call was answered"),
        Err(e) => e,
    };
    assert!(!matches!(refused, ClientError::Server(ref s) if s.code() == tonic::Code::Ok), "{refused}");
    for tls in [ClientTls::new(Some(&wrong.ca))?, ClientTls::default()] {
        let failed = match PolicyClient::connect_with(&nodes[0].endpoint, READ, &tls).await {
            Ok(mut c) => c.get(0).await.map(|_| ()).expect_err("an unverified node was trusted"),
            Err(e) => e,
        };
        assert!(matches!(failed, ClientError::Connect { .. }), "{failed:?}");
    }
    for n in nodes {
        let _ = n.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), n.task).await.context("node did not stop")???;
    }
    Ok(())
}

#[tokio::test]
async fn tls_settings_that_cannot_work_stop_the_node_with_a_clear_error() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    let pki = make_pki(certs.path(), "store");
    let dir = tempfile::tempdir()?;
    let base = PolicyStoreConfig {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(TOKEN.into()),
        ..PolicyStoreConfig::default()
    };
    let cases = [
        (PolicyStoreConfig { tls_cert_file: Some(pki.cert.clone()), ..base.clone() }, "go together"),
        (
            PolicyStoreConfig {
                tls_cert_file: Some(pki.cert.clone()),
                tls_key_file: Some(certs.path().join("missing.key")),
                ..base.clone()
            },
            "tls_key_file",
        ),
        (PolicyStoreConfig { tls_ca_file: Some(pki.ca.clone()), ..base.clone() }, "tls_ca_file"),
    ];
    for (cfg, expected) in cases {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let e = policy_store::run(cfg, listener, std::future::pending()).await.expect_err("started");
        assert!(e.to_string().contains(expected), "{e}");
    }
    Ok(())
}
