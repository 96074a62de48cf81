//! Just-in-time access grants. A hold of a rule with `grant: { max }` is an access request;
//! approving it records a grant (`until` = now + the chosen duration, capped at `max`) in the
//! hold's record, next to the decision. Grants are listed and revoked through the REST API.
//!
//! The grant is published as [`proto::events::Event::GrantDecided`] with the decision, and a
//! revocation as [`proto::events::Event::GrantRevoked`], both on the access request's session;
//! proxy nodes follow them and let statements under the rule through until the grant ends.

use proto::events::{Envelope, Event, GrantDecision, GrantRevocation, Timestamp};

use crate::store::HoldRecord;

/// The grant of a decided access request, if it has one.
pub fn decision(rec: &HoldRecord) -> Option<GrantDecision> {
    let g = rec.grant.as_ref()?;
    let d = rec.decision.as_ref()?;
    Some(GrantDecision {
        grant_id: g.grant_id,
        hold_id: rec.id(),
        principal: rec.request.principal.subject.clone(),
        connection: rec.request.connection.clone(),
        rule: rec.request.rule.clone(),
        granted_by: d.decided_by.clone(),
        from: rec.decided_at.unwrap_or(rec.request.requested_at),
        until: g.until,
    })
}

/// The events to publish with a decided record besides `HoldDecided`: its grant, if any.
pub(crate) fn events(rec: &HoldRecord, at: Timestamp) -> Vec<Envelope> {
    let Some(g) = decision(rec) else { return Vec::new() };
    vec![Envelope {
        v: proto::events::ENVELOPE_VERSION,
        id: crate::hold::derived_id("grant_decided", rec.id()),
        session: rec.session,
        at,
        event: Event::GrantDecided(g),
    }]
}

/// The revocation event of a record whose grant was revoked.
pub(crate) fn revocation(rec: &HoldRecord, reason: Option<String>) -> Option<Envelope> {
    let g = rec.grant.as_ref()?;
    let revoked_by = g.revoked.clone()?;
    Some(Envelope {
        v: proto::events::ENVELOPE_VERSION,
        id: crate::hold::derived_id("grant_revoked", rec.id()),
        session: rec.session,
        at: Timestamp::now(),
        event: Event::GrantRevoked(GrantRevocation {
            grant_id: g.grant_id,
            hold_id: rec.id(),
            revoked_by,
            reason,
        }),
    })
}
