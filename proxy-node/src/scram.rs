//! SCRAM-SHA-256 as a client (RFC 5802 and RFC 7677), the way PostgreSQL runs it: no channel
//! binding, an empty user name (the server takes the startup message's), and the password
//! prepared with SASLprep when it can be.
//!
//! The costly part of a handshake is the salted password, PBKDF2 over the server's iteration
//! count (4096 by default: about half of the proxy's CPU for a new session). It depends only on
//! the password, the role's salt and the iteration count, so it is computed once, off the
//! runtime's threads, and kept: every session after the first to the same target role only
//! pays for a few HMACs. Everything that proves anything is still computed afresh per
//! handshake from both nonces, and the server's signature is checked every time.

use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The most PBKDF2 iterations a server may ask for. PostgreSQL's default is 4096 (its
/// `scram_iterations`); a server, or someone between it and the gateway, asking for billions
/// would otherwise keep a thread busy for minutes.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Salted passwords kept. One per target role is needed; more are kept for rotations.
const KEPT: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed server message: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend the client's")]
    Nonce,
    #[error("the server asks for {0} iterations (at most {MAX_ITERATIONS} are accepted)")]
    Iterations(u64),
    #[error("the server asks for a mandatory extension")]
    Extension,
    #[error("the server refused the proof: {0}")]
    Refused(String),
    #[error("the server's signature is wrong: it does not know the password")]
    Signature,
    #[error("the salted password could not be computed")]
    Compute,
}

/// One handshake, from the client's first message to the check of the server's last.
pub struct Scram {
    password: Arc<[u8]>,
    nonce: String,
    client_first_bare: String,
    /// The server signature to expect, once the proof is sent.
    expect: Option<[u8; 32]>,
}

impl Scram {
    /// Start a handshake with a fresh random nonce.
    pub fn new(password: &[u8]) -> Self {
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        Self::with_nonce(password, B64.encode(raw))
    }

    fn with_nonce(password: &[u8], nonce: String) -> Self {
        Scram {
            password: normalize(password).into(),
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            expect: None,
        }
    }

    /// The client-first message (gs2 header `n,,`: no channel binding).
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The client-final message (with the proof) for the server-first message.
    pub async fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let first = ServerFirst::parse(server_first, &self.nonce)?;
        let salted = salted_password(self.password.clone(), first.salt, first.iterations).await?;
        let (message, expect) = self.prove(&salted, server_first, first.nonce);
        self.expect = Some(expect);
        Ok(message)
    }

    /// The client-final message and the server signature to expect, from the salted password.
    fn prove(&self, salted: &[u8; 32], server_first: &[u8], nonce: &str) -> (Vec<u8>, [u8; 32]) {
        let without_proof = format!("c=biws,r={nonce}");
        let mut auth =
            Vec::with_capacity(self.client_first_bare.len() + server_first.len() + without_proof.len() + 2);
        auth.extend_from_slice(self.client_first_bare.as_bytes());
        auth.push(b',');
        auth.extend_from_slice(server_first);
        auth.push(b',');
        auth.extend_from_slice(without_proof.as_bytes());
        let client_key = hmac(salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, &auth);
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(salted, b"Server Key");
        let message = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        (message, hmac(&server_key, &auth))
    }

    /// Check the server-final message: the server proves it knows the password too.
    pub fn verify_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let expect = self.expect.ok_or(ScramError::Malformed("a final message before the proof"))?;
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::Refused(e.chars().take(200).collect()));
        }
        let v = text
            .split(',')
            .next()
            .and_then(|a| a.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no verifier"))?;
        let got = B64.decode(v).map_err(|_| ScramError::Malformed("verifier is not base64"))?;
        if got.len() == expect.len() && bool::from(got.ct_eq(&expect)) {
            Ok(())
        } else {
            Err(ScramError::Signature)
        }
    }
}

struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    iterations: u32,
}

