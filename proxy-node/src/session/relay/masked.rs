//! Masking in the relay: deciding, with the target's catalog and the statement's lineage, which
//! result columns are masked, and rewriting every message that carries data toward the client.
//!
//! - A result column with an origin in its RowDescription (a plain column reference, through
//!   aliases, `*`, subqueries and views) is masked if the origin is covered by a masking
//!   pattern; a view's column is followed to the base columns of the view's definition.
//! - A computed column (no origin) is masked if any column it derives from is masked, per
//!   `masking::lineage`; when the lineage cannot line up with the result, if the statement
//!   references any masked column; when the statement cannot be analysed at all, always.
//! - Detectors run on every value of every other column.
//! - A value that cannot be masked ends the session: the client never gets the raw value.
//! - A masked column that would choose rows (`WHERE email LIKE 'a%'`, `ORDER BY email`, …)
//!   rather than be returned refuses the statement before it runs, as
//!   `defaults.masked_predicates` says: the rows would tell what the values hide.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use masking::lineage::lineage_sql;
use proto::policy::MaskedPredicates;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{
    ColumnRef, Expect, Field, Frame, Lineage, Masker, Output, Relay, Rules, SessionError, mask, sqlstate,
};
use crate::catalog::Reach;
use crate::mask::{CsvShape, RowPlan};

/// The last RowDescription planned from column origins alone (see
/// [`Relay::plan_described`]).
pub(super) struct PlanMemo {
    rules: Arc<Rules>,
    derived: crate::catalog::Derived,
    body: Bytes,
    plan: Arc<RowPlan>,
    described: Option<Bytes>,
}

/// Views are followed this deep at most; deeper counts as masked.
const MAX_VIEW_DEPTH: u8 = 8;

