//! The SQLite connection: schema and migrations, pragmas, and the write-transaction helper that
//! retries when another process holds the write lock, so "database is locked" never reaches a user.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use crate::dir::DbDir;
use crate::error::{Error, Result};

/// Forward migrations; entry `i` takes the schema from version `i` to `i + 1`.
/// Never edit a released entry: add a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE applications (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    executable  TEXT NOT NULL,
    preprocess  TEXT NOT NULL DEFAULT '',
    postprocess TEXT NOT NULL DEFAULT '',
    envscript   TEXT NOT NULL DEFAULT ''
);

-- One row per planned application run. job_id is the UUID's 16 bytes; pk is the row number
-- that edges, events and leases refer to (8 bytes instead of 16, and insertion-ordered).
CREATE TABLE jobs (
    pk                   INTEGER PRIMARY KEY,
    job_id               BLOB NOT NULL,
    workflow             TEXT NOT NULL,
    name                 TEXT NOT NULL,
    description          TEXT NOT NULL,
    input_files          TEXT NOT NULL,
    stage_in_url         TEXT NOT NULL,
    stage_out_files      TEXT NOT NULL,
    stage_out_url        TEXT NOT NULL,
    wall_time_minutes    INTEGER NOT NULL,
    num_nodes            INTEGER NOT NULL,
    coschedule_num_nodes INTEGER NOT NULL,
    ranks_per_node       INTEGER NOT NULL,
    cpu_affinity         TEXT NOT NULL,
    threads_per_rank     INTEGER NOT NULL,
    threads_per_core     INTEGER NOT NULL,
    node_packing_count   INTEGER NOT NULL,
    environ_vars         TEXT NOT NULL,
    mpi_flags            TEXT NOT NULL,
    application          TEXT NOT NULL,
    args                 TEXT NOT NULL,
    user_workdir         TEXT NOT NULL,
    wait_for_parents     INTEGER NOT NULL,
    post_error_handler   INTEGER NOT NULL,
    post_timeout_handler INTEGER NOT NULL,
    auto_timeout_retry   INTEGER NOT NULL,
    max_restarts         INTEGER NOT NULL,
    data                 TEXT NOT NULL,
    state                INTEGER NOT NULL,
    return_code          INTEGER,
    num_restarts         INTEGER NOT NULL DEFAULT 0,
    queued_launch_id     INTEGER,
    lease_session        INTEGER
);
CREATE UNIQUE INDEX jobs_job_id ON jobs(job_id);
-- Serves leasing (state IN runnable, workflow filter), ls --state and ls --by-states.
CREATE INDEX jobs_state_workflow ON jobs(state, workflow);
-- Only leased jobs are in it: small, and finds a session's jobs without a scan.
CREATE INDEX jobs_lease ON jobs(lease_session) WHERE lease_session IS NOT NULL;