impl<'a> ServerFirst<'a> {
    /// `[m=...,]r=nonce,s=salt,i=count[,extensions]`, the nonce extending `ours`.
    fn parse(msg: &'a [u8], ours: &str) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attrs = text.split(',');
        let mut next = |name: &'static str| {
            attrs.next().and_then(|a| a.strip_prefix(name)).ok_or(ScramError::Malformed(name))
        };
        if text.starts_with("m=") {
            return Err(ScramError::Extension);
        }
        let nonce = next("r=")?;
        // Printable ASCII but ',', and longer than ours: the server added its part.
        if nonce.len() <= ours.len()
            || !nonce.starts_with(ours)
            || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Nonce);
        }
        let salt = B64.decode(next("s=")?).map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let count = next("i=")?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ScramError::Malformed("i="));
        }
        let iterations: u64 = count.parse().unwrap_or(u64::MAX);
        if iterations == 0 || iterations > u64::from(MAX_ITERATIONS) {
            return Err(ScramError::Iterations(iterations));
        }
        Ok(ServerFirst { nonce, salt, iterations: iterations as u32 })
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

/// The password as SCRAM hashes it: SASLprep'd when it is UTF-8 and SASLprep accepts it, else
/// its bytes as they are (PostgreSQL does the same when it stores the verifier).
fn normalize(pw: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(pw).ok().map(stringprep::saslprep) {
        Some(Ok(p)) => p.into_owned().into_bytes(),
        _ => pw.to_vec(),
    }
}

/// `Hi(password, salt, iterations)` (PBKDF2-HMAC-SHA-256, one block).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = <HmacSha256 as Mac>::new_from_slice(password).unwrap_or_else(|_| unreachable!());
    let mut m = keyed.clone();
    m.update(salt);
    m.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut m = keyed.clone();
        m.update(&u);
        u = m.finalize().into_bytes().into();
        out.iter_mut().zip(u).for_each(|(o, b)| *o ^= b);
    }
    out
}

/// The kept salted passwords, by a digest of the password, the salt and the iteration count.
type Kept = Mutex<crate::Map<[u8; 32], [u8; 32]>>;

fn kept() -> &'static Kept {
    static KEPT_SALTED: OnceLock<Kept> = OnceLock::new();
    KEPT_SALTED.get_or_init(Default::default)
}

/// The keys of the salted passwords computed (not found kept), for tests.
#[cfg(test)]
static COMPUTED: Mutex<Vec<[u8; 32]>> = Mutex::new(Vec::new());

/// What a salted password is kept under: a digest of the password, the salt and the count.
fn cache_key(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [password, salt] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(iterations.to_be_bytes());
    h.finalize().into()
}

