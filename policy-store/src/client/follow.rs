//! Following the store in the background, for proxies and the approval service.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use proto::pb::policy_store_client::PolicyStoreClient;
use proto::pb::watch_event::Event;
use proto::pb::{GetRequest, Heartbeat, PolicyVersion, WatchRequest};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Bearer, ClientError, authorized};

/// The first wait after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// HTTP/2 pings detect a dead store while no versions arrive.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A stream that brought no version or heartbeat for this long is given up for the next
/// endpoint: a node sends a heartbeat about every second while it is confirmed current.
const SILENCE_LIMIT: Duration = Duration::from_secs(5);

/// A parsed, validated version the proxy enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivePolicy {
    pub version: u64,
    pub document: proto::policy::PolicyDocument,
    /// Hex SHA-256 of the document's YAML.
    pub digest: String,
}

/// A background follower of the store's Watch stream (see [`follow`]). Clones share it.
#[derive(Debug, Clone)]
pub struct Follower {
    /// The last good version; `None` until the first one arrives.
    pub policy: watch::Receiver<Option<Arc<ActivePolicy>>>,
    last_contact: Arc<Mutex<Option<(Instant, SystemTime)>>>,
    started: (Instant, SystemTime),
}

/// Why [`Follower::current`] refuses to hand out a policy: enforcing it would not be safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StalePolicy {
    /// No version was ever received.
    #[error(
        "no policy version received from the policy store in {} (following since {})",
        humantime::format_duration(*.waited),
        humantime::format_rfc3339_seconds(*.since)
    )]
    NeverReceived { waited: Duration, since: SystemTime },
    /// Versions were received, but the store has not been reached for longer than the limit.
    #[error(
        "policy version {version} is stale: no contact with the policy store for {} since {} (limit {})",
        humantime::format_duration(*.silent_for),
        humantime::format_rfc3339_seconds(*.last_contact),
        humantime::format_duration(*.limit)
    )]
    Stale { version: u64, silent_for: Duration, last_contact: SystemTime, limit: Duration },
}

impl Follower {
    /// When the store was last known current: a heartbeat (the serving node had confirmed with
    /// its raft leader and quorum that it was current, at this instant) or a version received on
    /// the Watch stream; `None` if never.
    pub fn last_contact(&self) -> Option<Instant> {
        self.contact().map(|(at, _)| at)
    }

    fn contact(&self) -> Option<(Instant, SystemTime)> {
        *self.last_contact.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The policy to enforce now: the last version received, as long as the store was reached
    /// within `max_staleness`. Past that (or before any version arrived) the caller must fail
    /// closed; the error says why, for the client and the log.
    pub fn current(&self, max_staleness: Duration) -> Result<Arc<ActivePolicy>, StalePolicy> {
        let policy = self.policy.borrow().clone();
        let (policy, (contact_at, contact_wall)) = match (policy, self.contact()) {
            (Some(p), Some(c)) => (p, c),
            _ => {
                return Err(StalePolicy::NeverReceived {
                    waited: self.started.0.elapsed(),
                    since: self.started.1,
                });
            }
        };
        let silent_for = contact_at.elapsed();
        if silent_for > max_staleness {
            return Err(StalePolicy::Stale {
                version: policy.version,
                silent_for: Duration::from_millis(silent_for.as_millis() as u64),
                last_contact: contact_wall,
                limit: max_staleness,
            });
        }
        Ok(policy)
    }
}

/// Follow the store in a background task, with `token` (the read token, or the admin token) as
/// `authorization: Bearer <token>` on every request. On each connection it first asks for the
/// newest version (`Get`) and enforces only that, never the history before it, then follows
/// `Watch` from there; of versions that arrive together only the newest valid one is activated.
/// A version not newer than the last one seen is refused and logged: a store that went back
/// (restored from an old backup, a lagging node) never makes a proxy enforce an older version.
/// On disconnect it retries with backoff (100ms doubling to 2s), cycling through `endpoints`.
/// A received document that fails `proto::policy::parse` is logged and skipped (the last good
/// one stays). The store counts as reached (contact, see [`Follower::current`]) only by a
/// heartbeat, which a node sends each time its raft leader and quorum confirmed it current (the
/// contact dates from that confirmation), or by a version received on the Watch stream. Neither
/// an open stream nor `Get` counts: a node cut off from the raft majority still answers from its
/// old state, and ends its streams when it cannot confirm. A heartbeat naming a version above
/// the last one seen means one was missed: the follower reconnects and starts again with `Get`.
/// A stream silent for 5 s is given up for the next endpoint. Undecodable answers never count,
/// so a proxy that cannot read the store goes stale. Answers up to [`crate::MAX_VERSION_BYTES`] are
/// accepted. The receiver starts at `None`. The task ends when every receiver of
/// [`Follower::policy`] is dropped. Must be called inside a tokio runtime; fails only when the
/// token cannot be sent as a header.
pub fn follow(endpoints: Vec<String>, token: &str) -> Result<Follower, ClientError> {
    follow_with(endpoints, token, crate::ClientTls::default())
}

/// [`follow`], checking `https://` nodes' certificates as `tls` says.
pub fn follow_with(
    endpoints: Vec<String>,
    token: &str,
    tls: crate::ClientTls,
) -> Result<Follower, ClientError> {
    let authorization = super::bearer(token)?;
    let (tx, policy) = watch::channel(None);
    let last_contact = Arc::new(Mutex::new(None));
    let contact = Contact(last_contact.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = follow_loop(endpoints, &authorization, &tls, &tx, &contact) => {}
            () = tx.closed() => debug!("policy follower dropped"),
        }
    });
    Ok(Follower { policy, last_contact, started: (Instant::now(), SystemTime::now()) })
}

