//! The `balsam` command under the attacks of a hostile new user (issue 7): unwritable logs,
//! numbers out of range, pipes, broken quotes, byte-order marks, short names that match many
//! jobs. Each test drives the real binary and checks the exact message, the exit code and that
//! the database did not change.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{process_tree, read, run_cmd, set_settings, Db, Run, TIMEOUT};
use serde_json::json;

/// `ls --json`: every job's name, sorted.
fn names(db: &Db) -> Vec<String> {
    let mut v: Vec<String> = db
        .jobs_json(&[])
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Asserts a refusal with exactly this stderr (no panic, exit code 1 or clap's 2).
#[track_caller]
fn refused(out: &Run, stderr: &str) {
    out.err();
    assert_eq!(out.stderr, stderr, "stdout:\n{}", out.stdout);
}

/// The first line of stderr (clap adds usage lines after its error).
fn first_line(out: &Run) -> &str {
    out.stderr.lines().next().unwrap_or("")
}

#[test]
fn an_unwritable_log_falls_back_to_stderr_with_one_warning() {
    let db = Db::new();
    db.hello_app();
    // Root may write anywhere: a file where the log folder should be is unwritable for all.
    let log = db.path.join("log");
    std::fs::remove_dir_all(&log).unwrap();
    std::fs::write(&log, "not a folder").unwrap();
    let out = db.run(&["ls"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "No BalsamJobs match the query\n");
    // A read command logs nothing, so it does not even try the log.
    assert_eq!(out.stderr, "");

    // A command that logs: one warning, then the log's lines on stderr; the job is added.
    let out = db.run(&[
        "job",
        "--name",
        "a",
        "--app",
        "say-hello",
        "--yes",
        "--args",
        "x",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("warning: cannot write the log"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert!(
        warnings[0].starts_with(&format!(
            "balsam: warning: cannot write the log {}: ",
            log.join("balsam.log").display()
        )) && warnings[0].ends_with("; logging to stderr instead"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("job added"), "{}", out.stderr);
    assert_eq!(names(&db), ["a"]);
}

#[test]
fn log_settings_set_the_level_and_rotate_the_log() {
    let db = Db::new();
    set_settings(
        &db,
        &[
            ("LOG_HANDLER_LEVEL", json!("WARNING")),
            ("LOG_FILE_SIZE_LIMIT", json!(1024)),
            ("LOG_BACKUP_COUNT", json!(2)),
        ],
    );
    db.hello_app();
    // WARNING: the info line of each added job is not written.
    db.add_job("quiet", "w", "say-hello", &[]);
    let log = db.path.join("log/balsam.log");
    assert!(
        !log.exists() || !read(&log).contains("job added"),
        "{}",
        read(&log)
    );

    // INFO: each job added is a line; 1 KiB files, two backups.
    set_settings(&db, &[("LOG_HANDLER_LEVEL", json!("INFO"))]);
    for i in 0..30 {
        db.run(&[
            "job",
            "--name",
            &format!("job{i}"),
            "--app",
            "say-hello",
            "--yes",
        ])
        .ok();
    }
    let mut files: Vec<String> = std::fs::read_dir(db.path.join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("balsam.log"))
        .collect();
    files.sort();
    assert_eq!(files, ["balsam.log", "balsam.log.1", "balsam.log.2"]);
    for f in &files {
        let len = std::fs::metadata(db.path.join("log").join(f))
            .unwrap()
            .len();
        assert!(len <= 1024, "{f}: {len} bytes");
    }
    // The newest lines are in balsam.log.
    assert!(read(&log).contains("name=job29"), "{}", read(&log));
    // `balsam log` shows the current logs, not the rotated ones.
    let out = db.run(&["log", "--no-follow", "-n", "1000"]);
    let text = out.ok();
    assert!(
        text.lines().all(|l| l.starts_with("balsam.log: ")),
        "{text}"
    );
}

#[test]
fn numeric_flags_have_ranges_and_clear_errors() {
    let db = Db::new();
    db.hello_app();
    for (args, want) in [
        (
            vec!["launcher", "--num-workers", "4294967295"],
            "error: invalid value '4294967295' for '--num-workers <N>': 4294967295 is not in \
             0..=1024",
        ),
        (
            vec!["launcher", "--num-workers", "-1"],
            "error: unexpected argument '-1' found",
        ),
        (
            vec!["submit-launch", "-n", "0", "-t", "5"],
            "error: invalid value '0' for '--nodes <NODES>': 0 is not in 1..=100000",
        ),
        (
            vec!["submit-launch", "-n", "1", "-t", "4294967296"],
            "error: invalid value '4294967296' for '--time-minutes <MINUTES>': 4294967296 is \
             not in 1..=43200",
        ),
        (
            vec!["service", "--once", "--period", "1e300"],
            "error: invalid value '1e300' for '--period <SECONDS>': expected a number of \
             seconds more than 0 and at most 86400 (a day)",
        ),
        (
            vec!["service", "--once", "--period", "NaN"],
            "error: invalid value 'NaN' for '--period <SECONDS>': expected a number of seconds \
             more than 0 and at most 86400 (a day)",
        ),
        (
            vec!["make_dummies", "18446744073709551615"],
            "error: invalid value '18446744073709551615' for '<NUM>': 18446744073709551615 is \
             not in 1..=10000000",
        ),
        (
            vec!["log", "-n", "99999999999"],
            "error: invalid value '99999999999' for '--lines <LINES>': 99999999999 is not in \
             0..=100000",
        ),
        (
            vec![
                "job",
                "--name",
                "a",
                "--app",
                "say-hello",
                "--wall-time-minutes",
                "-5",
                "--yes",
            ],
            "error: unexpected argument '-5' found",
        ),
        (
            vec![
                "job",
                "--name",
                "a",
                "--app",
                "say-hello",
                "--ranks-per-node",
                "0",
                "--yes",
            ],
            "error: invalid value '0' for '--ranks-per-node <N>': expected an integer from 1 to \
             100000",
        ),
    ] {
        let out = db.run(&args);
        out.err();
        assert_eq!(first_line(&out), want, "{args:?}:\n{}", out.stderr);
    }
    // BALSAM_LS_LIMIT is checked too.
    let out = run_cmd(
        {
            let mut c = db.cmd(&["ls"]);
            c.env("BALSAM_LS_LIMIT", "99999999999999999999999");
            c
        },
        TIMEOUT,
        None,
    );
    refused(
        &out,
        "balsam: error: BALSAM_LS_LIMIT=\"99999999999999999999999\": expected a whole number \
         of rows from 1 to 10000000 (unset it for 5000)\n",
    );
    assert!(names(&db).is_empty());
    assert!(db.path.join("qsubmit").read_dir().unwrap().next().is_none());
}

#[test]
fn errors_say_their_cause_once() {
    let db = Db::new();
    db.hello_app();
    let file = db.tmp.path().join("two.jsonl");
    std::fs::write(
        &file,
        "{\"name\": \"a\", \"application\": \"say-hello\", \"num_nodes\": \"two\"}\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", file.to_str().unwrap()]);
    refused(
        &out,
        &format!(
            "balsam: error: {}:1: bad value \"two\" for num_nodes: expected an integer from 1 \
             to 1000000\n",
            file.display()
        ),
    );
    let csv = db.tmp.path().join("two.csv");
    std::fs::write(&csv, "name,application,num_nodes\na,say-hello,two\n").unwrap();
    let out = db.run(&["job", "--from-file", csv.to_str().unwrap()]);
    refused(
        &out,
        &format!(
            "balsam: error: {}:2: bad value \"two\" for num_nodes: expected an integer from 1 \
             to 1000000\n",
            csv.display()
        ),
    );
    assert!(names(&db).is_empty());
}

#[test]
fn a_byte_order_mark_is_not_an_error() {
    let db = Db::new();
    db.hello_app();
    let file = db.tmp.path().join("bom.jsonl");
    std::fs::write(
        &file,
        "\u{feff}{\"name\": \"a\", \"application\": \"say-hello\"}\n\
         {\"name\": \"b\", \"application\": \"say-hello\"}\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", file.to_str().unwrap()]);
    assert_eq!(
        out.ok(),
        format!("Added 2 jobs from {}\n", file.display()),
        "{}",
        out.stderr
    );
    let csv = db.tmp.path().join("bom.csv");
    std::fs::write(&csv, "\u{feff}name,application\nc,say-hello\n").unwrap();
    db.run(&["job", "--from-file", csv.to_str().unwrap()]).ok();
    assert_eq!(names(&db), ["a", "b", "c"]);
    // A JSON error names the column within the line, not a "line 1" that is not the file's.
    std::fs::write(
        &file,
        "{\"name\": \"a\", \"application\": \"say-hello\"}\n{\"name\": }\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", file.to_str().unwrap()]);
    refused(
        &out,
        &format!(
            "balsam: error: {}:2: not a JSON object: expected value at column 10\n",
            file.display()
        ),
    );
}

#[test]
fn an_unterminated_csv_quote_is_an_error_naming_its_line() {
    let db = Db::new();
    db.hello_app();
    let csv = db.tmp.path().join("quote.csv");
    std::fs::write(
        &csv,
        "name,application,args\n\
         a,say-hello,one\n\
         b,say-hello,\"two\n\
         c,say-hello,three\n\
         d,say-hello,four\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", csv.to_str().unwrap()]);
    refused(
        &out,
        &format!(
            "balsam: error: {}:3: the quote that opens a field on this line is not closed \
             before the line ends (a job field holds no line break; a quote inside a quoted \
             field is written twice: \"\")\n",
            csv.display()
        ),
    );
    assert!(names(&db).is_empty(), "nothing inserted");
}

#[test]
fn rm_lists_what_it_would_remove_and_asks() {
    let db = Db::new();
    db.run(&["make_dummies", "12"]).ok();
    // `dummy1` is part of dummy1 and dummy10, dummy11: listed, then asked; no answer, no removal.
    let out = db.run(&["rm", "jobs", "--name", "dummy1"]);
    let err = out.err();
    let listed: Vec<&str> = err
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| n.starts_with("dummy"))
        .collect();
    let mut listed: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(listed, ["dummy1", "dummy10", "dummy11"], "{err}");
    assert!(err.starts_with("job_id "), "{err}");
    assert!(
        err.contains("Remove these 3 job(s) and their history? [y/n]: \n"),
        "{err}"
    );
    assert!(
        err.ends_with(
            "balsam: error: nothing removed: not confirmed (pass --yes to remove without asking)\n"
        ),
        "{err}"
    );
    assert_eq!(names(&db).len(), 12);
    // "n" keeps them; "y" removes them.
    db.run_stdin(&["rm", "jobs", "--name", "dummy1"], "n\n")
        .err();
    assert_eq!(names(&db).len(), 12);
    // Names match ignoring case, as in legacy Balsam.
    let out = db.run_stdin(&["rm", "jobs", "--name", "DUMMY1"], "y\n");
    assert_eq!(out.ok(), "Removed 3 job(s)\n");
    assert_eq!(names(&db).len(), 9);
    // --yes does not ask, and --force still means the same.
    assert_eq!(
        db.run(&["rm", "jobs", "--name", "dummy2", "--yes"]).ok(),
        "Removed 1 job(s)\n"
    );
    assert_eq!(
        db.run(&["rm", "jobs", "--name", "dummy3", "--force"]).ok(),
        "Removed 1 job(s)\n"
    );
    assert_eq!(names(&db).len(), 7);
}

#[test]
fn balsam_launcher_in_a_batch_job_refuses_workers_on_the_head_node() {
    let db = Db::new();
    let nodefile = db.tmp.path().join("nodes");
    std::fs::write(&nodefile, "nid01001\nnid01002\n").unwrap();
    let mut c = db.cmd(&["launcher", "--num-workers", "2", "--consume-all"]);
    // Output to a file, not a pipe: a launcher started by mistake (it puts mpiexec in a process
    // group of its own) must not keep the test waiting for the end of its output.
    let out_path = db.tmp.path().join("launcher.out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    c.env("MPIEXEC_TIMEOUT", "20")
        .env("COBALT_JOBID", "4242")
        .env("COBALT_PARTNAME", "1001-1002")
        .env("COBALT_NODEFILE", &nodefile)
        .stdin(std::process::Stdio::null())
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file);
    let mut child = c.spawn().unwrap();
    let ended = common::wait_for(Duration::from_secs(15), Duration::from_millis(50), || {
        child.try_wait().unwrap().is_some()
    });
    if !ended {
        for pid in process_tree(child.id() as i32) {
            // SAFETY: the launcher this test started and its descendants.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = child.wait();
        panic!("balsam launcher started:\n{}", read(&out_path));
    }
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert_eq!(
        read(&out_path),
        "balsam: error: --num-workers 2 starts worker ranks on this host, but this is cobalt \
         batch job 4242 with 2 node(s): inside a batch job `balsam launcher` runs one launcher \
         rank on each node of the allocation. Leave out --num-workers.\n"
    );
    assert!(!Path::new(&db.path.join("log/launcher-1.log")).exists());
}

#[test]
fn the_launcher_logs_at_the_settings_level_and_rotates() {
    let db = Db::new();
    set_settings(
        &db,
        &[
            ("LOG_HANDLER_LEVEL", json!("DEBUG")),
            ("LOG_FILE_SIZE_LIMIT", json!(1024)),
            ("LOG_BACKUP_COUNT", json!(2)),
        ],
    );
    db.hello_app();
    // Two-rank jobs: rank 0 logs the mpiexec line of each, so its log grows past 3 KiB.
    for i in 0..20 {
        db.run(&[
            "job",
            "--name",
            &format!("h{i}"),
            "--app",
            "say-hello",
            "--ranks-per-node",
            "2",
            "--yes",
        ])
        .ok();
    }
    common::sibling_bin("balsam-mpi-launcher");
    let mut c = db.cmd(&[
        "launcher",
        "--num-workers",
        "1",
        "--consume-all",
        "--idle-exit-seconds",
        "1",
    ]);
    c.env("MPIEXEC_TIMEOUT", "100");
    let out = run_cmd(c, Duration::from_secs(120), None);
    out.ok();
    assert!(
        db.jobs_json(&[])
            .iter()
            .all(|j| j["state"] == "JOB_FINISHED"),
        "{}",
        out.stderr
    );
    // Debug lines go to the file only; stderr keeps its own level.
    assert!(!out.stderr.contains("DEBUG"), "{}", out.stderr);
    let mut files: Vec<String> = std::fs::read_dir(db.path.join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("launcher-1.log"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["launcher-1.log", "launcher-1.log.1", "launcher-1.log.2"]
    );
    for f in &files {
        let path = db.path.join("log").join(f);
        assert!(std::fs::metadata(&path).unwrap().len() <= 1024, "{f}");
    }
    let worker = read(&db.path.join("log/launcher-1.rank1.log"));
    assert!(worker.contains(" DEBUG worker on "), "{worker}");
    assert!(
        read(&db.path.join("log/launcher-1.log")).contains("launcher session 1 done"),
        "the newest lines are in the current file"
    );
}

#[test]
fn job_fields_out_of_range_are_refused_from_every_path() {
    let db = Db::new();
    db.hello_app();
    // Accepted today, then every service pass failed with "Integer out of range".
    let out = db.run(&[
        "job",
        "--name",
        "big",
        "--app",
        "say-hello",
        "--num-nodes",
        "4294967295",
        "--coschedule-num-nodes",
        "1",
        "--yes",
    ]);
    out.err();
    assert_eq!(
        first_line(&out),
        "error: invalid value '4294967295' for '--num-nodes <N>': expected an integer from 1 to \
         1000000"
    );
    // Each in range, but too many nodes in all.
    let out = db.run(&[
        "job",
        "--name",
        "big",
        "--app",
        "say-hello",
        "--num-nodes",
        "1000000",
        "--coschedule-num-nodes",
        "1",
        "--yes",
    ]);
    refused(
        &out,
        "balsam: error: bad value \"1\" for coschedule_num_nodes: expected with num_nodes \
         1000000, at most 1000000 nodes in all\n",
    );
    let file = db.tmp.path().join("big.jsonl");
    std::fs::write(
        &file,
        "{\"name\": \"ok\", \"application\": \"say-hello\"}\n\
         {\"name\": \"big\", \"application\": \"say-hello\", \"num_nodes\": 4294967295}\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", file.to_str().unwrap()]);
    refused(
        &out,
        &format!(
            "balsam: error: {}:2: bad value \"4294967295\" for num_nodes: expected an integer \
             from 1 to 1000000\n",
            file.display()
        ),
    );
    let id = db.add_job("small", "w", "say-hello", &[]);
    let out = db.run(&["modify", &id[..8], "num_nodes", "4294967295"]);
    refused(
        &out,
        "balsam: error: bad value \"4294967295\" for num_nodes: expected an integer from 1 to \
         1000000\n",
    );
    assert_eq!(names(&db), ["small"]);
    assert_eq!(db.jobs_json(&[])[0]["num_nodes"], 1);
}

#[test]
fn unbalanced_quotes_in_args_are_refused_from_every_path() {
    let db = Db::new();
    db.hello_app();
    let out = db.run(&[
        "job",
        "--name",
        "q",
        "--app",
        "say-hello",
        "--args",
        "'x",
        "--yes",
    ]);
    out.err();
    assert!(
        first_line(&out).starts_with("error: invalid value ''x' for '--args <ARGS>': "),
        "{}",
        out.stderr
    );
    let file = db.tmp.path().join("q.jsonl");
    std::fs::write(
        &file,
        "{\"name\": \"q\", \"application\": \"say-hello\", \"args\": \"\\\"unclosed\"}\n",
    )
    .unwrap();
    let out = db.run(&["job", "--from-file", file.to_str().unwrap()]);
    let err = out.err();
    assert!(
        err.starts_with(&format!(
            "balsam: error: {}:1: bad value \"\\\"unclosed\" for args: ",
            file.display()
        )),
        "{err}"
    );
    let id = db.add_job("fine", "w", "say-hello", &["--args", "'a b' c"]);
    let out = db.run(&["modify", &id[..8], "args", "it's"]);
    let err = out.err();
    assert!(
        err.starts_with("balsam: error: bad value \"it's\" for args: "),
        "{err}"
    );
    assert_eq!(names(&db), ["fine"]);
    assert_eq!(db.jobs_json(&[])[0]["args"], "'a b' c");
}

/// `balsam job --from-file SOURCE` with `input` written into a pipe by a shell.
fn import_from_pipe(db: &Db, shell: &str, input: &str) -> Run {
    let data = db.tmp.path().join("pipe-input");
    std::fs::write(&data, input).unwrap();
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(shell.replace("BALSAM", &common::balsam_bin().display().to_string()))
        .arg("import")
        .arg(&data)
        .env("BALSAM_DB_PATH", &db.path)
        .current_dir(db.tmp.path());
    run_cmd(c, TIMEOUT, None)
}

#[test]
fn bulk_import_from_a_pipe_reads_it_once() {
    let db = Db::new();
    db.hello_app();
    let two = "{\"name\": \"p1\", \"application\": \"say-hello\"}\n\
               {\"name\": \"p2\", \"application\": \"say-hello\"}\n";
    // `-` is standard input.
    let out = db.run_stdin(&["job", "--from-file", "-"], two);
    assert_eq!(out.ok(), "Added 2 jobs from <stdin>\n", "{}", out.stderr);
    assert_eq!(names(&db), ["p1", "p2"]);
    // A pipe through /dev/stdin, and a process substitution.
    let out = import_from_pipe(
        &db,
        "cat \"$1\" | BALSAM job --from-file /dev/stdin",
        "{\"name\": \"q1\", \"application\": \"say-hello\"}\n\
         {\"name\": \"q2\", \"application\": \"say-hello\"}\n",
    );
    assert_eq!(out.ok(), "Added 2 jobs from /dev/stdin\n", "{}", out.stderr);
    let out = import_from_pipe(
        &db,
        "BALSAM job --from-file <(cat \"$1\") --format csv",
        "name,application\nr1,say-hello\n",
    );
    let text = out.ok();
    assert!(
        text.starts_with("Added 1 jobs from /dev/fd/"),
        "{text}{}",
        out.stderr
    );
    assert_eq!(names(&db), ["p1", "p2", "q1", "q2", "r1"]);
    // A bad line in a pipe: nothing of it is inserted.
    let out = db.run_stdin(
        &["job", "--from-file", "-"],
        "{\"name\": \"s1\", \"application\": \"say-hello\"}\n{\"name\": \"s2\", \"application\": \"nope\"}\n",
    );
    refused(
        &out,
        "balsam: error: <stdin>:2: unknown application \"nope\"; register it with `balsam app \
         --name nope --executable CMD` (see `balsam ls apps`)\n",
    );
    assert_eq!(names(&db).len(), 5);
}

/// The database file and its WAL, to see that a command changed nothing.
fn db_bytes(db: &Db) -> Vec<Vec<u8>> {
    ["balsamdb.sqlite3", "balsamdb.sqlite3-wal"]
        .iter()
        .map(|f| std::fs::read(db.path.join(f)).unwrap_or_default())
        .collect()
}

#[test]
fn read_commands_do_not_wait_for_a_writer_or_write() {
    if common::on_postgres() {
        return; // about the SQLite file and its write lock
    }
    let db = Db::new();
    db.hello_app();
    db.add_job("a", "w", "say-hello", &[]);
    let before = db_bytes(&db);
    for args in [
        vec!["ls"],
        vec!["ls", "wf"],
        vec!["ls", "apps"],
        vec!["ls", "--by-states"],
        vec!["ls", "--history"],
        vec!["log", "--no-follow"],
    ] {
        db.run(&args).ok();
    }
    assert!(db_bytes(&db) == before, "a read command wrote the database");

    // Another process holds the write lock for 60 s: ls answers at once all the same.
    let holder = db.tmp.path().join("hold.py");
    std::fs::write(
        &holder,
        "import sqlite3, sys, time\n\
         c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
         c.execute('BEGIN IMMEDIATE')\n\
         c.execute(\"UPDATE jobs SET description = 'held'\")\n\
         print('locked', flush=True)\n\
         time.sleep(60)\n",
    )
    .unwrap();
    let mut hold = Command::new("python3");
    hold.arg(&holder)
        .arg(db.path.join("balsamdb.sqlite3"))
        .stdout(std::process::Stdio::piped());
    let mut hold = hold.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "locked\n");
    // Well inside the store's wait for a lock: a command that took it would still be waiting.
    let out = run_cmd(db.cmd(&["ls", "wf"]), Duration::from_secs(8), None);
    let _ = hold.kill();
    let _ = hold.wait();
    let text = out.ok();
    assert!(text.contains("w "), "{text}");
}

#[test]
fn an_empty_database_file_is_refused_and_left_alone() {
    if common::on_postgres() {
        return; // about the SQLite file
    }
    let db = Db::new();
    let file = db.path.join("balsamdb.sqlite3");
    std::fs::write(&file, "").unwrap();
    for args in [
        vec!["ls"],
        vec!["job", "--name", "a", "--app", "x", "--yes"],
    ] {
        let out = db.run(&args);
        refused(
            &out,
            &format!(
                "balsam: error: {} is empty (0 bytes): not a Balsam database. It may have been \
                 truncated; restore it from a backup, or create a new database with `balsam \
                 init DIR`\n",
                file.display()
            ),
        );
    }
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
}

#[test]
fn modify_changes_an_application() {
    let db = Db::new();
    db.hello_app();
    let id = db.add_job("a", "w", "say-hello", &["--args", "you"]);
    let out = db.run(&[
        "modify",
        "--type",
        "apps",
        "say-hello",
        "executable",
        "echo Goodbye,",
    ]);
    assert_eq!(
        out.ok(),
        "application say-hello: executable: echo Hello, -> echo Goodbye,\n"
    );
    let out = db.run(&["modify", "--type", "apps", "say-hello", "name", "say-bye"]);
    assert_eq!(
        out.ok(),
        "application say-hello: name: say-hello -> say-bye\n"
    );
    // The job follows its application's new name.
    let jobs = db.jobs_json(&[]);
    assert_eq!(jobs[0]["application"], "say-bye");
    let apps: serde_json::Value =
        serde_json::from_str(db.run(&["ls", "apps", "--json"]).ok()).unwrap();
    assert_eq!(apps[0]["executable"], "echo Goodbye,");
    // Refusals say what to do; nothing changes.
    let out = db.run(&["modify", "--type", "apps", "nope", "description", "x"]);
    refused(
        &out,
        "balsam: error: unknown application \"nope\"; register it with `balsam app --name nope \
         --executable CMD` (see `balsam ls apps`)\n",
    );
    let out = db.run(&["modify", "--type", "apps", "say-bye", "colour", "x"]);
    refused(
        &out,
        "balsam: error: bad value \"colour\" for field: expected an application field: name, \
         description, executable, preprocess, postprocess, envscript\n",
    );
    let out = db.run(&[
        "modify",
        "--type",
        "apps",
        "say-bye",
        "executable",
        "echo 'x",
    ]);
    out.err();
    assert!(
        out.stderr
            .starts_with("balsam: error: cannot parse executable \"echo 'x\""),
        "{}",
        out.stderr
    );
    let apps: serde_json::Value =
        serde_json::from_str(db.run(&["ls", "apps", "--json"]).ok()).unwrap();
    assert_eq!(apps[0]["executable"], "echo Goodbye,");
    assert_eq!(db.jobs_json(&[])[0]["job_id"], id.as_str());
}

/// `balsam modify ID state STATE` with a terminal as its standard input (through `script`).
fn modify_from_a_terminal(db: &Db, id: &str, state: &str) -> Run {
    let line = format!(
        "{} modify {id} state {state}",
        common::balsam_bin().display()
    );
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"])
        .env("BALSAM_DB_PATH", &db.path)
        .current_dir(db.tmp.path());
    run_cmd(c, TIMEOUT, None)
}

#[test]
fn a_script_restarting_a_job_counts_and_a_person_resets() {
    let db = Db::new();
    db.hello_app();
    let id = db.add_job("a", "w", "say-hello", &["--max-restarts", "1"]);
    let restarts = |db: &Db| db.jobs_json(&[])[0]["num_restarts"].as_u64().unwrap();
    // From a script (standard input is not a terminal), as an error handler would.
    db.run(&["modify", &id, "state", "RUN_ERROR"]).ok();
    db.run(&["modify", &id, "state", "RESTART_READY"]).ok();
    assert_eq!(restarts(&db), 1);
    assert_eq!(db.state_of("a"), "RESTART_READY");
    db.run(&["modify", &id, "state", "RUN_ERROR"]).ok();
    db.run(&["modify", &id, "state", "RESTART_READY"]).ok();
    assert_eq!(db.state_of("a"), "FAILED", "past max_restarts 1");
    assert!(
        common::history(&db, "a").contains("restart limit reached"),
        "{}",
        common::history(&db, "a")
    );
    // A person at a terminal starts the count again.
    let out = modify_from_a_terminal(&db, &id, "RESTART_READY");
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(db.state_of("a"), "RESTART_READY");
    assert_eq!(restarts(&db), 0);
    assert!(
        common::history(&db, "a").contains("(restart count reset from 1 to 0)"),
        "{}",
        common::history(&db, "a")
    );
}
