//! Rank 0: the MPI loop. Every MPI call of rank 0 happens here, on the main thread, and the loop
//! never blocks in MPI: it probes, handles what arrived, schedules, and when nothing happened waits
//! on its channels with a timeout that backs off (so an idle launcher costs almost nothing, and
//! ranks oversubscribing cores leave them to the jobs).
//!
//! - Serial jobs go to worker ranks: a job takes 1/node_packing_count of its node, and a worker
//!   gets as many as fit plus a small backlog sized by how short the jobs are, so a worker never
//!   waits for the master between two short jobs. When no worker rank shares rank 0's node (one
//!   rank per node, as batch templates start it), rank 0 runs serial jobs there itself through a
//!   local executor that stands in the worker list with rank 0.
//! - MPI jobs (several nodes or ranks; every job in `--job-mode mpi`) get whole idle nodes,
//!   reserved while they run; when none are idle the largest waiting job reserves nodes that are
//!   draining, so a stream of serial work cannot starve it. The runner (an executor on this rank)
//!   starts the MPI launch command and reports like a worker; at most MAX_CONCURRENT_MPIRUNS run.
//! - The store thread ([`crate::store_thread`]) does all database work; the master tells it what
//!   started and ended, and gets runnable jobs, kills and status from it.
//! - It stops at the time limit, on SIGTERM/SIGINT, when idle without `--persistent`, or when the
//!   session is lost; running jobs are killed, recorded (RUN_TIMEOUT → RESTART_READY), leases
//!   released and the session ended before it returns.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balsam_store::{DbDir, LeaseFilter, SessionInfo, Store};
use crossbeam_channel::{Receiver, Select, Sender};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::config::{Config, JobMode, LaunchOptions, ALLOCATION_MARGIN_MINUTES};
use crate::executor::{Event, Executor, ExecutorConfig, Request};
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
use crate::store_thread::{self, Class, Demand, FromStore, Runnable, StoreThreadConfig, ToStore};
use crate::transitions::TransitionOptions;
use crate::worker::{send, try_receive};

/// Shortest idle pause of the loop.
const MIN_PAUSE: Duration = Duration::from_micros(500);
/// Longest idle pause while jobs run.
const BUSY_MAX_PAUSE: Duration = Duration::from_millis(10);
/// Longest idle pause with nothing running.
const IDLE_MAX_PAUSE: Duration = Duration::from_millis(25);
/// How long workers get to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

/// Exit code when the session was lost (its jobs were given to other launchers).
pub const EXIT_SESSION_LOST: i32 = 3;

struct WorkerState {
    rank: i32,
    node: usize,
    capacity: u64,
    /// Units of jobs sent and not finished (running or queued on the worker).
    assigned: u64,
    /// Jobs sent and not started yet.
    unstarted: usize,
    bye: bool,
}

struct NodeState {
    name: String,
    workers: Vec<usize>,
    reserved_by: Option<i64>,
}

enum Place {
    Worker(usize),
    Runner(Vec<usize>),
}

