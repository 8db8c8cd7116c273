//! Launcher jobs in the batch queue end to end: `balsam submit-launch`, `balsam ls queues` and
//! `balsam service` against the Cobalt and PBS fixture schedulers (tests/fixtures: real command
//! lines, real output formats, the submitted script really runs) and the local scheduler.
//!
//! Every test has its own fixture state folder inside its temporary directory; the fixtures'
//! walltimes are shrunk (`*_FIXTURE_SECONDS_PER_MINUTE`). Whatever a test started is stopped
//! when it ends, pass or fail: fixture batch jobs still listed are deleted with the fixture's
//! `qdel` (their supervisors and sessions killed if that does not do), local batch jobs
//! (process groups) and background services are killed by pid.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{read, repo_root, run_cmd, set_settings, wait_for, Daemon, Db, Run, TIMEOUT};
use serde_json::{json, Value};

/// Bound for a launch to run its jobs and finish.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Real seconds per fixture walltime minute: a 5-minute launch may run 60 s. The launcher leaves
/// after a short idle time once the hello jobs are done, long before that.
const SECONDS_PER_MINUTE: &str = "12";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cobalt,
    Pbs,
    Local,
}

/// A database with its batch scheduler: the Cobalt or PBS fixture (with its own state folder),
/// or the local scheduler. Dropping it stops every batch job it may have left running.
struct Site {
    db: Db,
    kind: Kind,
    /// Fixture state folder (Cobalt and PBS).
    state: PathBuf,
    /// Environment of every command (fixture variables, PATH).
    env: Vec<(String, String)>,
}

impl Site {
    fn new(kind: Kind) -> Site {
        let db = Db::new();
        let state = db.tmp.path().join(match kind {
            Kind::Cobalt => "cobalt-state",
            Kind::Pbs => "pbs-state",
            Kind::Local => "unused",
        });
        let path = std::env::var("PATH").unwrap_or_default();
        let mut env: Vec<(String, String)> = Vec::new();
        let prefix = match kind {
            Kind::Cobalt => Some("COBALT"),
            Kind::Pbs => Some("PBS"),
            Kind::Local => None,
        };
        if let Some(p) = prefix {
            env.extend([
                (format!("{p}_FIXTURE_STATE"), state.display().to_string()),
                (
                    format!("{p}_FIXTURE_SECONDS_PER_MINUTE"),
                    SECONDS_PER_MINUTE.into(),
                ),
                (format!("{p}_FIXTURE_START_DELAY"), "0.5".into()),
                (format!("{p}_FIXTURE_EXIT_DELAY"), "0.5".into()),
                (format!("{p}_FIXTURE_KILL_GRACE"), "2".into()),
            ]);
        }
        // The Cobalt template runs `aprun`: the ALPS fixture translates it to mpiexec.
        let path = if kind == Kind::Cobalt {
            format!("{}:{path}", fixture_dir("aprun").display())
        } else {
            path
        };
        env.push(("PATH".into(), path));
        let site = Site {
            db,
            kind,
            state,
            env,
        };
        if let Some(dir) = site.fixture() {
            site.set_settings(&[
                (
                    "SCHEDULER_CLASS",
                    json!(if kind == Kind::Cobalt {
                        "CobaltScheduler"
                    } else {
                        "PBSScheduler"
                    }),
                ),
                ("SCHEDULER_SUBMIT_EXE", json!(dir.join("qsub"))),
                ("SCHEDULER_STATUS_EXE", json!(dir.join("qstat"))),
                ("SCHEDULER_CANCEL_EXE", json!(dir.join("qdel"))),
            ]);
        }
        site
    }

