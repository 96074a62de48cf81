//! Column lineage of SQL statements: for each output column of a statement, the table columns it
//! is computed from.
//!
//! PostgreSQL's `RowDescription` names the origin table and column only for plain column
//! references; a computed output column (an expression, a function, an aggregate, a subquery, a
//! `UNION` branch, `row_to_json(t)` …) has no origin. [`lineage`] tells, without a catalog, which
//! table columns each output column derives from, so that the proxy can mask a computed column
//! whenever any of its sources is masked.
//!
//! The analysis is conservative: when it cannot tell which table owns a column it lists every
//! candidate, when an output derives from something whose columns cannot be known it sets
//! [`Output::Column::opaque`], when positions may not line up it clears [`Lineage::exact`], and
//! for statements returning rows of a shape it cannot know it returns
//! [`LineageError::Unsupported`]. An extra source only over-masks; a missing one would leak.
//!
//! Names are folded the way PostgreSQL folds them: unquoted identifiers are lower-cased (ASCII
//! only, as PostgreSQL does for multi-byte encodings), quoted ones are kept exactly, and both are
//! truncated to 63 bytes. sqlparser does not decode `U&"…"` identifiers: it reads `U&"d\0061ta"`
//! as `U & "d\0061ta"`, an operator between two columns. So a quoted identifier with a backslash
//! is resolved both as written and as PostgreSQL would decode it after `U&`, and the expression
//! is marked opaque (the operator tree around it is not PostgreSQL's). `UESCAPE` does not parse.
//!
//! Scopes follow PostgreSQL's: a FROM item that is not LATERAL (a subquery) does not see the items
//! before it in its FROM list, a function in FROM and a LATERAL item do, and `JOIN … ON` sees only
//! the two sides of its join, plus, for all of them, the query levels outside.
//!
//! Besides what each output derives from, the analysis tells which columns *choose rows*
//! ([`Lineage::chooses`]): those whose values decide which rows a statement returns or changes,
//! how many, or in which order (`WHERE`, `JOIN`, `GROUP BY`, `ORDER BY`, `LIMIT`, window
//! clauses, `FILTER`, `CASE` conditions, the arguments of set-returning functions, `DISTINCT`
//! and set operations that compare rows, and whatever subqueries feed those). A masked value
//! used there shows through the rows, even when every value returned is masked. A column only
//! compared unchanged for equality with constants or parameters is kept apart
//! ([`Lineage::looked_up`]).

use std::collections::BTreeSet;

use sqlparser::ast::{
    AccessExpr, AlterSchemaOperation, AlterTable, AlterTableOperation, AlterViewOperation, ArrayElemTypeDef,
    BinaryOperator, CastKind, CeilFloorKind, ConnectByKind, CopySource, CopyTarget, Cte, DataType,
    DateTimeField, Distinct, ExactNumberInfo, Expr, FromTable, Function, FunctionArg, FunctionArgExpr,
    FunctionArgumentClause, FunctionArguments, GroupByExpr, Ident, InTarget, JoinConstraint, JoinOperator,
    JsonPathElem, ListAggOnOverflow, MergeAction, MergeInsertKind, MergeUpdateKind, NamedWindowExpr,
    ObjectName, ObjectNamePart, OnConflictAction, OnInsert, OrderBy, OrderByExpr, OrderByKind, OutputClause,
    Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, SetOperator, SetQuantifier, Statement,
    Subscript, TableAlias, TableFactor, TableObject, TableWithJoins, TimezoneInfo, TrimWhereField,
    UnaryOperator, UpdateTableFromKind, Values, WildcardAdditionalOptions, WindowFrameBound, WindowSpec,
    WindowType,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

/// How deeply expressions, queries and table factors may nest before [`lineage`] gives up with
/// [`LineageError::TooDeep`] (left-deep chains of binary operators and set operations are walked
/// iteratively and do not count).
pub const MAX_DEPTH: usize = 200;

/// How many nodes [`lineage`] may visit in one statement (recursive CTEs are analysed several
/// times) before it gives up with [`LineageError::TooComplex`].
const MAX_STEPS: usize = 1_000_000;

/// How many times the body of a recursive CTE is re-analysed while looking for a fixpoint.
const MAX_RECURSIVE_ROUNDS: usize = 16;

/// PostgreSQL truncates identifiers to `NAMEDATALEN - 1` bytes.
const MAX_IDENT_BYTES: usize = 63;

/// Functions that run SQL given as text, or read whole tables by name: their results derive from
/// columns that the statement does not name, so the statement is refused.
const SQL_EXECUTING_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "dblink",
    "dblink_exec",
    "dblink_fetch",
    "dblink_get_result",
    "dblink_send_query",
    "dblink_open",
];

/// Built-ins that keep what they are given where a later statement reads it back, unmasked: a
/// sequence's value (`setval`, read by `currval` or the sequence itself), an advisory lock's key
/// (`pg_locks`), the random seed (`random()`), a setting (`current_setting`), a notification's
/// payload (listeners the gateway does not mask for), a WAL message, a large object. Their
/// arguments count as stored ([`Lineage::written`]).
const STORING_FUNCTIONS: &[&str] = &[
    "setval",
    "setseed",
    "set_config",
    "pg_notify",
    "pg_logical_emit_message",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "lo_from_bytea",
    "lo_put",
    "lowrite",
];

/// Built-in set-returning functions: how many rows they return depends on their arguments
/// (`generate_series(1, ascii(email))`), so in a select list their arguments choose rows
/// ([`Lineage::chooses`]). In FROM, every function's arguments do.
const SET_RETURNING_FUNCTIONS: &[&str] = &[
    "generate_series",
    "generate_subscripts",
    "unnest",
    "regexp_matches",
    "regexp_split_to_table",
    "string_to_table",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_each",
    "json_each_text",
    "jsonb_each",
    "jsonb_each_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "json_to_recordset",
    "jsonb_to_recordset",
    "jsonb_path_query",
    "jsonb_path_query_tz",
    "ts_stat",
    "ts_debug",
    "ts_parse",
    "pg_options_to_table",
    "aclexplode",
];

/// A table column, or a whole row of a table when `column` is `None`.
///
/// Names are folded the way PostgreSQL folds them (see the [module docs](self)). `schema` is the
/// schema as written in the statement; `None` means "resolved through `search_path`".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ColumnRef {
    /// Schema as written, if any.
    pub schema: Option<String>,
    /// Table (or view) name.
    pub table: String,
    /// Column name; `None` for a whole-row reference (any column of the table).
    pub column: Option<String>,
}

impl ColumnRef {
    /// A reference to one column of a table.
    pub fn column(schema: Option<&str>, table: &str, column: &str) -> Self {
        Self { schema: schema.map(str::to_owned), table: table.to_owned(), column: Some(column.to_owned()) }
    }

    /// A reference to a whole row of a table (any of its columns).
    pub fn whole_row(schema: Option<&str>, table: &str) -> Self {
        Self { schema: schema.map(str::to_owned), table: table.to_owned(), column: None }
    }

    fn of_table(table: &TableRef, column: Option<&str>) -> Self {
        Self { schema: table.schema.clone(), table: table.table.clone(), column: column.map(str::to_owned) }
    }
}

/// A base table (or view) named in a statement, names folded as for [`ColumnRef`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableRef {
    /// Schema as written, if any.
    pub schema: Option<String>,
    /// Table (or view) name.
    pub table: String,
}

impl TableRef {
    /// A table reference.
    pub fn new(schema: Option<&str>, table: &str) -> Self {
        Self { schema: schema.map(str::to_owned), table: table.to_owned() }
    }
}

/// One item of a statement's result, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// One result column, computed or direct.
    Column {
        /// The column's name as PostgreSQL would report it, when it can be told.
        name: Option<String>,
        /// Every table column it derives from (a `column: None` entry means any column of that
        /// table). Empty for literals and `count(*)`.
        sources: BTreeSet<ColumnRef>,
        /// It derives from something whose columns cannot be known (a set-returning function
        /// over a column, an unresolvable name, …): the proxy treats it as masked if ANY column
        /// in [`Lineage::referenced`] is masked.
        opaque: bool,
        /// Every value is one of `sources` passed through unchanged (a plain reference, through
        /// aliases, subqueries, CTEs and `UNION ALL` branches that are plain too) or a constant:
        /// comparing it with a constant compares the column's own values. `false` when anything
        /// is computed from them (a function, an operator, a cast, `COLLATE`, an aggregate …);
        /// `true` for an output with no sources.
        plain: bool,
    },
    /// `*` or `t.*` over base tables: expands, in order, to all columns of these tables (the
    /// proxy knows the columns from the catalog).
    Star {
        /// The tables, in order.
        tables: Vec<TableRef>,
    },
}

/// The lineage of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// The result's columns, in order; empty for statements that return no rows.
    pub outputs: Vec<Output>,
    /// `false` when the positions of `outputs` may not line up with the result's columns (a
    /// star over `NATURAL JOIN`/`USING`, a star over a function's result, set-operation branches
    /// that cannot be aligned, …): the proxy then masks every computed column if any column in
    /// `referenced` is masked.
    pub exact: bool,
    /// Every table column or whole table referenced anywhere in the statement (projection,
    /// `WHERE`, `JOIN … ON`, `GROUP BY`, `HAVING`, `ORDER BY`, subqueries, CTE bodies …), for the
    /// conservative fallback.
    pub referenced: BTreeSet<ColumnRef>,
    /// What the values the statement stores come from (`INSERT`, `UPDATE`, `MERGE`, writing
    /// CTEs, `SELECT INTO`, `CREATE TABLE AS`, the arguments of built-ins that keep them, such
    /// as `setval`): every column a stored value is computed from, and, when one is computed by
    /// something opaque (a function of a whole row, say), every column referenced. A masked
    /// column among them would be stored where it is not masked.
    ///
    /// DDL that gives a table's values another identity counts as storing them there: the
    /// columns it renames, the tables it renames, and both sides of a partition it detaches or
    /// an inheritance it ends (`ALTER TABLE users RENAME email TO e` would otherwise leave
    /// `users.email`'s values under a name no masking pattern covers).
    pub written: BTreeSet<ColumnRef>,
    /// The columns whose values choose rows: which rows the statement returns or changes, how
    /// many, or in which order. Those read in `WHERE`, `JOIN … ON`/`USING`/`NATURAL`,
    /// `GROUP BY`, `HAVING`, `ORDER BY` (by expression, output name or position), `DISTINCT`
    /// and `DISTINCT ON`, window `PARTITION BY`/`ORDER BY`/frames, `LIMIT`/`OFFSET`/`FETCH`,
    /// `FILTER`, an aggregate's `ORDER BY` and `WITHIN GROUP`, `CASE` conditions, the
    /// arguments of functions in FROM and of set-returning functions, the outputs of
    /// `UNION`/`INTERSECT`/`EXCEPT` (which compare rows; not `UNION ALL`), MERGE's `ON` and
    /// `WHEN` conditions, `ON CONFLICT … WHERE`, the query of `CREATE VIEW`, the statement
    /// under `EXPLAIN`, and what subqueries in any of those return. A name the analysis cannot
    /// resolve there (an opaque one) adds every column in [`Lineage::referenced`].
    ///
    /// Excludes what is only looked up by equality ([`Lineage::looked_up`]).
    pub chooses: BTreeSet<ColumnRef>,
    /// The columns that choose rows only by an equality lookup: compared unchanged, with `=`,
    /// `<>`, `IN (…)`, `= ANY(…)` or `IS [NOT] NULL`, with constants or parameters only
    /// (`WHERE email = $1`). Such a lookup answers only "is it exactly this value". A column also
    /// used otherwise is in [`Lineage::chooses`] only.
    pub looked_up: BTreeSet<ColumnRef>,
    /// Part of the statement (the query of `EXPLAIN` or `CREATE VIEW`) could not be analysed:
    /// columns that choose rows may be missing from [`Lineage::chooses`].
    pub chooses_unknown: bool,
}

/// Why a statement's lineage cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    /// The SQL text does not parse.
    #[error("parsing SQL for lineage")]
    Parse(#[source] ParserError),
    /// The statement returns rows whose shape or origin cannot be analysed.
    #[error("cannot tell the lineage of {0}")]
    Unsupported(String),
    /// The statement nests deeper than [`MAX_DEPTH`].
    #[error("statement nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The statement is too large to analyse.
    #[error("statement too complex to analyse")]
    TooComplex,
}

/// Settings whose values are one of a fixed few, numbers, or fixed by the server, and the name
/// of the column `SHOW` answers with.
const FIXED_KIND_SETTINGS: &[&str] = &[
    "transaction_isolation",
    "default_transaction_isolation",
    "transaction_read_only",
    "default_transaction_read_only",
    "transaction_deferrable",
    "default_transaction_deferrable",
    "server_version",
    "server_version_num",
    "server_encoding",
    "client_encoding",
    "standard_conforming_strings",
    "integer_datetimes",
    "intervalstyle",
    "datestyle",
    "max_identifier_length",
    "is_superuser",
    "in_hot_standby",
    "bytea_output",
    "extra_float_digits",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "max_connections",
    "block_size",
];

/// The setting `SHOW` names, when it is one of [`FIXED_KIND_SETTINGS`].
fn fixed_kind_setting(variable: &[Ident]) -> Option<&'static str> {
    let words: Vec<String> = variable.iter().map(fold_ident).collect();
    let name = match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["transaction", "isolation", "level"] => "transaction_isolation".to_string(),
        [one] => (*one).to_string(),
        _ => return None,
    };
    FIXED_KIND_SETTINGS.iter().copied().find(|s| *s == name)
}

/// The lineage of one parsed statement.
///
/// Statements that return no rows (plain `INSERT`/`UPDATE`/`DELETE`/`MERGE`, DDL, `SET`,
/// `BEGIN` …) give no outputs. `DECLARE … CURSOR FOR q` and `PREPARE p AS s` give the lineage
/// of `q` and `s` (for the proxy to use on `FETCH`/`EXECUTE`); `EXPLAIN` gives the single
/// `QUERY PLAN` column; `COPY … TO STDOUT` gives the copied columns.
///
/// # Errors
///
/// [`LineageError::Unsupported`] for `SHOW`, `FETCH`, `EXECUTE`, `CALL` and other statements
/// returning rows whose shape cannot be known, for functions that run SQL given as text
/// (`query_to_xml`, `dblink` …) and for syntax of other dialects; [`LineageError::TooDeep`] and
/// [`LineageError::TooComplex`] for statements too deep or too large to analyse.
pub fn lineage(stmt: &Statement) -> Result<Lineage, LineageError> {
    let mut a = Analyzer::default();
    let d = a.statement(stmt)?;
    for out in &d.outputs {
        match out {
            Output::Column { sources, .. } => a.referenced.extend(sources.iter().cloned()),
            Output::Star { tables } => {
                a.referenced.extend(tables.iter().map(|t| ColumnRef::of_table(t, None)));
            }
        }
    }
    let mut written = a.written.sources;
    if a.written.opaque {
        written.extend(a.referenced.iter().cloned());
    }
    let mut chooses = a.chosen.sources;
    if a.chosen.opaque {
        chooses.extend(a.referenced.iter().cloned());
    }
    let mut looked_up = a.looked_up;
    looked_up.retain(|r| !chooses.contains(r));
    Ok(Lineage {
        outputs: d.outputs,
        exact: d.exact,
        referenced: a.referenced,
        written,
        chooses,
        looked_up,
        chooses_unknown: a.choice_unknown,
    })
}

/// Parses `sql` with the PostgreSQL dialect and returns the lineage of each statement, in order.
///
/// # Errors
///
/// [`LineageError::Parse`] if the text does not parse, else the first error of [`lineage`].
pub fn lineage_sql(sql: &str) -> Result<Vec<Lineage>, LineageError> {
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(LineageError::Parse)?;
    stmts.iter().map(lineage).collect()
}

