//! The policy document: connections, rules, masking, service accounts and defaults.
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
    #[serde(default)]
    pub defaults: Defaults,
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
    pub host: String,
    pub port: u16,
    /// The target database (defaults to the connection's name).
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub tls: TlsMode,
}

/// TLS to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
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

/// Masking of response values (enforced by the masking pipeline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Masking {
    #[serde(default)]
    pub connections: Vec<String>,
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub detectors: Vec<String>,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub exempt: Option<Principals>,
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
    /// A statement whose effect cannot be known. Default hold.
    #[serde(default = "hold")]
    pub unknown_operation: Action,
    /// A statement no rule matches. Default allow.
    #[serde(default = "allow")]
    pub no_match: Action,
    /// Hold timeout for holds that come from a default. Default 5m.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    pub hold_timeout: Duration,
}

impl Default for Defaults {
    fn default() -> Self {
        Self { unparsed: deny(), unknown_operation: hold(), no_match: allow(), hold_timeout: five_minutes() }
    }
}

fn deny() -> Action {
    Action::Deny
}
fn hold() -> Action {
    Action::Hold
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
            if t.is_empty() || t.split('.').count() > 3 {
                err(format!("{p}.match.tables[{j}]"), format!("`{t}` is not a table name"));
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
        if let Some(t) = r.timeout
            && (t.is_zero() || t > Duration::from_secs(7 * 24 * 3600))
        {
            err(format!("{p}.timeout"), "must be between 1s and 7d".into());
        }
    }
    for (i, _) in doc.masking.iter().enumerate() {
        err(
            format!("masking[{i}]"),
            "masking is not enforced by this version of the proxy; refusing a policy it cannot honour".into(),
        );
    }
    let mut sa_names = HashSet::new();
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
        }
    }
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
    fn garbage_never_panics() {
        for s in ["", "{", "- - -", "connections: 5", "\u{0}\u{1}", "rules: [{name: x}]", "a: &a [*a]", ":"] {
            let _ = parse(s);
        }
        assert!(parse("{").is_err());
        assert!(parse("rules: [{name: x}]").is_err());
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
    fn masking_is_refused_until_enforced() {
        let doc = format!("{GOOD}masking:\n  - columns: [users.email]\n");
        let e = parse(&doc).expect_err("masking refused");
        assert_eq!(e.0[0].path, "masking[0]");
    }
}