#[derive(Debug, Clone)]
struct Contact(Arc<Mutex<Option<(Instant, SystemTime)>>>);

impl Contact {
    fn touch(&self) {
        self.at(Instant::now());
    }

    /// The store was known current at `at`; contact never moves back.
    fn at(&self, at: Instant) {
        let mut contact = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if contact.is_some_and(|(last, _)| last >= at) {
            return;
        }
        let now = SystemTime::now();
        *contact = Some((at, now.checked_sub(at.elapsed()).unwrap_or(now)));
    }
}

/// How a stream that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The server ended it.
    Closed,
    /// Nothing arrived for [`SILENCE_LIMIT`].
    Silent,
    /// A heartbeat named a version above the last one seen: start again with `Get`.
    Resync,
}

async fn follow_loop(
    endpoints: Vec<String>,
    authorization: &Bearer,
    tls: &crate::ClientTls,
    tx: &watch::Sender<Option<Arc<ActivePolicy>>>,
    contact: &Contact,
) {
    if endpoints.is_empty() {
        warn!("no policy-store endpoints to follow");
        return;
    }
    let mut last_seen = 0u64;
    let mut backoff = MIN_BACKOFF;
    let mut next = 0usize;
    loop {
        let endpoint = &endpoints[next % endpoints.len()];
        let ended =
            stream_once(endpoint, (authorization, tls), &mut last_seen, tx, contact, &mut backoff).await;
        let resync = matches!(ended, Ok(Ended::Resync));
        match ended {
            Ok(Ended::Closed) => info!(endpoint = %endpoint, "policy watch stream ended; reconnecting"),
            Ok(Ended::Silent) => warn!(
                endpoint = %endpoint,
                "no heartbeat from the policy store for {}s; trying the next endpoint",
                SILENCE_LIMIT.as_secs()
            ),
            Ok(Ended::Resync) => info!(
                endpoint = %endpoint,
                policy.seen = last_seen,
                "the policy store is at a version this follower has not seen; resyncing"
            ),
            Err(e) => warn!(endpoint = %endpoint, error = %e, "policy watch failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        // A resync asks the same node again; anything else moves on to the next one.
        if !resync {
            next = next.wrapping_add(1);
        }
    }
}

/// One connection: the newest version, then the stream of later ones into `tx`, until the
/// stream ends, fails, falls silent or shows that a version was missed.
async fn stream_once(
    endpoint: &str,
    (authorization, tls): (&Bearer, &crate::ClientTls),
    last_seen: &mut u64,
    tx: &watch::Sender<Option<Arc<ActivePolicy>>>,
    contact: &Contact,
    backoff: &mut Duration,
) -> Result<Ended, ClientError> {
    let channel = super::endpoint(endpoint, tls)?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect { endpoint: endpoint.to_string(), source })?;
    let mut client = PolicyStoreClient::new(channel).max_decoding_message_size(crate::MAX_VERSION_BYTES);
    // Served from the node's own state, which may be old: not contact. The Watch stream's first
    // heartbeat says whether the node is current.
    match client.get(authorized(GetRequest { version: 0 }, authorization)).await {
        Ok(latest) => {
            let latest = latest.into_inner();
            if latest.version < *last_seen {
                warn!(
                    endpoint = %endpoint,
                    policy.version = latest.version,
                    policy.seen = *last_seen,
                    "the policy store's newest version is older than the one enforced; keeping it"
                );
            } else if latest.version > *last_seen {
                accept(vec![latest], last_seen, tx);
            }
        }
        // An empty store: nothing to enforce yet.
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Err(status) => return Err(status.into()),
    }
    *backoff = MIN_BACKOFF;
    let request = authorized(WatchRequest { from_version: *last_seen }, authorization);
    let mut stream = client.watch(request).await?.into_inner();
    debug!(endpoint = %endpoint, policy.version = *last_seen, "following policy store");
    let silence = tokio::time::sleep(SILENCE_LIMIT);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            message = stream.message() => match message? {
                Some(first) => {
                    // Take whatever else already arrived, so a backlog activates only its newest.
                    let mut events = vec![first];
                    let mut failed = None;
                    loop {
                        match stream.message().now_or_never() {
                            Some(Ok(Some(e))) => events.push(e),
                            Some(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                            Some(Ok(None)) | None => break,
                        }
                    }
                    let mut versions = Vec::new();
                    let mut heartbeats = Vec::new();
                    for event in events {
                        match event.event {
                            Some(Event::Version(v)) => versions.push(v),
                            Some(Event::Heartbeat(h)) => heartbeats.push(h),
                            None => debug!(endpoint = %endpoint, "ignored a Watch event of an unknown kind"),
                        }
                    }
                    let mut reached = accept(versions, last_seen, tx);
                    if reached {
                        contact.touch();
                    }
                    // Versions come before the heartbeat that names them, so every version a
                    // heartbeat names was taken above.
                    for h in heartbeats {
                        if !heartbeat(&h, *last_seen, contact) {
                            return Ok(Ended::Resync);
                        }
                        reached = true;
                    }
                    if let Some(e) = failed {
                        return Err(e.into());
                    }
                    if reached {
                        silence.as_mut().reset(tokio::time::Instant::now() + SILENCE_LIMIT);
                    }
                }
                None => return Ok(Ended::Closed),
            },
            () = &mut silence => return Ok(Ended::Silent),
        }
    }
}

