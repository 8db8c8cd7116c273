//! How fast one executor (one worker's process engine) runs N `/bin/true` jobs one at a time,
//! with everything a real job gets (working directory, output file, environment, its own session,
//! a process nursery).
//! `cargo run --release -p balsam-launcher --example executor_bench -- 5000 [packing] [executors]`

use std::time::{Duration, Instant};

use balsam_launcher::executor::{Event, Executor, ExecutorConfig, Request};
use balsam_launcher::messages::RunJob;
use balsam_launcher::{packing, process};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: i64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let k: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let m: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = std::env::temp_dir().join(format!("executor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exs: Vec<Executor> = (0..m)
        .map(|_| {
            Executor::start(ExecutorConfig {
                capacity: packing::NODE,
                gpus_per_node: 0,
                kill_grace: Duration::from_secs(1),
                base_env: process::base_environment(None),
            })
            .expect("start an executor (build balsam-mpi-launcher first)")
        })
        .collect();
    let t = Instant::now();
    for pk in 0..n {
        let wd = dir.join(format!("j{pk}"));
        std::fs::create_dir_all(&wd).unwrap();
        exs[pk as usize % m].send(Request::Run(RunJob {
            pk,
            cute_id: format!("[j{pk}]"),
            argv: vec!["/bin/true".into()],
            envscript: None,
            output: wd.join("j.out"),
            workdir: wd,
            env: vec![("BALSAM_JOB_ID".into(), pk.to_string())],
            cost: packing::cost(k),
            wall_time_limit_s: None,
        }));
    }
    let setup = t.elapsed();
    let mut done = 0;
    while done < n {
        let mut sel = crossbeam_channel::Select::new();
        for ex in &exs {
            sel.recv(&ex.events);
        }
        let op = sel.select();
        let i = op.index();
        if let Event::Finished(f) = op.recv(&exs[i].events).unwrap() {
            assert!(f.status.success(), "{f:?}");
            done += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{n} jobs in {secs:.3} s ({:.0}/s; setup {:.3} s)",
        n as f64 / secs,
        setup.as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).ok();
}
