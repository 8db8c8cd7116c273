//! The machine's limit for the throughput benchmark: THREADS threads each spawning and waiting
//! for a program (default `/bin/true`) in a loop, N times in all. Prints `jobs seconds rate`.
//!
//! `cargo run --release -p balsam-launcher --example spawn_baseline -- 20000 2 /bin/true`

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let program = args.next().unwrap_or_else(|| "/bin/true".into());
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let st = Command::new(&program)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("spawn");
                    assert!(st.success());
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!("{n} {secs:.3} {:.1}", n as f64 / secs);
}