/// Take a heartbeat: the node was current when it confirmed, `confirmed_ms_ago` before sending,
/// so that is when the store was last reached. False (no contact) when it names a version above
/// `last_seen`: this follower missed one and must resync. One below `last_seen` (the store went
/// back, e.g. restored from an old backup) still counts; the newer version stays enforced.
fn heartbeat(h: &Heartbeat, last_seen: u64, contact: &Contact) -> bool {
    if h.version > last_seen {
        return false;
    }
    if h.version < last_seen {
        debug!(
            policy.version = h.version,
            policy.seen = last_seen,
            "the policy store is at an older version than the one enforced"
        );
    }
    // An age too large to subtract cannot be fresh: no contact, but no resync either.
    if let Some(at) = Instant::now().checked_sub(Duration::from_millis(h.confirmed_ms_ago)) {
        contact.at(at);
    }
    true
}

/// Take `batch` (versions received in order): refuse (and log) each one not newer than
/// `last_seen`, then activate the newest valid one of the rest. Returns whether any was newer.
fn accept(
    batch: Vec<PolicyVersion>,
    last_seen: &mut u64,
    tx: &watch::Sender<Option<Arc<ActivePolicy>>>,
) -> bool {
    let mut newer = Vec::with_capacity(batch.len());
    for v in batch {
        if v.version <= *last_seen {
            warn!(
                policy.version = v.version,
                policy.seen = *last_seen,
                "refused a policy version not newer than the last one seen"
            );
        } else {
            *last_seen = v.version;
            newer.push(v);
        }
    }
    let any = !newer.is_empty();
    while let Some(v) = newer.pop() {
        if let Some(active) = activate(v) {
            tx.send_replace(Some(Arc::new(active)));
            break;
        }
    }
    any
}

