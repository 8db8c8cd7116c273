//! Jobs and applications: adding (one or a million), finding by id prefix, listing, modifying,
//! removing, dependencies and history.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::db::Store;
use crate::error::{Error, Result};
use crate::fields::{self, Value};
use crate::lifecycle::resolve_children;
use crate::model::{id_from_key, job_key, now_us, Application, Event, Job, JobSpec, ID_HEX_SQL};
use crate::sql::{args, params, Arg, Row, Tx, P};
use crate::state::State;

/// The job columns in the order [`job_from_row`] reads them.
pub(crate) const JOB_COLS: &str = "pk, job_id, workflow, name, description, input_files, \
    stage_in_url, stage_out_files, stage_out_url, wall_time_minutes, num_nodes, \
    coschedule_num_nodes, ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, \
    node_packing_count, environ_vars, mpi_flags, application, args, user_workdir, \
    wait_for_parents, post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, \
    data, state, return_code, num_restarts, queued_launch_id, lease_session";

/// Statements touching many jobs by id take them in chunks of this many.
pub(crate) const CHUNK: usize = 10_000;

pub(crate) fn job_from_row(r: &Row) -> Result<Job> {
    let id = id_from_key(r.blob(1)?);
    Ok(Job {
        pk: r.i64(0)?,
        job_id: id,
        spec: JobSpec {
            workflow: r.text(2)?,
            name: r.text(3)?,
            description: r.text(4)?,
            input_files: r.text(5)?,
            stage_in_url: r.text(6)?,
            stage_out_files: r.text(7)?,
            stage_out_url: r.text(8)?,
            wall_time_minutes: r.u32(9)?,
            num_nodes: r.u32(10)?,
            coschedule_num_nodes: r.u32(11)?,
            ranks_per_node: r.u32(12)?,
            cpu_affinity: r.text(13)?,
            threads_per_rank: r.u32(14)?,
            threads_per_core: r.u32(15)?,
            node_packing_count: r.u32(16)?,
            environ_vars: r.text(17)?,
            mpi_flags: r.text(18)?,
            application: r.text(19)?,
            args: r.text(20)?,
            user_workdir: r.text(21)?,
            wait_for_parents: r.bool(22)?,
            post_error_handler: r.bool(23)?,
            post_timeout_handler: r.bool(24)?,
            auto_timeout_retry: r.bool(25)?,
            max_restarts: r.u32(26)?,
            data: serde_json::from_str(r.str(27)?).unwrap_or(serde_json::Value::Null),
        },
        state: r.state(28)?,
        return_code: r.opt_i32(29)?,
        num_restarts: r.u32(30)?,
        queued_launch_id: r.opt_i64(31)?,
        lease_session: r.opt_i64(32)?,
    })
}

pub(crate) fn jobs_from(rows: Vec<Row>) -> Result<Vec<Job>> {
    rows.iter().map(job_from_row).collect()
}

/// A job to add: its fields, an optional chosen id, and parents by id.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// Use this id instead of a fresh one (import files may name their jobs).
    pub job_id: Option<Uuid>,
    /// The job's fields.
    pub spec: JobSpec,
    /// Parents, already in the database or earlier in the same batch.
    pub parents: Vec<Uuid>,
}

/// Filters for `balsam ls` and `balsam rm`; every given filter must match. Text filters are
/// legacy Balsam's: case-insensitive substring matches.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Text in the name.
    pub name: Option<String>,
    /// Hex digits in the job id (hyphens ignored).
    pub id: Option<String>,
    /// Exact state.
    pub state: Option<State>,
    /// Text in the workflow.
    pub workflow: Option<String>,
}

/// A workflow and its jobs by state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkflowSummary {
    /// Workflow name.
    pub workflow: String,
    /// Jobs in it.
    pub total: u64,
    /// Count per state, in state order.
    pub by_state: Vec<(State, u64)>,
}

/// The hex digits of an id prefix, lower case, without hyphens.
fn prefix_hex(prefix: &str) -> Result<String> {
    let hex: String = prefix
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_lowercase();
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::UnknownJob(prefix.to_string()));
    }
    Ok(hex)
}

