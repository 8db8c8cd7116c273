//! The store's errors. Each message names what is wrong and, where the user can act, how to fix it.

use std::path::PathBuf;

use crate::state::{valid_state_names, Actor, State};

/// Everything the store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `--db`, no `BALSAM_DB_PATH`.
    #[error(
        "no Balsam database is active.\n  Activate one with `source balsamactivate PATH`, set BALSAM_DB_PATH=PATH, or pass --db PATH.\n  Create one with `balsam init PATH`."
    )]
    NoDatabase,
    /// The database file is empty (truncated, or created by something else).
    #[error("{} is empty (0 bytes): not a Balsam database. It may have been truncated; restore it from a backup, or create a new database with `balsam init DIR`", .0.display())]
    EmptyDatabase(PathBuf),
    /// The open database file was removed or replaced.
    #[error("the database file {} is gone: {problem}; nothing more can be recorded in it", path.display())]
    DatabaseGone {
        /// The file.
        path: PathBuf,
        /// What happened to it.
        problem: String,
    },
    /// The path exists but holds no Balsam database.
    #[error("{} is not a Balsam database (no {} inside). Create one with `balsam init {}`", .0.display(), crate::dir::DB_FILE, .0.display())]
    NotADatabase(PathBuf),
    /// `balsam init` on a directory that already holds a database.
    #[error("{} already holds a Balsam database", .0.display())]
    AlreadyExists(PathBuf),
    /// Written by a newer balsam.
    #[error("the database at {} has schema version {found}, newer than this balsam understands ({supported}). Upgrade balsam to use it.", path.display())]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Version found in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A state name that does not exist.
    #[error("invalid state {0:?}; valid states are: {states}", states = valid_state_names())]
    InvalidState(String),
    /// The state machine refuses the move.
    #[error("{}", illegal_message(*from, *to, *actor))]
    IllegalTransition {
        /// Current state.
        from: State,
        /// Requested state.
        to: State,
        /// Who asked.
        actor: Actor,
    },
    /// The job changed state under us (a user or another launcher got there first).
    #[error("job {job} is {actual}, not {expected} as expected; left as it is")]
    StateChanged {
        /// Short id of the job.
        job: String,
        /// State the caller expected.
        expected: State,
        /// State found.
        actual: State,
    },
    /// No job has this id (prefix).
    #[error("no job id starts with {0:?}; see `balsam ls` for the ids")]
    UnknownJob(String),
    /// Several jobs share the prefix.
    #[error("job id prefix {prefix:?} is ambiguous; it matches:\n{}", candidates.join("\n"))]
    AmbiguousJob {
        /// The prefix given.
        prefix: String,
        /// `id name` of some of the matches.
        candidates: Vec<String>,
    },
    /// No application of this name.
    #[error("unknown application {0:?}; register it with `balsam app --name {0} --executable CMD` (see `balsam ls apps`)")]
    UnknownApp(String),
    /// An application of this name exists.
    #[error("an application named {0:?} already exists; choose another name or remove it with `balsam rm apps --name {0}`")]
    DuplicateApp(String),
    /// A field name that jobs do not have.
    #[error("unknown job field {0:?}; valid fields are: {fields}", fields = crate::fields::field_names().join(", "))]
    UnknownField(String),
    /// A value that does not fit its field.
    #[error("bad value {value:?} for {field}: expected {expected}")]
    BadValue {
        /// The field.
        field: String,
        /// What was given.
        value: String,
        /// The form the field takes.
        expected: String,
    },
    /// A line of a bulk-import file is wrong; nothing was inserted.
    #[error("{file}:{line}: {source}")]
    BadLine {
        /// File name.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        source: Box<Error>,
    },
    /// Anything else the user asked for that cannot be done; the message says why.
    #[error("{0}")]
    Refused(String),
    /// A dependency that would close a cycle.
    #[error(
        "adding {parent} -> {child} would make a cycle: {child} is already an ancestor of {parent}"
    )]
    Cycle {
        /// Short parent id.
        parent: String,
        /// Short child id.
        child: String,
    },
    /// The session was ended or expired; its leases are gone.
    #[error(
        "launcher session {0} has ended or expired; its jobs were released to other launchers"
    )]
    SessionEnded(i64),
    /// The database holds something this code cannot read.
    #[error("database is corrupt: {0}")]
    Corrupt(String),
    /// settings.json is wrong.
    #[error("{}: {key}: {problem}", path.display())]
    Settings {
        /// settings.json path.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong and the expected form.
        problem: String,
    },
    /// SQLite failed.
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// PostgreSQL failed.
    #[error("database error: {}", pg_message(.0))]
    Pg(#[from] postgres::Error),
    /// The database server cannot be reached.
    #[error("cannot reach the database server at {address}: {problem}.\n  {hint}")]
    Unavailable {
        /// `host:port`.
        address: String,
        /// What went wrong.
        problem: String,
        /// What to do about it.
        hint: String,
    },
    /// File system failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn illegal_message(from: State, to: State, actor: Actor) -> String {
    match actor {
        Actor::User => format!(
            "cannot change state from {from} to {to}: a USER_KILLED job stays killed; add a new job instead"
        ),
        Actor::System => format!("illegal state transition from {from} to {to}"),
    }
}

/// PostgreSQL's own message, with its detail (the crate's Display says only "db error").
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{}: {d}", db.message()),
            None => db.message().to_string(),
        },
        // "error connecting to server" says nothing without its cause ("Connection refused").
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl Error {
    /// Whether the database cannot be reached or written at the moment (a server down, a full
    /// disk, a read-only or vanished file): something to wait out or report, never the fault
    /// of a job.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            Error::Unavailable { .. } | Error::DatabaseGone { .. } => true,
            Error::Sql(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                C::DiskFull
                    | C::ReadOnly
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::PermissionDenied
                    | C::DatabaseBusy
                    | C::DatabaseLocked
            ),
            Error::Pg(p) => {
                crate::db::is_connection_error(self)
                    || p.code().is_some_and(|c| {
                        matches!(c.code(), "53100" | "53200" | "25006" | "57P01" | "57P03")
                    })
            }
            _ => false,
        }
    }

    /// Whether no writer at all can write the database now, not only this process: a full
    /// disk, a read-only file or server, an I/O error on the file. (A server that cannot be
    /// reached, or a lock held too long, may well be written by others meanwhile.) A launcher
    /// whose heartbeat fails this way keeps its jobs: nobody can expire its session either.
    pub fn blocks_every_writer(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            Error::Io { .. } => true,
            Error::Sql(rusqlite::Error::SqliteFailure(f, _)) => {
                matches!(f.code, C::DiskFull | C::ReadOnly | C::SystemIoFailure)
            }
            Error::Pg(p) => p
                .code()
                .is_some_and(|c| matches!(c.code(), "53100" | "25006")),
            _ => false,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
