//! The store against a real SQLite file: jobs, dependencies, the state machine, leases, expiry,
//! restart bounds, migrations.

use std::time::Duration;

use balsam_store::*;

/// A new database: SQLite, or with BALSAM_TEST_BACKEND=postgres a new database on the server
/// of BALSAM_TEST_PG_URL (tests/pg/server.sh), so every test runs on both backends.
fn create_db(path: &std::path::Path) -> Store {
    if std::env::var("BALSAM_TEST_BACKEND").as_deref() != Ok("postgres") {
        return Store::create(path).unwrap();
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let url =
        std::env::var("BALSAM_TEST_PG_URL").expect("BALSAM_TEST_PG_URL for the postgres backend");
    let (mut info, password) = ServerInfo::from_url(&url).unwrap();
    info.dbname = format!(
        "store_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        now_us() % 1_000_000
    );
    Store::create_on_server(path, &info, password.as_deref()).unwrap()
}

fn new_store() -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = create_db(&tmp.path().join("db"));
    store
        .add_app(&Application {
            id: 0,
            name: "hello".into(),
            description: String::new(),
            executable: "echo hi".into(),
            preprocess: String::new(),
            postprocess: String::new(),
            envscript: String::new(),
        })
        .unwrap();
    (tmp, store)
}

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        workflow: "wf".into(),
        application: "hello".into(),
        ..JobSpec::default()
    }
}

fn add(store: &mut Store, name: &str, parents: &[&Job]) -> Job {
    store
        .add_job(&NewJob {
            job_id: None,
            spec: spec(name),
            parents: parents.iter().map(|p| p.job_id).collect(),
        })
        .unwrap()
}

fn walk(store: &mut Store, pk: i64, path: &[State]) {
    for w in path.windows(2) {
        assert_eq!(
            store
                .transition(Transition::new(pk, w[0], w[1], ""), None)
                .unwrap(),
            Outcome::Applied(w[1])
        );
    }
}

const TO_RUNNABLE: [State; 4] = [
    State::Created,
    State::Ready,
    State::StagedIn,
    State::Preprocessed,
];

#[test]
fn creation_writes_history_and_ids_resolve_by_prefix() {
    let (_t, mut s) = new_store();
    let j = add(&mut s, "a", &[]);
    let h = s.history(j.pk).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].to_state, State::Created);
    assert!(
        h[0].history_line().ends_with(" CREATED]"),
        "{}",
        h[0].history_line()
    );
    let id = j.job_id.to_string();
    assert_eq!(s.job(&id[..5]).unwrap().pk, j.pk);
    assert_eq!(s.job(&id).unwrap().pk, j.pk);
    assert!(matches!(s.job("zz"), Err(Error::UnknownJob(_))));
    // Sixteen jobs: some pair shares a first hex digit, so a one-character prefix is ambiguous.
    let mut all = vec![j];
    for i in 0..16 {
        all.push(add(&mut s, &format!("j{i}"), &[]));
    }
    let first = all
        .iter()
        .map(|j| j.job_id.to_string()[..1].to_string())
        .find(|c| {
            all.iter()
                .filter(|j| j.job_id.to_string().starts_with(c.as_str()))
                .count()
                > 1
        });
    let err = s.job(&first.unwrap()).unwrap_err().to_string();
    assert!(err.contains("ambiguous"), "{err}");
}

#[test]
fn illegal_transitions_are_refused_and_change_nothing() {
    let (_t, mut s) = new_store();
    let j = add(&mut s, "a", &[]);
    let err = s
        .transition(
            Transition::new(j.pk, State::Created, State::RunDone, ""),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("CREATED") && err.to_string().contains("RUN_DONE"));
    assert_eq!(s.job_by_pk(j.pk).unwrap().state, State::Created);
    assert_eq!(s.history(j.pk).unwrap().len(), 1);
    // A stale expectation is a conflict, not an error.
    assert_eq!(
        s.transition(
            Transition::new(j.pk, State::Ready, State::StagedIn, ""),
            None
        )
        .unwrap(),
        Outcome::Conflict(State::Created)
    );
}

