//! Behaviour of both event-bus implementations: NATS JetStream against a real `nats-server`
//! (testkit), and the in-process bus. Behaviours shared by both run on each.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use eventbus::{BusError, Delivery, Durable, EventBus, NatsConfig};
use proto::events::{Envelope, Event};
use proto::subjects;
use uuid::Uuid;

const WAIT: Duration = Duration::from_millis(500);

/// The ack timeout of the tests' NATS bus; it bounds JetStream API calls too, so it is ample.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

async fn nats_bus(nats: &testkit::Nats) -> Result<EventBus> {
    nats_bus_with(nats, ACK_TIMEOUT).await
}

async fn nats_bus_with(nats: &testkit::Nats, ack_timeout: Duration) -> Result<EventBus> {
    testkit::init_crypto();
    let cfg = NatsConfig { url: nats.url.clone(), ack_timeout, ..Default::default() };
    EventBus::connect_nats(&cfg).await.context("connecting to test NATS")
}

fn request(session: Uuid, seq: u64) -> Envelope {
    Envelope::new(
        session,
        Event::RequestReceived {
            seq,
            statement: format!("select {seq}").into(),
            parameters: Default::default(),
        },
    )
}

fn statement_seqs(ds: &[Delivery]) -> Vec<u64> {
    ds.iter()
        .map(|d| match &d.envelope.event {
            Event::RequestReceived { seq, .. } => *seq,
            _ => 0,
        })
        .collect()
}

/// Fetch until `n` deliveries arrived (acking each) or `deadline` passes.
async fn collect(durable: &mut Durable, n: usize, deadline: Duration) -> Result<Vec<Delivery>> {
    let until = Instant::now() + deadline;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < until {
        for d in durable.next_batch(n - out.len(), WAIT).await? {
            d.ack().await?;
            out.push(d);
        }
    }
    Ok(out)
}

/// Fetch, without acking, until `n` deliveries arrived; fails after 10 s. (One fetch returns only
/// what has reached the consumer.)
async fn fetch(durable: &mut Durable, n: usize) -> Result<Vec<Delivery>> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < n {
        ensure!(Instant::now() < until, "only {} of {n} deliveries arrived", out.len());
        out.extend(durable.next_batch(n - out.len(), WAIT).await?);
    }
    Ok(out)
}

// ---- behaviours shared by both buses -------------------------------------------------------

async fn durable_delivers_published_events_in_order(bus: EventBus) -> Result<()> {
    let mut durable = bus.durable("in-order", subjects::ALL_SESSION_EVENTS).await?;
    let session = Uuid::now_v7();
    let envs: Vec<Envelope> = (1..=20).map(|i| request(session, i)).collect();
    bus.publish_all(&envs).await?;
    bus.publish(&request(session, 21)).await?;

    let got = collect(&mut durable, 21, Duration::from_secs(10)).await?;
    ensure!(statement_seqs(&got) == (1..=21).collect::<Vec<_>>(), "order: {:?}", statement_seqs(&got));
    ensure!(got[..20].iter().zip(&envs).all(|(d, e)| &d.envelope == e), "envelopes differ");
    ensure!(got.windows(2).all(|w| w[0].stream_seq < w[1].stream_seq), "stream_seq not increasing");
    ensure!(got.iter().all(|d| d.delivered == 1), "first deliveries must say delivered = 1");
    // Nothing more once everything was acked.
    ensure!(
        durable.next_batch(10, Duration::from_millis(200)).await?.is_empty(),
        "unexpected extra delivery"
    );
    Ok(())
}

async fn consumers_sharing_a_name_split_the_work(bus: EventBus) -> Result<()> {
    let mut a = bus.durable("shared", subjects::ALL_SESSION_EVENTS).await?;
    let mut b = bus.durable("shared", subjects::ALL_SESSION_EVENTS).await?;
    let envs: Vec<Envelope> = (1..=100).map(|i| request(Uuid::now_v7(), i)).collect();
    bus.publish_all(&envs).await?;

    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(10);
    while got_a.len() + got_b.len() < 100 && Instant::now() < until {
        for (durable, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
            for d in durable.next_batch(10, Duration::from_millis(100)).await? {
                d.ack().await?;
                got.push(d.envelope.id);
            }
        }
    }
    ensure!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both consumers get work: {} / {}",
        got_a.len(),
        got_b.len()
    );
    let all: Vec<Uuid> = got_a.iter().chain(&got_b).copied().collect();
    let unique: HashSet<Uuid> = all.iter().copied().collect();
    ensure!(all.len() == 100 && unique.len() == 100, "got {} deliveries, {} unique", all.len(), unique.len());
    ensure!(unique == envs.iter().map(|e| e.id).collect(), "delivered ids differ from published ones");
    Ok(())
}