/// The job with this id or unique prefix; `lock`: for a write that depends on it.
fn find_by_prefix(tx: &mut Tx, prefix: &str, lock: bool) -> Result<Job> {
    let hex = prefix_hex(prefix)?;
    // A whole id is found through the index; a prefix of the id as users see it is a range of
    // the key's middle bytes, not of the key, so it takes a scan (as legacy's prefix search on
    // its database did).
    let rows = if hex.len() == 32 {
        let id = Uuid::parse_str(&hex).map_err(|_| Error::UnknownJob(prefix.to_string()))?;
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE job_id = ?1{}",
            if lock { tx.for_update() } else { "" }
        );
        tx.query(&sql, params![job_key(&id).as_slice()])?
    } else {
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE substr(lower({ID_HEX_SQL}), 1, ?2) = ?1 ORDER BY pk LIMIT 11{}",
            if lock { tx.for_update() } else { "" }
        );
        tx.query(&sql, params![&hex, hex.len()])?
    };
    let mut found = jobs_from(rows)?;
    match found.len() {
        0 => Err(Error::UnknownJob(prefix.to_string())),
        1 => Ok(found.remove(0)),
        n => {
            let mut candidates: Vec<String> = found
                .iter()
                .take(10)
                .map(|j| format!("  {} {} ({})", j.job_id, j.spec.name, j.state))
                .collect();
            if n > 10 {
                candidates.push("  ...".into());
            }
            Err(Error::AmbiguousJob {
                prefix: prefix.to_string(),
                candidates,
            })
        }
    }
}

pub(crate) fn pk_of(tx: &mut Tx, id: &Uuid) -> Result<Option<i64>> {
    tx.query_opt(
        "SELECT pk FROM jobs WHERE job_id = ?1",
        params![job_key(id).as_slice()],
    )?
    .map(|r| r.i64(0))
    .transpose()
}

pub(crate) fn get_job(tx: &mut Tx, pk: i64) -> Result<Job> {
    let row = tx.query_opt(
        &format!("SELECT {JOB_COLS} FROM jobs WHERE pk = ?1"),
        params![pk],
    )?;
    row.map(|r| job_from_row(&r))
        .transpose()?
        .ok_or_else(|| Error::UnknownJob(format!("#{pk}")))
}

/// The job, its row locked for a write that depends on what was read.
pub(crate) fn get_job_locked(tx: &mut Tx, pk: i64) -> Result<Job> {
    let sql = format!(
        "SELECT {JOB_COLS} FROM jobs WHERE pk = ?1{}",
        tx.for_update()
    );
    let row = tx.query_opt(&sql, params![pk])?;
    row.map(|r| job_from_row(&r))
        .transpose()?
        .ok_or_else(|| Error::UnknownJob(format!("#{pk}")))
}

pub(crate) fn insert_event(
    tx: &mut Tx,
    pk: i64,
    from: Option<State>,
    to: State,
    message: &str,
) -> Result<()> {
    tx.exec(
        "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![pk, now_us(), from, to, message],
    )?;
    Ok(())
}

/// Would `parent -> child` close a cycle? True when `parent` is `child` or a descendant of it.
fn reaches(tx: &mut Tx, from: i64, target: i64) -> Result<bool> {
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(pk) = stack.pop() {
        if pk == target {
            return Ok(true);
        }
        if seen.insert(pk) {
            for r in tx.query("SELECT child FROM deps WHERE parent = ?1", params![pk])? {
                stack.push(r.i64(0)?);
            }
        }
    }
    Ok(false)
}

pub(crate) fn app_exists(tx: &mut Tx, name: &str) -> Result<bool> {
    tx.exists("SELECT 1 FROM applications WHERE name = ?1", params![name])
}

pub(crate) fn app_from_row(r: &Row) -> Result<Application> {
    Ok(Application {
        id: r.i64(0)?,
        name: r.text(1)?,
        description: r.text(2)?,
        executable: r.text(3)?,
        preprocess: r.text(4)?,
        postprocess: r.text(5)?,
        envscript: r.text(6)?,
    })
}

pub(crate) const APP_COLS: &str =
    "id, name, description, executable, preprocess, postprocess, envscript";

fn filter_sql(f: &JobFilter) -> Result<(String, Vec<Arg>)> {
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    if let Some(s) = f.state {
        clauses.push("state = ?".to_string());
        args.push(Arg::Int(s.code()));
    }
    // SQLite's lower() folds ASCII only; names and workflows are mostly ASCII, and a
    // non-ASCII filter still matches its exact case.
    if let Some(w) = &f.workflow {
        clauses.push("instr(lower(workflow), lower(?)) > 0".to_string());
        args.push(Arg::Text(w.clone()));
    }
    if let Some(n) = &f.name {
        clauses.push("instr(lower(name), lower(?)) > 0".to_string());
        args.push(Arg::Text(n.clone()));
    }
    if let Some(p) = &f.id {
        let hex: String = p
            .chars()
            .filter(|c| *c != '-')
            .collect::<String>()
            .to_lowercase();
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::BadValue {
                field: "id".into(),
                value: p.clone(),
                expected: "hexadecimal digits of a job id, e.g. 7df86c8b".into(),
            });
        }
        clauses.push(format!("instr(lower({ID_HEX_SQL}), ?) > 0"));
        args.push(Arg::Text(hex));
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    Ok((sql, args))
}