    /// The fixture's folder (qsub, qstat, qdel), for Cobalt and PBS.
    fn fixture(&self) -> Option<PathBuf> {
        match self.kind {
            Kind::Cobalt => Some(fixture_dir("cobalt")),
            Kind::Pbs => Some(fixture_dir("pbs")),
            Kind::Local => None,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.db.cmd(args);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        run_cmd(self.cmd(args), TIMEOUT, None)
    }

    /// One of the fixture's programs, with this site's environment.
    fn fixture_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.fixture().expect("a fixture scheduler").join(program));
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.db.tmp.path());
        c
    }

    fn set_settings(&self, pairs: &[(&str, Value)]) {
        set_settings(&self.db, pairs);
    }

    /// The hello app and `n` jobs `test1..testN` in workflow `test`.
    fn hello_jobs(&self, n: usize) {
        self.db.hello_app();
        for i in 1..=n {
            self.db.add_job(
                &format!("test{i}"),
                "test",
                "say-hello",
                &["--args", &format!("world {i}!")],
            );
        }
    }

    /// `balsam ls queues --json`, parsed.
    fn launches(&self) -> Vec<Value> {
        let out = self.run(&["ls", "queues", "--json"]);
        let text = out.ok();
        match serde_json::from_str(text) {
            Ok(Value::Array(a)) => a,
            other => panic!("ls queues --json: {other:?}: {text}"),
        }
    }

    /// The launch with this id, as `ls queues --json` shows it now.
    fn launch(&self, id: i64) -> Value {
        self.launches()
            .into_iter()
            .find(|l| l["id"] == id)
            .unwrap_or_else(|| panic!("no launch {id}:\n{}", self.diagnostics()))
    }

    /// Waits until the launch is finished; returns the states seen on the way.
    fn wait_launch_finished(&self, id: i64) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let ok = wait_for(LAUNCH_TIMEOUT, POLL, || {
            let s = self.launch(id)["state"].as_str().unwrap().to_string();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            s == "finished"
        });
        assert!(
            ok,
            "launch {id} not finished after {LAUNCH_TIMEOUT:?} (states seen: {seen:?}):\n{}",
            self.diagnostics()
        );
        seen
    }

    /// Waits until every job is JOB_FINISHED.
    fn wait_jobs_finished(&self) {
        let ok = wait_for(LAUNCH_TIMEOUT, POLL, || {
            let jobs = self.db.jobs_json(&[]);
            !jobs.is_empty() && jobs.iter().all(|j| j["state"] == "JOB_FINISHED")
        });
        assert!(
            ok,
            "jobs not all JOB_FINISHED after {LAUNCH_TIMEOUT:?}:\n{}",
            self.diagnostics()
        );
    }

    /// The `qsubmit/qlaunch*.sh` scripts.
    fn scripts(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.db.path.join("qsubmit"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("qlaunch") && n.ends_with(".sh"))
            .collect();
        v.sort();
        v
    }

    /// Ids of the fixture's batch jobs not yet gone (queued, running or exiting).
    fn fixture_jobs(&self) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(self.state.join("jobs")) {
            Ok(d) => d
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// How many batch jobs the fixture ever accepted.
    fn fixture_submissions(&self) -> u64 {
        let counter = if self.kind == Kind::Pbs {
            "next_seq"
        } else {
            "next_jobid"
        };
        std::fs::read_to_string(self.state.join(counter))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0, |n| n - 1)
    }

    /// What a failure message needs: jobs, launches, the batch jobs' output, the service log.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        let by_states = self.run(&["ls", "--by-states"]);
        s += &format!(
            "--- ls --by-states\n{}{}\n",
            by_states.stdout, by_states.stderr
        );
        let q = self.run(&["ls", "queues"]);
        s += &format!("--- ls queues\n{}{}\n", q.stdout, q.stderr);
        if let Ok(d) = std::fs::read_dir(self.db.path.join("qsubmit")) {
            let mut files: Vec<PathBuf> = d.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                s += &format!("--- {}\n{}\n", f.display(), tail.join("\n"));
            }
        }
        let log = self.db.path.join("log/service.log");
        if log.exists() {
            s += &format!("--- service.log\n{}\n", read(&log));
        }
        s += &format!("--- fixture jobs: {:?}\n", self.fixture_jobs());
        s
    }

    /// Stops every batch job left: fixture jobs through qdel (then by pid), local jobs by
    /// process group.
    fn stop_batch_jobs(&self) {
        if self.fixture().is_some() {
            let left = self.fixture_jobs();
            if left.is_empty() {
                return;
            }
            let mut args: Vec<&str> = Vec::new();
            args.extend(left.iter().map(String::as_str));
            let _ = run_cmd(
                self.fixture_cmd("qdel", &args),
                Duration::from_secs(20),
                None,
            );
            if wait_for(Duration::from_secs(20), POLL, || {
                self.fixture_jobs().is_empty()
            }) {
                return;
            }
            // The supervisors did not finish: kill them and the jobs' sessions.
            for id in self.fixture_jobs() {
                let text =
                    std::fs::read_to_string(self.state.join("jobs").join(&id)).unwrap_or_default();
                for key in ["J_PGID", "J_SUPERVISOR"] {
                    let pid = text
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{key}=")))
                        .and_then(|v| v.trim().parse::<i32>().ok());
                    if let Some(pid) = pid.filter(|p| *p > 1) {
                        // SAFETY: plain signals to processes this test's fixture started.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        } else {
            for pid in self.local_jobs() {
                kill_group(pid);
            }
        }
    }

    /// Pids of the local scheduler's jobs that still lead their process group.
    fn local_jobs(&self) -> Vec<i32> {
        let path = self.db.path.join("qsubmit/local-jobs.json");
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v["jobs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["pid"].as_i64())
                    .map(|p| p as i32)
                    .filter(|p| group_leader_alive(*p))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop_batch_jobs();
    }
}

/// `balsam service ARGS` in the background (see [`Daemon`]).
fn start_service(site: &Site, args: &[&str]) -> Daemon {
    let mut a = vec!["service"];
    a.extend_from_slice(args);
    Daemon::start(site.cmd(&a), site.db.tmp.path().join("service.out"))
}

fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// How often the tests here poll for a condition.
const POLL: Duration = Duration::from_millis(100);

/// Whether `pid` is alive (not a zombie) and leads its own process group.
fn group_leader_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(2) == Some(&pid.to_string().as_str())
}

/// SIGTERM to a process group this test started, SIGKILL after 3 s.
fn kill_group(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: signals to a process group this test started.
    unsafe { libc::kill(-pid, libc::SIGTERM) };
    if !wait_for(Duration::from_secs(3), POLL, || !group_leader_alive(pid)) {
        // SAFETY: as above.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// The value printed for `key` in a `Qlaunch { ... }` block.
fn qlaunch_field<'a>(text: &'a str, key: &str) -> &'a str {
    let tag = format!("'{key}': ");
    let start = text
        .find(&tag)
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        + tag.len();
    let rest = &text[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// Asserts `want` appear in `text` in this order.
#[track_caller]
fn assert_in_order(text: &str, want: &[&str]) {
    let mut at = 0;
    for w in want {
        match text[at..].find(w) {
            Some(i) => at += i + w.len(),
            None => panic!("{w:?} missing (or out of order) in:\n{text}"),
        }
    }
}

#[test]
fn cobalt_submit_launch_as_in_the_talk() {
    let site = Site::new(Kind::Cobalt);
    site.hello_jobs(10);
    let out = site.run(&[
        "submit-launch",
        "-n",
        "2",
        "-t",
        "5",
        "-q",
        "debug-cache-quad",
        "-A",
        "SDL_Workshop",
        "-q",
        "training",
        "--job-mode=serial",
    ]);
    let text = out.ok().to_string();

    // The talk's block, with this database's script and the id Cobalt gave.
    let command = qlaunch_field(&text, "command")
        .trim_matches('\'')
        .to_string();
    let sid = qlaunch_field(&text, "scheduler_id").to_string();
    assert!(
        !sid.is_empty() && sid.bytes().all(|b| b.is_ascii_digit()),
        "a Cobalt id prints as a number: {text}"
    );
    let id = qlaunch_field(&text, "id").to_string();
    let expected = format!(
        "Submit OK: Qlaunch {{ 'command': '{command}',\n  'from_balsam': True,\n  'id': {id},\n  \
         'job_mode': 'serial',\n  'nodes': 2,\n  'prescheduled_only': False,\n  \
         'project': 'SDL_Workshop',\n  'queue': 'training',\n  'scheduler_id': {sid},\n  \
         'state': 'submitted',\n  'wall_minutes': 5,\n  'wf_filter': ''}}\n"
    );
    assert_eq!(text, expected);
    let script = site.db.path.join(format!("qsubmit/qlaunch{id}.sh"));
    assert_eq!(
        Path::new(&command).canonicalize().unwrap(),
        script.canonicalize().unwrap()
    );
    let launch_id: i64 = id.parse().unwrap();

    // The rendered script, and the command line the fixture received.
    let s = read(&script);
    for want in [
        "#COBALT -A SDL_Workshop",
        "#COBALT -n 2",
        "#COBALT -q training",
        "#COBALT -t 5",
        "aprun -n 2 -N 1 ",
        "--job-mode=serial",
        "--consume-all",
        "--time-limit-minutes=3",
    ] {
        assert!(s.contains(want), "script lacks {want:?}:\n{s}");
    }
    assert!(!s.contains("debug-cache-quad"), "the last -q wins:\n{s}");
    let cobaltlog = site
        .db
        .path
        .join(format!("qsubmit/qlaunch{launch_id}.cobaltlog"));
    let log = read(&cobaltlog);
    assert!(log.starts_with(&format!("Jobid: {sid}\n")), "{log}");
    assert!(
        log.contains("-A SDL_Workshop -n 2 -q training -t 5"),
        "{log}"
    );

    // The launch runs the ten jobs. Its states are watched from the submission on: with
    // nothing left to do, the launcher leaves at once, so the launch may be running only briefly.
    let seen = site.wait_launch_finished(launch_id);
    site.wait_jobs_finished();
    for i in 1..=10 {
        let name = format!("test{i}");
        let j = site
            .db
            .jobs_json(&["--name", &name])
            .into_iter()
            .find(|j| j["name"] == name.as_str())
            .unwrap();
        let wd = PathBuf::from(j["workdir"].as_str().unwrap());
        assert_eq!(
            read(&wd.join(format!("{name}.out"))),
            format!("Hello, world {i}!\n")
        );
    }
    assert!(
        seen.iter().any(|s| s == "running"),
        "the refresh saw the launch run: {seen:?}"
    );
    let table = site.run(&["ls", "queues"]).ok().to_string();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(sid.as_str()))
        .unwrap_or_else(|| panic!("no row for {sid}:\n{table}"));
    for want in ["training", "SDL_Workshop", "serial", "finished"] {
        assert!(row.contains(want), "{want:?} not in {row:?}");
    }
    // Cobalt saw the script end by itself, not at the walltime.
    let log = read(&cobaltlog);
    assert!(
        log.contains("task completed normally with an exit code of 0"),
        "{log}"
    );
    let history = site
        .run(&["ls", "--name", "test5", "--history"])
        .ok()
        .to_string();
    assert_in_order(
        &history,
        &["CREATED", "RUNNING", "RUN_DONE", "JOB_FINISHED"],
    );
    assert!(site.fixture_jobs().is_empty());
}

#[test]
fn cobalt_refusals_leave_nothing_behind() {
    let site = Site::new(Kind::Cobalt);
    site.hello_jobs(2);
    let nothing_left = |what: &str| {
        assert!(site.launches().is_empty(), "{what}: a launch was recorded");
        assert!(
            site.scripts().is_empty(),
            "{what}: scripts left: {:?}",
            site.scripts()
        );
        assert_eq!(
            site.fixture_submissions(),
            0,
            "{what}: the fixture got a job"
        );
    };

    // A queue Cobalt does not have: its words, verbatim.
    let out = site.run(&[
        "submit-launch",
        "-n",
        "2",
        "-t",
        "5",
        "-q",
        "xyz",
        "-A",
        "SDL_Workshop",
    ]);
    let err = out.err();
    assert!(err.contains("Queue 'xyz' does not exist"), "{err}");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    nothing_left("bad queue");

    // A workflow filter that matches no job.
    let out = site.run(&[
        "submit-launch",
        "-n",
        "1",
        "-t",
        "5",
        "-q",
        "training",
        "--wf-filter",
        "nosuchflow",
    ]);
    let err = out.err();
    assert!(err.contains("nosuchflow"), "{err}");
    nothing_left("wf filter");

    // A scheduler class that does not exist.
    site.set_settings(&[("SCHEDULER_CLASS", json!("LSFScheduler"))]);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "5", "-q", "training"]);
    let err = out.err();
    assert!(
        err.contains("SCHEDULER_CLASS") && err.contains("LSFScheduler"),
        "{err}"
    );
    nothing_left("scheduler class");
    site.set_settings(&[("SCHEDULER_CLASS", json!("CobaltScheduler"))]);

    // A JOB_TEMPLATE that is not there.
    let missing = site.db.tmp.path().join("no-such.tmpl");
    site.set_settings(&[("JOB_TEMPLATE", json!(missing))]);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "5", "-q", "training"]);
    let err = out.err();
    assert!(
        err.contains("JOB_TEMPLATE") && err.contains(&missing.display().to_string()),
        "{err}"
    );
    nothing_left("missing template");

    // A template with a syntax error: the file and the line.
    std::fs::write(
        site.db.path.join("broken.tmpl"),
        "#!/bin/bash\n#COBALT -n {{ nodes }}\necho {{ nodes \n",
    )
    .unwrap();
    site.set_settings(&[("JOB_TEMPLATE", json!("broken.tmpl"))]);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "5", "-q", "training"]);
    let err = out.err();
    assert!(err.contains("broken.tmpl:"), "names the file: {err}");
    assert!(err.contains("syntax error"), "{err}");
    nothing_left("broken template");

    // With the settings repaired the same database submits.
    site.set_settings(&[("JOB_TEMPLATE", json!(""))]);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "5", "-q", "training"]);
    assert!(
        out.ok().starts_with("Submit OK: Qlaunch {"),
        "{}",
        out.stdout
    );
    assert_eq!(site.launches().len(), 1);
    assert_eq!(site.fixture_submissions(), 1);
    site.wait_jobs_finished();
    let id = site.launches()[0]["id"].as_i64().unwrap();
    site.wait_launch_finished(id);
}

