//! One client session on the Postgres listener: startup and authentication here, then the
//! message loop in [`relay`]: statement → classify → decide → (hold) → relay → record.

mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use proto::events::{
    Envelope, ErrorInfo, Event, HoldDecision, HoldOutcome, HoldRequest, Principal, ResultCapture, SessionId,
    Timestamp,
};
use proto::policy::Connection;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::policy::Verdict;
use crate::tls::Stream;
use crate::upstream;
use crate::wire::postgres::frame::{CANCEL_REQUEST, GSSENC_REQUEST, SSL_REQUEST};
use crate::wire::postgres::messages::{self as msg, sqlstate};
use crate::wire::postgres::{Frame, FrameError, StartupFrame, decode_frame, decode_startup};
use crate::{ClientTls, Shared};

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("client closed the connection")]
    Closed,
    #[error("{0}")]
    Refused(String),
}

struct Client {
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
    max: usize,
}

impl Client {
    fn new(stream: Stream, buf: BytesMut, max: usize) -> Self {
        Self { stream, buf, out: BytesMut::with_capacity(8192), max }
    }

    async fn read_startup(&mut self) -> Result<StartupFrame, SessionError> {
        loop {
            if let Some(f) = decode_startup(&mut self.buf)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(SessionError::Closed);
            }
        }
    }

    /// The next message, of at most `max` bytes.
    async fn read_frame(&mut self, max: usize) -> Result<Frame, SessionError> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, max)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(SessionError::Closed);
            }
        }
    }

    fn queue(&mut self, f: &Frame) {
        f.encode_into(&mut self.out);
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Send an error and close.
    /// Tell the client why it is refused, then close. A client that reads nothing gets
    /// [`REFUSAL_WRITE`] to take the message: the task, its buffers and its socket must not
    /// wait on it for good.
    async fn refuse(&mut self, code: &str, message: String) -> SessionError {
        self.queue(&msg::fatal(code, &message));
        let _ = tokio::time::timeout(REFUSAL_WRITE, async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
        SessionError::Refused(message)
    }
}

/// Serve one accepted client connection.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + shared.cfg.auth_timeout;
    let mut client = match tokio::time::timeout_at(deadline, negotiate(&shared, stream)).await {
        Ok(Ok(c)) => c,
        Ok(Err(SessionError::Closed)) => return,
        Ok(Err(e)) => {
            debug!(error = %e, client = %peer, "session ended before startup");
            return;
        }
        Err(_) => {
            debug!(client = %peer, "session ended: no startup packet or TLS handshake in time");
            return;
        }
    };
    match startup(&shared, &mut client, peer, deadline).await {
        Ok(()) | Err(SessionError::Closed) => {}
        Err(e) => debug!(error = %e, client = %peer, "session ended"),
    }
}

/// The refusal of a second SSLRequest or GSSENCRequest.
const ENCRYPTION_ASKED_TWICE: &str = "airlock: encryption was already negotiated; asked again";

/// How long a refused client has to take the refusal before its connection is dropped.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

/// The largest password message (API key or OIDC token) read from a client not yet
/// authenticated: a connection cannot make the proxy hold `max_message_bytes` for it.
const MAX_CREDENTIAL: usize = 64 * 1024;