/// Checks a job's fields by the same rules as the field table ([`fields::FIELDS`]), on the
/// typed values (an import checks a million jobs: no text round trip).
pub(crate) fn validate_spec(spec: &JobSpec) -> Result<()> {
    let bad = |field: &str, value: String, expected: &str| Error::BadValue {
        field: field.into(),
        value,
        expected: expected.into(),
    };
    if spec.application.is_empty() {
        return Err(bad(
            "application",
            String::new(),
            "the name of a registered application (see `balsam ls apps`)",
        ));
    }
    if spec.name.is_empty() {
        return Err(bad("name", String::new(), "a non-empty job name"));
    }
    let ints = [
        ("wall_time_minutes", spec.wall_time_minutes),
        ("num_nodes", spec.num_nodes),
        ("coschedule_num_nodes", spec.coschedule_num_nodes),
        ("ranks_per_node", spec.ranks_per_node),
        ("threads_per_rank", spec.threads_per_rank),
        ("threads_per_core", spec.threads_per_core),
        ("node_packing_count", spec.node_packing_count),
        ("max_restarts", spec.max_restarts),
    ];
    for (name, v) in ints {
        let f = fields::field(name)?;
        if v > f.max || (f.kind == fields::Kind::Positive && v == 0) {
            f.parse_str(&v.to_string())?;
        }
    }
    if spec.num_nodes as u64 + spec.coschedule_num_nodes as u64 > fields::MAX_NODES as u64 {
        return Err(bad(
            "coschedule_num_nodes",
            spec.coschedule_num_nodes.to_string(),
            &format!(
                "with num_nodes {}, at most {} nodes in all",
                spec.num_nodes,
                fields::MAX_NODES
            ),
        ));
    }
    if !matches!(spec.cpu_affinity.as_str(), "none" | "depth") {
        fields::field("cpu_affinity")?.parse_str(&spec.cpu_affinity)?;
    }
    if !fields::valid_environ(&spec.environ_vars) {
        fields::field("environ_vars")?.parse_str(&spec.environ_vars)?;
    }
    for (name, text) in [("args", &spec.args), ("mpi_flags", &spec.mpi_flags)] {
        if text.contains(['\'', '"', '\\']) {
            fields::field(name)?.parse_str(text)?;
        }
    }
    if !spec.data.is_object() {
        return Err(bad("data", spec.data.to_string(), "a JSON object"));
    }
    Ok(())
}

/// One job of a bulk import, with where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct ImportLine {
    /// Line (or record) number in the source, 1-based.
    pub line: usize,
    /// The job.
    pub job: NewJob,
}

/// The columns of a job's row as an import writes them, in order.
const INSERT_COLS: &str = "job_id, workflow, name, description, input_files, stage_in_url, \
     stage_out_files, stage_out_url, wall_time_minutes, num_nodes, coschedule_num_nodes, \
     ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, node_packing_count, \
     environ_vars, mpi_flags, application, args, user_workdir, wait_for_parents, \
     post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, data, state";

/// A parent of an imported job: in the database already, or earlier in the same import.
enum ParentRef {
    Pk(i64),
    Local(Uuid),
}

/// A job of an import, checked.
struct Checked {
    id: Uuid,
    spec: JobSpec,
    parents: Vec<ParentRef>,
}

/// The checks of an import, line by line: fields, application, that a chosen id is new, and
/// that parents exist (in the database, or earlier in the import).
struct Checker<'s> {
    source: &'s str,
    apps_ok: HashSet<String>,
    /// Ids given in the file so far (generated ids are new by construction).
    given: HashSet<Uuid>,
    /// Ids of jobs not yet written (PostgreSQL writes in chunks), for their children.
    unwritten: HashSet<Uuid>,
}

impl Checker<'_> {
    fn at(&self, line: usize, e: Error) -> Error {
        Error::BadLine {
            file: self.source.to_string(),
            line,
            source: Box::new(e),
        }
    }

    fn check(&mut self, tx: &mut Tx, item: ImportLine) -> Result<Checked> {
        let ImportLine { line, job: j } = item;
        validate_spec(&j.spec).map_err(|e| self.at(line, e))?;
        if !self.apps_ok.contains(&j.spec.application) {
            if !app_exists(tx, &j.spec.application)? {
                return Err(self.at(line, Error::UnknownApp(j.spec.application.clone())));
            }
            self.apps_ok.insert(j.spec.application.clone());
        }
        let id = match j.job_id {
            Some(id) => {
                if !self.given.insert(id) || pk_of(tx, &id)?.is_some() {
                    return Err(self.at(
                        line,
                        Error::Refused(format!(
                            "job_id {id} is already in the database (or earlier in {})",
                            self.source
                        )),
                    ));
                }
                id
            }
            None => crate::model::new_job_id(),
        };
        let mut parents = Vec::with_capacity(j.parents.len());
        for p in &j.parents {
            if self.unwritten.contains(p) {
                parents.push(ParentRef::Local(*p));
            } else if let Some(pk) = pk_of(tx, p)? {
                parents.push(ParentRef::Pk(pk));
            } else {
                return Err(self.at(
                    line,
                    Error::Refused(format!(
                        "parent {p} is neither in the database nor earlier in {}",
                        self.source
                    )),
                ));
            }
        }
        Ok(Checked {
            id,
            spec: j.spec,
            parents,
        })
    }
}

