//! The process engine through a real nursery (the `balsam-mpi-launcher` binary cargo builds for
//! these tests): jobs run, are packed, killed and timed out, and every process a job or a script
//! starts ends with it.

use std::path::Path;
use std::time::{Duration, Instant};

use balsam_launcher::executor::{Event, Executor, ExecutorConfig, Request};
use balsam_launcher::messages::{ExitStatus, JobFinished, KillReason, RunJob};
use balsam_launcher::nursery::{ScriptNursery, ScriptRunner};
use balsam_launcher::{packing, process};

fn job(dir: &Path, pk: i64, cmd: &str, cost: u64) -> RunJob {
    RunJob {
        pk,
        cute_id: format!("[j{pk}]"),
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        envscript: None,
        workdir: dir.to_path_buf(),
        output: dir.join(format!("j{pk}.out")),
        env: vec![
            ("JOBVAR".into(), pk.to_string()),
            ("BALSAM_JOB_ID".into(), format!("job-{pk}")),
        ],
        cost,
        wall_time_limit_s: None,
    }
}

fn finished(ex: &Executor, n: usize) -> Vec<JobFinished> {
    let mut out = Vec::new();
    while out.len() < n {
        match ex
            .events
            .recv_timeout(Duration::from_secs(20))
            .expect("event in time")
        {
            Event::Finished(f) => out.push(f),
            Event::Started(_) => {}
        }
    }
    out.sort_by_key(|f| f.pk);
    out
}

fn cfg() -> ExecutorConfig {
    ExecutorConfig {
        capacity: packing::NODE,
        gpus_per_node: 0,
        kill_grace: Duration::from_millis(300),
        base_env: process::base_environment(None),
    }
}

/// Live (not zombie) processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if cmd.contains(marker) && !zombie {
            out.push(pid);
        }
    }
    out
}

#[track_caller]
fn wait_gone(marker: &str, within: Duration) {
    let t = Instant::now();
    while !processes_with(marker).is_empty() {
        if t.elapsed() > within {
            let pids = processes_with(marker);
            for p in &pids {
                // SAFETY: kills processes this test started (by their unique marker).
                unsafe { libc::kill(*p as i32, libc::SIGKILL) };
            }
            panic!("processes with {marker:?} still alive after {within:?}: {pids:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_file(p: &Path) {
    let t = Instant::now();
    while std::fs::read_to_string(p).unwrap_or_default().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never written",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn runs_reports_and_kills() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(cfg()).unwrap();
    ex.send(Request::Run(job(
        dir.path(),
        1,
        "echo out $JOBVAR",
        packing::cost(4),
    )));
    ex.send(Request::Run(job(
        dir.path(),
        2,
        "echo oops >&2; exit 3",
        packing::cost(4),
    )));
    ex.send(Request::Run(job(
        dir.path(),
        3,
        "trap '' TERM; echo ready; sleep 30",
        packing::cost(4),
    )));
    let mut j4 = job(dir.path(), 4, "x", packing::cost(4));
    j4.argv = vec!["/no/such/program".into()];
    ex.send(Request::Run(j4));
    let mut j5 = job(dir.path(), 5, "true", packing::cost(4));
    j5.output = dir.path().join("no/such/dir/j5.out");
    ex.send(Request::Run(j5));
    let f = finished(&ex, 4);
    assert_eq!(f[0].status, ExitStatus::Code(0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("j1.out")).unwrap(),
        "out 1\n"
    );
    assert_eq!(f[1].status, ExitStatus::Code(3));
    assert_eq!(f[1].tail, "oops");
    assert!(matches!(&f[2].status, ExitStatus::NotStarted(w) if w.contains("not found")));
    // The launcher could not write the job's output file: not the job's fault.
    assert!(
        matches!(&f[3].status, ExitStatus::Infrastructure(w) if w.contains("cannot open output file")),
        "{:?}",
        f[3]
    );
    // Job 3 ignores SIGTERM: the kill escalates to SIGKILL after the grace.
    wait_file(&dir.path().join("j3.out"));
    let t = Instant::now();
    ex.send(Request::Kill(vec![3], KillReason::User));
    let f = finished(&ex, 1);
    assert_eq!(f[0].status, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(f[0].killed, Some(KillReason::User));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn packing_limits_concurrency_and_wall_time_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(cfg()).unwrap();
    let log = dir.path().join("log");
    let cmd = format!(
        "echo start >> {0}; sleep 0.3; echo end >> {0}",
        log.display()
    );
    for pk in 0..4 {
        ex.send(Request::Run(job(dir.path(), pk, &cmd, packing::cost(2))));
    }
    let f = finished(&ex, 4);
    assert!(f.iter().all(|f| f.status.success()));
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut now, mut max) = (0, 0);
    for l in text.lines() {
        now += if l == "start" { 1 } else { -1 };
        max = max.max(now);
    }
    assert_eq!(max, 2, "{text}");
    // Past its wall time, the job and its child are killed.
    let mut slow = job(dir.path(), 9, "sleep 1011 & sleep 1012", packing::cost(2));
    slow.wall_time_limit_s = Some(1);
    ex.send(Request::Run(slow));
    let f = finished(&ex, 1);
    assert_eq!(f[0].killed, Some(KillReason::WallTime));
    wait_gone("sleep 101", Duration::from_secs(5));
}

#[test]
fn gpus_are_assigned_per_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(ExecutorConfig {
        gpus_per_node: 2,
        ..cfg()
    })
    .unwrap();
    for pk in 0..3 {
        ex.send(Request::Run(job(
            dir.path(),
            pk,
            "echo $CUDA_VISIBLE_DEVICES; sleep 0.2",
            packing::cost(4),
        )));
    }
    finished(&ex, 3);
    let gpus: Vec<String> = (0..3)
        .map(|pk| std::fs::read_to_string(dir.path().join(format!("j{pk}.out"))).unwrap())
        .collect();
    assert_eq!(gpus, ["0\n", "1\n", "0\n"]);
}

#[test]
fn what_a_job_leaves_behind_dies_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(cfg()).unwrap();
    // A child in the job's group, a double fork, a `setsid` daemon of its own session, and a
    // child that moved to a process group of its own.
    let cmd = "sleep 1021 & (sleep 1022 &) ; setsid sleep 1023 & \
               perl -e 'setpgrp(0,0); exec qw(sleep 1024)' & sleep 0.3; exit 0";
    ex.send(Request::Run(job(dir.path(), 1, cmd, packing::cost(4))));
    let f = finished(&ex, 1);
    assert_eq!(f[0].status, ExitStatus::Code(0), "{:?}", f[0]);
    wait_gone("sleep 102", Duration::from_secs(5));
}

#[test]
fn a_running_jobs_daemons_live_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(cfg()).unwrap();
    let ready = dir.path().join("ready");
    // A double-forked daemon in a session of its own is orphaned to the nursery while the job
    // runs; it carries the job's BALSAM_JOB_ID.
    let cmd = format!(
        "(setsid sleep 1031 &); sleep 0.5; echo up > {}; sleep 1.5",
        ready.display()
    );
    ex.send(Request::Run(job(dir.path(), 1, &cmd, packing::cost(4))));
    // Another job ending meanwhile makes the nursery look for orphans: the daemon is kept.
    ex.send(Request::Run(job(
        dir.path(),
        2,
        "sleep 0.8",
        packing::cost(4),
    )));
    wait_file(&ready);
    let f = finished(&ex, 1);
    assert_eq!(f[0].pk, 2);
    assert!(
        !processes_with("sleep 1031").is_empty(),
        "the running job's daemon was killed"
    );
    let f = finished(&ex, 1);
    assert_eq!(f[0].status, ExitStatus::Code(0));
    wait_gone("sleep 1031", Duration::from_secs(5));
}

