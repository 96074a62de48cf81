//! NATS stream and subject names. An event of a session is published on
//! `airlock.session.{session}.{kind}` (see [`session_subject`]; the kinds are
//! [`crate::events::Event::kind`]), or, for the high-volume traffic events, inside a batch on
//! [`BATCH`].

use uuid::Uuid;

/// The JetStream stream that holds every Airlock event.
pub const STREAM: &str = "AIRLOCK_EVENTS";
/// The subjects the stream captures.
pub const STREAM_SUBJECTS: &str = "airlock.>";
/// Every session event.
pub const ALL_SESSION_EVENTS: &str = "airlock.session.>";
/// Batches of session events: the proxy's group commit publishes the request, decision and
/// response events of all its sessions here, several per message (see
/// [`crate::events::Batch`]). Matches [`ALL_SESSION_EVENTS`], and no per-kind filter.
pub const BATCH: &str = "airlock.session.batch";
/// Hold requests, consumed by the approval service.
pub const HOLD_REQUESTED: &str = "airlock.session.*.hold_requested";
/// Hold decisions, watched by proxy nodes.
pub const HOLD_DECIDED: &str = "airlock.session.*.hold_decided";
/// Grants, followed by proxy nodes.
pub const GRANT_DECIDED: &str = "airlock.session.*.grant_decided";
/// Grant revocations, followed by proxy nodes.
pub const GRANT_REVOKED: &str = "airlock.session.*.grant_revoked";
/// Policy changes (one per applied version).
pub const POLICY_APPLIED: &str = "airlock.policy.applied";
/// Durable consumer name of the recorder.
pub const RECORDER_DURABLE: &str = "recorder";
/// Durable consumer name of the approval service.
pub const APPROVALS_DURABLE: &str = "approvals";

/// The subject of one session event.
pub fn session_subject(session: Uuid, kind: &str) -> String {
    format!("airlock.session.{session}.{kind}")
}

/// NATS subject matching: `*` matches one token, `>` matches one or more trailing tokens.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(matches("airlock.session.>", "airlock.session.x.request"));
        assert!(!matches("airlock.session.>", "airlock.session"));
        assert!(matches(HOLD_REQUESTED, "airlock.session.abc.hold_requested"));
        assert!(!matches(HOLD_REQUESTED, "airlock.session.abc.hold_decided"));
        assert!(!matches(HOLD_REQUESTED, "airlock.session.a.b.hold_requested"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
    }
}
