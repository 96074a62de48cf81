//! The policy document: connections, rules, masking, service accounts, approver groups and
//! defaults.
//!
//! Users write it as YAML and apply it with `airlock policy apply -f FILE`. [`parse`] checks both
//! shape and meaning, and every error names the field (`rules[1].action`) and its line.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::ApproverSpec;
pub use crate::events::Decision as Action;

/// The whole document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default)]
    pub connections: Vec<Connection>,
    /// Most restrictive match wins: deny > hold > allow.
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub masking: Vec<Masking>,
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccount>,
    /// Named groups of approvers, held in the store. A person is in a group when their token's
    /// groups claim (or the approval service's Slack mapping) says so, or when the group lists
    /// them here. Once this section is non-empty, every group a hold rule names must be defined
    /// in it.
    #[serde(default)]
    pub approver_groups: Vec<ApproverGroup>,
    #[serde(default)]
    pub defaults: Defaults,
}

impl PolicyDocument {
    /// The names of the [`approver_groups`](Self::approver_groups) that list this person: by
    /// OIDC subject, by e-mail (compared case-insensitively) or by Slack user id.
    pub fn approver_groups_of(&self, who: &ApproverIdentity<'_>) -> Vec<String> {
        self.approver_groups.iter().filter(|g| g.lists(who)).map(|g| g.name.clone()).collect()
    }
}

/// A named group of approvers (see [`PolicyDocument::approver_groups`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverGroup {
    /// What hold rules name in `approvers.groups` (letters, digits, _ - .).
    pub name: String,
    /// OIDC subjects (`sub`) or e-mail addresses (matched against a token's `email` claim, or a
    /// Slack user's profile e-mail). Default: none.
    #[serde(default)]
    pub members: Vec<String>,
    /// Slack user ids (`U012345`), for approvers who answer in Slack. Default: none.
    #[serde(default)]
    pub slack_users: Vec<String>,
}

/// Who an approver is, as far as the approval service knows: each part is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApproverIdentity<'a> {
    /// The OIDC subject (`sub`), or the approver's configured name.
    pub subject: Option<&'a str>,
    /// A verified e-mail address.
    pub email: Option<&'a str>,
    /// A Slack user id.
    pub slack_user: Option<&'a str>,
}

impl ApproverGroup {
    /// Does the group list this person?
    pub fn lists(&self, who: &ApproverIdentity<'_>) -> bool {
        let member = self.members.iter().any(|m| {
            who.subject.is_some_and(|s| !s.is_empty() && m == s)
                || who.email.is_some_and(|e| !e.is_empty() && m.contains('@') && m.eq_ignore_ascii_case(e))
        });
        member || who.slack_user.is_some_and(|u| !u.is_empty() && self.slack_users.iter().any(|s| s == u))
    }
}

/// A target the gateway connects to on the agent's behalf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// What clients put as the database name.
    pub name: String,
    pub kind: ConnectionKind,
    pub upstream: Upstream,
    pub credentials: Credentials,
    /// Refuse to serve the connection when its events cannot be recorded. Default true.
    #[serde(default = "yes")]
    pub require_recording: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    Postgres,
    Mysql,
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// A host name or address, or, as in libpq, an absolute path: the directory of the
    /// target's Unix-domain socket (for a target on the gateway's own host).
    pub host: String,
    /// The TCP port, or the number in the socket file's name (`.s.PGSQL.<port>`).
    pub port: u16,
    /// The target database (defaults to the connection's name).
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub tls: TlsMode,
    /// The CAs (PEM) that `tls: verify-full` checks the target's certificate against: a file
    /// on the gateway's hosts. Required with `verify-full`, refused with the other modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl Upstream {
    /// The path of the target's Unix-domain socket, when `host` names its directory (starts
    /// with `/`, as libpq reads it): `<host>/.s.PGSQL.<port>`.
    pub fn unix_socket(&self) -> Option<String> {
        self.host
            .starts_with('/')
            .then(|| format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port))
    }
}

/// TLS to the target, as libpq's `sslmode` of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain text.
    Disable,
    /// TLS if the target offers it (not verified), else plain text.
    #[default]
    Prefer,
    /// TLS or no connection; the target's certificate is not verified.
    Require,
    /// TLS with the chain verified against `ca_file` and the host name against the certificate.
    VerifyFull,
}

impl TlsMode {
    /// The mode as the policy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// The target credentials. The gateway holds them; the agent never sees them.
/// The password comes from an environment variable or a file of the gateway's host,
/// never from the document itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<String>,
}

/// One rule. A rule matches a statement when the connection, the principal and the match all do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// Connection names; empty or omitted = every connection.
    #[serde(default)]
    pub connections: Vec<String>,
    /// Omitted = everyone.
    #[serde(default)]
    pub principals: Option<Principals>,
    #[serde(default, rename = "match")]
    pub matches: Match,
    pub action: Action,
    /// Who may approve (hold only). Omitted = any approver, one approval.
    #[serde(default)]
    pub approvers: Option<ApproverSpec>,
    /// How long a hold waits before it is denied as expired (hold only). Default 5m.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Where the approval service posts this rule's holds in Slack (hold only). Default: the
    /// service's `slack.default_channel`.
    #[serde(default)]
    pub slack: Option<SlackRoute>,
    /// The name of an outgoing webhook, configured in the approval service, told when a hold of
    /// this rule is created and when it is decided (hold only). Default: none.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Just-in-time access (hold only): a hold of this rule is an access request, and approving
    /// it grants the principal the connection, for statements under this rule, for a duration up
    /// to `grant.max`. Default: none (an approval releases one statement).
    #[serde(default)]
    pub grant: Option<GrantSpec>,
}

/// A rule's Slack channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackRoute {
    /// A channel id (`C0123`) or name (`#dba-approvals`).
    pub channel: String,
}

