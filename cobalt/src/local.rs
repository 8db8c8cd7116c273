//! The local "scheduler": batch jobs on a workstation or inside an existing allocation.
//!
//! A submitted script runs at once as a background process in its own process group (so
//! `cancel` can signal it and everything it started), with stdout and stderr in
//! `DIR/NAME.out`. The job id is its pid. Because `balsam submit-launch` and `balsam service` are
//! different processes, the jobs are recorded in `STATE_DIR/local-jobs.json` (written atomically,
//! under an flock): pid, the start time the kernel gave the process (so a recycled pid is not
//! mistaken for our job), nodes, minutes, queue. A job is finished when its pid is gone, is a
//! zombie, or belongs to a process that started at another time. Nothing is enforced: no wall
//! time, no node count. The script sees `BALSAM_LOCAL_JOB_ID`, `BALSAM_LOCAL_NODES` and
//! `BALSAM_LOCAL_END_TIME` so the launcher can find its (virtual) allocation.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exec::program_or;
use crate::scheduler::{
    BatchJobState, BatchJobStatus, Scheduler, SchedulerConfig, SchedulerKind, SubmitRequest,
    SUBMIT_EXE_SETTING,
};

/// File name of the record of local jobs, inside the configured state directory.
pub const STATE_FILE: &str = "local-jobs.json";
/// Environment variable with the local job's id (its pid).
pub const ENV_JOB_ID: &str = "BALSAM_LOCAL_JOB_ID";
/// Environment variable with the number of (virtual) nodes the local job asked for.
pub const ENV_NODES: &str = "BALSAM_LOCAL_NODES";
/// Environment variable with the local job's end time (Unix seconds: submission + wall time).
pub const ENV_END_TIME: &str = "BALSAM_LOCAL_END_TIME";

/// Finished jobs stay in the record this long, so that every status reader sees them finish.
const KEEP_FINISHED_SECS: u64 = 24 * 3600;

/// Background processes on this machine.
#[derive(Debug, Clone)]
pub struct LocalScheduler {
    config: SchedulerConfig,
}

/// One recorded local job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LocalJob {
    /// Process id (and job id).
    pid: u32,
    /// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start_ticks: Option<u64>,
    /// Job name.
    name: String,
    /// Queue name given at submission (informational).
    queue: String,
    /// Project given at submission (informational).
    project: String,
    /// Nodes asked for.
    nodes: usize,
    /// Wall time asked for, in minutes.
    wall_minutes: u64,
    /// Submission time, Unix seconds.
    submitted_at: u64,
    /// When `status` first saw it finished, Unix seconds.
    finished_at: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    jobs: Vec<LocalJob>,
}

impl LocalScheduler {
    /// An adapter for this configuration (`config.state_dir` holds the record of jobs).
    pub fn new(config: SchedulerConfig) -> Self {
        LocalScheduler { config }
    }

    fn state_path(&self) -> PathBuf {
        self.config.state_dir.join(STATE_FILE)
    }

