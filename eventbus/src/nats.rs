//! The JetStream implementation: one stream ([`proto::subjects::STREAM`]) captures every
//! `airlock.>` subject; durable consumers are explicit-ack pull consumers; live subscriptions are
//! core NATS subscriptions (JetStream-published messages reach core subscribers too).

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, Consumer, DeliverPolicy, pull},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, StorageType},
};
use futures::StreamExt;
use proto::events::{self, Envelope};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, error, info, warn};

use crate::{Acker, BusError, Delivery, NatsConfig, SharedMessage};

/// How long the server waits for an ack before redelivering (the default for [`NatsBus::durable`]).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// The most envelope bytes [`NatsBus::publish_batch`] puts in one message (well under the
/// server's default 1 MiB max_payload).
pub const BATCH_BYTES: usize = 256 * 1024;

/// About what one envelope of a statement takes encoded: sizes a batch's buffer up front.
const ENVELOPE_BYTES_GUESS: usize = 256;

/// How many deliveries a durable consumer may have out unacked (the server's default is 1000;
/// the recorder fetches more than that at once to write larger chunks).
pub const MAX_ACK_PENDING: i64 = 20_000;

/// The most bytes one fetch asks for, whatever the number of messages.
pub const FETCH_BYTES: usize = 32 * 1024 * 1024;

/// Extra time a fetch may take beyond its `wait` before we give up on the server.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// A connection to NATS with the Airlock stream in place.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    ack_timeout: Duration,
    /// Disconnections and slow-subscriber drops so far: chances that a subscription missed
    /// messages.
    losses: Arc<AtomicU64>,
}

impl NatsBus {
    /// See [`crate::EventBus::max_event_bytes`].
    pub fn max_event_bytes(&self) -> usize {
        self.inner.client.max_payload().saturating_sub(crate::HEADER_ROOM)
    }