/// How long a just-in-time grant may last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// The longest grant an approver may give (1m to 30d).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Rule {
    /// The hold timeout (default 5 minutes).
    pub fn hold_timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(300))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principals {
    #[serde(default)]
    pub groups: Vec<String>,
    /// Subjects (OIDC `sub`, or service-account names).
    #[serde(default)]
    pub subjects: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Empty or omitted = every operation.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Table names: `orders` matches it in any schema, `public.orders` only there; `*` globs.
    /// Empty or omitted = any statement, whatever tables it touches.
    #[serde(default)]
    pub tables: Vec<String>,
}

/// What a statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    Create,
    Drop,
    Alter,
    Grant,
    Revoke,
    Copy,
    Call,
    Do,
    Set,
    Show,
    Transaction,
    Explain,
    Prepare,
    Execute,
    Deallocate,
    Lock,
    Vacuum,
    Analyze,
    Comment,
    Listen,
    Notify,
    Cursor,
    Discard,
    /// A change of session state that widens rights: `SET ROLE`, `SET SESSION AUTHORIZATION`,
    /// `RESET ALL`, `BEGIN READ WRITE`, `SET default_transaction_read_only`, ...
    Escalate,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Select => "select",
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Merge => "merge",
            Operation::Truncate => "truncate",
            Operation::Create => "create",
            Operation::Drop => "drop",
            Operation::Alter => "alter",
            Operation::Grant => "grant",
            Operation::Revoke => "revoke",
            Operation::Copy => "copy",
            Operation::Call => "call",
            Operation::Do => "do",
            Operation::Set => "set",
            Operation::Show => "show",
            Operation::Transaction => "transaction",
            Operation::Explain => "explain",
            Operation::Prepare => "prepare",
            Operation::Execute => "execute",
            Operation::Deallocate => "deallocate",
            Operation::Lock => "lock",
            Operation::Vacuum => "vacuum",
            Operation::Analyze => "analyze",
            Operation::Comment => "comment",
            Operation::Listen => "listen",
            Operation::Notify => "notify",
            Operation::Cursor => "cursor",
            Operation::Discard => "discard",
            Operation::Escalate => "escalate",
        }
    }

    /// Whether the operation can change data, schema or rights.
    pub fn is_write(self) -> bool {
        !matches!(
            self,
            Operation::Select
                | Operation::Show
                | Operation::Explain
                | Operation::Transaction
                | Operation::Cursor
                | Operation::Listen
        )
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Masking of response values: columns masked by their origin, and detectors run on every value.
/// Several entries may apply to a session; a principal in `exempt` skips the entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Masking {
    /// Connections the entry applies to. Empty or omitted = every connection.
    #[serde(default)]
    pub connections: Vec<String>,
    /// Columns by origin: `table.column`, `schema.table.column`, `table.*` or `schema.table.*`.
    /// Identifiers fold like PostgreSQL's: unquoted ones are lower-cased, `"Quoted"` ones kept.
    /// A pattern without a schema matches the table in any schema.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Detectors run on every text value of every column (JSON included): `email`, `phone`,
    /// `credit_card`, `iban`, `ssn`, `ipv4`, `ipv6`, `jwt`, `api_key`.
    #[serde(default)]
    pub detectors: Vec<String>,
    /// `redact` (default), `partial` (keeps the last 4 characters), `partial:N`, or `hash`
    /// (keyed and stable per value, so joins and group-bys still work).
    #[serde(default)]
    pub strategy: Option<String>,
    /// Principals who see these values unmasked.
    #[serde(default)]
    pub exempt: Option<Principals>,
}

/// A masked column's origin pattern, folded (see [`Masking::columns`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ColumnPattern {
    pub schema: Option<String>,
    pub table: String,
    /// `None` for `table.*`.
    pub column: Option<String>,
}

impl ColumnPattern {
    /// Parse `table.column`, `schema.table.column`, `table.*` or `schema.table.*`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        let mut chars = text.trim().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                '"' => {
                    quoted = !quoted;
                    was_quoted = true;
                }
                '.' if !quoted => {
                    parts.push(Self::fold(std::mem::take(&mut cur), was_quoted)?);
                    was_quoted = false;
                }
                c => cur.push(c),
            }
        }
        if quoted {
            return Err(format!("`{text}`: unterminated quoted identifier"));
        }
        let last = if !was_quoted && cur == "*" { None } else { Some(Self::fold(cur, was_quoted)?) };
        let mut pattern = match (parts.len(), last) {
            (1, column) => Self { schema: None, table: parts.remove(0), column },
            (2, column) => {
                let table = parts.remove(1);
                Self { schema: Some(parts.remove(0)), table, column }
            }
            _ => {
                return Err(format!(
                    "`{text}` is not a column: write table.column, schema.table.column or table.*"
                ));
            }
        };
        if pattern.table == "*" || pattern.schema.as_deref() == Some("*") {
            return Err(format!("`{text}`: only the column may be `*`"));
        }
        pattern.table.shrink_to_fit();
        Ok(pattern)
    }

    fn fold(ident: String, quoted: bool) -> Result<String, String> {
        if ident.is_empty() {
            return Err("an empty identifier".into());
        }
        Ok(if quoted { ident } else { ident.to_lowercase() })
    }

    /// Does the pattern cover `schema.table.column` (`column` `None`: some column of the table)?
    /// An unknown schema matches any pattern schema (the conservative reading).
    pub fn covers(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> bool {
        if self.table != table {
            return false;
        }
        if let (Some(want), Some(have)) = (&self.schema, schema)
            && want != have
        {
            return false;
        }
        match (&self.column, column) {
            (None, _) | (_, None) => true,
            (Some(want), Some(have)) => want == have,
        }
    }
}

impl std::fmt::Display for ColumnPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(s) = &self.schema {
            write!(f, "{s}.")?;
        }
        write!(f, "{}.{}", self.table, self.column.as_deref().unwrap_or("*"))
    }
}

/// A non-human principal that authenticates with an API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Hex SHA-256 of the API key (`airlock keygen` prints both). The key itself is never stored.
    pub api_key_sha256: String,
}

