//! A database directory with its own PostgreSQL server (`balsam init DIR --postgres`), for the
//! tests of the server's life, its security, outages and many hosts. The server is stopped by
//! the pid in its `postmaster.pid` when the fixture is dropped, also when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{balsam_bin, process_tree, run_cmd, Db, Run, TIMEOUT};

/// How long `balsam init --postgres` may take (initdb and the first start).
pub const INIT_TIMEOUT: Duration = Duration::from_secs(120);

/// A database on its own server.
pub struct PgDb {
    /// The database directory and its commands.
    pub db: Db,
    /// What `balsam init` printed.
    pub init: Run,
}

impl std::ops::Deref for PgDb {
    type Target = Db;
    fn deref(&self) -> &Db {
        &self.db
    }
}

impl PgDb {
    /// `balsam init TMP/test-db --postgres --pg-host 127.0.0.1 EXTRA`.
    pub fn new(extra: &[&str]) -> PgDb {
        let mut args = vec!["--pg-host", "127.0.0.1"];
        args.extend_from_slice(extra);
        PgDb::init_with(&args, |c| c)
    }

    /// `balsam init TMP/test-db --postgres ARGS`, the command passed through `wrap` (to run it
    /// on another host), which must succeed.
    pub fn init_with(args: &[&str], wrap: impl FnOnce(Command) -> Command) -> PgDb {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("test-db");
        let mut c = Command::new(balsam_bin());
        c.arg("init")
            .arg(&path)
            .arg("--postgres")
            .args(args)
            .env_remove("BALSAM_DB_PATH");
        let init = run_cmd(wrap(c), INIT_TIMEOUT, None);
        let pg = PgDb {
            db: Db { tmp, path },
            init,
        };
        pg.init.ok();
        pg
    }

    /// `server-info`, parsed.
    pub fn info(&self) -> serde_json::Value {
        server_info(&self.path)
    }

    /// `host:port` of the server.
    pub fn address(&self) -> String {
        let i = self.info();
        format!("{}:{}", i["host"].as_str().unwrap(), i["port"])
    }

    /// The generated password (the last field of `pgpass`).
    pub fn password(&self) -> String {
        let text = std::fs::read_to_string(self.path.join("pgpass")).unwrap();
        text.trim_end().rsplit(':').next().unwrap().to_string()
    }

    /// The server's data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.path.join(self.info()["data_dir"].as_str().unwrap())
    }

    /// The postmaster's pid, while it runs.
    pub fn postmaster(&self) -> Option<i32> {
        postmaster_pid(&self.data_dir())
    }

    /// Stops the server (by its pid) and waits for it to be gone. Also after a failed init
    /// (no `server-info`): the data folder is `balsamdb`.
    pub fn kill_server(&self) {
        if let Some(pid) = postmaster_pid(&self.path.join("balsamdb")) {
            stop_pid(pid);
        }
    }

    /// `balsam server ACTION` against this database.
    pub fn server(&self, action: &str) -> Run {
        self.run(&["server", action])
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        self.kill_server();
    }
}

/// `DIR/server-info`, parsed.
pub fn server_info(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&crate::common::read(&dir.join("server-info"))).unwrap()
}

/// The pid in `DATA/postmaster.pid`, when that process lives.
pub fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// A live, non-zombie process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z') || r.starts_with('X')),
        Err(_) => false,
    }
}

/// Fast shutdown of a postmaster, then SIGKILL after 30 s.
pub fn stop_pid(pid: i32) {
    // SAFETY: signals a postmaster this test's database started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let t = Instant::now();
    while alive(pid) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The uid a process runs as.
pub fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Whether this test runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` with the default bound.
pub fn run(cmd: Command) -> Run {
    run_cmd(cmd, TIMEOUT, None)
}

/// Kills a `balsam launcher` and everything under it (mpiexec runs in a process group of its
/// own, so killing the launcher's group would leave the ranks running) when dropped, unless
/// disarmed once the launcher has exited by itself.
pub struct TreeGuard {
    pid: Option<i32>,
}

impl TreeGuard {
    /// Guards the tree under `pid`.
    pub fn new(pid: i32) -> TreeGuard {
        TreeGuard { pid: Some(pid) }
    }

    /// The launcher exited by itself: nothing to kill (its pid may be another's by now).
    pub fn disarm(&mut self) {
        self.pid = None;
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        let Some(root) = self.pid else { return };
        let pids = process_tree(root);
        for p in &pids {
            // SAFETY: stops the test's own launcher tree top-down first, so no parent restarts
            // what dies.
            unsafe { libc::kill(*p, libc::SIGSTOP) };
        }
        for p in process_tree(root).into_iter().chain(pids) {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}
