//! Queries for programs: what the Python package's `BalsamJob.objects` and
//! `ApplicationDefinition.objects` run. A query is typed before any SQL is written: a field
//! enum ([`JobField`], [`AppField`]), a lookup enum ([`Lookup`]) and operands checked against
//! the field's kind, so an unknown field, a lookup that does not apply or a bad value is
//! refused with a message that names it, and the statement text only ever contains column
//! names from the enums. Each query is written once and runs on SQLite and PostgreSQL.
//!
//! Writes reuse the store's rules: values go through the field table ([`crate::fields`]) and
//! [`validate_spec`], state changes follow `balsam modify`'s rule ([`user_move`], applied
//! set-wise so that 500,000 jobs change in one transaction), removal is
//! [`Store::remove_jobs`] and new jobs go through [`Store::import_jobs`].

use std::collections::HashSet;
use std::fmt;

use serde_json::Value as Json;
use uuid::Uuid;

use crate::db::Store;
use crate::error::{Error, Result};
use crate::fields::{self, Field, MAX_NODES};
use crate::jobs::{
    app_exists, app_from_row, jobs_from, validate_spec, NewJob, APP_COLS, CHUNK, JOB_COLS,
};
use crate::lifecycle::{resolve_children, resolve_parents, user_move, write_updates, RestartCount};
use crate::model::{id_from_key, job_key, now_us, Application, Job, JobSpec, ID_HEX_SQL};
use crate::sql::{Tx, P};
use crate::state::{State, ALL_STATES};

/// Most values one `__in` lookup on text may list (each is a statement parameter; both
/// backends cap those). Lists of integers have no such bound.
pub const MAX_IN_TEXTS: usize = 10_000;

/// Why a query or a change was refused before it reached the database.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A field the table does not have.
    #[error("unknown {table} field {name:?} in {given:?}; {table} fields are: {valid}")]
    UnknownField {
        /// `job` or `application`.
        table: &'static str,
        /// The name given.
        name: String,
        /// The whole keyword, e.g. `nodes__lte`.
        given: String,
        /// The valid names.
        valid: String,
    },
    /// A lookup that does not exist.
    #[error(
        "unknown lookup {lookup:?} in {given:?}; lookups are: {}",
        Lookup::names()
    )]
    UnknownLookup {
        /// The lookup given.
        lookup: String,
        /// The whole keyword.
        given: String,
    },
    /// A lookup that does not apply to the field's kind.
    #[error("{given}: {field} is {kind}; its lookups are: {valid}")]
    BadLookup {
        /// The whole keyword.
        given: String,
        /// The field.
        field: &'static str,
        /// What kind of field it is, in words.
        kind: &'static str,
        /// The lookups that apply.
        valid: String,
    },
    /// A value that does not fit its field or lookup.
    #[error("bad value {value} for {given}: expected {expected}")]
    BadValue {
        /// The keyword it was given for.
        given: String,
        /// The value, as JSON.
        value: String,
        /// What it should be.
        expected: String,
    },
    /// A field that programs may read but not set.
    #[error("{field} cannot be set: {why}")]
    ReadOnly {
        /// The field.
        field: &'static str,
        /// Who keeps it.
        why: &'static str,
    },
    /// The query cannot be used that way.
    #[error("{0}")]
    Unsupported(String),
    /// The store's own checks (a field's value, a state name).
    #[error(transparent)]
    Store(#[from] Error),
}

/// How a field is stored and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Text.
    Text,
    /// A non-null integer.
    Int,
    /// An integer that may be absent (NULL).
    OptInt,
    /// true/false, stored 0/1.
    Bool,
    /// A job state, stored as its code; compared by name.
    State,
    /// A job id, stored as its time-ordered key; compared by the id users see.
    JobId,
    /// A JSON object stored as text.
    Json,
}

impl ColumnKind {
    fn words(self) -> &'static str {
        match self {
            ColumnKind::Text => "a text field",
            ColumnKind::Int | ColumnKind::OptInt => "an integer field",
            ColumnKind::Bool => "a true/false field",
            ColumnKind::State => "the state (compared by name)",
            ColumnKind::JobId => "the job id",
            ColumnKind::Json => "a JSON object field",
        }
    }

    fn lookups(self) -> &'static [Lookup] {
        use Lookup::*;
        match self {
            ColumnKind::Text | ColumnKind::Int | ColumnKind::OptInt | ColumnKind::State => &[
                Exact, IExact, Contains, IContains, StartsWith, In, Lt, Lte, Gt, Gte,
            ],
            ColumnKind::Bool => &[Exact, IExact, In],
            ColumnKind::JobId => &[Exact, IExact, Contains, IContains, StartsWith, In],
            ColumnKind::Json => &[Exact, Contains, IContains, StartsWith, In],
        }
    }
}

/// A field of a table that queries name.
pub trait Column: Copy + Eq + fmt::Debug + 'static {
    /// Every field, in display order.
    const ALL: &'static [Self];
    /// `job` or `application`, for messages.
    const TABLE: &'static str;
    /// The name users type; also the column.
    fn name(self) -> &'static str;
    /// How it is stored and compared.
    fn kind(self) -> ColumnKind;
    /// The SQL expression ordering by it.
    fn order_sql(self) -> String {
        self.name().to_string()
    }
    /// The row number column, the last key of every ordering.
    fn pk_column() -> &'static str;

    /// The field of this name.
    fn parse(name: &str, given: &str) -> Result<Self, QueryError> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| QueryError::UnknownField {
                table: Self::TABLE,
                name: name.to_string(),
                given: given.to_string(),
                valid: Self::ALL
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

macro_rules! job_fields {
    ($($variant:ident => $name:literal, $kind:ident;)*) => {
        /// Every field of a job that queries can name: what users set, and what the system
        /// keeps (state, return code, restarts, the launch and the lease).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum JobField { $(
            #[doc = concat!("`", $name, "`")]
            $variant,
        )* }

        impl Column for JobField {
            const ALL: &'static [JobField] = &[$(JobField::$variant),*];
            const TABLE: &'static str = "job";
            fn name(self) -> &'static str {
                match self { $(JobField::$variant => $name),* }
            }
            fn kind(self) -> ColumnKind {
                match self { $(JobField::$variant => ColumnKind::$kind),* }
            }
            fn order_sql(self) -> String {
                match self {
                    JobField::JobId => ID_HEX_SQL.to_string(),
                    f => f.name().to_string(),
                }
            }
            fn pk_column() -> &'static str {
                "pk"
            }
        }
    };
}