#[test]
fn parents_gate_children_and_failures_propagate() {
    let (_t, mut s) = new_store();
    let a = add(&mut s, "A", &[]);
    let b = add(&mut s, "B", &[&a]);
    let c = add(&mut s, "C", &[&b]);
    assert_eq!(s.check_parents(b.pk).unwrap(), Some(State::AwaitingParents));
    assert_eq!(s.check_parents(c.pk).unwrap(), Some(State::AwaitingParents));
    walk(&mut s, a.pk, &TO_RUNNABLE);
    walk(
        &mut s,
        a.pk,
        &[
            State::Preprocessed,
            State::Running,
            State::RunDone,
            State::Postprocessed,
            State::JobFinished,
        ],
    );
    assert_eq!(
        s.job_by_pk(b.pk).unwrap().state,
        State::Ready,
        "woken by its parent"
    );
    // B fails: C, waiting on it, fails too, with the reason in its history.
    s.transition(
        Transition::new(b.pk, State::Ready, State::Failed, "boom"),
        None,
    )
    .unwrap();
    assert_eq!(s.job_by_pk(c.pk).unwrap().state, State::Failed);
    let last = s.history(c.pk).unwrap().pop().unwrap();
    assert!(last.message.contains("[B |"), "{}", last.message);
}

#[test]
fn dependencies_refuse_cycles_and_duplicates() {
    let (_t, mut s) = new_store();
    let a = add(&mut s, "A", &[]);
    let b = add(&mut s, "B", &[&a]);
    let c = add(&mut s, "C", &[&b]);
    let ids = |j: &Job| j.job_id.to_string();
    assert!(matches!(
        s.add_dependency(&ids(&c), &ids(&a)),
        Err(Error::Cycle { .. })
    ));
    assert!(matches!(
        s.add_dependency(&ids(&a), &ids(&a)),
        Err(Error::Cycle { .. })
    ));
    assert!(s
        .add_dependency(&ids(&a), &ids(&b))
        .unwrap_err()
        .to_string()
        .contains("already a parent"));
    s.add_dependency(&ids(&a), &ids(&c)).unwrap();
    assert_eq!(s.parents(c.pk).unwrap().len(), 2);
    assert_eq!(s.children(a.pk).unwrap().len(), 2);
}