impl Relay<'_> {
    /// Recompile the session's masking rules when the policy version changed.
    pub(super) fn refresh_rules(&mut self, policy: &policy_store::client::ActivePolicy) {
        if self.rules_version == Some(policy.version) {
            return;
        }
        self.rules = Rules::compile(
            &policy.document,
            &self.s.conn.name,
            &self.s.principal,
            &self.s.shared.masking_key,
        )
        .map(Arc::new);
        self.rules_version = Some(policy.version);
    }

    /// The statement and parameters as events and approvers see them: detectors applied. What
    /// the detectors leave as it is stays shared, not copied.
    pub(super) fn shown(
        &self,
        sql: &Arc<str>,
        params: &Arc<[Option<String>]>,
    ) -> (Arc<str>, Arc<[Option<String>]>) {
        let Some(r) = &self.rules else { return (sql.clone(), params.clone()) };
        let shown_sql = r.scrub(sql).map_or_else(|| sql.clone(), Arc::from);
        let mut scrubbed: Option<Vec<Option<String>>> = None;
        for (i, p) in params.iter().enumerate() {
            if let Some(masked) = p.as_deref().and_then(|p| r.scrub(p)) {
                scrubbed.get_or_insert_with(|| params.to_vec())[i] = Some(masked);
            }
        }
        (shown_sql, scrubbed.map_or_else(|| params.clone(), Arc::from))
    }

    /// A reason to refuse a statement before it runs because its results could not be masked:
    /// a binary COPY TO, or (with `unknown_lineage: deny`) a result the lineage cannot explain.
    /// Read from the classification (computed once per statement shape); text the classifier
    /// refused is parsed here.
    pub(super) fn mask_precheck(&self, sql: &str, c: &crate::policy::Classification) -> Option<String> {
        let rules = self.rules.as_ref()?;
        let facts = facts_of(sql, c)?;
        let lineage = if rules.has_columns() && rules.unknown == proto::policy::UnknownLineage::Deny {
            facts.unclear_lineage
        } else {
            None
        };
        match (facts.unmaskable_copy, lineage) {
            (Some(copy), l) if l.is_none_or(|l| copy <= l) => Some(
                "COPY TO in binary format (or with options the gateway cannot parse) cannot be masked; use text or csv"
                    .into(),
            ),
            (_, Some(i)) => Some(format!(
                "statement {} reads columns whose origin cannot be told, and the policy says to deny rather than mask (defaults.unknown_lineage)",
                i + 1
            )),
            _ => self.predicates_precheck(rules, c, &facts),
        }
    }

    /// A reason to refuse a statement whose rows a masked column would choose
    /// (`defaults.masked_predicates`), told without the catalog, for the statements
    /// [`Self::storing_masked`] did not judge with it ([`Self::choosing_masked`]; the relay
    /// skips that for statements that store nothing computed, reads among them). It refuses
    /// the columns the masking patterns name (and a field that may call a function of a row
    /// of a masked table, and the planner's sampled values), and, when which columns choose
    /// rows cannot be told, a statement reaching tables with masked columns. What only the
    /// catalog tells (a view's column over a masked one, a partition's, a generated column's)
    /// is left to [`Self::choosing_masked`].
    fn predicates_precheck(
        &self,
        rules: &Arc<Rules>,
        c: &crate::policy::Classification,
        facts: &mask::PrecheckFacts,
    ) -> Option<String> {
        if rules.predicates == MaskedPredicates::Allow || !rules.has_columns() || !facts.chooses_rows() {
            return None;
        }
        // Judged with the catalog for these rules already.
        if self.stores_memo.iter().any(|m| {
            std::ptr::eq(Arc::as_ptr(&m.input), c)
                && Arc::ptr_eq(&m.rules, rules)
                && m.derived.holds(&self.catalog)
        }) {
            return None;
        }
        let covered = |schema: Option<&str>, table: &str, column: Option<&str>| {
            rules.masker_for(schema, table, column).is_some()
        };
        if let Some(i) = facts.unclear_choice
            && c.accesses
                .iter()
                .chain(&c.reaches)
                .filter_map(|a| a.table.as_ref())
                .any(|t| covered(t.schema(), t.table(), None))
        {
            return Some(predicate_refusal(rules.predicates, i, None));
        }
        // `u.name` that may call `name(u)` (the catalog said so: it stays in `attribute_calls`).
        let column = |r: &ColumnRef| match &r.column {
            Some(n) if c.attribute_calls.contains(n) => None,
            other => other.clone(),
        };
        let itself = |r: &ColumnRef| covered(r.schema.as_deref(), &r.table, column(r).as_deref());
        let deny = rules.predicates == MaskedPredicates::Deny;
        for (r, i) in facts.chooses.iter().chain(facts.looked_up.iter().filter(|_| deny)) {
            if itself(r) || samples_values(r) {
                return Some(predicate_refusal(rules.predicates, *i, Some(r)));
            }
        }
        // A lookup of a masked column itself is allowed; of a whole row, or of sampled values
        // of any column, it is not.
        if !deny {
            for (r, i) in &facts.looked_up {
                if (column(r).is_none() && itself(r)) || samples_values(r) {
                    return Some(predicate_refusal(rules.predicates, *i, Some(r)));
                }
            }
        }
        None
    }

    /// A reason to refuse a statement whose rows a masked column would choose, under
    /// `defaults.masked_predicates`, with the catalog: views are followed to their base columns,
    /// and a line of inheritance and generated columns are looked at, as for masking a result
    /// ([`Self::refs_masker`]). Under `equality`, a lookup of a view's column is allowed when
    /// the view passes a masked column through unchanged, not when it computes something from
    /// one (`substr(email, 1, 1) AS initial`).
    async fn choosing_masked(
        &mut self,
        rules: &Rules,
        sql: &str,
        c: &crate::policy::Classification,
        facts: &mask::PrecheckFacts,
    ) -> Option<String> {
        if rules.predicates == MaskedPredicates::Allow || !facts.chooses_rows() {
            return None;
        }
        if let Some(i) = facts.unclear_choice {
            let tables: Vec<ColumnRef> = c
                .accesses
                .iter()
                .chain(&c.reaches)
                .filter_map(|a| a.table.as_ref())
                .map(|t| ColumnRef::whole_row(t.schema(), t.table()))
                .collect();
            if !tables.is_empty() && self.refs_masker(rules, tables).await.is_some() {
                return Some(predicate_refusal(rules.predicates, i, None));
            }
        }
        // `u.name` calls `name(u)` where no column has the name: a function of the whole row.
        let called = self.field_calls(sql, facts).await;
        let widen = |r: &ColumnRef| match &r.column {
            Some(n) if called.contains(n) => ColumnRef::whole_row(r.schema.as_deref(), &r.table),
            _ => r.clone(),
        };
        let deny = rules.predicates == MaskedPredicates::Deny;
        for (r, i) in facts.chooses.iter().chain(facts.looked_up.iter().filter(|_| deny)) {
            if self.refs_masker(rules, vec![widen(r)]).await.is_some() {
                return Some(predicate_refusal(rules.predicates, *i, Some(r)));
            }
        }
        if !deny {
            for (r, i) in &facts.looked_up {
                let w = widen(r);
                let reveals = if w == *r {
                    self.lookup_reveals(rules, w).await
                } else {
                    self.refs_masker(rules, vec![w]).await.is_some()
                };
                if reveals {
                    return Some(predicate_refusal(rules.predicates, *i, Some(r)));
                }
            }
        }
        None
    }

    /// The names among the columns that choose rows that PostgreSQL would read as calls of a
    /// function on a row (`u.row_to_json`, `o.total_of` for a user's `total_of(orders)`): no
    /// column of the table has them, and a function of one argument does.
    async fn field_calls(&mut self, sql: &str, facts: &mask::PrecheckFacts) -> HashSet<String> {
        let raw = self.s.shared.classifier.classify(sql);
        let mut called = HashSet::new();
        if raw.attribute_calls.is_empty() {
            return called;
        }
        let cfg = &self.s.shared.cfg;
        let reach = Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
        let names: HashSet<&String> = facts
            .chooses
            .iter()
            .chain(&facts.looked_up)
            .filter_map(|(r, _)| r.column.as_ref())
            .filter(|n| raw.attribute_calls.contains(*n))
            .collect();
        for n in names {
            if !matches!(
                self.catalog.attribute_call(reach, n).await,
                crate::policy::AttributeCall::NoFunction
            ) {
                called.insert(n.clone());
            }
        }
        called
    }

    /// Would an equality lookup of column `r` (`WHERE r = 'x'`) tell more than whether a masked
    /// value is exactly a given one? Not when `r` is masked by its own pattern (or its line of
    /// inheritance's), or is not masked at all; when it is a view's column that passes such a
    /// column through unchanged, as that column. Yes when it is computed from masked columns (a
    /// view's `substr(email, 1, 1)`, a generated column), or when the catalog cannot say.
    async fn lookup_reveals(&mut self, rules: &Rules, r: ColumnRef) -> bool {
        let cfg = &self.s.shared.cfg;
        let (timeout, max) = (cfg.connect_timeout, cfg.max_message_bytes);
        let mut work = vec![(r, 0u8)];
        let mut seen = HashSet::new();
        while let Some((r, depth)) = work.pop() {
            if !seen.insert(r.clone()) {
                continue;
            }
            if self.refs_masker(rules, vec![r.clone()]).await.is_none() {
                continue;
            }
            let (schema, column) = (r.schema.as_deref(), r.column.as_deref());
            if rules.masker_for(schema, &r.table, column).is_some() {
                continue;
            }
            let reach = Reach { target: &self.s.conn, timeout, max };
            if inherited_masker(&mut self.catalog, reach, rules, schema, &r.table, column).await.is_some() {
                continue;
            }
            let Some(column) = r.column.clone() else { return true };
            if samples_values(&r) || depth >= MAX_VIEW_DEPTH {
                return true;
            }
            let reach = Reach { target: &self.s.conn, timeout, max };
            let Ok(rels) = self.catalog.relations(reach, r.schema.as_deref(), &r.table).await else {
                return true;
            };
            let views: Vec<_> = rels.into_iter().filter(|rel| matches!(rel.relkind, 'v' | 'm')).collect();
            // Masked, but not by a pattern, an ancestor or a view: a generated column, or a
            // name the catalog does not see.
            if views.is_empty() {
                return true;
            }
            for view in views {
                let Some(def) = view.view_sql else { return true };
                let Some(l) = lineage_sql(&def).ok().and_then(|mut ls| ls.pop()) else { return true };
                let passed = l.outputs.iter().find_map(|o| match o {
                    Output::Column { name: Some(n), sources, opaque: false, plain: true } if *n == column => {
                        Some(sources.clone())
                    }
                    _ => None,
                });
                match passed {
                    Some(sources) => work.extend(sources.into_iter().map(|s| (s, depth + 1))),
                    None => return true,
                }
            }
        }
        false
    }

    /// A reason to refuse a statement that would store values of masked columns where they
    /// are not masked (`UPDATE t SET note = email`, `INSERT ... SELECT`, `CREATE TABLE AS`,
    /// `SELECT INTO`): read back from there, or from its `RETURNING`, they would not be masked.
    /// Columns chosen by only to pick rows (`WHERE email = ...`) are not stored.
    pub(super) async fn storing_masked(
        &mut self,
        sql: &str,
        c: &crate::policy::Classification,
    ) -> Option<String> {
        let rules = self.rules.clone().filter(|r| r.has_columns())?;
        // Text neither parser reads (`ALTER TABLE users SET SCHEMA x`, which the default
        // `unparsed: deny` refuses anyway) may rename or store what is masked.
        let Some(facts) = facts_of(sql, c) else {
            return Some("the gateway cannot tell what it stores, and column masking is on".into());
        };
        // Not a store, but judged here for the catalog (and remembered with the answer).
        if let Some(refusal) = self.choosing_masked(&rules, sql, c, &facts).await {
            return Some(refusal);
        }
        if let Some(i) = facts.unclear_writes {
            return Some(format!(
                "statement {} stores values whose origin cannot be told, and column masking is on",
                i + 1
            ));
        }
        // What a function returns may be a masked value it read (its arguments are the sources
        // the lineage sees).
        let stores = c.accesses.iter().any(|a| {
            use proto::policy::Operation as O;
            matches!(a.operation, O::Insert | O::Update | O::Merge | O::Create)
        }) || !facts.written.is_empty();
        if stores && c.calls_functions && self.functions_reveal_masked(&rules, sql).await {
            return Some("it would store what a function that reads masked columns returns".into());
        }
        // A function that may write (volatile, or not known) may keep its arguments where a
        // later statement reads them unmasked (`SELECT log_it(email) FROM users`, when unknown
        // effects are allowed or a hold is approved).
        if c.calls_functions && self.may_write_through_functions(c).await {
            let read = lineage_sql(sql)
                .map(|ls| {
                    ls.iter().flat_map(|l| l.referenced.iter().cloned().chain(output_sources(l))).collect()
                })
                .ok();
            let masked = match read {
                Some(refs) => self.refs_masker(&rules, refs).await.is_some(),
                None => true,
            };
            if masked {
                return Some(
                    "it passes values of masked columns to a function that may write them where they are not masked"
                        .into(),
                );
            }
        }
        if facts.written.is_empty() {
            return None;
        }
        let written = facts.written.clone();
        self.refs_masker(&rules, written).await.map(|_| {
            "it would store values computed from masked columns where they are not masked".to_string()
        })
    }

    /// Mask a frame from the target. `None`: the frame was the proxy's own and is consumed.
    pub(super) async fn mask_upstream(
        &mut self,
        rules: &Arc<Rules>,
        mut f: Frame,
    ) -> Result<Option<Frame>, SessionError> {
        match f.tag {
            b'A' => {
                if let Some(b) = mask::mask_notification(rules, &f.body) {
                    f.body = b;
                }
            }
            b'S' => {
                // application_name is the one free-text setting the server reports; a statement
                // can set it from a masked column (set_config('application_name', email, false)).
                let withhold = rules.has_columns() && self.current_reads_masked(rules).await;
                if let Some(b) = mask::mask_parameter_status(rules, &f.body, withhold) {
                    f.body = b;
                }
            }
            b'E' | b'N' => {
                let withhold = rules.has_columns() && self.current_reads_masked(rules).await;
                if let Some(b) = mask::mask_error(rules, &f.body, withhold) {
                    f.body = b;
                }
            }
            b'T' => {
                let memo = self.memo_plan(rules, &f.body);
                let fields = match memo {
                    Some(_) => Vec::new(),
                    None => match mask::read_fields(&f.body) {
                        Some(fields) => fields,
                        None => {
                            return Err(
                                self.masking_failed("a malformed RowDescription from the target".into())
                            );
                        }
                    },
                };
                if !matches!(
                    self.expect.front(),
                    Some(
                        Expect::HiddenDescribe
                            | Expect::Execute(_)
                            | Expect::Query(..)
                            | Expect::DescribeStatement { .. }
                            | Expect::DescribePortal { .. }
                    )
                ) {
                    return Ok(Some(f));
                }
                let (plan, described) = match memo {
                    Some(hit) => hit,
                    None => {
                        let (sql, stmt) = match self.expect.front() {
                            Some(Expect::HiddenDescribe) => (self.execute_after_describe_sql(), 0),
                            Some(Expect::Execute(r) | Expect::Query(r, _)) => (r.sql.clone(), r.stmt),
                            Some(
                                Expect::DescribeStatement { sql, .. } | Expect::DescribePortal { sql, .. },
                            ) => (sql.clone(), 0),
                            _ => (None, 0),
                        };
                        self.plan_described(rules, f.body.clone(), &fields, sql.as_deref(), stmt).await
                    }
                };
                if let Some(b) = described {
                    f.body = b;
                }
                match self.expect.front_mut() {
                    Some(Expect::HiddenDescribe) => {
                        self.expect.pop_front();
                        if let Some(Expect::Execute(r)) = self.expect.front_mut() {
                            r.plan = Some(plan.clone());
                        }
                        return Ok(None);
                    }
                    Some(Expect::Execute(r) | Expect::Query(r, _)) => r.plan = Some(plan),
                    Some(Expect::DescribePortal { .. }) => {
                        if let Some(Expect::Execute(r)) = self.expect.get_mut(1)
                            && r.planned_by_client_describe
                        {
                            r.plan = Some(plan.clone());
                        }
                    }
                    _ => {}
                }
            }
            b'n' if matches!(self.expect.front(), Some(Expect::HiddenDescribe)) => {
                self.expect.pop_front();
                return Ok(None);
            }
            b'D' => {
                let masked = match self.expect.front() {
                    Some(Expect::Execute(r) | Expect::Query(r, _)) => match &r.plan {
                        Some(plan) => plan.mask_row(&f.body).map_err(|e| e.to_string()),
                        None => Err("rows arrived without a row description".into()),
                    },
                    _ => Ok(None),
                };
                match masked {
                    Ok(Some(b)) => f.body = b,
                    Ok(None) => {}
                    Err(e) => return Err(self.masking_failed(e)),
                }
            }
            b'H' => {
                let (sql, stmt, seq) = match self.expect.front() {
                    Some(Expect::Execute(r) | Expect::Query(r, _)) => (r.sql.clone(), r.stmt, r.seq),
                    _ => return Ok(Some(f)),
                };
                // Rows are split into fields by the client_encoding the gateway last heard of:
                // a statement before this one that may change it (the same message, or one
                // pipelined ahead and not yet answered) reports the change only afterwards.
                let behind = stmt > 0 && !sql.as_deref().is_some_and(|s| only_opens_blocks_before(s, stmt));
                let copy = if behind
                    || (self.relexing_through > self.answered_through && self.relexing_through < seq)
                {
                    Err("COPY TO behind a statement that may change client_encoding, still unanswered, cannot be masked; send it on its own".to_string())
                } else {
                    self.copy_plan(rules, &f.body, sql.as_deref(), stmt).await
                };
                match copy {
                    Ok(c) => {
                        if let Some(Expect::Execute(r) | Expect::Query(r, _)) = self.expect.front_mut() {
                            r.copy = Some(c);
                        }
                    }
                    Err(e) => return Err(self.masking_failed(e)),
                }
            }
            b'd' => {
                let masked = match self.expect.front() {
                    Some(Expect::Execute(r) | Expect::Query(r, _)) => match &r.copy {
                        Some((plan, csv, delim)) => {
                            plan.mask_copy_row(&f.body, *csv, *delim).map_err(|e| e.to_string())
                        }
                        None => Err("COPY data arrived without a COPY response".into()),
                    },
                    _ => Ok(None),
                };
                match masked {
                    Ok(Some(b)) => f.body = Bytes::from(b),
                    Ok(None) => {}
                    Err(e) => return Err(self.masking_failed(e)),
                }
            }
            _ => {}
        }
        Ok(Some(f))
    }

    /// End the session rather than send a value unmasked.
    fn masking_failed(&mut self, why: String) -> SessionError {
        tracing::warn!(reason = %why, "a value could not be masked; closing the session");
        // Stop whatever still streams toward us.
        self.cancel_running();
        self.refuse_fatal(
            sqlstate::INTERNAL_ERROR,
            format!("airlock: a result could not be masked ({why}); the session is closed rather than send it unmasked"),
        )
    }

    fn execute_after_describe_sql(&self) -> Option<Arc<str>> {
        match self.expect.get(1) {
            Some(Expect::Execute(r)) => r.sql.clone(),
            _ => None,
        }
    }

    pub(super) fn statement_sql(&self, name: &str) -> Option<Arc<str>> {
        self.lookup_statement(name).map(|p| p.sql).filter(|s| !s.is_empty())
    }

    pub(super) fn portal_sql(&self, name: &str) -> Option<Arc<str>> {
        self.lookup_portal(name)
            .and_then(|p| p.stmt.as_ref())
            .map(|p| p.sql.clone())
            .filter(|s| !s.is_empty())
    }

    /// Could the messages of the statement answering now show masked values? It reads masked
    /// columns; or it does more than read, since a constraint's error (`Failing row contains
    /// (…)`, `Key (email)=(…)`) or a trigger's notice can show whole rows of the table it
    /// writes, whatever columns it names; or it is unknown. A Sync at the head is the commit of
    /// an implicit transaction, whose deferred constraints report the same way.
    async fn current_reads_masked(&mut self, rules: &Rules) -> bool {
        let (sql, stmt, cached) = match self.expect.iter().take(2).find_map(|e| match e {
            Expect::Execute(r) | Expect::Query(r, _) => Some(r),
            _ => None,
        }) {
            Some(r) => (r.sql.clone(), r.stmt, r.reads_masked),
            None => return matches!(self.expect.front(), Some(Expect::Sync)),
        };
        if let Some(v) = cached {
            return v;
        }
        let more_than_reads = sql.as_deref().is_none_or(|s| {
            use proto::policy::Operation as O;
            let c = self.s.shared.classifier.classify(s);
            c.unparsed.is_some()
                || c.calls_functions
                || c.accesses
                    .iter()
                    .any(|a| !matches!(a.operation, O::Select | O::Show | O::Explain | O::Cursor))
        });
        let reads = more_than_reads
            || match sql.as_deref().map(lineage_sql) {
                Some(Ok(ls)) => match ls.get(stmt) {
                    Some(l) => {
                        let refs: Vec<ColumnRef> =
                            l.referenced.iter().cloned().chain(output_sources(l)).collect();
                        self.refs_masker(rules, refs).await.is_some()
                    }
                    None => true,
                },
                _ => true,
            };
        let reads = reads || self.functions_reveal_masked(rules, sql.as_deref().unwrap_or_default()).await;
        if let Some(Expect::Execute(r) | Expect::Query(r, _)) =
            self.expect.iter_mut().take(2).find(|e| matches!(e, Expect::Execute(_) | Expect::Query(..)))
        {
            r.reads_masked = Some(reads);
        }
        reads
    }

    /// The plan and client-side description of a RowDescription `body` planned before, if
    /// nothing it was derived from has changed since: the same rules, the same catalog answers
    /// (not invalidated by DDL, and the oldest of them not older than the catalog trusts an
    /// answer, so a plan is never staler than a fresh one could be).
    fn memo_plan(&self, rules: &Arc<Rules>, body: &[u8]) -> Option<(Arc<RowPlan>, Option<Bytes>)> {
        let m = self.plan_memo.as_ref()?;
        (Arc::ptr_eq(&m.rules, rules) && *m.body == *body && m.derived.holds(&self.catalog))
            .then(|| (m.plan.clone(), m.described.clone()))
    }

    /// Plan a RowDescription and say what the client sees of it. A plan made from column
    /// origins alone (every column from a table, every lookup answered) is kept for
    /// [`Self::memo_plan`]: it depends on nothing else, so the next identical description
    /// (a client repeating a statement) gets it without parsing or looking anything up.
    async fn plan_described(
        &mut self,
        rules: &Arc<Rules>,
        body: Bytes,
        fields: &[Field],
        sql: Option<&str>,
        stmt: usize,
    ) -> (Arc<RowPlan>, Option<Bytes>) {
        let since = self.catalog.start_deriving();
        let plan = Arc::new(self.plan(rules, fields, sql, stmt).await);
        let described = plan.describe(fields);
        if let Some(derived) = self.catalog.derived(since)
            && fields.iter().all(|f| f.table_oid != 0)
        {
            self.plan_memo = Some(PlanMemo {
                rules: rules.clone(),
                derived,
                body,
                plan: plan.clone(),
                described: described.clone(),
            });
        }
        (plan, described)
    }

    /// The masking plan of a result described by `fields`, produced by statement `stmt` of `sql`.
    async fn plan(&mut self, rules: &Rules, fields: &[Field], sql: Option<&str>, stmt: usize) -> RowPlan {
        let mut whole: Vec<Option<Masker>> = vec![None; fields.len()];
        if rules.has_columns() {
            let lineage = if fields.iter().any(|f| f.table_oid == 0) {
                sql.and_then(|s| lineage_sql(s).ok())
                    .and_then(|mut ls| (stmt < ls.len()).then(|| ls.swap_remove(stmt)))
            } else {
                None
            };
            let aligned = lineage.as_ref().is_some_and(|l| {
                l.exact
                    && l.outputs.len() == fields.len()
                    && l.outputs.iter().all(|o| matches!(o, Output::Column { .. }))
            });
            let functions_reveal = match sql {
                Some(s) if fields.iter().any(|f| f.table_oid == 0) => {
                    self.functions_reveal_masked(rules, s).await
                }
                _ => false,
            };
            for (i, f) in fields.iter().enumerate() {
                if f.table_oid == 0 && functions_reveal {
                    whole[i] = Some(rules.fallback().clone());
                    continue;
                }
                whole[i] = if f.table_oid != 0 {
                    self.origin_masker(rules, f.table_oid, f.attnum).await
                } else {
                    match &lineage {
                        None => Some(rules.fallback().clone()),
                        Some(l) if aligned => match l.outputs.get(i) {
                            Some(Output::Column { sources, opaque, .. }) => {
                                let mut refs: Vec<ColumnRef> = sources.iter().cloned().collect();
                                if *opaque {
                                    refs.extend(l.referenced.iter().cloned());
                                }
                                self.refs_masker(rules, refs).await
                            }
                            _ => Some(rules.fallback().clone()),
                        },
                        Some(l) => {
                            let refs: Vec<ColumnRef> =
                                l.referenced.iter().cloned().chain(output_sources(l)).collect();
                            self.refs_masker(rules, refs).await
                        }
                    }
                };
            }
        }
        RowPlan::new(rules, fields, whole)
    }

    /// Does the statement call a function that may write (not read-only, or not known)?
    async fn may_write_through_functions(&mut self, c: &crate::policy::Classification) -> bool {
        let cfg = &self.s.shared.cfg;
        let (timeout, max) = (cfg.connect_timeout, cfg.max_message_bytes);
        for f in c.functions.iter().chain(&c.builtins) {
            if !self.catalog.read_only(&self.s.conn, f, timeout, max).await {
                return true;
            }
        }
        false
    }

    /// Could a function `sql` calls return values of masked columns (its body reads them, or
    /// its body cannot be read)? Then every computed column of the result is masked: lineage
    /// sees a call's arguments, not what the function reads.
    async fn functions_reveal_masked(&mut self, rules: &Rules, sql: &str) -> bool {
        let c = self.s.shared.classifier.classify(sql);
        if c.functions.is_empty() && c.builtins.is_empty() && c.attribute_calls.is_empty() {
            return false;
        }
        // Other sessions' statement texts, with whatever values they hold.
        if c.functions.iter().chain(&c.builtins).any(|f| {
            f.schema.as_deref().is_none_or(|s| s == "pg_catalog")
                && SHOWS_STATEMENTS.contains(&f.name.as_str())
        }) {
            return true;
        }
        let cfg = &self.s.shared.cfg;
        let reach = Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
        // `x.name` calling a user function: its body is not read.
        if !self.catalog.fields_call_nothing_unknown(reach, &c).await {
            return true;
        }
        let mut refs: Vec<ColumnRef> = Vec::new();
        for f in c.functions.iter().chain(&c.builtins) {
            match self.catalog.function_reads(reach, f).await {
                Some(cols) => refs.extend(cols.iter().cloned()),
                None => return true,
            }
        }
        !refs.is_empty() && self.refs_masker(rules, refs).await.is_some()
    }

    /// The masker of a result column by its origin; unknown origins are masked.
    async fn origin_masker(&mut self, rules: &Rules, oid: u32, attnum: i16) -> Option<Masker> {
        let cfg = &self.s.shared.cfg;
        let reach = Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
        match self.catalog.origin(reach, oid, attnum).await {
            Ok(Some(o)) => {
                if let Some(m) = rules.masker_for(Some(&o.schema), &o.table, Some(&o.column)) {
                    return Some(m.clone());
                }
                let reach =
                    Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
                if let Some(m) = inherited_masker(
                    &mut self.catalog,
                    reach,
                    rules,
                    Some(&o.schema),
                    &o.table,
                    Some(&o.column),
                )
                .await
                {
                    return Some(m);
                }
                // A generated column holds what its expression computes from the row's other
                // columns (`lower(email)`): masked as a value computed from them.
                if let Some(expr) = &o.generated {
                    let r = ColumnRef {
                        schema: Some(o.schema.clone()),
                        table: o.table.clone(),
                        column: Some(o.column.clone()),
                    };
                    let Some(refs) = generated_sources(&r, expr) else {
                        return Some(rules.fallback().clone());
                    };
                    if let Some(m) = self.refs_masker(rules, refs).await {
                        return Some(m);
                    }
                }
                if matches!(o.relkind, 'v' | 'm') {
                    let r = ColumnRef {
                        schema: Some(o.schema.clone()),
                        table: o.table.clone(),
                        column: Some(o.column.clone()),
                    };
                    return self.refs_masker(rules, vec![r]).await;
                }
                None
            }
            Ok(None) => Some(rules.fallback().clone()),
            Err(e) => {
                tracing::warn!(error = %e, "catalog lookup of a column origin failed; masking the column");
                Some(rules.fallback().clone())
            }
        }
    }

    /// How a value derived from `refs` is masked: redacted ([`Rules::fallback`]) if any of them
    /// is masked, following views to their base columns; `None` if none is. Lookup failures
    /// count as masked. Never a column's own `partial` or `hash`: applied to a computed value
    /// (`substr(card, 5, 4)`, `CASE WHEN false THEN email ELSE 'guess' END`), those would show
    /// the chosen part, or hash a chosen text.
    async fn refs_masker(&mut self, rules: &Rules, refs: Vec<ColumnRef>) -> Option<Masker> {
        let mut work: Vec<(ColumnRef, u8)> = refs.into_iter().map(|r| (r, 0)).collect();
        let mut seen = HashSet::new();
        let cfg = &self.s.shared.cfg;
        let reach = Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
        while let Some((r, depth)) = work.pop() {
            if rules.masker_for(r.schema.as_deref(), &r.table, r.column.as_deref()).is_some() {
                return Some(rules.fallback().clone());
            }
            if samples_values(&r) {
                return Some(rules.fallback().clone());
            }
            if inherited_masker(
                &mut self.catalog,
                reach,
                rules,
                r.schema.as_deref(),
                &r.table,
                r.column.as_deref(),
            )
            .await
            .is_some()
            {
                return Some(rules.fallback().clone());
            }
            if !seen.insert(r.clone()) {
                continue;
            }
            // A generated column holds what its expression computes from the row's columns.
            if let Some(col) = &r.column {
                match self.catalog.generated(reach, r.schema.as_deref(), &r.table).await {
                    Ok(g) => {
                        if let Some((_, expr)) = g.iter().find(|(c, _)| c == col) {
                            match generated_sources(&r, expr) {
                                Some(refs) => work.extend(refs.into_iter().map(|n| (n, depth + 1))),
                                None => return Some(rules.fallback().clone()),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "catalog lookup of generated columns failed; masking");
                        return Some(rules.fallback().clone());
                    }
                }
            }
            let rels = match self.catalog.relations(reach, r.schema.as_deref(), &r.table).await {
                Ok(rels) => rels,
                Err(e) => {
                    tracing::warn!(error = %e, "catalog lookup of a relation failed; masking");
                    return Some(rules.fallback().clone());
                }
            };
            // A name the catalog cannot find may be a view the session made over masked
            // columns: not a plain table.
            if rels.is_empty() && self.catalog.may_not_see(r.schema.as_deref()) {
                return Some(rules.fallback().clone());
            }
            for rel in rels.into_iter().filter(|rel| matches!(rel.relkind, 'v' | 'm')) {
                if depth >= MAX_VIEW_DEPTH {
                    return Some(rules.fallback().clone());
                }
                let Some(def) = rel.view_sql else { return Some(rules.fallback().clone()) };
                let Ok(mut ls) = lineage_sql(&def) else { return Some(rules.fallback().clone()) };
                let Some(l) = ls.pop() else { return Some(rules.fallback().clone()) };
                let named = r.column.as_deref().and_then(|c| {
                    l.outputs.iter().find_map(|o| match o {
                        Output::Column { name: Some(n), sources, .. } if n == c => Some(sources.clone()),
                        _ => None,
                    })
                });
                let mut next: Vec<ColumnRef> = match named {
                    Some(sources) => sources.into_iter().collect(),
                    // A whole-row reference, or a column the definition does not name plainly.
                    None => output_sources(&l).chain(l.referenced.iter().cloned()).collect(),
                };
                // Lineage follows a call to its arguments only: what a function the definition
                // calls reads may be in any column of the view (coarse, so never too little).
                let called = self.s.shared.classifier.classify(&def);
                if !self.catalog.fields_call_nothing_unknown(reach, &called).await {
                    return Some(rules.fallback().clone());
                }
                for f in called.functions.iter().chain(&called.builtins) {
                    match self.catalog.function_reads(reach, f).await {
                        Some(cols) => next.extend(cols.iter().cloned()),
                        None => return Some(rules.fallback().clone()),
                    }
                }
                work.extend(next.into_iter().map(|n| (n, depth + 1)));
            }
        }
        None
    }

    /// The plan for COPY TO rows, from the CopyOutResponse body and the statement.
    async fn copy_plan(
        &mut self,
        rules: &Rules,
        body: &[u8],
        sql: Option<&str>,
        stmt: usize,
    ) -> Result<(RowPlan, Option<CsvShape>, u8), String> {
        let (format, ncols) = match (body.first(), body.get(1..3)) {
            (Some(&f), Some(n)) => (f, usize::from(u16::from_be_bytes([n[0], n[1]]))),
            _ => return Err("a malformed CopyOutResponse".into()),
        };
        if format != 0 {
            return Err("COPY TO in binary format cannot be masked".into());
        }
        if let Some(enc) = &self.lexing.foreign_encoding {
            return Err(format!("COPY TO in client_encoding {enc} cannot be masked (only UTF8 can)"));
        }
        let parsed = sql.and_then(|s| Parser::parse_sql(&PostgreSqlDialect {}, s).ok());
        let st = parsed.as_ref().and_then(|p| p.get(stmt));
        let shape = st
            .and_then(mask::copy_shape)
            .ok_or("the COPY statement's format could not be read, or its ENCODING is not UTF8")?;
        let fields: Vec<Field> = (0..ncols)
            .map(|_| Field {
                name: Bytes::new(),
                table_oid: 0,
                attnum: 0,
                type_oid: masking::value::oid::TEXT,
                typlen: -1,
                typmod: -1,
                format: 0,
            })
            .collect();
        let mut whole: Vec<Option<Masker>> = vec![None; ncols];
        if rules.has_columns() {
            let lineage = st.and_then(|st| masking::lineage::lineage(st).ok());
            let cfg = &self.s.shared.cfg;
            let reach =
                Reach { target: &self.s.conn, timeout: cfg.connect_timeout, max: cfg.max_message_bytes };
            // One list of source columns per output column, expanding stars from the catalog.
            let mut per_col: Option<Vec<Vec<ColumnRef>>> = None;
            if let Some(l) = lineage.as_ref().filter(|l| l.exact) {
                let mut cols = Vec::new();
                let mut ok = true;
                for o in &l.outputs {
                    match o {
                        Output::Column { sources, opaque, .. } => {
                            let mut refs: Vec<ColumnRef> = sources.iter().cloned().collect();
                            if *opaque {
                                refs.extend(l.referenced.iter().cloned());
                            }
                            cols.push(refs);
                        }
                        Output::Star { tables } => {
                            for t in tables {
                                // The catalog's own session resolves an unqualified name by the
                                // default search_path, without this session's temporary tables:
                                // once either may differ, its columns are not this table's.
                                if t.schema.is_none() && (self.search_path_touched || self.catalog.changed())
                                {
                                    ok = false;
                                    continue;
                                }
                                match self.catalog.columns(reach, t.schema.as_deref(), &t.table).await {
                                    Ok(names) if !names.is_empty() => {
                                        cols.extend(names.into_iter().map(|c| {
                                            vec![ColumnRef {
                                                schema: t.schema.clone(),
                                                table: t.table.clone(),
                                                column: Some(c),
                                            }]
                                        }))
                                    }
                                    _ => ok = false,
                                }
                            }
                        }
                    }
                }
                if ok && cols.len() == ncols {
                    per_col = Some(cols);
                }
            }
            // A function that reveals masked values: every column may hold what it returns.
            if let Some(s) = sql
                && per_col.is_some()
                && self.functions_reveal_masked(rules, s).await
            {
                per_col = None;
            }
            match per_col {
                Some(cols) => {
                    for (i, refs) in cols.into_iter().enumerate() {
                        whole[i] = self.refs_masker(rules, refs).await;
                    }
                }
                None => whole = vec![Some(rules.fallback().clone()); ncols],
            }
        }
        Ok((RowPlan::new(rules, &fields, whole), shape.csv, shape.delimiter))
    }
}