job_fields! {
    JobId => "job_id", JobId;
    Workflow => "workflow", Text;
    Name => "name", Text;
    Description => "description", Text;
    InputFiles => "input_files", Text;
    StageInUrl => "stage_in_url", Text;
    StageOutFiles => "stage_out_files", Text;
    StageOutUrl => "stage_out_url", Text;
    WallTimeMinutes => "wall_time_minutes", Int;
    NumNodes => "num_nodes", Int;
    CoscheduleNumNodes => "coschedule_num_nodes", Int;
    RanksPerNode => "ranks_per_node", Int;
    CpuAffinity => "cpu_affinity", Text;
    ThreadsPerRank => "threads_per_rank", Int;
    ThreadsPerCore => "threads_per_core", Int;
    NodePackingCount => "node_packing_count", Int;
    EnvironVars => "environ_vars", Text;
    MpiFlags => "mpi_flags", Text;
    Application => "application", Text;
    Args => "args", Text;
    UserWorkdir => "user_workdir", Text;
    WaitForParents => "wait_for_parents", Bool;
    PostErrorHandler => "post_error_handler", Bool;
    PostTimeoutHandler => "post_timeout_handler", Bool;
    AutoTimeoutRetry => "auto_timeout_retry", Bool;
    MaxRestarts => "max_restarts", Int;
    Data => "data", Json;
    State => "state", State;
    ReturnCode => "return_code", OptInt;
    NumRestarts => "num_restarts", Int;
    QueuedLaunchId => "queued_launch_id", OptInt;
    LeaseSession => "lease_session", OptInt;
}

impl JobField {
    /// The field table's entry, for fields users set (None for the system's fields).
    pub fn settable(self) -> Option<&'static Field> {
        fields::field(self.name()).ok()
    }

    /// Why a field cannot be set by a program, for the system's fields.
    fn read_only_reason(self) -> Option<&'static str> {
        Some(match self {
            JobField::JobId => "a job's id is given when it is added, and never changes",
            JobField::ReturnCode => "the launcher records the exit code of each run",
            JobField::NumRestarts => {
                "the store counts restarts (a script's RESTART_READY counts toward max_restarts)"
            }
            JobField::QueuedLaunchId => "the service records the launch a job was scheduled into",
            JobField::LeaseSession => "launchers take and release their leases",
            _ => return None,
        })
    }
}

/// Every field of an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppField {
    /// `id`, the number `balsam ls apps` shows.
    Id,
    /// `name`.
    Name,
    /// `description`.
    Description,
    /// `executable`.
    Executable,
    /// `preprocess`.
    Preprocess,
    /// `postprocess`.
    Postprocess,
    /// `envscript`.
    Envscript,
}

impl Column for AppField {
    const ALL: &'static [AppField] = &[
        AppField::Id,
        AppField::Name,
        AppField::Description,
        AppField::Executable,
        AppField::Preprocess,
        AppField::Postprocess,
        AppField::Envscript,
    ];
    const TABLE: &'static str = "application";
    fn name(self) -> &'static str {
        match self {
            AppField::Id => "id",
            AppField::Name => "name",
            AppField::Description => "description",
            AppField::Executable => "executable",
            AppField::Preprocess => "preprocess",
            AppField::Postprocess => "postprocess",
            AppField::Envscript => "envscript",
        }
    }
    fn kind(self) -> ColumnKind {
        match self {
            AppField::Id => ColumnKind::Int,
            _ => ColumnKind::Text,
        }
    }
    fn pk_column() -> &'static str {
        "id"
    }
}

/// How a field is compared with a value (legacy's Django lookups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Equal (the default).
    Exact,
    /// Equal, ignoring ASCII case.
    IExact,
    /// Contains the text.
    Contains,
    /// Contains the text, ignoring ASCII case.
    IContains,
    /// Starts with the text.
    StartsWith,
    /// Equal to one of a list.
    In,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
}

impl Lookup {
    const ALL: [Lookup; 10] = [
        Lookup::Exact,
        Lookup::IExact,
        Lookup::Contains,
        Lookup::IContains,
        Lookup::StartsWith,
        Lookup::In,
        Lookup::Lt,
        Lookup::Lte,
        Lookup::Gt,
        Lookup::Gte,
    ];

    /// The name after `__`.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Exact => "exact",
            Lookup::IExact => "iexact",
            Lookup::Contains => "contains",
            Lookup::IContains => "icontains",
            Lookup::StartsWith => "startswith",
            Lookup::In => "in",
            Lookup::Lt => "lt",
            Lookup::Lte => "lte",
            Lookup::Gt => "gt",
            Lookup::Gte => "gte",
        }
    }

    fn names() -> String {
        Lookup::ALL.map(Lookup::as_str).join(", ")
    }

    fn compare_op(self) -> Option<&'static str> {
        Some(match self {
            Lookup::Lt => "<",
            Lookup::Lte => "<=",
            Lookup::Gt => ">",
            Lookup::Gte => ">=",
            _ => return None,
        })
    }

    /// Whether `text` (a state name) passes this lookup with `operand` (not `in`).
    fn matches_text(self, text: &str, operand: &str) -> bool {
        match self {
            Lookup::Exact => text == operand,
            Lookup::IExact => text.eq_ignore_ascii_case(operand),
            Lookup::Contains => text.contains(operand),
            Lookup::IContains => text
                .to_ascii_lowercase()
                .contains(&operand.to_ascii_lowercase()),
            Lookup::StartsWith => text.starts_with(operand),
            Lookup::Lt => text < operand,
            Lookup::Lte => text <= operand,
            Lookup::Gt => text > operand,
            Lookup::Gte => text >= operand,
            Lookup::In => false,
        }
    }
}

/// A value bound to a statement, owned.
#[derive(Debug, Clone, PartialEq)]
enum Param {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
    Ints(Vec<i64>),
}

impl Param {
    fn p(&self) -> P<'_> {
        match self {
            Param::Int(v) => P::Int(*v),
            Param::Text(s) => P::Text(s),
            Param::Blob(b) => P::Blob(b),
            Param::Ints(v) => P::Ints(v),
        }
    }
}

/// A checked operand.
#[derive(Debug, Clone, PartialEq)]
enum Operand {
    /// Compare with NULL: `exact=None`.
    Null,
    Int(i64),
    Text(String),
    Key([u8; 16]),
    Ints(Vec<i64>),
    Texts(Vec<String>),
    Keys(Vec<[u8; 16]>),
    /// A state lookup, resolved to the states it matches.
    States(Vec<State>),
}

/// One checked comparison: `field__lookup=value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition<F> {
    field: F,
    lookup: Lookup,
    operand: Operand,
}

