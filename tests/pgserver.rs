//! The private PostgreSQL server of a database directory, end to end: `balsam init --postgres`,
//! `balsam server start|stop|status`, `balsamactivate`, `balsam init --db-url` with the password
//! in the URL, PGPASSFILE or ~/.pgpass, what it refuses without the password, and a 30 s outage
//! in the middle of a launcher run. Each test has a server of its own, stopped by its pid when
//! the test ends, whatever happens; every command runs under a timeout.

mod common;
mod private_server;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{balsam_bin, read, repo_root, run_cmd, sibling_bin, states, wait_for, Daemon, Db};
use private_server::{alive, is_root, uid_of, PgDb, TreeGuard};
use serde_json::Value;

/// What the issue allows a command that cannot reach the server.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(10);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A free TCP port below the kernel's range for outgoing connections.
fn free_port() -> u16 {
    (20_000..30_000)
        .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .unwrap()
}

#[test]
fn init_postgres_makes_a_private_server_that_wants_its_password() {
    let pg = PgDb::new(&[]);
    let out = &pg.init.stdout;
    assert!(out.contains("Launching Balsam DB server"), "{out}");
    assert!(out.contains("server started"), "{out}");
    assert!(out.contains(&format!("PostgreSQL server at {}", pg.address())));
    assert!(
        !pg.init.stderr.contains("can be read by other users"),
        "a directory init made itself is private: {}",
        pg.init.stderr
    );
    let password = pg.password();
    assert!(password.len() >= 32, "a long generated password");
    assert!(
        !out.contains(&password) && !pg.init.stderr.contains(&password),
        "the password is never printed"
    );
    assert!(!read(&pg.path.join("server-info")).contains(&password));

    // The password file: mode 0600, the caller's.
    let pgpass = pg.path.join("pgpass");
    assert_eq!(mode(&pgpass), 0o600);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(std::fs::metadata(&pgpass).unwrap().uid(), unsafe {
        libc::geteuid()
    });

    // Every connection must prove the password: no `trust`, no `peer`, TCP lines only.
    let hba = read(&pg.data_dir().join("pg_hba.conf"));
    let rules: Vec<&str> = hba
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(!rules.is_empty());
    for r in &rules {
        assert!(
            r.starts_with("host ") && r.ends_with("scram-sha-256"),
            "{r}"
        );
    }

    // As root, the server runs as `postgres`, which owns its data (mode 0700).
    let pid = pg.postmaster().expect("the server runs");
    if is_root() {
        let info = pg.info();
        assert_eq!(info["os_user"], "postgres");
        assert!(out.contains("runs as the user postgres"), "{out}");
        let pg_uid = std::fs::metadata(pg.data_dir()).unwrap().uid();
        assert_ne!(pg_uid, 0);
        assert_eq!(uid_of(pid), pg_uid);
        assert_eq!(mode(&pg.data_dir()), 0o700);
    }
    pg.run(&["app", "--name", "hello", "--executable", "echo hi"])
        .ok();

    // Without the password: refused by the server, and said so.
    let home = pg.tmp.path().join("empty-home");
    std::fs::create_dir(&home).unwrap();
    let other = pg.tmp.path().join("no-password");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(pg.path.join("server-info"), other.join("server-info")).unwrap();
    let ls = |dir: &Path| {
        let mut c = Command::new(balsam_bin());
        c.args(["ls", "apps", "--db"])
            .arg(dir)
            .env("HOME", &home)
            .env_remove("PGPASSFILE")
            .env_remove("PGPASSWORD");
        let t = Instant::now();
        (run_cmd(c, common::TIMEOUT, None), t.elapsed())
    };
    let (r, took) = ls(&other);
    let e = r.err();
    assert!(
        e.contains("refused the connection") && e.contains("password"),
        "{e}"
    );
    assert!(took < UNREACHABLE_BOUND, "took {took:?}");
    // A wrong password.
    let i = pg.info();
    std::fs::write(
        other.join("pgpass"),
        format!(
            "{}:{}:*:*:not-{password}\n",
            i["host"].as_str().unwrap(),
            i["port"]
        ),
    )
    .unwrap();
    let e = ls(&other).0.err().to_string();
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains(&password));
    // The right one, from the database directory's pgpass.
    assert!(ls(&pg.path).0.ok().contains("hello"));
}

