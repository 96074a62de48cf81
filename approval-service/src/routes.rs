//! What the service reads from the policy: per rule, its Slack channel, its webhook and its
//! just-in-time grant limit; and the policy's `approver_groups`. The policy comes from the policy
//! store (followed over gRPC); without one, every hold goes to `slack.default_channel`, no rule
//! grants access, and approvers' groups come from their tokens and the Slack mapping only.

use std::sync::Arc;
use std::time::Duration;

use policy_store::client::ActivePolicy;
use proto::policy::ApproverIdentity;
use tokio::sync::watch;

/// The policy as the service sees it: `None` until the first version arrives.
pub type PolicyWatch = watch::Receiver<Option<Arc<ActivePolicy>>>;

/// What a hold's rule asks of the service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// Where the hold is posted in Slack.
    pub channel: Option<String>,
    /// The webhook told about it.
    pub webhook: Option<String>,
    /// Approving it grants access for up to this long.
    pub grant_max: Option<Duration>,
}

/// Looks rules up by name in the latest policy.
#[derive(Clone)]
pub struct Routes {
    policy: Option<PolicyWatch>,
    default_channel: Option<String>,
}

impl Routes {
    pub fn new(policy: Option<PolicyWatch>, default_channel: Option<String>) -> Self {
        Self { policy, default_channel }
    }

    /// Wait (up to `within`) until the first policy version is known, so holds that arrive
    /// while the service is starting still find their rule's channel and webhook.
    pub async fn ready(&self, within: Duration) {
        if let Some(p) = &self.policy {
            let mut p = p.clone();
            let _ = tokio::time::timeout(within, p.wait_for(Option::is_some)).await;
        }
    }

    /// The route of the rule named `rule` (a default such as `defaults.unknown_operation` has
    /// only the default channel).
    pub fn for_rule(&self, rule: &str) -> Route {
        let found = self.policy.as_ref().and_then(|p| {
            let p = p.borrow();
            let active = p.as_ref()?;
            active.document.rules.iter().find(|r| r.name == rule).map(|r| Route {
                channel: r.slack.as_ref().map(|s| s.channel.clone()),
                webhook: r.webhook.clone(),
                grant_max: r.grant.as_ref().map(|g| g.max),
            })
        });
        let mut route = found.unwrap_or_default();
        if route.channel.is_none() {
            route.channel.clone_from(&self.default_channel);
        }
        route
    }

    /// The groups the current policy's `approver_groups` puts this person in: none before the
    /// first version arrives, or without a policy store.
    pub fn approver_groups_of(&self, who: &ApproverIdentity<'_>) -> Vec<String> {
        self.policy
            .as_ref()
            .and_then(|p| p.borrow().as_ref().map(|active| active.document.approver_groups_of(who)))
            .unwrap_or_default()
    }

    /// Does the current policy name `group` as approvers: in a rule's `approvers.groups`, or as
    /// an `approver_groups` entry? (A token's groups make its holder an approver only through
    /// such a group; anything else in the claim, such as `agents`, does not.)
    pub fn names_approver_group(&self, group: &str) -> bool {
        self.policy.as_ref().is_some_and(|p| {
            p.borrow().as_ref().is_some_and(|active| {
                let d = &active.document;
                d.approver_groups.iter().any(|g| g.name == group)
                    || d.rules
                        .iter()
                        .any(|r| r.approvers.as_ref().is_some_and(|a| a.groups.iter().any(|g| g == group)))
            })
        })
    }

    /// Is the policy known: there is none to follow, or its first version has arrived?
    pub fn loaded(&self) -> bool {
        self.policy.as_ref().is_none_or(|p| p.borrow().is_some())
    }