fn bad_value(given: &str, value: &Json, expected: impl Into<String>) -> QueryError {
    QueryError::BadValue {
        given: given.to_string(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// The hex digits of (part of) a job id, lower case, hyphens dropped.
fn id_hex(given: &str, v: &Json) -> Result<String, QueryError> {
    let s = v
        .as_str()
        .ok_or_else(|| bad_value(given, v, "hexadecimal digits of a job id, as text"))?;
    let hex: String = s.chars().filter(|c| *c != '-').collect::<String>();
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad_value(
            given,
            v,
            "hexadecimal digits of a job id, e.g. 7df86c8b",
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// A whole job id.
fn id_of(given: &str, v: &Json) -> Result<Uuid, QueryError> {
    let hex = id_hex(given, v)?;
    Uuid::parse_str(&hex)
        .ok()
        .filter(|_| hex.len() == 32)
        .ok_or_else(|| {
            bad_value(
                given,
                v,
                "a whole job id (32 hexadecimal digits); use job_id__startswith for a prefix",
            )
        })
}

/// A whole job id as its stored key.
fn id_key(given: &str, v: &Json) -> Result<[u8; 16], QueryError> {
    id_of(given, v).map(|id| job_key(&id))
}

fn int_of(given: &str, v: &Json) -> Result<i64, QueryError> {
    match v {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad_value(given, v, "an integer"))
}

fn text_of(given: &str, v: &Json) -> Result<String, QueryError> {
    match v {
        Json::String(s) => Ok(s.clone()),
        Json::Number(n) => Ok(n.to_string()),
        _ => Err(bad_value(given, v, "text")),
    }
}

fn bool_of(given: &str, v: &Json) -> Result<i64, QueryError> {
    match v {
        Json::Bool(b) => Some(*b as i64),
        Json::Number(n) => n.as_i64().filter(|n| *n == 0 || *n == 1),
        Json::String(s) => fields::parse_bool(s).map(i64::from),
        _ => None,
    }
    .ok_or_else(|| bad_value(given, v, "True or False"))
}

fn state_of(v: &Json, given: &str) -> Result<State, QueryError> {
    match v {
        Json::String(s) => Ok(s.parse::<State>()?),
        _ => Err(bad_value(given, v, "a state name, e.g. JOB_FINISHED")),
    }
}

fn list_of<'v>(given: &str, v: &'v Json) -> Result<&'v [Json], QueryError> {
    match v {
        Json::Array(items) => Ok(items),
        _ => Err(bad_value(given, v, "a list of values")),
    }
}

impl<F: Column> Condition<F> {
    /// Parses `field__lookup` (or just `field`, for exact) with its value, checking that the
    /// field exists, the lookup applies to it and the value fits both.
    pub fn parse(keyword: &str, value: &Json) -> Result<Condition<F>, QueryError> {
        let (name, lookup) = match keyword.split_once("__") {
            Some((name, l)) => {
                let lookup = Lookup::ALL
                    .iter()
                    .copied()
                    .find(|x| x.as_str() == l)
                    .ok_or_else(|| {
                        // The field is checked first: `nodes__lte` is an unknown field.
                        match F::parse(name, keyword) {
                            Err(e) => e,
                            Ok(_) => QueryError::UnknownLookup {
                                lookup: l.to_string(),
                                given: keyword.to_string(),
                            },
                        }
                    })?;
                (name, lookup)
            }
            None => (keyword, Lookup::Exact),
        };
        let field = F::parse(name, keyword)?;
        let kind = field.kind();
        if !kind.lookups().contains(&lookup) {
            return Err(QueryError::BadLookup {
                given: keyword.to_string(),
                field: field.name(),
                kind: kind.words(),
                valid: kind
                    .lookups()
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let operand = Self::operand(keyword, kind, lookup, value)?;
        Ok(Condition {
            field,
            lookup,
            operand,
        })
    }

    fn operand(
        given: &str,
        kind: ColumnKind,
        lookup: Lookup,
        value: &Json,
    ) -> Result<Operand, QueryError> {
        use ColumnKind as K;
        use Lookup as L;
        if value.is_null() {
            return match lookup {
                L::Exact | L::IExact => Ok(Operand::Null),
                _ => Err(bad_value(
                    given,
                    value,
                    "a value (None only works with exact)",
                )),
            };
        }
        let texts = |items: &[Json], each: &dyn Fn(&Json) -> Result<String, QueryError>| {
            if items.len() > MAX_IN_TEXTS {
                return Err(QueryError::Unsupported(format!(
                    "{given}: at most {MAX_IN_TEXTS} values per list; split the query or filter on another field"
                )));
            }
            items
                .iter()
                .filter(|v| !v.is_null())
                .map(each)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match (kind, lookup) {
            (K::State, L::In) => {
                let mut states = Vec::new();
                for v in list_of(given, value)?.iter().filter(|v| !v.is_null()) {
                    states.push(state_of(v, given)?);
                }
                Operand::States(states)
            }
            (K::State, L::Exact | L::IExact) => Operand::States(vec![state_of(value, given)?]),
            (K::State, l) => {
                let text = text_of(given, value)?;
                Operand::States(
                    ALL_STATES
                        .iter()
                        .copied()
                        .filter(|s| l.matches_text(s.as_str(), &text))
                        .collect(),
                )
            }
            (K::JobId, L::Exact | L::IExact) => Operand::Key(id_key(given, value)?),
            (K::JobId, L::In) => {
                let items = list_of(given, value)?;
                if items.len() > MAX_IN_TEXTS {
                    return Err(QueryError::Unsupported(format!(
                        "{given}: at most {MAX_IN_TEXTS} ids per list; split the query"
                    )));
                }
                Operand::Keys(
                    items
                        .iter()
                        .filter(|v| !v.is_null())
                        .map(|v| id_key(given, v))
                        .collect::<Result<_, _>>()?,
                )
            }
            (K::JobId, _) => Operand::Text(id_hex(given, value)?),
            (K::Int | K::OptInt, L::In) => Operand::Ints(
                list_of(given, value)?
                    .iter()
                    .filter(|v| !v.is_null())
                    .map(|v| int_of(given, v))
                    .collect::<Result<_, _>>()?,
            ),
            (K::Int | K::OptInt, L::Exact | L::Lt | L::Lte | L::Gt | L::Gte) => {
                Operand::Int(int_of(given, value)?)
            }
            (K::Int | K::OptInt, _) => Operand::Text(text_of(given, value)?),
            (K::Bool, L::In) => Operand::Ints(
                list_of(given, value)?
                    .iter()
                    .filter(|v| !v.is_null())
                    .map(|v| bool_of(given, v))
                    .collect::<Result<_, _>>()?,
            ),
            (K::Bool, _) => Operand::Int(bool_of(given, value)?),
            (K::Json, L::Exact) => Operand::Text(json_text(given, value)?),
            (K::Json, L::In) => {
                Operand::Texts(texts(list_of(given, value)?, &|v| json_text(given, v))?)
            }
            (K::Json, _) => Operand::Text(text_of(given, value)?),
            (K::Text, L::In) => {
                Operand::Texts(texts(list_of(given, value)?, &|v| text_of(given, v))?)
            }
            (K::Text, _) => Operand::Text(text_of(given, value)?),
        })
    }

    /// The condition as SQL that is never NULL (so that `exclude` negates it exactly), with
    /// its parameters appended in order.
    fn sql(&self, tx: &Tx, params: &mut Vec<Param>) -> String {
        let col = self.field.name();
        let kind = self.field.kind();
        let mut push = |p: Param| params.push(p);
        let text_expr = match kind {
            ColumnKind::Int | ColumnKind::OptInt => format!("CAST({col} AS TEXT)"),
            ColumnKind::JobId => format!("lower({ID_HEX_SQL})"),
            _ => col.to_string(),
        };
        let cond = match (&self.operand, self.lookup) {
            (Operand::Null, _) => return format!("{col} IS NULL"),
            (Operand::States(states), _) => {
                if states.is_empty() {
                    return "0 = 1".into();
                }
                let codes: Vec<String> = states.iter().map(|s| s.code().to_string()).collect();
                return format!("{col} IN ({})", codes.join(", "));
            }
            (Operand::Key(k), _) => {
                push(Param::Blob(k.to_vec()));
                return format!("{col} = ?");
            }
            (Operand::Keys(ks), _) => {
                if ks.is_empty() {
                    return "0 = 1".into();
                }
                for k in ks {
                    push(Param::Blob(k.to_vec()));
                }
                return format!("{col} IN ({})", vec!["?"; ks.len()].join(", "));
            }
            (Operand::Ints(v), _) => {
                if v.is_empty() {
                    return "0 = 1".into();
                }
                push(Param::Ints(v.clone()));
                tx.in_list(col, "?")
            }
            (Operand::Texts(v), _) => {
                if v.is_empty() {
                    return "0 = 1".into();
                }
                for t in v {
                    push(Param::Text(t.clone()));
                }
                format!("{col} IN ({})", vec!["?"; v.len()].join(", "))
            }
            (Operand::Int(v), l) => {
                push(Param::Int(*v));
                format!("{col} {} ?", l.compare_op().unwrap_or("="))
            }
            (Operand::Text(t), l) => {
                let n = t.chars().count();
                push(Param::Text(t.clone()));
                match l {
                    Lookup::Exact => format!("{text_expr} = ?"),
                    Lookup::IExact => format!("lower({text_expr}) = lower(CAST(? AS TEXT))"),
                    Lookup::Contains => format!("instr({text_expr}, CAST(? AS TEXT)) > 0"),
                    Lookup::IContains => {
                        format!("instr(lower({text_expr}), lower(CAST(? AS TEXT))) > 0")
                    }
                    Lookup::StartsWith => format!("substr({text_expr}, 1, {n}) = ?"),
                    l => format!("{text_expr} {} ?", l.compare_op().unwrap_or("=")),
                }
            }
        };
        if kind == ColumnKind::OptInt {
            format!("({col} IS NOT NULL AND {cond})")
        } else {
            cond
        }
    }
}

/// A JSON object's stored text (keys sorted, compact: as the store writes `data`).
fn json_text(given: &str, v: &Json) -> Result<String, QueryError> {
    match v {
        Json::Object(_) => Ok(v.to_string()),
        Json::String(s) => match serde_json::from_str::<Json>(s) {
            Ok(o @ Json::Object(_)) => Ok(o.to_string()),
            _ => Err(bad_value(given, v, "a JSON object")),
        },
        _ => Err(bad_value(given, v, "a JSON object (a dict)")),
    }
}

/// One term of a filter.
#[derive(Debug, Clone, PartialEq)]
enum Term<F> {
    Field(Condition<F>),
    /// Jobs that are children of this job.
    ChildOf(i64),
    /// Jobs that are parents of this job.
    ParentOf(i64),
}

/// `filter(...)` (all terms hold) or `exclude(...)` (not all of them hold).
#[derive(Debug, Clone, PartialEq)]
struct Group<F> {
    negate: bool,
    terms: Vec<Term<F>>,
}

/// A query over a table: the filters (each `filter` and `exclude` adds a group, all of which
/// must hold), the order, and a slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Query<F> {
    groups: Vec<Group<F>>,
    order: Vec<(F, bool)>,
    offset: u64,
    limit: Option<u64>,
}

/// A query over jobs.
pub type JobQuery = Query<JobField>;
/// A query over applications.
pub type AppQuery = Query<AppField>;

impl<F: Column> Default for Query<F> {
    fn default() -> Self {
        Query {
            groups: Vec::new(),
            order: Vec::new(),
            offset: 0,
            limit: None,
        }
    }
}

impl<F: Column> Query<F> {
    /// Every row.
    pub fn all() -> Query<F> {
        Query::default()
    }

    fn refuse_if_sliced(&self, what: &str) -> Result<(), QueryError> {
        if self.is_sliced() {
            return Err(QueryError::Unsupported(format!(
                "cannot {what} a query once it has been sliced; filter it instead"
            )));
        }
        Ok(())
    }

    fn add(&self, negate: bool, terms: Vec<Term<F>>) -> Result<Query<F>, QueryError> {
        self.refuse_if_sliced("filter")?;
        let mut q = self.clone();
        if !terms.is_empty() {
            q.groups.push(Group { negate, terms });
        }
        Ok(q)
    }

    /// Rows for which every lookup holds (`filter(num_nodes__lte=128, ...)`).
    pub fn filter(&self, lookups: &[(String, Json)]) -> Result<Query<F>, QueryError> {
        let terms = lookups
            .iter()
            .map(|(k, v)| Condition::parse(k, v).map(Term::Field))
            .collect::<Result<_, _>>()?;
        self.add(false, terms)
    }

    /// Rows for which not every lookup holds (`exclude(state="USER_KILLED")`).
    pub fn exclude(&self, lookups: &[(String, Json)]) -> Result<Query<F>, QueryError> {
        let terms = lookups
            .iter()
            .map(|(k, v)| Condition::parse(k, v).map(Term::Field))
            .collect::<Result<_, _>>()?;
        self.add(true, terms)
    }

    /// Ordered by these fields (`-name` descending), replacing any earlier order; rows that
    /// tie keep the order they were added in.
    pub fn order_by(&self, keys: &[String]) -> Result<Query<F>, QueryError> {
        self.refuse_if_sliced("reorder")?;
        let mut q = self.clone();
        q.order = keys
            .iter()
            .map(|k| {
                let (desc, name) = match k.strip_prefix('-') {
                    Some(n) => (true, n),
                    None => (false, k.as_str()),
                };
                F::parse(name, k).map(|f| (f, desc))
            })
            .collect::<Result<_, _>>()?;
        Ok(q)
    }

    /// The rows from `start` up to `stop` (exclusive) of this query, as Python's slices.
    pub fn slice(&self, start: u64, stop: Option<u64>) -> Query<F> {
        let mut q = self.clone();
        let avail = self.limit.map(|l| l.saturating_sub(start));
        let want = stop.map(|s| s.saturating_sub(start));
        q.offset = self.offset + start;
        q.limit = match (avail, want) {
            (Some(a), Some(w)) => Some(a.min(w)),
            (a, w) => a.or(w),
        };
        q
    }

    /// Whether a slice was taken.
    pub fn is_sliced(&self) -> bool {
        self.offset > 0 || self.limit.is_some()
    }

    /// `WHERE ...` (or nothing), with its parameters.
    fn where_sql(&self, tx: &Tx, params: &mut Vec<Param>) -> String {
        if self.groups.is_empty() {
            return String::new();
        }
        let pk = F::pk_column();
        let groups: Vec<String> = self
            .groups
            .iter()
            .map(|g| {
                let terms: Vec<String> = g
                    .terms
                    .iter()
                    .map(|t| match t {
                        Term::Field(c) => c.sql(tx, params),
                        Term::ChildOf(p) => {
                            params.push(Param::Int(*p));
                            format!("{pk} IN (SELECT child FROM deps WHERE parent = ?)")
                        }
                        Term::ParentOf(c) => {
                            params.push(Param::Int(*c));
                            format!("{pk} IN (SELECT parent FROM deps WHERE child = ?)")
                        }
                    })
                    .collect();
                let all = terms.join(" AND ");
                if g.negate {
                    format!("NOT ({all})")
                } else {
                    format!("({all})")
                }
            })
            .collect();
        format!("WHERE {}", groups.join(" AND "))
    }

    /// `ORDER BY ... LIMIT ... OFFSET ...`.
    fn tail_sql(&self) -> String {
        let pk = F::pk_column();
        let mut keys: Vec<String> = self
            .order
            .iter()
            .map(|(f, desc)| format!("{}{}", f.order_sql(), if *desc { " DESC" } else { "" }))
            .collect();
        keys.push(pk.to_string());
        let mut s = format!(" ORDER BY {}", keys.join(", "));
        // Both backends take LIMIT before OFFSET; a slice with no end still needs a LIMIT on
        // SQLite, and -1 there (ALL on PostgreSQL) means none.
        match (self.limit, self.offset) {
            (Some(l), o) => s.push_str(&format!(" LIMIT {l} OFFSET {o}")),
            (None, 0) => {}
            (None, o) => s.push_str(&format!(" LIMIT {} OFFSET {o}", i64::MAX)),
        }
        s
    }

    /// `SELECT cols FROM table WHERE ... ORDER BY ... LIMIT ...`.
    fn select_sql(&self, tx: &Tx, cols: &str, table: &str, params: &mut Vec<Param>) -> String {
        let w = self.where_sql(tx, params);
        format!("SELECT {cols} FROM {table} {w}{}", self.tail_sql())
    }

    /// `SELECT count(*)` of this query, slice included.
    fn count_sql(&self, tx: &Tx, table: &str, params: &mut Vec<Param>) -> String {
        let pk = F::pk_column();
        if self.is_sliced() {
            let inner = self.select_sql(tx, pk, table, params);
            format!("SELECT count(*) FROM ({inner}) AS sliced")
        } else {
            format!(
                "SELECT count(*) FROM {table} {}",
                self.where_sql(tx, params)
            )
        }
    }
}

impl Query<JobField> {
    /// The children of the job with row number `pk`.
    pub fn children_of(pk: i64) -> JobQuery {
        JobQuery::all()
            .add(false, vec![Term::ChildOf(pk)])
            .expect("an unsliced query")
    }

    /// The parents of the job with row number `pk`.
    pub fn parents_of(pk: i64) -> JobQuery {
        JobQuery::all()
            .add(false, vec![Term::ParentOf(pk)])
            .expect("an unsliced query")
    }
}

fn params_of(v: &[Param]) -> Vec<P<'_>> {
    v.iter().map(Param::p).collect()
}

/// One field's value in a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Absent (a NULL return code, launch or lease).
    Null,
    /// An integer.
    Int(i64),
    /// true/false.
    Bool(bool),
    /// Text.
    Text(String),
    /// A state.
    State(State),
    /// A job id.
    Id(Uuid),
    /// A JSON object.
    Json(Json),
}

fn cell(row: &crate::sql::Row, i: usize, kind: ColumnKind) -> Result<Cell> {
    Ok(match kind {
        ColumnKind::Text => Cell::Text(row.text(i)?),
        ColumnKind::Int => Cell::Int(row.i64(i)?),
        ColumnKind::OptInt => row.opt_i64(i)?.map(Cell::Int).unwrap_or(Cell::Null),
        ColumnKind::Bool => Cell::Bool(row.bool(i)?),
        ColumnKind::State => Cell::State(row.state(i)?),
        ColumnKind::JobId => Cell::Id(id_from_key(row.blob(i)?)),
        ColumnKind::Json => Cell::Json(serde_json::from_str(row.str(i)?).unwrap_or(Json::Null)),
    })
}

/// Changes to make to every job of a query (`update(**fields)`): field values checked by the
/// field table, and a new state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobChanges {
    fields: Vec<(JobField, fields::Value)>,
    state: Option<State>,
}

impl JobChanges {
    /// Checks `field=value` pairs: each must be a field users set (or `state`), with a value of
    /// its kind (`False` is false, counts are bounded, `environ_vars` may be a dict).
    pub fn parse(pairs: &[(String, Json)]) -> Result<JobChanges, QueryError> {
        let mut out = JobChanges::default();
        let mut probe = JobSpec {
            name: "probe".into(),
            application: "probe".into(),
            ..JobSpec::default()
        };
        for (name, value) in pairs {
            let field = JobField::parse(name, name)?;
            if field == JobField::State {
                out.state = Some(state_of(value, name)?);
                continue;
            }
            if let Some(why) = field.read_only_reason() {
                return Err(QueryError::ReadOnly {
                    field: field.name(),
                    why,
                });
            }
            let f = field.settable().expect("every other job field is settable");
            let v = f.parse_json(value)?;
            f.apply(&mut probe, v.clone());
            out.fields.retain(|(g, _)| *g != field);
            out.fields.push((field, v));
        }
        // The rules that concern one field at a time (a non-empty name, an application, a
        // JSON object): the rest of each job is checked against its row.
        validate_spec(&probe)?;
        Ok(out)
    }

    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.state.is_none()
    }

    fn value_of(&self, name: &str) -> Option<&fields::Value> {
        self.fields
            .iter()
            .find(|(f, _)| f.name() == name)
            .map(|(_, v)| v)
    }
}

/// A new job from a program's field values (`BalsamJob(**fields).save()`, `bulk_create`):
/// the fields users set, and optionally `job_id` and `parents` (ids). A new job starts
/// CREATED; the system's fields cannot be given.
pub fn new_job(pairs: &[(&str, &Json)]) -> Result<NewJob, QueryError> {
    let mut job = NewJob::default();
    for (name, value) in pairs {
        match *name {
            "job_id" => {
                if !value.is_null() {
                    job.job_id = Some(id_of("job_id", value)?);
                }
            }
            "parents" => {
                for p in list_of("parents", value)? {
                    job.parents.push(id_of("parents", p)?);
                }
            }
            "state" => {
                return Err(QueryError::Unsupported(
                    "a new job starts CREATED: save it first, then change its state".into(),
                ))
            }
            name => {
                let field = JobField::parse(name, name)?;
                if let Some(why) = field.read_only_reason() {
                    return Err(QueryError::ReadOnly {
                        field: field.name(),
                        why,
                    });
                }
                let f = field.settable().expect("every other job field is settable");
                let v = f.parse_json(value)?;
                f.apply(&mut job.spec, v);
            }
        }
    }
    Ok(job)
}

/// One state change of a job's history, for the reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// When, µs since the epoch (UTC).
    pub time_us: i64,
    /// The job's row number.
    pub job: i64,
    /// Before (None at creation).
    pub from: Option<State>,
    /// After.
    pub to: State,
}

