//! `airlock policy-store status|add-learner|promote|remove` (the admin API, with the admin token)
//! and `airlock policy diff|rollback`: thin clients of the policy store.

use anyhow::Context;
use clap::Subcommand;
use policy_store::client::{AdminClient, PolicyClient};
use proto::pb::{MembershipResponse, StatusResponse};

use crate::config::AirlockConfig;

#[derive(Subcommand)]
pub(crate) enum StoreAdminCommand {
    /// Show this node's view of the cluster: state, leader, term, members, latest version.
    Status(AdminTarget),
    /// Add a node as a learner (it copies the log but does not vote); returns once it caught up.
    AddLearner {
        /// The new node's id (its policy_store.node_id).
        node_id: u64,
        /// host:port of the new node's gRPC listener.
        addr: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Make learners voters.
    Promote {
        #[arg(required = true)]
        node_ids: Vec<u64>,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Remove nodes (voters or learners) from the cluster.
    Remove {
        #[arg(required = true)]
        node_ids: Vec<u64>,
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(clap::Args)]
pub(crate) struct AdminTarget {
    /// Policy store endpoint (any node). Default: http(s)://<policy_store.listen> (https when it
    /// serves TLS).
    #[arg(long)]
    store: Option<String>,
    /// Admin token. Default: $AIRLOCK_ADMIN_TOKEN, else policy_store.admin_token(_file), else
    /// ./data/admin-token (`airlock up`).
    #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

async fn admin_client(cfg: &AirlockConfig, t: AdminTarget) -> anyhow::Result<AdminClient> {
    let endpoint = t.store.unwrap_or_else(|| cfg.policy_store.local_url());
    let token = match t.token {
        Some(t) => t,
        None => match cfg.policy_store.token().context("reading policy_store.admin_token_file")? {
            Some(t) => t,
            None => std::fs::read_to_string("data/admin-token").map(|s| s.trim().to_string()).context(
                "no admin token: pass --token, set AIRLOCK_ADMIN_TOKEN, or configure policy_store.admin_token",
            )?,
        },
    };
    Ok(AdminClient::connect_with(&endpoint, &token, &cfg.policy_store.client_tls()?).await?)
}

fn print_members(r: &MembershipResponse) {
    println!("membership committed at log index {}", r.log_index);
    for m in &r.members {
        println!("  node {:<4} {:<8} {}", m.node_id, if m.voter { "voter" } else { "learner" }, m.addr);
    }
}

fn print_status(s: &StatusResponse) {
    println!("node {}: {} (term {})", s.node_id, s.state, s.term);
    if s.leader_id == 0 {
        println!("leader: none known");
    } else {
        println!("leader: node {}", s.leader_id);
    }
    println!("log: last index {}, applied {}", s.last_log_index, s.last_applied_index);
    println!("policy version: {}", s.policy_version);
    println!("members:");
    for m in &s.members {
        println!("  node {:<4} {:<8} {}", m.node_id, if m.voter { "voter" } else { "learner" }, m.addr);
    }
}

pub(crate) async fn run(cfg: &AirlockConfig, cmd: StoreAdminCommand) -> anyhow::Result<()> {
    match cmd {
        StoreAdminCommand::Status(t) => print_status(&admin_client(cfg, t).await?.status().await?),
        StoreAdminCommand::AddLearner { node_id, addr, target } => {
            print_members(&admin_client(cfg, target).await?.add_learner(node_id, &addr).await?);
        }
        StoreAdminCommand::Promote { node_ids, target } => {
            print_members(&admin_client(cfg, target).await?.promote(node_ids).await?);
        }
        StoreAdminCommand::Remove { node_ids, target } => {
            print_members(&admin_client(cfg, target).await?.remove(node_ids).await?);
        }
    }
    Ok(())
}

/// `airlock policy diff V1 V2`: a unified diff of two versions' documents.
pub(crate) async fn diff(mut c: PolicyClient, from: u64, to: u64) -> anyhow::Result<()> {
    let old = c.get(from).await.with_context(|| format!("reading version {from}"))?;
    let new = c.get(to).await.with_context(|| format!("reading version {to}"))?;
    print!("{}", policy_store::client::diff(&old, &new));
    Ok(())
}

/// `airlock policy rollback V`: apply version V's document again as a new version.
pub(crate) async fn rollback(mut c: PolicyClient, version: u64, author: &str) -> anyhow::Result<()> {
    let r = c.rollback(version, author).await?;
    if r.changed {
        println!("rolled back to version {version}'s document as version {}", r.version);
    } else {
        println!("unchanged: version {} already has version {version}'s document", r.version);
    }
    Ok(())
}
