//! Rule evaluation: the most restrictive decision over every access wins (deny > hold > allow).

use std::time::Duration;

use proto::events::{ApproverSpec, Decision, Principal};
use proto::policy::{Operation, PolicyDocument, Rule};

use super::classify::{Access, Classification};

/// The outcome for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The deciding rule's name, or the default that decided (`defaults.unparsed`).
    pub rule: String,
    /// Why, for the client and the record.
    pub reason: String,
    /// Set when the decision is hold.
    pub hold: Option<HoldSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldSpec {
    pub approvers: ApproverSpec,
    pub timeout: Duration,
}

fn applies(rule: &Rule, connection: &str, who: &Principal) -> bool {
    let conn_ok = rule.connections.is_empty() || rule.connections.iter().any(|c| c == connection);
    let who_ok = match &rule.principals {
        None => true,
        Some(p) => {
            (p.groups.is_empty() && p.subjects.is_empty())
                || who.in_any_group(&p.groups)
                || p.subjects.contains(&who.subject)
        }
    };
    conn_ok && who_ok
}

/// What the gateway knows of the session a statement runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// The session may have changed `search_path`: an unqualified table name may then resolve
    /// to any schema, so it no longer matches an allow rule that names a schema (deny and hold
    /// rules match unqualified names in any schema anyway).
    pub search_path_touched: bool,
}

fn matches(rule: &Rule, a: &Access, facts: SessionFacts) -> bool {
    let op_ok = rule.matches.operations.is_empty() || rule.matches.operations.contains(&a.operation);
    if !op_ok {
        return false;
    }
    let strict = rule.action == Decision::Allow && facts.search_path_touched;
    rule.matches.tables.is_empty()
        || a.table.as_ref().is_some_and(|t| {
            rule.matches.tables.iter().any(|p| {
                t.matches(p, rule.action != Decision::Allow)
                    && !(strict && t.unqualified() && p.contains('.'))
            })
        })
}

impl Verdict {
    fn from_rule(rule: &Rule, a: &Access) -> Self {
        let what = match &a.table {
            Some(t) => format!("{} on {t}", a.operation),
            None => a.operation.to_string(),
        };
        Self {
            decision: rule.action,
            rule: rule.name.clone(),
            reason: format!("{what} matched rule `{}`", rule.name),
            hold: Some(HoldSpec {
                approvers: rule.approvers.clone().unwrap_or(ApproverSpec { groups: vec![], min: 1 }),
                timeout: rule.hold_timeout(),
            })
            .filter(|_| rule.action == Decision::Hold),
        }
    }

    fn from_default(doc: &PolicyDocument, decision: Decision, name: &str, reason: String) -> Self {
        Self {
            decision,
            rule: format!("defaults.{name}"),
            reason,
            hold: (decision == Decision::Hold).then(|| HoldSpec {
                approvers: ApproverSpec { groups: vec![], min: 1 },
                timeout: doc.defaults.hold_timeout,
            }),
        }
    }
}

/// Operations that change data or schema.
const WRITES: &[Operation] = &[
    Operation::Insert,
    Operation::Update,
    Operation::Delete,
    Operation::Merge,
    Operation::Truncate,
    Operation::Create,
    Operation::Drop,
    Operation::Alter,
    Operation::Grant,
    Operation::Revoke,
    Operation::Copy,
    Operation::Call,
    Operation::Do,
];

/// Can any write by `who` on `connection` ever be allowed (or approved)? When not, the proxy
/// opens the target session read-only, so the target refuses writes the gateway missed.
pub fn may_write(doc: &PolicyDocument, connection: &str, who: &Principal) -> bool {
    let rules: Vec<&Rule> = doc.rules.iter().filter(|r| applies(r, connection, who)).collect();
    WRITES.iter().any(|op| {
        // A write to a table no table-specific rule names: only rules for every table apply.
        let denied_everywhere = rules
            .iter()
            .filter(|r| r.matches.tables.is_empty())
            .filter(|r| r.matches.operations.is_empty() || r.matches.operations.contains(op))
            .any(|r| r.action == Decision::Deny);
        if denied_everywhere {
            return false;
        }
        // Some rule, or the defaults, could let it through.
        let any_opening = rules
            .iter()
            .filter(|r| r.matches.operations.is_empty() || r.matches.operations.contains(op))
            .any(|r| r.action != Decision::Deny);
        any_opening
            || doc.defaults.no_match != Decision::Deny
            || doc.defaults.unknown_operation != Decision::Deny
    })
}

