//! Authentication at the proxy, adversarially: forged tokens (algorithm confusion, keys offered
//! in the token's own header, another key under a trusted `kid`), claims of the wrong shape, keys
//! the issuer published for something else, what made-up key ids cost the issuer, and malformed
//! password messages.
//!
//! The issuer is a small HTTP server of the test's own (discovery and JWKS, counting every
//! request) whose keys the test holds. Clients log in to a database no connection names: one the
//! proxy authenticated is told so (3D000), one it refused gets 28P01 (or 08P01 for a broken
//! message), and no target is needed to tell the two apart.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::Proxy;
use eventbus::EventBus;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use proxy_node::ProxyConfig;
use proxy_node::identity::OidcConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_KEY: &str = "ak_auth_tests_0123456789abcdef";
/// Authenticated: the proxy says the database names no connection.
const IN: &str = "3D000";
/// Refused: invalid password.
const REFUSED: &str = "28P01";
/// Refused: a protocol violation.
const PROTOCOL: &str = "08P01";
const WAIT: Duration = Duration::from_secs(15);

/// An OIDC issuer on 127.0.0.1: discovery at `/.well-known/openid-configuration`, its keys at
/// `/jwks.json`, and an attacker's keys at `/attacker/jwks.json` (where a token's `jku` or `x5u`
/// points). Every request's path is recorded.
struct Issuer {
    url: String,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Issuer {
    async fn start(jwks: Value, attacker_jwks: Value) -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/jwks.json") });
        let seen = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (seen, discovery, jwks, attacker) =
                    (seen.clone(), discovery.clone(), jwks.clone(), attacker_jwks.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&req);
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    seen.lock().unwrap().push(path.clone());
                    let (status, body) = match path.as_str() {
                        "/.well-known/openid-configuration" => ("200 OK", discovery.to_string()),
                        "/jwks.json" => ("200 OK", jwks.to_string()),
                        p if p.starts_with("/attacker/") => ("200 OK", attacker.to_string()),
                        _ => ("404 Not Found", "{}".to_string()),
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        Issuer { url, hits }
    }

    /// How many requests asked for a path starting with `prefix`.
    fn hits(&self, prefix: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|p| p.starts_with(prefix)).count()
    }
}

/// A P-256 key: to sign with, and its public JWK (with `kid`, no `alg` or `use`).
struct Key {
    sign: EncodingKey,
    public: Value,
    /// Its self-signed certificate's DER, base64 (for an `x5c` header).
    cert: String,
}

fn key(dir: &Path, name: &str, kid: &str) -> Key {
    let pki = testkit::pki::make_pki(dir, name);
    let sign = EncodingKey::from_ec_pem(pki.key_pem.as_bytes()).unwrap();
    let mut public = serde_json::to_value(Jwk::from_encoding_key(&sign, Algorithm::ES256).unwrap()).unwrap();
    let o = public.as_object_mut().unwrap();
    o.remove("alg");
    o.insert("kid".into(), kid.into());
    let cert: String = pki.cert_pem.lines().filter(|l| !l.starts_with("-----")).collect::<Vec<_>>().concat();
    Key { sign, public, cert }
}