#[test]
fn user_job_template_renders_and_runs() {
    let site = Site::new(Kind::Cobalt);
    std::fs::create_dir_all(site.db.path.join("templates")).unwrap();
    std::fs::write(
        site.db.path.join("templates/user.tmpl"),
        "#!/bin/bash\n\
         #COBALT -A {{ project }}\n\
         #COBALT -n {{ nodes }}\n\
         #COBALT -t {{ time_minutes }}\n\
         # stop at {{ time_minutes-2 }} minutes\n\
         echo \"rendered project={{ project }} nodes={{ nodes }} queue={{ queue }} \
         stop={{ time_minutes-2 }} mode={{ job_mode }}\"\n\
         echo \"cobalt size=$COBALT_PARTSIZE queue=$COBALT_QUEUE project=$COBALT_PROJECT\"\n\
         {{ balsam_bin }}/balsam launcher --{{ wf_filter }} --job-mode={{ job_mode }} \
         --time-limit-minutes={{ time_minutes-2 }}\n",
    )
    .unwrap();
    let bin = common::balsam_bin();
    // A relative JOB_TEMPLATE is taken from the database directory.
    site.set_settings(&[("JOB_TEMPLATE", json!("templates/user.tmpl"))]);
    let out = site.run(&[
        "submit-launch",
        "-n",
        "3",
        "-t",
        "10",
        "-q",
        "debug-flat-quad",
        "-A",
        "myproj",
        "--job-mode",
        "mpi",
    ]);
    let text = out.ok().to_string();
    let id: i64 = qlaunch_field(&text, "id").parse().unwrap();
    let script = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.sh")));
    assert_eq!(
        script,
        "#!/bin/bash\n\
         #COBALT -A myproj\n\
         #COBALT -n 3\n\
         #COBALT -t 10\n\
         # stop at 8 minutes\n\
         echo \"rendered project=myproj nodes=3 queue=debug-flat-quad stop=8 mode=mpi\"\n\
         echo \"cobalt size=$COBALT_PARTSIZE queue=$COBALT_QUEUE project=$COBALT_PROJECT\"\n"
            .to_string()
            + &format!(
                "{} launcher --consume-all --job-mode=mpi --time-limit-minutes=8\n",
                bin.display()
            )
    );
    // Cobalt ran it with what was asked.
    site.wait_launch_finished(id);
    let output = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.output")));
    assert_eq!(
        output,
        "rendered project=myproj nodes=3 queue=debug-flat-quad stop=8 mode=mpi\n\
         cobalt size=3 queue=debug-flat-quad project=myproj\n"
    );

    // Without -A, DEFAULT_PROJECT is charged.
    site.set_settings(&[("DEFAULT_PROJECT", json!("defproj"))]);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "4", "-q", "training"]);
    let text = out.ok().to_string();
    assert_eq!(qlaunch_field(&text, "project"), "'defproj'");
    let id2: i64 = qlaunch_field(&text, "id").parse().unwrap();
    assert_ne!(id, id2);
    let script = read(&site.db.path.join(format!("qsubmit/qlaunch{id2}.sh")));
    assert!(script.contains("#COBALT -A defproj\n"), "{script}");
    assert!(script.contains("# stop at 2 minutes\n"), "{script}");
    site.wait_launch_finished(id2);
    let output = read(&site.db.path.join(format!("qsubmit/qlaunch{id2}.output")));
    assert!(
        output.contains("cobalt size=1 queue=training project=defproj"),
        "{output}"
    );
    assert!(site.fixture_jobs().is_empty());
}