async fn durable_only_sees_its_filter(bus: EventBus) -> Result<()> {
    let mut holds = bus.durable("holds", subjects::HOLD_REQUESTED).await?;
    let session = Uuid::now_v7();
    let hold = Envelope::new(
        session,
        Event::HoldRequested(Box::new(proto::events::HoldRequest {
            hold_id: Uuid::now_v7(),
            seq: 1,
            connection: "shop".into(),
            principal: Default::default(),
            requester_email: None,
            statement: "delete from orders".into(),
            parameters: Default::default(),
            fingerprint: "ab".into(),
            rule: "writes".into(),
            reason: "matched".into(),
            approvers: Default::default(),
            requested_at: proto::events::Timestamp(1),
            expires_at: proto::events::Timestamp(2),
        })),
    );
    bus.publish_all(&[request(session, 1), hold.clone(), request(session, 2)]).await?;
    let got = collect(&mut holds, 1, Duration::from_secs(5)).await?;
    ensure!(got.len() == 1 && got[0].envelope == hold, "expected only the hold");
    // In a batch, a hold still goes on its own subject, where the approval service looks.
    let mut batched_hold = hold.clone();
    batched_hold.id = Uuid::now_v7();
    bus.publish_batch(&[request(session, 3), batched_hold.clone(), request(session, 4)]).await?;
    let got = collect(&mut holds, 1, Duration::from_secs(5)).await?;
    ensure!(got.len() == 1 && got[0].envelope == batched_hold, "expected the batched hold");
    ensure!(
        holds.next_batch(10, Duration::from_millis(200)).await?.is_empty(),
        "non-matching event delivered"
    );
    Ok(())
}

async fn subscription_sees_live_matching_events(bus: EventBus) -> Result<()> {
    let session = Uuid::now_v7();
    bus.publish(&request(session, 1)).await?; // before subscribing: not seen
    let mut sub = bus.subscribe(&subjects::session_subject(session, "request")).await?;
    let other = request(Uuid::now_v7(), 7); // other session: filtered out
    let live = request(session, 2);
    bus.publish_all(&[other, live.clone()]).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.context("no live event")?;
    ensure!(got.as_ref() == Some(&live), "expected the live event, got {got:?}");
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    ensure!(more.is_err(), "unexpected extra event {more:?}");
    Ok(())
}

async fn batches_arrive_as_separate_envelopes_in_order(bus: EventBus) -> Result<()> {
    let mut durable = bus.durable("batched", subjects::ALL_SESSION_EVENTS).await?;
    let session = Uuid::now_v7();
    let mut sub = bus.subscribe(subjects::ALL_SESSION_EVENTS).await?;
    let envs: Vec<Envelope> = (1..=40).map(|i| request(session, i)).collect();
    bus.publish_batch(&envs[..30]).await?;
    bus.publish(&envs[30]).await?;
    bus.publish_batch(&envs[31..]).await?;
    let got = collect(&mut durable, 40, Duration::from_secs(10)).await?;
    ensure!(statement_seqs(&got) == (1..=40).collect::<Vec<_>>(), "order: {:?}", statement_seqs(&got));
    ensure!(got.iter().zip(&envs).all(|(d, e)| &d.envelope == e), "envelopes differ");
    ensure!(got.windows(2).all(|w| w[0].stream_seq <= w[1].stream_seq), "stream_seq went back");
    for e in &envs {
        let live = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.context("subscription")?;
        ensure!(live.as_ref() == Some(e), "subscription order: expected {:?}, got {live:?}", e.id);
    }
    ensure!(
        durable.next_batch(10, Duration::from_millis(200)).await?.is_empty(),
        "unexpected extra delivery"
    );
    Ok(())
}

// ---- NATS ------------------------------------------------------------------------------------

