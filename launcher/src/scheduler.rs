//! Rank 0's scheduling: which job runs where, and how much work the launcher holds. No MPI, no
//! database and no clock in here: the MPI loop ([`crate::master`]) tells the [`Scheduler`] what
//! happened (jobs in hand, started, finished, workers gone) with the time it happened, asks it to
//! [`Scheduler::decide`], and carries out the [`Action`]s. So every case is a unit test.
//!
//! The rules:
//! - A serial job goes to a worker that can start it now (its node has room in packing units, see
//!   [`crate::packing`]), the least loaded first.
//! - When none can, a job may wait on a worker as a *backlog*, so a worker never waits for the
//!   master between two short jobs — but only when jobs are short (the observed run times say so:
//!   [`BACKLOG_WORK`] of work per slot, at least one job when they are shorter than
//!   [`SHORT_JOB`]), and not on a worker that is busy with a job running far longer than usual.
//!   Without observations there is no backlog.
//! - A backlog is reclaimable: when another worker has room and the master has nothing else to
//!   give it, a job expected to wait on its worker for [`RECLAIM_WORTH`] or more (its worker's
//!   running job has that much of its usual run time left, or runs twice as long as usual) is
//!   taken back ([`Action::Reclaim`]) and started there. So no job waits behind a busy worker
//!   while another has room, and jobs about to start are not moved about.
//! - MPI jobs (several nodes or ranks) get whole idle nodes, largest first; when none are idle the
//!   largest waiting job reserves nodes that then drain, so a stream of serial work cannot starve
//!   it. At most `max_mpiruns` run at once.
//! - A job runs only when it fits the time left ([`fits_time`], the same rule the lease filter
//!   uses) and the launcher's nodes; otherwise it is given back ([`Action::Release`]).
//! - The launcher holds work in proportion to its capacity and the jobs' expected length
//!   ([`Scheduler::lease_target`]): what its slots can start now, plus [`LEASE_AHEAD`] of expected
//!   work per slot. Long jobs are leased one per slot, so launchers share a small campaign.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use crate::packing;

/// How a runnable job is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// On a worker rank, packed with others on its node.
    Serial,
    /// Through the MPI launcher on reserved nodes.
    Mpi,
}

/// Work per slot a worker may hold beyond what it runs, in expected run time.
pub const BACKLOG_WORK: Duration = Duration::from_millis(50);
/// Jobs at least this long (expected) get no backlog at all: one slot, one job. Shorter ones
/// get at least one, so a worker starts the next at once (a round trip to the master and the
/// worker's idle polling cost a few per cent of a 1 s job).
pub const SHORT_JOB: Duration = Duration::from_secs(5);
/// A backlog job expected to wait at least this long for its worker is taken back when another
/// worker has room: moving it costs a round trip of a few milliseconds.
pub const RECLAIM_WORTH: Duration = Duration::from_millis(250);
/// Expected work per slot held beyond the running jobs, so leasing stays a small cost per job
/// and a slot never waits for a lease between two jobs shorter than this.
pub const LEASE_AHEAD: Duration = Duration::from_secs(2);
/// Most serial jobs a launcher holds, running or not, unless it has more than half as many slots
/// (then twice its slots): enough that leases come in batches of hundreds, few enough that rank
/// 0's memory stays small.
pub const MAX_SERIAL_IN_HAND: usize = 2048;
/// Most backlog jobs per slot, and per worker.
const MAX_BACKLOG_PER_SLOT: usize = 64;
const MAX_BACKLOG_PER_WORKER: usize = 256;

/// Whether a job of `wall_time_minutes` fits in `time_left` (None: no time limit). A job's wall
/// time is an upper bound in whole minutes, so it fits when it is at most the time left rounded
/// up to whole minutes: a 1-minute job fits a 1-minute launcher. Used by the lease filter (see
/// [`max_wall_minutes`]) and by the scheduler, so both agree.
pub fn fits_time(wall_time_minutes: u32, time_left: Option<Duration>) -> bool {
    match max_wall_minutes(time_left) {
        None => true,
        Some(m) => wall_time_minutes <= m,
    }
}

/// The longest wall time that fits in `time_left`, in minutes (None: no limit).
pub fn max_wall_minutes(time_left: Option<Duration>) -> Option<u32> {
    time_left.map(|t| t.as_secs_f64() / 60.0).map(|m| {
        let m = m.ceil();
        if m >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            m as u32
        }
    })
}

/// What the scheduler needs to know of a runnable job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobShape {
    /// The job's row number.
    pub pk: i64,
    /// Serial or MPI.
    pub class: Class,
    /// Share of a node it takes (serial jobs), packing units.
    pub cost: u64,
    /// Nodes it needs (MPI jobs): num_nodes + coschedule_num_nodes.
    pub nodes: usize,
    /// Its wall time, minutes.
    pub wall_time_minutes: u32,
}

impl JobShape {
    /// The shape of a leased job.
    pub fn of(job: &balsam_store::Job, class: Class) -> JobShape {
        JobShape {
            pk: job.pk,
            class,
            cost: packing::cost(job.spec.node_packing_count),
            nodes: (job.spec.num_nodes.max(1) + job.spec.coschedule_num_nodes) as usize,
            wall_time_minutes: job.spec.wall_time_minutes,
        }
    }
}

