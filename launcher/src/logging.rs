//! Logs of the launcher's ranks and of the `balsam` command, and the log files they share.
//!
//! Every rank logs to stderr, and once the session is known to `<db>/log/launcher-<session>.log`
//! (rank 0) or `launcher-<session>.rank<r>.log` (workers). Lines are written synchronously, so
//! nothing is lost when a rank aborts.
//!
//! The database's `settings.json` says how much goes into a file and how big it may grow, as in
//! legacy Balsam: `LOG_HANDLER_LEVEL` is the level of the file (stderr keeps its own), and a file
//! that would grow past `LOG_FILE_SIZE_LIMIT` bytes is renamed `.1` (older backups move to `.2`,
//! ...; `LOG_BACKUP_COUNT` of them are kept) and a new one begun. With `LOG_BACKUP_COUNT` 0 a file
//! is never rotated, as legacy's handler did.
//!
//! [`RotatingFile`] is hand-written rather than taken from a crate (file-rotate, tracing-appender)
//! because several processes append to one file: every `balsam` command writes `balsam.log`. The
//! crates keep the file's size and the rotation in the memory of one process, so two processes
//! would rotate the same file twice or write on into a renamed one. Here a writer shared by
//! processes takes an exclusive `flock` on the log folder for each line, follows the name to the
//! current file when another process rotated it, and appends the line with one `write` to an
//! `O_APPEND` descriptor, so lines never interleave or get lost in a rotation.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use balsam_store::{DbDir, Settings};
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// What `settings.json` says about log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// The level of the file (LOG_HANDLER_LEVEL).
    pub level: LevelFilter,
    /// Size in bytes past which a file is rotated (LOG_FILE_SIZE_LIMIT).
    pub max_bytes: u64,
    /// Rotated files kept (LOG_BACKUP_COUNT); 0: never rotate.
    pub backups: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits::from_settings(&Settings::default())
    }
}

impl LogLimits {
    /// The limits a database's settings give.
    pub fn from_settings(s: &Settings) -> LogLimits {
        LogLimits {
            level: parse_level(&s.log_handler_level).unwrap_or(LevelFilter::INFO),
            max_bytes: s.log_file_size_limit.max(1),
            backups: s.log_backup_count,
        }
    }

    /// The limits of the database whose `log/` folder holds `path` (defaults when its settings
    /// cannot be read: a log must not fail for that).
    fn beside(path: &Path) -> LogLimits {
        path.parent()
            .and_then(Path::parent)
            .and_then(|root| DbDir::open(root).ok())
            .and_then(|db| db.settings().ok())
            .map(|s| LogLimits::from_settings(&s))
            .unwrap_or_default()
    }
}

/// A level as settings and `BALSAM_LOG_LEVEL` write it (`WARNING` as Python's logging does).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.trim().to_ascii_uppercase().as_str() {
        "TRACE" => LevelFilter::TRACE,
        "DEBUG" => LevelFilter::DEBUG,
        "INFO" => LevelFilter::INFO,
        "WARN" | "WARNING" => LevelFilter::WARN,
        "ERROR" | "CRITICAL" => LevelFilter::ERROR,
        "OFF" => LevelFilter::OFF,
        _ => return None,
    })
}

/// A log file rotated by size, opened when the first line comes (a command that logs nothing
/// creates nothing).
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    backups: usize,
    /// Whether other processes append to the same file (then each line is written under a lock
    /// on the folder, and the file is reopened when another process rotated it).
    shared: bool,
    file: Option<File>,
    /// The folder, held open for its lock.
    dir: Option<File>,
    /// Bytes in the file, as this process knows it (single-writer files only).
    size: u64,
}