#[test]
fn pbs_submit_launch_runs_the_jobs() {
    let site = Site::new(Kind::Pbs);
    site.hello_jobs(4);

    // A queue PBS does not have: its words, verbatim; nothing recorded.
    let out = site.run(&[
        "submit-launch",
        "-n",
        "2",
        "-t",
        "5",
        "-q",
        "nosuchq",
        "-A",
        "proj",
    ]);
    let err = out.err();
    assert!(err.contains("qsub: Unknown queue"), "{err}");
    assert!(site.launches().is_empty());
    assert!(site.scripts().is_empty(), "{:?}", site.scripts());
    assert_eq!(site.fixture_submissions(), 0);

    let out = site.run(&[
        "submit-launch",
        "-n",
        "2",
        "-t",
        "5",
        "-q",
        "debug",
        "-A",
        "proj",
        "--job-mode",
        "serial",
    ]);
    let text = out.ok().to_string();
    assert!(text.starts_with("Submit OK: Qlaunch {"), "{text}");
    for want in [
        "'queue': 'debug'",
        "'project': 'proj'",
        "'nodes': 2",
        "'state': 'submitted'",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    let sid = qlaunch_field(&text, "scheduler_id")
        .trim_matches('\'')
        .to_string();
    let (seq, server) = sid
        .split_once('.')
        .unwrap_or_else(|| panic!("a PBS id: {sid}"));
    assert!(seq.bytes().all(|b| b.is_ascii_digit()), "{sid}");
    assert_eq!(server, "pbsfixture");
    let id: i64 = qlaunch_field(&text, "id").parse().unwrap();
    let script = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.sh")));
    for want in [
        "#PBS -l select=2\n",
        "#PBS -q debug\n",
        "#PBS -A proj\n",
        "#PBS -l walltime=00:05:00\n",
        "mpiexec -n 2 -ppn 1 --hostfile $PBS_NODEFILE ",
        "--job-mode=serial",
    ] {
        assert!(script.contains(want), "script lacks {want:?}:\n{script}");
    }

    let table = site.run(&["ls", "queues"]).ok().to_string();
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(sid.as_str())),
        "{sid} not in:\n{table}"
    );
    // Watched from the submission on, as above.
    let seen = site.wait_launch_finished(id);
    site.wait_jobs_finished();
    assert!(seen.iter().any(|s| s == "running"), "{seen:?}");
    let table = site.run(&["ls", "queues"]).ok().to_string();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(sid.as_str()))
        .unwrap_or_else(|| panic!("no row for {sid}:\n{table}"));
    assert!(row.contains("finished") && row.contains("debug"), "{row}");

    // PBS's own record: the script ended by itself with status 0.
    let q = run_cmd(
        site.fixture_cmd("qstat", &["-x", "-f", "-F", "json", &sid]),
        TIMEOUT,
        None,
    );
    let doc: Value = serde_json::from_str(q.ok()).unwrap();
    let job = &doc["Jobs"][&sid];
    assert_eq!(job["job_state"], "F", "{job}");
    assert_eq!(job["Exit_status"], 0, "{job}");
    assert_eq!(job["Account_Name"], "proj", "{job}");
    assert!(site.fixture_jobs().is_empty());
}