/// A worker: a rank that runs serial jobs on its node (or rank 0 itself, on a node without
/// worker ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Its MPI rank (0: rank 0's own executor).
    pub rank: i32,
    /// Index of its node.
    pub node: usize,
    /// Its share of the node, packing units.
    pub capacity: u64,
}

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this worker (index into the worker list).
    Worker(usize),
    /// Through the MPI launcher on these nodes.
    Nodes(Vec<usize>),
}

/// Why a job is given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Its wall time does not fit the time left.
    TooLong,
    /// It needs more nodes than the launcher has.
    TooLarge,
}

/// What the MPI loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a serial job to a worker. `backlog`: the worker has no room now; it starts the job
    /// when a running one ends (or gives it back on [`Action::Reclaim`]).
    Run {
        /// The job.
        pk: i64,
        /// The worker (index).
        worker: usize,
        /// Queued behind running jobs rather than started at once.
        backlog: bool,
    },
    /// Start an MPI job on these nodes (index list).
    Launch {
        /// The job.
        pk: i64,
        /// Its nodes, reserved until it ends.
        nodes: Vec<usize>,
    },
    /// These busy nodes are reserved for an MPI job: no new serial work goes there, and the job
    /// starts once they drained.
    Reserve {
        /// The job.
        pk: i64,
        /// The nodes.
        nodes: Vec<usize>,
    },
    /// Ask a worker for jobs it has not started: they come back (reported as not started,
    /// [`crate::messages::KillReason::Reclaimed`]) and are placed again.
    Reclaim {
        /// The worker (index).
        worker: usize,
        /// The jobs.
        pks: Vec<i64>,
    },
    /// Give jobs back to the database: this launcher will not run them.
    Release {
        /// The jobs.
        pks: Vec<i64>,
        /// Why.
        why: ReleaseReason,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Run {
                pk,
                worker,
                backlog: false,
            } => write!(f, "job #{pk} to worker {worker}: it has room now"),
            Action::Run {
                pk,
                worker,
                backlog: true,
            } => write!(
                f,
                "job #{pk} queued on worker {worker}: no worker has room, jobs are short"
            ),
            Action::Launch { pk, nodes } => write!(f, "job #{pk} starts on nodes {nodes:?}"),
            Action::Reserve { pk, nodes } => write!(
                f,
                "job #{pk} reserves nodes {nodes:?}: none are idle, they drain for it"
            ),
            Action::Reclaim { worker, pks } => write!(
                f,
                "{} jobs taken back from worker {worker}: they would wait there {} ms or more while another worker has room",
                pks.len(),
                RECLAIM_WORTH.as_millis()
            ),
            Action::Release { pks, why } => write!(
                f,
                "{} jobs given back: {}",
                pks.len(),
                match why {
                    ReleaseReason::TooLong => "their wall time does not fit the time left",
                    ReleaseReason::TooLarge => "they need more nodes than this launcher has",
                }
            ),
        }
    }
}

/// What became of a job the launcher must drop (a user killed, removed or changed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// It waited in the launcher's own queue: it is out, nothing ran.
    Queued,
    /// It was sent to a worker or the MPI launcher: stop it there.
    Sent {
        /// Where.
        place: Place,
        /// Whether its process started.
        started: bool,
    },
    /// The launcher does not hold it.
    Unknown,
}

#[derive(Debug, Clone)]
struct Worker {
    spec: WorkerSpec,
    /// Units of jobs sent and not finished (each counted up to the capacity).
    load: u64,
    /// Jobs sent and not started, oldest first, with when they were sent.
    unstarted: VecDeque<(i64, Instant)>,
    /// Jobs sent and not finished (running or not).
    jobs: usize,
    gone: bool,
}

#[derive(Debug, Clone)]
struct Active {
    shape: JobShape,
    place: Place,
    units: u64,
    /// When its process started.
    started: Option<Instant>,
    /// Asked back and not returned yet.
    reclaiming: bool,
}

/// Rank 0's scheduling state: the workers, the nodes, the jobs in hand and where they run.
#[derive(Debug, Clone)]
pub struct Scheduler {
    workers: Vec<Worker>,
    /// Per node: its workers, and the MPI job that holds or reserved it.
    nodes: Vec<(Vec<usize>, Option<i64>)>,
    serial: VecDeque<JobShape>,
    /// Largest first, then oldest.
    mpi: Vec<JobShape>,
    /// The MPI job that reserved draining nodes, with them.
    waiting: Option<(JobShape, Vec<usize>)>,
    active: HashMap<i64, Active>,
    mpi_running: usize,
    max_mpiruns: usize,
    /// Moving average of run times, seconds.
    expected: Option<f64>,
    /// Cost of the latest serial job seen (to count slots).
    typical_cost: u64,
    runs_serial: bool,
    runs_mpi: bool,
}

