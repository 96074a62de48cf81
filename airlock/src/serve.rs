//! Running components: each alone (split deployment) or all together (`airlock up`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use eventbus::EventBus;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::info;

use crate::admin::{self, Component};
use crate::config::AirlockConfig;

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    info!("shutting down");
}

/// Where a client in this process reaches the store listening at `addr`.
fn store_url(cfg: &AirlockConfig, addr: SocketAddr) -> String {
    let scheme = if cfg.policy_store.tls_cert_file.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn nats(cfg: &AirlockConfig) -> anyhow::Result<EventBus> {
    EventBus::connect_nats(&cfg.nats).await.context("connecting to NATS")
}

pub(crate) async fn proxy(cfg: AirlockConfig, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let token = cfg.proxy.policy_store_token().map_err(anyhow::Error::msg)?;
    let bus = nats(&cfg).await?;
    let tls = policy_store::ClientTls::new(cfg.proxy.policy_store_ca_file.as_deref())?;
    let follower = policy_store::client::follow_with(cfg.proxy.policy_store.clone(), &token, tls)?;
    let ready = admin::proxy_readiness(follower.clone(), cfg.proxy.policy_max_staleness);
    admin::serve(&cfg.admin, Component::Proxy, metrics, ready).await?;
    let listener = bind(cfg.proxy.listen, "postgres").await?;
    proxy_node::run(cfg.proxy.clone(), bus, follower, listener, shutdown_signal()).await?;
    Ok(())
}

pub(crate) async fn approvals(cfg: AirlockConfig, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let bus = nats(&cfg).await?;
    admin::serve(&cfg.admin, Component::Approvals, metrics, admin::always()).await?;
    let acfg = cfg.approvals();
    let listener = bind(acfg.listen, "approvals").await?;
    approval_service::run(acfg, bus, listener, shutdown_signal()).await?;
    Ok(())
}

pub(crate) async fn recorder(cfg: AirlockConfig, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let bus = nats(&cfg).await?;
    admin::serve(&cfg.admin, Component::Recorder, metrics, admin::always()).await?;
    let store = recorder::open_store(&cfg.storage()).context("opening the recordings store")?;
    recorder::run(cfg.recorder(), bus, store, shutdown_signal()).await?;
    Ok(())
}

pub(crate) async fn policy_store(cfg: AirlockConfig, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let listener = bind(cfg.policy_store.listen, "policy-store").await?;
    admin::serve(&cfg.admin, Component::PolicyStore, metrics, admin::always()).await?;
    let endpoint = store_url(&cfg, listener.local_addr()?);
    let tls = cfg.policy_store.client_tls()?;
    // Without an admin token the store refuses to start (below); the publisher reads with the
    // read token, else the admin token.
    let token = cfg.policy_store.reader_token().context("reading policy_store.read_token_file")?;
    // Publish every committed version to NATS, so the archive shows who changed what.
    let nats = cfg.nats.clone();
    let publisher = tokio::spawn(async move {
        let Some(token) = token else { return };
        let bus = loop {
            match EventBus::connect_nats(&nats).await {
                Ok(b) => break b,
                Err(e) => {
                    tracing::warn!(error = %e, "policy events wait for NATS");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        policy_store::publish::publish_versions(endpoint, tls, token, bus, std::future::pending()).await;
    });
    let result = policy_store::run(cfg.policy_store.clone(), listener, shutdown_signal()).await;
    publisher.abort();
    result?;
    Ok(())
}

/// A token of `airlock up`, made once and kept in the data folder as `name` (mode 0600): the
/// admin token (`admin-token`: the approval service's break-glass token and the policy store's
/// admin token) and the policy store's read token (`policy-read-token`).
fn token_file(data_dir: &Path, name: &str, prefix: &str) -> anyhow::Result<PathBuf> {
    let path = data_dir.join(name);
    if !path.exists() {
        let token = format!("{prefix}_{}", hex::encode(rand::random::<[u8; 24]>()));
        std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(path)
}

/// Everything in one process.
pub(crate) async fn up(
    mut cfg: AirlockConfig,
    metrics: PrometheusHandle,
    data_dir: PathBuf,
    policy: Option<PathBuf>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    cfg.policy_store.data_dir = data_dir.join("policy-store");
    let mut storage = cfg.storage();
    if cfg.storage.is_none() {
        let dir = data_dir.join("recordings");
        std::fs::create_dir_all(&dir)?;
        storage.url = format!("file://{}", dir.display());
    }
    let mut acfg = cfg.approvals();
    if acfg.admin_token.is_none() && acfg.admin_token_file.is_none() {
        acfg.admin_token_file = Some(token_file(&data_dir, "admin-token", "adm")?);
    }
    // The store's tokens: configured, or kept in the data folder. The proxy, the approval
    // service and the event publisher read with the read token; `-f` applies with the admin
    // token, as `airlock policy apply` does (it falls back to ./data/admin-token).
    let store = &mut cfg.policy_store;
    if store.admin_token.is_none() && store.admin_token_file.is_none() {
        store.admin_token_file = Some(token_file(&data_dir, "admin-token", "adm")?);
    }
    if store.read_token.is_none() && store.read_token_file.is_none() {
        store.read_token_file = Some(token_file(&data_dir, "policy-read-token", "rd")?);
    }
    let store_admin = cfg.policy_store.token().context("reading policy_store.admin_token_file")?;
    let store_admin = store_admin.context("policy_store.admin_token")?;
    let store_read = cfg.policy_store.reader_token().context("reading policy_store.read_token_file")?;
    let store_read = store_read.context("policy_store.read_token")?;
    anyhow::ensure!(
        cfg.recorder().shard == recorder::Shard::ALL,
        "recorder.shard is {}: `airlock up` runs the only recorder, so it must record every session (\"0/1\")",
        cfg.recorder().shard
    );
    let bus = EventBus::memory();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Consumers first, so the in-process bus delivers every event to them.
    let store = recorder::open_store(&storage).context("opening the recordings store")?;
    let recorder = tokio::spawn(recorder::run(cfg.recorder(), bus.clone(), store, stopped()));
    let ps_listener = bind(cfg.policy_store.listen, "policy-store").await?;
    let ps_addr = ps_listener.local_addr()?;
    // The in-process parts reach the store as any client does: over TLS when it serves TLS.
    let endpoint = store_url(&cfg, ps_addr);
    let store_tls = cfg.policy_store.client_tls()?;
    let approvals_listener = bind(acfg.listen, "approvals").await?;
    // The approval service follows the in-process store: rule routes and `approver_groups`.
    let approvals_policy =
        policy_store::client::follow_with(vec![endpoint.clone()], &store_read, store_tls.clone())?.policy;
    let approvals = tokio::spawn(approval_service::run_with_policy(
        acfg.clone(),
        bus.clone(),
        Some(approvals_policy),
        approvals_listener,
        stopped(),
    ));

    let ps = tokio::spawn(policy_store::run(cfg.policy_store.clone(), ps_listener, stopped()));
    if let Some(path) = policy {
        let yaml = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut client = connect_retrying(&endpoint, &store_admin, &store_tls).await?;
        let r = client
            .apply(&yaml, "airlock up")
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        info!(policy.version = r.version, changed = r.changed, "policy applied");
    }
    let publisher = tokio::spawn(policy_store::publish::publish_versions(
        endpoint.clone(),
        store_tls.clone(),
        store_read.clone(),
        bus.clone(),
        std::future::pending(),
    ));
    let follower = policy_store::client::follow_with(vec![endpoint], &store_read, store_tls)?;
    let ready = admin::proxy_readiness(follower.clone(), cfg.proxy.policy_max_staleness);
    let admin_addr = admin::serve(&cfg.admin, Component::Up, metrics, ready).await?;
    let proxy_listener = bind(cfg.proxy.listen, "postgres").await?;
    info!(
        postgres = %cfg.proxy.listen,
        approvals = %acfg.listen,
        policy_store = %ps_addr,
        admin = ?admin_addr,
        data = %data_dir.display(),
        "airlock is up"
    );
    let proxy = proxy_node::run(cfg.proxy.clone(), bus, follower, proxy_listener, shutdown_signal());
    let result = proxy.await;
    publisher.abort();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = recorder.await;
        let _ = approvals.await;
        let _ = ps.await;
    })
    .await;
    result.map_err(Into::into)
}

/// The store may still be starting: retry for a few seconds.
pub(crate) async fn connect_retrying(
    endpoint: &str,
    token: &str,
    tls: &policy_store::ClientTls,
) -> anyhow::Result<policy_store::client::PolicyClient> {
    let mut last = None;
    for _ in 0..50 {
        match policy_store::client::PolicyClient::connect_with(endpoint, token, tls).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!(
        "cannot reach the policy store at {endpoint}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}
