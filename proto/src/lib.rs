//! Airlock's shared contract. Every component depends on this crate and nothing here does I/O.
//!
//! # Layout
//! - [`events`]: the event envelope and event types, encoded as MessagePack with field names.
//! - [`subjects`]: NATS stream and subject names, and subject wildcard matching.
//! - [`policy`]: the policy document (YAML), its types and its validation with line numbers.
//! - [`config`]: the one config loader (TOML plus `AIRLOCK_*` environment overrides).
//! - [`pb`]: the policy store's gRPC definitions, generated from `proto/policy.proto`.

pub mod config;
pub mod events;
pub mod policy;
pub mod subjects;

/// Generated gRPC types for the policy store (`proto/policy.proto`).
#[allow(unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("airlock.policy.v1");
}
