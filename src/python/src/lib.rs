//! `balsam._native`: the Rust store, called from the `balsam` Python package.
//!
//! Thin on purpose: every query, check and write is the store's ([`balsam_store::query`] and
//! the [`Store`] methods); this module converts Python values to the store's types and back,
//! turns the store's errors into the package's exceptions (`balsam.exceptions`), and lets other
//! Python threads run while the database works.
//!
//! Each call uses an open store of the database `BALSAM_DB_PATH` names at the time of the call,
//! from a small pool (a store is used by one thread at a time, as everywhere in balsam). A
//! process forked with open stores opens its own: a connection must never cross a fork.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use balsam_store::query::{self as q, QueryError};
use balsam_store::{
    Application, Cell, Column, DbDir, Error, Job, JobChanges, JobField, JobSpec, RestartCount,
    ServerInfo, State, Store,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};
use serde_json::Value as Json;

/// An open store: its database directory, the process that opened it, and the store.
struct Open {
    root: PathBuf,
    pid: u32,
    store: Store,
}

/// Open stores not in use. A call takes one for the active database (or opens one) and puts
/// it back, so each thread that calls at the same moment has its own (a store is not shared
/// between threads, as everywhere in balsam), and connections are reused across calls and
/// threads. The pool is a static, never dropped: a store dropped while a thread exits would
/// close its PostgreSQL connection after the runtime it needs is gone.
static POOL: Mutex<Vec<Open>> = Mutex::new(Vec::new());

/// Stores kept for reuse; more are closed when put back.
const POOL_SIZE: usize = 8;

/// Either of the store's error types, on the way to a Python exception.
enum Fail {
    Store(Error),
    Query(QueryError),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Store(e)
    }
}

impl From<QueryError> for Fail {
    fn from(e: QueryError) -> Fail {
        match e {
            QueryError::Store(e) => Fail::Store(e),
            e => Fail::Query(e),
        }
    }
}

/// The exception class of `balsam.exceptions` for a store error.
fn store_class(e: &Error) -> &'static str {
    match e {
        Error::BadLine { source, .. } => store_class(source),
        Error::UnknownField(_) | Error::BadValue { .. } => "FieldError",
        Error::InvalidState(_) => "InvalidStateError",
        Error::Cycle { .. } => "CycleError",
        Error::UnknownJob(_) | Error::UnknownApp(_) => "DoesNotExist",
        Error::Refused(_)
        | Error::DuplicateApp(_)
        | Error::AmbiguousJob { .. }
        | Error::IllegalTransition { .. }
        | Error::StateChanged { .. } => "RefusedError",
        e if e.is_unavailable() => "DatabaseUnavailable",
        _ => "DatabaseError",
    }
}

fn raise(py: Python<'_>, class: &str, message: String) -> PyErr {
    let found = py
        .import("balsam.exceptions")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match found {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(e) => e,
    }
}

fn to_py_err(py: Python<'_>, f: Fail) -> PyErr {
    match f {
        Fail::Store(e) => raise(py, store_class(&e), e.to_string()),
        Fail::Query(e) => {
            let class = match e {
                QueryError::Unsupported(_) => "RefusedError",
                _ => "FieldError",
            };
            raise(py, class, e.to_string())
        }
    }
}

/// Runs `f` on a store for the active database, taken from the pool or opened.
fn on_store<T>(f: impl FnOnce(&mut Store) -> Result<T, Fail>) -> Result<T, Fail> {
    let dir = DbDir::locate(None)?;
    let pid = std::process::id();
    let found = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Stores opened by the parent of a fork are never used, nor closed: closing them here
        // would release the parent's locks.
        let (mine, theirs): (Vec<Open>, Vec<Open>) = pool.drain(..).partition(|o| o.pid == pid);
        std::mem::forget(theirs);
        *pool = mine;
        pool.iter()
            .position(|o| o.root == dir.root)
            .map(|i| pool.swap_remove(i))
    };
    let mut open = match found {
        Some(o) => o,
        None => Open {
            root: dir.root.clone(),
            pid,
            store: Store::open(dir)?,
        },
    };
    let out = f(&mut open.store);
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_SIZE {
        pool.push(open);
    }
    out
}

