//! One event-bus interface, two implementations: NATS JetStream for split deployments and an
//! in-process bus for `airlock up`. Every component (proxy, approvals, recorder) talks to
//! [`EventBus`] only, so both modes run the same code.
//!
//! Guarantees:
//! - [`EventBus::publish`] returns `Ok` only once the event is durably accepted (a JetStream
//!   ack, or handed to the in-process queues), within [`NatsConfig::ack_timeout`]. Callers fail
//!   closed on `Err`.
//! - A [`Durable`] consumer delivers at least once; a delivery that is not acked comes back.
//!
//! # Layout
//! - [`nats`]: the JetStream implementation.
//! - [`memory`]: the in-process implementation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use proto::events::Envelope;
use serde::Deserialize;

pub mod memory;
pub mod nats;

/// How to reach NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL. Default `nats://127.0.0.1:4222`.
    #[serde(default = "default_url")]
    pub url: String,
    /// How long a publish may wait for its acknowledgement before the caller fails closed.
    /// Default 2s.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Replicas of the stream when Airlock creates it. Default 1.
    #[serde(default = "one")]
    pub stream_replicas: usize,
    /// How long the stream keeps events. Default 7d.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            ack_timeout: default_ack_timeout(),
            stream_replicas: 1,
            max_age: default_max_age(),
        }
    }
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(2)
}
fn one() -> usize {
    1
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("connecting to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("setting up JetStream stream or consumer: {0}")]
    Setup(String),
    #[error("publishing to {subject}: {message}")]
    Publish { subject: String, message: String },
    #[error("no acknowledgement for {subject} within {timeout:?}")]
    AckTimeout { subject: String, timeout: Duration },
    #[error("consuming: {0}")]
    Consume(String),
    #[error("acknowledging: {0}")]
    Ack(String),
    #[error(transparent)]
    Codec(#[from] proto::events::CodecError),
    #[error("the event bus is closed")]
    Closed,
}

/// The event bus.
#[derive(Clone)]
pub enum EventBus {
    Nats(nats::NatsBus),
    Memory(memory::MemoryBus),
}

/// A NATS server's `max_payload` unless configured otherwise.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// What a message's headers (`Nats-Msg-Id` and the like) may take of `max_payload`.
pub const HEADER_ROOM: usize = 4096;

impl EventBus {
    /// Connect to NATS and make sure the stream exists.
    pub async fn connect_nats(cfg: &NatsConfig) -> Result<Self, BusError> {
        Ok(Self::Nats(nats::NatsBus::connect(cfg).await?))
    }

    /// A new in-process bus.
    pub fn memory() -> Self {
        Self::Memory(memory::MemoryBus::new())
    }

    /// The most bytes one encoded event may take: the NATS server's `max_payload` (what it
    /// says at connection), less room for a message's headers. The in-process bus keeps the
    /// default server's limit, so that what tests send meets the same bound.
    pub fn max_event_bytes(&self) -> usize {
        match self {
            Self::Nats(b) => b.max_event_bytes(),
            Self::Memory(_) => DEFAULT_MAX_PAYLOAD - HEADER_ROOM,
        }
    }

    /// How many times so far a [`EventBus::subscribe`] subscription may have missed messages
    /// (the connection to NATS was lost, or the server dropped messages for a slow
    /// subscriber): whoever keeps state from a subscription, and cannot afford to miss a
    /// message, starts over when this changes. Always 0 for the in-process bus.
    pub fn losses(&self) -> u64 {
        match self {
            Self::Nats(b) => b.losses(),
            Self::Memory(_) => 0,
        }
    }

    /// Publish one event; `Ok` only once it is acknowledged.
    pub async fn publish(&self, env: &Envelope) -> Result<(), BusError> {
        self.publish_all(std::slice::from_ref(env)).await
    }

    /// Publish events together, in order, as few bus messages as possible on
    /// [`proto::subjects::BATCH`] (the in-process bus hands them out one by one); `Ok` only once
    /// all are acknowledged. Consumers see each envelope as its own [`Delivery`].
    pub async fn publish_batch(&self, envs: &[Envelope]) -> Result<(), BusError> {
        match self {
            Self::Nats(b) => b.publish_batch(envs).await,
            Self::Memory(b) => b.publish_all(envs),
        }
    }

    /// Publish several events, pipelined, in order; `Ok` only once all are acknowledged.
    pub async fn publish_all(&self, envs: &[Envelope]) -> Result<(), BusError> {
        match self {
            Self::Nats(b) => b.publish_all(envs).await,
            Self::Memory(b) => b.publish_all(envs),
        }
    }

    /// A durable consumer named `name` over `filter` (NATS wildcards). Consumers with the same
    /// name share the work. Deliveries must be acked; unacked ones are redelivered.
    pub async fn durable(&self, name: &str, filter: &str) -> Result<Durable, BusError> {
        match self {
            Self::Nats(b) => Ok(Durable::Nats(b.durable(name, filter).await?)),
            Self::Memory(b) => Ok(Durable::Memory(b.durable(name, filter))),
        }
    }

    /// Events matching `filter` from now on, not durable (e.g. a proxy waiting for decisions).
    pub async fn subscribe(&self, filter: &str) -> Result<Subscription, BusError> {
        match self {
            Self::Nats(b) => Ok(Subscription::Nats(b.subscribe(filter).await?)),
            Self::Memory(b) => Ok(Subscription::Memory(b.subscribe(filter))),
        }
    }
}

/// A durable consumer.
pub enum Durable {
    Nats(nats::NatsDurable),
    Memory(memory::MemoryDurable),
}

impl Durable {
    /// Up to `max` deliveries, waiting at most `wait` for the first. Empty on timeout.
    /// Undecodable messages are logged and terminated, never returned.
    pub async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        match self {
            Self::Nats(d) => d.next_batch(max, wait).await,
            Self::Memory(d) => d.next_batch(max, wait).await,
        }
    }
}

/// One delivered event. The envelopes of one batch message share its acknowledgement: the
/// message is acked once every one of them is, and until then all of them may come back.
pub struct Delivery {
    pub envelope: Envelope,
    /// Position in the stream (monotonic per stream; the in-process bus counts from 1). The
    /// envelopes of one batch share it.
    pub stream_seq: u64,
    /// How many times it has been delivered (1 the first time).
    pub delivered: u64,
    pub(crate) acker: Acker,
}

pub(crate) enum Acker {
    Nats { message: Arc<SharedMessage>, acked: AtomicBool },
    Memory,
}

/// A bus message whose envelopes were handed out as separate deliveries.
pub(crate) struct SharedMessage {
    pub(crate) message: async_nats::jetstream::Message,
    /// Deliveries of this message not acked yet.
    pub(crate) unacked: AtomicUsize,
}

impl Delivery {
    /// Acknowledge: it will not be delivered again (for a batch: once all its envelopes are).
    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Nats { message, acked } => {
                if acked.swap(true, Ordering::AcqRel) || message.unacked.fetch_sub(1, Ordering::AcqRel) != 1 {
                    return Ok(());
                }
                message.message.ack().await.map_err(|e| BusError::Ack(e.to_string()))
            }
            Acker::Memory => Ok(()),
        }
    }

    /// Tell the server work is still in progress (resets the redelivery timer).
    pub async fn progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Nats { message, .. } => message
                .message
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(|e| BusError::Ack(e.to_string())),
            Acker::Memory => Ok(()),
        }
    }
}

/// A live subscription.
pub enum Subscription {
    Nats(nats::NatsSubscription),
    Memory(memory::MemorySubscription),
}

impl Subscription {
    /// The next event, or `None` when the bus closed.
    pub async fn next(&mut self) -> Option<Envelope> {
        match self {
            Self::Nats(s) => s.next().await,
            Self::Memory(s) => s.next().await,
        }
    }
}
