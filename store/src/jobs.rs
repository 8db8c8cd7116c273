//! Jobs and applications: adding (one or a million), finding by id prefix, listing, modifying,
//! removing, dependencies and history.

use std::collections::HashSet;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use uuid::Uuid;

use crate::db::Store;
use crate::error::{Error, Result};
use crate::fields::{self, Value};
use crate::lifecycle::resolve_children;
use crate::model::{now_us, Application, Event, Job, JobSpec};
use crate::state::State;

/// The job columns in the order [`job_from_row`] reads them.
pub(crate) const JOB_COLS: &str = "pk, job_id, workflow, name, description, input_files, \
    stage_in_url, stage_out_files, stage_out_url, wall_time_minutes, num_nodes, \
    coschedule_num_nodes, ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, \
    node_packing_count, environ_vars, mpi_flags, application, args, user_workdir, \
    wait_for_parents, post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, \
    data, state, return_code, num_restarts, queued_launch_id, lease_session";

pub(crate) fn job_from_row(r: &Row) -> rusqlite::Result<Job> {
    let id: Vec<u8> = r.get(1)?;
    let data: String = r.get(27)?;
    let state: i64 = r.get(28)?;
    let bad = |msg: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, msg.into())
    };
    Ok(Job {
        pk: r.get(0)?,
        job_id: Uuid::from_slice(&id).map_err(|e| bad(e.to_string()))?,
        spec: JobSpec {
            workflow: r.get(2)?,
            name: r.get(3)?,
            description: r.get(4)?,
            input_files: r.get(5)?,
            stage_in_url: r.get(6)?,
            stage_out_files: r.get(7)?,
            stage_out_url: r.get(8)?,
            wall_time_minutes: r.get(9)?,
            num_nodes: r.get(10)?,
            coschedule_num_nodes: r.get(11)?,
            ranks_per_node: r.get(12)?,
            cpu_affinity: r.get(13)?,
            threads_per_rank: r.get(14)?,
            threads_per_core: r.get(15)?,
            node_packing_count: r.get(16)?,
            environ_vars: r.get(17)?,
            mpi_flags: r.get(18)?,
            application: r.get(19)?,
            args: r.get(20)?,
            user_workdir: r.get(21)?,
            wait_for_parents: r.get(22)?,
            post_error_handler: r.get(23)?,
            post_timeout_handler: r.get(24)?,
            auto_timeout_retry: r.get(25)?,
            max_restarts: r.get(26)?,
            data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
        },
        state: State::from_code(state).map_err(|e| bad(e.to_string()))?,
        return_code: r.get(29)?,
        num_restarts: r.get(30)?,
        queued_launch_id: r.get(31)?,
        lease_session: r.get(32)?,
    })
}

/// A job to add: its fields, an optional chosen id, and parents by id.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// Use this id instead of a fresh UUID v4 (import files may name their jobs).
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

/// Where the ids of a prefix lie, as a range of 16-byte keys.
fn prefix_range(prefix: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let hex: String = prefix
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_lowercase();
    if hex.is_empty() || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::UnknownJob(prefix.to_string()));
    }
    let pad = |c: char| {
        let mut s = hex.clone();
        s.extend(std::iter::repeat_n(c, 32 - hex.len()));
        Uuid::parse_str(&s).map(|u| u.as_bytes().to_vec())
    };
    let lo = pad('0').map_err(|_| Error::UnknownJob(prefix.to_string()))?;
    let hi = pad('f').map_err(|_| Error::UnknownJob(prefix.to_string()))?;
    Ok((lo, hi))
}

fn find_by_prefix(tx: &Transaction, prefix: &str) -> Result<Job> {
    let (lo, hi) = prefix_range(prefix)?;
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {JOB_COLS} FROM jobs WHERE job_id BETWEEN ?1 AND ?2 ORDER BY job_id LIMIT 11"
    ))?;
    let mut found: Vec<Job> = stmt
        .query_map(params![lo, hi], job_from_row)?
        .collect::<rusqlite::Result<_>>()?;
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

