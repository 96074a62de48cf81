//! `airlock.toml`: one file with a section per component, overridable by `AIRLOCK_*` variables
//! (`AIRLOCK_PROXY__LISTEN=0.0.0.0:15432` sets `proxy.listen`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration. Every section is optional and every field has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AirlockConfig {
    #[serde(default)]
    pub(crate) nats: eventbus::NatsConfig,
    #[serde(default)]
    pub(crate) storage: Option<recorder::StorageConfig>,
    #[serde(default)]
    pub(crate) proxy: proxy_node::ProxyConfig,
    #[serde(default)]
    pub(crate) approvals: Option<approval_service::ApprovalsConfig>,
    #[serde(default)]
    pub(crate) recorder: Option<recorder::RecorderConfig>,
    #[serde(default)]
    pub(crate) policy_store: policy_store::PolicyStoreConfig,
    #[serde(default)]
    pub(crate) admin: crate::admin::AdminConfig,
    #[serde(default)]
    pub(crate) log: LogConfig,
    #[serde(default)]
    pub(crate) runtime: RuntimeConfig,
}

/// The process's async runtime (`[runtime]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuntimeConfig {
    /// Threads that run sessions and services. Default: one per CPU core. A proxy that shares
    /// a small machine with its target or clients spends less CPU per statement with fewer
    /// (each thread handing work to another costs a wakeup). With one, everything runs on the
    /// main thread (tokio's current-thread scheduler, without a work-stealing worker).
    #[serde(default)]
    pub(crate) worker_threads: Option<usize>,
}

impl RuntimeConfig {
    /// Most worker threads accepted.
    const MAX_WORKERS: usize = 1024;

    /// Build the runtime this section describes.
    pub(crate) fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = match self.worker_threads {
            Some(1) => tokio::runtime::Builder::new_current_thread(),
            Some(n) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            }
            None => tokio::runtime::Builder::new_multi_thread(),
        };
        b.enable_all();
        b.build()
    }
}

/// Logging (`[log]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `pretty` or `json`. Default pretty.
    #[serde(default)]
    pub(crate) format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Pretty,
    Json,
}

impl proto::config::Validate for AirlockConfig {
    fn validate(&self) -> Result<(), String> {
        self.proxy.validate()?;
        proto::config::Validate::validate(&self.policy_store)?;
        // The rest of `[approvals]` is checked once it is complete (it inherits from `[proxy]`,
        // and `airlock up` adds an admin token); its own OIDC issuer can be checked now.
        if let Some(o) = self.approvals.as_ref().and_then(|a| a.oidc.as_ref()) {
            o.validate().map_err(|e| format!("approvals.{e}"))?;
        }
        if let Some(n) = self.runtime.worker_threads
            && !(1..=RuntimeConfig::MAX_WORKERS).contains(&n)
        {
            return Err(format!(
                "runtime.worker_threads must be between 1 and {}",
                RuntimeConfig::MAX_WORKERS
            ));
        }
        if self.nats.ack_timeout.is_zero() {
            return Err("nats.ack_timeout must be positive".into());
        }
        Ok(())
    }
}

impl AirlockConfig {
    /// The `[approvals]` section, or its defaults; approvers' OIDC, the policy stores to follow
    /// and the token to follow them with default to the proxy's.
    pub(crate) fn approvals(&self) -> approval_service::ApprovalsConfig {
        let mut a: approval_service::ApprovalsConfig = self.approvals.clone().unwrap_or_else(|| {
            toml::Value::Table(toml::Table::new()).try_into().expect("every approvals field has a default")
        });
        // The proxy's issuer, but an audience of its own: a token minted for the data path (one a
        // person hands their agent) must not also decide holds.
        if a.oidc.is_none() {
            a.oidc = self.proxy.oidc.clone().map(|mut o| {
                o.audience = format!("{}-approvals", o.audience);
                o
            });
        }
        if a.policy_store.is_empty() {
            a.policy_store.clone_from(&self.proxy.policy_store);
        }
        if a.policy_store_token.is_none() && a.policy_store_token_file.is_none() {
            a.policy_store_token.clone_from(&self.proxy.policy_store_token);
            a.policy_store_token_file = self.proxy.policy_store_token_file.as_ref().map(PathBuf::from);
        }
        if a.policy_store_ca_file.is_none() {
            a.policy_store_ca_file.clone_from(&self.proxy.policy_store_ca_file);
        }
        a
    }

    /// The `[recorder]` section, or its defaults.
    pub(crate) fn recorder(&self) -> recorder::RecorderConfig {
        self.recorder.clone().unwrap_or_else(|| {
            toml::Value::Table(toml::Table::new()).try_into().expect("every recorder field has a default")
        })
    }

    /// The `[storage]` section, or its defaults (local disk).
    pub(crate) fn storage(&self) -> recorder::StorageConfig {
        self.storage.clone().unwrap_or_else(|| {
            toml::Value::Table(toml::Table::new()).try_into().expect("every storage field has a default")
        })
    }
}

