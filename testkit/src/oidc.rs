//! [`OidcIssuer`]: an OIDC discovery + JWKS endpoint for tests, and token minting.

use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use axum::Json;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The `kid` of the ES256 key.
pub const ES256_KID: &str = "test-es256";
/// The `kid` of the RS256 key.
pub const RS256_KID: &str = "test-rs256";

/// An OIDC issuer on 127.0.0.1: serves `GET /.well-known/openid-configuration` and `GET /jwks.json`
/// from an axum server on its own thread and tokio runtime (so it works from sync and async tests).
///
/// It holds an ES256 key (kid `test-es256`) and an RS256 key (kid `test-rs256`); both public keys
/// are in the JWKS. The server stops on `Drop`.
pub struct OidcIssuer {
    /// `http://127.0.0.1:PORT`, the `iss` claim and the discovery base URL.
    pub issuer: String,
    /// `airlock`, the `aud` claim.
    pub audience: String,
    es256: EncodingKey,
    rs256: EncodingKey,
    stranger: EncodingKey,
    jwks: Value,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OidcIssuer {
    /// Generates the keys and starts serving discovery and JWKS on a free port.
    pub fn start() -> anyhow::Result<OidcIssuer> {
        crate::init_crypto();
        let (es256, es256_jwk) = ec_key(ES256_KID)?;
        let (stranger, _) = ec_key(ES256_KID)?;
        let (rs256, rs256_jwk) = rsa_key()?;
        let jwks = json!({ "keys": [es256_jwk, rs256_jwk] });

        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the OIDC issuer")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let issuer = format!("http://127.0.0.1:{port}");
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/jwks.json"),
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
        });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(move || async move { Json(discovery) }))
            .route(
                "/jwks.json",
                get({
                    let jwks = jwks.clone();
                    move || async move { Json(jwks) }
                }),
            );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the OIDC issuer's runtime")?;
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("testkit-oidc".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "OIDC issuer listener");
                            return;
                        }
                    };
                    // Dropping the runtime on shutdown cancels open connections too.
                    tokio::select! {
                        res = axum::serve(listener, app) => {
                            if let Err(e) = res {
                                tracing::error!(error = %e, "OIDC issuer server");
                            }
                        }
                        _ = rx => {}
                    }
                });
            })
            .context("spawning the OIDC issuer thread")?;
        Ok(OidcIssuer {
            issuer,
            audience: "airlock".to_owned(),
            es256,
            rs256,
            stranger,
            jwks,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `{issuer}/jwks.json`.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks.json", self.issuer)
    }

    /// The JWKS document served at [`OidcIssuer::jwks_uri`].
    pub fn jwks(&self) -> Value {
        self.jwks.clone()
    }

    /// Default claims: `iss`, `aud`, `sub`, `groups`, `iat` = now, `nbf` = now - 5, `exp` = now + 600.
    pub fn claims(&self, sub: &str, groups: &[&str]) -> Value {
        let now = now();
        json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "groups": groups,
            "iat": now,
            "nbf": now - 5,
            "exp": now + 600,
        })
    }

    /// An ES256 token (kid `test-es256`) with the default claims.
    pub fn token(&self, sub: &str, groups: &[&str]) -> String {
        self.token_with(self.claims(sub, groups))
    }

    /// Signs arbitrary claims with the ES256 key (kid `test-es256`).
    pub fn token_with(&self, claims: Value) -> String {
        sign(Algorithm::ES256, ES256_KID, &claims, &self.es256)
    }

    /// An RS256 token (kid `test-rs256`) with the default claims.
    pub fn token_rs256(&self, sub: &str, groups: &[&str]) -> String {
        sign(Algorithm::RS256, RS256_KID, &self.claims(sub, groups), &self.rs256)
    }

    /// Same header and claims as [`OidcIssuer::token`], signed by a different ES256 key.
    pub fn token_signed_by_stranger(&self, sub: &str, groups: &[&str]) -> String {
        sign(Algorithm::ES256, ES256_KID, &self.claims(sub, groups), &self.stranger)
    }

    /// Header `{"alg":"none","typ":"JWT"}`, the default claims and an empty signature: `xxx.yyy.`.
    pub fn token_alg_none(&self, sub: &str, groups: &[&str]) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(self.claims(sub, groups).to_string());
        format!("{header}.{claims}.")
    }
}

impl std::fmt::Debug for OidcIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcIssuer").field("issuer", &self.issuer).field("audience", &self.audience).finish()
    }
}

impl Drop for OidcIssuer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("signing a test token with a key made for it")
}

/// A fresh P-256 key: the signing key and its public JWK.
fn ec_key(kid: &str) -> anyhow::Result<(EncodingKey, Value)> {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| anyhow::anyhow!("encoding a P-256 key as PKCS#8"))?;
    // The public key is the uncompressed point 0x04 || X || Y.
    let point = pair.public_key().as_ref();
    anyhow::ensure!(point.len() == 65 && point[0] == 4, "unexpected P-256 public key encoding");
    let jwk = json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
    });
    Ok((EncodingKey::from_ec_der(pkcs8.as_ref()), jwk))
}

/// A 2048-bit RSA key (generated once per process): the signing key and its public JWK.
fn rsa_key() -> anyhow::Result<(EncodingKey, Value)> {
    static KEY: OnceLock<(EncodingKey, Value)> = OnceLock::new();
    if let Some(key) = KEY.get() {
        return Ok(key.clone());
    }
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("generating an RSA key"))?;
    let pkcs8 = pair.as_der().map_err(|_| anyhow::anyhow!("encoding an RSA key as PKCS#8"))?;
    // jsonwebtoken's from_rsa_der wants PKCS#1; its PEM reader unwraps PKCS#8.
    let b64 = STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).context("loading the RSA key")?;
    let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let jwk = json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(&public.n),
        "e": URL_SAFE_NO_PAD.encode(&public.e),
        "kid": RS256_KID,
        "alg": "RS256",
        "use": "sig",
    });
    Ok(KEY.get_or_init(|| (key, jwk)).clone())
}