    /// Runs `f` on the record of jobs with the lock held, saving what it leaves.
    fn with_state<T>(&self, f: impl FnOnce(&mut StateFile) -> Result<T>) -> Result<T> {
        let dir = &self.config.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join("local-jobs.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        let _guard = Flock::exclusive(&lock).map_err(|e| Error::io(&lock_path, e))?;
        let path = self.state_path();
        let mut state = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{e}; delete the file if no local batch jobs are running"),
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let result = f(&mut state)?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp{}", std::process::id()));
        let text = serde_json::to_string_pretty(&state).unwrap_or_else(|_| "{\"jobs\":[]}".into());
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(result)
    }
}

impl Scheduler for LocalScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Local
    }

    fn submit(&self, req: &SubmitRequest) -> Result<String> {
        req.validate(false)?;
        let out_path = req.cwd.join(format!("{}.out", req.job_name));
        let now = unix_now();
        let end = now + req.wall_minutes * 60;

        // An executable script runs as itself (its #! line decides); otherwise with bash (or
        // SCHEDULER_SUBMIT_EXE), which is what the shipped templates are written for.
        let executable = std::fs::metadata(&req.script)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if !executable {
            let shell = program_or(&self.config.submit_exe, "bash");
            let found = find_program(&shell).ok_or_else(|| Error::ProgramNotFound {
                program: shell.clone(),
                setting: SUBMIT_EXE_SETTING,
            })?;
            argv.push(found.into_os_string());
        }
        argv.push(req.script.clone().into_os_string());

        let out = File::create(&out_path).map_err(|e| Error::io(&out_path, e))?;
        let err = out.try_clone().map_err(|e| Error::io(&out_path, e))?;
        // The pid is only known after the spawn, so a tiny sh wrapper exports it and then execs
        // the script: exec keeps the pid, so the job id, the process and the group are one.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("{ENV_JOB_ID}=$$; export {ENV_JOB_ID}; exec \"$@\""))
            .arg("balsam-local-job")
            .args(&argv)
            .current_dir(&req.cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(ENV_NODES, req.nodes.to_string())
            .env(ENV_END_TIME, end.to_string())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| Error::Spawn {
            program: req.script.clone(),
            setting: SUBMIT_EXE_SETTING,
            source: e,
        })?;
        let pid = child.id();
        let start_ticks = proc_start_ticks(pid);
        // Reap it when it ends, so a long-lived caller (the service) does not collect zombies.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let job = LocalJob {
            pid,
            start_ticks,
            name: req.job_name.clone(),
            queue: req.queue.clone(),
            project: req.project().unwrap_or("").to_string(),
            nodes: req.nodes,
            wall_minutes: req.wall_minutes,
            submitted_at: now,
            finished_at: None,
        };
        self.with_state(|s| {
            s.jobs.retain(|j| j.pid != pid);
            s.jobs.push(job);
            Ok(())
        })?;
        Ok(pid.to_string())
    }

    fn status(&self) -> Result<Vec<BatchJobStatus>> {
        let now = unix_now();
        self.with_state(|s| {
            for j in &mut s.jobs {
                if j.finished_at.is_none() && !is_alive(j.pid, j.start_ticks) {
                    j.finished_at = Some(now);
                }
            }
            s.jobs.retain(|j| {
                j.finished_at
                    .is_none_or(|t| now.saturating_sub(t) < KEEP_FINISHED_SECS)
            });
            Ok(s.jobs
                .iter()
                .map(|j| {
                    let running = j.finished_at.is_none();
                    let elapsed_min = now.saturating_sub(j.submitted_at) / 60;
                    BatchJobStatus {
                        scheduler_id: j.pid.to_string(),
                        state: if running {
                            BatchJobState::Running
                        } else {
                            BatchJobState::Finished
                        },
                        raw_state: if running { "running" } else { "finished" }.into(),
                        nodes: Some(j.nodes),
                        wall_minutes: Some(j.wall_minutes),
                        time_remaining_minutes: running
                            .then(|| j.wall_minutes.saturating_sub(elapsed_min)),
                        queue: j.queue.clone(),
                        project: j.project.clone(),
                        name: j.name.clone(),
                    }
                })
                .collect())
        })
    }

    fn cancel(&self, scheduler_id: &str) -> Result<()> {
        let pid: u32 = scheduler_id
            .trim()
            .parse()
            .map_err(|_| Error::UnknownLocalJob(scheduler_id.to_string()))?;
        let job = self.with_state(|s| Ok(s.jobs.iter().find(|j| j.pid == pid).cloned()))?;
        let Some(job) = job else {
            return Err(Error::UnknownLocalJob(scheduler_id.to_string()));
        };
        if job.finished_at.is_some() || !is_alive(job.pid, job.start_ticks) {
            return Ok(());
        }
        // SAFETY: a plain syscall; the group is the one the job leads (process_group(0)), and
        // is_alive just checked that the pid is still our process.
        let rc = unsafe { libc::killpg(pid as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(Error::io(format!("process group {pid}"), e));
            }
        }
        Ok(())
    }
}

/// The program's path: as given when it contains a '/', else the first match on PATH.
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// True when `pid` exists, is not a zombie and (when known) started at `start_ticks`.
fn is_alive(pid: u32, start_ticks: Option<u64>) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match proc_stat(pid) {
        Some((state, ticks)) => {
            state != 'Z' && state != 'X' && start_ticks.is_none_or(|t| t == ticks)
        }
        // No /proc (not Linux): trust kill(2).
        None => !Path::new("/proc/self/stat").exists(),
    }
}

