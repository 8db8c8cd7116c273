//! Cobalt (ALCF Theta and Cooley).
//!
//! Submit: `qsub --cwd DIR -O NAME -A PROJECT -n NODES -q QUEUE -t MINUTES [flags] SCRIPT`; Cobalt
//! prints the new job id, sometimes after warnings, so the id is the last integer on stdout.
//! Status: `qstat -u USER` with `QSTAT_HEADER` choosing the columns. Cobalt prints a fixed-width
//! table: a header line, a rule line (`=====`, or dashes on some versions), then one left-aligned
//! row per job with two spaces between columns. Columns are cut at the header names' positions
//! rather than split on blanks, because the Command column may contain spaces. Cancel: `qdel ID`.

use std::time::Duration;

use crate::error::Result;
use crate::exec::{program_or, Run};
use crate::scheduler::{
    ceil_minutes, parse_duration_secs, BatchJobState, BatchJobStatus, Scheduler, SchedulerConfig,
    SchedulerKind, SubmitRequest, CANCEL_EXE_SETTING, STATUS_EXE_SETTING, SUBMIT_EXE_SETTING,
};

/// The columns asked of `qstat` through `QSTAT_HEADER`.
pub const QSTAT_HEADER: &str = "JobID:TimeRemaining:WallTime:State:Queue:Nodes:Project:Command";

/// Cobalt through its `qsub`, `qstat` and `qdel` programs.
#[derive(Debug, Clone)]
pub struct CobaltScheduler {
    config: SchedulerConfig,
}

impl CobaltScheduler {
    /// An adapter for this configuration.
    pub fn new(config: SchedulerConfig) -> Self {
        CobaltScheduler { config }
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }
}

impl Scheduler for CobaltScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Cobalt
    }

    fn submit(&self, req: &SubmitRequest) -> Result<String> {
        req.validate(true)?;
        let exe = program_or(&self.config.submit_exe, "qsub");
        Run::new(&exe, SUBMIT_EXE_SETTING, self.timeout())
            .args(submit_args(req))
            .submit(
                parse_submit_output,
                "no job id (an integer) in what qsub printed",
            )
    }

    fn status(&self) -> Result<Vec<BatchJobStatus>> {
        let exe = program_or(&self.config.status_exe, "qstat");
        Run::new(&exe, STATUS_EXE_SETTING, self.timeout())
            .env("QSTAT_HEADER", QSTAT_HEADER)
            .arg("-u")
            .arg(&self.config.user)
            .status(parse_qstat, usize::MAX)
    }

    fn cancel(&self, scheduler_id: &str) -> Result<()> {
        let exe = program_or(&self.config.cancel_exe, "qdel");
        Run::new(&exe, CANCEL_EXE_SETTING, self.timeout())
            .arg(scheduler_id)
            .output()?;
        Ok(())
    }
}

/// The qsub arguments for a request (without the program).
pub fn submit_args(req: &SubmitRequest) -> Vec<String> {
    let mut a = vec![
        "--cwd".to_string(),
        req.cwd.display().to_string(),
        "-O".into(),
        req.job_name.clone(),
    ];
    if let Some(p) = req.project() {
        a.extend(["-A".into(), p.to_string()]);
    }
    a.extend([
        "-n".into(),
        req.nodes.to_string(),
        "-q".into(),
        req.queue.clone(),
        "-t".into(),
        req.wall_minutes.to_string(),
    ]);
    a.extend(req.sched_flags.iter().cloned());
    a.push(req.script.display().to_string());
    a
}

