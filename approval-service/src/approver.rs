//! Who an approver is: whether a caller is a known approver at all, and which person they are.
//!
//! A person reaches the service in two ways, each with its own identifiers: a REST call carries
//! an OIDC token (`sub`, maybe a verified e-mail, groups), a Slack click a Slack user id (and the
//! profile e-mail `users.info` reports). The [`Directory`] resolves either to a
//! [`Decider::Approver`] that carries every identifier known for that person (its [`Person`]),
//! joined through the `[[approvals.approvers]]` entry that names them, so that the checks on a
//! vote (never the requester, `min` distinct people) compare people, not strings.
//!
//! A caller is a **known approver** when an `[[approvals.approvers]]` entry names them (by `sub`,
//! verified e-mail or Slack user id), when a policy `approver_groups` entry lists them, or (token
//! callers) when their token's groups include a group that some hold rule's `approvers.groups`
//! or the policy's `approver_groups` names. Anyone else holding a token from the same issuer (an
//! agent, say) is not an approver: the REST API refuses them, whatever the hold.

use proto::events::Principal;
use proto::policy::ApproverIdentity;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::ApproverEntry;
use crate::hold::{Decider, Via};
use crate::routes::Routes;

/// Every identifier the service knows for one person. Two votes come from the same person when
/// their identifiers overlap; a requester is the person when its subject is one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// OIDC subjects: a token's `sub`, and the `name` of the person's `[[approvals.approvers]]`
    /// entry (which is their `sub`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// E-mail addresses, lower-cased: a token's verified `email`, a Slack profile's, an entry's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<String>,
    /// Slack user ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slack_users: Vec<String>,
}

impl Person {
    /// No identifier at all (records written before people were tracked).
    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty() && self.emails.is_empty() && self.slack_users.is_empty()
    }

    fn add(list: &mut Vec<String>, v: Option<&str>) {
        if let Some(v) = v.map(str::trim).filter(|v| !v.is_empty())
            && !list.iter().any(|x| x == v)
        {
            list.push(v.to_string());
        }
    }

    pub fn add_subject(&mut self, s: Option<&str>) {
        Self::add(&mut self.subjects, s);
    }

    pub fn add_email(&mut self, e: Option<&str>) {
        Self::add(&mut self.emails, e.map(str::to_lowercase).as_deref());
    }

    pub fn add_slack_user(&mut self, u: Option<&str>) {
        Self::add(&mut self.slack_users, u);
    }

    /// Add what an `[[approvals.approvers]]` entry says about the person.
    fn add_entry(&mut self, a: &ApproverEntry) {
        self.add_subject(Some(&a.name));
        self.add_email(a.email.as_deref());
        self.add_slack_user(a.slack_user.as_deref());
    }

    /// Is `subject` (a requester's subject, or an identity recorded by an older version) this
    /// person? Subjects compare exactly; a subject that is an e-mail address also matches the
    /// person's e-mails, case-insensitively.
    pub fn is(&self, subject: &str) -> bool {
        self.subjects.iter().any(|s| s == subject)
            || (subject.contains('@') && self.emails.iter().any(|e| e.eq_ignore_ascii_case(subject)))
            || self.slack_users.iter().any(|u| u == subject)
    }

    /// Is `email` one of this person's addresses (compared case-insensitively)?
    pub fn is_email(&self, email: &str) -> bool {
        self.emails.iter().any(|e| e.eq_ignore_ascii_case(email.trim()))
    }

    /// Do the two share any identifier?
    pub fn same_as(&self, other: &Person) -> bool {
        let any = |a: &[String], b: &[String]| a.iter().any(|x| b.contains(x));
        any(&self.subjects, &other.subjects)
            || any(&self.emails, &other.emails)
            || any(&self.slack_users, &other.slack_users)
    }

    /// Is the person's OIDC subject known? Without it, the service cannot tell them from a
    /// requester (which is known by subject only) or from their own votes made with a token.
    pub fn subject_known(&self) -> bool {
        !self.subjects.is_empty()
    }
}

/// Why a caller is not an approver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotApprover {
    /// Nothing lists the caller.
    Unknown,
    /// A policy is configured but its first version has not arrived, so group memberships are not
    /// known yet (retry).
    PolicyNotLoaded,
}

/// The configured approvers, and the lookups that turn callers into [`Decider`]s.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: Vec<ApproverEntry>,
}

impl Directory {
    pub fn new(entries: &[ApproverEntry]) -> Self {
        Self { entries: entries.to_vec() }
    }

    /// The entry with this explicit Slack user id.
    pub fn by_slack_id(&self, user: &str) -> Option<&ApproverEntry> {
        self.entries.iter().find(|a| a.slack_user.as_deref() == Some(user))
    }

