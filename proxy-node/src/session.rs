//! One client session on the Postgres listener: startup, authentication, then a loop of
//! statement → classify → decide → (hold) → relay → record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::events::{
    Decision, Envelope, ErrorInfo, Event, HoldDecision, HoldOutcome, HoldRequest, Principal, ResultCapture,
    SessionId, Timestamp,
};
use proto::policy::Connection;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::Shared;
use crate::policy::{Verdict, classify, evaluate};
use crate::upstream::{self, Upstream};
use crate::wire::postgres::messages::{self as msg, sqlstate};
use crate::wire::postgres::{Frame, FrameError, StartupFrame, decode_frame, decode_startup};

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
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    max: usize,
}

impl Client {
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

    async fn read_frame(&mut self) -> Result<Frame, SessionError> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, self.max)? {
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
            self.out.clear();
        }
        Ok(())
    }

    /// Send an error and close.
    async fn refuse(&mut self, code: &str, message: String) -> SessionError {
        self.queue(&msg::fatal(code, &message));
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        SessionError::Refused(message)
    }
}

/// Serve one accepted client connection.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut client = Client {
        stream,
        buf: BytesMut::with_capacity(8192),
        out: BytesMut::with_capacity(8192),
        max: shared.cfg.max_message_bytes,
    };
    match startup(&shared, &mut client, peer).await {
        Ok(()) | Err(SessionError::Closed) => {}
        Err(e) => debug!(error = %e, client = %peer, "session ended"),
    }
}

