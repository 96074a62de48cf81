//! The harness the proxy node's integration tests share: a target seeded for the test, the
//! policy it runs under, the proxy started in-process in front of it, clients, and waiting for
//! what the proxy does. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use eventbus::EventBus;
use policy_store::client::ActivePolicy;
use proto::events::{Envelope, Event, HoldDecision, HoldOutcome, HoldRequest};
use proxy_node::ProxyConfig;
use testkit::Postgres;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The target's password of `airlock_svc`, the role the proxy logs in as.
pub(crate) const DB_PASSWORD: &str = "svc-Pa55word";

/// `orders` with one row.
pub(crate) const ONE_ORDER: &str =
    "CREATE TABLE orders (id int primary key, item text); INSERT INTO orders VALUES (1, 'apple');";

/// `orders` with three rows and `payments` with one.
pub(crate) const ORDERS_AND_PAYMENTS: &str = "CREATE TABLE orders (id int primary key, item text); \
     INSERT INTO orders VALUES (1, 'apple'), (2, 'pear'), (3, 'plum'); \
     CREATE TABLE payments (id int primary key, amount int); \
     INSERT INTO payments VALUES (1, 10);";

/// A rule (an item of `rules:`) that denies DDL.
pub(crate) const NO_DDL: &str =
    "  - name: no-ddl\n    match: { operations: [create, drop, alter] }\n    action: deny\n";

/// Logs `filter` (e.g. `proxy_node=debug`) to the test's output, once per test binary.
pub(crate) fn init_tracing(filter: &str) {
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Creates the role `airlock_svc` (password [`DB_PASSWORD`]) and its database `shop` on `pg`.
pub(crate) fn create_shop(pg: &Postgres) {
    pg.psql("postgres", &format!("CREATE ROLE airlock_svc LOGIN PASSWORD '{DB_PASSWORD}'")).unwrap();
    pg.psql("postgres", "CREATE DATABASE shop OWNER airlock_svc").unwrap();
}

/// [`create_shop`], then runs `seed` there as its owner.
pub(crate) fn seed_shop(pg: &Postgres, seed: &str) {
    create_shop(pg);
    run_as_owner(pg, seed);
}

/// Runs `sql` in `shop` on `pg` (directly, not through the proxy) as its owner `airlock_svc`;
/// what it printed.
pub(crate) fn run_as_owner(pg: &Postgres, sql: &str) -> String {
    pg.psql("shop", &format!("SET ROLE airlock_svc; {sql}")).unwrap()
}

/// Writes [`DB_PASSWORD`] to the file `pw` in `dir`; its path.
pub(crate) fn write_password(dir: &Path) -> String {
    let pw = dir.join("pw");
    std::fs::write(&pw, DB_PASSWORD).unwrap();
    pw.to_str().unwrap().to_string()
}

/// A policy: `connections` (items), then `middle` (rules, masking, ...), then `accounts`
/// (items of `service_accounts:`).
pub(crate) fn policy_yaml(connections: &str, middle: &str, accounts: &str) -> String {
    format!("connections:\n{connections}{middle}service_accounts:\n{accounts}")
}

/// A connection item: `name`, to database `shop` at `host:port` with the upstream settings
/// `tls`, logging in as `airlock_svc` with the password in `pw_file`.
pub(crate) fn connection(name: &str, host: &str, port: u16, tls: &str, pw_file: &str) -> String {
    format!(
        "  - name: {name}\n    kind: postgres\n    upstream: {{ host: \"{host}\", port: {port}, database: shop, {tls} }}\n    \
         credentials: {{ user: airlock_svc, password_file: {pw_file} }}\n"
    )
}

/// A service account item: `name`, in the group `group`, logging in with the API key `key`.
pub(crate) fn service_account(name: &str, group: &str, key: &str) -> String {
    let hash = proxy_node::identity::hash_api_key(key);
    format!("  - {{ name: {name}, groups: [{group}], api_key_sha256: {hash} }}\n")
}

/// A policy of `rules` over the connection `shop` (plain text to `host:port`) for the service
/// account `agent` (group `agents`) with the API key `key`.
pub(crate) fn agent_policy(host: &str, port: u16, pw_file: &str, rules: &str, key: &str) -> String {
    policy_yaml(
        &connection("shop", host, port, "tls: disable", pw_file),
        &format!("rules:\n{rules}"),
        &service_account("agent", "agents", key),
    )
}

/// `yaml`, parsed, as the policy version `version`.
pub(crate) fn active_policy(version: u64, yaml: &str) -> Arc<ActivePolicy> {
    let document = proto::policy::parse(yaml).unwrap();
    Arc::new(ActivePolicy { version, document, digest: format!("test-{version}") })
}

/// The SQLSTATE of `e` (or why it has none).
pub(crate) fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("not a db error: {e}"))
}

