//! One SQL layer over both backends, so every query of the store is written once.
//!
//! - Statements use SQLite's placeholders (`?1`, or `?` in order); on PostgreSQL they become
//!   `$1`. Both backends run the same text otherwise: PostgreSQL's schema defines the two
//!   SQLite functions the queries use (`instr`, `hex`), and both accept `ON CONFLICT DO
//!   NOTHING` and `RETURNING`.
//! - Parameters are [`P`]: borrowed, typed loosely (an integer binds to any integer or boolean
//!   column), so call sites stay short; a list of ids ([`P::Ints`]) binds as a JSON array that
//!   SQLite unpacks with `json_each`, and as a `bigint[]` on PostgreSQL ([`Tx::in_list`]).
//! - Rows come back as owned values ([`Row`]) with typed getters that name what was wrong.
//! - Row locks: SQLite serialises writers on the whole file, so a read inside a write
//!   transaction already sees the rows as they will stay. PostgreSQL runs transactions at READ
//!   COMMITTED side by side, so a read that a write depends on locks its rows
//!   ([`Tx::for_update`], [`Tx::for_share`]); queues of work are taken with `SKIP LOCKED`.

use std::collections::HashMap;

use postgres::types::{FromSql, IsNull, ToSql, Type};

use crate::error::{Error, Result};
use crate::state::State;

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: one file, one host.
    Sqlite,
    /// A PostgreSQL server: many hosts.
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum P<'a> {
    /// NULL.
    Null,
    /// An integer (also binds to boolean columns).
    Int(i64),
    /// Text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
    /// A list of integers, for `IN` ([`Tx::in_list`]).
    Ints(&'a [i64]),
}

impl From<i64> for P<'_> {
    fn from(v: i64) -> Self {
        P::Int(v)
    }
}
impl From<u32> for P<'_> {
    fn from(v: u32) -> Self {
        P::Int(v.into())
    }
}
impl From<i32> for P<'_> {
    fn from(v: i32) -> Self {
        P::Int(v.into())
    }
}
impl From<usize> for P<'_> {
    fn from(v: usize) -> Self {
        P::Int(v as i64)
    }
}
impl From<bool> for P<'_> {
    fn from(v: bool) -> Self {
        P::Int(v as i64)
    }
}
impl From<State> for P<'_> {
    fn from(v: State) -> Self {
        P::Int(v.code())
    }
}
impl<'a> From<&'a str> for P<'a> {
    fn from(v: &'a str) -> Self {
        P::Text(v)
    }
}
impl<'a> From<&'a String> for P<'a> {
    fn from(v: &'a String) -> Self {
        P::Text(v)
    }
}
impl<'a> From<&'a [u8]> for P<'a> {
    fn from(v: &'a [u8]) -> Self {
        P::Blob(v)
    }
}
impl<'a> From<&'a [i64]> for P<'a> {
    fn from(v: &'a [i64]) -> Self {
        P::Ints(v)
    }
}
impl<'a, T: Into<P<'a>>> From<Option<T>> for P<'a> {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(P::Null)
    }
}

/// An owned parameter, for statements built at run time (filters).
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
}

impl Arg {
    /// The parameter borrowing this value.
    pub fn p(&self) -> P<'_> {
        match self {
            Arg::Int(v) => P::Int(*v),
            Arg::Text(s) => P::Text(s),
        }
    }
}

/// Parameters borrowing a list of owned ones.
pub(crate) fn args(v: &[Arg]) -> Vec<P<'_>> {
    v.iter().map(Arg::p).collect()
}

/// Parameters from a list of expressions: `params![pk, state, name]`.
macro_rules! params {
    () => { &[] as &[$crate::sql::P] };
    ($($v:expr),+ $(,)?) => { &[$($crate::sql::P::from($v)),+] as &[$crate::sql::P] };
}
pub(crate) use params;

/// A value read from a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum V {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row of a result, owned.
#[derive(Debug, Clone)]
pub(crate) struct Row(Vec<V>);

