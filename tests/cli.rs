//! The `balsam` command end to end: every store subcommand against a real database in a
//! temporary directory, its output and its error messages.

mod common;

use std::process::Command;

use common::{run_cmd, Db, TIMEOUT};

#[test]
fn init_prints_how_to_activate_and_refuses_twice() {
    let db = Db::new();
    let again = db.run(&["init", db.path.to_str().unwrap()]);
    assert!(again.err().contains("already holds a Balsam database"));
    let store = if common::on_postgres() {
        "server-info"
    } else {
        "balsamdb.sqlite3"
    };
    for sub in ["data", "log", "qsubmit", "settings.json", store] {
        assert!(db.path.join(sub).exists(), "{sub}");
    }
    let out = db.run(&["init", db.tmp.path().join("other").to_str().unwrap()]);
    assert!(out.ok().contains("Successfully created Balsam DB at:"));
    assert!(out.stdout.contains("Use `source balsamactivate"));
}

#[test]
fn no_database_and_not_a_database_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Command::new(common::balsam_bin());
    c.args(["ls"])
        .env_remove("BALSAM_DB_PATH")
        .current_dir(tmp.path());
    let out = run_cmd(c, TIMEOUT, None);
    assert!(
        out.err().contains("no Balsam database is active") && out.stderr.contains("balsamactivate")
    );
    let mut c = Command::new(common::balsam_bin());
    c.args(["--db", tmp.path().to_str().unwrap(), "ls"]);
    let out = run_cmd(c, TIMEOUT, None);
    assert!(
        out.err().contains("is not a Balsam database"),
        "{}",
        out.stderr
    );
}

#[test]
fn hello_world_quickstart_as_in_the_talk() {
    let db = Db::new();
    let app = db.run(&["app", "--name", "say-hello", "--executable", "echo Hello,"]);
    let text = app.ok();
    assert!(
        text.contains("Application 1:") && text.contains("Executable:    echo Hello,"),
        "{text}"
    );
    assert!(text.contains("Added app to database"));
    let job = db.run(&[
        "job",
        "--name",
        "test1",
        "--workflow",
        "test",
        "--app",
        "say-hello",
        "--args",
        "world!",
        "--yes",
    ]);
    let text = job.ok();
    for line in [
        "workflow: test",
        "name: test1",
        "input_files: *",
        "wait_for_parents: True",
        "post_error_handler: False",
        "state: CREATED",
        "data: {}",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("*** Executed command: echo Hello, world!"));
    assert!(text.contains(&format!(
        "*** Working directory: {}/data/test/test1_",
        db.path.display()
    )));
    for i in 2..=10 {
        db.run(&[
            "job",
            "--name",
            &format!("test{i}"),
            "--workflow",
            "test",
            "--app",
            "say-hello",
            "--args",
            &format!("world {i}!"),
            "--yes",
        ])
        .ok();
    }
    let second = db.run(&[
        "job",
        "--name",
        "test11",
        "--workflow",
        "test",
        "--app",
        "say-hello",
        "--yes",
    ]);
    assert!(second.ok().contains("already has 10 jobs"));
    let ls = db.run(&["ls"]);
    let lines: Vec<&str> = ls.ok().lines().collect();
    assert!(lines[0]
        .split_whitespace()
        .eq(["job_id", "name", "workflow", "application", "state"]));
    assert_eq!(lines.len(), 12);
    assert!(lines[1].contains("test1") && lines[1].ends_with("CREATED"));
    let hist = db.run(&["ls", "--name", "test5", "--history"]);
    let h = hist.ok();
    assert!(h.starts_with("Job test5 ["), "{h}");
    let entry = h.lines().nth(2).unwrap();
    // [MM-DD-YYYY HH:MM:SS.ffffff CREATED]
    assert!(
        entry.starts_with('[')
            && entry.ends_with(" CREATED]")
            && entry.len() == "[10-03-2018 19:04:00.143928 CREATED]".len(),
        "{entry}"
    );
}