/// What masking must know of `sql` before it runs: from its classification (computed once per
/// statement shape), or, for text the classifier refused, parsed here. `None`: it does not parse.
fn facts_of<'a>(
    sql: &str,
    c: &'a crate::policy::Classification,
) -> Option<std::borrow::Cow<'a, mask::PrecheckFacts>> {
    if c.unparsed.is_some() {
        let parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
        Some(std::borrow::Cow::Owned(mask::precheck_facts(&parsed)))
    } else {
        Some(std::borrow::Cow::Borrowed(&c.mask_facts))
    }
}

/// Why a statement whose rows masked column `column` chooses (statement `stmt`, 0-based) is
/// refused; `None`: which columns choose them cannot be told.
fn predicate_refusal(mode: MaskedPredicates, stmt: usize, column: Option<&ColumnRef>) -> String {
    let what = match column {
        Some(r) => {
            let mut name = r.schema.as_ref().map(|s| format!("{s}.")).unwrap_or_default();
            name.push_str(&r.table);
            name.push('.');
            name.push_str(r.column.as_deref().unwrap_or("*"));
            format!("uses {name}, a masked column, to choose rows")
        }
        None => "may use masked columns to choose rows (the gateway cannot tell which columns do)".into(),
    };
    let allowed = match mode {
        MaskedPredicates::Equality => {
            "a masked column may only be returned, or compared unchanged with constants or parameters by =, <>, IN or IS NULL"
        }
        MaskedPredicates::Deny | MaskedPredicates::Allow => "a masked column may only be returned",
    };
    format!(
        "statement {} {what}: which rows come back would tell its values; {allowed} (defaults.masked_predicates: {mode})",
        stmt + 1
    )
}

