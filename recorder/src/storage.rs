//! Where recordings go: an S3-compatible bucket, a GCS bucket or an Azure container (each with an
//! optional key prefix), or a local directory, all behind `object_store`.
//!
//! Requests to a cloud store are retried by `object_store` at most [`StorageConfig::max_retries`]
//! times within [`StorageConfig::retry_timeout`]; beyond that the recorder's own loop retries
//! with backoff, forever, without acknowledging anything.

use std::sync::Arc;

use object_store::ObjectStore;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, RetryConfig};
use serde::Deserialize;

use crate::error::StorageError;

/// Object storage for recordings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where recordings go: `s3://BUCKET[/PREFIX]`, `gs://BUCKET[/PREFIX]` (credentials from
    /// `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS`), `az://CONTAINER[/PREFIX]`
    /// (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`), or `file:///ABS/DIR` (a relative
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
    /// Retries of one request inside `object_store` (cloud stores). Default 3.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Time budget of one request's retries inside `object_store`. Default 30s.
    #[serde(default = "default_retry_timeout", with = "humantime_serde")]
    pub retry_timeout: Duration,
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
            max_retries: default_max_retries(),
            retry_timeout: default_retry_timeout(),
        }
    }
}

fn default_max_retries() -> usize {
    3
}
fn default_retry_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_url() -> String {
    "file://./data/recordings".into()
}

/// Open the configured store.
pub fn open_store(cfg: &StorageConfig) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUrl { url: cfg.url.clone(), reason: reason.into() };
    let build_error = |source| StorageError::Build { url: cfg.url.clone(), source };
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: cfg.max_retries,
        retry_timeout: cfg.retry_timeout,
    };
    let with_prefix = |store: Arc<dyn ObjectStore>, prefix: &str| -> Arc<dyn ObjectStore> {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() { store } else { Arc::new(PrefixStore::new(store, prefix)) }
    };
    if let Some(rest) = cfg.url.strip_prefix("gs://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name"));
        }
        let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket).with_retry(retry);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.with_url(endpoint);
        }
        let gcs = builder.build().map_err(build_error)?;
        return Ok(with_prefix(Arc::new(gcs), prefix));
    }
    if let Some(rest) = cfg.url.strip_prefix("az://") {
        let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if container.is_empty() {
            return Err(invalid("no container name"));
        }
        let mut builder = MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .with_allow_http(cfg.allow_http)
            .with_retry(retry);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let azure = builder.build().map_err(build_error)?;
        return Ok(with_prefix(Arc::new(azure), prefix));
    }
    if let Some(rest) = cfg.url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name"));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_allow_http(cfg.allow_http)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry);
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
        let s3 = builder.build().map_err(build_error)?;
        Ok(with_prefix(Arc::new(s3), prefix))
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
        Err(invalid(
            "expected s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], az://CONTAINER[/PREFIX] or file://DIR",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_schemes_and_empty_buckets_are_clear_errors() {
        for url in ["http://x", "s3://", "s3:///prefix", "gs://", "az:///p", "file://", "recordings"] {
            let cfg = StorageConfig { url: url.into(), ..Default::default() };
            assert!(
                matches!(open_store(&cfg), Err(StorageError::InvalidUrl { .. })),
                "{url} should be rejected"
            );
        }
    }

    #[test]
    fn gcs_and_azure_urls_build_stores() {
        let gcs = StorageConfig { url: "gs://bucket/prefix".into(), ..Default::default() };
        assert!(open_store(&gcs).is_ok(), "gs:// builds without credentials until first use");
        let azure = StorageConfig {
            url: "az://container".into(),
            endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            allow_http: true,
            ..Default::default()
        };
        // Azure needs an account name; with none in the environment the error names the store.
        match open_store(&azure) {
            Ok(_) | Err(StorageError::Build { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
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
