//! End to end against a real Slurm 22.05 cluster (tests/slurm/cluster.sh: munged, slurmctld and
//! three slurmd for nodes n1..n3 on loopback, every file in one temporary folder): launcher jobs
//! submitted by `balsam submit-launch` and by `balsam service` go through sbatch, run
//! `balsam-mpi-launcher` under srun on the allocated nodes, and are followed with squeue.
//!
//! Every test starts its own cluster (its own folder and ports: a service adopts every batch job
//! of the user in its cluster, so no two tests may share one) and stops it when it ends, failed
//! or not, through a guard. Every command runs with a timeout; the background service is killed
//! by pid when a test ends.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    history, job, read, repo_root, run_cmd, set_settings, wait_for, Daemon, Db, Run, TIMEOUT,
};
use serde_json::Value;

/// Bound of `cluster.sh start` (it may have to install the packages first) and `stop`.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// The cluster

/// A running test cluster; stopped (by its pid files, through cluster.sh) when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    /// What env.sh exports (SLURM_CONF...).
    env: Vec<(String, String)>,
}

fn cluster_script() -> PathBuf {
    repo_root().join("tests/slurm/cluster.sh")
}

/// A port base whose four ports (slurmctld, three slurmd) are free. Each test has its own
/// `slot`, so tests running at the same time never try the same ports.
fn free_port_base(slot: u16) -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    (0..20)
        .map(|j| 17000 + 100 * j + 20 * slot)
        .find(|&base| (base..base + 4).all(free))
        .expect("no free port range for a test cluster")
}

