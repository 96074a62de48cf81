//! Connecting to the target as the gateway's own user: TLS as `upstream.tls` says, startup,
//! then SCRAM-SHA-256, md5 or cleartext authentication with the credentials the gateway holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::frontend;
use proto::policy::{Connection, TlsMode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::scram::Scram;
use crate::tls::{self, Stream};
use crate::wire::postgres::frame::SSL_REQUEST;
use crate::wire::postgres::messages::read_error_fields;
use crate::wire::postgres::{Frame, decode_frame};

/// Client startup parameters passed on to the target. Anything else (notably `options`, which
/// can set any server setting) is dropped.
const PASSED_PARAMS: &[&str] =
    &["application_name", "client_encoding", "datestyle", "timezone", "extra_float_digits", "intervalstyle"];

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("reading the password: {0}")]
    Password(String),
    #[error("TLS to {addr}: {message}")]
    Tls { addr: String, message: String },
    #[error("target rejected the gateway: {code} {message}")]
    Rejected { code: String, message: String },
    #[error("target asked for an unsupported authentication method ({0})")]
    Method(String),
    #[error("protocol error from target: {0}")]
    Protocol(String),
    #[error("i/o with target: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a target listens: `host:port` over TCP, or the socket file `host/.s.PGSQL.port` when
/// `host` is a directory (an absolute path), as libpq reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host:port`; for an open session, the address it connected to (after name resolution).
    Tcp(String),
    /// A Unix-domain socket on the gateway's host.
    Unix(PathBuf),
}

impl Address {
    fn of(c: &Connection) -> Self {
        match c.upstream.unix_socket() {
            Some(path) => Address::Unix(PathBuf::from(path)),
            None => Address::Tcp(format!("{}:{}", c.upstream.host, c.upstream.port)),
        }
    }

    fn name(&self) -> String {
        match self {
            Address::Tcp(a) => a.clone(),
            Address::Unix(p) => p.display().to_string(),
        }
    }
}

/// Where a target is and how to reach it: what a session's CancelRequests need.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The target's address.
    pub addr: Address,
    tls: Option<TargetTls>,
}

/// TLS to a target: the mode, the rustls settings and the name its certificate must carry.
#[derive(Debug, Clone)]
struct TargetTls {
    mode: TlsMode,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TargetTls {
    /// The settings of a connection's `upstream`; `None` for `tls: disable` and for a Unix
    /// socket with `tls: prefer` (the socket never leaves the host, and PostgreSQL offers no TLS
    /// on it). Policy validation refuses a Unix socket with `require` or `verify-full`; should
    /// one get here all the same, it is refused rather than served in plain text.
    fn of(c: &Connection) -> Result<Option<Self>, UpstreamError> {
        let u = &c.upstream;
        if let Some(path) = u.unix_socket() {
            return match u.tls {
                TlsMode::Disable | TlsMode::Prefer => Ok(None),
                mode => Err(UpstreamError::Tls {
                    addr: path,
                    message: format!("tls: {} cannot be had over a Unix-domain socket", mode.as_str()),
                }),
            };
        }
        let config = match (u.tls, &u.ca_file) {
            (TlsMode::Disable, _) => return Ok(None),
            (TlsMode::VerifyFull, Some(ca)) => tls::verifying_config(ca),
            (TlsMode::VerifyFull, None) => Err("tls: verify-full needs upstream.ca_file".to_string()),
            (TlsMode::Prefer | TlsMode::Require, _) => tls::unverified_config(),
        };
        let tls_err = |message| UpstreamError::Tls { addr: format!("{}:{}", u.host, u.port), message };
        let config = config.map_err(tls_err)?;
        let name = tls::server_name(&u.host).map_err(tls_err)?;
        Ok(Some(TargetTls { mode: u.tls, config, name }))
    }
}

/// Open a connection and, over TCP, negotiate TLS: SSLRequest, then the handshake if the target
/// says "S"; "N" is plain text for `prefer` and an error for the other modes. A Unix socket is
/// never encrypted (`TargetTls::of` gives no settings for one).
async fn open(target: &Address, tls: Option<&TargetTls>) -> Result<(Stream, Address), UpstreamError> {
    let addr = match target {
        Address::Tcp(addr) => addr.as_str(),
        Address::Unix(path) => {
            let unix = UnixStream::connect(path)
                .await
                .map_err(|source| UpstreamError::Connect { addr: target.name(), source })?;
            return Ok((Stream::Unix(unix), Address::Unix(path.clone())));
        }
    };
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| UpstreamError::Connect { addr: addr.to_string(), source })?;
    tcp.set_nodelay(true)?;
    let peer = Address::Tcp(tcp.peer_addr()?.to_string());
    let Some(tls) = tls else {
        return Ok((Stream::Plain(tcp), peer));
    };
    let tls_err = |message: String| UpstreamError::Tls { addr: addr.to_string(), message };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8i32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await?;
    // One byte only: anything the target sent after it must come through TLS.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == TlsMode::Prefer => return Ok((Stream::Plain(tcp), peer)),
        b'N' => {
            return Err(tls_err(format!(
                "the target does not accept TLS connections (tls: {})",
                tls.mode.as_str()
            )));
        }
        other => {
            return Err(UpstreamError::Protocol(format!("unexpected answer {other:#04x} to SSLRequest")));
        }
    }
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match connector.connect(tls.name.clone(), tcp).await {
        Ok(s) => Ok((Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s))), peer)),
        Err(e) => {
            let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
            Err(tls_err(match rustls_err {
                Some(rustls::Error::InvalidCertificate(why)) => {
                    format!("certificate verification failed (tls: {}): {why:?}", tls.mode.as_str())
                }
                _ => format!("handshake failed: {e}"),
            }))
        }
    }
}