#[test]
fn init_postgres_in_a_folder_others_can_read_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shared-db");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new(balsam_bin());
    c.arg("init")
        .arg(&dir)
        .args(["--postgres", "--pg-host", "127.0.0.1"]);
    let r = run_cmd(c, private_server::INIT_TIMEOUT, None);
    // Stop the server whatever the outcome.
    let pid = private_server::postmaster_pid(&dir.join("balsamdb"));
    let stop = scopeguard(move || {
        if let Some(p) = pid {
            private_server::stop_pid(p)
        }
    });
    r.ok();
    assert!(
        r.stderr.contains("warning:")
            && r.stderr.contains("can be read by other users")
            && r.stderr.contains("chmod o-rw"),
        "{}",
        r.stderr
    );
    drop(stop);
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

#[test]
fn server_start_stop_status_and_a_command_while_it_is_down() {
    // The default host: this machine's name.
    let port = free_port();
    let pg = PgDb::init_with(&["--pg-port", &port.to_string()], |c| c);
    let info = pg.info();
    let mut host = [0u8; 256];
    // SAFETY: gethostname writes at most host.len() bytes.
    unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) };
    let host =
        String::from_utf8_lossy(&host[..host.iter().position(|b| *b == 0).unwrap()]).into_owned();
    assert_eq!(info["host"], Value::from(host));
    assert_eq!(info["port"], Value::from(port));
    let address = pg.address();

    let st = pg.server("status");
    let pid = pg.postmaster().unwrap();
    assert!(
        st.ok()
            .contains(&format!("running on this host (pid {pid}, ready)")),
        "{st:?}"
    );
    pg.run(&["app", "--name", "hello", "--executable", "echo hi"])
        .ok();
    pg.add_job("kept", "wf", "hello", &[]);

    let stop = pg.server("stop");
    assert!(
        stop.ok().contains(&format!("stopped (pid {pid})")),
        "{stop:?}"
    );
    assert!(!alive(pid));
    let st = pg.server("status");
    assert_eq!(st.code, Some(3), "{st:?}");
    assert!(st.stdout.contains("not running"), "{st:?}");

    // A command while the server is down: a clear error, in bounded time.
    let t = Instant::now();
    let r = pg.run(&["ls"]);
    let took = t.elapsed();
    let e = r.err();
    assert!(
        e.contains(&address) && e.contains("balsam server start"),
        "{e}"
    );
    assert!(took < UNREACHABLE_BOUND, "took {took:?}");
    let r = pg.run(&[
        "job",
        "--name",
        "lost",
        "--workflow",
        "wf",
        "--app",
        "hello",
        "--yes",
    ]);
    assert!(r.err().contains("balsam server start"));

    let start = pg.server("start");
    let out = start.ok();
    for line in [
        "Launching Balsam DB server",
        "waiting for server to start",
        "server started",
    ] {
        assert!(out.contains(line), "{out}");
    }
    let again = pg.server("start");
    assert!(again.ok().contains("already running"), "{again:?}");
    let jobs = pg.jobs_json(&[]);
    assert_eq!(
        jobs.len(),
        1,
        "the job written before the stop, nothing else"
    );
    assert_eq!(jobs[0]["name"], "kept");

    // A server that accepts connections and never answers (stopped, or its host hung): the
    // command still ends in bounded time.
    let pid = pg.postmaster().unwrap();
    // SAFETY: stops the test's own server; the guard resumes it whatever happens.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = scopeguard(move || {
        // SAFETY: resumes it.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let t = Instant::now();
    let r = pg.run(&["ls"]);
    let took = t.elapsed();
    let e = r.err();
    assert!(e.contains(&address) && e.contains("no answer"), "{e}");
    assert!(took < UNREACHABLE_BOUND, "took {took:?}");
    drop(resume);
    assert_eq!(pg.jobs_json(&[]).len(), 1);

    // A host other than the server's may not start it.
    let elsewhere = pg.tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let mut moved = info.clone();
    moved["host"] = Value::from("198.51.100.7");
    std::fs::write(elsewhere.join("server-info"), moved.to_string()).unwrap();
    let r = pg.run(&["server", "start", "--db", elsewhere.to_str().unwrap()]);
    assert!(r.err().contains("runs on 198.51.100.7"), "{r:?}");

    // An SQLite database has no server.
    let sqlite = Db::new();
    let r = sqlite.run(&["server", "start"]);
    assert!(r.err().contains("embedded SQLite"), "{r:?}");
}