/// What to do when no rule can decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// A statement the gateway cannot parse. Default deny.
    #[serde(default = "deny")]
    pub unparsed: Action,
    /// A statement whose effect cannot be known. Default deny (`hold` sends it to approvers).
    #[serde(default = "deny")]
    pub unknown_operation: Action,
    /// A statement no rule matches. Default allow.
    #[serde(default = "allow")]
    pub no_match: Action,
    /// Hold timeout for holds that come from a default. Default 5m.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// A result column whose origin the gateway cannot tell, in a statement that reads masked
    /// columns: `mask` it (default) or `deny` the statement.
    #[serde(default)]
    pub unknown_lineage: UnknownLineage,
    /// A masked column used to choose rows (`WHERE`, `JOIN`, `GROUP BY`, `ORDER BY`, …) rather
    /// than returned, masked: see [`MaskedPredicates`]. Default `equality`.
    #[serde(default)]
    pub masked_predicates: MaskedPredicates,
}

/// See [`Defaults::unknown_lineage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownLineage {
    #[default]
    Mask,
    Deny,
}

/// See [`Defaults::masked_predicates`]. Masking hides the values a statement returns; a masked
/// column that chooses which rows come back, how many, or in which order shows through them
/// (`WHERE email LIKE 'a%'` answers one question a statement; `ORDER BY email` sorts by it;
/// `generate_series(1, ascii(email))` counts to a character's code). For the principals the
/// column is masked for (exemptions apply), statements using it so are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskedPredicates {
    /// A masked column may only be returned (masked): anywhere else (`WHERE`, `JOIN … ON`/
    /// `USING`, `GROUP BY`, `HAVING`, `ORDER BY`, `DISTINCT`, window clauses, `LIMIT`,
    /// `FILTER`, `CASE` conditions, arguments of set-returning functions, subqueries feeding
    /// those) the statement is refused.
    Deny,
    /// As `deny`, except a lookup by a value the statement names: the column, unchanged,
    /// compared with constants or parameters by `=`, `<>`, `IN (…)` or `IS [NOT] NULL`
    /// (`WHERE email = $1`), which tells only whether it is exactly that value.
    #[default]
    Equality,
    /// No check: masked columns may choose rows any way (their values can be inferred).
    Allow,
}

impl std::fmt::Display for MaskedPredicates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Equality => "equality",
            Self::Allow => "allow",
        })
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            unparsed: deny(),
            unknown_operation: deny(),
            no_match: allow(),
            hold_timeout: five_minutes(),
            unknown_lineage: UnknownLineage::Mask,
            masked_predicates: MaskedPredicates::Equality,
        }
    }
}

