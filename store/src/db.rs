//! The connection to a database directory's store, SQLite or PostgreSQL: opening, schema
//! migrations, and the transaction helpers every query runs in.
//!
//! - [`Store::write`] runs a closure in one write transaction and runs it again when the
//!   database asks for it: SQLite's write lock held by another process (so "database is locked"
//!   never reaches a user), PostgreSQL's serialization failures and deadlocks, and a server
//!   connection lost and found again within the store's patience. The closure may run more
//!   than once.
//! - [`Store::read`] runs a closure on one consistent snapshot; it never waits for a writer.
//! - A server that cannot be reached within the patience (a few seconds by default) is
//!   reported as [`Error::Unavailable`], naming its address and what to do. The first failure
//!   of a process is logged once, and so is the recovery.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::dir::DbDir;
use crate::error::{Error, Result};
use crate::schema;
use crate::server_info::ServerInfo;
use crate::sql::{Backend, PgConn, Tx};

/// The SQLite schema version this build writes.
pub const SCHEMA_VERSION: i64 = schema::SQLITE.len() as i64;
/// The PostgreSQL schema version this build writes.
pub const PG_SCHEMA_VERSION: i64 = schema::POSTGRES.len() as i64;

/// How long one SQLite attempt waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SQLite write keeps retrying before it gives up with a clear message.
const RETRY_FOR: Duration = Duration::from_secs(600);
/// How long a call keeps trying to reach an unreachable server, by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(5);
/// Serialises concurrent first opens of a PostgreSQL database (schema creation).
const MIGRATION_LOCK: i64 = 0x6261_6c73_616d;

/// Whether this process has already said that the server is unreachable (said once, until it
/// is back).
static OUTAGE_ANNOUNCED: AtomicBool = AtomicBool::new(false);

enum Conn {
    Sqlite(Connection),
    Pg(Box<PgConn>),
}

/// An open Balsam database. Not shared between threads: each thread opens its own.
pub struct Store {
    /// None while a PostgreSQL server is unreachable.
    conn: Option<Conn>,
    /// The database directory.
    pub dir: DbDir,
    /// Opened for reading only: writes are refused without touching the database.
    read_only: bool,
    /// The SQLite file's (device, inode) when opened, to notice it being removed or replaced.
    file_id: Option<(u64, u64)>,
    /// The PostgreSQL server, for PostgreSQL databases.
    server: Option<ServerInfo>,
    /// How long a call keeps trying to reach an unreachable server.
    patience: Duration,
}