-- Dependencies, indexed both ways: children of a parent and parents of a child by index.
CREATE TABLE deps (
    parent INTEGER NOT NULL,
    child  INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE INDEX deps_child ON deps(child, parent);

-- The provenance log: every state change, with UTC microseconds.
CREATE TABLE events (
    job        INTEGER NOT NULL,
    time_us    INTEGER NOT NULL,
    from_state INTEGER,
    to_state   INTEGER NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX events_job ON events(job);

-- Launcher and service processes that hold leases.
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    batch_job_id TEXT NOT NULL,
    job_mode     TEXT NOT NULL,
    wf_filter    TEXT NOT NULL,
    started_us   INTEGER NOT NULL,
    heartbeat_us INTEGER NOT NULL,
    ended_us     INTEGER
);
CREATE INDEX sessions_live ON sessions(heartbeat_us) WHERE ended_us IS NULL;

-- Batch jobs that run launchers.
CREATE TABLE launches (
    id                INTEGER PRIMARY KEY,
    scheduler_id      TEXT NOT NULL,
    scheduler         TEXT NOT NULL,
    project           TEXT NOT NULL,
    queue             TEXT NOT NULL,
    nodes             INTEGER NOT NULL,
    wall_minutes      INTEGER NOT NULL,
    job_mode          TEXT NOT NULL,
    wf_filter         TEXT NOT NULL,
    command           TEXT NOT NULL,
    state             TEXT NOT NULL,
    sched_flags       TEXT NOT NULL,
    from_balsam       INTEGER NOT NULL,
    prescheduled_only INTEGER NOT NULL,
    reason            TEXT NOT NULL,
    created_us        INTEGER NOT NULL,
    updated_us        INTEGER NOT NULL
);
CREATE INDEX launches_scheduler_id ON launches(scheduler_id);
"#,
    // Version 2: a session's process identity (boot id and start time), so a launcher on the same
    // host can tell that another launcher's process is gone and take its jobs back at once.
    r#"
ALTER TABLE sessions ADD COLUMN proc_id TEXT NOT NULL DEFAULT '';
"#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long one attempt waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write keeps retrying before it gives up with a clear message.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// An open Balsam database. Not shared between threads: each thread opens its own.
pub struct Store {
    pub(crate) conn: Connection,
    /// The database directory.
    pub dir: DbDir,
    /// Opened for reading only: writes are refused without touching the file.
    read_only: bool,
    /// The database file's (device, inode) when opened, to notice it being removed or replaced.
    file_id: Option<(u64, u64)>,
}

impl Store {
    /// Creates a database directory and its schema.
    pub fn create(path: &Path) -> Result<Store> {
        let dir = DbDir::create_layout(path)?;
        let mut store = Store::connect(dir, true, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database directory, migrating an older schema forward.
    pub fn open(dir: DbDir) -> Result<Store> {
        let mut store = Store::connect(dir, false, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database for commands that only read (`ls`, `which`, ...). It never
    /// writes and never waits for a writer, and works for users who may only read the
    /// directory. An older schema is migrated first when this user can write the database.
    pub fn open_read_only(dir: DbDir) -> Result<Store> {
        let mut store = Store::connect(dir.clone(), false, true)?;
        let found = store.read(|tx| Ok(tx.query_row("PRAGMA user_version", [], |r| r.get(0))?))?;
        if found == SCHEMA_VERSION {
            return Ok(store);
        }
        if found > SCHEMA_VERSION {
            return Err(Error::NewerSchema {
                path: dir.db_file(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        drop(store);
        Store::open(dir.clone()).map_err(|e| {
            Error::Refused(format!(
                "the database at {} has schema version {found} and must be upgraded to {SCHEMA_VERSION} by a user who may write it ({e})",
                dir.root.display()
            ))
        })?;
        Store::connect(dir, false, true)
    }

    /// Opens the active database (`--db`, then `BALSAM_DB_PATH`).
    pub fn locate(explicit: Option<&Path>) -> Result<Store> {
        Store::open(DbDir::locate(explicit)?)
    }

    /// Opens the active database for reading only (see [`Store::open_read_only`]).
    pub fn locate_read_only(explicit: Option<&Path>) -> Result<Store> {
        Store::open_read_only(DbDir::locate(explicit)?)
    }

    fn connect(dir: DbDir, create: bool, read_only: bool) -> Result<Store> {
        let mut flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(dir.db_file(), flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        if !read_only {
            // WAL lets launchers read while another process writes; NORMAL sync is durable
            // across process crashes (the case that matters: kill -9 of a launcher) at a
            // fraction of FULL's cost. Changing the mode takes a lock, so it is done only when
            // needed (once, on a new database) and retried.
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                retry_busy(|| {
                    conn.pragma_update(None, "journal_mode", "WAL")?;
                    Ok(())
                })?;
            }
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.set_prepared_statement_cache_capacity(64);
        let file_id = file_id(&dir.db_file());
        Ok(Store {
            conn,
            dir,
            read_only,
            file_id,
        })
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.dir.db_file();
        // Read first: a current schema needs no write lock, so opening never waits behind a
        // writer.
        let found: i64 =
            self.read(|tx| Ok(tx.query_row("PRAGMA user_version", [], |r| r.get(0))?))?;
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        self.write(|tx| {
            let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if found > SCHEMA_VERSION {
                return Err(Error::NewerSchema {
                    path: path.clone(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            for (v, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", v as i64 + 1)?;
            }
            Ok(())
        })
    }

    /// Fails when the database file this store opened was removed or replaced since (a deleted
    /// database directory): writes would go to a file nobody will ever read again.
    pub fn check_file(&self) -> Result<()> {
        let path = self.dir.db_file();
        match (self.file_id, file_id(&path)) {
            (Some(was), Some(now)) if was == now => Ok(()),
            (None, _) => Ok(()),
            (Some(_), None) => Err(Error::DatabaseGone {
                path,
                problem: "it was removed".into(),
            }),
            (Some(_), Some(_)) => Err(Error::DatabaseGone {
                path,
                problem: "it was replaced by another file".into(),
            }),
        }
    }

    /// The schema version in the file.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, retrying the whole transaction while
    /// another process holds the write lock. `f` may run more than once.
    pub(crate) fn write<T>(&mut self, mut f: impl FnMut(&Transaction) -> Result<T>) -> Result<T> {
        if self.read_only {
            return Err(Error::Refused(format!(
                "the database at {} was opened for reading only",
                self.dir.root.display()
            )));
        }
        let conn = &mut self.conn;
        retry_busy(|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `f` once in one `BEGIN IMMEDIATE` transaction: only taking the write lock is
    /// retried, for work that cannot be repeated (it consumes a stream). On an error the
    /// transaction is rolled back.
    pub(crate) fn write_once<T>(&mut self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        if self.read_only {
            return Err(Error::Refused(format!(
                "the database at {} was opened for reading only",
                self.dir.root.display()
            )));
        }
        let conn = &self.conn;
        retry_busy(|| Ok(conn.execute_batch("BEGIN IMMEDIATE")?))?;
        match f(conn) {
            Ok(out) => match conn.execute_batch("COMMIT") {
                Ok(()) => Ok(out),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Runs `f` in one read transaction (a consistent snapshot), retrying on a busy database.
    pub(crate) fn read<T>(&mut self, mut f: impl FnMut(&Transaction) -> Result<T>) -> Result<T> {
        let conn = &mut self.conn;
        retry_busy(|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let out = f(&tx)?;
            tx.finish()?;
            Ok(out)
        })
    }
}

/// (device, inode) of a file, if it exists.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn is_busy(e: &Error) -> bool {
    matches!(e, Error::Sql(rusqlite::Error::SqliteFailure(f, _))
        if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Retries `f` while SQLite reports the database busy or locked, with a growing pause.
pub(crate) fn retry_busy<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut warned = false;
    loop {
        match f() {
            Err(e) if is_busy(&e) && start.elapsed() < RETRY_FOR => {
                if !warned && start.elapsed() > Duration::from_secs(10) {
                    tracing::warn!("database busy for over 10 s; still retrying");
                    warned = true;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) if is_busy(&e) => {
                return Err(Error::Refused(format!(
                    "the database stayed locked by another process for {} s; is a process stuck holding it? ({e})",
                    RETRY_FOR.as_secs()
                )))
            }
            other => return other,
        }
    }
}
