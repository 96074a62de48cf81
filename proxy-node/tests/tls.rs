//! TLS on both sides of the proxy, against a real PostgreSQL with real clients: psql and
//! tokio-postgres (rustls) with `sslmode=require` and `verify-full` to the listener,
//! `client_tls = require` refusing plain clients, and `upstream.tls` (prefer, require,
//! verify-full with the right and a wrong CA) to a target with `ssl = on`. Certificates are
//! made by rcgen for each test.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{ONE_ORDER, Proxy, pg_bindir};
use eventbus::EventBus;
use proxy_node::{ClientTls, ProxyConfig};
use testkit::Postgres;
use testkit::pki::{Pki, make_pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

const KEY: &str = "ak_tls_tests_0123456789abcdef";
const SSL_OF_BACKEND: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
/// The proxy's `auth_timeout` in these tests: long enough for any client to log in on a
/// loaded machine.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    pg: Postgres,
    port: u16,
    _proxy: Proxy,
    pki: Pki,
    dir: tempfile::TempDir,
}

/// A target (with `ssl = on` when `target_ssl`), and the proxy in front of it with a listener
/// certificate and `client_tls`. `connections(pg_port, pw_file, pki, wrong_ca)` writes the
/// policy's connections.
async fn start(
    target_ssl: bool,
    client_tls: Option<ClientTls>,
    connections: impl FnOnce(u16, &str, &Pki, &Path) -> String,
) -> Harness {
    testkit::init_crypto();
    common::init_tracing("proxy_node=debug");
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "good");
    let wrong = make_pki(dir.path(), "wrong");
    let mut pg = Postgres::start().unwrap();
    if target_ssl {
        pg.enable_ssl(&pki.cert_pem, &pki.key_pem).unwrap();
    }
    common::seed_shop(&pg, ONE_ORDER);
    let pw = common::write_password(dir.path());
    let yaml = common::policy_yaml(
        &connections(pg.port, &pw, &pki, &wrong.ca),
        &format!("rules:\n{}", common::NO_DDL),
        &common::service_account("agent", "agents", KEY),
    );
    let cfg = ProxyConfig {
        tls_cert_file: Some(pki.cert.to_str().unwrap().into()),
        tls_key_file: Some(pki.key.to_str().unwrap().into()),
        client_tls,
        auth_timeout: AUTH_TIMEOUT,
        target_password_dir: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    cfg.validate().unwrap();
    let proxy = Proxy::start(cfg, EventBus::memory(), &yaml).await;
    Harness { pg, port: proxy.port, _proxy: proxy, pki, dir }
}

fn connection(name: &str, pg_port: u16, pw: &str, tls: &str) -> String {
    common::connection(name, "127.0.0.1", pg_port, tls, pw)
}

