//! Admin and audit commands: thin clients of the policy store, the approval service and the
//! archive.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use policy_store::client::PolicyClient;
use uuid::Uuid;

use crate::config::AirlockConfig;

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Check policy documents as the store would, without one (no token; for a policy
    /// repository's CI). Exits 1 if any is invalid.
    Validate {
        /// The YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate and store a policy document as a new version (admin token).
    Apply {
        /// The YAML file.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Who is applying it, recorded in the history after the token's role
        /// (`admin-token:NAME`; anyone with the token can claim any name). Default: $USER.
        #[arg(long)]
        author: Option<String>,
        #[command(flatten)]
        target: StoreTarget,
    },
    /// Print one version's document (default: the latest).
    Get {
        version: Option<u64>,
        #[command(flatten)]
        target: StoreTarget,
    },
    /// List every version.
    History {
        #[command(flatten)]
        target: StoreTarget,
    },
    /// Show what changed between two versions (a unified diff of their documents).
    Diff {
        from: u64,
        to: u64,
        #[command(flatten)]
        target: StoreTarget,
    },
    /// Apply an old version's document again, as a new version (the history keeps both; admin
    /// token).
    Rollback {
        version: u64,
        /// Who is rolling back, recorded as for `apply`. Default: $USER.
        #[arg(long)]
        author: Option<String>,
        #[command(flatten)]
        target: StoreTarget,
    },
}

/// Which policy store, with which token.
#[derive(clap::Args)]
pub(crate) struct StoreTarget {
    /// Policy store endpoint. Default: http(s)://<policy_store.listen> (https when it serves TLS; its
    /// certificate is checked against policy_store.tls_ca_file, else the system roots).
    #[arg(long)]
    store: Option<String>,
    /// Bearer token: the store's admin token (apply, rollback) or its read token (get, history,
    /// diff). Default: $AIRLOCK_ADMIN_TOKEN, else policy_store.admin_token(_file), else (reads)
    /// policy_store.read_token(_file), else ./data/admin-token (`airlock up`).
    #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl StoreTarget {
    fn endpoint(&self, cfg: &AirlockConfig) -> String {
        self.store.clone().unwrap_or_else(|| cfg.policy_store.local_url())
    }

    /// The token to send; `write` when the command changes the policy.
    fn token(&self, cfg: &AirlockConfig, write: bool) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        if let Some(t) = cfg.policy_store.token().context("reading policy_store.admin_token_file")? {
            return Ok(t);
        }
        if !write
            && let Some(t) = cfg.policy_store.read_token().context("reading policy_store.read_token_file")?
        {
            return Ok(t);
        }
        std::fs::read_to_string("data/admin-token").map(|s| s.trim().to_string()).context(
            "no policy-store token: pass --token, set AIRLOCK_ADMIN_TOKEN, or configure \
             policy_store.admin_token (reads: policy_store.read_token)",
        )
    }

    async fn client(&self, cfg: &AirlockConfig, write: bool) -> anyhow::Result<PolicyClient> {
        let tls = cfg.policy_store.client_tls()?;
        Ok(PolicyClient::connect_with(&self.endpoint(cfg), &self.token(cfg, write)?, &tls).await?)
    }
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

pub(crate) async fn policy(cfg: &AirlockConfig, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Validate { files } => {
            let mut invalid = 0;
            for file in &files {
                match std::fs::read_to_string(file).map_err(|e| e.to_string()).and_then(|yaml| {
                    proto::policy::parse(&yaml).map_err(|e| e.to_string().trim_end().to_string())
                }) {
                    Ok(doc) => println!(
                        "{}: valid ({} connections, {} rules, {} masking entries, {} service accounts)",
                        file.display(),
                        doc.connections.len(),
                        doc.rules.len(),
                        doc.masking.len(),
                        doc.service_accounts.len()
                    ),
                    Err(e) => {
                        invalid += 1;
                        eprintln!("{}: {e}", file.display());
                    }
                }
            }
            anyhow::ensure!(invalid == 0, "{invalid} of {} documents invalid", files.len());
        }
        PolicyCommand::Apply { file, author, target } => {
            let yaml =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            // Check locally first, so errors name the file's lines even if the store is down.
            if let Err(e) = proto::policy::parse(&yaml) {
                anyhow::bail!("{}: {e}", file.display());
            }
            let author = author.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
            let mut c = target.client(cfg, true).await?;
            let r = c.apply(&yaml, &author).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if r.changed {
                println!("applied {} as version {}", file.display(), r.version);
            } else {
                println!("unchanged: version {} already has this document", r.version);
            }
        }
        PolicyCommand::Get { version, target } => {
            let v = target.client(cfg, false).await?.get(version.unwrap_or(0)).await?;
            print!("{}", v.document_yaml);
        }
        PolicyCommand::Diff { from, to, target } => {
            crate::store_admin::diff(target.client(cfg, false).await?, from, to).await?;
        }
        PolicyCommand::Rollback { version, author, target } => {
            let author = author.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
            crate::store_admin::rollback(target.client(cfg, true).await?, version, &author).await?;
        }
        PolicyCommand::History { target } => {
            let mut c = target.client(cfg, false).await?;
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