#[tokio::test]
async fn nats_batches_arrive_as_separate_envelopes_in_order() -> Result<()> {
    let nats = testkit::Nats::start()?;
    batches_arrive_as_separate_envelopes_in_order(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn nats_a_batch_comes_back_whole_until_every_envelope_is_acked() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let EventBus::Nats(bus) = nats_bus(&nats).await? else { unreachable!("nats_bus returns NATS") };
    let ack_wait = Duration::from_secs(1);
    let mut durable =
        Durable::Nats(bus.durable_with_ack_wait("partial", subjects::ALL_SESSION_EVENTS, ack_wait).await?);
    let session = Uuid::now_v7();
    let envs = [request(session, 1), request(session, 2), request(session, 3)];
    EventBus::Nats(bus.clone()).publish_batch(&envs).await?;

    // All three from one message; acking two (one of them twice) does not ack the message.
    let first = fetch(&mut durable, 3).await?;
    ensure!(statement_seqs(&first) == vec![1, 2, 3], "first round {:?}", statement_seqs(&first));
    ensure!(first.iter().all(|d| d.stream_seq == first[0].stream_seq), "not one message");
    first[0].ack().await?;
    first[0].ack().await?;
    first[2].ack().await?;
    drop(first);
    let again = collect(&mut durable, 3, Duration::from_secs(10)).await?;
    ensure!(statement_seqs(&again) == vec![1, 2, 3], "redelivered {:?}", statement_seqs(&again));
    ensure!(again.iter().all(|d| d.delivered == 2), "redeliveries must count");
    // `collect` acked all three: the message is done.
    ensure!(
        durable.next_batch(10, ack_wait + Duration::from_millis(500)).await?.is_empty(),
        "a fully acked batch came back"
    );
    Ok(())
}

/// `n` requests of one session, each with a 100 KiB statement.
fn big_requests(n: u64) -> Vec<Envelope> {
    let session = Uuid::now_v7();
    let big = "x".repeat(100 * 1024);
    (1..=n)
        .map(|seq| {
            Envelope::new(
                session,
                Event::RequestReceived {
                    seq,
                    statement: big.as_str().into(),
                    parameters: Default::default(),
                },
            )
        })
        .collect()
}

#[tokio::test]
async fn nats_a_fetch_cut_short_by_its_byte_limit_keeps_what_arrived() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let EventBus::Nats(bus) = nats_bus(&nats).await? else { unreachable!("nats_bus returns NATS") };
    let envs = big_requests(10);
    EventBus::Nats(bus.clone()).publish_all(&envs).await?;
    // 250 KB per fetch: each fetch ends after two or three of the ten 100 KB messages.
    let mut durable =
        Durable::Nats(bus.durable("bytes", subjects::ALL_SESSION_EVENTS).await?.with_fetch_bytes(250 * 1024));
    let started = Instant::now();
    let first = durable.next_batch(100, WAIT).await?;
    ensure!(!first.is_empty() && first.len() < 10, "a byte-limited fetch got {}", first.len());
    for d in &first {
        d.ack().await?;
    }
    let rest = collect(&mut durable, 10 - first.len(), Duration::from_secs(10)).await?;
    let mut seqs = statement_seqs(&first);
    seqs.extend(statement_seqs(&rest));
    ensure!(seqs == (1..=10).collect::<Vec<_>>(), "got {seqs:?}");
    // Nothing waited out the 30 s ack wait.
    ensure!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn nats_an_oversized_batch_is_split_across_messages() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut durable = bus.durable("split", subjects::ALL_SESSION_EVENTS).await?;
    let envs = big_requests(8);
    bus.publish_batch(&envs).await?;
    let got = collect(&mut durable, 8, Duration::from_secs(10)).await?;
    ensure!(statement_seqs(&got) == (1..=8).collect::<Vec<_>>(), "order: {:?}", statement_seqs(&got));
    let messages: HashSet<u64> = got.iter().map(|d| d.stream_seq).collect();
    ensure!(messages.len() >= 4, "800 KiB must not go as one message: {} messages", messages.len());
    Ok(())
}

