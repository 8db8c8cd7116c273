//! The launcher end to end: `balsam launcher` starts `mpiexec -n N+1 balsam-mpi-launcher` on a
//! fresh database, with real MPI ranks, real job processes and the real CLI inside scripts.
//! Every launcher run is bounded by MPIEXEC_TIMEOUT and the fixture's per-process timeout, and
//! background launchers are killed with their whole process tree when a test ends.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    alive, background_launcher, history, job, process_tree, read, repo_root, run_cmd, run_launcher,
    set_settings, states, wait_until, workdir, Background, Db, IdleExit, Run, LAUNCHER_TIMEOUT,
};
use serde_json::Value;

fn app(name: &str) -> String {
    common::fixture_app(name)
}

/// `balsam launcher --num-workers N --consume-all` with a short idle exit, plus `extra`.
fn launcher_cmd(db: &Db, workers: u32, extra: &[&str]) -> Command {
    common::launcher_cmd(db, workers, IdleExit::AfterOneSecond, extra)
}

fn launcher(db: &Db, workers: u32, extra: &[&str]) -> Run {
    run_launcher(launcher_cmd(db, workers, extra))
}

fn background(db: &Db, workers: u32, extra: &[&str], name: &str) -> Background {
    background_launcher(db, launcher_cmd(db, workers, extra), name)
}

fn jobs(db: &Db) -> Vec<Value> {
    db.jobs_json(&[])
}

#[test]
fn hello_world_and_the_failing_app_as_in_the_talk() {
    let db = Db::new();
    db.hello_app();
    db.run(&["app", "--name", "failer", "--executable", &app("fail.py")])
        .ok();
    for i in 1..=10 {
        db.add_job(
            &format!("test{i}"),
            "test",
            "say-hello",
            &["--args", &format!("world {i}!")],
        );
    }
    db.add_job("testfail", "test", "failer", &[]);
    let run = launcher(&db, 2, &[]);
    run.ok();
    for i in 1..=10 {
        let name = format!("test{i}");
        let j = job(&db, &name);
        assert_eq!(j["state"], "JOB_FINISHED", "{name}: {j}");
        assert_eq!(j["return_code"], 0);
        assert_eq!(
            read(&workdir(&db, &name).join(format!("{name}.out"))),
            format!("Hello, world {i}!\n")
        );
        assert!(
            j["lease_session"].is_null(),
            "a finished job is leased by no one"
        );
    }
    assert_eq!(db.state_of("testfail"), "FAILED");
    assert_eq!(job(&db, "testfail")["return_code"], 1);
    let h = history(&db, "testfail");
    for want in [
        "RUN_ERROR",
        "exit code 1",
        "Traceback (most recent call last)",
        "Hello from rank 1",
        "RuntimeError: simulated error",
        "FAILED",
    ] {
        assert!(h.contains(want), "history lacks {want:?}:\n{h}");
    }
    let ls = db.run(&["ls"]).ok().to_string();
    assert_eq!(ls.matches("JOB_FINISHED").count(), 10, "{ls}");
    // The session's log is in the database directory.
    let logs: Vec<String> = std::fs::read_dir(db.path.join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.starts_with("launcher-") && l.ends_with(".log")),
        "{logs:?}"
    );
}

