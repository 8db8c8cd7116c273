//! One module per `balsam` subcommand, plus what they share: the open database and the prompt.

pub mod app;
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
pub mod server;
pub mod service;
pub mod submit_launch;
pub mod which;

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use balsam_store::{Job, Store};

/// What every subcommand that works on a database gets.
pub struct Ctx {
    /// The open database.
    pub store: Store,
    /// Keeps the log file writer alive until exit.
    _log_guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl Ctx {
    /// Opens the active database and starts logging to its `log/balsam.log`.
    pub fn open(db: Option<&Path>) -> Result<Ctx> {
        Ctx::open_logging(db, "balsam.log", tracing::Level::WARN)
    }

    /// Opens the active database and logs to `log/<file>`, and to stderr from `stderr_level`
    /// up (the service shows its decisions on its terminal too).
    pub fn open_logging(
        db: Option<&Path>,
        file: &str,
        stderr_level: tracing::Level,
    ) -> Result<Ctx> {
        let store = Store::locate(db)?;
        let guard = init_logging(&store.dir.log_dir(), file, stderr_level);
        Ok(Ctx {
            store,
            _log_guard: guard,
        })
    }
}

/// Logs go to the database's `log/balsam.log` (the provenance of who changed what from the
/// command line) and, for warnings, to stderr.
fn init_logging(
    dir: &Path,
    file: &str,
    stderr_level: tracing::Level,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    use tracing_subscriber::prelude::*;
    let file = tracing_appender::rolling::never(dir, file);
    let (writer, guard) = tracing_appender::non_blocking(file);
    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer.with_max_level(tracing::Level::INFO));
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_writer(std::io::stderr.with_max_level(stderr_level));
    tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init()
        .ok()?;
    Some(guard)
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