/// Runs `f` on a store without holding the GIL, so other Python threads run.
fn with_store<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&mut Store) -> Result<T, Fail> + Send,
) -> PyResult<T> {
    py.detach(|| on_store(f)).map_err(|e| to_py_err(py, e))
}

// ---- Python values <-> the store's values ----

/// A Python value as JSON, the loose form the store checks against each field.
fn to_json(v: &Bound<'_, PyAny>) -> PyResult<Json> {
    if v.is_none() {
        return Ok(Json::Null);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Json::Bool(b.is_true()));
    }
    if v.is_instance_of::<PyInt>() {
        if let Ok(i) = v.extract::<i64>() {
            return Ok(i.into());
        }
        if let Ok(u) = v.extract::<u64>() {
            return Ok(u.into());
        }
        return Err(PyTypeError::new_err(format!(
            "{v} does not fit a 64-bit integer"
        )));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Json::String(s.extract::<String>()?));
    }
    if v.is_instance_of::<PyFloat>() {
        let x: f64 = v.extract()?;
        return serde_json::Number::from_f64(x)
            .map(Json::Number)
            .ok_or_else(|| PyTypeError::new_err(format!("{x} is not a number a job can hold")));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut map = serde_json::Map::new();
        for (k, val) in d.iter() {
            let key = k.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!("dictionary keys must be text, not {k}"))
            })?;
            map.insert(key.extract::<String>()?, to_json(&val)?);
        }
        return Ok(Json::Object(map));
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() || v.hasattr("__iter__")? {
        if !v.hasattr("__len__")? {
            return Err(PyTypeError::new_err(format!(
                "cannot use {} as a value; give a list",
                v.get_type().name()?
            )));
        }
        return v
            .try_iter()?
            .map(|item| to_json(&item?))
            .collect::<PyResult<Vec<_>>>()
            .map(Json::Array);
    }
    if v.hasattr("__index__")? {
        return to_json(&v.call_method0("__index__")?);
    }
    if v.hasattr("hex")? && v.get_type().name()?.extract::<String>()? == "UUID" {
        return Ok(Json::String(v.str()?.extract::<String>()?));
    }
    Err(PyTypeError::new_err(format!(
        "cannot use a value of type {} in a query or a job field",
        v.get_type().name()?
    )))
}

/// Keyword arguments as (name, value) pairs.
fn pairs(d: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, Json)>> {
    let Some(d) = d else {
        return Ok(Vec::new());
    };
    d.iter()
        .map(|(k, v)| Ok((k.extract::<String>()?, to_json(&v)?)))
        .collect()
}

fn json_to_py<'py>(py: Python<'py>, v: &Json) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Json::Null => py.None().into_bound(py),
        Json::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Json::Number(n) => match n.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any(),
            None => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Json::String(s) => PyString::new(py, s).into_any(),
        Json::Array(items) => {
            let list = PyList::empty(py);
            for i in items {
                list.append(json_to_py(py, i)?)?;
            }
            list.into_any()
        }
        Json::Object(map) => {
            let d = PyDict::new(py);
            for (k, val) in map {
                d.set_item(k, json_to_py(py, val)?)?;
            }
            d.into_any()
        }
    })
}

