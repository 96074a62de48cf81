//! `airlock`: one binary for every component, `airlock up`, and the admin and audit commands.
//! It only wires the component crates together; their logic lives in their own `lib.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod audit_cmd;
mod commands;
mod config;
mod serve;
mod store_admin;
mod telemetry;

/// mimalloc, not the system allocator: the relay makes a few short-lived allocations per
/// statement (events, their strings), and glibc's malloc took about a sixth of the proxy's
/// user time on them. (`--features system-allocator` leaves it out, for heap profilers.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "An access gateway for AI agents: policy, approvals, masking, recording."
)]
struct Cli {
    /// Config file. Default: $AIRLOCK_CONFIG, else ./airlock.toml if present, else built-in defaults.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: in-process event bus, recordings on local disk, a single-node
    /// policy store in the data folder.
    Up {
        /// Data folder (policy store, recordings, admin token). Default ./data.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Apply this policy file at start.
        #[arg(long, short = 'f')]
        policy: Option<PathBuf>,
    },
    /// Run a proxy node (events to NATS, policies from the policy store).
    Proxy,
    /// Run the approval service, or manage holds: list, approve, deny.
    Approvals {
        #[command(subcommand)]
        command: Option<commands::ApprovalsCommand>,
    },
    /// Run the recorder (NATS to object storage).
    Recorder,
    /// Run a policy-store node, or manage the cluster: status, add-learner, promote, remove.
    PolicyStore {
        #[command(subcommand)]
        command: Option<store_admin::StoreAdminCommand>,
    },
    /// Manage policies in the policy store.
    Policy {
        #[command(subcommand)]
        command: commands::PolicyCommand,
    },
    /// Read recorded sessions from the archive.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
    },
    /// Make a new API key for a service account; prints the key and the hash for the policy.
    Keygen,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cfg, _path) = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            // One line: TOML errors come with a multi-line snippet.
            let line = format!("{e:#}")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("airlock: {line}");
            return ExitCode::from(64);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match cfg.runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up { data_dir, policy } => {
                telemetry::init(&cfg.log);
                serve::up(cfg, admin::install_recorder()?, data_dir, policy).await
            }
            Command::Proxy => {
                telemetry::init(&cfg.log);
                serve::proxy(cfg, admin::install_recorder()?).await
            }
            Command::Approvals { command: None } => {
                telemetry::init(&cfg.log);
                serve::approvals(cfg, admin::install_recorder()?).await
            }
            Command::Approvals { command: Some(c) } => commands::approvals(&cfg, c).await,
            Command::Recorder => {
                telemetry::init(&cfg.log);
                serve::recorder(cfg, admin::install_recorder()?).await
            }
            Command::PolicyStore { command: Some(c) } => store_admin::run(&cfg, c).await,
            Command::PolicyStore { command: None } => {
                telemetry::init(&cfg.log);
                serve::policy_store(cfg, admin::install_recorder()?).await
            }
            Command::Policy { command } => commands::policy(&cfg, command).await,
            Command::Audit { command } => audit_cmd::audit(&cfg, command).await,
            Command::Keygen => commands::keygen(),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock: {e:#}");
            ExitCode::FAILURE
        }
    }
}