/// Answer the client's GSSENCRequest ("no") and SSLRequest ("yes" and the TLS handshake when
/// a certificate is configured, else "no"), up to the packet that follows them, which stays
/// in the client's buffer for `authenticate`. With `client_tls = require`, a client that does
/// not ask for TLS is refused (a CancelRequest still passes, as PostgreSQL lets it).
async fn negotiate(shared: &Shared, mut tcp: TcpStream) -> Result<Client, SessionError> {
    let mut buf = BytesMut::with_capacity(8192);
    let max = shared.cfg.max_message_bytes;
    // Each may be asked once, as PostgreSQL allows (libpq asks for GSS, then TLS).
    let (mut gss_asked, mut ssl_asked) = (false, false);
    loop {
        // Every startup-phase packet starts with its length and a code: look at those only.
        if buf.len() < 8 {
            if tcp.read_buf(&mut buf).await? == 0 {
                return Err(SessionError::Closed);
            }
            continue;
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let code = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let asked = match (len, code) {
            (8, GSSENC_REQUEST) => Some(std::mem::replace(&mut gss_asked, true)),
            (8, SSL_REQUEST) => Some(std::mem::replace(&mut ssl_asked, true)),
            _ => None,
        };
        if asked == Some(true) {
            let mut client = Client::new(Stream::Plain(tcp), BytesMut::new(), max);
            return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, ENCRYPTION_ASKED_TWICE.into()).await);
        }
        match (len, code) {
            (8, GSSENC_REQUEST) => {
                buf.advance(8);
                tcp.write_all(b"N").await?;
            }
            (8, SSL_REQUEST) => {
                buf.advance(8);
                let Some(acceptor) = &shared.tls else {
                    tcp.write_all(b"N").await?;
                    continue;
                };
                if !buf.is_empty() {
                    // Bytes sent before the handshake would pass as if they came over TLS.
                    let mut client = Client::new(Stream::Plain(tcp), BytesMut::new(), max);
                    return Err(client
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            "airlock: data sent after SSLRequest before the TLS handshake".into(),
                        )
                        .await);
                }
                tcp.write_all(b"S").await?;
                let tls = acceptor.accept(tcp).await?;
                let stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                return Ok(Client::new(stream, buf, max));
            }
            (_, CANCEL_REQUEST) => return Ok(Client::new(Stream::Plain(tcp), buf, max)),
            _ => {
                let mut client = Client::new(Stream::Plain(tcp), buf, max);
                if shared.client_tls == ClientTls::Require {
                    return Err(client
                        .refuse(
                            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                            "airlock: this listener requires TLS (sslmode=require)".into(),
                        )
                        .await);
                }
                // A startup packet, or garbage that `authenticate` refuses.
                return Ok(client);
            }
        }
    }
}

/// Who the client is and which connection it wants.
struct Authenticated {
    params: Vec<(String, String)>,
    principal: Principal,
    /// The OIDC token's verified e-mail, if any.
    email: Option<String>,
    expires: Option<std::time::SystemTime>,
    key_sha256: Option<String>,
    conn: Connection,
    policy: Arc<policy_store::client::ActivePolicy>,
}

/// Startup packet and credential, up to a principal and a connection. `None`: a cancel request.
async fn authenticate(
    shared: &Arc<Shared>,
    client: &mut Client,
    peer: SocketAddr,
) -> Result<Option<Authenticated>, SessionError> {
    let params = match client.read_startup().await {
        Ok(StartupFrame::Ssl | StartupFrame::GssEnc) => {
            // Encryption was negotiated (or declined) before: PostgreSQL refuses another
            // request too. Answering each would let a client that never reads fill the
            // socket and hold the session's task forever.
            return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, ENCRYPTION_ASKED_TWICE.into()).await);
        }
        Ok(StartupFrame::Cancel { pid, secret }) => {
            if secret.len() == 4 {
                let key = i32::from_be_bytes([secret[0], secret[1], secret[2], secret[3]]);
                shared.cancels.forward(pid, key).await;
            }
            return Ok(None);
        }
        Ok(StartupFrame::Startup { version, params }) => {
            if version & 0xffff != 0 {
                // Ask the client to fall back to 3.0.
                let mut body = BytesMut::new();
                body.extend_from_slice(&0i32.to_be_bytes());
                body.extend_from_slice(&0i32.to_be_bytes());
                client.queue(&Frame { tag: b'v', body: body.freeze() });
            }
            params
        }
        Err(SessionError::Frame(e)) => {
            return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")).await);
        }
        Err(e) => return Err(e),
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let database = get("database").or_else(|| get("user")).unwrap_or_default();

    // Authentication: the password carries the token or API key.
    client.queue(&msg::auth_cleartext_request());
    client.flush().await?;
    // Before anyone is authenticated, a message is an API key or a token: a few kilobytes.
    let f = match client.read_frame(MAX_CREDENTIAL.min(client.max)).await {
        Ok(f) => f,
        Err(SessionError::Frame(e)) => {
            return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")).await);
        }
        Err(e) => return Err(e),
    };
    let credential = match (f.tag, msg::read_cstr_body(&f.body)) {
        (b'p', Some(s)) => s.to_string(),
        (b'p', None) => {
            return Err(client
                .refuse(
                    sqlstate::PROTOCOL_VIOLATION,
                    "airlock: the password must be one NUL-terminated UTF-8 string (an OIDC token or an API key)"
                        .into(),
                )
                .await);
        }
        _ => {
            return Err(client
                .refuse(sqlstate::PROTOCOL_VIOLATION, "airlock: expected a password message".into())
                .await);
        }
    };
    let policy = match shared.policy_now() {
        Ok(p) => p,
        Err(why) => return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, why).await),
    };
    let crate::identity::Verified { principal, email, expires } =
        match shared.auth.authenticate_with_email(&credential, &policy.document).await {
            Ok(p) => p,
            Err(e) => {
                info!(client = %peer, error = %e, "authentication failed");
                // The provider's own errors name its internal addresses: not for a stranger.
                let why = match e {
                    crate::identity::AuthError::Provider(_) => {
                        "the identity provider could not be reached".to_string()
                    }
                    e => e.to_string(),
                };
                return Err(client
                    .refuse(sqlstate::INVALID_PASSWORD, format!("airlock: authentication failed: {why}"))
                    .await);
            }
        };
    // Kept to tell, when the policy changes, whether the service account still has this key.
    let key_sha256 =
        (principal.kind == "service_account").then(|| crate::identity::hash_api_key(&credential));
    drop(credential);
    let Some(conn) = policy.document.connections.iter().find(|c| c.name == database).cloned() else {
        return Err(client
            .refuse(sqlstate::INVALID_CATALOG_NAME, format!("airlock: no connection named \"{database}\""))
            .await);
    };
    Ok(Some(Authenticated { params, principal, email, expires, key_sha256, conn, policy }))
}