/// A job as the dict `BalsamJob` keeps: every field by name, and `pk`.
fn job_dict<'py>(py: Python<'py>, j: &Job) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let s = &j.spec;
    d.set_item("pk", j.pk)?;
    d.set_item("job_id", j.job_id.to_string())?;
    d.set_item("workflow", &s.workflow)?;
    d.set_item("name", &s.name)?;
    d.set_item("description", &s.description)?;
    d.set_item("input_files", &s.input_files)?;
    d.set_item("stage_in_url", &s.stage_in_url)?;
    d.set_item("stage_out_files", &s.stage_out_files)?;
    d.set_item("stage_out_url", &s.stage_out_url)?;
    d.set_item("wall_time_minutes", s.wall_time_minutes)?;
    d.set_item("num_nodes", s.num_nodes)?;
    d.set_item("coschedule_num_nodes", s.coschedule_num_nodes)?;
    d.set_item("ranks_per_node", s.ranks_per_node)?;
    d.set_item("cpu_affinity", &s.cpu_affinity)?;
    d.set_item("threads_per_rank", s.threads_per_rank)?;
    d.set_item("threads_per_core", s.threads_per_core)?;
    d.set_item("node_packing_count", s.node_packing_count)?;
    d.set_item("environ_vars", &s.environ_vars)?;
    d.set_item("mpi_flags", &s.mpi_flags)?;
    d.set_item("application", &s.application)?;
    d.set_item("args", &s.args)?;
    d.set_item("user_workdir", &s.user_workdir)?;
    d.set_item("wait_for_parents", s.wait_for_parents)?;
    d.set_item("post_error_handler", s.post_error_handler)?;
    d.set_item("post_timeout_handler", s.post_timeout_handler)?;
    d.set_item("auto_timeout_retry", s.auto_timeout_retry)?;
    d.set_item("max_restarts", s.max_restarts)?;
    d.set_item("data", json_to_py(py, &s.data)?)?;
    d.set_item("state", j.state.as_str())?;
    d.set_item("return_code", j.return_code)?;
    d.set_item("num_restarts", j.num_restarts)?;
    d.set_item("queued_launch_id", j.queued_launch_id)?;
    d.set_item("lease_session", j.lease_session)?;
    Ok(d)
}

fn app_dict<'py>(py: Python<'py>, a: &Application) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", a.id)?;
    d.set_item("name", &a.name)?;
    d.set_item("description", &a.description)?;
    d.set_item("executable", &a.executable)?;
    d.set_item("preprocess", &a.preprocess)?;
    d.set_item("postprocess", &a.postprocess)?;
    d.set_item("envscript", &a.envscript)?;
    Ok(d)
}

fn jobs_list<'py>(py: Python<'py>, jobs: &[Job]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for j in jobs {
        list.append(job_dict(py, j)?)?;
    }
    Ok(list)
}

fn cell_to_py<'py>(py: Python<'py>, c: &Cell) -> PyResult<Bound<'py, PyAny>> {
    Ok(match c {
        Cell::Null => py.None().into_bound(py),
        Cell::Int(i) => i.into_pyobject(py)?.into_any(),
        Cell::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Cell::Text(s) => PyString::new(py, s).into_any(),
        Cell::State(s) => PyString::new(py, s.as_str()).into_any(),
        Cell::Id(u) => PyString::new(py, &u.to_string()).into_any(),
        Cell::Json(j) => json_to_py(py, j)?,
    })
}

fn restart_count(reset: bool) -> RestartCount {
    if reset {
        RestartCount::Reset
    } else {
        RestartCount::Count
    }
}

// ---- queries ----

/// A query over jobs (what `BalsamJob.objects.filter(...)` holds). Immutable: each method
/// returns a new query.
#[pyclass(frozen, skip_from_py_object, module = "balsam._native")]
#[derive(Clone)]
struct JobQuery(q::JobQuery);

#[pymethods]
impl JobQuery {
    /// Every job.
    #[new]
    fn new() -> Self {
        JobQuery(q::JobQuery::all())
    }