/// Cumulative count of RUN_DONE over time: `(time, jobs done so far)` at each completion.
/// `changes` in time order.
pub fn throughput(changes: &[StateChange]) -> Vec<(i64, u64)> {
    let mut n = 0;
    changes
        .iter()
        .filter(|c| c.to == State::RunDone && c.from != Some(State::RunDone))
        .map(|c| {
            n += 1;
            (c.time_us, n)
        })
        .collect()
}

/// Jobs running over time: `(time, jobs running then)` at each start and end of a run.
/// `changes` in time order.
pub fn utilization(changes: &[StateChange]) -> Vec<(i64, u64)> {
    let mut running: HashSet<i64> = HashSet::new();
    let mut out = Vec::new();
    for c in changes {
        let changed = if c.to == State::Running {
            running.insert(c.job)
        } else if c.from == Some(State::Running) {
            running.remove(&c.job)
        } else {
            false
        };
        if changed {
            out.push((c.time_us, running.len() as u64));
        }
    }
    out
}

/// RUN_ERROR per minute: `(start of minute, errors in it)` for every minute from the first
/// error's to the last's (minutes without errors count 0). `changes` in time order.
pub fn errors_per_minute(changes: &[StateChange]) -> Vec<(i64, u64)> {
    const MINUTE_US: i64 = 60_000_000;
    let minutes: Vec<i64> = changes
        .iter()
        .filter(|c| c.to == State::RunError && c.from != Some(State::RunError))
        .map(|c| c.time_us.div_euclid(MINUTE_US))
        .collect();
    let (Some(first), Some(last)) = (minutes.iter().min(), minutes.iter().max()) else {
        return Vec::new();
    };
    let mut counts = vec![0u64; (last - first + 1) as usize];
    for m in &minutes {
        counts[(m - first) as usize] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, n)| ((first + i as i64) * MINUTE_US, n))
        .collect()
}

