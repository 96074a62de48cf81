//! The proxy node: it accepts agents' connections, authenticates them, parses and decides every
//! statement, holds the ones that need a human, relays the rest to the target with the
//! gateway's own credentials, and publishes every event of the session to the event bus.
//!
//! It is stateless: policies arrive from the policy store over a gRPC watch stream, events go
//! to the bus, and any number of nodes can run behind a TCP load balancer.
//!
//! # Layout
//! - [`wire`]: sans-I/O codecs (the Postgres v3 protocol).
//! - [`identity`]: OIDC token and API key authentication.
//! - [`policy`]: statement classification and rule evaluation.
//! - [`hold`]: statements waiting for a decision.
//! - `journal`: group commit of every session's events to the bus.
//! - [`grant`]: just-in-time access grants followed from the bus.
//! - [`upstream`]: connecting to targets with held credentials.
//! - [`tls`]: TLS to clients and to targets, and the stream that is plain TCP or TLS.
//! - `session`: one client session, from startup to the end.
//! - [`cancel`]: routing CancelRequests to the right target backend.
//! - [`catalog`]: function volatility, result column origins and view definitions from the
//!   target's catalog.
//! - [`mask`]: masking rules of a session and the rewriting of every message carrying data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eventbus::EventBus;
use policy_store::client::ActivePolicy;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub mod cancel;
pub mod catalog;
pub mod grant;
pub mod hold;
pub mod identity;
mod journal;
pub mod mask;
pub mod policy;
pub mod scram;
mod session;
pub mod tls;

/// A hash map for keys that clients choose (statement texts, statement and portal names) and
/// catalog lookups on the per-statement path: ahash, keyed at random per process as std's
/// SipHash is (so colliding keys cannot be worked out in advance), and several times cheaper on
/// short keys.
pub type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
pub mod upstream;
pub mod wire;

pub use identity::OidcConfig;

/// Proxy node settings (`[proxy]` in airlock.toml).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Postgres listener. Default 127.0.0.1:15432.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Policy store gRPC endpoints to follow. Default `["http://127.0.0.1:17070"]`.
    #[serde(default = "default_policy_store")]
    pub policy_store: Vec<String>,
    /// The bearer token to follow the policy store with: its read token (or its admin token).
    /// `airlock proxy` needs it (or the `_file` variant); `airlock up` sets its own. Default none.
    #[serde(default)]
    pub policy_store_token: Option<String>,
    /// A file holding `policy_store_token` (trimmed). Default none.
    #[serde(default)]
    pub policy_store_token_file: Option<String>,
    /// The CA (PEM) that `https://` policy-store endpoints' certificates are checked against.
    /// Default: the system's trusted roots.
    #[serde(default)]
    pub policy_store_ca_file: Option<std::path::PathBuf>,
    /// This node's name in events. Default `proxy-<pid>`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// OIDC issuer for agents' tokens. Default none (API keys only).
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// The largest protocol message accepted, from clients or targets. Default 16 MiB.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Timeout for connecting to and authenticating with a target. Default 10s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Extra time a held statement waits past its rule's timeout for the approval service's
    /// expiry before denying on its own. Default 5s.
    #[serde(default = "default_hold_grace", with = "humantime_serde")]
    pub hold_grace: Duration,
    /// How long the node keeps enforcing its last policy version when the policy store cannot
    /// be reached; past this it refuses every statement and says why. Default 10m.
    #[serde(default = "default_max_staleness", with = "humantime_serde")]
    pub policy_max_staleness: Duration,
    /// How long a client may take from connecting to being authenticated. Default 30s.
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Result rows kept in each response event. Default 1000.
    #[serde(default = "default_capture_rows")]
    pub capture_rows: usize,
    /// A file holding the secret key of the `hash` masking strategy (at least 32 bytes, e.g. 64
    /// hex digits from `airlock keygen`). Every node of a deployment needs the same key for
    /// hashed values to match across nodes. Default none: a random key per process, so hashes
    /// are stable only until the node restarts.
    #[serde(default)]
    pub masking_key_file: Option<String>,
    /// The listener's certificate chain (PEM). Set it with [`ProxyConfig::tls_key_file`] to offer
    /// TLS to clients. Default none: clients that ask for TLS are told to continue in plain text.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    /// The private key of [`ProxyConfig::tls_cert_file`] (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// TLS from clients. Default `allow` when a certificate is configured, else `disable`.
    #[serde(default)]
    pub client_tls: Option<ClientTls>,
    /// The environment variables a policy's `password_env` may name: exact names, or patterns
    /// with one `*`. Default `["*_DB_PASSWORD"]`. Whoever writes policy chooses a connection's
    /// host; these bounds keep the gateway's own secrets from being sent there.
    #[serde(default = "default_password_env")]
    pub target_password_env: Vec<String>,
    /// The folder a policy's `password_file` must be in (symbolic links followed). Default
    /// none: no file is read.
    #[serde(default)]
    pub target_password_dir: Option<String>,
    /// Send a target's password in the clear when it asks so over a connection that is not
    /// `tls: verify-full`. Default false (SCRAM and md5 are unaffected).
    #[serde(default)]
    pub target_cleartext_password: bool,
}