    /// Jobs for which every lookup holds.
    #[pyo3(signature = (**lookups))]
    fn filter(&self, py: Python<'_>, lookups: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let p = pairs(lookups)?;
        self.0
            .filter(&p)
            .map(JobQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Jobs for which not every lookup holds.
    #[pyo3(signature = (**lookups))]
    fn exclude(&self, py: Python<'_>, lookups: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let p = pairs(lookups)?;
        self.0
            .exclude(&p)
            .map(JobQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Ordered by fields (`-name` for descending).
    fn order_by(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<Self> {
        self.0
            .order_by(&keys)
            .map(JobQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Rows `start` to `stop` (exclusive) of the query.
    #[pyo3(signature = (start, stop=None))]
    fn slice(&self, start: u64, stop: Option<u64>) -> Self {
        JobQuery(self.0.slice(start, stop))
    }

    /// Whether a slice was taken.
    #[getter]
    fn is_sliced(&self) -> bool {
        self.0.is_sliced()
    }

    /// The children of the job with row number `pk`.
    #[staticmethod]
    fn children_of(pk: i64) -> Self {
        JobQuery(q::JobQuery::children_of(pk))
    }

    /// The parents of the job with row number `pk`.
    #[staticmethod]
    fn parents_of(pk: i64) -> Self {
        JobQuery(q::JobQuery::parents_of(pk))
    }

    /// How many jobs match.
    fn count(&self, py: Python<'_>) -> PyResult<u64> {
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.count_jobs_where(&q)?))
    }

    /// The jobs that match, as dicts.
    fn fetch<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let q = self.0.clone();
        let jobs = with_store(py, move |s| Ok(s.find_jobs(&q)?))?;
        jobs_list(py, &jobs)
    }

    /// Row numbers of the jobs that match, in order.
    fn pks(&self, py: Python<'_>) -> PyResult<Vec<i64>> {
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.find_job_pks(&q)?))
    }

    /// Tuples of the given fields of each job that matches.
    fn values<'py>(&self, py: Python<'py>, fields: Vec<String>) -> PyResult<Bound<'py, PyList>> {
        let fs = fields
            .iter()
            .map(|f| JobField::parse(f, f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_py_err(py, e.into()))?;
        let q = self.0.clone();
        let rows = with_store(py, move |s| Ok(s.job_values(&q, &fs)?))?;
        let out = PyList::empty(py);
        for r in &rows {
            let cells = r
                .iter()
                .map(|c| cell_to_py(py, c))
                .collect::<PyResult<Vec<_>>>()?;
            out.append(PyTuple::new(py, cells)?)?;
        }
        Ok(out)
    }

    /// Changes every job that matches, in one transaction; returns how many. `source` names
    /// the program in the history; `reset_restarts`: a RESTART_READY starts the restart count
    /// again instead of counting toward max_restarts.
    #[pyo3(signature = (changes, reset_restarts=false, source="Python".to_string()))]
    fn update(
        &self,
        py: Python<'_>,
        changes: &Bound<'_, PyDict>,
        reset_restarts: bool,
        source: String,
    ) -> PyResult<u64> {
        let p = pairs(Some(changes))?;
        let c = JobChanges::parse(&p).map_err(|e| to_py_err(py, e.into()))?;
        let q = self.0.clone();
        with_store(py, move |s| {
            Ok(s.update_jobs_where(&q, &c, restart_count(reset_restarts), &source)?)
        })
    }

    /// Removes every job that matches, by `balsam rm`'s rules; returns how many.
    fn delete(&self, py: Python<'_>) -> PyResult<usize> {
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.remove_jobs_where(&q)?))
    }

    /// A report over the state history of the jobs that match: `throughput`, `utilization`
    /// or `errors`. Returns (times in µs since the epoch, values).
    fn report(&self, py: Python<'_>, which: &str) -> PyResult<(Vec<i64>, Vec<u64>)> {
        let f = match which {
            "throughput" => q::throughput,
            "utilization" => q::utilization,
            "errors" => q::errors_per_minute,
            other => {
                return Err(PyTypeError::new_err(format!(
                    "unknown report {other:?}: throughput, utilization or errors"
                )))
            }
        };
        let qq = self.0.clone();
        let changes = with_store(py, move |s| Ok(s.run_history(&qq)?))?;
        Ok(f(&changes).into_iter().unzip())
    }
}

/// A query over applications.
#[pyclass(frozen, skip_from_py_object, module = "balsam._native")]
#[derive(Clone)]
struct AppQuery(q::AppQuery);

#[pymethods]
impl AppQuery {
    /// Every application.
    #[new]
    fn new() -> Self {
        AppQuery(q::AppQuery::all())
    }