/// Every source column of every output of a lineage (stars as whole-row references).
fn output_sources(l: &Lineage) -> impl Iterator<Item = ColumnRef> + '_ {
    l.outputs.iter().flat_map(|o| -> Vec<ColumnRef> {
        match o {
            Output::Column { sources, .. } => sources.iter().cloned().collect(),
            Output::Star { tables } => tables
                .iter()
                .map(|t| ColumnRef { schema: t.schema.clone(), table: t.table.clone(), column: None })
                .collect(),
        }
    })
}

/// Are the statements of `sql` before statement `stmt` only `BEGIN`s and savepoints, which
/// change no setting (`BEGIN; COPY … TO STDOUT`)?
fn only_opens_blocks_before(sql: &str, stmt: usize) -> bool {
    use sqlparser::ast::Statement as S;
    Parser::parse_sql(&PostgreSqlDialect {}, sql).is_ok_and(|sts| {
        sts.len() > stmt
            && sts[..stmt].iter().all(|st| matches!(st, S::StartTransaction { .. } | S::Savepoint { .. }))
    })
}

/// The columns the expression `expr` of generated column `r` reads (`None`: it cannot be
/// read).
fn generated_sources(r: &ColumnRef, expr: &str) -> Option<Vec<ColumnRef>> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let table = match &r.schema {
        Some(s) => format!("{}.{}", quote(s), quote(&r.table)),
        None => quote(&r.table),
    };
    let l = lineage_sql(&format!("SELECT {expr} FROM {table}")).ok()?.pop()?;
    Some(l.referenced.iter().cloned().chain(output_sources(&l)).collect())
}