/// The directory of PostgreSQL's programs (psql, pgbench).
pub(crate) fn pg_bindir() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().into(),
        _ => "/usr/lib/postgresql/15/bin".into(),
    }
}

/// A tokio-postgres client (no TLS) through the proxy on `port` to `database`, as `user` with
/// the API key `key`.
pub(crate) async fn connect(port: u16, user: &str, key: &str, database: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(key)
        .dbname(database)
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Polls `sql` on `pg`'s `shop` (directly, not through the proxy) every 100 ms until it returns
/// `want`; panics saying `what` did not happen after `within`.
pub(crate) async fn wait_for_target(pg: &Postgres, sql: &str, want: &str, within: Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let got = pg.psql("shop", sql).unwrap();
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} (`{sql}` is {got}, not {want})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a long query on `client`, cancels it through the proxy (connecting with `tls`) once
/// the target `pg` runs it, and checks the target cancelled it.
pub(crate) async fn cancel_a_long_query<T>(pg: &Postgres, client: tokio_postgres::Client, tls: T)
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
{
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    // A cancel that reaches the backend before the query would find it idle and do nothing.
    let running =
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(%'";
    wait_for_target(pg, running, "1", Duration::from_secs(15), "the query never started on the target").await;
    token.cancel_query(tls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeper).await.unwrap().unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e}");
}

/// The proxy, running in-process on a port of its own until this is dropped.
pub(crate) struct Proxy {
    /// Where clients connect, on 127.0.0.1.
    pub(crate) port: u16,
    /// The policy the proxy runs under: send a new one to change it.
    policy: watch::Sender<Option<Arc<ActivePolicy>>>,
    _stop: oneshot::Sender<()>,
}

impl Proxy {
    /// Starts the proxy with `cfg` on `bus`, under the policy `yaml` (version 1).
    pub(crate) async fn start(cfg: ProxyConfig, bus: EventBus, yaml: &str) -> Proxy {
        let (policy, rx) = watch::channel(Some(active_policy(1, yaml)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            proxy_node::run(cfg, bus, rx, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Proxy { port, policy, _stop: stop }
    }

    /// Replaces the proxy's policy with `yaml`, as version `version`.
    pub(crate) fn apply_yaml(&self, version: u64, yaml: &str) {
        self.policy.send(Some(active_policy(version, yaml))).unwrap();
    }

    /// Leaves the proxy running until the test's runtime ends; its port.
    pub(crate) fn detach(self) -> u16 {
        let port = self.port;
        std::mem::forget(self);
        port
    }
}

/// A target whose database `shop` is seeded for the test, and the proxy in front of it.
pub(crate) struct Node {
    /// The target.
    pub(crate) pg: Postgres,
    /// The bus the proxy publishes on.
    pub(crate) bus: EventBus,
    /// The proxy's port.
    pub(crate) port: u16,
    /// The file holding the target's password, for the policy's connections.
    pub(crate) pw_file: String,
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts a target seeded with `seed` (see [`seed_shop`]) and the proxy with `cfg` (its
    /// `target_password_dir` set here) on `bus`, under the policy `policy(&target, pw_file)`.
    pub(crate) async fn start(
        seed: &str,
        cfg: ProxyConfig,
        bus: EventBus,
        policy: impl FnOnce(&Postgres, &str) -> String,
    ) -> Node {
        testkit::init_crypto();
        let pg = Postgres::start().unwrap();
        seed_shop(&pg, seed);
        let dir = tempfile::tempdir().unwrap();
        let pw_file = write_password(dir.path());
        let cfg = ProxyConfig { target_password_dir: Some(dir.path().display().to_string()), ..cfg };
        let proxy = Proxy::start(cfg, bus.clone(), &policy(&pg, &pw_file)).await;
        Node { pg, bus, port: proxy.port, pw_file, proxy, _dir: dir }
    }

    /// [`ONE_ORDER`] behind the proxy (debug logs on, the in-memory bus), [`NO_DDL`] for the
    /// agent with the API key `key`.
    pub(crate) async fn no_ddl(key: &str) -> Node {
        init_tracing("proxy_node=debug");
        Node::start(ONE_ORDER, ProxyConfig::default(), EventBus::memory(), |pg, pw| {
            agent_policy("127.0.0.1", pg.port, pw, NO_DDL, key)
        })
        .await
    }

    /// Replaces the proxy's policy with `yaml`, as version `version`.
    pub(crate) fn apply_yaml(&self, version: u64, yaml: &str) {
        self.proxy.apply_yaml(version, yaml);
    }

    /// A tokio-postgres client through the proxy to `shop`, as `user` with the API key `key`.
    pub(crate) async fn connect_as(&self, user: &str, key: &str) -> tokio_postgres::Client {
        connect(self.port, user, key, "shop").await
    }

    /// A raw wire-protocol session through the proxy to `shop`, logged in as `user` with `key`.
    pub(crate) async fn raw_as(&self, user: &str, key: &str) -> tokio::net::TcpStream {
        testkit::pgwire::connect(self.port, user, "shop", key).await
    }

    /// [`run_as_owner`] on the target.
    pub(crate) fn as_owner(&self, sql: &str) -> String {
        run_as_owner(&self.pg, sql)
    }

    /// What `sql` returns on the target's `shop`, run directly (not through the proxy).
    pub(crate) fn sql(&self, sql: &str) -> String {
        self.pg.psql("shop", sql).unwrap()
    }
}

/// Implements `Deref<Target = Node>` for a test's harness that keeps its node in the field `node`.
#[allow(unused_macros)] // Not every test binary has such a harness.
macro_rules! deref_to_node {
    ($harness:ty) => {
        impl std::ops::Deref for $harness {
            type Target = $crate::common::Node;

            fn deref(&self) -> &$crate::common::Node {
                &self.node
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use deref_to_node;

/// The hold requests the proxy publishes, each with its session, and the bus to decide them on
/// as the approval service would.
pub(crate) struct Holds {
    bus: EventBus,
    requests: mpsc::UnboundedReceiver<(Uuid, HoldRequest)>,
}

impl Holds {
    /// Collects the hold requests published on `bus` from now on.
    pub(crate) async fn subscribe(bus: &EventBus) -> Holds {
        let (tx, requests) = mpsc::unbounded_channel();
        let mut sub = bus.subscribe(proto::subjects::HOLD_REQUESTED).await.unwrap();
        tokio::spawn(async move {
            while let Some(env) = sub.next().await {
                if let Event::HoldRequested(h) = env.event {
                    let _ = tx.send((env.session, *h));
                }
            }
        });
        Holds { bus: bus.clone(), requests }
    }

    /// The next hold request and its session, however long it takes.
    pub(crate) async fn recv(&mut self) -> (Uuid, HoldRequest) {
        self.requests.recv().await.unwrap()
    }

    /// The next hold request and its session, within 30 s.
    pub(crate) async fn next(&mut self) -> (Uuid, HoldRequest) {
        tokio::time::timeout(Duration::from_secs(30), self.recv()).await.expect("a hold")
    }

    /// Panics if a hold request comes within `d`.
    pub(crate) async fn none_within(&mut self, d: Duration) {
        if let Ok((_, h)) = tokio::time::timeout(d, self.recv()).await {
            panic!("unexpected hold of {:?}", h.statement);
        }
    }

    /// Decides hold `h` of `session` as `outcome`, as the approval service would.
    pub(crate) async fn answer(&self, session: Uuid, h: &HoldRequest, outcome: HoldOutcome) {
        let d = HoldDecision { hold_id: h.hold_id, outcome, decided_by: "tester".into(), reason: None };
        self.bus.publish(&Envelope::new(session, Event::HoldDecided(d))).await.unwrap();
    }

    /// Decides the next hold request (within 30 s) as `outcome`; the request.
    pub(crate) async fn decide(&mut self, outcome: HoldOutcome) -> HoldRequest {
        let (session, h) = self.next().await;
        self.answer(session, &h, outcome).await;
        h
    }

    /// Runs `probe`, a write that changes nothing, on `c` until it is held (`held`) or runs
    /// without a hold (`!held`), for up to 10 s (grants and policies reach the node in the
    /// background). A held probe is denied, so no hold is left pending.
    pub(crate) async fn wait_until_held(&mut self, c: &tokio_postgres::Client, probe: &str, held: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let run = c.execute(probe, &[]);
            tokio::pin!(run);
            // Either the statement completes (not held) or its hold request arrives (held).
            let hold = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::select! {
                    r = &mut run => {
                        assert_eq!(r.unwrap(), 0);
                        None
                    }
                    hold = self.recv() => Some(hold),
                }
            });
            let was_held = match hold.await.expect("the probe neither ran nor was held") {
                None => false,
                Some((session, req)) => {
                    assert_eq!(req.statement, probe);
                    self.answer(session, &req, HoldOutcome::Denied).await;
                    let e = tokio::time::timeout(Duration::from_secs(10), run).await.unwrap().unwrap_err();
                    assert_eq!(sqlstate(&e), "42501");
                    true
                }
            };
            if was_held == held {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{probe}: held is not {held} after 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The random choices of the generated corpora, from a seed, so a seed reproduces a corpus.
pub(crate) struct Rng(rand::rngs::StdRng);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(rand::SeedableRng::seed_from_u64(seed))
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.0, 0..n)
    }

    pub(crate) fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    /// True `percent` times in a hundred.
    pub(crate) fn chance(&mut self, percent: u32) -> bool {
        rand::Rng::random_ratio(&mut self.0, percent, 100)
    }
}

/// A whole number from the environment variable `name`, else `default`: how a generated
/// corpus takes another seed or size.
pub(crate) fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
