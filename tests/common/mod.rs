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

/// Whether the suites run against PostgreSQL (BALSAM_TEST_BACKEND=postgres, with the shared
/// test server of BALSAM_TEST_PG_URL that tests/pg/server.sh started) instead of SQLite.
pub fn on_postgres() -> bool {
    std::env::var("BALSAM_TEST_BACKEND").as_deref() == Ok("postgres")
}

/// Creates a database directory at `path` for a test: `balsam init` (SQLite), or on
/// PostgreSQL a database of its own on the shared test server.
pub fn create_db(path: &Path) {
    if !on_postgres() {
        run_cmd(
            {
                let mut c = Command::new(balsam_bin());
                c.arg("init").arg(path).env_remove("BALSAM_DB_PATH");
                c
            },
            TIMEOUT,
            None,
        )
        .ok();
        return;
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let url = std::env::var("BALSAM_TEST_PG_URL")
        .expect("BALSAM_TEST_PG_URL (tests/pg/server.sh start DIR prints it)");
    let (mut info, password) = balsam_store::ServerInfo::from_url(&url).unwrap();
    info.dbname = format!(
        "t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        balsam_store::now_us() % 1_000_000_000
    );
    balsam_store::Store::create_on_server(path, &info, password.as_deref())
        .unwrap_or_else(|e| panic!("creating a test database on {url}: {e}"));
}

impl Db {
    /// A new database in a new temporary folder (see [`create_db`]).
    pub fn new() -> Db {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("test-db");
        create_db(&path);
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

/// A file's text; the test fails naming the file when it cannot be read.
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Polls `f` every `every` until it holds or `timeout` passes; false on timeout.
pub fn wait_for(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Sets keys of the database's settings.json.
pub fn set_settings(db: &Db, pairs: &[(&str, serde_json::Value)]) {
    let p = db.path.join("settings.json");
    let mut v: serde_json::Value = serde_json::from_str(&read(&p)).unwrap();
    for (k, val) in pairs {
        v[*k] = val.clone();
    }
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The job with this exact name, as `ls --json` prints it.
pub fn job(db: &Db, name: &str) -> serde_json::Value {
    db.jobs_json(&["--name", name])
        .into_iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name}"))
}

/// `balsam ls --history --name NAME`.
pub fn history(db: &Db, name: &str) -> String {
    db.run(&["ls", "--history", "--name", name])
        .ok()
        .to_string()
}

/// A long-running `balsam` command (the service) in the background, in its own process group,
/// with stdout and stderr in a file; its group is killed if the test ends while it runs.
pub struct Daemon {
    child: Option<std::process::Child>,
    output: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output in `output`.
    pub fn start(mut cmd: Command, output: PathBuf) -> Daemon {
        use std::os::unix::process::CommandExt;
        let f = std::fs::File::create(&output).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .process_group(0);
        Daemon {
            child: Some(cmd.spawn().expect("start the background command")),
            output,
        }
    }

    /// Its pid (and process group).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("still running").id() as i32
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends `sig` and waits up to `timeout` for the exit; the exit code (None: killed by a
    /// signal, or still running at the timeout, then killed) and how long it took.
    pub fn stop(&mut self, sig: i32, timeout: Duration) -> (Option<i32>, Duration) {
        let mut child = self.child.take().expect("still running");
        // SAFETY: a signal to the child this test started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st.code(), t.elapsed());
            }
            if t.elapsed() > timeout {
                // SAFETY: its own process group, started by this test.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return (None, t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: its own process group, started by this test.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

/// Pids of `root` and all its descendants (from /proc).
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(k) = children.get(&out[i]) {
            out.extend(k);
        }
        i += 1;
    }
    out
}

/// Stops a tree top-down first (so no parent restarts what dies), then sends `sig` to it all.
pub fn kill_tree(root: i32, sig: i32) {
    let pids = process_tree(root);
    for p in &pids {
        // SAFETY: signals processes of the test's own tree.
        unsafe { libc::kill(*p, libc::SIGSTOP) };
    }
    for p in process_tree(root).into_iter().chain(pids) {
        // SAFETY: as above.
        unsafe { libc::kill(p, sig) };
    }
}

/// Whether a process runs (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .map(|(_, r)| r.starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Waits for `f`, polling every 50 ms; fails the test naming `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    assert!(
        wait_for(timeout, Duration::from_millis(50), f),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// A program (a launcher) running in the background with its output in a log file, in a process
/// group of its own; its whole process tree is killed if the test ends while it runs.
pub struct Background {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Background {
    /// Starts `cmd` with stdout and stderr to `log`.
    pub fn start(mut cmd: Command, log: PathBuf) -> Background {
        use std::os::unix::process::CommandExt;
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null())
            .process_group(0);
        Background {
            child: Some(cmd.spawn().expect("start a background program")),
            log,
        }
    }

    /// Its pid (it must still run).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Waits for it to exit by itself; kills it after `timeout`. Returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if t.elapsed() > timeout {
                kill_tree(child.id() as i32, libc::SIGKILL);
                let _ = child.wait();
                panic!("still running after {timeout:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it exited; its exit code then.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let st = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(st.code())
    }

    /// kill -9 of it and everything it started.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Bound of one launcher run in the end-to-end suites.
pub const LAUNCHER_TIMEOUT: Duration = Duration::from_secs(150);

/// A program of `tests/fixtures/apps`, by file name.
pub fn fixture_app(name: &str) -> String {
    repo_root()
        .join("tests/fixtures/apps")
        .join(name)
        .display()
        .to_string()
}

/// When a test's launcher leaves once it is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleExit {
    /// The launcher's default rules (it leaves when nothing more can arrive).
    Default,
    /// `--idle-exit-seconds 1` on top.
    AfterOneSecond,
}

/// `balsam launcher --num-workers N --consume-all` with `idle`, plus `extra`, bounded by
/// MPIEXEC_TIMEOUT below [`LAUNCHER_TIMEOUT`].
pub fn launcher_cmd(db: &Db, workers: u32, idle: IdleExit, extra: &[&str]) -> Command {
    sibling_bin("balsam-mpi-launcher");
    let n = workers.to_string();
    let mut c = db.cmd(&["launcher", "--num-workers", &n, "--consume-all"]);
    if idle == IdleExit::AfterOneSecond {
        c.args(["--idle-exit-seconds", "1"]);
    }
    c.args(extra).env("MPIEXEC_TIMEOUT", "140");
    c
}

/// Runs a launcher command to its end, within [`LAUNCHER_TIMEOUT`].
pub fn run_launcher(cmd: Command) -> Run {
    run_cmd(cmd, LAUNCHER_TIMEOUT, None)
}

/// A launcher command in the background, its output in `NAME.log` of the test's folder.
pub fn background_launcher(db: &Db, cmd: Command, name: &str) -> Background {
    let log = db.tmp.path().join(format!("{name}.log"));
    Background::start(cmd, log)
}

/// Every job's state, by name.
pub fn states(db: &Db) -> std::collections::HashMap<String, String> {
    db.jobs_json(&[])
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap().to_string(),
                j["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The working directory of the (one) job with this name.
pub fn workdir(db: &Db, name: &str) -> PathBuf {
    PathBuf::from(job(db, name)["workdir"].as_str().unwrap())
}