#[tokio::test]
async fn nats_durable_delivers_published_events_in_order() -> Result<()> {
    let nats = testkit::Nats::start()?;
    durable_delivers_published_events_in_order(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn nats_consumers_sharing_a_durable_name_split_the_work_without_duplicates() -> Result<()> {
    let nats = testkit::Nats::start()?;
    consumers_sharing_a_name_split_the_work(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn nats_durable_only_delivers_subjects_matching_its_filter() -> Result<()> {
    let nats = testkit::Nats::start()?;
    durable_only_sees_its_filter(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn nats_subscription_sees_live_matching_events_only() -> Result<()> {
    let nats = testkit::Nats::start()?;
    subscription_sees_live_matching_events(nats_bus(&nats).await?).await
}

#[tokio::test]
async fn nats_durable_replays_events_published_before_it_was_created() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let session = Uuid::now_v7();
    bus.publish_all(&[request(session, 1), request(session, 2)]).await?;
    let mut late = bus.durable("late", subjects::ALL_SESSION_EVENTS).await?;
    let got = collect(&mut late, 2, Duration::from_secs(5)).await?;
    ensure!(statement_seqs(&got) == vec![1, 2], "got {:?}", statement_seqs(&got));
    Ok(())
}

#[tokio::test]
async fn nats_unacked_deliveries_are_redelivered() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let EventBus::Nats(bus) = nats_bus(&nats).await? else { unreachable!("nats_bus returns NATS") };
    // Long enough that nothing comes back while the first round is still being fetched.
    let ack_wait = Duration::from_secs(3);
    let mut durable =
        Durable::Nats(bus.durable_with_ack_wait("redeliver", subjects::ALL_SESSION_EVENTS, ack_wait).await?);
    let session = Uuid::now_v7();
    let envs = [request(session, 1), request(session, 2), request(session, 3)];
    EventBus::Nats(bus.clone()).publish_all(&envs).await?;

    // Take all three, ack only the second.
    let first = fetch(&mut durable, 3).await?;
    ensure!(statement_seqs(&first) == vec![1, 2, 3], "first round {:?}", statement_seqs(&first));
    first[1].ack().await?;
    drop(first);
    drop(durable);

    // A new instance of the same durable gets the unacked ones again, marked as redeliveries.
    let mut again =
        Durable::Nats(bus.durable_with_ack_wait("redeliver", subjects::ALL_SESSION_EVENTS, ack_wait).await?);
    let got = collect(&mut again, 2, Duration::from_secs(10)).await?;
    ensure!(statement_seqs(&got) == vec![1, 3], "redelivered {:?}", statement_seqs(&got));
    ensure!(
        got.iter().all(|d| d.delivered == 2),
        "redeliveries must count: {:?}",
        got.iter().map(|d| d.delivered).collect::<Vec<_>>()
    );
    ensure!(
        again.next_batch(10, ack_wait + Duration::from_millis(500)).await?.is_empty(),
        "acked events came back"
    );
    Ok(())
}

#[tokio::test]
async fn nats_republishing_an_envelope_is_deduplicated_by_its_id() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut durable = bus.durable("dedup", subjects::ALL_SESSION_EVENTS).await?;
    let env = request(Uuid::now_v7(), 1);
    bus.publish(&env).await?;
    bus.publish(&env).await?; // a retry after a lost ack
    let got = collect(&mut durable, 2, Duration::from_secs(2)).await?;
    ensure!(got.len() == 1 && got[0].envelope == env, "expected one copy, got {}", got.len());
    Ok(())
}

#[tokio::test]
async fn nats_undecodable_messages_are_terminated_not_delivered() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut durable = bus.durable("garbage", subjects::ALL_SESSION_EVENTS).await?;
    let raw = async_nats::connect(nats.url.as_str()).await?;
    let js = async_nats::jetstream::new(raw);
    js.publish("airlock.session.x.request", bytes::Bytes::from_static(b"\xff\x00 not msgpack"))
        .await?
        .await?;
    let good = request(Uuid::now_v7(), 1);
    bus.publish(&good).await?;
    let got = collect(&mut durable, 2, Duration::from_secs(2)).await?;
    ensure!(got.len() == 1 && got[0].envelope == good, "expected only the good event, got {}", got.len());
    Ok(())
}

/// One envelope of a batch that this version cannot read (a newer node's event) costs only
/// itself: the others are delivered.
#[tokio::test]
async fn nats_an_undecodable_envelope_does_not_take_its_batch_with_it() -> Result<()> {
    let nats = testkit::Nats::start()?;
    let bus = nats_bus(&nats).await?;
    let mut durable = bus.durable("mixed", subjects::ALL_SESSION_EVENTS).await?;
    let raw = async_nats::connect(nats.url.as_str()).await?;
    let js = async_nats::jetstream::new(raw);
    let (a, b) = (request(Uuid::now_v7(), 1), request(Uuid::now_v7(), 2));
    let foreign: &[u8] = &[0x81, 0xa5, b'e', b'v', b'e', b'n', b't', 0xa3, b'n', b'e', b'w'];
    let payload = [&[0x93][..], &proto::events::encode(&a)?, foreign, &proto::events::encode(&b)?].concat();
    js.publish(subjects::BATCH, bytes::Bytes::from(payload)).await?.await?;
    let got = collect(&mut durable, 3, Duration::from_secs(2)).await?;
    ensure!(got.len() == 2, "expected the two good events, got {}", got.len());
    ensure!(got[0].envelope == a && got[1].envelope == b, "out of order or altered");
    for d in &got {
        d.ack().await?;
    }
    Ok(())
}

#[tokio::test]
async fn nats_publish_fails_within_the_ack_timeout_while_nats_is_down_and_recovers() -> Result<()> {
    let mut nats = testkit::Nats::start()?;
    let ack_timeout = Duration::from_millis(700);
    let bus = nats_bus_with(&nats, ack_timeout).await?;
    let mut durable = bus.durable("outage", subjects::ALL_SESSION_EVENTS).await?;
    let session = Uuid::now_v7();
    bus.publish(&request(session, 1)).await?;

    nats.stop();
    for n in 2..=3 {
        let started = Instant::now();
        let res = bus.publish_all(&[request(session, n), request(session, n + 10)]).await;
        let took = started.elapsed();
        ensure!(
            matches!(res, Err(BusError::AckTimeout { .. } | BusError::Publish { .. })),
            "publish while down must fail, got {res:?}"
        );
        ensure!(took < ack_timeout + Duration::from_secs(2), "publish while down took {took:?}");
    }

    nats.start_again()?;
    let until = Instant::now() + Duration::from_secs(15);
    let back = request(session, 4);
    loop {
        match bus.publish(&back).await {
            Ok(()) => break,
            Err(e) if Instant::now() < until => {
                tracing::debug!(error = %e, "not reconnected yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("publish after NATS came back"),
        }
    }
    // What was acked before the outage survived it, and the new event follows it. (Publishes that
    // failed may still have reached the server after the reconnect: the caller was told they
    // failed, so it did not rely on them.)
    let got = collect(&mut durable, 10, Duration::from_secs(3)).await?;
    let seqs = statement_seqs(&got);
    ensure!(seqs.first() == Some(&1) && seqs.last() == Some(&4), "after the outage: {seqs:?}");
    Ok(())
}

#[tokio::test]
async fn nats_connect_to_nothing_is_a_clear_error() -> Result<()> {
    testkit::init_crypto();
    let cfg = NatsConfig { url: format!("nats://127.0.0.1:{}", testkit::free_port()), ..Default::default() };
    let res = EventBus::connect_nats(&cfg).await;
    ensure!(matches!(res, Err(BusError::Connect { .. })), "expected a connect error");
    Ok(())
}

// ---- in-process ------------------------------------------------------------------------------

#[tokio::test]
async fn memory_durable_delivers_published_events_in_order() -> Result<()> {
    durable_delivers_published_events_in_order(EventBus::memory()).await
}

#[tokio::test]
async fn memory_consumers_sharing_a_durable_name_split_the_work_without_duplicates() -> Result<()> {
    consumers_sharing_a_name_split_the_work(EventBus::memory()).await
}

#[tokio::test]
async fn memory_durable_only_delivers_subjects_matching_its_filter() -> Result<()> {
    durable_only_sees_its_filter(EventBus::memory()).await
}

#[tokio::test]
async fn memory_batches_arrive_as_separate_envelopes_in_order() -> Result<()> {
    batches_arrive_as_separate_envelopes_in_order(EventBus::memory()).await
}

#[tokio::test]
async fn memory_subscription_sees_live_matching_events_only() -> Result<()> {
    subscription_sees_live_matching_events(EventBus::memory()).await
}

#[tokio::test]
async fn memory_stream_seq_counts_from_one_and_durables_see_only_later_events() -> Result<()> {
    let bus = EventBus::memory();
    let session = Uuid::now_v7();
    bus.publish(&request(session, 1)).await?;
    let mut durable = bus.durable("later", subjects::ALL_SESSION_EVENTS).await?;
    bus.publish_all(&[request(session, 2), request(session, 3)]).await?;
    let got = collect(&mut durable, 3, Duration::from_millis(300)).await?;
    ensure!(statement_seqs(&got) == vec![2, 3], "got {:?}", statement_seqs(&got));
    ensure!(got.iter().map(|d| d.stream_seq).collect::<Vec<_>>() == vec![2, 3], "stream_seq from 1 per bus");
    Ok(())
}

#[tokio::test]
async fn memory_next_batch_returns_empty_after_waiting() -> Result<()> {
    let bus = EventBus::memory();
    let mut durable = bus.durable("idle", subjects::ALL_SESSION_EVENTS).await?;
    let started = Instant::now();
    ensure!(durable.next_batch(10, Duration::from_millis(100)).await?.is_empty(), "nothing was published");
    ensure!(started.elapsed() >= Duration::from_millis(90), "returned before the wait");
    Ok(())
}
