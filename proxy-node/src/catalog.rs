//! Catalog lookups on the target: how volatile a called function is.
//!
//! A function that is not a known read-only built-in is judged by `pg_proc.provolatile`:
//! immutable or stable functions cannot write (PostgreSQL runs them read-only), volatile ones
//! have an unknown effect. Unqualified names are judged by their most volatile overload in any
//! schema, so `search_path` cannot make a volatile function look stable. Lookups go over
//! side connections to the same target, which a node's sessions share ([`Pool`]); answers
//! are cached per session, and dropped whenever the session runs DDL.
//!
//! Masking looks up result columns' origins, relations by name (with view definitions) and
//! table columns the same way. Policy looks up what a statement reaches through the tables it
//! names: their lines of inheritance and views' base tables ([`Catalog::reached`]), for a
//! write the tables foreign keys write, the triggers and rules it fires, and the functions its
//! defaults, constraints, indexes and column types run ([`Catalog::writes_reached`]), and for a
//! read the functions views, row security and column types' casts and operators run
//! ([`Catalog::views_read_only`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use proto::policy::{Connection, Operation};
use tokio::io::AsyncWriteExt;

use crate::policy::{AttributeCall, FunctionRef, TableName};
use crate::upstream::{self, Upstream, UpstreamError};
use crate::wire::postgres::messages::{read_data_row, read_error_fields};
use masking::lineage::ColumnRef;

// Every catalog query compares OIDs only with OIDs (`16384::pg_catalog.oid`) and calls the
// built-ins behind polymorphic operators by name (`pg_catalog.arrayoverlap`): an operator a
// user made for exactly the types written (`>=(oid, integer)`, `&&(oid[], oid[])`) would be
// picked over a built-in that needs a coercion, and run on the catalog connection. Catalog
// connections search `pg_catalog` first ([`SEARCH_PATH_SQL`]), so a user's operator of the
// same types as a built-in is not picked either. Catalogs by OID: 1247 `pg_type`,
// 1255 `pg_proc`, 1259 `pg_class`, 2604 `pg_attrdef`, 2606 `pg_constraint`, 2617
// `pg_operator`, 3256 `pg_policy`, 3381 `pg_statistic_ext`.

/// Whether function `p` makes a value of a type its caller names (see [`FUNCTION_SQL`]).
macro_rules! makes_named_type_sql {
    () => {
        "((p.pronargs > 0 AND p.proargtypes[0] IN (2275::pg_catalog.oid, 2281::pg_catalog.oid) \
           AND pg_catalog.arrayoverlap(p.proargtypes::pg_catalog.oid[], '{26,2206}'::pg_catalog.oid[])) \
         OR p.proname IN ('json_populate_record', 'json_populate_recordset', 'jsonb_populate_record', \
           'jsonb_populate_recordset'))"
    };
}

/// How many user types (OID 16384 up) that run code of their own function `p` takes or
/// returns (see [`FUNCTION_SQL`]).
macro_rules! user_types_sql {
    () => {
        "(SELECT count(*) FROM pg_catalog.pg_type ty \
           WHERE ty.oid = ANY (pg_catalog.array_append(p.proargtypes::pg_catalog.oid[], p.prorettype)) \
           AND ty.oid >= 16384::pg_catalog.oid AND ty.typtype IN ('d', 'b', 'r', 'm'))::text"
    };
}

/// The overloads of a function: schema, volatility, language, source, how many user types they
/// take or return, and whether the function makes a value of a type its caller names: a type's
/// input or receive function (first argument `cstring` or `internal`, 2275 and 2281) that takes
/// a type OID (`oid` or `regtype`, 26 and 2206), such as `domain_in`, `record_in`, `array_in` or
/// `range_in`, or `json(b)_populate_record(set)`, which fills a row type's columns from text.
/// Whatever that type's input runs (a domain's `CHECK`, a range's canonical function), it runs
/// although the function itself is a stable built-in.
const FUNCTION_SQL: &str = concat!(
    "SELECT n.nspname, p.provolatile::text, l.lanname, p.prosrc, ",
    user_types_sql!(),
    ", ",
    makes_named_type_sql!(),
    "::text \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
     WHERE p.proname = $1 AND ($2::text IS NULL OR n.nspname = $2)"
);

/// The functions PostgreSQL could call for `x.$1` or `(x).$1` (field selection that names no
/// column): those callable with one argument, and, failing those, a cast to a type of that name
/// (a domain's `CHECK`, a user type's input function: listed as volatile user code).
const ATTRIBUTE_SQL: &str = concat!(
    "SELECT n.nspname, p.provolatile::text, ",
    user_types_sql!(),
    " FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     WHERE p.proname = $1 AND p.pronargs >= 1 \
       AND (p.pronargs - p.pronargdefaults <= 1 OR p.provariadic <> 0::pg_catalog.oid) \
     UNION ALL SELECT n.nspname, 'v', '1' FROM pg_catalog.pg_type t \
     JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
     WHERE t.typname = $1 AND t.oid >= 16384::pg_catalog.oid"
);

/// Run first on every catalog connection: `pg_catalog` ahead of the `search_path` the role or
/// database sets (which may list it after a schema users write). Functions only: no operator
/// is looked up before it holds.
const SEARCH_PATH_SQL: &str = "SELECT pg_catalog.set_config('search_path', \
     pg_catalog.rtrim(pg_catalog.concat('pg_catalog, ', pg_catalog.current_setting('search_path')), ', '), false)";

/// Cached entries live this long at most.
/// How long a looked-up answer is trusted.
pub(crate) const TTL: Duration = Duration::from_secs(30);

/// A table column's origin, as the catalog names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub schema: String,
    pub table: String,
    pub column: String,
    /// `pg_class.relkind`: `r` table, `p` partitioned, `v` view, `m` materialized view, …
    pub relkind: char,
    /// A generated column's expression (`lower(email)`), computed from other columns of the
    /// row.
    pub generated: Option<String>,
}

/// A column's origin as the cache keeps it (shared: every RowDescription naming it asks), or
/// `None` when the catalog has none.
type KnownOrigin = Option<Arc<Origin>>;

/// A relation found by name, with its definition when it is a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub schema: String,
    pub relkind: char,
    pub view_sql: Option<String>,
    /// Functions reading it may run besides a view's definition: its row security policies'
    /// (when enabled), and the casts and operators users made for its columns' types.
    pub reading_runs: Vec<Called>,
    /// Why reading it runs code of unknown effect, if it does: a policy reads a relation whose
    /// reading runs code of its own (a view, a table with row security).
    pub reading_unknown: Option<String>,
}

/// A function that an expression the catalog keeps calls (a column default, a constraint, an
/// index expression, a partition key, a row security policy, a domain's constraint or default,
/// a cast or operator of a column's type), as [`WRITES_SQL`] and [`RELATION_SQL`] list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Called {
    pub schema: String,
    pub name: String,
    /// One character each: `provolatile`; `prokind`; `c` for C or internal code (only a
    /// superuser creates those) or `o`; `b` for a built-in (OID below 16384) or `u`; `t` if it
    /// makes a value of a type its caller names ([`FUNCTION_SQL`]) or `f`.
    flags: String,
}

impl Called {
    /// May it write, as far as its row says? `None`: a user function in SQL or a procedural
    /// language, which only its body can tell ([`Catalog::read_only`]). `write`: it runs as a
    /// row is written, where a sequence's `nextval` (a serial column's default) writes only the
    /// sequence.
    fn may_write(&self, write: bool) -> Option<bool> {
        let f: Vec<char> = self.flags.chars().collect();
        let [volatility, kind, code, origin, makes] = f[..] else { return Some(true) };
        if crate::policy::is_denied_builtin(&self.name) || makes != 'f' {
            return Some(true);
        }
        if origin == 'b' {
            let known = volatility != 'v'
                || crate::policy::is_read_only_builtin(&self.name)
                || (write && self.name == "nextval");
            return Some(!known);
        }
        // C says what it does (no user but a superuser can create it) when it is not volatile
        // or is named a read-only built-in (`uuid_generate_v4`). An aggregate is C too,
        // whatever its state function is; there is no body to read either way.
        if code == 'c' {
            let known = kind == 'f' && (volatility != 'v' || crate::policy::is_read_only_builtin(&self.name));
            return Some(!known);
        }
        None
    }
}

