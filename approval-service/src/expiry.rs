//! Expires holds nobody decided before their `expires_at`: publishes `HoldDecided` with outcome
//! `Expired`, once per hold in this process.

use std::sync::Arc;
use std::time::Duration;

use proto::events::HoldOutcome;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::HoldError;
use crate::hold::{Decider, Holds};

/// How long to wait before retrying an expiry whose publish failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Expire due holds until `stop`.
pub(crate) async fn run(holds: Arc<Holds>, stop: CancellationToken) {
    loop {
        let now = Instant::now();
        for (id, timeout) in holds.due(now) {
            let reason = format!("no decision within {}", humantime::format_duration(round_to_secs(timeout)));
            match holds.decide(id, HoldOutcome::Expired, &Decider::Service, Some(reason)).await {
                Ok(_) | Err(HoldError::NotFound(_) | HoldError::Busy(_)) => {}
                Err(e) => {
                    warn!(hold.id = %id, error = %e, "expiring a hold failed; retrying");
                    holds.postpone(id, Instant::now() + RETRY_AFTER);
                }
            }
        }
        let next = holds.next_deadline();
        tokio::select! {
            () = stop.cancelled() => return,
            () = holds.changed() => {}
            () = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn round_to_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_millis() >= 500))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_shown_in_whole_seconds() {
        let shown = |d| humantime::format_duration(round_to_secs(d)).to_string();
        assert_eq!(shown(Duration::from_millis(300_000)), "5m");
        assert_eq!(shown(Duration::from_millis(999)), "1s");
        assert_eq!(shown(Duration::from_millis(90_200)), "1m 30s");
    }
}