/// Decide what to do with a classified message.
pub fn evaluate(doc: &PolicyDocument, connection: &str, who: &Principal, c: &Classification) -> Verdict {
    evaluate_with_grants(doc, connection, who, c, SessionFacts::default(), &|_| None)
}

/// [`evaluate`], where a hold rule covered by an active just-in-time grant allows instead.
/// `grant(rule)` names the grant covering `rule` for this principal and connection, if any.
pub fn evaluate_with_grants(
    doc: &PolicyDocument,
    connection: &str,
    who: &Principal,
    c: &Classification,
    facts: SessionFacts,
    grant: &dyn Fn(&Rule) -> Option<String>,
) -> Verdict {
    if let Some(e) = &c.unparsed {
        return Verdict::from_default(
            doc,
            doc.defaults.unparsed,
            "unparsed",
            format!("the statement could not be parsed ({e})"),
        );
    }
    if let Some(f) = &c.denied_function {
        return Verdict {
            decision: Decision::Deny,
            rule: "builtin.dangerous-functions".into(),
            reason: format!("{f}() is never allowed through the gateway"),
            hold: None,
        };
    }
    let rules: Vec<&Rule> = doc.rules.iter().filter(|r| applies(r, connection, who)).collect();
    let mut best: Option<Verdict> = None;
    let mut consider = |v: Verdict| {
        if best.as_ref().is_none_or(|b| v.decision > b.decision) {
            best = Some(v);
        }
    };
    // A rule's verdict on an access; a hold covered by a grant allows.
    let by_rule = |r: &Rule, a: &Access| {
        let mut v = Verdict::from_rule(r, a);
        if v.decision == Decision::Hold
            && r.grant.is_some()
            && let Some(g) = grant(r)
        {
            v.decision = Decision::Allow;
            v.hold = None;
            v.reason = format!("{} (allowed by {g})", v.reason);
        }
        v
    };
    for a in &c.accesses {
        let mut matched = false;
        for r in rules.iter().filter(|r| matches(r, a, facts)) {
            matched = true;
            consider(by_rule(r, a));
        }
        if !matched {
            let what = match &a.table {
                Some(t) => format!("{} on {t}", a.operation),
                None => a.operation.to_string(),
            };
            consider(Verdict::from_default(
                doc,
                doc.defaults.no_match,
                "no_match",
                format!("no rule matched {what}"),
            ));
        }
    }
    // Tables reached through the named ones (a partition's parent, a view's base table): a
    // rule that restricts them restricts this; allow rules and defaults are for what is named.
    for a in &c.reaches {
        for r in rules.iter().filter(|r| r.action != Decision::Allow && matches(r, a, facts)) {
            consider(by_rule(r, a));
        }
    }
    if let Some(why) = c.unknown_effect() {
        consider(Verdict::from_default(doc, doc.defaults.unknown_operation, "unknown_operation", why));
    }
    best.unwrap_or_else(|| Verdict {
        decision: Decision::Allow,
        rule: "empty".into(),
        reason: "empty query".into(),
        hold: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify;

    const DOC: &str = r#"
connections:
  - name: shop
    kind: postgres
    upstream: { host: 127.0.0.1, port: 5432 }
    credentials: { user: svc, password_env: X }
  - name: other
    kind: postgres
    upstream: { host: 127.0.0.1, port: 5432 }
    credentials: { user: svc, password_env: X }
rules:
  - name: writes-need-approval
    connections: [shop]
    principals: { groups: [agents] }
    match: { operations: [delete, update, truncate, drop, alter], tables: [orders, users] }
    action: hold
    approvers: { groups: [dba], min: 1 }
    timeout: 2m
  - name: no-ddl-for-agents
    match: { operations: [create, drop, alter, grant] }
    action: deny
"#;

    fn agent() -> Principal {
        Principal { subject: "bot".into(), groups: vec!["agents".into()], kind: "oidc".into() }
    }

    fn decide(sql: &str, conn: &str, who: &Principal) -> Verdict {
        let doc = proto::policy::parse(DOC).expect("doc");
        evaluate(&doc, conn, who, &classify(sql))
    }

    #[test]
    fn reads_are_allowed_by_default() {
        assert_eq!(decide("select * from orders", "shop", &agent()).decision, Decision::Allow);
    }

    #[test]
    fn ddl_is_denied_naming_the_rule() {
        let v = decide("CREATE TABLE t (id int)", "shop", &agent());
        assert_eq!((v.decision, v.rule.as_str()), (Decision::Deny, "no-ddl-for-agents"));
    }

    #[test]
    fn most_restrictive_wins() {
        // DROP matches both the hold and the deny rule.
        let v = decide("DROP TABLE orders", "shop", &agent());
        assert_eq!(v.decision, Decision::Deny);
        // A held write hidden behind a harmless statement still holds the whole message.
        let v = decide("select 1; delete from orders where id = 1", "shop", &agent());
        assert_eq!(v.decision, Decision::Hold);
        assert_eq!(v.hold.expect("hold").timeout, Duration::from_secs(120));
    }

    #[test]
    fn rules_respect_connection_and_principal() {
        assert_eq!(decide("delete from orders", "other", &agent()).decision, Decision::Allow);
        let human = Principal { subject: "h".into(), groups: vec!["dba".into()], kind: "oidc".into() };
        assert_eq!(decide("delete from orders", "shop", &human).decision, Decision::Allow);
    }

    #[test]
    fn unparsed_and_unknown_take_their_defaults() {
        let v = decide("DELET FROM orders", "shop", &agent());
        assert_eq!((v.decision, v.rule.as_str()), (Decision::Deny, "defaults.unparsed"));
        let v = decide("select my_func()", "shop", &agent());
        assert_eq!((v.decision, v.rule.as_str()), (Decision::Deny, "defaults.unknown_operation"));
        // Sent to approvers only when the policy says so.
        let doc =
            proto::policy::parse(&format!("{DOC}defaults: {{ unknown_operation: hold }}\n")).expect("doc");
        let v = evaluate(&doc, "shop", &agent(), &classify("select my_func()"));
        assert_eq!((v.decision, v.rule.as_str()), (Decision::Hold, "defaults.unknown_operation"));
    }

    #[test]
    fn dangerous_functions_are_denied() {
        let v = decide("select pg_terminate_backend(1)", "shop", &agent());
        assert_eq!(v.decision, Decision::Deny);
    }

    #[test]
    fn read_only_sessions_are_detected() {
        let doc = proto::policy::parse(
            r#"
connections:
  - { name: shop, kind: postgres, upstream: { host: h, port: 1 }, credentials: { user: u, password_env: X } }
rules:
  - { name: agents-read-only, principals: { groups: [agents] }, match: { operations: [insert, update, delete, merge, truncate, create, drop, alter, grant, revoke, copy, call, do] }, action: deny }
"#,
        )
        .expect("doc");
        assert!(!may_write(&doc, "shop", &agent()));
        let human = Principal { subject: "h".into(), groups: vec!["dba".into()], kind: "oidc".into() };
        assert!(may_write(&doc, "shop", &human));
        let doc = proto::policy::parse(DOC).expect("doc");
        assert!(may_write(&doc, "shop", &agent()), "holds can be approved, so writes are possible");
    }

    #[test]
    fn allow_rule_on_one_table_cannot_launder_a_write_to_another() {
        let doc = proto::policy::parse(
            r#"
connections:
  - { name: shop, kind: postgres, upstream: { host: h, port: 1 }, credentials: { user: u, password_env: X } }
rules:
  - { name: scratch-writes, match: { operations: [update, select], tables: [scratch] }, action: allow }
defaults: { no_match: deny }
"#,
        )
        .expect("doc");
        let v = evaluate(&doc, "shop", &agent(), &classify("UPDATE orders SET x = 1 FROM scratch"));
        assert_eq!(v.decision, Decision::Deny, "{v:?}");
        let v = evaluate(&doc, "shop", &agent(), &classify("UPDATE scratch SET x = 1"));
        assert_eq!(v.decision, Decision::Allow, "{v:?}");
    }
}
