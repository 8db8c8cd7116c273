//! PBS Professional / OpenPBS (ALCF Polaris).
//!
//! Submit: `qsub -N NAME -l select=NODES -l walltime=HH:MM:00 -q QUEUE -A PROJECT [flags] SCRIPT`,
//! run in the job's directory (PBS has no `--cwd`; the job sees it as `PBS_O_WORKDIR`); qsub
//! prints the id, e.g. `1234.server`.
//! Status: `qstat -f -F json`, filtered to the user's jobs by `Job_Owner` (`user@host`): PBS does
//! not accept `-u` together with `-f`. Some PBS versions print JSON that is not JSON: unescaped
//! backslashes in values (`"PBS_O_PATH":"C:\Program Files"`, `a\_b`), bare `inf`/`nan` (a job
//! named `inf`), raw control characters. These are repaired before parsing, cheaply, in one pass.
//! Cancel: `qdel ID`.

use std::time::Duration;

use serde_json::Value;

use crate::error::Result;
use crate::exec::{program_or, Run};
use crate::scheduler::{
    ceil_minutes, parse_duration_secs, BatchJobState, BatchJobStatus, Scheduler, SchedulerConfig,
    SchedulerKind, SubmitRequest, CANCEL_EXE_SETTING, STATUS_EXE_SETTING, SUBMIT_EXE_SETTING,
};

/// PBS through `qsub`, `qstat` and `qdel`.
#[derive(Debug, Clone)]
pub struct PbsScheduler {
    config: SchedulerConfig,
}

impl PbsScheduler {
    /// An adapter for this configuration.
    pub fn new(config: SchedulerConfig) -> Self {
        PbsScheduler { config }
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }
}

impl Scheduler for PbsScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pbs
    }

    fn submit(&self, req: &SubmitRequest) -> Result<String> {
        req.validate(false)?;
        let exe = program_or(&self.config.submit_exe, "qsub");
        Run::new(&exe, SUBMIT_EXE_SETTING, self.timeout())
            .args(submit_args(req))
            .cwd(&req.cwd)
            .submit(
                parse_submit_output,
                "no job id (like 1234.server) in what qsub printed",
            )
    }

    fn status(&self) -> Result<Vec<BatchJobStatus>> {
        let exe = program_or(&self.config.status_exe, "qstat");
        Run::new(&exe, STATUS_EXE_SETTING, self.timeout())
            .args(["-f", "-F", "json"])
            .status(|out| parse_qstat_json(out, &self.config.user), 2000)
    }

    fn cancel(&self, scheduler_id: &str) -> Result<()> {
        let exe = program_or(&self.config.cancel_exe, "qdel");
        Run::new(&exe, CANCEL_EXE_SETTING, self.timeout())
            .arg(scheduler_id)
            .output()?;
        Ok(())
    }
}

/// `HH:MM:00` for a number of minutes.
pub fn walltime(minutes: u64) -> String {
    format!("{:02}:{:02}:00", minutes / 60, minutes % 60)
}

/// The qsub arguments for a request (without the program; run it in `req.cwd`).
pub fn submit_args(req: &SubmitRequest) -> Vec<String> {
    let mut a = vec![
        "-N".to_string(),
        req.job_name.clone(),
        "-l".into(),
        format!("select={}", req.nodes),
        "-l".into(),
        format!("walltime={}", walltime(req.wall_minutes)),
    ];
    if !req.queue.trim().is_empty() {
        a.extend(["-q".into(), req.queue.clone()]);
    }
    if let Some(p) = req.project() {
        a.extend(["-A".into(), p.to_string()]);
    }
    a.extend(req.sched_flags.iter().cloned());
    a.push(req.script.display().to_string());
    a
}

/// The job id qsub printed: the last non-empty line, which starts with a digit (`1234.server`,
/// `1234[].server` for arrays).
pub fn parse_submit_output(stdout: &str) -> Option<String> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())?;
    line.bytes()
        .next()
        .filter(u8::is_ascii_digit)
        .map(|_| line.to_string())
}

/// Parses `qstat -f -F json`, keeping the jobs whose `Job_Owner` is `user` (`user@host`).
pub fn parse_qstat_json(
    text: &str,
    user: &str,
) -> std::result::Result<Vec<BatchJobStatus>, String> {
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(first) => serde_json::from_str(&repair_json(text))
            .map_err(|_| format!("not JSON, even after repairing PBS's escapes ({first})"))?,
    };
    if !doc.is_object() {
        return Err("the JSON is not an object".into());
    }
    let Some(jobs) = doc.get("Jobs") else {
        // PBS leaves "Jobs" out when there are none.
        return Ok(Vec::new());
    };
    let jobs = jobs.as_object().ok_or("\"Jobs\" is not an object")?;
    let mut out = Vec::new();
    for (id, job) in jobs {
        let owner = text_of(job.get("Job_Owner"));
        if owner.split('@').next() != Some(user) {
            continue;
        }
        let raw_state = text_of(job.get("job_state"));
        let state = normalise_state(&raw_state);
        let limits = job.get("Resource_List");
        let limit = |k: &str| limits.and_then(|l| l.get(k));
        let wall_secs = parse_duration_secs(&text_of(limit("walltime")));
        let used_secs = job
            .get("resources_used")
            .and_then(|u| u.get("walltime"))
            .and_then(|w| parse_duration_secs(&text_of(Some(w))));
        let nodes = limit("nodect")
            .and_then(|v| text_of(Some(v)).parse().ok())
            .or_else(|| select_chunks(&text_of(limit("select"))));
        out.push(BatchJobStatus {
            scheduler_id: id.clone(),
            nodes,
            wall_minutes: wall_secs.map(ceil_minutes),
            time_remaining_minutes: match (&state, wall_secs) {
                (BatchJobState::Running, Some(w)) => {
                    Some(w.saturating_sub(used_secs.unwrap_or(0)) / 60)
                }
                _ => None,
            },
            state,
            raw_state,
            queue: text_of(job.get("queue")),
            project: text_of(job.get("Account_Name")),
            name: text_of(job.get("Job_Name")),
        });
    }
    Ok(out)
}