#[test]
fn the_talks_dag_with_input_files() {
    let db = Db::new();
    let dag = app("dag.sh");
    for step in ["generate", "simulate", "reduce"] {
        db.run(&[
            "app",
            "--name",
            step,
            "--executable",
            &format!("{dag} {step}"),
        ])
        .ok();
    }
    let a = db.add_job("A", "dag", "generate", &[]);
    let mut mids = Vec::new();
    for n in ["B", "C", "D"] {
        mids.push(db.add_job(
            n,
            "dag",
            "simulate",
            &["--args", n, "--input-files", &format!("{n}.inp")],
        ));
    }
    let e = db.add_job("E", "dag", "reduce", &["--input-files", "*.out"]);
    for m in &mids {
        db.run(&["dep", &a, m]).ok();
        db.run(&["dep", m, &e]).ok();
    }
    launcher(&db, 3, &[]).ok();
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    assert_eq!(
        read(&workdir(&db, "E").join("E.out")),
        "simulated input for B\nsimulated input for C\nsimulated input for D\n"
    );
    // B got its own input from A and nothing else, as a copy of its own (a child never changes
    // its parents' files); E got the three results, copied too.
    let b = workdir(&db, "B");
    let b_inp = b.join("B.inp").symlink_metadata().unwrap();
    assert!(b_inp.file_type().is_file(), "{b_inp:?}");
    assert!(!b.join("C.inp").exists());
    std::fs::write(b.join("B.inp"), "written by the child").unwrap();
    assert_ne!(
        read(&workdir(&db, "A").join("B.inp")),
        "written by the child",
        "the parent's file is its own"
    );
    for n in ["B.out", "C.out", "D.out"] {
        let m = workdir(&db, "E").join(n).symlink_metadata().unwrap();
        assert!(m.file_type().is_file(), "{n}: {m:?}");
    }
    let h = history(&db, "E");
    assert!(
        h.contains("AWAITING_PARENTS") && h.contains("copied 3 files from 3 parents"),
        "{h}"
    );
}

#[test]
fn pre_and_postprocess_scripts_and_the_error_handler() {
    let db = Db::new();
    let (pre, post) = (app("pre.sh"), app("post.sh"));
    db.run(&[
        "app",
        "--name",
        "flaky",
        "--executable",
        &app("flaky.sh"),
        "--preprocess",
        &pre,
        "--postprocess",
        &post,
    ])
    .ok();
    db.run(&[
        "app",
        "--name",
        "prefail",
        "--executable",
        "true",
        "--preprocess",
        &pre,
    ])
    .ok();
    db.run(&[
        "app",
        "--name",
        "decider",
        "--executable",
        "true",
        "--postprocess",
        &app("setstate.sh"),
    ])
    .ok();
    db.add_job("handled", "pp", "flaky", &["--post-handle-error"]);
    db.add_job("unhandled", "pp", "flaky", &[]);
    db.add_job("refused", "pp", "prefail", &["--env", "PRE_FAIL=1"]);
    db.add_job("decided", "pp", "decider", &[]);
    launcher(&db, 2, &[]).ok();

    // The handler fixed the job and set it RESTART_READY; the rerun passed; postprocess ran twice.
    let wd = workdir(&db, "handled");
    assert_eq!(db.state_of("handled"), "JOB_FINISHED");
    let id = job(&db, "handled")["job_id"].as_str().unwrap().to_string();
    let post_log = read(&wd.join("post.txt"));
    assert_eq!(
        post_log,
        format!("post error=TRUE timeout= job={id}\npost error= timeout= job={id}\n")
    );
    // Preprocess ran once (restarts do not run it again), in the workdir, with the job's env.
    assert_eq!(
        read(&wd.join("pre.txt")),
        format!("pre job={id} db={}\n", db.path.display())
    );
    assert!(wd.join("postprocess.log").exists() && wd.join("preprocess.log").exists());
    let h = history(&db, "handled");
    for want in [
        "RUN_ERROR",
        "exit code 3",
        "not fixed yet",
        "RESTART_READY",
        "RUN_DONE",
        "JOB_FINISHED",
    ] {
        assert!(h.contains(want), "history lacks {want:?}:\n{h}");
    }
    // No handler: RUN_ERROR then FAILED, and postprocess never ran.
    assert_eq!(db.state_of("unhandled"), "FAILED");
    assert!(!workdir(&db, "unhandled").join("post.txt").exists());
    // A failing preprocess fails the job with its output in the history.
    assert_eq!(db.state_of("refused"), "FAILED");
    let h = history(&db, "refused");
    assert!(
        h.contains("preprocess") && h.contains("exit code 4") && h.contains("preprocess refuses"),
        "{h}"
    );
    assert!(!h.contains("RUNNING"), "{h}");
    // A postprocess script that sets the state itself: that state stands.
    assert_eq!(db.state_of("decided"), "FAILED");
    let h = history(&db, "decided");
    assert!(
        h.contains("User mutated state") && !h.contains("POSTPROCESSED"),
        "{h}"
    );
}