fn corrupt(i: usize, want: &str, got: &V) -> Error {
    Error::Corrupt(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn get(&self, i: usize) -> Result<&V> {
        self.0
            .get(i)
            .ok_or_else(|| Error::Corrupt(format!("no column {i} in the result")))
    }

    /// An integer column.
    pub fn i64(&self, i: usize) -> Result<i64> {
        match self.get(i)? {
            V::Int(v) => Ok(*v),
            other => Err(corrupt(i, "an integer", other)),
        }
    }

    /// A nullable integer column.
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.get(i)? {
            V::Null => Ok(None),
            V::Int(v) => Ok(Some(*v)),
            other => Err(corrupt(i, "an integer or NULL", other)),
        }
    }

    /// An integer column that fits u32.
    pub fn u32(&self, i: usize) -> Result<u32> {
        let v = self.i64(i)?;
        u32::try_from(v).map_err(|_| Error::Corrupt(format!("column {i}: {v} out of range")))
    }

    /// A non-negative integer column.
    pub fn u64(&self, i: usize) -> Result<u64> {
        let v = self.i64(i)?;
        u64::try_from(v).map_err(|_| Error::Corrupt(format!("column {i}: {v} out of range")))
    }

    /// A nullable integer column that fits i32.
    pub fn opt_i32(&self, i: usize) -> Result<Option<i32>> {
        self.opt_i64(i)?
            .map(|v| {
                i32::try_from(v)
                    .map_err(|_| Error::Corrupt(format!("column {i}: {v} out of range")))
            })
            .transpose()
    }

    /// A boolean stored as 0/1.
    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.i64(i)? != 0)
    }

    /// A text column.
    pub fn str(&self, i: usize) -> Result<&str> {
        match self.get(i)? {
            V::Text(s) => Ok(s),
            other => Err(corrupt(i, "text", other)),
        }
    }

    /// A text column, owned.
    pub fn text(&self, i: usize) -> Result<String> {
        self.str(i).map(str::to_string)
    }

    /// A bytes column.
    pub fn blob(&self, i: usize) -> Result<&[u8]> {
        match self.get(i)? {
            V::Blob(b) => Ok(b),
            other => Err(corrupt(i, "bytes", other)),
        }
    }

    /// A state code column.
    pub fn state(&self, i: usize) -> Result<State> {
        State::from_code(self.i64(i)?)
    }
}

/// A PostgreSQL connection with its prepared statements.
pub(crate) struct PgConn {
    pub client: postgres::Client,
    stmts: HashMap<String, postgres::Statement>,
}

/// Prepared statements kept per PostgreSQL connection; past this the cache starts again (the
/// store's statements are few; this only bounds statements built with varying text).
const PG_STATEMENT_CACHE: usize = 512;

impl PgConn {
    pub fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client,
            stmts: HashMap::new(),
        }
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let st = self.client.prepare(&pg_placeholders(sql))?;
        if self.stmts.len() >= PG_STATEMENT_CACHE {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }
}

/// SQLite's `?1` / `?` placeholders as PostgreSQL's `$1`.
pub(crate) fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 1;
    let mut chars = sql.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_string = !in_string;
            out.push(c);
            continue;
        }
        if c != '?' || in_string {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        out.push('$');
        if digits.is_empty() {
            out.push_str(&next.to_string());
            next += 1;
        } else {
            out.push_str(&digits);
        }
    }
    out
}