/// A JSON value as text: strings as they are, numbers and others as printed.
fn text_of(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Node count from a select statement: `2:system=polaris` → 2; `1:ncpus=64+2:ncpus=32` → 3.
fn select_chunks(select: &str) -> Option<usize> {
    if select.trim().is_empty() {
        return None;
    }
    let mut total = 0usize;
    for chunk in select.split('+') {
        let count = chunk.split(':').next().unwrap_or("").trim();
        total += if count.bytes().all(|b| b.is_ascii_digit()) && !count.is_empty() {
            count.parse::<usize>().ok()?
        } else {
            1
        };
    }
    Some(total)
}

/// Maps PBS's one-letter states.
fn normalise_state(raw: &str) -> BatchJobState {
    match raw.trim() {
        // Held, waiting for its start time, or moving between servers: still in the queue.
        "Q" | "H" | "W" | "T" => BatchJobState::Queued,
        "R" | "B" => BatchJobState::Running,
        "E" => BatchJobState::Exiting,
        "F" | "X" => BatchJobState::Finished,
        other => BatchJobState::Other(other.to_string()),
    }
}

/// Repairs what PBS gets wrong in its JSON: backslashes that start no valid escape are doubled;
/// raw control characters in strings are escaped; bare words outside strings other than
/// `true`/`false`/`null` (PBS prints `inf`, `nan`) are quoted.
pub fn repair_json(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    let mut in_string = false;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            match c {
                '"' => {
                    in_string = false;
                    out.push(c);
                }
                '\\' => {
                    let next = chars.get(i + 1).copied();
                    let valid = match next {
                        Some('"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => true,
                        Some('u') => {
                            chars.len() > i + 5
                                && chars[i + 2..i + 6].iter().all(|h| h.is_ascii_hexdigit())
                        }
                        _ => false,
                    };
                    if valid {
                        out.push('\\');
                        out.push(next.unwrap_or('\\'));
                        i += 1;
                    } else {
                        out.push_str("\\\\");
                    }
                }
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
            i += 1;
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            i += 1;
            continue;
        }
        // Numbers pass through whole, so that the exponent of 2.5e3 is not taken for a word.
        if c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        {
            while i < chars.len()
                && (chars[i].is_ascii_digit() || matches!(chars[i], '.' | 'e' | 'E' | '+' | '-'))
            {
                out.push(chars[i]);
                i += 1;
            }
            continue;
        }
        let starts_word = c.is_ascii_alphabetic()
            || (c == '-' && chars.get(i + 1).is_some_and(|n| n.is_ascii_alphabetic()));
        if starts_word {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.' | '-' | '+'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if matches!(word.as_str(), "true" | "false" | "null") {
                out.push_str(&word);
            } else {
                out.push('"');
                out.push_str(&word);
                out.push('"');
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::path::PathBuf;

    /// `qstat -f -F json` as PBS Pro 2022 prints it on Polaris, trimmed, with the invalid JSON
    /// PBS is known to produce (a bare `inf` job name, `\P` and `\_` escapes) and another user's
    /// job.
    const QSTAT: &str = include_str!("../testdata/pbs-qstat-f.json");

    #[test]
    fn fixture_really_is_invalid_json() {
        assert!(serde_json::from_str::<Value>(QSTAT).is_err());
    }

    #[test]
    fn parses_qstat_json() {
        let jobs = parse_qstat_json(QSTAT, "msalim").unwrap();
        assert_eq!(jobs.len(), 3, "{jobs:#?}");
        let r = &jobs[0];
        assert_eq!(r.scheduler_id, "1234.polaris-pbs-01");
        assert_eq!(r.state, BatchJobState::Running);
        assert_eq!(r.raw_state, "R");
        assert_eq!(r.nodes, Some(2));
        assert_eq!(r.wall_minutes, Some(30));
        // 30:00 limit - 1:02 used = 28:58 → 28 whole minutes.
        assert_eq!(r.time_remaining_minutes, Some(28));
        assert_eq!(r.queue, "debug");
        assert_eq!(r.project, "datascience");
        assert_eq!(r.name, "qlaunch1");

        let q = &jobs[1];
        assert_eq!(q.state, BatchJobState::Queued);
        assert_eq!(q.nodes, Some(10), "nodect given as a string");
        assert_eq!(q.wall_minutes, Some(60));
        assert_eq!(q.time_remaining_minutes, None);
        assert_eq!(q.name, "inf");

        let h = &jobs[2];
        assert_eq!(h.state, BatchJobState::Queued);
        assert_eq!(h.raw_state, "H");
        assert_eq!(h.nodes, Some(3), "from the select statement");
        assert_eq!(h.name, "12345");
        assert_eq!(h.project, "");
    }

    #[test]
    fn no_jobs_key_means_no_jobs() {
        let text = r#"{"timestamp":1712311200,"pbs_version":"2022.1.1","pbs_server":"pbs01"}"#;
        assert!(parse_qstat_json(text, "u").unwrap().is_empty());
        assert!(parse_qstat_json("qstat: error", "u").is_err());
    }

    #[test]
    fn repair_keeps_valid_json_and_fixes_pbs_mistakes() {
        let good = r#"{"a":"x\"y\\z\n\u00e9","b":[1,-2.5e3,true,false,null]}"#;
        assert_eq!(repair_json(good), good);
        let bad = "{\"p\":\"C:\\Program\\_x\",\"n\":inf,\"m\":-inf,\"q\":nan,\"t\":\"a\tb\"}";
        let v: Value = serde_json::from_str(&repair_json(bad)).unwrap();
        assert_eq!(v["p"], "C:\\Program\\_x");
        assert_eq!(v["n"], "inf");
        assert_eq!(v["m"], "-inf");
        assert_eq!(v["q"], "nan");
        assert_eq!(v["t"], "a\tb");
    }

    #[test]
    fn submit_output_and_args() {
        assert_eq!(
            parse_submit_output("1234.polaris-pbs-01\n"),
            Some("1234.polaris-pbs-01".into())
        );
        assert_eq!(
            parse_submit_output("qsub: warning\n99.srv\n"),
            Some("99.srv".into())
        );
        assert_eq!(parse_submit_output("qsub: error\n"), None);
        assert_eq!(walltime(5), "00:05:00");
        assert_eq!(walltime(125), "02:05:00");
        assert_eq!(walltime(1440), "24:00:00");
        let req = SubmitRequest {
            script: PathBuf::from("/db/qsubmit/qlaunch1.sh"),
            cwd: PathBuf::from("/db/qsubmit"),
            job_name: "qlaunch1".into(),
            project: Some("datascience".into()),
            queue: "debug".into(),
            nodes: 2,
            wall_minutes: 30,
            sched_flags: vec!["-l".into(), "filesystems=home:eagle".into()],
        };
        assert_eq!(
            submit_args(&req).join(" "),
            "-N qlaunch1 -l select=2 -l walltime=00:30:00 -q debug -A datascience \
             -l filesystems=home:eagle /db/qsubmit/qlaunch1.sh"
        );
    }

    #[test]
    fn states() {
        assert_eq!(normalise_state("E"), BatchJobState::Exiting);
        assert_eq!(normalise_state("F"), BatchJobState::Finished);
        assert_eq!(normalise_state("S"), BatchJobState::Other("S".into()));
    }

    #[test]
    fn adapter_with_stand_in_programs() {
        use crate::testutil::{fake_program, request};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fixture = d.join("qstat.json");
        std::fs::write(&fixture, QSTAT).unwrap();
        let mut config = SchedulerConfig::new(SchedulerKind::Pbs, d);
        config.user = "msalim".into();
        config.submit_exe = Some(fake_program(
            d,
            "qsub",
            "pwd > \"$(dirname \"$0\")/qsub.cwd\"\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/qsub.args\"\necho 1234.polaris-pbs-01",
        ));
        config.status_exe = Some(fake_program(
            d,
            "qstat",
            &format!(
                "[ \"$*\" = '-f -F json' ] || exit 3\ncat '{}'",
                fixture.display()
            ),
        ));
        config.cancel_exe = Some(fake_program(
            d,
            "qdel",
            "echo \"qdel: Unknown Job Id $1\" >&2; exit 35",
        ));
        let sched = crate::from_config(&config);
        let req = request(d);
        assert_eq!(sched.submit(&req).unwrap(), "1234.polaris-pbs-01");
        let cwd = std::fs::read_to_string(d.join("qsub.cwd")).unwrap();
        assert_eq!(
            std::path::Path::new(cwd.trim()).canonicalize().unwrap(),
            d.canonicalize().unwrap()
        );
        let args = std::fs::read_to_string(d.join("qsub.args")).unwrap();
        assert!(
            args.starts_with("-N\nqlaunch1\n-l\nselect=2\n-l\nwalltime=00:30:00\n"),
            "{args}"
        );
        assert_eq!(sched.status().unwrap().len(), 3);
        let err = sched.cancel("9.x").unwrap_err();
        let Error::ProgramFailed { code, stderr, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            (*code, stderr.as_str()),
            (Some(35), "qdel: Unknown Job Id 9.x\n")
        );
    }
}