#[test]
fn node_packing_runs_four_at_a_time_on_one_worker() {
    let db = Db::new();
    db.run(&["app", "--name", "record", "--executable", &app("record.sh")])
        .ok();
    let log = db.tmp.path().join("packing.log");
    let logs = log.display().to_string();
    for i in 0..8 {
        let args = format!("{logs} 2 j{i}");
        db.add_job(
            &format!("j{i}"),
            "pack",
            "record",
            &["--node-packing-count", "4", "--args", &args],
        );
    }
    launcher(&db, 1, &[]).ok();
    let text = read(&log);
    let (mut now, mut max, mut starts) = (0, 0, 0);
    for l in text.lines() {
        if l.starts_with("start") {
            now += 1;
            starts += 1;
        } else {
            now -= 1;
        }
        max = max.max(now);
    }
    assert_eq!(starts, 8, "{text}");
    assert_eq!(
        max, 4,
        "four at a time on the one worker, never five:\n{text}"
    );
    assert!(states(&db).values().all(|s| s == "JOB_FINISHED"));
}

#[test]
fn mpi_jobs_through_mpiexec() {
    let db = Db::new();
    db.run(&["app", "--name", "ranks", "--executable", &app("ranks.sh")])
        .ok();
    db.add_job("rpn2", "mpi", "ranks", &["--ranks-per-node", "2"]);
    db.add_job("two-nodes", "mpi", "ranks", &["--num-nodes", "2"]);
    launcher(&db, 2, &[]).ok();
    for name in ["rpn2", "two-nodes"] {
        let out = read(&workdir(&db, name).join(format!("{name}.out")));
        let mut ranks: Vec<&str> = out.lines().filter(|l| l.starts_with("rank")).collect();
        ranks.sort();
        assert_eq!(ranks.len(), 2, "{name}: {out}");
        assert!(
            ranks[0].starts_with("rank 0 of 2") && ranks[1].starts_with("rank 1 of 2"),
            "{name}: {out}"
        );
        assert_eq!(db.state_of(name), "JOB_FINISHED");
    }
    let h = history(&db, "rpn2");
    assert!(h.contains("MPI launch"), "{h}");
}

#[test]
fn mpi_jobs_through_the_aprun_fixture() {
    let db = Db::new();
    set_settings(&db, &[("MPI_LAUNCHER", Value::from("aprun"))]);
    db.run(&["app", "--name", "ranks", "--executable", &app("ranks.sh")])
        .ok();
    db.add_job(
        "theta",
        "mpi",
        "ranks",
        &["--ranks-per-node", "2", "--env", "SITE=theta"],
    );
    let path = format!(
        "{}:{}",
        repo_root().join("tests/fixtures/aprun").display(),
        std::env::var("PATH").unwrap()
    );
    let mut c = launcher_cmd(&db, 1, &[]);
    c.env("PATH", path)
        .env("APRUN_FIXTURE_STATE", db.tmp.path().join("aprun-state"));
    run_cmd(c, LAUNCHER_TIMEOUT, None).ok();
    assert_eq!(
        db.state_of("theta"),
        "JOB_FINISHED",
        "{}",
        history(&db, "theta")
    );
    let out = read(&workdir(&db, "theta").join("theta.out"));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("rank")).count(),
        2,
        "{out}"
    );
    // The first session of a fresh database logs to launcher-1.log.
    let log = read(&db.path.join("log/launcher-1.log"));
    assert!(
        log.contains("aprun -n 2 -N 2 -d 1 -j 1 -cc none -e 'SITE=theta'"),
        "{log}"
    );
}