/// An authenticated connection to the target.
pub struct Upstream {
    /// The connection, plain or TLS.
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub buf: BytesMut,
    /// ParameterStatus frames to pass to the client.
    pub parameters: Vec<Frame>,
    /// The target backend's (pid, secret), for cancel requests.
    pub backend_key: Option<(i32, i32)>,
    /// Where the target is, for cancel requests.
    pub addr: Endpoint,
}

impl Upstream {
    /// Read one frame from the target.
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, UpstreamError> {
        loop {
            match decode_frame(&mut self.buf, max) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(UpstreamError::Protocol("target closed the connection".into()));
            }
        }
    }
}

/// Where the proxy may read a target's password, whatever a policy names
/// (`proxy.target_password_env`, `proxy.target_password_dir`,
/// `proxy.target_cleartext_password`). A policy names a connection's host and where its password
/// is; without these bounds, whoever may write policy could have the gateway send any variable
/// of its environment or any file it can read (its TLS key, the masking key, a token) to a host
/// of their choosing.
#[derive(Debug, Clone, Default)]
pub struct PasswordSources {
    /// Variables `password_env` may name: exact names, or patterns with one `*` (`*_DB_PASSWORD`).
    pub env: Vec<String>,
    /// The folder `password_file` must be in (after symbolic links are followed).
    pub dir: Option<PathBuf>,
    /// Send the password in the clear to a target that asks for it over a connection that is
    /// not `tls: verify-full` (where anyone between the gateway and the target reads it).
    pub cleartext: bool,
}

impl PasswordSources {
    /// `name` is a variable `password_env` may name.
    pub fn allows_env(&self, name: &str) -> bool {
        self.env.iter().any(|p| match p.split_once('*') {
            None => p == name,
            Some((head, tail)) => {
                name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
            }
        })
    }

    /// The password of `c`, from a source these bounds allow.
    pub fn password(&self, c: &Connection) -> Result<String, UpstreamError> {
        let refused = |what: String, setting: &str| {
            UpstreamError::Password(format!(
                "{what} is not a source the gateway reads target passwords from (see proxy.{setting})"
            ))
        };
        if let Some(var) = &c.credentials.password_env {
            if !self.allows_env(var) {
                return Err(refused(format!("environment variable {var}"), "target_password_env"));
            }
            return std::env::var(var)
                .map_err(|_| UpstreamError::Password(format!("environment variable {var} is not set")));
        }
        if let Some(path) = &c.credentials.password_file {
            let Some(dir) = &self.dir else {
                return Err(refused(format!("file {path}"), "target_password_dir"));
            };
            let inside = std::fs::canonicalize(dir)
                .ok()
                .zip(std::fs::canonicalize(path).ok())
                .is_some_and(|(dir, file)| file != dir && file.starts_with(&dir));
            if !inside {
                return Err(refused(format!("file {path}"), "target_password_dir"));
            }
            let s =
                std::fs::read_to_string(path).map_err(|e| UpstreamError::Password(format!("{path}: {e}")))?;
            return Ok(s.trim_end_matches(['\r', '\n']).to_string());
        }
        Err(UpstreamError::Password("no password source configured".into()))
    }
}

