//! Who is connecting: an OIDC JWT (checked against the issuer's JWKS, found through its
//! discovery document) or a service account's API key (checked against the SHA-256 in the
//! policy). The credential arrives as the Postgres password.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use proto::events::Principal;
use proto::policy::PolicyDocument;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

/// OIDC settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL; its discovery document is `{issuer}/.well-known/openid-configuration`.
    /// No default: without it only API keys are accepted.
    pub issuer: String,
    /// The audience tokens must carry. Default `airlock`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// The claim that lists the principal's groups. Default `groups`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Accepted signature algorithms (pinned). Default `[RS256, ES256]`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on exp and nbf. Default 30s.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// How long fetched keys are trusted before they are fetched again. Default 10m.
    #[serde(default = "default_jwks_ttl", with = "humantime_serde")]
    pub jwks_ttl: Duration,
}

fn default_audience() -> String {
    "airlock".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_ttl() -> Duration {
    Duration::from_secs(600)
}

impl OidcConfig {
    /// Settings for an issuer with every other field at its default.
    pub fn for_issuer(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_string(),
            audience: default_audience(),
            groups_claim: default_groups_claim(),
            algorithms: default_algorithms(),
            leeway: default_leeway(),
            jwks_ttl: default_jwks_ttl(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.algorithms.is_empty() {
            return Err("oidc.algorithms must not be empty".into());
        }
        if let Some(a) = self
            .algorithms
            .iter()
            .find(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            return Err(format!(
                "oidc.algorithms: {a:?} is a shared-secret algorithm; only public-key algorithms are allowed"
            ));
        }
        if !(self.issuer.starts_with("https://") || self.issuer.starts_with("http://")) {
            return Err("oidc.issuer must be an http(s) URL".into());
        }
        key_source(&self.issuer).map_err(|e| format!("oidc.issuer: {e}"))
    }
}

/// May the keys that verify tokens come from `url`? Over TLS, or in the clear from this machine
/// only (tests, an issuer on the same host): keys fetched in the clear from elsewhere can be
/// swapped on the way, and whoever swaps them signs any token they like.
fn key_source(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let loopback = u.host_str().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback())
    });
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{url} is plain http to another host: the issuer's keys would be fetched in the clear, where anyone \
             on the way could swap them; use https"
        )),
        other => Err(format!("{url}: keys are fetched over https, not {other}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential was sent (put the token or API key in the password)")]
    Missing,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("tokens are not accepted: no OIDC issuer is configured")]
    NoIssuer,
    #[error("unknown API key")]
    UnknownKey,
    #[error("identity provider unavailable: {0}")]
    Provider(String),
    #[error(
        "token subject {0:?} is also the name of a service account; refused so that neither takes the other's rules"
    )]
    SubjectCollides(String),
}

#[derive(Default)]
struct Keys {
    /// The key set last fetched, and when.
    set: Option<(JwkSet, Instant)>,
    /// When a fetch was last started, whatever came of it.
    attempted: Option<Instant>,
}

/// Validates OIDC tokens; keys are cached and refreshed on expiry or an unknown `kid`.
///
/// Tokens whose key is in the fresh cached set never wait for a fetch. Fetches run one at a
/// time and at most once per [`MIN_REFETCH`], failed or not, so tokens with made-up `kid`s, or
/// an issuer that is down, cost one request to the issuer per interval, not one per login, and
/// logins do not queue behind them.
pub struct OidcVerifier {
    cfg: OidcConfig,
    http: reqwest::Client,
    keys: std::sync::Mutex<Keys>,
    /// Held while a fetch runs.
    fetching: Mutex<()>,
}