#[test]
fn dropping_the_executor_ends_its_nursery_and_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let ex = Executor::start(cfg()).unwrap();
    ex.send(Request::Run(job(
        dir.path(),
        1,
        "trap '' TERM; sleep 1041 & echo up; sleep 1042",
        packing::cost(4),
    )));
    wait_file(&dir.path().join("j1.out"));
    ex.send(Request::KillAll(KillReason::Exit));
    let f = finished(&ex, 1);
    assert_eq!(f[0].killed, Some(KillReason::Exit));
    drop(ex);
    wait_gone("sleep 104", Duration::from_secs(5));
}

#[test]
fn scripts_end_with_what_they_started_in_process_and_in_a_nursery() {
    let dir = tempfile::tempdir().unwrap();
    let env = process::base_environment(None);
    let nursery = ScriptNursery::start(Duration::from_millis(300), env.clone()).unwrap();
    for (i, host) in [None, Some(nursery)].into_iter().enumerate() {
        let mut r = ScriptRunner::new(&env, host);
        let out = dir.path().join(format!("s{i}.log"));
        let sh = |cmd: &str| vec!["sh".to_string(), "-c".to_string(), cmd.to_string()];
        let run = r
            .run(
                &sh(&format!("sleep 105{i} & echo done; exit 2")),
                dir.path(),
                &out,
                &[],
                Duration::from_secs(20),
                Duration::from_millis(300),
            )
            .unwrap();
        assert_eq!(run.status, Some(ExitStatus::Code(2)), "{i}");
        assert!(run.pid > 0);
        wait_gone(&format!("sleep 105{i}"), Duration::from_secs(5));
        // Past its limit: killed, with its children.
        let t = Instant::now();
        let run = r
            .run(
                &sh(&format!("trap '' TERM; sleep 106{i} & sleep 107{i}")),
                dir.path(),
                &out,
                &[],
                Duration::from_millis(500),
                Duration::from_millis(300),
            )
            .unwrap();
        assert_eq!(run.status, None, "{i}");
        assert!(t.elapsed() < Duration::from_secs(10));
        wait_gone(&format!("sleep 106{i}"), Duration::from_secs(5));
        wait_gone(&format!("sleep 107{i}"), Duration::from_secs(5));
        let e = r
            .run(
                &["/no/such/script".to_string()],
                dir.path(),
                &out,
                &[],
                Duration::from_secs(5),
                Duration::from_millis(300),
            )
            .unwrap_err();
        assert!(e.why.contains("not found") && !e.infrastructure, "{e}");
    }
}