#[test]
fn leases_are_exclusive_and_expire_to_restart_ready() {
    let (_t, mut s) = new_store();
    let jobs: Vec<Job> = (0..10)
        .map(|i| add(&mut s, &format!("j{i}"), &[]))
        .collect();
    for j in &jobs {
        walk(&mut s, j.pk, &TO_RUNNABLE);
    }
    let info = |pid| SessionInfo {
        kind: "launcher".into(),
        host: "h".into(),
        pid,
        ..Default::default()
    };
    let s1 = s.start_session(&info(1)).unwrap();
    let s2 = s.start_session(&info(2)).unwrap();
    let got1 = s
        .lease(s1, LeaseGroup::Runnable, &LeaseFilter::default(), 6)
        .unwrap();
    let got2 = s
        .lease(s2, LeaseGroup::Runnable, &LeaseFilter::default(), 6)
        .unwrap();
    assert_eq!(got1.len(), 6);
    assert_eq!(got2.len(), 4);
    assert!(got1.iter().all(|j| !got2.iter().any(|k| k.pk == j.pk)));
    // Session 2 may not write a job session 1 holds.
    let out = s
        .apply(
            &[Transition::new(
                got1[0].pk,
                State::Preprocessed,
                State::Running,
                "",
            )],
            Some(s2),
        )
        .unwrap();
    assert_eq!(out[0], Outcome::Conflict(State::Preprocessed));
    let run: Vec<Transition> = got1
        .iter()
        .map(|j| Transition::new(j.pk, State::Preprocessed, State::Running, ""))
        .collect();
    assert!(s
        .apply(&run, Some(s1))
        .unwrap()
        .iter()
        .all(|o| matches!(o, Outcome::Applied(State::Running))));
    // Session 1 falls silent; session 2 keeps beating.
    std::thread::sleep(Duration::from_millis(1100));
    s.heartbeat(s2).unwrap();
    let expired = s.expire_sessions(Duration::from_secs(1)).unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].session.id, s1);
    assert_eq!(expired[0].restarted, 6);
    for j in &got1 {
        let j = s.job_by_pk(j.pk).unwrap();
        assert_eq!(j.state, State::RestartReady);
        assert_eq!(j.num_restarts, 1);
        assert_eq!(j.lease_session, None);
        let msg = s.history(j.pk).unwrap().pop().unwrap().message;
        assert!(
            msg.contains(&format!("session {s1}")) && msg.contains("silent since"),
            "{msg}"
        );
    }
    // The expired session learns it on its next heartbeat and cannot lease again.
    assert!(matches!(s.heartbeat(s1), Err(Error::SessionEnded(_))));
    assert!(s
        .lease(s1, LeaseGroup::Runnable, &LeaseFilter::default(), 1)
        .is_err());
    assert_eq!(
        s.lease(s2, LeaseGroup::Runnable, &LeaseFilter::default(), 100)
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn restart_bound_fails_the_job() {
    let (_t, mut s) = new_store();
    let mut sp = spec("flaky");
    sp.max_restarts = 2;
    let j = s
        .add_job(&NewJob {
            job_id: None,
            spec: sp,
            parents: vec![],
        })
        .unwrap();
    walk(&mut s, j.pk, &TO_RUNNABLE);
    let mut from = State::Preprocessed;
    for _ in 0..2 {
        walk(
            &mut s,
            j.pk,
            &[from, State::Running, State::RunTimeout, State::RestartReady],
        );
        from = State::RestartReady;
    }
    walk(
        &mut s,
        j.pk,
        &[State::RestartReady, State::Running, State::RunTimeout],
    );
    let out = s
        .transition(
            Transition::new(j.pk, State::RunTimeout, State::RestartReady, "timed out"),
            None,
        )
        .unwrap();
    assert_eq!(out, Outcome::Applied(State::Failed));
    let msg = s.history(j.pk).unwrap().pop().unwrap().message;
    assert!(msg.contains("restart limit"), "{msg}");
}

#[test]
fn user_state_changes_and_kill() {
    let (_t, mut s) = new_store();
    let a = add(&mut s, "A", &[]);
    let b = add(&mut s, "B", &[&a]);
    let j = s
        .set_state_by_user(a.pk, State::RestartReady, "", RestartCount::Count)
        .unwrap();
    assert_eq!(j.state, State::RestartReady);
    assert!(s
        .history(a.pk)
        .unwrap()
        .pop()
        .unwrap()
        .message
        .contains("User mutated state from command line"));
    let killed = s.kill(a.pk, true).unwrap();
    assert_eq!(killed.len(), 2);
    assert_eq!(s.job_by_pk(b.pk).unwrap().state, State::UserKilled);
    assert!(s
        .set_state_by_user(a.pk, State::Ready, "", RestartCount::Count)
        .is_err());
    assert!(s
        .modify_field(a.pk, "args", &fields::Value::Text("x".into()))
        .is_err());
}

#[test]
fn bulk_add_checks_everything_first() {
    let (_t, mut s) = new_store();
    let mut jobs: Vec<NewJob> = (0..100)
        .map(|i| NewJob {
            job_id: None,
            spec: spec(&format!("j{i}")),
            parents: vec![],
        })
        .collect();
    jobs[57].spec.application = "nope".into();
    let err = s.add_jobs(&jobs, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains(":58:") && err.contains("nope"), "{err}");
    assert_eq!(s.count_jobs().unwrap(), 0, "nothing inserted");
    jobs[57].spec.application = "hello".into();
    let mut seen = Vec::new();
    s.add_jobs(&jobs, &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen, vec![100]);
    assert_eq!(
        s.count_by_state(&JobFilter::default()).unwrap(),
        vec![(State::Created, 100)]
    );
}

#[test]
fn newer_schema_is_refused() {
    let (t, s) = new_store();
    let file = s.dir.db_file();
    let server = s.server().cloned();
    drop(s);
    match server {
        None => {
            let conn = rusqlite::Connection::open(&file).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        Some(info) => {
            let mut c = info
                .client_config(&t.path().join("db"))
                .connect(postgres::NoTls)
                .unwrap();
            c.execute(
                "INSERT INTO balsam_schema (version) VALUES ($1)",
                &[&(PG_SCHEMA_VERSION + 1)],
            )
            .unwrap();
        }
    }
    let err = Store::open(DbDir::open(&t.path().join("db")).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("newer") && err.contains("Upgrade balsam"),
        "{err}"
    );
}

#[test]
fn waiting_work_groups_what_no_launcher_holds() {
    let (_tmp, mut store) = new_store();
    let mut shapes = Vec::new();
    for (i, (nodes, wall, packing)) in [(1, 10, 4), (1, 10, 4), (1, 10, 4), (8, 30, 1)]
        .into_iter()
        .enumerate()
    {
        let mut s = spec(&format!("j{i}"));
        s.num_nodes = nodes;
        s.wall_time_minutes = wall;
        s.node_packing_count = packing;
        shapes.push(
            store
                .add_job(&NewJob {
                    job_id: None,
                    spec: s,
                    parents: vec![],
                })
                .unwrap(),
        );
    }
    // A child waiting for its parent is not work yet (the service's transitions have moved it
    // to AWAITING_PARENTS before it counts).
    let parent = shapes[0].clone();
    let child = add(&mut store, "child", &[&parent]);
    walk(
        &mut store,
        child.pk,
        &[State::Created, State::AwaitingParents],
    );
    let work = store.waiting_work("").unwrap();
    assert_eq!(work.len(), 2, "{work:?}");
    let small = work.iter().find(|w| w.num_nodes == 1).unwrap();
    assert_eq!(
        (
            small.wall_time_minutes,
            small.node_packing_count,
            small.count
        ),
        (10, 4, 3)
    );
    let big = work.iter().find(|w| w.num_nodes == 8).unwrap();
    assert_eq!(big.count, 1);

    // A leased job belongs to its launcher; finished jobs are not work.
    let session = store.start_session(&SessionInfo::default()).unwrap();
    walk(&mut store, shapes[1].pk, &TO_RUNNABLE);
    let leased = store
        .lease(session, LeaseGroup::Runnable, &LeaseFilter::default(), 10)
        .unwrap();
    assert_eq!(leased.len(), 1);
    let work = store.waiting_work("").unwrap();
    let small = work.iter().find(|w| w.num_nodes == 1).unwrap();
    assert_eq!(small.count, 2);

    assert!(store.waiting_work("nomatch").unwrap().is_empty());
    assert_eq!(store.count_wf_filter("w").unwrap(), 5);
    assert_eq!(store.count_wf_filter("nomatch").unwrap(), 0);
}

fn session(s: &mut Store, host: &str, pid: i64) -> i64 {
    s.start_session(&SessionInfo {
        kind: "launcher".into(),
        host: host.into(),
        pid,
        ..Default::default()
    })
    .unwrap()
}

fn runnable(s: &mut Store, name: &str) -> Job {
    let j = add(s, name, &[]);
    walk(s, j.pk, &TO_RUNNABLE);
    s.job_by_pk(j.pk).unwrap()
}

#[test]
fn a_script_sending_a_job_back_counts_toward_max_restarts_and_a_person_resets() {
    let (_t, mut s) = new_store();
    let j = add(&mut s, "loop", &[]);
    s.modify_field(j.pk, "max_restarts", &fields::Value::Int(2))
        .unwrap();
    walk(&mut s, j.pk, &TO_RUNNABLE);
    let mut from = State::Preprocessed;
    let mut states = Vec::new();
    for _ in 0..4 {
        walk(&mut s, j.pk, &[from, State::Running, State::RunError]);
        let after = s
            .set_state_by_user(j.pk, State::RestartReady, "", RestartCount::Count)
            .unwrap();
        states.push(after.state);
        if after.state != State::RestartReady {
            break;
        }
        from = State::RestartReady;
    }
    assert_eq!(
        states,
        vec![State::RestartReady, State::RestartReady, State::Failed]
    );
    let last = s.history(j.pk).unwrap().pop().unwrap().message;
    assert!(last.contains("restart limit"), "{last}");
    // A person resets it on purpose: a fresh count.
    let after = s
        .set_state_by_user(j.pk, State::RestartReady, "", RestartCount::Reset)
        .unwrap();
    assert_eq!((after.state, after.num_restarts), (State::RestartReady, 0));
}

#[test]
fn recursive_kill_makes_every_descendant_user_killed() {
    let (_t, mut s) = new_store();
    let a = add(&mut s, "A", &[]);
    let b = add(&mut s, "B", &[&a]);
    let c = add(&mut s, "C", &[&b]);
    for j in [&b, &c] {
        s.check_parents(j.pk).unwrap();
    }
    let killed = s.kill(a.pk, true).unwrap();
    assert_eq!(killed.len(), 3);
    for j in [&a, &b, &c] {
        assert_eq!(s.job_by_pk(j.pk).unwrap().state, State::UserKilled);
    }
    // Without --recursive, the children fail because their parent was killed (legacy).
    let d = add(&mut s, "D", &[]);
    let e = add(&mut s, "E", &[&d]);
    s.check_parents(e.pk).unwrap();
    s.kill(d.pk, false).unwrap();
    assert_eq!(s.job_by_pk(e.pk).unwrap().state, State::Failed);
}

#[test]
fn removed_jobs_are_gone_for_a_launcher_and_do_not_hold_back_the_others() {
    let (_t, mut s) = new_store();
    let a = runnable(&mut s, "a");
    let b = runnable(&mut s, "b");
    let sid = session(&mut s, "h", 1);
    s.lease(sid, LeaseGroup::Runnable, &LeaseFilter::default(), 10)
        .unwrap();
    s.remove_jobs(&[a.pk]).unwrap();
    let out = s
        .apply(
            &[
                Transition::new(a.pk, State::Preprocessed, State::Running, ""),
                Transition::new(b.pk, State::Preprocessed, State::Running, ""),
            ],
            Some(sid),
        )
        .unwrap();
    assert_eq!(out, vec![Outcome::Gone, Outcome::Applied(State::Running)]);
    assert_eq!(s.lease_states(sid).unwrap(), vec![(b.pk, State::Running)]);
    // A note on the job that is still there, none on the removed one.
    assert!(s.note(b.pk, Some(sid), "process 42 ended").unwrap());
    assert!(!s.note(a.pk, Some(sid), "process 41 ended").unwrap());
    let last = s.history(b.pk).unwrap().pop().unwrap();
    assert_eq!(last.to_state, State::Running);
    assert!(
        last.message.contains("process 42 ended"),
        "{}",
        last.message
    );
}

#[test]
fn a_session_whose_process_is_gone_is_ended_at_once() {
    let (_t, mut s) = new_store();
    let jobs: Vec<Job> = (0..3).map(|i| runnable(&mut s, &format!("j{i}"))).collect();
    let host = "this-host";
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let dead = session(&mut s, host, child.id() as i64);
    let alive = session(&mut s, host, std::process::id() as i64);
    let elsewhere = session(&mut s, "other-host", 999_999);
    let got = s
        .lease(dead, LeaseGroup::Runnable, &LeaseFilter::default(), 2)
        .unwrap();
    s.apply(
        &[Transition::new(
            got[0].pk,
            State::Preprocessed,
            State::Running,
            "",
        )],
        Some(dead),
    )
    .unwrap();
    assert!(
        s.expire_dead_sessions(host).unwrap().is_empty(),
        "still alive"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let ended = s.expire_dead_sessions(host).unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].session.id, dead);
    assert_eq!((ended[0].restarted, ended[0].released), (1, 1));
    let j = s.job_by_pk(got[0].pk).unwrap();
    assert_eq!((j.state, j.lease_session), (State::RestartReady, None));
    let why = s.history(j.pk).unwrap().pop().unwrap().message;
    assert!(why.contains("process is gone"), "{why}");
    let live: Vec<i64> = s.live_sessions().unwrap().iter().map(|x| x.id).collect();
    assert_eq!(live, vec![alive, elsewhere]);
    assert_eq!(jobs.len(), 3);
}

#[test]
fn runnable_overview_and_work_outlook() {
    let (_t, mut s) = new_store();
    let small = runnable(&mut s, "small");
    let big = add(&mut s, "big", &[]);
    s.modify_field(big.pk, "num_nodes", &fields::Value::Int(8))
        .unwrap();
    walk(&mut s, big.pk, &TO_RUNNABLE);
    let waiting = add(&mut s, "child", &[&small]);
    s.check_parents(waiting.pk).unwrap();
    let _fresh = add(&mut s, "fresh", &[]);
    let groups = s.runnable_overview("").unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(
        (groups[0].nodes_needed, groups[0].serial, groups[0].count),
        (1, true, 1)
    );
    assert_eq!((groups[1].nodes_needed, groups[1].serial), (8, false));
    assert!(groups[1].example.contains("big"), "{:?}", groups[1]);
    assert!(s.runnable_overview("no-such-wf").unwrap().is_empty());

    let me = session(&mut s, "h", 1);
    let other = session(&mut s, "h", 2);
    s.lease(other, LeaseGroup::Runnable, &LeaseFilter::default(), 1)
        .unwrap();
    let o = s.work_outlook(me, "").unwrap();
    assert_eq!(o.runnable_free, 1);
    assert_eq!(o.processable_free, 1, "the fresh CREATED job");
    assert_eq!(o.awaiting_parents, 1);
    assert_eq!(o.held_by_others, 1);
    assert_eq!(
        o.others.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![other]
    );
    assert!(!o.service_live);
    s.start_session(&SessionInfo {
        kind: "service".into(),
        host: "h".into(),
        pid: 3,
        ..Default::default()
    })
    .unwrap();
    assert!(s.work_outlook(me, "").unwrap().service_live);
    assert_eq!(
        s.work_outlook(me, "nothing").unwrap(),
        Outlook {
            service_live: true,
            ..Outlook::default()
        }
    );
}

#[test]
fn import_streams_once_in_one_transaction_with_time_ordered_ids() {
    let (_t, mut s) = new_store();
    let first = NewJob {
        job_id: Some(new_job_id()),
        spec: spec("first"),
        parents: vec![],
    };
    let parent = first.job_id.unwrap();
    // An iterator that can be read once, like a pipe; the bad line is the third.
    let mut consumed = 0;
    let lines = [
        first.clone(),
        NewJob {
            job_id: None,
            spec: spec("second"),
            parents: vec![parent],
        },
        NewJob {
            job_id: None,
            spec: JobSpec {
                args: "'unbalanced".into(),
                ..spec("third")
            },
            parents: vec![],
        },
    ];
    let mut it = lines.iter().cloned().enumerate().map(|(i, job)| {
        consumed += 1;
        Ok(ImportLine { line: i + 1, job })
    });
    let err = s
        .import_jobs("jobs.jsonl", &mut it, &mut |_| {})
        .unwrap_err()
        .to_string();
    drop(it);
    assert_eq!(consumed, 3);
    assert!(err.starts_with("jobs.jsonl:3: bad value"), "{err}");
    assert_eq!(s.count_jobs().unwrap(), 0, "nothing inserted");
    let mut it = lines[..2]
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, job)| Ok(ImportLine { line: i + 1, job }));
    let pks = s.import_jobs("jobs.jsonl", &mut it, &mut |_| {}).unwrap();
    assert_eq!(pks.len(), 2);
    let second = s.job_by_pk(pks[1]).unwrap();
    assert_ne!(second.job_id.to_string()[..8], parent.to_string()[..8]);
    assert_eq!(s.parent_ids(second.pk).unwrap(), vec![parent]);
    // The same id again: refused, naming the line.
    let mut it = std::iter::once(Ok(ImportLine {
        line: 9,
        job: first,
    }));
    let err = s
        .import_jobs("more.jsonl", &mut it, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("more.jsonl:9") && err.contains("already"),
        "{err}"
    );
}

