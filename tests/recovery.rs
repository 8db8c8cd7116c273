//! The launcher under trouble, end to end: scheduling that never leaves a job behind a busy
//! worker, two launchers sharing a small campaign, recovery after kill -9, jobs removed or changed
//! while a launcher holds them, a database directory that cannot be written, time limits, bad
//! numbers, and when an idle launcher leaves. Real MPI ranks, real processes, the real CLI.
//! Every launcher run is bounded by MPIEXEC_TIMEOUT and a per-process timeout, and background
//! launchers are killed with their whole process tree when a test ends.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    alive, background_launcher, history, read, run_cmd, run_launcher, states, wait_until, workdir,
    Background, Db, IdleExit, Run, LAUNCHER_TIMEOUT,
};

fn app(name: &str) -> String {
    common::fixture_app(name)
}

/// `balsam launcher --num-workers N --consume-all` plus `extra`, with the default idle rules.
fn launcher_cmd(db: &Db, workers: u32, extra: &[&str]) -> Command {
    common::launcher_cmd(db, workers, IdleExit::Default, extra)
}

fn launcher(db: &Db, workers: u32, extra: &[&str]) -> Run {
    run_launcher(launcher_cmd(db, workers, extra))
}

fn background(db: &Db, workers: u32, extra: &[&str], name: &str) -> Background {
    background_launcher(db, launcher_cmd(db, workers, extra), name)
}

fn count_in(states: &HashMap<String, String>, state: &str) -> usize {
    states.values().filter(|s| *s == state).count()
}

/// Most jobs running at once, from `record.sh`'s start/end lines.
fn most_at_once(log: &Path) -> usize {
    let (mut now, mut max) = (0i64, 0i64);
    for l in read(log).lines() {
        now += if l.starts_with("start") { 1 } else { -1 };
        max = max.max(now);
    }
    max as usize
}

fn record_app(db: &Db) {
    db.run(&["app", "--name", "record", "--executable", &app("record.sh")])
        .ok();
}

// ---- E: scheduling ----

#[test]
fn a_short_job_never_waits_behind_a_long_one_while_a_worker_idles() {
    let db = Db::new();
    record_app(&db);
    let log = db.tmp.path().join("record.log");
    let shorts = ["short1", "short2", "short3", "short4"];
    db.add_job(
        "long",
        "order",
        "record",
        &["--args", &format!("{} 25 long", log.display())],
    );
    for name in shorts {
        db.add_job(
            name,
            "order",
            "record",
            &["--args", &format!("{} 1 {name}", log.display())],
        );
    }
    let t = Instant::now();
    let mut bg = background(&db, 2, &[], "order");
    // With 2 workers: the long job on one, the short ones one after the other on the other.
    wait_until(
        "the short jobs to finish while the long one runs",
        Duration::from_secs(20),
        || {
            let st = states(&db);
            shorts.iter().all(|n| st[*n] == "JOB_FINISHED")
        },
    );
    assert!(
        !read(&log).contains("end long"),
        "the short jobs did not wait for the long one (after {:?}):\n{}",
        t.elapsed(),
        read(&log)
    );
    assert_eq!(bg.wait(Duration::from_secs(90)), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("long"), "JOB_FINISHED");
}

#[test]
fn a_job_that_adds_tasks_and_waits_for_them_sees_them_all_finish() {
    // The talk's dynamic workflow: a running job adds tasks with the CLI and polls until they
    // are done. With 2 workers the tasks must all run on the worker the job leaves free.
    let db = Db::new();
    db.run(&["app", "--name", "sleeper", "--executable", "sleep"])
        .ok();
    let script = db.tmp.path().join("boss.sh");
    std::fs::write(
        &script,
        r#"#!/usr/bin/env bash
set -e
for i in 1 2 3 4; do
    balsam job --name task$i --workflow tasks --app sleeper --args 1 --yes > /dev/null
done
for n in $(seq 1 400); do
    done=$(balsam ls --json --wf tasks | python3 -c 'import json, sys; print(sum(j["state"] == "JOB_FINISHED" for j in json.load(sys.stdin)))')
    if [ "$done" = 4 ]; then echo "all 4 tasks finished"; exit 0; fi
    sleep 0.2
done
echo "tasks never finished"
exit 1
"#,
    )
    .unwrap();
    db.run(&[
        "app",
        "--name",
        "boss",
        "--executable",
        &format!("bash {}", script.display()),
    ])
    .ok();
    db.add_job("boss", "boss", "boss", &[]);
    let run = launcher(&db, 2, &[]);
    run.ok();
    let st = states(&db);
    assert_eq!(st.len(), 5, "{st:?}");
    assert_eq!(
        st["boss"],
        "JOB_FINISHED",
        "{}\n{}",
        history(&db, "boss"),
        run.stderr
    );
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    assert_eq!(
        read(&workdir(&db, "boss").join("boss.out")).trim(),
        "all 4 tasks finished"
    );
}

