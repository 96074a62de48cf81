//! `airlock audit ...`: auditors' commands. Each reads the bucket alone (the `[storage]`
//! section), never a running component.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use proto::events::Decision;
use recorder::audit::{self, SessionFilter};
use uuid::Uuid;

use crate::config::AirlockConfig;

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// List recorded sessions, newest first.
    Sessions {
        /// Started at or after (YYYY-MM-DD or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Started before (YYYY-MM-DD or RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// The principal's subject.
        #[arg(long)]
        principal: Option<String>,
        /// The connection name.
        #[arg(long)]
        connection: Option<String>,
        /// Sessions with at least one request decided so.
        #[arg(long, value_enum)]
        decision: Option<DecisionArg>,
    },
    /// Print a session's events.
    Show { id: Uuid },
    /// Print a readable transcript of a session.
    Replay { id: Uuid },
    /// Transcript lines of every session containing TEXT (case-insensitive).
    Search { text: String },
    /// Check hash chains, manifests and the archive log; exit 1 if anything was tampered with.
    Verify {
        /// One session (default: the whole archive).
        id: Option<Uuid>,
        /// Require manifests, archive log entries and the retention marker signed by this Ed25519
        /// public key (64 hex digits). Default: the
        /// public half of `recorder.signing_key_file`, if configured.
        #[arg(long)]
        public_key: Option<String>,
        /// Sessions dated before this (YYYY-MM-DD) are expired, not deleted: for archives whose
        /// retention is done by storage lifecycle rules. The recorder's own retention records
        /// its cutoff in the archive, so it needs no flag.
        #[arg(long)]
        expired_before: Option<String>,
        /// An archive log head an earlier `audit verify` printed (`SEQ:SHA256`), kept outside the
        /// bucket: the log must still hold that entry unchanged, so deleting the newest sessions
        /// together with their log entries is detected.
        #[arg(long)]
        checkpoint: Option<audit::Checkpoint>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DecisionArg {
    Allow,
    Hold,
    Deny,
}

impl From<DecisionArg> for Decision {
    fn from(d: DecisionArg) -> Self {
        match d {
            DecisionArg::Allow => Decision::Allow,
            DecisionArg::Hold => Decision::Hold,
            DecisionArg::Deny => Decision::Deny,
        }
    }
}

fn time_arg(name: &str, value: Option<String>) -> anyhow::Result<Option<proto::events::Timestamp>> {
    value
        .map(|v| {
            audit::parse_time(&v).with_context(|| format!("--{name} {v:?}: expected YYYY-MM-DD or RFC 3339"))
        })
        .transpose()
}

pub(crate) async fn audit(cfg: &AirlockConfig, cmd: AuditCommand) -> anyhow::Result<()> {
    let store = recorder::open_store(&cfg.storage()).context("opening the archive")?;
    match cmd {
        AuditCommand::Sessions { since, until, principal, connection, decision } => {
            let filter = SessionFilter {
                since: time_arg("since", since)?,
                until: time_arg("until", until)?,
                principal,
                connection,
                decision: decision.map(Decision::from),
            };
            let mut s = audit::list_sessions(store.as_ref()).await?;
            s.retain(|s| filter.matches(s));
            print!("{}", audit::render_sessions(&s));
        }
        AuditCommand::Show { id } => {
            for e in audit::read_session(store.as_ref(), id).await? {
                println!("{} {} {:?}", e.at, e.event.kind(), e.event);
            }
        }
        AuditCommand::Replay { id } => {
            let events = audit::read_session(store.as_ref(), id).await?;
            print!("{}", audit::render_replay(&events));
        }
        AuditCommand::Search { text } => {
            for (id, line) in audit::search(store.as_ref(), &text).await? {
                println!("{id} {line}");
            }
        }
        AuditCommand::Verify { id, public_key, expired_before, checkpoint } => {
            if let Some(date) = &expired_before {
                time_arg("expired-before", Some(date.clone()))?;
            }
            let key = match public_key {
                Some(hex) => Some(
                    recorder::manifest::parse_public_key(&hex)
                        .context("--public-key: expected 64 hex digits (an Ed25519 public key)")?,
                ),
                None => cfg.recorder().signing_key()?.map(|k| k.verifying_key()),
            };
            let report =
                audit::verify_with(store.as_ref(), id, key.as_ref(), expired_before, checkpoint.as_ref())
                    .await?;
            print!("{}", report.render());
            if !report.ok() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