/// The key `kid` names in `set` for a signature made with `alg`; without a `kid`, the set's only
/// key. A key the issuer published for something else is not one: marked for encryption
/// (`"use": "enc"`), for other operations (`key_ops` without `verify`), or for another algorithm
/// (`alg`), so that each key verifies only what it was published for (RFC 8725 3.1). Several
/// keys may share a `kid` (a signing and an encryption key, say): the one that fits is taken.
fn find_key(set: &JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    let fits = |jwk: &&Jwk| {
        let c = &jwk.common;
        c.public_key_use.as_ref().is_none_or(|u| *u == PublicKeyUse::Signature)
            && c.key_operations.as_ref().is_none_or(|ops| ops.contains(&KeyOperations::Verify))
            && c.key_algorithm.is_none_or(|a| a == KeyAlgorithm::from(alg))
    };
    let jwk = match kid {
        Some(k) => set.keys.iter().filter(|j| j.common.key_id.as_deref() == Some(k)).find(fits),
        None if set.keys.len() == 1 => set.keys.first().filter(fits),
        None => None,
    }?;
    DecodingKey::from_jwk(jwk).ok()
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// The least time between two key fetches (after one that failed, or found no such `kid`).
const MIN_REFETCH: Duration = Duration::from_secs(10);

impl OidcVerifier {
    pub fn new(cfg: OidcConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { cfg, http, keys: Default::default(), fetching: Mutex::new(()) }
    }

    async fn fetch(&self) -> Result<JwkSet, AuthError> {
        let issuer = self.cfg.issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let p = |e: reqwest::Error| AuthError::Provider(e.to_string());
        let d: Discovery = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(p)?
            .error_for_status()
            .map_err(p)?
            .json()
            .await
            .map_err(p)?;
        if d.issuer.trim_end_matches('/') != issuer {
            return Err(AuthError::Provider(format!(
                "discovery document names issuer {} , not {issuer}",
                d.issuer
            )));
        }
        // An issuer reached over TLS may still name keys to be fetched in the clear.
        key_source(&d.jwks_uri).map_err(|e| AuthError::Provider(format!("jwks_uri: {e}")))?;
        self.http
            .get(&d.jwks_uri)
            .send()
            .await
            .map_err(p)?
            .error_for_status()
            .map_err(p)?
            .json()
            .await
            .map_err(p)
    }

    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        if let Some(answer) = self.cached_key(kid, alg) {
            return answer;
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Another login may have fetched while this one waited.
        if let Some(answer) = self.cached_key(kid, alg) {
            return answer;
        }
        self.lock_keys().attempted = Some(Instant::now());
        let set = self.fetch().await?;
        let key = find_key(&set, kid, alg);
        self.lock_keys().set = Some((set, Instant::now()));
        key.ok_or_else(|| AuthError::InvalidToken("unknown key id".into()))
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        // Nothing is left half-written under this lock.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `kid` without fetching: its key from the fresh set; or a refusal when a
    /// fetch was started less than [`MIN_REFETCH`] ago (it found no such key, or failed);
    /// `None` when a fetch is due.
    fn cached_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Result<DecodingKey, AuthError>> {
        let keys = self.lock_keys();
        let fresh = keys.set.as_ref().filter(|(_, at)| at.elapsed() < self.cfg.jwks_ttl);
        if let Some(key) = fresh.and_then(|(set, _)| find_key(set, kid, alg)) {
            return Some(Ok(key));
        }
        if keys.attempted.is_some_and(|at| at.elapsed() < MIN_REFETCH) {
            return Some(Err(match fresh {
                Some(_) => AuthError::InvalidToken("unknown key id".into()),
                None => AuthError::Provider("the issuer's keys could not be fetched; retried shortly".into()),
            }));
        }
        None
    }

    /// Check a token and return its principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        Ok(self.verify_with_email(token).await?.0)
    }

    /// [`verify`](Self::verify), plus the token's `email` claim when `email_verified` is true
    /// (the approval service matches approver groups on it).
    pub async fn verify_with_email(&self, token: &str) -> Result<(Principal, Option<String>), AuthError> {
        self.verify_token(token).await.map(|v| (v.principal, v.email))
    }

    /// [`verify_with_email`](Self::verify_with_email), with when the token stops being valid.
    pub async fn verify_token(&self, token: &str) -> Result<Verified, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        if !self.cfg.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm(header.alg));
        }
        // Extensions the token says must be understood: none is (RFC 7515 4.1.11).
        if let Some(crit) = &header.crit {
            return Err(AuthError::InvalidToken(format!("unsupported critical header parameters {crit:?}")));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.set_issuer(&[self.cfg.issuer.trim_end_matches('/'), self.cfg.issuer.as_str()]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = self.cfg.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let claims = data.claims;
        // One issuer: a list that merely includes ours (the library accepts any overlap) is not
        // a token our issuer made for itself.
        if !claims.get("iss").is_some_and(serde_json::Value::is_string) {
            return Err(AuthError::InvalidToken("iss must be a single string".into()));
        }
        let subject = claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default().to_string();
        if subject.is_empty() {
            return Err(AuthError::InvalidToken("empty sub".into()));
        }
        let groups = match claims.get(&self.cfg.groups_claim) {
            Some(serde_json::Value::Array(a)) => {
                a.iter().filter_map(|g| g.as_str().map(str::to_string)).collect()
            }
            Some(serde_json::Value::String(s)) => {
                s.split([' ', ',']).filter(|g| !g.is_empty()).map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        // Only an address the issuer says it verified: a missing claim, or a provider's string
        // "false", would let anyone with an account at the issuer claim an approver's address.
        let verified = match claims.get("email_verified") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let email = claims
            .get("email")
            .and_then(|e| e.as_str())
            .filter(|e| verified && !e.is_empty())
            .map(str::to_string);
        // `exp` is required and checked above; past it (and the leeway) the session ends too.
        let expires = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .map(|exp| std::time::UNIX_EPOCH + Duration::from_secs(exp) + self.cfg.leeway);
        Ok(Verified { principal: Principal { subject, groups, kind: "oidc".into() }, email, expires })
    }
}

/// Authenticates credentials against OIDC and the policy's service accounts.
#[derive(Clone)]
pub struct Authenticator {
    oidc: Option<Arc<OidcVerifier>>,
}

/// Does this credential look like a JWT (three base64url parts, a JSON header)?
fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.matches('.').count() == 2
}

/// Hex SHA-256 of an API key, as stored in the policy.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Authenticator {
    pub fn new(oidc: Option<OidcConfig>) -> Self {
        Self { oidc: oidc.map(|c| Arc::new(OidcVerifier::new(c))) }
    }

    pub async fn authenticate(
        &self,
        credential: &str,
        policy: &PolicyDocument,
    ) -> Result<Principal, AuthError> {
        Ok(self.authenticate_with_email(credential, policy).await?.principal)
    }

    /// [`authenticate`](Self::authenticate), plus the e-mail an OIDC token carried and its
    /// issuer verified (holds name it, so that the requester is known to approvers by it too).
    pub async fn authenticate_with_email(
        &self,
        credential: &str,
        policy: &PolicyDocument,
    ) -> Result<Verified, AuthError> {
        if credential.is_empty() {
            return Err(AuthError::Missing);
        }
        if looks_like_jwt(credential) {
            let verified = match &self.oidc {
                Some(v) => v.verify_token(credential).await?,
                None => return Err(AuthError::NoIssuer),
            };
            // Rules, grants and approvals name principals by subject alone.
            if policy.service_accounts.iter().any(|sa| sa.name == verified.principal.subject) {
                return Err(AuthError::SubjectCollides(verified.principal.subject));
            }
            return Ok(verified);
        }
        let digest = hash_api_key(credential);
        // Compare against every account in constant time, so timing says nothing about which matched.
        let mut found = None;
        for sa in &policy.service_accounts {
            let eq: bool = sa.api_key_sha256.to_ascii_lowercase().as_bytes().ct_eq(digest.as_bytes()).into();
            if eq && found.is_none() {
                found = Some(sa);
            }
        }
        let sa = found.ok_or(AuthError::UnknownKey)?;
        Ok(Verified {
            principal: Principal {
                subject: sa.name.clone(),
                groups: sa.groups.clone(),
                kind: "service_account".into(),
            },
            email: None,
            expires: None,
        })
    }
}