fn deny() -> Action {
    Action::Deny
}
fn allow() -> Action {
    Action::Allow
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

/// One problem with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Where, as a path: `rules[1].action`.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.path.is_empty(), self.line) {
            (false, Some(l)) => write!(f, "line {l}: {}: {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// All the problems with a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl std::fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        writeln!(f, "policy document is invalid ({n} error{}):", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The largest document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// PostgreSQL keeps the first 63 bytes of a name (`NAMEDATALEN - 1`) and drops the rest.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Parse and validate a YAML policy document.
pub fn parse(yaml: &str) -> Result<PolicyDocument, ValidationErrors> {
    if yaml.len() > MAX_DOCUMENT_BYTES {
        return Err(ValidationErrors(vec![ValidationError {
            path: String::new(),
            line: None,
            message: format!("document is {} bytes; the limit is {MAX_DOCUMENT_BYTES}", yaml.len()),
        }]));
    }
    let doc: PolicyDocument = if yaml.trim().is_empty() {
        PolicyDocument::default()
    } else {
        serde_yaml::from_str(yaml).map_err(|e| {
            let line = e.location().map(|l| l.line());
            let msg = e.to_string();
            // serde_yaml prefixes the path: "rules[0].action: unknown variant ..."; strip its
            // trailing " at line N column M" since we report the line ourselves.
            let msg = match msg.find(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            let (path, message) = match msg.split_once(": ") {
                Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
                _ => (String::new(), msg),
            };
            ValidationErrors(vec![ValidationError { path, line, message }])
        })?
    };
    let mut errors = Vec::new();
    validate(&doc, &mut |path: String, message: String| errors.push((path, message)));
    if errors.is_empty() {
        return Ok(doc);
    }
    let lines = crate::policy::locate::Locator::new(yaml);
    Err(ValidationErrors(
        errors
            .into_iter()
            .map(|(path, message)| ValidationError { line: lines.line_of(&path), path, message })
            .collect(),
    ))
}

fn validate(doc: &PolicyDocument, err: &mut dyn FnMut(String, String)) {
    let mut names = HashSet::new();
    for (i, c) in doc.connections.iter().enumerate() {
        let p = format!("connections[{i}]");
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch)) {
            err(format!("{p}.name"), format!("`{}` is not a valid name (letters, digits, _ - .)", c.name));
        }
        if !names.insert(c.name.as_str()) {
            err(format!("{p}.name"), format!("connection `{}` is defined twice", c.name));
        }
        if c.kind != ConnectionKind::Postgres {
            err(format!("{p}.kind"), "only `postgres` connections are supported by this version".into());
        }
        if c.upstream.host.is_empty() {
            err(format!("{p}.upstream.host"), "must not be empty".into());
        }
        if c.upstream.port == 0 {
            err(format!("{p}.upstream.port"), "must be 1-65535".into());
        }
        if let Some(socket) = c.upstream.unix_socket()
            && matches!(c.upstream.tls, TlsMode::Require | TlsMode::VerifyFull)
        {
            err(
                format!("{p}.upstream.tls"),
                format!(
                    "tls: {} cannot be had over a Unix-domain socket ({socket}); it never leaves the host, \
                     so use tls: disable, or a host name to reach the target over TCP",
                    c.upstream.tls.as_str()
                ),
            );
        }
        match (c.upstream.tls, &c.upstream.ca_file) {
            (TlsMode::VerifyFull, None) => err(
                format!("{p}.upstream.ca_file"),
                "tls: verify-full needs ca_file, the CA certificates (PEM) that signed the target's certificate"
                    .into(),
            ),
            (TlsMode::VerifyFull, Some(f)) if f.trim().is_empty() => {
                err(format!("{p}.upstream.ca_file"), "must not be empty".into())
            }
            (TlsMode::VerifyFull, Some(_)) | (_, None) => {}
            (mode, Some(_)) => err(
                format!("{p}.upstream.ca_file"),
                format!("is only used with tls: verify-full (this connection has tls: {})", mode.as_str()),
            ),
        }
        if c.credentials.user.is_empty() {
            err(format!("{p}.credentials.user"), "must not be empty".into());
        }
        match (&c.credentials.password_env, &c.credentials.password_file) {
            (Some(_), Some(_)) => {
                err(format!("{p}.credentials"), "set one of password_env or password_file, not both".into())
            }
            (None, None) => err(
                format!("{p}.credentials"),
                "set password_env or password_file (passwords are never written in the policy)".into(),
            ),
            _ => {}
        }
    }
    let group_names = validate_approver_groups(&doc.approver_groups, err);
    let mut rule_names = HashSet::new();
    for (i, r) in doc.rules.iter().enumerate() {
        let p = format!("rules[{i}]");
        if r.name.trim().is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        }
        if !rule_names.insert(r.name.as_str()) {
            err(format!("{p}.name"), format!("rule `{}` is defined twice", r.name));
        }
        for (j, c) in r.connections.iter().enumerate() {
            if !names.contains(c.as_str()) {
                err(format!("{p}.connections[{j}]"), format!("unknown connection `{c}`"));
            }
        }
        for (j, t) in r.matches.tables.iter().enumerate() {
            if t.is_empty() || t.split('.').any(str::is_empty) {
                err(format!("{p}.match.tables[{j}]"), format!("`{t}` is not a table name"));
            } else if t.contains('"') {
                err(
                    format!("{p}.match.tables[{j}]"),
                    format!(
                        "`{t}`: write the name as PostgreSQL stores it, without quotes (`Users` for a table created as \"Users\"); deny and hold rules match names whatever their case"
                    ),
                );
            } else if t.split('.').any(|part| part.trim() != part) {
                err(
                    format!("{p}.match.tables[{j}]"),
                    format!("`{t}`: a name with spaces before or after it names no table you meant"),
                );
            } else if t.split('.').count() > 2 {
                err(
                    format!("{p}.match.tables[{j}]"),
                    format!(
                        "`{t}`: name a table as `table` or `schema.table` (the connection names the database)"
                    ),
                );
            } else if let Some(long) = t.split('.').find(|part| part.len() > MAX_IDENTIFIER_BYTES) {
                err(
                    format!("{p}.match.tables[{j}]"),
                    format!(
                        "`{long}` is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte names, so it names no table"
                    ),
                );
            }
        }
        if r.action != Action::Hold {
            if r.approvers.is_some() {
                err(format!("{p}.approvers"), "only a hold rule has approvers".into());
            }
            if r.timeout.is_some() {
                err(format!("{p}.timeout"), "only a hold rule has a timeout".into());
            }
            if r.slack.is_some() {
                err(format!("{p}.slack"), "only a hold rule is posted to Slack".into());
            }
            if r.webhook.is_some() {
                err(format!("{p}.webhook"), "only a hold rule has a webhook".into());
            }
            if r.grant.is_some() {
                err(format!("{p}.grant"), "only a hold rule grants access".into());
            }
        }
        if let Some(s) = &r.slack
            && s.channel.trim().is_empty()
        {
            err(format!("{p}.slack.channel"), "must not be empty".into());
        }
        if let Some(w) = &r.webhook
            && (w.is_empty() || !w.chars().all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch)))
        {
            err(
                format!("{p}.webhook"),
                format!("`{w}` is not a valid webhook name (letters, digits, _ - .)"),
            );
        }
        if let Some(g) = &r.grant
            && (g.max < Duration::from_secs(60) || g.max > Duration::from_secs(30 * 24 * 3600))
        {
            err(format!("{p}.grant.max"), "must be between 1m and 30d".into());
        }
        if let Some(a) = &r.approvers
            && a.min == 0
        {
            err(format!("{p}.approvers.min"), "must be at least 1".into());
        }
        if let Some(a) = &r.approvers
            && !group_names.is_empty()
        {
            for (j, g) in a.groups.iter().enumerate() {
                if !group_names.contains(g.as_str()) {
                    err(
                        format!("{p}.approvers.groups[{j}]"),
                        format!("unknown approver group `{g}` (not defined in approver_groups)"),
                    );
                }
            }
        }
        if let Some(t) = r.timeout
            && (t.is_zero() || t > Duration::from_secs(7 * 24 * 3600))
        {
            err(format!("{p}.timeout"), "must be between 1s and 7d".into());
        }
    }
    for (i, m) in doc.masking.iter().enumerate() {
        let p = format!("masking[{i}]");
        for (j, c) in m.connections.iter().enumerate() {
            if !names.contains(c.as_str()) {
                err(format!("{p}.connections[{j}]"), format!("unknown connection `{c}`"));
            }
        }
        for (j, c) in m.columns.iter().enumerate() {
            if let Err(e) = ColumnPattern::parse(c) {
                err(format!("{p}.columns[{j}]"), e);
            }
        }
        for (j, d) in m.detectors.iter().enumerate() {
            if let Err(e) = d.parse::<masking::detect::Detector>() {
                err(format!("{p}.detectors[{j}]"), e.to_string());
            }
        }
        if let Some(s) = &m.strategy
            && let Err(e) = masking::strategy::Strategy::parse(s)
        {
            err(format!("{p}.strategy"), e.to_string());
        }
        if m.columns.is_empty() && m.detectors.is_empty() {
            err(p, "masks nothing: list columns, detectors, or both".into());
        }
    }
    let mut sa_names = HashSet::new();
    let mut key_owners = std::collections::HashMap::new();
    for (i, s) in doc.service_accounts.iter().enumerate() {
        let p = format!("service_accounts[{i}]");
        if s.name.is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        }
        if !sa_names.insert(s.name.as_str()) {
            err(format!("{p}.name"), format!("service account `{}` is defined twice", s.name));
        }
        if s.api_key_sha256.len() != 64 || !s.api_key_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            err(format!("{p}.api_key_sha256"), "must be 64 hex characters (a SHA-256)".into());
        } else if let Some(first) = key_owners.insert(s.api_key_sha256.to_ascii_lowercase(), s.name.as_str())
        {
            // One key would log in as whichever account comes first.
            err(
                format!("{p}.api_key_sha256"),
                format!("the same key as service account `{first}`: each account needs its own key"),
            );
        }
    }
}