#[test]
fn job_asks_for_confirmation_without_yes() {
    let db = Db::new();
    db.hello_app();
    let no = db.run_stdin(&["job", "--name", "a", "--app", "say-hello"], "n\n");
    assert!(no.err().contains("not confirmed"));
    assert_eq!(db.jobs_json(&[]).len(), 0);
    db.run_stdin(&["job", "--name", "a", "--app", "say-hello"], "y\n")
        .ok();
    assert_eq!(db.jobs_json(&[]).len(), 1);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let db = Db::new();
    db.hello_app();
    let cases: &[(&[&str], &str)] = &[
        (
            &["job", "--name", "a", "--app", "nope", "--yes"],
            "unknown application \"nope\"",
        ),
        (
            &[
                "job",
                "--name",
                "a",
                "--app",
                "say-hello",
                "--cpu-affinity",
                "deep",
                "--yes",
            ],
            "invalid value 'deep' for '--cpu-affinity <AFFINITY>': expected none or depth",
        ),
        (
            &[
                "job",
                "--name",
                "a",
                "--app",
                "say-hello",
                "--env",
                "novalue",
                "--yes",
            ],
            "NAME=VALUE",
        ),
        (
            &[
                "job",
                "--name",
                "a",
                "--app",
                "say-hello",
                "--num-nodes",
                "0",
                "--yes",
            ],
            "an integer from 1 to",
        ),
        (&["job", "--app", "say-hello", "--yes"], "--name"),
        (&["ls", "--state", "DONE"], "valid states are: CREATED"),
        (
            &["modify", "ffffffff", "state", "READY"],
            "no job id starts with",
        ),
        (
            &["app", "--name", "say-hello", "--executable", "true"],
            "already exists",
        ),
    ];
    for (args, want) in cases {
        let out = db.run(args);
        assert!(out.err().contains(want), "{args:?}: {}", out.stderr);
    }
    assert_eq!(db.jobs_json(&[]).len(), 0);
    let id = db.add_job("a", "w", "say-hello", &[]);
    for (args, want) in [
        (
            vec!["modify", &id[..8], "nodes", "3"],
            "unknown job field \"nodes\"",
        ),
        (
            vec!["modify", &id[..8], "num_nodes", "three"],
            "bad value \"three\" for num_nodes",
        ),
        (
            vec!["modify", &id[..8], "state", "FINISHED"],
            "valid states are",
        ),
        (
            vec!["modify", &id[..8], "application", "nope"],
            "unknown application",
        ),
    ] {
        let out = db.run(&args);
        assert!(out.err().contains(want), "{args:?}: {}", out.stderr);
    }
    let j = &db.jobs_json(&[])[0];
    assert_eq!(j["num_nodes"], 1);
    assert_eq!(j["state"], "CREATED");
}

#[test]
fn modify_is_typed_and_records_state_changes() {
    let db = Db::new();
    db.hello_app();
    let id = db.add_job("a", "w", "say-hello", &[]);
    db.run(&["modify", &id[..6], "wait_for_parents", "False"])
        .ok();
    db.run(&["modify", &id[..6], "num_nodes", "4"]).ok();
    db.run(&["modify", &id[..6], "data", "{\"energy\": -1.5}"])
        .ok();
    let j = &db.jobs_json(&["--id", &id[..6]])[0];
    assert_eq!(j["wait_for_parents"], false);
    assert_eq!(j["num_nodes"], 4);
    assert_eq!(j["data"]["energy"], -1.5);
    db.run(&["modify", &id[..6], "state", "RESTART_READY"]).ok();
    let hist = db.run(&["ls", "--id", &id, "--history"]);
    assert!(
        hist.ok()
            .contains("RESTART_READY] User mutated state from command line"),
        "{}",
        hist.stdout
    );
    db.run(&["killjob", "--id", &id[..6]]).ok();
    let out = db.run(&["modify", &id[..6], "state", "READY"]);
    assert!(out.err().contains("USER_KILLED"), "{}", out.stderr);
    assert_eq!(db.state_of("a"), "USER_KILLED");
}