/// Who a credential names, and for how long.
#[derive(Debug, Clone)]
pub struct Verified {
    pub principal: Principal,
    /// The e-mail an OIDC token carried and its issuer verified.
    pub email: Option<String>,
    /// When an OIDC token stops being valid (its `exp` plus the leeway); `None` for an API key,
    /// which is valid until the policy removes or replaces it.
    pub expires: Option<std::time::SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape_detection() {
        assert!(looks_like_jwt("eyJhbGciOi.eyJzdWIi.sig"));
        assert!(!looks_like_jwt("ak_live_123"));
        assert!(!looks_like_jwt("eyJ.only-one-dot"));
    }

    #[test]
    fn shared_secret_algorithms_are_refused_in_config() {
        let mut c = OidcConfig::for_issuer("http://127.0.0.1:1");
        c.algorithms = vec![Algorithm::HS256];
        assert!(c.validate().is_err());
        c.algorithms = vec![];
        assert!(c.validate().is_err());
    }

    /// An issuer that answers every request with a 500, counting them.
    async fn failing_issuer() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        issuer_answering(|_| "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into())
            .await
    }

    /// An issuer on 127.0.0.1 that answers every request with `answer(its URL)`, counting them.
    async fn issuer_answering(
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let base = url.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer(&base).as_bytes()).await;
            }
        });
        (url, hits)
    }

    /// Keys come over TLS, or in the clear from this machine only: an issuer configured as
    /// plain http elsewhere is refused, and so is a discovery document that names plain-http
    /// keys on another host (nothing is fetched from there).
    #[tokio::test]
    async fn keys_are_fetched_over_tls_or_from_this_machine_only() {
        for ok in [
            "https://idp.example.com/realms/a",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert_eq!(OidcConfig::for_issuer(ok).validate(), Ok(()), "{ok}");
        }
        for bad in ["http://idp.example.com", "http://10.0.0.5:8080/realms/a", "http://127.0.0.1.example.com"]
        {
            let e = OidcConfig::for_issuer(bad).validate().unwrap_err();
            assert!(e.contains("plain http"), "{bad}: {e}");
        }
        let (issuer, hits) = issuer_answering(|base| {
            let body = format!(r#"{{"issuer":"{base}","jwks_uri":"http://192.0.2.1/jwks.json"}}"#);
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        })
        .await;
        let v = OidcVerifier::new(OidcConfig::for_issuer(&issuer));
        match v.verify(&token_with_kid("k1")).await {
            Err(AuthError::Provider(e)) => assert!(e.contains("jwks_uri") && e.contains("plain http"), "{e}"),
            other => panic!("{:?}", other.map(|p| p.subject)),
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "the discovery document only");
    }

    /// A token header naming `kid` (its claims and signature are never reached).
    fn token_with_kid(kid: &str) -> String {
        use base64::Engine;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.c2ln", b64(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#)), b64("{}"))
    }

    /// Logins with made-up key ids while the issuer fails cost it one request per
    /// `MIN_REFETCH`, not one each, and fail at once instead of queueing behind fetches.
    #[tokio::test]
    async fn made_up_key_ids_do_not_make_a_fetch_each() {
        let (issuer, hits) = failing_issuer().await;
        let v = Arc::new(OidcVerifier::new(OidcConfig::for_issuer(&issuer)));
        let logins: Vec<_> = (0..20)
            .map(|i| {
                let v = v.clone();
                tokio::spawn(async move { v.verify(&token_with_kid(&format!("kid-{i}"))).await })
            })
            .collect();
        for l in logins {
            assert!(matches!(l.await.unwrap(), Err(AuthError::Provider(_))));
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "one discovery request in all");
        let started = Instant::now();
        assert!(matches!(v.verify(&token_with_kid("another")).await, Err(AuthError::Provider(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn api_keys_match_their_hash_only() {
        let doc = proto::policy::PolicyDocument {
            service_accounts: vec![proto::policy::ServiceAccount {
                name: "etl".into(),
                groups: vec!["batch".into()],
                api_key_sha256: hash_api_key("ak_secret"),
            }],
            ..Default::default()
        };
        let a = Authenticator::new(None);
        let p = a.authenticate("ak_secret", &doc).await.expect("valid key");
        assert_eq!((p.subject.as_str(), p.groups.as_slice()), ("etl", &["batch".to_string()][..]));
        assert!(matches!(a.authenticate("ak_wrong", &doc).await, Err(AuthError::UnknownKey)));
        assert!(matches!(a.authenticate("", &doc).await, Err(AuthError::Missing)));
        assert!(matches!(a.authenticate("eyJa.eyJb.c", &doc).await, Err(AuthError::NoIssuer)));
    }
}
