//! The transitions as the service calls them (`process_pending`), on a real database, without MPI.

use std::time::Duration;

use balsam_launcher::messages::{ExitStatus, KillReason};
use balsam_launcher::transitions::{after_run, process_pending, RunResult, TransitionOptions};
use balsam_store::{
    Application, JobSpec, LeaseFilter, LeaseGroup, NewJob, SessionInfo, State, Store, Transition,
};

fn setup() -> (tempfile::TempDir, Store, i64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut store = Store::create(&tmp.path().join("db")).unwrap();
    let session = store
        .start_session(&SessionInfo {
            kind: "service".into(),
            host: "h".into(),
            pid: 1,
            ..SessionInfo::default()
        })
        .unwrap();
    (tmp, store, session)
}

fn app(store: &mut Store, name: &str, pre: &str, post: &str) {
    store
        .add_app(&Application {
            id: 0,
            name: name.into(),
            description: String::new(),
            executable: "true".into(),
            preprocess: pre.into(),
            postprocess: post.into(),
            envscript: String::new(),
        })
        .unwrap();
}

fn spec(name: &str, app: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        workflow: "wf".into(),
        application: app.into(),
        ..JobSpec::default()
    }
}

fn state(store: &mut Store, name: &str) -> State {
    let (jobs, _) = store
        .list_jobs(
            &balsam_store::JobFilter {
                name: Some(name.into()),
                ..Default::default()
            },
            10,
        )
        .unwrap();
    jobs.into_iter()
        .find(|j| j.spec.name == name)
        .unwrap()
        .state
}