/// Inserts jobs from `lines` inside `tx`, checking each as it comes (see [`Checker`]). The
/// first problem is returned, naming its line. SQLite inserts row by row (in-process, cheap);
/// PostgreSQL takes chunks through COPY (a statement per row would be a network round trip per
/// job).
fn insert_lines(
    tx: &mut Tx,
    source: &str,
    lines: &mut dyn Iterator<Item = Result<ImportLine>>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<i64>> {
    let mut checker = Checker {
        source,
        apps_ok: HashSet::new(),
        given: HashSet::new(),
        unwritten: HashSet::new(),
    };
    let now = now_us();
    let pks = match tx {
        Tx::Sqlite(c) => {
            let c: &rusqlite::Connection = c;
            let mut ins = c.prepare_cached(&format!(
                "INSERT INTO jobs ({INSERT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                 ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, \
                 ?26, ?27, ?28)"
            ))?;
            let mut ev = c.prepare_cached(
                "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?1, ?2, NULL, ?3, '')",
            )?;
            let mut dep = c.prepare_cached(
                "INSERT INTO deps (parent, child) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?;
            let mut pks = Vec::new();
            for item in lines {
                let j = checker.check(&mut Tx::Sqlite(c), item?)?;
                let s = &j.spec;
                ins.execute(rusqlite::params![
                    job_key(&j.id).as_slice(),
                    s.workflow,
                    s.name,
                    s.description,
                    s.input_files,
                    s.stage_in_url,
                    s.stage_out_files,
                    s.stage_out_url,
                    s.wall_time_minutes,
                    s.num_nodes,
                    s.coschedule_num_nodes,
                    s.ranks_per_node,
                    s.cpu_affinity,
                    s.threads_per_rank,
                    s.threads_per_core,
                    s.node_packing_count,
                    s.environ_vars,
                    s.mpi_flags,
                    s.application,
                    s.args,
                    s.user_workdir,
                    s.wait_for_parents,
                    s.post_error_handler,
                    s.post_timeout_handler,
                    s.auto_timeout_retry,
                    s.max_restarts,
                    s.data.to_string(),
                    State::Created.code()
                ])?;
                let pk = c.last_insert_rowid();
                ev.execute(rusqlite::params![pk, now, State::Created.code()])?;
                for p in &j.parents {
                    if let ParentRef::Pk(ppk) = p {
                        dep.execute(rusqlite::params![ppk, pk])?;
                    }
                }
                pks.push(pk);
                if pks.len() % CHUNK == 0 {
                    progress(pks.len());
                }
            }
            pks
        }
        Tx::Pg(pg) => {
            // The lines may come from a pipe at whatever pace its writer has: this transaction
            // waits for them as long as it takes (every other one is ended after 20 s without
            // its client, see ServerInfo::client_config).
            pg.client
                .batch_execute("SET LOCAL idle_in_transaction_session_timeout = 0")?;
            let mut pks = Vec::new();
            let mut chunk: Vec<Checked> = Vec::with_capacity(CHUNK);
            for item in lines {
                let j = checker.check(&mut Tx::Pg(pg), item?)?;
                checker.unwritten.insert(j.id);
                chunk.push(j);
                if chunk.len() >= CHUNK {
                    pks.extend(crate::pg::copy_jobs(
                        pg,
                        &chunk.iter().map(Checked::for_copy).collect::<Vec<_>>(),
                        now,
                    )?);
                    chunk.clear();
                    checker.unwritten.clear();
                    progress(pks.len());
                }
            }
            if !chunk.is_empty() {
                pks.extend(crate::pg::copy_jobs(
                    pg,
                    &chunk.iter().map(Checked::for_copy).collect::<Vec<_>>(),
                    now,
                )?);
            }
            if pks.len() >= CHUNK {
                // The planner's statistics follow a large import at once (leasing and listing
                // pick their indexes by them).
                pg.client.batch_execute("ANALYZE jobs")?;
            }
            pks
        }
    };
    progress(pks.len());
    Ok(pks)
}

/// What PostgreSQL's COPY needs of a checked job.
pub(crate) struct CopyJob<'a> {
    pub id: &'a Uuid,
    pub spec: &'a JobSpec,
    /// Parents: row numbers, or ids of jobs earlier in the same chunk.
    pub parents: Vec<Result<i64, Uuid>>,
}

impl Checked {
    fn for_copy(&self) -> CopyJob<'_> {
        CopyJob {
            id: &self.id,
            spec: &self.spec,
            parents: self
                .parents
                .iter()
                .map(|p| match p {
                    ParentRef::Pk(pk) => Ok(*pk),
                    ParentRef::Local(u) => Err(*u),
                })
                .collect(),
        }
    }
}