/// Find and load the configuration: `--config`, else `$AIRLOCK_CONFIG`, else `./airlock.toml`
/// if it exists, else the defaults.
pub(crate) fn load(explicit: Option<&Path>) -> anyhow::Result<(AirlockConfig, Option<PathBuf>)> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| env.iter().find(|(k, _)| k == "AIRLOCK_CONFIG").map(|(_, v)| PathBuf::from(v)))
        .or_else(|| Some(PathBuf::from("airlock.toml")).filter(|p| p.exists()));
    let text = match &path {
        Some(p) => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?)
        }
        None => None,
    };
    let env = env.into_iter().filter(|(k, _)| k != "AIRLOCK_CONFIG" && k != "AIRLOCK_ADMIN_TOKEN");
    let cfg = proto::config::load::<AirlockConfig>(text.as_deref(), env, "AIRLOCK_")?;
    Ok((cfg, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_working_defaults() {
        let cfg: AirlockConfig = proto::config::load(None, vec![], "AIRLOCK_").expect("defaults");
        assert_eq!(cfg.proxy.listen.port(), 15432);
        assert_eq!(cfg.policy_store.listen.port(), 17070);
        assert_eq!(cfg.approvals().listen.port(), 17080);
        assert!(cfg.storage().url.starts_with("file://"));
    }

    #[test]
    fn sections_and_env_overrides_apply() {
        let toml = "[proxy]\nlisten = \"127.0.0.1:1\"\n[proxy.oidc]\nissuer = \"http://127.0.0.1:9\"\n";
        let env = vec![("AIRLOCK_NATS__URL".to_string(), "nats://127.0.0.1:5".to_string())];
        let cfg: AirlockConfig = proto::config::load(Some(toml), env, "AIRLOCK_").expect("load");
        assert_eq!(cfg.proxy.listen.port(), 1);
        assert_eq!(cfg.nats.url, "nats://127.0.0.1:5");
        assert_eq!(cfg.proxy.oidc.expect("oidc").audience, "airlock");
    }

    #[test]
    fn approvals_follow_the_proxy_oidc_and_policy_store_unless_set() {
        let toml = "[proxy]\npolicy_store = [\"http://127.0.0.1:7\"]\n[proxy.oidc]\nissuer = \"http://127.0.0.1:9\"\n\
                    [approvals]\nadmin_token = \"t\"\n";
        let cfg: AirlockConfig = proto::config::load(Some(toml), vec![], "AIRLOCK_").expect("load");
        let a = cfg.approvals();
        let oidc = a.oidc.expect("from the proxy");
        assert_eq!(oidc.issuer, "http://127.0.0.1:9");
        // Agents' tokens (audience `airlock`) are not approvers' tokens.
        assert_eq!(oidc.audience, "airlock-approvals");
        assert_eq!(a.policy_store, vec!["http://127.0.0.1:7".to_string()]);
        let toml = format!("{toml}policy_store = [\"http://127.0.0.1:8\"]\n");
        let cfg: AirlockConfig = proto::config::load(Some(&toml), vec![], "AIRLOCK_").expect("load");
        assert_eq!(cfg.approvals().policy_store, vec!["http://127.0.0.1:8".to_string()]);
    }

    #[test]
    fn approvals_follow_the_store_with_the_proxys_token_and_ca_unless_set() {
        let toml = "[proxy]\npolicy_store_token_file = \"/run/read-token\"\npolicy_store_ca_file = \"/run/ca.pem\"\n\
                    [approvals]\nadmin_token = \"t\"\n";
        let cfg: AirlockConfig = proto::config::load(Some(toml), vec![], "AIRLOCK_").expect("load");
        let a = cfg.approvals();
        assert_eq!(a.policy_store_token_file, Some(PathBuf::from("/run/read-token")));
        assert_eq!(a.policy_store_token, None);
        assert_eq!(a.policy_store_ca_file, Some(PathBuf::from("/run/ca.pem")));
        let toml =
            format!("{toml}policy_store_token = \"own\"\npolicy_store_ca_file = \"/run/own-ca.pem\"\n");
        let cfg: AirlockConfig = proto::config::load(Some(&toml), vec![], "AIRLOCK_").expect("load");
        let a = cfg.approvals();
        assert_eq!((a.policy_store_token.as_deref(), a.policy_store_token_file), (Some("own"), None));
        assert_eq!(a.policy_store_ca_file, Some(PathBuf::from("/run/own-ca.pem")));
    }

    #[test]
    fn approvals_oidc_with_a_shared_secret_algorithm_is_refused() {
        let toml = "[approvals.oidc]\nissuer = \"http://127.0.0.1:9\"\nalgorithms = [\"HS256\"]\n";
        let e = proto::config::load::<AirlockConfig>(Some(toml), vec![], "AIRLOCK_").expect_err("HS256");
        assert!(e.to_string().contains("approvals.oidc.algorithms"), "{e}");
    }

    #[test]
    fn worker_threads_are_checked_and_used() {
        let e =
            proto::config::load::<AirlockConfig>(Some("[runtime]\nworker_threads = 0\n"), vec![], "AIRLOCK_")
                .expect_err("zero threads");
        assert!(e.to_string().contains("runtime.worker_threads"), "{e}");
        let env = vec![("AIRLOCK_RUNTIME__WORKER_THREADS".to_string(), "3".to_string())];
        let cfg: AirlockConfig = proto::config::load(None, env, "AIRLOCK_").expect("load");
        let rt = cfg.runtime.build().expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 3);
        // One thread: the current-thread scheduler, which still runs spawned tasks and timers.
        let env = vec![("AIRLOCK_RUNTIME__WORKER_THREADS".to_string(), "1".to_string())];
        let cfg: AirlockConfig = proto::config::load(None, env, "AIRLOCK_").expect("load");
        let rt = cfg.runtime.build().expect("runtime");
        assert_eq!(rt.handle().runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread);
        let spawned = rt.block_on(async {
            tokio::spawn(async {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                7
            })
            .await
        });
        assert_eq!(spawned.expect("joined"), 7);
    }

    #[test]
    fn typos_are_rejected_by_name() {
        let e =
            proto::config::load::<AirlockConfig>(Some("[proxy]\nlisten_addr = \"x\"\n"), vec![], "AIRLOCK_")
                .expect_err("unknown field");
        assert!(e.to_string().contains("listen_addr"), "{e}");
    }
}