#[test]
fn killjob_stops_a_running_job_within_seconds() {
    let db = Db::new();
    db.run(&["app", "--name", "sleeper", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log").display().to_string();
    let id = db.add_job(
        "k1",
        "kill",
        "sleeper",
        &["--args", &format!("{log} k1 60")],
    );
    let mut bg = background(&db, 1, &[], "kill");
    let wd = workdir(&db, "k1");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("k1") == "RUNNING" && wd.join("pid").exists()
    });
    assert!(
        !job(&db, "k1")["lease_session"].is_null(),
        "ls shows the session running the job"
    );
    let pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    assert!(alive(pid));
    let t = Instant::now();
    db.run(&["killjob", "--id", &id]).ok();
    wait_until("the job's process to die", Duration::from_secs(10), || {
        !alive(pid)
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(bg.wait(Duration::from_secs(60)), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("k1"), "USER_KILLED");
    let h = history(&db, "k1");
    assert!(
        h.trim_end().lines().last().unwrap().contains("USER_KILLED"),
        "nothing written after the kill:\n{h}"
    );
    assert!(!Path::new(&log).exists(), "the job never finished");
}

#[test]
fn time_limit_then_a_second_launcher_finishes_the_jobs() {
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    db.run(&[
        "app",
        "--name",
        "long-handled",
        "--executable",
        &app("once.sh"),
        "--postprocess",
        &app("post.sh"),
    ])
    .ok();
    let log = db.tmp.path().join("finished.log").display().to_string();
    // Packed two per worker, so all three start at once.
    let w0 = ["--wall-time-minutes", "0", "--node-packing-count", "2"];
    db.add_job(
        "t1",
        "tl",
        "long",
        &[&w0[..], &["--args", &format!("{log} t1 60")]].concat(),
    );
    db.add_job(
        "t2",
        "tl",
        "long-handled",
        &[
            &w0[..],
            &["--args", &format!("{log} t2 60"), "--post-handle-timeout"],
        ]
        .concat(),
    );
    db.add_job(
        "t3",
        "tl",
        "long",
        &[
            &w0[..],
            &[
                "--args",
                &format!("{log} t3 60"),
                "--disable-auto-timeout-retry",
            ],
        ]
        .concat(),
    );
    // A job longer than the time limit is never started.
    db.add_job(
        "t4",
        "tl",
        "long",
        &["--wall-time-minutes", "5", "--args", &format!("{log} t4 1")],
    );
    let t = Instant::now();
    let run = launcher(
        &db,
        2,
        &["--time-limit-minutes", "0.1", "--kill-grace-seconds", "1"],
    );
    run.ok();
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "the launcher stops at its limit: {:?}",
        t.elapsed()
    );
    let st = states(&db);
    assert_eq!(st["t1"], "RESTART_READY", "{st:?}");
    assert_eq!(
        st["t2"], "RUN_TIMEOUT",
        "the timeout handler is left to the next launcher: {st:?}"
    );
    assert_eq!(st["t3"], "FAILED", "{st:?}");
    assert_eq!(st["t4"], "PREPROCESSED", "{st:?}");
    assert!(
        jobs(&db).iter().all(|j| j["lease_session"].is_null()),
        "every lease released"
    );
    let h = history(&db, "t1");
    assert!(
        h.contains("RUN_TIMEOUT") && h.contains("time limit") && h.contains("RESTART_READY"),
        "{h}"
    );

    launcher(&db, 2, &[]).ok();
    let st = states(&db);
    for n in ["t1", "t2", "t4"] {
        assert_eq!(st[n], "JOB_FINISHED", "{n}: {}", history(&db, n));
    }
    let post = read(&workdir(&db, "t2").join("post.txt"));
    assert!(post.starts_with("post error= timeout=TRUE"), "{post}");
    assert_eq!(job(&db, "t1")["num_restarts"], 1);
}

#[test]
fn kill_9_of_the_launcher_loses_no_job_and_runs_none_twice() {
    let db = Db::new();
    set_settings(&db, &[("LEASE_EXPIRY_SECONDS", Value::from(5))]);
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log");
    let logs = log.display().to_string();
    let names: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
    for n in &names {
        db.add_job(
            n,
            "crash",
            "long",
            &[
                "--node-packing-count",
                "2",
                "--args",
                &format!("{logs} {n} 60"),
            ],
        );
    }
    let mut bg = background(&db, 2, &[], "crash");
    wait_until("four jobs running", Duration::from_secs(60), || {
        states(&db).values().filter(|s| *s == "RUNNING").count() == 4
    });
    bg.kill9();
    assert!(!log.exists(), "nothing finished before the crash");
    // The next launcher ends the dead session (its process is gone from this host) and reruns
    // them.
    launcher(&db, 2, &[]).ok();
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    let mut finished: Vec<String> = read(&log).lines().map(String::from).collect();
    finished.sort();
    let want: Vec<String> = names.iter().map(|n| format!("finished {n}")).collect();
    assert_eq!(finished, want, "every job finished exactly once");
    let h = history(&db, "r0");
    assert!(
        h.contains("process is gone") && h.contains("RESTART_READY"),
        "{h}"
    );
}

#[test]
fn two_launchers_on_one_database_run_every_job_once() {
    let db = Db::new();
    db.run(&[
        "app",
        "--name",
        "append",
        "--executable",
        "sh -c 'echo $0 >> $1; sleep 0.05'",
    ])
    .ok();
    let log = db.tmp.path().join("ran.log");
    let n = 60;
    let lines: String = (0..n)
        .map(|i| format!("{{\"name\": \"j{i}\", \"workflow\": \"two\", \"application\": \"append\", \"args\": \"j{i} {}\"}}\n", log.display()))
        .collect();
    let file = db.tmp.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    db.run(&["job", "--from-file", file.to_str().unwrap(), "--yes"])
        .ok();
    let mut a = background(&db, 2, &[], "a");
    let mut b = background(&db, 2, &[], "b");
    assert_eq!(a.wait(LAUNCHER_TIMEOUT), Some(0), "{}", a.output());
    assert_eq!(b.wait(LAUNCHER_TIMEOUT), Some(0), "{}", b.output());
    let ran: Vec<String> = read(&log).lines().map(String::from).collect();
    let unique: HashSet<&String> = ran.iter().collect();
    assert_eq!(ran.len(), n, "each job ran once:\n{}", ran.join("\n"));
    assert_eq!(unique.len(), n);
    assert!(states(&db).values().all(|s| s == "JOB_FINISHED"));
}

#[test]
fn sigterm_stops_the_launcher_cleanly_and_its_jobs_run_again() {
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log").display().to_string();
    for n in ["g1", "g2"] {
        db.add_job(n, "sig", "long", &["--args", &format!("{log} {n} 60")]);
    }
    let mut bg = background(&db, 2, &["--kill-grace-seconds", "1"], "sigterm");
    wait_until("both jobs running", Duration::from_secs(60), || {
        states(&db).values().filter(|s| *s == "RUNNING").count() == 2
    });
    let pid = bg.pid();
    // SAFETY: signals the launcher this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    assert_eq!(bg.wait(Duration::from_secs(30)), Some(0), "{}", bg.output());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "stopped in {:?}",
        t.elapsed()
    );
    let st = states(&db);
    assert!(st.values().all(|s| s == "RESTART_READY"), "{st:?}");
    let h = history(&db, "g1");
    assert!(
        h.contains("RUN_TIMEOUT") && h.contains("stopped by a signal"),
        "{h}"
    );
    launcher(&db, 2, &[]).ok();
    assert!(states(&db).values().all(|s| s == "JOB_FINISHED"));
}