/// Folds an identifier the way PostgreSQL does: unquoted ones lower-cased (ASCII only), quoted
/// ones kept, both truncated to 63 bytes on a character boundary.
pub fn fold_ident(ident: &Ident) -> String {
    let mut s = match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.value.clone(),
    };
    if s.len() > MAX_IDENT_BYTES {
        let mut end = MAX_IDENT_BYTES;
        while end > 0 && !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Truncates a name to 63 bytes on a character boundary, as PostgreSQL does.
fn truncate_name(mut s: String) -> String {
    if s.len() > MAX_IDENT_BYTES {
        let mut end = MAX_IDENT_BYTES;
        while end > 0 && !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The body of a `U&"…"` identifier as PostgreSQL decodes it with the default escape character
/// (`str_udeescape` in `parser.c`): `\XXXX` and `\+XXXXXX` code points, UTF-16 surrogate pairs
/// written as two escapes, `\\` for a backslash. `None` when it has no escape (it reads the same
/// either way) or one PostgreSQL rejects (then it cannot be a `U&` identifier).
fn unicode_unescaped(body: &str) -> Option<String> {
    if !body.contains('\\') {
        return None;
    }
    let hex = |s: &str| -> Option<u32> {
        s.bytes().all(|b| b.is_ascii_hexdigit()).then(|| u32::from_str_radix(s, 16).ok()).flatten()
    };
    let mut out = String::with_capacity(body.len());
    let mut pair_first: Option<u32> = None;
    let mut rest = body;
    while let Some(c) = rest.chars().next() {
        if c != '\\' {
            if pair_first.is_some() {
                return None;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let after = &rest[1..];
        let (code, len) = if let Some(tail) = after.strip_prefix('\\') {
            if pair_first.is_some() {
                return None;
            }
            out.push('\\');
            rest = tail;
            continue;
        } else if let Some(code) = after.get(..4).and_then(hex) {
            (code, 5)
        } else if let Some(code) = after.strip_prefix('+').and_then(|a| a.get(..6)).and_then(hex) {
            (code, 8)
        } else {
            return None;
        };
        if code == 0 || code > 0x10_FFFF {
            return None;
        }
        let code = match (pair_first.take(), code) {
            (Some(first), 0xDC00..=0xDFFF) => 0x10000 + ((first - 0xD800) << 10) + (code - 0xDC00),
            (Some(_), _) | (None, 0xDC00..=0xDFFF) => return None,
            (None, 0xD800..=0xDBFF) => {
                pair_first = Some(code);
                rest = &rest[len..];
                continue;
            }
            (None, code) => code,
        };
        out.push(char::from_u32(code)?);
        rest = &rest[len..];
    }
    if pair_first.is_some() {
        return None;
    }
    Some(truncate_name(out))
}

/// The names an identifier may have: folded as written and, for a quoted one with escapes, as
/// PostgreSQL decodes it after `U&` (sqlparser reads `U&"d\0061ta"` as `U & "d\0061ta"`, so
/// which one it is cannot be told here).
fn ident_names(id: &Ident) -> Vec<String> {
    let mut names = vec![fold_ident(id)];
    if id.quote_style == Some('"')
        && let Some(decoded) = unicode_unescaped(&id.value)
        && decoded != names[0]
    {
        names.push(decoded);
    }
    names
}

/// Every reading of a dotted name whose parts may be `U&` identifiers ([`ident_names`]); only
/// the last four parts (the most PostgreSQL accepts) have more than one.
fn name_variants<'a>(parts: impl ExactSizeIterator<Item = &'a Ident>) -> Vec<Vec<String>> {
    let skip = parts.len().saturating_sub(4);
    let mut variants = vec![Vec::new()];
    for (i, part) in parts.enumerate() {
        let names = if i < skip { vec![fold_ident(part)] } else { ident_names(part) };
        variants = variants
            .into_iter()
            .flat_map(|v| {
                names.iter().map(move |n| {
                    let mut v = v.clone();
                    v.push(n.clone());
                    v
                })
            })
            .collect();
    }
    variants
}

// ---------------------------------------------------------------------------------------------
// Internal model
// ---------------------------------------------------------------------------------------------

/// Sources gathered for one expression.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Acc {
    sources: BTreeSet<ColumnRef>,
    opaque: bool,
    /// The sources whose values reach the expression unchanged, on every path (a subset of
    /// `sources`): see [`Output::Column::plain`].
    plain: BTreeSet<ColumnRef>,
}

impl Acc {
    fn merge(&mut self, other: &Acc) {
        for s in &other.sources {
            let new = self.sources.insert(s.clone());
            if !other.plain.contains(s) {
                self.plain.remove(s);
            } else if new {
                self.plain.insert(s.clone());
            }
        }
        self.opaque |= other.opaque;
    }

    /// Adds a source whose values reach the expression unchanged.
    fn add_plain(&mut self, r: ColumnRef) {
        if self.sources.insert(r.clone()) {
            self.plain.insert(r);
        }
    }

    /// Adds a source the expression computes something from.
    fn add_computed(&mut self, r: ColumnRef) {
        self.plain.remove(&r);
        self.sources.insert(r);
    }

    /// Something is computed from every source gathered so far.
    fn computed(&mut self) {
        self.plain.clear();
    }

    /// Adds what an output item derives from: a column's sources, or a star's whole tables.
    fn add_output(&mut self, out: &Output) {
        match out {
            Output::Column { sources, opaque, plain, .. } => {
                for s in sources {
                    if *plain {
                        self.add_plain(s.clone());
                    } else {
                        self.add_computed(s.clone());
                    }
                }
                self.opaque |= *opaque;
            }
            Output::Star { tables } => {
                for t in tables {
                    self.add_computed(ColumnRef::of_table(t, None));
                }
            }
        }
    }

    fn into_column(self, name: Option<String>) -> Output {
        let plain = self.plain.len() == self.sources.len();
        Output::Column { name, sources: self.sources, opaque: self.opaque, plain }
    }
}

/// The outputs of a query, a derived table or a CTE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Derived {
    outputs: Vec<Output>,
    exact: bool,
}

impl Derived {
    fn exact(outputs: Vec<Output>) -> Self {
        Self { outputs, exact: true }
    }

    /// Everything any output derives from.
    fn all(&self) -> Acc {
        let mut acc = Acc::default();
        for out in &self.outputs {
            acc.add_output(out);
        }
        acc
    }

    /// Applies a column alias list (`AS s(a, b)`, `WITH x(a, b)`): renames the first outputs by
    /// position when positions are known, else gives every alias all the sources.
    fn renamed(mut self, names: &[String]) -> Self {
        if names.is_empty() {
            return self;
        }
        let positional = self.exact
            && self.outputs.len() >= names.len()
            && self.outputs.iter().take(names.len()).all(|o| matches!(o, Output::Column { .. }));
        if positional {
            for (out, new) in self.outputs.iter_mut().zip(names) {
                if let Output::Column { name, .. } = out {
                    *name = Some(new.clone());
                }
            }
            return self;
        }
        let mut all = self.all();
        all.computed();
        let mut outputs: Vec<Output> =
            names.iter().map(|n| all.clone().into_column(Some(n.clone()))).collect();
        outputs.append(&mut self.outputs);
        Self { outputs, exact: false }
    }

    /// Looks a column name up among the outputs. Returns `(definite, maybe)`: a named output
    /// matched, or a star or an output of unknown name may hold it.
    /// When the outputs are not known exactly (a function's row, a star over something
    /// unknown), any of them may hold the name, whatever it is called here.
    fn column(&self, c: &str, acc: &mut Acc) -> (bool, bool) {
        let (mut definite, mut maybe) = (false, !self.exact);
        for out in &self.outputs {
            match out {
                Output::Column { name: Some(n), .. } if n == c => {
                    acc.add_output(out);
                    definite = true;
                }
                Output::Column { name: Some(_), .. } if self.exact => {}
                Output::Column { .. } => {
                    acc.add_output(out);
                    maybe = true;
                }
                Output::Star { tables } => {
                    for t in tables {
                        acc.add_plain(ColumnRef::of_table(t, Some(c)));
                    }
                    maybe = true;
                }
            }
        }
        (definite, maybe)
    }
}

/// Something in a FROM clause (or a DML target).
#[derive(Debug, Clone)]
struct Relation {
    /// The name it is referred to by (its alias, else its table or CTE name).
    name: Option<String>,
    /// The schema it was written with, for `schema.table.column` references (`None` if aliased).
    schema: Option<String>,
    /// Whether it has an alias (then `schema.table.column` cannot reach it).
    aliased: bool,
    /// Added by a FROM list still being analysed: only a LATERAL item (or a function) of that
    /// list may see it (PostgreSQL's `p_lateral_only`).
    lateral_only: bool,
    kind: RelKind,
}

#[derive(Debug, Clone)]
enum RelKind {
    /// A base table or view.
    Base(TableRef),
    /// A derived table, a CTE or a base table with a column alias list.
    Derived(Derived),
    /// A table function: every column derives from all its arguments. `columns` are the alias
    /// list's names; `complete` when that list is a full column definition list.
    Func { acc: Acc, columns: Vec<String>, complete: bool },
    /// An aliased parenthesized join; `merged` when it merges columns (`USING`, `NATURAL`).
    Join { members: Vec<Relation>, merged: bool },
}

impl Relation {
    /// Looks a column up in this relation. Returns `(definite, maybe)` as [`Derived::column`].
    fn column(&self, c: &str, acc: &mut Acc) -> (bool, bool) {
        match &self.kind {
            RelKind::Base(t) => {
                acc.add_plain(ColumnRef::of_table(t, Some(c)));
                (false, true)
            }
            RelKind::Derived(d) => d.column(c, acc),
            RelKind::Func { acc: f, columns, complete } => {
                // `func_relation` made every source computed.
                if columns.iter().any(|n| n == c) {
                    acc.merge(f);
                    (true, false)
                } else if *complete {
                    (false, false)
                } else {
                    acc.merge(f);
                    (false, true)
                }
            }
            RelKind::Join { members, .. } => {
                let (mut definite, mut maybe) = (false, false);
                for m in members {
                    let (d, m) = m.column(c, acc);
                    definite |= d;
                    maybe |= m;
                }
                (definite, maybe)
            }
        }
    }

    /// Adds everything a whole-row reference to this relation derives from.
    fn whole_row(&self, acc: &mut Acc) {
        match &self.kind {
            RelKind::Base(t) => acc.add_computed(ColumnRef::of_table(t, None)),
            RelKind::Derived(d) => {
                let mut all = d.all();
                all.computed();
                acc.merge(&all);
            }
            RelKind::Func { acc: f, .. } => acc.merge(f),
            RelKind::Join { members, .. } => {
                for m in members {
                    m.whole_row(acc);
                }
            }
        }
    }

    /// Adds everything a whole-row reference derives from, except base tables' rows (for a
    /// join, its members' that are not base tables), and the columns of stars: a star's columns
    /// have their tables' names, so [`Derived::column`] already added the one a name may be.
    fn computed_rows(&self, acc: &mut Acc) {
        match &self.kind {
            RelKind::Base(_) => {}
            RelKind::Derived(d) => {
                let mut rows = Acc::default();
                for out in d.outputs.iter().filter(|o| matches!(o, Output::Column { .. })) {
                    rows.add_output(out);
                }
                rows.computed();
                acc.merge(&rows);
            }
            RelKind::Join { members, .. } => members.iter().for_each(|m| m.computed_rows(acc)),
            RelKind::Func { .. } => self.whole_row(acc),
        }
    }

    /// Appends the expansion of `rel.*` to `out`; returns whether the positions are exact.
    fn star(&self, out: &mut Vec<Output>) -> bool {
        match &self.kind {
            RelKind::Base(t) => {
                push_star(out, t.clone());
                true
            }
            RelKind::Derived(d) => {
                for o in &d.outputs {
                    match o {
                        Output::Star { tables } => {
                            for t in tables {
                                push_star(out, t.clone());
                            }
                        }
                        Output::Column { .. } => out.push(o.clone()),
                    }
                }
                d.exact
            }
            RelKind::Func { acc, columns, complete } => {
                if columns.is_empty() {
                    out.push(acc.clone().into_column(self.name.clone()));
                } else {
                    out.extend(columns.iter().map(|c| acc.clone().into_column(Some(c.clone()))));
                }
                *complete
            }
            RelKind::Join { members, merged } => {
                let mut exact = !merged;
                for m in members {
                    exact &= m.star(out);
                }
                exact
            }
        }
    }

    /// Whether a qualifier (`t`, `s.t` or `db.s.t`) names this relation.
    fn matches(&self, qualifier: &[String]) -> bool {
        let Some((table, rest)) = qualifier.split_last() else { return false };
        if self.name.as_deref() != Some(table.as_str()) {
            return false;
        }
        match rest.last() {
            None => true,
            Some(schema) => !self.aliased && self.schema.as_ref().is_none_or(|s| s == schema),
        }
    }
}

fn push_star(out: &mut Vec<Output>, t: TableRef) {
    if let Some(Output::Star { tables }) = out.last_mut() {
        tables.push(t);
    } else {
        out.push(Output::Star { tables: vec![t] });
    }
}

/// One query level's FROM scope.
#[derive(Debug, Default)]
struct Level {
    rels: Vec<Relation>,
    /// Some join merges columns (`USING`, `NATURAL`), so `*` does not line up.
    merged: bool,
    /// Sources of the named windows (`WINDOW w AS (…)`) of this level.
    windows: Acc,
    /// The FROM item being analysed is LATERAL or a function: it sees the [`Relation::lateral_only`]
    /// relations of this level (PostgreSQL's `p_lateral_active`).
    lateral: bool,
}

impl Level {
    /// The relations a name in scope of this level may refer to.
    fn visible(&self) -> impl Iterator<Item = &Relation> {
        self.rels.iter().filter(|r| self.lateral || !r.lateral_only)
    }

    /// The FROM list is complete: every clause after it sees all of it.
    fn complete_from(&mut self) {
        for rel in &mut self.rels {
            rel.lateral_only = false;
        }
    }
}

/// Combines the outputs of two set-operation branches (or two rounds of a recursive CTE):
/// output i is the union of both outputs i, names from the left.
fn combine(left: Derived, right: Derived) -> Derived {
    let aligned = left.outputs.len() == right.outputs.len()
        && left.outputs.iter().zip(&right.outputs).all(|pair| match pair {
            (Output::Column { .. }, Output::Column { .. }) => true,
            (Output::Star { tables: a }, Output::Star { tables: b }) => a == b,
            _ => false,
        });
    let exact = left.exact && right.exact;
    if aligned {
        let outputs = left
            .outputs
            .into_iter()
            .zip(&right.outputs)
            .map(|(l, r)| match &l {
                Output::Column { name, .. } => {
                    let name = name.clone();
                    let mut acc = Acc::default();
                    acc.add_output(&l);
                    acc.add_output(r);
                    acc.into_column(name)
                }
                Output::Star { .. } => l,
            })
            .collect();
        return Derived { outputs, exact };
    }
    let all_right = right.all();
    let mut outputs: Vec<Output> = left
        .outputs
        .iter()
        .map(|l| {
            let mut acc = Acc::default();
            acc.add_output(l);
            acc.merge(&all_right);
            acc.computed();
            let name = match l {
                Output::Column { name, .. } => name.clone(),
                Output::Star { .. } => None,
            };
            acc.into_column(name)
        })
        .collect();
    if outputs.is_empty() && !right.outputs.is_empty() {
        let mut all_right = all_right;
        all_right.computed();
        outputs.push(all_right.into_column(None));
    }
    Derived { outputs, exact: false }
}

/// `e` without the parentheses around it.
fn unnested(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => unnested(inner),
        e => e,
    }
}

/// The name PostgreSQL gives an unaliased output column (`FigureColnameInternal` in
/// `parse_target.c`), with its strength: 2 for a real name, 1 for a fallback (`case`, a cast's
/// type), 0 for `?column?`. `None` when it cannot be told here: a wrong name would let a
/// reference to the real one resolve elsewhere, where no name only makes the output a candidate
/// for every reference.
fn figure_name(e: &Expr) -> Option<(String, u8)> {
    let named = |s: &str| Some((s.to_owned(), 2));
    let unnamed = || Some(("?column?".to_owned(), 0));
    match e {
        Expr::Identifier(id) => Some((fold_ident(id), 2)),
        Expr::CompoundIdentifier(parts) => parts.last().map(|id| (fold_ident(id), 2)),
        // `(t.*)`: the last field name, ignoring `*`.
        Expr::QualifiedWildcard(name, _) => function_name(name).map(|n| (n, 2)),
        // sqlparser reads the subquery `(VALUES (1))` as a call of `values`.
        Expr::Function(_) if is_values_call(e) => named("column1"),
        // `treat(x AS t)` is named after the type by PostgreSQL's grammar.
        Expr::Function(f) if function_name(&f.name).as_deref() == Some("treat") => None,
        Expr::Function(f) => function_name(&f.name).map(|n| (n, 2)),
        Expr::Tuple(items) if items.iter().any(is_values_call) => None,
        Expr::Nested(inner) | Expr::Collate { expr: inner, .. } => figure_name(inner),
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } => {
            match figure_name(expr)? {
                strong @ (_, 2) => Some(strong),
                _ => type_name(data_type).map(|n| (n, 1)),
            }
        }
        Expr::TypedString(t) => type_name(&t.data_type).map(|n| (n, 1)),
        Expr::Interval(_) => Some(("interval".to_owned(), 1)),
        // The last field name of the chain, ignoring subscripts and `*`, else the root's.
        Expr::CompoundFieldAccess { root, access_chain } => {
            for access in access_chain.iter().rev() {
                match access {
                    AccessExpr::Dot(Expr::Identifier(id)) => return Some((fold_ident(id), 2)),
                    AccessExpr::Dot(Expr::Wildcard(_)) | AccessExpr::Subscript(_) => {}
                    AccessExpr::Dot(_) => return None,
                }
            }
            figure_name(root)
        }
        Expr::Case { else_result, .. } => match else_result.as_deref() {
            None => Some(("case".to_owned(), 1)),
            Some(e) => match figure_name(e)? {
                strong @ (_, 2) => Some(strong),
                _ => Some(("case".to_owned(), 1)),
            },
        },
        Expr::Exists { negated: false, .. } => named("exists"),
        // A scalar subquery is named by its column, even `?column?`, as a strong name.
        Expr::Subquery(q) => first_output_name(q).map(|(n, _)| (n, 2)),
        Expr::Array(_) => named("array"),
        Expr::Tuple(_) => named("row"),
        // Special syntax that PostgreSQL's grammar turns into function calls.
        Expr::Trim { trim_where, .. } => named(match trim_where {
            Some(TrimWhereField::Leading) => "ltrim",
            Some(TrimWhereField::Trailing) => "rtrim",
            Some(TrimWhereField::Both) | None => "btrim",
        }),
        Expr::Substring { .. } => named("substring"),
        Expr::Position { .. } => named("position"),
        Expr::Overlay { .. } => named("overlay"),
        Expr::Extract { .. } => named("extract"),
        Expr::AtTimeZone { .. } => named("timezone"),
        Expr::Ceil { field: CeilFloorKind::DateTimeField(DateTimeField::NoDateTime), .. } => named("ceil"),
        Expr::Floor { field: CeilFloorKind::DateTimeField(DateTimeField::NoDateTime), .. } => named("floor"),
        Expr::IsNormalized { negated: false, .. } => named("is_normalized"),
        Expr::BinaryOp { op: BinaryOperator::Overlaps, .. } => named("overlaps"),
        // `U&"…"` is read as `U & "…"`: PostgreSQL's tree may be a column, named by it.
        Expr::BinaryOp { op: BinaryOperator::BitwiseAnd, .. } => None,
        Expr::Value(_)
        | Expr::BinaryOp { .. }
        | Expr::UnaryOp { .. }
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsNotTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotUnknown(_)
        | Expr::IsDistinctFrom(..)
        | Expr::IsNotDistinctFrom(..)
        | Expr::IsNormalized { negated: true, .. }
        | Expr::Exists { negated: true, .. }
        | Expr::Like { .. }
        | Expr::ILike { .. }
        | Expr::SimilarTo { .. }
        | Expr::Between { .. }
        | Expr::In { .. }
        | Expr::AnyOp { .. }
        | Expr::AllOp { .. } => unnamed(),
        _ => None,
    }
}

/// `values(…)`: `VALUES` is reserved in PostgreSQL, so this is sqlparser's reading of a
/// `(VALUES (…), …)` subquery (whose other rows it reads as a row around it).
fn is_values_call(e: &Expr) -> bool {
    matches!(e, Expr::Function(f) if matches!(f.name.0.as_slice(),
        [ObjectNamePart::Identifier(id)] if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("values")))
}

