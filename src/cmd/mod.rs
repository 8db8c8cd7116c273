//! One module per `balsam` subcommand, plus what they share: the open database and the prompt.

pub mod app;
pub mod bulk;
pub mod dep;
pub mod init;
pub mod job;
pub mod killjob;
pub mod launcher;
pub mod log;
pub mod ls;
pub mod make_dummies;
pub mod mkchild;
pub mod modify;
pub mod rm;
pub mod service;
pub mod submit_launch;
pub mod which;

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use balsam_launcher::logging::{self, LogLimits};
use balsam_store::{DbDir, Job, Store};
use tracing::level_filters::LevelFilter;

/// What every subcommand that works on a database gets.
pub struct Ctx {
    /// The open database.
    pub store: Store,
}

impl Ctx {
    /// Opens the active database and logs to its `log/balsam.log`.
    pub fn open(db: Option<&Path>) -> Result<Ctx> {
        Ctx::open_logging(db, "balsam.log", LevelFilter::WARN)
    }

    /// Opens the active database for a command that only reads (`ls`, `log`): it never takes
    /// the write lock, so it neither waits behind a writer nor needs write access (a schema
    /// older than this balsam is still upgraded first, by a user who may write).
    pub fn open_read_only(db: Option<&Path>) -> Result<Ctx> {
        let store = Store::locate_read_only(db)?;
        init_logging(&store.dir, "balsam.log", LevelFilter::WARN);
        Ok(Ctx { store })
    }

    /// Opens the active database and logs to `log/<file>`, and to stderr from `stderr_level`
    /// up (the service shows its decisions on its terminal too).
    pub fn open_logging(db: Option<&Path>, file: &str, stderr_level: LevelFilter) -> Result<Ctx> {
        let store = Store::locate(db)?;
        init_logging(&store.dir, file, stderr_level);
        Ok(Ctx { store })
    }
}

/// Logs go to the database's `log/` (the provenance of who changed what from the command line),
/// at LOG_HANDLER_LEVEL and rotated as the settings say, and from `stderr_level` up to stderr.
/// A log that cannot be written is said once, and its lines go to stderr: a command never fails
/// for its log.
fn init_logging(db: &DbDir, file: &str, stderr_level: LevelFilter) {
    let limits = match db.settings() {
        Ok(s) => LogLimits::from_settings(&s),
        Err(e) => {
            eprintln!("balsam: warning: {e}; logging with the default settings");
            LogLimits::default()
        }
    };
    logging::init_command(&db.log_dir().join(file), limits, stderr_level);
}

/// A bug must not look like a user error: say so and how to report it, then abort.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "balsam: internal error: {info}\nThis is a bug in balsam; please report it with the command you ran."
        );
        std::process::abort();
    }));
}

/// Asks a yes/no question on the terminal. Without a terminal and without an answer on stdin
/// the answer is no, so scripts must pass --yes (or --force) explicitly.
pub fn confirm(question: &str) -> Result<bool> {
    eprint!("{question} [y/n]: ");
    std::io::stderr().flush().ok();
    let stdin = std::io::stdin();
    let mut line = String::new();
    let n = stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the answer")?;
    if n == 0 {
        if !stdin.is_terminal() {
            eprintln!();
        }
        return Ok(false);
    }
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// Resolves a job id prefix.
pub fn find_job(store: &mut Store, prefix: &str) -> Result<Job> {
    Ok(store.job(prefix)?)
}
