//! Where recordings go: an S3-compatible bucket (with an optional key prefix) or a local
//! directory, both behind `object_store`.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use serde::Deserialize;

use crate::error::StorageError;

/// Object storage for recordings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where recordings go: `s3://BUCKET[/PREFIX]` or `file:///ABS/DIR` (a relative
    /// `file://DIR` is resolved against the working directory; the directory is created).
    /// Default `file://./data/recordings`.
    #[serde(default = "default_url")]
    pub url: String,
    /// S3 endpoint, for S3-compatible servers (MinIO, moto, ...). Default: AWS (or `AWS_ENDPOINT`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3 region. Default `us-east-1` (or `AWS_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// S3 access key id. Default: `AWS_ACCESS_KEY_ID` from the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// S3 secret access key. Default: `AWS_SECRET_ACCESS_KEY` from the environment.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP S3 endpoints. Default false.
    #[serde(default)]
    pub allow_http: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
        }
    }
}

fn default_url() -> String {
    "file://./data/recordings".into()
}

/// Open the configured store.
pub fn open_store(cfg: &StorageConfig) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUrl { url: cfg.url.clone(), reason: reason.into() };
    if let Some(rest) = cfg.url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name"));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_allow_http(cfg.allow_http)
            .with_virtual_hosted_style_request(false);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &cfg.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &cfg.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &cfg.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let s3 = builder.build().map_err(|source| StorageError::Build { url: cfg.url.clone(), source })?;
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() { Ok(Arc::new(s3)) } else { Ok(Arc::new(PrefixStore::new(s3, prefix))) }
    } else if let Some(dir) = cfg.url.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(invalid("no directory"));
        }
        std::fs::create_dir_all(dir)
            .map_err(|source| StorageError::CreateDir { path: dir.to_string(), source })?;
        let local = LocalFileSystem::new_with_prefix(dir)
            .map_err(|source| StorageError::Build { url: cfg.url.clone(), source })?;
        Ok(Arc::new(local))
    } else {
        Err(invalid("expected s3://BUCKET[/PREFIX] or file://DIR"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_schemes_and_empty_buckets_are_clear_errors() {
        for url in ["http://x", "s3://", "s3:///prefix", "file://", "recordings"] {
            let cfg = StorageConfig { url: url.into(), ..Default::default() };
            assert!(
                matches!(open_store(&cfg), Err(StorageError::InvalidUrl { .. })),
                "{url} should be rejected"
            );
        }
    }

    #[test]
    fn local_directory_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("a/b");
        let cfg = StorageConfig { url: format!("file://{}", target.display()), ..Default::default() };
        open_store(&cfg).expect("open local store");
        assert!(target.is_dir());
    }

    #[test]
    fn config_defaults_to_local_recordings() {
        let cfg: StorageConfig = toml::from_str("").expect("empty config deserializes");
        assert_eq!(cfg.url, "file://./data/recordings");
        assert!(!cfg.allow_http);
        assert!(toml::from_str::<StorageConfig>("bucket = 'x'").is_err(), "unknown fields are rejected");
    }
}