#[test]
fn balsamactivate_starts_a_stopped_server() {
    let pg = PgDb::new(&[]);
    pg.server("stop").ok();
    assert!(pg.postmaster().is_none());
    let path = format!(
        "{}:{}:{}",
        balsam_bin().parent().unwrap().display(),
        repo_root().join("src/scripts").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let activate = || {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(
                r#"source balsamactivate "$1" && echo "active: $BALSAM_DB_PATH" && balsam ls apps"#,
            )
            .arg("bash")
            .arg(&pg.path)
            .env("PATH", &path)
            .env_remove("BALSAM_DB_PATH");
        run_cmd(c, common::TIMEOUT, None)
    };
    let r = activate();
    let out = r.ok();
    for line in [
        "Launching Balsam DB server",
        "waiting for server to start.... done",
        "server started",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert!(
        out.contains(&format!("active: {}", pg.path.display())),
        "{out}"
    );
    // The server outlives the shell that started it.
    let pid = pg.postmaster().expect("running after the shell ended");
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid));
    // Running already: nothing to say.
    let r = activate();
    assert!(!r.ok().contains("Launching"), "{r:?}");
    assert_eq!(pg.postmaster(), Some(pid));
}

#[test]
fn init_db_url_takes_the_password_from_the_url_pgpassfile_or_home() {
    // The "site's" server: a private server made by balsam, reached by its URL.
    let site = PgDb::new(&[]);
    let pw = site.password();
    let port = site.info()["port"].to_string();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let init = |dir: &str, url: &str, env: &[(&str, &Path)]| {
        let mut c = Command::new(balsam_bin());
        c.arg("init")
            .arg(tmp.path().join(dir))
            .args(["--db-url", url])
            .env("HOME", &home)
            .env_remove("PGPASSFILE")
            .env_remove("BALSAM_DB_PATH");
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(c, common::TIMEOUT, None)
    };
    let use_db = |dir: &str, env: &[(&str, &Path)]| {
        let mut c = Command::new(balsam_bin());
        c.args(["app", "--name", "hi", "--executable", "echo hi", "--db"])
            .arg(tmp.path().join(dir))
            .env("HOME", &home)
            .env_remove("PGPASSFILE");
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(c, common::TIMEOUT, None)
    };

    // 1. In the URL: kept in DIR/pgpass, mode 0600, never printed.
    let r = init(
        "a",
        &format!("postgresql://balsam:{pw}@127.0.0.1:{port}/campaign_a"),
        &[],
    );
    assert!(r.ok().contains(&format!("127.0.0.1:{port}")), "{r:?}");
    assert!(!r.stdout.contains(&pw) && !r.stderr.contains(&pw));
    assert_eq!(mode(&tmp.path().join("a/pgpass")), 0o600);
    use_db("a", &[]).ok();
    // balsam does not run a site's server.
    let mut c = Command::new(balsam_bin());
    c.args(["server", "start", "--db"])
        .arg(tmp.path().join("a"));
    let r = run_cmd(c, common::TIMEOUT, None);
    assert!(r.err().contains("site's database server"), "{r:?}");

    // 2. In PGPASSFILE: read at each connection, not copied.
    let passfile = tmp.path().join("passfile");
    std::fs::write(&passfile, format!("127.0.0.1:{port}:*:balsam:{pw}\n")).unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url_b = format!("postgresql://balsam@127.0.0.1:{port}/campaign_b");
    init("b", &url_b, &[("PGPASSFILE", &passfile)]).ok();
    assert!(!tmp.path().join("b/pgpass").exists());
    use_db("b", &[("PGPASSFILE", &passfile)]).ok();
    let e = use_db("b", &[]).err().to_string();
    assert!(e.contains("password"), "{e}");

    // 3. In ~/.pgpass.
    let dot = home.join(".pgpass");
    std::fs::write(&dot, format!("*:{port}:campaign_c:balsam:{pw}\n")).unwrap();
    std::fs::set_permissions(&dot, std::fs::Permissions::from_mode(0o600)).unwrap();
    init(
        "c",
        &format!("postgresql://balsam@127.0.0.1:{port}/campaign_c"),
        &[],
    )
    .ok();
    use_db("c", &[]).ok();
    std::fs::remove_file(&dot).unwrap();

    // 4. Nowhere: refused, and nothing left that looks like a database.
    let r = init(
        "d",
        &format!("postgresql://balsam@127.0.0.1:{port}/campaign_d"),
        &[],
    );
    assert!(r.err().contains("password"), "{r:?}");
    assert!(!tmp.path().join("d/server-info").exists());

    // A bad URL is named without its password.
    let r = init("e", "postgresql://balsam:hush@/x", &[]);
    let e = r.err();
    assert!(e.contains("--db-url") && !e.contains("hush"), "{e}");
}