#[test]
fn local_submit_launch_runs_the_jobs() {
    let site = Site::new(Kind::Local);
    site.hello_jobs(3);
    let out = site.run(&["submit-launch", "-n", "1", "-t", "5"]);
    let text = out.ok().to_string();
    assert!(text.starts_with("Submit OK: Qlaunch {"), "{text}");
    assert!(text.contains("'state': 'submitted'"), "{text}");
    let pid = qlaunch_field(&text, "scheduler_id").to_string();
    assert!(
        pid.parse::<i32>().is_ok(),
        "the local job id is a pid: {text}"
    );
    let id: i64 = qlaunch_field(&text, "id").parse().unwrap();
    let script = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.sh")));
    assert!(script.contains("mpiexec -n 2 "), "{script}");
    site.wait_jobs_finished();
    site.wait_launch_finished(id);
    assert!(
        !group_leader_alive(pid.parse().unwrap()),
        "the local job is gone"
    );
    let launches = site.launches();
    assert_eq!(launches.len(), 1, "{launches:?}");
    assert_eq!(launches[0]["scheduler_id"], pid.as_str());
}

#[test]
fn local_service_submits_runs_and_stops() {
    let site = Site::new(Kind::Local);
    site.hello_jobs(4);
    let log = site.db.path.join("log/service.log");
    let mut svc = start_service(&site, &["--period", "1"]);
    // Until the service has seen its launch end, only the service refreshes the launches (`ls
    // queues` would too, and the service would then not see the transitions).
    site.wait_jobs_finished();
    assert!(svc.running(), "service died:\n{}", svc.output());
    let text = read(&log);
    let (id, sid) = text
        .lines()
        .find_map(|l| {
            let rest = l.split_once("submitted launch ")?.1;
            let (id, rest) = rest.split_once(" as local job ")?;
            let pid = rest.split(':').next()?;
            Some((id.parse::<i64>().ok()?, pid.to_string()))
        })
        .unwrap_or_else(|| panic!("no submission in the log:\n{text}"));
    assert!(
        wait_for(LAUNCH_TIMEOUT, POLL, || read(&log)
            .contains(&format!("launch {id}: running -> finished"))),
        "the service did not see launch {id} finish:\n{}",
        site.diagnostics()
    );
    let text = read(&log);
    assert_in_order(
        &text,
        &[
            "decision: 4 runnable jobs need 4 node-minutes",
            "submitting",
            &format!("submitted launch {id} as local job {sid}"),
            &format!("launch {id}: submitted -> running"),
            &format!("launch {id}: running -> finished"),
        ],
    );

    let launches = site.launches();
    assert_eq!(launches.len(), 1, "{launches:?}\n{text}");
    let l = &launches[0];
    assert_eq!(l["id"], id);
    assert_eq!(l["scheduler_id"], sid.as_str());
    assert_eq!(l["from_balsam"], true);
    assert_eq!(l["queue"], "local");
    assert_eq!(l["state"], "finished");
    let reason = l["reason"].as_str().unwrap();
    assert!(
        !reason.is_empty() && reason.contains("submitting"),
        "{reason}"
    );
    assert!(
        !group_leader_alive(sid.parse().unwrap()),
        "the local job is gone"
    );

    // With no work left, later passes submit nothing more.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(3500) {
        assert_eq!(site.launches().len(), 1, "{}", read(&log));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(svc.running(), "service died:\n{}", svc.output());

    // One service per database.
    let second = site.run(&["service", "--once"]);
    let err = second.err();
    assert!(
        err.contains("another balsam service is already running"),
        "{err}"
    );
    assert!(
        err.contains(&svc.pid().to_string()),
        "names the holder: {err}"
    );

    // SIGTERM stops it cleanly and promptly.
    let (code, took) = svc.stop(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", svc.output());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(read(&log).contains("service stopped"));
    // The lock went with it: a new pass runs.
    let again = site.run(&["service", "--once"]);
    again.ok();
    assert_eq!(site.launches().len(), 1);
}

#[test]
fn local_service_once_on_an_empty_database() {
    let site = Site::new(Kind::Local);
    let out = site.run(&["service", "--once"]);
    out.ok();
    let log = read(&site.db.path.join("log/service.log"));
    assert!(
        log.contains("decision: no runnable jobs: nothing to submit"),
        "{log}"
    );
    assert!(site.launches().is_empty());
    assert!(site.scripts().is_empty());
    // ls queues shows the service's last decision, with the pid that made it.
    let ls = site.run(&["ls", "queues"]);
    let text = ls.ok();
    assert!(text.contains("No queued launches"), "{text}");
    assert!(
        text.contains("Last service decision (")
            && text.contains("): no runnable jobs: nothing to submit"),
        "{text}"
    );
}

#[test]
fn cobalt_service_follows_the_queue_policy() {
    let site = Site::new(Kind::Cobalt);
    site.hello_jobs(3);
    let policy = site.db.tmp.path().join("policy.ini");
    let write_policy = |submit: &str| {
        std::fs::write(
            &policy,
            format!(
                "[debug-cache-quad]\nsubmit-jobs = {submit}\nmax-queued = 1\npolicy = [\n    \
                 {{\"min-nodes\": 1, \"max-nodes\": 8, \"min-minutes\": 1, \"max-minutes\": 60}}\n  ]\n"
            ),
        )
        .unwrap();
    };
    write_policy("off");
    site.set_settings(&[("QUEUE_POLICY", json!(policy))]);
    let log_path = site.db.path.join("log/service.log");

    // submit-jobs = off: nothing submitted, and the log says why.
    site.run(&["service", "--once"]).ok();
    let log = read(&log_path);
    assert!(
        log.lines()
            .any(|l| l.contains("decision:") && l.contains("debug-cache-quad: submit-jobs is off")),
        "{log}"
    );
    let ls = site.run(&["ls", "queues"]);
    assert!(
        ls.ok().contains("debug-cache-quad: submit-jobs is off"),
        "ls queues does not show the decision:\n{}",
        ls.stdout
    );
    assert!(site.launches().is_empty());
    assert_eq!(site.fixture_submissions(), 0);

    // A batch job of the user's own, submitted by hand, is queued in the only queue.
    let hand = site.db.tmp.path().join("by-hand.sh");
    std::fs::write(&hand, "#!/bin/bash\nsleep 300\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hand, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let q = run_cmd(
        site.fixture_cmd(
            "qsub",
            &[
                "-A",
                "other",
                "-n",
                "1",
                "-q",
                "debug-cache-quad",
                "-t",
                "10",
                hand.to_str().unwrap(),
            ],
        ),
        TIMEOUT,
        None,
    );
    let hand_id = q.ok().trim().to_string();
    assert!(hand_id.bytes().all(|b| b.is_ascii_digit()), "{hand_id}");

    // submit-jobs = on, max-queued = 1: the hand job is adopted and takes the place.
    write_policy("on");
    site.run(&["service", "--once"]).ok();
    let launches = site.launches();
    assert_eq!(launches.len(), 1, "{launches:?}\n{}", read(&log_path));
    let adopted = &launches[0];
    assert_eq!(adopted["from_balsam"], false);
    assert_eq!(adopted["scheduler_id"], hand_id.as_str());
    assert_eq!(adopted["queue"], "debug-cache-quad");
    assert_eq!(adopted["project"], "other");
    assert!(
        ["queued", "running"].contains(&adopted["state"].as_str().unwrap()),
        "{adopted}"
    );
    let log = read(&log_path);
    assert!(
        log.contains(&format!("adopted cobalt job {hand_id}")),
        "{log}"
    );
    assert!(
        log.lines().any(
            |l| l.contains("decision:") && l.contains("debug-cache-quad: max-queued 1 reached")
        ),
        "{log}"
    );
    assert_eq!(site.fixture_submissions(), 1, "only the hand job");
    let table = site.run(&["ls", "queues"]).ok().to_string();
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(hand_id.as_str())
                && l.contains("not submitted by this database")),
        "{table}"
    );

    // Once it is gone the place is free: one launch, and only one.
    run_cmd(site.fixture_cmd("qdel", &[&hand_id]), TIMEOUT, None).ok();
    assert!(
        wait_for(Duration::from_secs(20), POLL, || site
            .fixture_jobs()
            .is_empty()),
        "the hand job did not go: {:?}",
        site.fixture_jobs()
    );
    site.run(&["service", "--once"]).ok();
    let ours = |site: &Site| -> Vec<Value> {
        site.launches()
            .into_iter()
            .filter(|l| l["from_balsam"] == true)
            .collect()
    };
    let mine = ours(&site);
    assert_eq!(mine.len(), 1, "{mine:?}\n{}", read(&log_path));
    assert_eq!(mine[0]["queue"], "debug-cache-quad");
    assert!(
        mine[0]["reason"].as_str().unwrap().contains("submitting"),
        "{}",
        mine[0]
    );
    let id = mine[0]["id"].as_i64().unwrap();
    site.run(&["service", "--once"]).ok();
    assert_eq!(ours(&site).len(), 1, "{}", read(&log_path));
    assert_eq!(site.fixture_submissions(), 2);
    let adopted = site
        .launches()
        .into_iter()
        .find(|l| l["from_balsam"] == false)
        .unwrap();
    assert_eq!(adopted["state"], "finished", "{adopted}");

    // The service's launch runs the jobs.
    site.wait_jobs_finished();
    site.wait_launch_finished(id);
    assert!(site.fixture_jobs().is_empty());
}

