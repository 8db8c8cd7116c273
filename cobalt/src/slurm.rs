//! Slurm.
//!
//! Submit: `sbatch --parsable -J NAME -N NODES -t MINUTES [-p QUEUE] [-A PROJECT] --chdir DIR
//! -o DIR/NAME.out [flags] SCRIPT`; `--parsable` prints `id` or `id;cluster`.
//! Status: `squeue --json -u USER`. Slurm 22.05 (openapi v0.0.38) prints plain numbers and a state
//! string (`"node_count": 2`, `"job_state": "RUNNING"`); later releases wrap numbers as
//! `{"set": true, "infinite": false, "number": 2}` and give the state as a list
//! (`["PENDING", "REQUEUED"]`). Both are read. When `--json` is not understood (Slurm before
//! 21.08) or prints something unreadable, the text form `squeue -h -o '%i|%T|%D|%l|%L|%P|%a|%j'`
//! is used instead. Cancel: `scancel ID`.
//!
//! Node lists are expanded by [`crate::nodelist::expand_hostlist`]; [`scontrol_hostnames`] asks
//! Slurm itself, for the rare expression the parser refuses.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::exec::{program_or, Run};
use crate::scheduler::{
    ceil_minutes, parse_duration_secs, BatchJobState, BatchJobStatus, Scheduler, SchedulerConfig,
    SchedulerKind, SubmitRequest, CANCEL_EXE_SETTING, STATUS_EXE_SETTING, SUBMIT_EXE_SETTING,
};

/// The `squeue -o` format of the text fallback. The job name goes last because it may contain
/// the separator.
pub const SQUEUE_TEXT_FORMAT: &str = "%i|%T|%D|%l|%L|%P|%a|%j";

/// Slurm through `sbatch`, `squeue` and `scancel`.
#[derive(Debug, Clone)]
pub struct SlurmScheduler {
    config: SchedulerConfig,
}

impl SlurmScheduler {
    /// An adapter for this configuration.
    pub fn new(config: SchedulerConfig) -> Self {
        SlurmScheduler { config }
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    fn status_text(&self, exe: &Path) -> Result<Vec<BatchJobStatus>> {
        Run::new(exe, STATUS_EXE_SETTING, self.timeout())
            .args(["-h", "-u", &self.config.user, "-o", SQUEUE_TEXT_FORMAT])
            .status(parse_squeue_text, usize::MAX)
    }
}

impl Scheduler for SlurmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Slurm
    }

    fn submit(&self, req: &SubmitRequest) -> Result<String> {
        req.validate(false)?;
        let exe = program_or(&self.config.submit_exe, "sbatch");
        Run::new(&exe, SUBMIT_EXE_SETTING, self.timeout())
            .args(submit_args(req))
            .submit(
                parse_submit_output,
                "no job id in what sbatch --parsable printed",
            )
    }

    fn status(&self) -> Result<Vec<BatchJobStatus>> {
        let exe = program_or(&self.config.status_exe, "squeue");
        let run = Run::new(&exe, STATUS_EXE_SETTING, self.timeout()).args([
            "--json",
            "-u",
            &self.config.user,
        ]);
        match run.output() {
            Ok(out) => match parse_squeue_json(&out.stdout, now_epoch()) {
                Ok(jobs) => Ok(jobs),
                Err(problem) => {
                    tracing::warn!(
                        "cannot read `{}` ({problem}); falling back to squeue's text output",
                        run.display()
                    );
                    self.status_text(&exe)
                }
            },
            Err(Error::ProgramFailed { ref stderr, .. }) if json_unsupported(stderr) => {
                tracing::info!("squeue does not support --json; using its text output");
                self.status_text(&exe)
            }
            Err(e) => Err(e),
        }
    }

    fn cancel(&self, scheduler_id: &str) -> Result<()> {
        let exe = program_or(&self.config.cancel_exe, "scancel");
        Run::new(&exe, CANCEL_EXE_SETTING, self.timeout())
            .arg(scheduler_id)
            .output()?;
        Ok(())
    }
}

/// squeue's complaint when it predates `--json` (or was built without JSON support).
fn json_unsupported(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("json") || s.contains("unrecognized option") || s.contains("invalid option")
}

fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sbatch arguments for a request (without the program).
pub fn submit_args(req: &SubmitRequest) -> Vec<String> {
    let mut a = vec![
        "--parsable".to_string(),
        "-J".into(),
        req.job_name.clone(),
        "-N".into(),
        req.nodes.to_string(),
        "-t".into(),
        req.wall_minutes.to_string(),
    ];
    if !req.queue.trim().is_empty() {
        a.extend(["-p".into(), req.queue.clone()]);
    }
    if let Some(p) = req.project() {
        a.extend(["-A".into(), p.to_string()]);
    }
    a.extend([
        "--chdir".into(),
        req.cwd.display().to_string(),
        "-o".into(),
        req.cwd
            .join(format!("{}.out", req.job_name))
            .display()
            .to_string(),
    ]);
    a.extend(req.sched_flags.iter().cloned());
    a.push(req.script.display().to_string());
    a
}

/// The job id in `sbatch --parsable` output: `id` or `id;cluster` on the last non-empty line
/// (also `Submitted batch job ID`, for wrappers that drop `--parsable`).
pub fn parse_submit_output(stdout: &str) -> Option<String> {
    let is_id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let id = line.trim().split(';').next()?.trim();
    if is_id(id) {
        return Some(id.to_string());
    }
    // Without --parsable (a wrapper may drop it): "Submitted batch job 12".
    line.split_whitespace()
        .last()
        .filter(|w| is_id(w))
        .map(str::to_string)
}

/// Parses `squeue --json` (Slurm 22.05 and later shapes); `now` (Unix seconds) gives running jobs'
/// remaining time from their end time.
pub fn parse_squeue_json(text: &str, now: u64) -> std::result::Result<Vec<BatchJobStatus>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let jobs = doc
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or("no \"jobs\" list in the JSON")?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id = match job.get("job_id") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => number(v)
                .map(|n| n.to_string())
                .ok_or_else(|| format!("job_id {v} is not a number"))?,
            None => return Err("a job has no job_id".into()),
        };
        let raw_state = match job.get("job_state") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(states)) => states
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        let state = normalise_state(raw_state.split(',').next().unwrap_or(""));
        let end_time = job.get("end_time").and_then(number).filter(|&t| t > 0);
        let text = |k: &str| {
            job.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        out.push(BatchJobStatus {
            scheduler_id: id,
            nodes: job.get("node_count").and_then(number).map(|n| n as usize),
            wall_minutes: job.get("time_limit").and_then(number),
            time_remaining_minutes: match (&state, end_time) {
                (BatchJobState::Running, Some(end)) => Some(end.saturating_sub(now) / 60),
                _ => None,
            },
            state,
            raw_state,
            queue: text("partition"),
            project: text("account"),
            name: text("name"),
        });
    }
    Ok(out)
}

/// A Slurm number: plain, or `{"set": true, "infinite": false, "number": N}` (None when unset or
/// infinite).
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse().ok(),
        Value::Object(o) => {
            let set = o.get("set").and_then(Value::as_bool).unwrap_or(true);
            let infinite = o.get("infinite").and_then(Value::as_bool).unwrap_or(false);
            if !set || infinite {
                None
            } else {
                o.get("number").and_then(number)
            }
        }
        _ => None,
    }
}

/// Parses `squeue -h -o '%i|%T|%D|%l|%L|%P|%a|%j'`.
pub fn parse_squeue_text(text: &str) -> std::result::Result<Vec<BatchJobStatus>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.splitn(8, '|').collect();
        if f.len() < 8 {
            return Err(format!(
                "line {line:?} does not have the 8 fields of {SQUEUE_TEXT_FORMAT}"
            ));
        }
        let state = normalise_state(f[1]);
        let null = |s: &str| {
            let s = s.trim();
            if s == "(null)" {
                String::new()
            } else {
                s.to_string()
            }
        };
        out.push(BatchJobStatus {
            scheduler_id: f[0].trim().to_string(),
            raw_state: f[1].trim().to_string(),
            nodes: f[2].trim().parse().ok(),
            wall_minutes: parse_duration_secs(f[3]).map(ceil_minutes),
            time_remaining_minutes: if state == BatchJobState::Running {
                parse_duration_secs(f[4]).map(|s| s / 60)
            } else {
                None
            },
            state,
            queue: null(f[5]),
            project: null(f[6]),
            name: f[7].to_string(),
        });
    }
    Ok(out)
}

