//! Logs of every rank: to stderr, and once the session is known to
//! `<db>/log/launcher-<session>.log` (rank 0) or `launcher-<session>.rank<r>.log` (workers).
//! Lines are written synchronously, so nothing is lost when a rank aborts.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The file half of the log, opened later than logging starts.
#[derive(Clone, Default)]
pub struct LogFile(Arc<Mutex<Option<File>>>);

impl LogFile {
    /// Starts writing to `path` as well (appending).
    pub fn open(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        Ok(())
    }
}

/// A writer that prefixes each log line with the rank and tees it to stderr and the file.
pub struct Tee {
    prefix: String,
    file: LogFile,
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter<'a>;
    fn make_writer(&'a self) -> TeeWriter<'a> {
        TeeWriter {
            tee: self,
            buf: Vec::new(),
        }
    }
}

/// One log line being written.
pub struct TeeWriter<'a> {
    tee: &'a Tee,
    buf: Vec<u8>,
}

impl Write for TeeWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TeeWriter<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut line = Vec::with_capacity(self.tee.prefix.len() + self.buf.len());
        line.extend_from_slice(self.tee.prefix.as_bytes());
        line.extend_from_slice(&self.buf);
        let _ = std::io::stderr().lock().write_all(&line);
        if let Some(f) = self
            .tee
            .file
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = f.write_all(&line);
        }
    }
}

/// Starts logging for `rank` at `level` (RUST_LOG overrides). Returns the file half to open once
/// the session is known.
pub fn init(rank: i32, level: &str) -> LogFile {
    let file = LogFile::default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let lvl = match level.to_ascii_uppercase().as_str() {
            "WARNING" => "warn".to_string(),
            other => other.to_ascii_lowercase(),
        };
        EnvFilter::new(format!("{lvl},balsam_launcher={lvl}"))
    });
    let tee = Tee {
        prefix: format!("[rank {rank}] "),
        file: file.clone(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_writer(tee)
        .try_init();
    file
}

/// A panic in any thread logs and aborts the process, so mpiexec tears the whole MPI job down
/// within seconds instead of hanging in MPI_Finalize.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!("panic in thread {thread}: {info}; aborting the launcher (this is a bug)");
        eprintln!("balsam-mpi-launcher: internal error in thread {thread}: {info}\nThis is a bug; please report it.");
        std::process::abort();
    }));
}