/// The job template on the talk's slide ("The Launcher job template"), as users copied it.
const TALK_TEMPLATE: &str = "#!/bin/bash -x\n\
#COBALT -A {{ project }}\n\
#COBALT -n {{ nodes }}\n\
#COBALT -q {{ queue }}\n\
#COBALT -t {{ time_minutes }}\n\
#COBALT --attrs ssds=required:ssd_size=128\n\
\n\
source balsamactivate {{ balsam_db_path }}\n\
sleep 2\n\
\n\
balsam launcher --{{ wf_filter }} --job-mode={{ job_mode }} --time-limit-minutes={{ time_minutes-2 }}\n\
source balsamdeactivate\n";

/// A Cobalt site whose jobs find `balsam` and the shell helpers on PATH, as the talk's users had.
fn talk_site() -> Site {
    let mut site = Site::new(Kind::Cobalt);
    let bin = common::balsam_bin();
    let scripts = repo_root().join("src/scripts");
    for (k, v) in site.env.iter_mut() {
        if k == "PATH" {
            *v = format!(
                "{}:{}:{v}",
                bin.parent().unwrap().display(),
                scripts.display()
            );
        }
    }
    std::fs::create_dir_all(site.db.path.join("job-templates")).unwrap();
    site
}

#[test]
fn the_talks_job_template_runs_the_jobs_on_the_allocations_nodes() {
    let site = talk_site();
    std::fs::write(
        site.db
            .path
            .join("job-templates/theta.cobaltscheduler.tmpl"),
        TALK_TEMPLATE,
    )
    .unwrap();
    site.set_settings(&[(
        "JOB_TEMPLATE",
        json!("job-templates/theta.cobaltscheduler.tmpl"),
    )]);
    site.hello_jobs(4);
    site.db
        .add_job("other", "other-wf", "say-hello", &["--args", "other"]);

    // wf_filter renders as legacy did: consume-all, or wf-filter=NAME.
    let out = site.run(&[
        "submit-launch",
        "-n",
        "2",
        "-t",
        "5",
        "-q",
        "debug-cache-quad",
        "-A",
        "SDL_Workshop",
        "--job-mode=serial",
        "--wf-filter",
        "test",
    ]);
    let text = out.ok().to_string();
    assert!(text.starts_with("Submit OK: Qlaunch {"), "{text}");
    let id: i64 = qlaunch_field(&text, "id").parse().unwrap();
    let script = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.sh")));
    assert!(
        script.contains(
            "\nbalsam launcher --wf-filter=test --job-mode=serial --time-limit-minutes=3\n"
        ),
        "{script}"
    );

    // `balsam launcher` in the batch job starts one launcher rank on each of the allocation's
    // two nodes with aprun, and none on the MOM node; the jobs of the workflow run.
    let ok = wait_for(LAUNCH_TIMEOUT, POLL, || {
        (1..=4).all(|i| site.db.state_of(&format!("test{i}")) == "JOB_FINISHED")
    });
    assert!(
        ok,
        "the talk's template ran nothing:\n{}",
        site.diagnostics()
    );
    site.wait_launch_finished(id);
    assert_eq!(site.db.state_of("other"), "CREATED", "outside the filter");
    let err = read(&site.db.path.join(format!("qsubmit/qlaunch{id}.error")));
    assert!(
        err.contains("balsam launcher: in cobalt batch job ")
            && err.contains("(2 node(s)): one launcher rank per node: ")
            && err.contains("aprun -n 2 -N 1 -cc none "),
        "{err}"
    );
    let logs: Vec<String> = std::fs::read_dir(site.db.path.join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("launcher-") && !n.contains(".rank"))
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let log = read(&site.db.path.join("log").join(&logs[0]));
    assert!(log.contains(": 2 ranks, job mode serial"), "{log}");
}