/// Open and authenticate a session on the target.
pub async fn connect(
    c: &Connection,
    client_params: &[(String, String)],
    timeout: Duration,
    max_message: usize,
    read_only: bool,
    sources: &PasswordSources,
) -> Result<Upstream, UpstreamError> {
    let target = Address::of(c);
    let addr = target.name();
    let tls = TargetTls::of(c)?;
    let pw = sources.password(c)?;
    let cleartext = sources.cleartext || c.upstream.tls == TlsMode::VerifyFull;
    let (stream, peer) = tokio::time::timeout(timeout, open(&target, tls.as_ref()))
        .await
        .map_err(|_| UpstreamError::Timeout(addr.clone()))??;
    let mut up = Upstream {
        stream,
        buf: BytesMut::with_capacity(8192),
        parameters: vec![],
        backend_key: None,
        addr: Endpoint { addr: peer, tls },
    };
    tokio::time::timeout(
        timeout,
        handshake(&mut up, c, &pw, cleartext, client_params, max_message, read_only),
    )
    .await
    .map_err(|_| UpstreamError::Timeout(addr))??;
    Ok(up)
}

async fn send(up: &mut Upstream, buf: &mut BytesMut) -> Result<(), UpstreamError> {
    up.stream.write_all(buf).await?;
    up.stream.flush().await?;
    buf.clear();
    Ok(())
}

fn io_err(e: std::io::Error) -> UpstreamError {
    UpstreamError::Protocol(e.to_string())
}

/// Where the authentication exchange with the target is.
enum Auth {
    /// Nothing asked yet.
    Start,
    /// A password (cleartext or md5) was sent.
    Password,
    /// SCRAM started: the server's first message is due.
    Scram(Scram),
    /// The client's proof was sent: the server's is due.
    ScramProved(Scram),
    /// The server proved it knows the password.
    ScramDone,
    /// The target said the client is in.
    Ok,
}

async fn handshake(
    up: &mut Upstream,
    c: &Connection,
    pw: &str,
    cleartext: bool,
    client_params: &[(String, String)],
    max: usize,
    read_only: bool,
) -> Result<(), UpstreamError> {
    let database = c.upstream.database.clone().unwrap_or_else(|| c.name.clone());
    let mut params: Vec<(&str, &str)> =
        vec![("user", c.credentials.user.as_str()), ("database", database.as_str())];
    for (k, v) in client_params {
        if PASSED_PARAMS.contains(&k.to_ascii_lowercase().as_str()) {
            params.push((k.as_str(), v.as_str()));
        }
    }
    if read_only {
        // Defence in depth: the target itself refuses writes the gateway might miss.
        params.push(("options", "-c default_transaction_read_only=on"));
    }
    let mut out = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut out).map_err(io_err)?;
    send(up, &mut out).await?;
    // Once SCRAM has started, the target must finish it, proving it knows the password, before
    // it may say the client is in: one that asks for the password in the clear (or md5)
    // instead, or says "ok" without its proof, is refused (someone between the gateway and the
    // target would otherwise get the password, or pose as the target).
    let mut auth = Auth::Start;
    loop {
        let f = up.read_frame(max).await?;
        match f.tag {
            b'R' => {
                let code = f.body.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                let rest = &f.body[4.min(f.body.len())..];
                auth = match (code, std::mem::replace(&mut auth, Auth::Start)) {
                    (Some(0), Auth::Start | Auth::Password | Auth::ScramDone) => Auth::Ok,
                    (Some(0), Auth::Scram(_) | Auth::ScramProved(_)) => {
                        return Err(UpstreamError::Protocol(
                            "the target ended SCRAM without proving it knows the password".into(),
                        ));
                    }
                    (Some(3), Auth::Start) if !cleartext => {
                        return Err(UpstreamError::Method(
                            "the password in the clear, over a connection that is not tls: verify-full \
                             (set proxy.target_cleartext_password to allow it)"
                                .into(),
                        ));
                    }
                    (Some(3), Auth::Start) => {
                        frontend::password_message(pw.as_bytes(), &mut out).map_err(io_err)?;
                        send(up, &mut out).await?;
                        Auth::Password
                    }
                    (Some(5), Auth::Start) => {
                        let salt: [u8; 4] = rest
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| UpstreamError::Protocol("short md5 salt".into()))?;
                        let hash = md5_hash(c.credentials.user.as_bytes(), pw.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut out).map_err(io_err)?;
                        send(up, &mut out).await?;
                        Auth::Password
                    }
                    (Some(10), Auth::Start) => {
                        let offers_scram = rest.split(|b| *b == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(UpstreamError::Method("SASL without SCRAM-SHA-256".into()));
                        }
                        let s = Scram::new(pw.as_bytes());
                        frontend::sasl_initial_response(SCRAM_SHA_256, &s.client_first(), &mut out)
                            .map_err(io_err)?;
                        send(up, &mut out).await?;
                        Auth::Scram(s)
                    }
                    (Some(11), Auth::Scram(mut s)) => {
                        let message = s
                            .client_final(rest)
                            .await
                            .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(&message, &mut out).map_err(io_err)?;
                        send(up, &mut out).await?;
                        Auth::ScramProved(s)
                    }
                    (Some(12), Auth::ScramProved(s)) => {
                        s.verify_final(rest)
                            .map_err(|e| UpstreamError::Protocol(format!("SCRAM server proof: {e}")))?;
                        Auth::ScramDone
                    }
                    (Some(other @ (0 | 3 | 5 | 10 | 11 | 12)), _) => {
                        return Err(UpstreamError::Protocol(format!(
                            "authentication request {other} out of turn"
                        )));
                    }
                    (Some(other), _) => {
                        return Err(UpstreamError::Method(format!("authentication request {other}")));
                    }
                    (None, _) => return Err(UpstreamError::Protocol("short authentication message".into())),
                };
            }
            b'E' => {
                let (code, message) = read_error_fields(&f.body);
                return Err(UpstreamError::Rejected { code, message });
            }
            b'S' => up.parameters.push(f),
            b'K' => {
                if f.body.len() >= 8 {
                    let pid = i32::from_be_bytes([f.body[0], f.body[1], f.body[2], f.body[3]]);
                    let key = i32::from_be_bytes([f.body[4], f.body[5], f.body[6], f.body[7]]);
                    up.backend_key = Some((pid, key));
                }
            }
            b'Z' if matches!(auth, Auth::Ok) => return Ok(()),
            b'Z' => {
                return Err(UpstreamError::Protocol(
                    "the target was ready before authentication ended".into(),
                ));
            }
            b'N' => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during startup",
                    other as char
                )));
            }
        }
    }
}