/// The outage of the issue: PostgreSQL stops for 30 s in the middle of a launcher run
/// (2 workers, 32 jobs of `sleep 2`) while the service runs; then it comes back.
#[test]
fn a_thirty_second_outage_in_the_middle_of_a_launcher_run() {
    sibling_bin("balsam-mpi-launcher");
    let pg = PgDb::new(&[]);
    let address = pg.address();
    // The service runs transitions and expiry, but submits nothing.
    let policy = read(&pg.path.join("job-templates/local_policy.ini"))
        .replace("submit-jobs = on", "submit-jobs = off");
    std::fs::write(pg.path.join("nosubmit.ini"), policy).unwrap();
    common::set_settings(&pg.db, &[("QUEUE_POLICY", Value::from("nosubmit.ini"))]);

    let log = pg.tmp.path().join("runs.log");
    let script = pg.tmp.path().join("nap.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"start $1 $$ $(date +%s.%N)\" >> {log}\nsleep 2\necho \"end $1 $$ $(date +%s.%N)\" >> {log}\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    pg.run(&[
        "app",
        "--name",
        "nap",
        "--executable",
        script.to_str().unwrap(),
    ])
    .ok();
    // Parents that run before and during the outage, each with a child that becomes runnable
    // only when its parent's end is written: after the outage. A launcher that gave up during
    // the outage would leave the children waiting.
    let half = 16;
    let n = 2 * half;
    let id = |i: usize| format!("00000000-0000-4000-8000-{i:012}");
    let mut lines = String::new();
    for i in 0..half {
        lines.push_str(&format!(
            "{{\"job_id\": \"{}\", \"name\": \"p{i}\", \"workflow\": \"nap\", \"application\": \"nap\", \"args\": \"p{i}\"}}\n",
            id(i)
        ));
    }
    for i in 0..half {
        lines.push_str(&format!(
            "{{\"name\": \"c{i}\", \"workflow\": \"nap\", \"application\": \"nap\", \"args\": \"c{i}\", \"parents\": [\"{}\"]}}\n",
            id(i)
        ));
    }
    let file = pg.tmp.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    pg.run(&["job", "--from-file", file.to_str().unwrap(), "--yes"])
        .ok();

    let mut service = Daemon::start(pg.cmd(&["service"]), pg.tmp.path().join("service.out"));
    let mut launcher_cmd = pg.cmd(&[
        "launcher",
        "--num-workers",
        "2",
        "--consume-all",
        "--idle-exit-seconds",
        "1",
    ]);
    launcher_cmd.env("MPIEXEC_TIMEOUT", "280");
    let mut launcher = Daemon::start(launcher_cmd, pg.tmp.path().join("launcher.out"));
    let mut tree = TreeGuard::new(launcher.pid());
    let ended = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("end "))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(120), Duration::from_millis(100), || {
            ended() >= 4
        }),
        "jobs ran before the outage:\n{}",
        launcher.output()
    );

    // The outage.
    pg.server("stop").ok();
    let down = now_s();
    let t = Instant::now();
    let r = pg.run(&["ls", "--by-states"]);
    let took = t.elapsed();
    let e = r.err();
    assert!(
        e.contains(&address) && e.contains("balsam server start"),
        "{e}"
    );
    assert!(took < UNREACHABLE_BOUND, "took {took:?}");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(t.elapsed()));
    assert!(
        launcher.running(),
        "the launcher rides it out:\n{}",
        launcher.output()
    );
    assert!(
        service.running(),
        "the service rides it out:\n{}",
        service.output()
    );
    let up = now_s();
    pg.server("start").ok();

    let t = Instant::now();
    while launcher.running() && t.elapsed() < Duration::from_secs(200) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if launcher.running() {
        drop(tree);
    } else {
        tree.disarm();
    }
    let (code, _) = launcher.stop(0, Duration::from_secs(1));
    assert_eq!(code, Some(0), "{}", launcher.output());
    // Jobs the launcher left RUN_DONE on its way out are the service's to finish.
    assert!(
        wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
            pg.jobs_json(&[])
                .iter()
                .all(|j| j["state"] == "JOB_FINISHED")
        }),
        "{:?}\n{}",
        states(&pg),
        launcher_logs(&pg.path)
    );
    service.stop(libc::SIGTERM, Duration::from_secs(20));

    // Each job ran once: one start and one end in its output, one RUNNING in its history.
    let text = read(&log);
    let mut runs: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    let mut starts: HashMap<(String, String), f64> = HashMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let time: f64 = f[3].parse().unwrap();
        match f[0] {
            "start" => {
                starts.insert((f[1].into(), f[2].into()), time);
            }
            _ => {
                let s = starts[&(f[1].to_string(), f[2].to_string())];
                runs.entry(f[1].into()).or_default().push((s, time));
            }
        }
    }
    assert_eq!(runs.len(), n, "{text}");
    assert!(
        runs.values().all(|r| r.len() == 1),
        "each job ran once:\n{text}"
    );
    // Jobs that were running when the server went away kept running through it.
    assert!(
        runs.values().flatten().any(|(s, e)| *s < down && *e > down),
        "a job ran across the start of the outage:\n{text}"
    );
    // Once the launcher finds the database unreachable it starts no more jobs (their results
    // could not be written either; README, "What a launcher does with its jobs"), so no job may
    // start later than a few seconds into the outage (the store's patience, 5 s, a retry, and a 2 s job's end).
    assert!(
        runs.values()
            .flatten()
            .all(|(s, _)| *s < down + 15.0 || *s > up),
        "jobs kept starting while the database could not be reached:\n{text}"
    );
    for i in 0..half {
        let (start, _) = runs[&format!("c{i}")][0];
        let (_, parent_end) = runs[&format!("p{i}")][0];
        assert!(start > parent_end, "c{i} ran after its parent:\n{text}");
    }
    assert!(
        runs.values().flatten().any(|(s, _)| *s > up),
        "the launcher ran jobs after the outage:\n{text}"
    );
    let history = pg.run(&["ls", "--history"]).ok().to_string();
    let running = history.matches(" RUNNING]").count();
    assert_eq!(running, n, "one RUNNING per run:\n{history}");

    // The outage is told once and the recovery once by the launcher (its store says both).
    // The service's store says both too, and each of its steps that failed says why, once:
    // not once per pass.
    let about = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(&address))
            .map(|l| l.split_once("Z ").map_or(l, |(_, m)| m).trim().to_string())
            .collect()
    };
    // Besides, the launcher says once that no job starts until the database works again.
    let launcher_log = launcher_logs(&pg.path);
    let said = about(&launcher_log);
    let count = |what: &str| said.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("unreachable"), 1, "{launcher_log}");
    assert_eq!(count("reachable again"), 1, "{launcher_log}");
    assert!(count("no job starts until") <= 1, "{launcher_log}");
    assert!(said.len() <= 3, "{launcher_log}");
    let service_log = read(&pg.path.join("log/service.log"));
    let said = about(&service_log);
    let distinct: std::collections::HashSet<&String> = said.iter().collect();
    assert_eq!(distinct.len(), said.len(), "{service_log}");
    assert!(said.len() <= 4, "{service_log}");
    assert_eq!(
        said.iter()
            .filter(|l| l.contains("reachable again"))
            .count(),
        1,
        "{service_log}"
    );
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Rank 0's logs of every launcher session.
fn launcher_logs(db: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(db.join("log")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("launcher-") && !name.contains(".rank") {
            out.push_str(&read(&e.path()));
        }
    }
    out
}
