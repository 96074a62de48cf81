//! The harness the approval service's integration tests share: the service on a free port, the
//! bus, hold requests published as a proxy would, and the decisions and Slack posts they wait for.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use approval_service::client::ApprovalsClient;
use approval_service::config::{ApproverEntry, SlackConfig};
use approval_service::slack::fake::{self, FakeSlack};
use approval_service::{ApprovalError, ApprovalsConfig};
use eventbus::{EventBus, NatsConfig, Subscription};
use policy_store::client::ActivePolicy;
use proto::events::{
    ApproverSpec, Envelope, Event, HoldDecision, HoldRequest, Principal, SessionId, Timestamp,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub(crate) const TOKEN: &str = "test-admin-token";
pub(crate) const SECRET: &str = "slack-signing-secret";
pub(crate) const CHANNEL: &str = "C_APPROVALS";
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// A policy whose hold rule names `dba` as its approvers.
pub(crate) const DBA_RULE: &str =
    "rules:\n  - name: writes-need-approval\n    action: hold\n    approvers: { groups: [dba] }\n";

/// What tells a running service to stop.
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An approval service running on a free loopback port.
pub(crate) struct Service {
    pub(crate) url: String,
    admin_token: Option<String>,
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<Result<(), ApprovalError>>,
}

impl Service {
    /// Starts `run_with_policy`, with `policy` (YAML) as its active policy if given.
    pub(crate) async fn start(
        bus: EventBus,
        cfg: ApprovalsConfig,
        policy: Option<&str>,
    ) -> anyhow::Result<Service> {
        let (keep, policy) = match policy {
            Some(yaml) => {
                let document = proto::policy::parse(yaml)?;
                let active = ActivePolicy { version: 1, document, digest: String::new() };
                let (tx, rx) = watch::channel(Some(Arc::new(active)));
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Self::spawn(cfg, move |cfg, listener, shutdown| {
            approval_service::run_with_policy(cfg, bus, policy, listener, async move {
                // The policy's sender lives as long as the service.
                let _keep = keep;
                shutdown.await;
            })
        })
        .await
    }

    /// Starts `approval_service::run` (no policy store configured, so no policy).
    pub(crate) async fn start_plain(bus: EventBus, cfg: ApprovalsConfig) -> anyhow::Result<Service> {
        Self::spawn(cfg, move |cfg, listener, shutdown| approval_service::run(cfg, bus, listener, shutdown))
            .await
    }

    /// Binds a free port and spawns `run` on it, stopped by [`Service::stop`].
    async fn spawn<F, Fut>(cfg: ApprovalsConfig, run: F) -> anyhow::Result<Service>
    where
        F: FnOnce(ApprovalsConfig, TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), ApprovalError>> + Send + 'static,
    {
        testkit::init_crypto();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let admin_token = cfg.admin_token.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(
            cfg,
            listener,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        ));
        Ok(Service { url, admin_token, stop, task })
    }

    /// A client with the configured admin token.
    pub(crate) fn client(&self) -> ApprovalsClient {
        ApprovalsClient::new(&self.url, self.admin_token.as_deref().expect("an admin token is configured"))
    }

    /// Stops the service and waits for `run` to return cleanly.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task).await.context("service did not stop")??.context("run failed")
    }

    /// POST a Slack callback with the given timestamp and signature headers.
    pub(crate) async fn callback(
        &self,
        body: &str,
        ts: Option<&str>,
        sig: Option<&str>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let mut req = reqwest::Client::new()
            .post(format!("{}/slack/interactions", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string());
        if let Some(ts) = ts {
            req = req.header("x-slack-request-timestamp", ts);
        }
        if let Some(sig) = sig {
            req = req.header("x-slack-signature", sig);
        }
        let resp = req.send().await?;
        Ok((resp.status(), resp.text().await?))
    }

    /// POST a correctly signed Slack callback.
    pub(crate) async fn signed(&self, body: &str) -> anyhow::Result<(StatusCode, String)> {
        let ts = fake::now_ts();
        self.callback(body, Some(&ts), Some(&fake::sign(SECRET, &ts, body))).await
    }
}

/// An `[[approvals.approvers]]` entry.
pub(crate) fn entry(
    name: &str,
    email: Option<&str>,
    slack_user: Option<&str>,
    groups: &[&str],
) -> ApproverEntry {
    ApproverEntry {
        name: name.into(),
        email: email.map(str::to_string),
        slack_user: slack_user.map(str::to_string),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

/// Slack settings pointing at `slack`, signed with [`SECRET`], posting to [`CHANNEL`].
pub(crate) fn slack_config(slack: &FakeSlack) -> SlackConfig {
    SlackConfig {
        bot_token: Some("xoxb-test".into()),
        bot_token_file: None,
        signing_secret: Some(SECRET.into()),
        signing_secret_file: None,
        api_url: slack.api_url.clone(),
        default_channel: Some(CHANNEL.into()),
        team_id: Some("T0001".into()),
    }
}

/// The approvers' OIDC settings for `oidc`.
pub(crate) fn oidc_config(oidc: &testkit::OidcIssuer) -> proxy_node::identity::OidcConfig {
    let mut c = proxy_node::identity::OidcConfig::for_issuer(&oidc.issuer);
    c.audience = oidc.audience.clone();
    c
}

/// A token with a verified `email` claim.
pub(crate) fn token_with_email(
    oidc: &testkit::OidcIssuer,
    sub: &str,
    email: &str,
    groups: &[&str],
) -> String {
    let mut claims = oidc.claims(sub, groups);
    claims["email"] = email.into();
    claims["email_verified"] = true.into();
    oidc.token_with(claims)
}

/// A bus on `nats`.
pub(crate) async fn nats_bus(nats: &testkit::Nats) -> anyhow::Result<EventBus> {
    testkit::init_crypto();
    Ok(EventBus::connect_nats(&NatsConfig { url: nats.url.clone(), ..Default::default() }).await?)
}

/// `agent-7`'s `DELETE` on `shop`, held for `min` approvals of `dba`, requested now.
pub(crate) fn hold_request(timeout: Duration, min: u32) -> HoldRequest {
    hold_request_at(Timestamp::now(), timeout, min)
}

/// [`hold_request`], requested at `requested_at`.
pub(crate) fn hold_request_at(requested_at: Timestamp, timeout: Duration, min: u32) -> HoldRequest {
    HoldRequest {
        requester_email: None,
        hold_id: Uuid::now_v7(),
        seq: 3,
        connection: "shop".into(),
        principal: Principal {
            subject: "agent-7".into(),
            groups: vec!["agents".into()],
            kind: "oidc".into(),
        },
        statement: "DELETE FROM orders WHERE id = 42".into(),
        parameters: vec![],
        fingerprint: "f00d".into(),
        rule: "writes-need-approval".into(),
        reason: "delete on orders".into(),
        approvers: ApproverSpec { groups: vec!["dba".into()], min },
        requested_at,
        expires_at: requested_at.plus(timeout),
    }
}

/// Publish a hold request as a proxy would; returns its session.
pub(crate) async fn request_hold(bus: &EventBus, req: &HoldRequest) -> anyhow::Result<SessionId> {
    let session = Uuid::now_v7();
    bus.publish(&Envelope::new(session, Event::HoldRequested(Box::new(req.clone())))).await?;
    Ok(session)
}

/// The first decision for `hold` seen on `sub`, with its envelope; no timeout (for the paused
/// clock, whose auto-advance would fire one).
pub(crate) async fn next_decision(
    sub: &mut Subscription,
    hold: Uuid,
) -> anyhow::Result<(Envelope, HoldDecision)> {
    while let Some(env) = sub.next().await {
        if let Event::HoldDecided(d) = &env.event
            && d.hold_id == hold
        {
            let d = d.clone();
            return Ok((env, d));
        }
    }
    bail!("the bus closed")
}

/// [`next_decision`], within `within`.
pub(crate) async fn decision_within(
    sub: &mut Subscription,
    hold: Uuid,
    within: Duration,
) -> anyhow::Result<(Envelope, HoldDecision)> {
    tokio::time::timeout(within, next_decision(sub, hold)).await.context("no decision in time")?
}

/// The first decision for `hold` seen on `sub` within `within`.
pub(crate) async fn decision_for(
    sub: &mut Subscription,
    hold: Uuid,
    within: Duration,
) -> anyhow::Result<HoldDecision> {
    Ok(decision_within(sub, hold, within).await?.1)
}

/// Asserts that no decision for `hold` arrives on `sub` within `within`.
pub(crate) async fn no_decision_for(sub: &mut Subscription, hold: Uuid, within: Duration) {
    let r = decision_for(sub, hold, within).await;
    assert!(r.is_err(), "unexpected decision: {r:?}");
}

/// Waits until `client` (an approver) sees the hold.
pub(crate) async fn visible(client: &ApprovalsClient, id: Uuid) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get(id).await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "hold {id} never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The hold's message, once posted.
pub(crate) async fn posted(slack: &FakeSlack, hold: Uuid) -> Value {
    slack
        .wait_for("chat.postMessage", WAIT, |b| b.to_string().contains(&hold.to_string()))
        .await
        .expect("the hold was posted to Slack")
        .body
}