/// Send a CancelRequest for a target backend, with the TLS settings of its session.
pub async fn cancel(target: Endpoint, pid: i32, key: i32) -> Result<(), UpstreamError> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), open(&target.addr, target.tls.as_ref()))
        .await
        .map_err(|_| UpstreamError::Timeout(target.addr.name()))??
        .0;
    let mut buf = BytesMut::new();
    frontend::cancel_request(pid, key, &mut buf);
    s.write_all(&buf).await?;
    s.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const PASSWORD: &str = "the target's password";

    fn auth(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut f = vec![b'R'];
        f.extend_from_slice(&(8 + rest.len() as i32).to_be_bytes());
        f.extend_from_slice(&code.to_be_bytes());
        f.extend_from_slice(rest);
        f
    }

    /// A "target" that sends `first` after the startup message and, if `then` is given, reads
    /// the client's next message and sends `then`; returns what the gateway's connect (with
    /// `sources`, its password in a file `pw` of `dir`) said and every byte it sent after the
    /// startup message (after its first answer when `then` is given).
    async fn fake_target(
        first: Vec<u8>,
        then: Option<Vec<u8>>,
        sources: PasswordSources,
        dir: &std::path::Path,
    ) -> (Result<Upstream, UpstreamError>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut startup = vec![0u8; i32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut startup).await.unwrap();
            s.write_all(&first).await.unwrap();
            if let Some(then) = then {
                let mut head = [0u8; 5];
                s.read_exact(&mut head).await.unwrap();
                let mut answer =
                    vec![0u8; i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4];
                s.read_exact(&mut answer).await.unwrap();
                s.write_all(&then).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
            rest
        });
        let pw = dir.join("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        let got = connect(
            &target(port, &format!("password_file: {}", pw.display())),
            &[],
            Duration::from_secs(5),
            1 << 20,
            false,
            &sources,
        )
        .await;
        (got, server.await.unwrap())
    }

    /// A plain-text connection `t` to 127.0.0.1:`port` with credentials `{ user: u, CREDS }`.
    fn target(port: u16, creds: &str) -> Connection {
        let doc = proto::policy::parse(&format!(
            "connections:\n  - name: t\n    kind: postgres\n    upstream: {{ host: 127.0.0.1, port: {port}, tls: disable }}\n    credentials: {{ user: u, {creds} }}\n"
        ))
        .unwrap();
        doc.connections[0].clone()
    }

    fn sources_in(dir: &std::path::Path) -> PasswordSources {
        PasswordSources { env: vec!["*_DB_PASSWORD".into()], dir: Some(dir.to_path_buf()), cleartext: false }
    }

    /// A "target" that starts SCRAM, then, after the client's first message, answers `then`.
    async fn scram_then(then: Vec<u8>) -> (Result<Upstream, UpstreamError>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        fake_target(auth(10, b"SCRAM-SHA-256\0\0"), Some(then), sources_in(dir.path()), dir.path()).await
    }

    /// Whoever writes policy names where a target's password is: only the variables and the
    /// folder the proxy's own configuration allows are read, so a policy cannot have the
    /// gateway send its storage key, TLS key or any other file or variable to a host it names.
    #[test]
    fn a_policy_cannot_point_the_gateway_at_its_own_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let secret = elsewhere.path().join("tls.key");
        std::fs::write(&secret, "not for targets").unwrap();
        std::fs::write(dir.path().join("shop"), "shop-pw\n").unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("link")).unwrap();
        let sources = sources_in(dir.path());
        let d = dir.path().display();
        let refused = [
            ("password_env: AIRLOCK_STORAGE__SECRET_ACCESS_KEY".to_string(), "proxy.target_password_env"),
            ("password_env: PGPASSWORD".to_string(), "proxy.target_password_env"),
            ("password_env: SHOP_DB_PASSWORD_OLD".to_string(), "proxy.target_password_env"),
            (format!("password_file: {}", secret.display()), "proxy.target_password_dir"),
            (
                format!(
                    "password_file: {d}/../{}/tls.key",
                    elsewhere.path().file_name().unwrap().to_str().unwrap()
                ),
                "proxy.target_password_dir",
            ),
            (format!("password_file: {d}/link"), "proxy.target_password_dir"),
            (format!("password_file: {d}"), "proxy.target_password_dir"),
        ];
        for (creds, setting) in refused {
            let e = sources.password(&target(1, &creds)).expect_err(&creds).to_string();
            assert!(e.contains("is not a source") && e.contains(setting), "{creds}: {e}");
        }
        assert_eq!(sources.password(&target(1, &format!("password_file: {d}/shop"))).unwrap(), "shop-pw");
        // Without a folder configured, no file is read.
        let e = PasswordSources { dir: None, ..sources.clone() }
            .password(&target(1, &format!("password_file: {d}/shop")))
            .expect_err("no folder");
        assert!(e.to_string().contains("proxy.target_password_dir"), "{e}");
        assert!(sources.allows_env("SHOP_DB_PASSWORD") && sources.allows_env("_DB_PASSWORD"));
        assert!(!sources.allows_env("DB_PASSWORD") && !sources.allows_env("MINIO_ROOT_PASSWORD"));
        let exact = PasswordSources { env: vec!["PGPASS_SHOP".into()], ..Default::default() };
        assert!(exact.allows_env("PGPASS_SHOP") && !exact.allows_env("PGPASS_SHOPX"));
    }

    /// A target that asks for the password in the clear over a connection that is not
    /// `verify-full` (so possibly someone posing as it) does not get it unless the proxy's
    /// configuration allows it.
    #[tokio::test]
    async fn the_password_goes_in_the_clear_only_where_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (got, sent) = fake_target(auth(3, b""), None, sources_in(dir.path()), dir.path()).await;
        let e = got.err().expect("refused");
        assert!(e.to_string().contains("target_cleartext_password"), "{e}");
        assert!(!String::from_utf8_lossy(&sent).contains(PASSWORD), "sent {sent:?}");
        let allowed = PasswordSources { cleartext: true, ..sources_in(dir.path()) };
        let (_, sent) = fake_target(auth(3, b""), None, allowed, dir.path()).await;
        assert!(String::from_utf8_lossy(&sent).contains(PASSWORD), "sent {sent:?}");
    }

    /// A target (or someone posing as it) that starts SCRAM must finish it: asking for the
    /// password in the clear or md5 instead, or letting the client in without its own proof,
    /// gets a refusal, and the password is never sent.
    #[tokio::test]
    async fn a_target_cannot_leave_scram_for_a_weaker_method_or_skip_its_proof() {
        let ready = [auth(0, b""), vec![b'Z', 0, 0, 0, 5, b'I']].concat();
        for (what, then) in [
            ("cleartext", auth(3, b"")),
            ("md5", auth(5, b"salt")),
            ("ok without proof", ready.clone()),
            ("a second SASL start", auth(10, b"SCRAM-SHA-256\0\0")),
        ] {
            let (got, sent) = scram_then(then).await;
            let e = got.err().unwrap_or_else(|| panic!("{what}: the gateway went on"));
            assert!(e.to_string().contains("SCRAM") || e.to_string().contains("out of turn"), "{what}: {e}");
            let text = String::from_utf8_lossy(&sent);
            assert!(!text.contains(PASSWORD) && !text.contains("md5"), "{what}: sent {text:?}");
        }
    }
}