/// An open transaction (or, for reads, a snapshot) on either backend.
pub(crate) enum Tx<'c> {
    /// Inside `BEGIN` on a SQLite connection.
    Sqlite(&'c rusqlite::Connection),
    /// Inside `BEGIN` on a PostgreSQL connection.
    Pg(&'c mut PgConn),
}

impl Tx<'_> {
    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Pg(_) => Backend::Postgres,
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[P]) -> Result<u64> {
        match self {
            Tx::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Tx::Pg(c) => {
                let st = c.statement(sql)?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                Ok(c.client.execute(&st, &refs)?)
            }
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&mut self, sql: &str, params: &[P]) -> Result<Vec<Row>> {
        match self {
            Tx::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        vals.push(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => V::Null,
                            rusqlite::types::ValueRef::Integer(v) => V::Int(v),
                            rusqlite::types::ValueRef::Real(v) => V::Real(v),
                            rusqlite::types::ValueRef::Text(t) => {
                                V::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => V::Blob(b.to_vec()),
                        });
                    }
                    out.push(Row(vals));
                }
                Ok(out)
            }
            Tx::Pg(c) => {
                let st = c.statement(sql)?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                let rows = c.client.query(&st, &refs)?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get::<_, V>(i).map_err(Error::from))
                            .collect::<Result<Vec<V>>>()
                            .map(Row)
                    })
                    .collect()
            }
        }
    }

    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[P]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row; a query that must return one (a count).
    pub fn query_one(&mut self, sql: &str, params: &[P]) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| Error::Corrupt(format!("no row from {sql}")))
    }

    /// Whether the query returns a row.
    pub fn exists(&mut self, sql: &str, params: &[P]) -> Result<bool> {
        Ok(!self.query(sql, params)?.is_empty())
    }

    /// Runs several statements without parameters (schema changes).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Tx::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Tx::Pg(c) => Ok(c.client.batch_execute(sql)?),
        }
    }

    /// ` FOR UPDATE` on PostgreSQL: a read a write depends on locks its rows.
    pub fn for_update(&self) -> &'static str {
        match self {
            Tx::Sqlite(_) => "",
            Tx::Pg(_) => " FOR UPDATE",
        }
    }

    /// ` FOR SHARE` on PostgreSQL: a read that must not change under the transaction.
    pub fn for_share(&self) -> &'static str {
        match self {
            Tx::Sqlite(_) => "",
            Tx::Pg(_) => " FOR SHARE",
        }
    }

    /// ` FOR UPDATE SKIP LOCKED` on PostgreSQL: take work no other transaction is taking.
    pub fn skip_locked(&self) -> &'static str {
        match self {
            Tx::Sqlite(_) => "",
            Tx::Pg(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// `col IN (the list bound to param)`, for a [`P::Ints`] parameter.
    pub fn in_list(&self, col: &str, param: &str) -> String {
        match self {
            Tx::Sqlite(_) => format!("{col} IN (SELECT value FROM json_each({param}))"),
            Tx::Pg(_) => format!("{col} = ANY({param})"),
        }
    }
}

impl rusqlite::ToSql for P<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            P::Null => ToSqlOutput::Owned(Value::Null),
            P::Int(v) => ToSqlOutput::Owned(Value::Integer(*v)),
            P::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            P::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            P::Ints(v) => {
                let mut s = String::with_capacity(v.len() * 8 + 2);
                s.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(&x.to_string());
                }
                s.push(']');
                ToSqlOutput::Owned(Value::Text(s))
            }
        })
    }
}

impl ToSql for P<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let mismatch = || -> Box<dyn std::error::Error + Sync + Send> {
            format!("cannot bind {self:?} to a {ty} parameter").into()
        };
        match self {
            P::Null => Ok(IsNull::Yes),
            P::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                _ => Err(mismatch()),
            },
            P::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => {
                    s.to_sql(ty, out)
                }
                _ => Err(mismatch()),
            },
            P::Blob(b) => match *ty {
                Type::BYTEA => b.to_sql(ty, out),
                _ => Err(mismatch()),
            },
            P::Ints(v) => match *ty {
                Type::INT8_ARRAY => v.to_sql(ty, out),
                _ => Err(mismatch()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> FromSql<'a> for V {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<V, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => V::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => V::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => V::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => V::Int(bool::from_sql(ty, raw)? as i64),
            Type::FLOAT8 => V::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => V::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => V::Blob(Vec::<u8>::from_sql(ty, raw)?),
            _ => V::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> std::result::Result<V, Box<dyn std::error::Error + Sync + Send>> {
        Ok(V::Null)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::FLOAT8
                | Type::FLOAT4
                | Type::BYTEA
                | Type::TEXT
                | Type::VARCHAR
                | Type::NAME
                | Type::BPCHAR
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE x = ?1 AND y = ?2 OR z = ?1"),
            "SELECT a FROM t WHERE x = $1 AND y = $2 OR z = $1"
        );
        assert_eq!(
            pg_placeholders("WHERE a = ? AND b = ? AND c = '?'"),
            "WHERE a = $1 AND b = $2 AND c = '?'"
        );
    }
}