#[test]
fn dependencies_tree_and_recursive_kill() {
    let db = Db::new();
    db.hello_app();
    let a = db.add_job("A", "dag", "say-hello", &[]);
    let b = db.add_job("B", "dag", "say-hello", &[]);
    let c = db.add_job("C", "dag", "say-hello", &[]);
    db.run(&["dep", &a[..8], &b[..8]]).ok();
    db.run(&["dep", &b[..8], &c[..8]]).ok();
    assert!(db.run(&["dep", &c[..8], &a[..8]]).err().contains("cycle"));
    assert!(db
        .run(&["dep", &a[..8], &b[..8]])
        .err()
        .contains("already a parent"));
    let tree = db.run(&["ls", "--tree"]);
    let t = tree.ok();
    assert!(t.lines().next().unwrap().starts_with("A "), "{t}");
    assert!(t.contains("|--B ") && t.contains("|  |--C "), "{t}");
    let j = &db.jobs_json(&["--name", "C"])[0];
    assert_eq!(j["parents"][0], b.as_str());
    let out = db.run(&["killjob", "--id", &a[..8], "--recursive"]);
    assert_eq!(out.ok().matches("Killed").count(), 3);
    for n in ["A", "B", "C"] {
        assert_eq!(db.state_of(n), "USER_KILLED");
    }
}

#[test]
fn ambiguous_prefix_lists_candidates() {
    let db = Db::new();
    db.hello_app();
    db.run(&["make_dummies", "40"]).ok();
    let jobs = db.jobs_json(&[]);
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect();
    // The shortest prefix that 2 to 10 jobs share (all candidates are then listed).
    let c = (1..36)
        .flat_map(|len| ids.iter().map(move |i| &i[..len]))
        .find(|p| (2..=10).contains(&ids.iter().filter(|i| i.starts_with(*p)).count()))
        .unwrap();
    let out = db.run(&["modify", c, "args", "x"]);
    let e = out.err();
    assert!(e.contains("ambiguous"), "{e}");
    assert!(
        ids.iter()
            .filter(|i| i.starts_with(c))
            .all(|i| e.contains(i.as_str())),
        "{e}"
    );
}

#[test]
fn ls_limit_fields_by_states_and_workflows() {
    let db = Db::new();
    db.run(&["make_dummies", "12", "--workflow", "big"]).ok();
    let out = run_cmd(
        {
            let mut c = db.cmd(&["ls"]);
            c.env("BALSAM_LS_LIMIT", "5");
            c
        },
        TIMEOUT,
        None,
    );
    assert!(
        out.ok().contains("(7 more BalsamJobs not shown...)"),
        "{}",
        out.stdout
    );
    let out = run_cmd(
        {
            let mut c = db.cmd(&["ls"]);
            c.env("BALSAM_LS_FIELDS", "num_nodes:args");
            c
        },
        TIMEOUT,
        None,
    );
    assert!(
        out.ok()
            .lines()
            .next()
            .unwrap()
            .ends_with("num_nodes   args"),
        "{}",
        out.stdout
    );
    let out = run_cmd(
        {
            let mut c = db.cmd(&["ls"]);
            c.env("BALSAM_LS_FIELDS", "bogus");
            c
        },
        TIMEOUT,
        None,
    );
    assert!(out.err().contains("BALSAM_LS_FIELDS") && out.stderr.contains("bogus"));
    let id = db.jobs_json(&[])[0]["job_id"].as_str().unwrap().to_string();
    db.run(&["modify", &id, "state", "JOB_FINISHED"]).ok();
    let out = run_cmd(
        {
            let mut c = db.cmd(&["ls", "--by-states"]);
            c.env("BALSAM_LS_LIMIT", "2");
            c
        },
        TIMEOUT,
        None,
    );
    let t = out.ok();
    assert!(
        t.contains("CREATED (11 BalsamJobs)") && t.contains("(9 more BalsamJobs not shown...)"),
        "{t}"
    );
    assert!(t.contains("JOB_FINISHED (1 BalsamJobs)"), "{t}");
    let wf = db.run(&["ls", "wf"]);
    assert!(
        wf.ok().contains("big") && wf.stdout.contains("CREATED: 11"),
        "{}",
        wf.stdout
    );
    let apps = db.run(&["ls", "apps"]);
    assert!(apps.ok().contains("dummy"));
    assert_eq!(db.jobs_json(&["--state", "JOB_FINISHED"]).len(), 1);
    assert_eq!(
        db.jobs_json(&["--wf", "big", "--state", "CREATED"]).len(),
        11
    );
}

