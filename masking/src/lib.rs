//! Airlock's masking engine, independent of any wire protocol:
//!
//! - [`detect`]: PII detectors (e-mail, phone, payment card, IBAN, SSN, IP addresses, JWTs and API
//!   keys), each with a validator, run in a single pass over a text.
//! - [`strategy`]: what a masked value becomes (`redact`, `partial`, keyed `hash`).
//! - [`value`]: masking one PostgreSQL value of a given type, in text or binary format, so that
//!   the result is still a valid value for the client.
//! - [`lineage`]: which table columns each output column of a SQL statement derives from.

pub mod detect;
pub mod lineage;
pub mod strategy;
pub mod value;
