//! Many hosts, for real: a "login" host with the PostgreSQL server, the CLI and the service, and
//! two "compute" hosts where launchers run, each a network namespace with its own host name,
//! joined to the login host only by TCP over a veth link (tests/netns/hosts.sh). The database
//! directory sits on the file system they all share, as on a site.
//!
//! Each test builds its own set of namespaces (its own addresses in 10.233.N.0/24) and a server
//! of its own, and removes both when it ends, also when it fails. Every command runs under a
//! timeout and every launcher under MPIEXEC_TIMEOUT. Needs root (network namespaces).

mod common;
mod private_server;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{read, repo_root, run_cmd, sibling_bin, wait_for, Daemon, Run};
use private_server::{is_root, PgDb};
use serde_json::Value;

/// Bound of one launcher run.
const LAUNCHER_TIMEOUT: Duration = Duration::from_secs(200);

/// A set of namespaces: a login host and compute hosts c1 and c2. Removed when dropped.
struct Hosts {
    n: u32,
}

impl Hosts {
    /// Builds set `n` (removing what is left of an earlier one first).
    fn new(n: u32) -> Hosts {
        let r = run_cmd(
            Hosts::script(&["setup", &n.to_string()]),
            common::TIMEOUT,
            None,
        );
        let hosts = Hosts { n };
        r.ok();
        hosts
    }

    fn script(args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(repo_root().join("tests/netns/hosts.sh")).args(args);
        c
    }

    /// The login host's address, where the database server listens.
    fn login_address(&self) -> String {
        format!("10.233.{}.1", self.n)
    }

    /// `cmd` run on `host` instead (same environment and working directory).
    fn on(&self, host: &str, cmd: Command) -> Command {
        let mut c = Hosts::script(&["run", &self.n.to_string(), host]);
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Cuts (`false`) or restores a compute host's link.
    fn link(&self, host: &str, up: bool) {
        run_cmd(
            Hosts::script(&[
                "link",
                &self.n.to_string(),
                host,
                if up { "up" } else { "down" },
            ]),
            common::TIMEOUT,
            None,
        )
        .ok();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let r = run_cmd(
            Hosts::script(&["teardown", &self.n.to_string()]),
            common::TIMEOUT,
            None,
        );
        if r.code != Some(0) {
            eprintln!("tearing down namespaces {}: {r:?}", self.n);
        }
    }
}

/// A campaign on a login host's private server, driven from the login host.
struct Site {
    /// Dropped before the hosts: the server stops by its pid, then the namespaces go.
    pg: PgDb,
    hosts: Hosts,
}

impl Site {
    /// Namespaces of set `n` and `balsam init --postgres` on the login host, with the server
    /// known by the login host's address.
    fn new(n: u32) -> Option<Site> {
        if !is_root() {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        sibling_bin("balsam-mpi-launcher");
        let hosts = Hosts::new(n);
        let addr = hosts.login_address();
        let pg = PgDb::init_with(&["--pg-host", &addr], |c| hosts.on("login", c));
        assert_eq!(pg.info()["host"], Value::from(addr.clone()));
        // The service runs transitions and expiry, and submits nothing.
        let policy = read(&pg.path.join("job-templates/local_policy.ini"))
            .replace("submit-jobs = on", "submit-jobs = off");
        std::fs::write(pg.path.join("nosubmit.ini"), policy).unwrap();
        common::set_settings(&pg.db, &[("QUEUE_POLICY", Value::from("nosubmit.ini"))]);
        Some(Site { pg, hosts })
    }

    /// `balsam ARGS` on `host`.
    fn balsam(&self, host: &str, args: &[&str]) -> Command {
        self.hosts.on(host, self.pg.cmd(args))
    }

    /// Runs `balsam ARGS` on the login host.
    fn run(&self, args: &[&str]) -> Run {
        run_cmd(self.balsam("login", args), common::TIMEOUT, None)
    }

    /// Adds a job from the login host; its id.
    fn add_job(&self, name: &str, wf: &str, app: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "job",
            "--name",
            name,
            "--workflow",
            wf,
            "--app",
            app,
            "--yes",
        ];
        args.extend_from_slice(extra);
        self.run(&args).ok();
        self.job(name)["job_id"].as_str().unwrap().to_string()
    }