/// TLS from clients (`proxy.client_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    /// Answer every SSLRequest with "no": clients continue in plain text.
    Disable,
    /// TLS for clients that ask for it (`sslmode=prefer` or stronger), plain text for the others.
    Allow,
    /// Refuse clients that do not ask for TLS (CancelRequests excepted, as PostgreSQL does).
    Require,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15432))
}
fn default_policy_store() -> Vec<String> {
    vec!["http://127.0.0.1:17070".into()]
}
fn default_max_message() -> usize {
    16 * 1024 * 1024
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_hold_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_max_staleness() -> Duration {
    Duration::from_secs(600)
}
fn default_auth_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_capture_rows() -> usize {
    1000
}
fn default_password_env() -> Vec<String> {
    vec!["*_DB_PASSWORD".into()]
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            policy_store: default_policy_store(),
            policy_store_token: None,
            policy_store_token_file: None,
            policy_store_ca_file: None,
            node_name: None,
            oidc: None,
            max_message_bytes: default_max_message(),
            connect_timeout: default_connect_timeout(),
            hold_grace: default_hold_grace(),
            auth_timeout: default_auth_timeout(),
            policy_max_staleness: default_max_staleness(),
            capture_rows: default_capture_rows(),
            masking_key_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            client_tls: None,
            target_password_env: default_password_env(),
            target_password_dir: None,
            target_cleartext_password: false,
        }
    }
}

impl ProxyConfig {
    /// The token to follow the policy store with: [`ProxyConfig::policy_store_token`] or the
    /// contents of [`ProxyConfig::policy_store_token_file`] (trimmed); exactly one must be set.
    pub fn policy_store_token(&self) -> Result<String, String> {
        let token = match (&self.policy_store_token, &self.policy_store_token_file) {
            (Some(_), Some(_)) => {
                return Err("set proxy.policy_store_token or proxy.policy_store_token_file, not both".into());
            }
            (None, None) => {
                return Err("set proxy.policy_store_token or proxy.policy_store_token_file: the policy \
                            store's read token, which the proxy follows the store with"
                    .into());
            }
            (Some(t), None) => t.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("proxy.policy_store_token_file {path}: {e}"))?
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            return Err("proxy.policy_store_token: the token is empty".into());
        }
        Ok(token)
    }

    /// The key of the `hash` masking strategy: from [`ProxyConfig::masking_key_file`], or random.
    pub fn masking_key(&self) -> Result<Vec<u8>, String> {
        let Some(path) = &self.masking_key_file else {
            let mut key = Vec::with_capacity(32);
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            return Ok(key);
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("proxy.masking_key_file {path}: {e}"))?;
        let key = text.trim().as_bytes().to_vec();
        if key.len() < 32 {
            return Err(format!("proxy.masking_key_file {path}: the key must be at least 32 bytes"));
        }
        Ok(key)
    }

    /// Where target passwords may be read from ([`upstream::PasswordSources`]).
    pub fn password_sources(&self) -> upstream::PasswordSources {
        upstream::PasswordSources {
            env: self.target_password_env.clone(),
            dir: self.target_password_dir.as_ref().map(std::path::PathBuf::from),
            cleartext: self.target_cleartext_password,
        }
    }

    /// Check the settings at start: limits, the OIDC issuer, and that the TLS certificate and key
    /// (both or neither) are readable, parseable and match.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(o) = &self.oidc {
            o.validate()?;
        }
        if self.max_message_bytes < 1024 {
            return Err("proxy.max_message_bytes must be at least 1024".into());
        }
        if self.policy_store.is_empty() {
            return Err("proxy.policy_store must list at least one endpoint".into());
        }
        if let Some(p) = self.target_password_env.iter().find(|p| p.is_empty() || p.matches('*').count() > 1)
        {
            return Err(format!(
                "proxy.target_password_env: {p:?} must be a variable name, or a pattern with one `*`"
            ));
        }
        if let Some(dir) = &self.target_password_dir
            && !std::path::Path::new(dir).is_dir()
        {
            return Err(format!("proxy.target_password_dir {dir}: not a folder this process can see"));
        }
        self.tls_acceptor()?;
        Ok(())
    }

    /// What the listener does with clients' TLS: the setting, or its default.
    pub fn client_tls(&self) -> ClientTls {
        match (self.client_tls, &self.tls_cert_file) {
            (Some(mode), _) => mode,
            (None, Some(_)) => ClientTls::Allow,
            (None, None) => ClientTls::Disable,
        }
    }

    /// The TLS acceptor for clients, `None` when TLS from clients is disabled. Reads and checks
    /// the certificate and key files.
    pub fn tls_acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        let mode = self.client_tls();
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                let acceptor = tls::acceptor(cert, key)?;
                Ok((mode != ClientTls::Disable).then_some(acceptor))
            }
            (None, None) if mode == ClientTls::Disable => Ok(None),
            (None, None) => Err(format!(
                "proxy.client_tls = \"{}\" needs proxy.tls_cert_file and proxy.tls_key_file",
                if mode == ClientTls::Require { "require" } else { "allow" }
            )),
            (Some(_), None) => {
                Err("proxy.tls_cert_file is set without proxy.tls_key_file: set both or neither".into())
            }
            (None, Some(_)) => {
                Err("proxy.tls_key_file is set without proxy.tls_cert_file: set both or neither".into())
            }
        }
    }

    pub(crate) fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| format!("proxy-{}", std::process::id()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("event bus: {0}")]
    Bus(#[from] eventbus::BusError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
}