#[test]
fn rm_jobs_and_apps() {
    let db = Db::new();
    db.hello_app();
    db.add_job("keep", "w1", "say-hello", &[]);
    db.run(&[
        "job",
        "--name",
        "go",
        "--workflow",
        "w2",
        "--app",
        "say-hello",
        "--yes",
    ])
    .ok();
    db.run(&[
        "job",
        "--name",
        "go",
        "--workflow",
        "w3",
        "--app",
        "say-hello",
        "--yes",
    ])
    .ok();
    assert!(db
        .run(&["rm", "jobs", "--name", "go"])
        .err()
        .contains("not confirmed"));
    db.run(&["rm", "jobs", "--name", "go", "--wf-filter", "w2", "--force"])
        .ok();
    assert_eq!(db.jobs_json(&[]).len(), 2);
    let out = db.run(&["rm", "apps", "--name", "say-hello"]);
    assert!(out.err().contains("not confirmed"));
    let out = db.run_stdin(&["rm", "apps", "--name", "say-hello"], "y\n");
    assert!(
        out.err().contains("2 jobs use application"),
        "{}",
        out.stderr
    );
    db.run(&["rm", "jobs", "--all", "--force"]).ok();
    db.run(&["rm", "apps", "--name", "say-hello", "--force"])
        .ok();
    assert!(db.run(&["ls", "apps"]).ok().lines().count() <= 1);
}

#[test]
fn mkchild_uses_balsam_job_id() {
    let db = Db::new();
    db.hello_app();
    let parent = db.add_job("parent", "w", "say-hello", &["--num-nodes", "2"]);
    let out = db.run(&["mkchild", "--name", "kid", "--args", "again"]);
    assert!(out.err().contains("BALSAM_JOB_ID"), "{}", out.stderr);
    let out = run_cmd(
        {
            let mut c = db.cmd(&["mkchild", "--name", "kid", "--args", "again"]);
            c.env("BALSAM_JOB_ID", &parent);
            c
        },
        TIMEOUT,
        None,
    );
    assert!(
        out.ok().contains("Added child of [parent |"),
        "{}",
        out.stdout
    );
    let kid = &db.jobs_json(&["--name", "kid"])[0];
    assert_eq!(kid["parents"][0], parent.as_str());
    assert_eq!(kid["num_nodes"], 2, "inherits the parent's resources");
    assert_eq!(kid["args"], "again");
    assert_eq!(kid["workflow"], "w");
}