/// Maps Slurm's job states (long names, and the compact codes of `%t`).
fn normalise_state(raw: &str) -> BatchJobState {
    let s = raw.trim().to_ascii_uppercase();
    match s.as_str() {
        "PENDING" | "PD" | "REQUEUED" | "RQ" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
        | "RD" => BatchJobState::Queued,
        // CONFIGURING: nodes allocated, booting; the job has started as far as queues go.
        "RUNNING" | "R" | "CONFIGURING" | "CF" | "RESIZING" | "RS" | "SIGNALING" | "SI" => {
            BatchJobState::Running
        }
        "COMPLETING" | "CG" | "STAGE_OUT" | "SO" => BatchJobState::Exiting,
        "COMPLETED" | "CD" | "CANCELLED" | "CA" | "FAILED" | "F" | "TIMEOUT" | "TO"
        | "NODE_FAIL" | "NF" | "PREEMPTED" | "PR" | "BOOT_FAIL" | "BF" | "DEADLINE" | "DL"
        | "OUT_OF_MEMORY" | "OOM" | "SPECIAL_EXIT" | "SE" | "REVOKED" | "RV" => {
            BatchJobState::Finished
        }
        _ => BatchJobState::Other(raw.trim().to_string()),
    }
}

/// Minutes left in a Slurm job, from `squeue -h -j ID -o %L`. Slurm 22.05 does not export
/// `SLURM_JOB_END_TIME`, so a launcher inside a job can ask this instead. None for jobs without a
/// limit (`UNLIMITED`) or no longer listed.
pub fn time_left_minutes(squeue: &Path, job_id: &str, timeout: Duration) -> Result<Option<u64>> {
    let out = Run::new(squeue, STATUS_EXE_SETTING, timeout)
        .args(["-h", "-j", job_id, "-o", "%L"])
        .output()?;
    Ok(out
        .stdout
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .and_then(parse_duration_secs)
        .map(|s| s / 60))
}