    /// Applications for which every lookup holds.
    #[pyo3(signature = (**lookups))]
    fn filter(&self, py: Python<'_>, lookups: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let p = pairs(lookups)?;
        self.0
            .filter(&p)
            .map(AppQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Applications for which not every lookup holds.
    #[pyo3(signature = (**lookups))]
    fn exclude(&self, py: Python<'_>, lookups: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let p = pairs(lookups)?;
        self.0
            .exclude(&p)
            .map(AppQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Ordered by fields (`-name` for descending).
    fn order_by(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<Self> {
        self.0
            .order_by(&keys)
            .map(AppQuery)
            .map_err(|e| to_py_err(py, e.into()))
    }

    /// Rows `start` to `stop` (exclusive) of the query.
    #[pyo3(signature = (start, stop=None))]
    fn slice(&self, start: u64, stop: Option<u64>) -> Self {
        AppQuery(self.0.slice(start, stop))
    }

    /// Whether a slice was taken.
    #[getter]
    fn is_sliced(&self) -> bool {
        self.0.is_sliced()
    }

    /// How many applications match.
    fn count(&self, py: Python<'_>) -> PyResult<u64> {
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.count_apps_where(&q)?))
    }

    /// The applications that match, as dicts.
    fn fetch<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let q = self.0.clone();
        let apps = with_store(py, move |s| Ok(s.find_apps(&q)?))?;
        let out = PyList::empty(py);
        for a in &apps {
            out.append(app_dict(py, a)?)?;
        }
        Ok(out)
    }

    /// Changes fields of every application that matches; returns how many.
    fn update(&self, py: Python<'_>, changes: &Bound<'_, PyDict>) -> PyResult<u64> {
        let c: Vec<(String, String)> = changes
            .iter()
            .map(|(k, v)| {
                let key: String = k.extract()?;
                let val: String = v.extract().map_err(|_| {
                    raise(
                        py,
                        "FieldError",
                        format!("bad value {v} for the application's {key}: expected text"),
                    )
                })?;
                Ok((key, val))
            })
            .collect::<PyResult<_>>()?;
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.update_apps_where(&q, &c)?))
    }

    /// Removes the applications that match (refused while jobs use one, unless `force`);
    /// returns their names.
    #[pyo3(signature = (force=false))]
    fn delete(&self, py: Python<'_>, force: bool) -> PyResult<Vec<String>> {
        let q = self.0.clone();
        with_store(py, move |s| Ok(s.remove_apps_where(&q, force)?))
    }
}

// ---- jobs ----

/// The new job of a dict of fields (with optional `job_id` and `parents`).
fn new_job(d: &Bound<'_, PyDict>) -> PyResult<Result<balsam_store::NewJob, QueryError>> {
    let p = pairs(Some(d))?;
    let refs: Vec<(&str, &Json)> = p.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Ok(q::new_job(&refs))
}

/// Adds many jobs in one transaction (`bulk_create`): each a dict of fields. A bad job adds
/// nothing, and the error names its position in the list. Returns the new jobs' row numbers.
#[pyfunction]
fn add_jobs(py: Python<'_>, jobs: &Bound<'_, PyList>) -> PyResult<Vec<i64>> {
    // The jobs are converted as the store reads them, so that a million jobs never sit in
    // memory twice; the GIL is held throughout (the objects are Python's). A Python error
    // (a value of a type no field takes) ends the import like a bad job: nothing is added,
    // and it is raised as it was.
    let mut failure: Option<PyErr> = None;
    let mut refused: Option<(usize, QueryError)> = None;
    let mut lines = jobs.iter().enumerate().map(|(i, item)| {
        let line = i + 1;
        let bad = |source: Error| Error::BadLine {
            file: "bulk_create".into(),
            line,
            source: Box::new(source),
        };
        let converted = item
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err(format!("item {line} of bulk_create: not a job")))
            .and_then(|d| new_job(d));
        match converted {
            Ok(Ok(job)) => Ok(balsam_store::ImportLine { line, job }),
            Ok(Err(QueryError::Store(e))) => Err(bad(e)),
            Ok(Err(e)) => {
                let message = e.to_string();
                refused = Some((line, e));
                Err(bad(Error::Refused(message)))
            }
            Err(e) => {
                let message = e.to_string();
                failure = Some(e);
                Err(bad(Error::Refused(message)))
            }
        }
    });
    let out = on_store(|store| Ok(store.import_jobs("bulk_create", &mut lines, &mut |_| {})?));
    drop(lines);
    match (out, failure, refused) {
        (Err(_), Some(e), _) => Err(e),
        (Err(_), None, Some((line, e))) => {
            let class = match e {
                QueryError::Unsupported(_) => "RefusedError",
                _ => "FieldError",
            };
            Err(raise(py, class, format!("bulk_create:{line}: {e}")))
        }
        (out, _, _) => out.map_err(|e| to_py_err(py, e)),
    }
}