    fn jobs(&self) -> Vec<Value> {
        let r = self.run(&["ls", "--json"]);
        serde_json::from_str(r.ok()).unwrap()
    }

    fn job(&self, name: &str) -> Value {
        self.jobs()
            .into_iter()
            .find(|j| j["name"] == name)
            .unwrap_or_else(|| panic!("no job {name}"))
    }

    fn states(&self) -> HashMap<String, String> {
        self.jobs()
            .iter()
            .map(|j| {
                (
                    j["name"].as_str().unwrap().to_string(),
                    j["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// `ls --history` of the job with exactly this name (`--name` matches substrings).
    fn history(&self, name: &str) -> String {
        let all = self
            .run(&["ls", "--history", "--name", name])
            .ok()
            .to_string();
        let start = all
            .find(&format!("Job {name} ["))
            .unwrap_or_else(|| panic!("no history of {name}:\n{all}"));
        let rest = &all[start..];
        rest[..rest[1..].find("\nJob ").map_or(rest.len(), |i| i + 1)].to_string()
    }

    /// The service, on the login host.
    fn service(&self) -> Daemon {
        Daemon::start(
            self.balsam("login", &["service"]),
            self.pg.tmp.path().join("service.out"),
        )
    }

    /// A launcher with 2 workers on `host`, in the background.
    fn launcher(&self, host: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["launcher", "--num-workers", "2", "--consume-all"];
        args.extend_from_slice(extra);
        let mut c = self.pg.cmd(&args);
        c.env(
            "MPIEXEC_TIMEOUT",
            (LAUNCHER_TIMEOUT.as_secs() - 10).to_string(),
        );
        Daemon::start(
            self.hosts.on(host, c),
            self.pg.tmp.path().join(format!("launcher-{host}.out")),
        )
    }

    /// A script that records each run of a job in `log`: `start`, then `alive` every half
    /// second for `halves` half seconds, then `end`, each line `WHAT NAME HOST PID TIME`. The
    /// last line of a run tells until when it ran, even if it was killed.
    fn recording_app(&self, name: &str, halves: u32, log: &Path) {
        let script = self.pg.tmp.path().join(format!("{name}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nh=$(hostname)\nsay() {{ echo \"$1 $2 $h $$ $(date +%s.%N)\" >> {log}; }}\nsay start \"$1\"\ni=0\nwhile [ $i -lt {halves} ]; do sleep 0.5; say alive \"$1\"; i=$((i + 1)); done\nsay end \"$1\"\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.run(&[
            "app",
            "--name",
            name,
            "--executable",
            script.to_str().unwrap(),
        ])
        .ok();
    }
}

/// Waits for a background command to exit by itself; its exit code (None when it had to be
/// killed at `timeout`).
fn wait_exit(d: &mut Daemon, timeout: Duration) -> Option<i32> {
    let t = Instant::now();
    while d.running() && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(100));
    }
    d.stop(0, Duration::from_secs(1)).0
}

/// One run of a job, from a recording app's log.
#[derive(Debug, Clone)]
struct RunRecord {
    host: String,
    start: f64,
    /// The time of its last line.
    last: f64,
    /// It ran to its end.
    ended: bool,
}

/// The runs of each job in a recording app's log.
fn runs(log: &Path) -> HashMap<String, Vec<RunRecord>> {
    let mut out: HashMap<String, Vec<RunRecord>> = HashMap::new();
    let mut open: HashMap<(String, String, String), usize> = HashMap::new();
    for l in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (name, host, pid, time) = (f[1], f[2], f[3], f[4].parse::<f64>().unwrap());
        let key = (name.to_string(), host.to_string(), pid.to_string());
        let v = out.entry(name.to_string()).or_default();
        if f[0] == "start" {
            open.insert(key, v.len());
            v.push(RunRecord {
                host: host.to_string(),
                start: time,
                last: time,
                ended: false,
            });
        } else if let Some(&i) = open.get(&key) {
            v[i].last = time;
            v[i].ended = f[0] == "end";
        }
    }
    out
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn workdir(site: &Site, name: &str) -> PathBuf {
    PathBuf::from(site.job(name)["workdir"].as_str().unwrap())
}

#[test]
fn the_talks_hello_world_and_dag_run_on_a_compute_host() {
    let Some(site) = Site::new(1) else { return };
    // The CLI on the login host: the talk's hello world...
    site.run(&["app", "--name", "say-hello", "--executable", "echo Hello,"])
        .ok();
    for i in 1..=10 {
        site.add_job(
            &format!("test{i}"),
            "test",
            "say-hello",
            &["--args", &format!("world {i}!")],
        );
    }
    // ... and the A -> B,C,D -> E workflow.
    let dag = repo_root().join("tests/fixtures/apps/dag.sh");
    for step in ["generate", "simulate", "reduce"] {
        let exe = format!("{} {step}", dag.display());
        site.run(&["app", "--name", step, "--executable", &exe])
            .ok();
    }
    let a = site.add_job("A", "dag", "generate", &[]);
    let mut mids = Vec::new();
    for n in ["B", "C", "D"] {
        mids.push(site.add_job(
            n,
            "dag",
            "simulate",
            &["--args", n, "--input-files", &format!("{n}.inp")],
        ));
    }
    let e = site.add_job("E", "dag", "reduce", &["--input-files", "*.out"]);
    for m in &mids {
        site.run(&["dep", &a, m]).ok();
        site.run(&["dep", m, &e]).ok();
    }
    // From a compute host the server is seen, but not managed: it runs on the login host.
    let login = site.hosts.login_address();
    let st = run_cmd(
        site.balsam("c1", &["server", "status"]),
        common::TIMEOUT,
        None,
    );
    assert!(
        st.ok().contains(&format!("answers (it runs on {login})")),
        "{st:?}"
    );
    let stop = run_cmd(
        site.balsam("c1", &["server", "stop"]),
        common::TIMEOUT,
        None,
    );
    assert!(stop.ok().contains("stop it there"), "{stop:?}");
    let start = run_cmd(
        site.balsam("c1", &["server", "start"]),
        common::TIMEOUT,
        None,
    );
    assert!(
        start.err().contains(&format!("runs on {login}")),
        "{start:?}"
    );
    assert!(site.pg.postmaster().is_some());
    let _service = site.service();
    let mut launcher = site.launcher("c1", &["--idle-exit-seconds", "3"]);
    assert_eq!(
        wait_exit(&mut launcher, LAUNCHER_TIMEOUT),
        Some(0),
        "{}",
        launcher.output()
    );
    let st = site.states();
    assert_eq!(st.len(), 15);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    for i in 1..=10 {
        let name = format!("test{i}");
        assert_eq!(
            read(&workdir(&site, &name).join(format!("{name}.out"))),
            format!("Hello, world {i}!\n")
        );
    }
    assert_eq!(
        read(&workdir(&site, "E").join("E.out")),
        "simulated input for B\nsimulated input for C\nsimulated input for D\n"
    );
    // They ran on the compute host.
    let h = site.history("test1");
    assert!(h.contains("RUNNING] on c1"), "{h}");
}

/// Jobs of a compute host cut off mid-run come back after the lease expiry, and a launcher on
/// the other compute host finishes them. While cut off, the host's commands fail in bounded
/// time.
#[test]
fn a_cut_off_compute_host_gives_its_jobs_back_after_the_lease_expiry() {
    let Some(site) = Site::new(2) else { return };
    common::set_settings(&site.pg.db, &[("LEASE_EXPIRY_SECONDS", Value::from(6))]);
    let log = site.pg.tmp.path().join("runs.log");
    site.recording_app("work", 6, &log);
    let n = 12;
    for i in 0..n {
        site.add_job(
            &format!("w{i}"),
            "cut",
            "work",
            &["--args", &format!("w{i}")],
        );
    }
    let _service = site.service();
    let mut c1 = site.launcher("c1", &["--idle-exit-seconds", "3"]);
    let mut running = None;
    assert!(
        wait_for(Duration::from_secs(90), Duration::from_millis(100), || {
            running = site
                .states()
                .into_iter()
                .find(|(_, s)| s == "RUNNING")
                .map(|(n, _)| n);
            running.is_some()
        }),
        "c1 runs jobs:\n{}",
        c1.output()
    );
    site.hosts.link("c1", false);
    let cut = now_s();
    let running = running.unwrap();

    // Cut off: a command on c1 fails in bounded time, naming the server.
    let t = Instant::now();
    let r = run_cmd(site.balsam("c1", &["ls"]), common::TIMEOUT, None);
    let took = t.elapsed();
    let e = r.err();
    assert!(
        e.contains(&site.pg.address()) && e.contains("balsam server start"),
        "{e}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // The service on the login host expires c1's session; a launcher on c2 finishes its jobs.
    let mut c2 = site.launcher("c2", &["--idle-exit-seconds", "5"]);
    assert_eq!(
        wait_exit(&mut c2, LAUNCHER_TIMEOUT),
        Some(0),
        "{}",
        c2.output()
    );
    let st = site.states();
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    // The job seen RUNNING on c1 when the link went down came back when its lease expired,
    // and ran again on c2.
    let h = site.history(&running);
    let order = [
        "RUNNING] on c1",
        "RESTART_READY]",
        "lease expired",
        "RUNNING] on c2",
        "JOB_FINISHED]",
    ];
    let mut at = 0;
    for want in order {
        at += h[at..]
            .find(want)
            .unwrap_or_else(|| panic!("{running}: no {want:?} after the cut:\n{h}"));
    }
    // Jobs c1 held but had not recorded as started (it started them cut off, or not at all)
    // went back without a restart; no job ran more than once on each host.
    let runs = runs(&log);
    assert_eq!(runs.len(), n);
    for (name, r) in &runs {
        let on_c1 = r.iter().filter(|x| x.host == "c1").count();
        let on_c2 = r.iter().filter(|x| x.host == "c2").count();
        assert!(on_c1 <= 1 && on_c2 <= 1, "{name}: {r:?}");
        assert!(r.iter().any(|x| x.ended), "{name} ran to its end: {r:?}");
        assert!(
            r.iter().all(|x| x.host == "c1" || x.start > cut),
            "c2 ran only after the cut: {name}: {r:?}"
        );
    }
    // c1, reconnected, finds its session expired and stops without writing.
    site.hosts.link("c1", true);
    assert!(
        wait_exit(&mut c1, Duration::from_secs(90)).is_some(),
        "c1's launcher stops once it learns its session expired:\n{}",
        c1.output()
    );
    assert!(site.states().values().all(|s| s == "JOB_FINISHED"));
}

/// A launcher cut off from the database must stop its jobs once it could not renew its lease
/// for about the lease expiry (fence itself): otherwise, when the lease expires and another
/// launcher takes the job, two copies of the job run at once.
#[test]
fn a_cut_off_launcher_stops_its_jobs_before_another_takes_them() {
    let Some(site) = Site::new(4) else { return };
    let expiry = 6.0;
    common::set_settings(
        &site.pg.db,
        &[("LEASE_EXPIRY_SECONDS", Value::from(expiry as u64))],
    );
    let log = site.pg.tmp.path().join("runs.log");
    // Longer than the expiry and the time another launcher needs to take the job over.
    site.recording_app("long", 80, &log);
    for i in 0..2 {
        site.add_job(
            &format!("l{i}"),
            "fence",
            "long",
            &["--args", &format!("l{i}")],
        );
    }
    let _service = site.service();
    let mut c1 = site.launcher("c1", &["--idle-exit-seconds", "3"]);
    assert!(
        wait_for(Duration::from_secs(90), Duration::from_millis(200), || {
            runs(&log).len() == 2
        }),
        "c1 runs both jobs:\n{}",
        c1.output()
    );
    site.hosts.link("c1", false);
    let mut c2 = site.launcher("c2", &["--idle-exit-seconds", "5"]);
    assert_eq!(
        wait_exit(&mut c2, LAUNCHER_TIMEOUT),
        Some(0),
        "{}",
        c2.output()
    );
    site.hosts.link("c1", true);
    let code = wait_exit(&mut c1, Duration::from_secs(90));
    let out = c1.output();
    assert_eq!(code, Some(3), "c1 stops with the lost-session code:\n{out}");
    assert!(
        out.contains("could not renew its lease"),
        "c1 says why it stopped its jobs:\n{out}"
    );
    let runs = runs(&log);
    for (name, r) in &runs {
        for (i, a) in r.iter().enumerate() {
            for b in &r[i + 1..] {
                let overlap = a.start < b.last && b.start < a.last;
                assert!(
                    !overlap,
                    "two copies of {name} ran at once: {a:?} and {b:?}; the launcher cut off from the database did not stop its jobs (fence itself) before its lease expired"
                );
            }
        }
    }
    assert!(site.states().values().all(|s| s == "JOB_FINISHED"));
}

#[test]
fn two_launchers_on_two_compute_hosts_run_every_job_once() {
    let Some(site) = Site::new(3) else { return };
    let log = site.pg.tmp.path().join("runs.log");
    // Each run appends one line, "NAME HOST PID", with no process started but the shell.
    let script = site.pg.tmp.path().join("append.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread host < /proc/sys/kernel/hostname\necho \"$1 $host $$\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    site.run(&[
        "app",
        "--name",
        "append",
        "--executable",
        script.to_str().unwrap(),
    ])
    .ok();
    // More jobs than one launcher leases at a time, so that both lease from the same pool.
    let n = 1200;
    let lines: String = (0..n)
        .map(|i| format!("{{\"name\": \"j{i}\", \"workflow\": \"two\", \"application\": \"append\", \"args\": \"j{i}\"}}\n"))
        .collect();
    let file = site.pg.tmp.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    site.run(&["job", "--from-file", file.to_str().unwrap(), "--yes"])
        .ok();
    let mut a = site.launcher("c1", &["--idle-exit-seconds", "2"]);
    let mut b = site.launcher("c2", &["--idle-exit-seconds", "2"]);
    assert_eq!(
        wait_exit(&mut a, LAUNCHER_TIMEOUT),
        Some(0),
        "{}",
        a.output()
    );
    assert_eq!(
        wait_exit(&mut b, LAUNCHER_TIMEOUT),
        Some(0),
        "{}",
        b.output()
    );
    let st = site.states();
    assert_eq!(st.len(), n);
    assert!(st.values().all(|s| s == "JOB_FINISHED"), "{st:?}");
    let text = read(&log);
    let mut seen: HashMap<&str, &str> = HashMap::new();
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let Some(before) = seen.insert(f[0], f[1]) {
            panic!("{} ran twice: on {before} and on {}", f[0], f[1]);
        }
        *per_host.entry(f[1]).or_default() += 1;
    }
    assert_eq!(seen.len(), n, "every job ran");
    assert!(
        per_host.contains_key("c1") && per_host.contains_key("c2"),
        "both hosts ran jobs: {per_host:?}"
    );
}
