//! The archive through the real `airlock` binary: a recorder killed with -9 while many sessions
//! are in flight records every published event exactly once after its restart; `airlock audit`
//! lists, filters, searches, replays and verifies from the bucket alone, and `verify` fails,
//! naming the damage, once a chunk is deleted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use eventbus::{EventBus, NatsConfig};
use proto::events::{Decision, Envelope, Event, Principal, ResultCapture, Timestamp};
use proto::subjects;
use recorder::audit::{self, Verdict};
use recorder::{RecorderConfig, StorageConfig};
use testkit::Proc;
use testkit::sessions::{interleave, spaced};
use uuid::Uuid;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_airlock"))
}

fn airlock(cfg: &Path, args: &[&str]) -> Result<Output> {
    Command::new(bin()).arg("-c").arg(cfg).args(args).output().context("running airlock")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A session: start, `requests` statements (every fourth denied, the rest answered with a row),
/// end. Times are 1ms apart from `start`.
fn session(principal: &str, requests: u64, start: i64) -> Vec<Envelope> {
    let id = Uuid::now_v7();
    let mut events = vec![Event::SessionStarted {
        principal: Principal {
            subject: principal.into(),
            groups: vec!["agents".into()],
            kind: "oidc".into(),
        },
        connection: "shop".into(),
        protocol: "postgres".into(),
        client_addr: "127.0.0.1:5000".into(),
        node: "n1".into(),
        policy_version: 1,
    }];
    for seq in 1..=requests {
        events.push(Event::RequestReceived {
            seq,
            statement: format!("select name from fruit where id = {seq}").into(),
            parameters: Default::default(),
        });
        let decision = if seq % 4 == 0 { Decision::Deny } else { Decision::Allow };
        events.push(Event::PolicyDecided {
            seq,
            decision,
            rule: Some(format!("rule-{decision}").into()),
            operations: ["select".into()].into(),
            tables: ["fruit".into()].into(),
            reason: if decision == Decision::Deny { "no fruit today".into() } else { "".into() },
            policy_version: 1,
        });
        if decision == Decision::Allow {
            events.push(Event::ResponseSent {
                seq,
                rows: 1,
                duration_us: 700,
                command_tag: Some("SELECT 1".into()),
                error: None,
                result: Some(ResultCapture {
                    columns: vec!["name".into()],
                    rows: vec![vec![Some(format!("apple-{seq}"))]],
                    truncated: false,
                }),
            });
        }
    }
    events.push(Event::SessionEnded { reason: "client closed".into() });
    spaced(events, start, 1_000, |event, at| Envelope { at: Timestamp(at), ..Envelope::new(id, event) })
}

fn storage_toml(s: &StorageConfig) -> String {
    let mut out = format!("[storage]\nurl = \"{}\"\n", s.url);
    if let Some(e) = &s.endpoint {
        out.push_str(&format!(
            "endpoint = \"{e}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
             allow_http = true\nmax_retries = 0\nretry_timeout = \"1s\"\n",
            s.region.as_deref().unwrap_or_default(),
            s.access_key_id.as_deref().unwrap_or_default(),
            s.secret_access_key.as_deref().unwrap_or_default(),
        ));
    }
    out
}

/// Poll until every session is intact (one session at a time, which reads only its own objects),
/// then verify the whole archive once.
async fn wait_intact(
    store: &dyn recorder::ObjectStore,
    sessions: &[Vec<Envelope>],
    within: Duration,
) -> Result<audit::VerifyReport> {
    let until = Instant::now() + within;
    for s in sessions {
        loop {
            let one = audit::verify(store, Some(s[0].session), None).await;
            if let Ok(r) = &one
                && r.ok()
                && r.sessions.iter().all(|v| v.verdict == Verdict::Intact)
            {
                break;
            }
            if Instant::now() > until {
                bail!("session {} not intact in time: {:?}", s[0].session, one.map(|r| r.render()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let report = audit::verify(store, None, None).await?;
    ensure!(report.ok(), "{}", report.render());
    Ok(report)
}

/// Every other part as proxies publish since the group commit (batch messages of 10 envelopes
/// of mixed sessions, acked as a whole), the rest one message per event.
async fn publish_like_proxies(bus: &EventBus, i: usize, part: &[Envelope]) -> Result<()> {
    if i.is_multiple_of(2) {
        for batch in part.chunks(10) {
            bus.publish_batch(batch).await?;
        }
    } else {
        bus.publish_all(part).await?;
    }
    Ok(())
}

#[tokio::test]
async fn recorder_killed_with_sigkill_mid_flight_records_every_event_exactly_once() -> Result<()> {
    testkit::init_crypto();
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let dir = tempfile::tempdir()?;
    let storage = StorageConfig {
        url: format!("s3://{}/crash", s3.bucket),
        endpoint: Some(s3.endpoint.clone()),
        region: Some(s3.region.clone()),
        access_key_id: Some(s3.access_key_id.clone()),
        secret_access_key: Some(s3.secret_access_key.clone()),
        allow_http: true,
        max_retries: 0,
        retry_timeout: Duration::from_secs(1),
    };
    let cfg = dir.path().join("airlock.toml");
    std::fs::write(
        &cfg,
        format!(
            "[nats]\nurl = \"{}\"\n\n{}\n[recorder]\nbatch_max = 300\nbatch_wait = \"20ms\"\n",
            nats.url,
            storage_toml(&storage)
        ),
    )?;
    let bus = EventBus::connect_nats(&NatsConfig { url: nats.url.clone(), ..Default::default() }).await?;
    // A short ack wait, so that what the killed recorder fetched but never acked comes back soon
    // (the recorder reuses the existing consumer).
    let EventBus::Nats(inner) = &bus else { unreachable!("connect_nats returns NATS") };
    inner
        .durable_with_ack_wait(
            subjects::RECORDER_DURABLE,
            subjects::ALL_SESSION_EVENTS,
            Duration::from_secs(2),
        )
        .await?;

    let spawn = || {
        let mut cmd = Command::new(bin());
        cmd.arg("-c").arg(&cfg).arg("recorder").env("RUST_LOG", "info");
        Proc::spawn(cmd, "recorder")
    };
    let mut recorder = spawn()?;
    let base = Timestamp::now().as_micros();
    let sessions: Vec<_> =
        (0..30).map(|i| session(&format!("agent-{i}"), 20, base + i * 1_000_000)).collect();
    let all = interleave(&sessions);
    let parts: Vec<Vec<Envelope>> = all.chunks(100).map(<[Envelope]>::to_vec).collect();
    let half = parts.len() / 2;
    for (i, part) in parts[..half].iter().enumerate() {
        publish_like_proxies(&bus, i, part).await?;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // Kill it once it is writing: some of the first half is stored, the rest is in flight.
    let store = recorder::open_store(&storage)?;
    let until = Instant::now() + Duration::from_secs(20);
    while audit::read_session(store.as_ref(), sessions[0][0].session).await.is_err() {
        ensure!(Instant::now() < until, "the recorder never wrote:\n{}", recorder.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    recorder.kill9();
    for (i, part) in parts[half..].iter().enumerate() {
        publish_like_proxies(&bus, i, part).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut restarted = spawn()?;
    let started = Instant::now();

    let report = match wait_intact(store.as_ref(), &sessions, Duration::from_secs(60)).await {
        Ok(r) => r,
        Err(e) => bail!("{e}\nrecorder log:\n{}", restarted.log()),
    };
    for s in &sessions {
        let v = report.sessions.iter().find(|v| v.id == s[0].session).context("in the report")?;
        ensure!(v.events == s.len() as u64, "{}: {} events stored, {} published", v.id, v.events, s.len());
        let got = audit::read_session(store.as_ref(), s[0].session).await?;
        ensure!(got == *s, "session {} reads back differently", s[0].session);
    }
    eprintln!("recorded after restart in {:?}", started.elapsed());
    let verify = airlock(&cfg, &["audit", "verify"])?;
    ensure!(verify.status.success(), "verify: {}", stdout(&verify));
    ensure!(
        stdout(&verify).contains("verified: 30 sessions intact, 0 open, 0 tampered"),
        "{}",
        stdout(&verify)
    );
    // The head it prints, passed back as a checkpoint, is found; one beyond the log is not.
    let head = stdout(&verify)
        .lines()
        .find_map(|l| l.strip_prefix("archive log head: "))
        .and_then(|l| l.split_whitespace().next())
        .context("verify prints the log head")?
        .to_string();
    let anchored = airlock(&cfg, &["audit", "verify", "--checkpoint", &head])?;
    ensure!(anchored.status.success(), "verify --checkpoint: {}", stdout(&anchored));
    let (seq, hash) = head.split_once(':').context("SEQ:SHA256")?;
    let beyond = format!("{}:{hash}", seq.parse::<u64>()? + 1);
    let cut = airlock(&cfg, &["audit", "verify", "--checkpoint", &beyond])?;
    ensure!(!cut.status.success() && stdout(&cut).contains("of the checkpoint"), "{}", stdout(&cut));
    restarted.terminate();
    Ok(())
}

#[tokio::test]
async fn audit_commands_read_the_bucket_and_verify_names_a_deleted_chunk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("archive");
    let storage = StorageConfig { url: format!("file://{}", archive.display()), ..Default::default() };
    let store = recorder::open_store(&storage)?;
    let bus = EventBus::memory();
    bus.durable(subjects::RECORDER_DURABLE, subjects::ALL_SESSION_EVENTS).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rec_cfg =
        RecorderConfig { batch_max: 9, batch_wait: Duration::from_millis(20), ..Default::default() };
    let task = tokio::spawn(recorder::run(rec_cfg, bus.clone(), Arc::clone(&store), async move {
        let _ = stopped.await;
    }));
    let base = Timestamp::now().as_micros();
    let sessions = vec![session("alice-bot", 8, base), session("bob-bot", 3, base + 1_000_000)];
    bus.publish_all(&interleave(&sessions)).await?;
    wait_intact(store.as_ref(), &sessions, Duration::from_secs(20)).await?;
    let _ = stop.send(());
    task.await??;

    let cfg = dir.path().join("airlock.toml");
    std::fs::write(&cfg, storage_toml(&storage))?;
    let (alice, bob) = (sessions[0][0].session.to_string(), sessions[1][0].session.to_string());

    let listed = stdout(&airlock(&cfg, &["audit", "sessions", "--principal", "alice-bot"])?);
    ensure!(listed.contains(&alice) && !listed.contains(&bob), "{listed}");
    let denied = stdout(&airlock(&cfg, &["audit", "sessions", "--decision", "deny"])?);
    ensure!(denied.contains(&alice) && !denied.contains(&bob), "bob had no denials (3 requests): {denied}");
    let today = Timestamp(base).date();
    let since = stdout(&airlock(&cfg, &["audit", "sessions", "--since", &today])?);
    ensure!(since.contains(&alice) && since.contains(&bob), "{since}");
    let none = stdout(&airlock(&cfg, &["audit", "sessions", "--until", &today])?);
    ensure!(!none.contains(&alice), "{none}");

    let found = stdout(&airlock(&cfg, &["audit", "search", "no fruit today"])?);
    ensure!(found.lines().count() == 2 && found.lines().all(|l| l.starts_with(&alice)), "{found}");
    let replay = stdout(&airlock(&cfg, &["audit", "replay", &alice])?);
    for needle in ["#3 > select name from fruit where id = 3", "#4 policy: deny", "apple-7", "session ended"]
    {
        ensure!(replay.contains(needle), "replay lacks {needle:?}:\n{replay}");
    }

    let ok = airlock(&cfg, &["audit", "verify"])?;
    ensure!(ok.status.success(), "{}", stdout(&ok));
    // Delete chunk 1 of alice's session straight from the directory.
    let chunk = archive.join("sessions").join(format!("date={today}")).join(&alice).join("00000001.mpk.zst");
    std::fs::remove_file(&chunk).with_context(|| format!("removing {}", chunk.display()))?;
    let failed = airlock(&cfg, &["audit", "verify"])?;
    let text = stdout(&failed);
    ensure!(failed.status.code() == Some(1), "verify must exit 1:\n{text}");
    ensure!(text.contains(&format!("{alice} TAMPERED")) && text.contains("chunk 1 deleted"), "{text}");
    ensure!(text.contains(&format!("{bob} OK")), "{text}");
    let alone = airlock(&cfg, &["audit", "verify", &bob])?;
    ensure!(alone.status.success(), "bob's session alone verifies: {}", stdout(&alone));
    Ok(())
}