impl Scheduler {
    /// A scheduler for `nodes` nodes and these workers. `runs_serial`/`runs_mpi`: which classes
    /// the launcher leases (for [`Scheduler::lease_target`]).
    pub fn new(
        nodes: usize,
        workers: Vec<WorkerSpec>,
        max_mpiruns: usize,
        runs_serial: bool,
        runs_mpi: bool,
    ) -> Scheduler {
        let mut node_list: Vec<(Vec<usize>, Option<i64>)> = vec![(Vec::new(), None); nodes];
        for (i, w) in workers.iter().enumerate() {
            node_list[w.node].0.push(i);
        }
        Scheduler {
            workers: workers
                .into_iter()
                .map(|spec| Worker {
                    spec,
                    load: 0,
                    unstarted: VecDeque::new(),
                    jobs: 0,
                    gone: false,
                })
                .collect(),
            nodes: node_list,
            serial: VecDeque::new(),
            mpi: Vec::new(),
            waiting: None,
            active: HashMap::new(),
            mpi_running: 0,
            max_mpiruns: max_mpiruns.max(1),
            expected: None,
            typical_cost: packing::NODE,
            runs_serial,
            runs_mpi,
        }
    }

    /// How many workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Worker `i` as given.
    pub fn worker(&self, i: usize) -> WorkerSpec {
        self.workers[i].spec
    }

    /// Whether worker `i` said goodbye.
    pub fn is_gone(&self, i: usize) -> bool {
        self.workers[i].gone
    }

    /// A runnable job the launcher now holds.
    pub fn add(&mut self, job: JobShape) {
        match job.class {
            Class::Serial => {
                self.typical_cost = job.cost.max(1);
                self.serial.push_back(job);
            }
            Class::Mpi => {
                let at = self.mpi.partition_point(|q| {
                    (q.nodes, std::cmp::Reverse(q.pk)) >= (job.nodes, std::cmp::Reverse(job.pk))
                });
                self.mpi.insert(at, job);
            }
        }
    }

    /// A job's process started at `now`.
    pub fn started(&mut self, pk: i64, now: Instant) {
        let Some(a) = self.active.get_mut(&pk) else {
            return;
        };
        a.started = Some(now);
        a.reclaiming = false;
        if let Place::Worker(wi) = a.place {
            self.workers[wi].unstarted.retain(|(p, _)| *p != pk);
        }
    }

    /// A job ended (ran for `ran_for`), could not start, or was dropped before it started
    /// (`ran_for` None). Returns where it was.
    pub fn finished(&mut self, pk: i64, ran_for: Option<Duration>) -> Option<Place> {
        let a = self.active.remove(&pk)?;
        match &a.place {
            Place::Worker(wi) => {
                let w = &mut self.workers[*wi];
                w.load = w.load.saturating_sub(a.units);
                w.jobs = w.jobs.saturating_sub(1);
                w.unstarted.retain(|(p, _)| *p != pk);
            }
            Place::Nodes(nodes) => {
                self.mpi_running = self.mpi_running.saturating_sub(1);
                for n in nodes {
                    if self.nodes[*n].1 == Some(pk) {
                        self.nodes[*n].1 = None;
                    }
                }
            }
        }
        if let Some(t) = ran_for {
            let secs = t.as_secs_f64().max(0.0005);
            self.expected = Some(match self.expected {
                None => secs,
                Some(a) => a * 0.9 + secs * 0.1,
            });
        }
        Some(a.place)
    }

    /// A job came back unstarted from a reclaim: it is placed again before anything else.
    /// False when the scheduler did not have it out.
    pub fn reclaimed(&mut self, pk: i64) -> bool {
        let Some(a) = self.active.remove(&pk) else {
            return false;
        };
        if let Place::Worker(wi) = a.place {
            let w = &mut self.workers[wi];
            w.load = w.load.saturating_sub(a.units);
            w.jobs = w.jobs.saturating_sub(1);
            w.unstarted.retain(|(p, _)| *p != pk);
        }
        self.serial.push_front(a.shape);
        true
    }

    /// A worker said goodbye: nothing more goes to it.
    pub fn worker_gone(&mut self, wi: usize) {
        self.workers[wi].gone = true;
    }

    /// Whether every worker said goodbye.
    pub fn all_workers_gone(&self) -> bool {
        self.workers.iter().all(|w| w.gone)
    }

    /// Takes a job out of the launcher's hands (a user killed, removed or changed it).
    pub fn drop_job(&mut self, pk: i64) -> Dropped {
        if let Some(i) = self.serial.iter().position(|j| j.pk == pk) {
            self.serial.remove(i);
            return Dropped::Queued;
        }
        if let Some(i) = self.mpi.iter().position(|j| j.pk == pk) {
            self.mpi.remove(i);
            return Dropped::Queued;
        }
        if self.waiting.as_ref().is_some_and(|(j, _)| j.pk == pk) {
            let (_, nodes) = self.waiting.take().expect("checked");
            for n in nodes {
                self.nodes[n].1 = None;
            }
            return Dropped::Queued;
        }
        match self.active.get(&pk) {
            Some(a) => Dropped::Sent {
                place: a.place.clone(),
                started: a.started.is_some(),
            },
            None => Dropped::Unknown,
        }
    }

    /// Empties the launcher's own queues (it is stopping); returns the jobs, none of which ran.
    pub fn drain(&mut self) -> Vec<i64> {
        let mut out: Vec<i64> = self.serial.drain(..).map(|j| j.pk).collect();
        out.extend(self.mpi.drain(..).map(|j| j.pk));
        if let Some((j, nodes)) = self.waiting.take() {
            out.push(j.pk);
            for n in nodes {
                self.nodes[n].1 = None;
            }
        }
        out
    }

    /// Jobs sent and not finished.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Jobs in hand not sent anywhere yet.
    pub fn queued(&self) -> usize {
        self.serial.len() + self.mpi.len() + usize::from(self.waiting.is_some())
    }