/// Parse `[[schema, name, flags], ...]` as [`RELATION_SQL`] lists [`Called`] functions.
fn called_from_json(json: Option<&str>) -> Option<Vec<Called>> {
    let Some(json) = json else { return Some(Vec::new()) };
    let rows: Vec<(String, String, String)> = serde_json::from_str(json).ok()?;
    Some(rows.into_iter().map(|(schema, name, flags)| Called { schema, name, flags }).collect())
}

const ORIGIN_SQL: &str = "SELECT n.nspname, c.relname, a.attname, c.relkind::text, \
     CASE WHEN a.attgenerated <> '' THEN (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) \
       FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum) END \
     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE a.attrelid = $1::text::oid AND a.attnum = $2::text::int2";

/// CTEs the write and read lookups share, once a query has defined `rel(i, oid)` (the
/// relations asked about, `i` naming each in the answer) and `obj(i, classid, objid, tree)`
/// (catalog objects whose expressions run, each with its expression tree as text): `ref`, what
/// those objects depend on. The query then defines `typ0(i, oid, made)`: the types it starts
/// from (see [`calls_sql`]).
macro_rules! refs_sql {
    () => {
        "ref(i, classid, oid) AS (SELECT obj.i, d.refclassid, d.refobjid FROM obj \
           JOIN pg_catalog.pg_depend d ON d.classid = obj.classid AND d.objid = obj.objid), "
    };
}

/// CTEs the write and read lookups share, after [`refs_sql`] and `typ0`:
/// - `typ(i, oid, made)`: the types reached from `typ0`: from each user type (OID 16384 up) a
///   domain's base type and the types its constraints name, an array's element type, a range's
///   subtype, a composite type's attribute types, and so on. `made`: values of it are made, so
///   a domain's constraints and default run (reading a column runs neither);
/// - `tree(i, t)`: expression trees that run: the objects', and made domains' defaults and
///   constraints;
/// - `called(i, schema, name, flags)`: the functions those run ([`Called`]): those the objects
///   and made domains depend on, those the trees call by OID (a built-in is in no
///   `pg_depend`), those behind the operators they use, and the cast functions and the
///   functions of user operators of every type reached (a cast or operator applied to a
///   column runs them, the statement does not name them). Of a built-in type, only operators
///   spelled like built-in ones count: the classifier refuses other spellings (`###`) itself.
macro_rules! calls_sql {
    () => {
        concat!(
            "typ(i, oid, made) AS (SELECT i, oid, made FROM typ0 \
               UNION SELECT typ.i, m.oid, typ.made FROM typ JOIN pg_catalog.pg_type ty ON ty.oid = typ.oid, \
               LATERAL (SELECT d.refobjid FROM pg_catalog.pg_depend d \
                   WHERE d.classid = 1247::pg_catalog.oid AND d.objid = ty.oid \
                     AND d.refclassid = 1247::pg_catalog.oid \
                 UNION ALL SELECT d.refobjid FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_depend d \
                   ON d.classid = 2606::pg_catalog.oid AND d.objid = k.oid \
                   WHERE k.contypid = ty.oid AND d.refclassid = 1247::pg_catalog.oid \
                 UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a \
                   WHERE a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped) m(oid) \
               WHERE ty.oid >= 16384::pg_catalog.oid), \
             tree(i, t) AS (SELECT i, tree FROM obj WHERE tree IS NOT NULL \
               UNION ALL SELECT typ.i, ty.typdefaultbin::text FROM typ \
                 JOIN pg_catalog.pg_type ty ON ty.oid = typ.oid WHERE typ.made AND ty.typdefaultbin IS NOT NULL \
               UNION ALL SELECT typ.i, k.conbin::text FROM typ \
                 JOIN pg_catalog.pg_constraint k ON k.contypid = typ.oid WHERE typ.made AND k.conbin IS NOT NULL), \
             dep(i, classid, oid) AS (SELECT i, classid, oid FROM ref \
               UNION ALL SELECT typ.i, d.refclassid, d.refobjid FROM typ \
                 JOIN pg_catalog.pg_type ty ON ty.oid = typ.oid \
                 JOIN pg_catalog.pg_depend d ON d.classid = 1247::pg_catalog.oid AND d.objid = ty.oid \
                 WHERE typ.made AND ty.typtype IN ('d', 'r') \
               UNION ALL SELECT typ.i, d.refclassid, d.refobjid FROM typ \
                 JOIN pg_catalog.pg_constraint k ON k.contypid = typ.oid \
                 JOIN pg_catalog.pg_depend d ON d.classid = 2606::pg_catalog.oid AND d.objid = k.oid \
                 WHERE typ.made \
               UNION ALL SELECT typ.i, 1255::pg_catalog.oid, k.castfunc FROM typ \
                 JOIN pg_catalog.pg_cast k ON k.castsource = typ.oid OR k.casttarget = typ.oid \
                 WHERE typ.oid >= 16384::pg_catalog.oid AND k.castfunc <> 0::pg_catalog.oid \
               UNION ALL SELECT typ.i, 2617::pg_catalog.oid, o.oid FROM typ \
                 JOIN pg_catalog.pg_operator o ON o.oprleft = typ.oid OR o.oprright = typ.oid \
                 WHERE o.oid >= 16384::pg_catalog.oid AND (typ.oid >= 16384::pg_catalog.oid OR o.oprname IN ( \
                   '+', '-', '*', '/', '//', '%', '^', '=', '<>', '<', '>', '<=', '>=', '<=>', '||', '|', '&', \
                   '#', '##', '#-', '#>', '#>>', '~', '~*', '!~', '!~*', '~~', '~~*', '!~~', '!~~*', '~=', \
                   '<<', '>>', '&&', '&<', '&>', '&<|', '|&>', '<<|', '|>>', '<^', '>^', '<->', '<@', '@>', \
                   '->', '->>', '?', '?|', '?&', '?#', '?-', '?-|', '?||', '@', '@?', '@@', '^@', '@-@', '!', \
                   '!!', '|/', '||/'))), \
             fn(i, oid) AS (SELECT i, oid FROM dep WHERE classid = 1255::pg_catalog.oid \
               UNION SELECT dep.i, o.oprcode::pg_catalog.oid FROM dep \
                 JOIN pg_catalog.pg_operator o ON o.oid = dep.oid WHERE dep.classid = 2617::pg_catalog.oid \
               UNION SELECT tree.i, m[1]::pg_catalog.oid FROM tree, \
                 pg_catalog.regexp_matches(tree.t, ':(?:funcid|aggfnoid|winfnoid) ([0-9]+)', 'g') m), \
             called(i, schema, name, flags) AS (SELECT DISTINCT fn.i, n.nspname::text, p.proname::text, \
               pg_catalog.concat(p.provolatile, p.prokind, \
                 CASE WHEN l.lanname IN ('c', 'internal') THEN 'c' ELSE 'o' END, \
                 CASE WHEN p.oid < 16384::pg_catalog.oid THEN 'b' ELSE 'u' END, \
                 CASE WHEN ",
            makes_named_type_sql!(),
            " THEN 't' ELSE 'f' END) \
               FROM fn JOIN pg_catalog.pg_proc p ON p.oid = fn.oid \
               JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
               JOIN pg_catalog.pg_language l ON l.oid = p.prolang) "
        )
    };
}

/// Relations called `$1` (in schema `$2`, or in any): schema, kind, a view's definition, and
/// what reading one runs: the functions its row security policies call when row security is
/// on, and its columns' types' user casts and operators, as a JSON array of [`Called`]; and
/// the first relation a policy reads whose reading runs code of its own (a view, a table with
/// row security, a sequence), if any.
const RELATION_SQL: &str = concat!(
    "WITH RECURSIVE rel AS (SELECT c.oid AS i, c.oid, n.nspname, c.relkind, c.relrowsecurity \
       FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2)), \
     obj(i, classid, objid, tree) AS (SELECT rel.i, 3256::pg_catalog.oid, p.oid, \
         pg_catalog.concat(p.polqual::text, ' ', p.polwithcheck::text) \
       FROM rel JOIN pg_catalog.pg_policy p ON p.polrelid = rel.oid WHERE rel.relrowsecurity), ",
    refs_sql!(),
    "typ0(i, oid, made) AS (SELECT ref.i, ref.oid, true FROM ref WHERE ref.classid = 1247::pg_catalog.oid \
       UNION SELECT rel.i, a.atttypid, false FROM rel JOIN pg_catalog.pg_attribute a ON a.attrelid = rel.oid \
         WHERE a.attnum > 0 AND NOT a.attisdropped), ",
    calls_sql!(),
    "SELECT rel.nspname, rel.relkind::text, \
       CASE WHEN rel.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(rel.oid) END, \
       (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(called.schema, called.name, called.flags))::text \
         FROM called WHERE called.i = rel.i), \
       (SELECT pg_catalog.concat(n.nspname, '.', c.relname) FROM ref \
         JOIN pg_catalog.pg_class c ON c.oid = ref.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE ref.i = rel.i AND ref.classid = 1259::pg_catalog.oid AND ref.oid <> rel.oid \
           AND (c.relkind NOT IN ('r', 'p') OR c.relrowsecurity) LIMIT 1) \
     FROM rel"
);

