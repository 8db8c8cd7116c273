//! Rank 0: the MPI loop. Every MPI call of rank 0 happens here, on the main thread, and the loop
//! never blocks in MPI: it probes, handles what arrived, asks the scheduler what to do, does it,
//! and when nothing happened waits on its channels with a timeout that backs off (so an idle
//! launcher costs almost nothing, and ranks oversubscribing cores leave them to the jobs).
//!
//! The loop decides nothing itself: which job runs where is the [`Scheduler`]'s decision, when to
//! leave when idle is [`idle::decide_idle`]'s, whether jobs may start is [`Health`]'s. The loop
//! carries the jobs' data: serial jobs go to worker ranks as [`RunJob`]s in batched messages
//! (rank 0's own executor stands in the worker list with rank 0 when no worker rank shares its
//! node), MPI jobs to the runner, an executor that starts the MPI launch command.
//!
//! The store thread ([`crate::store_thread`]) does all database work; the loop tells it what
//! started and ended, and gets runnable jobs, jobs to drop, and what could still arrive from it.
//!
//! It stops at the time limit, on SIGTERM/SIGINT, when idle and nothing more can arrive, when the
//! session is lost or the database is gone; running jobs are killed, recorded (RUN_TIMEOUT →
//! RESTART_READY), leases released and the session ended before it returns. Results that could
//! not be written by then make the exit code non-zero ([`EXIT_DATABASE`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balsam_store::{DbDir, LeaseFilter, SessionInfo, Store};
use crossbeam_channel::{Receiver, Select, Sender};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::config::{Config, JobMode, LaunchOptions, ALLOCATION_MARGIN_MINUTES};
use crate::executor::{Event, Executor, ExecutorConfig, Request};
use crate::health::{self, Health, Resource};
use crate::idle::{self, IdleDecision, IdleFacts, IdleRules};
use crate::jobenv::LauncherContext;
use crate::logging::LogFile;
use crate::messages::{
    ExitStatus, JobFinished, JobStarted, KillReason, Message, RunJob, WorkerSetup,
    MAX_JOBS_PER_MESSAGE,
};
use crate::mpirun::{self, MpiRun};
use crate::nodes::{self, NodeMap};
use crate::nursery::ScriptNursery;
use crate::packing;
use crate::process;
use crate::scheduler::{Action, Class, Dropped, JobShape, Place, Scheduler, WorkerSpec};
use crate::store_thread::{self, Demand, FromStore, Runnable, StoreThreadConfig, ToStore};
use crate::transitions::TransitionOptions;
use crate::worker::{send, try_receive};

/// Shortest idle pause of the loop.
const MIN_PAUSE: Duration = Duration::from_micros(500);
/// Longest idle pause while jobs run.
const BUSY_MAX_PAUSE: Duration = Duration::from_millis(10);
/// Longest idle pause with nothing running: no worker has anything to report then, and work
/// from the store thread wakes the loop at once (it waits on that channel), so a long pause costs
/// no latency where it matters and keeps an idle launcher's CPU near nothing.
const IDLE_MAX_PAUSE: Duration = Duration::from_millis(100);
/// How long workers get to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// Exit code when the session was lost (its jobs were given to other launchers).
pub const EXIT_SESSION_LOST: i32 = 3;
/// Exit code when the database was gone, or results could not be written to it before the
/// launcher had to stop (those jobs run again once the session ends or expires).
pub const EXIT_DATABASE: i32 = 4;