impl Store {
    /// Registers an application; the name must be new.
    pub fn add_app(&mut self, app: &Application) -> Result<Application> {
        if app.name.trim().is_empty() || app.executable.trim().is_empty() {
            return Err(Error::Refused(
                "an application needs a --name and an --executable".into(),
            ));
        }
        self.write(|tx| {
            if app_exists(tx, &app.name)? {
                return Err(Error::DuplicateApp(app.name.clone()));
            }
            let id = tx
                .query_one(
                    "INSERT INTO applications (name, description, executable, preprocess, postprocess, envscript) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                    params![&app.name, &app.description, &app.executable, &app.preprocess, &app.postprocess, &app.envscript],
                )?
                .i64(0)?;
            Ok(Application { id, ..app.clone() })
        })
    }

    /// All applications, by id.
    pub fn apps(&mut self) -> Result<Vec<Application>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {APP_COLS} FROM applications ORDER BY id"),
                &[],
            )?
            .iter()
            .map(app_from_row)
            .collect()
        })
    }

    /// The application of this name.
    pub fn app(&mut self, name: &str) -> Result<Application> {
        self.read(|tx| {
            tx.query_opt(
                &format!("SELECT {APP_COLS} FROM applications WHERE name = ?1"),
                params![name],
            )?
            .map(|r| app_from_row(&r))
            .transpose()?
            .ok_or_else(|| Error::UnknownApp(name.to_string()))
        })
    }

    /// Changes one field of an application (legacy's `modify --type apps`): `name`,
    /// `description`, `executable`, `preprocess`, `postprocess` or `envscript`. A new name must
    /// be free; the application's jobs follow it.
    pub fn modify_app(&mut self, name: &str, field: &str, value: &str) -> Result<Application> {
        const APP_FIELDS: [&str; 6] = [
            "name",
            "description",
            "executable",
            "preprocess",
            "postprocess",
            "envscript",
        ];
        let Some(column) = APP_FIELDS.iter().find(|f| **f == field) else {
            return Err(Error::BadValue {
                field: "field".into(),
                value: field.into(),
                expected: format!("an application field: {}", APP_FIELDS.join(", ")),
            });
        };
        let words_ok = |what: &str| -> Result<()> {
            shell_words::split(value)
                .map(|_| ())
                .map_err(|e| Error::BadValue {
                    field: what.into(),
                    value: value.into(),
                    expected: format!("a command line with balanced quotes ({e})"),
                })
        };
        match *column {
            "name" if value.trim().is_empty() => {
                return Err(Error::Refused(
                    "an application needs a non-empty name".into(),
                ))
            }
            "executable" if value.trim().is_empty() => {
                return Err(Error::Refused(
                    "an application needs a non-empty executable".into(),
                ))
            }
            "executable" | "preprocess" | "postprocess" => words_ok(column)?,
            _ => {}
        }
        self.write(|tx| {
            let sql = format!(
                "SELECT {APP_COLS} FROM applications WHERE name = ?1{}",
                tx.for_update()
            );
            let app = tx
                .query_opt(&sql, params![name])?
                .map(|r| app_from_row(&r))
                .transpose()?
                .ok_or_else(|| Error::UnknownApp(name.to_string()))?;
            if *column == "name" && value != app.name {
                if app_exists(tx, value)? {
                    return Err(Error::DuplicateApp(value.to_string()));
                }
                tx.exec(
                    "UPDATE jobs SET application = ?1 WHERE application = ?2",
                    params![value, name],
                )?;
            }
            // `column` comes from the fixed list above, never from the user's text.
            tx.exec(
                &format!("UPDATE applications SET {column} = ?1 WHERE id = ?2"),
                params![value, app.id],
            )?;
            app_from_row(&tx.query_one(
                &format!("SELECT {APP_COLS} FROM applications WHERE id = ?1"),
                params![app.id],
            )?)
        })
    }

    /// Removes applications by name (or all); refuses while jobs use them unless `force`.
    pub fn remove_apps(&mut self, names: Option<&[String]>, force: bool) -> Result<Vec<String>> {
        self.write(|tx| {
            let targets: Vec<String> = match names {
                Some(ns) => {
                    for n in ns {
                        if !app_exists(tx, n)? {
                            return Err(Error::UnknownApp(n.clone()));
                        }
                    }
                    ns.to_vec()
                }
                None => tx
                    .query("SELECT name FROM applications ORDER BY id", &[])?
                    .iter()
                    .map(|r| r.text(0))
                    .collect::<Result<_>>()?,
            };
            for n in &targets {
                let users = tx
                    .query_one(
                        "SELECT count(*) FROM jobs WHERE application = ?1",
                        params![n],
                    )?
                    .i64(0)?;
                if users > 0 && !force {
                    return Err(Error::Refused(format!(
                        "{users} jobs use application {n:?}; remove them first or pass --force"
                    )));
                }
                tx.exec("DELETE FROM applications WHERE name = ?1", params![n])?;
            }
            Ok(targets)
        })
    }

    /// Adds one job (CREATED, with its creation event). Checks its application and parents.
    pub fn add_job(&mut self, job: &NewJob) -> Result<Job> {
        let pk = self.add_jobs(std::slice::from_ref(job), &mut |_| {})?[0];
        self.job_by_pk(pk)
    }

    /// Adds many jobs in one transaction: a bad job, unknown application, unknown parent or
    /// duplicate id inserts nothing. `progress` hears the count done now and then.
    pub fn add_jobs(
        &mut self,
        jobs: &[NewJob],
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<i64>> {
        let total = jobs.len();
        let mut lines = jobs.iter().enumerate().map(|(i, j)| {
            Ok(ImportLine {
                line: i + 1,
                job: j.clone(),
            })
        });
        self.import_jobs("(jobs)", &mut lines, progress)
            .map_err(|e| match e {
                // One job: its own error, without a line number.
                Error::BadLine { source, .. } if total == 1 => *source,
                other => other,
            })
    }

    /// Bulk import: reads `lines` once, as they come (a pipe works), and inserts every job in
    /// one transaction. The first bad line (its fields, an unknown application or parent, an
    /// id already present) is returned as [`Error::BadLine`] naming `source` and the line, and
    /// nothing is inserted; a crash halfway inserts nothing either. New jobs get time-ordered
    /// ids (UUID v7), so the id index grows at its end. Returns the new jobs' row numbers.
    pub fn import_jobs(
        &mut self,
        source: &str,
        lines: &mut dyn Iterator<Item = Result<ImportLine>>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<i64>> {
        // The lines can be read only once, so the transaction is never run twice: only
        // beginning it is retried.
        self.write_once(|tx| insert_lines(tx, source, lines, progress))
    }

    /// The job with this id or unique id prefix.
    pub fn job(&mut self, id_prefix: &str) -> Result<Job> {
        self.read(|tx| find_by_prefix(tx, id_prefix, false))
    }

    /// The job with this row number.
    pub fn job_by_pk(&mut self, pk: i64) -> Result<Job> {
        self.read(|tx| get_job(tx, pk))
    }

    /// The job with this full id.
    pub fn job_by_id(&mut self, id: &Uuid) -> Result<Job> {
        self.read(|tx| {
            let pk = pk_of(tx, id)?.ok_or_else(|| Error::UnknownJob(id.to_string()))?;
            get_job(tx, pk)
        })
    }

    /// Jobs matching `filter`, oldest first, at most `limit`; with the total that match.
    pub fn list_jobs(&mut self, filter: &JobFilter, limit: usize) -> Result<(Vec<Job>, u64)> {
        let (where_sql, owned) = filter_sql(filter)?;
        let limit = limit.min(i64::MAX as usize);
        self.read(|tx| {
            let ps = args(&owned);
            let total = tx
                .query_one(&format!("SELECT count(*) FROM jobs {where_sql}"), &ps)?
                .u64(0)?;
            let jobs = jobs_from(tx.query(
                &format!("SELECT {JOB_COLS} FROM jobs {where_sql} ORDER BY pk LIMIT {limit}"),
                &ps,
            )?)?;
            Ok((jobs, total))
        })
    }

    /// The first `limit` jobs matching `filter`, by row number, without counting them all (for
    /// a caller that knows the count already, as `ls --by-states` does).
    pub fn list_jobs_first(&mut self, filter: &JobFilter, limit: usize) -> Result<Vec<Job>> {
        let (where_sql, owned) = filter_sql(filter)?;
        let limit = limit.min(i64::MAX as usize);
        self.read(|tx| {
            jobs_from(tx.query(
                &format!("SELECT {JOB_COLS} FROM jobs {where_sql} ORDER BY pk LIMIT {limit}"),
                &args(&owned),
            )?)
        })
    }

    /// How many jobs match `filter`, per state (states with none are left out).
    pub fn count_by_state(&mut self, filter: &JobFilter) -> Result<Vec<(State, u64)>> {
        let (where_sql, owned) = filter_sql(filter)?;
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT state, count(*) FROM jobs {where_sql} GROUP BY state ORDER BY state"
                ),
                &args(&owned),
            )?
            .iter()
            .map(|r| Ok((r.state(0)?, r.u64(1)?)))
            .collect()
        })
    }

    /// Jobs in a workflow (for `balsam job`'s note).
    pub fn count_in_workflow(&mut self, workflow: &str) -> Result<u64> {
        self.read(|tx| {
            tx.query_one(
                "SELECT count(*) FROM jobs WHERE workflow = ?1",
                params![workflow],
            )?
            .u64(0)
        })
    }

    /// Every workflow with its jobs per state.
    pub fn workflows(&mut self) -> Result<Vec<WorkflowSummary>> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT workflow, state, count(*) FROM jobs GROUP BY workflow, state ORDER BY workflow, state",
                &[],
            )?;
            let mut out: Vec<WorkflowSummary> = Vec::new();
            for r in rows {
                let (wf, s, n) = (r.text(0)?, r.state(1)?, r.u64(2)?);
                match out.last_mut() {
                    Some(w) if w.workflow == wf => {
                        w.total += n;
                        w.by_state.push((s, n));
                    }
                    _ => out.push(WorkflowSummary {
                        workflow: wf,
                        total: n,
                        by_state: vec![(s, n)],
                    }),
                }
            }
            Ok(out)
        })
    }

    /// The job's state history, oldest first.
    pub fn history(&mut self, pk: i64) -> Result<Vec<Event>> {
        self.read(|tx| {
            tx.query(
                "SELECT time_us, from_state, to_state, message FROM events WHERE job = ?1 ORDER BY rowid",
                params![pk],
            )?
            .iter()
            .map(|r| {
                Ok(Event {
                    time_us: r.i64(0)?,
                    from_state: r.opt_i64(1)?.map(State::from_code).transpose()?,
                    to_state: r.state(2)?,
                    message: r.text(3)?,
                })
            })
            .collect()
        })
    }

    /// The job's parents.
    pub fn parents(&mut self, pk: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            jobs_from(tx.query(
                &format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE pk IN (SELECT parent FROM deps WHERE child = ?1) ORDER BY pk"
                ),
                params![pk],
            )?)
        })
    }

    /// The job's children.
    pub fn children(&mut self, pk: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            jobs_from(tx.query(
                &format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE pk IN (SELECT child FROM deps WHERE parent = ?1) ORDER BY pk"
                ),
                params![pk],
            )?)
        })
    }

    /// Adds the edge `parent -> child`; refuses duplicates, cycles, and children already past
    /// the parents check.
    pub fn add_dependency(&mut self, parent: &str, child: &str) -> Result<(Job, Job)> {
        self.write(|tx| {
            if tx.backend() == crate::sql::Backend::Postgres {
                // Two edges added at once could close a cycle that neither sees: dependency
                // changes take turns (SQLite's writers always do).
                tx.exec("SELECT pg_advisory_xact_lock(?1)", params![DEPENDENCY_LOCK])?;
            }
            let p = find_by_prefix(tx, parent, false)?;
            let c = find_by_prefix(tx, child, true)?;
            if p.pk == c.pk {
                return Err(Error::Cycle {
                    parent: p.id8(),
                    child: c.id8(),
                });
            }
            if tx.exists(
                "SELECT 1 FROM deps WHERE parent = ?1 AND child = ?2",
                params![p.pk, c.pk],
            )? {
                return Err(Error::Refused(format!(
                    "{} is already a parent of {}",
                    p.cute_id(),
                    c.cute_id()
                )));
            }
            if reaches(tx, c.pk, p.pk)? {
                return Err(Error::Cycle {
                    parent: p.cute_id(),
                    child: c.cute_id(),
                });
            }
            if !matches!(c.state, State::Created | State::AwaitingParents) {
                return Err(Error::Refused(format!(
                    "{} is {}: dependencies can only be added to jobs in CREATED or AWAITING_PARENTS",
                    c.cute_id(),
                    c.state
                )));
            }
            tx.exec(
                "INSERT INTO deps (parent, child) VALUES (?1, ?2)",
                params![p.pk, c.pk],
            )?;
            Ok((p.clone(), c.clone()))
        })
    }

    /// Sets one field of a job, typed; `application` must name a registered application.
    /// A USER_KILLED job is left as it is.
    pub fn modify_field(&mut self, pk: i64, name: &str, value: &Value) -> Result<Job> {
        let field = fields::field(name)?;
        self.write(|tx| {
            let job = get_job_locked(tx, pk)?;
            if job.state == State::UserKilled {
                return Err(Error::Refused(format!(
                    "{} is USER_KILLED and cannot be modified; add a new job instead",
                    job.cute_id()
                )));
            }
            let mut spec = job.spec.clone();
            field.apply(&mut spec, value.clone());
            validate_spec(&spec)?;
            if name == "application" && !app_exists(tx, &spec.application)? {
                return Err(Error::UnknownApp(spec.application.clone()));
            }
            let json;
            let p: P = match value {
                Value::Text(s) => P::Text(s),
                Value::Int(n) => P::Int(i64::from(*n)),
                Value::Bool(b) => P::Int(*b as i64),
                Value::Json(j) => {
                    json = j.to_string();
                    P::Text(&json)
                }
            };
            // `field.name` comes from the fixed field table, never from the user's text.
            tx.exec(
                &format!("UPDATE jobs SET {} = ?1 WHERE pk = ?2", field.name),
                &[p, P::Int(pk)],
            )?;
            get_job(tx, pk)
        })
    }

    /// Removes jobs with their history and edges. Children waiting on a removed parent are
    /// checked again, so none waits forever. A launcher that held a removed job finds it gone
    /// and stops it.
    pub fn remove_jobs(&mut self, pks: &[i64]) -> Result<usize> {
        self.write(|tx| {
            let gone: HashSet<i64> = pks.iter().copied().collect();
            let mut orphans = Vec::new();
            let mut n = 0;
            for chunk in pks.chunks(CHUNK) {
                let list = P::Ints(chunk);
                for r in tx.query(
                    &format!(
                        "SELECT child FROM deps WHERE {}",
                        tx.in_list("parent", "?1")
                    ),
                    &[list],
                )? {
                    let child = r.i64(0)?;
                    if !gone.contains(&child) {
                        orphans.push(child);
                    }
                }
                tx.exec(
                    &format!("DELETE FROM events WHERE {}", tx.in_list("job", "?1")),
                    &[list],
                )?;
                tx.exec(
                    &format!(
                        "DELETE FROM deps WHERE {} OR {}",
                        tx.in_list("parent", "?1"),
                        tx.in_list("child", "?1")
                    ),
                    &[list],
                )?;
                n += tx.exec(
                    &format!("DELETE FROM jobs WHERE {}", tx.in_list("pk", "?1")),
                    &[list],
                )? as usize;
            }
            orphans.sort_unstable();
            orphans.dedup();
            for o in orphans {
                crate::lifecycle::resolve_parents(tx, o, true)?;
            }
            Ok(n)
        })
    }

    /// Row numbers of the jobs matching `filter` (for `rm --all --wf-filter` and the like).
    pub fn job_pks(&mut self, filter: &JobFilter) -> Result<Vec<i64>> {
        let (where_sql, owned) = filter_sql(filter)?;
        self.read(|tx| {
            tx.query(
                &format!("SELECT pk FROM jobs {where_sql} ORDER BY pk"),
                &args(&owned),
            )?
            .iter()
            .map(|r| r.i64(0))
            .collect()
        })
    }

    /// Total jobs.
    pub fn count_jobs(&mut self) -> Result<u64> {
        self.read(|tx| tx.query_one("SELECT count(*) FROM jobs", &[])?.u64(0))
    }

    /// Job ids of the parents of `pk`, for BALSAM_PARENT_IDS.
    pub fn parent_ids(&mut self, pk: i64) -> Result<Vec<Uuid>> {
        Ok(self.parents(pk)?.into_iter().map(|j| j.job_id).collect())
    }

    /// Job ids of the parents of each of `pks` (one query for a whole lease; jobs without
    /// parents are absent from the map).
    pub fn parent_ids_of(&mut self, pks: &[i64]) -> Result<HashMap<i64, Vec<Uuid>>> {
        self.read(|tx| {
            let mut out: HashMap<i64, Vec<Uuid>> = HashMap::new();
            for chunk in pks.chunks(CHUNK) {
                let sql = format!(
                    "SELECT d.child, j.job_id FROM deps d JOIN jobs j ON j.pk = d.parent WHERE {} ORDER BY d.child, j.pk",
                    tx.in_list("d.child", "?1")
                );
                for r in tx.query(&sql, &[P::Ints(chunk)])? {
                    let id = id_from_key(r.blob(1)?);
                    out.entry(r.i64(0)?).or_default().push(id);
                }
            }
            Ok(out)
        })
    }

    /// Resolves the children of `pk` again: used by callers that just changed its state.
    pub fn recheck_children(&mut self, pk: i64) -> Result<()> {
        self.write(|tx| resolve_children(tx, &[pk]))
    }
}

/// Serialises dependency changes on PostgreSQL (see [`Store::add_dependency`]).
const DEPENDENCY_LOCK: i64 = 0x6465_7073;
