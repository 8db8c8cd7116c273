//! The store against a real SQLite file: jobs, dependencies, the state machine, leases, expiry,
//! restart bounds, migrations.

use std::time::Duration;

use balsam_store::*;

fn new_store() -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::create(&tmp.path().join("db")).unwrap();
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
    let j = s.set_state_by_user(a.pk, State::RestartReady, "").unwrap();
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
    assert!(s.set_state_by_user(a.pk, State::Ready, "").is_err());
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
    assert!(s.add_jobs(&jobs, 10, &mut |_| {}).is_err());
    assert_eq!(s.count_jobs().unwrap(), 0, "nothing inserted");
    jobs[57].spec.application = "hello".into();
    let mut seen = Vec::new();
    s.add_jobs(&jobs, 30, &mut |n| seen.push(n)).unwrap();
    assert_eq!(seen, vec![30, 60, 90, 100]);
    assert_eq!(
        s.count_by_state(&JobFilter::default()).unwrap(),
        vec![(State::Created, 100)]
    );
}

#[test]
fn newer_schema_is_refused() {
    let (t, s) = new_store();
    let file = s.dir.db_file();
    drop(s);
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
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
