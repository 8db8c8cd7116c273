//! A probe that exercises the store the way launchers do, for the benchmark and for the
//! concurrency test (two probes leasing from one database at once).
//!
//! ```text
//! balsam-store-probe prepare DB N            # move N CREATED jobs to PREPROCESSED (runnable)
//! balsam-store-probe size DB                 # the database's size on disk, bytes
//! balsam-store-probe lease DB BATCH ROUNDS [--finish] [--print] [--ready FILE] [--wait-for FILE]
//!     [--pause-ms MS]
//!     # lease BATCH runnable jobs per round; --finish runs each through RUNNING to RUN_DONE;
//!     # --print writes every leased job id to stdout; timings go to stderr
//! ```

use std::process::ExitCode;
use std::time::Instant;

use balsam_store::{LeaseFilter, LeaseGroup, SessionInfo, State, Store, Transition};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balsam-store-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn num(s: Option<&String>, what: &str) -> Result<usize, String> {
    s.and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("expected a number for {what}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let usage =
        "usage: balsam-store-probe prepare DB N | lease DB BATCH ROUNDS [--finish] [--print]";
    let cmd = args.get(1).ok_or(usage)?;
    let db = args.get(2).ok_or(usage)?;
    let mut store = Store::locate(Some(std::path::Path::new(db))).map_err(|e| e.to_string())?;
    if cmd == "size" {
        println!("{}", store.size_bytes().map_err(|e| e.to_string())?);
        return Ok(());
    }
    let session = store
        .start_session(&SessionInfo {
            kind: "probe".into(),
            host: "localhost".into(),
            pid: std::process::id() as i64,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    let e = |e: balsam_store::Error| e.to_string();
    match cmd.as_str() {
        "prepare" => {
            let mut left = num(args.get(3), "N")?;
            let t0 = Instant::now();
            while left > 0 {
                let jobs = store
                    .lease(
                        session,
                        LeaseGroup::Processable,
                        &LeaseFilter::default(),
                        left.min(20_000),
                    )
                    .map_err(e)?;
                if jobs.is_empty() {
                    break;
                }
                let mut ts = Vec::with_capacity(jobs.len() * 3);
                for j in &jobs {
                    for (a, b) in [
                        (State::Created, State::Ready),
                        (State::Ready, State::StagedIn),
                        (State::StagedIn, State::Preprocessed),
                    ] {
                        ts.push(Transition::new(j.pk, a, b, ""));
                    }
                }
                store.apply(&ts, Some(session)).map_err(e)?;
                let pks: Vec<i64> = jobs.iter().map(|j| j.pk).collect();
                store.release(session, &pks).map_err(e)?;
                left -= jobs.len();
            }
            eprintln!("prepared in {:.2} s", t0.elapsed().as_secs_f64());
        }
        "lease" => {
            let batch = num(args.get(3), "BATCH")?;
            let rounds = num(args.get(4), "ROUNDS")?;
            let finish = args.iter().any(|a| a == "--finish");
            let print = args.iter().any(|a| a == "--print");
            let pause_ms = match args.iter().position(|a| a == "--pause-ms") {
                Some(i) => num(args.get(i + 1), "--pause-ms")? as u64,
                None => 0,
            };
            // `--ready FILE`: say "I am at the barrier" so the caller knows when every probe is
            // started (process start can take seconds on a loaded machine).
            if let Some(i) = args.iter().position(|a| a == "--ready") {
                let file = args.get(i + 1).ok_or("--ready needs a file")?;
                std::fs::write(file, "").map_err(|e| format!("{file}: {e}"))?;
            }
            // `--wait-for FILE`: start only once FILE exists, so concurrent probes really overlap.
            if let Some(i) = args.iter().position(|a| a == "--wait-for") {
                let file = args.get(i + 1).ok_or("--wait-for needs a file")?;
                let t0 = Instant::now();
                while !std::path::Path::new(file).exists() {
                    if t0.elapsed().as_secs() > 60 {
                        return Err(format!("{file} did not appear within 60 s"));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            let mut times = Vec::new();
            for _ in 0..rounds {
                let t0 = Instant::now();
                let jobs = store
                    .lease(
                        session,
                        LeaseGroup::Runnable,
                        &LeaseFilter::default(),
                        batch,
                    )
                    .map_err(e)?;
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                if jobs.is_empty() {
                    break;
                }
                if finish {
                    let mut ts = Vec::with_capacity(jobs.len() * 2);
                    for j in &jobs {
                        ts.push(Transition::new(
                            j.pk,
                            j.state,
                            State::Running,
                            format!("probe {}", std::process::id()),
                        ));
                        ts.push(
                            Transition::new(j.pk, State::Running, State::RunDone, "").with_code(0),
                        );
                    }
                    store.apply(&ts, Some(session)).map_err(e)?;
                }
                if print {
                    for j in &jobs {
                        println!("{}", j.job_id);
                    }
                }
                // A launcher hands its jobs out between leases; `--pause-ms` stands for that
                // work so that concurrent probes take turns as launchers do.
                if pause_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                }
            }
            let n = times.len().max(1) as f64;
            let mean = times.iter().sum::<f64>() / n;
            let max = times.iter().cloned().fold(0.0, f64::max);
            eprintln!(
                "lease of {batch}: {} rounds, mean {mean:.2} ms, max {max:.2} ms",
                times.len()
            );
        }
        _ => return Err(usage.into()),
    }
    store.end_session(session).map_err(e)?;
    Ok(())
}