#[test]
fn a_launcher_command_killed_with_sigkill_stops_its_pilot_and_its_jobs_run_again() {
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log").display().to_string();
    db.add_job(
        "k1",
        "sigkill",
        "long",
        &["--args", &format!("{log} k1 60")],
    );
    let mut bg = background(&db, 1, &["--kill-grace-seconds", "1"], "sigkill");
    let wd = workdir(&db, "k1");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("k1") == "RUNNING" && wd.join("pid").exists()
    });
    let job_pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    // Everything `balsam launcher` started: mpiexec (in a process group of its own), the
    // ranks, their nurseries and the job.
    let cli = bg.pid();
    let tree: Vec<i32> = common::process_tree(cli)
        .into_iter()
        .filter(|p| *p != cli)
        .collect();
    assert!(tree.contains(&job_pid), "{tree:?}");
    // Should the test fail, what survived the command must not outlive the test.
    struct KillOnDrop(Vec<i32>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for p in &self.0 {
                // SAFETY: processes this test started.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
        }
    }
    let mut survivors = KillOnDrop(tree.clone());
    // SAFETY: kills the command this test started, and only it.
    unsafe { libc::kill(cli, libc::SIGKILL) };
    assert_eq!(bg.wait(Duration::from_secs(10)), None, "{}", bg.output());
    wait_until(
        "the pilot and its job to stop",
        Duration::from_secs(20),
        || tree.iter().all(|p| !alive(*p)),
    );
    // All gone: their pids may be reused from now on.
    survivors.0.clear();
    assert_eq!(db.state_of("k1"), "RESTART_READY", "{}", history(&db, "k1"));
    launcher(&db, 1, &[]).ok();
    assert_eq!(db.state_of("k1"), "JOB_FINISHED");
}

