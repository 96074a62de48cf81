//! Just-in-time access grants: an approver granted a principal a connection, for statements
//! under one rule, until a time. The node follows grant and revocation events and consults them
//! when a rule would hold; expiry is checked against the clock on every statement.
//!
//! Grants made before this node started are not known to it (the statements are then held as
//! usual, which fails safe).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventbus::{BusError, EventBus};
use proto::events::{Event, GrantDecision, Timestamp};
use uuid::Uuid;

#[derive(Clone, Default)]
pub struct Grants {
    active: Arc<Mutex<HashMap<Uuid, GrantDecision>>>,
}

impl Grants {
    /// Follow grant and revocation events in the background.
    pub async fn start(bus: &EventBus) -> Result<Self, BusError> {
        let grants = Self::default();
        for filter in [proto::subjects::GRANT_DECIDED, proto::subjects::GRANT_REVOKED] {
            let mut sub = bus.subscribe(filter).await?;
            let g = grants.clone();
            tokio::spawn(async move {
                while let Some(env) = sub.next().await {
                    match env.event {
                        Event::GrantDecided(d) => {
                            tracing::info!(grant.id = %d.grant_id, principal = %d.principal, until = %d.until, "grant received");
                            g.lock().insert(d.grant_id, d);
                        }
                        Event::GrantRevoked(r) => {
                            tracing::info!(grant.id = %r.grant_id, "grant revoked");
                            g.lock().remove(&r.grant_id);
                        }
                        _ => {}
                    }
                }
            });
        }
        Ok(grants)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, GrantDecision>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The grant covering `rule` for this principal and connection now, as "grant ID until T".
    pub fn covering(&self, principal: &str, connection: &str, rule: &str) -> Option<String> {
        let now = Timestamp::now();
        let mut m = self.lock();
        m.retain(|_, g| g.until > now);
        m.values()
            .find(|g| {
                g.principal == principal && g.connection == connection && g.rule == rule && g.from <= now
            })
            .map(|g| format!("grant {} until {}", g.grant_id, g.until))
    }
}