/// The tables a relation called `$1` (in schema `$2`, or in any) inherits from or is a
/// partition of, up to the root, and those that inherit from it or are its partitions, down to
/// the leaves (not their siblings).
const INHERITANCE_SQL: &str = "WITH RECURSIVE start AS ( \
       SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2)), \
     up(oid) AS (SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN start s ON i.inhrelid = s.oid \
       UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid), \
     down(oid) AS (SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN start s ON i.inhparent = s.oid \
       UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down ON i.inhparent = down.oid) \
     SELECT n.nspname, c.relname FROM (SELECT oid FROM up UNION SELECT oid FROM down) r \
     JOIN pg_catalog.pg_class c ON c.oid = r.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace";

/// What writing the relations named in `$1` (a JSON array of `[name, schema or null]`; an
/// unqualified name counts in every schema) runs and writes besides, one row each, with the
/// name's index in `$1`:
/// - `t`: an enabled user trigger (`tgname`): code of any effect runs with the write;
/// - `r`: a rewrite rule other than a view's `_RETURN` (`ON INSERT/UPDATE/DELETE ... DO ALSO` or
///   `INSTEAD`), which runs other statements in the write's place or with it;
/// - `f`: a table with a foreign key referencing it (schema, name, and `confdeltype` and
///   `confupdtype` together): what deleting or updating a referenced row does there;
/// - `c`: a function writing a row runs ([`Called`]: schema, name, flags): in a column's
///   default or generation expression, a constraint, an index's expression or predicate, the
///   partition key, a domain's constraints and default (of a column's type, or a type those are
///   made of), or a cast or user operator of those types; or that `ANALYZE` runs, in an
///   extended statistics expression (`stxexprs` read by name: PostgreSQL 14 added it).
const WRITES_SQL: &str = concat!(
    "WITH RECURSIVE want AS ( \
       SELECT (w.i - 1)::int AS i, w.v->>0 AS name, w.v->>1 AS schema \
       FROM pg_catalog.jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS w(v, i)), \
     rel AS (SELECT want.i, c.oid FROM want JOIN pg_catalog.pg_class c ON c.relname = want.name \
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE want.schema IS NULL OR n.nspname = want.schema), \
     obj(i, classid, objid, tree) AS ( \
       SELECT rel.i, 2604::pg_catalog.oid, d.oid, d.adbin::text FROM rel \
         JOIN pg_catalog.pg_attrdef d ON d.adrelid = rel.oid \
       UNION ALL SELECT rel.i, 2606::pg_catalog.oid, k.oid, k.conbin::text FROM rel \
         JOIN pg_catalog.pg_constraint k ON k.conrelid = rel.oid \
       UNION ALL SELECT rel.i, 1259::pg_catalog.oid, x.indexrelid, \
           pg_catalog.concat(x.indexprs::text, ' ', x.indpred::text) FROM rel \
         JOIN pg_catalog.pg_index x ON x.indrelid = rel.oid \
       UNION ALL SELECT rel.i, 1259::pg_catalog.oid, rel.oid, k.partexprs::text FROM rel \
         LEFT JOIN pg_catalog.pg_partitioned_table k ON k.partrelid = rel.oid \
       UNION ALL SELECT rel.i, 3381::pg_catalog.oid, x.oid, \
           pg_catalog.jsonb_extract_path_text(pg_catalog.to_jsonb(x), 'stxexprs') FROM rel \
         JOIN pg_catalog.pg_statistic_ext x ON x.stxrelid = rel.oid), ",
    refs_sql!(),
    "typ0(i, oid, made) AS (SELECT ref.i, ref.oid, true FROM ref WHERE ref.classid = 1247::pg_catalog.oid \
       UNION SELECT rel.i, a.atttypid, true FROM rel JOIN pg_catalog.pg_attribute a ON a.attrelid = rel.oid \
         WHERE a.attnum > 0 AND NOT a.attisdropped), ",
    calls_sql!(),
    "SELECT rel.i::text, 't', n.nspname, c.relname, t.tgname FROM rel \
       JOIN pg_catalog.pg_trigger t ON t.tgrelid = rel.oid \
       JOIN pg_catalog.pg_class c ON c.oid = rel.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' \
     UNION ALL SELECT rel.i::text, 'r', n.nspname, c.relname, w.rulename FROM rel \
       JOIN pg_catalog.pg_rewrite w ON w.ev_class = rel.oid \
       JOIN pg_catalog.pg_class c ON c.oid = rel.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
       WHERE w.ev_type <> '1' \
     UNION ALL SELECT rel.i::text, 'f', n.nspname, c.relname, k.confdeltype::text || k.confupdtype::text FROM rel \
       JOIN pg_catalog.pg_constraint k ON k.confrelid = rel.oid AND k.contype = 'f' \
       JOIN pg_catalog.pg_class c ON c.oid = k.conrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     UNION ALL SELECT called.i::text, 'c', called.schema, called.name, called.flags FROM called"
);

/// How many rounds of foreign keys [`Catalog::writes_reached`] follows (a table referencing one
/// referencing one ...), and to how many (operation, table) pairs in all: past either, the
/// write's effect is unknown. (A table's own partitions and children count for neither: the
/// catalog lists them in one answer.)
const MAX_FK_DEPTH: usize = 16;
const MAX_WRITES_REACHED: usize = 256;

/// What writing one relation runs and writes besides (a row of [`WRITES_SQL`] each).
#[derive(Debug, Default)]
struct WriteFacts {
    /// A user trigger or rewrite rule that runs with a write: what, for the reason.
    runs: Option<String>,
    /// The tables whose foreign keys reference it, each with its `confdeltype` and
    /// `confupdtype`.
    referencing: Vec<(TableName, char, char)>,
    /// The functions writing a row runs (defaults, constraints, indexes, its types' checks).
    code: Vec<Called>,
}

/// What the writes a statement names do besides ([`Catalog::writes_reached`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WritesReached {
    /// Tables written through foreign keys and through the line of inheritance and views of
    /// those, with what is done to each.
    pub tables: Vec<(Operation, TableName)>,
    /// Why the effect is unknown, if it is: a trigger or rule runs, or the foreign keys lead
    /// further than the gateway follows.
    pub unknown: Option<String>,
}

/// What PostgreSQL does to a table whose foreign key (with `ON DELETE` action `del` and
/// `ON UPDATE` action `upd`, as `pg_constraint` spells them) references a table that `op` writes:
/// `TRUNCATE` truncates every referencing table (with `CASCADE`; without it the server refuses),
/// `DELETE` deletes rows there (`CASCADE`) or updates them (`SET NULL`, `SET DEFAULT`), `UPDATE`
/// updates them (any of the three). `NO ACTION` and `RESTRICT` only check.
fn through_foreign_key(op: Operation, del: char, upd: char) -> Option<Operation> {
    match (op, del, upd) {
        (Operation::Truncate, _, _) => Some(Operation::Truncate),
        (Operation::Delete, 'c', _) => Some(Operation::Delete),
        (Operation::Delete, 'n' | 'd', _) => Some(Operation::Update),
        (Operation::Update, _, 'c' | 'n' | 'd') => Some(Operation::Update),
        _ => None,
    }
}

/// Does `op` write rows of its table (so its triggers and rules run), or what is computed from
/// them (`VACUUM FULL` rebuilds its indexes, `ANALYZE` computes index and statistics
/// expressions, `ALTER TABLE` may fill a column or check rows: user functions in those run)?
pub fn writes_rows(op: Operation) -> bool {
    matches!(
        op,
        Operation::Insert
            | Operation::Update
            | Operation::Delete
            | Operation::Merge
            | Operation::Truncate
            | Operation::Vacuum
            | Operation::Analyze
            | Operation::Alter
    )
}