pub(crate) fn pk_of(tx: &Connection, id: &Uuid) -> Result<Option<i64>> {
    Ok(tx
        .prepare_cached("SELECT pk FROM jobs WHERE job_id = ?1")?
        .query_row([id.as_bytes().as_slice()], |r| r.get(0))
        .optional()?)
}

pub(crate) fn get_job(tx: &Transaction, pk: i64) -> Result<Job> {
    tx.prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE pk = ?1"))?
        .query_row([pk], job_from_row)
        .optional()?
        .ok_or_else(|| Error::UnknownJob(format!("#{pk}")))
}

pub(crate) fn insert_event(
    tx: &Transaction,
    pk: i64,
    from: Option<State>,
    to: State,
    message: &str,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![pk, now_us(), from.map(State::code), to.code(), message])?;
    Ok(())
}

/// Would `parent -> child` close a cycle? True when `parent` is `child` or a descendant of it.
fn reaches(tx: &Transaction, from: i64, target: i64) -> Result<bool> {
    let mut stmt = tx.prepare_cached("SELECT child FROM deps WHERE parent = ?1")?;
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(pk) = stack.pop() {
        if pk == target {
            return Ok(true);
        }
        if seen.insert(pk) {
            let kids: Vec<i64> = stmt
                .query_map([pk], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            stack.extend(kids);
        }
    }
    Ok(false)
}

fn app_exists(tx: &Connection, name: &str) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM applications WHERE name = ?1")?
        .exists([name])?)
}

fn app_from_row(r: &Row) -> rusqlite::Result<Application> {
    Ok(Application {
        id: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        executable: r.get(3)?,
        preprocess: r.get(4)?,
        postprocess: r.get(5)?,
        envscript: r.get(6)?,
    })
}

const APP_COLS: &str = "id, name, description, executable, preprocess, postprocess, envscript";