struct Active {
    place: Place,
    cost: u64,
    started: bool,
    kill: Option<KillReason>,
}

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
    let mut store = Store::open(dir.clone())?;
    for e in store.expire_sessions(cfg.lease_expiry)? {
        tracing::warn!(
            "expired silent launcher session {} ({}:{}): {} running jobs to RESTART_READY",
            e.session.id,
            e.session.host,
            e.session.pid,
            e.restarted
        );
    }
    let host = mpi::environment::processor_name().unwrap_or_else(|_| process::hostname());
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
    let mut node_states: Vec<NodeState> = map
        .nodes
        .iter()
        .map(|n| NodeState {
            name: n.name.clone(),
            workers: Vec::new(),
            reserved_by: None,
        })
        .collect();
    let mut workers: Vec<WorkerState> = Vec::new();
    for (ni, n) in map.nodes.iter().enumerate() {
        let share = packing::NODE / n.workers.len().max(1) as u64;
        for r in &n.workers {
            node_states[ni].workers.push(workers.len());
            workers.push(WorkerState {
                rank: *r,
                node: ni,
                capacity: share,
                assigned: 0,
                unstarted: 0,
                bye: false,
            });
        }
    }
    let local = master_node.map(|ni| {
        node_states[ni].workers.push(workers.len());
        workers.push(WorkerState {
            rank: 0,
            node: ni,
            capacity: packing::NODE,
            assigned: 0,
            unstarted: 0,
            bye: false,
        });
        tracing::info!(
            "rank 0 runs serial jobs on its node {} (no worker rank there)",
            node_states[ni].name
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
    let demand = Arc::new(Demand::default());
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
        nodes: node_states,
        workers,
        serial_q: VecDeque::new(),
        mpi_q: Vec::new(),
        waiting: None,
        active: HashMap::new(),
        mpi_running: 0,
        max_mpiruns: cfg.settings.max_concurrent_mpiruns.max(1),
        runner,
        local,
        mpirun,
        to_store,
        from_store,
        store_handle: Some(handle),
        demand,
        deadline,
        avg_runtime: None,
        outbox: HashMap::new(),
        kills: HashMap::new(),
        started: Vec::new(),
        finished: Vec::new(),
        has_work: true,
        store_busy: true,
        idle_since: None,
        stopping: None,
        stop_began: None,
        finish_sent: false,
        store_ended: false,
        stats: Stats::default(),
        cfg,
    };
    m.set_targets();
    Ok(m)
}

struct Master<'w> {
    world: &'w SimpleCommunicator,
    cfg: Config,
    session: i64,
    synthetic: bool,
    nodes: Vec<NodeState>,
    workers: Vec<WorkerState>,
    serial_q: VecDeque<Runnable>,
    mpi_q: Vec<Runnable>,
    /// The MPI job that reserved draining nodes, with them.
    waiting: Option<(Runnable, Vec<usize>)>,
    active: HashMap<i64, Active>,
    mpi_running: usize,
    max_mpiruns: usize,
    runner: Executor,
    /// Runs serial jobs on rank 0's node when no worker rank runs there; its worker entry has
    /// rank 0.
    local: Option<Executor>,
    mpirun: MpiRun,
    to_store: Sender<ToStore>,
    from_store: Receiver<FromStore>,
    store_handle: Option<std::thread::JoinHandle<()>>,
    demand: Arc<Demand>,
    deadline: Option<Instant>,
    /// Moving average of job run times, seconds.
    avg_runtime: Option<f64>,
    outbox: HashMap<usize, Vec<RunJob>>,
    kills: HashMap<(usize, KillReason), Vec<i64>>,
    started: Vec<(i64, String)>,
    finished: Vec<JobFinished>,
    has_work: bool,
    store_busy: bool,
    idle_since: Option<Instant>,
    stopping: Option<KillReason>,
    stop_began: Option<Instant>,
    finish_sent: bool,
    store_ended: bool,
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
    empty_queue_with_room: u64,
}