async fn startup(
    shared: &Arc<Shared>,
    client: &mut Client,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), SessionError> {
    let auth = match tokio::time::timeout_at(deadline, authenticate(shared, client, peer)).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(client
                .refuse(sqlstate::PROTOCOL_VIOLATION, "airlock: authentication timed out".into())
                .await);
        }
    };
    let Authenticated { params, principal, email, expires, key_sha256, conn, policy } = auth;

    let session_id: SessionId = Uuid::now_v7();
    let span = info_span!("session", session.id = %session_id, principal = %principal.subject, connection = %conn.name);
    let read_only = !crate::policy::may_write(&policy.document, &conn.name, &principal);
    let mut s = Session {
        shared: shared.clone(),
        id: session_id,
        principal,
        email,
        expires,
        key_sha256,
        conn,
        seq: 0,
        read_only,
        cancelled: Arc::default(),
    };
    async move {
        let started = Event::SessionStarted {
            principal: s.principal.clone(),
            connection: s.conn.name.clone(),
            protocol: "postgres".into(),
            client_addr: peer.to_string(),
            node: s.shared.cfg.node_name(),
            policy_version: policy.version,
        };
        if let Err(e) = s.record(vec![started]).await {
            return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, e).await);
        }
        let mut up = match upstream::connect(
            &s.conn,
            &params,
            s.shared.cfg.connect_timeout,
            s.shared.cfg.max_message_bytes,
            s.read_only,
            &s.shared.cfg.password_sources(),
        )
        .await
        {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "upstream connect failed");
                let _ =
                    s.record(vec![Event::SessionEnded { reason: format!("target unreachable: {e}") }]).await;
                return Err(client
                    .refuse(
                        sqlstate::CONNECTION_FAILURE,
                        format!("airlock: cannot connect to the target: {e}"),
                    )
                    .await);
            }
        };
        client.queue(&msg::auth_ok());
        for p in &up.parameters {
            client.queue(p);
        }
        let key = s.shared.cancels.register(up.addr.clone(), up.backend_key, s.cancelled.clone());
        let mut body = BytesMut::new();
        body.extend_from_slice(&key.0.to_be_bytes());
        body.extend_from_slice(&key.1.to_be_bytes());
        client.queue(&Frame { tag: b'K', body: body.freeze() });
        client.queue(&msg::ready_for_query(b'I'));
        client.flush().await?;
        info!(client_tls = client.stream.is_tls(), target_tls = up.stream.is_tls(), "session started");
        let result = relay::run(&mut s, client, &mut up).await;
        s.shared.cancels.remove(key);
        let reason = match &result {
            Ok(()) => "client closed".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = s.record(vec![Event::SessionEnded { reason: reason.clone() }]).await;
        info!(reason = %reason, "session ended");
        result
    }
    .instrument(span)
    .await
}

pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: SessionId,
    pub(crate) principal: Principal,
    /// The principal's verified e-mail (OIDC), named in its hold requests.
    pub(crate) email: Option<String>,
    /// When the OIDC token it logged in with stops being valid (`exp` plus the leeway): the
    /// session ends at its first statement after that, as a new login with it would fail.
    pub(crate) expires: Option<std::time::SystemTime>,
    /// The SHA-256 of the API key a service account logged in with (`None`: an OIDC token).
    pub(crate) key_sha256: Option<String>,
    pub(crate) conn: Connection,
    /// The number of the last request.
    pub(crate) seq: u64,
    /// The principal may never write here: the target session is read-only, and anything
    /// that would widen it is refused.
    pub(crate) read_only: bool,
    /// Woken by a CancelRequest with this session's key ([`crate::cancel::Cancels`]).
    pub(crate) cancelled: Arc<crate::cancel::CancelSignal>,
}

impl Session {
    /// Why the session may not go on under `doc`, a policy version other than the one it was
    /// opened under: what it was opened on is gone or changed. Its connection was removed or
    /// changed (host, credentials, ...), or its service account was removed, given another key
    /// or other groups; or a service account took an OIDC principal's subject. Rules and
    /// masking of a new version apply to open sessions at their next statement; these cannot,
    /// so such a session ends (a revoked key ends its sessions).
    pub(crate) fn lost_standing(&self, doc: &proto::policy::PolicyDocument) -> Option<String> {
        let name = &self.conn.name;
        match doc.connections.iter().find(|c| c.name == *name) {
            None => return Some(format!("the connection \"{name}\" was removed")),
            Some(c) if *c != self.conn => return Some(format!("the connection \"{name}\" was changed")),
            Some(_) => {}
        }
        let who = &self.principal.subject;
        let account = doc.service_accounts.iter().find(|sa| sa.name == *who);
        match (&self.key_sha256, account) {
            (Some(_), None) => Some(format!("the service account \"{who}\" was removed")),
            (Some(key), Some(sa)) if !sa.api_key_sha256.eq_ignore_ascii_case(key) => {
                Some(format!("the key of the service account \"{who}\" was replaced"))
            }
            (Some(_), Some(sa)) if sa.groups != self.principal.groups => {
                Some(format!("the groups of the service account \"{who}\" changed"))
            }
            (None, Some(_)) => {
                Some(format!("a service account is now named \"{who}\", this principal's subject"))
            }
            _ => None,
        }
    }

    /// Publish events; `Err` is the message to refuse the client with. When the connection
    /// requires recording, `Ok` means they are acknowledged; otherwise they are only queued
    /// (the journal logs what the bus refuses).
    pub(crate) async fn record(&self, events: Vec<Event>) -> Result<(), String> {
        let envs = Envelope::stamp_all(self.id, events);
        if !self.conn.require_recording {
            if let Err(e) = self.shared.journal.submit(envs).await {
                warn!(error = %e, "cannot record; connection does not require recording");
            }
            return Ok(());
        }
        self.shared.journal.record(envs).await.map_err(|e| {
            warn!(error = %e, "cannot record; failing closed");
            format!("airlock: cannot record this session ({e}); refusing to serve unrecorded traffic")
        })
    }

    /// A hold request for a statement and its parameters.
    pub(crate) fn hold_request(
        &self,
        seq: u64,
        sql: &str,
        params: &[Option<String>],
        verdict: &Verdict,
    ) -> (HoldRequest, Duration) {
        let spec = verdict.hold.clone().unwrap_or_else(|| crate::policy::evaluate::HoldSpec {
            approvers: Default::default(),
            timeout: Duration::from_secs(300),
        });
        let mut h = Sha256::new();
        h.update(sql.as_bytes());
        for p in params {
            match p {
                Some(v) => {
                    h.update([1]);
                    h.update((v.len() as u64).to_be_bytes());
                    h.update(v.as_bytes());
                }
                None => h.update([0]),
            }
        }
        let now = Timestamp::now();
        let req = HoldRequest {
            hold_id: Uuid::now_v7(),
            seq,
            connection: self.conn.name.clone(),
            principal: self.principal.clone(),
            requester_email: self.email.clone(),
            statement: sql.to_string(),
            parameters: params.to_vec(),
            fingerprint: hex::encode(h.finalize()),
            rule: verdict.rule.clone(),
            reason: verdict.reason.clone(),
            approvers: spec.approvers.clone(),
            requested_at: now,
            expires_at: now.plus(spec.timeout),
        };
        (req, spec.timeout)
    }