/// A history line of a set-wise state change, and the job's new row.
struct Moved {
    update: crate::pg::JobUpdate,
    event: crate::pg::NewEvent,
    to: State,
}

impl Store {
    /// How many jobs the query matches (its slice included).
    pub fn count_jobs_where(&mut self, q: &JobQuery) -> Result<u64> {
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.count_sql(tx, "jobs", &mut ps);
            tx.query_one(&sql, &params_of(&ps))?.u64(0)
        })
    }

    /// The jobs the query matches, in its order.
    pub fn find_jobs(&mut self, q: &JobQuery) -> Result<Vec<Job>> {
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.select_sql(tx, JOB_COLS, "jobs", &mut ps);
            jobs_from(tx.query(&sql, &params_of(&ps))?)
        })
    }

    /// Row numbers of the jobs the query matches, in its order (8 bytes a job: a program
    /// walks a million jobs by fetching them in pages of these).
    pub fn find_job_pks(&mut self, q: &JobQuery) -> Result<Vec<i64>> {
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.select_sql(tx, "pk", "jobs", &mut ps);
            tx.query(&sql, &params_of(&ps))?
                .iter()
                .map(|r| r.i64(0))
                .collect()
        })
    }

    /// The jobs with these row numbers, in this order; jobs removed meanwhile are left out.
    pub fn jobs_by_pks(&mut self, pks: &[i64]) -> Result<Vec<Job>> {
        let found = self.read(|tx| {
            let mut out = Vec::with_capacity(pks.len());
            for chunk in pks.chunks(CHUNK) {
                let sql = format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE {}",
                    tx.in_list("pk", "?1")
                );
                out.extend(jobs_from(tx.query(&sql, &[P::Ints(chunk)])?)?);
            }
            Ok(out)
        })?;
        let mut by_pk: std::collections::HashMap<i64, Job> =
            found.into_iter().map(|j| (j.pk, j)).collect();
        Ok(pks.iter().filter_map(|pk| by_pk.remove(pk)).collect())
    }

    /// The given fields of each job the query matches, in its order (`values_list`).
    pub fn job_values(&mut self, q: &JobQuery, fields: &[JobField]) -> Result<Vec<Vec<Cell>>> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let cols: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.select_sql(tx, &cols.join(", "), "jobs", &mut ps);
            tx.query(&sql, &params_of(&ps))?
                .iter()
                .map(|r| {
                    fields
                        .iter()
                        .enumerate()
                        .map(|(i, f)| cell(r, i, f.kind()))
                        .collect()
                })
                .collect()
        })
    }

    /// The state of each job, by row number (None for a job removed meanwhile): one statement
    /// for any number of jobs (a program waiting on 10,000 jobs asks this once a round).
    pub fn job_states(&mut self, pks: &[i64]) -> Result<Vec<Option<State>>> {
        let found = self.read(|tx| {
            let mut out = std::collections::HashMap::with_capacity(pks.len());
            for chunk in pks.chunks(CHUNK * 10) {
                let sql = format!(
                    "SELECT pk, state FROM jobs WHERE {}",
                    tx.in_list("pk", "?1")
                );
                for r in tx.query(&sql, &[P::Ints(chunk)])? {
                    out.insert(r.i64(0)?, r.state(1)?);
                }
            }
            Ok(out)
        })?;
        Ok(pks.iter().map(|pk| found.get(pk).copied()).collect())
    }

    /// Changes every job the query matches, in one transaction (`update(**fields)`); returns
    /// how many. Field values are set as `balsam modify` sets them; a state change is made as
    /// `balsam modify ID state S` makes it (the history line says `source`, e.g. "Python",
    /// and `count` decides whether RESTART_READY counts toward max_restarts), set-wise.
    /// Refused as a whole, changing nothing, when a job matched is USER_KILLED (a killed job
    /// stays as it is), an application is unknown or a node count would exceed the limit.
    pub fn update_jobs_where(
        &mut self,
        q: &JobQuery,
        changes: &JobChanges,
        count: RestartCount,
        source: &str,
    ) -> std::result::Result<u64, QueryError> {
        q.refuse_if_sliced("update")?;
        Ok(self.write(|tx| update_in(tx, q, changes, count, source))?)
    }

    /// Removes every job the query matches, by `balsam rm`'s rules ([`Store::remove_jobs`]:
    /// history and edges go with them, waiting children are checked again). Returns how many.
    pub fn remove_jobs_where(&mut self, q: &JobQuery) -> std::result::Result<usize, QueryError> {
        q.refuse_if_sliced("delete")?;
        let pks = self.find_job_pks(q)?;
        if pks.is_empty() {
            return Ok(0);
        }
        Ok(self.remove_jobs(&pks)?)
    }

    /// The state changes in the history of the query's jobs that the reports read (runs
    /// starting and ending, errors), in time order.
    pub fn run_history(&mut self, q: &JobQuery) -> Result<Vec<StateChange>> {
        let q = Query {
            order: Vec::new(),
            ..q.clone()
        };
        self.read(|tx| {
            let mut ps = Vec::new();
            let jobs = if q.groups.is_empty() && !q.is_sliced() {
                String::new()
            } else {
                let inner = q.select_sql(tx, "pk", "jobs", &mut ps);
                format!("AND e.job IN ({inner})")
            };
            let (running, done, error) = (
                State::Running.code(),
                State::RunDone.code(),
                State::RunError.code(),
            );
            let sql = format!(
                "SELECT e.time_us, e.job, e.from_state, e.to_state FROM events e \
                 WHERE (e.to_state IN ({running}, {done}, {error}) OR e.from_state = {running}) \
                 AND (e.from_state IS NULL OR e.from_state <> e.to_state) {jobs} \
                 ORDER BY e.time_us, e.rowid"
            );
            tx.query(&sql, &params_of(&ps))?
                .iter()
                .map(|r| {
                    Ok(StateChange {
                        time_us: r.i64(0)?,
                        job: r.i64(1)?,
                        from: r.opt_i64(2)?.map(State::from_code).transpose()?,
                        to: r.state(3)?,
                    })
                })
                .collect()
        })
    }

    /// How many applications the query matches.
    pub fn count_apps_where(&mut self, q: &AppQuery) -> Result<u64> {
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.count_sql(tx, "applications", &mut ps);
            tx.query_one(&sql, &params_of(&ps))?.u64(0)
        })
    }

    /// The applications the query matches, in its order.
    pub fn find_apps(&mut self, q: &AppQuery) -> Result<Vec<Application>> {
        self.read(|tx| {
            let mut ps = Vec::new();
            let sql = q.select_sql(tx, APP_COLS, "applications", &mut ps);
            tx.query(&sql, &params_of(&ps))?
                .iter()
                .map(app_from_row)
                .collect()
        })
    }

    /// Changes fields of every application the query matches, by [`Store::modify_app`]'s
    /// rules, in one transaction. Returns how many.
    pub fn update_apps_where(
        &mut self,
        q: &AppQuery,
        changes: &[(String, String)],
    ) -> std::result::Result<u64, QueryError> {
        q.refuse_if_sliced("update")?;
        let mut cols = Vec::new();
        for (name, _) in changes {
            let f = AppField::parse(name, name)?;
            if f == AppField::Id {
                return Err(QueryError::ReadOnly {
                    field: "id",
                    why: "an application's number is given when it is registered",
                });
            }
            cols.push(f);
        }
        let names = self.find_apps(q)?;
        if changes.iter().any(|(n, _)| n == "name") && names.len() > 1 {
            return Err(QueryError::Unsupported(format!(
                "{} applications match: names are unique, so a name can only be given to one",
                names.len()
            )));
        }
        // modify_app's checks on the values, all before the transaction.
        for (name, value) in changes {
            if matches!(name.as_str(), "name" | "executable") && value.trim().is_empty() {
                return Err(QueryError::Store(Error::Refused(format!(
                    "an application needs a non-empty {name}"
                ))));
            }
            if matches!(name.as_str(), "executable" | "preprocess" | "postprocess") {
                shell_words::split(value).map_err(|e| {
                    QueryError::Store(Error::BadValue {
                        field: name.clone(),
                        value: value.clone(),
                        expected: format!("a command line with balanced quotes ({e})"),
                    })
                })?;
            }
        }
        Ok(self.write(|tx| {
            let mut n = 0;
            for app in &names {
                let sql = format!(
                    "SELECT {APP_COLS} FROM applications WHERE id = ?1{}",
                    tx.for_update()
                );
                let Some(row) = tx.query_opt(&sql, &[P::Int(app.id)])? else {
                    continue;
                };
                let now = app_from_row(&row)?;
                for ((_, value), col) in changes.iter().zip(&cols) {
                    if *col == AppField::Name && *value != now.name {
                        if app_exists(tx, value)? {
                            return Err(Error::DuplicateApp(value.clone()));
                        }
                        tx.exec(
                            "UPDATE jobs SET application = ?1 WHERE application = ?2",
                            &[P::Text(value), P::Text(&now.name)],
                        )?;
                    }
                    // `col` comes from the field enum, never from the user's text.
                    tx.exec(
                        &format!("UPDATE applications SET {} = ?1 WHERE id = ?2", col.name()),
                        &[P::Text(value), P::Int(now.id)],
                    )?;
                }
                n += 1;
            }
            Ok(n)
        })?)
    }

    /// Removes the applications the query matches, by `balsam rm apps`'s rules (refused while
    /// jobs use one, unless `force`). Returns the names removed.
    pub fn remove_apps_where(
        &mut self,
        q: &AppQuery,
        force: bool,
    ) -> std::result::Result<Vec<String>, QueryError> {
        q.refuse_if_sliced("delete")?;
        let names: Vec<String> = self.find_apps(q)?.into_iter().map(|a| a.name).collect();
        if names.is_empty() {
            return Ok(names);
        }
        Ok(self.remove_apps(Some(&names), force)?)
    }
}