#[test]
fn filters_are_case_insensitive_substrings_as_in_legacy() {
    let (_t, mut s) = new_store();
    for name in ["dummy1", "dummy10", "Dummy11", "other"] {
        add(&mut s, name, &[]);
    }
    let names = |s: &mut Store, f: JobFilter| -> Vec<String> {
        s.list_jobs(&f, 100)
            .unwrap()
            .0
            .into_iter()
            .map(|j| j.spec.name)
            .collect()
    };
    let f = JobFilter {
        name: Some("DUMMY1".into()),
        ..JobFilter::default()
    };
    assert_eq!(names(&mut s, f), vec!["dummy1", "dummy10", "Dummy11"]);
    let all = s.list_jobs(&JobFilter::default(), 100).unwrap().0;
    let id = all[3].job_id.to_string();
    let f = JobFilter {
        id: Some(id[2..14].to_uppercase()),
        ..JobFilter::default()
    };
    assert_eq!(names(&mut s, f), vec!["other"]);
    let f = JobFilter {
        workflow: Some("W".into()),
        ..JobFilter::default()
    };
    assert_eq!(names(&mut s, f).len(), 4);
    let f = JobFilter {
        id: Some("xyz".into()),
        ..JobFilter::default()
    };
    assert!(s.list_jobs(&f, 10).is_err());
}