    /// The entry with this e-mail (case-insensitive).
    fn by_email(&self, email: &str) -> Option<&ApproverEntry> {
        self.entries.iter().find(|a| a.email.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(email)))
    }

    /// The approver a verified OIDC token is: `principal` and its verified `email`. `Err` when the
    /// token's holder is not a known approver (see the module docs).
    pub fn by_token(
        &self,
        principal: &Principal,
        email: Option<&str>,
        routes: &Routes,
    ) -> Result<Decider, NotApprover> {
        let sub = principal.subject.as_str();
        let mut person = Person::default();
        person.add_subject(Some(sub));
        person.add_email(email);
        let mut entries: Vec<&ApproverEntry> = self.entries.iter().filter(|a| a.name == sub).collect();
        if let Some(e) = email.and_then(|e| self.by_email(e))
            && !entries.iter().any(|a| a.name == e.name)
        {
            if e.name != sub {
                warn!(
                    approver = %e.name, subject = %sub,
                    "an approvers entry has this token's verified e-mail but another name; its name should be the OIDC sub"
                );
            }
            entries.push(e);
        }
        let mut groups = principal.groups.clone();
        let mut listed = false;
        for a in &entries {
            person.add_entry(a);
            for g in &a.groups {
                if !groups.contains(g) {
                    groups.push(g.clone());
                }
            }
        }
        let mut add_policy = |who: &ApproverIdentity<'_>, groups: &mut Vec<String>| {
            for g in routes.approver_groups_of(who) {
                listed = true;
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        };
        add_policy(&ApproverIdentity { subject: Some(sub), email, slack_user: None }, &mut groups);
        for a in &entries {
            let who = ApproverIdentity {
                subject: Some(&a.name),
                email: a.email.as_deref(),
                slack_user: a.slack_user.as_deref(),
            };
            add_policy(&who, &mut groups);
        }
        let by_group = principal
            .groups
            .iter()
            .any(|g| routes.names_approver_group(g) || self.entries.iter().any(|a| a.groups.contains(g)));
        if entries.is_empty() && !listed && !by_group {
            return Err(if routes.loaded() { NotApprover::Unknown } else { NotApprover::PolicyNotLoaded });
        }
        Ok(Decider::Approver { identity: sub.to_string(), person, groups, via: Via::Oidc })
    }

    /// The approver Slack user `user` is, with the e-mail of their Slack profile if known: their
    /// `[[approvals.approvers]]` entry (by Slack user id, else by e-mail), else, if a policy
    /// `approver_groups` entry lists them, a person known by e-mail and Slack id only (recorded as
    /// the e-mail, else the user id). `None`: not a known approver.
    pub fn by_slack(&self, user: &str, email: Option<&str>, routes: &Routes) -> Option<Decider> {
        let mut person = Person::default();
        person.add_slack_user(Some(user));
        person.add_email(email);
        let entry = self.by_slack_id(user).or_else(|| email.and_then(|e| self.by_email(e)));
        if let Some(a) = entry {
            person.add_entry(a);
            let who = ApproverIdentity {
                subject: Some(&a.name),
                email: email.or(a.email.as_deref()),
                slack_user: Some(user),
            };
            let mut groups = routes.with_policy_groups(a.groups.clone(), &who);
            if let Some(e) = email
                && a.email.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case(e))
            {
                // Mapped by Slack id, with another profile e-mail: the policy may list either.
                let who = ApproverIdentity { subject: None, email: a.email.as_deref(), slack_user: None };
                groups = routes.with_policy_groups(groups, &who);
            }
            return Some(Decider::Approver { identity: a.name.clone(), person, groups, via: Via::Slack });
        }
        let who = ApproverIdentity { subject: None, email, slack_user: Some(user) };
        let groups = routes.approver_groups_of(&who);
        if groups.is_empty() {
            return None;
        }
        let identity = email.map_or_else(|| user.to_string(), str::to_string);
        Some(Decider::Approver { identity, person, groups, via: Via::Slack })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(subjects: &[&str], emails: &[&str], slack: &[&str]) -> Person {
        let mut p = Person::default();
        subjects.iter().for_each(|s| p.add_subject(Some(s)));
        emails.iter().for_each(|e| p.add_email(Some(e)));
        slack.iter().for_each(|u| p.add_slack_user(Some(u)));
        p
    }

    #[test]
    fn people_match_on_any_identifier_and_emails_ignore_case() {
        let rest = person(&["00u1alice"], &["Alice@Example.com"], &[]);
        let slack = person(&["alice"], &["alice@example.com"], &["U1"]);
        assert!(rest.same_as(&slack));
        assert!(!rest.same_as(&person(&["bob"], &["bob@example.com"], &["U2"])));
        assert!(rest.is("00u1alice") && rest.is("ALICE@example.com"));
        assert!(!rest.is("alice"), "a plain subject compares exactly");
        assert!(!Person::default().subject_known());
    }
}