/// psql through the proxy with extra connection settings; (success, stdout, stderr).
async fn psql(port: u16, db: &str, extra: &str, sql: &str) -> (bool, String, String) {
    let mut cmd = Command::new(pg_bindir().join("psql"));
    cmd.args([
        &format!("host=127.0.0.1 port={port} user=agent password={KEY} dbname={db} {extra}"),
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "10");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// A rustls client configuration trusting the test CA.
fn rustls_client(ca: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_with_tls_or_without_when_allowed() {
    // The target has no TLS: `tls: prefer` falls back to plain text, `tls: require` fails.
    let h = start(false, None, |port, pw, _, _| {
        connection("shop", port, pw, "tls: prefer") + &connection("strict", port, pw, "tls: require")
    })
    .await;

    let (ok, out, err) = psql(h.port, "shop", "sslmode=require", "SELECT item FROM orders").await;
    assert!(ok, "{err}");
    assert_eq!(out, "apple");
    let ca = h.pki.ca.display().to_string();
    for host in ["127.0.0.1", "localhost"] {
        let extra = format!("sslmode=verify-full sslrootcert={ca} host={host}");
        let (ok, out, err) = psql(h.port, "shop", &extra, "SELECT count(*) FROM orders").await;
        assert!(ok, "verify-full to {host}: {err}");
        assert_eq!(out, "1");
    }
    // `allow` (the default with a certificate) still serves plain clients.
    let (ok, out, err) = psql(h.port, "shop", "sslmode=disable", "SELECT item FROM orders").await;
    assert!(ok, "{err}");
    assert_eq!(out, "apple");
    // The target connection fell back to plain text.
    let (ok, out, err) = psql(h.port, "shop", "sslmode=require", SSL_OF_BACKEND).await;
    assert!(ok, "{err}");
    assert_eq!(out, "f");
    let (ok, _, err) = psql(h.port, "strict", "sslmode=require", "SELECT 1").await;
    assert!(!ok);
    assert!(err.contains("the target does not accept TLS connections (tls: require)"), "{err}");

    // tokio-postgres over rustls, a pipelined extended-protocol workload and a cancel.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client(&h.pki.ca));
    let (client, conn) = tokio_postgres::Config::new()
        .host("localhost")
        .port(h.port)
        .user("agent")
        .password(KEY)
        .dbname("shop")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(tls.clone())
        .await
        .unwrap();
    tokio::spawn(conn);
    let stmt = client.prepare("SELECT $1::int + id FROM orders").await.unwrap();
    let (a, b) = tokio::join!(client.query_one(&stmt, &[&1i32]), client.query_one(&stmt, &[&2i32]));
    assert_eq!((a.unwrap().get::<_, i32>(0), b.unwrap().get::<_, i32>(0)), (2, 3));
    let big = client.simple_query("SELECT repeat('x', 1000000)").await.unwrap();
    assert_eq!(simple_rows(&big)[0].len(), 1_000_000);
    common::cancel_a_long_query(&h.pg, client, tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_plain_clients_and_survives_garbage_handshakes() {
    let h =
        start(false, Some(ClientTls::Require), |port, pw, _, _| connection("shop", port, pw, "tls: disable"))
            .await;
    let (ok, _, err) = psql(h.port, "shop", "sslmode=disable", "SELECT 1").await;
    assert!(!ok);
    assert!(err.contains("airlock: this listener requires TLS (sslmode=require)"), "{err}");
    let (ok, _, err) = psql(h.port, "shop", "sslmode=prefer gssencmode=prefer", "SELECT 1").await;
    assert!(ok, "{err}");

    // Garbage instead of a ClientHello, and bytes piggybacked on the SSLRequest: each session
    // ends on its own.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    s.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not TLS at all").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0, 0, 0, 8]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("data sent after SSLRequest"), "{rest:?}");
    // Encryption asked for a second time, inside TLS or in the clear, is refused as PostgreSQL
    // refuses it (answering each request would let a client that never reads pile them up).
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&SSL_REQUEST).await.unwrap();
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(&h.pki.ca)));
    let mut t = tls.connect("localhost".try_into().unwrap(), s).await.unwrap();
    t.write_all(&SSL_REQUEST).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest)).await.unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("encryption was already negotiated"), "{rest:?}");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[GSSENC_REQUEST, GSSENC_REQUEST].concat()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest.first(), Some(&b'N'), "{rest:?}");
    assert!(String::from_utf8_lossy(&rest).contains("encryption was already negotiated"), "{rest:?}");
    // A client that never finishes the handshake is dropped at the auth timeout.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(AUTH_TIMEOUT * 2, s.read_to_end(&mut rest)).await.unwrap();

    let (ok, out, err) = psql(h.port, "shop", "sslmode=require", "SELECT item FROM orders").await;
    assert!(ok, "{err}");
    assert_eq!(out, "apple");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_tls_verifies_the_target_and_encrypts() {
    let h = start(true, None, |port, pw, pki, wrong| {
        let ca = pki.ca.display();
        let wrong = wrong.display();
        connection("full", port, pw, &format!("tls: verify-full, ca_file: {ca}"))
            + &connection("wrongca", port, pw, &format!("tls: verify-full, ca_file: {wrong}"))
            + &connection("req", port, pw, "tls: require")
            + &connection("pref", port, pw, "tls: prefer")
            + &connection("plain", port, pw, "tls: disable")
            // Masking looks up column origins on a side connection with the same TLS settings.
            + "masking:\n  - connections: [full]\n    columns: [orders.item]\n    strategy: redact\n"
    })
    .await;
    for (db, ssl) in [("full", "t"), ("req", "t"), ("pref", "t"), ("plain", "f")] {
        let (ok, out, err) = psql(h.port, db, "sslmode=require", SSL_OF_BACKEND).await;
        assert!(ok, "{db}: {err}");
        assert_eq!(out, ssl, "{db}");
        let (ok, out, err) = psql(h.port, db, "sslmode=require", "SELECT item FROM orders").await;
        assert!(ok, "{db}: {err}");
        if db == "full" {
            assert!(!out.is_empty() && out != "apple", "masked: {out}");
        } else {
            assert_eq!(out, "apple");
        }
    }

    // A wrong CA: the client is told why and nothing reaches the target.
    let (ok, out, err) =
        psql(h.port, "wrongca", "sslmode=require", "INSERT INTO orders VALUES (9, 'fig')").await;
    assert!(!ok);
    assert_eq!(out, "");
    assert!(err.contains("cannot connect to the target"), "{err}");
    assert!(err.contains("certificate verification failed (tls: verify-full)"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(h.pg.psql("shop", "SELECT count(*) FROM orders").unwrap(), "1");

    // Cancel requests reach a TLS target's backend.
    let client = common::connect(h.port, "agent", KEY, "full").await;
    common::cancel_a_long_query(&h.pg, client, tokio_postgres::NoTls).await;
    let _ = &h.dir;
}

#[test]
fn bad_tls_settings_are_refused_at_start() {
    testkit::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "cfg");
    let path = |p: &Path| Some(p.to_str().unwrap().to_string());
    let err = |cfg: ProxyConfig| cfg.validate().unwrap_err();
    let only_cert = ProxyConfig { tls_cert_file: path(&pki.cert), ..Default::default() };
    assert!(err(only_cert).contains("set both or neither"));
    let no_cert = ProxyConfig { client_tls: Some(ClientTls::Require), ..Default::default() };
    assert!(err(no_cert).contains("needs proxy.tls_cert_file"));
    let missing = ProxyConfig {
        tls_cert_file: Some("/nonexistent.pem".into()),
        tls_key_file: path(&pki.key),
        ..Default::default()
    };
    assert!(err(missing).contains("proxy.tls_cert_file /nonexistent.pem"));
    let swapped =
        ProxyConfig { tls_cert_file: path(&pki.key), tls_key_file: path(&pki.cert), ..Default::default() };
    assert!(err(swapped).contains("no PEM certificate"));
    let other = make_pki(dir.path(), "other");
    let mismatched =
        ProxyConfig { tls_cert_file: path(&pki.cert), tls_key_file: path(&other.key), ..Default::default() };
    let e = err(mismatched);
    assert!(e.contains("proxy.tls_cert_file"), "{e}");
    let good =
        ProxyConfig { tls_cert_file: path(&pki.cert), tls_key_file: path(&pki.key), ..Default::default() };
    good.validate().unwrap();
    assert_eq!(good.client_tls(), ClientTls::Allow);
    assert_eq!(ProxyConfig::default().client_tls(), ClientTls::Disable);
}
