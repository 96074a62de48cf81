//! The approval service: consumes hold requests from the event bus, asks approvers (Slack,
//! REST with OIDC tokens, webhooks), and turns their answers into decisions
//! ([`proto::events::Event::HoldDecided`]); expires holds nobody answers.
//!
//! Exactly once, across replicas and restarts: every hold is a record in a shared store (a
//! JetStream key-value bucket on NATS) and every vote a compare-and-set on it, so each hold is
//! decided once and posted to Slack once, whichever replica a click reaches. Hold requests come
//! through the shared durable consumer `approvals`; a delivery is acked only once its hold is
//! decided and published, so a killed replica's holds are redelivered to the others (or to it,
//! restarted), which find the record, republish a decision that was stored but not published
//! (same event id, deduplicated) and expire what is due.
//!
//! # Layout
//! - [`config`]: `[approvals]`: listen, tokens, OIDC, approvers, Slack, webhooks.
//! - [`store`]: hold records and compare-and-set (KV bucket or in-process).
//! - [`approver`]: who is a known approver, and which person (for self-approval and `min`).
//! - [`hold`]: who decides ([`hold::Decider`]), votes and `min`, publishing decisions.
//! - [`routes`]: a rule's Slack channel, webhook and grant limit, from the policy.
//! - [`slack`]: the Slack bot: Block Kit posts, the deny modal, signed interactivity callbacks.
//! - [`webhook`]: signed outgoing webhooks with retries.
//! - [`grant`]: just-in-time access grants.
//! - `intake`: the bus consumers: hold requests in, decisions made elsewhere.
//! - `expiry`: expires holds nobody answered in time.
//! - [`api`]: the REST API (axum) and its JSON types, shared with [`client`].
//! - [`client`]: the REST client used by `airlock approvals list|show|approve|deny`.
//! - [`error`]: the service's error types.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod api;
pub mod approver;
pub mod client;
pub mod config;
pub mod error;
mod expiry;
pub mod grant;
pub mod hold;
mod intake;
pub mod routes;
pub mod slack;
pub mod store;
pub mod webhook;

pub use config::ApprovalsConfig;
pub use error::{ApprovalError, HoldError};

use crate::hold::{Holds, Notice};
use crate::routes::{PolicyWatch, Routes};
use crate::slack::Slack;
use crate::webhook::Webhooks;

/// Run the approval service until `shutdown` completes: consume hold requests and decisions from
/// `bus`, expire holds, post to Slack, and serve the REST API and Slack callbacks on `listener`.
/// Rule settings come from the policy stores in `cfg.policy_store`, if any, read with
/// `cfg.policy_store_token` (required with them).
///
/// On shutdown, undecided holds are left unacked, so another replica (or this one, restarted)
/// gets them redelivered.
pub async fn run(
    cfg: ApprovalsConfig,
    bus: eventbus::EventBus,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApprovalError> {
    let policy = match cfg.policy_store_token()? {
        Some(token) if !cfg.policy_store.is_empty() => {
            let tls = policy_store::ClientTls::new(cfg.policy_store_ca_file.as_deref())
                .map_err(ApprovalError::Follow)?;
            Some(
                policy_store::client::follow_with(cfg.policy_store.clone(), &token, tls)
                    .map_err(ApprovalError::Follow)?
                    .policy,
            )
        }
        _ => None,
    };
    run_with_policy(cfg, bus, policy, listener, shutdown).await
}

/// [`run`], reading rule settings from `policy` (tests and embedders pass their own).
pub async fn run_with_policy(
    cfg: ApprovalsConfig,
    bus: eventbus::EventBus,
    policy: Option<PolicyWatch>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApprovalError> {
    let token = cfg.admin_token()?.map(Arc::<str>::from);
    // Whoever loaded `cfg` (the `airlock` binary fills `oidc` from `[proxy.oidc]`), an approver's
    // token is checked as strictly as an agent's: pinned public-key algorithms, an http(s) issuer.
    if let Some(o) = &cfg.oidc {
        o.validate().map_err(ApprovalError::Oidc)?;
    }
    let oidc = cfg.oidc.clone().map(|c| Arc::new(proxy_node::identity::OidcVerifier::new(c)));
    let slack = match &cfg.slack {
        Some(s) => Some(Arc::new(Slack::from_config(s, &cfg.approvers)?)),
        None => None,
    };
    let webhooks = Webhooks::from_config(&cfg.webhooks)?;
    let store = match &bus {
        eventbus::EventBus::Nats(n) => store::Store::nats(n.client().clone()).await?,
        eventbus::EventBus::Memory(_) => store::Store::memory(),
    };
    let routes = Routes::new(policy, cfg.slack.as_ref().and_then(|s| s.default_channel.clone()));
    // Subscribe to decisions before consuming requests, so no decision for a fetched hold is missed.
    let decisions = bus.subscribe(proto::subjects::HOLD_DECIDED).await?;
    let durable = bus.durable(proto::subjects::APPROVALS_DURABLE, proto::subjects::HOLD_REQUESTED).await?;
    let (holds, notices) = Holds::new(bus, store, routes);
    let holds = Arc::new(holds);
    let stop = CancellationToken::new();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(intake::consume_requests(holds.clone(), durable, stop.clone()));
    tasks.spawn(intake::watch_decisions(holds.clone(), decisions, stop.clone()));
    tasks.spawn(intake::keep_alive(holds.clone(), stop.clone()));
    tasks.spawn(expiry::run(holds.clone(), stop.clone()));
    tasks.spawn(notify(holds.clone(), slack.clone(), webhooks, notices, stop.clone()));

    let addr = listener.local_addr().ok();
    info!(listen = ?addr, slack = slack.is_some(), oidc = oidc.is_some(), "approval service listening");
    let directory = Arc::new(approver::Directory::new(&cfg.approvers));
    let mut router = api::router(holds.clone(), token, oidc, directory);
    if let Some(s) = &slack {
        router = router.merge(slack::router(holds, s.clone()));
    }
    let serve_stop = stop.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown => {}
                () = serve_stop.cancelled() => {}
            }
        })
        .await;
    stop.cancel();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "approval service task ended abnormally");
        }
    }
    info!("approval service stopped");
    served.map_err(ApprovalError::Serve)
}

/// How long a notice waits for the first policy version (to find its rule's channel).
const POLICY_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Tell Slack and webhooks what happened, each notice in its own task (off the decision path).
async fn notify(
    holds: Arc<Holds>,
    slack: Option<Arc<Slack>>,
    webhooks: Webhooks,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    stop: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            n = notices.recv() => match n { Some(n) => n, None => return },
        };
        let holds = holds.clone();
        let slack = slack.clone();
        let webhooks = webhooks.clone();
        tokio::spawn(async move {
            let (rec, event) = match &notice {
                Notice::Created(r) => (r, Some("hold.created")),
                Notice::Resumed(r) => (r, None),
                Notice::Decided(r) => (r, Some("hold.decided")),
            };
            holds.routes().ready(POLICY_WAIT).await;
            let route = holds.routes().for_rule(&rec.request.rule);
            if let (Some(name), Some(event)) = (&route.webhook, event) {
                webhooks.fire(name, event, rec);
            }
            let Some(slack) = slack else { return };
            match &notice {
                Notice::Created(r) | Notice::Resumed(r) => {
                    if let Some(channel) = &route.channel {
                        slack::post_hold(&holds, &slack, r.id(), channel).await;
                    }
                }
                Notice::Decided(r) => slack::show_outcome(&holds, &slack, r.id()).await,
            }
        });
    }
}