/// Runs rank 0 to the end; returns the process exit code.
pub fn run(
    world: &SimpleCommunicator,
    db: Option<PathBuf>,
    opts: LaunchOptions,
    log: &LogFile,
    term: Arc<AtomicBool>,
) -> i32 {
    let workers: Vec<i32> = (1..world.size()).collect();
    match start(world, db, opts, log) {
        Ok(mut m) => {
            let code = m.run(&term);
            tracing::info!("launcher session {} done (exit code {code})", m.session);
            code
        }
        Err(e) => {
            tracing::error!("the launcher cannot start: {e}");
            eprintln!("balsam-mpi-launcher: {e}");
            for r in &workers {
                send(
                    world,
                    *r,
                    &Message::Shutdown {
                        reason: KillReason::Exit,
                    },
                );
            }
            let t = Instant::now();
            let mut byes = 0;
            while byes < workers.len() && t.elapsed() < Duration::from_secs(10) {
                match try_receive(world) {
                    Some((_, Message::Bye)) => byes += 1,
                    Some(_) => {}
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            1
        }
    }
}

/// SQLite memory rank 0 may use for all its connections together (store thread, transition
/// threads), so its resident set stays bounded over a database of millions of jobs.
pub const SQLITE_HEAP_LIMIT: i64 = 24 << 20;

/// Bounds the SQLite heap of this process. The store opens each connection with a 64 MB page
/// cache, which suits the CLI; rank 0 holds seven connections, two of which scan the whole job
/// table over a long run. Soft limit: SQLite recycles cache pages instead of growing.
/// Seam: when the store offers a cache-size option, use it instead.
fn limit_sqlite_memory() {
    // SAFETY: sqlite3_soft_heap_limit64 is thread-safe and may be called at any time.
    unsafe { rusqlite::ffi::sqlite3_soft_heap_limit64(SQLITE_HEAP_LIMIT) };
}

fn start<'w>(
    world: &'w SimpleCommunicator,
    db: Option<PathBuf>,
    opts: LaunchOptions,
    log: &LogFile,
) -> anyhow::Result<Master<'w>> {
    use anyhow::Context;
    limit_sqlite_memory();
    let dir = DbDir::locate(db.as_deref())?;
    let (batch, alloc) = nodes::allocation_nodes();
    let alloc_minutes = alloc.as_ref().and_then(|a| {
        balsam_cobalt::allocation::launcher_time_limit_minutes(
            a,
            std::time::SystemTime::now(),
            ALLOCATION_MARGIN_MINUTES,
        )
    });
    let cfg = Config::resolve(dir.clone(), opts, alloc_minutes)?;
    let started_at = Instant::now();
    let deadline = cfg.time_limit.map(|t| started_at + t);
    let host = mpi::environment::processor_name().unwrap_or_else(|_| process::hostname());
    let mut store = Store::open(dir.clone())?;
    store_thread::expire_sessions(&mut store, &host, cfg.lease_expiry);
    let batch_job_id = alloc.as_ref().map(|a| a.job_id.clone()).unwrap_or_default();
    let session = store.start_session(&SessionInfo {
        kind: "launcher".into(),
        host: host.clone(),
        pid: std::process::id() as i64,
        batch_job_id,
        job_mode: cfg.opts.job_mode.as_str().into(),
        wf_filter: cfg.wf_filter.clone(),
    })?;
    let log_path = dir.log_dir().join(format!("launcher-{session}.log"));
    if let Err(e) = log.open(&log_path) {
        tracing::warn!("cannot open {}: {e}", log_path.display());
    }
    tracing::info!(
        "launcher session {session} on {host}: {} ranks, job mode {}, workflow filter {:?}, time limit {}",
        world.size(),
        cfg.opts.job_mode.as_str(),
        cfg.wf_filter,
        cfg.time_limit.map(|t| format!("{:.1} min", t.as_secs_f64() / 60.0)).unwrap_or_else(|| "none".into())
    );

    // Hellos: where every worker runs.
    let nworkers = (world.size() - 1) as usize;
    let mut hellos: Vec<(i32, String, Option<u32>)> = Vec::with_capacity(nworkers);
    let t = Instant::now();
    while hellos.len() < nworkers {
        match try_receive(world) {
            Some((
                _,
                Message::Hello {
                    rank,
                    host,
                    node_index,
                    ..
                },
            )) => hellos.push((rank, host, node_index)),
            Some((from, m)) => {
                tracing::warn!("unexpected message from rank {from} at start: {m:?}")
            }
            None => {
                if t.elapsed() > HELLO_TIMEOUT {
                    anyhow::bail!(
                        "only {} of {nworkers} worker ranks said hello within {HELLO_TIMEOUT:?}",
                        hellos.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    hellos.sort();
    let batch_ref = batch.as_ref().map(|(s, l)| (s.as_str(), l.as_slice()));
    let list = batch_ref.map(|(_, l)| l);
    let placed: Vec<(i32, String)> = hellos
        .iter()
        .map(|(r, h, i)| (*r, nodes::place(list, h, *i)))
        .collect();
    let map: NodeMap = nodes::map_nodes(batch_ref, &placed, &host);
    tracing::info!("{} nodes from {}", map.nodes.len(), map.source);
    // Rank 0's own node. When no worker rank shares it (one rank per node, as the batch
    // templates start the launcher), rank 0 runs serial jobs there itself: otherwise a 1-node
    // launch could run nothing and every launch would leave a node idle.
    let master_name = nodes::place(list, &host, nodes::batch_node_index());
    let master_node = map
        .nodes
        .iter()
        .position(|n| nodes::same_host(&n.name, &master_name))
        .filter(|ni| map.nodes[*ni].workers.is_empty())
        .filter(|_| cfg.opts.job_mode != JobMode::Mpi);

    let base_env = process::base_environment(process::balsam_cli_dir().as_deref());
    let mpirun = MpiRun::from_settings(&cfg.settings, &mpirun::path_dirs(&base_env))?;
    tracing::info!("MPI jobs start with {}", mpirun.describe());

    // Nodes and workers.
    let node_names: Vec<String> = map.nodes.iter().map(|n| n.name.clone()).collect();
    let mut workers: Vec<WorkerSpec> = Vec::new();
    for (ni, n) in map.nodes.iter().enumerate() {
        let share = packing::NODE / n.workers.len().max(1) as u64;
        for r in &n.workers {
            workers.push(WorkerSpec {
                rank: *r,
                node: ni,
                capacity: share,
            });
        }
    }
    let local = master_node.map(|ni| {
        workers.push(WorkerSpec {
            rank: 0,
            node: ni,
            capacity: packing::NODE,
        });
        tracing::info!(
            "rank 0 runs serial jobs on its node {} (no worker rank there)",
            node_names[ni]
        );
        Executor::start(ExecutorConfig {
            capacity: packing::NODE,
            gpus_per_node: cfg.opts.gpus_per_node,
            kill_grace: cfg.kill_grace,
            base_env: base_env.clone(),
        })
    });
    let local = local
        .transpose()
        .context("cannot run jobs on rank 0's node")?;
    for w in workers.iter().filter(|w| w.rank != 0) {
        let setup = WorkerSetup {
            session,
            log_file: Some(
                dir.log_dir()
                    .join(format!("launcher-{session}.rank{}.log", w.rank)),
            ),
            gpus_per_node: cfg.opts.gpus_per_node,
            capacity: w.capacity,
            kill_grace_ms: cfg.kill_grace.as_millis() as u64,
        };
        send(world, w.rank, &Message::Welcome(setup));
    }

    // What this launcher leases.
    let total_nodes = map.nodes.len() as u32;
    let base = LeaseFilter {
        wf_filter: cfg.wf_filter.clone(),
        ..LeaseFilter::default()
    };
    let (serial_filter, mpi_filter) = match (cfg.opts.job_mode, workers.is_empty()) {
        (JobMode::Serial, true) => anyhow::bail!(
            "--job-mode serial needs at least one worker rank (run with 2 or more MPI ranks)"
        ),
        (JobMode::Serial, false) => (
            Some(LeaseFilter {
                serial_only: true,
                ..base.clone()
            }),
            None,
        ),
        (JobMode::Mpi, _) | (JobMode::Mixed, true) => (
            None,
            Some(LeaseFilter {
                max_nodes: Some(total_nodes),
                ..base.clone()
            }),
        ),
        (JobMode::Mixed, false) => (
            Some(LeaseFilter {
                serial_only: true,
                ..base.clone()
            }),
            Some(LeaseFilter {
                mpi_only: true,
                max_nodes: Some(total_nodes),
                ..base.clone()
            }),
        ),
    };
    let max_mpiruns = cfg.settings.max_concurrent_mpiruns.max(1);
    let sched = Scheduler::new(
        map.nodes.len(),
        workers,
        max_mpiruns,
        serial_filter.is_some(),
        mpi_filter.is_some(),
    );
    // The targets are known before the store thread starts, so its first leases and
    // handovers already follow them.
    let demand = Arc::new(Demand::default());
    let (serial_target, mpi_target) = sched.lease_target();
    demand.set_target(Class::Serial, serial_target);
    demand.set_target(Class::Mpi, mpi_target);
    let health = Arc::new(Health::new());
    let launcher_ctx = LauncherContext {
        nodes: total_nodes,
        job_mode: cfg.opts.job_mode.as_str().into(),
    };
    let (to_store, store_rx) = crossbeam_channel::unbounded();
    let (store_tx, from_store) = crossbeam_channel::unbounded();
    let handle = store_thread::spawn(
        StoreThreadConfig {
            db: dir.clone(),
            session,
            host,
            job_mode: cfg.opts.job_mode,
            nodes: total_nodes,
            wf_filter: cfg.wf_filter.clone(),
            serial_filter,
            mpi_filter,
            deadline,
            lease_expiry: cfg.lease_expiry,
            launcher: launcher_ctx.clone(),
            transition_threads: cfg.transition_threads,
            transition_opts: TransitionOptions {
                launcher: Some(launcher_ctx),
                kill_grace: cfg.kill_grace,
                scripts: Some(
                    ScriptNursery::start(cfg.kill_grace, base_env.clone())
                        .context("cannot run pre- and postprocess scripts")?,
                ),
                ..TransitionOptions::default()
            },
        },
        demand.clone(),
        health.clone(),
        store_rx,
        to_store.clone(),
        store_tx,
    )
    .context("cannot start the store thread")?;
    let runner = Executor::start(ExecutorConfig {
        capacity: u64::MAX,
        gpus_per_node: 0,
        kill_grace: cfg.kill_grace,
        base_env,
    })
    .context("cannot run MPI jobs")?;
    let m = Master {
        world,
        session,
        synthetic: map.synthetic,
        node_names,
        sched,
        serial_jobs: HashMap::new(),
        mpi_jobs: HashMap::new(),
        unstarted: HashMap::new(),
        killing: HashMap::new(),
        runner,
        local,
        mpirun,
        to_store,
        from_store,
        store_handle: Some(handle),
        demand,
        health,
        deadline,
        outbox: HashMap::new(),
        kills: HashMap::new(),
        started: Vec::new(),
        finished: Vec::new(),
        store_busy: true,
        idle_facts: None,
        idle_since: None,
        idle_said: None,
        said_not_here: false,
        stopping: None,
        stop_began: None,
        finish_sent: false,
        store_end: None,
        stats: Stats::default(),
        cfg,
    };
    m.set_targets();
    Ok(m)
}

/// Why the launcher stops, and what that means for its running jobs and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// SIGTERM/SIGINT: running jobs become RUN_TIMEOUT.
    Signal,
    /// The time limit: running jobs become RUN_TIMEOUT.
    TimeLimit,
    /// Nothing more to do.
    Idle,
    /// The session expired: write nothing, other launchers own the jobs.
    SessionLost,
    /// The database file was removed or replaced: nothing can be recorded.
    DatabaseGone,
    /// The lease could not be renewed for so long that other launchers may take the jobs over
    /// soon ([`health::fence_after`]): every job is stopped first, nothing is written for them.
    Fenced,
}

impl Stop {
    fn kill_reason(&self) -> KillReason {
        match self {
            Stop::Signal => KillReason::Signal,
            Stop::TimeLimit => KillReason::TimeLimit,
            Stop::Idle => KillReason::Exit,
            Stop::SessionLost | Stop::DatabaseGone | Stop::Fenced => KillReason::SessionLost,
        }
    }
}

struct Master<'w> {
    world: &'w SimpleCommunicator,
    cfg: Config,
    session: i64,
    synthetic: bool,
    node_names: Vec<String>,
    /// Which job runs where.
    sched: Scheduler,
    /// Serial jobs in hand, not sent yet, ready to send.
    serial_jobs: HashMap<i64, RunJob>,
    /// MPI jobs in hand, not started yet.
    mpi_jobs: HashMap<i64, Runnable>,
    /// Serial jobs sent and not started: kept to place them again if taken back.
    unstarted: HashMap<i64, RunJob>,
    /// Jobs the launcher asked to stop, with why (decides what is recorded).
    killing: HashMap<i64, KillReason>,
    runner: Executor,
    /// Runs serial jobs on rank 0's node when no worker rank runs there; its worker entry has
    /// rank 0.
    local: Option<Executor>,
    mpirun: MpiRun,
    to_store: Sender<ToStore>,
    from_store: Receiver<FromStore>,
    store_handle: Option<std::thread::JoinHandle<()>>,
    demand: Arc<Demand>,
    health: Arc<Health>,
    deadline: Option<Instant>,
    outbox: HashMap<usize, Vec<RunJob>>,
    kills: HashMap<(usize, KillReason), Vec<i64>>,
    started: Vec<(i64, String)>,
    finished: Vec<JobFinished>,
    /// The store thread has writes or transitions in hand.
    store_busy: bool,
    /// What could still arrive, as the store thread saw it since the launcher became idle.
    idle_facts: Option<IdleFacts>,
    idle_since: Option<Instant>,
    /// The wait last announced (so it is said once).
    idle_said: Option<String>,
    /// The runnable jobs this launcher cannot run were named.
    said_not_here: bool,
    stopping: Option<Stop>,
    stop_began: Option<Instant>,
    finish_sent: bool,
    /// The store thread ended: with what it could not do, if anything.
    store_end: Option<Option<String>>,
    stats: Stats,
}

/// Counters logged when the launcher ends (how hard the loop worked).
#[derive(Debug, Default)]
struct Stats {
    loops: u64,
    sleeps: u64,
    reports: u64,
    run_messages: u64,
    jobs_sent: u64,
    reclaims: u64,
}

impl Master<'_> {
    /// Tells the store thread how many jobs the launcher wants to hold.
    fn set_targets(&self) {
        let (serial, mpi) = self.sched.lease_target();
        self.demand.set_target(Class::Serial, serial);
        self.demand.set_target(Class::Mpi, mpi);
    }

    fn run(&mut self, term: &AtomicBool) -> i32 {
        let mut pause = MIN_PAUSE;
        loop {
            self.stats.loops += 1;
            // A signal is seen before the reports are read, so that jobs it ended count as
            // stopped by it (see job_finished).
            if self.stopping.is_none() && term.load(Ordering::Relaxed) {
                self.check_stop(term);
            }
            let mut activity = self.poll_mpi();
            activity |= self.poll_store();
            activity |= self.poll_runner();
            activity |= self.poll_local();
            if self.stopping.is_none() {
                self.check_stop(term);
            }
            if self.stopping.is_some() {
                if self.stop_progress() {
                    break;
                }
            } else {
                activity |= self.schedule();
                self.set_targets();
            }
            self.send_outbox();
            self.send_to_store();
            if activity {
                pause = MIN_PAUSE;
                continue;
            }
            let max = if self.sched.active() == 0 {
                IDLE_MAX_PAUSE
            } else {
                BUSY_MAX_PAUSE
            };
            let mut sel = Select::new();
            sel.recv(&self.from_store);
            sel.recv(&self.runner.events);
            if let Some(local) = &self.local {
                sel.recv(&local.events);
            }
            let _ = sel.ready_timeout(pause);
            self.stats.sleeps += 1;
            pause = (pause * 2).min(max);
        }
        if let Some(h) = self.store_handle.take() {
            let _ = h.join();
        }
        tracing::info!("loop statistics: {:?}", self.stats);
        self.exit_code()
    }

    fn exit_code(&self) -> i32 {
        let db_file = self.cfg.db.db_file();
        let fail = |msg: String| {
            tracing::error!("{msg}");
            eprintln!("balsam-mpi-launcher: {msg}");
            EXIT_DATABASE
        };
        match &self.stopping {
            Some(Stop::SessionLost | Stop::Fenced) => return EXIT_SESSION_LOST,
            Some(Stop::DatabaseGone) => return EXIT_DATABASE,
            _ => {}
        }
        match &self.store_end {
            Some(Some(problem)) => return fail(problem.clone()),
            None => {
                return fail(format!(
                    "the session could not be ended in the database {} in time; its jobs run again once it expires",
                    db_file.display()
                ))
            }
            Some(None) => {}
        }
        // Stopped from outside while the database or the job files could not be written: say so,
        // the jobs that could not start are left as they were.
        let trouble = self
            .health
            .trouble(Resource::Database)
            .or_else(|| self.health.trouble(Resource::JobFiles));
        let why = match self.stopping {
            Some(Stop::TimeLimit) => "at the time limit",
            Some(Stop::Signal) => "by a signal",
            _ => return 0,
        };
        match trouble {
            Some(t) => fail(format!(
                "stopped {why} while it {t} (database directory {}); jobs that could not start are left as they were",
                self.cfg.db.root.display()
            )),
            None => 0,
        }
    }

    // ---- inputs ----

    fn poll_mpi(&mut self) -> bool {
        let mut any = false;
        while let Some((from, msg)) = try_receive(self.world) {
            any = true;
            let Some(wi) = self.worker_index(from) else {
                tracing::warn!("message from unknown rank {from}");
                continue;
            };
            match msg {
                Message::Report { started, finished } => {
                    self.stats.reports += 1;
                    let now = Instant::now();
                    for s in started {
                        self.job_started(s, Some(wi), now);
                    }
                    for f in finished {
                        self.job_finished(f);
                    }
                }
                Message::Bye => self.sched.worker_gone(wi),
                other => tracing::warn!("unexpected message from rank {from}: {other:?}"),
            }
        }
        any
    }

    fn worker_index(&self, rank: i32) -> Option<usize> {
        (0..self.sched.workers()).find(|i| self.sched.worker(*i).rank == rank)
    }

    fn poll_runner(&mut self) -> bool {
        let mut any = false;
        while let Ok(ev) = self.runner.events.try_recv() {
            any = true;
            match ev {
                Event::Started(s) => self.job_started(s, None, Instant::now()),
                Event::Finished(f) => self.job_finished(f),
            }
        }
        any
    }

    fn poll_local(&mut self) -> bool {
        let Some(local) = &self.local else {
            return false;
        };
        let events: Vec<Event> = local.events.try_iter().collect();
        let any = !events.is_empty();
        let wi = self.worker_index(0);
        let now = Instant::now();
        for ev in events {
            match ev {
                Event::Started(s) => self.job_started(s, wi, now),
                Event::Finished(f) => self.job_finished(f),
            }
        }
        any
    }

    fn poll_store(&mut self) -> bool {
        let mut any = false;
        while let Ok(m) = self.from_store.try_recv() {
            match m {
                FromStore::Runnable(jobs) => {
                    any = true;
                    for r in jobs {
                        self.job_in_hand(r);
                    }
                }
                FromStore::Drop(pks) => {
                    any = true;
                    for pk in pks {
                        self.kill_job(pk, KillReason::User);
                    }
                }
                FromStore::Status { busy, idle } => {
                    self.store_busy = busy;
                    if self.sched.is_idle() {
                        self.idle_facts = idle;
                    }
                }
                FromStore::SessionLost => {
                    any = true;
                    if self.stopping == Some(Stop::Fenced) {
                        // Every job is being stopped already, for this very reason.
                        tracing::error!("session {} lost, as feared", self.session);
                    } else if self.stopping != Some(Stop::SessionLost) {
                        tracing::error!(
                            "session {} lost: killing every job and stopping",
                            self.session
                        );
                        self.begin_stop(Stop::SessionLost);
                    }
                }
                FromStore::DatabaseGone(why) => {
                    any = true;
                    if self.stopping != Some(Stop::DatabaseGone) {
                        let msg = format!(
                            "the database {} is gone ({why}): nothing can be recorded; killing every job and stopping",
                            self.cfg.db.db_file().display()
                        );
                        tracing::error!("{msg}");
                        eprintln!("balsam-mpi-launcher: {msg}");
                        self.begin_stop(Stop::DatabaseGone);
                    }
                }
                FromStore::Ended { problem } => self.store_end = Some(problem),
            }
        }
        any
    }

    /// A runnable job leased for this launcher.
    fn job_in_hand(&mut self, r: Runnable) {
        let shape = JobShape::of(&r.job, r.class);
        self.sched.add(shape);
        match r.class {
            Class::Serial => {
                let job = self.run_job(r, shape.cost);
                self.serial_jobs.insert(shape.pk, job);
            }
            Class::Mpi => {
                self.mpi_jobs.insert(shape.pk, r);
            }
        }
    }

    fn job_started(&mut self, s: JobStarted, worker: Option<usize>, now: Instant) {
        self.sched.started(s.pk, now);
        self.unstarted.remove(&s.pk);
        self.health.ok(Resource::JobFiles);
        let place = match worker {
            Some(wi) => {
                let w = self.sched.worker(wi);
                format!(
                    "on {} (rank {}, pid {}, slot {})",
                    self.node_names[w.node], w.rank, s.pid, s.slot
                )
            }
            None => format!("MPI launch, pid {}", s.pid),
        };
        self.started.push((s.pk, place));
    }

    fn job_finished(&mut self, mut f: JobFinished) {
        if f.killed == Some(KillReason::Reclaimed) && !f.started {
            // Taken back before it started: placed again.
            if let Some(job) = self.unstarted.remove(&f.pk) {
                if self.sched.reclaimed(f.pk) {
                    self.serial_jobs.insert(f.pk, job);
                    return;
                }
            }
        }
        self.unstarted.remove(&f.pk);
        let ran_for = f.started.then(|| Duration::from_millis(f.elapsed_ms));
        let Some(place) = self.sched.finished(f.pk, ran_for) else {
            return;
        };
        let class = match place {
            Place::Worker(_) => Class::Serial,
            Place::Nodes(_) => Class::Mpi,
        };
        self.demand.let_go(class, 1);
        if let ExitStatus::Infrastructure(why) = &f.status {
            self.health.failed(Resource::JobFiles, why, Instant::now());
        }
        // A kill the master asked for decides what is recorded, unless the job got to exit 0.
        let asked = self.killing.remove(&f.pk);
        if f.killed.is_none() && asked.is_some() && !f.status.success() {
            f.killed = asked;
        }
        // A batch system ending the allocation (Slurm's time limit) signals every process in it,
        // the jobs as well as the launcher: a job that died after the launcher got its signal
        // was cut short, as if the launcher had killed it (RUN_TIMEOUT, not RUN_ERROR).
        if f.killed.is_none()
            && f.started
            && !f.status.success()
            && self.stopping == Some(Stop::Signal)
        {
            f.killed = Some(KillReason::Signal);
        }
        self.finished.push(f);
    }

    // ---- scheduling ----

    fn schedule(&mut self) -> bool {
        let now = Instant::now();
        if !self.health.may_start_jobs(now) {
            return false;
        }
        let time_left = self.deadline.map(|d| d.saturating_duration_since(now));
        let actions = self.sched.decide(now, time_left);
        let any = !actions.is_empty();
        for a in actions {
            self.act(a);
        }
        any
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Run { pk, worker, .. } => {
                let Some(job) = self.serial_jobs.remove(&pk) else {
                    return;
                };
                self.stats.jobs_sent += 1;
                if self.sched.worker(worker).rank == 0 {
                    if let Some(local) = &self.local {
                        local.send(Request::Run(job.clone()));
                    }
                    self.unstarted.insert(pk, job);
                    return;
                }
                let out = self.outbox.entry(worker).or_default();
                out.push(job);
                if out.len() >= MAX_JOBS_PER_MESSAGE {
                    self.flush_outbox(worker);
                }
            }
            Action::Launch { pk, nodes } => {
                if let Some(r) = self.mpi_jobs.remove(&pk) {
                    self.launch_mpi(r, nodes);
                }
            }
            Action::Reserve { .. } => tracing::debug!("{a}"),
            Action::Reclaim { worker, ref pks } => {
                tracing::info!("{a}");
                self.stats.reclaims += 1;
                let rank = self.sched.worker(worker).rank;
                // Jobs still in the outbox have not left: the worker gets them, then the reclaim.
                self.flush_outbox(worker);
                if rank == 0 {
                    if let Some(local) = &self.local {
                        local.send(Request::Reclaim(pks.clone()));
                    }
                } else {
                    send(self.world, rank, &Message::Reclaim { pks: pks.clone() });
                }
            }
            Action::Release { ref pks, .. } => {
                tracing::info!("{a}");
                let mut n = [0usize; 2];
                for pk in pks {
                    if self.serial_jobs.remove(pk).is_some() {
                        n[0] += 1;
                    } else if self.mpi_jobs.remove(pk).is_some() {
                        n[1] += 1;
                    }
                }
                self.demand.let_go(Class::Serial, n[0]);
                self.demand.let_go(Class::Mpi, n[1]);
                let _ = self.to_store.send(ToStore::Release(pks.clone()));
            }
        }
    }

    fn run_job(&self, r: Runnable, cost: u64) -> RunJob {
        RunJob {
            pk: r.job.pk,
            cute_id: r.job.cute_id(),
            argv: r.argv,
            envscript: r.envscript,
            workdir: r.workdir,
            output: r.output,
            env: r.env,
            cost,
            wall_time_limit_s: self
                .cfg
                .opts
                .enforce_wall_time
                .then(|| u64::from(r.job.spec.wall_time_minutes) * 60),
        }
    }

    fn launch_mpi(&mut self, r: Runnable, nodes: Vec<usize>) {
        let pk = r.job.pk;
        // Synthetic nodes are all this machine: the MPI launcher places the ranks itself.
        let hosts: Vec<String> = if self.synthetic {
            Vec::new()
        } else {
            nodes.iter().map(|n| self.node_names[*n].clone()).collect()
        };
        match self.mpirun.command(&r.job, &r.argv, &hosts, &r.env) {
            Ok(argv) => {
                tracing::info!("{}: {}", r.job.cute_id(), shell_words::join(&argv));
                let mut job = self.run_job(r, 0);
                job.argv = argv;
                self.runner.send(Request::Run(job));
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.job_finished(JobFinished {
                    pk,
                    status: ExitStatus::NotStarted(e.to_string()),
                    tail: String::new(),
                    elapsed_ms: 0,
                    killed: None,
                    started: false,
                });
            }
        }
    }

    /// Stops a job wherever it is: out of the queue (its lease given back), or killed where it
    /// runs. `reason` decides what is recorded when it ends.
    fn kill_job(&mut self, pk: i64, reason: KillReason) {
        match self.sched.drop_job(pk) {
            Dropped::Queued => {
                let class = if self.serial_jobs.remove(&pk).is_some() {
                    Class::Serial
                } else {
                    self.mpi_jobs.remove(&pk);
                    Class::Mpi
                };
                self.demand.let_go(class, 1);
                let _ = self.to_store.send(ToStore::Release(vec![pk]));
            }
            Dropped::Sent { place, .. } => {
                if self.killing.contains_key(&pk) {
                    return;
                }
                self.killing.insert(pk, reason);
                match place {
                    Place::Worker(wi) if self.sched.worker(wi).rank == 0 => {
                        if let Some(local) = &self.local {
                            local.send(Request::Kill(vec![pk], reason));
                        }
                    }
                    Place::Worker(wi) => {
                        // A job still in the outbox leaves first, so the worker knows it.
                        self.kills.entry((wi, reason)).or_default().push(pk)
                    }
                    Place::Nodes(_) => self.runner.send(Request::Kill(vec![pk], reason)),
                }
            }
            Dropped::Unknown => {}
        }
    }

    // ---- outputs ----

    fn flush_outbox(&mut self, wi: usize) {
        let Some(jobs) = self.outbox.remove(&wi).filter(|j| !j.is_empty()) else {
            return;
        };
        self.stats.run_messages += 1;
        let msg = Message::Run(jobs);
        send(self.world, self.sched.worker(wi).rank, &msg);
        if let Message::Run(jobs) = msg {
            for j in jobs {
                self.unstarted.insert(j.pk, j);
            }
        }
    }

    fn send_outbox(&mut self) {
        let workers: Vec<usize> = self.outbox.keys().copied().collect();
        for wi in workers {
            self.flush_outbox(wi);
        }
        for ((wi, reason), pks) in self.kills.drain() {
            send(
                self.world,
                self.sched.worker(wi).rank,
                &Message::Kill { pks, reason },
            );
        }
    }

    fn send_to_store(&mut self) {
        if !self.started.is_empty() {
            let _ = self
                .to_store
                .send(ToStore::Started(std::mem::take(&mut self.started)));
        }
        if !self.finished.is_empty() {
            let _ = self
                .to_store
                .send(ToStore::Finished(std::mem::take(&mut self.finished)));
        }
    }

    // ---- stopping ----

    fn check_stop(&mut self, term: &AtomicBool) {
        if term.load(Ordering::Relaxed) {
            tracing::warn!("signal received: stopping; running jobs become RUN_TIMEOUT");
            return self.begin_stop(Stop::Signal);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("time limit reached: stopping; running jobs become RUN_TIMEOUT");
            return self.begin_stop(Stop::TimeLimit);
        }
        if let Some(held) = self.health.lease_held_at() {
            let silent = held.elapsed();
            if health::must_fence(silent, self.cfg.lease_expiry, self.cfg.kill_grace) {
                let msg = format!(
                    "this launcher could not renew its lease on the database for {:.1} s ({}; LEASE_EXPIRY_SECONDS is {}), so its jobs may soon be lost to other launchers: stopping every job before they can be taken over, and exiting; the jobs run again once this session ends or expires",
                    silent.as_secs_f64(),
                    self.health
                        .trouble(Resource::Database)
                        .unwrap_or_else(|| "the database does not answer".into()),
                    self.cfg.lease_expiry.as_secs()
                );
                tracing::error!("{msg}");
                eprintln!("balsam-mpi-launcher: {msg}");
                return self.begin_stop(Stop::Fenced);
            }
        }
        if !self.sched.is_idle() || self.store_busy {
            self.idle_since = None;
            self.idle_facts = None;
            self.idle_said = None;
            return;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let Some(facts) = &self.idle_facts else {
            // The store thread's view of what could arrive comes with its next status.
            return;
        };
        let rules = IdleRules {
            persistent: self.cfg.opts.persistent,
            idle_exit: self.cfg.idle_exit,
            lease_expiry: self.cfg.lease_expiry,
        };
        if !facts.not_here.is_empty() && !self.said_not_here {
            self.said_not_here = true;
            let lines = facts.not_here.join("\n  ");
            tracing::warn!("runnable jobs this launcher cannot run:\n  {lines}");
            eprintln!("balsam-mpi-launcher: runnable jobs this launcher cannot run:\n  {lines}");
        }
        match idle::decide_idle(facts, since.elapsed(), &rules) {
            IdleDecision::Exit { why } => {
                tracing::info!("{why}: exiting");
                self.begin_stop(Stop::Idle);
            }
            IdleDecision::Wait { why, kind, .. } => {
                if self.idle_said.as_ref() != Some(&kind.to_string()) {
                    if kind.tell_user() {
                        tracing::info!("idle: {why}");
                        eprintln!("balsam-mpi-launcher: idle: {why}");
                    } else {
                        tracing::debug!("idle: {why}");
                    }
                    self.idle_said = Some(kind.to_string());
                }
            }
        }
    }

    fn begin_stop(&mut self, stop: Stop) {
        let reason = stop.kill_reason();
        self.stopping = Some(stop.clone());
        self.stop_began = Some(Instant::now());
        let _ = self.to_store.send(ToStore::Draining);
        let unstarted = self.sched.drain();
        for pk in &unstarted {
            self.serial_jobs.remove(pk);
            self.mpi_jobs.remove(pk);
        }
        if !unstarted.is_empty() && reason != KillReason::SessionLost {
            let _ = self.to_store.send(ToStore::Release(unstarted));
        }
        if let Some(local) = &self.local {
            // Rank 0's own jobs end through its executor; their reports still arrive.
            local.send(Request::KillAll(reason));
        }
        for wi in 0..self.sched.workers() {
            let w = self.sched.worker(wi);
            if w.rank == 0 {
                self.sched.worker_gone(wi);
            } else if !self.sched.is_gone(wi) {
                self.flush_outbox(wi);
                send(self.world, w.rank, &Message::Shutdown { reason });
            }
        }
        let running = self.sched.on_nodes();
        if !running.is_empty() {
            tracing::info!("killing {} MPI jobs", running.len());
        }
        for pk in running {
            self.killing.entry(pk).or_insert(reason);
        }
        self.runner.send(Request::KillAll(reason));
    }

    /// True when everything is done.
    fn stop_progress(&mut self) -> bool {
        let began = *self.stop_began.get_or_insert_with(Instant::now);
        if !self.finish_sent {
            let workers_done = self.sched.all_workers_gone();
            let jobs_done = self.sched.active() == 0;
            let overdue = began.elapsed() > self.cfg.kill_grace + Duration::from_secs(20);
            let done = workers_done && jobs_done;
            if !done && !overdue {
                return false;
            }
            if !done {
                tracing::error!(
                    "{} jobs and some workers did not finish stopping in time; ending the session anyway",
                    self.sched.active(),
                );
            }
            self.send_to_store();
            let _ = self.to_store.send(ToStore::Finish);
            self.finish_sent = true;
        }
        // The store thread gets its time to write and end the session.
        self.store_end.is_some()
            || began.elapsed() > self.cfg.kill_grace + store_thread::FINISH_PATIENCE * 2
    }
}