#[test]
fn import_json_lines_and_csv() {
    let db = Db::new();
    db.hello_app();
    let dir = db.tmp.path();
    let a = "7df86c8b-f94b-4349-8ab6-a8afc85d8a9f";
    let jsonl = format!(
        "{{\"name\": \"A\", \"workflow\": \"imp\", \"application\": \"say-hello\", \"job_id\": \"{a}\"}}\n\
         # comments and blank lines are skipped\n\n\
         {{\"name\": \"B\", \"workflow\": \"imp\", \"num_nodes\": 2, \"wait_for_parents\": \"False\", \"parents\": [\"{a}\"], \"environ_vars\": {{\"OMP_NUM_THREADS\": \"1\"}}}}\n"
    );
    std::fs::write(dir.join("jobs.jsonl"), jsonl).unwrap();
    // The command line's --app is the default for every line.
    let out = db.run(&["job", "--from-file", "jobs.jsonl", "--app", "say-hello"]);
    assert!(out.ok().contains("Added 2 jobs"), "{}", out.stdout);
    let b = &db.jobs_json(&["--name", "B"])[0];
    assert_eq!(b["parents"][0], a);
    assert_eq!(b["wait_for_parents"], false);
    assert_eq!(b["environ_vars"], "OMP_NUM_THREADS=1");
    std::fs::write(dir.join("jobs.csv"), "name,workflow,application,num_nodes,args\nc1,csvwf,say-hello,1,x y\nc2,csvwf,say-hello,,z\n").unwrap();
    db.run(&["job", "--from-file", "jobs.csv"]).ok();
    assert_eq!(db.jobs_json(&["--wf", "csvwf"]).len(), 2);
    // A bad line anywhere: reported by line and field, nothing inserted.
    let mut lines: Vec<String> = (0..50)
        .map(|i| format!("{{\"name\": \"n{i}\", \"application\": \"say-hello\"}}"))
        .collect();
    lines[36] =
        "{\"name\": \"bad\", \"application\": \"say-hello\", \"num_nodes\": \"lots\"}".into();
    std::fs::write(dir.join("bad.jsonl"), lines.join("\n")).unwrap();
    let out = db.run(&["job", "--from-file", "bad.jsonl"]);
    let e = out.err();
    assert!(
        e.contains("bad.jsonl:37") && e.contains("num_nodes") && e.contains("lots"),
        "{e}"
    );
    lines[36] = "{\"name\": \"bad\", \"application\": \"say-hello\", \"nodes\": 2}".into();
    std::fs::write(dir.join("bad.jsonl"), lines.join("\n")).unwrap();
    let e = db
        .run(&["job", "--from-file", "bad.jsonl"])
        .err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:37") && e.contains("unknown job field \"nodes\""),
        "{e}"
    );
    std::fs::write(
        dir.join("bad.csv"),
        "name,application,wall_time_minutes\nx,say-hello,5\ny,nope,5\n",
    )
    .unwrap();
    let e = db.run(&["job", "--from-file", "bad.csv"]).err().to_string();
    assert!(
        e.contains("bad.csv:3") && e.contains("unknown application \"nope\""),
        "{e}"
    );
    assert_eq!(db.jobs_json(&[]).len(), 4);
}

#[test]
fn app_with_python_script_runs_under_python3() {
    let db = Db::new();
    let script = db.tmp.path().join("fail.py");
    std::fs::write(&script, "raise RuntimeError('simulated error')\n").unwrap();
    let out = db.run(&["app", "--name", "failer", "--exec", "fail.py"]);
    let line = out
        .ok()
        .lines()
        .find(|l| l.starts_with("Executable:"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("python3")
            && line.ends_with(&format!(
                "{}",
                std::fs::canonicalize(&script).unwrap().display()
            )),
        "{line}"
    );
    assert!(db
        .run(&["app", "--name", "x", "--exec", "missing.py"])
        .err()
        .contains("no such file"));
}

#[test]
fn which_and_activate_scripts() {
    let db = Db::new();
    assert_eq!(
        db.run(&["which"]).ok().trim(),
        std::fs::canonicalize(&db.path).unwrap().to_str().unwrap()
    );
    assert_eq!(db.run(&["which", "--name"]).ok().trim(), "test-db");
    let scripts = common::repo_root().join("src/scripts");
    let script = format!(
        "PS1='$ '; source {s}/balsamactivate test-db && echo \"$PS1|$BALSAM_DB_PATH\" && source {s}/balsamdeactivate && echo \"[$PS1][${{BALSAM_DB_PATH:-unset}}]\"",
        s = scripts.display()
    );
    let mut c = Command::new("bash");
    c.args(["-c", &script])
        .current_dir(db.tmp.path())
        .env_remove("BALSAM_DB_PATH");
    let out = run_cmd(c, TIMEOUT, None);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "[BalsamDB: test-db] $ |{}",
            std::fs::canonicalize(&db.path).unwrap().display()
        )
    );
    assert_eq!(lines[1], "[$ ][unset]");
}