    /// Nothing in hand at all.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.queued() == 0
    }

    /// Jobs started through the MPI launcher (on nodes) and not finished.
    pub fn on_nodes(&self) -> Vec<i64> {
        self.active
            .iter()
            .filter(|(_, a)| matches!(a.place, Place::Nodes(_)))
            .map(|(pk, _)| *pk)
            .collect()
    }

    /// The expected run time of a job, from those observed (None before any ended).
    pub fn expected_run_time(&self) -> Option<Duration> {
        self.expected.map(Duration::from_secs_f64)
    }

    /// How many jobs of each class the launcher wants to hold in all (running, sent and queued):
    /// what its slots can run now, plus [`LEASE_AHEAD`] of expected work per slot. Before any
    /// job ended, one per slot.
    pub fn lease_target(&self) -> (usize, usize) {
        let serial = if self.runs_serial {
            let slots: usize = self
                .workers
                .iter()
                .filter(|w| !w.gone)
                .map(|w| (w.spec.capacity / self.typical_cost).max(1) as usize)
                .sum();
            let ahead = match self.expected {
                Some(e) => (LEASE_AHEAD.as_secs_f64() / e).floor().min(1e6) as usize,
                None => 0,
            };
            (slots * (1 + ahead)).min(MAX_SERIAL_IN_HAND.max(slots * 2))
        } else {
            0
        };
        let mpi = if self.runs_mpi {
            self.nodes.len().min(self.max_mpiruns) + 1
        } else {
            0
        };
        (serial, mpi)
    }

    /// Backlog jobs a slot may hold: [`BACKLOG_WORK`] of expected work, only for short jobs.
    fn backlog_per_slot(&self) -> usize {
        match self.expected {
            Some(e) if e < SHORT_JOB.as_secs_f64() => {
                let e_us = ((e * 1e6).round() as u128).max(1);
                (BACKLOG_WORK.as_micros().div_ceil(e_us) as usize).clamp(1, MAX_BACKLOG_PER_SLOT)
            }
            _ => 0,
        }
    }

    /// How long a job queued on this worker is expected to wait for a slot: the least of its
    /// running jobs' usual run time left; [`Duration::MAX`] when one runs twice as long as usual
    /// (it may run for long: nothing should wait behind it); zero when one is only somewhat
    /// late, or none started yet, or nothing is known of run times.
    fn expected_wait(&self, wi: usize, now: Instant) -> Duration {
        let Some(e) = self.expected.map(Duration::from_secs_f64) else {
            return Duration::ZERO;
        };
        self.active
            .values()
            .filter(|a| a.place == Place::Worker(wi))
            .filter_map(|a| a.started)
            .map(|s| {
                let ran = now.saturating_duration_since(s);
                if ran < e {
                    e - ran
                } else if ran < e * 2 {
                    Duration::ZERO
                } else {
                    Duration::MAX
                }
            })
            .min()
            .unwrap_or(Duration::ZERO)
    }

    fn eligible(&self, wi: usize) -> bool {
        let w = &self.workers[wi];
        !w.gone && self.nodes[w.spec.node].1.is_none()
    }

    fn units(&self, wi: usize, cost: u64) -> u64 {
        cost.min(self.workers[wi].spec.capacity)
    }

    fn has_room(&self, wi: usize, cost: u64) -> bool {
        let w = &self.workers[wi];
        w.load + self.units(wi, cost) <= w.spec.capacity
    }

    /// The worker with room for `cost` now, least loaded first; else one that may hold it as a
    /// backlog, shortest backlog first.
    fn pick_worker(&self, cost: u64, now: Instant) -> Option<(usize, bool)> {
        let room = (0..self.workers.len())
            .filter(|i| self.eligible(*i) && self.has_room(*i, cost))
            .min_by_key(|i| {
                let w = &self.workers[*i];
                (w.load as u128 * 1_000_000) / w.spec.capacity.max(1) as u128
            });
        if let Some(i) = room {
            return Some((i, false));
        }
        let per_slot = self.backlog_per_slot();
        if per_slot == 0 {
            return None;
        }
        (0..self.workers.len())
            .filter(|i| {
                let w = &self.workers[*i];
                let slots = (w.spec.capacity / cost.max(1)).max(1) as usize;
                self.eligible(*i)
                    && w.jobs < (slots * (1 + per_slot)).min(MAX_BACKLOG_PER_WORKER)
                    && self.expected_wait(*i, now) < Duration::MAX
            })
            .min_by_key(|i| self.workers[*i].jobs)
            .map(|i| (i, true))
    }

    fn send(&mut self, job: &JobShape, wi: usize, now: Instant) {
        let units = self.units(wi, job.cost);
        let w = &mut self.workers[wi];
        w.load += units;
        w.jobs += 1;
        w.unstarted.push_back((job.pk, now));
        self.active.insert(
            job.pk,
            Active {
                shape: *job,
                place: Place::Worker(wi),
                units,
                started: None,
                reclaiming: false,
            },
        );
    }

    fn node_idle(&self, n: usize) -> bool {
        let (workers, holder) = &self.nodes[n];
        holder.is_none() && workers.iter().all(|w| self.workers[*w].load == 0)
    }

    fn launch(&mut self, job: &JobShape, nodes: Vec<usize>) -> Action {
        for n in &nodes {
            self.nodes[*n].1 = Some(job.pk);
        }
        self.mpi_running += 1;
        self.active.insert(
            job.pk,
            Active {
                shape: *job,
                place: Place::Nodes(nodes.clone()),
                units: 0,
                started: None,
                reclaiming: false,
            },
        );
        Action::Launch { pk: job.pk, nodes }
    }

    /// Decides what to start, queue, reclaim and give back now. `time_left`: until the
    /// launcher's time limit (None: no limit).
    pub fn decide(&mut self, now: Instant, time_left: Option<Duration>) -> Vec<Action> {
        let mut out = Vec::new();
        self.decide_mpi(time_left, &mut out);
        self.decide_serial(now, time_left, &mut out);
        self.decide_reclaims(now, &mut out);
        out
    }

    fn decide_mpi(&mut self, time_left: Option<Duration>, out: &mut Vec<Action>) {
        // The waiting job starts once its reserved nodes drained.
        if let Some((job, nodes)) = self.waiting.take() {
            let drained = nodes
                .iter()
                .all(|n| self.nodes[*n].0.iter().all(|w| self.workers[*w].load == 0));
            if drained && self.mpi_running < self.max_mpiruns {
                out.push(self.launch(&job, nodes));
            } else {
                self.waiting = Some((job, nodes));
            }
        }
        let (mut too_long, mut too_large) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < self.mpi.len() && self.mpi_running < self.max_mpiruns {
            let job = self.mpi[i];
            if !fits_time(job.wall_time_minutes, time_left) {
                too_long.push(self.mpi.remove(i).pk);
                continue;
            }
            if job.nodes > self.nodes.len() {
                // The lease filter keeps these out; a job changed meanwhile is given back.
                too_large.push(self.mpi.remove(i).pk);
                continue;
            }
            let idle: Vec<usize> = (0..self.nodes.len())
                .filter(|n| self.node_idle(*n))
                .collect();
            if idle.len() >= job.nodes {
                self.mpi.remove(i);
                out.push(self.launch(&job, idle[..job.nodes].to_vec()));
                continue;
            }
            if self.waiting.is_none() {
                // Reserve the least loaded unreserved nodes; they drain, then it starts.
                let mut free: Vec<usize> = (0..self.nodes.len())
                    .filter(|n| self.nodes[*n].1.is_none())
                    .collect();
                if free.len() >= job.nodes {
                    free.sort_by_key(|n| {
                        self.nodes[*n]
                            .0
                            .iter()
                            .map(|w| self.workers[*w].load)
                            .sum::<u64>()
                    });
                    let chosen = free[..job.nodes].to_vec();
                    self.mpi.remove(i);
                    for n in &chosen {
                        self.nodes[*n].1 = Some(job.pk);
                    }
                    out.push(Action::Reserve {
                        pk: job.pk,
                        nodes: chosen.clone(),
                    });
                    self.waiting = Some((job, chosen));
                    continue;
                }
            }
            i += 1;
        }
        for (pks, why) in [
            (too_long, ReleaseReason::TooLong),
            (too_large, ReleaseReason::TooLarge),
        ] {
            if !pks.is_empty() {
                out.push(Action::Release { pks, why });
            }
        }
    }

    fn decide_serial(&mut self, now: Instant, time_left: Option<Duration>, out: &mut Vec<Action>) {
        let mut too_long = Vec::new();
        while let Some(front) = self.serial.front().copied() {
            if !fits_time(front.wall_time_minutes, time_left) {
                self.serial.pop_front();
                too_long.push(front.pk);
                continue;
            }
            let Some((wi, backlog)) = self.pick_worker(front.cost, now) else {
                break;
            };
            self.serial.pop_front();
            self.send(&front, wi, now);
            out.push(Action::Run {
                pk: front.pk,
                worker: wi,
                backlog,
            });
        }
        if !too_long.is_empty() {
            out.push(Action::Release {
                pks: too_long,
                why: ReleaseReason::TooLong,
            });
        }
    }

    /// Takes back queued jobs that would wait [`RECLAIM_WORTH`] or more on their worker, when
    /// other workers have room and the master has nothing else to give them: at most as many as
    /// they have room for (less those on their way back already), oldest first.
    fn decide_reclaims(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.serial.is_empty() || self.expected.is_none() {
            return;
        }
        if !self.workers.iter().any(|w| !w.unstarted.is_empty()) {
            return;
        }
        // Room, counted in jobs of the typical cost.
        let room: usize = (0..self.workers.len())
            .filter(|o| self.eligible(*o))
            .map(|o| {
                let w = &self.workers[o];
                let unit = self.units(o, self.typical_cost).max(1);
                (w.spec.capacity.saturating_sub(w.load) / unit) as usize
            })
            .sum();
        let on_their_way = self.active.values().filter(|a| a.reclaiming).count();
        let mut budget = room.saturating_sub(on_their_way);
        for wi in 0..self.workers.len() {
            if budget == 0 {
                break;
            }
            if self.workers[wi].unstarted.is_empty() || self.expected_wait(wi, now) < RECLAIM_WORTH
            {
                continue;
            }
            let mut pks = Vec::new();
            for (pk, _) in &self.workers[wi].unstarted {
                if budget == 0 {
                    break;
                }
                if self.active.get(pk).is_some_and(|a| !a.reclaiming) {
                    pks.push(*pk);
                    budget -= 1;
                }
            }
            for pk in &pks {
                if let Some(a) = self.active.get_mut(pk) {
                    a.reclaiming = true;
                }
            }
            if !pks.is_empty() {
                out.push(Action::Reclaim { worker: wi, pks });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: u64 = packing::NODE / 2;

    fn serial(pk: i64) -> JobShape {
        JobShape {
            pk,
            class: Class::Serial,
            cost: packing::cost(1),
            nodes: 1,
            wall_time_minutes: 1,
        }
    }

    fn mpi(pk: i64, nodes: usize) -> JobShape {
        JobShape {
            pk,
            class: Class::Mpi,
            cost: packing::NODE,
            nodes,
            wall_time_minutes: 1,
        }
    }

    /// `balsam launcher --num-workers 2`: two worker ranks sharing one node, half a node each.
    fn two_workers() -> Scheduler {
        Scheduler::new(
            1,
            vec![
                WorkerSpec {
                    rank: 1,
                    node: 0,
                    capacity: HALF,
                },
                WorkerSpec {
                    rank: 2,
                    node: 0,
                    capacity: HALF,
                },
            ],
            4,
            true,
            false,
        )
    }

    /// One worker per node, whole nodes (as batch templates start the launcher).
    fn nodes(n: usize) -> Scheduler {
        Scheduler::new(
            n,
            (0..n)
                .map(|i| WorkerSpec {
                    rank: i as i32 + 1,
                    node: i,
                    capacity: packing::NODE,
                })
                .collect(),
            4,
            true,
            true,
        )
    }

    fn runs(actions: &[Action]) -> Vec<(i64, usize, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Run {
                    pk,
                    worker,
                    backlog,
                } => Some((*pk, *worker, *backlog)),
                _ => None,
            })
            .collect()
    }

    /// Runs `pk` on its worker: started now, finished after `secs`.
    fn run_for(s: &mut Scheduler, pk: i64, t: Instant, secs: f64) {
        s.started(pk, t);
        s.finished(pk, Some(Duration::from_secs_f64(secs)));
    }

    #[test]
    fn a_short_job_never_waits_behind_a_long_one_while_a_worker_idles() {
        // The case: a 25 s job, then a 1 s job, 2 workers. Nothing is known about run
        // times, so nothing is queued behind a running job: each goes where there is room.
        let mut s = two_workers();
        let t = Instant::now();
        s.add(serial(1));
        s.add(serial(2));
        let a = s.decide(t, None);
        assert_eq!(runs(&a), vec![(1, 0, false), (2, 1, false)]);
        // A third job waits in the master until a worker has room, not on a busy worker.
        s.add(serial(3));
        assert!(s.decide(t, None).is_empty());
        s.started(1, t);
        s.started(2, t);
        run_for(&mut s, 2, t, 1.0);
        assert_eq!(runs(&s.decide(t, None)), vec![(3, 1, false)]);
    }

    #[test]
    fn no_backlog_without_observed_run_times_nor_for_long_jobs() {
        let mut s = two_workers();
        let t = Instant::now();
        for pk in 1..=6 {
            s.add(serial(pk));
        }
        assert_eq!(runs(&s.decide(t, None)).len(), 2, "one per slot");
        // Jobs of 10 s: still one per slot.
        run_for(&mut s, 1, t, 10.0);
        run_for(&mut s, 2, t, 10.0);
        let a = runs(&s.decide(t, None));
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|(_, _, backlog)| !backlog), "{a:?}");
    }

    #[test]
    fn short_jobs_get_a_small_backlog_so_workers_never_wait_for_the_master() {
        let mut s = two_workers();
        let t = Instant::now();
        s.add(serial(1));
        s.add(serial(2));
        s.decide(t, None);
        // /bin/true: about 1 ms a job.
        run_for(&mut s, 1, t, 0.001);
        run_for(&mut s, 2, t, 0.001);
        for pk in 3..=1000 {
            s.add(serial(pk));
        }
        let a = runs(&s.decide(t, None));
        let backlog = a.iter().filter(|r| r.2).count();
        // 50 ms of work per slot: 50 jobs each beside the one each starts now.
        assert_eq!(a.len() - backlog, 2);
        assert_eq!(backlog, 100, "{a:?}");
        let per_worker = |w| a.iter().filter(|r| r.1 == w).count();
        assert_eq!(per_worker(0), per_worker(1), "shared evenly");
    }

    #[test]
    fn no_backlog_behind_a_job_running_far_longer_than_usual() {
        let mut s = two_workers();
        let t = Instant::now();
        for pk in [1, 2] {
            s.add(serial(pk));
        }
        s.decide(t, None);
        s.started(1, t);
        s.started(2, t);
        // Short jobs were seen; job 1 on worker 0 runs on and on.
        for i in 0..20 {
            s.add(serial(100 + i));
        }
        run_for(&mut s, 2, t, 0.01);
        let later = t + Duration::from_secs(30);
        for (pk, w, _) in runs(&s.decide(later, None)) {
            assert_eq!(w, 1, "job {pk} queued behind the long job");
        }
    }

    #[test]
    fn the_dynamic_workflow_pattern_its_tasks_never_wait_behind_their_master_job() {
        // A running job (pk 1, on worker 0) adds tasks and waits for them. A task queued on
        // worker 0 while the job there was not yet known to run long is taken back once worker 1
        // has room, and runs there.
        let mut s = two_workers();
        let t0 = Instant::now();
        s.add(serial(1));
        s.add(serial(2));
        s.decide(t0, None);
        s.started(1, t0);
        s.started(2, t0);
        run_for(&mut s, 2, t0, 0.1);
        // 0.1 s jobs observed: task 10 goes to worker 1, task 11 queues on worker 0.
        let t1 = t0 + Duration::from_millis(50);
        s.add(serial(10));
        s.add(serial(11));
        let a = runs(&s.decide(t1, None));
        assert_eq!(a, vec![(10, 1, false), (11, 0, true)]);
        s.started(10, t1);
        run_for(&mut s, 10, t1, 0.1);
        // Job 1 has run three times as long as usual: task 11 would wait behind it.
        let t2 = t0 + Duration::from_millis(300);
        let a = s.decide(t2, None);
        assert_eq!(
            a,
            vec![Action::Reclaim {
                worker: 0,
                pks: vec![11]
            }]
        );
        // Asked once only.
        assert!(s.decide(t2, None).is_empty());
        assert!(s.reclaimed(11));
        assert_eq!(runs(&s.decide(t2, None)), vec![(11, 1, false)]);
        // And no new task queues behind it.
        s.add(serial(12));
        s.add(serial(13));
        let a = runs(&s.decide(t2, None));
        assert!(a.iter().all(|(_, w, _)| *w == 1), "{a:?}");
    }

    #[test]
    fn a_stuck_backlog_is_reclaimed_only_as_far_as_others_have_room() {
        let mut s = Scheduler::new(
            3,
            (0..3)
                .map(|i| WorkerSpec {
                    rank: i + 1,
                    node: i as usize,
                    capacity: packing::NODE,
                })
                .collect(),
            1,
            true,
            false,
        );
        let t = Instant::now();
        for pk in 1..=3 {
            s.add(serial(pk));
        }
        s.decide(t, None);
        for pk in 1..=3 {
            s.started(pk, t);
        }
        run_for(&mut s, 3, t, 0.1);
        // Worker 2 is free: job 10 starts there, 11 and 12 wait on workers 0 and 1.
        for pk in 10..=12 {
            s.add(serial(pk));
        }
        let a = runs(&s.decide(t, None));
        assert_eq!(a, vec![(10, 2, false), (11, 0, true), (12, 1, true)]);
        s.started(10, t);
        run_for(&mut s, 10, t, 0.1);
        // Worker 2 has room for one: one of the jobs stuck behind long runs comes back, not both.
        let later = t + Duration::from_millis(500);
        let a = s.decide(later, None);
        assert_eq!(
            a,
            vec![Action::Reclaim {
                worker: 0,
                pks: vec![11]
            }]
        );
        // While it is on its way back, nothing more.
        assert!(s.decide(later, None).is_empty());
        assert!(s.reclaimed(11));
        assert_eq!(runs(&s.decide(later, None)), vec![(11, 2, false)]);
    }

    #[test]
    fn a_backlog_about_to_start_stays_and_one_that_would_wait_moves() {
        // 1 s jobs, 2 workers: job 4 queued on worker 0 behind job 1, worker 1 free.
        let setup = || {
            let mut s = two_workers();
            let t = Instant::now();
            s.add(serial(1));
            s.add(serial(2));
            s.decide(t, None);
            s.started(1, t);
            s.started(2, t);
            run_for(&mut s, 2, t, 1.0);
            s.add(serial(3));
            s.add(serial(4));
            assert_eq!(runs(&s.decide(t, None)), vec![(3, 1, false), (4, 0, true)]);
            s.started(3, t);
            run_for(&mut s, 3, t, 1.0);
            (s, t)
        };
        // Job 1 ends in about 0.2 s: moving job 4 would gain little.
        let (mut s, t) = setup();
        assert!(s.decide(t + Duration::from_millis(800), None).is_empty());
        // Job 1 ends in about 0.5 s: job 4 moves to the free worker.
        let (mut s, t) = setup();
        let reclaim = vec![Action::Reclaim {
            worker: 0,
            pks: vec![4],
        }];
        assert_eq!(s.decide(t + Duration::from_millis(500), None), reclaim);
        // Job 1 runs on, far past its usual time: job 4 moves too.
        let (mut s, t) = setup();
        assert!(s.decide(t + Duration::from_millis(1500), None).is_empty());
        assert_eq!(s.decide(t + Duration::from_millis(2100), None), reclaim);
    }

    #[test]
    fn nothing_is_reclaimed_while_the_master_has_jobs_to_give() {
        let mut s = two_workers();
        let t = Instant::now();
        s.add(serial(1));
        s.add(serial(2));
        s.decide(t, None);
        run_for(&mut s, 1, t, 0.001);
        run_for(&mut s, 2, t, 0.001);
        for pk in 3..=200 {
            s.add(serial(pk));
        }
        s.decide(t, None);
        let later = t + Duration::from_secs(1);
        assert!(s
            .decide(later, None)
            .iter()
            .all(|a| !matches!(a, Action::Reclaim { .. })));
    }

    #[test]
    fn leases_follow_capacity_and_expected_length() {
        let mut s = two_workers();
        let t = Instant::now();
        // Nothing known: one job per slot (two launchers share four 15 s jobs two and two).
        assert_eq!(s.lease_target(), (2, 0));
        s.add(serial(1));
        s.add(serial(2));
        s.decide(t, None);
        run_for(&mut s, 1, t, 15.0);
        run_for(&mut s, 2, t, 15.0);
        assert_eq!(s.lease_target().0, 2);
        // Short jobs: two seconds of work per slot ahead, up to the bound.
        let mut s = two_workers();
        s.add(serial(1));
        s.decide(t, None);
        run_for(&mut s, 1, t, 0.01);
        assert_eq!(s.lease_target().0, 2 * 201);
        let mut s = two_workers();
        s.add(serial(1));
        s.decide(t, None);
        run_for(&mut s, 1, t, 0.001);
        assert_eq!(s.lease_target().0, MAX_SERIAL_IN_HAND);
        // 1 s jobs: one running and one ahead per slot.
        let mut s = two_workers();
        s.add(serial(1));
        s.decide(t, None);
        run_for(&mut s, 1, t, 1.0005);
        assert_eq!(s.lease_target().0, 2 * 2);
        // Packed jobs count slots by their cost; the total stays bounded.
        let mut s = nodes(1);
        s.add(JobShape {
            cost: packing::cost(4),
            ..serial(1)
        });
        assert_eq!(s.lease_target(), (4, 2));
        s.decide(t, None);
        run_for(&mut s, 1, t, 0.0001);
        assert_eq!(s.lease_target().0, MAX_SERIAL_IN_HAND);
    }

    #[test]
    fn the_fit_rule_rounds_the_time_left_up_to_whole_minutes() {
        let secs = |s: f64| Some(Duration::from_secs_f64(s));
        // --time-limit-minutes 1 and the default 1-minute jobs: they run.
        assert!(fits_time(1, secs(59.9)));
        assert!(fits_time(1, secs(60.0)));
        assert!(!fits_time(2, secs(60.0)));
        assert!(fits_time(2, secs(60.5)));
        assert!(fits_time(0, secs(0.0)));
        assert!(!fits_time(1, secs(0.0)));
        assert!(fits_time(u32::MAX, None));
        assert_eq!(max_wall_minutes(secs(6.0)), Some(1));
        assert_eq!(max_wall_minutes(Some(Duration::MAX)), Some(u32::MAX));
    }

    #[test]
    fn jobs_that_do_not_fit_the_time_left_are_given_back() {
        let mut s = two_workers();
        let t = Instant::now();
        s.add(JobShape {
            wall_time_minutes: 5,
            ..serial(1)
        });
        s.add(serial(2));
        let a = s.decide(t, Some(Duration::from_secs(60)));
        assert_eq!(runs(&a), vec![(2, 0, false)]);
        assert!(a.contains(&Action::Release {
            pks: vec![1],
            why: ReleaseReason::TooLong
        }));
    }

    #[test]
    fn mpi_jobs_take_idle_nodes_largest_first_and_reserve_busy_ones() {
        let mut s = nodes(3);
        let t = Instant::now();
        s.add(serial(1));
        s.decide(t, None);
        s.started(1, t);
        // Worker 0's node is busy. A 2-node job takes the two idle ones; a 3-node job reserves.
        s.add(mpi(10, 2));
        s.add(mpi(11, 3));
        s.add(mpi(12, 5));
        let a = s.decide(t, None);
        assert!(a.contains(&Action::Release {
            pks: vec![12],
            why: ReleaseReason::TooLarge
        }));
        // Largest first: the 3-node job reserves every node (they drain), the 2-node job waits.
        assert!(a.contains(&Action::Reserve {
            pk: 11,
            nodes: vec![1, 2, 0]
        }));
        assert!(!a.iter().any(|x| matches!(x, Action::Launch { .. })));
        // No serial job goes to a reserved node.
        s.add(serial(2));
        assert!(runs(&s.decide(t, None)).is_empty());
        s.finished(1, Some(Duration::from_secs(1)));
        let a = s.decide(t, None);
        assert!(a.contains(&Action::Launch {
            pk: 11,
            nodes: vec![1, 2, 0]
        }));
        s.started(11, t);
        s.finished(11, Some(Duration::from_secs(1)));
        let a = s.decide(t, None);
        assert!(a.contains(&Action::Launch {
            pk: 10,
            nodes: vec![0, 1]
        }));
        assert_eq!(runs(&a), vec![(2, 2, false)]);
    }

    #[test]
    fn dropped_jobs_leave_the_queue_or_are_stopped_where_they_run() {
        let mut s = two_workers();
        let t = Instant::now();
        for pk in 1..=3 {
            s.add(serial(pk));
        }
        s.decide(t, None);
        s.started(1, t);
        assert_eq!(
            s.drop_job(1),
            Dropped::Sent {
                place: Place::Worker(0),
                started: true
            }
        );
        assert_eq!(
            s.drop_job(2),
            Dropped::Sent {
                place: Place::Worker(1),
                started: false
            }
        );
        assert_eq!(s.drop_job(3), Dropped::Queued);
        assert_eq!(s.drop_job(3), Dropped::Unknown);
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn a_worker_that_left_gets_nothing() {
        let mut s = two_workers();
        s.worker_gone(0);
        s.add(serial(1));
        s.add(serial(2));
        assert_eq!(runs(&s.decide(Instant::now(), None)), vec![(1, 1, false)]);
        assert_eq!(s.lease_target().0, 1);
    }
}
