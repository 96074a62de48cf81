//! The recorder end to end: events published on the bus come back from storage exactly once, in
//! order, through restarts and storage outages. Real NATS and a real S3 server (testkit), plus
//! the in-process bus with a local directory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::{
    Running, agent, approved_hold, envelopes, local_setup, nats_bus, policy_decided, response_sent,
    session_started,
};
use eventbus::EventBus;
use object_store::ObjectStore;
use proto::events::{Decision, Envelope, Event, ResultCapture, Timestamp};
use proto::subjects;
use recorder::{RecorderConfig, audit};
use testkit::sessions::interleave;
use uuid::Uuid;

/// A session: start, `requests` statements (every third denied, every fourth held and approved,
/// the rest allowed with a result), end. Timestamps are 1ms apart from `start`.
fn session(principal: &str, requests: u64, start: i64) -> Vec<Envelope> {
    let id = Uuid::now_v7();
    let p = agent(principal);
    let mut events = vec![session_started(&p)];
    for seq in 1..=requests {
        let statement = format!("select * from orders where id = {seq}");
        events.push(Event::RequestReceived {
            seq,
            statement: statement.as_str().into(),
            parameters: Default::default(),
        });
        let decision = match seq {
            s if s % 3 == 0 => Decision::Deny,
            s if s % 4 == 0 => Decision::Hold,
            _ => Decision::Allow,
        };
        events.push(policy_decided(seq, decision, "orders", "matched"));
        if decision == Decision::Hold {
            let (mut request, mut decided) = approved_hold(&p, seq, start);
            request.statement = statement.as_str().into();
            request.fingerprint = "f".into();
            request.reason = "matched".into();
            decided.reason = Some("looks fine".into());
            events.push(Event::HoldRequested(Box::new(request)));
            events.push(Event::HoldDecided(decided));
        }
        if decision != Decision::Deny {
            let result = ResultCapture {
                columns: vec!["id".into(), "total".into()],
                rows: vec![vec![Some(seq.to_string()), Some(format!("{seq}.50"))]],
                truncated: false,
            };
            events.push(response_sent(seq, 1_200, Some(result)));
        }
    }
    events.push(Event::SessionEnded { reason: "client closed".into() });
    envelopes(id, events, start)
}

/// Runs a recorder on `bus` and `store`, in batches of up to 50.
fn start_recorder(bus: &EventBus, store: &Arc<dyn ObjectStore>) -> Running {
    let cfg = RecorderConfig { batch_max: 50, batch_wait: Duration::from_millis(100), ..Default::default() };
    common::start_recorder(bus, store, cfg)
}

/// Poll until session `expected` is fully recorded; then it must be exactly the published events.
async fn wait_recorded(store: &dyn ObjectStore, expected: &[Envelope], within: Duration) -> Result<()> {
    let id = expected[0].session;
    let until = Instant::now() + within;
    loop {
        match audit::read_session(store, id).await {
            Ok(got) if got.len() >= expected.len() => {
                ensure!(got == expected, "session {id} recorded differently ({} events)", got.len());
                return Ok(());
            }
            Ok(_) | Err(recorder::AuditError::NotFound(_)) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(got) => anyhow::bail!("session {id}: {} of {} events recorded", got.len(), expected.len()),
            Err(e) => return Err(e).context("reading session"),
        }
    }
}

/// The recordings' store in `s3`.
fn s3_store(s3: &testkit::S3) -> Result<Arc<dyn ObjectStore>> {
    common::s3_store(s3, "recordings")
}

