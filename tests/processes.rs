//! A job's whole process tree lives and dies with the job: whatever way the job ends (by itself,
//! `balsam killjob`, past its wall time, at the launcher's time limit) and whatever way the
//! launcher ends (SIGTERM, kill -9 of rank 0 or of a worker rank), no process a job started
//! remains.
//!
//! Jobs run `tests/fixtures/apps/tree.sh BASE ...`, which leaves three kinds of process behind:
//! a child in its process group (`sleep BASE`), a double-forked grandchild (`sleep BASE+1`) and
//! a `setsid` daemon (`sleep BASE+2`). Each test has its own BASE, by which its processes are
//! found in /proc, and killed by pid when the test ends, whatever happened.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{
    alive, background_launcher, history, job, process_tree, repo_root, run_launcher, wait_until,
    workdir, Background, Db, IdleExit, Run, LAUNCHER_TIMEOUT,
};

/// What the README promises for `balsam killjob` (a launcher stops the process within 2 s), with
/// a margin for a machine busy with builds.
const KILL_PROMISE: Duration = Duration::from_secs(2);
const KILL_MARGIN: Duration = Duration::from_secs(1);

fn tree_app(db: &Db, name: &str) {
    let exe = repo_root().join("tests/fixtures/apps/tree.sh");
    db.run(&["app", "--name", name, "--executable", exe.to_str().unwrap()])
        .ok();
}

/// `balsam launcher --num-workers N --consume-all` with a short idle exit, plus `extra`.
fn launcher_cmd(db: &Db, workers: u32, extra: &[&str]) -> Command {
    common::launcher_cmd(db, workers, IdleExit::AfterOneSecond, extra)
}

fn launcher(db: &Db, workers: u32, extra: &[&str]) -> Run {
    run_launcher(launcher_cmd(db, workers, extra))
}

/// The processes of one test, found by their markers; killed by pid when the test ends.
struct Marked {
    /// The three processes tree.sh leaves for each base.
    markers: Vec<String>,
    /// Those and the job's own `sleep BASE+3`, killed when the test ends.
    cleanup: Vec<String>,
}

impl Marked {
    fn new(bases: &[u32]) -> Marked {
        let sleeps = |n: u32| -> Vec<String> {
            bases
                .iter()
                .flat_map(|b| (0..n).map(move |i| format!("sleep {}", b + i)))
                .collect()
        };
        Marked {
            markers: sleeps(3),
            cleanup: sleeps(4),
        }
    }