/// Adds one job; returns it.
#[pyfunction]
fn add_job<'py>(py: Python<'py>, fields: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let job = new_job(fields)?.map_err(|e| to_py_err(py, e.into()))?;
    let added = with_store(py, move |s| Ok(s.add_job(&job)?))?;
    job_dict(py, &added)
}

/// The job with this id, or unique prefix of one.
#[pyfunction]
fn job<'py>(py: Python<'py>, id: String) -> PyResult<Bound<'py, PyDict>> {
    let j = with_store(py, move |s| Ok(s.job(&id)?))?;
    job_dict(py, &j)
}

/// The jobs with these row numbers, in this order (jobs removed meanwhile are left out).
#[pyfunction]
fn jobs_by_pks<'py>(py: Python<'py>, pks: Vec<i64>) -> PyResult<Bound<'py, PyList>> {
    let jobs = with_store(py, move |s| Ok(s.jobs_by_pks(&pks)?))?;
    jobs_list(py, &jobs)
}

/// The state of each job by row number (None for a job that was removed).
#[pyfunction]
fn job_states(py: Python<'_>, pks: Vec<i64>) -> PyResult<Vec<Option<&'static str>>> {
    let states = with_store(py, move |s| Ok(s.job_states(&pks)?))?;
    Ok(states.into_iter().map(|s| s.map(State::as_str)).collect())
}

/// The job's state history, as `balsam ls --history` prints it.
#[pyfunction]
fn history(py: Python<'_>, pk: i64) -> PyResult<Vec<String>> {
    let events = with_store(py, move |s| Ok(s.history(pk)?))?;
    Ok(events.iter().map(|e| e.history_line()).collect())
}

/// Adds `parent -> child` (ids or unique prefixes); refuses cycles and duplicates.
#[pyfunction]
fn add_dependency(py: Python<'_>, parent: String, child: String) -> PyResult<()> {
    with_store(py, move |s| {
        Ok(s.add_dependency(&parent, &child).map(|_| ())?)
    })
}

/// `balsam killjob`: USER_KILLED for the job (and its descendants); returns the killed jobs'
/// ids.
#[pyfunction]
#[pyo3(signature = (pk, recursive=false))]
fn kill(py: Python<'_>, pk: i64, recursive: bool) -> PyResult<Vec<String>> {
    let killed = with_store(py, move |s| Ok(s.kill(pk, recursive)?))?;
    Ok(killed.iter().map(|j| j.job_id.to_string()).collect())
}

/// The working directory of a job with these fields, in the active database.
#[pyfunction]
fn workdir(
    py: Python<'_>,
    user_workdir: String,
    workflow: String,
    name: String,
    job_id: String,
) -> PyResult<String> {
    let id = balsam_store::Uuid::parse_str(&job_id)
        .map_err(|_| raise(py, "FieldError", format!("{job_id:?} is not a job id")))?;
    let job = Job {
        pk: 0,
        job_id: id,
        spec: JobSpec {
            user_workdir,
            workflow,
            name,
            ..JobSpec::default()
        },
        state: State::Created,
        return_code: None,
        num_restarts: 0,
        queued_launch_id: None,
        lease_session: None,
    };
    let root = db_path(py)?;
    Ok(job.workdir(Path::new(&root)).display().to_string())
}

/// A new job id (time-ordered, as the store makes them).
#[pyfunction]
fn new_job_id() -> String {
    balsam_store::new_job_id().to_string()
}

/// Each job field: (name, kind, settable by programs).
#[pyfunction]
fn job_fields() -> Vec<(&'static str, &'static str, bool)> {
    JobField::ALL
        .iter()
        .map(|f| {
            let kind = match f.kind() {
                balsam_store::query::ColumnKind::Text => "text",
                balsam_store::query::ColumnKind::Int => "int",
                balsam_store::query::ColumnKind::OptInt => "optional int",
                balsam_store::query::ColumnKind::Bool => "bool",
                balsam_store::query::ColumnKind::State => "state",
                balsam_store::query::ColumnKind::JobId => "job id",
                balsam_store::query::ColumnKind::Json => "json",
            };
            (f.name(), kind, f.settable().is_some())
        })
        .collect()
}

/// A new job's fields as the store fills them in (legacy's defaults).
#[pyfunction]
fn job_defaults<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let job = Job {
        pk: 0,
        job_id: balsam_store::Uuid::nil(),
        spec: JobSpec::default(),
        state: State::Created,
        return_code: None,
        num_restarts: 0,
        queued_launch_id: None,
        lease_session: None,
    };
    let d = job_dict(py, &job)?;
    d.del_item("pk")?;
    d.del_item("job_id")?;
    Ok(d)
}