/// `public` with these members set.
fn with(public: &Value, set: Value) -> Value {
    let mut v = public.clone();
    for (k, x) in set.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// A compact JWS of `claims` under `header`, signed with `key` as `alg`.
fn jws(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// An ES256 token of `claims` signed with `key`, its header naming `kid`.
fn es256(key: &Key, kid: &str, claims: &Value) -> String {
    jws(&json!({ "alg": "ES256", "typ": "JWT", "kid": kid }), claims, &key.sign, Algorithm::ES256)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims the proxy accepts from `iss`.
fn claims(iss: &str) -> Value {
    let now = now();
    json!({ "iss": iss, "aud": "airlock", "sub": "agent-1", "groups": ["agents"],
            "iat": now, "nbf": now - 5, "exp": now + 600 })
}

/// The proxy, trusting `issuer` for tokens and one service account's API key; its port.
async fn proxy(issuer: &str) -> u16 {
    testkit::init_crypto();
    let yaml = common::policy_yaml(
        "  - name: shop\n    kind: postgres\n    upstream: { host: 127.0.0.1, port: 1, database: shop }\n    \
         credentials: { user: svc, password_env: SHOP_DB_PASSWORD }\n",
        "",
        &common::service_account("etl", "batch", API_KEY),
    );
    let cfg = ProxyConfig {
        oidc: Some(OidcConfig::for_issuer(issuer)),
        auth_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    cfg.validate().unwrap();
    Proxy::start(cfg, EventBus::memory(), &yaml).await.detach()
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&i32::try_from(body.len() + 4).unwrap().to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Log in to the database `nowhere`, answering the password request with a `tag` message of
/// `body`; the SQLSTATE and message of the proxy's answer (`closed` if it sent none).
async fn answer(port: u16, tag: u8, body: &[u8]) -> (String, String) {
    let talk = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut startup = vec![0, 3, 0, 0];
        startup.extend_from_slice(b"user\0ANY\0database\0nowhere\0\0");
        let mut pkt = i32::try_from(startup.len() + 4).unwrap().to_be_bytes().to_vec();
        pkt.extend(startup);
        s.write_all(&pkt).await.unwrap();
        let mut buf = Vec::new();
        let mut sent = false;
        loop {
            while buf.len() >= 5 {
                let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 1 + len {
                    break;
                }
                let msg: Vec<u8> = buf.drain(..1 + len).collect();
                match msg[0] {
                    b'R' if !sent => {
                        assert_eq!(&msg[5..9], &[0, 0, 0, 3], "a cleartext password request");
                        s.write_all(&frame(tag, body)).await.unwrap();
                        sent = true;
                    }
                    b'E' => {
                        let mut code = String::new();
                        let mut message = String::new();
                        for field in msg[5..].split(|&b| b == 0) {
                            match field.first() {
                                Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
                                Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into(),
                                _ => {}
                            }
                        }
                        return (code, message);
                    }
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return ("closed".to_string(), String::new()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, talk).await.expect("the proxy answered")
}

/// [`answer`] for a password.
async fn login(port: u16, password: &str) -> (String, String) {
    answer(port, b'p', &[password.as_bytes(), b"\0"].concat()).await
}

/// The cases whose SQLSTATE is not `want`, and what they got.
async fn mismatches(port: u16, want: &str, cases: &[(&str, String)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (what, token) in cases {
        let (code, message) = login(port, token).await;
        if code != want {
            wrong.push(format!("{what}: {code} instead of {want}: {message}"));
        }
    }
    wrong
}

/// Every case's SQLSTATE is `want`; says which were not.
async fn expect(port: u16, want: &str, cases: &[(&str, String)]) {
    let wrong = mismatches(port, want, cases).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Tokens no issuer made, or made for someone else, or of the wrong shape: refused, and the
/// proxy never fetches keys from where a token points (`jku`, `x5u`). (Regression tests: the
/// proxy already refused all of these; `airlock/tests/e2e.rs` covers a plainly wrong audience,
/// issuer, signature, expiry and `alg: none`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misshapen_tokens_are_refused_and_point_the_proxy_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = key(dir.path(), "trusted", "k1");
    let attacker = key(dir.path(), "attacker", "attacker");
    // The RSA key of another issuer's JWKS, published here too: its public half is public.
    let other = testkit::OidcIssuer::start().unwrap();
    let rsa = other.jwks()["keys"].as_array().unwrap().iter().find(|k| k["kty"] == "RSA").unwrap().clone();
    let jwks = json!({ "keys": [trusted.public, rsa] });
    let issuer = Issuer::start(jwks.clone(), json!({ "keys": [attacker.public] })).await;
    let port = proxy(&issuer.url).await;
    let iss = issuer.url.as_str();
    let good = claims(iss);
    let changed = |set: Value| with(&good, set);
    let without = |field: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(field);
        c
    };
    let now = now();

    // The harness tells an authenticated client from a refused one.
    let aud_list = changed(json!({ "aud": ["someone-else", "airlock"] }));
    expect(
        port,
        IN,
        &[
            ("a good token", es256(&trusted, "k1", &good)),
            ("aud, a list with ours", es256(&trusted, "k1", &aud_list)),
            ("exp inside the 30s leeway", es256(&trusted, "k1", &changed(json!({ "exp": now - 10 })))),
            ("the API key", API_KEY.to_string()),
        ],
    )
    .await;

    // HS256 keyed with what the JWKS publishes of the RSA key: its modulus, its JWK, its `n`.
    let n = URL_SAFE_NO_PAD.decode(rsa["n"].as_str().unwrap()).unwrap();
    let hs256 = |secret: &[u8]| {
        let header = json!({ "alg": "HS256", "typ": "JWT", "kid": rsa["kid"] });
        jws(&header, &good, &EncodingKey::from_secret(secret), Algorithm::HS256)
    };
    let unsigned = |alg: &str| {
        let header = URL_SAFE_NO_PAD.encode(json!({ "alg": alg, "kid": "k1" }).to_string());
        format!("{header}.{}.", URL_SAFE_NO_PAD.encode(good.to_string()))
    };
    // The attacker's own key, offered in the header in every way a header can offer one.
    let offered = |extra: Value| {
        let header = with(&json!({ "alg": "ES256", "typ": "JWT" }), extra);
        jws(&header, &good, &attacker.sign, Algorithm::ES256)
    };
    let forged = [
        ("HS256 keyed with the RSA modulus", hs256(&n)),
        ("HS256 keyed with the RSA JWK", hs256(rsa.to_string().as_bytes())),
        ("HS256 keyed with the RSA n as text", hs256(rsa["n"].as_str().unwrap().as_bytes())),
        ("alg none", unsigned("none")),
        ("alg None", unsigned("None")),
        ("alg NONE", unsigned("NONE")),
        ("an embedded jwk, the trusted kid", offered(json!({ "kid": "k1", "jwk": attacker.public }))),
        ("an embedded jwk, its own kid", offered(json!({ "kid": "attacker", "jwk": attacker.public }))),
        (
            "jku to the attacker's keys",
            offered(json!({ "kid": "attacker", "jku": format!("{iss}/attacker/jwks.json") })),
        ),
        (
            "x5u to the attacker's keys",
            offered(json!({ "kid": "attacker", "x5u": format!("{iss}/attacker/x5u") })),
        ),
        (
            "x5c with the attacker's certificate",
            offered(json!({ "kid": "attacker", "x5c": [attacker.cert] })),
        ),
        ("another key under the trusted kid", es256(&attacker, "k1", &good)),
        ("an EC signature under the RSA key's kid", es256(&attacker, rsa["kid"].as_str().unwrap(), &good)),
        ("no kid, another key", offered(json!({}))),
    ];
    expect(port, REFUSED, &forged).await;
    assert_eq!(issuer.hits("/attacker"), 0, "the proxy fetched what a token pointed at");

    let misshapen = [
        ("no exp", without("exp")),
        ("exp a string", changed(json!({ "exp": (now + 600).to_string() }))),
        ("exp null", changed(json!({ "exp": null }))),
        ("exp negative", changed(json!({ "exp": -1 }))),
        ("expired past the leeway", changed(json!({ "exp": now - 60 }))),
        ("nbf past the leeway", changed(json!({ "nbf": now + 60 }))),
        ("nbf a string", changed(json!({ "nbf": "0" }))),
        ("no aud", without("aud")),
        ("aud, a list without ours", changed(json!({ "aud": ["someone-else"] }))),
        ("aud, an empty list", changed(json!({ "aud": [] }))),
        ("aud in another case", changed(json!({ "aud": "Airlock" }))),
        ("no iss", without("iss")),
        ("iss with a trailing slash", changed(json!({ "iss": format!("{iss}/") }))),
        ("iss of another issuer", changed(json!({ "iss": other.issuer }))),
        ("no sub", without("sub")),
        ("sub empty", changed(json!({ "sub": "" }))),
        ("sub a number", changed(json!({ "sub": 42 }))),
        ("the subject of the service account", changed(json!({ "sub": "etl" }))),
    ];
    let misshapen: Vec<(&str, String)> =
        misshapen.iter().map(|(w, c)| (*w, es256(&trusted, "k1", c))).collect();
    expect(port, REFUSED, &misshapen).await;

    // Any one character of a good token changed (its header, claims or signature, or a dot):
    // refused.
    let token = es256(&trusted, "k1", &good);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut next = |n: usize| rand::Rng::random_range(&mut rng, 0..n);
    let mut mutated = Vec::new();
    while mutated.len() < 150 {
        let (at, c) = (next(token.len()), alphabet[next(alphabet.len())]);
        if token.as_bytes()[at] != c {
            let mut t = token.clone().into_bytes();
            t[at] = c;
            mutated.push(("a good token with one character changed", String::from_utf8(t).unwrap()));
        }
    }
    expect(port, REFUSED, &mutated).await;

    // A token as large as a password message may be is read whole; a larger one is refused at
    // once, not read.
    let padded = changed(json!({ "pad": "x".repeat(40 * 1024) }));
    expect(port, IN, &[("a valid 55 KiB token", es256(&trusted, "k1", &padded))]).await;
    let huge = changed(json!({ "pad": "x".repeat(80 * 1024) }));
    let (code, message) = login(port, &es256(&trusted, "k1", &huge)).await;
    assert_eq!(code, PROTOCOL, "{message}");
    assert!(message.contains("exceeds"), "{message}");
    // Still serving.
    assert_eq!(login(port, &es256(&trusted, "k1", &good)).await.0, IN);
}

/// A key verifies only what its issuer published it for: not a key marked for encryption
/// (`use`), for other operations (`key_ops`), or for another algorithm (`alg`). And of two keys
/// sharing a `kid` (a signing and an encryption key), the signing key is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_verify_only_what_the_issuer_published_them_for() {
    let dir = tempfile::tempdir().unwrap();
    let plain = key(dir.path(), "plain", "plain");
    let sig = key(dir.path(), "sig", "sig");
    let enc = key(dir.path(), "enc", "enc");
    let other_alg = key(dir.path(), "es384", "es384");
    let ops = key(dir.path(), "ops", "ops");
    let rotated_enc = key(dir.path(), "rot-enc", "rot");
    let rotated_sig = key(dir.path(), "rot-sig", "rot");
    let jwks = json!({ "keys": [
        plain.public,
        with(&sig.public, json!({ "use": "sig", "alg": "ES256", "key_ops": ["verify"] })),
        with(&enc.public, json!({ "use": "enc" })),
        with(&other_alg.public, json!({ "alg": "ES384" })),
        with(&ops.public, json!({ "key_ops": ["encrypt", "wrapKey"] })),
        with(&rotated_enc.public, json!({ "use": "enc" })),
        with(&rotated_sig.public, json!({ "use": "sig" })),
    ]});
    let issuer = Issuer::start(jwks, json!({ "keys": [] })).await;
    let port = proxy(&issuer.url).await;
    let c = claims(&issuer.url);
    let mut wrong = mismatches(
        port,
        IN,
        &[
            ("a key with no use or alg", es256(&plain, "plain", &c)),
            ("a signing key for ES256", es256(&sig, "sig", &c)),
            ("the signing key of two under one kid", es256(&rotated_sig, "rot", &c)),
        ],
    )
    .await;
    wrong.extend(
        mismatches(
            port,
            REFUSED,
            &[
                ("a key for encryption", es256(&enc, "enc", &c)),
                ("a key for ES384", es256(&other_alg, "es384", &c)),
                ("a key for encrypt and wrapKey", es256(&ops, "ops", &c)),
                ("the encryption key of two under one kid", es256(&rotated_enc, "rot", &c)),
            ],
        )
        .await,
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A token is from one issuer (`iss` a list that includes ours is not ours), and a header that
/// says some extension must be understood (`crit`) is refused: the proxy understands none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_lists_and_critical_extensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = key(dir.path(), "trusted", "k1");
    let issuer = Issuer::start(json!({ "keys": [trusted.public] }), json!({ "keys": [] })).await;
    let port = proxy(&issuer.url).await;
    let c = claims(&issuer.url);
    assert_eq!(login(port, &es256(&trusted, "k1", &c)).await.0, IN);
    let listed = with(&c, json!({ "iss": ["https://tenant-b.example.com", issuer.url] }));
    let crit =
        json!({ "alg": "ES256", "kid": "k1", "crit": ["urn:example:bound"], "urn:example:bound": true });
    expect(
        port,
        REFUSED,
        &[
            ("iss, a list with ours", es256(&trusted, "k1", &listed)),
            ("a critical extension", jws(&crit, &c, &trusted.sign, Algorithm::ES256)),
        ],
    )
    .await;
}

/// Logins with made-up key ids (or none, where the issuer has several keys) cost a working issuer
/// no request at all while its keys are fresh and the last fetch is recent: a stranger cannot make
/// the proxy hammer it. (Regression test; a unit test covers an issuer that is down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_key_ids_do_not_send_the_proxy_to_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = key(dir.path(), "trusted", "k1");
    let second = key(dir.path(), "second", "k2");
    let stranger = key(dir.path(), "stranger", "x");
    let issuer =
        Issuer::start(json!({ "keys": [trusted.public, second.public] }), json!({ "keys": [] })).await;
    let port = proxy(&issuer.url).await;
    let c = claims(&issuer.url);
    assert_eq!(login(port, &es256(&trusted, "k1", &c)).await.0, IN);
    assert_eq!(issuer.hits("/jwks.json"), 1);
    let started = std::time::Instant::now();
    let logins: Vec<_> = (0..40)
        .map(|i| {
            let token = if i % 4 == 0 {
                let header = json!({ "alg": "ES256", "typ": "JWT" });
                jws(&header, &c, &stranger.sign, Algorithm::ES256)
            } else {
                es256(&stranger, &format!("made-up-{i}"), &c)
            };
            tokio::spawn(async move { login(port, &token).await.0 })
        })
        .collect();
    for l in logins {
        assert_eq!(l.await.unwrap(), REFUSED);
    }
    assert!(started.elapsed() < Duration::from_secs(8), "the test outlived the refetch interval");
    assert_eq!(issuer.hits("/jwks.json"), 1, "made-up key ids sent the proxy to the issuer");
    assert_eq!(issuer.hits("/.well-known"), 1);
    // Known keys still work at once.
    assert_eq!(login(port, &es256(&second, "k2", &c)).await.0, IN);
    assert_eq!(issuer.hits("/jwks.json"), 1);
}

/// A password message that is not one UTF-8 string, or not a password message at all, is
/// refused as what it is; the proxy keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_password_messages_are_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = key(dir.path(), "trusted", "k1");
    let issuer = Issuer::start(json!({ "keys": [trusted.public] }), json!({ "keys": [] })).await;
    let port = proxy(&issuer.url).await;
    let not_a_string: [(&str, &[u8]); 4] = [
        ("not UTF-8", b"ak_\xff\xfe\0"),
        ("no NUL", b"ak_auth_tests_0123456789abcdef"),
        ("a NUL inside", b"ak_auth_tests\0_0123456789abcdef\0"),
        ("empty", b""),
    ];
    for (what, body) in not_a_string {
        let (code, message) = answer(port, b'p', body).await;
        assert_eq!(code, PROTOCOL, "{what}: {message}");
        assert!(message.contains("UTF-8 string"), "{what}: {message}");
    }
    let (code, message) = answer(port, b'Q', b"SELECT 1\0").await;
    assert_eq!(
        (code.as_str(), message.contains("expected a password message")),
        (PROTOCOL, true),
        "{message}"
    );
    let (code, message) = login(port, "").await;
    assert_eq!(code, REFUSED, "{message}");
    assert!(message.contains("no credential"), "{message}");
    // Non-ASCII but valid UTF-8 is a credential like any other: an unknown one.
    let (code, message) = login(port, "clé-ünïcödé").await;
    assert_eq!(code, REFUSED, "{message}");
    assert_eq!(login(port, API_KEY).await.0, IN);
}