#[test]
fn two_processes_lease_from_one_database_without_overlap() {
    let db = Db::new();
    db.run(&["make_dummies", "10000"]).ok();
    let probe = common::sibling_bin("balsam-store-probe");
    let p = db.path.to_str().unwrap();
    run_cmd(
        {
            let mut c = Command::new(&probe);
            c.args(["prepare", p, "10000"]);
            c
        },
        TIMEOUT,
        None,
    )
    .ok();
    let go = db.tmp.path().join("go");
    let spawn = |ready: &str| {
        let ready = db.tmp.path().join(ready);
        let mut c = Command::new(&probe);
        c.args([
            "lease",
            p,
            "20",
            "1000",
            "--finish",
            "--print",
            "--pause-ms",
            "5",
            "--ready",
            ready.to_str().unwrap(),
            "--wait-for",
            go.to_str().unwrap(),
        ]);
        (ready, std::thread::spawn(move || run_cmd(c, TIMEOUT, None)))
    };
    let ((ready1, t1), (ready2, t2)) = (spawn("ready1"), spawn("ready2"));
    // A real barrier: wait until both probes are started and waiting, then let them go at once.
    let t0 = std::time::Instant::now();
    while !(ready1.exists() && ready2.exists()) {
        assert!(t0.elapsed() < TIMEOUT, "the probes did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::write(&go, "").unwrap();
    let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
    let a: Vec<&str> = r1.ok().lines().collect();
    let b: Vec<&str> = r2.ok().lines().collect();
    let mut all: Vec<&str> = a.iter().chain(b.iter()).copied().collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a job was leased twice");
    assert_eq!(
        n,
        10000,
        "every job leased once (got {} + {})",
        a.len(),
        b.len()
    );
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both processes took part ({} + {}): {} / {}",
        a.len(),
        b.len(),
        r1.stderr,
        r2.stderr
    );
    let done = db.run(&["ls", "--by-states"]);
    assert!(
        done.ok().contains("RUN_DONE (10000 BalsamJobs)"),
        "{}",
        done.stdout
    );
}

#[test]
fn log_shows_what_the_command_line_did() {
    let db = Db::new();
    db.hello_app();
    db.add_job("logged", "w", "say-hello", &[]);
    let out = db.run(&["log", "--no-follow", "-n", "50"]);
    let t = out.ok();
    assert!(
        t.contains("balsam.log:") && t.contains("job added") && t.contains("logged"),
        "{t}"
    );
}

#[test]
fn concurrent_writers_never_see_a_locked_database() {
    let db = Db::new();
    db.hello_app();
    let threads: Vec<_> = (0..4)
        .map(|w| {
            let cmds: Vec<Command> = (0..15)
                .map(|i| {
                    db.cmd(&[
                        "job",
                        "--name",
                        &format!("w{w}-{i}"),
                        "--workflow",
                        "race",
                        "--app",
                        "say-hello",
                        "--yes",
                    ])
                })
                .collect();
            std::thread::spawn(move || {
                cmds.into_iter()
                    .map(|c| run_cmd(c, TIMEOUT, None))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for r in t.join().unwrap() {
            r.ok();
            assert!(!r.stderr.contains("locked"), "{}", r.stderr);
        }
    }
    assert_eq!(db.jobs_json(&["--wf", "race"]).len(), 60);
}