impl Cluster {
    /// Starts a cluster in a new temporary folder.
    fn start(slot: u16) -> Cluster {
        // A short path: the munge socket inside must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("slurm-")
            .tempdir_in("/tmp")
            .unwrap();
        let base = free_port_base(slot);
        let mut cmd = Command::new("bash");
        cmd.arg(cluster_script())
            .arg("start")
            .arg(dir.path())
            .env("SLURM_PORT_BASE", base.to_string());
        let mut cluster = Cluster {
            dir,
            env: Vec::new(),
        };
        // From here on, dropping `cluster` stops whatever did start.
        let run = run_cmd(cmd, CLUSTER_TIMEOUT, None);
        assert_eq!(
            run.code,
            Some(0),
            "cluster.sh start failed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let env_sh = std::fs::read_to_string(cluster.dir.path().join("env.sh")).unwrap();
        for line in env_sh.lines() {
            if let Some((k, v)) = line
                .trim()
                .strip_prefix("export ")
                .and_then(|l| l.split_once('='))
            {
                cluster.env.push((k.to_string(), v.to_string()));
            }
        }
        assert!(
            cluster.env.iter().any(|(k, _)| k == "SLURM_CONF"),
            "env.sh exports no SLURM_CONF:\n{env_sh}"
        );
        cluster
    }

    /// Gives a command this cluster's environment (and nothing of any Slurm job the tests
    /// themselves might run in).
    fn apply(&self, c: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("SLURM_") || k.starts_with("SBATCH_") || k.starts_with("SQUEUE_") {
                c.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        // sbatch, squeue, scancel and, inside the batch job, srun.
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{path}:/usr/bin:/bin"));
    }

    /// `balsam ARGS` on `db`, talking to this cluster.
    fn balsam(&self, db: &Db, args: &[&str]) -> Command {
        let mut c = db.cmd(args);
        self.apply(&mut c);
        c
    }

    fn run(&self, db: &Db, args: &[&str]) -> Run {
        run_cmd(self.balsam(db, args), TIMEOUT, None)
    }

    /// A Slurm client command (squeue, scontrol...) against this cluster.
    fn client(&self, program: &str, args: &[&str]) -> Run {
        let mut c = Command::new(program);
        c.args(args);
        self.apply(&mut c);
        run_cmd(c, Duration::from_secs(30), None)
    }

    /// squeue and the tails of the daemons' logs, for failure messages.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        let q = self.client("squeue", &["-a", "-t", "all"]);
        s.push_str(&format!("--- squeue -t all:\n{}{}\n", q.stdout, q.stderr));
        s.push_str(&tails(&self.dir.path().join("log"), "slurmctld", 10));
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut cmd = Command::new("bash");
        cmd.arg(cluster_script()).arg("stop").arg(self.dir.path());
        let run = run_cmd(cmd, CLUSTER_TIMEOUT, None);
        if run.code != Some(0) {
            eprintln!(
                "cluster.sh stop {} failed:\n{}\n{}",
                self.dir.path().display(),
                run.stdout,
                run.stderr
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The service in the background

/// `balsam service ARGS` against the cluster, in the background (see [`Daemon`]).
fn start_service(cluster: &Cluster, db: &Db, args: &[&str]) -> Daemon {
    Daemon::start(
        cluster.balsam(db, &[&["service"], args].concat()),
        db.tmp.path().join("service.out"),
    )
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The last `n` lines of every file in `dir` whose name contains `pattern`.
fn tails(dir: &Path, pattern: &str, n: usize) -> String {
    let mut s = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return s;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(pattern))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        s.push_str(&format!("--- {}:\n", p.display()));
        for l in &lines[lines.len().saturating_sub(n)..] {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// Jobs by state, launches, launcher logs and batch job outputs, then the cluster's state: what
/// a failure message needs.
fn diagnostics(cluster: &Cluster, db: &Db) -> String {
    let mut s = String::new();
    let by_states = db.run(&["ls", "--by-states"]);
    s.push_str(&format!(
        "--- balsam ls --by-states:\n{}\n",
        by_states.stdout
    ));
    let queues = cluster.run(db, &["ls", "queues"]);
    s.push_str(&format!(
        "--- balsam ls queues:\n{}{}\n",
        queues.stdout, queues.stderr
    ));
    s.push_str(&tails(&db.path.join("qsubmit"), ".out", 30));
    s.push_str(&tails(&db.path.join("log"), "launcher-", 30));
    s.push_str(&tails(&db.path.join("log"), "service", 30));
    s.push_str(&cluster.diagnostics());
    s
}

/// SCHEDULER_CLASS = SlurmScheduler.
fn use_slurm(db: &Db) {
    set_settings(db, &[("SCHEDULER_CLASS", "SlurmScheduler".into())]);
}

fn launches(cluster: &Cluster, db: &Db) -> Vec<Value> {
    let out = cluster.run(db, &["ls", "queues", "--json"]);
    serde_json::from_str(out.ok())
        .unwrap_or_else(|e| panic!("ls queues --json: {e}:\n{}", out.stdout))
}

fn launch_state(cluster: &Cluster, db: &Db, id: i64) -> String {
    launches(cluster, db)
        .iter()
        .find(|l| l["id"] == id)
        .map(|l| l["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no launch {id}"))
}

/// How many jobs are in each state.
fn state_counts(db: &Db) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for j in db.jobs_json(&[]) {
        *m.entry(j["state"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

fn all_finished(db: &Db) -> bool {
    db.jobs_json(&[])
        .iter()
        .all(|j| j["state"] == "JOB_FINISHED")
}

/// The value of `'key': value` in submit-launch's `Submit OK: Qlaunch { ... }` (quotes removed).
fn qlaunch_field(text: &str, key: &str) -> Option<String> {
    let pat = format!("'{key}': ");
    let start = text.find(&pat)? + pat.len();
    let rest = &text[start..];
    let end = rest.find([',', '}', '\n']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('\'').to_string())
}

/// The worker rank a job's (last) RUNNING line names: `RUNNING] on HOST (rank N, pid ...`.
fn running_rank(history: &str) -> Option<u32> {
    let line = history.lines().rev().find(|l| l.contains("RUNNING]"))?;
    let after = &line[line.find("(rank ")? + "(rank ".len()..];
    after[..after.find(',')?].parse().ok()
}

fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The queue policy of the service test: the debug partition, one launch at a time, 1-3 nodes
/// for 1-10 minutes.
const POLICY: &str = r#"# Test policy: the loopback cluster's debug partition.
[debug]
submit-jobs = on
max-queued = 1
policy = [{"min-nodes": 1, "max-nodes": 3, "min-minutes": 1, "max-minutes": 10}]
"#;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn submit_launch_runs_hello_world_across_three_nodes() {
    let db = Db::new();
    let cluster = Cluster::start(0);
    use_slurm(&db);
    db.hello_app();
    // Where a job runs: srun gives each launcher rank its node's name, and the jobs a rank
    // starts inherit it. The pause keeps both workers busy at once.
    let where_sh = db.tmp.path().join("where.sh");
    write_script(
        &where_sh,
        "#!/bin/sh\nsleep 1\necho \"node $SLURMD_NODENAME nodeid $SLURM_NODEID job $SLURM_JOB_ID\"\n",
    );
    db.run(&[
        "app",
        "--name",
        "where",
        "--executable",
        where_sh.to_str().unwrap(),
    ])
    .ok();
    for i in 1..=6 {
        db.run(&[
            "job",
            "--name",
            &format!("hello{i}"),
            "--workflow",
            "test",
            "--application",
            "say-hello",
            "--args",
            &format!("world {i}!"),
            "--wall-time-minutes",
            "1",
            "--yes",
        ])
        .ok();
    }
    for i in 1..=4 {
        db.add_job(
            &format!("where{i}"),
            "test",
            "where",
            &["--wall-time-minutes", "1"],
        );
    }

    let t0 = Instant::now();
    let out = cluster.run(
        &db,
        &[
            "submit-launch",
            "-n",
            "3",
            "-t",
            "5",
            "-q",
            "debug",
            "--job-mode",
            "serial",
        ],
    );
    let text = out.ok().to_string();
    assert!(text.starts_with("Submit OK: Qlaunch {"), "{text}");
    let field = |k: &str| qlaunch_field(&text, k).unwrap_or_else(|| panic!("no {k} in {text}"));
    let sched_id = field("scheduler_id");
    assert!(
        !sched_id.is_empty() && sched_id.bytes().all(|b| b.is_ascii_digit()),
        "scheduler id {sched_id:?} in {text}"
    );
    assert_eq!(field("state"), "submitted");
    assert_eq!(field("nodes"), "3");
    assert_eq!(field("wall_minutes"), "5");
    assert_eq!(field("queue"), "debug");
    assert_eq!(field("job_mode"), "serial");
    let id: i64 = field("id").parse().unwrap();
    let script = db.path.join(format!("qsubmit/qlaunch{id}.sh"));
    assert_eq!(field("command"), script.display().to_string());

    // The rendered script, and Slurm's view of the batch job.
    let body = read(&script);
    for want in [
        "#SBATCH -N 3",
        "#SBATCH -t 5",
        "#SBATCH -p debug",
        "srun -n 3 ",
        "--job-mode=serial",
        &format!("BALSAM_DB_PATH={}", db.path.display()),
    ] {
        assert!(
            body.contains(want),
            "{} lacks {want:?}:\n{body}",
            script.display()
        );
    }
    let show = cluster.client("scontrol", &["show", "job", &sched_id]);
    let show = show.ok();
    for want in [
        format!("JobName=qlaunch{id}"),
        "NumNodes=3".to_string(),
        "Partition=debug".to_string(),
        "TimeLimit=00:05:00".to_string(),
    ] {
        assert!(
            show.contains(&want),
            "scontrol show job lacks {want}:\n{show}"
        );
    }

    // All jobs run.
    assert!(
        wait_for(Duration::from_secs(90), Duration::from_millis(300), || {
            all_finished(&db)
        }),
        "jobs not all JOB_FINISHED after 90 s: {:?}\n{}",
        state_counts(&db),
        diagnostics(&cluster, &db)
    );
    let ran_in = t0.elapsed();
    for i in 1..=6 {
        let name = format!("hello{i}");
        let j = job(&db, &name);
        assert_eq!(j["return_code"], 0, "{j}");
        let wd = PathBuf::from(j["workdir"].as_str().unwrap());
        assert_eq!(
            read(&wd.join(format!("{name}.out"))),
            format!("Hello, world {i}!\n")
        );
    }
    // Every job ran inside this batch job, on the node srun put its rank on (task r on n{r+1}:
    // one task per node, in order): on worker ranks 1 and 2, or on rank 0, which runs serial
    // jobs on its own node since no worker rank shares it.
    let mut ranks = BTreeSet::new();
    let mut nodes = BTreeSet::new();
    for i in 1..=6 {
        let h = history(&db, &format!("hello{i}"));
        let r = running_rank(&h).unwrap_or_else(|| panic!("no rank in:\n{h}"));
        assert!(r <= 2, "rank {r}:\n{h}");
        ranks.insert(r);
    }
    for i in 1..=4 {
        let name = format!("where{i}");
        let h = history(&db, &name);
        let r = running_rank(&h).unwrap_or_else(|| panic!("no rank in:\n{h}"));
        ranks.insert(r);
        let wd = PathBuf::from(job(&db, &name)["workdir"].as_str().unwrap());
        let said = read(&wd.join(format!("{name}.out")));
        assert_eq!(
            said.trim(),
            format!("node n{} nodeid {r} job {sched_id}", r + 1),
            "{name} ran on rank {r}:\n{h}"
        );
        nodes.insert(r + 1);
    }
    assert!(
        ranks.len() >= 2,
        "jobs ran on ranks {ranks:?} only, not spread over the nodes"
    );
    assert!(nodes.len() >= 2, "where-jobs ran on nodes {nodes:?} only");
    let launcher_log = tails(&db.path.join("log"), "launcher-", 1000);
    assert!(
        launcher_log.contains("3 ranks, job mode serial"),
        "{launcher_log}"
    );

    // The launcher leaves after its idle period; Slurm then lists the job as completed.
    assert!(
        wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
            launch_state(&cluster, &db, id) == "finished"
        }),
        "launch {id} not finished 60 s after its jobs:\n{}",
        diagnostics(&cluster, &db)
    );
    let ls = launches(&cluster, &db);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["scheduler_id"], sched_id.as_str());
    assert_eq!(ls[0]["from_balsam"], true);
    let show = cluster.client("scontrol", &["show", "job", &sched_id]);
    assert!(show.ok().contains("JobState=COMPLETED"), "{}", show.stdout);
    let log = tails(&db.path.join("log"), "launcher-", 1000);
    assert!(log.contains("no work left for this launcher"), "{log}");
    eprintln!(
        "10 jobs finished {:.1} s after submission, on ranks {ranks:?}",
        ran_in.as_secs_f64()
    );
}

#[test]
fn bad_partition_reaches_the_user_in_slurms_words() {
    let db = Db::new();
    let cluster = Cluster::start(1);
    use_slurm(&db);
    for (args, words) in [
        (
            ["-n", "1", "-t", "5", "-q", "nosuchpart"],
            "Invalid partition name specified",
        ),
        // debug has MaxTime=30, and n1..n3 are all the nodes there are.
        (
            ["-n", "1", "-t", "45", "-q", "debug"],
            "Requested time limit is invalid",
        ),
        (
            ["-n", "4", "-t", "5", "-q", "debug"],
            "Node count specification invalid",
        ),
    ] {
        let out = cluster.run(&db, &[&["submit-launch"], &args[..]].concat());
        let e = out.err();
        assert!(e.contains(words), "{args:?}: stderr lacks {words:?}:\n{e}");
        assert!(
            e.contains("sbatch"),
            "{args:?}: which program said it?\n{e}"
        );
        assert!(!out.stdout.contains("Submit OK"), "{}", out.stdout);
        assert!(
            e.contains("nothing was recorded"),
            "{args:?}: stderr does not say that nothing was recorded:\n{e}"
        );
    }
    // Nothing recorded, nothing left in qsubmit, nothing in Slurm's queue.
    assert_eq!(launches(&cluster, &db), Vec::<Value>::new());
    let out = cluster.run(&db, &["ls", "queues", "--json"]);
    assert_eq!(out.ok().trim(), "[]");
    let left: Vec<String> = std::fs::read_dir(db.path.join("qsubmit"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("qlaunch"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in qsubmit: {left:?}");
    let q = cluster.client("squeue", &["-h", "-t", "all"]);
    assert_eq!(q.ok().trim(), "", "Slurm has jobs");

    // The same database submits fine to a partition that exists; its launch is the only one.
    // One node in serial mode: the launcher has no worker rank, and rank 0 runs the jobs on its
    // own node.
    db.hello_app();
    for i in 1..=3 {
        db.add_job(&format!("one{i}"), "one", "say-hello", &[]);
    }
    let out = cluster.run(
        &db,
        &[
            "submit-launch",
            "-n",
            "1",
            "-t",
            "5",
            "-q",
            "batch",
            "--job-mode",
            "serial",
        ],
    );
    let text = out.ok().to_string();
    assert_eq!(qlaunch_field(&text, "queue").as_deref(), Some("batch"));
    let ls = launches(&cluster, &db);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["queue"], "batch");
    assert!(
        wait_for(Duration::from_secs(60), Duration::from_millis(300), || {
            all_finished(&db)
        }),
        "a 1-node serial launch did not run its jobs: {:?}\n{}",
        state_counts(&db),
        diagnostics(&cluster, &db)
    );
    for i in 1..=3 {
        let h = history(&db, &format!("one{i}"));
        assert_eq!(running_rank(&h), Some(0), "{h}");
    }
}

#[test]
fn service_submits_launchers_for_50_jobs_and_then_stays_idle() {
    let db = Db::new();
    let cluster = Cluster::start(2);
    use_slurm(&db);
    std::fs::write(db.path.join("policy.ini"), POLICY).unwrap();
    set_settings(&db, &[("QUEUE_POLICY", "policy.ini".into())]);
    db.hello_app();
    let lines: Vec<String> = (1..=50)
        .map(|i| {
            format!(
                "{{\"name\": \"hello{i}\", \"workflow\": \"many\", \"application\": \"say-hello\", \
                 \"args\": \"world {i}!\", \"wall_time_minutes\": 1, \"node_packing_count\": 4}}"
            )
        })
        .collect();
    std::fs::write(db.tmp.path().join("jobs.jsonl"), lines.join("\n")).unwrap();
    let out = db.run(&["job", "--from-file", "jobs.jsonl"]);
    assert!(out.ok().contains("Added 50 jobs"), "{}", out.stdout);

    let t0 = Instant::now();
    let mut service = start_service(&cluster, &db, &["--period", "1"]);
    // One service per database.
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            std::fs::read_to_string(db.path.join("service.lock"))
                .is_ok_and(|s| s.trim() == service.pid().to_string())
        }),
        "the service did not take its lock:\n{}",
        service.output()
    );
    let second = cluster.run(&db, &["service", "--once"]);
    let e = second.err();
    assert_eq!(second.code, Some(1), "{e}");
    assert!(e.contains("already running"), "{e}");
    assert!(service.running(), "{}", service.output());

    assert!(
        wait_for(Duration::from_secs(120), Duration::from_millis(500), || {
            all_finished(&db)
        }),
        "jobs not all JOB_FINISHED after 120 s: {:?}\n{}\n{}",
        state_counts(&db),
        service.output(),
        diagnostics(&cluster, &db)
    );
    let ran_in = t0.elapsed();
    for i in [1, 17, 50] {
        let name = format!("hello{i}");
        let wd = PathBuf::from(job(&db, &name)["workdir"].as_str().unwrap());
        assert_eq!(
            read(&wd.join(format!("{name}.out"))),
            format!("Hello, world {i}!\n")
        );
    }
    let service_log =
        || std::fs::read_to_string(db.path.join("log/service.log")).unwrap_or_default();
    let log = service_log();
    assert!(
        log.lines()
            .any(|l| l.contains("decision:") && l.contains("submitting")),
        "no submitting decision in service.log:\n{log}"
    );
    assert!(log.contains("as slurm job"), "{log}");

    // What it submitted fits the policy and ran in the debug partition, as batch jobs of ours.
    let submitted: Vec<Value> = launches(&cluster, &db)
        .into_iter()
        .filter(|l| l["from_balsam"] == true)
        .collect();
    assert!(!submitted.is_empty(), "{}", diagnostics(&cluster, &db));
    for l in &submitted {
        let nodes = l["nodes"].as_u64().unwrap();
        let wall = l["wall_minutes"].as_u64().unwrap();
        assert!((1..=3).contains(&nodes), "{l}");
        assert!((1..=10).contains(&wall), "{l}");
        assert_eq!(l["queue"], "debug", "{l}");
        assert!(
            l["reason"].as_str().unwrap().contains("submitting"),
            "the launch does not carry the decision: {l}"
        );
        let id = l["scheduler_id"].as_str().unwrap();
        let show = cluster.client("scontrol", &["show", "job", id]);
        let show = show.ok();
        assert!(
            show.contains(&format!("NumNodes={nodes} ")) && show.contains("Partition=debug"),
            "{show}"
        );
    }
    // Nothing else of ours in Slurm's queue.
    let all_ids: BTreeSet<String> = cluster
        .client("squeue", &["-h", "-t", "all", "-o", "%i"])
        .ok()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    let ours: BTreeSet<String> = submitted
        .iter()
        .map(|l| l["scheduler_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all_ids, ours);

    // The launchers leave after their idle period; the service sees their batch jobs end.
    for l in &submitted {
        let id = l["id"].as_i64().unwrap();
        let seen = wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
            service_log().lines().any(|line| {
                line.contains(&format!("launch {id}: ")) && line.ends_with("-> finished")
            })
        });
        assert!(
            seen,
            "the service did not see launch {id} finish:
{}",
            diagnostics(&cluster, &db)
        );
    }
    // Idle: no work and a free place in the queue, yet a few more periods submit nothing.
    let before = submitted.len();
    let submissions = |log: &str| log.matches("as slurm job").count();
    let logged = submissions(&service_log());
    std::thread::sleep(Duration::from_secs(4));
    assert!(service.running(), "{}", service.output());
    let after: Vec<Value> = launches(&cluster, &db)
        .into_iter()
        .filter(|l| l["from_balsam"] == true)
        .collect();
    assert_eq!(after.len(), before, "submitted while idle: {after:?}");
    assert!(after.iter().all(|l| l["state"] == "finished"), "{after:?}");
    let log = service_log();
    assert_eq!(submissions(&log), logged, "submitted while idle:\n{log}");
    assert!(
        log.contains("decision: no runnable jobs"),
        "the idle decision is not logged:\n{log}"
    );

    // SIGTERM stops it cleanly, at once.
    let (code, took) = service.stop(libc::SIGTERM, Duration::from_secs(10));
    assert_eq!(code, Some(0), "after {took:?}:\n{}", service.output());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let log = service_log();
    assert!(log.contains("service stopped"), "{log}");
    // The lock went with it.
    let once = cluster.run(&db, &["service", "--once"]);
    once.ok();
    if let Some(d) = log
        .lines()
        .find(|l| l.contains("decision:") && l.contains("submitting"))
    {
        eprintln!("{d}");
    }
    eprintln!(
        "50 jobs finished {:.1} s after the service started, in {} launches: {:?}",
        ran_in.as_secs_f64(),
        submitted.len(),
        submitted
            .iter()
            .map(|l| format!("{} nodes x {} min", l["nodes"], l["wall_minutes"]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn time_limit_leaves_jobs_restart_ready_and_the_next_launcher_finishes_them() {
    let db = Db::new();
    let cluster = Cluster::start(3);
    use_slurm(&db);
    // First run: leave a mark, then sleep past any allocation. A rerun finds the mark and ends.
    let slow = db.tmp.path().join("slow.sh");
    write_script(
        &slow,
        "#!/bin/sh\nif [ -e marker ]; then echo \"second run on $SLURMD_NODENAME\"; exit 0; fi\n\
         touch marker\necho \"first run on $SLURMD_NODENAME\"\nexec sleep 300\n",
    );
    db.run(&[
        "app",
        "--name",
        "slow",
        "--executable",
        slow.to_str().unwrap(),
    ])
    .ok();
    db.add_job("slow", "tl", "slow", &["--wall-time-minutes", "1"]);

    // The shipped template without the launcher's own time limit: what ends the launcher is
    // Slurm's, by SIGTERM to every process of the job (KillWait=10 s before SIGKILL).
    // `balsam init` puts a copy of the shipped template in job-templates/ for users to edit.
    let copy = db.path.join("job-templates/slurm.tmpl");
    let shipped = if copy.is_file() {
        read(&copy)
    } else {
        read(&repo_root().join("cobalt/templates/slurm.tmpl"))
    };
    let own_limit =
        " --time-limit-minutes={{ time_minutes - 2 if time_minutes >= 4 else time_minutes / 2 }}";
    assert!(
        shipped.contains(own_limit),
        "slurm.tmpl changed; update this test"
    );
    let template = db.tmp.path().join("no-time-limit.tmpl");
    std::fs::write(&template, shipped.replace(own_limit, "")).unwrap();
    set_settings(
        &db,
        &[("JOB_TEMPLATE", template.display().to_string().into())],
    );

    let t0 = Instant::now();
    let out = cluster.run(
        &db,
        &[
            "submit-launch",
            "-n",
            "2",
            "-t",
            "1",
            "-q",
            "debug",
            "--job-mode",
            "serial",
        ],
    );
    let text = out.ok().to_string();
    let id1: i64 = qlaunch_field(&text, "id").unwrap().parse().unwrap();
    let sched1 = qlaunch_field(&text, "scheduler_id").unwrap();
    let body = read(&db.path.join(format!("qsubmit/qlaunch{id1}.sh")));
    assert!(
        !body.contains("--time-limit-minutes") && body.contains("srun -n 2 "),
        "{body}"
    );
    assert!(
        wait_for(Duration::from_secs(30), Duration::from_millis(300), || {
            db.state_of("slow") == "RUNNING"
        }),
        "the job did not start:\n{}",
        diagnostics(&cluster, &db)
    );
    // Slurm ends the batch job 60-90 s after it starts (whole minutes, checked every 30 s).
    assert!(
        wait_for(Duration::from_secs(150), Duration::from_secs(1), || {
            launch_state(&cluster, &db, id1) == "finished"
        }),
        "launch {id1} not finished after 150 s:\n{}",
        diagnostics(&cluster, &db)
    );
    let ended_after = t0.elapsed();
    let show = cluster.client("scontrol", &["show", "job", &sched1]);
    assert!(
        show.ok().contains("JobState=TIMEOUT"),
        "Slurm did not end it for its time limit:\n{}",
        show.stdout
    );
    let out1 = read(&db.path.join(format!("qsubmit/qlaunch{id1}.out")));
    assert!(out1.contains("DUE TO TIME LIMIT"), "{out1}");
    // The launcher's log says so once the launcher is gone; SIGKILL comes 10 s after SIGTERM.
    let logged = wait_for(Duration::from_secs(15), Duration::from_millis(300), || {
        tails(&db.path.join("log"), "launcher-", 1000).contains("signal received: stopping")
    });
    assert!(logged, "{}", diagnostics(&cluster, &db));
    let h = history(&db, "slow");
    assert_eq!(
        db.state_of("slow"),
        "RESTART_READY",
        "{h}\n{}",
        diagnostics(&cluster, &db)
    );
    let run_timeout = h.find("RUN_TIMEOUT]").unwrap_or_else(|| panic!("{h}"));
    let restart = h.find("RESTART_READY]").unwrap_or_else(|| panic!("{h}"));
    assert!(run_timeout < restart, "{h}");
    assert!(!h.contains("RUN_ERROR") && !h.contains("FAILED"), "{h}");
    assert!(job(&db, "slow")["lease_session"].is_null());

    // The next launcher, from the shipped template (1 node, mixed mode: the master starts the
    // job with srun as a step of its own), finishes it.
    set_settings(&db, &[("JOB_TEMPLATE", "".into())]);
    let out = cluster.run(&db, &["submit-launch", "-n", "1", "-t", "5", "-q", "debug"]);
    let text = out.ok().to_string();
    let id2: i64 = qlaunch_field(&text, "id").unwrap().parse().unwrap();
    assert_ne!(id1, id2);
    assert!(
        wait_for(Duration::from_secs(60), Duration::from_millis(300), || {
            db.state_of("slow") == "JOB_FINISHED"
        }),
        "the second launcher did not finish the job:\n{}\n{}",
        history(&db, "slow"),
        diagnostics(&cluster, &db)
    );
    let j = job(&db, "slow");
    assert_eq!(j["return_code"], 0);
    let h = history(&db, "slow");
    assert!(
        h.rfind("RESTART_READY]").unwrap() < h.rfind("RUNNING]").unwrap(),
        "{h}"
    );
    let wd = PathBuf::from(j["workdir"].as_str().unwrap());
    let said = read(&wd.join("slow.out"));
    assert!(said.contains("second run on n1"), "{said}");
    eprintln!(
        "Slurm ended the first launch {:.1} s after submission; the job finished {:.1} s after",
        ended_after.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