impl RotatingFile {
    /// A file at `path`, rotated past `max_bytes` keeping `backups` old ones; `shared` when other
    /// processes write it too.
    pub fn new(path: impl Into<PathBuf>, max_bytes: u64, backups: usize, shared: bool) -> Self {
        RotatingFile {
            path: path.into(),
            max_bytes: max_bytes.max(1),
            backups,
            shared,
            file: None,
            dir: None,
            size: 0,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    /// Appends one line (with its newline), rotating first when it would not fit.
    pub fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if !self.shared {
            return self.append_unlocked(line);
        }
        if self.dir.is_none() {
            let dir = match self.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            std::fs::create_dir_all(&dir)?;
            self.dir = Some(File::open(&dir)?);
        }
        let fd = self.dir.as_ref().map(|d| d.as_raw_fd()).unwrap_or(-1);
        // SAFETY: flock on a descriptor we own. A file system without locks (ENOLCK) still gets
        // the line, unlocked.
        let locked = unsafe { libc::flock(fd, libc::LOCK_EX) } == 0;
        let result = (|| {
            // Another process may have rotated the file since: follow the name.
            let current = match (&self.file, std::fs::metadata(&self.path)) {
                (Some(f), Ok(m)) => {
                    let mine = f.metadata()?;
                    mine.ino() == m.ino() && mine.dev() == m.dev()
                }
                _ => false,
            };
            if !current {
                self.open()?;
            }
            self.size = self
                .file
                .as_ref()
                .map_or(Ok(0), |f| f.metadata().map(|m| m.len()))?;
            self.append_unlocked(line)
        })();
        if locked {
            // SAFETY: as above.
            unsafe { libc::flock(fd, libc::LOCK_UN) };
        }
        result
    }

    fn append_unlocked(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.backups > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// `log` → `log.1`, `log.1` → `log.2`, ..., the oldest dropped; then a new `log`.
    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |i: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        for i in (1..self.backups).rev() {
            let from = numbered(i);
            if from.exists() {
                std::fs::rename(&from, numbered(i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = None;
        self.open()
    }
}

/// The file half of a log, opened later than logging starts (the launcher knows its file once it
/// has a session). Shared by the writers of every thread.
#[derive(Clone, Default)]
pub struct LogFile(Arc<LogFileInner>);

#[derive(Default)]
struct LogFileInner {
    file: Mutex<Option<RotatingFile>>,
    /// The file's level, as [`level_code`] (0: no file).
    level: AtomicU8,
    /// Raises the process's level to the file's, once the file's level is known.
    reload: Mutex<Option<reload::Handle<LevelFilter, Registry>>>,
    /// Whether writing the file failed (said once; its lines then go to stderr).
    failed: std::sync::atomic::AtomicBool,
}

fn level_code(l: LevelFilter) -> u8 {
    match l.into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

fn enabled(code: u8, level: &Level) -> bool {
    code >= level_code(LevelFilter::from_level(*level))
}

impl LogFile {
    /// Starts writing to `path` as well (appending), with the level and rotation of the
    /// database's settings (the log folder is the database's `log/`).
    pub fn open(&self, path: &Path) -> std::io::Result<()> {
        let limits = LogLimits::beside(path);
        let mut f = RotatingFile::new(path, limits.max_bytes, limits.backups, false);
        // Open now, so a folder that cannot be written is reported by the caller.
        f.open()?;
        self.set(f, limits.level);
        Ok(())
    }

    /// Writes to `file` from now on, lines of `level` and above.
    pub fn set(&self, file: RotatingFile, level: LevelFilter) {
        *self.0.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        self.0.level.store(level_code(level), Ordering::Relaxed);
        if let Some(h) = self
            .0
            .reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = h.modify(|current| {
                if level > *current {
                    *current = level;
                }
            });
        }
    }

    /// Whether a line of `level` goes to the file.
    fn wants(&self, level: &Level) -> bool {
        enabled(self.0.level.load(Ordering::Relaxed), level)
    }

    /// Appends a line. Returns false when it could not be written: the first failure is said
    /// on stderr, once; the caller then shows the line on stderr.
    fn write(&self, line: &[u8]) -> bool {
        let mut guard = self.0.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = guard.as_mut() else {
            return false;
        };
        match f.append(line) {
            Ok(()) => true,
            Err(e) => {
                if !self.0.failed.swap(true, Ordering::Relaxed) {
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "balsam: warning: cannot write the log {}: {e}; logging to stderr instead",
                        f.path().display()
                    );
                }
                false
            }
        }
    }
}

/// A writer that prefixes each log line with the rank and tees it to stderr (lines at the
/// stderr level) and the file (lines at the file's level).
pub struct Tee {
    prefix: String,
    stderr_level: u8,
    file: LogFile,
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter<'a>;
    fn make_writer(&'a self) -> TeeWriter<'a> {
        TeeWriter {
            tee: self,
            level: Level::ERROR,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> TeeWriter<'a> {
        TeeWriter {
            tee: self,
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

/// One log line being written.
pub struct TeeWriter<'a> {
    tee: &'a Tee,
    level: Level,
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
        let file = &self.tee.file;
        let mut to_stderr = enabled(self.tee.stderr_level, &self.level);
        if file.wants(&self.level) && !file.write(&line) {
            to_stderr = true;
        }
        if to_stderr {
            let _ = std::io::stderr().lock().write_all(&line);
        }
    }
}

/// Starts logging for `rank`: stderr at `level` (RUST_LOG overrides), the file (once opened) at
/// LOG_HANDLER_LEVEL. Returns the file half to open once the session is known.
pub fn init(rank: i32, level: &str) -> LogFile {
    let file = LogFile::default();
    let env = EnvFilter::try_from_default_env().ok();
    // RUST_LOG, when set, decides what reaches stderr.
    let stderr_level = if env.is_some() {
        LevelFilter::TRACE
    } else {
        parse_level(level).unwrap_or(LevelFilter::INFO)
    };
    let (filter, handle) = reload::Layer::new(stderr_level);
    *file.0.reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    let tee = Tee {
        prefix: format!("[rank {rank}] "),
        stderr_level: level_code(stderr_level),
        file: file.clone(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(env)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .with_writer(tee),
        )
        .try_init();
    file
}

/// The file writer of the `balsam` command's log: lines at the file's level go to the file, or
/// to stderr when it cannot be written (unless the stderr layer shows them already).
pub struct CommandLog {
    file: LogFile,
    stderr_level: u8,
}

impl<'a> MakeWriter<'a> for CommandLog {
    type Writer = CommandLogWriter<'a>;
    fn make_writer(&'a self) -> CommandLogWriter<'a> {
        CommandLogWriter {
            log: self,
            level: Level::ERROR,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> CommandLogWriter<'a> {
        CommandLogWriter {
            log: self,
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

/// One line of the command's log being written.
pub struct CommandLogWriter<'a> {
    log: &'a CommandLog,
    level: Level,
    buf: Vec<u8>,
}

impl Write for CommandLogWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for CommandLogWriter<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() || !self.log.file.wants(&self.level) {
            return;
        }
        let shown = enabled(self.log.stderr_level, &self.level);
        if !self.log.file.write(&self.buf) && !shown {
            let _ = std::io::stderr().lock().write_all(&self.buf);
        }
    }
}

/// Logging of a `balsam` command: `file` (shared with other processes, rotated as the settings
/// say, created only when a line is written) from the settings' level up, and stderr, without
/// times, from `stderr_level` up. When the file cannot be written, one warning says so and its
/// lines go to stderr.
pub fn init_command(file: &Path, limits: LogLimits, stderr_level: LevelFilter) {
    use std::io::IsTerminal;
    let log = LogFile::default();
    log.set(
        RotatingFile::new(file, limits.max_bytes, limits.backups, true),
        limits.level,
    );
    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(CommandLog {
            file: log,
            stderr_level: level_code(stderr_level),
        })
        .with_filter(limits.level);
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_writer(std::io::stderr)
        .with_filter(stderr_level);
    let _ = tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotates_by_size_keeping_that_many_backups() {
        for shared in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("x.log");
            let mut f = RotatingFile::new(&path, 100, 2, shared);
            for i in 0..20 {
                f.append(format!("line {i:02} of thirty bytes....\n").as_bytes())
                    .unwrap();
            }
            assert_eq!(names(tmp.path()), ["x.log", "x.log.1", "x.log.2"]);
            // 30-byte lines, 3 per 100-byte file: the newest 3 in x.log, then older.
            let read = |n: &str| std::fs::read_to_string(tmp.path().join(n)).unwrap();
            assert!(read("x.log").starts_with("line 18"), "{}", read("x.log"));
            assert!(
                read("x.log.1").starts_with("line 15"),
                "{}",
                read("x.log.1")
            );
            assert!(
                read("x.log.2").starts_with("line 12"),
                "{}",
                read("x.log.2")
            );
            for n in ["x.log", "x.log.1", "x.log.2"] {
                assert!(read(n).len() <= 100, "{n}: {}", read(n).len());
            }
        }
    }

    #[test]
    fn zero_backups_never_rotates_as_legacy() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.log");
        let mut f = RotatingFile::new(&path, 10, 0, true);
        for _ in 0..5 {
            f.append(b"0123456789\n").unwrap();
        }
        assert_eq!(names(tmp.path()), ["x.log"]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 55);
    }

    #[test]
    fn nothing_is_created_before_the_first_line() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log/x.log");
        let f = RotatingFile::new(&path, 10, 1, true);
        drop(f);
        assert!(!tmp.path().join("log").exists());
    }

    #[test]
    fn writers_in_several_processes_lose_no_line() {
        // Two writers of one shared file (as two processes would have: separate descriptors),
        // in threads, with rotations between their lines: every line lands in some file, whole.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.log");
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut f = RotatingFile::new(&path, 2000, 100, true);
                    for i in 0..500 {
                        f.append(format!("writer {t} line {i:04}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut lines: Vec<String> = Vec::new();
        for n in names(tmp.path()) {
            let text = std::fs::read_to_string(tmp.path().join(&n)).unwrap();
            assert!(text.len() <= 2000, "{n} is {} bytes", text.len());
            lines.extend(text.lines().map(String::from));
        }
        lines.sort();
        let mut want: Vec<String> = (0..2)
            .flat_map(|t| (0..500).map(move |i| format!("writer {t} line {i:04}")))
            .collect();
        want.sort();
        assert_eq!(lines, want);
    }

    #[test]
    fn levels_as_settings_write_them() {
        assert_eq!(parse_level("WARNING"), Some(LevelFilter::WARN));
        assert_eq!(parse_level("debug"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level("loud"), None);
        let s = Settings {
            log_handler_level: "DEBUG".into(),
            log_backup_count: 3,
            log_file_size_limit: 2048,
            ..Settings::default()
        };
        assert_eq!(
            LogLimits::from_settings(&s),
            LogLimits {
                level: LevelFilter::DEBUG,
                max_bytes: 2048,
                backups: 3
            }
        );
    }
}