/// Field 22 of /proc/PID/stat: the start time in clock ticks since boot.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// (state, start time) from /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last ')'.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> Option<(char, u64)> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')' the fields are 3 (state), 4, ..., so field N is fields[N - 3].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// An exclusive flock held until dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a File) -> std::io::Result<Self> {
        loop {
            // SAFETY: flock on a descriptor we own for the guard's lifetime.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Flock(file));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor locked in `exclusive`.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn setup(script: &str) -> (tempfile::TempDir, LocalScheduler, SubmitRequest) {
        let dir = tempfile::tempdir().unwrap();
        let script_path = dir.path().join("job.sh");
        std::fs::write(&script_path, script).unwrap();
        let config = SchedulerConfig::new(SchedulerKind::Local, dir.path().join("qsubmit"));
        let req = SubmitRequest {
            script: script_path,
            cwd: dir.path().to_path_buf(),
            job_name: "qlaunch1".into(),
            project: None,
            queue: "local".into(),
            nodes: 3,
            wall_minutes: 10,
            sched_flags: vec![],
        };
        (dir, LocalScheduler::new(config), req)
    }

    fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        false
    }

    #[test]
    fn runs_script_and_reports_finish() {
        let (dir, sched, req) = setup(
            "echo \"job=$BALSAM_LOCAL_JOB_ID nodes=$BALSAM_LOCAL_NODES pid=$$\"\necho err >&2\n",
        );
        let id = sched.submit(&req).unwrap();
        let out = dir.path().join("qlaunch1.out");
        assert!(wait_for(|| {
            sched.status().unwrap()[0].state == BatchJobState::Finished
        }));
        let text = std::fs::read_to_string(out).unwrap();
        assert!(
            text.contains(&format!("job={id} nodes=3 pid={id}")),
            "{text}"
        );
        assert!(text.contains("err"), "{text}");
        let st = sched.status().unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].scheduler_id, id);
        assert_eq!(st[0].nodes, Some(3));
        assert_eq!(st[0].queue, "local");
        assert_eq!(st[0].time_remaining_minutes, None);
    }

    #[test]
    fn status_across_instances_and_cancel_kills_the_group() {
        let (dir, sched, req) = setup("sleep 60 &\nsleep 60\n");
        let id = sched.submit(&req).unwrap();
        // A second adapter (as in another balsam process) sees the job.
        let other = LocalScheduler::new(sched.config.clone());
        let st = other.status().unwrap();
        assert_eq!(st[0].scheduler_id, id);
        assert_eq!(st[0].state, BatchJobState::Running);
        assert_eq!(st[0].time_remaining_minutes, Some(10));
        assert_eq!(st[0].wall_minutes, Some(10));
        other.cancel(&id).unwrap();
        assert!(wait_for(|| {
            other.status().unwrap()[0].state == BatchJobState::Finished
        }));
        // The background sleep was in the group and got SIGTERM too: nothing holds the out file.
        let pid: i32 = id.parse().unwrap();
        // SAFETY: signal 0 probes the group.
        assert!(wait_for(|| unsafe { libc::killpg(pid, 0) } != 0));
        // Cancelling a finished job is fine; an unknown one is an error naming it.
        other.cancel(&id).unwrap();
        let err = other.cancel("999999999").unwrap_err().to_string();
        assert!(err.contains("999999999"), "{err}");
        drop(dir);
    }

    #[test]
    fn executable_script_runs_directly() {
        let (dir, sched, req) = setup("#!/bin/sh\necho direct $0\n");
        std::fs::set_permissions(&req.script, std::fs::Permissions::from_mode(0o755)).unwrap();
        sched.submit(&req).unwrap();
        assert!(wait_for(|| {
            sched.status().unwrap()[0].state == BatchJobState::Finished
        }));
        let text = std::fs::read_to_string(dir.path().join("qlaunch1.out")).unwrap();
        assert!(text.contains("direct"), "{text}");
    }

    #[test]
    fn missing_shell_names_the_setting() {
        let (_dir, sched, req) = setup("echo hi\n");
        let mut config = sched.config.clone();
        config.submit_exe = Some("/nonexistent/bash".into());
        let err = LocalScheduler::new(config).submit(&req).unwrap_err();
        assert!(matches!(err, Error::ProgramNotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/bash") && msg.contains("SCHEDULER_SUBMIT_EXE"),
            "{msg}"
        );
    }

    #[test]
    fn recycled_pid_is_finished() {
        // Our own pid with a wrong start time is not "our" job.
        let me = std::process::id();
        let ticks = proc_start_ticks(me).unwrap();
        assert!(is_alive(me, Some(ticks)));
        assert!(!is_alive(me, Some(ticks + 1)));
        assert!(!is_alive(u32::MAX / 2, None));
    }

    #[test]
    fn proc_stat_with_odd_command_name() {
        let line = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 0";
        assert_eq!(parse_proc_stat(line), Some(('S', 987654)));
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    /// The shipped local template, submitted for real: mpiexec starts nodes + 1 ranks of the
    /// "launcher" (here /bin/echo). Skipped when MPICH's mpiexec is not installed.
    #[test]
    fn local_template_end_to_end() {
        if find_program(Path::new("mpiexec")).is_none() {
            eprintln!("mpiexec not found; skipping");
            return;
        }
        let vars = crate::TemplateVars {
            project: String::new(),
            queue: "local".into(),
            nodes: 2,
            time_minutes: 5,
            job_mode: "serial".into(),
            wf_filter: crate::wf_filter_option(""),
            balsam_bin: "/usr/bin".into(),
            balsam_db_path: "/tmp/db".into(),
            sched_flags: String::new(),
            launcher_bin: "/bin/echo".into(),
        };
        let script = crate::render_job_template(
            "local.tmpl",
            crate::default_template(SchedulerKind::Local),
            &vars,
        )
        .unwrap();
        let (dir, sched, mut req) = setup(&script);
        req.nodes = 2;
        req.wall_minutes = 5;
        sched.submit(&req).unwrap();
        assert!(wait_for(|| {
            sched.status().unwrap()[0].state == BatchJobState::Finished
        }));
        let out = std::fs::read_to_string(dir.path().join("qlaunch1.out")).unwrap();
        let ranks = out
            .lines()
            .filter(|l| l.starts_with("--job-mode=serial --consume-all --time-limit-minutes=3"))
            .count();
        assert_eq!(ranks, 3, "{out}");
    }
}