    /// Live processes carrying one of the markers, with their command lines.
    fn alive(&self) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for (pid, cmd) in processes() {
            if self.markers.contains(&cmd) {
                out.push((pid, cmd));
            }
        }
        out
    }

    /// Which markers have a live process.
    fn present(&self) -> Vec<String> {
        let mut v: Vec<String> = self.alive().into_iter().map(|(_, c)| c).collect();
        v.sort();
        v.dedup();
        v
    }

    #[track_caller]
    fn wait_all_present(&self) {
        let ok = common::wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
            self.present().len() == self.markers.len()
        });
        assert!(
            ok,
            "not every process of the jobs started: {:?} of {:?}",
            self.present(),
            self.markers
        );
    }

    /// Waits up to `within` for every marked process to be gone; the time it took. Where no
    /// promise is measured the bound is 15 s: the processes would live for a day otherwise, and
    /// the bound leaves room for a 2-core CI machine busy with other tests.
    #[track_caller]
    fn wait_gone(&self, within: Duration) -> Duration {
        let t = Instant::now();
        let ok = common::wait_for(within, Duration::from_millis(20), || {
            self.alive().is_empty()
        });
        let took = t.elapsed();
        assert!(
            ok,
            "processes started by jobs still alive {within:?} later: {:?}",
            self.alive()
        );
        took
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        for (pid, _) in processes()
            .into_iter()
            .filter(|(_, c)| self.cleanup.contains(c))
        {
            // SAFETY: kills a process this test's jobs started (found by its unique marker).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Every live (not zombie) process, with its command line (arguments joined by spaces).
fn processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if stat
            .rsplit_once(") ")
            .is_none_or(|(_, r)| r.starts_with('Z'))
        {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd)
            .trim_end_matches('\0')
            .replace('\0', " ");
        out.push((pid, cmd));
    }
    out
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

fn background(db: &Db, workers: u32, extra: &[&str], name: &str) -> Background {
    background_launcher(db, launcher_cmd(db, workers, extra), name)
}

/// The launcher's MPI ranks (not their nurseries), by rank.
fn ranks(bg: &Background) -> HashMap<u32, i32> {
    let mut out = HashMap::new();
    for p in process_tree(bg.pid()) {
        if !cmdline(p).starts_with(
            &common::sibling_bin("balsam-mpi-launcher")
                .display()
                .to_string(),
        ) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
        let rank = env
            .split(|b| *b == 0)
            .filter_map(|e| std::str::from_utf8(e).ok()?.strip_prefix("PMI_RANK="))
            .find_map(|r| r.parse::<u32>().ok());
        if let Some(r) = rank {
            out.insert(r, p);
        }
    }
    out
}

/// The launcher's process nurseries.
fn nurseries(bg: &Background) -> Vec<i32> {
    process_tree(bg.pid())
        .into_iter()
        .filter(|p| cmdline(*p).starts_with("balsam-nursery"))
        .collect()
}

fn started(db: &Db, name: &str) -> bool {
    db.state_of(name) == "RUNNING" && workdir(db, name).join("started").exists()
}

/// A job running `tree.sh BASE SECONDS [ignore-term]`, with job options `flags`.
fn tree_job(db: &Db, name: &str, base: u32, secs: &str, ignore_term: bool, flags: &[&str]) {
    let args = format!(
        "{base} {secs}{}",
        if ignore_term { " ignore-term" } else { "" }
    );
    let mut a = vec!["--args", &args];
    a.extend_from_slice(flags);
    db.add_job(name, "tree", "tree", &a);
}

/// An application whose preprocess script is tree.sh (run by rank 0) and whose run is `true`.
fn tree_preprocess_app(db: &Db, name: &str, base: u32) {
    let exe = repo_root().join("tests/fixtures/apps/tree.sh");
    db.run(&[
        "app",
        "--name",
        name,
        "--executable",
        "true",
        "--preprocess",
        &format!("{} {base} {}", exe.display(), base + 3),
    ])
    .ok();
}

#[test]
fn a_jobs_children_die_when_it_ends_and_it_still_finishes() {
    let db = Db::new();
    tree_app(&db, "tree");
    let marks = Marked::new(&[71000]);
    let _busy = Marked::new(&[71100]);
    // It leaves its three processes behind and exits 0 after 2 s; the other job keeps the
    // launcher busy meanwhile, so what is checked is the job's end, not the launcher's.
    let two = ["--node-packing-count", "2"];
    tree_job(&db, "leaver", 71000, "2", false, &two);
    tree_job(&db, "busy", 71100, "12", false, &two);
    let mut bg = background(&db, 1, &[], "ends");
    marks.wait_all_present();
    wait_until("the job to finish", Duration::from_secs(60), || {
        db.state_of("leaver") == "JOB_FINISHED"
    });
    marks.wait_gone(Duration::from_secs(3));
    assert_eq!(db.state_of("busy"), "RUNNING", "the launcher still runs");
    assert_eq!(bg.wait(LAUNCHER_TIMEOUT), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("leaver"), "JOB_FINISHED");
    assert_eq!(job(&db, "leaver")["return_code"], 0);
}

#[test]
fn killjob_kills_a_job_that_ignores_sigterm_with_its_children_within_the_promise() {
    let db = Db::new();
    tree_app(&db, "tree");
    let marks = Marked::new(&[72000]);
    tree_job(&db, "stubborn", 72000, "72003", true, &[]);
    let id = db.job_id("stubborn");
    let mut bg = background(&db, 1, &[], "killjob");
    wait_until("the job to run", Duration::from_secs(60), || {
        started(&db, "stubborn")
    });
    marks.wait_all_present();
    let pid: i32 = common::read(&workdir(&db, "stubborn").join("started"))
        .trim()
        .parse()
        .unwrap();
    let t = Instant::now();
    db.run(&["killjob", "--id", &id]).ok();
    let gone = marks.wait_gone(Duration::from_secs(10));
    wait_until("the job's process to die", Duration::from_secs(10), || {
        !alive(pid)
    });
    let took = t.elapsed();
    println!(
        "balsam killjob started to the job's death: {took:?}; every process gone {gone:?} after \
         the command returned"
    );
    assert!(
        took < KILL_PROMISE + KILL_MARGIN,
        "the README promises {KILL_PROMISE:?}; took {took:?}"
    );
    assert_eq!(bg.wait(LAUNCHER_TIMEOUT), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("stubborn"), "USER_KILLED");
    let h = history(&db, "stubborn");
    assert!(
        h.contains(&format!(
            "process {pid} ended (killed by signal 9 (SIGKILL))"
        )),
        "the death is in the history:\n{h}"
    );
}

#[test]
fn a_job_past_its_wall_time_dies_with_its_children() {
    let db = Db::new();
    tree_app(&db, "tree");
    let marks = Marked::new(&[73000]);
    tree_job(
        &db,
        "overtime",
        73000,
        "73003",
        false,
        &["--wall-time-minutes", "1", "--disable-auto-timeout-retry"],
    );
    let mut bg = background(&db, 1, &["--enforce-wall-time"], "walltime");
    marks.wait_all_present();
    // Not "anything but RUNNING": the processes can be up before RUNNING is written.
    wait_until("the wall time to pass", Duration::from_secs(120), || {
        matches!(db.state_of("overtime").as_str(), "RUN_TIMEOUT" | "FAILED")
    });
    marks.wait_gone(Duration::from_secs(15));
    assert_eq!(bg.wait(LAUNCHER_TIMEOUT), Some(0), "{}", bg.output());
    assert_eq!(db.state_of("overtime"), "FAILED");
    let h = history(&db, "overtime");
    assert!(h.contains("wall_time_minutes"), "{h}");
}

#[test]
fn jobs_running_at_the_time_limit_die_with_their_children() {
    // On rank 0's own node (no worker rank), then on a worker.
    for (workers, base) in [(0, 74000), (1, 74500)] {
        let db = Db::new();
        tree_app(&db, "tree");
        let marks = Marked::new(&[base, base + 100]);
        for (name, b) in [("late1", base), ("late2", base + 100)] {
            let flags = ["--wall-time-minutes", "0", "--node-packing-count", "2"];
            tree_job(&db, name, b, &(b + 3).to_string(), false, &flags);
        }
        let t = Instant::now();
        let run = launcher(
            &db,
            workers,
            &["--time-limit-minutes", "0.15", "--job-mode", "serial"],
        );
        run.ok();
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
        marks.wait_gone(Duration::from_secs(15));
        for n in ["late1", "late2"] {
            let h = history(&db, n);
            assert!(h.contains("RUNNING") && h.contains("time limit"), "{h}");
        }
    }
}

#[test]
fn sigterm_to_the_launcher_leaves_no_process_of_any_job() {
    let db = Db::new();
    tree_app(&db, "tree");
    tree_preprocess_app(&db, "slow-pre", 75200);
    let marks = Marked::new(&[75000, 75100, 75200]);
    tree_job(&db, "serial", 75000, "75003", false, &[]);
    // An MPI job: rank 0 starts mpiexec, whose two ranks each leave their processes.
    tree_job(
        &db,
        "mpi",
        75100,
        "75103",
        false,
        &["--ranks-per-node", "2"],
    );
    // A preprocess script, run by rank 0, that leaves its processes too.
    db.add_job("pre", "tree", "slow-pre", &[]);
    let mut bg = background(&db, 2, &[], "sigterm");
    marks.wait_all_present();
    let running = common::wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        db.state_of("serial") == "RUNNING" && db.state_of("mpi") == "RUNNING"
    });
    assert!(running, "both jobs running:\n{}", db.run(&["ls"]).ok());
    let nurseries = nurseries(&bg);
    // SAFETY: signals the launcher this test started.
    unsafe { libc::kill(bg.pid(), libc::SIGTERM) };
    assert_eq!(bg.wait(Duration::from_secs(60)), Some(0), "{}", bg.output());
    marks.wait_gone(Duration::from_secs(15));
    // Rank 0's for MPI jobs and for scripts, and one per worker.
    assert_eq!(nurseries.len(), 4, "{nurseries:?}");
    for p in nurseries {
        assert!(!alive(p), "nursery {p} outlived the launcher");
    }
    for n in ["serial", "mpi"] {
        assert_eq!(db.state_of(n), "RESTART_READY", "{}", history(&db, n));
    }
}

