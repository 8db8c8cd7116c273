//! Worker ranks (1..N): say hello, then run the jobs rank 0 sends, as child processes, and
//! report what happened. One thread does it all: it probes MPI (never a blocking receive), and
//! between probes sleeps in poll(2) on the socket to its process nursery
//! ([`crate::nursery::Nursery`]), which starts the jobs, the next queued one the moment one
//! ends, and reports. A busy worker probes every
//! [`PROBE_EVERY`] and reports every [`REPORT_EVERY`] (at once when its backlog runs out); an
//! idle one backs off to [`MAX_PAUSE`] between probes, a few wake-ups a second.
//!
//! SIGTERM and SIGINT (which mpiexec forwards to every rank) do not stop a worker: rank 0 decides
//! what happens to the jobs and then sends [`Message::Shutdown`].

use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::executor::{Event, ExecutorConfig};
use crate::logging::LogFile;
use crate::messages::{JobFinished, JobStarted, Message, TAG};
use crate::nursery::{fatal_loss, Nursery};
use crate::process;

/// Shortest pause between idle polls.
pub const MIN_PAUSE: Duration = Duration::from_micros(200);
/// Longest pause between idle polls: the first job sent to an idle worker waits at most this
/// long; a busy worker probes every few milliseconds.
pub const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Sends one message (small enough for MPI's eager protocol: returns at once).
pub fn send(world: &SimpleCommunicator, to: i32, msg: &Message) {
    let bytes = msg.encode();
    world.process_at_rank(to).send_with_tag(&bytes[..], TAG);
}

/// Receives one pending message, if any, without blocking.
pub fn try_receive(world: &SimpleCommunicator) -> Option<(i32, Message)> {
    let (msg, status) = world.any_process().immediate_matched_probe()?;
    let (bytes, _) = (msg, status).matched_receive_vec::<u8>();
    match Message::decode(&bytes) {
        Ok(m) => Some((status.source_rank(), m)),
        Err(e) => {
            tracing::error!("from rank {}: {e}", status.source_rank());
            None
        }
    }
}

/// Runs a worker rank to the end; returns its exit code.
pub fn run(world: &SimpleCommunicator, log: &LogFile) -> i32 {
    let rank = world.rank();
    let host = mpi::environment::processor_name().unwrap_or_else(|_| process::hostname());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    send(
        world,
        0,
        &Message::Hello {
            rank,
            host: host.clone(),
            cpus,
            node_index: crate::nodes::batch_node_index(),
        },
    );
    let mut pause = MIN_PAUSE;
    let setup = loop {
        match try_receive(world) {
            Some((_, Message::Welcome(s))) => break s,
            Some((_, Message::Shutdown { .. })) => {
                send(world, 0, &Message::Bye);
                return 0;
            }
            Some((from, m)) => {
                tracing::warn!("unexpected message from rank {from} before Welcome: {m:?}")
            }
            None => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    };
    if let Some(path) = &setup.log_file {
        if let Err(e) = log.open(path) {
            tracing::warn!("cannot open log file {}: {e}", path.display());
        }
    }
    tracing::debug!(
        "worker on {host} with {cpus} CPUs, capacity {}",
        setup.capacity
    );
    let mut nursery = match Nursery::start(&ExecutorConfig {
        capacity: setup.capacity,
        gpus_per_node: setup.gpus_per_node,
        kill_grace: Duration::from_millis(setup.kill_grace_ms),
        base_env: process::base_environment(process::balsam_cli_dir().as_deref()),
    }) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("worker rank {rank} cannot run jobs: {e}");
            eprintln!("balsam-mpi-launcher: worker rank {rank} cannot run jobs: {e}");
            world.abort(1)
        }
    };
    let mut w = Progress::default();
    let mut pause = MIN_PAUSE;
    let mut last_report = Instant::now();
    loop {
        let mut activity = false;
        while let Some((from, msg)) = try_receive(world) {
            activity = true;
            match msg {
                Message::Run(jobs) => {
                    w.outstanding += jobs.len();
                    for j in jobs {
                        nursery.submit(j);
                    }
                }
                Message::Kill { pks, reason } => nursery.kill(pks, reason),
                Message::Reclaim { pks } => nursery.reclaim(pks),
                Message::Shutdown { reason } => {
                    w.shutting = true;
                    nursery.kill_all(reason);
                }
                other => tracing::warn!("unexpected message from rank {from}: {other:?}"),
            }
        }
        // Run jobs until it is time to talk to the master again: a report is due when there is
        // no backlog (the master must send more), or every REPORT_EVERY while busy. Between
        // probes, the worker sleeps in poll(2) on the nursery, which starts the next job the moment
        // one ends.
        let probe_at = Instant::now()
            + if nursery.is_idle() && !activity {
                pause
            } else {
                PROBE_EVERY
            };
        loop {
            let now = Instant::now();
            let mut until = probe_at;
            if nursery.has_events() {
                until = until.min(last_report + REPORT_EVERY);
            }
            if now >= until {
                break;
            }
            nursery.wait(until - now, None);
            if nursery.is_lost() {
                fatal_loss(&format!("worker rank {rank}'s process nursery ended"));
            }
            if nursery.has_events() && (nursery.queued() == 0 || w.shutting) {
                break;
            }
        }
        for ev in nursery.take_events() {
            w.note(ev);
        }
        if w.has_report()
            && (nursery.queued() == 0 || w.shutting || last_report.elapsed() >= REPORT_EVERY)
        {
            report(world, &mut w);
            last_report = Instant::now();
        }
        if w.shutting && w.outstanding == 0 {
            report(world, &mut w);
            send(world, 0, &Message::Bye);
            return 0;
        }
        pause = if activity || !nursery.is_idle() {
            MIN_PAUSE
        } else {
            (pause * 2).min(MAX_PAUSE)
        };
    }
}

/// Longest a worker with a backlog holds back a report.
const REPORT_EVERY: Duration = Duration::from_millis(5);
/// How often a busy worker looks for messages from the master.
const PROBE_EVERY: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Progress {
    /// Jobs sent by the master and not finished.
    outstanding: usize,
    started: Vec<JobStarted>,
    finished: Vec<JobFinished>,
    shutting: bool,
}

impl Progress {
    fn note(&mut self, ev: Event) {
        match ev {
            Event::Started(s) => self.started.push(s),
            Event::Finished(f) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.finished.push(f);
            }
        }
    }
    fn has_report(&self) -> bool {
        !self.started.is_empty() || !self.finished.is_empty()
    }
}

/// Sends what happened, in messages of bounded size.
fn report(world: &SimpleCommunicator, w: &mut Progress) {
    while w.has_report() {
        let s: Vec<JobStarted> = w.started.drain(..w.started.len().min(256)).collect();
        let f: Vec<JobFinished> = w.finished.drain(..w.finished.len().min(16)).collect();
        send(
            world,
            0,
            &Message::Report {
                started: s,
                finished: f,
            },
        );
    }
}