impl Master<'_> {
    fn set_targets(&self) {
        let slots: u64 = self
            .workers
            .iter()
            .map(|w| w.capacity / packing::cost(1).max(1))
            .sum::<u64>()
            .max(1);
        // Enough in hand for every worker's capacity and backlog, and a lease batch big enough
        // that leasing stays a small cost per job.
        let serial = if self.workers.is_empty() {
            0
        } else {
            (slots as usize * 64).clamp(512, 4096)
        };
        let mpi = (self.nodes.len() * 2).clamp(8, 256);
        self.demand.serial_target.store(serial, Ordering::Relaxed);
        self.demand.mpi_target.store(mpi, Ordering::Relaxed);
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
            if let Some(reason) = self.stopping {
                if self.stop_progress(reason) {
                    break;
                }
            } else {
                activity |= self.schedule();
            }
            self.send_outbox();
            self.send_to_store();
            if activity {
                pause = MIN_PAUSE;
                continue;
            }
            let max = if self.active.is_empty() {
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
        match self.stopping {
            Some(KillReason::SessionLost) => EXIT_SESSION_LOST,
            _ => 0,
        }
    }

    // ---- inputs ----

    fn poll_mpi(&mut self) -> bool {
        let mut any = false;
        while let Some((from, msg)) = try_receive(self.world) {
            any = true;
            let Some(wi) = self.workers.iter().position(|w| w.rank == from) else {
                tracing::warn!("message from unknown rank {from}");
                continue;
            };
            match msg {
                Message::Report { started, finished } => {
                    self.stats.reports += 1;
                    for s in started {
                        self.job_started(s, Some(wi));
                    }
                    for f in finished {
                        self.job_finished(f);
                    }
                }
                Message::Bye => self.workers[wi].bye = true,
                other => tracing::warn!("unexpected message from rank {from}: {other:?}"),
            }
        }
        any
    }

    fn poll_runner(&mut self) -> bool {
        let mut any = false;
        while let Ok(ev) = self.runner.events.try_recv() {
            any = true;
            match ev {
                Event::Started(s) => self.job_started(s, None),
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
        let wi = self.workers.iter().position(|w| w.rank == 0);
        for ev in events {
            match ev {
                Event::Started(s) => self.job_started(s, wi),
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
                        match r.class {
                            Class::Serial => self.serial_q.push_back(r),
                            Class::Mpi => self.mpi_q.push(r),
                        }
                    }
                    // Largest first (legacy), then oldest.
                    self.mpi_q
                        .sort_by_key(|r| (std::cmp::Reverse(nodes_needed(r)), r.job.pk));
                }
                FromStore::Kill(pks) | FromStore::Conflict(pks) => {
                    any = true;
                    for pk in pks {
                        self.kill_job(pk, KillReason::User);
                    }
                }
                FromStore::Status { has_work, busy } => {
                    self.has_work = has_work;
                    self.store_busy = busy;
                }
                FromStore::SessionLost => {
                    any = true;
                    if self.stopping != Some(KillReason::SessionLost) {
                        tracing::error!(
                            "session {} lost: killing every job and stopping",
                            self.session
                        );
                        self.begin_stop(KillReason::SessionLost);
                    }
                }
                FromStore::Ended => self.store_ended = true,
            }
        }
        any
    }

    fn job_started(&mut self, s: JobStarted, worker: Option<usize>) {
        let place = match worker {
            Some(wi) => {
                let w = &mut self.workers[wi];
                w.unstarted = w.unstarted.saturating_sub(1);
                format!(
                    "on {} (rank {}, pid {}, slot {})",
                    self.nodes[w.node].name, w.rank, s.pid, s.slot
                )
            }
            None => format!("MPI launch, pid {}", s.pid),
        };
        if let Some(a) = self.active.get_mut(&s.pk) {
            a.started = true;
        }
        self.started.push((s.pk, place));
    }

    fn job_finished(&mut self, mut f: JobFinished) {
        let Some(a) = self.active.remove(&f.pk) else {
            return;
        };
        match &a.place {
            Place::Worker(wi) => {
                let w = &mut self.workers[*wi];
                w.assigned = w.assigned.saturating_sub(a.cost);
                if !f.started {
                    w.unstarted = w.unstarted.saturating_sub(1);
                }
            }
            Place::Runner(nodes) => {
                self.mpi_running = self.mpi_running.saturating_sub(1);
                for n in nodes {
                    if self.nodes[*n].reserved_by == Some(f.pk) {
                        self.nodes[*n].reserved_by = None;
                    }
                }
            }
        }
        if f.started {
            let secs = (f.elapsed_ms as f64 / 1000.0).max(0.0005);
            self.avg_runtime = Some(match self.avg_runtime {
                None => secs,
                Some(a) => a * 0.9 + secs * 0.1,
            });
        }
        // A kill the master asked for decides what is recorded, unless the job got to exit 0.
        if f.killed.is_none() && a.kill.is_some() && !f.status.success() {
            f.killed = a.kill;
        }
        // A batch system ending the allocation (Slurm's time limit) signals every process in it,
        // the jobs as well as the launcher: a job that died after the launcher got its signal
        // was cut short, as if the launcher had killed it (RUN_TIMEOUT, not RUN_ERROR).
        if f.killed.is_none()
            && f.started
            && !f.status.success()
            && self.stopping == Some(KillReason::Signal)
        {
            f.killed = Some(KillReason::Signal);
        }
        self.finished.push(f);
    }

    // ---- scheduling ----

    fn fits_time(&self, r: &Runnable) -> bool {
        match self.deadline {
            None => true,
            Some(d) => {
                u64::from(r.job.spec.wall_time_minutes) * 60
                    <= d.saturating_duration_since(Instant::now()).as_secs()
            }
        }
    }

    fn schedule(&mut self) -> bool {
        let mut any = self.schedule_mpi();
        any |= self.schedule_serial();
        any
    }

    fn schedule_serial(&mut self) -> bool {
        let mut any = false;
        if self.serial_q.is_empty() && self.workers.iter().any(|w| w.unstarted == 0 && !w.bye) {
            self.stats.empty_queue_with_room += 1;
        }
        let mut dropped = Vec::new();
        while let Some(front) = self.serial_q.front() {
            if !self.fits_time(front) {
                let r = self.serial_q.pop_front().expect("front exists");
                dropped.push(r.job.pk);
                continue;
            }
            let cost = packing::cost(front.job.spec.node_packing_count);
            let Some(wi) = self.pick_worker(cost) else {
                break;
            };
            self.stats.jobs_sent += 1;
            let r = self.serial_q.pop_front().expect("front exists");
            self.demand.taken(Class::Serial, 1);
            let w = &mut self.workers[wi];
            w.assigned += cost;
            w.unstarted += 1;
            self.active.insert(
                r.job.pk,
                Active {
                    place: Place::Worker(wi),
                    cost,
                    started: false,
                    kill: None,
                },
            );
            let job = self.run_job(r, cost);
            if self.workers[wi].rank == 0 {
                if let Some(local) = &self.local {
                    local.send(Request::Run(job));
                }
                any = true;
                continue;
            }
            let out = self.outbox.entry(wi).or_default();
            out.push(job);
            if out.len() >= MAX_JOBS_PER_MESSAGE {
                let jobs = std::mem::take(out);
                self.stats.run_messages += 1;
                send(self.world, self.workers[wi].rank, &Message::Run(jobs));
            }
            any = true;
        }
        if !dropped.is_empty() {
            self.demand.taken(Class::Serial, dropped.len());
            tracing::info!(
                "{} jobs cannot finish before the time limit; released",
                dropped.len()
            );
            let _ = self.to_store.send(ToStore::Release(dropped));
        }
        any
    }

    /// The worker with room for `cost` now, least loaded first; else the one with the shortest
    /// backlog of jobs not yet started, below its prefetch limit.
    fn pick_worker(&self, cost: u64) -> Option<usize> {
        let eligible = |w: &&WorkerState| !w.bye && self.nodes[w.node].reserved_by.is_none();
        let now = self
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| eligible(w) && w.assigned + cost.min(w.capacity) <= w.capacity)
            .min_by_key(|(_, w)| w.assigned * 1000 / w.capacity.max(1));
        if let Some((i, _)) = now {
            return Some(i);
        }
        // Backlog per slot: one job at least (the next starts the moment one ends, without a
        // round trip to the master), more for short jobs (50 ms of work), at most 64.
        let per_slot = match self.avg_runtime {
            Some(a) => (0.05 / a).ceil().clamp(1.0, 64.0) as usize,
            None => 1,
        };
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                let slots = (w.capacity / cost.max(1)).max(1) as usize;
                eligible(w) && w.unstarted < (per_slot * slots).min(256)
            })
            .min_by_key(|(_, w)| w.unstarted)
            .map(|(i, _)| i)
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

    fn node_idle(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        node.reserved_by.is_none() && node.workers.iter().all(|w| self.workers[*w].assigned == 0)
    }

    fn schedule_mpi(&mut self) -> bool {
        let mut any = false;
        // The waiting job starts once its reserved nodes drained.
        if let Some((r, nodes)) = self.waiting.take() {
            let drained = nodes.iter().all(|n| {
                self.nodes[*n]
                    .workers
                    .iter()
                    .all(|w| self.workers[*w].assigned == 0)
            });
            if drained && self.mpi_running < self.max_mpiruns {
                self.launch_mpi(r, nodes);
                any = true;
            } else {
                self.waiting = Some((r, nodes));
            }
        }
        let mut i = 0;
        let mut dropped = Vec::new();
        while i < self.mpi_q.len() && self.mpi_running < self.max_mpiruns {
            if !self.fits_time(&self.mpi_q[i]) {
                dropped.push(self.mpi_q.remove(i).job.pk);
                continue;
            }
            let need = nodes_needed(&self.mpi_q[i]);
            if need > self.nodes.len() {
                // The lease filter keeps these out; a job changed meanwhile is given back.
                dropped.push(self.mpi_q.remove(i).job.pk);
                continue;
            }
            let idle: Vec<usize> = (0..self.nodes.len())
                .filter(|n| self.node_idle(*n))
                .collect();
            if idle.len() >= need {
                let r = self.mpi_q.remove(i);
                self.demand.taken(Class::Mpi, 1);
                self.launch_mpi(r, idle[..need].to_vec());
                any = true;
                continue;
            }
            if self.waiting.is_none() {
                // Reserve the least loaded unreserved nodes; they drain, then it starts.
                let mut free: Vec<usize> = (0..self.nodes.len())
                    .filter(|n| self.nodes[*n].reserved_by.is_none())
                    .collect();
                if free.len() >= need {
                    free.sort_by_key(|n| {
                        self.nodes[*n]
                            .workers
                            .iter()
                            .map(|w| self.workers[*w].assigned)
                            .sum::<u64>()
                    });
                    let chosen = free[..need].to_vec();
                    let r = self.mpi_q.remove(i);
                    self.demand.taken(Class::Mpi, 1);
                    for n in &chosen {
                        self.nodes[*n].reserved_by = Some(r.job.pk);
                    }
                    tracing::debug!(
                        "{}: reserved {need} nodes, waiting for them to drain",
                        r.job.cute_id()
                    );
                    self.waiting = Some((r, chosen));
                    any = true;
                    continue;
                }
            }
            i += 1;
        }
        if !dropped.is_empty() {
            self.demand.taken(Class::Mpi, dropped.len());
            let _ = self.to_store.send(ToStore::Release(dropped));
        }
        any
    }

    fn launch_mpi(&mut self, r: Runnable, nodes: Vec<usize>) {
        let pk = r.job.pk;
        for n in &nodes {
            self.nodes[*n].reserved_by = Some(pk);
        }
        // Synthetic nodes are all this machine: the MPI launcher places the ranks itself.
        let hosts: Vec<String> = if self.synthetic {
            Vec::new()
        } else {
            nodes.iter().map(|n| self.nodes[*n].name.clone()).collect()
        };
        self.mpi_running += 1;
        self.active.insert(
            pk,
            Active {
                place: Place::Runner(nodes),
                cost: 0,
                started: false,
                kill: None,
            },
        );
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

    fn kill_job(&mut self, pk: i64, reason: KillReason) {
        if let Some(i) = self.serial_q.iter().position(|r| r.job.pk == pk) {
            self.serial_q.remove(i);
            self.demand.taken(Class::Serial, 1);
            return;
        }
        if let Some(i) = self.mpi_q.iter().position(|r| r.job.pk == pk) {
            self.mpi_q.remove(i);
            self.demand.taken(Class::Mpi, 1);
            return;
        }
        if self.waiting.as_ref().is_some_and(|(r, _)| r.job.pk == pk) {
            let (_, nodes) = self.waiting.take().expect("checked");
            for n in nodes {
                self.nodes[n].reserved_by = None;
            }
            return;
        }
        let Some(a) = self.active.get_mut(&pk) else {
            return;
        };
        if a.kill.is_some() {
            return;
        }
        a.kill = Some(reason);
        match &a.place {
            Place::Worker(wi) if self.workers[*wi].rank == 0 => {
                if let Some(local) = &self.local {
                    local.send(Request::Kill(vec![pk], reason));
                }
            }
            Place::Worker(wi) => self.kills.entry((*wi, reason)).or_default().push(pk),
            Place::Runner(_) => self.runner.send(Request::Kill(vec![pk], reason)),
        }
    }

    // ---- outputs ----

    fn send_outbox(&mut self) {
        for (wi, jobs) in self.outbox.drain() {
            if !jobs.is_empty() {
                self.stats.run_messages += 1;
                send(self.world, self.workers[wi].rank, &Message::Run(jobs));
            }
        }
        for ((wi, reason), pks) in self.kills.drain() {
            send(
                self.world,
                self.workers[wi].rank,
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
            return self.begin_stop(KillReason::Signal);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("time limit reached: stopping; running jobs become RUN_TIMEOUT");
            return self.begin_stop(KillReason::TimeLimit);
        }
        let idle = self.active.is_empty()
            && self.serial_q.is_empty()
            && self.mpi_q.is_empty()
            && self.waiting.is_none()
            && !self.store_busy;
        if !idle || self.cfg.opts.persistent {
            self.idle_since = None;
            return;
        }
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let waited = since.elapsed();
        if !self.has_work && waited >= self.cfg.idle_exit {
            tracing::info!("no work left for this launcher: exiting");
            self.begin_stop(KillReason::Exit);
        } else if waited >= (self.cfg.idle_exit * 5).max(Duration::from_secs(10)) {
            tracing::warn!(
                "jobs remain but none this launcher can run (too many nodes, too long, or waiting for other launchers) for {} s: exiting",
                waited.as_secs()
            );
            self.begin_stop(KillReason::Exit);
        }
    }

    fn begin_stop(&mut self, reason: KillReason) {
        self.stopping = Some(reason);
        self.stop_began = Some(Instant::now());
        let _ = self.to_store.send(ToStore::Draining);
        let mut unstarted: Vec<i64> = self.serial_q.drain(..).map(|r| r.job.pk).collect();
        unstarted.extend(self.mpi_q.drain(..).map(|r| r.job.pk));
        if let Some((r, _)) = self.waiting.take() {
            unstarted.push(r.job.pk);
        }
        if !unstarted.is_empty() && reason != KillReason::SessionLost {
            let _ = self.to_store.send(ToStore::Release(unstarted));
        }
        for w in &mut self.workers {
            if w.rank == 0 {
                // Rank 0's own jobs end through its executor; their reports still arrive.
                if let Some(local) = &self.local {
                    local.send(Request::KillAll(reason));
                }
                w.bye = true;
            } else if !w.bye {
                send(self.world, w.rank, &Message::Shutdown { reason });
            }
        }
        let running: Vec<i64> = self
            .active
            .iter()
            .filter(|(_, a)| matches!(a.place, Place::Runner(_)))
            .map(|(pk, _)| *pk)
            .collect();
        if !running.is_empty() {
            tracing::info!("killing {} MPI jobs", running.len());
        }
        for pk in running {
            if let Some(a) = self.active.get_mut(&pk) {
                a.kill.get_or_insert(reason);
            }
        }
        self.runner.send(Request::KillAll(reason));
    }

    /// True when everything is done.
    fn stop_progress(&mut self, _reason: KillReason) -> bool {
        let began = *self.stop_began.get_or_insert_with(Instant::now);
        if !self.finish_sent {
            let workers_done = self.workers.iter().all(|w| w.bye);
            let jobs_done = self.active.is_empty();
            let overdue = began.elapsed() > self.cfg.kill_grace + Duration::from_secs(20);
            let done = workers_done && jobs_done;
            if !done && !overdue {
                return false;
            }
            if !done {
                tracing::error!(
                    "{} jobs and {} workers did not finish stopping in time; ending the session anyway",
                    self.active.len(),
                    self.workers.iter().filter(|w| !w.bye).count()
                );
            }
            self.send_to_store();
            let _ = self.to_store.send(ToStore::Finish);
            self.finish_sent = true;
        }
        // The store thread gets its time to write and end the session.
        self.store_ended || began.elapsed() > self.cfg.kill_grace + Duration::from_secs(90)
    }
}

fn nodes_needed(r: &Runnable) -> usize {
    (r.job.spec.num_nodes.max(1) + r.job.spec.coschedule_num_nodes) as usize
}