/// The name PostgreSQL gives a cast's type in a column name: the last part of the type's name
/// as its grammar builds it (`int` is `int4`, `character varying` is `varchar`). `None` for
/// types it is not sure of.
fn type_name(t: &DataType) -> Option<String> {
    let n = match t {
        DataType::Custom(name, _) => return function_name(name),
        DataType::Array(
            ArrayElemTypeDef::SquareBracket(inner, _)
            | ArrayElemTypeDef::AngleBracket(inner)
            | ArrayElemTypeDef::Parenthesis(inner)
            | ArrayElemTypeDef::Qualified(inner, _),
        ) => return type_name(inner),
        DataType::Text => "text",
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => "int4",
        DataType::BigInt(_) | DataType::Int8(_) => "int8",
        DataType::SmallInt(_) | DataType::Int2(_) => "int2",
        DataType::Real | DataType::Float4 => "float4",
        DataType::DoublePrecision | DataType::Float8 => "float8",
        DataType::Float(ExactNumberInfo::None) => "float8",
        DataType::Float(ExactNumberInfo::Precision(p)) => match p {
            1..=24 => "float4",
            25..=53 => "float8",
            _ => return None,
        },
        DataType::Numeric(_) | DataType::Decimal(_) | DataType::Dec(_) => "numeric",
        DataType::Bool | DataType::Boolean => "bool",
        DataType::Varchar(_) | DataType::CharacterVarying(_) | DataType::CharVarying(_) => "varchar",
        DataType::Char(_) | DataType::Character(_) => "bpchar",
        DataType::Date => "date",
        DataType::Time(_, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => "time",
        DataType::Time(_, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => "timetz",
        DataType::Timestamp(_, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => "timestamp",
        DataType::Timestamp(_, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => "timestamptz",
        DataType::Interval { .. } => "interval",
        DataType::JSON => "json",
        DataType::JSONB => "jsonb",
        DataType::Uuid => "uuid",
        DataType::Bytea => "bytea",
        DataType::Regclass => "regclass",
        DataType::Bit(_) => "bit",
        DataType::BitVarying(_) | DataType::VarBit(_) => "varbit",
        DataType::TsVector => "tsvector",
        DataType::TsQuery => "tsquery",
        _ => return None,
    };
    Some(n.to_owned())
}

/// The name of a subquery's first output, read from its leftmost SELECT.
fn first_output_name(q: &Query) -> Option<(String, u8)> {
    let mut body = q.body.as_ref();
    loop {
        match body {
            SetExpr::SetOperation { left, .. } => body = left,
            SetExpr::Query(inner) => body = &inner.body,
            SetExpr::Select(s) => {
                return match s.projection.first()? {
                    SelectItem::UnnamedExpr(e) => figure_name(e),
                    SelectItem::ExprWithAlias { alias, .. } => Some((fold_ident(alias), 2)),
                    _ => None,
                };
            }
            SetExpr::Values(_) => return Some(("column1".to_owned(), 2)),
            _ => return None,
        }
    }
}

fn output_name(e: &Expr) -> Option<String> {
    figure_name(e).map(|(n, _)| n)
}

fn object_idents(name: &ObjectName) -> Result<Vec<String>, LineageError> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => Ok(fold_ident(id)),
            ObjectNamePart::Function(_) => Err(LineageError::Unsupported(format!("the name {name}"))),
        })
        .collect()
}

fn table_ref(name: &ObjectName) -> Result<TableRef, LineageError> {
    let parts = object_idents(name)?;
    match parts.as_slice() {
        [t] => Ok(TableRef { schema: None, table: t.clone() }),
        [s, t] | [_, s, t] => Ok(TableRef { schema: Some(s.clone()), table: t.clone() }),
        _ => Err(LineageError::Unsupported(format!("the table name {name}"))),
    }
}

fn alias_columns(alias: Option<&TableAlias>) -> Vec<String> {
    alias.map(|a| a.columns.iter().map(|c| fold_ident(&c.name)).collect()).unwrap_or_default()
}

fn function_name(name: &ObjectName) -> Option<String> {
    name.0.last().and_then(ObjectNamePart::as_ident).map(fold_ident)
}

/// Refuses the functions that run SQL given as text, by any name the call may have (a `U&`
/// name as PostgreSQL decodes it too).
fn check_function(name: &ObjectName) -> Result<(), LineageError> {
    let names = name.0.last().and_then(ObjectNamePart::as_ident).map(ident_names).unwrap_or_default();
    match names.iter().find(|n| SQL_EXECUTING_FUNCTIONS.contains(&n.as_str())) {
        Some(n) => {
            Err(LineageError::Unsupported(format!("the function {n}, which reads tables it is not given")))
        }
        None => Ok(()),
    }
}

/// Is the function one of [`STORING_FUNCTIONS`], by any name the call may have?
fn stores_arguments(name: &ObjectName) -> bool {
    let names = name.0.last().and_then(ObjectNamePart::as_ident).map(ident_names).unwrap_or_default();
    names.iter().any(|n| STORING_FUNCTIONS.contains(&n.as_str()))
}

/// Does `ALTER SCHEMA` rename the schema?
pub fn renames_schema(a: &sqlparser::ast::AlterSchema) -> bool {
    a.operations.iter().any(|o| matches!(o, AlterSchemaOperation::Rename { .. }))
}

/// `U&"…"` is read by sqlparser as `U & "…"`: the quoted identifier is not decoded.
fn is_unicode_ident(left: &Expr, op: &BinaryOperator) -> bool {
    matches!(op, BinaryOperator::BitwiseAnd)
        && matches!(left, Expr::Identifier(id) if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("u"))
}

// ---------------------------------------------------------------------------------------------
// Analyzer
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Analyzer {
    /// FROM scopes, innermost last.
    levels: Vec<Level>,
    /// CTEs in scope, innermost last.
    ctes: Vec<(String, Derived)>,
    referenced: BTreeSet<ColumnRef>,
    /// What stored values derive from (see [`Lineage::written`]).
    written: Acc,
    /// Analysing a clause whose values choose rows: names resolved now are
    /// [`Lineage::chooses`] (or [`Lineage::looked_up`]).
    choosing: bool,
    /// Resolving the column side of an equality lookup ([`lookup_column`]).
    lookup: bool,
    /// What chooses rows other than by equality lookups; `opaque` when a name there could not
    /// be resolved.
    chosen: Acc,
    /// What chooses rows by equality lookups only.
    looked_up: BTreeSet<ColumnRef>,
    /// Part of the statement could not be analysed for what chooses rows.
    choice_unknown: bool,
    depth: usize,
    steps: usize,
}

impl Analyzer {
    fn enter(&mut self) -> Result<(), LineageError> {
        self.depth += 1;
        self.steps += 1;
        if self.depth > MAX_DEPTH {
            return Err(LineageError::TooDeep);
        }
        if self.steps > MAX_STEPS {
            return Err(LineageError::TooComplex);
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    fn note(&mut self, acc: &Acc) {
        self.referenced.extend(acc.sources.iter().cloned());
    }

    /// Everything `found` derives from chooses rows.
    fn chose(&mut self, found: &Acc) {
        self.chosen.sources.extend(found.sources.iter().cloned());
        self.chosen.opaque |= found.opaque;
    }

    /// Runs `f` in a clause whose values choose rows.
    fn in_choosing<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, LineageError>,
    ) -> Result<T, LineageError> {
        let was = std::mem::replace(&mut self.choosing, true);
        let r = f(self);
        self.choosing = was;
        r
    }

    /// Runs `f` outside any choosing clause: a query nested in one (its own clauses choose
    /// rows, and what it returns is accounted for by its caller), a FROM item.
    fn in_values<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, LineageError>,
    ) -> Result<T, LineageError> {
        let was = (std::mem::replace(&mut self.choosing, false), std::mem::replace(&mut self.lookup, false));
        let r = f(self);
        (self.choosing, self.lookup) = was;
        r
    }

    /// Resolves an expression whose values choose rows (only for `referenced` and `chosen`).
    fn choosing_expr(&mut self, e: &Expr) -> Result<(), LineageError> {
        self.in_choosing(|a| a.referenced_expr(e))
    }

    /// Analyses a part of the statement that contributes only what it references and what
    /// chooses rows (the statement under EXPLAIN, a view's query): when it cannot be analysed,
    /// the rest of the statement still is, and [`Lineage::chooses_unknown`] is set.
    fn contained(&mut self, f: impl FnOnce(&mut Self) -> Result<(), LineageError>) {
        let depth = self.depth;
        let (levels, ctes) = (self.levels.len(), self.ctes.len());
        let flags = (self.choosing, self.lookup);
        if f(self).is_err() {
            self.depth = depth;
            self.levels.truncate(levels);
            self.ctes.truncate(ctes);
            (self.choosing, self.lookup) = flags;
            self.choice_unknown = true;
        }
    }

    /// Sort and grouping keys (`ORDER BY`, `GROUP BY`, `DISTINCT ON`): they choose rows, and an
    /// output name or position among them stands for that output of `outputs`.
    fn sort_keys<'e>(
        &mut self,
        keys: impl IntoIterator<Item = &'e Expr>,
        outputs: &Derived,
    ) -> Result<(), LineageError> {
        for e in keys {
            self.by_output(e, outputs);
            self.choosing_expr(e)?;
        }
        Ok(())
    }

    /// `ORDER BY 2`, `GROUP BY e` (an output's name): that output chooses rows. A position
    /// past a star, or past the end, counts every output.
    fn by_output(&mut self, e: &Expr, outputs: &Derived) {
        match unnested(e) {
            Expr::Value(v) => {
                let Ok(n) = v.value.to_string().parse::<usize>() else { return };
                let mut at = 0;
                for out in &outputs.outputs {
                    match out {
                        Output::Column { .. } => {
                            at += 1;
                            if at == n {
                                let mut acc = Acc::default();
                                acc.add_output(out);
                                self.chose(&acc);
                                return;
                            }
                        }
                        Output::Star { .. } => break,
                    }
                }
                self.chose(&outputs.all());
            }
            Expr::Identifier(id) => {
                let names = ident_names(id);
                let mut acc = Acc::default();
                for out in &outputs.outputs {
                    if let Output::Column { name: Some(n), .. } = out
                        && names.contains(n)
                    {
                        acc.add_output(out);
                    }
                }
                self.chose(&acc);
            }
            _ => {}
        }
    }

    fn level_mut(&mut self) -> Result<&mut Level, LineageError> {
        self.levels.last_mut().ok_or_else(|| LineageError::Unsupported("a relation outside any scope".into()))
    }

    // ---- statements ------------------------------------------------------------------------

    fn statement(&mut self, stmt: &Statement) -> Result<Derived, LineageError> {
        self.enter()?;
        let r = self.statement_inner(stmt);
        self.leave();
        r
    }

    fn statement_inner(&mut self, stmt: &Statement) -> Result<Derived, LineageError> {
        match stmt {
            Statement::Query(q) => {
                let d = self.query(q)?;
                Ok(if is_select_into(q) {
                    self.written.merge(&d.all());
                    Derived::exact(vec![])
                } else {
                    d
                })
            }
            // A view's query chooses rows whenever the view is read; it returns none now.
            Statement::CreateView(cv) => {
                self.contained(|a| a.query(&cv.query).map(drop));
                Ok(Derived::exact(vec![]))
            }
            Statement::CreateTable(ct) if ct.query.is_some() => {
                if let Some(q) = &ct.query {
                    let d = self.query(q)?;
                    self.written.merge(&d.all());
                }
                Ok(Derived::exact(vec![]))
            }
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => {
                self.dml(stmt)
            }
            Statement::Declare { stmts, .. } => match stmts.iter().find_map(|d| d.for_query.as_deref()) {
                Some(q) => self.query(q),
                None => Ok(Derived::exact(vec![])),
            },
            Statement::Prepare { statement, .. } => self.statement(statement),
            Statement::Explain { statement, .. } => {
                // The plan is not data; the inner statement only contributes `referenced` and
                // what chooses its rows (the plan shows how many rows each step finds).
                self.contained(|a| a.statement(statement).map(drop));
                let plan = Output::Column {
                    name: Some("QUERY PLAN".into()),
                    sources: BTreeSet::new(),
                    opaque: false,
                    plain: false,
                };
                Ok(Derived::exact(vec![plan]))
            }
            Statement::Copy { source, to, target, .. } => {
                if !*to {
                    return Ok(Derived::exact(vec![]));
                }
                let d = match source {
                    CopySource::Query(q) => self.query(q)?,
                    CopySource::Table { table_name, columns } => {
                        let t = table_ref(table_name)?;
                        if columns.is_empty() {
                            Derived::exact(vec![Output::Star { tables: vec![t] }])
                        } else {
                            Derived::exact(
                                columns
                                    .iter()
                                    .map(|c| {
                                        let c = fold_ident(c);
                                        let sources = BTreeSet::from([ColumnRef::of_table(&t, Some(&c))]);
                                        Output::Column { name: Some(c), sources, opaque: false, plain: true }
                                    })
                                    .collect(),
                            )
                        }
                    }
                };
                Ok(if matches!(target, CopyTarget::Stdout) { d } else { Derived::exact(vec![]) })
            }
            // A setting whose value is one of a fixed few, a number or the server's own: no
            // session can put a masked value there (what drivers ask at connect, like JDBC's
            // `SHOW TRANSACTION ISOLATION LEVEL`). Any other setting (a custom one, or text such
            // as `application_name` that `set_config` could fill with a masked value) is unknown.
            Statement::ShowVariable { variable } => match fixed_kind_setting(variable) {
                Some(name) => Ok(Derived::exact(vec![Output::Column {
                    name: Some(name.to_string()),
                    sources: BTreeSet::new(),
                    opaque: false,
                    plain: true,
                }])),
                None => Err(LineageError::Unsupported("SHOW".into())),
            },
            Statement::ShowFunctions { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowProcessList { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowCharset(_)
            | Statement::ShowObjects(_)
            | Statement::ShowTables { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCollation { .. } => Err(LineageError::Unsupported("SHOW".into())),
            Statement::Fetch { .. } => Err(LineageError::Unsupported("FETCH".into())),
            Statement::Execute { .. } => Err(LineageError::Unsupported("EXECUTE".into())),
            Statement::Call(_) => Err(LineageError::Unsupported("CALL".into())),
            Statement::ExplainTable { .. } => Err(LineageError::Unsupported("DESCRIBE".into())),
            Statement::Pragma { .. } => Err(LineageError::Unsupported("PRAGMA".into())),
            Statement::AlterTable(at) => {
                self.alter_table(at)?;
                Ok(Derived::exact(vec![]))
            }
            Statement::AlterView(av) => {
                let t = table_ref(&av.name)?;
                match &av.operation {
                    AlterViewOperation::RenameColumn { old_column_name, .. } => {
                        let c = fold_ident(old_column_name);
                        self.written.sources.insert(ColumnRef::of_table(&t, Some(&c)));
                    }
                    AlterViewOperation::RenameTo { .. } | AlterViewOperation::SetSchema { .. } => {
                        self.written.sources.insert(ColumnRef::of_table(&t, None));
                    }
                    _ => {}
                }
                Ok(Derived::exact(vec![]))
            }
            // Every table of the schema changes name; which of them are masked by a pattern
            // naming the schema cannot be told here.
            Statement::AlterSchema(a) if renames_schema(a) => {
                Err(LineageError::Unsupported("ALTER SCHEMA ... RENAME".into()))
            }
            _ => Ok(Derived::exact(vec![])),
        }
    }

    /// What `ALTER TABLE` gives another identity: see [`Lineage::written`].
    fn alter_table(&mut self, at: &AlterTable) -> Result<(), LineageError> {
        let t = table_ref(&at.name)?;
        for op in &at.operations {
            match op {
                AlterTableOperation::RenameColumn { old_column_name: c, .. }
                | AlterTableOperation::ChangeColumn { old_name: c, .. } => {
                    let c = fold_ident(c);
                    self.written.sources.insert(ColumnRef::of_table(&t, Some(&c)));
                }
                AlterTableOperation::RenameTable { .. } => {
                    self.written.sources.insert(ColumnRef::of_table(&t, None));
                }
                AlterTableOperation::NoInherit { parent: other }
                | AlterTableOperation::DetachPartitionOf { partition: other, .. }
                | AlterTableOperation::SwapWith { table_name: other } => {
                    let other = table_ref(other)?;
                    self.written.sources.insert(ColumnRef::of_table(&t, None));
                    self.written.sources.insert(ColumnRef::of_table(&other, None));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// INSERT / UPDATE / DELETE / MERGE: the outputs of RETURNING.
    fn dml(&mut self, stmt: &Statement) -> Result<Derived, LineageError> {
        let mark = self.levels.len();
        let r = self.dml_inner(stmt);
        self.levels.truncate(mark);
        r
    }

    fn dml_inner(&mut self, stmt: &Statement) -> Result<Derived, LineageError> {
        // `extra`: what the statement writes into the target, hence what RETURNING may return.
        let mut extra = Acc::default();
        let returning = match stmt {
            Statement::Insert(ins) => {
                if !ins.multi_table_into_clauses.is_empty() || ins.multi_table_else_clause.is_some() {
                    return Err(LineageError::Unsupported("multi-table INSERT".into()));
                }
                if let Some(src) = &ins.source {
                    let d = self.query(src)?;
                    extra.merge(&d.all());
                }
                self.levels.push(Level::default());
                let table = match &ins.table {
                    TableObject::TableName(name) => table_ref(name)?,
                    TableObject::TableFunction(_) | TableObject::TableQuery(_) => {
                        return Err(LineageError::Unsupported("INSERT into a table function".into()));
                    }
                };
                let alias = ins.table_alias.as_ref().map(|a| fold_ident(&a.alias));
                let target = Relation {
                    name: Some(alias.clone().unwrap_or_else(|| table.table.clone())),
                    schema: if alias.is_some() { None } else { table.schema.clone() },
                    aliased: alias.is_some(),
                    lateral_only: false,
                    kind: RelKind::Base(table),
                };
                self.level_mut()?.rels.push(target);
                for a in &ins.assignments {
                    self.expr(&a.value, &mut extra)?;
                }
                match &ins.on {
                    Some(OnInsert::OnConflict(oc)) => {
                        if let OnConflictAction::DoUpdate(du) = &oc.action {
                            let excluded = Relation {
                                name: Some("excluded".into()),
                                schema: None,
                                aliased: true,
                                lateral_only: false,
                                kind: RelKind::Func { acc: extra.clone(), columns: vec![], complete: false },
                            };
                            self.level_mut()?.rels.push(excluded);
                            for a in &du.assignments {
                                self.expr(&a.value, &mut extra)?;
                            }
                            if let Some(sel) = &du.selection {
                                self.choosing_expr(sel)?;
                            }
                            self.level_mut()?.rels.pop();
                        }
                    }
                    Some(OnInsert::DuplicateKeyUpdate(assignments)) => {
                        for a in assignments {
                            self.expr(&a.value, &mut extra)?;
                        }
                    }
                    Some(_) | None => {}
                }
                ins.returning.as_deref().or(output_items(ins.output.as_ref()))
            }
            Statement::Update(up) => {
                self.levels.push(Level::default());
                self.add_from(&up.table)?;
                if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) = &up.from {
                    for twj in f {
                        self.add_from(twj)?;
                    }
                }
                // The FROM list does not see the target either, only LATERAL items do (and fail).
                self.level_mut()?.complete_from();
                for a in &up.assignments {
                    self.expr(&a.value, &mut extra)?;
                }
                if let Some(sel) = &up.selection {
                    self.choosing_expr(sel)?;
                }
                for o in &up.order_by {
                    self.in_choosing(|a| a.order_by_expr(o, &mut Acc::default()))?;
                }
                if let Some(l) = &up.limit {
                    self.choosing_expr(l)?;
                }
                up.returning.as_deref().or(output_items(up.output.as_ref()))
            }
            Statement::Delete(del) => {
                self.levels.push(Level::default());
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &del.from;
                for twj in from {
                    self.add_from(twj)?;
                }
                for twj in del.using.iter().flatten() {
                    self.add_from(twj)?;
                }
                self.level_mut()?.complete_from();
                if let Some(sel) = &del.selection {
                    self.choosing_expr(sel)?;
                }
                for o in &del.order_by {
                    self.in_choosing(|a| a.order_by_expr(o, &mut Acc::default()))?;
                }
                if let Some(l) = &del.limit {
                    self.choosing_expr(l)?;
                }
                del.returning.as_deref().or(output_items(del.output.as_ref()))
            }
            Statement::Merge(m) => {
                self.levels.push(Level::default());
                // The source does not see the target (PostgreSQL adds the target after it).
                for rel in self.table_factor(&m.table)? {
                    self.level_mut()?.rels.push(Relation { lateral_only: true, ..rel });
                }
                for rel in self.table_factor(&m.source)? {
                    self.level_mut()?.rels.push(Relation { lateral_only: true, ..rel });
                }
                self.level_mut()?.complete_from();
                self.choosing_expr(&m.on)?;
                for clause in &m.clauses {
                    if let Some(p) = &clause.predicate {
                        self.choosing_expr(p)?;
                    }
                    match &clause.action {
                        MergeAction::Insert(ins) => {
                            match &ins.kind {
                                MergeInsertKind::Values(v) => {
                                    let d = self.values(v)?;
                                    extra.merge(&d.all());
                                }
                                MergeInsertKind::Row | MergeInsertKind::Wildcard => {
                                    let mut all = Acc::default();
                                    if let Some(level) = self.levels.last() {
                                        for rel in &level.rels {
                                            rel.whole_row(&mut all);
                                        }
                                    }
                                    extra.merge(&all);
                                }
                            }
                            if let Some(p) = &ins.insert_predicate {
                                self.choosing_expr(p)?;
                            }
                        }
                        MergeAction::Update(up) => {
                            match &up.kind {
                                MergeUpdateKind::Set(assignments) => {
                                    for a in assignments {
                                        self.expr(&a.value, &mut extra)?;
                                    }
                                }
                                MergeUpdateKind::Wildcard => {
                                    let mut all = Acc::default();
                                    if let Some(level) = self.levels.last() {
                                        for rel in &level.rels {
                                            rel.whole_row(&mut all);
                                        }
                                    }
                                    extra.merge(&all);
                                }
                            }
                            for p in [&up.update_predicate, &up.delete_predicate].into_iter().flatten() {
                                self.choosing_expr(p)?;
                            }
                        }
                        MergeAction::Delete { .. } | MergeAction::DoNothing { .. } => {}
                    }
                }
                output_items(m.output.as_ref())
            }
            _ => return Err(LineageError::Unsupported("this statement as a data-modifying query".into())),
        };
        self.note(&extra);
        self.written.merge(&extra);
        match returning {
            None => Ok(Derived::exact(vec![])),
            Some(items) => {
                let extra = (extra != Acc::default()).then_some(extra);
                self.project(items, extra.as_ref())
            }
        }
    }

    // ---- queries ---------------------------------------------------------------------------

    fn query(&mut self, q: &Query) -> Result<Derived, LineageError> {
        self.enter()?;
        let mark = self.ctes.len();
        let r = self.query_inner(q);
        self.ctes.truncate(mark);
        self.leave();
        r
    }

    fn query_inner(&mut self, q: &Query) -> Result<Derived, LineageError> {
        if !q.pipe_operators.is_empty() {
            return Err(LineageError::Unsupported("pipe operators".into()));
        }
        if q.for_clause.is_some() {
            return Err(LineageError::Unsupported("FOR XML / FOR JSON".into()));
        }
        if let Some(with) = &q.with {
            if with.recursive && reads_a_later_sibling(&with.cte_tables) {
                return Err(LineageError::Unsupported(
                    "a WITH RECURSIVE query that reads a query defined after it".into(),
                ));
            }
            for cte in &with.cte_tables {
                self.cte(cte, with.recursive)?;
            }
        }
        let d = self.set_expr(&q.body, q.order_by.as_ref())?;
        // How many rows, and which, are returned.
        if let Some(limit) = &q.limit_clause {
            match limit {
                sqlparser::ast::LimitClause::LimitOffset { limit, offset, limit_by } => {
                    for e in limit.iter().chain(offset.as_ref().map(|o| &o.value)).chain(limit_by) {
                        self.choosing_expr(e)?;
                    }
                }
                sqlparser::ast::LimitClause::OffsetCommaLimit { offset, limit } => {
                    self.choosing_expr(offset)?;
                    self.choosing_expr(limit)?;
                }
            }
        }
        if let Some(e) = q.fetch.as_ref().and_then(|f| f.quantity.as_ref()) {
            self.choosing_expr(e)?;
        }
        Ok(d)
    }

    fn cte(&mut self, cte: &Cte, recursive: bool) -> Result<(), LineageError> {
        let name = fold_ident(&cte.alias.name);
        let columns: Vec<String> = cte.alias.columns.iter().map(|c| fold_ident(&c.name)).collect();
        if !recursive {
            let d = self.query(&cte.query)?.renamed(&columns);
            self.ctes.push((name, d));
            return Ok(());
        }
        // A recursive CTE sees itself: iterate from "no outputs" until its outputs stop growing.
        self.ctes.push((name.clone(), Derived::exact(vec![])));
        let mut current: Option<Derived> = None;
        let mut converged = false;
        for _ in 0..MAX_RECURSIVE_ROUNDS {
            let d = self.query(&cte.query)?.renamed(&columns);
            let next = match current.take() {
                None => d,
                Some(prev) => combine(prev.clone(), d),
            };
            let same = self.ctes.last().is_some_and(|(_, prev)| *prev == next);
            if let Some(slot) = self.ctes.last_mut() {
                slot.1 = next.clone();
            }
            current = Some(next);
            if same {
                converged = true;
                break;
            }
        }
        if !converged && let Some((_, d)) = self.ctes.last_mut() {
            for out in &mut d.outputs {
                if let Output::Column { opaque, plain, .. } = out {
                    *opaque = true;
                    *plain = false;
                }
            }
        }
        Ok(())
    }

    fn set_expr(&mut self, body: &SetExpr, order_by: Option<&OrderBy>) -> Result<Derived, LineageError> {
        self.enter()?;
        let r = self.set_expr_inner(body, order_by);
        self.leave();
        r
    }

    fn set_expr_inner(
        &mut self,
        body: &SetExpr,
        order_by: Option<&OrderBy>,
    ) -> Result<Derived, LineageError> {
        let d = match body {
            SetExpr::Select(s) => return self.select(s, order_by),
            SetExpr::Query(q) => self.query(q)?,
            SetExpr::SetOperation { .. } => {
                // Walk the left spine iteratively: long UNION chains are left-deep.
                let mut rights = Vec::new();
                let mut cur = body;
                let mut compares = false;
                while let SetExpr::SetOperation { left, right, op, set_quantifier } = cur {
                    // All but UNION ALL compare rows with each other, by every output.
                    compares |= !(matches!(op, SetOperator::Union)
                        && matches!(set_quantifier, SetQuantifier::All | SetQuantifier::AllByName));
                    rights.push(right.as_ref());
                    cur = left;
                }
                let mut d = self.set_expr(cur, None)?;
                for right in rights.into_iter().rev() {
                    let r = self.set_expr(right, None)?;
                    d = combine(d, r);
                }
                if compares {
                    self.chose(&d.all());
                }
                d
            }
            SetExpr::Values(v) => self.values(v)?,
            SetExpr::Insert(stmt) | SetExpr::Update(stmt) | SetExpr::Delete(stmt) | SetExpr::Merge(stmt) => {
                self.dml(stmt)?
            }
            SetExpr::Table(t) => {
                let Some(table) = &t.table_name else {
                    return Err(LineageError::Unsupported("TABLE without a name".into()));
                };
                let table = fold_ident(table);
                let schema = t.schema_name.as_ref().map(fold_ident);
                let cte = if schema.is_none() { self.find_cte(&table) } else { None };
                match cte {
                    Some(d) => d,
                    None => Derived::exact(vec![Output::Star { tables: vec![TableRef { schema, table }] }]),
                }
            }
        };
        // ORDER BY of a set operation names its outputs; only subqueries in it can reference.
        if let Some(ob) = order_by {
            self.sort_by(ob, &d)?;
        }
        Ok(d)
    }

    fn values(&mut self, v: &Values) -> Result<Derived, LineageError> {
        let width = v.rows.iter().map(|r| r.content.len()).max().unwrap_or(0);
        let mut accs = vec![Acc::default(); width];
        for row in &v.rows {
            for (e, acc) in row.content.iter().zip(accs.iter_mut()) {
                self.expr(e, acc)?;
            }
        }
        let outputs = accs
            .into_iter()
            .enumerate()
            .map(|(i, acc)| acc.into_column(Some(format!("column{}", i + 1))))
            .collect();
        Ok(Derived::exact(outputs))
    }

    fn find_cte(&self, name: &str) -> Option<Derived> {
        self.ctes.iter().rev().find(|(n, _)| n == name).map(|(_, d)| d.clone())
    }

    fn select(
        &mut self,
        s: &sqlparser::ast::Select,
        order_by: Option<&OrderBy>,
    ) -> Result<Derived, LineageError> {
        if !s.lateral_views.is_empty() {
            return Err(LineageError::Unsupported("LATERAL VIEW".into()));
        }
        if s.value_table_mode.is_some() {
            return Err(LineageError::Unsupported("SELECT AS STRUCT / VALUE".into()));
        }
        let mark = self.levels.len();
        self.levels.push(Level::default());
        let r = self.select_inner(s, order_by);
        self.levels.truncate(mark);
        r
    }

    fn select_inner(
        &mut self,
        s: &sqlparser::ast::Select,
        order_by: Option<&OrderBy>,
    ) -> Result<Derived, LineageError> {
        for twj in &s.from {
            self.add_from(twj)?;
        }
        self.level_mut()?.complete_from();
        let mut windows = Acc::default();
        for def in &s.named_window {
            if let NamedWindowExpr::WindowSpec(spec) = &def.1 {
                self.window_spec(spec, &mut windows)?;
            }
        }
        self.level_mut()?.windows = windows;
        let mut d = self.project(&s.projection, None)?;
        d.exact &= s.exclude.is_none();
        // Everything below chooses rows: which, how many, in which order.
        for e in [&s.prewhere, &s.selection, &s.having, &s.qualify].into_iter().flatten() {
            self.choosing_expr(e)?;
        }
        match &s.distinct {
            Some(Distinct::On(exprs)) => self.sort_keys(exprs, &d)?,
            // Rows are compared with each other by every output.
            Some(Distinct::Distinct) => self.chose(&d.all()),
            Some(Distinct::All) | None => {}
        }
        match &s.group_by {
            GroupByExpr::Expressions(exprs, _) => self.sort_keys(exprs, &d)?,
            GroupByExpr::All(_) => self.chose(&d.all()),
        }
        for e in s.cluster_by.iter().chain(&s.distribute_by) {
            self.choosing_expr(e)?;
        }
        for o in &s.sort_by {
            self.in_choosing(|a| a.order_by_expr(o, &mut Acc::default()))?;
        }
        for c in &s.connect_by {
            match c {
                ConnectByKind::ConnectBy { relationships, .. } => {
                    for e in relationships {
                        self.choosing_expr(e)?;
                    }
                }
                ConnectByKind::StartWith { condition, .. } => self.choosing_expr(condition)?,
            }
        }
        if let Some(ob) = order_by {
            self.sort_by(ob, &d)?;
        }
        Ok(d)
    }

    /// Resolves the items of a projection or RETURNING list in the innermost level. `extra` is
    /// added to every output (what a DML statement wrote into its target).
    fn project(&mut self, items: &[SelectItem], extra: Option<&Acc>) -> Result<Derived, LineageError> {
        let mut outputs = Vec::new();
        let mut exact = true;
        for item in items {
            match item {
                // `(t.*)`, even with an alias: PostgreSQL's grammar drops the parentheses and
                // expands it to every column of `t`, so how many outputs and their names are
                // not known here.
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }
                    if matches!(unnested(e), Expr::QualifiedWildcard(..) | Expr::Wildcard(..)) =>
                {
                    let acc = self.expr_acc(e)?;
                    outputs.push(acc.into_column(None));
                    exact = false;
                }
                SelectItem::UnnamedExpr(e) => {
                    let acc = self.expr_acc(e)?;
                    outputs.push(acc.into_column(output_name(e)));
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let acc = self.expr_acc(expr)?;
                    outputs.push(acc.into_column(Some(fold_ident(alias))));
                }
                SelectItem::ExprWithAliases { expr, aliases } => {
                    let acc = self.expr_acc(expr)?;
                    exact = false;
                    if aliases.is_empty() {
                        outputs.push(acc.clone().into_column(None));
                    }
                    for a in aliases {
                        outputs.push(acc.clone().into_column(Some(fold_ident(a))));
                    }
                }
                SelectItem::Wildcard(opts) => {
                    exact &= self.wildcard_options(opts)?;
                    let Some(level) = self.levels.last() else { continue };
                    exact &= !level.merged;
                    for rel in &level.rels {
                        exact &= rel.star(&mut outputs);
                    }
                }
                SelectItem::QualifiedWildcard(kind, opts) => {
                    exact &= self.wildcard_options(opts)?;
                    match kind {
                        SelectItemQualifiedWildcardKind::ObjectName(name) => {
                            let qualifier = object_idents(name)?;
                            match self.find_relations(&qualifier) {
                                Some(rels) => {
                                    for rel in rels {
                                        exact &= rel.star(&mut outputs);
                                    }
                                }
                                None => {
                                    let acc = Acc { opaque: true, ..Acc::default() };
                                    outputs.push(acc.into_column(None));
                                    exact = false;
                                }
                            }
                        }
                        SelectItemQualifiedWildcardKind::Expr(e) => {
                            // `(composite).*`: an unknown number of columns.
                            let acc = self.expr_acc(e)?;
                            outputs.push(acc.into_column(None));
                            exact = false;
                        }
                    }
                }
            }
        }
        if let Some(extra) = extra {
            for out in &mut outputs {
                match out {
                    Output::Column { sources, opaque, plain, .. } => {
                        sources.extend(extra.sources.iter().cloned());
                        *opaque |= extra.opaque;
                        *plain &= extra.sources.is_empty();
                    }
                    Output::Star { .. } => {
                        let mut acc = Acc::default();
                        acc.add_output(out);
                        acc.merge(extra);
                        *out = acc.into_column(None);
                        exact = false;
                    }
                }
            }
        }
        Ok(Derived { outputs, exact })
    }

    /// Non-PostgreSQL options of `*`; returns whether positions stay exact.
    fn wildcard_options(&mut self, opts: &WildcardAdditionalOptions) -> Result<bool, LineageError> {
        if opts.opt_replace.is_some() {
            return Err(LineageError::Unsupported("SELECT * REPLACE".into()));
        }
        Ok(opts.opt_ilike.is_none()
            && opts.opt_exclude.is_none()
            && opts.opt_except.is_none()
            && opts.opt_rename.is_none())
    }

    /// A query's `ORDER BY`: it chooses the rows' order, by expressions or by the names and
    /// positions of `outputs`.
    fn sort_by(&mut self, ob: &OrderBy, outputs: &Derived) -> Result<(), LineageError> {
        match &ob.kind {
            OrderByKind::Expressions(exprs) => {
                for o in exprs {
                    self.by_output(&o.expr, outputs);
                }
            }
            OrderByKind::All(_) => self.chose(&outputs.all()),
        }
        self.in_choosing(|a| a.order_by(ob, &mut Acc::default()))
    }

    fn order_by(&mut self, ob: &OrderBy, acc: &mut Acc) -> Result<(), LineageError> {
        if let OrderByKind::Expressions(exprs) = &ob.kind {
            for o in exprs {
                self.order_by_expr(o, acc)?;
            }
        }
        if let Some(exprs) = ob.interpolate.as_ref().and_then(|i| i.exprs.as_ref()) {
            for e in exprs.iter().filter_map(|i| i.expr.as_ref()) {
                self.expr(e, acc)?;
            }
        }
        Ok(())
    }

    fn order_by_expr(&mut self, o: &OrderByExpr, acc: &mut Acc) -> Result<(), LineageError> {
        self.expr(&o.expr, acc)?;
        if let Some(fill) = &o.with_fill {
            for e in [&fill.from, &fill.to, &fill.step].into_iter().flatten() {
                self.expr(e, acc)?;
            }
        }
        Ok(())
    }

    // ---- FROM ------------------------------------------------------------------------------

    /// Adds a FROM item and its joins to the innermost level, seen only by LATERAL items until
    /// the FROM list is complete ([`Level::complete_from`]).
    fn add_from(&mut self, twj: &TableWithJoins) -> Result<(), LineageError> {
        let start = self.level_mut()?.rels.len();
        for rel in self.table_factor(&twj.relation)? {
            self.level_mut()?.rels.push(Relation { lateral_only: true, ..rel });
        }
        for join in &twj.joins {
            for rel in self.table_factor(&join.relation)? {
                self.level_mut()?.rels.push(Relation { lateral_only: true, ..rel });
            }
            let constraint = match &join.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c)
                | JoinOperator::Semi(c)
                | JoinOperator::LeftSemi(c)
                | JoinOperator::RightSemi(c)
                | JoinOperator::Anti(c)
                | JoinOperator::LeftAnti(c)
                | JoinOperator::RightAnti(c)
                | JoinOperator::StraightJoin(c) => Some(c),
                JoinOperator::AsOf { match_condition, constraint } => {
                    self.choosing_expr(match_condition)?;
                    Some(constraint)
                }
                JoinOperator::CrossApply
                | JoinOperator::OuterApply
                | JoinOperator::ArrayJoin
                | JoinOperator::LeftArrayJoin
                | JoinOperator::InnerArrayJoin => None,
            };
            // The join's condition chooses which rows pair up.
            match constraint {
                Some(JoinConstraint::On(e)) => self.join_condition(start, |a| a.choosing_expr(e))?,
                Some(JoinConstraint::Using(names) | JoinConstraint::UsingAlias(names, _)) => {
                    self.level_mut()?.merged = true;
                    self.join_condition(start, |a| {
                        for name in names {
                            let parts = name.0.iter().filter_map(ObjectNamePart::as_ident).cloned();
                            let e = Expr::CompoundIdentifier(parts.collect());
                            a.choosing_expr(&e)?;
                        }
                        Ok(())
                    })?;
                }
                Some(JoinConstraint::Natural) => {
                    // Every column the two sides share: which, only the catalog knows.
                    self.level_mut()?.merged = true;
                    self.join_condition(start, |a| {
                        let mut rows = Acc::default();
                        if let Some(level) = a.levels.last() {
                            level.visible().for_each(|r| r.whole_row(&mut rows));
                        }
                        a.chose(&rows);
                        Ok(())
                    })?;
                }
                Some(JoinConstraint::None) | None => {}
            }
        }
        Ok(())
    }

    /// `JOIN … ON e` (and the names of `USING`): `e` sees the two sides of its join (the
    /// relations of this level from `start`), not the FROM items before them, whatever their
    /// LATERAL state. Runs `f` in that scope.
    fn join_condition(
        &mut self,
        start: usize,
        f: impl FnOnce(&mut Self) -> Result<(), LineageError>,
    ) -> Result<(), LineageError> {
        let level = self.level_mut()?;
        let mut rels = std::mem::take(&mut level.rels);
        let mut sides = rels.split_off(start.min(rels.len()));
        let lateral_only: Vec<bool> = sides.iter().map(|r| r.lateral_only).collect();
        for rel in &mut sides {
            rel.lateral_only = false;
        }
        level.rels = sides;
        let r = f(self);
        let level = self.level_mut()?;
        let mut sides = std::mem::take(&mut level.rels);
        for (rel, was) in sides.iter_mut().zip(lateral_only) {
            rel.lateral_only = was;
        }
        rels.append(&mut sides);
        level.rels = rels;
        r
    }

    /// The relations a table factor brings into scope (several for an unaliased nested join).
    /// A LATERAL item, and a function (PostgreSQL lets every function in FROM see the items
    /// before it), is analysed seeing the items before it; a plain subquery is not.
    fn table_factor(&mut self, tf: &TableFactor) -> Result<Vec<Relation>, LineageError> {
        self.enter()?;
        let lateral = match tf {
            TableFactor::Derived { lateral, .. } => *lateral,
            TableFactor::Table { args, .. } => args.is_some(),
            TableFactor::NestedJoin { .. } => false,
            _ => true,
        };
        let before = self.levels.last_mut().map(|l| std::mem::replace(&mut l.lateral, lateral));
        let r = self.in_values(|a| a.table_factor_inner(tf));
        if let (Some(level), Some(before)) = (self.levels.last_mut(), before) {
            level.lateral = before;
        }
        self.leave();
        r
    }

    fn table_factor_inner(&mut self, tf: &TableFactor) -> Result<Vec<Relation>, LineageError> {
        let rel = match tf {
            TableFactor::Table { name, alias, args, with_ordinality, .. } => {
                if let Some(args) = args {
                    check_function(name)?;
                    // How many rows a function in FROM returns depends on its arguments.
                    let mut acc = Acc::default();
                    self.in_choosing(|a| a.function_args_list(&args.args, None, &mut acc))?;
                    func_relation(function_name(name), acc, alias.as_ref(), *with_ordinality)
                } else {
                    let parts = object_idents(name)?;
                    let cte = match parts.as_slice() {
                        [single] => self.find_cte(single).map(|d| (single.clone(), d)),
                        _ => None,
                    };
                    let columns = alias_columns(alias.as_ref());
                    let alias_name = alias.as_ref().map(|a| fold_ident(&a.name));
                    match cte {
                        Some((cte_name, d)) => Relation {
                            name: Some(alias_name.clone().unwrap_or(cte_name)),
                            schema: None,
                            // `schema.name.column` never names a CTE: PostgreSQL looks further out.
                            aliased: true,
                            lateral_only: false,
                            kind: RelKind::Derived(d.renamed(&columns)),
                        },
                        None => {
                            let t = table_ref(name)?;
                            let kind = if columns.is_empty() {
                                RelKind::Base(t.clone())
                            } else {
                                // `users AS u(a, b)` renames the first columns, whatever they are.
                                RelKind::Derived(
                                    Derived::exact(vec![Output::Star { tables: vec![t.clone()] }])
                                        .renamed(&columns),
                                )
                            };
                            Relation {
                                name: Some(alias_name.clone().unwrap_or_else(|| t.table.clone())),
                                schema: if alias_name.is_some() { None } else { t.schema.clone() },
                                aliased: alias_name.is_some(),
                                lateral_only: false,
                                kind,
                            }
                        }
                    }
                }
            }
            TableFactor::Derived { subquery, alias, .. } => {
                let d = self.query(subquery)?.renamed(&alias_columns(alias.as_ref()));
                Relation {
                    name: alias.as_ref().map(|a| fold_ident(&a.name)),
                    schema: None,
                    aliased: true,
                    lateral_only: false,
                    kind: RelKind::Derived(d),
                }
            }
            TableFactor::TableFunction { expr, alias } => {
                let acc = self.in_choosing(|a| a.expr_acc(expr))?;
                func_relation(None, acc, alias.as_ref(), false)
            }
            TableFactor::Function { name, args, with_ordinality, alias, .. } => {
                check_function(name)?;
                let mut acc = Acc::default();
                self.in_choosing(|a| a.function_args_list(args, None, &mut acc))?;
                func_relation(function_name(name), acc, alias.as_ref(), *with_ordinality)
            }
            TableFactor::UNNEST { alias, array_exprs, with_ordinality, with_offset, .. } => {
                let mut acc = Acc::default();
                self.in_choosing(|a| a.exprs(array_exprs, &mut acc))?;
                func_relation(Some("unnest".into()), acc, alias.as_ref(), *with_ordinality || *with_offset)
            }
            TableFactor::JsonTable { json_expr, alias, .. } => {
                let acc = self.in_choosing(|a| a.expr_acc(json_expr))?;
                func_relation(Some("json_table".into()), acc, alias.as_ref(), true)
            }
            TableFactor::OpenJsonTable { json_expr, alias, .. } => {
                let acc = self.in_choosing(|a| a.expr_acc(json_expr))?;
                func_relation(Some("openjson".into()), acc, alias.as_ref(), true)
            }
            TableFactor::XmlTable { row_expression, passing, alias, .. } => {
                let acc = self.in_choosing(|a| {
                    let mut acc = a.expr_acc(row_expression)?;
                    for arg in &passing.arguments {
                        a.expr(&arg.expr, &mut acc)?;
                    }
                    Ok(acc)
                })?;
                func_relation(Some("xmltable".into()), acc, alias.as_ref(), true)
            }
            TableFactor::NestedJoin { table_with_joins, alias } => {
                let level = self.level_mut()?;
                let mark = level.rels.len();
                let merged_before = level.merged;
                self.add_from(table_with_joins)?;
                let level = self.level_mut()?;
                let members = level.rels.split_off(mark.min(level.rels.len()));
                let Some(alias) = alias else { return Ok(members) };
                let merged = level.merged && !merged_before;
                level.merged = merged_before;
                let join = Relation {
                    name: None,
                    schema: None,
                    aliased: true,
                    lateral_only: false,
                    kind: RelKind::Join { members, merged },
                };
                let columns = alias_columns(Some(alias));
                let kind = if columns.is_empty() {
                    join.kind
                } else {
                    // `(a JOIN b) AS j(x, y)` renames the join's first columns, whatever they are.
                    let mut outputs = Vec::new();
                    let exact = join.star(&mut outputs);
                    RelKind::Derived(Derived { outputs, exact }.renamed(&columns))
                };
                Relation {
                    name: Some(fold_ident(&alias.name)),
                    schema: None,
                    aliased: true,
                    lateral_only: false,
                    kind,
                }
            }
            TableFactor::Pivot { .. }
            | TableFactor::Unpivot { .. }
            | TableFactor::UnpivotExpr { .. }
            | TableFactor::MatchRecognize { .. }
            | TableFactor::SemanticView { .. } => {
                return Err(LineageError::Unsupported(
                    "PIVOT, UNPIVOT, MATCH_RECOGNIZE and semantic views".into(),
                ));
            }
        };
        Ok(vec![rel])
    }

    // ---- name resolution -------------------------------------------------------------------

    /// The relations a qualifier names, from the innermost level that has any in scope.
    fn find_relations(&self, qualifier: &[String]) -> Option<Vec<&Relation>> {
        self.levels.iter().rev().find_map(|level| {
            let found: Vec<&Relation> = level.visible().filter(|r| r.matches(qualifier)).collect();
            (!found.is_empty()).then_some(found)
        })
    }

    /// An unqualified name: a column of any relation in scope that may have it, from the
    /// innermost level outwards until a level certainly has it, plus a whole-row reference if a
    /// relation is so named.
    fn resolve_name(&self, c: &str) -> Acc {
        let mut acc = Acc::default();
        let mut row_found = false;
        let mut named = false;
        for level in self.levels.iter().rev() {
            let (mut definite, mut maybe) = (false, false);
            for rel in level.visible() {
                let (d, m) = rel.column(c, &mut acc);
                definite |= d;
                maybe |= m;
            }
            if !row_found {
                for rel in level.visible().filter(|r| r.name.as_deref() == Some(c)) {
                    rel.whole_row(&mut acc);
                    row_found = true;
                }
            }
            named |= definite;
            if definite && !maybe {
                break;
            }
        }
        if !named {
            // No output is known to have this name, so PostgreSQL takes it from a table, or
            // from an output it names differently than here (and then nothing else may have
            // it): whatever a table may have was added, so add everything else in scope. A table
            // answering "maybe" must not stand in for the output it may really be.
            for rel in self.levels.iter().flat_map(Level::visible) {
                rel.computed_rows(&mut acc);
            }
        }
        acc
    }

    /// `t.c`, `s.t.c`, `db.s.t.c`.
    fn resolve_qualified(&self, parts: &[String]) -> Acc {
        let Some((column, qualifier)) = parts.split_last() else { return Acc::default() };
        if qualifier.is_empty() {
            return self.resolve_name(column);
        }
        match self.find_relations(qualifier) {
            Some(rels) => {
                let mut acc = Acc::default();
                for rel in rels {
                    let (d, m) = rel.column(column, &mut acc);
                    if !d && !m {
                        rel.whole_row(&mut acc);
                    }
                }
                acc
            }
            None => {
                // Not a relation in scope: PostgreSQL would reject it, but stay safe.
                let mut acc = self.resolve_name(column);
                if let Some(first) = qualifier.first() {
                    acc.merge(&self.resolve_name(first));
                }
                acc.opaque = true;
                acc
            }
        }
    }

    /// `t.*` inside an expression: the whole row of `t`.
    fn resolve_row(&self, name: &ObjectName) -> Result<Acc, LineageError> {
        object_idents(name)?;
        let parts = name.0.iter().filter_map(ObjectNamePart::as_ident).collect::<Vec<_>>();
        let variants = name_variants(parts.into_iter());
        let mut acc = Acc { opaque: variants.len() > 1, ..Acc::default() };
        for qualifier in variants {
            match self.find_relations(&qualifier) {
                Some(rels) => rels.iter().for_each(|r| r.whole_row(&mut acc)),
                None => acc.opaque = true,
            }
        }
        Ok(acc)
    }

    /// A bare `*` inside an expression: every relation of the innermost level.
    fn all_rows(&self) -> Acc {
        let mut acc = Acc::default();
        if let Some(level) = self.levels.last() {
            level.visible().for_each(|r| r.whole_row(&mut acc));
        }
        acc
    }

    // ---- expressions -----------------------------------------------------------------------

    fn expr_acc(&mut self, e: &Expr) -> Result<Acc, LineageError> {
        let mut acc = Acc::default();
        self.expr(e, &mut acc)?;
        Ok(acc)
    }

    /// Resolves an expression only for `referenced`.
    fn referenced_expr(&mut self, e: &Expr) -> Result<(), LineageError> {
        self.expr(e, &mut Acc::default())
    }

    fn add(&mut self, acc: &mut Acc, found: Acc) {
        self.note(&found);
        if self.choosing {
            if self.lookup && !found.opaque {
                // The column itself, compared for equality with constants: a lookup. Anything
                // computed from it, or a whole row, chooses rows by more than that.
                for s in &found.sources {
                    if s.column.is_some() && found.plain.contains(s) {
                        self.looked_up.insert(s.clone());
                    } else {
                        self.chosen.sources.insert(s.clone());
                    }
                }
            } else {
                self.chose(&found);
            }
        }
        acc.merge(&found);
    }

    /// A subquery used as a value (scalar, `IN`, `ANY`, `ARRAY(…)`): in a choosing clause,
    /// what it returns chooses rows too.
    fn subquery(&mut self, q: &Query, acc: &mut Acc) -> Result<(), LineageError> {
        let choosing = self.choosing;
        let d = self.in_values(|a| a.query(q))?;
        let mut all = d.all();
        all.computed();
        if choosing {
            self.chose(&all);
        }
        acc.merge(&all);
        Ok(())
    }

    fn exprs<'e>(
        &mut self,
        es: impl IntoIterator<Item = &'e Expr>,
        acc: &mut Acc,
    ) -> Result<(), LineageError> {
        for e in es {
            self.expr(e, acc)?;
        }
        Ok(())
    }

    /// Adds to `acc` every table column `e` derives from.
    fn expr(&mut self, e: &Expr, acc: &mut Acc) -> Result<(), LineageError> {
        self.enter()?;
        let r = self.expr_inner(e, acc);
        self.leave();
        r
    }

    fn expr_inner(&mut self, e: &Expr, acc: &mut Acc) -> Result<(), LineageError> {
        if self.choosing
            && !self.lookup
            && let Some(column) = lookup_column(e)
        {
            // `email = 'x'`, `email IN ($1, $2)`, `email IS NULL`: the constants read nothing.
            self.lookup = true;
            let r = self.expr(column, acc);
            self.lookup = false;
            r?;
            acc.computed();
            return Ok(());
        }
        self.expr_kind(e, acc)?;
        // Only a name (or a constant) passes values through unchanged.
        if !matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::Nested(_) | Expr::Value(_))
        {
            acc.computed();
        }
        Ok(())
    }

    fn expr_kind(&mut self, e: &Expr, acc: &mut Acc) -> Result<(), LineageError> {
        match e {
            Expr::Identifier(id) => {
                let names = ident_names(id);
                let mut found = Acc { opaque: names.len() > 1, ..Acc::default() };
                for name in names {
                    found.merge(&self.resolve_name(&name));
                }
                self.add(acc, found);
            }
            Expr::CompoundIdentifier(parts) => {
                let variants = name_variants(parts.iter());
                let mut found = Acc { opaque: variants.len() > 1, ..Acc::default() };
                for parts in variants {
                    found.merge(&self.resolve_qualified(&parts));
                }
                self.add(acc, found);
            }
            Expr::QualifiedWildcard(name, _) => {
                let found = self.resolve_row(name)?;
                self.add(acc, found);
            }
            Expr::Wildcard(_) => {
                let found = self.all_rows();
                self.add(acc, found);
            }
            Expr::BinaryOp { .. } => {
                // Walk the left spine iteratively: long AND/OR/|| chains are left-deep.
                let mut rights = Vec::new();
                let mut cur = e;
                while let Expr::BinaryOp { left, op, right } = cur {
                    if self.choosing && !self.lookup && lookup_column(cur).is_some() {
                        break;
                    }
                    acc.opaque |= is_unicode_ident(left, op);
                    rights.push(right.as_ref());
                    cur = left;
                }
                self.expr(cur, acc)?;
                self.exprs(rights.into_iter().rev(), acc)?;
            }
            Expr::CompoundFieldAccess { root, access_chain } => {
                self.expr(root, acc)?;
                for a in access_chain {
                    match a {
                        // `(row).field`: the field name is not a column reference.
                        AccessExpr::Dot(Expr::Identifier(_)) => {}
                        AccessExpr::Dot(other) => self.expr(other, acc)?,
                        AccessExpr::Subscript(s) => self.subscript(s, acc)?,
                    }
                }
            }
            Expr::JsonAccess { value, path } => {
                self.expr(value, acc)?;
                for elem in &path.path {
                    match elem {
                        JsonPathElem::Bracket { key } | JsonPathElem::ColonBracket { key } => {
                            self.expr(key, acc)?
                        }
                        JsonPathElem::Dot { .. } => {}
                    }
                }
            }
            Expr::IsFalse(x)
            | Expr::IsNotFalse(x)
            | Expr::IsTrue(x)
            | Expr::IsNotTrue(x)
            | Expr::IsNull(x)
            | Expr::IsNotNull(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotUnknown(x)
            | Expr::IsJson { expr: x, .. }
            | Expr::IsNormalized { expr: x, .. }
            | Expr::UnaryOp { expr: x, .. }
            | Expr::Extract { expr: x, .. }
            | Expr::Ceil { expr: x, .. }
            | Expr::Floor { expr: x, .. }
            | Expr::Collate { expr: x, .. }
            | Expr::Nested(x)
            | Expr::Prefixed { value: x, .. }
            | Expr::Named { expr: x, .. }
            | Expr::OuterJoin(x)
            | Expr::Prior(x)
            | Expr::Cast { expr: x, .. } => self.expr(x, acc)?,
            Expr::IsDistinctFrom(a, b)
            | Expr::IsNotDistinctFrom(a, b)
            | Expr::AnyOp { left: a, right: b, .. }
            | Expr::AllOp { left: a, right: b, .. }
            | Expr::AtTimeZone { timestamp: a, time_zone: b }
            | Expr::Position { expr: a, r#in: b }
            | Expr::RLike { expr: a, pattern: b, .. } => {
                self.expr(a, acc)?;
                self.expr(b, acc)?;
            }
            Expr::MemberOf(m) => {
                self.expr(&m.value, acc)?;
                self.expr(&m.array, acc)?;
            }
            Expr::Like { expr, pattern, escape_char, .. }
            | Expr::ILike { expr, pattern, escape_char, .. }
            | Expr::SimilarTo { expr, pattern, escape_char, .. } => {
                self.expr(expr, acc)?;
                self.expr(pattern, acc)?;
                self.exprs(escape_char.as_deref(), acc)?;
            }
            Expr::In { expr, target, .. } => {
                self.expr(expr, acc)?;
                match target {
                    InTarget::List(list) => self.exprs(list, acc)?,
                    InTarget::Subquery(q) => self.subquery(q, acc)?,
                    InTarget::Unnest(x) => self.expr(x, acc)?,
                    InTarget::Table { name, args } => {
                        // ClickHouse `IN table`: the whole table.
                        let t = table_ref(name)?;
                        let mut found = Acc::default();
                        found.add_computed(ColumnRef::of_table(&t, None));
                        self.add(acc, found);
                        if let Some(args) = args {
                            self.function_args_list(args, None, acc)?;
                        }
                    }
                }
            }
            Expr::Between { expr, low, high, .. } => {
                self.expr(expr, acc)?;
                self.expr(low, acc)?;
                self.expr(high, acc)?;
            }
            Expr::Convert { expr, styles, .. } => {
                self.expr(expr, acc)?;
                self.exprs(styles, acc)?;
            }
            Expr::Substring { expr, substring_from, substring_for, .. } => {
                self.expr(expr, acc)?;
                self.exprs(substring_from.as_deref().into_iter().chain(substring_for.as_deref()), acc)?;
            }
            Expr::Trim { expr, trim_what, trim_characters, .. } => {
                self.expr(expr, acc)?;
                self.exprs(trim_what.as_deref(), acc)?;
                self.exprs(trim_characters.iter().flatten(), acc)?;
            }
            Expr::Overlay { expr, overlay_what, overlay_from, overlay_for } => {
                self.expr(expr, acc)?;
                self.expr(overlay_what, acc)?;
                self.expr(overlay_from, acc)?;
                self.exprs(overlay_for.as_deref(), acc)?;
            }
            Expr::Value(_) | Expr::TypedString(_) => {}
            Expr::Function(f) => self.function(f, acc)?,
            Expr::Case { operand, conditions, else_result, .. } => {
                // The conditions choose which result a row gets (`THEN 1/0` would show it).
                // `CASE email WHEN 'a' THEN …` only compares the column with constants.
                let lookup = operand.as_deref().is_some_and(is_column)
                    && conditions.iter().all(|cw| is_constant(&cw.condition));
                self.in_choosing(|a| {
                    if let Some(o) = operand.as_deref() {
                        let was = std::mem::replace(&mut a.lookup, lookup);
                        let r = a.expr(o, acc);
                        a.lookup = was;
                        r?;
                    }
                    a.exprs(conditions.iter().map(|cw| &cw.condition), acc)
                })?;
                self.exprs(conditions.iter().map(|cw| &cw.result), acc)?;
                self.exprs(else_result.as_deref(), acc)?;
            }
            // Whether rows exist, not what they hold: its own clauses choose them.
            Expr::Exists { subquery, .. } => {
                let d = self.in_values(|a| a.query(subquery))?;
                acc.merge(&d.all());
            }
            Expr::Subquery(subquery) => self.subquery(subquery, acc)?,
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => {
                self.exprs(sets.iter().flatten(), acc)?;
            }
            Expr::Tuple(items) | Expr::Struct { values: items, .. } => self.exprs(items, acc)?,
            Expr::Array(a) => self.exprs(&a.elem, acc)?,
            Expr::Dictionary(fields) => self.exprs(fields.iter().map(|f| f.value.as_ref()), acc)?,
            Expr::Map(m) => {
                for entry in &m.entries {
                    self.expr(&entry.key, acc)?;
                    self.expr(&entry.value, acc)?;
                }
            }
            Expr::Interval(i) => self.expr(&i.value, acc)?,
            Expr::MatchAgainst { columns, .. } => {
                for name in columns {
                    let parts = object_idents(name)?;
                    let found = self.resolve_qualified(&parts);
                    self.add(acc, found);
                }
            }
            Expr::Lambda(l) => self.expr(&l.body, acc)?,
        }
        Ok(())
    }

    fn subscript(&mut self, s: &Subscript, acc: &mut Acc) -> Result<(), LineageError> {
        match s {
            Subscript::Index { index } => self.expr(index, acc),
            Subscript::Slice { lower_bound, upper_bound, stride } => {
                self.exprs([lower_bound, upper_bound, stride].into_iter().flatten(), acc)
            }
        }
    }

    fn function(&mut self, f: &Function, acc: &mut Acc) -> Result<(), LineageError> {
        check_function(&f.name)?;
        if !stores_arguments(&f.name) {
            return self.function_call(f, acc);
        }
        let mut args = Acc::default();
        self.function_call(f, &mut args)?;
        self.written.merge(&args);
        acc.merge(&args);
        Ok(())
    }

    fn function_call(&mut self, f: &Function, acc: &mut Acc) -> Result<(), LineageError> {
        let name = function_name(&f.name);
        // How many rows a set-returning function gives depends on its arguments.
        let set_returning = name.as_deref().is_some_and(|n| SET_RETURNING_FUNCTIONS.contains(&n));
        let was = self.choosing;
        self.choosing |= set_returning;
        let r = self.function_arguments(f, name.as_deref(), acc);
        self.choosing = was;
        r?;
        // Which rows an aggregate takes, in which order, and the window it sees, are chosen.
        self.in_choosing(|a| {
            for o in &f.within_group {
                a.order_by_expr(o, acc)?;
            }
            a.exprs(f.filter.as_deref(), acc)
        })?;
        match &f.over {
            None => {}
            Some(WindowType::NamedWindow(_)) => self.named_windows(acc),
            Some(WindowType::WindowSpec(spec)) => {
                if spec.window_name.is_some() {
                    self.named_windows(acc);
                }
                self.window_spec(spec, acc)?;
            }
        }
        Ok(())
    }

    fn function_arguments(
        &mut self,
        f: &Function,
        name: Option<&str>,
        acc: &mut Acc,
    ) -> Result<(), LineageError> {
        for args in [&f.parameters, &f.args] {
            match args {
                FunctionArguments::None => {}
                FunctionArguments::Subquery(q) => self.subquery(q, acc)?,
                FunctionArguments::List(list) => {
                    self.function_args_list(&list.args, name, acc)?;
                    for clause in &list.clauses {
                        match clause {
                            FunctionArgumentClause::Where(e) | FunctionArgumentClause::Limit(e) => {
                                self.in_choosing(|a| a.expr(e, acc))?;
                            }
                            FunctionArgumentClause::Having(h) => self.in_choosing(|a| a.expr(&h.1, acc))?,
                            FunctionArgumentClause::OrderBy(exprs) => {
                                for o in exprs {
                                    self.in_choosing(|a| a.order_by_expr(o, acc))?;
                                }
                            }
                            FunctionArgumentClause::OnOverflow(ListAggOnOverflow::Truncate {
                                filler,
                                ..
                            }) => {
                                self.exprs(filler.as_deref(), acc)?;
                            }
                            FunctionArgumentClause::OnOverflow(ListAggOnOverflow::Error)
                            | FunctionArgumentClause::IgnoreOrRespectNulls(_)
                            | FunctionArgumentClause::Separator(_)
                            | FunctionArgumentClause::JsonNullClause(_)
                            | FunctionArgumentClause::JsonReturningClause(_) => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn named_windows(&mut self, acc: &mut Acc) {
        if let Some(level) = self.levels.last() {
            acc.merge(&level.windows);
        }
    }

    /// A window's partitions, order and frame choose which rows each result sees.
    fn window_spec(&mut self, spec: &WindowSpec, acc: &mut Acc) -> Result<(), LineageError> {
        self.in_choosing(|a| a.window_spec_inner(spec, acc))
    }

    fn window_spec_inner(&mut self, spec: &WindowSpec, acc: &mut Acc) -> Result<(), LineageError> {
        self.exprs(&spec.partition_by, acc)?;
        for o in &spec.order_by {
            self.order_by_expr(o, acc)?;
        }
        if let Some(frame) = &spec.window_frame {
            for bound in std::iter::once(&frame.start_bound).chain(frame.end_bound.as_ref()) {
                if let WindowFrameBound::Preceding(Some(e)) | WindowFrameBound::Following(Some(e)) = bound {
                    self.expr(e, acc)?;
                }
            }
        }
        Ok(())
    }

    /// Function arguments; `function` is the function's name, to tell `count(*)` apart.
    fn function_args_list(
        &mut self,
        args: &[FunctionArg],
        function: Option<&str>,
        acc: &mut Acc,
    ) -> Result<(), LineageError> {
        for arg in args {
            let arg = match arg {
                FunctionArg::Named { arg, .. } | FunctionArg::Unnamed(arg) => arg,
                FunctionArg::ExprNamed { name, arg, .. } => {
                    self.expr(name, acc)?;
                    arg
                }
            };
            match arg {
                FunctionArgExpr::Expr(e) => self.expr(e, acc)?,
                FunctionArgExpr::QualifiedWildcard(name) => {
                    let found = self.resolve_row(name)?;
                    self.add(acc, found);
                }
                FunctionArgExpr::Wildcard | FunctionArgExpr::WildcardWithOptions(_) => {
                    if function != Some("count") {
                        let found = self.all_rows();
                        self.add(acc, found);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A table function's relation: every column derives from all its arguments, and is opaque if
/// those reference any column.
fn func_relation(
    name: Option<String>,
    mut acc: Acc,
    alias: Option<&TableAlias>,
    extra_columns: bool,
) -> Relation {
    acc.opaque |= !acc.sources.is_empty();
    acc.computed();
    let columns = alias_columns(alias);
    let complete = !extra_columns
        && !columns.is_empty()
        && alias.is_some_and(|a| a.columns.iter().all(|c| c.data_type.is_some()));
    Relation {
        name: alias.map(|a| fold_ident(&a.name)).or(name),
        schema: None,
        aliased: true,
        lateral_only: false,
        kind: RelKind::Func { acc, columns, complete },
    }
}

fn output_items(output: Option<&OutputClause>) -> Option<&[SelectItem]> {
    match output? {
        OutputClause::Output { select_items, .. } | OutputClause::Returning { select_items, .. } => {
            Some(select_items)
        }
    }
}

/// Is `e` a column named as it is (a name, maybe in parentheses)?
fn is_column(e: &Expr) -> bool {
    matches!(unnested(e), Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

/// Is `e` a constant the statement supplies: a literal, a parameter (`$1`), or one of those
/// negated, parenthesised or cast to a built-in type (a type of its own could compare by
/// anything)?
fn is_constant(e: &Expr) -> bool {
    match e {
        Expr::Value(_) | Expr::TypedString(_) => true,
        Expr::Nested(x) | Expr::UnaryOp { op: UnaryOperator::Minus | UnaryOperator::Plus, expr: x } => {
            is_constant(x)
        }
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } => {
            builtin_type(data_type) && is_constant(expr)
        }
        Expr::Array(a) => a.elem.iter().all(is_constant),
        _ => false,
    }
}

fn builtin_type(t: &DataType) -> bool {
    match t {
        DataType::Custom(..) => false,
        DataType::Array(
            ArrayElemTypeDef::SquareBracket(inner, _)
            | ArrayElemTypeDef::AngleBracket(inner)
            | ArrayElemTypeDef::Parenthesis(inner)
            | ArrayElemTypeDef::Qualified(inner, _),
        ) => builtin_type(inner),
        _ => true,
    }
}

/// The column of an equality lookup, when `e` is one: the column, unchanged, compared with
/// constants only by `=`, `<>`, `IN (…)`, `= ANY (…)`, `<> ALL (…)` or `IS [NOT] NULL`. Such a
/// test tells only whether the value is exactly one the statement names.
fn lookup_column(e: &Expr) -> Option<&Expr> {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::Eq | BinaryOperator::NotEq, right } => {
            if is_column(left) && is_constant(right) {
                Some(left)
            } else if is_column(right) && is_constant(left) {
                Some(right)
            } else {
                None
            }
        }
        Expr::In { expr, target: InTarget::List(list), .. }
            if !list.is_empty() && is_column(expr) && list.iter().all(is_constant) =>
        {
            Some(expr)
        }
        Expr::AnyOp { left, compare_op: BinaryOperator::Eq, right, .. }
        | Expr::AllOp { left, compare_op: BinaryOperator::NotEq, right }
            if is_column(left) && is_constant(right) =>
        {
            Some(left)
        }
        Expr::IsNull(x) | Expr::IsNotNull(x) if is_column(x) => Some(x),
        _ => None,
    }
}

/// `SELECT … INTO t` creates a table and returns no rows.
/// Does a query of a `WITH RECURSIVE` list read one defined after it? PostgreSQL lets it (the
/// name is then that query, not a table of the same name); the analysis reads the list in order.
fn reads_a_later_sibling(ctes: &[Cte]) -> bool {
    let names: Vec<String> = ctes.iter().map(|c| fold_ident(&c.alias.name)).collect();
    ctes.iter().enumerate().any(|(i, cte)| {
        let later = &names[i + 1..];
        sqlparser::ast::visit_relations(&cte.query, |r| match r.0.as_slice() {
            [ObjectNamePart::Identifier(id)] if later.contains(&fold_ident(id)) => {
                std::ops::ControlFlow::Break(())
            }
            _ => std::ops::ControlFlow::Continue(()),
        })
        .is_break()
    })
}

fn is_select_into(q: &Query) -> bool {
    selects_into(&q.body)
}

/// Does this query body create a table (`SELECT … INTO t`)? PostgreSQL takes the `INTO` of a
/// set operation's first branch, and of a parenthesised query, as the whole statement's.
pub fn selects_into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => selects_into(left) || selects_into(right),
        SetExpr::Query(q) => selects_into(&q.body),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Lineage {
        let mut all = lineage_sql(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    fn col(table: &str, column: &str) -> ColumnRef {
        ColumnRef::column(None, table, column)
    }

    fn row(table: &str) -> ColumnRef {
        ColumnRef::whole_row(None, table)
    }

    fn email() -> ColumnRef {
        col("users", "email")
    }

    fn column(l: &Lineage, i: usize) -> (Option<&str>, &BTreeSet<ColumnRef>, bool) {
        match l.outputs.get(i) {
            Some(Output::Column { name, sources, opaque, .. }) => (name.as_deref(), sources, *opaque),
            other => panic!("output {i} is not a column: {other:?} in {l:?}"),
        }
    }

    fn set(refs: &[ColumnRef]) -> BTreeSet<ColumnRef> {
        refs.iter().cloned().collect()
    }

    #[test]
    fn what_a_statement_stores_is_traced_to_its_sources() {
        for sql in [
            "UPDATE users SET notes = email WHERE id = 1",
            "UPDATE orders o SET note = u.email FROM users u WHERE u.id = o.user_id",
            "UPDATE orders SET note = (SELECT email FROM users LIMIT 1)",
            "INSERT INTO orders (note) SELECT email FROM users",
            "INSERT INTO orders (note) SELECT upper(e) FROM (SELECT email AS e FROM users) s RETURNING id",
            "INSERT INTO orders (note) VALUES ((SELECT email FROM users WHERE id = 1))",
            "INSERT INTO orders (id, note) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET note = (SELECT email FROM users LIMIT 1)",
            "WITH w AS (INSERT INTO orders (note) SELECT email FROM users RETURNING 1) SELECT * FROM w",
            "MERGE INTO orders o USING users u ON o.user_id = u.id WHEN MATCHED THEN UPDATE SET note = u.email",
            "SELECT email INTO copy FROM users",
            "CREATE TABLE copy AS SELECT lower(email) FROM users",
        ] {
            let l = one(sql);
            assert!(l.written.contains(&email()), "{sql}: {:?}", l.written);
        }
        // Read only to choose rows, or not at all: nothing of it is stored.
        for sql in [
            "UPDATE users SET notes = 'x' WHERE email = 'a@b'",
            "INSERT INTO orders (note) VALUES ('plain')",
            "DELETE FROM users WHERE email = 'a@b' RETURNING id",
            "SELECT email FROM users",
        ] {
            let l = one(sql);
            assert!(!l.written.contains(&email()), "{sql}: {:?}", l.written);
        }
    }

    #[test]
    fn renames_and_builtins_that_keep_values_count_as_stores() {
        for (sql, want) in [
            ("ALTER TABLE users RENAME COLUMN email TO e", vec![email()]),
            ("ALTER TABLE IF EXISTS ONLY users RENAME \"email\" TO e", vec![email()]),
            ("ALTER TABLE users RENAME TO u2", vec![row("users")]),
            ("ALTER VIEW users RENAME COLUMN email TO e", vec![email()]),
            ("ALTER MATERIALIZED VIEW users RENAME TO u2", vec![row("users")]),
            ("ALTER TABLE users DETACH PARTITION users_low", vec![row("users"), row("users_low")]),
            ("ALTER TABLE users_child NO INHERIT users", vec![row("users_child"), row("users")]),
            ("SELECT setval('s', ascii(email)) FROM users", vec![email()]),
            ("SELECT 1 FROM users WHERE pg_catalog.pg_try_advisory_lock(length(email))", vec![email()]),
            ("SELECT setseed(length(email) / 100.0) FROM users", vec![email()]),
        ] {
            let l = one(sql);
            for r in want {
                assert!(l.written.contains(&r), "{sql}: {r:?} missing from {:?}", l.written);
            }
        }
        for sql in [
            "ALTER TABLE users RENAME CONSTRAINT c TO d",
            "ALTER TABLE users ADD COLUMN x int",
            "SELECT setval('s', 42)",
            "SELECT upper(email) FROM users",
        ] {
            assert!(one(sql).written.is_empty(), "{sql}: {:?}", one(sql).written);
        }
        assert_unsupported("ALTER SCHEMA public RENAME TO p2");
    }

    /// The first output of `sql` derives from users.email (or the whole users row).
    fn assert_email_source(sql: &str) {
        let l = one(sql);
        let (_, sources, _) = column(&l, 0);
        assert!(
            sources.contains(&email()) || sources.contains(&row("users")),
            "{sql}: users.email missing from {sources:?}"
        );
    }

    fn assert_unsupported(sql: &str) {
        match lineage_sql(sql) {
            Err(LineageError::Unsupported(_)) => {}
            other => panic!("{sql}: expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn show_of_a_setting_of_fixed_kind_derives_from_nothing_and_any_other_is_unknown() {
        for (sql, name) in [
            ("SHOW TRANSACTION ISOLATION LEVEL", "transaction_isolation"),
            ("show transaction_isolation", "transaction_isolation"),
            ("SHOW server_version", "server_version"),
            ("SHOW DateStyle", "datestyle"),
        ] {
            let l = one(sql);
            assert_eq!(column(&l, 0), (Some(name), &set(&[]), false), "{sql}");
        }
        // Text a session can set (with set_config, to a masked value), custom settings, every
        // setting at once, and a quoted name (matched as the server does, case-insensitively).
        for sql in [
            "SHOW application_name",
            "SHOW search_path",
            "SHOW my.secret",
            "SHOW ALL",
            "SHOW \"TRANSACTION_ISOLATION\"",
            "SHOW \"Application_Name\"",
        ] {
            assert!(lineage_sql(sql).is_err(), "{sql}");
        }
    }

    #[test]
    fn plain_column_is_its_own_source() {
        let l = one("SELECT email FROM users");
        assert!(l.exact);
        assert_eq!(column(&l, 0), (Some("email"), &set(&[email()]), false));
        assert!(l.referenced.contains(&email()));
    }

    #[test]
    fn qualified_columns_and_aliases_resolve_through_table_alias() {
        let l = one("SELECT u.email AS e, u.id FROM users u");
        assert_eq!(column(&l, 0), (Some("e"), &set(&[email()]), false));
        assert_eq!(column(&l, 1), (Some("id"), &set(&[col("users", "id")]), false));
    }

    #[test]
    fn schema_qualified_names_keep_the_schema() {
        let l = one("SELECT public.users.email, users.id FROM public.users");
        let expected = ColumnRef::column(Some("public"), "users", "email");
        assert_eq!(column(&l, 0).1, &set(&[expected]));
        assert_eq!(column(&l, 1).1, &set(&[ColumnRef::column(Some("public"), "users", "id")]));
    }

    #[test]
    fn quoted_identifiers_keep_case_and_unquoted_fold() {
        let l = one(r#"SELECT "Users"."Email", EMAIL FROM "Users""#);
        assert_eq!(column(&l, 0), (Some("Email"), &set(&[col("Users", "Email")]), false));
        assert_eq!(column(&l, 1).1, &set(&[col("Users", "email")]));
    }

    #[test]
    fn long_identifiers_are_truncated_like_postgres() {
        let long = format!("{}xyz", "e".repeat(63));
        let l = one(&format!("SELECT {long} FROM users"));
        assert_eq!(column(&l, 0).1, &set(&[col("users", &"e".repeat(63))]));
    }

    #[test]
    fn unqualified_column_lists_every_candidate_base_table() {
        let l = one("SELECT email FROM users u JOIN orders o ON o.user_id = u.id");
        assert_eq!(column(&l, 0).1, &set(&[email(), col("orders", "email")]));
        assert!(l.referenced.contains(&col("orders", "user_id")));
        assert!(l.referenced.contains(&col("users", "id")));
    }

    #[test]
    fn unqualified_column_skips_derived_tables_without_that_name() {
        let l = one("SELECT email FROM users, (SELECT 1 AS x) s");
        assert_eq!(column(&l, 0).1, &set(&[email()]));
        // Inside the subquery, `name` is people's: a subquery in FROM does not see the items
        // before it; a LATERAL one may also take users.name.
        let l = one("SELECT x FROM users, (SELECT lower(name) AS x FROM people) s");
        assert_eq!(column(&l, 0).1, &set(&[col("users", "x"), col("people", "name")]));
        let l = one("SELECT x FROM users, LATERAL (SELECT lower(name) AS x FROM people) s");
        assert_eq!(column(&l, 0).1, &set(&[col("users", "x"), col("people", "name"), col("users", "name")]));
    }

    #[test]
    fn expressions_union_their_arguments() {
        for sql in [
            "SELECT lower(email) FROM users",
            "SELECT email || '' FROM users",
            "SELECT '' || email FROM users",
            "SELECT substring(email from 2 for 3) FROM users",
            "SELECT substring(email, 2) FROM users",
            "SELECT split_part(email, '@', 2) FROM users",
            "SELECT coalesce(NULL, email) FROM users",
            "SELECT cast(email AS bytea) FROM users",
            "SELECT email::varchar(3) FROM users",
            "SELECT trim(both 'x' from email) FROM users",
            "SELECT upper(reverse(email)) FROM users",
            "SELECT length(email) + 1 FROM users",
            "SELECT NOT (email LIKE 'a%') FROM users",
            "SELECT format('%s', email) FROM users",
            "SELECT CASE WHEN true THEN email END FROM users",
            "SELECT CASE WHEN email LIKE 'a%' THEN 1 ELSE 0 END FROM users",
            "SELECT ARRAY[email] FROM users",
            "SELECT (email, 1) FROM users",
            "SELECT overlay(email placing 'x' from 1) FROM users",
            "SELECT position('@' in email) FROM users",
            "SELECT email COLLATE \"C\" FROM users",
            "SELECT nullif(email, '') FROM users",
            "SELECT greatest(email, 'a') FROM users",
        ] {
            assert_email_source(sql);
        }
    }

    #[test]
    fn output_names_follow_postgres() {
        let l =
            one("SELECT lower(email), email::text, 1, CASE WHEN true THEN email END, count(*) FROM users");
        let names: Vec<Option<&str>> = (0..5).map(|i| column(&l, i).0).collect();
        assert_eq!(names, [Some("lower"), Some("email"), Some("?column?"), Some("case"), Some("count")]);
        let l = one("SELECT CASE WHEN true THEN 1 ELSE email END, (SELECT email FROM users) FROM users");
        assert_eq!((column(&l, 0).0, column(&l, 1).0), (Some("email"), Some("email")));
    }

    #[test]
    fn aggregates_and_windows_union_all_their_arguments() {
        for sql in [
            "SELECT string_agg(email, ',') FROM users",
            "SELECT count(email) FROM users",
            "SELECT count(DISTINCT email) FROM users",
            "SELECT max(email) OVER () FROM users",
            "SELECT array_agg(id ORDER BY email) FROM users",
            "SELECT count(*) FILTER (WHERE email LIKE 'a%') FROM users",
            "SELECT first_value(id) OVER (PARTITION BY email) FROM users",
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY email) FROM users",
            "SELECT row_number() OVER w FROM users WINDOW w AS (ORDER BY email)",
        ] {
            assert_email_source(sql);
        }
    }

    #[test]
    fn count_star_has_no_source() {
        let l = one("SELECT count(*) FROM users WHERE email LIKE 'a%'");
        assert_eq!(column(&l, 0), (Some("count"), &BTreeSet::new(), false));
        assert!(l.referenced.contains(&email()));
    }

    #[test]
    fn whole_row_references_name_the_whole_table() {
        for sql in [
            "SELECT row_to_json(u) FROM users u",
            "SELECT to_jsonb(u) FROM users u",
            "SELECT to_json(u.*) FROM users u",
            "SELECT json_agg(u) FROM users u",
            "SELECT array_agg(u)::text FROM users u",
            "SELECT ROW(u.*) FROM users u",
            "SELECT u FROM users u",
            "SELECT users FROM users",
            "SELECT (u).email FROM users u",
            "SELECT hstore(u) -> 'email' FROM users u",
        ] {
            let l = one(sql);
            assert!(column(&l, 0).1.contains(&row("users")), "{sql}: {l:?}");
        }
    }

    #[test]
    fn whole_row_of_a_derived_table_is_all_its_sources() {
        assert_email_source("SELECT to_json(s) FROM (SELECT email FROM users) s");
        assert_email_source("SELECT row_to_json(s.*) FROM (SELECT lower(email) FROM users) s");
        assert_email_source("WITH c AS (SELECT email FROM users) SELECT json_agg(c) FROM c");
    }

    #[test]
    fn star_over_base_tables() {
        let l = one("SELECT * FROM users");
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(None, "users")] }]);
        assert!(l.exact);
        assert!(l.referenced.contains(&row("users")));
        let l = one("SELECT u.*, o.id FROM public.users u, orders o");
        assert_eq!(l.outputs[0], Output::Star { tables: vec![TableRef::new(Some("public"), "users")] });
        let l = one("SELECT * FROM users, orders");
        assert_eq!(
            l.outputs,
            [Output::Star { tables: vec![TableRef::new(None, "users"), TableRef::new(None, "orders")] }]
        );
    }

    #[test]
    fn star_over_derived_tables_expands_inline_in_from_order() {
        let l = one("SELECT * FROM (SELECT lower(email) AS e, id FROM users) s, orders");
        assert!(l.exact);
        assert_eq!(column(&l, 0), (Some("e"), &set(&[email()]), false));
        assert_eq!(column(&l, 1), (Some("id"), &set(&[col("users", "id")]), false));
        assert_eq!(l.outputs[2], Output::Star { tables: vec![TableRef::new(None, "orders")] });
        let l = one("WITH a AS (SELECT * FROM users) SELECT * FROM a");
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(None, "users")] }]);
    }

    #[test]
    fn natural_and_using_joins_under_a_star_are_not_exact() {
        assert!(!one("SELECT * FROM users NATURAL JOIN orders").exact);
        assert!(!one("SELECT * FROM users JOIN orders USING (id)").exact);
        assert!(one("SELECT users.* FROM users JOIN orders USING (id)").exact);
        assert!(!one("SELECT j.* FROM (users JOIN orders USING (id)) AS j").exact);
        let l = one("SELECT id FROM users JOIN orders USING (id)");
        assert_eq!(column(&l, 0).1, &set(&[col("users", "id"), col("orders", "id")]));
    }

    #[test]
    fn derived_tables_with_column_alias_lists() {
        let l = one("SELECT x, y FROM (SELECT email, id FROM users) AS s(x, y)");
        assert_eq!(column(&l, 0), (Some("x"), &set(&[email()]), false));
        assert_eq!(column(&l, 1), (Some("y"), &set(&[col("users", "id")]), false));
        assert_email_source("SELECT s.x FROM (SELECT * FROM users) s(x)");
        assert_email_source("SELECT x FROM users AS u(x)");
    }

    #[test]
    fn lateral_subqueries_and_joins_of_every_kind() {
        assert_email_source("SELECT t.e FROM users u, LATERAL (SELECT u.email AS e) t");
        assert_email_source("SELECT t.e FROM users u CROSS JOIN LATERAL (SELECT lower(u.email) e) t");
        assert_email_source(
            "SELECT t.e FROM orders o LEFT JOIN LATERAL (SELECT email e FROM users) t ON true",
        );
        assert_email_source("SELECT u.email FROM orders o RIGHT JOIN users u ON o.uid = u.id");
        assert_email_source("SELECT u.email FROM orders o FULL OUTER JOIN users u ON o.uid = u.id");
        assert_email_source("SELECT j.email FROM (users u JOIN orders o ON true) AS j");
        assert_email_source("SELECT email FROM (orders o JOIN users u ON true)");
    }

    #[test]
    fn ctes_resolve_through_their_outputs() {
        assert_email_source("WITH a AS (SELECT * FROM users) SELECT a.email FROM a");
        assert_email_source("WITH a(x) AS (SELECT email FROM users) SELECT x FROM a");
        assert_email_source(
            "WITH a AS (SELECT email AS e FROM users), b AS (SELECT e FROM a) SELECT e FROM b",
        );
        assert_email_source("WITH a AS (SELECT email FROM users) SELECT (SELECT email FROM a LIMIT 1)");
        let l = one("WITH a AS (SELECT email FROM users) SELECT 1 FROM a");
        assert!(l.referenced.contains(&email()));
    }

    #[test]
    fn recursive_ctes_union_both_branches() {
        assert_email_source(
            "WITH RECURSIVE r(n, e) AS (SELECT 1, 'x'::text UNION ALL SELECT n + 1, email FROM r, users WHERE n < 3) \
             SELECT e FROM r",
        );
        assert_email_source(
            "WITH RECURSIVE r AS (SELECT email AS e, 1 AS n FROM users UNION ALL SELECT 'x', n + 1 FROM r) \
             SELECT e FROM r",
        );
        // The value flows through the recursion from another column.
        let l = one(
            "WITH RECURSIVE r(a, b) AS (SELECT 'x'::text, email FROM users UNION ALL SELECT b, a FROM r) \
             SELECT a FROM r",
        );
        assert!(column(&l, 0).1.contains(&email()));
    }

    #[test]
    fn data_modifying_ctes_return_their_returning_lists() {
        assert_email_source("WITH d AS (DELETE FROM users RETURNING *) SELECT email FROM d");
        assert_email_source("WITH d AS (DELETE FROM users RETURNING email) SELECT * FROM d");
        assert_email_source("WITH d AS (UPDATE users SET name = 'x' RETURNING email AS e) SELECT e FROM d");
    }

    #[test]
    fn scalar_exists_and_in_subqueries_use_their_projection() {
        assert_email_source("SELECT (SELECT email FROM users LIMIT 1)");
        assert_email_source("SELECT (SELECT e FROM (SELECT email AS e FROM users) s LIMIT 1)");
        assert_email_source("SELECT EXISTS (SELECT email FROM users)");
        assert_email_source("SELECT 'a@b' IN (SELECT email FROM users)");
        assert_email_source("SELECT 'a@b' = ANY (SELECT email FROM users)");
        assert_email_source("SELECT ARRAY(SELECT email FROM users)");
        let l = one("SELECT (SELECT email FROM users LIMIT 1) AS x");
        assert_eq!(column(&l, 0).0, Some("x"));
    }

    #[test]
    fn correlated_subqueries_may_reach_outer_columns() {
        // `orders` may lack an `email` column, then it is the outer users.email.
        assert_email_source("SELECT (SELECT email FROM orders o LIMIT 1) FROM users");
        assert_email_source("SELECT (SELECT u.email FROM orders o LIMIT 1) FROM users u");
    }

    #[test]
    fn set_operations_union_outputs_by_position() {
        let l = one("SELECT x FROM (SELECT email FROM users UNION SELECT 'a') t(x)");
        assert_eq!(column(&l, 0).1, &set(&[email()]));
        let l = one("SELECT 'a' AS k, id FROM orders UNION ALL SELECT email, id FROM users");
        assert!(l.exact);
        assert_eq!(column(&l, 0), (Some("k"), &set(&[email()]), false));
        assert_eq!(column(&l, 1).1, &set(&[col("orders", "id"), col("users", "id")]));
        for sql in [
            "SELECT 'a' INTERSECT SELECT email FROM users",
            "SELECT 'a' EXCEPT ALL SELECT email FROM users",
            "(SELECT 'a' UNION (SELECT 'b' UNION SELECT email FROM users)) ORDER BY 1",
            "SELECT 'a' UNION SELECT 'b' UNION SELECT 'c' UNION SELECT email FROM users",
        ] {
            assert_email_source(sql);
        }
    }

    #[test]
    fn set_operations_with_unaligned_stars_are_not_exact() {
        let l = one("SELECT * FROM notes UNION SELECT email, id FROM users");
        assert!(!l.exact);
        assert!(l.outputs.iter().all(|o| matches!(o, Output::Column { .. })));
        assert!(column(&l, 0).1.contains(&email()));
        let l = one("SELECT * FROM users UNION SELECT * FROM users");
        assert!(l.exact);
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(None, "users")] }]);
    }

    #[test]
    fn values_have_no_sources() {
        let l = one("VALUES (1, 'a'), (2, 'b')");
        assert_eq!(column(&l, 0), (Some("column1"), &BTreeSet::new(), false));
        assert_eq!(column(&l, 1), (Some("column2"), &BTreeSet::new(), false));
        let l = one("SELECT x FROM (VALUES (1)) v(x)");
        assert_eq!(column(&l, 0), (Some("x"), &BTreeSet::new(), false));
        assert_email_source("SELECT * FROM (VALUES ((SELECT email FROM users LIMIT 1))) v(x)");
    }

    #[test]
    fn insert_returning_resolves_against_the_target() {
        let l = one("INSERT INTO users AS u (email) VALUES ('a') RETURNING u.email, id");
        assert_eq!(column(&l, 0).1, &set(&[email()]));
        assert_eq!(column(&l, 1).1, &set(&[col("users", "id")]));
        let l = one("INSERT INTO users (email) VALUES ('a') RETURNING *");
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(None, "users")] }]);
        let l = one("INSERT INTO users (email) VALUES ('a')");
        assert!(l.outputs.is_empty());
    }

    #[test]
    fn insert_select_returning_carries_the_copied_sources() {
        assert_email_source("INSERT INTO notes (body) SELECT email FROM users RETURNING body");
        let l = one("INSERT INTO notes SELECT email FROM users RETURNING *");
        assert!(!l.exact);
        assert!(column(&l, 0).1.contains(&email()));
        assert_email_source(
            "INSERT INTO notes (id, body) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE \
             SET body = (SELECT email FROM users LIMIT 1) RETURNING body",
        );
    }

    #[test]
    fn update_and_delete_returning() {
        let l = one("UPDATE users u SET name = o.x FROM orders o WHERE o.uid = u.id RETURNING u.email, o.x");
        assert!(column(&l, 0).1.contains(&email()));
        assert!(column(&l, 1).1.contains(&col("orders", "x")));
        assert!(l.referenced.contains(&col("orders", "uid")));
        assert_email_source("UPDATE notes SET body = (SELECT email FROM users LIMIT 1) RETURNING body");
        assert_email_source("UPDATE users SET name = email RETURNING name");
        let l = one("DELETE FROM users WHERE id = 1 RETURNING *");
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(None, "users")] }]);
        assert!(l.referenced.contains(&col("users", "id")));
        assert_email_source("DELETE FROM orders o USING users u WHERE o.uid = u.id RETURNING u.email");
    }

    #[test]
    fn merge_resolves_target_and_source() {
        let l = one("MERGE INTO notes n USING users u ON n.id = u.id \
             WHEN MATCHED THEN UPDATE SET body = u.email WHEN NOT MATCHED THEN DO NOTHING");
        assert!(l.outputs.is_empty());
        assert!(l.referenced.contains(&email()));
    }

    #[test]
    fn declare_cursor_has_its_query_lineage() {
        assert_email_source("DECLARE c CURSOR FOR SELECT lower(email) FROM users");
        assert_email_source("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT email FROM users");
    }

    #[test]
    fn explain_returns_only_the_plan_column() {
        for sql in ["EXPLAIN SELECT email FROM users", "EXPLAIN ANALYZE SELECT email FROM users"] {
            let l = one(sql);
            assert_eq!(column(&l, 0), (Some("QUERY PLAN"), &BTreeSet::new(), false));
            assert_eq!(l.outputs.len(), 1);
            assert!(l.referenced.contains(&email()));
        }
    }

    #[test]
    fn copy_to_stdout() {
        assert_email_source("COPY (SELECT lower(email) FROM users) TO STDOUT");
        let l = one("COPY users (email, id) TO STDOUT");
        assert_eq!(column(&l, 0), (Some("email"), &set(&[email()]), false));
        assert_eq!(column(&l, 1).1, &set(&[col("users", "id")]));
        let l = one("COPY public.users TO STDOUT");
        assert_eq!(l.outputs, [Output::Star { tables: vec![TableRef::new(Some("public"), "users")] }]);
        assert!(one("COPY users FROM STDIN").outputs.is_empty());
    }

    #[test]
    fn table_functions_are_opaque_over_their_column_arguments() {
        let l = one("SELECT x FROM users, unnest(ARRAY[email]) x");
        let (_, sources, opaque) = column(&l, 0);
        assert!(sources.contains(&email()) && opaque);
        let l = one("SELECT r.a FROM users u, json_to_recordset(u.data) AS r(a text, b int)");
        let (_, sources, opaque) = column(&l, 0);
        assert!(sources.contains(&col("users", "data")) && opaque);
        let l = one("SELECT g FROM generate_series(1, 3) g");
        assert_eq!(column(&l, 0), (Some("g"), &BTreeSet::new(), false));
        let l = one("SELECT t.v FROM users u, LATERAL jsonb_each_text(to_jsonb(u)) t(k, v)");
        assert!(column(&l, 0).1.contains(&row("users")));
    }

    #[test]
    fn star_over_a_function_is_not_exact() {
        let l = one("SELECT * FROM users u, unnest(ARRAY[u.email])");
        assert!(!l.exact);
        assert!(
            l.outputs
                .iter()
                .any(|o| matches!(o, Output::Column { sources, .. } if sources.contains(&email())))
        );
        assert!(one("SELECT * FROM json_to_recordset('[]') AS r(a text, b int)").exact);
    }

    #[test]
    fn statements_with_unknown_row_shapes_are_unsupported() {
        assert_unsupported("SHOW search_path");
        assert_unsupported("FETCH 10 FROM c");
        assert_unsupported("EXECUTE p(1)");
        assert_unsupported("CALL p(1)");
        assert_unsupported("SELECT query_to_xml('SELECT email FROM users', true, false, '')");
        assert_unsupported("SELECT * FROM dblink('db', 'SELECT email FROM users') AS t(e text)");
    }

    #[test]
    fn statements_without_rows_have_no_outputs() {
        for sql in [
            "SET search_path = public",
            "BEGIN",
            "COMMIT",
            "CREATE TABLE t (a int)",
            "DROP TABLE t",
            "UPDATE users SET name = 'x' WHERE email = 'a'",
            "DELETE FROM users WHERE email = 'a'",
            "SELECT email INTO copy FROM users",
        ] {
            let l = one(sql);
            assert!(l.outputs.is_empty() && l.exact, "{sql}: {l:?}");
        }
        assert!(one("DELETE FROM users WHERE email = 'a'").referenced.contains(&email()));
    }

    #[test]
    fn referenced_covers_every_clause() {
        let l = one("WITH c AS (SELECT secret FROM vault) \
             SELECT u.id FROM users u JOIN orders o ON o.uid = u.id \
             WHERE u.email LIKE 'a%' AND EXISTS (SELECT 1 FROM c WHERE c.secret = 'x') \
             GROUP BY u.id, u.name HAVING max(o.total) > 1 ORDER BY u.phone LIMIT (SELECT count(k) FROM keys)");
        assert_eq!(column(&l, 0).1, &set(&[col("users", "id")]));
        for c in [
            email(),
            col("vault", "secret"),
            col("orders", "uid"),
            col("users", "name"),
            col("orders", "total"),
            col("users", "phone"),
            col("keys", "k"),
        ] {
            assert!(l.referenced.contains(&c), "{c:?} missing from {:?}", l.referenced);
        }
    }

    #[test]
    fn json_extraction_from_a_whole_row() {
        assert_email_source("SELECT j->>'email' FROM (SELECT to_jsonb(u) j FROM users u) s");
        assert_email_source(
            "SELECT s.j #>> '{email}' FROM (SELECT row_to_json(u) AS j FROM users AS u) AS s",
        );
    }

    #[test]
    fn unknown_names_in_derived_tables_fall_back_to_all_outputs() {
        assert_email_source("SELECT s.foo FROM (SELECT email FROM users) s");
    }

    #[test]
    fn unicode_escaped_identifiers_are_opaque() {
        let l = one(r#"SELECT U&"d\0061ta" FROM users"#);
        assert!(column(&l, 0).2);
    }

    #[test]
    fn unicode_escaped_identifiers_resolve_as_postgres_decodes_them() {
        for sql in [
            r#"SELECT U&"\0065mail" FROM users"#,
            r#"SELECT U&"\0065mail" || '' FROM users"#,
            // sqlparser reads `(1 || U) & "\0065mail"`.
            r#"SELECT 1 || U&"\0065mail" FROM users"#,
            r#"SELECT U&"\+000065mail" FROM users"#,
            r#"SELECT U&"\0075".email FROM users u"#,
            r#"SELECT users.U&"\0065mail" FROM users"#,
            r#"SELECT x FROM (SELECT U&"\0065mail" AS x FROM users) s"#,
            r#"COPY (SELECT U&"\0065mail" FROM users) TO STDOUT"#,
        ] {
            let l = one(sql);
            let (_, sources, opaque) = column(&l, 0);
            assert!(sources.contains(&email()) && opaque, "{sql}: {sources:?}");
            assert!(l.referenced.contains(&email()), "{sql}: {:?}", l.referenced);
        }
        let l = one(r#"INSERT INTO notes (body) SELECT U&"\0065mail" FROM users"#);
        assert!(l.written.contains(&email()), "{:?}", l.written);
        // Without `U&` it is that name, as written.
        let l = one(r#"SELECT "\0065mail" FROM users"#);
        assert!(column(&l, 0).1.contains(&col("users", r"\0065mail")));
        assert_unsupported(r#"SELECT U&"query\005Fto\005Fxml"('SELECT email FROM users', true, true, '')"#);
    }

    #[test]
    fn unicode_escapes_decode_as_postgres_does() {
        for (body, decoded) in [
            (r"\0065mail", "email"),
            (r"\+01F600", "\u{1F600}"),
            (r"\D83D\DE00", "\u{1F600}"),
            (r"a\\b", r"a\b"),
            (r"\00E9t\00E9", "\u{e9}t\u{e9}"),
        ] {
            assert_eq!(unicode_unescaped(body).as_deref(), Some(decoded), "{body}");
        }
        // PostgreSQL rejects these after `U&`; without escapes the name reads the same.
        for body in [r"\D83D", r"\DE00", r"\D83Dx", r"\0000", r"\+110000", r"\x", r"\12", r"\+12345", "plain"]
        {
            assert_eq!(unicode_unescaped(body), None, "{body}");
        }
        let long = format!(r"{}\00E9", "e".repeat(62));
        assert_eq!(unicode_unescaped(&long), Some("e".repeat(62)));
    }

    /// A second review's leaks: a name no output of an inexact relation carries (a function's
    /// row), `treat(... AS text)` named after its type, `(t.*)` expanded by PostgreSQL, and a
    /// schema-qualified name that never names a CTE.
    #[test]
    fn names_pass_inexact_relations_expanded_rows_and_ctes_as_postgres_resolves_them() {
        assert_email_source(
            "SELECT (SELECT value FROM (SELECT * FROM json_each(json_build_object('k', \
             (SELECT reverse(email) FROM users LIMIT 1)))) s LIMIT 1) FROM (SELECT 'safe' AS value) o",
        );
        assert_email_source(
            "SELECT (SELECT text FROM (SELECT treat(reverse(email) AS text) FROM users) s LIMIT 1) \
             FROM (SELECT 'safe' AS text) o",
        );
        assert_email_source(
            "SELECT (SELECT email FROM (SELECT (u.*) FROM users u) s LIMIT 1) FROM (SELECT 'safe' AS email) o",
        );
        assert_email_source(
            "SELECT (SELECT email FROM (SELECT (u.*) AS x FROM users u) s LIMIT 1) FROM (SELECT 'safe' AS email) o",
        );
        let l = one(
            "SELECT (p.*), (o.*) FROM (SELECT 1 AS k, reverse(email) AS r FROM users) p, (SELECT FROM users) o",
        );
        assert!(!l.exact, "(p.*) is not one column: {l:?}");
        let l = one(
            "SELECT (WITH users AS (SELECT 'safe' AS email) SELECT public.users.email FROM users) FROM public.users",
        );
        let (_, sources, _) = column(&l, 0);
        assert!(
            sources.iter().any(|c| c.table == "users" && c.column.as_deref() == Some("email")),
            "the outer public.users.email: {sources:?}"
        );
    }

    #[test]
    fn a_subquery_in_from_does_not_see_the_items_before_it() {
        // PostgreSQL takes `email` from the outer users: s1 is not in scope inside s2.
        let leak = "SELECT (SELECT x FROM (SELECT 'a' AS email) s1, (SELECT email AS x) s2) FROM users";
        assert_email_source(leak);
        assert_email_source(&format!("COPY ({leak}) TO STDOUT"));
        assert!(one(&format!("INSERT INTO notes (body) {leak}")).written.contains(&email()));
        // Nor by its name: `users.email` is the outer table's.
        assert_email_source(
            "SELECT (SELECT x FROM (SELECT 'a' AS email) users, (SELECT users.email AS x) s2) FROM users",
        );
        assert_email_source(
            "SELECT (SELECT x FROM (SELECT 'a' AS email) s1 JOIN (SELECT email AS x) s2 ON true) FROM users",
        );
        // A LATERAL item does see them: here `email` is s1's.
        let l =
            one("SELECT (SELECT x FROM (SELECT 'a' AS email) s1, LATERAL (SELECT email AS x) s2) FROM users");
        assert!(!column(&l, 0).1.contains(&email()), "{l:?}");
        // So do functions, and subqueries inside a LATERAL item reach past it.
        assert_email_source("SELECT x FROM users u, upper(u.email) AS x");
        assert_email_source("SELECT q.g FROM users u, LATERAL (SELECT * FROM (SELECT u.email AS g) s) q");
        assert_email_source("SELECT g FROM users u, LATERAL (SELECT (SELECT u.email) AS g) q");
        // The target of UPDATE and DELETE is hidden from its FROM list only.
        assert!(one("UPDATE users SET notes = email FROM (SELECT 1 AS k) s").written.contains(&email()));
        assert_email_source("DELETE FROM users USING (SELECT 1 AS k) s RETURNING email");
    }

    #[test]
    fn a_join_condition_sees_only_its_two_sides() {
        for sql in [
            "SELECT (SELECT 1 FROM (SELECT 'a' AS email) s1, (SELECT 1 AS k) a \
             JOIN (SELECT 2 AS j) b ON email::int = 1) FROM users",
            "SELECT (SELECT 1 FROM (SELECT 'a' AS email) s1 \
             JOIN ((SELECT 1 AS k) a JOIN (SELECT 2 AS j) b ON email::int = 1) ON true) FROM users",
        ] {
            assert!(one(sql).referenced.contains(&email()), "{sql}");
        }
        // Both sides, and the joins to the left, are in scope.
        let l = one("SELECT 1 FROM orders o JOIN users u ON true JOIN people p ON u.email = p.name");
        assert!(l.referenced.contains(&email()));
    }

    #[test]
    fn a_table_that_may_have_a_name_does_not_hide_an_output_named_otherwise() {
        for other in ["users u2", "pg_namespace n"] {
            assert_email_source(&format!(
                r#"SELECT "?column?" FROM (SELECT CASE WHEN true THEN email ELSE (SELECT 'x') END FROM users) s, {other}"#
            ));
            // A name no output has: PostgreSQL would take it from a table, or refuse it.
            assert_email_source(&format!("SELECT nothing FROM (SELECT email AS e FROM users) s, {other}"));
        }
    }

    #[test]
    fn output_names_follow_postgres_figure_colname() {
        // As PostgreSQL 15 names them, over t(x text, y int, ts timestamptz, a int[]).
        let named = [
            ("(ts, ts) OVERLAPS (ts, ts)", "overlaps"),
            ("x IS NORMALIZED", "is_normalized"),
            ("x IS NOT NORMALIZED", "?column?"),
            ("trim(x)", "btrim"),
            ("trim(leading 'a' from x)", "ltrim"),
            ("trim(trailing from x)", "rtrim"),
            ("ceil(y)", "ceil"),
            ("floor(y)", "floor"),
            ("extract(year from ts)", "extract"),
            ("ts AT TIME ZONE 'utc'", "timezone"),
            ("position('a' in x)", "position"),
            ("substring(x from 1)", "substring"),
            ("substring(x, 1, 2)", "substring"),
            ("overlay(x placing 'a' from 1)", "overlay"),
            ("true", "?column?"),
            ("NULL", "?column?"),
            ("NOT EXISTS (SELECT 1)", "?column?"),
            ("EXISTS (SELECT 1)", "exists"),
            ("interval '1 day'", "interval"),
            ("date '2020-01-01'", "date"),
            ("current_user", "current_user"),
            ("ARRAY(SELECT 1)", "array"),
            ("ROW(1, 2)", "row"),
            ("(1, 2)", "row"),
            ("ARRAY[1]", "array"),
            ("'x'::text", "text"),
            ("x::int", "x"),
            ("(CASE WHEN true THEN 1 END)", "case"),
            ("CASE WHEN true THEN x END", "case"),
            ("CASE WHEN true THEN '1' ELSE (SELECT 'x') END", "?column?"),
            ("CASE WHEN true THEN 1 END::text", "text"),
            ("(SELECT 1)", "?column?"),
            ("(SELECT x FROM t)", "x"),
            ("(VALUES (1))", "column1"),
            ("a[1]", "a"),
            ("(SELECT 1 UNION SELECT 2)", "?column?"),
            ("x COLLATE \"C\"", "x"),
            ("coalesce(x)", "coalesce"),
            ("nullif(x, x)", "nullif"),
            ("1::integer", "int4"),
            ("1::bigint", "int8"),
            ("1::double precision", "float8"),
            ("1::varchar(3)", "varchar"),
            ("1::character varying", "varchar"),
            ("1::char", "bpchar"),
            ("1::numeric(3,1)", "numeric"),
            ("1::real", "float4"),
            ("1::float", "float8"),
            ("1::float(10)", "float4"),
            ("1::smallint", "int2"),
            ("true::boolean", "bool"),
            ("ts::timestamp", "ts"),
            ("1::decimal", "numeric"),
            ("x::pg_catalog.text", "x"),
            ("'{1}'::int[]", "int4"),
            ("-y", "?column?"),
            ("x LIKE 'a'", "?column?"),
            ("y BETWEEN 1 AND 2", "?column?"),
            ("y IN (1)", "?column?"),
            ("CAST(y AS text)", "y"),
            ("1::bit", "bit"),
            ("'a'::name", "name"),
            ("1::\"char\"", "char"),
            ("(SELECT t FROM t)", "t"),
            ("(WITH w AS (SELECT 1 AS k) SELECT k FROM w)", "k"),
            ("(t).x", "x"),
            ("(t.*)::text", "t"),
            ("current_timestamp", "current_timestamp"),
        ];
        for (e, name) in named {
            let l = one(&format!("SELECT {e} FROM t"));
            assert_eq!(column(&l, 0).0, Some(name), "{e}");
        }
        // Not told here (PostgreSQL names them by what `*` or the operator tree really is).
        for e in ["(SELECT * FROM t1)", r#"U&"\0078""#, "(VALUES (1), (2))"] {
            let l = one(&format!("SELECT {e} FROM t"));
            assert_eq!(column(&l, 0).0, None, "{e}");
        }
    }

    #[test]
    fn unresolved_qualifiers_are_opaque() {
        let l = one("SELECT x.email FROM users");
        let (_, sources, opaque) = column(&l, 0);
        assert!(opaque && sources.contains(&email()));
    }

    #[test]
    fn long_operator_chains_do_not_count_as_depth() {
        let chain = vec!["email"; 5000].join(" || ");
        assert_email_source(&format!("SELECT {chain} FROM users"));
        let union = vec!["SELECT email FROM users"; 2000].join(" UNION ALL ");
        assert_email_source(&union);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut stmt =
            Parser::parse_sql(&PostgreSqlDialect {}, "SELECT email FROM users").expect("parses").remove(0);
        if let Statement::Query(q) = &mut stmt
            && let SetExpr::Select(s) = q.body.as_mut()
            && let Some(SelectItem::UnnamedExpr(e)) = s.projection.first_mut()
        {
            for _ in 0..(MAX_DEPTH * 2) {
                *e = Expr::Nested(Box::new(e.clone()));
            }
        }
        assert!(matches!(lineage(&stmt), Err(LineageError::TooDeep)));
    }

    #[test]
    fn several_statements_give_one_lineage_each() {
        let all = lineage_sql("SELECT email FROM users; SELECT 1; BEGIN").expect("parses");
        assert_eq!(all.len(), 3);
        assert!(matches!(lineage_sql("SELECT FROM WHERE"), Err(LineageError::Parse(_))));
    }

    #[test]
    fn window_and_named_window_sources() {
        assert_email_source("SELECT rank() OVER (ORDER BY email) FROM users");
        assert_email_source("SELECT sum(id) OVER w FROM users WINDOW w AS (PARTITION BY email)");
    }

    #[test]
    fn more_whole_row_disguises() {
        for sql in [
            "SELECT u::text FROM users u",
            "SELECT concat_ws(',', u.*) FROM users u",
            "SELECT (SELECT u) FROM users u",
            "SELECT t FROM (SELECT * FROM users) t",
            "SELECT jsonb_agg(x) FROM (SELECT email FROM users) x",
            "SELECT to_json(x)::text FROM (SELECT email FROM users UNION SELECT 'a') x",
            "SELECT (t).email FROM (SELECT u AS t FROM users u) s",
        ] {
            assert_email_source(sql);
        }
    }

    #[test]
    fn join_alias_column_lists_rename_unknown_columns() {
        assert_email_source("SELECT j.x FROM (users JOIN orders ON true) AS j(x)");
        assert_email_source("SELECT x FROM (users JOIN orders ON true) AS j(x)");
    }

    #[test]
    fn names_not_found_anywhere_fall_back_to_derived_tables() {
        assert_email_source("SELECT strpos FROM (SELECT position('@' in email) FROM users) s");
    }

    #[test]
    fn deep_subqueries_do_not_overflow_a_small_stack() {
        let mut sql = String::from("SELECT email FROM users");
        for _ in 0..150 {
            sql = format!("SELECT (SELECT x FROM ({sql}) AS s(x) LIMIT 1) AS x");
        }
        let stmts = Parser::new(&PostgreSqlDialect {})
            .with_recursion_limit(10_000)
            .try_with_sql(&sql)
            .and_then(|mut p| p.parse_statements())
            .expect("parses");
        let outcome = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let r = lineage(&stmts[0]).map(|_| ());
                // Dropping a deep AST recurses too: leak it to keep the test about lineage.
                std::mem::forget(stmts);
                r
            })
            .expect("spawns")
            .join()
            .expect("no stack overflow");
        assert!(matches!(outcome, Err(LineageError::TooDeep)));
        let mut sql = String::from("SELECT email FROM users");
        for _ in 0..6 {
            sql = format!("SELECT (SELECT x FROM ({sql}) AS s(x) LIMIT 1) AS x");
        }
        assert_email_source(&sql);
    }

    #[test]
    fn merge_returning_and_on_conflict_excluded() {
        assert_email_source(
            "MERGE INTO notes n USING users u ON n.id = u.id \
             WHEN MATCHED THEN UPDATE SET body = u.email RETURNING n.body",
        );
        assert_email_source(
            "INSERT INTO notes (id, body) SELECT id, 'x' FROM orders ON CONFLICT (id) DO UPDATE \
             SET body = (SELECT max(email) FROM users) RETURNING body",
        );
        assert_email_source(
            "INSERT INTO notes (id, body) SELECT id, email FROM users ON CONFLICT (id) DO UPDATE \
             SET body = excluded.body RETURNING body",
        );
    }

    #[test]
    fn prepare_has_the_statement_lineage() {
        assert_email_source("PREPARE p AS SELECT email FROM users WHERE id = $1");
    }

    /// Does `email` (or the whole users row) choose rows of `sql` other than by a lookup?
    fn chooses_email(l: &Lineage) -> bool {
        l.chooses.contains(&email()) || l.chooses.contains(&row("users"))
    }

    #[test]
    fn columns_that_choose_rows_are_told_apart() {
        for sql in [
            // The review's extraction, a character at a time, in one statement.
            "SELECT string_agg(ch.c, '' ORDER BY i) FROM users u, generate_series(1,40) i, \
             (SELECT chr(n) c FROM generate_series(32,126) n) ch WHERE u.id=3 AND substr(u.email,i,1)=ch.c",
            "SELECT count(*) FROM generate_series(1, (SELECT ascii(substr(email, 1, 1)) FROM users LIMIT 1))",
            "SELECT count(*) FROM users, generate_series(1, ascii(substr(email, 1, 1)))",
            "SELECT count(*) FROM users, LATERAL unnest(string_to_array(email, '@')) p",
            "SELECT generate_series(1, ascii(email)) FROM users",
            "SELECT 1 + regexp_split_to_table(email, '') FROM users",
            "SELECT id FROM users WHERE email LIKE 'a%'",
            "SELECT id FROM users WHERE email ILIKE 'a%' OR email SIMILAR TO 'b%'",
            "SELECT id FROM users WHERE email ~ '^a'",
            "SELECT id FROM users WHERE email > 'm'",
            "SELECT id FROM users WHERE email BETWEEN 'a' AND 'b'",
            "SELECT id FROM users WHERE substr(email, 1, 1) = 'a'",
            "SELECT id FROM users WHERE lower(email) = 'a'",
            "SELECT id FROM users WHERE email::text = 'a'",
            "SELECT id FROM users WHERE email COLLATE \"C\" = 'a'",
            "SELECT id FROM users WHERE email = 'a' || name",
            "SELECT id FROM users WHERE email = (SELECT note FROM orders LIMIT 1)",
            "SELECT id FROM users WHERE email IN (SELECT note FROM orders)",
            "SELECT id FROM users WHERE email IN ('a', name)",
            "SELECT id FROM users WHERE length(email) = 5 AND email = 'a'",
            "SELECT id FROM users WHERE NOT (email < 'b')",
            "SELECT id FROM users ORDER BY email",
            "SELECT id FROM users ORDER BY email DESC LIMIT 1",
            "SELECT email FROM users ORDER BY 1",
            "SELECT id, email AS e FROM users ORDER BY e",
            "SELECT count(*) FROM users GROUP BY email",
            "SELECT email, count(*) FROM users GROUP BY 1",
            "SELECT count(*) FROM users GROUP BY ROLLUP (email)",
            "SELECT count(*) FROM users HAVING max(email) > 'm'",
            "SELECT DISTINCT ON (email) id FROM users",
            "SELECT DISTINCT email FROM users",
            "SELECT count(*) FROM (SELECT DISTINCT substr(email, 1, 1) FROM users) s",
            "SELECT count(*) FROM users u JOIN orders o ON o.note = u.email",
            "SELECT count(*) FROM users u JOIN orders o ON o.note LIKE u.email",
            "SELECT count(*) FROM users JOIN contacts USING (email)",
            "SELECT count(*) FROM users NATURAL JOIN contacts",
            "SELECT row_number() OVER (PARTITION BY email) FROM users",
            "SELECT rank() OVER (ORDER BY email) FROM users",
            "SELECT rank() OVER w FROM users WINDOW w AS (ORDER BY email)",
            "SELECT id FROM users LIMIT (SELECT ascii(email) FROM users WHERE id = 1)",
            "SELECT id FROM users OFFSET (SELECT length(email) FROM users WHERE id = 1)",
            "SELECT count(*) FILTER (WHERE email LIKE 'a%') FROM users",
            "SELECT string_agg(name, ',' ORDER BY email) FROM users",
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY email) FROM users",
            "SELECT CASE WHEN email LIKE 'a%' THEN 1 END FROM users",
            "SELECT CASE WHEN email = 'a' THEN 1 WHEN email LIKE 'b%' THEN 2 END FROM users",
            "SELECT CASE email WHEN name THEN 1 END FROM users",
            "SELECT id FROM users WHERE id IN (SELECT id FROM users WHERE email LIKE 'c%')",
            "SELECT id FROM users WHERE 'a@b' IN (SELECT email FROM users)",
            "SELECT id FROM users WHERE 'a@b' = ANY (SELECT email FROM users)",
            "SELECT id FROM users WHERE EXISTS (SELECT 1 FROM users u2 WHERE u2.email > users.email)",
            "SELECT (SELECT count(*) FROM orders o WHERE o.note = u.email) FROM users u",
            "WITH c AS (SELECT id FROM users WHERE email LIKE 'c%') SELECT count(*) FROM c",
            "WITH x AS (SELECT email AS e FROM users) SELECT count(*) FROM x WHERE e LIKE 'a%'",
            "WITH x AS (SELECT email FROM users) SELECT 1 WHERE 'a' IN (TABLE x)",
            // A value computed from the column, compared for equality through a subquery.
            "SELECT count(*) FROM (SELECT substr(email, 1, 1) AS i FROM users) s WHERE s.i = 'a'",
            "SELECT email FROM users UNION SELECT 'x'",
            "SELECT email FROM users INTERSECT SELECT note FROM orders",
            "SELECT email FROM users EXCEPT ALL SELECT note FROM orders",
            "(SELECT email AS e FROM users UNION ALL SELECT note FROM orders) ORDER BY e",
            "SELECT id FROM users u WHERE row_to_json(u)::text LIKE '%a%'",
            "SELECT id FROM users u WHERE u::text LIKE '%a%'",
            "SELECT id FROM users u WHERE u = u",
            "UPDATE users SET name = 'x' WHERE email LIKE 'a%'",
            "UPDATE orders o SET total = 0 FROM users u WHERE u.id = o.user_id AND u.email > 'm'",
            "DELETE FROM users WHERE email LIKE 'a%' RETURNING id",
            "INSERT INTO orders (id) SELECT id FROM users WHERE email LIKE 'a%'",
            "INSERT INTO orders (id, note) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET note = 'y' \
             WHERE (SELECT email FROM users LIMIT 1) > 'm'",
            "MERGE INTO orders o USING users u ON o.note = u.email WHEN MATCHED THEN DELETE",
            "MERGE INTO orders o USING users u ON o.user_id = u.id WHEN MATCHED AND u.email > 'm' THEN DELETE",
            "EXPLAIN SELECT id FROM users WHERE email < 'b'",
            "EXPLAIN ANALYZE SELECT id FROM users ORDER BY email",
            "CREATE VIEW c_users AS SELECT id FROM users WHERE email LIKE 'c%'",
            "CREATE MATERIALIZED VIEW c_users AS SELECT id FROM users ORDER BY email",
            "CREATE TABLE c_users AS SELECT id FROM users WHERE email LIKE 'c%'",
            "DECLARE c CURSOR FOR SELECT id FROM users ORDER BY email",
            "PREPARE p AS SELECT id FROM users WHERE email LIKE $1",
            "COPY (SELECT id FROM users WHERE email LIKE 'a%') TO STDOUT",
            "SELECT count(*) FROM jsonb_each_text((SELECT to_jsonb(u) FROM users u LIMIT 1))",
        ] {
            let l = one(sql);
            assert!(chooses_email(&l), "{sql}: users.email missing from {:?}", l.chooses);
            assert!(!l.chooses_unknown, "{sql}");
        }
    }

    #[test]
    fn equality_lookups_of_an_unchanged_column_are_kept_apart() {
        for sql in [
            "SELECT id, email FROM users WHERE email = 'carol'",
            "SELECT id FROM users WHERE 'carol' = email",
            "SELECT id FROM users WHERE email = $1",
            "SELECT id FROM users u WHERE u.email <> $1",
            "SELECT id FROM users WHERE (email) = 'a'::text",
            "SELECT id FROM users WHERE email IN ('a', 'b')",
            "SELECT id FROM users WHERE email NOT IN ('a', $2)",
            "SELECT id FROM users WHERE email IS NULL",
            "SELECT id FROM users WHERE email IS NOT NULL AND id > 2",
            "SELECT id FROM users WHERE email = ANY($1)",
            "SELECT id FROM users WHERE email = ANY(ARRAY['a', 'b'])",
            "SELECT id FROM users WHERE email = 'a' OR (email = 'b' AND id = 3)",
            "SELECT id FROM users WHERE NOT (email = 'a')",
            "SELECT id FROM (SELECT id, email AS e FROM users) s WHERE e = 'a'",
            "WITH x AS (SELECT * FROM users) SELECT id FROM x WHERE email = 'a'",
            "SELECT id FROM (SELECT email FROM users UNION ALL SELECT 'x') s(e) WHERE e = 'a'",
            "SELECT CASE email WHEN 'a' THEN 1 WHEN 'b' THEN 2 END FROM users",
            "SELECT CASE WHEN email = 'a' THEN 1 END FROM users",
            "SELECT count(*) FILTER (WHERE email IS NULL) FROM users",
            "SELECT count(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.email = 'a'",
            "SELECT id FROM users WHERE id IN (SELECT id FROM users WHERE email = $1)",
            "UPDATE users SET name = 'x' WHERE email = $1",
            "DELETE FROM users WHERE email IN ('a', 'b')",
        ] {
            let l = one(sql);
            assert!(!chooses_email(&l), "{sql}: chooses {:?}", l.chooses);
            assert!(l.looked_up.contains(&email()), "{sql}: looked up {:?}", l.looked_up);
        }
    }

    #[test]
    fn returned_values_choose_no_rows() {
        for sql in [
            "SELECT email FROM users",
            "SELECT lower(email), email || 'x', email = 'a', email LIKE 'a%' FROM users WHERE id = 1",
            "SELECT count(email), max(email), string_agg(email, ',') FROM users",
            "SELECT (SELECT email FROM users LIMIT 1)",
            "SELECT u.email FROM users u JOIN orders o ON o.user_id = u.id ORDER BY o.total",
            "SELECT email FROM users UNION ALL SELECT 'x'",
            "SELECT * FROM users WHERE EXISTS (SELECT * FROM users u2 WHERE u2.id = 1)",
            "SELECT email FROM users ORDER BY id LIMIT 5",
            "SELECT e FROM (SELECT email AS e, id FROM users) s WHERE id = 2",
            "SELECT row_to_json(u) FROM users u",
            "SELECT CASE WHEN id > 1 THEN email ELSE name END FROM users",
            "UPDATE users SET name = 'x' WHERE id = 1 RETURNING email",
        ] {
            let l = one(sql);
            assert!(!chooses_email(&l), "{sql}: chooses {:?}", l.chooses);
            assert!(!l.looked_up.contains(&email()), "{sql}: looked up {:?}", l.looked_up);
        }
        // Other columns choose the rows.
        let l = one("SELECT email FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total > 5");
        assert_eq!(l.chooses, set(&[col("orders", "user_id"), col("users", "id"), col("orders", "total")]));
    }

    #[test]
    fn what_cannot_be_told_chooses_rows() {
        // A name no relation in scope has, in a choosing clause: every referenced column.
        let l = one("SELECT email FROM users WHERE nope.x = 1");
        assert!(chooses_email(&l), "{:?}", l.chooses);
        // A view's query, or the statement under EXPLAIN, that cannot be analysed.
        for sql in [
            "CREATE VIEW v AS SELECT * FROM dblink('host=x', 'SELECT email FROM users') AS t(e text)",
            "EXPLAIN SELECT * FROM query_to_xml('SELECT email FROM users', true, false, '')",
        ] {
            assert!(one(sql).chooses_unknown, "{sql}");
        }
        assert!(!one("EXPLAIN SELECT id FROM users WHERE id = 1").chooses_unknown);
    }

    #[test]
    fn outputs_tell_whether_they_pass_a_column_through_unchanged() {
        let l = one(
            "SELECT u.email, (u.email), u.email AS e, lower(u.email), u.email::text, 'x', count(id), s.e2, s.c \
             FROM users u, (SELECT email AS e2, upper(name) AS c FROM users) s",
        );
        let plain: Vec<bool> = l
            .outputs
            .iter()
            .map(|o| match o {
                Output::Column { plain, .. } => *plain,
                Output::Star { .. } => panic!("a star"),
            })
            .collect();
        assert_eq!(plain, [true, true, true, false, false, true, false, true, false]);
        let l = one("SELECT email FROM users UNION ALL SELECT lower(note) FROM orders");
        assert!(matches!(&l.outputs[0], Output::Column { plain: false, .. }));
    }
}