/// Where the node's policy comes from.
pub enum PolicySource {
    /// Following the policy store: enforced only while the store was reached within
    /// `policy_max_staleness`.
    Follow(policy_store::client::Follower),
    /// A fixed channel (tests, embedding).
    Fixed(watch::Receiver<Option<Arc<ActivePolicy>>>),
}

impl From<policy_store::client::Follower> for PolicySource {
    fn from(f: policy_store::client::Follower) -> Self {
        Self::Follow(f)
    }
}

impl From<watch::Receiver<Option<Arc<ActivePolicy>>>> for PolicySource {
    fn from(r: watch::Receiver<Option<Arc<ActivePolicy>>>) -> Self {
        Self::Fixed(r)
    }
}

impl Shared {
    /// The policy to enforce now, or why there is none (the client is told).
    pub(crate) fn policy_now(&self) -> Result<Arc<ActivePolicy>, String> {
        match &self.policy {
            PolicySource::Follow(f) => {
                f.current(self.cfg.policy_max_staleness).map_err(|e| format!("airlock: {e}"))
            }
            PolicySource::Fixed(r) => {
                r.borrow().clone().ok_or_else(|| "airlock: no policy has been received yet".to_string())
            }
        }
    }
}

/// What every session of a node shares.
pub(crate) struct Shared {
    pub(crate) cfg: ProxyConfig,
    pub(crate) journal: journal::Journal,
    pub(crate) classifier: policy::cache::ClassifyCache,
    pub(crate) policy: PolicySource,
    pub(crate) auth: identity::Authenticator,
    pub(crate) holds: hold::Holds,
    pub(crate) grants: grant::Grants,
    pub(crate) cancels: cancel::Cancels,
    /// Idle catalog side connections, lent to sessions for each lookup.
    pub(crate) catalogs: Arc<catalog::Pool>,
    /// The key of the `hash` masking strategy.
    pub(crate) masking_key: Vec<u8>,
    /// TLS for clients that ask for it; `None`: answer "no".
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// `Require`: refuse clients that do not ask for TLS.
    pub(crate) client_tls: ClientTls,
}

/// Serve Postgres clients on `listener` until `shutdown` resolves.
pub async fn run(
    cfg: ProxyConfig,
    bus: EventBus,
    policy: impl Into<PolicySource>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ProxyError> {
    let masking_key = cfg.masking_key().map_err(ProxyError::Config)?;
    let tls = cfg.tls_acceptor().map_err(ProxyError::Config)?;
    let client_tls = if tls.is_some() { cfg.client_tls() } else { ClientTls::Disable };
    if cfg.masking_key_file.is_none() {
        info!("no proxy.masking_key_file: hashed masking values are stable only until this node restarts");
    }
    let holds = hold::Holds::start(&bus).await?;
    let grants = grant::Grants::start(&bus).await?;
    let shared = Arc::new(Shared {
        auth: identity::Authenticator::new(cfg.oidc.clone()),
        journal: journal::Journal::start(bus),
        classifier: Default::default(),
        policy: policy.into(),
        holds,
        grants,
        cancels: cancel::Cancels::default(),
        catalogs: Arc::new(catalog::Pool::new(cfg.password_sources())),
        cfg,
        masking_key,
        tls,
        client_tls,
    });
    // Close catalog connections nobody borrowed for a while; ends with the node.
    let weak = Arc::downgrade(&shared);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(catalog::IDLE_FOR / 2);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match weak.upgrade() {
                Some(shared) => shared.catalogs.expire(),
                None => return,
            }
        }
    });
    info!(listen = ?listener.local_addr().ok(), "proxy listening");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(session::serve(shared.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