/// `Hi(password, salt, iterations)`, kept or computed on a blocking thread.
async fn salted_password(
    password: Arc<[u8]>,
    salt: Vec<u8>,
    iterations: u32,
) -> Result<[u8; 32], ScramError> {
    let key = cache_key(&password, &salt, iterations);
    let lock = || kept().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = lock().get(&key) {
        return Ok(*s);
    }
    // One computation at a time: sessions opening together compute it once (the others find
    // it kept), and a target asking for many iterations holds one thread, not one per session.
    static COMPUTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = COMPUTING.lock().await;
    if let Some(s) = lock().get(&key) {
        return Ok(*s);
    }
    #[cfg(test)]
    COMPUTED.lock().unwrap_or_else(|p| p.into_inner()).push(key);
    let salted = tokio::task::spawn_blocking(move || hi(&password, &salt, iterations))
        .await
        .map_err(|_| ScramError::Compute)?;
    let mut kept = lock();
    if kept.len() >= KEPT {
        kept.clear();
    }
    kept.insert(key, salted);
    Ok(salted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange, with PostgreSQL's empty user name in place of `user`
    /// (the user name is part of what is signed, so the proof and verifier differ from the
    /// RFC's; the RFC's own are checked with its `n=user` below).
    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";

    #[test]
    fn rfc_7677_example_exchange() {
        let mut s = Scram::with_nonce(b"pencil", NONCE.into());
        s.client_first_bare = format!("n=user,r={NONCE}");
        let salted = hi(b"pencil", &B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(), 4096);
        let (message, expect) =
            s.prove(&salted, SERVER_FIRST.as_bytes(), &SERVER_FIRST[2..SERVER_FIRST.find(',').unwrap()]);
        assert_eq!(
            String::from_utf8(message).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.expect = Some(expect);
        s.verify_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
    }

    #[tokio::test]
    async fn the_salted_password_is_computed_once_and_the_proof_every_time() {
        let salt = B64.encode(b"a salt of this test");
        let first = format!("r={NONCE}server,s={salt},i=4096");
        let mut a = Scram::with_nonce(b"unique to this test", NONCE.into());
        let pa = a.client_final(first.as_bytes()).await.unwrap();
        let first2 = format!("r={NONCE}other,s={salt},i=4096");
        let mut b = Scram::with_nonce(b"unique to this test", NONCE.into());
        let pb = b.client_final(first2.as_bytes()).await.unwrap();
        assert_eq!(computed(b"unique to this test", b"a salt of this test"), 1);
        // Another server nonce: another proof, another expected signature.
        assert_ne!(pa, pb);
        assert_ne!(a.expect, b.expect);
        // Another password with the same salt is not served the first one's.
        let mut c = Scram::with_nonce(b"another password", NONCE.into());
        c.client_final(first.as_bytes()).await.unwrap();
        assert_ne!(a.expect, c.expect);
    }

    /// Sessions that open together compute a salted password once between them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_handshakes_compute_the_salted_password_once() {
        let salt = B64.encode(b"a salt for concurrent handshakes");
        let handshakes: Vec<_> = (0..8)
            .map(|i| {
                let first = format!("r={NONCE}s{i},s={salt},i=4096");
                tokio::spawn(async move {
                    let mut s = Scram::with_nonce(b"concurrent password", NONCE.into());
                    s.client_final(first.as_bytes()).await.unwrap()
                })
            })
            .collect();
        for h in handshakes {
            h.await.unwrap();
        }
        assert_eq!(computed(b"concurrent password", b"a salt for concurrent handshakes"), 1);
    }

    /// How many times the salted password of `password` and `salt` (4096 iterations) was
    /// computed in this process.
    fn computed(password: &[u8], salt: &[u8]) -> usize {
        let key = cache_key(&normalize(password), salt, 4096);
        COMPUTED.lock().unwrap().iter().filter(|k| **k == key).count()
    }

    #[tokio::test]
    async fn a_server_that_does_not_play_by_the_rules_is_refused() {
        let salt = B64.encode(b"salt");
        let cases: [(String, ScramError); 9] = [
            (format!("r=someoneelse,s={salt},i=4096"), ScramError::Nonce),
            // Our nonce, with nothing of the server's.
            (format!("r={NONCE},s={salt},i=4096"), ScramError::Nonce),
            (format!("r={NONCE}x\u{7f},s={salt},i=4096"), ScramError::Nonce),
            (format!("m=ext,r={NONCE}x,s={salt},i=4096"), ScramError::Extension),
            (format!("r={NONCE}x,s={salt},i=0"), ScramError::Iterations(0)),
            (format!("r={NONCE}x,s={salt},i=4294967296"), ScramError::Iterations(4_294_967_296)),
            (format!("r={NONCE}x,s={salt},i=-1"), ScramError::Malformed("i=")),
            (format!("r={NONCE}x,s=!!,i=4096"), ScramError::Malformed("salt is not base64")),
            (format!("r={NONCE}x,i=4096,s={salt}"), ScramError::Malformed("s=")),
        ];
        for (msg, want) in cases {
            let mut s = Scram::with_nonce(b"pw", NONCE.into());
            assert_eq!(s.client_final(msg.as_bytes()).await.unwrap_err(), want, "{msg}");
        }
        let mut s = Scram::with_nonce(b"pw", NONCE.into());
        assert_eq!(
            s.verify_final(b"v=AAAA").unwrap_err(),
            ScramError::Malformed("a final message before the proof")
        );
        s.client_final(format!("r={NONCE}x,s={salt},i=4096").as_bytes()).await.unwrap();
        for (last, want) in [
            (&b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="[..], ScramError::Signature),
            (b"v=", ScramError::Signature),
            (b"v=***", ScramError::Malformed("verifier is not base64")),
            (b"e=invalid-proof", ScramError::Refused("invalid-proof".into())),
            (b"\xff", ScramError::Malformed("not UTF-8")),
            (b"", ScramError::Malformed("no verifier")),
        ] {
            assert_eq!(s.verify_final(last).unwrap_err(), want, "{last:?}");
        }
    }

    #[test]
    fn passwords_are_prepared_as_postgresql_prepares_them() {
        // SASLprep maps a non-ASCII space to a space and drops soft hyphens; bytes that are not
        // UTF-8, or text SASLprep refuses, are used as they are.
        assert_eq!(normalize("a\u{00A0}b\u{00AD}c".as_bytes()), b"a bc");
        assert_eq!(normalize(b"\xffraw"), b"\xffraw");
        assert_eq!(normalize("a\u{0007}".as_bytes()), "a\u{0007}".as_bytes());
    }
}