// ---- applications and databases ----

/// Registers an application; returns it.
#[pyfunction]
fn add_app<'py>(py: Python<'py>, fields: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let get = |k: &str| -> PyResult<String> {
        Ok(match fields.get_item(k)? {
            Some(v) if !v.is_none() => v.extract().map_err(|_| {
                raise(
                    py,
                    "FieldError",
                    format!("bad value {v} for the application's {k}: expected text"),
                )
            })?,
            _ => String::new(),
        })
    };
    let app = Application {
        id: 0,
        name: get("name")?,
        description: get("description")?,
        executable: get("executable")?,
        preprocess: get("preprocess")?,
        postprocess: get("postprocess")?,
        envscript: get("envscript")?,
    };
    let added = with_store(py, move |s| Ok(s.add_app(&app)?))?;
    app_dict(py, &added)
}

/// The active database directory (`BALSAM_DB_PATH`).
#[pyfunction]
fn db_path(py: Python<'_>) -> PyResult<String> {
    DbDir::locate(None)
        .map(|d| d.root.display().to_string())
        .map_err(|e| to_py_err(py, e.into()))
}

/// Creates a database directory: SQLite, or on the PostgreSQL server of `db_url`
/// (`postgresql://USER[:PASSWORD]@HOST:PORT/NAME`, created on the server when missing).
/// Returns the directory.
#[pyfunction]
#[pyo3(signature = (path, db_url=None))]
fn create_database(py: Python<'_>, path: PathBuf, db_url: Option<String>) -> PyResult<String> {
    py.detach(move || -> Result<String, Fail> {
        let store = match db_url {
            None => Store::create(&path)?,
            Some(url) => {
                let (info, password): (ServerInfo, Option<String>) = ServerInfo::from_url(&url)?;
                Store::create_on_server(&path, &info, password.as_deref())?
            }
        };
        Ok(store.dir.root.display().to_string())
    })
    .map_err(|e| to_py_err(py, e))
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<JobQuery>()?;
    m.add_class::<AppQuery>()?;
    m.add_function(wrap_pyfunction!(add_jobs, m)?)?;
    m.add_function(wrap_pyfunction!(add_job, m)?)?;
    m.add_function(wrap_pyfunction!(job, m)?)?;
    m.add_function(wrap_pyfunction!(jobs_by_pks, m)?)?;
    m.add_function(wrap_pyfunction!(job_states, m)?)?;
    m.add_function(wrap_pyfunction!(history, m)?)?;
    m.add_function(wrap_pyfunction!(add_dependency, m)?)?;
    m.add_function(wrap_pyfunction!(kill, m)?)?;
    m.add_function(wrap_pyfunction!(workdir, m)?)?;
    m.add_function(wrap_pyfunction!(new_job_id, m)?)?;
    m.add_function(wrap_pyfunction!(job_fields, m)?)?;
    m.add_function(wrap_pyfunction!(job_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(add_app, m)?)?;
    m.add_function(wrap_pyfunction!(db_path, m)?)?;
    m.add_function(wrap_pyfunction!(create_database, m)?)?;
    Ok(())
}