    pub(crate) fn local_decision(&self, hold_id: Uuid, outcome: HoldOutcome, why: &str) -> HoldDecision {
        HoldDecision { hold_id, outcome, decided_by: LOCAL_DECIDER.into(), reason: Some(why.into()) }
    }
}

pub(crate) const LOCAL_DECIDER: &str = "proxy-node";
/// The most bytes of result values a response event records (its rows are cut there, and
/// marked `truncated`): the event must fit on the bus whatever the result, or no other session
/// of its batch could be recorded either.
pub(crate) const CAPTURE_BYTES: usize = 256 * 1024;
/// The most bytes of one result value a response event records.
const CAPTURE_VALUE_BYTES: usize = 16 * 1024;

/// What a request event adds to its statement and parameters (ids, times, field names).
const EVENT_OVERHEAD: usize = 2048;
/// How much of a statement too large to record its refusal's record keeps.
const CUT_STATEMENT: usize = 4096;
/// How much of each parameter the record of such a statement keeps, and of how many.
const CUT_PARAMETER: usize = 256;
const CUT_PARAMETERS: usize = 256;

fn request_bytes(sql: &str, params: &[Option<String>]) -> usize {
    EVENT_OVERHEAD + sql.len() + params.iter().map(|p| p.as_ref().map_or(1, |v| v.len() + 5)).sum::<usize>()
}

/// Why a statement may not run whatever the rules say: its request event (the statement and
/// its parameters) would be larger than the bus takes (`max`), so it could not be recorded. A
/// best-effort connection would run it unrecorded, a strict one fail every session whose
/// events share its batch.
pub(crate) fn unrecordable(sql: &str, params: &[Option<String>], max: usize) -> Option<String> {
    let n = request_bytes(sql, params);
    (n > max).then(|| {
        format!(
            "the statement and its parameters ({n} bytes) are too large to record: the event bus takes at most \
             {max} bytes per event (raise NATS max_payload to send larger statements)"
        )
    })
}

/// The statement and parameters as a request event records them: as they are, or, when they
/// do not fit in one event (the statement is then refused, [`unrecordable`]), cut, each cut
/// value saying how long it was and its SHA-256.
pub(crate) fn fit_for_record(
    sql: Arc<str>,
    params: Arc<[Option<String>]>,
    max: usize,
) -> (Arc<str>, Arc<[Option<String>]>) {
    if request_bytes(&sql, &params) <= max {
        return (sql, params);
    }
    let mut kept: Vec<Option<String>> =
        params.iter().take(CUT_PARAMETERS).map(|p| p.as_deref().map(|v| cut(v, CUT_PARAMETER))).collect();
    if params.len() > CUT_PARAMETERS {
        kept.push(Some(format!("… [{} more parameters cut for the record]", params.len() - CUT_PARAMETERS)));
    }
    (cut(&sql, CUT_STATEMENT).into(), kept.into())
}

/// `s`, or its first `keep` bytes (at a character boundary) and what was cut.
fn cut(s: &str, keep: usize) -> String {
    if s.len() <= keep {
        return s.to_string();
    }
    let end = (0..=keep).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!(
        "{}… [cut for the record: {} bytes in all, sha256 {}]",
        &s[..end],
        s.len(),
        hex::encode(Sha256::digest(s.as_bytes()))
    )
}