/// Starts jobs that leave processes behind on rank 0 (a preprocess script; an MPI job when
/// `mpi`; the serial job when there is no worker rank) and on the workers, kills rank `victim`
/// of the launcher with SIGKILL, and checks that nothing of any job remains a few seconds later.
fn kill_9_leaves_nothing(workers: u32, mpi: bool, victim: u32, base: u32) {
    let db = Db::new();
    tree_app(&db, "tree");
    tree_preprocess_app(&db, "slow-pre", base + 200);
    db.add_job("pre", "tree", "slow-pre", &[]);
    tree_job(&db, "serial", base, &(base + 3).to_string(), false, &[]);
    let mut bases = vec![base, base + 200];
    if mpi {
        let b = base + 100;
        tree_job(
            &db,
            "mpi",
            b,
            &(b + 3).to_string(),
            false,
            &["--ranks-per-node", "2"],
        );
        bases.push(b);
    }
    let marks = Marked::new(&bases);
    let mut bg = background(&db, workers, &[], "kill9");
    marks.wait_all_present();
    let ranks = ranks(&bg);
    assert_eq!(ranks.len(), workers as usize + 1, "{ranks:?}");
    let nurseries = nurseries(&bg);
    // SAFETY: kills a rank of the launcher this test started.
    unsafe { libc::kill(ranks[&victim], libc::SIGKILL) };
    let took = marks.wait_gone(Duration::from_secs(10));
    println!("every process of the jobs gone {took:?} after the kill");
    let code = bg.wait(Duration::from_secs(60));
    assert_ne!(code, Some(0), "{}", bg.output());
    for p in nurseries {
        wait_until("the nurseries to end", Duration::from_secs(10), || {
            !alive(p)
        });
    }
}

#[test]
fn kill_9_of_rank_0_leaves_no_process_of_any_job() {
    kill_9_leaves_nothing(2, true, 0, 76000);
}

#[test]
fn kill_9_of_rank_0_running_serial_jobs_itself_leaves_nothing() {
    // No worker rank: rank 0 runs the serial job on its own node.
    kill_9_leaves_nothing(0, false, 0, 77000);
}

#[test]
fn kill_9_of_a_worker_rank_leaves_no_process_of_any_job() {
    kill_9_leaves_nothing(2, true, 1, 78000);
}

/// The helpers find what they look for (a test that cannot see the processes would pass).
#[test]
fn the_markers_find_live_processes() {
    let marks = Marked::new(&[79000]);
    let mut kids: Vec<Child> = (0..3)
        .map(|i| {
            Command::new("sleep")
                .arg((79000 + i).to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    marks.wait_all_present();
    for k in &mut kids {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    marks.wait_gone(Duration::from_secs(15));
    assert!(Path::new("/proc/self/stat").exists());
}
