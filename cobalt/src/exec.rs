//! Running scheduler programs (qsub, squeue, ...) with a deadline.
//!
//! A scheduler command can hang when the scheduler is overloaded or its server is unreachable; the
//! service must not hang with it. So every command runs with a time limit: we poll `try_wait`
//! with short sleeps (no busy loop, no extra process) and, at the deadline, kill the command's
//! whole process group (the command runs in its own group so that helpers it started die too).
//! Output is drained by reader threads while we wait, so a chatty command cannot block on a full
//! pipe.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often the child is polled while we wait for it.
const POLL: Duration = Duration::from_millis(25);

/// How long to wait for the output pipes to close after the program exited. A program that left a
/// background child holding its stdout open would otherwise keep us waiting until the deadline.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// What a successful run printed.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// Standard output, lossily decoded (schedulers sometimes print Latin-1).
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// One command to run: the program, where it comes from in the settings, and how to run it.
#[derive(Debug, Clone)]
pub(crate) struct Run<'a> {
    /// The program, a bare name (looked up on PATH) or a path.
    pub exe: &'a Path,
    /// The settings key that chose `exe`, named in "not found" errors.
    pub setting: &'static str,
    /// Arguments.
    pub args: Vec<OsString>,
    /// Working directory, if not ours.
    pub cwd: Option<&'a Path>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Time limit.
    pub timeout: Duration,
}

impl<'a> Run<'a> {
    pub fn new(exe: &'a Path, setting: &'static str, timeout: Duration) -> Self {
        Run {
            exe,
            setting,
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            timeout,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn cwd(mut self, dir: &'a Path) -> Self {
        self.cwd = Some(dir);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The command line, shell-quoted, for messages.
    pub fn display(&self) -> String {
        let mut words = Vec::with_capacity(self.args.len() + 3);
        for (k, v) in &self.env {
            words.push(format!("{k}={v}"));
        }
        words.push(self.exe.to_string_lossy().into_owned());
        words.extend(self.args.iter().map(|a| a.to_string_lossy().into_owned()));
        shell_words::join(words)
    }

    /// Runs a submit program and reads the new job's id from its stdout with `parse`; `what`
    /// says what was expected when nothing could be read.
    pub fn submit(&self, parse: impl Fn(&str) -> Option<String>, what: &str) -> Result<String> {
        let out = self.output()?;
        parse(&out.stdout).ok_or_else(|| Error::UnexpectedOutput {
            command: self.display(),
            problem: what.to_string(),
            output: format!("{}{}", out.stdout, out.stderr),
        })
    }

    /// Runs a status program and parses its stdout; `keep` bounds how much of the output an
    /// error quotes.
    pub fn status<T>(
        &self,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
        keep: usize,
    ) -> Result<T> {
        let out = self.output()?;
        parse(&out.stdout).map_err(|problem| Error::UnexpectedOutput {
            command: self.display(),
            problem,
            output: out.stdout.chars().take(keep).collect(),
        })
    }

    /// Runs the command; Ok only when it exits 0 within the time limit.
    pub fn output(&self) -> Result<Output> {
        let mut cmd = Command::new(self.exe);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = self.cwd {
            cmd.current_dir(dir);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // "Text file busy": a script just written is still open for writing in a process forked
        // meanwhile by another thread; that descriptor closes at its exec, so try again shortly.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.map_err(|e| self.spawn_error(e))?,
            }
        };
        let pid = child.id() as libc::pid_t;

        let (done_tx, done_rx) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stdout.take() {
            drain(pipe, Arc::clone(&stdout), done_tx.clone());
        }
        if let Some(pipe) = child.stderr.take() {
            drain(pipe, Arc::clone(&stderr), done_tx.clone());
        }
        drop(done_tx);

        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(self.spawn_error(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                // SAFETY: plain syscalls on the group we created; a stale group only yields ESRCH.
                unsafe {
                    libc::killpg(pid, libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    command: self.display(),
                    seconds: self.timeout.as_secs(),
                });
            }
            thread::sleep(POLL.min(deadline - now));
        };

        // Both readers signal when their pipe closes; do not wait past the grace period for a pipe
        // that a left-behind grandchild still holds.
        let grace_end = Instant::now() + PIPE_GRACE;
        for _ in 0..2 {
            let left = grace_end.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let take = |buf: &Arc<Mutex<Vec<u8>>>| {
            let bytes = buf.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let out = Output {
            stdout: take(&stdout),
            stderr: take(&stderr),
        };
        if status.success() {
            Ok(out)
        } else {
            Err(Error::ProgramFailed {
                command: self.display(),
                code: status.code(),
                stderr: out.stderr,
                stdout: out.stdout,
            })
        }
    }

    fn spawn_error(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ProgramNotFound {
                program: self.exe.to_path_buf(),
                setting: self.setting,
            }
        } else {
            Error::Spawn {
                program: self.exe.to_path_buf(),
                setting: self.setting,
                source: e,
            }
        }
    }
}

/// Reads a pipe to its end on a thread, appending to `buf`, then says so on `done`.
fn drain(mut pipe: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>) {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if let Ok(mut b) = buf.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// The program to use: the configured one, else the default bare name (looked up on PATH).
pub(crate) fn program_or(configured: &Option<PathBuf>, default: &str) -> PathBuf {
    configured.clone().unwrap_or_else(|| PathBuf::from(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Run<'static> {
        Run::new(Path::new("/bin/sh"), "TEST_EXE", Duration::from_secs(10))
            .arg("-c")
            .arg(script)
    }

    #[test]
    fn captures_output() {
        let out = sh("echo out; echo err >&2").output().unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn nonzero_exit_keeps_stderr_verbatim() {
        let err = sh("echo 'qsub: error: project   XYZ unknown' >&2; exit 3")
            .output()
            .unwrap_err();
        match &err {
            Error::ProgramFailed { code, stderr, .. } => {
                assert_eq!(*code, Some(3));
                assert_eq!(stderr, "qsub: error: project   XYZ unknown\n");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.scheduler_stderr(),
            Some("qsub: error: project   XYZ unknown\n")
        );
        let msg = err.to_string();
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("qsub: error: project   XYZ unknown"), "{msg}");
    }

    #[test]
    fn missing_program_names_setting() {
        let err = Run::new(
            Path::new("/nonexistent/qsub"),
            "SCHEDULER_SUBMIT_EXE",
            Duration::from_secs(1),
        )
        .output()
        .unwrap_err();
        assert!(matches!(err, Error::ProgramNotFound { .. }));
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/qsub"), "{msg}");
        assert!(msg.contains("SCHEDULER_SUBMIT_EXE"), "{msg}");
    }

    #[test]
    fn timeout_kills_the_group() {
        let start = Instant::now();
        let err = Run::new(Path::new("/bin/sh"), "X", Duration::from_millis(300))
            .arg("-c")
            .arg("sleep 30 & sleep 30; wait")
            .output()
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn leftover_background_child_does_not_block() {
        // The program exits at once but leaves a child holding stdout open.
        let start = Instant::now();
        let out = sh("echo 1234; sleep 20 &").output().unwrap();
        assert_eq!(out.stdout.trim(), "1234");
        assert!(start.elapsed() < Duration::from_secs(8));
    }

    #[test]
    fn env_and_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let out = sh("echo $FOO; pwd")
            .env("FOO", "bar baz")
            .cwd(dir.path())
            .output()
            .unwrap();
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines[0], "bar baz");
        assert_eq!(
            Path::new(lines[1]).canonicalize().unwrap(),
            dir.path().canonicalize().unwrap()
        );
    }
}