/// Check `approver_groups` and return the names it defines.
fn validate_approver_groups<'a>(
    groups: &'a [ApproverGroup],
    err: &mut dyn FnMut(String, String),
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        let p = format!("approver_groups[{i}]");
        if g.name.is_empty() || !g.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "_-.".contains(ch)) {
            err(
                format!("{p}.name"),
                format!("`{}` is not a valid group name (letters, digits, _ - .)", g.name),
            );
        }
        if !names.insert(g.name.as_str()) {
            err(format!("{p}.name"), format!("approver group `{}` is defined twice", g.name));
        }
        let mut seen = HashSet::new();
        for (j, m) in g.members.iter().enumerate() {
            if m.trim().is_empty() || m.trim() != m || m.chars().any(char::is_control) {
                err(
                    format!("{p}.members[{j}]"),
                    format!(
                        "`{m}` is not an OIDC subject or e-mail (empty, padded or with control characters)"
                    ),
                );
            } else if !seen.insert(m.to_ascii_lowercase()) {
                err(format!("{p}.members[{j}]"), format!("`{m}` is listed twice"));
            }
        }
        let mut seen = HashSet::new();
        for (j, u) in g.slack_users.iter().enumerate() {
            let well_formed = u.len() >= 2
                && (u.starts_with('U') || u.starts_with('W'))
                && u.chars().all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit());
            if !well_formed {
                err(
                    format!("{p}.slack_users[{j}]"),
                    format!(
                        "`{u}` is not a Slack user id (like U012AB3CD: U or W, then capitals and digits)"
                    ),
                );
            } else if !seen.insert(u.as_str()) {
                err(format!("{p}.slack_users[{j}]"), format!("`{u}` is listed twice"));
            }
        }
    }
    names
}

pub mod locate {
    //! Maps a field path (`rules[1].connections[0]`) to its line in the YAML source.

    use std::collections::HashMap;

    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::Marker;

    pub struct Locator {
        lines: HashMap<String, usize>,
    }

    enum Frame {
        Map { path: String, key: Option<String> },
        Seq { path: String, index: usize },
    }

    struct Recv {
        stack: Vec<Frame>,
        lines: HashMap<String, usize>,
    }