#[test]
fn two_launchers_share_a_small_campaign() {
    // Four jobs, two launchers of two workers each: all four run at once, two in each.
    let db = Db::new();
    record_app(&db);
    let log = db.tmp.path().join("record.log");
    for i in 0..4 {
        let name = format!("s{i}");
        db.add_job(
            &name,
            "share",
            "record",
            &["--args", &format!("{} 8 {name}", log.display())],
        );
    }
    let mut a = background(&db, 2, &[], "a");
    let mut b = background(&db, 2, &[], "b");
    assert_eq!(a.wait(LAUNCHER_TIMEOUT), Some(0), "{}", a.output());
    assert_eq!(b.wait(LAUNCHER_TIMEOUT), Some(0), "{}", b.output());
    assert!(states(&db).values().all(|s| s == "JOB_FINISHED"));
    assert_eq!(
        most_at_once(&log),
        4,
        "both launchers ran jobs:\n{}\n--- a:\n{}\n--- b:\n{}",
        read(&log),
        a.output(),
        b.output()
    );
}

// ---- B: recovery ----

#[test]
fn after_kill_9_another_launcher_on_this_host_recovers_at_once() {
    // LEASE_EXPIRY_SECONDS stays at its default (180 s): the dead launcher ran on this host, so
    // its session is ended as soon as the next launcher starts.
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let log = db.tmp.path().join("finished.log");
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
                &format!("{} {n} 60", log.display()),
            ],
        );
    }
    let mut bg = background(&db, 2, &[], "crash");
    wait_until("four jobs running", Duration::from_secs(60), || {
        count_in(&states(&db), "RUNNING") == 4
    });
    bg.kill9();
    let t = Instant::now();
    let run = run_cmd(launcher_cmd(&db, 2, &[]), Duration::from_secs(90), None);
    run.ok();
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "recovered in {:?}, well inside the 180 s expiry",
        t.elapsed()
    );
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    let mut finished: Vec<String> = read(&log).lines().map(String::from).collect();
    finished.sort();
    let want: Vec<String> = names.iter().map(|n| format!("finished {n}")).collect();
    assert_eq!(finished, want, "every job finished exactly once");
    for n in &names {
        let h = history(&db, n);
        // One RUNNING per run: the killed one and the rerun.
        assert_eq!(h.matches("RUNNING").count(), 2, "{n}:\n{h}");
        assert_eq!(h.matches("JOB_FINISHED").count(), 1, "{n}:\n{h}");
        assert!(h.contains("RESTART_READY"), "{n}:\n{h}");
    }
}

// ---- C: jobs removed or changed while held ----

#[test]
fn a_job_removed_while_it_runs_is_stopped_and_dropped_and_the_others_are_written() {
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    record_app(&db);
    let flog = db.tmp.path().join("finished.log");
    let rlog = db.tmp.path().join("record.log");
    let id = db.add_job(
        "victim",
        "rm",
        "long",
        &["--args", &format!("{} victim 60", flog.display())],
    );
    db.add_job(
        "other",
        "rm",
        "record",
        &["--args", &format!("{} 4 other", rlog.display())],
    );
    let mut bg = background(&db, 2, &[], "rm");
    let wd = workdir(&db, "victim");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("victim") == "RUNNING" && wd.join("pid").exists()
    });
    let pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    db.run_stdin(&["rm", "jobs", "--id", &id, "--force"], "y\n")
        .ok();
    wait_until(
        "the removed job's process to be stopped",
        Duration::from_secs(10),
        || !alive(pid),
    );
    assert_eq!(bg.wait(Duration::from_secs(60)), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("other"), "JOB_FINISHED");
    let out = bg.output();
    assert_eq!(
        out.matches("removed from the database").count(),
        1,
        "one line for the removed job:\n{out}"
    );
    assert!(!out.contains("no job id starts with"), "{out}");
    assert!(!flog.exists(), "the removed job never finished");
}