/// The job id in qsub's output: the last word that is an integer (warnings may come first).
pub fn parse_submit_output(stdout: &str) -> Option<String> {
    stdout
        .split_whitespace()
        .rev()
        .find(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
}

/// Parses Cobalt's qstat table (any column order; the columns of [`QSTAT_HEADER`] are used when
/// present). Empty output means no jobs.
pub fn parse_qstat(text: &str) -> std::result::Result<Vec<BatchJobStatus>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let columns = header_columns(header);
    let col = |name: &str| {
        columns
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    let id_col = col("JobID").ok_or_else(|| {
        format!("the header line {header:?} has no JobID column; is QSTAT_HEADER honoured?")
    })?;
    let state_col = col("State");
    let mut jobs = Vec::new();
    for line in lines {
        if is_rule(line) {
            continue;
        }
        let fields = cut_columns(line, &columns);
        let get = |i: Option<usize>| i.and_then(|i| fields.get(i)).cloned().unwrap_or_default();
        let id = get(Some(id_col));
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "row {line:?} has JobID {id:?}, not an integer; the columns do not line up with the header"
            ));
        }
        let raw_state = get(state_col);
        let state = normalise_state(&raw_state);
        let nodes_text = get(col("Nodes"));
        let remaining = parse_duration_secs(&get(col("TimeRemaining"))).map(|s| s / 60);
        jobs.push(BatchJobStatus {
            scheduler_id: id,
            nodes: nodes_text.parse().ok(),
            wall_minutes: parse_duration_secs(&get(col("WallTime"))).map(ceil_minutes),
            time_remaining_minutes: if state == BatchJobState::Running {
                remaining
            } else {
                None
            },
            state,
            raw_state,
            queue: get(col("Queue")),
            project: get(col("Project")),
            name: {
                let c = get(col("Command"));
                if c.is_empty() {
                    get(col("JobName"))
                } else {
                    c
                }
            },
        });
    }
    Ok(jobs)
}

/// Header names with their starting character positions.
fn header_columns(header: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = header.chars().collect();
    let mut cols = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() {
            i += 1;
        }
        cols.push((chars[start..i].iter().collect(), start));
    }
    cols
}

/// The rule under the header: only `=`, `-` and blanks.
fn is_rule(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && t.chars().all(|c| c == '=' || c == '-' || c == ' ')
}

/// Cuts a row at the header positions; the last column takes the rest of the line. A value that
/// overflows into the next column's position (it cannot in Cobalt's own printer, but a wrapper
/// might) is handled by moving the cut to the next blank.
fn cut_columns(line: &str, columns: &[(String, usize)]) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::with_capacity(columns.len());
    let mut pos = 0;
    for (i, (_, start)) in columns.iter().enumerate() {
        let start = (*start).max(pos).min(chars.len());
        let mut end = match columns.get(i + 1) {
            Some((_, next)) => (*next).max(start).min(chars.len()),
            None => chars.len(),
        };
        // Keep a value whole when it runs past the next column's start.
        while end < chars.len()
            && end > start
            && !chars[end - 1].is_whitespace()
            && i + 1 < columns.len()
        {
            end += 1;
        }
        out.push(
            chars[start..end]
                .iter()
                .collect::<String>()
                .trim()
                .to_string(),
        );
        pos = end;
    }
    out
}

