//! The admin port of every component (`[admin]`): Prometheus metrics (`GET /metrics`), liveness
//! (`GET /healthz`: the process serves) and readiness (`GET /readyz`: the component can do its
//! work; a proxy, for one, only once it enforces a policy version that is not stale).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tokio::net::TcpListener;

/// `[admin]`. Each component has its own default port, so that several run on one host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminConfig {
    /// Serve the admin port. Default true.
    #[serde(default = "enabled")]
    pub(crate) enabled: bool,
    /// Where. Default: 127.0.0.1 and the component's port ([`Component::default_port`]); when
    /// that is taken, the component runs without an admin port (with a warning), while a
    /// configured address that cannot be bound stops it.
    #[serde(default)]
    pub(crate) listen: Option<SocketAddr>,
}

fn enabled() -> bool {
    true
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { enabled: true, listen: None }
    }
}

/// Which component a process runs, for its default admin port.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Component {
    Up,
    Proxy,
    Approvals,
    Recorder,
    PolicyStore,
}

impl Component {
    fn default_port(self) -> u16 {
        match self {
            Component::Up => 17090,
            Component::Proxy => 17091,
            Component::Approvals => 17092,
            Component::Recorder => 17093,
            Component::PolicyStore => 17094,
        }
    }
}

/// Whether the component can do its work now: `Err` says why not.
pub(crate) type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Statement durations, in seconds: from a cached read to a long report.
const DURATION_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Install the process's metrics recorder. Call before any component starts: what records
/// metrics before it goes nowhere.
pub(crate) fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("airlock_statement_duration_seconds".into()), DURATION_BUCKETS)?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Bind the admin port of `component` as `cfg` says (`None` when disabled) and serve it in the
/// background with `ready` as the readiness check.
pub(crate) async fn serve(
    cfg: &AdminConfig,
    component: Component,
    metrics: PrometheusHandle,
    ready: Readiness,
) -> anyhow::Result<Option<SocketAddr>> {
    if !cfg.enabled {
        return Ok(None);
    }
    let addr = cfg.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], component.default_port())));
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        // The default port taken (another component on this host): the component still runs.
        Err(e) if cfg.listen.is_none() => {
            tracing::warn!(listen = %addr, error = %e, "admin port not served: set admin.listen");
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("binding the admin listener on {addr}")),
    };
    let addr = listener.local_addr()?;
    // Histograms keep recent samples until upkeep folds them in.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(PrometheusHandle, Readiness)>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State((_, ready)): State<(PrometheusHandle, Readiness)>| async move {
                match ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                }
            }),
        )
        .with_state((metrics, ready));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the admin listener stopped");
        }
    });
    tracing::info!(listen = %addr, "admin port serving /metrics, /healthz and /readyz");
    Ok(Some(addr))
}

/// Always ready: the component has no state that could make it unable to work.
pub(crate) fn always() -> Readiness {
    Arc::new(|| Ok(()))
}

/// A proxy is ready while it enforces a policy version that is not stale; meanwhile its gauges
/// show the version and how long ago the store was last reached.
pub(crate) fn proxy_readiness(
    follower: policy_store::client::Follower,
    max_staleness: Duration,
) -> Readiness {
    let version = metrics::gauge!("airlock_policy_version");
    let contact_age = metrics::gauge!("airlock_policy_contact_age_seconds");
    let watched = follower.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            if let Some(p) = watched.policy.borrow().as_ref() {
                version.set(p.version as f64);
            }
            if let Some(at) = watched.last_contact() {
                contact_age.set(at.elapsed().as_secs_f64());
            }
        }
    });
    Arc::new(move || follower.current(max_staleness).map(|_| ()).map_err(|e| e.to_string()))
}