#[test]
fn a_crashed_rank_ends_the_launcher_and_its_jobs_and_another_launcher_recovers() {
    let db = Db::new();
    set_settings(&db, &[("LEASE_EXPIRY_SECONDS", Value::from(5))]);
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log");
    db.add_job(
        "c1",
        "crash",
        "long",
        &["--args", &format!("{} c1 60", log.display())],
    );
    let mut bg = background(&db, 2, &[], "rank-crash");
    let wd = workdir(&db, "c1");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("c1") == "RUNNING" && wd.join("pid").exists()
    });
    let job_pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    // The job's parent is the process nursery of the worker rank that runs it, whose parent is
    // that rank: crash the rank.
    let parent = |pid: i32| -> i32 {
        let stat = read(Path::new(&format!("/proc/{pid}/stat")));
        stat.rsplit_once(") ")
            .unwrap()
            .1
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let nursery_pid = parent(job_pid);
    assert!(read(Path::new(&format!("/proc/{nursery_pid}/cmdline"))).starts_with("balsam-nursery"));
    let rank_pid = parent(nursery_pid);
    assert!(read(Path::new(&format!("/proc/{rank_pid}/cmdline"))).contains("balsam-mpi-launcher"));
    // SAFETY: kills a process of the test's own launcher.
    unsafe { libc::kill(rank_pid, libc::SIGKILL) };
    let t = Instant::now();
    let code = bg.wait(Duration::from_secs(30));
    assert_ne!(code, Some(0), "{}", bg.output());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the MPI job ended in {:?}",
        t.elapsed()
    );
    wait_until(
        "the orphaned job to die with its rank",
        Duration::from_secs(5),
        || !alive(job_pid),
    );
    launcher(&db, 2, &[]).ok();
    assert_eq!(db.state_of("c1"), "JOB_FINISHED");
    assert_eq!(read(&log), "finished c1\n", "finished once");
    let h = history(&db, "c1");
    assert!(
        h.contains("lease expired") || h.contains("process is gone"),
        "{h}"
    );
}

#[test]
fn job_modes_serial_and_mpi() {
    let db = Db::new();
    db.run(&["app", "--name", "ranks", "--executable", &app("ranks.sh")])
        .ok();
    db.add_job("s1", "modes", "ranks", &[]);
    db.add_job("m1", "modes", "ranks", &["--ranks-per-node", "2"]);
    // Serial mode runs the serial job on a worker and leaves the MPI job to others.
    launcher(&db, 1, &["--job-mode", "serial"]).ok();
    assert_eq!(db.state_of("s1"), "JOB_FINISHED");
    assert_eq!(db.state_of("m1"), "PREPROCESSED");
    assert!(history(&db, "s1").contains("(rank 1, pid"));
    // MPI mode starts every job with the MPI launcher, serial ones too.
    db.add_job("s2", "modes", "ranks", &[]);
    launcher(&db, 1, &["--job-mode", "mpi"]).ok();
    for n in ["m1", "s2"] {
        assert_eq!(db.state_of(n), "JOB_FINISHED", "{}", history(&db, n));
        assert!(history(&db, n).contains("MPI launch"));
    }
    assert!(read(&workdir(&db, "s2").join("s2.out")).contains("rank 0 of 1"));
    assert_eq!(
        read(&workdir(&db, "m1").join("m1.out"))
            .lines()
            .filter(|l| l.starts_with("rank"))
            .count(),
        2
    );
}

