//! End-to-end recorder throughput, NATS JetStream to object storage: publish EVENTS events of
//! SESSIONS concurrent sessions the way proxies do (batch messages of PER_MESSAGE envelopes on
//! `airlock.session.batch`, mixing the sessions), then start RECORDERS recorders (each with its
//! own NATS connection; recorder K runs as shard K/RECORDERS with its own durable consumer) and
//! time until every consumer has every message acked, i.e. every event is stored in its
//! session's chain. Starts its own nats-server and moto (S3) unless `--store file`.
//!
//! `cargo run --release -p recorder --example record_bench -- [--events N] [--sessions N]
//!  [--recorders N] [--batch N] [--per-message N] [--store s3|file]` (run by
//!  `bench/recorder.sh`). `--batch` is the recorders' `batch_max` (bus messages per fetch).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use eventbus::{EventBus, NatsConfig};
use proto::events::{Decision, Envelope, Event, Principal, ResultCapture};
use proto::subjects;
use recorder::{RecorderConfig, Shard, StorageConfig};
use uuid::Uuid;

struct Args {
    events: usize,
    sessions: usize,
    recorders: usize,
    batch: usize,
    per_message: usize,
    store: String,
}

fn args() -> Result<Args> {
    let mut a = Args {
        events: 200_000,
        sessions: 20,
        recorders: 1,
        batch: 1000,
        per_message: 50,
        store: "s3".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => a.events = value.parse()?,
            "--sessions" => a.sessions = value.parse()?,
            "--recorders" => a.recorders = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--per-message" => a.per_message = value.parse()?,
            "--store" => a.store = value,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Event `i` of a session: statements, decisions and responses with a small result, as a proxy
/// publishes them (about 200-300 bytes each).
fn event(i: usize) -> Event {
    let seq = (i / 3) as u64 + 1;
    match i % 3 {
        0 => Event::RequestReceived {
            seq,
            statement: format!("select id, name, price from products where id = {seq}").into(),
            parameters: Default::default(),
        },
        1 => Event::PolicyDecided {
            seq,
            decision: Decision::Allow,
            rule: Some("reads".into()),
            operations: ["select".into()].into(),
            tables: ["products".into()].into(),
            reason: "".into(),
            policy_version: 3,
        },
        _ => Event::ResponseSent {
            seq,
            rows: 1,
            duration_us: 420,
            command_tag: Some("SELECT 1".into()),
            error: None,
            result: Some(ResultCapture {
                columns: vec!["id".into(), "name".into(), "price".into()],
                rows: vec![vec![Some(seq.to_string()), Some("apple".into()), Some("1.20".into())]],
                truncated: false,
            }),
        },
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    testkit::init_crypto();
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let dir = tempfile::tempdir()?;
    let storage = match a.store.as_str() {
        "s3" => StorageConfig {
            url: format!("s3://{}/bench", s3.bucket),
            endpoint: Some(s3.endpoint.clone()),
            region: Some(s3.region.clone()),
            access_key_id: Some(s3.access_key_id.clone()),
            secret_access_key: Some(s3.secret_access_key.clone()),
            allow_http: true,
            ..Default::default()
        },
        _ => StorageConfig { url: format!("file://{}", dir.path().display()), ..Default::default() },
    };
    let nats_cfg =
        NatsConfig { url: nats.url.clone(), ack_timeout: Duration::from_secs(30), ..Default::default() };
    let bus = EventBus::connect_nats(&nats_cfg).await?;
    let recorders = u32::try_from(a.recorders.max(1))?;
    let shards: Vec<Shard> = (0..recorders).map(|k| Shard::new(k, recorders)).collect::<Result<_, _>>()?;
    for shard in &shards {
        bus.durable(&shard.durable_name(), subjects::ALL_SESSION_EVENTS).await?;
    }

    // Publish everything first, so the measurement is the recorders' alone.
    let sessions: Vec<Uuid> = (0..a.sessions).map(|_| Uuid::now_v7()).collect();
    let per_message = a.per_message.max(1);
    let mut batch = Vec::with_capacity(per_message);
    let published = Instant::now();
    for i in 0..a.events {
        let session = sessions[i % a.sessions];
        let n = i / a.sessions;
        let ev = if n == 0 {
            Event::SessionStarted {
                principal: Principal {
                    subject: "bench".into(),
                    groups: vec!["agents".into()],
                    kind: "oidc".into(),
                },
                connection: "shop".into(),
                protocol: "postgres".into(),
                client_addr: "127.0.0.1:1".into(),
                node: "bench".into(),
                policy_version: 3,
            }
        } else if i + a.sessions >= a.events {
            Event::SessionEnded { reason: "done".into() }
        } else {
            event(n)
        };
        batch.push(Envelope::new(session, ev));
        if batch.len() == per_message {
            bus.publish_batch(&batch).await?;
            batch.clear();
        }
    }
    bus.publish_batch(&batch).await?;
    eprintln!("published {} events in {:.1?}", a.events, published.elapsed());

    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(subjects::STREAM).await?;
    let start = Instant::now();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for &shard in &shards {
        let bus = EventBus::connect_nats(&nats_cfg).await?;
        let store = recorder::open_store(&storage)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cfg = RecorderConfig {
            batch_max: a.batch,
            batch_wait: Duration::from_millis(50),
            shard,
            ..Default::default()
        };
        tasks.push(tokio::spawn(recorder::run(cfg, bus, Arc::clone(&store), async move {
            let _ = stopped.await;
        })));
        stops.push(stop);
    }
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut left = 0;
        for shard in &shards {
            let info = stream.consumer_info(&shard.durable_name()).await?;
            left += info.num_pending + info.num_ack_pending as u64;
        }
        if left == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("not done after 10 minutes: {left} messages pending");
        }
    }
    let took = start.elapsed();
    for stop in stops {
        let _ = stop.send(());
    }
    for t in tasks {
        t.await??;
    }
    let store = recorder::open_store(&storage)?;
    let report = recorder::audit::verify(store.as_ref(), None, None).await?;
    let per_s = a.events as f64 / took.as_secs_f64();
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.2}s | {:.0} | {:.0} | {} |",
        a.store,
        a.recorders,
        a.events,
        a.sessions,
        per_message,
        a.batch,
        took.as_secs_f64(),
        per_s,
        per_s / a.recorders as f64,
        if report.ok() { "ok" } else { "FAILED" },
    );
    Ok(())
}