    /// `groups` (from a token or the Slack mapping) plus those the policy puts `who` in.
    pub fn with_policy_groups(&self, mut groups: Vec<String>, who: &ApproverIdentity<'_>) -> Vec<String> {
        for g in self.approver_groups_of(who) {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_the_first_policy_version() {
        let (tx, rx) = watch::channel(None);
        let routes = Routes::new(Some(rx), None);
        let document =
            proto::policy::parse("rules:\n  - name: r\n    action: hold\n    slack: { channel: C9 }\n")
                .unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Some(Arc::new(ActivePolicy { version: 1, document, digest: String::new() })));
            std::future::pending::<()>().await;
        });
        assert_eq!(routes.for_rule("r").channel, None);
        routes.ready(Duration::from_secs(15)).await;
        assert_eq!(routes.for_rule("r").channel.as_deref(), Some("C9"));
        // Without a policy source there is nothing to wait for.
        Routes::new(None, None).ready(Duration::from_secs(3600)).await;
    }

    #[test]
    fn rules_route_to_their_channel_else_the_default() {
        let yaml = "rules:\n  - name: r\n    action: hold\n    slack: { channel: C9 }\n    webhook: w\n    grant: { max: 1h }\n  - name: plain\n    action: hold\n";
        let document = proto::policy::parse(yaml).unwrap();
        let (_tx, rx) =
            watch::channel(Some(Arc::new(ActivePolicy { version: 1, document, digest: String::new() })));
        let routes = Routes::new(Some(rx), Some("C0".into()));
        let r = routes.for_rule("r");
        assert_eq!(r.channel.as_deref(), Some("C9"));
        assert_eq!(r.webhook.as_deref(), Some("w"));
        assert_eq!(r.grant_max, Some(Duration::from_secs(3600)));
        assert_eq!(routes.for_rule("plain").channel.as_deref(), Some("C0"));
        assert_eq!(
            routes.for_rule("defaults.unknown_operation"),
            Route { channel: Some("C0".into()), ..Default::default() }
        );
        assert_eq!(Routes::new(None, None).for_rule("r"), Route::default());
    }

    #[test]
    fn policy_groups_add_to_token_groups() {
        let yaml = "approver_groups:\n  - name: dba\n    members: [alice@example.com, sub-1]\n    \
                    slack_users: [U1]\n  - name: sre\n    members: [sub-1]\n";
        let document = proto::policy::parse(yaml).unwrap();
        let (_tx, rx) =
            watch::channel(Some(Arc::new(ActivePolicy { version: 1, document, digest: String::new() })));
        let routes = Routes::new(Some(rx), None);
        let sub = ApproverIdentity { subject: Some("sub-1"), ..Default::default() };
        assert_eq!(routes.with_policy_groups(vec!["dba".into()], &sub), vec!["dba", "sre"]);
        let email = ApproverIdentity { email: Some("alice@example.com"), ..Default::default() };
        assert_eq!(routes.with_policy_groups(vec!["x".into()], &email), vec!["x", "dba"]);
        let slack = ApproverIdentity { slack_user: Some("U1"), ..Default::default() };
        assert_eq!(routes.approver_groups_of(&slack), vec!["dba"]);
        assert!(routes.approver_groups_of(&ApproverIdentity::default()).is_empty());
        assert!(Routes::new(None, None).approver_groups_of(&sub).is_empty());
        let (_tx, rx) = watch::channel(None);
        assert!(Routes::new(Some(rx), None).approver_groups_of(&sub).is_empty(), "no version yet");
    }

    #[test]
    fn approver_groups_are_those_rules_and_approver_groups_name() {
        let yaml = "approver_groups:\n  - name: sre\n    members: [x]\nrules:\n  - name: r\n    action: hold\n    \
                    approvers: { groups: [sre] }\n  - name: d\n    action: hold\n    approvers: { groups: [sre] }\n";
        let document = proto::policy::parse(yaml).unwrap();
        let (_tx, rx) =
            watch::channel(Some(Arc::new(ActivePolicy { version: 1, document, digest: String::new() })));
        let routes = Routes::new(Some(rx), None);
        assert!(routes.names_approver_group("sre") && routes.loaded());
        assert!(!routes.names_approver_group("agents"));
        let (_tx, rx) = watch::channel(None);
        let waiting = Routes::new(Some(rx), None);
        assert!(!waiting.loaded() && !waiting.names_approver_group("sre"));
        assert!(Routes::new(None, None).loaded());
    }
}
