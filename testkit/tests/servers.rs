//! Each testkit server starts, works, and goes away.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde_json::Value;
use testkit::{Nats, OidcIssuer, Postgres, Proc, S3, free_port, wait_for_port};

fn port_is_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn proc_logs_output_and_dies_on_drop() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo hello-out; echo hello-err >&2; exec sleep 60"]);
    let proc = Proc::spawn(cmd, "sleeper").unwrap();
    let pid = proc.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !proc.log().contains("hello-err") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = proc.log();
    assert!(log.contains("hello-out") && log.contains("hello-err"), "log: {log}");
    drop(proc);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists");
}

#[test]
fn proc_terminate_stops_the_process() {
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let mut proc = Proc::spawn(cmd, "sleep").unwrap();
    proc.terminate();
    assert!(proc.try_wait().is_some());
}

#[test]
fn wait_for_port_times_out_on_a_closed_port() {
    let port = free_port();
    assert!(wait_for_port(port, Duration::from_millis(200)).is_err());
}

#[tokio::test]
async fn nats_accepts_jetstream_publish_and_survives_restart() {
    let mut nats = Nats::start().unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TEST".into(),
        subjects: vec!["test.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js.publish("test.one", "hello".into()).await.unwrap().await.unwrap();
    assert_eq!(ack.stream, "TEST");
    assert_eq!(ack.sequence, 1);

    nats.stop();
    assert!(!port_is_open(nats.port));
    nats.start_again().unwrap();

    // The stream and its message are still there (same store dir).
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("TEST").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let port = nats.port;
    drop(nats);
    assert!(!port_is_open(port));
}

#[tokio::test]
async fn postgres_uses_scram_and_rejects_a_wrong_password() {
    let pg = Postgres::start().unwrap();
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(pg.psql("postgres", "show password_encryption").unwrap(), "scram-sha-256");
    let verifier =
        pg.psql("postgres", "select rolpassword from pg_authid where rolname = 'postgres'").unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    assert!(pg.psql("postgres", "select nonsense").is_err());

    let client = pg.connect("postgres").await.unwrap();
    let row = client.query_one("select 1::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);

    let wrong = format!("postgres://postgres:wrong@127.0.0.1:{}/postgres", pg.port);
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls).await.err().expect("wrong password");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD), "{err:?}");

    let port = pg.port;
    let data = pg.data_dir();
    drop(pg);
    assert!(!port_is_open(port));
    assert!(!data.exists());
}

#[test]
fn two_postgres_clusters_run_at_once() {
    let a = Postgres::start().unwrap();
    let b = Postgres::start().unwrap();
    assert_ne!(a.port, b.port);
    a.psql("postgres", "create database shop").unwrap();
    assert_eq!(a.psql("shop", "select current_database()").unwrap(), "shop");
    assert!(b.psql("shop", "select 1").is_err());
}

fn s3_store(s3: &S3) -> impl ObjectStore {
    AmazonS3Builder::new()
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region(&s3.region)
        .with_bucket_name(&s3.bucket)
        .with_access_key_id(&s3.access_key_id)
        .with_secret_access_key(&s3.secret_access_key)
        .build()
        .unwrap()
}

#[tokio::test]
async fn s3_puts_and_gets_objects_and_keeps_them_across_restart() {
    testkit::init_crypto();
    let mut s3 = S3::start().unwrap();
    let store = s3_store(&s3);
    let path = ObjectPath::from("sessions/a/chunk-0001");
    store.put(&path, b"hello, bucket".to_vec().into()).await.unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello, bucket");

    s3.stop();
    assert!(store.get(&path).await.is_err());
    s3.start_again().unwrap();

    let store = s3_store(&s3);
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello, bucket");
    let listed: Vec<_> = store.list(Some(&ObjectPath::from("sessions"))).collect().await;
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn oidc_issuer_serves_discovery_and_jwks_that_verify_its_tokens() {
    testkit::init_crypto();
    let issuer = OidcIssuer::start().unwrap();
    let http = reqwest::Client::new();
    let discovery: Value = http
        .get(format!("{}/.well-known/openid-configuration", issuer.issuer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], issuer.issuer.as_str());
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    let jwks: JwkSet = http.get(jwks_uri).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks.keys.len(), 2);

    let verify = |token: &str, alg: Algorithm| -> Result<Value, jsonwebtoken::errors::Error> {
        let header = jsonwebtoken::decode_header(token)?;
        let kid = header.kid.expect("kid");
        let jwk = jwks.find(&kid).expect("kid in JWKS");
        let key = DecodingKey::from_jwk(jwk)?;
        let mut validation = Validation::new(alg);
        validation.set_audience(&[&issuer.audience]);
        validation.set_issuer(&[&issuer.issuer]);
        Ok(jsonwebtoken::decode::<Value>(token, &key, &validation)?.claims)
    };

    let claims = verify(&issuer.token("agent-1", &["agents"]), Algorithm::ES256).unwrap();
    assert_eq!(claims["sub"], "agent-1");
    assert_eq!(claims["groups"], serde_json::json!(["agents"]));

    let claims = verify(&issuer.token_rs256("agent-2", &["dba"]), Algorithm::RS256).unwrap();
    assert_eq!(claims["sub"], "agent-2");

    assert!(verify(&issuer.token_signed_by_stranger("agent-1", &[]), Algorithm::ES256).is_err());
    let none = issuer.token_alg_none("agent-1", &[]);
    assert!(none.ends_with('.') && none.matches('.').count() == 2);
    assert!(verify(&none, Algorithm::ES256).is_err());

    let mut expired = issuer.claims("agent-1", &[]);
    expired["exp"] = serde_json::json!(expired["iat"].as_i64().unwrap() - 3600);
    assert!(verify(&issuer.token_with(expired), Algorithm::ES256).is_err());
    let mut wrong_aud = issuer.claims("agent-1", &[]);
    wrong_aud["aud"] = "someone-else".into();
    assert!(verify(&issuer.token_with(wrong_aud), Algorithm::ES256).is_err());

    let port: u16 = issuer.issuer.rsplit(':').next().unwrap().parse().unwrap();
    drop(issuer);
    assert!(!port_is_open(port));
}