#[test]
fn a_job_a_user_sets_to_another_state_while_it_runs_is_stopped_and_left_to_that_state() {
    let db = Db::new();
    db.run(&["app", "--name", "long", "--executable", &app("once.sh")])
        .ok();
    let flog = db.tmp.path().join("finished.log");
    let id = db.add_job(
        "m",
        "modify",
        "long",
        &["--args", &format!("{} m 60", flog.display())],
    );
    let mut bg = background(&db, 2, &[], "modify");
    let wd = workdir(&db, "m");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("m") == "RUNNING" && wd.join("pid").exists()
    });
    let pid: i32 = read(&wd.join("pid")).trim().parse().unwrap();
    db.run(&["modify", &id, "state", "RESTART_READY"]).ok();
    wait_until(
        "the changed job's process to be stopped",
        Duration::from_secs(10),
        || !alive(pid),
    );
    // RESTART_READY is runnable: the launcher runs it again (the rerun of once.sh is quick).
    assert_eq!(bg.wait(Duration::from_secs(60)), Some(0), "{}", bg.output());
    let h = history(&db, "m");
    assert!(h.contains("User mutated state"), "{h}");
    assert_eq!(db.state_of("m"), "JOB_FINISHED", "{h}");
    assert_eq!(
        read(&flog),
        "finished m\n",
        "the stopped run never finished"
    );
    let out = bg.output();
    assert_eq!(
        out.matches("by a user").count(),
        1,
        "one line for the changed job:\n{out}"
    );
}

// ---- D: the database directory cannot be written ----

/// Sets or clears the immutable attribute of every directory under `root`: nothing can be
/// created in them, even by root, while files already open stay writable (as with a directory
/// made read-only under a running launcher).
fn freeze_dirs(root: &Path, on: bool) {
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        i += 1;
    }
    let st = Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .args(&dirs)
        .status()
        .expect("chattr (e2fsprogs) is needed for this test");
    assert!(st.success(), "chattr failed: this test needs root on ext4");
}

/// Clears the immutable attribute when the test ends, however it ends.
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        freeze_dirs(&self.0, false);
    }
}

#[test]
fn a_read_only_database_directory_fails_no_job_and_the_launcher_says_so() {
    let db = Db::new();
    db.run(&["app", "--name", "nap", "--executable", "sleep"])
        .ok();
    // wall_time_minutes 0: they fit the launcher's short time limit.
    let lines: String = (0..40)
        .map(|i| {
            format!("{{\"name\": \"n{i}\", \"workflow\": \"ro\", \"application\": \"nap\", \"args\": \"0.3\", \"wall_time_minutes\": 0}}\n")
        })
        .collect();
    let file = db.tmp.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    db.run(&["job", "--from-file", file.to_str().unwrap(), "--yes"])
        .ok();
    let mut bg = background(
        &db,
        2,
        &["--time-limit-minutes", "0.3", "--kill-grace-seconds", "1"],
        "ro",
    );
    wait_until("a few jobs to finish", Duration::from_secs(60), || {
        count_in(&states(&db), "JOB_FINISHED") >= 4
    });
    let thaw = Thaw(db.path.clone());
    freeze_dirs(&db.path, true);
    let code = bg.wait(Duration::from_secs(120));
    let out = bg.output();
    drop(thaw);
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}:\n{out}");
    assert!(
        out.contains("cannot write job files") && out.contains(&db.path.display().to_string()),
        "{out}"
    );
    let said = out
        .lines()
        .filter(|l| l.starts_with("balsam-mpi-launcher:"))
        .filter(|l| l.contains("no job starts until it works again"))
        .count();
    assert_eq!(said, 1, "said once on stderr:\n{out}");
    assert!(!out.contains("panicked"), "{out}");
    let st = states(&db);
    assert_eq!(count_in(&st, "FAILED"), 0, "{st:?}");
    // Once the directory is writable again, a launcher finishes everything.
    launcher(&db, 2, &[]).ok();
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
}