fn filter_sql(f: &JobFilter) -> Result<(String, Vec<rusqlite::types::Value>)> {
    use rusqlite::types::Value as V;
    let mut clauses = Vec::new();
    let mut args = Vec::new();
    if let Some(s) = f.state {
        clauses.push("state = ?".to_string());
        args.push(V::Integer(s.code()));
    }
    // SQLite's lower() folds ASCII only; names and workflows are mostly ASCII, and a
    // non-ASCII filter still matches its exact case.
    if let Some(w) = &f.workflow {
        clauses.push("instr(lower(workflow), lower(?)) > 0".to_string());
        args.push(V::Text(w.clone()));
    }
    if let Some(n) = &f.name {
        clauses.push("instr(lower(name), lower(?)) > 0".to_string());
        args.push(V::Text(n.clone()));
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
        clauses.push("instr(lower(hex(job_id)), ?) > 0".to_string());
        args.push(V::Text(hex));
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

/// The insert of one job's row: shared by every way of adding jobs.
const INSERT_JOB: &str =
    "INSERT INTO jobs (job_id, workflow, name, description, input_files, stage_in_url, \
     stage_out_files, stage_out_url, wall_time_minutes, num_nodes, coschedule_num_nodes, \
     ranks_per_node, cpu_affinity, threads_per_rank, threads_per_core, node_packing_count, \
     environ_vars, mpi_flags, application, args, user_workdir, wait_for_parents, \
     post_error_handler, post_timeout_handler, auto_timeout_retry, max_restarts, data, state) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
     ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)";

/// Inserts jobs from `lines` inside `tx`, checking each as it comes: fields, application,
/// parents (in the database, or earlier in the same import: both are visible inside the
/// transaction), and that a chosen id is new. The first problem is returned, naming its line.
fn insert_lines(
    tx: &Connection,
    source: &str,
    lines: &mut dyn Iterator<Item = Result<ImportLine>>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<i64>> {
    let now = now_us();
    let mut ins = tx.prepare_cached(INSERT_JOB)?;
    let mut ev = tx.prepare_cached(
        "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?1, ?2, NULL, ?3, '')",
    )?;
    let mut dep =
        tx.prepare_cached("INSERT OR IGNORE INTO deps (parent, child) VALUES (?1, ?2)")?;
    let mut apps_ok: HashSet<String> = HashSet::new();
    let mut pks = Vec::new();
    for item in lines {
        let ImportLine { line, job: j } = item?;
        let at = |e: Error| Error::BadLine {
            file: source.to_string(),
            line,
            source: Box::new(e),
        };
        let s = &j.spec;
        validate_spec(s).map_err(at)?;
        if !apps_ok.contains(&s.application) {
            if !app_exists(tx, &s.application)? {
                return Err(at(Error::UnknownApp(s.application.clone())));
            }
            apps_ok.insert(s.application.clone());
        }
        let id = match j.job_id {
            Some(id) => {
                if pk_of(tx, &id)?.is_some() {
                    return Err(at(Error::Refused(format!(
                        "job_id {id} is already in the database (or earlier in {source})"
                    ))));
                }
                id
            }
            None => crate::model::new_job_id(),
        };
        let mut parent_pks = Vec::with_capacity(j.parents.len());
        for p in &j.parents {
            match pk_of(tx, p)? {
                Some(pk) => parent_pks.push(pk),
                None => {
                    return Err(at(Error::Refused(format!(
                        "parent {p} is neither in the database nor earlier in {source}"
                    ))))
                }
            }
        }
        ins.execute(params![
            id.as_bytes().as_slice(),
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
        let pk = tx.last_insert_rowid();
        ev.execute(params![pk, now, State::Created.code()])?;
        for ppk in parent_pks {
            dep.execute(params![ppk, pk])?;
        }
        pks.push(pk);
        if pks.len() % 10_000 == 0 {
            progress(pks.len());
        }
    }
    progress(pks.len());
    Ok(pks)
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
            tx.execute(
                "INSERT INTO applications (name, description, executable, preprocess, postprocess, envscript) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![app.name, app.description, app.executable, app.preprocess, app.postprocess, app.envscript],
            )?;
            Ok(Application { id: tx.last_insert_rowid(), ..app.clone() })
        })
    }

    /// All applications, by id.
    pub fn apps(&mut self) -> Result<Vec<Application>> {
        self.read(|tx| {
            let mut stmt =
                tx.prepare_cached(&format!("SELECT {APP_COLS} FROM applications ORDER BY id"))?;
            let apps = stmt
                .query_map([], app_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(apps)
        })
    }

    /// The application of this name.
    pub fn app(&mut self, name: &str) -> Result<Application> {
        self.read(|tx| {
            tx.prepare_cached(&format!(
                "SELECT {APP_COLS} FROM applications WHERE name = ?1"
            ))?
            .query_row([name], app_from_row)
            .optional()?
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
            let app = tx
                .prepare_cached(&format!(
                    "SELECT {APP_COLS} FROM applications WHERE name = ?1"
                ))?
                .query_row([name], app_from_row)
                .optional()?
                .ok_or_else(|| Error::UnknownApp(name.to_string()))?;
            if *column == "name" && value != app.name {
                if app_exists(tx, value)? {
                    return Err(Error::DuplicateApp(value.to_string()));
                }
                tx.execute(
                    "UPDATE jobs SET application = ?1 WHERE application = ?2",
                    [value, name],
                )?;
            }
            // `column` comes from the fixed list above, never from the user's text.
            tx.execute(
                &format!("UPDATE applications SET {column} = ?1 WHERE id = ?2"),
                params![value, app.id],
            )?;
            Ok(tx
                .prepare_cached(&format!(
                    "SELECT {APP_COLS} FROM applications WHERE id = ?1"
                ))?
                .query_row([app.id], app_from_row)?)
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
                    .prepare("SELECT name FROM applications ORDER BY id")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?,
            };
            for n in &targets {
                let users: i64 = tx.query_row(
                    "SELECT count(*) FROM jobs WHERE application = ?1",
                    [n],
                    |r| r.get(0),
                )?;
                if users > 0 && !force {
                    return Err(Error::Refused(format!(
                        "{users} jobs use application {n:?}; remove them first or pass --force"
                    )));
                }
                tx.execute("DELETE FROM applications WHERE name = ?1", [n])?;
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
        // The lines can be read only once, so the transaction is never run twice: only taking
        // the write lock is retried.
        self.write_once(|tx| insert_lines(tx, source, lines, progress))
    }

    /// The job with this id or unique id prefix.
    pub fn job(&mut self, id_prefix: &str) -> Result<Job> {
        self.read(|tx| find_by_prefix(tx, id_prefix))
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
        let (where_sql, args) = filter_sql(filter)?;
        self.read(|tx| {
            let total: u64 = tx.query_row(
                &format!("SELECT count(*) FROM jobs {where_sql}"),
                rusqlite::params_from_iter(args.iter()),
                |r| r.get(0),
            )?;
            let mut stmt = tx.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs {where_sql} ORDER BY pk LIMIT {limit}"
            ))?;
            let jobs = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), job_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok((jobs, total))
        })
    }

    /// How many jobs match `filter`, per state (states with none are left out).
    pub fn count_by_state(&mut self, filter: &JobFilter) -> Result<Vec<(State, u64)>> {
        let (where_sql, args) = filter_sql(filter)?;
        self.read(|tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT state, count(*) FROM jobs {where_sql} GROUP BY state ORDER BY state"
            ))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, u64>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(s, n)| Ok((State::from_code(s)?, n)))
                .collect()
        })
    }

    /// Jobs in a workflow (for `balsam job`'s note).
    pub fn count_in_workflow(&mut self, workflow: &str) -> Result<u64> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached("SELECT count(*) FROM jobs WHERE workflow = ?1")?
                .query_row([workflow], |r| r.get(0))?)
        })
    }

    /// Every workflow with its jobs per state.
    pub fn workflows(&mut self) -> Result<Vec<WorkflowSummary>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT workflow, state, count(*) FROM jobs GROUP BY workflow, state ORDER BY workflow, state",
            )?;
            let mut out: Vec<WorkflowSummary> = Vec::new();
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, u64>(2)?))
            })?;
            for row in rows {
                let (wf, s, n) = row?;
                let s = State::from_code(s)?;
                match out.last_mut() {
                    Some(w) if w.workflow == wf => {
                        w.total += n;
                        w.by_state.push((s, n));
                    }
                    _ => out.push(WorkflowSummary { workflow: wf, total: n, by_state: vec![(s, n)] }),
                }
            }
            Ok(out)
        })
    }

    /// The job's state history, oldest first.
    pub fn history(&mut self, pk: i64) -> Result<Vec<Event>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT time_us, from_state, to_state, message FROM events WHERE job = ?1 ORDER BY rowid",
            )?;
            let rows = stmt
                .query_map([pk], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(t, f, to, m)| {
                    Ok(Event {
                        time_us: t,
                        from_state: f.map(State::from_code).transpose()?,
                        to_state: State::from_code(to)?,
                        message: m,
                    })
                })
                .collect()
        })
    }

    /// Ids of the job's parents.
    pub fn parents(&mut self, pk: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE pk IN (SELECT parent FROM deps WHERE child = ?1) ORDER BY pk"
            ))?;
            let jobs = stmt.query_map([pk], job_from_row)?.collect::<rusqlite::Result<_>>()?;
            Ok(jobs)
        })
    }

    /// The job's children.
    pub fn children(&mut self, pk: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE pk IN (SELECT child FROM deps WHERE parent = ?1) ORDER BY pk"
            ))?;
            let jobs = stmt.query_map([pk], job_from_row)?.collect::<rusqlite::Result<_>>()?;
            Ok(jobs)
        })
    }

    /// Adds the edge `parent -> child`; refuses duplicates, cycles, and children already past
    /// the parents check.
    pub fn add_dependency(&mut self, parent: &str, child: &str) -> Result<(Job, Job)> {
        self.write(|tx| {
            let p = find_by_prefix(tx, parent)?;
            let c = find_by_prefix(tx, child)?;
            if p.pk == c.pk {
                return Err(Error::Cycle { parent: p.id8(), child: c.id8() });
            }
            if tx.prepare_cached("SELECT 1 FROM deps WHERE parent = ?1 AND child = ?2")?.exists([p.pk, c.pk])? {
                return Err(Error::Refused(format!(
                    "{} is already a parent of {}", p.cute_id(), c.cute_id()
                )));
            }
            if reaches(tx, c.pk, p.pk)? {
                return Err(Error::Cycle { parent: p.cute_id(), child: c.cute_id() });
            }
            if !matches!(c.state, State::Created | State::AwaitingParents) {
                return Err(Error::Refused(format!(
                    "{} is {}: dependencies can only be added to jobs in CREATED or AWAITING_PARENTS",
                    c.cute_id(), c.state
                )));
            }
            tx.execute("INSERT INTO deps (parent, child) VALUES (?1, ?2)", [p.pk, c.pk])?;
            Ok((p.clone(), c.clone()))
        })
    }

    /// Sets one field of a job, typed; `application` must name a registered application.
    /// A USER_KILLED job is left as it is.
    pub fn modify_field(&mut self, pk: i64, name: &str, value: &Value) -> Result<Job> {
        let field = fields::field(name)?;
        self.write(|tx| {
            let job = get_job(tx, pk)?;
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
            let sql_value: rusqlite::types::Value = match value {
                Value::Text(s) => s.clone().into(),
                Value::Int(n) => (*n as i64).into(),
                Value::Bool(b) => (*b as i64).into(),
                Value::Json(j) => j.to_string().into(),
            };
            // `field.name` comes from the fixed field table, never from the user's text.
            tx.execute(
                &format!("UPDATE jobs SET {} = ?1 WHERE pk = ?2", field.name),
                params![sql_value, pk],
            )?;
            get_job(tx, pk)
        })
    }

    /// Removes jobs with their history and edges. Children waiting on a removed parent are
    /// checked again, so none waits forever.
    pub fn remove_jobs(&mut self, pks: &[i64]) -> Result<usize> {
        self.write(|tx| {
            let mut orphans = Vec::new();
            {
                let mut kids = tx.prepare_cached("SELECT child FROM deps WHERE parent = ?1")?;
                for pk in pks {
                    let k: Vec<i64> = kids
                        .query_map([pk], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()?;
                    orphans.extend(k);
                }
            }
            let mut n = 0;
            for pk in pks {
                tx.execute("DELETE FROM events WHERE job = ?1", [pk])?;
                tx.execute("DELETE FROM deps WHERE parent = ?1 OR child = ?1", [pk])?;
                n += tx.execute("DELETE FROM jobs WHERE pk = ?1", [pk])?;
            }
            let gone: HashSet<i64> = pks.iter().copied().collect();
            orphans.retain(|o| !gone.contains(o));
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
        let (where_sql, args) = filter_sql(filter)?;
        self.read(|tx| {
            let mut stmt = tx.prepare(&format!("SELECT pk FROM jobs {where_sql} ORDER BY pk"))?;
            let v = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(v)
        })
    }

    /// Total jobs.
    pub fn count_jobs(&mut self) -> Result<u64> {
        self.read(|tx| Ok(tx.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))?))
    }

    /// Job ids of the parents of `pk`, for BALSAM_PARENT_IDS.
    pub fn parent_ids(&mut self, pk: i64) -> Result<Vec<Uuid>> {
        Ok(self.parents(pk)?.into_iter().map(|j| j.job_id).collect())
    }

    /// Resolves several children edges at once: used by callers that just changed states.
    pub fn recheck_children(&mut self, pk: i64) -> Result<()> {
        self.write(|tx| resolve_children(tx, pk))
    }
}