async fn startup(shared: &Arc<Shared>, client: &mut Client, peer: SocketAddr) -> Result<(), SessionError> {
    let params = loop {
        match client.read_startup().await {
            Ok(StartupFrame::Ssl | StartupFrame::GssEnc) => {
                // TLS from clients comes later; the client may continue in plain text.
                client.stream.write_all(b"N").await?;
            }
            Ok(StartupFrame::Cancel { pid, secret }) => {
                if secret.len() == 4 {
                    let key = i32::from_be_bytes([secret[0], secret[1], secret[2], secret[3]]);
                    shared.cancels.forward(pid, key).await;
                }
                return Ok(());
            }
            Ok(StartupFrame::Startup { version, params }) => {
                if version & 0xffff != 0 {
                    // Ask the client to fall back to 3.0.
                    let mut body = BytesMut::new();
                    body.extend_from_slice(&0i32.to_be_bytes());
                    body.extend_from_slice(&0i32.to_be_bytes());
                    client.queue(&Frame { tag: b'v', body: body.freeze() });
                }
                break params;
            }
            Err(SessionError::Frame(e)) => {
                return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")).await);
            }
            Err(e) => return Err(e),
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let database = get("database").or_else(|| get("user")).unwrap_or_default();

    // Authentication: the password carries the token or API key.
    client.queue(&msg::auth_cleartext_request());
    client.flush().await?;
    let f = match client.read_frame().await {
        Ok(f) => f,
        Err(SessionError::Frame(e)) => {
            return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")).await);
        }
        Err(e) => return Err(e),
    };
    let credential = match (f.tag, msg::read_cstr_body(&f.body)) {
        (b'p', Some(s)) => s.to_string(),
        _ => {
            return Err(client
                .refuse(sqlstate::PROTOCOL_VIOLATION, "airlock: expected a password message".into())
                .await);
        }
    };
    let Some(policy) = shared.policy.borrow().clone() else {
        return Err(client
            .refuse(
                sqlstate::CANNOT_CONNECT_NOW,
                "airlock: no policy has been received from the policy store yet".into(),
            )
            .await);
    };
    let principal = match shared.auth.authenticate(&credential, &policy.document).await {
        Ok(p) => p,
        Err(e) => {
            info!(client = %peer, error = %e, "authentication failed");
            return Err(client
                .refuse(sqlstate::INVALID_PASSWORD, format!("airlock: authentication failed: {e}"))
                .await);
        }
    };
    drop(credential);
    let Some(conn) = policy.document.connections.iter().find(|c| c.name == database).cloned() else {
        return Err(client
            .refuse(sqlstate::INVALID_CATALOG_NAME, format!("airlock: no connection named \"{database}\""))
            .await);
    };

    let session_id: SessionId = Uuid::now_v7();
    let span = info_span!("session", session.id = %session_id, principal = %principal.subject, connection = %conn.name);
    let mut s = Session {
        shared: shared.clone(),
        id: session_id,
        principal,
        conn,
        seq: 0,
        tx_status: b'I',
        local_tx_failed: false,
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
        let key = s.shared.cancels.register(up.addr, up.backend_key);
        let mut body = BytesMut::new();
        body.extend_from_slice(&key.0.to_be_bytes());
        body.extend_from_slice(&key.1.to_be_bytes());
        client.queue(&Frame { tag: b'K', body: body.freeze() });
        client.queue(&msg::ready_for_query(b'I'));
        client.flush().await?;
        info!("session started");
        let result = s.run(client, &mut up).await;
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

struct Session {
    shared: Arc<Shared>,
    id: SessionId,
    principal: Principal,
    conn: Connection,
    seq: u64,
    /// The last transaction status the client was told.
    tx_status: u8,
    /// A statement was refused inside a transaction block: like PostgreSQL, everything until
    /// the end of the block fails, and COMMIT becomes ROLLBACK.
    local_tx_failed: bool,
}

/// What a held statement's wait ended with.
enum HoldEnd {
    Decided(HoldDecision),
    ClientGone,
}

impl Session {
    /// Publish events; `Err` is the message to refuse the client with.
    async fn record(&self, events: Vec<Event>) -> Result<(), String> {
        let envs: Vec<Envelope> = events.into_iter().map(|e| Envelope::new(self.id, e)).collect();
        match self.shared.bus.publish_all(&envs).await {
            Ok(()) => Ok(()),
            Err(e) if self.conn.require_recording => {
                warn!(error = %e, "cannot record; failing closed");
                Err(format!(
                    "airlock: cannot record this session ({e}); refusing to serve unrecorded traffic"
                ))
            }
            Err(e) => {
                warn!(error = %e, "cannot record; connection does not require recording");
                Ok(())
            }
        }
    }

    async fn run(&mut self, client: &mut Client, up: &mut Upstream) -> Result<(), SessionError> {
        loop {
            let f = match client.read_frame().await {
                Ok(f) => f,
                Err(SessionError::Frame(e)) => {
                    return Err(client.refuse(sqlstate::PROTOCOL_VIOLATION, format!("airlock: {e}")).await);
                }
                Err(e) => return Err(e),
            };
            match f.tag {
                b'Q' => {
                    let Some(sql) = msg::read_cstr_body(&f.body).map(str::to_string) else {
                        return Err(client
                            .refuse(sqlstate::PROTOCOL_VIOLATION, "airlock: malformed Query message".into())
                            .await);
                    };
                    self.query(client, up, &sql).await?;
                }
                b'X' => {
                    let mut out = BytesMut::new();
                    Frame { tag: b'X', body: bytes::Bytes::new() }.encode_into(&mut out);
                    let _ = up.stream.write_all(&out).await;
                    return Ok(());
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {
                    // The extended protocol is not relayed yet: refuse, then skip to Sync.
                    client.queue(&msg::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "airlock: the extended query protocol is not supported yet; use the simple query protocol",
                    ));
                    self.skip_to_sync(client).await?;
                }
                b'S' => {
                    let status = self.status();
                    client.queue(&msg::ready_for_query(status));
                    client.flush().await?;
                }
                b'd' | b'c' | b'f' => {} // stray COPY data outside COPY: ignored, as PostgreSQL does
                other => {
                    return Err(client
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            format!("airlock: unexpected message type {:?}", other as char),
                        )
                        .await);
                }
            }
        }
    }

    fn status(&self) -> u8 {
        if self.local_tx_failed { b'E' } else { self.tx_status }
    }

    async fn skip_to_sync(&mut self, client: &mut Client) -> Result<(), SessionError> {
        loop {
            let f = client.read_frame().await?;
            if f.tag == b'S' {
                let status = self.status();
                client.queue(&msg::ready_for_query(status));
                return client.flush().await;
            }
            if f.tag == b'X' {
                return Err(SessionError::Closed);
            }
        }
    }

    /// Answer the client without running anything: an error, then ReadyForQuery.
    async fn refuse_statement(
        &mut self,
        client: &mut Client,
        seq: u64,
        code: &str,
        message: String,
    ) -> Result<(), SessionError> {
        if self.tx_status == b'T' || self.tx_status == b'E' {
            self.local_tx_failed = true;
        }
        client.queue(&msg::error(code, &message));
        client.queue(&msg::ready_for_query(self.status()));
        let ev = Event::ResponseSent {
            seq,
            rows: 0,
            duration_us: 0,
            command_tag: None,
            error: Some(ErrorInfo { code: code.into(), message }),
            result: None,
        };
        if let Err(e) = self.record(vec![ev]).await {
            return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, e).await);
        }
        client.flush().await
    }

    async fn query(&mut self, client: &mut Client, up: &mut Upstream, sql: &str) -> Result<(), SessionError> {
        self.seq += 1;
        let seq = self.seq;
        let Some(policy) = self.shared.policy.borrow().clone() else {
            return Err(client
                .refuse(sqlstate::CANNOT_CONNECT_NOW, "airlock: policy unavailable".into())
                .await);
        };
        let c = classify(sql);
        let verdict: Verdict = evaluate(&policy.document, &self.conn.name, &self.principal, &c);
        debug!(decision = %verdict.decision, rule = %verdict.rule, "policy decision");
        let events = vec![
            Event::RequestReceived { seq, statement: sql.to_string() },
            Event::PolicyDecided {
                seq,
                decision: verdict.decision,
                rule: Some(verdict.rule.clone()),
                operations: c.operations(),
                tables: c.tables(),
                reason: verdict.reason.clone(),
                policy_version: policy.version,
            },
        ];
        if let Err(e) = self.record(events).await {
            return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, e).await);
        }

        // In a transaction that a refusal has already failed, only its end is accepted.
        let mut sql_to_run = sql.to_string();
        if self.local_tx_failed {
            match transaction_end(sql) {
                Some(TxEnd::Rollback) => {}
                Some(TxEnd::Commit) => sql_to_run = "ROLLBACK".into(),
                None => {
                    return self
                        .refuse_statement(
                            client,
                            seq,
                            sqlstate::IN_FAILED_TRANSACTION,
                            "current transaction is aborted, commands ignored until end of transaction block"
                                .into(),
                        )
                        .await;
                }
            }
        } else {
            match verdict.decision {
                Decision::Allow => {}
                Decision::Deny => {
                    let m = format!("airlock: denied by rule \"{}\": {}", verdict.rule, verdict.reason);
                    return self.refuse_statement(client, seq, sqlstate::INSUFFICIENT_PRIVILEGE, m).await;
                }
                Decision::Hold => match self.hold(client, seq, sql, &verdict).await? {
                    HoldEnd::Decided(d) if d.outcome == HoldOutcome::Approved => {}
                    HoldEnd::Decided(d) => {
                        let why = d.reason.map(|r| format!(": {r}")).unwrap_or_default();
                        let m = format!(
                            "airlock: hold {} was {} by {}{why} (rule \"{}\")",
                            d.hold_id, d.outcome, d.decided_by, verdict.rule
                        );
                        return self.refuse_statement(client, seq, sqlstate::INSUFFICIENT_PRIVILEGE, m).await;
                    }
                    HoldEnd::ClientGone => return Err(SessionError::Closed),
                },
            }
        }
        self.relay(client, up, seq, &sql_to_run).await
    }

    async fn hold(
        &mut self,
        client: &mut Client,
        seq: u64,
        sql: &str,
        verdict: &Verdict,
    ) -> Result<HoldEnd, SessionError> {
        let spec = verdict.hold.clone().unwrap_or_else(|| crate::policy::evaluate::HoldSpec {
            approvers: Default::default(),
            timeout: Duration::from_secs(300),
        });
        let hold_id = Uuid::now_v7();
        let now = Timestamp::now();
        let req = HoldRequest {
            hold_id,
            seq,
            connection: self.conn.name.clone(),
            principal: self.principal.clone(),
            statement: sql.to_string(),
            fingerprint: hex::encode(Sha256::digest(sql.as_bytes())),
            rule: verdict.rule.clone(),
            reason: verdict.reason.clone(),
            approvers: spec.approvers.clone(),
            requested_at: now,
            expires_at: now.plus(spec.timeout),
        };
        let rx = self.shared.holds.register(hold_id);
        if let Err(e) = self.record(vec![Event::HoldRequested(req.clone())]).await {
            self.shared.holds.forget(hold_id);
            return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, e).await);
        }
        info!(hold.id = %hold_id, rule = %verdict.rule, "statement held for approval");
        client.queue(&msg::notice(&format!(
            "airlock: waiting for approval of hold {hold_id} (rule \"{}\": {}); it expires at {}",
            verdict.rule, verdict.reason, req.expires_at
        )));
        client.flush().await?;

        // Wait for the decision, the rule's timeout (plus grace for the approval service to
        // expire it itself), or the client going away.
        let deadline = tokio::time::Instant::now() + spec.timeout + self.shared.cfg.hold_grace;
        let gone = client_gone(&mut client.stream, &mut client.buf);
        tokio::pin!(gone);
        let end = tokio::select! {
            d = rx => match d {
                Ok(d) => HoldEnd::Decided(d),
                Err(_) => HoldEnd::Decided(self.local_decision(hold_id, HoldOutcome::Expired, "the decision channel closed")),
            },
            _ = tokio::time::sleep_until(deadline) => {
                HoldEnd::Decided(self.local_decision(hold_id, HoldOutcome::Expired, "no decision arrived before the timeout"))
            }
            _ = &mut gone => HoldEnd::ClientGone,
        };
        self.shared.holds.forget(hold_id);
        match &end {
            HoldEnd::Decided(d) if d.decided_by == LOCAL_DECIDER => {
                let _ = self.record(vec![Event::HoldDecided(d.clone())]).await;
            }
            HoldEnd::ClientGone => {
                let d = self.local_decision(
                    hold_id,
                    HoldOutcome::Denied,
                    "the client disconnected while waiting",
                );
                let _ = self.record(vec![Event::HoldDecided(d)]).await;
            }
            HoldEnd::Decided(d) => {
                info!(hold.id = %hold_id, outcome = %d.outcome, by = %d.decided_by, "hold decided")
            }
        }
        Ok(end)
    }

    fn local_decision(&self, hold_id: Uuid, outcome: HoldOutcome, why: &str) -> HoldDecision {
        HoldDecision { hold_id, outcome, decided_by: LOCAL_DECIDER.into(), reason: Some(why.into()) }
    }

    /// Forward one query and relay the response until ReadyForQuery.
    async fn relay(
        &mut self,
        client: &mut Client,
        up: &mut Upstream,
        seq: u64,
        sql: &str,
    ) -> Result<(), SessionError> {
        let started = Instant::now();
        let mut out = BytesMut::new();
        msg::query(sql).encode_into(&mut out);
        if let Err(e) = up.stream.write_all(&out).await {
            return Err(client
                .refuse(sqlstate::CONNECTION_FAILURE, format!("airlock: target connection lost: {e}"))
                .await);
        }
        let mut rows = 0u64;
        let mut tag: Option<String> = None;
        let mut error: Option<ErrorInfo> = None;
        let mut capture = ResultCapture::default();
        let mut captured_bytes = 0usize;
        let cap_rows = self.shared.cfg.capture_rows;
        loop {
            let f = match up.read_frame(self.shared.cfg.max_message_bytes).await {
                Ok(f) => f,
                Err(e) => {
                    return Err(client
                        .refuse(sqlstate::CONNECTION_FAILURE, format!("airlock: target connection lost: {e}"))
                        .await);
                }
            };
            match f.tag {
                b'T' if capture.columns.is_empty() => {
                    capture.columns = msg::read_row_description(&f.body).unwrap_or_default();
                }
                b'D' => {
                    rows += 1;
                    if capture.rows.len() < cap_rows && captured_bytes < CAPTURE_BYTES {
                        if let Some(vals) = msg::read_data_row(&f.body) {
                            captured_bytes += f.body.len();
                            capture.rows.push(
                                vals.into_iter()
                                    .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                                    .collect(),
                            );
                        }
                    } else {
                        capture.truncated = true;
                    }
                }
                b'C' => {
                    if let Some(t) = msg::read_cstr_body(&f.body) {
                        if !t.starts_with("SELECT") && !t.starts_with("FETCH") && !t.starts_with("COPY") {
                            rows += msg::rows_in_tag(t).unwrap_or(0);
                        }
                        tag = Some(t.to_string());
                    }
                }
                b'E' => {
                    let (code, message) = msg::read_error_fields(&f.body);
                    error = Some(ErrorInfo { code, message });
                }
                b'G' => {
                    // COPY FROM STDIN is not relayed yet: fail it on the target.
                    let mut out = BytesMut::new();
                    msg::copy_fail("COPY FROM STDIN is not supported through airlock yet")
                        .encode_into(&mut out);
                    up.stream.write_all(&out).await.map_err(SessionError::Io)?;
                    continue;
                }
                b'W' => {
                    return Err(client
                        .refuse(sqlstate::FEATURE_NOT_SUPPORTED, "airlock: COPY BOTH is not supported".into())
                        .await);
                }
                b'Z' => {
                    self.tx_status = f.body.first().copied().unwrap_or(b'I');
                    if self.local_tx_failed && self.tx_status == b'I' {
                        self.local_tx_failed = false;
                    }
                }
                _ => {}
            }
            let done = f.tag == b'Z';
            client.queue(&f);
            if done {
                break;
            }
            if client.out.len() >= FLUSH_AT {
                client.flush().await?;
            }
        }
        let ev = Event::ResponseSent {
            seq,
            rows,
            duration_us: started.elapsed().as_micros() as u64,
            command_tag: tag,
            error,
            result: (!capture.columns.is_empty()).then_some(capture),
        };
        // The final bytes go out only once the response is recorded.
        if let Err(e) = self.record(vec![ev]).await {
            client.out.clear();
            return Err(client.refuse(sqlstate::CANNOT_CONNECT_NOW, e).await);
        }
        client.flush().await
    }
}

const LOCAL_DECIDER: &str = "proxy-node";
/// Flush buffered output to the client past this many bytes.
const FLUSH_AT: usize = 64 * 1024;
/// Stop capturing result rows for the record past this many bytes.
const CAPTURE_BYTES: usize = 1024 * 1024;

/// Resolves when the client closes its connection. Bytes it sends meanwhile are kept.
async fn client_gone(stream: &mut TcpStream, buf: &mut BytesMut) {
    loop {
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if buf.len() > 1024 * 1024 => return,
            Ok(_) => {}
        }
    }
}

enum TxEnd {
    Commit,
    Rollback,
}

/// Is this message exactly one statement that ends a transaction block?
fn transaction_end(sql: &str) -> Option<TxEnd> {
    use sqlparser::ast::Statement;
    let stmts = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql).ok()?;
    match stmts.as_slice() {
        [Statement::Commit { .. }] => Some(TxEnd::Commit),
        [Statement::Rollback { .. }] => Some(TxEnd::Rollback),
        _ => None,
    }
}
