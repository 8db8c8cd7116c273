//! Shared fixture for the end-to-end tests: a fresh database directory in a temporary folder,
//! and runners for the real binaries, each bounded in time so a hang fails in seconds.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default bound for one command.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The `balsam` binary under test.
pub fn balsam_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_balsam"))
}

/// A binary built beside `balsam` (e.g. `balsam-mpi-launcher`; the test script builds the
/// whole workspace first).
pub fn sibling_bin(name: &str) -> PathBuf {
    let p = balsam_bin().with_file_name(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None when killed by a signal or the timeout).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "command failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(
            self.code.is_some() && self.code != Some(0),
            "command should have failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        &self.stderr
    }
}

/// Runs a command with a deadline; kills its process group when it passes.
pub fn run_cmd(mut cmd: Command, timeout: Duration, stdin: Option<&str>) -> Run {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let pid = child.id() as i32;
    let out_thread = {
        let mut so = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut so, &mut s).ok();
            s
        })
    };
    let err_thread = {
        let mut se = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut se, &mut s).ok();
            s
        })
    };
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > timeout {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_thread.join().unwrap();
    let mut stderr = err_thread.join().unwrap();
    if status.is_none() {
        stderr.push_str(&format!("\n[test fixture: killed after {timeout:?}]"));
    }
    Run {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    }
}

/// A fresh database in a temporary directory.
pub struct Db {
    /// Keeps the folder alive.
    pub tmp: tempfile::TempDir,
    /// The database directory.
    pub path: PathBuf,
}

impl Db {
    /// `balsam init` in a new temporary folder.
    pub fn new() -> Db {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("test-db");
        let out = run_cmd(
            {
                let mut c = Command::new(balsam_bin());
                c.arg("init").arg(&path).env_remove("BALSAM_DB_PATH");
                c
            },
            TIMEOUT,
            None,
        );
        out.ok();
        Db { tmp, path }
    }

    /// A `balsam` command against this database.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(balsam_bin());
        c.args(args)
            .env("BALSAM_DB_PATH", &self.path)
            .current_dir(self.tmp.path());
        c
    }

    /// Runs `balsam ARGS`.
    pub fn run(&self, args: &[&str]) -> Run {
        run_cmd(self.cmd(args), TIMEOUT, None)
    }

    /// Runs `balsam ARGS` with standard input.
    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> Run {
        run_cmd(self.cmd(args), TIMEOUT, Some(stdin))
    }

    /// Registers the talk's `say-hello` application.
    pub fn hello_app(&self) {
        self.run(&["app", "--name", "say-hello", "--executable", "echo Hello,"])
            .ok();
    }

    /// Adds a job and returns its id (parsed from `ls --json`).
    pub fn add_job(&self, name: &str, wf: &str, app: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "job",
            "--name",
            name,
            "--workflow",
            wf,
            "--app",
            app,
            "--yes",
        ];
        args.extend_from_slice(extra);
        self.run(&args).ok();
        self.job_id(name)
    }

    /// The id of the (one) job with this exact name.
    pub fn job_id(&self, name: &str) -> String {
        let jobs = self.jobs_json(&["--name", name]);
        let matches: Vec<_> = jobs.iter().filter(|j| j["name"] == name).collect();
        assert_eq!(matches.len(), 1, "one job named {name}");
        matches[0]["job_id"].as_str().unwrap().to_string()
    }

    /// `balsam ls --json ARGS`, parsed.
    pub fn jobs_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["ls", "--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        serde_json::from_str(out.ok()).unwrap_or_else(|e| panic!("ls --json: {e}: {}", out.stdout))
    }

    /// The state of the job with this name.
    pub fn state_of(&self, name: &str) -> String {
        let jobs = self.jobs_json(&["--name", name]);
        jobs.iter().find(|j| j["name"] == name).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