#[test]
fn a_launcher_that_lost_its_session_kills_its_jobs_and_writes_nothing() {
    let db = Db::new();
    set_settings(&db, &[("LEASE_EXPIRY_SECONDS", Value::from(5))]);
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log");
    db.add_job(
        "z1",
        "frozen",
        "long",
        &["--args", &format!("{} z1 60", log.display())],
    );
    let mut first = background(&db, 1, &[], "frozen");
    let wd = workdir(&db, "z1");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("z1") == "RUNNING" && wd.join("pid").exists()
    });
    let job_pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    // Freeze the whole first launcher, job included, past the lease expiry.
    let root = first.pid();
    let frozen = process_tree(root);
    for p in &frozen {
        // SAFETY: stops processes of the test's own launcher.
        unsafe { libc::kill(*p, libc::SIGSTOP) };
    }
    std::thread::sleep(Duration::from_secs(7));
    // A second launcher expires the silent session and finishes the job (a rerun is quick).
    launcher(&db, 1, &[]).ok();
    assert_eq!(db.state_of("z1"), "JOB_FINISHED");
    for p in &frozen {
        // SAFETY: as above.
        unsafe { libc::kill(*p, libc::SIGCONT) };
    }
    // Thawed, the first launcher finds its session ended: it kills its copy and exits.
    assert_eq!(
        first.wait(Duration::from_secs(60)),
        Some(3),
        "{}",
        first.output()
    );
    assert!(first.output().contains("lost"), "{}", first.output());
    wait_until("the stale copy to die", Duration::from_secs(10), || {
        !alive(job_pid)
    });
    assert_eq!(
        db.state_of("z1"),
        "JOB_FINISHED",
        "nothing written by the lost launcher"
    );
    assert_eq!(read(&log), "finished z1\n");
    let h = history(&db, "z1");
    assert_eq!(h.matches("JOB_FINISHED").count(), 1, "{h}");
}

#[test]
fn stage_in_and_stage_out() {
    let db = Db::new();
    let input = db.tmp.path().join("inputs");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::write(input.join("data.txt"), "payload\n").unwrap();
    std::fs::write(input.join("sub/more.txt"), "more\n").unwrap();
    let results = db.tmp.path().join("results");
    db.run(&[
        "app",
        "--name",
        "copy",
        "--executable",
        "sh -c 'cat data.txt sub/more.txt > answer.res'",
    ])
    .ok();
    let url_in = format!("file://{}", input.display());
    let url_out = results.display().to_string();
    db.add_job(
        "s",
        "stage",
        "copy",
        &[
            "--url-in",
            &url_in,
            "--url-out",
            &url_out,
            "--stage-out-files",
            "*.res",
        ],
    );
    db.add_job("bad", "stage", "copy", &["--url-in", "/no/such/place"]);
    launcher(&db, 1, &[]).ok();
    assert_eq!(db.state_of("s"), "JOB_FINISHED", "{}", history(&db, "s"));
    assert_eq!(read(&results.join("answer.res")), "payload\nmore\n");
    assert_eq!(db.state_of("bad"), "FAILED");
    let h = history(&db, "bad");
    assert!(
        h.contains("stage-in failed") && h.contains("/no/such/place"),
        "{h}"
    );
}

#[test]
fn a_launcher_of_one_rank_runs_serial_jobs_itself() {
    // One rank on one node (a 1-node batch job starts one rank per node): rank 0 has no worker
    // rank beside it and runs the serial jobs on its own node.
    let db = Db::new();
    db.hello_app();
    for i in 1..=4 {
        db.add_job(
            &format!("solo{i}"),
            "solo",
            "say-hello",
            &["--node-packing-count", "2"],
        );
    }
    launcher(&db, 0, &["--job-mode", "serial"]).ok();
    for i in 1..=4 {
        let name = format!("solo{i}");
        assert_eq!(
            db.state_of(&name),
            "JOB_FINISHED",
            "{}",
            history(&db, &name)
        );
        assert!(
            history(&db, &name).contains("(rank 0, pid"),
            "{}",
            history(&db, &name)
        );
    }
}