/// The shared scenario: three interleaved sessions are recorded, read back, summarized, rendered.
async fn records_sessions_and_reads_them_back(bus: EventBus, store: Arc<dyn ObjectStore>) -> Result<()> {
    let base = Timestamp::now().as_micros();
    let sessions = vec![
        session("agent-a", 5, base),
        session("agent-b", 8, base + 1_000_000),
        session("agent-c", 1, base + 2_000_000),
    ];
    let running = start_recorder(&bus, &store);
    bus.publish_all(&interleave(&sessions)).await?;
    for s in &sessions {
        wait_recorded(store.as_ref(), s, Duration::from_secs(20)).await?;
    }
    running.shutdown().await?;

    let list = audit::list_sessions(store.as_ref()).await?;
    let ids: Vec<Uuid> = list.iter().map(|s| s.id).collect();
    ensure!(
        ids == vec![sessions[2][0].session, sessions[1][0].session, sessions[0][0].session],
        "newest first: {ids:?}"
    );
    let b = &list[1];
    ensure!(
        b.principal == "agent-b" && b.groups == vec!["agents".to_string()] && b.connection == "shop",
        "{b:?}"
    );
    ensure!(b.requests == 8 && b.denied == 2 && b.held == 2, "counts: {b:?}");
    ensure!(
        b.started_at == sessions[1][0].at && b.ended_at == sessions[1].last().map(|e| e.at),
        "times: {b:?}"
    );
    let table = audit::render_sessions(&list);
    ensure!(table.contains("agent-b") && table.contains(&sessions[1][0].session.to_string()), "{table}");

    let replay = audit::render_replay(&audit::read_session(store.as_ref(), sessions[1][0].session).await?);
    for needle in [
        "principal agent-b (groups: agents) on connection shop",
        "#3 > select * from orders where id = 3",
        "#3 policy: deny (rule: rule-deny",
        "#4 policy: hold",
        "#4 hold requested",
        "#4 hold decided: approved by alice (reason: looks fine)",
        "#5 < 1 row in 1.2ms (SELECT 1)",
        "5.50",
        "session ended: client closed",
    ] {
        ensure!(replay.contains(needle), "replay lacks {needle:?}:\n{replay}");
    }
    let missing = audit::read_session(store.as_ref(), Uuid::now_v7()).await;
    ensure!(matches!(missing, Err(recorder::AuditError::NotFound(_))), "unknown session must be NotFound");
    Ok(())
}

#[tokio::test]
async fn nats_and_s3_record_sessions_that_read_back_exactly_and_summarize() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    records_sessions_and_reads_them_back(nats_bus(&nats).await?, s3_store(&s3)?).await
}

#[tokio::test]
async fn memory_bus_and_local_directory_record_sessions_the_same_way() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bus, store) = local_setup(&dir.path().join("recordings")).await?;
    records_sessions_and_reads_them_back(bus, store).await
}

#[tokio::test]
async fn killing_and_restarting_the_recorder_loses_nothing() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    // Create the recorder's consumer with a short ack wait, so that what the killed recorder
    // fetched but never acked comes back quickly (the recorder reuses the existing consumer).
    let EventBus::Nats(nats_bus_inner) = &bus else { unreachable!("nats_bus returns NATS") };
    nats_bus_inner
        .durable_with_ack_wait(
            subjects::RECORDER_DURABLE,
            subjects::ALL_SESSION_EVENTS,
            Duration::from_secs(2),
        )
        .await?;

    let base = Timestamp::now().as_micros();
    let first = session("agent-a", 60, base);
    let killed = start_recorder(&bus, &store);
    for part in first.chunks(20) {
        bus.publish_all(part).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kill it mid-way: the run future is dropped wherever it is (fetching, writing or acking).
    killed.task.abort();
    let _ = killed.task.await;

    let second = session("agent-b", 10, base + 1_000_000);
    bus.publish_all(&second).await?;

    let restarted = start_recorder(&bus, &store);
    wait_recorded(store.as_ref(), &first, Duration::from_secs(30)).await?;
    wait_recorded(store.as_ref(), &second, Duration::from_secs(30)).await?;
    restarted.shutdown().await?;

    // A graceful stop and start again picks up exactly where it left off.
    let third = session("agent-c", 3, base + 2_000_000);
    bus.publish_all(&third).await?;
    let again = start_recorder(&bus, &store);
    wait_recorded(store.as_ref(), &third, Duration::from_secs(20)).await?;
    again.shutdown().await?;
    ensure!(audit::list_sessions(store.as_ref()).await?.len() == 3, "three sessions recorded");
    Ok(())
}

#[tokio::test]
async fn storage_outage_delays_recording_but_loses_nothing() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let mut s3 = testkit::S3::start()?;
    let bus = nats_bus(&nats).await?;
    let store = s3_store(&s3)?;
    let running = start_recorder(&bus, &store);

    let base = Timestamp::now().as_micros();
    let before = session("agent-a", 2, base);
    bus.publish_all(&before).await?;
    wait_recorded(store.as_ref(), &before, Duration::from_secs(20)).await?;

    s3.stop();
    let during = session("agent-b", 4, base + 1_000_000);
    bus.publish_all(&during).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3.start_again()?;

    wait_recorded(store.as_ref(), &during, Duration::from_secs(60)).await?;
    wait_recorded(store.as_ref(), &before, Duration::from_secs(5)).await?;
    running.shutdown().await
}