    /// Connect and create (or reuse) the stream.
    pub async fn connect(cfg: &NatsConfig) -> Result<Self, BusError> {
        // async-nats brings ring while object_store brings aws-lc-rs: pick one for rustls, or it
        // panics on the first TLS connection. A provider installed earlier wins.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let url = cfg.url.clone();
        let losses = Arc::new(AtomicU64::new(0));
        let lost = losses.clone();
        let client = async_nats::ConnectOptions::new()
            .name("airlock")
            .connection_timeout(cfg.ack_timeout.max(Duration::from_secs(1)))
            .event_callback(move |event| {
                let (url, lost) = (url.clone(), lost.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => info!(nats.url = %url, "connected to NATS"),
                        async_nats::Event::Disconnected => {
                            lost.fetch_add(1, Ordering::SeqCst);
                            warn!(nats.url = %url, "disconnected from NATS");
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            lost.fetch_add(1, Ordering::SeqCst);
                            warn!(nats.url = %url, subscription = sid, "NATS dropped messages for a slow subscriber");
                        }
                        other => debug!(nats.url = %url, event = %other, "NATS event"),
                    }
                }
            })
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| BusError::Connect { url: cfg.url.clone(), message: e.to_string() })?;
        let js = jetstream::ContextBuilder::new().timeout(cfg.ack_timeout).build(client.clone());
        let stream = js
            .get_or_create_stream(stream::Config {
                name: proto::subjects::STREAM.to_string(),
                subjects: vec![proto::subjects::STREAM_SUBJECTS.to_string()],
                storage: StorageType::File,
                max_age: cfg.max_age,
                num_replicas: cfg.stream_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Setup(format!("stream {}: {e}", proto::subjects::STREAM)))?;
        Ok(Self { inner: Arc::new(Inner { client, js, stream, ack_timeout: cfg.ack_timeout, losses }) })
    }

    /// See [`crate::EventBus::losses`].
    pub fn losses(&self) -> u64 {
        self.inner.losses.load(Ordering::SeqCst)
    }

    /// The underlying NATS client (for health checks).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Publish all envelopes pipelined, with `Nats-Msg-Id` set to the envelope id (so a retried
    /// publish is deduplicated by the stream), then wait for every ack. The whole call is bounded
    /// by the configured ack timeout, also while NATS is unreachable.
    pub async fn publish_all(&self, envs: &[Envelope]) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.ack_timeout;
        let mut acks = Vec::with_capacity(envs.len());
        for env in envs {
            let subject = env.subject();
            let payload = events::encode(env)?;
            let message = PublishMessage::build().payload(payload.into()).message_id(env.id.to_string());
            acks.push((subject.clone(), self.send(deadline, subject, message).await?));
        }
        self.await_acks(deadline, acks).await
    }

    /// Publish envelopes as batch messages on [`proto::subjects::BATCH`]: as many envelopes per
    /// message as fit in [`BATCH_BYTES`] (an envelope larger than that goes alone, and the server
    /// refuses it if it exceeds its max_payload). Events that others select by subject
    /// ([`proto::events::Event::batchable`] is false: holds, grants) go alone on their own
    /// subject, in their place in the order. Each message's `Nats-Msg-Id` is the id of its first
    /// envelope. Messages are pipelined; `Ok` once every one is acknowledged, bounded by the ack
    /// timeout.
    pub async fn publish_batch(&self, envs: &[Envelope]) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.ack_timeout;
        let mut acks = Vec::new();
        let mut start = 0;
        while start < envs.len() {
            let (subject, end, payload) = if envs[start].event.batchable() {
                let mut batch = events::Batch::with_capacity(
                    (envs.len() - start).saturating_mul(ENVELOPE_BYTES_GUESS).min(BATCH_BYTES),
                );
                let mut end = start;
                while end < envs.len()
                    && envs[end].event.batchable()
                    && batch.push_within(&envs[end], BATCH_BYTES)?
                {
                    end += 1;
                }
                (proto::subjects::BATCH.to_string(), end, batch.finish())
            } else {
                (envs[start].subject(), start + 1, events::encode(&envs[start])?.into())
            };
            let message = PublishMessage::build().payload(payload).message_id(envs[start].id.to_string());
            acks.push((subject.clone(), self.send(deadline, subject, message).await?));
            start = end;
        }
        self.await_acks(deadline, acks).await
    }

    async fn send(
        &self,
        deadline: Instant,
        subject: String,
        message: PublishMessage,
    ) -> Result<jetstream::context::PublishAckFuture, BusError> {
        match timeout_at(deadline, self.inner.js.send_publish(subject.clone(), message)).await {
            Err(_) => Err(BusError::AckTimeout { subject, timeout: self.inner.ack_timeout }),
            Ok(r) => r.map_err(|e| publish_error(&subject, e, self.inner.ack_timeout)),
        }
    }

    async fn await_acks(
        &self,
        deadline: Instant,
        acks: Vec<(String, jetstream::context::PublishAckFuture)>,
    ) -> Result<(), BusError> {
        for (subject, ack) in acks {
            match timeout_at(deadline, ack.into_future()).await {
                Err(_) => return Err(BusError::AckTimeout { subject, timeout: self.inner.ack_timeout }),
                Ok(r) => r.map_err(|e| publish_error(&subject, e, self.inner.ack_timeout))?,
            };
        }
        Ok(())
    }

    /// A durable pull consumer with the default ack wait ([`DEFAULT_ACK_WAIT`]).
    pub async fn durable(&self, name: &str, filter: &str) -> Result<NatsDurable, BusError> {
        self.durable_with_ack_wait(name, filter, DEFAULT_ACK_WAIT).await
    }

    /// A durable pull consumer: explicit ack, delivers everything the stream holds for `filter`,
    /// redelivers what is not acked within `ack_wait`. Processes using the same `name` share
    /// the work. If the consumer already exists, its server-side configuration is reused.
    pub async fn durable_with_ack_wait(
        &self,
        name: &str,
        filter: &str,
        ack_wait: Duration,
    ) -> Result<NatsDurable, BusError> {
        let consumer = self
            .inner
            .stream
            .get_or_create_consumer(
                name,
                pull::Config {
                    durable_name: Some(name.to_string()),
                    filter_subject: filter.to_string(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: MAX_ACK_PENDING,
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| BusError::Setup(format!("consumer {name}: {e}")))?;
        Ok(NatsDurable { consumer: Box::new(consumer), name: name.to_string(), fetch_bytes: FETCH_BYTES })
    }

    /// Live events on `filter` from now on.
    pub async fn subscribe(&self, filter: &str) -> Result<NatsSubscription, BusError> {
        let subscriber = self
            .inner
            .client
            .subscribe(filter.to_string())
            .await
            .map_err(|e| BusError::Setup(format!("subscribing to {filter}: {e}")))?;
        // Make sure the server has registered the subscription before we return, so that an
        // event published right after (from any connection) is seen.
        timeout(self.inner.ack_timeout, self.inner.client.flush())
            .await
            .map_err(|_| BusError::Setup(format!("subscribing to {filter}: flush timed out")))?
            .map_err(|e| BusError::Setup(format!("subscribing to {filter}: {e}")))?;
        Ok(NatsSubscription { subscriber, pending: VecDeque::new() })
    }
}

fn publish_error(subject: &str, e: jetstream::context::PublishError, timeout: Duration) -> BusError {
    match e.kind() {
        PublishErrorKind::TimedOut => BusError::AckTimeout { subject: subject.to_string(), timeout },
        _ => BusError::Publish { subject: subject.to_string(), message: e.to_string() },
    }
}

/// A durable pull consumer.
pub struct NatsDurable {
    consumer: Box<Consumer<pull::Config>>,
    name: String,
    fetch_bytes: usize,
}

impl NatsDurable {
    /// Ask for at most `bytes` per fetch instead of [`FETCH_BYTES`] (a fetch returns at least
    /// one message, whatever its size).
    pub fn with_fetch_bytes(mut self, bytes: usize) -> Self {
        self.fetch_bytes = bytes.max(1);
        self
    }

    /// Up to `max` deliveries. Returns at once with whatever is pending; if nothing is, waits up
    /// to `wait` for the first message and then takes whatever else is pending.
    pub async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let mut out = self.pull(max, None).await?;
        if out.is_empty() && !wait.is_zero() {
            out = self.pull(1, Some(wait)).await?;
            if !out.is_empty() && max > 1 {
                out.extend(self.pull(max - 1, None).await?);
            }
        }
        Ok(out)
    }

    /// One pull request: `wait = None` returns what is pending right now (no-wait fetch).
    async fn pull(&self, max: usize, wait: Option<Duration>) -> Result<Vec<Delivery>, BusError> {
        let consume = |e: &dyn std::fmt::Display| BusError::Consume(format!("consumer {}: {e}", self.name));
        let bound = wait.unwrap_or_default() + FETCH_GRACE;
        let collect = async {
            let mut batch = match wait {
                None => self.consumer.fetch().max_messages(max).max_bytes(self.fetch_bytes).messages().await,
                Some(w) => {
                    self.consumer
                        .batch()
                        .max_messages(max)
                        .max_bytes(self.fetch_bytes)
                        .expires(w)
                        .messages()
                        .await
                }
            }
            .map_err(|e| consume(&e))?;
            let mut out = Vec::with_capacity(max);
            while let Some(message) = batch.next().await {
                match message {
                    Ok(message) => out.extend(self.deliveries(message).await),
                    // The pull ended early (e.g. the byte limit was reached): keep what arrived,
                    // or it would sit unacked until the ack wait runs out.
                    Err(e) if !out.is_empty() => {
                        debug!(consumer = %self.name, error = %e, "pull ended early");
                        break;
                    }
                    Err(e) => return Err(consume(&e)),
                }
            }
            Ok(out)
        };
        timeout(bound, collect).await.map_err(|_| consume(&"fetch timed out"))?
    }

    /// One delivery per envelope of the message (a batch holds several).
    async fn deliveries(&self, message: jetstream::Message) -> Vec<Delivery> {
        let (stream_seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, u64::try_from(info.delivered).unwrap_or(1)),
            Err(e) => {
                warn!(consumer = %self.name, error = %e, "message without JetStream metadata, skipped");
                return Vec::new();
            }
        };
        // Each envelope on its own: one this version cannot read (a newer node's event, say)
        // must not take the rest of its batch with it.
        let decoded = events::decode_each(&message.payload).map(|each| {
            let (good, bad): (Vec<_>, Vec<_>) = each.into_iter().partition(Result::is_ok);
            if let Some(Err(e)) = bad.first() {
                error!(
                    consumer = %self.name,
                    subject = %message.subject,
                    stream.seq = stream_seq,
                    undecodable = bad.len(),
                    delivered = good.len(),
                    error = %e,
                    "events this version cannot read are skipped; the message stays in the stream until max_age"
                );
            }
            good.into_iter().filter_map(Result::ok).collect::<Vec<_>>()
        });
        match decoded {
            Ok(envelopes) if !envelopes.is_empty() => {
                let shared = Arc::new(SharedMessage { message, unacked: AtomicUsize::new(envelopes.len()) });
                envelopes
                    .into_iter()
                    .map(|envelope| Delivery {
                        envelope,
                        stream_seq,
                        delivered,
                        acker: Acker::Nats { message: shared.clone(), acked: AtomicBool::new(false) },
                    })
                    .collect()
            }
            decoded => {
                let error = match decoded {
                    Err(e) => e.to_string(),
                    Ok(_) => "an empty batch".to_string(),
                };
                warn!(
                    consumer = %self.name,
                    subject = %message.subject,
                    stream.seq = stream_seq,
                    error = %error,
                    "undecodable event, terminating it"
                );
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    warn!(consumer = %self.name, error = %e, "terminating undecodable event failed");
                }
                Vec::new()
            }
        }
    }
}

/// A live core-NATS subscription.
pub struct NatsSubscription {
    subscriber: async_nats::Subscriber,
    /// The rest of a batch message.
    pending: VecDeque<Envelope>,
}

impl NatsSubscription {
    /// The next decodable event; undecodable messages are logged and skipped.
    pub async fn next(&mut self) -> Option<Envelope> {
        loop {
            if let Some(env) = self.pending.pop_front() {
                return Some(env);
            }
            let message = self.subscriber.next().await?;
            match events::decode_many(&message.payload) {
                Ok(envs) => self.pending.extend(envs),
                Err(e) => warn!(subject = %message.subject, error = %e, "undecodable event skipped"),
            }
        }
    }
}
