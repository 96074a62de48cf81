//! Admin and audit commands: thin clients of the policy store, the approval service and the
//! archive.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use uuid::Uuid;

use crate::config::AirlockConfig;

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate and store a policy document as a new version.
    Apply {
        /// The YAML file.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Who is applying it (recorded in the history). Default: $USER.
        #[arg(long)]
        author: Option<String>,
        /// Policy store endpoint. Default: http://<policy_store.listen>.
        #[arg(long)]
        store: Option<String>,
    },
    /// Print one version's document (default: the latest).
    Get {
        version: Option<u64>,
        #[arg(long)]
        store: Option<String>,
    },
    /// List every version.
    History {
        #[arg(long)]
        store: Option<String>,
    },
    /// Show what changed between two versions (a unified diff of their documents).
    Diff {
        from: u64,
        to: u64,
        #[arg(long)]
        store: Option<String>,
    },
    /// Apply an old version's document again, as a new version (the history keeps both).
    Rollback {
        version: u64,
        /// Who is rolling back (recorded in the history). Default: $USER.
        #[arg(long)]
        author: Option<String>,
        #[arg(long)]
        store: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ApprovalsCommand {
    /// List pending holds.
    List(ApprovalsTarget),
    /// Show one pending hold in full.
    Show {
        id: Uuid,
        #[command(flatten)]
        target: ApprovalsTarget,
    },
    /// Approve a hold: its statement runs (once the rule's `min` approvals are in).
    Approve {
        id: Uuid,
        /// Your name, for the record (admin token only; an OIDC token names you itself).
        #[arg(long = "as")]
        approver: Option<String>,
        /// For an access request: how long the grant lasts (`2h`); default the rule's maximum.
        #[arg(long = "for")]
        duration: Option<String>,
        #[command(flatten)]
        target: ApprovalsTarget,
    },
    /// Deny a hold: its statement never runs.
    Deny {
        id: Uuid,
        /// Why (required; the agent sees it).
        #[arg(long)]
        reason: String,
        #[arg(long = "as")]
        approver: Option<String>,
        #[command(flatten)]
        target: ApprovalsTarget,
    },
}

#[derive(clap::Args)]
pub(crate) struct ApprovalsTarget {
    /// Approval service URL. Default: http://<approvals.listen>.
    #[arg(long)]
    url: Option<String>,
    /// Your OIDC token, or the break-glass admin token. Default: $AIRLOCK_ADMIN_TOKEN, else
    /// approvals.admin_token(_file), else ./data/admin-token.
    #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn store_endpoint(cfg: &AirlockConfig, store: Option<String>) -> String {
    store.unwrap_or_else(|| format!("http://{}", cfg.policy_store.listen))
}

pub(crate) async fn policy(cfg: &AirlockConfig, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Apply { file, author, store } => {
            let yaml =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            // Check locally first, so errors name the file's lines even if the store is down.
            if let Err(e) = proto::policy::parse(&yaml) {
                anyhow::bail!("{}: {e}", file.display());
            }
            let author = author.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
            let mut c = policy_store::client::PolicyClient::connect(&store_endpoint(cfg, store)).await?;
            let r = c.apply(&yaml, &author).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if r.changed {
                println!("applied {} as version {}", file.display(), r.version);
            } else {
                println!("unchanged: version {} already has this document", r.version);
            }
        }
        PolicyCommand::Get { version, store } => {
            let mut c = policy_store::client::PolicyClient::connect(&store_endpoint(cfg, store)).await?;
            let v = c.get(version.unwrap_or(0)).await?;
            print!("{}", v.document_yaml);
        }
        PolicyCommand::Diff { from, to, store } => {
            crate::store_admin::diff(&store_endpoint(cfg, store), from, to).await?;
        }
        PolicyCommand::Rollback { version, author, store } => {
            let author = author.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
            crate::store_admin::rollback(&store_endpoint(cfg, store), version, &author).await?;
        }
        PolicyCommand::History { store } => {
            let mut c = policy_store::client::PolicyClient::connect(&store_endpoint(cfg, store)).await?;
            println!("{:>8}  {:<24}  {:<16}  DIGEST", "VERSION", "APPLIED", "AUTHOR");
            for v in c.history().await? {
                let at = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(v.applied_at_unix_ms.max(0) as u64);
                println!(
                    "{:>8}  {:<24}  {:<16}  {}",
                    v.version,
                    proto::events::Timestamp::from(at).to_string().chars().take(19).collect::<String>(),
                    v.author,
                    v.digest.chars().take(12).collect::<String>()
                );
            }
        }
    }
    Ok(())
}

fn approvals_client(
    cfg: &AirlockConfig,
    t: ApprovalsTarget,
) -> anyhow::Result<approval_service::client::ApprovalsClient> {
    let acfg = cfg.approvals();
    let url = t.url.unwrap_or_else(|| format!("http://{}", acfg.listen));
    let token = match t.token {
        Some(t) => t,
        None => match acfg.token() {
            Ok(t) => t,
            Err(_) => std::fs::read_to_string("data/admin-token").map(|s| s.trim().to_string()).context(
                "no admin token: pass --token, set AIRLOCK_ADMIN_TOKEN, or configure approvals.admin_token",
            )?,
        },
    };
    Ok(approval_service::client::ApprovalsClient::new(&url, &token))
}

pub(crate) async fn approvals(cfg: &AirlockConfig, cmd: ApprovalsCommand) -> anyhow::Result<()> {
    match cmd {
        ApprovalsCommand::List(t) => {
            let holds = approvals_client(cfg, t)?.list().await?;
            print!("{}", approval_service::client::render_holds(&holds));
        }
        ApprovalsCommand::Show { id, target } => {
            let hold = approvals_client(cfg, target)?.get(id).await?;
            print!("{}", approval_service::client::render_hold(&hold));
        }
        ApprovalsCommand::Approve { id, approver, duration, target } => {
            let d = approvals_client(cfg, target)?
                .approve_for(id, approver.as_deref(), duration.as_deref())
                .await?;
            println!("{}", describe_decision(&d));
        }
        ApprovalsCommand::Deny { id, reason, approver, target } => {
            let d = approvals_client(cfg, target)?.deny(id, &reason, approver.as_deref()).await?;
            println!("{}", describe_decision(&d));
        }
    }
    Ok(())
}

/// One line for the CLI: the hold, its outcome (or that it still waits), who and why.
fn describe_decision(d: &approval_service::client::DecisionView) -> String {
    let why = d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    match d.outcome {
        Some(o) => format!("hold {} {o} by {}{why}", d.hold_id, d.decided_by),
        None => format!("hold {} still pending: more approvals are needed", d.hold_id),
    }
}

pub(crate) fn keygen() -> anyhow::Result<()> {
    let key = format!("ak_{}", hex::encode(rand::random::<[u8; 24]>()));
    println!("api key (give it to the agent; it is not stored):\n  {key}");
    println!(
        "policy entry:\n  service_accounts:\n    - name: CHANGE-ME\n      groups: [agents]\n      api_key_sha256: {}",
        proxy_node::identity::hash_api_key(&key)
    );
    Ok(())
}