/// The body of [`Store::update_jobs_where`], inside its transaction.
fn update_in(
    tx: &mut Tx,
    q: &JobQuery,
    changes: &JobChanges,
    count: RestartCount,
    source: &str,
) -> Result<u64> {
    let mut ps = Vec::new();
    let w = q.where_sql(tx, &mut ps);
    let sql = format!(
        "SELECT pk, state, num_restarts, max_restarts, return_code, lease_session FROM jobs {w} ORDER BY pk{}",
        tx.for_update()
    );
    let rows = tx.query(&sql, &params_of(&ps))?;
    if rows.is_empty() || changes.is_empty() {
        return Ok(rows.len() as u64);
    }
    let killed = rows
        .iter()
        .map(|r| r.state(1))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|s| *s == State::UserKilled)
        .count();
    if killed > 0 {
        return Err(Error::Refused(format!(
            "{killed} of the {} jobs matched are USER_KILLED, and a killed job cannot be modified \
             (add a new job instead); leave them out with .exclude(state=\"USER_KILLED\")",
            rows.len()
        )));
    }
    let pks: Vec<i64> = rows.iter().map(|r| r.i64(0)).collect::<Result<_>>()?;

    if let Some(fields::Value::Text(app)) = changes.value_of("application") {
        if !app_exists(tx, app)? {
            return Err(Error::UnknownApp(app.clone()));
        }
    }
    let nodes = changes.value_of("num_nodes");
    let cosched = changes.value_of("coschedule_num_nodes");
    if nodes.is_some() || cosched.is_some() {
        let expr = |v: Option<&fields::Value>, col: &str| match v {
            Some(fields::Value::Int(n)) => n.to_string(),
            _ => col.to_string(),
        };
        let (n, c) = (
            expr(nodes, "num_nodes"),
            expr(cosched, "coschedule_num_nodes"),
        );
        for chunk in pks.chunks(CHUNK) {
            let sql = format!(
                "SELECT num_nodes, coschedule_num_nodes FROM jobs WHERE {} AND {n} + {c} > {MAX_NODES} LIMIT 1",
                tx.in_list("pk", "?1")
            );
            if let Some(r) = tx.query_opt(&sql, &[P::Ints(chunk)])? {
                let (rn, rc) = (r.i64(0)?, r.i64(1)?);
                return Err(Error::BadValue {
                    field: "num_nodes + coschedule_num_nodes".into(),
                    value: format!("{} + {}", n.parse().unwrap_or(rn), c.parse().unwrap_or(rc)),
                    expected: format!("at most {MAX_NODES} nodes in all"),
                });
            }
        }
    }
    if !changes.fields.is_empty() {
        let sets: Vec<String> = changes
            .fields
            .iter()
            .enumerate()
            .map(|(i, (f, _))| format!("{} = ?{}", f.name(), i + 2))
            .collect();
        let json: Vec<Option<String>> = changes
            .fields
            .iter()
            .map(|(_, v)| match v {
                fields::Value::Json(j) => Some(j.to_string()),
                _ => None,
            })
            .collect();
        for chunk in pks.chunks(CHUNK) {
            let mut args = vec![P::Ints(chunk)];
            for ((_, v), j) in changes.fields.iter().zip(&json) {
                args.push(match v {
                    fields::Value::Text(s) => P::Text(s),
                    fields::Value::Int(n) => P::Int(i64::from(*n)),
                    fields::Value::Bool(b) => P::Int(*b as i64),
                    fields::Value::Json(_) => P::Text(j.as_deref().unwrap_or("{}")),
                });
            }
            // The column names come from the field table, never from the user's text.
            let sql = format!(
                "UPDATE jobs SET {} WHERE {}",
                sets.join(", "),
                tx.in_list("pk", "?1")
            );
            tx.exec(&sql, &args)?;
        }
    }
    if let Some(to) = changes.state {
        let now = now_us();
        let mut moved = Vec::with_capacity(rows.len());
        for r in &rows {
            let from = r.state(1)?;
            let (new, restarts, message) = user_move(from, to, r.u32(2)?, r.u32(3)?, count, source);
            moved.push(Moved {
                update: crate::pg::JobUpdate {
                    pk: r.i64(0)?,
                    state: new.code(),
                    return_code: r.opt_i64(4)?,
                    num_restarts: restarts.into(),
                    lease_session: r.opt_i64(5)?,
                },
                event: crate::pg::NewEvent {
                    job: r.i64(0)?,
                    time_us: now,
                    from_state: Some(from.code()),
                    to_state: new.code(),
                    message,
                },
                to: new,
            });
        }
        let (mut updates, mut events, mut ended, mut waiting) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for m in moved {
            if m.to.is_end() {
                ended.push(m.update.pk);
            } else if matches!(m.to, State::Created | State::AwaitingParents) {
                waiting.push((m.update.pk, m.to == State::AwaitingParents));
            }
            updates.push(m.update);
            events.push(m.event);
        }
        write_updates(tx, &updates, &events)?;
        if !ended.is_empty() {
            resolve_children(tx, &ended)?;
        }
        for (pk, only_awaiting) in waiting {
            resolve_parents(tx, pk, only_awaiting)?;
        }
    }
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(k: &str, v: Json) -> Result<Condition<JobField>, QueryError> {
        Condition::parse(k, &v)
    }

    #[test]
    fn keywords_name_a_field_and_a_lookup() {
        let c = cond("num_nodes__lte", json!(128)).unwrap();
        assert_eq!(c.field, JobField::NumNodes);
        assert_eq!(c.lookup, Lookup::Lte);
        assert_eq!(c.operand, Operand::Int(128));
        let c = cond("name", json!("test")).unwrap();
        assert_eq!((c.field, c.lookup), (JobField::Name, Lookup::Exact));
    }

    #[test]
    fn unknown_fields_and_lookups_are_named() {
        let e = cond("nodes__lte", json!(1)).unwrap_err().to_string();
        assert!(e.contains("\"nodes\"") && e.contains("num_nodes"), "{e}");
        let e = cond("num_nodes__below", json!(1)).unwrap_err().to_string();
        assert!(e.contains("\"below\"") && e.contains("lte"), "{e}");
        let e = cond("wait_for_parents__lt", json!(true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("true/false") && e.contains("exact"), "{e}");
    }

    #[test]
    fn values_must_fit_the_field() {
        let e = cond("num_nodes__lte", json!("many"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_nodes__lte") && e.contains("integer"), "{e}");
        let e = cond("state", json!("DONE")).unwrap_err().to_string();
        assert!(e.contains("DONE") && e.contains("JOB_FINISHED"), "{e}");
        let e = cond("state__in", json!(["RUN_DONE", "NOPE"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOPE"), "{e}");
        let e = cond("job_id", json!("7df86c8b")).unwrap_err().to_string();
        assert!(e.contains("startswith"), "{e}");
        assert!(cond("job_id__startswith", json!("7df8-6c8b")).is_ok());
        assert!(cond("job_id__startswith", json!("xyz")).is_err());
    }

    #[test]
    fn state_lookups_resolve_over_the_names() {
        let c = cond("state__startswith", json!("RUN_")).unwrap();
        assert_eq!(
            c.operand,
            Operand::States(vec![State::RunDone, State::RunTimeout, State::RunError])
        );
        let c = cond("state__iexact", json!("job_finished")).unwrap();
        assert_eq!(c.operand, Operand::States(vec![State::JobFinished]));
    }

    #[test]
    fn changes_are_checked_by_the_field_table() {
        let ok = JobChanges::parse(&[
            ("state".into(), json!("RESTART_READY")),
            ("wait_for_parents".into(), json!(false)),
            ("environ_vars".into(), json!({"A": "1"})),
        ])
        .unwrap();
        assert_eq!(ok.state, Some(State::RestartReady));
        assert_eq!(
            ok.value_of("environ_vars"),
            Some(&fields::Value::Text("A=1".into()))
        );
        for (k, v) in [
            ("num_nodes", json!(0)),
            ("num_nodes", json!(-1)),
            ("cpu_affinity", json!("deep")),
            ("wait_for_parents", json!(1)),
            ("name", json!("")),
            ("state", json!("FINISHED")),
            ("nodes", json!(1)),
            ("num_restarts", json!(0)),
            ("job_id", json!("x")),
        ] {
            assert!(
                JobChanges::parse(&[(k.into(), v.clone())]).is_err(),
                "{k}={v} accepted"
            );
        }
    }

    #[test]
    fn slices_compose_as_python_slices() {
        let q = JobQuery::all().slice(10, Some(30)).slice(5, Some(100));
        assert_eq!((q.offset, q.limit), (15, Some(15)));
        let q = JobQuery::all().slice(3, None);
        assert_eq!((q.offset, q.limit), (3, None));
        assert!(q.filter(&[]).is_err());
    }

    #[test]
    fn a_users_move_counts_or_resets_restarts() {
        let (s, n, m) = user_move(
            State::JobFinished,
            State::RestartReady,
            0,
            5,
            RestartCount::Count,
            "Python",
        );
        assert_eq!((s, n), (State::RestartReady, 1));
        assert_eq!(m, "User mutated state from Python");
        let (s, n, m) = user_move(
            State::RunError,
            State::RestartReady,
            5,
            5,
            RestartCount::Count,
            "Python",
        );
        assert_eq!((s, n), (State::Failed, 5));
        assert!(m.starts_with("restart limit reached"), "{m}");
        let (s, n, m) = user_move(
            State::Failed,
            State::RestartReady,
            5,
            5,
            RestartCount::Reset,
            "Python",
        );
        assert_eq!((s, n), (State::RestartReady, 0));
        assert!(m.contains("reset from 5 to 0"), "{m}");
        let (s, n, _) = user_move(
            State::Created,
            State::RestartReady,
            0,
            0,
            RestartCount::Count,
            "Python",
        );
        assert_eq!((s, n), (State::RestartReady, 0), "a job that never ran");
    }

    fn ch(t: i64, job: i64, from: Option<State>, to: State) -> StateChange {
        StateChange {
            time_us: t,
            job,
            from,
            to,
        }
    }

    #[test]
    fn reports_read_the_history() {
        use State::*;
        let h = [
            ch(0, 1, Some(Preprocessed), Running),
            ch(1, 2, Some(Preprocessed), Running),
            ch(2, 1, Some(Running), RunDone),
            ch(3, 3, Some(Preprocessed), Running),
            ch(4, 2, Some(Running), RunError),
            ch(60_000_000 * 2 + 5, 3, Some(Running), RunError),
        ];
        assert_eq!(throughput(&h), vec![(2, 1)]);
        assert_eq!(
            utilization(&h),
            vec![(0, 1), (1, 2), (2, 1), (3, 2), (4, 1), (120_000_005, 0)]
        );
        assert_eq!(
            errors_per_minute(&h),
            vec![(0, 1), (60_000_000, 0), (120_000_000, 1)]
        );
        assert!(errors_per_minute(&[]).is_empty());
    }
}