#[test]
fn applications_can_be_modified_and_jobs_follow_a_rename() {
    let (_t, mut s) = new_store();
    let j = add(&mut s, "j", &[]);
    let app = s.modify_app("hello", "executable", "echo hello,").unwrap();
    assert_eq!(app.executable, "echo hello,");
    assert!(s.modify_app("hello", "executable", "echo 'x").is_err());
    assert!(s.modify_app("hello", "colour", "red").is_err());
    assert!(s.modify_app("nope", "executable", "x").is_err());
    s.modify_app("hello", "name", "greet").unwrap();
    assert_eq!(s.job_by_pk(j.pk).unwrap().spec.application, "greet");
    assert!(s.app("hello").is_err());
}

#[test]
fn absurd_job_fields_are_refused_at_creation() {
    let (_t, mut s) = new_store();
    let mut j = NewJob {
        job_id: None,
        spec: spec("huge"),
        parents: vec![],
    };
    j.spec.num_nodes = u32::MAX;
    let e = s.add_job(&j).unwrap_err().to_string();
    assert!(e.contains("num_nodes"), "{e}");
    j.spec.num_nodes = 1_000_000;
    j.spec.coschedule_num_nodes = 1;
    let e = s.add_job(&j).unwrap_err().to_string();
    assert!(e.contains("coschedule_num_nodes"), "{e}");
    assert_eq!(s.count_jobs().unwrap(), 0);
}

#[test]
fn read_only_opens_never_write_and_empty_or_vanished_files_are_named() {
    let (t, mut s) = new_store();
    add(&mut s, "j", &[]);
    let dir = s.dir.clone();
    let mut ro = Store::open_read_only(dir.clone()).unwrap();
    assert_eq!(ro.count_jobs().unwrap(), 1);
    assert!(ro
        .add_app(&Application {
            id: 0,
            name: "x".into(),
            description: String::new(),
            executable: "true".into(),
            preprocess: String::new(),
            postprocess: String::new(),
            envscript: String::new(),
        })
        .is_err());
    // A writer holding the lock does not block a reader.
    s.check_file().unwrap();
    drop(ro);
    drop(s);
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join(DB_FILE), "").unwrap();
    let e = DbDir::open(&empty).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("balsam init"), "{e}");
    let s = Store::open(dir.clone()).unwrap();
    if s.backend() == Backend::Sqlite {
        std::fs::rename(dir.db_file(), t.path().join("moved")).unwrap();
        let e = s.check_file().unwrap_err().to_string();
        assert!(e.contains("gone") && e.contains("removed"), "{e}");
    }
}
