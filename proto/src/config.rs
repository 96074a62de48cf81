//! The one config loader: a TOML file, then `AIRLOCK_*` environment overrides, then `validate()`.
//!
//! Overrides name a path with double underscores: `AIRLOCK_PROXY__LISTEN=0.0.0.0:15432` sets
//! `proxy.listen`. Values are read as TOML scalars when they parse as one (numbers, booleans),
//! otherwise as strings. The environment is passed in, so tests never touch real variables.

use serde::de::DeserializeOwned;

/// A config that can check itself after loading.
pub trait Validate {
    /// Return a message naming the bad field, if any.
    fn validate(&self) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not a `#[source]`: the message already holds it, and error chains would print it twice.
    #[error("config: {0}")]
    Toml(toml::de::Error),
    #[error("config: environment override {name}: {message}")]
    Env { name: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl From<toml::de::Error> for ConfigError {
    fn from(e: toml::de::Error) -> Self {
        Self::Toml(e)
    }
}

/// Load a config from optional TOML text and environment pairs.
pub fn load<T: DeserializeOwned + Validate>(
    toml_text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
) -> Result<T, ConfigError> {
    let mut root: toml::Table = match toml_text {
        Some(t) => toml::from_str(t)?,
        None => toml::Table::new(),
    };
    let mut overrides: Vec<(String, String)> =
        env.into_iter().filter(|(k, _)| k.starts_with(prefix) && k.len() > prefix.len()).collect();
    overrides.sort();
    for (name, value) in overrides {
        let path: Vec<String> = name[prefix.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env { name, message: "empty path segment".into() });
        }
        set(&mut root, &path, scalar(&value)).map_err(|message| ConfigError::Env { name, message })?;
    }
    let cfg: T = toml::Value::Table(root).try_into()?;
    cfg.validate().map_err(ConfigError::Invalid)?;
    Ok(cfg)
}

fn scalar(v: &str) -> toml::Value {
    if let Ok(b) = v.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    toml::Value::String(v.to_string())
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        proxy: Proxy,
    }
    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Proxy {
        #[serde(default)]
        listen: String,
        #[serde(default)]
        max: u32,
    }
    impl Validate for Cfg {
        fn validate(&self) -> Result<(), String> {
            if self.proxy.max > 100 { Err("proxy.max must be at most 100".into()) } else { Ok(()) }
        }
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![("AIRLOCK_PROXY__LISTEN".to_string(), "0.0.0.0:1".to_string())];
        let c: Cfg = load(Some("[proxy]\nlisten = \"a\"\nmax = 3\n"), env, "AIRLOCK_").expect("load");
        assert_eq!(c.proxy.listen, "0.0.0.0:1");
        assert_eq!(c.proxy.max, 3);
    }

    #[test]
    fn errors_are_clear() {
        let e = load::<Cfg>(Some("[proxy]\nlisten = 5\n"), vec![], "AIRLOCK_").expect_err("type error");
        assert!(e.to_string().contains("listen"), "{e}");
        // Said once: the message is not repeated as its own cause.
        assert!(std::error::Error::source(&e).is_none(), "{e}");
        let e = load::<Cfg>(Some("[proxy]\nmax = 500\n"), vec![], "AIRLOCK_").expect_err("invalid");
        assert!(e.to_string().contains("proxy.max"), "{e}");
        let e = load::<Cfg>(None, vec![("AIRLOCK_PROXY__LISTEN__X".into(), "1".into())], "AIRLOCK_");
        assert!(e.is_err());
        let e = load::<Cfg>(Some("[[["), vec![], "AIRLOCK_");
        assert!(e.is_err());
    }
}