/// Maps Cobalt's state words.
fn normalise_state(raw: &str) -> BatchJobState {
    let s = raw.trim().to_ascii_lowercase();
    match s.as_str() {
        "queued" | "hold" | "user_hold" | "admin_hold" | "dep_hold" | "maxrun_hold" => {
            BatchJobState::Queued
        }
        "starting" | "running" => BatchJobState::Running,
        "exiting" | "killing" => BatchJobState::Exiting,
        "done" | "finished" | "completed" => BatchJobState::Finished,
        _ if s.ends_with("_hold") => BatchJobState::Queued,
        _ => BatchJobState::Other(raw.trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::path::PathBuf;

    /// Laid out exactly as Cobalt's `print_tabular` prints (columns padded to the widest value plus
    /// two spaces, trailing blanks kept, a rule of '=' under the header); generated with its
    /// formatting code.
    const QSTAT: &str = include_str!("../testdata/cobalt-qstat.txt");

    #[test]
    fn parses_qstat_table() {
        let jobs = parse_qstat(QSTAT).unwrap();
        assert_eq!(jobs.len(), 4);
        let j = &jobs[0];
        assert_eq!(j.scheduler_id, "278079");
        assert_eq!(j.state, BatchJobState::Running);
        assert_eq!(j.raw_state, "running");
        assert_eq!(j.nodes, Some(2));
        assert_eq!(j.wall_minutes, Some(5));
        assert_eq!(j.time_remaining_minutes, Some(4));
        assert_eq!(j.queue, "debug-cache-quad");
        assert_eq!(j.project, "SDL_Workshop");
        assert_eq!(j.name, "/home/u/db/qsubmit/qlaunch1.sh");

        let q = &jobs[1];
        assert_eq!(q.state, BatchJobState::Queued);
        assert_eq!(q.time_remaining_minutes, None);
        assert_eq!(q.wall_minutes, Some(60));
        assert_eq!(q.name, "/home/u/db/qsubmit/qlaunch 2.sh");

        assert_eq!(jobs[2].state, BatchJobState::Queued);
        assert_eq!(jobs[2].raw_state, "user_hold");
        assert_eq!(jobs[2].queue, "debug-flat-quad");

        assert_eq!(jobs[3].state, BatchJobState::Exiting);
        assert_eq!(jobs[3].wall_minutes, Some(1800));
        assert_eq!(jobs[3].nodes, Some(802));
    }

    #[test]
    fn empty_output_is_no_jobs() {
        assert!(parse_qstat("").unwrap().is_empty());
        assert!(parse_qstat("\n\n").unwrap().is_empty());
        // Header only (some versions print it even with no jobs).
        let header_only = "JobID  State\n=============\n";
        assert!(parse_qstat(header_only).unwrap().is_empty());
    }

    #[test]
    fn dash_rule_and_other_column_order() {
        let text = "\
JobID  State    Nodes  WallTime  Queue
-----  -------  -----  --------  -----
12     running  1      00:10:00  debug
";
        let jobs = parse_qstat(text).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].scheduler_id, "12");
        assert_eq!(jobs[0].nodes, Some(1));
        assert_eq!(jobs[0].queue, "debug");
        assert_eq!(jobs[0].project, "");
        assert_eq!(jobs[0].time_remaining_minutes, None);
    }

    #[test]
    fn unknown_state_is_other() {
        let text = "JobID  State\n=====\n5      dep_fail\n";
        let jobs = parse_qstat(text).unwrap();
        assert_eq!(jobs[0].state, BatchJobState::Other("dep_fail".into()));
    }

    #[test]
    fn misaligned_rows_are_an_error() {
        let text = "JobID  State\n============\nrunning 12\n";
        let err = parse_qstat(text).unwrap_err();
        assert!(err.contains("not an integer"), "{err}");
        let err = parse_qstat("Foo Bar\n1 2\n").unwrap_err();
        assert!(err.contains("no JobID column"), "{err}");
    }

    #[test]
    fn submit_output() {
        assert_eq!(parse_submit_output("278079\n"), Some("278079".into()));
        assert_eq!(
            parse_submit_output(
                "Job routed to queue \"debug-cache-quad\".\nMemory mode set to cache quad for queue debug-cache-quad\n278079\n"
            ),
            Some("278079".into())
        );
        assert_eq!(parse_submit_output("no id here"), None);
    }

    #[test]
    fn submit_command_line() {
        let req = SubmitRequest {
            script: PathBuf::from("/db/qsubmit/qlaunch1.sh"),
            cwd: PathBuf::from("/db/qsubmit"),
            job_name: "qlaunch1".into(),
            project: Some("SDL_Workshop".into()),
            queue: "debug-cache-quad".into(),
            nodes: 2,
            wall_minutes: 5,
            sched_flags: vec!["--attrs".into(), "ssds=required:ssd_size=128".into()],
        };
        assert_eq!(
            submit_args(&req).join(" "),
            "--cwd /db/qsubmit -O qlaunch1 -A SDL_Workshop -n 2 -q debug-cache-quad -t 5 \
             --attrs ssds=required:ssd_size=128 /db/qsubmit/qlaunch1.sh"
        );
        let mut no_project = req.clone();
        no_project.project = None;
        assert!(!submit_args(&no_project).contains(&"-A".to_string()));
    }

    #[test]
    fn adapter_with_stand_in_programs() {
        use crate::testutil::{fake_program, request};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fixture = d.join("qstat.txt");
        std::fs::write(&fixture, QSTAT).unwrap();
        let mut config = SchedulerConfig::new(SchedulerKind::Cobalt, d);
        config.user = "alice".into();
        config.submit_exe = Some(fake_program(
            d,
            "qsub",
            "printf '%s\\n' \"$@\" > \"$(dirname \"$0\")/qsub.args\"\n\
             echo 'Job routed to queue \"debug-cache-quad\".'\necho 278079",
        ));
        config.status_exe = Some(fake_program(
            d,
            "qstat",
            &format!(
                "[ \"$QSTAT_HEADER\" = '{QSTAT_HEADER}' ] || {{ echo \"bad header\" >&2; exit 2; }}\n\
                 [ \"$1 $2\" = '-u alice' ] || {{ echo \"bad args $*\" >&2; exit 3; }}\n\
                 cat '{}'",
                fixture.display()
            ),
        ));
        config.cancel_exe = Some(fake_program(
            d,
            "qdel",
            "echo \"      Failed to remove job $1: job not found\" >&2; exit 1",
        ));
        let sched = crate::from_config(&config);
        assert_eq!(sched.kind(), SchedulerKind::Cobalt);
        let req = request(d);
        assert_eq!(sched.submit(&req).unwrap(), "278079");
        let args = std::fs::read_to_string(d.join("qsub.args")).unwrap();
        let args: Vec<&str> = args.lines().collect();
        assert_eq!(args[..4], ["--cwd", d.to_str().unwrap(), "-O", "qlaunch1"]);
        assert!(args.contains(&"a b"), "{args:?}");
        assert_eq!(args.last(), Some(&req.script.to_str().unwrap()));

        let jobs = sched.status().unwrap();
        assert_eq!(jobs.len(), 4);

        let err = sched.cancel("5").unwrap_err();
        assert_eq!(
            err.scheduler_stderr(),
            Some("      Failed to remove job 5: job not found\n")
        );
    }

    #[test]
    fn refusal_keeps_qsub_words() {
        use crate::testutil::{fake_program, request};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut config = SchedulerConfig::new(SchedulerKind::Cobalt, d);
        config.submit_exe = Some(fake_program(
            d,
            "qsub",
            "echo 'Usage: qsub [options] <executable> [<excutable options>]' >&2\n\
             echo 'Project datascience is not a valid project for user' >&2\nexit 1",
        ));
        let err = CobaltScheduler::new(config)
            .submit(&request(d))
            .unwrap_err();
        let Error::ProgramFailed { code, stderr, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*code, Some(1));
        assert_eq!(
            stderr,
            "Usage: qsub [options] <executable> [<excutable options>]\n\
             Project datascience is not a valid project for user\n"
        );
        assert!(err.to_string().contains("not a valid project"));
        // No job id in the output.
        let mut config = SchedulerConfig::new(SchedulerKind::Cobalt, d);
        config.submit_exe = Some(fake_program(d, "qsub2", "echo submitted"));
        let err = CobaltScheduler::new(config)
            .submit(&request(d))
            .unwrap_err();
        assert!(matches!(err, Error::UnexpectedOutput { .. }), "{err:?}");
        // Missing programs name their settings.
        let mut config = SchedulerConfig::new(SchedulerKind::Cobalt, d);
        config.status_exe = Some(d.join("no-qstat"));
        let msg = CobaltScheduler::new(config)
            .status()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("no-qstat") && msg.contains("SCHEDULER_STATUS_EXE"),
            "{msg}"
        );
    }
}