impl Store {
    /// Creates a database directory with an embedded SQLite database.
    pub fn create(path: &Path) -> Result<Store> {
        let dir = DbDir::create_layout(path)?;
        let mut store = Store::connect_sqlite(dir, true, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Creates a database directory whose database lives on a PostgreSQL server: writes
    /// `server-info` (and `pgpass`, mode 0600, when a password is given), creates the database
    /// on the server when it does not exist yet (the user needs the right to), and its schema.
    /// On failure nothing is left that would make the directory look like a database.
    pub fn create_on_server(
        path: &Path,
        info: &ServerInfo,
        password: Option<&str>,
    ) -> Result<Store> {
        let dir = DbDir::create_layout_for_server(path)?;
        let written = [
            dir.root.join(crate::server_info::SERVER_INFO_FILE),
            dir.root.join(crate::server_info::PASSWORD_FILE),
        ];
        let made = (|| {
            if let Some(p) = password {
                crate::server_info::write_password_file(&written[1], info, p)?;
            }
            info.save(&dir.root)?;
            create_database_if_missing(&dir, info)?;
            Store::open(dir.clone())
        })();
        if made.is_err() {
            for f in &written {
                let _ = std::fs::remove_file(f);
            }
        }
        made
    }

    /// Opens an existing database directory (SQLite or PostgreSQL), migrating an older schema
    /// forward.
    pub fn open(dir: DbDir) -> Result<Store> {
        if dir.backend() == Backend::Sqlite && on_read_only_fs(&dir.root) {
            // SQLite would say only "unable to open database file" or "attempt to write a
            // readonly database", after the caller has done its work.
            return Err(Error::Refused(format!(
                "the database in {} is on a read-only file system: it can be read (`balsam ls`), not changed; \
                 remount it read-write, or copy the directory somewhere writable and use the copy",
                dir.root.display()
            )));
        }
        let mut store = Store::connect(dir, false)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database for commands that only read (`ls`, `which`, ...). It never
    /// writes and never waits for a writer, and works for users who may only read the
    /// directory. An older schema is migrated first when this user can write the database.
    pub fn open_read_only(dir: DbDir) -> Result<Store> {
        Store::try_open_read_only(dir.clone()).map_err(|e| match e {
            Error::Sql(rusqlite::Error::SqliteFailure(f, _))
                if f.extended_code == rusqlite::ffi::SQLITE_READONLY_DIRECTORY =>
            {
                Error::Refused(format!(
                    "cannot read the database in {} without its -wal and -shm files, and this user may not create them there; \
                     open it once as a user who may write the directory (any balsam command), which leaves them in place",
                    dir.root.display()
                ))
            }
            other => other,
        })
    }

    fn try_open_read_only(dir: DbDir) -> Result<Store> {
        // SQLite reports the missing -shm at the first read, not at the open.
        let opened = Store::connect(dir.clone(), true).and_then(|mut s| {
            let v = s.found_version()?;
            Ok((s, v))
        });
        let (store, (found, current)) = match opened {
            Ok(o) => o,
            Err(e) if dir.backend() == Backend::Sqlite && on_read_only_fs(&dir.root) => {
                let mut s = Store::connect_sqlite_frozen(dir.clone(), e)?;
                let v = s.found_version()?;
                (s, v)
            }
            Err(e) => return Err(e),
        };
        if found == current {
            return Ok(store);
        }
        if found > current {
            return Err(store.newer_schema(found));
        }
        drop(store);
        Store::open(dir.clone()).map_err(|e| {
            Error::Refused(format!(
                "the database at {} has schema version {found} and must be upgraded to {current} by a user who may write it ({e})",
                dir.root.display()
            ))
        })?;
        Store::connect(dir, true)
    }

    /// Opens the active database (`--db`, then `BALSAM_DB_PATH`).
    pub fn locate(explicit: Option<&Path>) -> Result<Store> {
        Store::open(DbDir::locate(explicit)?)
    }

    /// Opens the active database for reading only (see [`Store::open_read_only`]).
    pub fn locate_read_only(explicit: Option<&Path>) -> Result<Store> {
        Store::open_read_only(DbDir::locate(explicit)?)
    }

    /// The backend this store runs on.
    pub fn backend(&self) -> Backend {
        if self.server.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// The PostgreSQL server, for a PostgreSQL database.
    pub fn server(&self) -> Option<&ServerInfo> {
        self.server.as_ref()
    }

    /// How long a call keeps trying to reach an unreachable server before it fails with
    /// [`Error::Unavailable`] (default [`DEFAULT_PATIENCE`]). Commands keep the default;
    /// long-running processes that retry in their own loops may shorten or lengthen it.
    pub fn set_patience(&mut self, patience: Duration) {
        self.patience = patience;
    }

    fn connect(dir: DbDir, read_only: bool) -> Result<Store> {
        match dir.backend() {
            Backend::Sqlite => Store::connect_sqlite(dir, false, read_only),
            Backend::Postgres => {
                let server = ServerInfo::load(&dir.root)?;
                let mut store = Store {
                    conn: None,
                    dir,
                    read_only,
                    file_id: None,
                    server: Some(server),
                    patience: DEFAULT_PATIENCE,
                };
                store.ensure_connected(Instant::now())?;
                Ok(store)
            }
        }
    }

    /// Opens an SQLite database on a read-only file system (an archived campaign, a read-only
    /// mount of a project directory) whose `-wal` and `-shm` files are missing: SQLite opens a
    /// WAL database only with them, and nobody can create them there. Without a `-wal` file the
    /// database file holds every committed change, and no process can write through a
    /// read-only mount, so it is opened as immutable: read without locks. A `-wal` file that is
    /// there means changes this host cannot see without its `-shm`; that is refused, saying so.
    fn connect_sqlite_frozen(dir: DbDir, first: Error) -> Result<Store> {
        let file = dir.db_file();
        let wal = file.with_file_name(format!(
            "{}-wal",
            file.file_name().unwrap_or_default().to_string_lossy()
        ));
        if !file.is_file() {
            return Err(first);
        }
        if wal.exists() {
            return Err(Error::Refused(format!(
                "cannot read the database in {}: it is on a read-only file system, and its changes in {} \
                 can only be read with a -shm file, which cannot be created there; \
                 open it once where its directory is writable (any balsam command)",
                dir.root.display(),
                wal.display()
            )));
        }
        let uri = format!("file:{}?immutable=1", uri_path(&file));
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(uri, flags)?;
        Store::over_sqlite(conn, dir, true)
    }

    /// The store over an open SQLite connection, with the settings every connection gets.
    fn over_sqlite(conn: Connection, dir: DbDir, read_only: bool) -> Result<Store> {
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.set_prepared_statement_cache_capacity(64);
        let file_id = file_id(&dir.db_file());
        Ok(Store {
            conn: Some(Conn::Sqlite(conn)),
            dir,
            read_only,
            file_id,
            server: None,
            patience: DEFAULT_PATIENCE,
        })
    }

    fn connect_sqlite(dir: DbDir, create: bool, read_only: bool) -> Result<Store> {
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
            // The WAL and its index stay on disk when the last writer closes (emptied, not
            // removed), so users who may only read the directory can still open the database.
            persist_wal(&conn);
        }
        Store::over_sqlite(conn, dir, read_only)
    }

    /// Connects to the PostgreSQL server if not connected, retrying until `since` + patience.
    fn ensure_connected(&mut self, since: Instant) -> Result<()> {
        let Some(server) = &self.server else {
            return Ok(());
        };
        let mut pause = Duration::from_millis(100);
        while self.conn.is_none() {
            match connect_bounded(server.client_config(&self.dir.root)) {
                Ok(client) => {
                    if OUTAGE_ANNOUNCED.swap(false, Ordering::AcqRel) {
                        tracing::warn!("database server {} reachable again", server.address());
                    }
                    self.conn = Some(Conn::Pg(Box::new(PgConn::new(client))));
                }
                Err(e) => {
                    let no_answer = matches!(e, Error::Io { .. });
                    if !no_answer && !is_connection_error(&e) {
                        // Refused for a reason waiting will not cure (a wrong password).
                        let about_password = e.to_string().contains("password");
                        return Err(Error::Refused(format!(
                            "the database server at {} refused the connection: {e}{}",
                            server.address(),
                            if about_password {
                                format!(
                                    ". Its password is read from {}, then PGPASSFILE, then ~/.pgpass",
                                    self.dir.root.join(crate::server_info::PASSWORD_FILE).display()
                                )
                            } else {
                                String::new()
                            }
                        )));
                    }
                    if !OUTAGE_ANNOUNCED.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            "database server {} unreachable ({e}); retrying",
                            server.address()
                        );
                    }
                    if since.elapsed() + pause > self.patience {
                        return Err(self.unavailable(&e));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        Ok(())
    }

    fn unavailable(&self, e: &Error) -> Error {
        let server = self.server.as_ref().expect("postgres store");
        let hint = if server.data_dir.is_empty() {
            "check that the site's server is running and reachable from this host".to_string()
        } else {
            format!(
                "start it with `balsam server start --db {}`, or check the network between this host and {}",
                self.dir.root.display(),
                server.host
            )
        };
        Error::Unavailable {
            address: server.address(),
            problem: e.to_string(),
            hint,
        }
    }

    fn found_version(&mut self) -> Result<(i64, i64)> {
        match self.backend() {
            Backend::Sqlite => {
                let v = self.read(|tx| tx.query_one("PRAGMA user_version", &[])?.i64(0))?;
                Ok((v, SCHEMA_VERSION))
            }
            Backend::Postgres => {
                let v = self.read(|tx| {
                    let exists = tx.exists(
                        "SELECT 1 FROM information_schema.tables WHERE table_name = 'balsam_schema' AND table_schema = current_schema()",
                        &[],
                    )?;
                    if !exists {
                        return Ok(0);
                    }
                    Ok(tx
                        .query_one("SELECT max(version) FROM balsam_schema", &[])?
                        .opt_i64(0)?
                        .unwrap_or(0))
                })?;
                Ok((v, PG_SCHEMA_VERSION))
            }
        }
    }

    fn newer_schema(&self, found: i64) -> Error {
        Error::NewerSchema {
            path: match self.backend() {
                Backend::Sqlite => self.dir.db_file(),
                Backend::Postgres => self.dir.root.join(crate::server_info::SERVER_INFO_FILE),
            },
            found,
            supported: match self.backend() {
                Backend::Sqlite => SCHEMA_VERSION,
                Backend::Postgres => PG_SCHEMA_VERSION,
            },
        }
    }

    fn migrate(&mut self) -> Result<()> {
        // Read first: a current schema needs no write lock, so opening never waits behind a
        // writer.
        let (found, current) = self.found_version()?;
        if found == current {
            return Ok(());
        }
        if found > current {
            return Err(self.newer_schema(found));
        }
        let newer = self.newer_schema(i64::MAX);
        match self.backend() {
            Backend::Sqlite => self.write(|tx| {
                let found = tx.query_one("PRAGMA user_version", &[])?.i64(0)?;
                if found > SCHEMA_VERSION {
                    return Err(match &newer {
                        Error::NewerSchema {
                            path, supported, ..
                        } => Error::NewerSchema {
                            path: path.clone(),
                            found,
                            supported: *supported,
                        },
                        _ => unreachable!(),
                    });
                }
                for (v, sql) in schema::SQLITE.iter().enumerate().skip(found as usize) {
                    tx.batch(sql)?;
                    tx.batch(&format!("PRAGMA user_version = {}", v + 1))?;
                }
                Ok(())
            }),
            Backend::Postgres => self.write(|tx| {
                tx.exec("SELECT pg_advisory_xact_lock(?1)", &[MIGRATION_LOCK.into()])?;
                tx.batch("CREATE TABLE IF NOT EXISTS balsam_schema (version BIGINT NOT NULL)")?;
                let found = tx
                    .query_one("SELECT max(version) FROM balsam_schema", &[])?
                    .opt_i64(0)?
                    .unwrap_or(0);
                for (v, sql) in schema::POSTGRES.iter().enumerate().skip(found as usize) {
                    tx.batch(sql)?;
                    tx.exec(
                        "INSERT INTO balsam_schema (version) VALUES (?1)",
                        &[(v as i64 + 1).into()],
                    )?;
                }
                Ok(())
            }),
        }
    }

    /// The database's size on disk, bytes (the SQLite file and its WAL; the PostgreSQL
    /// database's tables and indexes).
    pub fn size_bytes(&mut self) -> Result<u64> {
        match self.backend() {
            Backend::Sqlite => {
                let size =
                    |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                let file = self.dir.db_file();
                let wal = file.with_file_name(format!("{}-wal", crate::dir::DB_FILE));
                Ok(size(file) + size(wal))
            }
            Backend::Postgres => self.read(|tx| {
                tx.query_one("SELECT pg_database_size(current_database())", &[])?
                    .u64(0)
            }),
        }
    }

    /// The schema version in the database.
    pub fn schema_version(&mut self) -> Result<i64> {
        Ok(self.found_version()?.0)
    }

    /// Fails when the SQLite file this store opened was removed or replaced since (a deleted
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

    /// Runs `f` in one write transaction, again when the database asks for it (see the module
    /// documentation). `f` may run more than once.
    pub(crate) fn write<T>(&mut self, mut f: impl FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        self.refuse_if_read_only()?;
        self.run(true, &mut f)
    }

    /// Runs `f` in one read transaction (a consistent snapshot), again when the database asks.
    pub(crate) fn read<T>(&mut self, mut f: impl FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        self.run(false, &mut f)
    }

    /// Runs `f` once in one write transaction: only beginning it is retried, for work that
    /// cannot be repeated (it consumes a stream). On an error the transaction is rolled back.
    pub(crate) fn write_once<T>(&mut self, f: impl FnOnce(&mut Tx) -> Result<T>) -> Result<T> {
        self.refuse_if_read_only()?;
        let start = Instant::now();
        loop {
            self.ensure_connected(start)?;
            match self.conn.as_mut().expect("connected") {
                Conn::Sqlite(c) => {
                    retry_busy(|| Ok(c.execute_batch("BEGIN IMMEDIATE")?))?;
                    let mut tx = Tx::Sqlite(c);
                    return finish_sqlite(c, f(&mut tx));
                }
                Conn::Pg(pg) => {
                    if let Err(e) = pg.client.batch_execute("BEGIN") {
                        let e = Error::Pg(e);
                        if is_connection_error(&e) && start.elapsed() < self.patience {
                            self.conn = None;
                            continue;
                        }
                        return Err(e);
                    }
                    let out = {
                        let mut tx = Tx::Pg(pg);
                        f(&mut tx)
                    };
                    let r = finish_pg(pg, out);
                    if r.as_ref().is_err_and(is_connection_error) {
                        self.conn = None;
                    }
                    return r;
                }
            }
        }
    }

    fn refuse_if_read_only(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::Refused(format!(
                "the database at {} was opened for reading only",
                self.dir.root.display()
            )));
        }
        Ok(())
    }

    fn run<T>(&mut self, write: bool, f: &mut dyn FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            self.ensure_connected(start)?;
            match self.conn.as_mut().expect("connected") {
                Conn::Sqlite(c) => {
                    let begin = if write { "BEGIN IMMEDIATE" } else { "BEGIN" };
                    return retry_busy(|| {
                        c.execute_batch(begin)?;
                        let out = {
                            let mut tx = Tx::Sqlite(c);
                            f(&mut tx)
                        };
                        finish_sqlite(c, out)
                    });
                }
                Conn::Pg(pg) => {
                    // Writes run at READ COMMITTED and lock the rows they depend on (see
                    // crate::sql); reads take one snapshot.
                    let begin = if write {
                        "BEGIN"
                    } else {
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
                    };
                    let out = match pg.client.batch_execute(begin) {
                        Ok(()) => {
                            let out = {
                                let mut tx = Tx::Pg(pg);
                                f(&mut tx)
                            };
                            finish_pg(pg, out)
                        }
                        Err(e) => Err(Error::Pg(e)),
                    };
                    match out {
                        Err(e) if is_retryable(&e) => {
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        Err(e) if is_connection_error(&e) => {
                            // Said by ensure_connected if connecting again fails: a connection
                            // that died while idle (the server restarted meanwhile) is no
                            // outage, and is replaced without a word.
                            self.conn = None;
                            if start.elapsed() >= self.patience {
                                return Err(self.unavailable(&e));
                            }
                        }
                        other => return other,
                    }
                }
            }
        }
    }
}

/// Creates the database of `info` on its server when connecting says it does not exist
/// (connecting to the server's `postgres` database to do it).
fn create_database_if_missing(dir: &DbDir, info: &ServerInfo) -> Result<()> {
    use postgres::error::SqlState;
    match connect_bounded(info.client_config(&dir.root)) {
        Ok(_) => Ok(()),
        Err(Error::Pg(e)) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            let mut admin = info.client_config(&dir.root);
            admin.dbname("postgres");
            let mut c = connect_bounded(admin)?;
            let name = info.dbname.replace('"', "\"\"");
            c.batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"))
                .or_else(|e| {
                    // Created by another process at the same moment.
                    if e.code() == Some(&SqlState::DUPLICATE_DATABASE) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// How many connection attempts of this process may wait for a server's answer at once: one
/// for each of a launcher's threads that use the database, and a few more.
const MAX_WAITING_CONNECTS: usize = 8;
/// Connection attempts of this process waiting for a server's answer, including those whose
/// caller stopped waiting (see [`connect_bounded`]).
static WAITING_CONNECTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Connects with a bound on the whole exchange. The client library bounds the TCP connect
/// only: a server that accepts connections and never answers (stopped with SIGSTOP, or its
/// host hung) would hold a command forever. The attempt runs on a thread of its own; one that
/// times out is left behind, to end when the server answers or the connection breaks, and at
/// most [`MAX_WAITING_CONNECTS`] are left behind at once: past that, an attempt fails at once.
/// Its error is an [`Error::Io`] of kind `TimedOut`; the library's own errors are
/// [`Error::Pg`].
fn connect_bounded(config: postgres::Config) -> Result<postgres::Client> {
    // A server that stays silent for hours (stopped, not dead: its kernel still acknowledges)
    // would otherwise collect a thread and a socket per retry, until the process runs out.
    if WAITING_CONNECTS.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING_CONNECTS {
        WAITING_CONNECTS.fetch_sub(1, Ordering::AcqRel);
        return Err(Error::io(
            format!(
                "no answer: {MAX_WAITING_CONNECTS} earlier attempts to connect still wait for the server"
            ),
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        ));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("pg-connect".into())
        .spawn(move || {
            let r = config.connect(postgres::NoTls);
            WAITING_CONNECTS.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(r);
        })
        .map_err(|e| {
            WAITING_CONNECTS.fetch_sub(1, Ordering::AcqRel);
            Error::io("cannot start a thread to connect to the database server", e)
        })?;
    match rx.recv_timeout(crate::server_info::CONNECT_TIMEOUT) {
        Ok(r) => r.map_err(Error::Pg),
        Err(_) => Err(Error::io(
            format!(
                "no answer within {} s",
                crate::server_info::CONNECT_TIMEOUT.as_secs()
            ),
            std::io::Error::from(std::io::ErrorKind::TimedOut),
        )),
    }
}

/// Commits after `out`, or rolls back.
fn finish_sqlite<T>(c: &Connection, out: Result<T>) -> Result<T> {
    match out {
        Ok(v) => match c.execute_batch("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Commits after `out`, or rolls back.
fn finish_pg<T>(pg: &mut PgConn, out: Result<T>) -> Result<T> {
    match out {
        Ok(v) => match pg.client.batch_execute("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = pg.client.batch_execute("ROLLBACK");
                Err(Error::Pg(e))
            }
        },
        Err(e) => {
            let _ = pg.client.batch_execute("ROLLBACK");
            Err(e)
        }
    }
}

/// Keeps the `-wal` and `-shm` files when this connection closes (SQLITE_FCNTL_PERSIST_WAL):
/// without them a reader who cannot create files in the directory cannot open a WAL database.
fn persist_wal(conn: &Connection) {
    let mut on: std::ffi::c_int = 1;
    // SAFETY: a file-control call on this open connection's main database, with a pointer to
    // an int that lives across the call, as SQLite documents for this opcode.
    unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&mut on as *mut std::ffi::c_int).cast(),
        );
    }
}

/// Whether `dir` sits on a file system mounted read-only.
fn on_read_only_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs(3) with a NUL-terminated path and a zeroed struct it fills in.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
    }
}

/// A path as the path part of an SQLite `file:` URI: `%`, `?` and `#` are escaped.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for ch in path.to_string_lossy().chars() {
        match ch {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// (device, inode) of a file, if it exists.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// PostgreSQL asks for the transaction to be run again.
fn is_retryable(e: &Error) -> bool {
    use postgres::error::SqlState;
    matches!(e, Error::Pg(p) if p.code().is_some_and(|c|
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED))
}

/// The connection to the server is gone or cannot be made (the server stopped, restarts, or
/// the network is down): worth waiting for.
pub(crate) fn is_connection_error(e: &Error) -> bool {
    let Error::Pg(p) = e else {
        return false;
    };
    if p.is_closed() {
        return true;
    }
    match p.code() {
        // Connection exceptions (08...), the server shutting down or starting (57P01-57P03).
        Some(c) => {
            let code = c.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        // No server answer at all: an I/O error or a timeout (not a client-side refusal
        // such as "invalid configuration: password missing").
        None => {
            p.as_db_error().is_none()
                && std::error::Error::source(p).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_never_answers_holds_a_bounded_number_of_connection_attempts() {
        // A server that accepts connections and never answers, like one stopped with SIGSTOP.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepter = std::thread::spawn(move || {
            (0..MAX_WAITING_CONNECTS)
                .map(|_| listener.accept().unwrap().0)
                .collect::<Vec<_>>()
        });
        let attempts: Vec<_> = (0..MAX_WAITING_CONNECTS + 4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = postgres::Config::new();
                    c.host("127.0.0.1")
                        .port(port)
                        .user("balsam")
                        .dbname("balsam");
                    connect_bounded(c).map(|_| ()).unwrap_err().to_string()
                })
            })
            .collect();
        let errors: Vec<String> = attempts.into_iter().map(|t| t.join().unwrap()).collect();
        let turned_away = errors
            .iter()
            .filter(|e| e.contains("earlier attempts to connect still wait"))
            .count();
        assert_eq!(turned_away, 4, "{errors:?}");
        assert_eq!(
            WAITING_CONNECTS.load(Ordering::Acquire),
            MAX_WAITING_CONNECTS
        );
        // The server goes away: the attempts left behind end, and new ones may start.
        drop(accepter.join().unwrap());
        let t = Instant::now();
        while WAITING_CONNECTS.load(Ordering::Acquire) > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "attempts still waiting"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_immutable_uri_names_the_file_whatever_its_path_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run 7?retry#2 100%");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("balsamdb.sqlite3");
        let c = Connection::open(&file).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (42);")
            .unwrap();
        drop(c);
        let uri = format!("file:{}?immutable=1", uri_path(&file));
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let c = Connection::open_with_flags(&uri, flags).unwrap();
        let x: i64 = c.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(x, 42);
        // Without the escapes, SQLite would read "retry#2 100%" as the URI's query and fragment.
        assert!(uri.contains("run 7%3fretry%232 100%25"), "{uri}");
    }
}
