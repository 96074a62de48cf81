//! Whether this node is current: one task per node asks the raft leader, about every second, to
//! confirm its leadership with a quorum (openraft's read index) and waits until this node has
//! applied everything committed before that. The latest confirmation is published on a watch
//! channel; every Watch stream sends it as a heartbeat, and a node that has not confirmed for
//! [`UNCONFIRMED_LIMIT`] refuses Watch and ends the streams it serves, so followers move on to a
//! node that can. A node cut off from the majority keeps its state machine and would otherwise
//! serve it as if it were current.

use std::sync::Arc;
use std::time::Duration;

use openraft::LogId;
use openraft::error::{CheckIsLeaderError, RaftError};
use proto::pb::RaftPayload;
use proto::pb::raft_client::RaftClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::Channels;
use crate::store::Versions;
use crate::{NodeId, Raft};

/// How often a node confirms that it is current.
pub(crate) const CONFIRM_INTERVAL: Duration = Duration::from_secs(1);
/// One confirmation (the leader's quorum round, then catching up with its read index) may take
/// this long.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// A node whose last confirmation is older than this serves no Watch stream.
pub(crate) const UNCONFIRMED_LIMIT: Duration = Duration::from_secs(5);

/// A confirmation: at `at` (when it was asked for) this node had applied everything committed,
/// and its newest version was `version` (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Confirmed {
    pub(crate) at: Instant,
    pub(crate) version: u64,
}

impl Confirmed {
    /// Whether this confirmation still lets the node serve Watch streams.
    pub(crate) fn fresh(&self) -> bool {
        self.at.elapsed() < UNCONFIRMED_LIMIT
    }
}

/// The latest confirmation, `None` until the first.
pub(crate) type Confirmations = watch::Receiver<Option<Confirmed>>;

type ReadIndex = Result<
    (Option<LogId<NodeId>>, Option<LogId<NodeId>>),
    RaftError<NodeId, CheckIsLeaderError<NodeId, openraft::BasicNode>>,
>;

/// Why a confirmation failed.
#[derive(Debug, thiserror::Error)]
enum NotConfirmed {
    #[error("no raft leader known")]
    NoLeader,
    #[error("as leader: {0}")]
    Leader(#[source] Box<RaftError<NodeId, CheckIsLeaderError<NodeId, openraft::BasicNode>>>),
    #[error("asking leader node {leader}: {source}")]
    Ask {
        leader: NodeId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("leader node {leader} refused: {source}")]
    Refused {
        leader: NodeId,
        #[source]
        source: Box<RaftError<NodeId, CheckIsLeaderError<NodeId, openraft::BasicNode>>>,
    },
    #[error("waiting to apply the leader's read index: {0}")]
    Apply(#[source] openraft::metrics::WaitError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Start the task; it runs until `stop` is cancelled. `token` is the admin token (the leader's
/// `Raft` service needs it).
pub(crate) fn spawn(
    raft: Raft,
    versions: watch::Receiver<Versions>,
    channels: Arc<Channels>,
    token: Arc<str>,
    stop: CancellationToken,
) -> (Confirmations, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONFIRM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when confirmations fail, and whether that was logged (once it lasted long enough
        // to end Watch streams: a node that just started has no leader yet).
        let mut failing: Option<(Instant, bool)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let at = Instant::now();
            let confirmed = tokio::select! {
                r = tokio::time::timeout(CONFIRM_TIMEOUT, confirm(&raft, &channels, &token)) => {
                    r.unwrap_or(Err(NotConfirmed::Timeout(CONFIRM_TIMEOUT)))
                }
                () = stop.cancelled() => return,
            };
            match confirmed {
                Ok(()) => {
                    // Read after the node applied the read index: at least what was committed at `at`.
                    let version = versions.borrow().last().map_or(0, |v| v.version);
                    tx.send_replace(Some(Confirmed { at, version }));
                    if let Some((_, true)) = failing {
                        info!(
                            policy.version = version,
                            "this node is confirmed current by the raft quorum again"
                        );
                    }
                    failing = None;
                }
                Err(e) => {
                    let (since, warned) = failing.get_or_insert((at, false));
                    if !*warned && since.elapsed() >= UNCONFIRMED_LIMIT {
                        warn!(
                            error = %e,
                            "this node cannot confirm with the raft leader and quorum that it is current; \
                             it serves no Watch stream until it can"
                        );
                        *warned = true;
                    } else {
                        debug!(error = %e, "this node could not confirm that it is current");
                    }
                }
            }
        }
    });
    (rx, task)
}

/// The leader confirms with its quorum (a single node is its own quorum); a follower asks the
/// leader for its read index, then waits until it applied it.
async fn confirm(raft: &Raft, channels: &Channels, token: &str) -> Result<(), NotConfirmed> {
    let forward = match raft.ensure_linearizable().await {
        Ok(_) => return Ok(()),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => f,
        Err(e) => return Err(NotConfirmed::Leader(Box::new(e))),
    };
    let (Some(leader), Some(node)) = (forward.leader_id, forward.leader_node) else {
        return Err(NotConfirmed::NoLeader);
    };
    let ask = |source: Box<dyn std::error::Error + Send + Sync>| NotConfirmed::Ask { leader, source };
    let channel = channels.node(leader, &node).map_err(|e| ask(Box::new(e)))?;
    let mut request = tonic::Request::new(RaftPayload { payload: Vec::new() });
    request.set_timeout(CONFIRM_TIMEOUT);
    let authorization = format!("Bearer {token}").parse().map_err(|e| ask(Box::new(e)))?;
    request.metadata_mut().insert("authorization", authorization);
    let answer = RaftClient::new(channel).read_index(request).await.map_err(|e| ask(Box::new(e)))?;
    let read: ReadIndex =
        serde_json::from_slice(&answer.into_inner().payload).map_err(|e| ask(Box::new(e)))?;
    let (read_log_id, _) = read.map_err(|e| NotConfirmed::Refused { leader, source: Box::new(e) })?;
    let index = read_log_id.map(|l| l.index);
    raft.wait(None)
        .applied_index_at_least(index, "the leader's read index")
        .await
        .map_err(NotConfirmed::Apply)?;
    Ok(())
}