/// The result capture and counters of one response.
pub(crate) struct Response {
    pub(crate) seq: u64,
    pub(crate) started: Instant,
    pub(crate) rows: u64,
    pub(crate) tag: Option<String>,
    pub(crate) error: Option<ErrorInfo>,
    pub(crate) capture: ResultCapture,
    pub(crate) captured_bytes: usize,
    /// The statement text that produced the response (for masking lineage); `None` if unknown.
    pub(crate) sql: Option<Arc<str>>,
    /// Which statement of a multi-statement simple query is answering.
    pub(crate) stmt: usize,
    /// How result rows are masked, once the row description is known.
    pub(crate) plan: Option<Arc<crate::mask::RowPlan>>,
    /// How COPY TO rows are masked: the plan, the CSV quoting (None = text format), the delimiter.
    pub(crate) copy: Option<(crate::mask::RowPlan, Option<crate::mask::CsvShape>, u8)>,
    /// Does the statement read masked columns (so error texts are withheld)? Computed once.
    pub(crate) reads_masked: Option<bool>,
    /// The client's own Describe of this portal comes just before this Execute: its row
    /// description gives the plan (the proxy sends no Describe of its own).
    pub(crate) planned_by_client_describe: bool,
    /// What an extended-protocol statement does to the session's statements and portals,
    /// applied when it completes (a simple query keeps one per statement beside it).
    pub(crate) effect: Option<crate::policy::SessionEffect>,
}

impl Response {
    pub(crate) fn new(seq: u64) -> Self {
        Self {
            seq,
            started: Instant::now(),
            rows: 0,
            tag: None,
            error: None,
            capture: ResultCapture::default(),
            captured_bytes: 0,
            sql: None,
            stmt: 0,
            plan: None,
            copy: None,
            reads_masked: None,
            planned_by_client_describe: false,
            effect: None,
        }
    }

    pub(crate) fn with_sql(mut self, sql: Option<Arc<str>>) -> Self {
        self.sql = sql;
        self
    }

    /// The next statement of a simple query starts answering.
    pub(crate) fn next_statement(&mut self) {
        self.stmt += 1;
        self.plan = None;
        self.copy = None;
        self.reads_masked = None;
    }

    pub(crate) fn columns(&mut self, body: &[u8]) {
        if self.capture.columns.is_empty() {
            self.capture.columns = msg::read_row_description(body).unwrap_or_default();
        }
    }

    pub(crate) fn row(&mut self, body: &[u8], cap_rows: usize) {
        self.rows += 1;
        if self.capture.rows.len() < cap_rows && self.captured_bytes < CAPTURE_BYTES {
            if let Some(vals) = msg::read_data_row(body) {
                let mut row = Vec::with_capacity(vals.len());
                // Every row and value takes room in the event, a NULL too.
                self.captured_bytes += 8;
                for v in vals {
                    let Some(v) = v else {
                        self.captured_bytes += 1;
                        row.push(None);
                        continue;
                    };
                    let room = CAPTURE_VALUE_BYTES.min(CAPTURE_BYTES.saturating_sub(self.captured_bytes));
                    let shown = crate::session::relay::show_value(v);
                    if shown.len() > room {
                        self.capture.truncated = true;
                    }
                    let shown = if shown.len() > room { cut(&shown, room) } else { shown };
                    self.captured_bytes += shown.len() + 1;
                    row.push(Some(shown));
                }
                self.capture.rows.push(row);
            }
        } else {
            self.capture.truncated = true;
        }
    }

    pub(crate) fn complete(&mut self, body: &[u8]) {
        if let Some(t) = msg::read_cstr_body(body) {
            if !t.starts_with("SELECT") && !t.starts_with("FETCH") {
                self.rows += msg::rows_in_tag(t).unwrap_or(0);
            }
            self.tag = Some(t.to_string());
        }
    }

    pub(crate) fn error(&mut self, body: &[u8]) {
        let (code, message) = msg::read_error_fields(body);
        // An error can quote a value of any size (`invalid input syntax for type integer: "..."`).
        self.error = Some(ErrorInfo { code: cut(&code, 16), message: cut(&message, CAPTURE_VALUE_BYTES) });
    }

    pub(crate) fn into_event(self) -> Event {
        Event::ResponseSent {
            seq: self.seq,
            rows: self.rows,
            duration_us: self.started.elapsed().as_micros() as u64,
            command_tag: self.tag,
            error: self.error,
            result: (!self.capture.columns.is_empty() || !self.capture.rows.is_empty())
                .then_some(self.capture),
        }
    }
}