#[test]
fn a_template_that_starts_no_launcher_is_refused_before_submitting() {
    let site = talk_site();
    site.hello_jobs(1);
    let refused = |template: &str, want: &str| {
        std::fs::write(site.db.path.join("job-templates/mine.tmpl"), template).unwrap();
        site.set_settings(&[("JOB_TEMPLATE", json!("job-templates/mine.tmpl"))]);
        let out = site.run(&[
            "submit-launch",
            "-n",
            "2",
            "-t",
            "5",
            "-q",
            "debug-cache-quad",
            "-A",
            "SDL_Workshop",
        ]);
        let err = out.err();
        let path = site.db.path.join("job-templates/mine.tmpl");
        assert!(
            err.starts_with(&format!(
                "balsam: error: the launcher job was not submitted (cobalt); nothing was \
                 recorded: the job template {} does not start a launcher: {want}",
                path.display()
            )),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(site.launches().is_empty(), "a launch was recorded");
        assert!(site.scripts().is_empty(), "{:?}", site.scripts());
        assert_eq!(site.fixture_submissions(), 0, "the fixture got a job");
    };
    // The talk's line with a misspelt option.
    refused(
        &TALK_TEMPLATE.replace("--time-limit-minutes=", "--time-limit="),
        "line 11 `balsam launcher --consume-all --job-mode=mixed --time-limit=3`: unexpected \
         argument '--time-limit' found",
    );
    // The launcher's job mode misspelt.
    refused(
        "#!/bin/bash\n{{ launcher_bin }} --job-mode=sreial --{{ wf_filter }}\n",
        "line 2 `",
    );
    // No launcher at all.
    refused(
        "#!/bin/bash\necho hello\n",
        "it starts no launcher: no line runs `balsam launcher` or balsam-mpi-launcher, so the \
         batch job would run no jobs",
    );
}

#[test]
fn a_job_too_large_for_every_window_does_not_stop_the_service() {
    let site = Site::new(Kind::Local);
    site.hello_jobs(2);
    // The local policy's window allows 2 nodes: this job fits none.
    site.db
        .add_job("huge", "test", "say-hello", &["--num-nodes", "600"]);
    site.run(&["service", "--once"]).ok();
    let launches = site.launches();
    assert_eq!(
        launches.len(),
        1,
        "{launches:?}\n{}",
        read(&site.db.path.join("log/service.log"))
    );
    let reason = launches[0]["reason"].as_str().unwrap().to_string();
    let skip = "skipping 1 job that no policy window can take (1 job of 600 nodes x 1 min; the \
                policy's windows allow at most 2 nodes and 60 min, 2 min of which the launcher \
                keeps free): change that job or the queue policy";
    assert!(reason.contains(skip), "{reason}");
    assert!(
        reason.contains("; submitting 1 nodes x "),
        "sized for the two others: {reason}"
    );
    let table = site.run(&["ls", "queues"]).ok().to_string();
    assert!(table.contains(skip), "{table}");
    assert!(
        table.contains("Last service decision (") && table.contains(skip),
        "{table}"
    );
    site.stop_batch_jobs();
}