const COLUMNS_SQL: &str = "SELECT a.attname FROM pg_catalog.pg_attribute a \
     WHERE a.attrelid = coalesce(pg_catalog.to_regclass(CASE WHEN $2::text IS NULL THEN '' \
       ELSE pg_catalog.quote_ident($2::text) || '.' END || pg_catalog.quote_ident($1::text))::pg_catalog.oid, \
       0::pg_catalog.oid) \
       AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

/// The generated columns of a relation called `$1` (in schema `$2`, or as the search path
/// finds it), with their expressions.
const GENERATED_SQL: &str = "SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid) \
     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
     WHERE a.attrelid = coalesce(pg_catalog.to_regclass(CASE WHEN $2::text IS NULL THEN '' \
       ELSE pg_catalog.quote_ident($2::text) || '.' END || pg_catalog.quote_ident($1::text))::pg_catalog.oid, \
       0::pg_catalog.oid) \
       AND a.attgenerated <> '' AND NOT a.attisdropped";

/// A relation's generated columns, each with its expression ([`Catalog::generated`]).
pub type GeneratedColumns = Arc<[(String, String)]>;

/// The columns a function reads, if its body can be read ([`Catalog::function_reads`]).
pub type FunctionReads = Option<Arc<[ColumnRef]>>;

/// What the catalog says of the functions of one name ([`Catalog::read_only`],
/// [`Catalog::function_reads`]).
#[derive(Clone)]
struct FunctionFacts {
    read_only: bool,
    reads: FunctionReads,
}

#[derive(Default)]
pub struct Catalog {
    /// Where its side connections come from: the node's, or its own.
    pool: Arc<Pool>,
    functions: crate::Map<FunctionRef, (FunctionFacts, Instant)>,
    attribute_calls: crate::Map<String, (AttributeCall, Instant)>,
    origins: crate::Map<(u32, i16), (KnownOrigin, Instant)>,
    relations: crate::Map<(Option<String>, String), (Vec<Relation>, Instant)>,
    /// Unqualified names last found to name no view in any schema, and no relation whose
    /// reading runs functions (row security, casts and operators of its columns' types): the
    /// answer of [`Catalog::views_read_only`] without a lookup.
    plain_read: crate::Map<String, Instant>,
    columns: crate::Map<(Option<String>, String), (Vec<String>, Instant)>,
    generated: crate::Map<(Option<String>, String), (GeneratedColumns, Instant)>,
    /// See [`Catalog::reached`].
    reached: crate::Map<TableName, (Arc<[TableName]>, Instant)>,
    /// See [`Catalog::writes_reached`].
    write_facts: crate::Map<TableName, (Arc<WriteFacts>, Instant)>,
    /// How many times it was invalidated: what was derived from its answers holds while this
    /// stays the same (and for [`TTL`]).
    epoch: u64,
    /// When the oldest origin or relation answer given since [`Catalog::start_deriving`] was
    /// looked up.
    oldest: Option<Instant>,
    /// An origin or relation lookup failed since [`Catalog::start_deriving`].
    failed: bool,
    /// How deep the judging of function bodies is nested (a body reads a view that calls a
    /// function whose body ...): see [`MAX_NESTING`].
    nesting: u8,
}

/// How deeply function bodies, and the views and functions they reach, are judged: deeper,
/// they count as not read-only (and a cycle ends).
const MAX_NESTING: u8 = 8;

/// What a result derived from catalog answers rests on ([`Catalog::derived`]).
#[derive(Debug, Clone, Copy)]
pub struct Derived {
    epoch: u64,
    /// When the oldest answer it used was looked up (`None`: it used none).
    oldest: Option<Instant>,
}

impl Derived {
    /// Does the result still hold: the catalog not invalidated since, and no answer it rests on
    /// older than the catalog trusts an answer ([`TTL`])? A kept result is then never staler
    /// than a fresh one could be.
    pub fn holds(&self, catalog: &Catalog) -> bool {
        self.epoch == catalog.epoch && self.oldest.is_none_or(|t| t.elapsed() < TTL)
    }
}

/// How a catalog lookup reaches the target.
#[derive(Clone, Copy)]
pub struct Reach<'a> {
    pub target: &'a Connection,
    pub timeout: Duration,
    pub max: usize,
}

impl Catalog {
    /// A session's catalog, borrowing side connections from `pool` (the node's).
    pub fn new(pool: Arc<Pool>) -> Self {
        Catalog { pool, ..Default::default() }
    }

    /// Forget what was looked up (after DDL).
    pub fn invalidate(&mut self) {
        self.epoch += 1;
        self.functions.clear();
        self.attribute_calls.clear();
        self.origins.clear();
        self.relations.clear();
        self.plain_read.clear();
        self.columns.clear();
        self.generated.clear();
        self.reached.clear();
        self.write_facts.clear();
    }

    /// Has the session run DDL (so it may have objects, temporary tables among them, that
    /// the catalog's own session does not see by name)?
    pub fn changed(&self) -> bool {
        self.epoch > 0
    }

    /// May a relation in `schema` (or unqualified) that the side connections do not find
    /// exist for the session all the same? Once it has run DDL, or in its temporary schema
    /// (`pg_temp` names `pg_temp_N`): what it created in its open transaction, and its
    /// temporary objects, only its own backend sees.
    pub fn may_not_see(&self, schema: Option<&str>) -> bool {
        self.changed() || schema.is_some_and(|s| s.starts_with("pg_temp"))
    }

    /// Start deriving something from catalog answers (a masking plan, the tables a statement
    /// reaches): note how old the answers given from now on are, and whether a lookup fails.
    /// [`Catalog::derived`] then says how long the result holds.
    pub fn start_deriving(&mut self) -> u64 {
        self.oldest = None;
        self.failed = false;
        self.epoch
    }

    /// What was derived since [`Catalog::start_deriving`] (which returned `since`) rests on:
    /// `None` if a lookup failed meanwhile (the result took a fallback) or DDL invalidated the
    /// catalog, so the result is not worth keeping.
    pub fn derived(&self, since: u64) -> Option<Derived> {
        (!self.failed && self.epoch == since).then_some(Derived { epoch: self.epoch, oldest: self.oldest })
    }

    fn answered(&mut self, at: Instant) {
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
    }

    /// `r`, noting a failure for [`Catalog::derived`].
    fn noted<T>(&mut self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        self.failed |= r.is_err();
        r
    }

    /// Is `f` known to be read-only? Every overload the server could pick is judged (an
    /// unqualified name in any schema, since `search_path` and argument types choose):
    /// - in `pg_catalog`: a known read-only built-in, or not volatile;
    /// - anywhere else: not volatile, written in SQL, and its body itself a read that calls no
    ///   function but read-only built-ins (a STABLE function may call a VOLATILE one, and
    ///   PostgreSQL lets that write; other languages cannot be inspected), and reads nothing
    ///   whose reading runs more ([`Catalog::views_read_only`]).
    ///
    /// Lookup failures and unknown names count as not read-only.
    pub async fn read_only(
        &mut self,
        target: &Connection,
        f: &FunctionRef,
        timeout: Duration,
        max: usize,
    ) -> bool {
        self.function(Reach { target, timeout, max }, f).await.read_only
    }

    /// The table columns the functions called `f` (every overload the server could pick) read
    /// and return: what a value they compute may reveal. Built-ins read none. `None`: a
    /// function whose body the gateway cannot read (not SQL), or a failed lookup.
    pub async fn function_reads(&mut self, reach: Reach<'_>, f: &FunctionRef) -> FunctionReads {
        self.function(reach, f).await.reads
    }