/// Parse and check a received version; `None` (logged) when it cannot be enforced.
fn activate(v: PolicyVersion) -> Option<ActivePolicy> {
    let digest = crate::version::digest(&v.document_yaml);
    if digest != v.digest {
        warn!(policy.version = v.version, "policy version digest mismatch; keeping the last good version");
        return None;
    }
    match proto::policy::parse(&v.document_yaml) {
        Ok(document) => {
            info!(policy.version = v.version, policy.digest = %digest, "policy version active");
            Some(ActivePolicy { version: v.version, document, digest })
        }
        Err(errors) => {
            warn!(policy.version = v.version, error = %errors, "invalid policy version skipped; keeping the last good version");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u64, yaml: &str) -> PolicyVersion {
        PolicyVersion {
            version: n,
            document_yaml: yaml.to_string(),
            author: "test".into(),
            applied_at_unix_ms: 0,
            digest: crate::version::digest(yaml),
        }
    }

    #[test]
    fn valid_version_becomes_active() {
        let active = activate(version(3, "defaults: { unparsed: deny }\n")).expect("valid");
        assert_eq!(active.version, 3);
        assert_eq!(active.digest, crate::version::digest("defaults: { unparsed: deny }\n"));
    }

    #[test]
    fn invalid_document_is_skipped() {
        assert!(activate(version(4, "rules: [{ name: x, action: explode }]\n")).is_none());
        assert!(activate(version(5, ": : :\n\t- [")).is_none());
    }

    fn follower_with(policy: Option<ActivePolicy>, contact_ago: Option<Duration>) -> Follower {
        let (_tx, rx) = watch::channel(policy.map(Arc::new));
        let now = (Instant::now(), SystemTime::now());
        let contact = contact_ago.map(|ago| (now.0 - ago, now.1 - ago));
        Follower { policy: rx, last_contact: Arc::new(Mutex::new(contact)), started: now }
    }

    #[test]
    fn current_policy_is_served_while_contact_is_recent() {
        let active = activate(version(7, "rules: []\n")).expect("valid");
        let f = follower_with(Some(active), Some(Duration::from_secs(1)));
        assert_eq!(f.current(Duration::from_secs(30)).expect("fresh").version, 7);
    }

    #[test]
    fn stale_policy_fails_closed_and_says_why() {
        let active = activate(version(7, "rules: []\n")).expect("valid");
        let f = follower_with(Some(active), Some(Duration::from_secs(45)));
        let err = f.current(Duration::from_secs(30)).expect_err("stale");
        let message = err.to_string();
        assert!(
            message.starts_with("policy version 7 is stale: no contact with the policy store for 45s since "),
            "{message}"
        );
        assert!(message.ends_with("(limit 30s)"), "{message}");
    }

    #[test]
    fn no_version_yet_fails_closed() {
        let f = follower_with(None, None);
        let err = f.current(Duration::from_secs(30)).expect_err("nothing received");
        assert!(matches!(err, StalePolicy::NeverReceived { .. }));
        assert!(err.to_string().starts_with("no policy version received from the policy store"), "{err}");
    }

    #[test]
    fn only_newer_versions_are_taken_and_only_the_newest_valid_one_is_activated() {
        let (tx, rx) = watch::channel(None);
        let mut seen = 0;
        let batch = vec![version(1, "rules: []\n"), version(2, "defaults: { no_match: deny }\n")];
        assert!(accept(batch, &mut seen, &tx));
        assert_eq!(rx.borrow().as_ref().map(|p| p.version), Some(2));
        assert_eq!(seen, 2);
        // Older or equal versions are refused; nothing changes.
        assert!(!accept(vec![version(1, "rules: []\n"), version(2, "rules: []\n")], &mut seen, &tx));
        assert_eq!(rx.borrow().as_ref().map(|p| p.version), Some(2));
        // A newer invalid one is skipped in favour of the newest valid one before it.
        let batch = vec![version(3, "rules: []\n"), version(4, ": : :\n\t- [")];
        assert!(accept(batch, &mut seen, &tx));
        assert_eq!(rx.borrow().as_ref().map(|p| p.version), Some(3));
        assert_eq!(seen, 4);
    }

    #[test]
    fn a_heartbeat_is_contact_from_its_confirmation_unless_it_names_a_version_not_seen() {
        let contact = Contact(Arc::default());
        let beat = |version, confirmed_ms_ago| Heartbeat { version, confirmed_ms_ago };
        // Ahead of the follower: resync, no contact.
        assert!(!heartbeat(&beat(8, 0), 7, &contact));
        assert_eq!(*contact.0.lock().expect("lock"), None);
        // Dated from the confirmation, not the arrival.
        assert!(heartbeat(&beat(7, 3_000), 7, &contact));
        let (at, _) = contact.0.lock().expect("lock").expect("contact");
        assert!(at.elapsed() >= Duration::from_secs(3));
        // An older confirmation never moves contact back; a lower version still counts.
        assert!(heartbeat(&beat(7, 60_000), 7, &contact));
        assert_eq!(contact.0.lock().expect("lock").map(|c| c.0), Some(at));
        assert!(heartbeat(&beat(6, 0), 7, &contact));
        assert!(contact.0.lock().expect("lock").expect("contact").0 > at);
    }

    #[test]
    fn digest_mismatch_is_skipped() {
        let mut v = version(6, "rules: []\n");
        v.digest = "00".into();
        assert!(activate(v).is_none());
    }
}
