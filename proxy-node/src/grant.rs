//! Just-in-time access grants: an approver granted a principal a connection, for statements
//! under one rule, until a time. The node follows grant and revocation events and consults them
//! when a rule would hold; expiry is checked against the clock on every statement, and against
//! the rule as the policy in force has it (a version that takes `grant` away, or shortens its
//! `max`, ends the grants it no longer allows).
//!
//! Grants made before this node started are not known to it (the statements are then held as
//! usual, which fails safe). Nor are grants announced while its connection to the bus was
//! down; and since a revocation may have been announced then too, a node that may have missed
//! events ([`EventBus::losses`]) forgets every grant it knew.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventbus::{BusError, EventBus};
use proto::events::{Event, GrantDecision, Timestamp};
use proto::policy::Rule;
use uuid::Uuid;

#[derive(Clone)]
pub struct Grants {
    /// The grants known, and the bus's [`EventBus::losses`] when they began to be collected.
    active: Arc<Mutex<(HashMap<Uuid, GrantDecision>, u64)>>,
    bus: EventBus,
}

impl Grants {
    /// Follow grant and revocation events in the background.
    pub async fn start(bus: &EventBus) -> Result<Self, BusError> {
        let grants = Self { active: Arc::new(Mutex::new((HashMap::new(), bus.losses()))), bus: bus.clone() };
        for filter in [proto::subjects::GRANT_DECIDED, proto::subjects::GRANT_REVOKED] {
            let mut sub = bus.subscribe(filter).await?;
            let g = grants.clone();
            tokio::spawn(async move {
                while let Some(env) = sub.next().await {
                    match env.event {
                        Event::GrantDecided(d) => {
                            tracing::info!(grant.id = %d.grant_id, principal = %d.principal, until = %d.until, "grant received");
                            g.lock().0.insert(d.grant_id, d);
                        }
                        Event::GrantRevoked(r) => {
                            tracing::info!(grant.id = %r.grant_id, "grant revoked");
                            g.lock().0.remove(&r.grant_id);
                        }
                        _ => {}
                    }
                }
            });
        }
        Ok(grants)
    }

    /// The grants known, forgotten first if events may have been missed since they were
    /// collected (a revocation among them).
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<Uuid, GrantDecision>, u64)> {
        let mut g = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let losses = self.bus.losses();
        if g.1 != losses {
            if !g.0.is_empty() {
                tracing::warn!(grants = g.0.len(), "events may have been missed: forgetting every grant");
            }
            *g = (HashMap::new(), losses);
        }
        g
    }

    /// The grant covering `rule` (as the policy in force has it) for this principal and
    /// connection now, as "grant ID until T". A rule that grants no access (any more) is
    /// covered by no grant; nor is it past the longest grant the rule now allows
    /// (`grant.max` from its start), should a new policy version have shortened that.
    pub fn covering(&self, principal: &str, connection: &str, rule: &Rule) -> Option<String> {
        let max = rule.grant.as_ref()?.max;
        let now = Timestamp::now();
        let mut guard = self.lock();
        let m = &mut guard.0;
        m.retain(|_, g| g.until > now);
        m.values()
            .find(|g| {
                g.principal == principal
                    && g.connection == connection
                    && g.rule == rule.name
                    && g.from <= now
                    && now < g.from.plus(max)
            })
            .map(|g| format!("grant {} until {}", g.grant_id, g.until.min(g.from.plus(max))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proto::events::Envelope;

    use super::*;

    fn rule(name: &str, max: Duration) -> Rule {
        Rule {
            name: name.into(),
            connections: vec![],
            principals: None,
            matches: Default::default(),
            action: proto::events::Decision::Hold,
            approvers: None,
            timeout: None,
            slack: None,
            webhook: None,
            grant: Some(proto::policy::GrantSpec { max }),
        }
    }

    /// A grant covers its rule only while the rule, as the policy in force has it, grants
    /// access, and no longer than the rule's `grant.max` from the grant's start (a new policy
    /// version may have shortened it). Nor another rule, principal or connection.
    #[tokio::test]
    async fn a_grant_covers_its_rule_only_as_long_as_the_rule_now_allows() {
        let bus = EventBus::memory();
        let grants = Grants::start(&bus).await.expect("grants");
        let now = Timestamp::now();
        let g = GrantDecision {
            grant_id: Uuid::now_v7(),
            hold_id: Uuid::now_v7(),
            principal: "agent".into(),
            connection: "shop".into(),
            rule: "deletes".into(),
            granted_by: "alice".into(),
            from: Timestamp(now.0 - 10 * 60 * 1_000_000),
            until: now.plus(Duration::from_secs(3600)),
        };
        bus.publish(&Envelope::new(Uuid::now_v7(), Event::GrantDecided(g))).await.expect("publish");
        let long = rule("deletes", Duration::from_secs(8 * 3600));
        for _ in 0..100 {
            if grants.covering("agent", "shop", &long).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(grants.covering("agent", "shop", &long).is_some());
        assert!(grants.covering("agent", "shop", &rule("updates", Duration::from_secs(3600))).is_none());
        assert!(grants.covering("other", "shop", &long).is_none());
        assert!(grants.covering("agent", "crm", &long).is_none());
        // Shortened to 5 minutes: the grant, 10 minutes old, is over.
        assert!(grants.covering("agent", "shop", &rule("deletes", Duration::from_secs(300))).is_none());
        let mut no_grant = long.clone();
        no_grant.grant = None;
        assert!(grants.covering("agent", "shop", &no_grant).is_none());
        assert!(grants.covering("agent", "shop", &long).is_some(), "the grant itself is kept");
    }

    /// A node that lost its connection to the bus may have missed a revocation: it forgets the
    /// grants it knew (the statements they covered are held again), and learns new ones.
    #[tokio::test]
    async fn grants_are_forgotten_when_the_bus_may_have_lost_a_revocation() {
        let mut nats = testkit::Nats::start().expect("nats");
        testkit::init_crypto();
        let cfg = eventbus::NatsConfig { url: nats.url.clone(), ..Default::default() };
        let bus = EventBus::connect_nats(&cfg).await.expect("connect");
        let grants = Grants::start(&bus).await.expect("grants");
        let grant = |id| GrantDecision {
            grant_id: id,
            hold_id: Uuid::now_v7(),
            principal: "agent".into(),
            connection: "shop".into(),
            rule: "deletes".into(),
            granted_by: "alice".into(),
            from: Timestamp::now(),
            until: Timestamp::now().plus(Duration::from_secs(3600)),
        };
        let rule = rule("deletes", Duration::from_secs(3600));
        let known = async |grants: &Grants, want: bool| {
            for _ in 0..100 {
                if grants.covering("agent", "shop", &rule).is_some() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the grant is {}known", if want { "not " } else { "still " });
        };
        let publish = async |bus: &EventBus, g| {
            bus.publish(&Envelope::new(Uuid::now_v7(), Event::GrantDecided(g))).await.expect("publish");
        };
        publish(&bus, grant(Uuid::now_v7())).await;
        known(&grants, true).await;
        // NATS goes away (a revocation published meanwhile would be lost) and comes back.
        nats.stop();
        nats.start_again().expect("restart");
        known(&grants, false).await;
        // Grants announced after that are followed again.
        for _ in 0..100 {
            if bus
                .publish(&Envelope::new(Uuid::now_v7(), Event::SessionEnded { reason: "probe".into() }))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        publish(&bus, grant(Uuid::now_v7())).await;
        known(&grants, true).await;
    }
}