    /// What the catalog says of the functions called `f`: one lookup for both questions.
    async fn function(&mut self, reach: Reach<'_>, f: &FunctionRef) -> FunctionFacts {
        if let Some((facts, at)) = self.functions.get(f)
            && at.elapsed() < TTL
        {
            return facts.clone();
        }
        let facts = match self.rows(reach, FUNCTION_SQL, &[Some(f.name.as_str()), f.schema.as_deref()]).await
        {
            // No row for a known built-in: SQL syntax that reads like a call (CURRENT_TIMESTAMP).
            Ok(rows) if rows.is_empty() => {
                let builtin = f.schema.is_none() && crate::policy::is_read_only_builtin(&f.name);
                FunctionFacts { read_only: builtin, reads: builtin.then(|| Arc::from([])) }
            }
            Ok(rows) => {
                let mut facts = FunctionFacts {
                    read_only: rows.iter().all(|r| overload_read_only(f, r)),
                    reads: overloads_read(&rows),
                };
                // A body's `x.name` may call another function (see `attribute_call`).
                if (facts.read_only || facts.reads.is_some())
                    && !self.bodies_call_nothing_by_field(reach, &rows).await
                {
                    facts = FunctionFacts { read_only: false, reads: None };
                }
                if facts.read_only && !self.bodies_read_plainly(reach, &rows).await {
                    facts.read_only = false;
                }
                facts
            }
            Err(e) => {
                tracing::warn!(error = %e, function = %f, "catalog lookup failed; treating the function as volatile and what it returns as unknown");
                FunctionFacts { read_only: false, reads: None }
            }
        };
        self.functions.insert(f.clone(), (facts.clone(), Instant::now()));
        facts
    }

    /// What `x.name` or `(x).name` calls where no column is called `name`: PostgreSQL then
    /// calls a function `name` with `x` as its one argument. Only built-ins are judged (by
    /// volatility and the denied list); a user function of that name may write. Lookup
    /// failures count as may-write.
    pub async fn attribute_call(&mut self, reach: Reach<'_>, name: &str) -> AttributeCall {
        if let Some((answer, at)) = self.attribute_calls.get(name)
            && at.elapsed() < TTL
        {
            return *answer;
        }
        let answer = match self.rows(reach, ATTRIBUTE_SQL, &[Some(name)]).await {
            Ok(rows) if rows.is_empty() => AttributeCall::NoFunction,
            Ok(rows) => {
                let builtin =
                    |r: &Vec<Option<String>>| r.first().is_some_and(|s| s.as_deref() == Some("pg_catalog"));
                if crate::policy::is_denied_builtin(name) && rows.iter().any(builtin) {
                    AttributeCall::Denied
                } else if rows.iter().all(|r| {
                    builtin(r)
                        && r.get(2).is_some_and(|u| u.as_deref() == Some("0"))
                        && (r.get(1).is_some_and(|v| v.as_deref() != Some("v"))
                            || crate::policy::is_read_only_builtin(name))
                }) {
                    AttributeCall::ReadOnly
                } else {
                    AttributeCall::MayWrite
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, name, "catalog lookup of functions callable as a field failed; treating it as a call of unknown effect");
                AttributeCall::MayWrite
            }
        };
        self.attribute_calls.insert(name.to_string(), (answer, Instant::now()));
        answer
    }

    /// Does every name `c` reads as a field (`x.name`) call nothing, or only read-only
    /// built-ins ([`Catalog::attribute_call`])?
    pub async fn fields_call_nothing_unknown(
        &mut self,
        reach: Reach<'_>,
        c: &crate::policy::Classification,
    ) -> bool {
        for n in &c.attribute_calls {
            if !matches!(
                self.attribute_call(reach, n).await,
                AttributeCall::NoFunction | AttributeCall::ReadOnly
            ) {
                return false;
            }
        }
        true
    }

    /// [`Catalog::fields_call_nothing_unknown`] for the SQL bodies of rows of [`FUNCTION_SQL`].
    async fn bodies_call_nothing_by_field(&mut self, reach: Reach<'_>, rows: &[Vec<Option<String>>]) -> bool {
        for row in rows {
            if let [Some(schema), _, Some(language), Some(body), ..] = row.as_slice()
                && schema != "pg_catalog"
                && language == "sql"
                && !self.fields_call_nothing_unknown(reach, &crate::policy::classify(body)).await
            {
                return false;
            }
        }
        true
    }

    /// Do the SQL bodies of rows of [`FUNCTION_SQL`] call the read-only built-ins they name
    /// (not a user function of that name the server may pick: `lower(5)` finds a user's
    /// `lower(int)`), and read only relations whose reading runs nothing unknown (a view's
    /// definition, row security: [`Catalog::views_read_only`])? A STABLE function may read
    /// a view that calls a VOLATILE one, and PostgreSQL lets that write.
    async fn bodies_read_plainly(&mut self, reach: Reach<'_>, rows: &[Vec<Option<String>>]) -> bool {
        if self.nesting >= MAX_NESTING {
            return false;
        }
        self.nesting += 1;
        let mut plain = true;
        for row in rows {
            let [Some(schema), _, Some(language), Some(body), ..] = row.as_slice() else { continue };
            if schema == "pg_catalog" || language != "sql" {
                continue;
            }
            let c = crate::policy::classify(body);
            for f in &c.builtins {
                plain = plain && Box::pin(self.function(reach, f)).await.read_only;
            }
            let read: Vec<TableName> = c
                .accesses
                .iter()
                .filter(|a| a.operation == Operation::Select)
                .filter_map(|a| a.table.clone())
                .collect();
            plain = plain
                && Box::pin(self.views_read_only(reach.target, read.iter(), reach.timeout, reach.max)).await;
            if !plain {
                break;
            }
        }
        self.nesting -= 1;
        plain
    }

    /// The first of `called` that may write (as `schema.name()`), if any: judged by its row
    /// ([`Called::may_write`]), and a user function by its overloads in its schema
    /// ([`Catalog::read_only`]). `write`: they run as a row is written.
    async fn first_may_write(&mut self, reach: Reach<'_>, called: &[Called], write: bool) -> Option<String> {
        for c in called {
            let may_write = match c.may_write(write) {
                Some(w) => w,
                None => {
                    let f = FunctionRef { schema: Some(c.schema.clone()), name: c.name.clone() };
                    let read_only = Box::pin(self.function(reach, &f)).await.read_only;
                    if let Some((_, at)) = fresh(&self.functions, &f) {
                        self.answered(at);
                    }
                    !read_only
                }
            };
            if may_write {
                return Some(format!("{}.{}()", c.schema, c.name));
            }
        }
        None
    }

