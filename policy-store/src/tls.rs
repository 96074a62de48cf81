//! TLS for the store's gRPC. Every call carries a bearer token, so a store reached over a network
//! serves TLS (`tls_cert_file`, `tls_key_file`) and its clients verify it ([`ClientTls`]): raft
//! peers, proxies, the approval service and the CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tracing::warn;

use crate::error::{ClientError, StoreError};

/// How long a client's TLS handshake may take, and a server's with one client (a client that
/// stalls its handshake holds nothing past it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a client checks the store nodes it reaches at `https://` endpoints: against the CA of
/// `ca_file`, or without one against the system's trusted roots. `http://` endpoints are reached
/// without TLS (a warning when the host is not a loopback address: the token travels in clear).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    ca: Option<Certificate>,
}

impl ClientTls {
    /// Trust the CA certificates (PEM) in `path`; the system's roots when `None`.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, ClientError> {
        let Some(path) = ca_file else { return Ok(Self::default()) };
        let pem = read_pem(path).map_err(|problem| ClientError::Tls { path: path.to_path_buf(), problem })?;
        Ok(Self { ca: Some(Certificate::from_pem(pem)) })
    }

    /// An endpoint for `url` (`http://host:port` or `https://host:port`).
    pub(crate) fn endpoint(&self, url: &str, connect_timeout: Duration) -> Result<Endpoint, ClientError> {
        let invalid = |source| ClientError::InvalidEndpoint { endpoint: url.to_string(), source };
        let endpoint =
            Endpoint::from_shared(url.to_string()).map_err(invalid)?.connect_timeout(connect_timeout);
        match endpoint.uri().scheme_str() {
            Some("https") => {
                let config = match &self.ca {
                    Some(ca) => ClientTlsConfig::new().ca_certificate(ca.clone()),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                endpoint.tls_config(config.timeout(HANDSHAKE_TIMEOUT)).map_err(invalid)
            }
            Some("http") => {
                if !endpoint.uri().host().is_some_and(is_loopback) {
                    warn_plaintext(url);
                }
                Ok(endpoint)
            }
            _ => Err(ClientError::Scheme(url.to_string())),
        }
    }
}

/// Warn once per endpoint: followers reconnect often.
fn warn_plaintext(url: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !warned.iter().any(|u| u == url) {
        warned.push(url.to_string());
        warn!(
            endpoint = %url,
            "reaching the policy store without TLS: its bearer token crosses the network in clear; \
             serve the store with tls_cert_file/tls_key_file and use an https:// endpoint"
        );
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A PEM file with at least one item, or what is wrong with it.
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err("no PEM block in it".into());
    }
    Ok(pem)
}

/// A node's TLS settings (`[policy_store]`), checked.
pub(crate) struct NodeTls {
    /// What the server presents; `None`: the node serves without TLS.
    pub server: Option<ServerTlsConfig>,
    /// How the node reaches its peers.
    pub peers: Peers,
}

/// How a node reaches its peers: at `https://` with this when it serves TLS itself, else at
/// `http://`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Peers(Option<ClientTls>);

impl Peers {
    /// An endpoint for the peer at `addr` (`host:port`).
    pub(crate) fn endpoint(&self, addr: &str, connect_timeout: Duration) -> Result<Endpoint, ClientError> {
        match &self.0 {
            Some(tls) => tls.endpoint(&format!("https://{addr}"), connect_timeout),
            None => ClientTls::default().endpoint(&format!("http://{addr}"), connect_timeout),
        }
    }
}

impl NodeTls {
    pub(crate) fn new(
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        ca: Option<&PathBuf>,
    ) -> Result<Self, StoreError> {
        let read = |setting: &'static str, path: &PathBuf| {
            read_pem(path).map_err(|problem| StoreError::Tls { setting, path: path.clone(), problem })
        };
        match (cert, key) {
            (None, None) => {
                if let Some(ca) = ca {
                    return Err(StoreError::Tls {
                        setting: "tls_ca_file",
                        path: ca.clone(),
                        problem: "set without tls_cert_file and tls_key_file: nodes serve TLS only with both"
                            .into(),
                    });
                }
                Ok(Self { server: None, peers: Peers(None) })
            }
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read("tls_cert_file", cert)?, read("tls_key_file", key)?);
                let server = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
                let peers = ClientTls::new(ca.map(PathBuf::as_path)).map_err(|e| match e {
                    ClientError::Tls { path, problem } => {
                        StoreError::Tls { setting: "tls_ca_file", path, problem }
                    }
                    other => StoreError::Tls {
                        setting: "tls_ca_file",
                        path: PathBuf::new(),
                        problem: other.to_string(),
                    },
                })?;
                Ok(Self { server: Some(server), peers: Peers(Some(peers)) })
            }
            (Some(p), None) | (None, Some(p)) => Err(StoreError::Tls {
                setting: if cert.is_some() { "tls_key_file" } else { "tls_cert_file" },
                path: p.clone(),
                problem: "tls_cert_file and tls_key_file go together".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_apart() {
        for h in ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1", "store.internal", "[2001:db8::1]", "localhost.evil.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn an_endpoint_must_be_http_or_https() {
        let tls = ClientTls::default();
        assert!(matches!(tls.endpoint("ftp://127.0.0.1:1", HANDSHAKE_TIMEOUT), Err(ClientError::Scheme(_))));
        assert!(tls.endpoint("http://127.0.0.1:1", HANDSHAKE_TIMEOUT).is_ok());
        assert!(tls.endpoint("https://127.0.0.1:1", HANDSHAKE_TIMEOUT).is_ok());
    }

    #[test]
    fn node_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");
        let err = |r: Result<NodeTls, StoreError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(NodeTls::new(Some(&pem), None, None)).contains("go together"));
        assert!(err(NodeTls::new(None, None, Some(&pem))).contains("without tls_cert_file"));
        assert!(err(NodeTls::new(Some(&junk), Some(&pem), None)).contains("no PEM block"));
        assert!(err(NodeTls::new(Some(&pem), Some(&missing), None)).contains("tls_key_file"));
        let plain = NodeTls::new(None, None, None).unwrap();
        let url = |t: &NodeTls| {
            t.peers.endpoint("h:1", HANDSHAKE_TIMEOUT).unwrap().uri().scheme_str().map(String::from)
        };
        assert!(plain.server.is_none() && url(&plain).as_deref() == Some("http"));
        let tls = NodeTls::new(Some(&pem), Some(&pem), Some(&pem)).unwrap();
        assert!(tls.server.is_some() && url(&tls).as_deref() == Some("https"));
    }
}