    impl Recv {
        /// The path of the value that starts now, advancing the parent.
        fn next_value_path(&mut self) -> Option<String> {
            match self.stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
                Some(Frame::Seq { path, index }) => {
                    let p = format!("{path}[{index}]");
                    *index += 1;
                    Some(p)
                }
            }
        }
    }

    fn join(path: &str, key: &str) -> String {
        if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
    }

    impl MarkedEventReceiver for Recv {
        fn on_event(&mut self, ev: Event, mark: Marker) {
            let line = mark.line();
            match ev {
                Event::Scalar(value, ..) => {
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut()
                        && key.is_none()
                    {
                        *key = Some(value);
                        return;
                    }
                    if let Some(p) = self.next_value_path() {
                        self.lines.entry(p).or_insert(line);
                    }
                }
                Event::MappingStart(..) => {
                    let p = self.next_value_path().unwrap_or_default();
                    self.lines.entry(p.clone()).or_insert(line);
                    self.stack.push(Frame::Map { path: p, key: None });
                }
                Event::SequenceStart(..) => {
                    let p = self.next_value_path().unwrap_or_default();
                    self.lines.entry(p.clone()).or_insert(line);
                    self.stack.push(Frame::Seq { path: p, index: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    self.stack.pop();
                }
                Event::Alias(_) => {
                    self.next_value_path();
                }
                _ => {}
            }
        }
    }

    impl Locator {
        pub fn new(yaml: &str) -> Self {
            let mut recv = Recv { stack: Vec::new(), lines: HashMap::new() };
            let mut parser = Parser::new_from_str(yaml);
            // A document that serde_yaml accepted parses here too; if not, we simply know fewer lines.
            let _ = parser.load(&mut recv, false);
            Self { lines: recv.lines }
        }

        /// The line of `path`, or of its nearest ancestor that is in the source.
        pub fn line_of(&self, path: &str) -> Option<usize> {
            let mut p = path.to_string();
            loop {
                if let Some(l) = self.lines.get(&p) {
                    return Some(*l);
                }
                let cut = p.rfind(['.', '['])?;
                p.truncate(cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
connections:
  - name: shop
    kind: postgres
    upstream: { host: 127.0.0.1, port: 5432, database: shop, tls: prefer }
    credentials: { user: airlock_svc, password_env: SHOP_DB_PASSWORD }
rules:
  - name: writes-need-approval
    connections: [shop]
    principals: { groups: [agents] }
    match: { operations: [delete, update, truncate, drop, alter], tables: [orders, users] }
    action: hold
    approvers: { groups: [dba], min: 1 }
    timeout: 5m
  - name: no-ddl-for-agents
    match: { operations: [create, drop, alter, grant] }
    action: deny
defaults: { unparsed: deny, unknown_operation: hold }
"#;

    #[test]
    fn design_example_parses() {
        let doc = parse(GOOD).expect("valid");
        assert_eq!(doc.connections[0].name, "shop");
        assert_eq!(doc.rules[0].hold_timeout(), Duration::from_secs(300));
        assert_eq!(doc.rules[1].action, Action::Deny);
        assert_eq!(doc.defaults.no_match, Action::Allow);
    }

    #[test]
    fn shape_error_names_field_and_line() {
        let bad = GOOD.replace("action: deny", "action: dney");
        let e = parse(&bad).expect_err("invalid");
        let e = &e.0[0];
        assert_eq!(e.path, "rules[1].action");
        assert_eq!(e.line, Some(17));
        assert!(e.message.contains("dney"), "{}", e.message);
    }

    #[test]
    fn table_patterns_that_can_name_no_table_are_rejected() {
        let long = "t".repeat(MAX_IDENTIFIER_BYTES + 1);
        for (pattern, says) in [
            ("shop.public.orders", "the connection names the database"),
            ("public..orders", "is not a table name"),
            (long.as_str(), "63-byte names"),
        ] {
            let bad = GOOD.replace("tables: [orders, users]", &format!("tables: [orders, \"{pattern}\"]"));
            let e = parse(&bad).expect_err(pattern);
            assert_eq!(e.0[0].path, "rules[0].match.tables[1]", "{pattern}");
            assert!(e.to_string().contains(says), "{pattern}: {e}");
        }
        // Quoted or padded, a name would match nothing: a deny rule that silently does nothing.
        for (pattern, says) in [
            ("\"Users\"", "without quotes"),
            ("public.\"Users\"", "without quotes"),
            (" orders", "spaces before or after"),
            ("public. orders", "spaces before or after"),
            ("orders ", "spaces before or after"),
        ] {
            let bad = GOOD.replace("tables: [orders, users]", &format!("tables: [orders, '{pattern}']"));
            let e = parse(&bad).expect_err(pattern);
            assert_eq!(e.0[0].path, "rules[0].match.tables[1]", "{pattern}");
            assert!(e.to_string().contains(says), "{pattern}: {e}");
        }
        let fine = "t".repeat(MAX_IDENTIFIER_BYTES);
        parse(
            &GOOD.replace(
                "tables: [orders, users]",
                &format!("tables: [public.{fine}, \"User\", 'my table']"),
            ),
        )
        .expect("valid");
    }

    #[test]
    fn two_service_accounts_may_not_share_a_key() {
        let key = "ab".repeat(32);
        let doc = format!(
            "{GOOD}service_accounts:\n  - {{ name: a, api_key_sha256: {key} }}\n  - {{ name: b, api_key_sha256: {} }}\n",
            key.to_uppercase()
        );
        let e = parse(&doc).expect_err("shared key");
        assert_eq!(e.0[0].path, "service_accounts[1].api_key_sha256");
        assert!(e.to_string().contains("the same key as service account `a`"), "{e}");
        parse(&doc.replace(&key.to_uppercase(), &"cd".repeat(32))).expect("own keys");
    }

    #[test]
    fn unknown_field_is_rejected_with_line() {
        let bad = GOOD.replace("    action: deny", "    actoin: deny");
        let e = parse(&bad).expect_err("invalid");
        assert_eq!(e.0[0].line, Some(17));
        assert!(e.0[0].message.contains("actoin"), "{}", e.0[0].message);
    }

    #[test]
    fn meaning_error_names_field_and_line() {
        let bad = GOOD.replace("connections: [shop]", "connections: [shp]");
        let e = parse(&bad).expect_err("invalid");
        assert_eq!(e.0[0].path, "rules[0].connections[0]");
        assert_eq!(e.0[0].line, Some(9));
        assert!(e.to_string().contains("line 9: rules[0].connections[0]: unknown connection `shp`"), "{e}");
    }

    #[test]
    fn verify_full_needs_a_ca_file_and_only_it_takes_one() {
        let full = GOOD.replace("tls: prefer", "tls: verify-full, ca_file: /etc/airlock/db-ca.pem");
        let doc = parse(&full).expect("valid");
        assert_eq!(doc.connections[0].upstream.ca_file.as_deref(), Some("/etc/airlock/db-ca.pem"));
        let e = parse(&GOOD.replace("tls: prefer", "tls: verify-full")).expect_err("invalid");
        assert_eq!(e.0[0].path, "connections[0].upstream.ca_file");
        assert!(e.0[0].message.contains("verify-full needs ca_file"), "{e}");
        let e = parse(&GOOD.replace("tls: prefer", "tls: require, ca_file: /ca.pem")).expect_err("invalid");
        assert!(
            e.0[0].message.contains("only used with tls: verify-full (this connection has tls: require)"),
            "{e}"
        );
    }

    const GROUPS: &str = "approver_groups:\n  - name: dba\n    members: [alice@example.com, oidc-subject-123]\n    \
                          slack_users: [U012345]\n  - name: sre\n";

    #[test]
    fn approver_groups_parse_and_list_their_members() {
        let doc = parse(&format!("{GOOD}{GROUPS}")).expect("valid");
        assert_eq!(doc.approver_groups.len(), 2);
        let dba = |who: ApproverIdentity<'_>| doc.approver_groups_of(&who) == vec!["dba".to_string()];
        assert!(dba(ApproverIdentity { subject: Some("oidc-subject-123"), ..Default::default() }));
        assert!(dba(ApproverIdentity { email: Some("Alice@Example.com"), ..Default::default() }));
        assert!(dba(ApproverIdentity { slack_user: Some("U012345"), ..Default::default() }));
        let nobody = |who: ApproverIdentity<'_>| doc.approver_groups_of(&who).is_empty();
        assert!(nobody(ApproverIdentity {
            subject: Some("mallory"),
            email: Some("m@example.com"),
            slack_user: Some("U9")
        }));
        assert!(
            nobody(ApproverIdentity { email: Some("oidc-subject-123"), ..Default::default() }),
            "e-mails only"
        );
        assert!(nobody(ApproverIdentity { subject: Some(""), email: Some(""), slack_user: Some("") }));
        assert!(nobody(ApproverIdentity::default()));
    }

    #[test]
    fn the_deploy_example_parses() {
        let doc = parse(include_str!("../../deploy/policy.example.yaml")).expect("valid");
        assert_eq!(doc.approver_groups[0].name, "dba");
    }

    #[test]
    fn without_approver_groups_rules_may_name_any_group() {
        let doc = parse(GOOD).expect("valid: the section is optional");
        assert!(doc.approver_groups.is_empty());
    }

    #[test]
    fn with_approver_groups_rules_must_name_defined_groups() {
        let yaml = format!("{GOOD}{GROUPS}").replace("groups: [dba], min: 1", "groups: [dba, dbas], min: 1");
        let e = parse(&yaml).expect_err("dbas is not defined");
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].path, "rules[0].approvers.groups[1]");
        assert_eq!(e.0[0].line, Some(13));
        assert!(
            e.to_string().contains("line 13: rules[0].approvers.groups[1]: unknown approver group `dbas`"),
            "{e}"
        );
    }

    #[test]
    fn approver_group_mistakes_name_field_and_line() {
        let yaml = format!(
            "{GOOD}approver_groups:\n  - name: dba\n    members: [a@example.com, A@example.com, \"\"]\n    \
             slack_users: [alice, U1, U1]\n  - name: dba\n  - name: \"no spaces\"\n    membres: [x]\n"
        );
        let e = parse(&yaml).expect_err("invalid");
        // An unknown field is a shape error, reported alone.
        assert_eq!(e.0[0].path, "approver_groups[2]", "{e}");
        assert!(e.0[0].message.contains("membres"), "{e}");
        let yaml = yaml.replace("    membres: [x]\n", "");
        let e = parse(&yaml).expect_err("invalid");
        let got: Vec<(&str, Option<usize>)> = e.0.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("approver_groups[0].members[1]", Some(21)),
                ("approver_groups[0].members[2]", Some(21)),
                ("approver_groups[0].slack_users[0]", Some(22)),
                ("approver_groups[0].slack_users[2]", Some(22)),
                ("approver_groups[1].name", Some(23)),
                ("approver_groups[2].name", Some(24)),
            ],
            "{e}"
        );
        assert!(e.to_string().contains("approver group `dba` is defined twice"), "{e}");
    }

    #[test]
    fn every_meaning_error_is_reported() {
        let bad =
            GOOD.replace("password_env: SHOP_DB_PASSWORD", "password: hunter2").replace("min: 1", "min: 0");
        // `password` is not a field: the shape error comes first and alone.
        let e = parse(&bad).expect_err("invalid");
        assert!(e.0[0].message.contains("password"), "{e}");
        let bad =
            GOOD.replace("min: 1", "min: 0").replace("name: no-ddl-for-agents", "name: writes-need-approval");
        let e = parse(&bad).expect_err("invalid");
        assert_eq!(e.0.len(), 2, "{e}");
    }

    #[test]
    fn a_unix_socket_host_is_read_as_libpq_reads_it_and_refuses_tls() {
        let on_socket = |tls: &str| {
            GOOD.replace("host: 127.0.0.1, port: 5432", "host: /run/pg/, port: 5433")
                .replace("tls: prefer", tls)
        };
        for tls in ["tls: prefer", "tls: disable"] {
            let doc = parse(&on_socket(tls)).expect("a socket with prefer or disable is valid");
            assert_eq!(doc.connections[0].upstream.unix_socket().as_deref(), Some("/run/pg/.s.PGSQL.5433"));
        }
        for tls in ["tls: require", "tls: verify-full, ca_file: /etc/ca.pem"] {
            let e = parse(&on_socket(tls)).expect_err("TLS cannot be had over a socket");
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].path, "connections[0].upstream.tls", "{e}");
            assert!(e.0[0].message.contains("Unix-domain socket (/run/pg/.s.PGSQL.5433)"), "{e}");
        }
        let doc = parse(GOOD).expect("valid");
        assert_eq!(doc.connections[0].upstream.unix_socket(), None, "a host name is TCP");
    }

    #[test]
    fn garbage_never_panics() {
        for s in ["", "{", "- - -", "connections: 5", "\u{0}\u{1}", "rules: [{name: x}]", "a: &a [*a]", ":"] {
            let _ = parse(s);
        }
        assert!(parse("{").is_err());
        assert!(parse("rules: [{name: x}]").is_err());
    }

    /// Valid documents broken at random (bytes cut out, YAML syntax put in, lines repeated or
    /// swapped, the text cut short) are accepted or refused with a message, never a panic; deep
    /// nesting and alias bombs are refused quickly.
    #[test]
    fn mutated_documents_are_refused_with_a_message_never_a_panic() {
        const PIECES: &[&str] = &[
            ":",
            "- ",
            "[",
            "]",
            "{",
            "}",
            "&a ",
            "*a",
            "!!binary ",
            "!<tag:x> ",
            "|",
            ">",
            "'",
            "\"",
            "\n",
            "\t",
            "#",
            "%YAML 1.1\n",
            "---\n",
            "...\n",
            "? ",
            "\u{feff}",
            "\u{0}",
            "99999999999999999999999",
            "-1",
            "1e309",
            "~",
            ".inf",
            "\\",
            "<<: *a\n",
            "  ",
            "\u{2028}",
            "é",
        ];
        let seeds = [GOOD, include_str!("../../deploy/policy.example.yaml")];
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut next = |n: usize| rng.random_range(0..n);
        let (mut refused, mut accepted) = (0, 0);
        for _ in 0..3000 {
            let mut doc: Vec<char> = seeds[next(seeds.len())].chars().collect();
            for _ in 0..=next(3) {
                let at = next(doc.len() + 1);
                match next(5) {
                    0 => drop(doc.drain(at..(at + next(20)).min(doc.len()))),
                    1 | 2 => doc.splice(at..at, PIECES[next(PIECES.len())].chars()).for_each(drop),
                    3 => doc.truncate(at),
                    _ => {
                        let text: String = doc.iter().collect();
                        let mut lines: Vec<&str> = text.lines().collect();
                        if lines.is_empty() {
                            continue;
                        }
                        let (i, j) = (next(lines.len()), next(lines.len()));
                        lines.swap(i, j);
                        lines.insert(j, lines[i]);
                        doc = lines.join("\n").chars().collect();
                    }
                }
            }
            match parse(&doc.iter().collect::<String>()) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused += 1;
                    assert!(!e.0.is_empty() && e.0.iter().all(|v| !v.message.is_empty()), "{e:?}");
                }
            }
        }
        assert!(refused > 1000 && accepted > 0, "{refused} refused, {accepted} accepted");
        let started = std::time::Instant::now();
        assert!(parse(&format!("rules: {}", "[".repeat(50_000))).is_err());
        assert!(parse(&format!("rules: {}", "- ".repeat(50_000))).is_err());
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"].windows(2).map(|w| (w[0], w[1])) {
            bomb += &format!("{name}: &{name} [{}]\n", vec![format!("*{prev}"); 10].join(", "));
        }
        assert!(parse(&format!("{bomb}connections: *h\n")).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[test]
    fn slack_webhook_and_grant_parse_on_hold_rules() {
        let doc = GOOD.replace(
            "    timeout: 5m\n",
            "    timeout: 5m\n    slack: { channel: \"#dba\" }\n    webhook: pager\n    grant: { max: 8h }\n",
        );
        let doc = parse(&doc).expect("valid");
        let r = &doc.rules[0];
        assert_eq!(r.slack.as_ref().map(|s| s.channel.as_str()), Some("#dba"));
        assert_eq!(r.webhook.as_deref(), Some("pager"));
        assert_eq!(r.grant.as_ref().map(|g| g.max), Some(Duration::from_secs(8 * 3600)));
        assert!(doc.rules[1].slack.is_none() && doc.rules[1].grant.is_none());
    }

    #[test]
    fn slack_webhook_and_grant_errors_name_field_and_line() {
        let bad = GOOD.replace("    action: deny\n", "    action: deny\n    webhook: pager\n");
        let e = parse(&bad).expect_err("webhook on a deny rule");
        assert_eq!(e.0[0].path, "rules[1].webhook");
        assert_eq!(e.0[0].line, Some(18));
        let bad = GOOD.replace("    timeout: 5m\n", "    timeout: 5m\n    grant: { max: 10s }\n");
        let e = parse(&bad).expect_err("grant too short");
        assert!(e.to_string().contains("line 15: rules[0].grant.max"), "{e}");
        let bad = GOOD.replace("    timeout: 5m\n", "    timeout: 5m\n    slack: { chanel: x }\n");
        let e = parse(&bad).expect_err("typo");
        assert!(e.0[0].message.contains("chanel"), "{e}");
    }

    #[test]
    fn design_masking_example_parses() {
        let doc = format!(
            "{GOOD}masking:\n  - connections: [shop]\n    columns: [users.email, users.phone, customers.*]\n    \
             detectors: [email, credit_card, phone, iban, ssn]\n    strategy: redact\n"
        );
        let doc = parse(&doc).expect("valid");
        assert_eq!(doc.masking[0].columns.len(), 3);
        assert_eq!(doc.defaults.unknown_lineage, UnknownLineage::Mask);
        assert_eq!(doc.defaults.masked_predicates, MaskedPredicates::Equality);
    }

    #[test]
    fn masked_predicates_parse_and_typos_are_named() {
        for (value, want) in [
            ("deny", MaskedPredicates::Deny),
            ("equality", MaskedPredicates::Equality),
            ("allow", MaskedPredicates::Allow),
        ] {
            let doc = GOOD.replace(
                "unknown_operation: hold }",
                &format!("unknown_operation: hold, masked_predicates: {value} }}"),
            );
            let doc = parse(&doc).expect("valid");
            assert_eq!(doc.defaults.masked_predicates, want);
            assert_eq!(want.to_string(), value);
        }
        let bad =
            GOOD.replace("unknown_operation: hold }", "unknown_operation: hold, masked_predicates: equal }");
        let e = parse(&bad).expect_err("typo");
        assert!(e.to_string().contains("masked_predicates"), "{e}");
    }

    #[test]
    fn masking_mistakes_are_named() {
        let doc = format!(
            "{GOOD}masking:\n  - connections: [nope]\n    columns: [email, a.b.c.d, '\"x.y']\n    \
             detectors: [emails]\n    strategy: shred\n  - strategy: hash\n"
        );
        let e = parse(&doc).expect_err("invalid");
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "masking[0].connections[0]",
            "masking[0].columns[0]",
            "masking[0].columns[1]",
            "masking[0].columns[2]",
            "masking[0].detectors[0]",
            "masking[0].strategy",
            "masking[1]",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        assert!(e.0.iter().all(|e| e.line.is_some()), "{e}");
    }

    #[test]
    fn column_patterns_fold_like_postgres() {
        let p = ColumnPattern::parse("Users.EMAIL").expect("valid");
        assert_eq!((p.schema, p.table.as_str(), p.column.as_deref()), (None, "users", Some("email")));
        let p = ColumnPattern::parse(r#"crm."Contacts"."E.Mail""#).expect("valid");
        assert_eq!(p.schema.as_deref(), Some("crm"));
        assert_eq!((p.table.as_str(), p.column.as_deref()), ("Contacts", Some("E.Mail")));
        let star = ColumnPattern::parse("public.customers.*").expect("valid");
        assert!(star.covers(Some("public"), "customers", Some("anything")));
        assert!(star.covers(None, "customers", Some("anything")));
        assert!(!star.covers(Some("other"), "customers", Some("anything")));
        let email = ColumnPattern::parse("users.email").expect("valid");
        assert!(email.covers(Some("any_schema"), "users", Some("email")));
        assert!(email.covers(Some("public"), "users", None), "a whole-row reference carries the column");
        assert!(!email.covers(Some("public"), "users", Some("name")));
        assert!(!email.covers(Some("public"), "Users", Some("email")), "quoted \"Users\" is another table");
        assert!(ColumnPattern::parse("*.email").is_err());
        assert!(ColumnPattern::parse("users.").is_err());
    }
}