    /// Do the views among `tables`, and the views those read in turn, only read and call
    /// nothing but read-only functions? Reading a view runs its definition, functions included;
    /// reading any relation runs its row security policies' functions (when row security is
    /// on) and the casts and operators users made for its columns' types (applied in the
    /// statement, or implicitly). Lookup failures and views nested too deep count as no.
    pub async fn views_read_only<'t>(
        &mut self,
        target: &Connection,
        tables: impl Iterator<Item = &'t crate::policy::TableName> + Clone,
        timeout: Duration,
        max: usize,
    ) -> bool {
        let plain = |t: &crate::policy::TableName| {
            t.schema().is_none() && self.plain_read.get(t.table()).is_some_and(|at| at.elapsed() < TTL)
        };
        if !self.changed() && tables.clone().all(plain) {
            return true;
        }
        let reach = Reach { target, timeout, max };
        let mut work: Vec<(Option<String>, String, u8)> =
            tables.map(|t| (t.schema().map(str::to_string), t.table().to_string(), 0)).collect();
        let mut seen = std::collections::HashSet::new();
        while let Some((schema, name, depth)) = work.pop() {
            if !seen.insert((schema.clone(), name.clone())) {
                continue;
            }
            let rels = match self.relations(reach, schema.as_deref(), &name).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, relation = %name, "catalog lookup of a relation failed; treating it as unknown");
                    return false;
                }
            };
            // Nothing of that name where the side connection looks: it may be a view the
            // session made, whose definition only the session's own backend sees.
            if rels.is_empty() && self.may_not_see(schema.as_deref()) {
                return false;
            }
            for rel in rels {
                // Row security policies, and casts and operators of its columns' types.
                if rel.reading_unknown.is_some()
                    || self.first_may_write(reach, &rel.reading_runs, false).await.is_some()
                {
                    return false;
                }
                if rel.relkind != 'v' {
                    continue;
                }
                if depth >= 8 {
                    return false;
                }
                let Some(def) = rel.view_sql else { return false };
                let c = crate::policy::classify(&def);
                if c.unparsed.is_some()
                    || c.denied_function.is_some()
                    || c.unknown.is_some()
                    || !c.executes.is_empty()
                    || c.accesses.iter().any(|a| a.operation != proto::policy::Operation::Select)
                    || !self.fields_call_nothing_unknown(reach, &c).await
                {
                    return false;
                }
                for f in c.functions.iter().chain(&c.builtins) {
                    if !Box::pin(self.read_only(target, f, timeout, max)).await {
                        return false;
                    }
                }
                work.extend(c.accesses.iter().filter_map(|a| {
                    a.table
                        .as_ref()
                        .map(|t| (t.schema().map(str::to_string), t.table().to_string(), depth + 1))
                }));
            }
        }
        true
    }

    /// The origin of a result column (RowDescription's table OID and attribute number).
    pub async fn origin(
        &mut self,
        reach: Reach<'_>,
        oid: u32,
        attnum: i16,
    ) -> Result<KnownOrigin, UpstreamError> {
        if let Some((o, at)) = fresh(&self.origins, &(oid, attnum)) {
            self.answered(at);
            return Ok(o);
        }
        let (oid_s, att_s) = (oid.to_string(), attnum.to_string());
        let rows = self.rows(reach, ORIGIN_SQL, &[Some(&oid_s), Some(&att_s)]).await;
        let rows = self.noted(rows)?;
        let o = rows.into_iter().next().and_then(|r| {
            let mut r = r.into_iter();
            Some(Arc::new(Origin {
                schema: r.next()??,
                table: r.next()??,
                column: r.next()??,
                relkind: r.next()??.chars().next()?,
                generated: r.next()?,
            }))
        });
        let now = Instant::now();
        self.origins.insert((oid, attnum), (o.clone(), now));
        self.answered(now);
        Ok(o)
    }

    /// Every relation called `name` (in `schema`, or in any schema).
    pub async fn relations(
        &mut self,
        reach: Reach<'_>,
        schema: Option<&str>,
        name: &str,
    ) -> Result<Vec<Relation>, UpstreamError> {
        let key = (schema.map(str::to_string), name.to_string());
        if let Some((r, at)) = fresh(&self.relations, &key) {
            self.answered(at);
            return Ok(r);
        }
        let rows = self.rows(reach, RELATION_SQL, &[Some(name), schema]).await;
        let rows = self.noted(rows)?;
        let rels: Vec<Relation> = rows
            .into_iter()
            .filter_map(|r| {
                let mut r = r.into_iter();
                let (schema, relkind, view_sql) = (r.next()??, r.next()??.chars().next()?, r.next()?);
                let runs = called_from_json(r.next()?.as_deref());
                let policy_reads = r.next()?;
                Some(Relation {
                    schema,
                    relkind,
                    view_sql,
                    reading_unknown: match (&runs, policy_reads) {
                        (_, Some(p)) => Some(format!("a row security policy reads {p}")),
                        (None, _) => Some("what its row security and column types run cannot be read".into()),
                        _ => None,
                    },
                    reading_runs: runs.unwrap_or_default(),
                })
            })
            .collect();
        if schema.is_none()
            && rels
                .iter()
                .all(|r| r.relkind != 'v' && r.reading_runs.is_empty() && r.reading_unknown.is_none())
        {
            self.plain_read.insert(name.to_string(), Instant::now());
        }
        let now = Instant::now();
        self.relations.insert(key, (rels.clone(), now));
        self.answered(now);
        Ok(rels)
    }

    /// The other tables a statement on `t` acts on: the tables it inherits from or is a
    /// partition of (a row of a partition is a row of its parent), those that inherit from it
    /// or are its partitions (a statement on a parent reads and writes their rows), and for a
    /// view the tables its definition reads (a write to an updatable view writes its base
    /// table), and theirs in turn. An unqualified name counts for every schema that has a relation of that name.
    pub async fn reached(
        &mut self,
        reach: Reach<'_>,
        t: &TableName,
    ) -> Result<Arc<[TableName]>, UpstreamError> {
        if let Some((r, at)) = fresh(&self.reached, t) {
            self.answered(at);
            return Ok(r);
        }
        let now = Instant::now();
        let mut out: Vec<TableName> = Vec::new();
        let mut work = vec![t.clone()];
        while let Some(name) = work.pop() {
            let rows = self.rows(reach, INHERITANCE_SQL, &[Some(name.table()), name.schema()]).await;
            let rows = self.noted(rows)?;
            // Its whole line of inheritance, closed already (a view has none).
            for n in rows.into_iter().filter_map(|r| {
                let mut r = r.into_iter();
                Some(TableName { parts: vec![r.next()??, r.next()??] })
            }) {
                if n != *t && !out.contains(&n) {
                    out.push(n);
                }
            }
            // A view's base tables, and theirs in turn. Each relation once: names in several
            // schemas can lead back.
            for rel in self.relations(reach, name.schema(), name.table()).await? {
                if let (true, Some(def)) = (matches!(rel.relkind, 'v' | 'm'), &rel.view_sql) {
                    for n in crate::policy::classify(def).accesses.into_iter().filter_map(|a| a.table) {
                        if n != *t && !out.contains(&n) {
                            work.push(n.clone());
                            out.push(n);
                        }
                    }
                }
            }
        }
        let out: Arc<[TableName]> = out.into();
        self.reached.insert(t.clone(), (out.clone(), now));
        self.answered(now);
        Ok(out)
    }

    /// What the writes `writes` (each an operation that writes rows, [`writes_rows`], on a table
    /// the statement names) do besides, beyond the named tables and what [`Catalog::reached`]
    /// finds for them:
    /// - through foreign keys, recursively: a `TRUNCATE` truncates the tables referencing its
    ///   table, a `DELETE` or `UPDATE` deletes or updates rows of those whose key says so
    ///   ([`through_foreign_key`]), and each of those written tables' own lines of inheritance
    ///   and views ([`Catalog::reached`]) are written alike;
    /// - a user trigger or a rewrite rule on any table written (named, reached, or through a
    ///   foreign key) runs code of any effect: the effect is unknown.
    ///
    /// Past [`MAX_FK_DEPTH`] rounds of foreign keys or [`MAX_WRITES_REACHED`] tables the effect is
    /// unknown too. Each relation's facts are looked up once (in one query for all those a round
    /// finds new) and cached like the other answers.
    pub async fn writes_reached(
        &mut self,
        reach: Reach<'_>,
        writes: &[(Operation, TableName)],
    ) -> Result<WritesReached, UpstreamError> {
        let mut out = WritesReached::default();
        let mut seen: std::collections::HashSet<(Operation, TableName)> = std::collections::HashSet::new();
        let mut round: Vec<(Operation, TableName)> = writes.to_vec();
        // How many (operation, table) pairs foreign keys led to.
        let mut followed = 0;
        for depth in 0..=MAX_FK_DEPTH {
            // This round's tables, and what each reaches through inheritance and views.
            let mut here: Vec<(Operation, TableName)> = Vec::new();
            for (op, t) in round.drain(..) {
                let reached = self.reached(reach, &t).await?;
                for n in std::iter::once(&t).chain(reached.iter()) {
                    if seen.insert((op, n.clone())) {
                        here.push((op, n.clone()));
                    }
                }
            }
            if here.is_empty() {
                return Ok(out);
            }
            let facts = self.write_facts(reach, &here).await?;
            for ((op, t), f) in here.into_iter().zip(facts) {
                if let Some(runs) = &f.runs
                    && !matches!(op, Operation::Vacuum | Operation::Analyze | Operation::Alter)
                {
                    out.unknown = Some(format!("{op} on {t} runs {runs}"));
                    return Ok(out);
                }
                // Inserting or updating a row computes defaults and index entries, and checks
                // constraints (deleting one does neither); VACUUM and ANALYZE compute index (and
                // statistics) expressions, ALTER TABLE defaults and constraints.
                if !matches!(op, Operation::Delete | Operation::Truncate)
                    && let Some(g) = self.first_may_write(reach, &f.code, true).await
                {
                    out.unknown = Some(format!(
                        "{op} on {t} runs {g} (a default, constraint, index or type check), \
                         which may have side effects"
                    ));
                    return Ok(out);
                }
                for (child, del, upd) in &f.referencing {
                    if let Some(cop) = through_foreign_key(op, *del, *upd)
                        && !seen.contains(&(cop, child.clone()))
                        && !round.contains(&(cop, child.clone()))
                    {
                        round.push((cop, child.clone()));
                        followed += 1;
                    }
                }
                if !writes.contains(&(op, t.clone())) {
                    out.tables.push((op, t));
                }
            }
            if round.is_empty() {
                return Ok(out);
            }
            if followed > MAX_WRITES_REACHED || depth == MAX_FK_DEPTH {
                break;
            }
        }
        out.unknown = Some(format!(
            "the foreign keys of the tables it writes lead further than the gateway follows \
             ({MAX_FK_DEPTH} deep, {MAX_WRITES_REACHED} tables)"
        ));
        Ok(out)
    }

    /// [`WriteFacts`] of each of `tables`, in order: cached ones from the cache, the others in
    /// one lookup.
    async fn write_facts(
        &mut self,
        reach: Reach<'_>,
        tables: &[(Operation, TableName)],
    ) -> Result<Vec<Arc<WriteFacts>>, UpstreamError> {
        let mut missing: Vec<&TableName> = Vec::new();
        for (_, t) in tables {
            match fresh(&self.write_facts, t) {
                Some((_, at)) => self.answered(at),
                None if !missing.contains(&t) => missing.push(t),
                None => {}
            }
        }
        if !missing.is_empty() {
            let want = serde_json::Value::Array(
                missing.iter().map(|t| serde_json::json!([t.table(), t.schema()])).collect(),
            )
            .to_string();
            let rows = self.rows(reach, WRITES_SQL, &[Some(&want)]).await;
            let rows = self.noted(rows)?;
            let mut found: Vec<WriteFacts> = missing.iter().map(|_| WriteFacts::default()).collect();
            for row in rows {
                let [Some(i), Some(kind), Some(schema), Some(name), Some(what)] = row.as_slice() else {
                    continue;
                };
                let Some(f) = i.parse::<usize>().ok().and_then(|i| found.get_mut(i)) else { continue };
                match kind.as_str() {
                    "t" => {
                        f.runs.get_or_insert_with(|| format!("trigger {what} of {schema}.{name}"));
                    }
                    "r" => {
                        f.runs.get_or_insert_with(|| format!("rule {what} of {schema}.{name}"));
                    }
                    "c" => f.code.push(Called {
                        schema: schema.clone(),
                        name: name.clone(),
                        flags: what.clone(),
                    }),
                    _ => {
                        let mut a = what.chars();
                        let (Some(del), Some(upd)) = (a.next(), a.next()) else { continue };
                        let child = TableName { parts: vec![schema.clone(), name.clone()] };
                        if !f.referencing.contains(&(child.clone(), del, upd)) {
                            f.referencing.push((child, del, upd));
                        }
                    }
                }
            }
            let now = Instant::now();
            for (t, f) in missing.into_iter().zip(found) {
                self.write_facts.insert(t.clone(), (Arc::new(f), now));
            }
            self.answered(now);
        }
        Ok(tables
            .iter()
            .map(|(_, t)| self.write_facts.get(t).map(|(f, _)| f.clone()).unwrap_or_default())
            .collect())
    }

    /// The live columns of a table, in order, as the target's `search_path` resolves `name`.
    pub async fn columns(
        &mut self,
        reach: Reach<'_>,
        schema: Option<&str>,
        name: &str,
    ) -> Result<Vec<String>, UpstreamError> {
        let key = (schema.map(str::to_string), name.to_string());
        if let Some((c, at)) = self.columns.get(&key)
            && at.elapsed() < TTL
        {
            return Ok(c.clone());
        }
        let rows = self.rows(reach, COLUMNS_SQL, &[Some(name), schema]).await?;
        let cols: Vec<String> = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
        self.columns.insert(key, (cols.clone(), Instant::now()));
        Ok(cols)
    }

    /// The generated columns of relation `name` and their expressions (`upper(name)`): what
    /// each holds is computed from other columns of its row.
    pub async fn generated(
        &mut self,
        reach: Reach<'_>,
        schema: Option<&str>,
        name: &str,
    ) -> Result<GeneratedColumns, UpstreamError> {
        let key = (schema.map(str::to_string), name.to_string());
        if let Some((g, at)) = fresh(&self.generated, &key) {
            self.answered(at);
            return Ok(g);
        }
        let rows = self.rows(reach, GENERATED_SQL, &[Some(name), schema]).await;
        let rows = self.noted(rows)?;
        let g: GeneratedColumns = rows
            .into_iter()
            .filter_map(|r| match r.as_slice() {
                [Some(c), Some(e)] => Some((c.clone(), e.clone())),
                _ => None,
            })
            .collect();
        let now = Instant::now();
        self.generated.insert(key, (g.clone(), now));
        self.answered(now);
        Ok(g)
    }

    /// Run one catalog query with text parameters over a side connection from the node's
    /// [`Pool`]; rows as text.
    ///
    /// A connection that was idle in the pool may have been closed by the target meanwhile
    /// (a restart, `idle_session_timeout`, an administrator): a lookup that fails on one other
    /// than by the target's refusal or a timeout is tried once more on a new connection.
    async fn rows(
        &mut self,
        reach: Reach<'_>,
        sql: &str,
        params: &[Option<&str>],
    ) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
        let Reach { target, timeout, max } = reach;
        let pooled = self.pool.take(target);
        let reused = pooled.is_some();
        let mut up = match pooled {
            Some(up) => up,
            None => self.pool.connect(target, timeout, max).await?,
        };
        let mut result = query(&mut up, sql, params, timeout, max).await;
        if reused
            && matches!(result, Err(ref e) if !matches!(e, UpstreamError::Rejected { .. } | UpstreamError::Timeout(_)))
        {
            up = self.pool.connect(target, timeout, max).await?;
            result = query(&mut up, sql, params, timeout, max).await;
        }
        match result {
            // Answered up to its ReadyForQuery, outside any transaction (the query ran in its
            // own implicit one): the connection is as it was.
            Ok((rows, b'I')) => {
                self.pool.put(target, up);
                Ok(rows)
            }
            Ok((_, status)) => Err(UpstreamError::Protocol(format!(
                "the catalog connection was left in transaction state {:?}",
                char::from(status)
            ))),
            Err(e) => {
                if matches!(e, UpstreamError::Rejected { .. }) {
                    self.pool.put(target, up);
                }
                Err(e)
            }
        }
    }
}