#[test]
fn process_pending_takes_jobs_to_runnable_and_respects_parents() {
    let (tmp, mut store, session) = setup();
    let script = tmp.path().join("pre.sh");
    std::fs::write(&script, "#!/bin/sh\necho pre > pre.txt\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    app(&mut store, "plain", "", "");
    app(&mut store, "pre", &script.display().to_string(), "");
    let parent = store
        .add_job(&NewJob {
            spec: spec("parent", "plain"),
            ..NewJob::default()
        })
        .unwrap();
    let mut child = spec("child", "pre");
    child.input_files = "*.txt".into();
    store
        .add_job(&NewJob {
            spec: child,
            parents: vec![parent.job_id],
            ..NewJob::default()
        })
        .unwrap();
    let many: Vec<NewJob> = (0..300)
        .map(|i| NewJob {
            spec: spec(&format!("m{i}"), "plain"),
            ..NewJob::default()
        })
        .collect();
    store.add_jobs(&many, &mut |_| {}).unwrap();

    let db = store.dir.clone();
    let n = process_pending(
        &db,
        session,
        &LeaseFilter::default(),
        3,
        &TransitionOptions::default(),
    )
    .unwrap();
    assert_eq!(n, 302);
    assert_eq!(state(&mut store, "parent"), State::Preprocessed);
    assert_eq!(state(&mut store, "m299"), State::Preprocessed);
    assert_eq!(state(&mut store, "child"), State::AwaitingParents);
    assert!(
        store.leased_jobs(session).unwrap().is_empty(),
        "every lease given back"
    );

    // The parent runs elsewhere and finishes; its output appears; the child is woken.
    let p = store.job_by_pk(parent.pk).unwrap();
    std::fs::write(p.workdir(&db.root).join("result.txt"), "42").unwrap();
    let pk = parent.pk;
    let leased = store
        .lease(
            session,
            LeaseGroup::Runnable,
            &LeaseFilter {
                wf_filter: "wf".into(),
                ..Default::default()
            },
            1000,
        )
        .unwrap();
    assert!(leased.iter().any(|j| j.pk == pk));
    for (from, to) in [
        (State::Preprocessed, State::Running),
        (State::Running, State::RunDone),
        (State::RunDone, State::Postprocessed),
        (State::Postprocessed, State::JobFinished),
    ] {
        store
            .transition(Transition::new(pk, from, to, ""), Some(session))
            .unwrap();
    }
    let others: Vec<i64> = leased.iter().map(|j| j.pk).filter(|p| *p != pk).collect();
    store.release(session, &others).unwrap();
    assert_eq!(state(&mut store, "child"), State::Ready);
    process_pending(
        &db,
        session,
        &LeaseFilter::default(),
        2,
        &TransitionOptions::default(),
    )
    .unwrap();
    assert_eq!(state(&mut store, "child"), State::Preprocessed);
    let c = store
        .list_jobs(
            &balsam_store::JobFilter {
                name: Some("child".into()),
                ..Default::default()
            },
            1,
        )
        .unwrap()
        .0
        .remove(0);
    let wd = c.workdir(&db.root);
    assert_eq!(
        std::fs::read_to_string(wd.join("result.txt")).unwrap(),
        "42",
        "copied from the parent"
    );
    assert_eq!(
        std::fs::read_to_string(wd.join("pre.txt")).unwrap(),
        "pre\n",
        "preprocess ran in the workdir"
    );
}

#[test]
fn after_run_plans_legacy_outcomes() {
    let (_tmp, mut store, _session) = setup();
    app(&mut store, "plain", "", "");
    app(&mut store, "post", "", "post.sh");
    let job = store
        .add_job(&NewJob {
            spec: spec("j", "plain"),
            ..NewJob::default()
        })
        .unwrap();
    let plain = store.app("plain").unwrap();
    let post = store.app("post").unwrap();
    let run = |status: ExitStatus, killed: Option<KillReason>| (status, killed);
    let plan = |job: &balsam_store::Job,
                app: &Application,
                (st, k): (ExitStatus, Option<KillReason>),
                stop: bool| {
        let r = RunResult {
            status: &st,
            killed: k,
            tail: "tail",
            elapsed: Duration::from_secs(1),
        };
        let p = after_run(job, Some(app), &r, stop);
        (
            p.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
            p.needs_processing,
        )
    };
    use State::*;
    assert_eq!(
        plan(&job, &plain, run(ExitStatus::Code(0), None), false),
        (vec![RunDone, Postprocessed, JobFinished], false)
    );
    assert_eq!(
        plan(&job, &post, run(ExitStatus::Code(0), None), false),
        (vec![RunDone], true)
    );
    assert_eq!(
        plan(&job, &plain, run(ExitStatus::Code(2), None), false),
        (vec![RunError, Failed], false)
    );
    assert_eq!(
        plan(
            &job,
            &plain,
            run(ExitStatus::Signal(9), Some(KillReason::TimeLimit)),
            true
        ),
        (vec![RunTimeout, RestartReady], false)
    );
    assert_eq!(
        plan(
            &job,
            &plain,
            run(ExitStatus::Signal(9), Some(KillReason::User)),
            false
        ),
        (vec![], false)
    );
    // Files the launcher could not write, or a job taken back before it started: nothing is
    // written, the job stays as it was.
    assert_eq!(
        plan(
            &job,
            &plain,
            run(ExitStatus::Infrastructure("No space left".into()), None),
            false
        ),
        (vec![], false)
    );
    assert_eq!(
        plan(
            &job,
            &plain,
            run(
                ExitStatus::NotStarted("taken back".into()),
                Some(KillReason::Reclaimed)
            ),
            false
        ),
        (vec![], false)
    );
    let mut handled = job.clone();
    handled.spec.post_error_handler = true;
    handled.spec.post_timeout_handler = true;
    assert_eq!(
        plan(&handled, &plain, run(ExitStatus::Code(2), None), false),
        (vec![RunError], true)
    );
    assert_eq!(
        plan(
            &handled,
            &plain,
            run(ExitStatus::Signal(15), Some(KillReason::WallTime)),
            false
        ),
        (vec![RunTimeout], true)
    );
    assert_eq!(
        plan(
            &handled,
            &plain,
            run(ExitStatus::Signal(15), Some(KillReason::Signal)),
            true
        ),
        (vec![RunTimeout], false)
    );
    let mut no_retry = job.clone();
    no_retry.spec.auto_timeout_retry = false;
    assert_eq!(
        plan(
            &no_retry,
            &plain,
            run(ExitStatus::Signal(9), Some(KillReason::TimeLimit)),
            false
        ),
        (vec![RunTimeout, Failed], false)
    );
    // The error's code and output tail go to the history.
    let st = ExitStatus::Code(2);
    let r = RunResult {
        status: &st,
        killed: None,
        tail: "Traceback\nRuntimeError: x",
        elapsed: Duration::from_secs(1),
    };
    let p = after_run(&job, Some(&plain), &r, false);
    assert!(
        p.transitions[0].message.contains("exit code 2")
            && p.transitions[0].message.contains("RuntimeError: x")
    );
    assert_eq!(p.transitions[0].return_code, Some(2));
}

#[test]
fn a_working_directory_that_cannot_be_written_leaves_the_job_as_it_was() {
    // As root only the immutable attribute stops a write (chattr, ext4 and the like).
    let (tmp, mut store, session) = setup();
    app(&mut store, "pre", "true", "");
    store
        .add_job(&NewJob {
            spec: spec("stuck", "pre"),
            ..NewJob::default()
        })
        .unwrap();
    let db = store.dir.clone();
    let data = tmp.path().join("db/data");
    std::fs::create_dir_all(&data).unwrap();
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&data)
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        chattr("+i"),
        "chattr +i failed: this test needs root on ext4"
    );
    let r = process_pending(
        &db,
        session,
        &LeaseFilter::default(),
        2,
        &TransitionOptions::default(),
    );
    assert!(chattr("-i"));
    let e = r.expect_err("the stage-in cannot create the working directory");
    assert!(
        matches!(e, balsam_launcher::Error::FileSystem(_)),
        "not the job's fault: {e}"
    );
    assert!(e.to_string().contains("cannot write job files"), "{e}");
    // Not FAILED: left in the state it reached, its lease given back.
    assert_eq!(state(&mut store, "stuck"), State::Ready);
    assert!(store.leased_jobs(session).unwrap().is_empty());
    // Once the directory can be written, the job goes on.
    process_pending(
        &db,
        session,
        &LeaseFilter::default(),
        2,
        &TransitionOptions::default(),
    )
    .unwrap();
    assert_eq!(state(&mut store, "stuck"), State::Preprocessed);
}