/// Is `r` a column of the planner's statistics that holds sampled values of other tables'
/// columns (`pg_stats.histogram_bounds`, `pg_statistic.stavalues1`, ...), or other sessions'
/// statement texts (`pg_stat_activity.query`), or a whole row of those? Which table's values a
/// row holds is only known row by row, so where column masking is on they are masked whatever
/// table they come from.
fn samples_values(r: &ColumnRef) -> bool {
    const RELATIONS: &[&str] =
        &["pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data"];
    const VALUES: &[&str] = &[
        "most_common_vals",
        "histogram_bounds",
        "most_common_elems",
        // PostgreSQL 17: bounds of range-typed columns.
        "range_bounds_histogram",
        "stavalues1",
        "stavalues2",
        "stavalues3",
        "stavalues4",
        "stavalues5",
        "stxdmcv",
        "stxdexpr",
        "exprs",
    ];
    // Unqualified, these names are pg_catalog's: it is searched first unless a session puts it
    // later, which only makes a masked reading of some other relation.
    let catalog = r.schema.as_deref().is_none_or(|s| s == "pg_catalog");
    let column_in = |columns: &[&str]| r.column.as_deref().is_none_or(|c| columns.contains(&c));
    // The text of other sessions' statements (the gateway's target role sees every session of
    // its role, an exempt person's included), with the values they hold. pg_stat_statements
    // lives in whatever schema the extension was created in.
    (catalog && RELATIONS.contains(&r.table.as_str()) && column_in(VALUES))
        || (catalog && r.table == "pg_stat_activity" && column_in(&["query"]))
        || (r.table == "pg_stat_statements" && column_in(&["query"]))
}

/// Built-ins that return other sessions' statement texts (what `pg_stat_activity` shows).
const SHOWS_STATEMENTS: &[&str] = &["pg_stat_get_activity", "pg_stat_get_backend_activity"];

/// The masker of a column by the rules for the tables in its line of inheritance: a
/// partition's rows are its parent's, and a parent's include its partitions' (their columns
/// share names). A failed lookup masks.
async fn inherited_masker(
    catalog: &mut crate::catalog::Catalog,
    reach: Reach<'_>,
    rules: &Rules,
    schema: Option<&str>,
    table: &str,
    column: Option<&str>,
) -> Option<Masker> {
    let t =
        crate::policy::TableName { parts: schema.into_iter().chain([table]).map(str::to_string).collect() };
    match catalog.reached(reach, &t).await {
        Ok(up) => up.iter().find_map(|p| rules.masker_for(p.schema(), p.table(), column).cloned()),
        Err(e) => {
            tracing::warn!(error = %e, "catalog lookup of a table's parents failed; masking");
            Some(rules.fallback().clone())
        }
    }
}