/// Idle catalog side connections, shared by a node's sessions: a session borrows one for each
/// lookup and gives it back, so a node holds about as many as it has lookups in flight, not one
/// per session, and a new session's first lookups skip connecting and authenticating.
///
/// A connection is kept only for the very target (address, TLS, credentials) it was opened
/// for, at most [`MAX_IDLE`] per target, and for [`IDLE_FOR`]; every catalog query runs in an
/// implicit transaction of its own and leaves no state on it.
pub struct Pool {
    idle: std::sync::Mutex<Vec<Idle>>,
    sources: upstream::PasswordSources,
}

struct Idle {
    target: Connection,
    conn: Upstream,
    since: Instant,
}

/// Idle catalog connections kept per target.
pub const MAX_IDLE: usize = 4;
/// How long a catalog connection is kept idle.
pub const IDLE_FOR: Duration = Duration::from_secs(60);
/// What catalog connections call themselves on the target (`pg_stat_activity.application_name`).
pub const APPLICATION_NAME: &str = "airlock catalog";

/// A pool whose connections read no password ([`upstream::PasswordSources::default`]).
impl Default for Pool {
    fn default() -> Self {
        Self::new(Default::default())
    }
}

impl Pool {
    /// An empty pool whose connections read target passwords from `sources`.
    pub fn new(sources: upstream::PasswordSources) -> Self {
        Self { idle: Default::default(), sources }
    }