/// Unmounts `mnt`; lazily when it is busy (a process of a failed test may still use it).
fn unmount(mnt: &Path) {
    let unmounted = Command::new("umount")
        .arg(mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

/// A small file system of its own (a loop-mounted ext4 image), unmounted when the test ends.
struct SmallDisk {
    mnt: PathBuf,
}

impl SmallDisk {
    fn new(dir: &Path, megabytes: u32) -> SmallDisk {
        let img = dir.join("disk.img");
        let mnt = dir.join("disk");
        std::fs::create_dir_all(&mnt).unwrap();
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(u64::from(megabytes) << 20).unwrap();
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        assert!(
            ok(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img)),
            "mkfs.ext4 failed"
        );
        assert!(
            ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)),
            "mounting a loop device failed: this test needs root and /dev/loop*"
        );
        SmallDisk { mnt }
    }

    /// Fills the file system until it is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.mnt.join("filler")).unwrap();
        let block = vec![0u8; 1 << 16];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.mnt.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // The loop device goes with the mount (mount -o loop sets autoclear).
        unmount(&self.mnt);
    }
}

#[test]
fn a_full_disk_until_the_time_limit_fails_no_job_and_exits_non_zero_with_what_was_not_written() {
    if common::on_postgres() {
        // The database is a server's, not on the disk that fills up.
        return;
    }
    // `db` is declared first so that it is dropped last: the disk is unmounted before the
    // temporary folder that holds it is removed.
    let db: Db;
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(tmp.path(), 48);
    let path = disk.mnt.join("db");
    common::create_db(&path);
    db = Db { tmp, path };
    db.run(&["app", "--name", "nap", "--executable", "sleep"])
        .ok();
    // wall_time_minutes 0: they fit the launcher's short time limit.
    let lines: String = (0..200)
        .map(|i| {
            format!("{{\"name\": \"f{i}\", \"workflow\": \"full\", \"application\": \"nap\", \"args\": \"0.2\", \"wall_time_minutes\": 0}}\n")
        })
        .collect();
    let file = db.tmp.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    db.run(&["job", "--from-file", file.to_str().unwrap(), "--yes"])
        .ok();
    let mut bg = background(
        &db,
        2,
        &["--time-limit-minutes", "0.3", "--kill-grace-seconds", "1"],
        "full",
    );
    wait_until("a few jobs to finish", Duration::from_secs(60), || {
        count_in(&states(&db), "JOB_FINISHED") >= 4
    });
    disk.fill();
    let code = bg.wait(Duration::from_secs(120));
    let out = bg.output();
    disk.free();
    assert_eq!(code, Some(4), "{out}");
    let said = |what: &str| {
        out.lines()
            .filter(|l| l.starts_with("balsam-mpi-launcher:") && l.contains(what))
            .count()
    };
    assert_eq!(said("no job starts until it works again"), 1, "{out}");
    assert_eq!(said("could not be written to the database"), 1, "{out}");
    assert!(
        out.contains(&db.path.join("balsamdb.sqlite3").display().to_string()),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    let st = states(&db);
    assert_eq!(count_in(&st, "FAILED"), 0, "{st:?}");
    // With room again, the next launcher on this host ends the dead session at once and runs
    // the rest, those whose results were not written included.
    launcher(&db, 2, &[]).ok();
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
}

#[test]
fn a_removed_database_file_stops_the_launcher_with_a_message_naming_it() {
    if common::on_postgres() {
        // The database is a server's, not a file in the directory: nothing to remove.
        return;
    }
    let db = Db::new();
    db.run(&["app", "--name", "nap", "--executable", "sleep"])
        .ok();
    for i in 0..2 {
        db.add_job(&format!("z{i}"), "gone", "nap", &["--args", "60"]);
    }
    let mut bg = background(&db, 2, &["--kill-grace-seconds", "1"], "gone");
    wait_until("the jobs to run", Duration::from_secs(60), || {
        count_in(&states(&db), "RUNNING") == 2
    });
    let file = db.path.join("balsamdb.sqlite3");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    let t = Instant::now();
    let code = bg.wait(Duration::from_secs(60));
    let out = bg.output();
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}:\n{out}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "stopped in {:?}",
        t.elapsed()
    );
    assert!(
        out.contains(&file.display().to_string()) && out.contains("gone"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

// ---- F: bounds and limits ----

#[test]
fn a_one_minute_launcher_runs_one_minute_jobs() {
    let db = Db::new();
    db.hello_app();
    for i in 0..3 {
        db.add_job(&format!("h{i}"), "minute", "say-hello", &[]);
    }
    let t = Instant::now();
    launcher(&db, 2, &["--time-limit-minutes", "1"]).ok();
    assert!(t.elapsed() < Duration::from_secs(50), "{:?}", t.elapsed());
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
}

/// A job restarted after its working directory was removed runs in a new one, and holds up no
/// other job (a missing directory is not a file system that cannot be written).
#[test]
fn a_restarted_job_whose_working_directory_was_removed_runs_again() {
    let db = Db::new();
    db.hello_app();
    let id = db.add_job("gone", "rerun", "say-hello", &[]);
    launcher(&db, 2, &[]).ok();
    assert_eq!(db.state_of("gone"), "JOB_FINISHED");
    let wd = workdir(&db, "gone");
    std::fs::remove_dir_all(&wd).unwrap();
    db.run(&["modify", &id, "state", "RESTART_READY"]).ok();
    for i in 0..4 {
        db.add_job(&format!("other{i}"), "rerun", "say-hello", &[]);
    }
    let t = Instant::now();
    let out = launcher(&db, 2, &[]);
    out.ok();
    let st = states(&db);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    assert!(
        read(&wd.join("gone.out")).contains("Hello"),
        "ran in a new directory"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "no backoff held the others: {:?}",
        t.elapsed()
    );
}

#[test]
fn a_launcher_that_can_run_none_of_the_jobs_says_which_and_why_and_leaves() {
    let db = Db::new();
    db.hello_app();
    db.add_job(
        "five-minutes",
        "none",
        "say-hello",
        &["--wall-time-minutes", "5"],
    );
    db.add_job("two-ranks", "none", "say-hello", &["--ranks-per-node", "2"]);
    let t = Instant::now();
    let run = launcher(
        &db,
        1,
        &["--job-mode", "serial", "--time-limit-minutes", "1"],
    );
    run.ok();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "left in {:?}",
        t.elapsed()
    );
    let err = &run.stderr;
    let line = |name: &str| {
        err.lines()
            .find(|l| l.contains(name) && !l.contains("INFO") && !l.contains("WARN"))
            .unwrap_or_else(|| panic!("no line naming {name} on stderr:\n{err}"))
            .to_string()
    };
    assert!(
        line("five-minutes").contains("wall_time_minutes (5)"),
        "{err}"
    );
    assert!(line("two-ranks").contains("--job-mode serial"), "{err}");
    let st = states(&db);
    assert!(st.values().all(|s| s == "PREPROCESSED"), "{st:?}");
}

#[test]
fn numeric_flags_out_of_range_are_refused_clearly() {
    let db = Db::new();
    for (flag, value) in [
        ("--time-limit-minutes", "1e300"),
        ("--kill-grace-seconds", "1e300"),
        ("--idle-exit-seconds", "1e300"),
        ("--time-limit-minutes", "-5"),
        ("--num-transition-threads", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let run = run_cmd(launcher_cmd(&db, 1, &[&arg]), Duration::from_secs(30), None);
        let err = run.err();
        assert!(err.contains(flag), "{arg}: {err}");
        assert!(
            err.contains(" to ") || err.contains("..="),
            "{arg}: the range is named: {err}"
        );
    }
}

#[test]
fn an_idle_launcher_with_nothing_to_wait_for_exits_at_once() {
    let db = Db::new();
    db.hello_app();
    for i in 0..2 {
        db.add_job(&format!("q{i}"), "quick", "say-hello", &[]);
    }
    let mut bg = background(&db, 2, &[], "quick");
    let mut done_at = None;
    let t = Instant::now();
    let code = loop {
        if let Some(code) = bg.exited() {
            break code;
        }
        if done_at.is_none() && states(&db).values().all(|s| s == "JOB_FINISHED") {
            done_at = Some(Instant::now());
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{}", bg.output());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0), "{}", bg.output());
    let done_at = done_at.unwrap_or_else(Instant::now);
    let linger = done_at.elapsed();
    assert!(
        linger < Duration::from_secs(4),
        "exited {linger:?} after the last job finished:\n{}",
        bg.output()
    );
}

#[test]
fn an_idle_launcher_waits_for_jobs_another_launcher_holds_and_says_so_once() {
    let db = Db::new();
    db.run(&["app", "--name", "nap", "--executable", "sleep"])
        .ok();
    db.add_job("held", "hold", "nap", &["--args", "6"]);
    let mut a = background(&db, 1, &[], "holder");
    wait_until("the job to run", Duration::from_secs(60), || {
        db.state_of("held") == "RUNNING"
    });
    let mut b = background(&db, 1, &["--idle-exit-seconds", "1"], "waiter");
    assert_eq!(a.wait(Duration::from_secs(60)), Some(0), "{}", a.output());
    assert_eq!(b.wait(Duration::from_secs(60)), Some(0), "{}", b.output());
    let out = b.output();
    let said: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("other launchers hold"))
        .filter(|l| l.starts_with("balsam-mpi-launcher:"))
        .collect();
    assert_eq!(said.len(), 1, "said once on stderr:\n{out}");
    assert!(
        said[0].contains("1 jobs") && said[0].contains("session 1"),
        "{out}"
    );
}

/// A read-only bind mount of a folder, unmounted when the test ends.
struct ReadOnlyView {
    mnt: PathBuf,
}

impl ReadOnlyView {
    fn new(src: &Path, mnt: &Path) -> ReadOnlyView {
        std::fs::create_dir_all(mnt).unwrap();
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        assert!(
            ok(Command::new("mount").arg("--bind").arg(src).arg(mnt)),
            "bind mount failed: this test needs root"
        );
        let view = ReadOnlyView {
            mnt: mnt.to_path_buf(),
        };
        assert!(
            ok(Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(mnt)),
            "remounting read-only failed"
        );
        view
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        unmount(&self.mnt);
    }
}

#[test]
fn a_campaign_archived_on_a_read_only_file_system_can_still_be_listed() {
    if common::on_postgres() {
        // The database is a server's, not a file on the mount.
        return;
    }
    let db = Db::new();
    db.hello_app();
    for name in ["a", "b", "c"] {
        db.add_job(name, "archived", "say-hello", &[]);
    }
    // The archive holds the database file without its -wal and -shm files, as a copy of the
    // directory or the `sqlite3` shell (which removes them when it closes) leaves it.
    let archive = db.tmp.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&db.path)
        .arg(archive.join("db"))
        .status()
        .unwrap();
    assert!(copied.success());
    for f in ["balsamdb.sqlite3-wal", "balsamdb.sqlite3-shm"] {
        let _ = std::fs::remove_file(archive.join("db").join(f));
    }
    let view = ReadOnlyView::new(&archive, &db.tmp.path().join("view"));
    let on_view = |args: &[&str]| {
        let mut c = Command::new(common::balsam_bin());
        c.args(args)
            .env("BALSAM_DB_PATH", view.mnt.join("db"))
            .current_dir(db.tmp.path());
        run_cmd(c, Duration::from_secs(30), None)
    };
    let ls = on_view(&["ls"]);
    let out = ls.ok();
    for name in ["a", "b", "c"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "{out}"
        );
    }
    assert!(
        on_view(&["ls", "--by-states"])
            .ok()
            .contains("CREATED (3 BalsamJobs)"),
        "{out}"
    );
    // A write is refused with a message, and changes nothing.
    let add = on_view(&[
        "job",
        "--name",
        "d",
        "--workflow",
        "archived",
        "--app",
        "say-hello",
        "--yes",
    ]);
    let err = add.err();
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert!(
        on_view(&["ls", "--by-states"])
            .ok()
            .contains("CREATED (3 BalsamJobs)"),
        "{err}"
    );
    // Changes in a -wal file cannot be read there without a -shm file: refused, saying why.
    std::fs::copy(
        db.path.join("balsamdb.sqlite3-wal"),
        archive.join("db/balsamdb.sqlite3-wal"),
    )
    .unwrap();
    let ls = on_view(&["ls"]);
    let err = ls.err();
    assert!(err.contains("read-only file system"), "{err}");
    assert!(err.contains("balsamdb.sqlite3-wal"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