/// Expands a hostlist with `scontrol show hostnames LIST` (for expressions
/// [`crate::nodelist::expand_hostlist`] refuses).
pub fn scontrol_hostnames(
    scontrol: &Path,
    hostlist: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    let out = Run::new(scontrol, "SLURM_SCONTROL_EXE", timeout)
        .args(["show", "hostnames", hostlist])
        .output()?;
    Ok(out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Expands a Slurm node list with the built-in parser, falling back to `scontrol` if given.
pub fn expand_nodelist(
    hostlist: &str,
    scontrol: Option<&Path>,
    timeout: Duration,
) -> Result<Vec<String>> {
    match crate::nodelist::expand_hostlist(hostlist) {
        Ok(hosts) => Ok(hosts),
        Err(parse_err) => match scontrol {
            Some(exe) => {
                let hosts = scontrol_hostnames(exe, hostlist, timeout)?;
                if hosts.is_empty() {
                    Err(parse_err)
                } else {
                    Ok(hosts)
                }
            }
            None => Err(parse_err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Real output of `squeue --json -u root` from Slurm 22.05.8 (Debian 12): two running jobs and
    /// one pending.
    const JSON_2205: &str = include_str!("../testdata/squeue-22.05.json");
    /// The shape of Slurm 23.11+/24.x: wrapped numbers, state lists, an infinite time limit.
    const JSON_24: &str = include_str!("../testdata/squeue-24.json");
    /// Real output of `squeue -h -u root -o '%i|%T|%D|%l|%L|%P|%a|%j'` (22.05.8); one job name
    /// contains '|'.
    const TEXT_2205: &str = include_str!("../testdata/squeue-22.05.txt");

    #[test]
    fn parses_2205_json() {
        // end_time of job 1 is 1795644722; 150 s before it, 2 whole minutes remain.
        let jobs = parse_squeue_json(JSON_2205, 1795644722 - 150).unwrap();
        assert_eq!(jobs.len(), 3);
        let j = &jobs[0];
        assert_eq!(j.scheduler_id, "1");
        assert_eq!(j.state, BatchJobState::Running);
        assert_eq!(j.raw_state, "RUNNING");
        assert_eq!(j.nodes, Some(2));
        assert_eq!(j.wall_minutes, Some(5));
        assert_eq!(j.time_remaining_minutes, Some(2));
        assert_eq!(j.queue, "debug");
        assert_eq!(j.project, "");
        assert_eq!(j.name, "myjob");
        let p = &jobs[2];
        assert_eq!(p.scheduler_id, "3");
        assert_eq!(p.state, BatchJobState::Queued);
        assert_eq!(p.project, "proj1");
        assert_eq!(p.wall_minutes, Some(10));
        assert_eq!(p.time_remaining_minutes, None);
        assert_eq!(p.name, "waiter");
    }

    #[test]
    fn parses_newer_json() {
        let jobs = parse_squeue_json(JSON_24, 1795650000 - 600).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].state, BatchJobState::Running);
        assert_eq!(jobs[0].nodes, Some(4));
        assert_eq!(jobs[0].wall_minutes, Some(30));
        assert_eq!(jobs[0].time_remaining_minutes, Some(10));
        assert_eq!(jobs[1].state, BatchJobState::Queued);
        assert_eq!(jobs[1].raw_state, "PENDING,REQUEUED");
        assert_eq!(jobs[1].wall_minutes, None, "infinite time limit");
        assert_eq!(jobs[1].queue, "batch");
    }

    #[test]
    fn json_errors_say_what_is_missing() {
        assert!(parse_squeue_json("squeue: error", 0)
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_squeue_json("{\"meta\":{}}", 0)
            .unwrap_err()
            .contains("jobs"));
        assert!(parse_squeue_json("{\"jobs\":[]}", 0).unwrap().is_empty());
    }

    #[test]
    fn parses_text_fallback() {
        let jobs = parse_squeue_text(TEXT_2205).unwrap();
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs[0].scheduler_id, "5");
        assert_eq!(jobs[0].state, BatchJobState::Queued);
        assert_eq!(jobs[0].wall_minutes, Some(45));
        assert_eq!(jobs[0].project, "proj1");
        assert_eq!(jobs[0].name, "my job|x");
        assert_eq!(jobs[1].wall_minutes, Some(60));
        assert_eq!(jobs[1].project, "");
        assert_eq!(jobs[2].state, BatchJobState::Running);
        assert_eq!(jobs[2].time_remaining_minutes, Some(9));
        assert_eq!(jobs[2].nodes, Some(2));
        assert!(parse_squeue_text("1|RUNNING").is_err());
        assert!(parse_squeue_text("").unwrap().is_empty());
    }

    #[test]
    fn states() {
        assert_eq!(normalise_state("COMPLETING"), BatchJobState::Exiting);
        assert_eq!(normalise_state("TIMEOUT"), BatchJobState::Finished);
        assert_eq!(normalise_state("CANCELLED"), BatchJobState::Finished);
        assert_eq!(normalise_state("CONFIGURING"), BatchJobState::Running);
        assert_eq!(
            normalise_state("SUSPENDED"),
            BatchJobState::Other("SUSPENDED".into())
        );
    }

    #[test]
    fn submit_output() {
        assert_eq!(parse_submit_output("1234\n"), Some("1234".into()));
        assert_eq!(parse_submit_output("1234;cluster\n"), Some("1234".into()));
        assert_eq!(parse_submit_output(""), None);
        assert_eq!(
            parse_submit_output("Submitted batch job 12\n"),
            Some("12".into())
        );
        assert_eq!(parse_submit_output("sbatch: oops\n"), None);
    }

    #[test]
    fn submit_command_line() {
        let req = SubmitRequest {
            script: PathBuf::from("/db/qsubmit/qlaunch1.sh"),
            cwd: PathBuf::from("/db/qsubmit"),
            job_name: "qlaunch1".into(),
            project: Some("proj".into()),
            queue: "debug".into(),
            nodes: 2,
            wall_minutes: 5,
            sched_flags: vec!["--constraint=knl".into()],
        };
        assert_eq!(
            submit_args(&req).join(" "),
            "--parsable -J qlaunch1 -N 2 -t 5 -p debug -A proj --chdir /db/qsubmit \
             -o /db/qsubmit/qlaunch1.out --constraint=knl /db/qsubmit/qlaunch1.sh"
        );
        let mut r = req.clone();
        r.queue.clear();
        r.project = None;
        let a = submit_args(&r);
        assert!(!a.contains(&"-p".to_string()) && !a.contains(&"-A".to_string()));
    }

    #[test]
    fn nodelist_prefers_parser() {
        // No scontrol given: the parser's answer, or its error.
        assert_eq!(
            expand_nodelist("n[1-2]", None, Duration::from_secs(1)).unwrap(),
            vec!["n1", "n2"]
        );
        assert!(expand_nodelist("n[1-", None, Duration::from_secs(1)).is_err());
        // A stand-in scontrol that echoes fixed names.
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("scontrol");
        std::fs::write(&exe, "#!/bin/sh\necho weird1\necho weird2\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            expand_nodelist("weird{1,2}[", Some(&exe), Duration::from_secs(5)).unwrap(),
            vec!["weird1", "weird2"]
        );
    }

    #[test]
    fn adapter_falls_back_to_text_on_old_slurm() {
        use crate::testutil::{fake_program, request};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let text = d.join("squeue.txt");
        std::fs::write(&text, TEXT_2205).unwrap();
        let mut config = SchedulerConfig::new(SchedulerKind::Slurm, d);
        config.user = "alice".into();
        config.submit_exe = Some(fake_program(
            d,
            "sbatch",
            "printf '%s\\n' \"$@\" > \"$(dirname \"$0\")/sbatch.args\"\necho '77;cluster'",
        ));
        // Slurm 20.11: no --json.
        config.status_exe = Some(fake_program(
            d,
            "squeue",
            &format!(
                "case \"$1\" in --json) echo \"squeue: unrecognized option '--json'\" >&2; exit 1;; esac\n\
                 [ \"$*\" = '-h -u alice -o {SQUEUE_TEXT_FORMAT}' ] || {{ echo \"bad args $*\" >&2; exit 3; }}\n\
                 cat '{}'",
                text.display()
            ),
        ));
        config.cancel_exe = Some(fake_program(d, "scancel", "exit 0"));
        let sched = crate::from_config(&config);
        let req = request(d);
        assert_eq!(sched.submit(&req).unwrap(), "77");
        let args = std::fs::read_to_string(d.join("sbatch.args")).unwrap();
        assert!(
            args.starts_with(
                "--parsable\n-J\nqlaunch1\n-N\n2\n-t\n30\n-p\ndebug\n-A\ndatascience\n"
            ),
            "{args}"
        );
        let jobs = sched.status().unwrap();
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs[0].name, "my job|x");
        sched.cancel("77").unwrap();
    }

    #[test]
    fn time_left() {
        use crate::testutil::fake_program;
        let dir = tempfile::tempdir().unwrap();
        let exe = fake_program(
            dir.path(),
            "squeue",
            "[ \"$*\" = '-h -j 42 -o %L' ] || exit 3\necho '   1:09:59'",
        );
        assert_eq!(
            time_left_minutes(&exe, "42", Duration::from_secs(5)).unwrap(),
            Some(69)
        );
        let exe = fake_program(dir.path(), "squeue2", "echo UNLIMITED");
        assert_eq!(
            time_left_minutes(&exe, "42", Duration::from_secs(5)).unwrap(),
            None
        );
    }

    #[test]
    fn adapter_reads_json_and_reports_real_errors() {
        use crate::testutil::fake_program;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let json = d.join("squeue.json");
        std::fs::write(&json, JSON_2205).unwrap();
        let mut config = SchedulerConfig::new(SchedulerKind::Slurm, d);
        config.status_exe = Some(fake_program(
            d,
            "squeue",
            &format!("cat '{}'", json.display()),
        ));
        let jobs = SlurmScheduler::new(config.clone()).status().unwrap();
        assert_eq!(jobs.len(), 3);
        // A controller that is down is reported, not papered over by the text fallback.
        config.status_exe = Some(fake_program(
            d,
            "squeue-down",
            "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1",
        ));
        let err = SlurmScheduler::new(config).status().unwrap_err();
        assert_eq!(
            err.scheduler_stderr(),
            Some("slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
        );
    }

    /// Runs against a real Slurm when `BALSAM_TEST_SLURM=1` (and SLURM_CONF, if needed, point at
    /// it): submit, see it in status, cancel, see it finish.
    #[test]
    #[ignore = "needs a running Slurm; run with BALSAM_TEST_SLURM=1 cargo test -- --ignored"]
    fn real_slurm_round_trip() {
        if std::env::var("BALSAM_TEST_SLURM").as_deref() != Ok("1") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let script = d.join("job.sh");
        std::fs::write(
            &script,
            "#!/bin/bash\necho \"nodes=$SLURM_JOB_NODELIST\"\nsleep 60\n",
        )
        .unwrap();
        let config = SchedulerConfig::new(SchedulerKind::Slurm, d);
        let sched = crate::from_config(&config);
        let req = SubmitRequest {
            script,
            cwd: d.to_path_buf(),
            job_name: "balsam-test".into(),
            project: None,
            queue: String::new(),
            nodes: 1,
            wall_minutes: 2,
            sched_flags: vec![],
        };
        let id = sched.submit(&req).unwrap();
        let mine = |s: &dyn Scheduler| {
            s.status()
                .unwrap()
                .into_iter()
                .find(|j| j.scheduler_id == id)
        };
        let j = mine(sched.as_ref()).expect("submitted job listed");
        assert_eq!(j.name, "balsam-test");
        assert_eq!(j.wall_minutes, Some(2));
        assert!(j.state.is_active(), "{j:?}");
        let left = time_left_minutes(Path::new("squeue"), &id, Duration::from_secs(10)).unwrap();
        assert!(left.is_some_and(|m| m <= 2), "{left:?}");
        sched.cancel(&id).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match mine(sched.as_ref()) {
                Some(j) if j.state.is_active() => {}
                _ => break,
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job did not leave the queue"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // The shipped template, with /bin/echo standing in for the launcher: one rank per node.
        let vars = crate::TemplateVars {
            project: String::new(),
            queue: String::new(),
            nodes: 2,
            time_minutes: 3,
            job_mode: "serial".into(),
            wf_filter: crate::wf_filter_option("wf1"),
            balsam_bin: "/usr/bin".into(),
            balsam_db_path: d.display().to_string(),
            sched_flags: String::new(),
            launcher_bin: "/bin/echo".into(),
        };
        let text = crate::render_job_template(
            "slurm.tmpl",
            crate::default_template(SchedulerKind::Slurm),
            &vars,
        )
        .unwrap();
        let tmpl_script = d.join("qlaunch2.sh");
        std::fs::write(&tmpl_script, text).unwrap();
        let mut t = req.clone();
        t.script = tmpl_script;
        t.job_name = "qlaunch2".into();
        t.nodes = 2;
        t.wall_minutes = 3;
        let id2 = sched.submit(&t).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let done = sched
                .status()
                .unwrap()
                .into_iter()
                .find(|j| j.scheduler_id == id2)
                .is_none_or(|j| j.state == BatchJobState::Finished);
            if done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "template job did not finish"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = std::fs::read_to_string(d.join("qlaunch2.out")).unwrap();
        let ranks = out
            .lines()
            .filter(|l| *l == "--job-mode=serial --wf-filter=wf1 --time-limit-minutes=1")
            .count();
        assert_eq!(ranks, 2, "{out}");

        // A bad partition: sbatch's own words come back.
        let mut bad = req.clone();
        bad.queue = "no-such-partition".into();
        let err = sched.submit(&bad).unwrap_err();
        assert!(
            err.scheduler_stderr()
                .unwrap_or("")
                .contains("invalid partition"),
            "{err}"
        );
    }
}