    async fn connect(
        &self,
        target: &Connection,
        timeout: Duration,
        max: usize,
    ) -> Result<Upstream, UpstreamError> {
        let params = [("application_name".to_string(), APPLICATION_NAME.to_string())];
        let mut up = upstream::connect(target, &params, timeout, max, true, &self.sources).await?;
        match query(&mut up, SEARCH_PATH_SQL, &[], timeout, max).await? {
            (_, b'I') => Ok(up),
            (_, status) => Err(UpstreamError::Protocol(format!(
                "the catalog connection was left in transaction state {:?}",
                char::from(status)
            ))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // Nothing is left half-done under this lock: keep using the list after a panic.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently returned idle connection to `target`, if one is fresh enough.
    fn take(&self, target: &Connection) -> Option<Upstream> {
        let mut idle = self.lock();
        idle.retain(|i| i.since.elapsed() < IDLE_FOR);
        let at = idle.iter().rposition(|i| i.target == *target)?;
        Some(idle.remove(at).conn)
    }

    /// Keep `conn` for the next lookup on `target`, unless enough are kept already.
    fn put(&self, target: &Connection, conn: Upstream) {
        let mut idle = self.lock();
        idle.retain(|i| i.since.elapsed() < IDLE_FOR);
        if idle.iter().filter(|i| i.target == *target).count() < MAX_IDLE {
            idle.push(Idle { target: target.clone(), conn, since: Instant::now() });
        }
    }

    /// Close the connections idle for longer than [`IDLE_FOR`].
    pub fn expire(&self) {
        let expired: Vec<Idle> = {
            let mut idle = self.lock();
            let (keep, expired) =
                std::mem::take(&mut *idle).into_iter().partition(|i| i.since.elapsed() < IDLE_FOR);
            *idle = keep;
            expired
        };
        drop(expired);
    }

    /// How many connections are idle.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// Run `sql` with text parameters on `up`: its rows as text, and the transaction status its
/// ReadyForQuery reported.
async fn query(
    up: &mut Upstream,
    sql: &str,
    params: &[Option<&str>],
    timeout: Duration,
    max: usize,
) -> Result<(Vec<Vec<Option<String>>>, u8), UpstreamError> {
    let mut out = BytesMut::new();
    message(&mut out, b'P', |b| {
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    });
    message(&mut out, b'B', |b| {
        b.put_u8(0);
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
        for v in params {
            match v {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    });
    message(&mut out, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    message(&mut out, b'S', |_| {});
    tokio::time::timeout(timeout, async {
        up.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        let status = loop {
            let fr = up.read_frame(max).await?;
            match fr.tag {
                b'D' => {
                    let row = read_data_row(&fr.body)
                        .ok_or_else(|| UpstreamError::Protocol("malformed catalog row".into()))?;
                    rows.push(
                        row.into_iter().map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned())).collect(),
                    );
                }
                b'E' => error = Some(read_error_fields(&fr.body)),
                b'Z' => break fr.body.first().copied().unwrap_or(0),
                _ => {}
            }
        };
        match error {
            Some((code, message)) => Err(UpstreamError::Rejected { code, message }),
            None => Ok((rows, status)),
        }
    })
    .await
    .map_err(|_| UpstreamError::Timeout("catalog lookup".into()))?
}

/// The answer kept under `key`, and when it was looked up, if it is still trusted ([`TTL`]).
fn fresh<K, Q, V>(answers: &crate::Map<K, (V, Instant)>, key: &Q) -> Option<(V, Instant)>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
    V: Clone,
{
    answers.get(key).filter(|(_, at)| at.elapsed() < TTL).map(|(v, at)| (v.clone(), *at))
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    body(&mut b);
    out.put_u8(tag);
    out.put_i32(b.len() as i32 + 4);
    out.put_slice(&b);
}

/// The table columns the overloads of a function (rows of [`FUNCTION_SQL`]) read; `None` if
/// one has a body that cannot be read (not SQL, a SQL-standard body, or one that does not parse)
/// or that calls a function other than a built-in, whose own reads the body does not show.
fn overloads_read(rows: &[Vec<Option<String>>]) -> FunctionReads {
    let mut cols: Vec<ColumnRef> = Vec::new();
    for row in rows {
        match row.as_slice() {
            [Some(schema), ..] if schema == "pg_catalog" => {}
            // An empty source is a SQL-standard body, which is not kept as text.
            [_, _, Some(language), Some(body), ..] if language == "sql" && !body.trim().is_empty() => {
                if !crate::policy::classify(body).functions.is_empty() {
                    return None;
                }
                cols.extend(masking::lineage::lineage_sql(body).ok()?.into_iter().flat_map(|l| l.referenced));
            }
            _ => return None,
        }
    }
    Some(cols.into())
}

/// One overload of a function (a row of [`FUNCTION_SQL`]): may it run as a read?
fn overload_read_only(f: &FunctionRef, row: &[Option<String>]) -> bool {
    let [Some(schema), Some(volatility), Some(language), body, Some(user_types), Some(makes_named_type)] =
        row
    else {
        return false;
    };
    // An argument or result of a domain (whose CHECK runs on the value), or of a base or range
    // type that is not built in (its own input function), runs functions the body does not
    // show. Composite and enum types run only built-in code. So does a built-in that makes a
    // value of whatever type its caller names (`domain_in('5', 'd'::regtype, -1)`).
    if user_types != "0" || makes_named_type != "false" {
        return false;
    }
    if volatility == "v" && !(schema == "pg_catalog" && crate::policy::is_read_only_builtin(&f.name)) {
        return false;
    }
    if schema == "pg_catalog" {
        return true;
    }
    if language != "sql" {
        return false;
    }
    // An empty source is a SQL-standard body (`RETURN ...`, `BEGIN ATOMIC`), kept parsed in
    // prosqlbody, not as text: unread, so not known to be read-only.
    let Some(body) = body.as_ref().filter(|b| !b.trim().is_empty()) else { return false };
    let c = crate::policy::classify(body);
    c.unparsed.is_none()
        && c.denied_function.is_none()
        && c.unknown.is_none()
        && c.executes.is_empty()
        && c.functions.is_empty()
        && c.accesses.iter().all(|a| a.operation == proto::policy::Operation::Select)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_keys_write_what_their_actions_say() {
        use Operation as O;
        // TRUNCATE reaches every referencing table, whatever its key does.
        for (del, upd) in [('a', 'a'), ('r', 'r'), ('c', 'a')] {
            assert_eq!(through_foreign_key(O::Truncate, del, upd), Some(O::Truncate));
        }
        assert_eq!(through_foreign_key(O::Delete, 'c', 'a'), Some(O::Delete));
        assert_eq!(through_foreign_key(O::Delete, 'n', 'a'), Some(O::Update));
        assert_eq!(through_foreign_key(O::Delete, 'd', 'a'), Some(O::Update));
        assert_eq!(through_foreign_key(O::Delete, 'a', 'c'), None);
        assert_eq!(through_foreign_key(O::Delete, 'r', 'c'), None);
        for upd in ['c', 'n', 'd'] {
            assert_eq!(through_foreign_key(O::Update, 'a', upd), Some(O::Update));
        }
        assert_eq!(through_foreign_key(O::Update, 'c', 'a'), None);
        assert_eq!(through_foreign_key(O::Insert, 'c', 'c'), None);
        assert!(writes_rows(O::Merge) && writes_rows(O::Truncate) && !writes_rows(O::Select));
        assert!(!writes_rows(O::Copy), "COPY FROM is an insert too; COPY TO writes nothing");
    }

    #[test]
    fn a_function_a_kept_expression_calls_is_judged_by_its_row_or_its_body() {
        let f =
            |name: &str, flags: &str| Called { schema: "s".into(), name: name.into(), flags: flags.into() };
        // Built-ins: by volatility and the gateway's lists; a serial column's `nextval` only
        // as the row is written.
        assert_eq!(f("now", "sfcbf").may_write(false), Some(false));
        assert_eq!(f("nextval", "vfcbf").may_write(true), Some(false));
        assert_eq!(f("nextval", "vfcbf").may_write(false), Some(true));
        assert_eq!(f("txid_current", "vfcbf").may_write(true), Some(true));
        assert_eq!(f("ts_rewrite", "ifcbf").may_write(false), Some(true), "denied");
        assert_eq!(f("domain_in", "sfcbt").may_write(false), Some(true), "makes a named type");
        // A user's C: trusted unless volatile; an aggregate's state function may be any.
        assert_eq!(f("citext_eq", "ifcuf").may_write(false), Some(false));
        assert_eq!(f("schedule", "vfcuf").may_write(true), Some(true));
        assert_eq!(f("dblink_exec", "ifcuf").may_write(true), Some(true));
        assert_eq!(f("uuid_generate_v4", "vfcuf").may_write(true), Some(false));
        assert_eq!(f("my_sum", "iacuf").may_write(false), Some(true));
        // Other languages: the body decides; a malformed row may write.
        assert_eq!(f("zapi", "ifouf").may_write(false), None);
        assert_eq!(f("zapi", "if").may_write(false), Some(true));
    }

    #[test]
    fn a_builtin_that_makes_a_named_type_is_not_read_only() {
        let f = FunctionRef { schema: None, name: "domain_in".into() };
        let row = |makes: &str| {
            ["pg_catalog", "s", "internal", "domain_in", "0", makes].map(|v| Some(v.to_string())).to_vec()
        };
        assert!(overload_read_only(&f, &row("false")));
        assert!(!overload_read_only(&f, &row("true")));
        assert!(!overload_read_only(&f, &row("false")[..5]), "a row without the column");
    }
}
