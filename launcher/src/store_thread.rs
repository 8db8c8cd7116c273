//! Rank 0's store thread: the only place the MPI side touches the database.
//!
//! - Leases runnable jobs ahead of demand, in batches, and prepares what running them needs
//!   (argv, environment, working directory) so the MPI loop stays cheap.
//! - Writes state changes in batched transactions: every RUNNING, and every run outcome with the
//!   states that follow it without a script (see [`crate::transitions::after_run`]), go into one
//!   `apply` per flush. This, more than anything, sets the launcher's throughput.
//! - Hands jobs that need scripts after their run to the transition pool, lease kept.
//! - Heartbeats the session; if the session was expired meanwhile, it stops writing at once and
//!   tells the master, which kills everything: the jobs belong to other launchers now.
//! - Polls for jobs users killed (`balsam killjob`) at least once a second, and notes in each
//!   one's history when its process died.
//! - Expires other launchers' dead sessions, so their jobs are run again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balsam_store::{DbDir, Job, LeaseFilter, LeaseGroup, Outcome, State, Store, Transition};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::jobenv::{job_environment, LauncherContext};
use crate::messages::{ExitStatus, JobFinished};
use crate::process;
use crate::transitions::{
    after_run, AppCache, Handover, RunResult, TransitionOptions, TransitionPool,
};

/// How a runnable job is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// On a worker rank, packed with others on its node.
    Serial,
    /// Through the MPI launcher on reserved nodes.
    Mpi,
}

/// A leased runnable job, ready to start.
#[derive(Debug, Clone)]
pub struct Runnable {
    /// The job as leased.
    pub job: Job,
    /// Serial or MPI.
    pub class: Class,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The application's envscript, if any.
    pub envscript: Option<String>,
    /// The job's environment on top of the launcher's.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: PathBuf,
    /// `<name>.out` in it.
    pub output: PathBuf,
}

/// Master → store thread.
#[derive(Debug)]
pub enum ToStore {
    /// These jobs' processes started (pk, where).
    Started(Vec<(i64, String)>),
    /// These jobs ended (or were dropped, or could not start).
    Finished(Vec<JobFinished>),
    /// The launcher will not run these; give them back.
    Release(Vec<i64>),
    /// Jobs the transitions' fast path just made runnable, still leased (from the pool).
    Handover(Vec<Handover>),
    /// The launcher is stopping: lease nothing more, leave timeout handlers to others.
    Draining,
    /// Write everything, stop the transitions, end the session, and exit.
    Finish,
}

/// Store thread → master.
#[derive(Debug)]
pub enum FromStore {
    /// Jobs to run.
    Runnable(Vec<Runnable>),
    /// Jobs users killed: stop their processes, write nothing for them.
    Kill(Vec<i64>),
    /// Jobs whose RUNNING could not be written (a user changed them first): stop them.
    Conflict(Vec<i64>),
    /// Whether work remains for this launcher's filter anywhere, and whether the store thread
    /// or the transitions still have work in hand.
    Status {
        /// `has_work` of the store.
        has_work: bool,
        /// Writes pending or transitions in flight.
        busy: bool,
    },
    /// The session expired: stop everything, write nothing.
    SessionLost,
    /// The session has ended; the thread exits.
    Ended,
}

/// How many runnable jobs the master holds and wants, per class. The master decrements as it
/// starts jobs; the store thread increments as it delivers.
#[derive(Debug, Default)]
pub struct Demand {
    /// Serial jobs delivered and not started.
    pub serial_queued: AtomicUsize,
    /// MPI jobs delivered and not started.
    pub mpi_queued: AtomicUsize,
    /// Serial jobs the master wants in hand.
    pub serial_target: AtomicUsize,
    /// MPI jobs the master wants in hand.
    pub mpi_target: AtomicUsize,
}

impl Demand {
    fn queued(&self, c: Class) -> &AtomicUsize {
        match c {
            Class::Serial => &self.serial_queued,
            Class::Mpi => &self.mpi_queued,
        }
    }
    fn target(&self, c: Class) -> usize {
        match c {
            Class::Serial => self.serial_target.load(Ordering::Relaxed),
            Class::Mpi => self.mpi_target.load(Ordering::Relaxed),
        }
    }
    /// The master took `n` jobs of class `c` out of its queue.
    pub fn taken(&self, c: Class, n: usize) {
        let q = self.queued(c);
        let _ = q.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

/// What the store thread needs.
#[derive(Debug, Clone)]
pub struct StoreThreadConfig {
    /// The database.
    pub db: DbDir,
    /// This launcher's session.
    pub session: i64,
    /// Workflow filter ('' = all).
    pub wf_filter: String,
    /// Lease filters per class (None: the class is not run by this launcher).
    pub serial_filter: Option<LeaseFilter>,
    /// See `serial_filter`.
    pub mpi_filter: Option<LeaseFilter>,
    /// The launcher's time limit, for the wall-time filter.
    pub deadline: Option<Instant>,
    /// Lease expiry (LEASE_EXPIRY_SECONDS): heartbeats come well within it.
    pub lease_expiry: Duration,
    /// Facts for the jobs' environment.
    pub launcher: LauncherContext,
    /// Transition threads.
    pub transition_threads: usize,
    /// Transition options.
    pub transition_opts: TransitionOptions,
}

enum Kind {
    Start,
    After { needs_processing: bool },
    Fail,
}

struct Pending {
    pk: i64,
    ts: Vec<Transition>,
    kind: Kind,
    /// The job, for a run outcome (taken out of `leased`).
    job: Option<Job>,
}

/// Starts the store thread.
/// `own_tx` is the sending side of `rx`: the transition pool hands runnable jobs over through it.
pub fn spawn(
    cfg: StoreThreadConfig,
    demand: Arc<Demand>,
    rx: Receiver<ToStore>,
    own_tx: Sender<ToStore>,
    tx: Sender<FromStore>,
) -> crate::Result<std::thread::JoinHandle<()>> {
    let store = Store::open(cfg.db.clone())?;
    let sink: crate::transitions::RunnableSink = Box::new(move |jobs| {
        let _ = own_tx.send(ToStore::Handover(jobs));
    });
    let pool = TransitionPool::start(
        &cfg.db,
        cfg.session,
        LeaseFilter {
            wf_filter: cfg.wf_filter.clone(),
            ..LeaseFilter::default()
        },
        cfg.transition_threads,
        cfg.transition_opts.clone(),
        Some(sink),
    )?;
    let mut st = StoreThread {
        store,
        cfg,
        demand,
        tx,
        pool: Some(pool),
        leased: HashMap::new(),
        apps: AppCache::default(),
        pending: Vec::new(),
        pending_since: None,
        release: Vec::new(),
        draining: false,
        lost: false,
        told_unreachable: false,
        next_lease: [Instant::now(), Instant::now()],
        lease_pause: [Duration::from_millis(50), Duration::from_millis(50)],
        last_heartbeat: Instant::now(),
        last_kill_poll: Instant::now(),
        last_expire: Instant::now(),
        last_status: Instant::now() - Duration::from_secs(10),
        user_kills: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || st.run(rx))
        .map_err(|e| crate::Error::io("cannot start the store thread", e))
}

struct StoreThread {
    store: Store,
    cfg: StoreThreadConfig,
    demand: Arc<Demand>,
    tx: Sender<FromStore>,
    pool: Option<TransitionPool>,
    leased: HashMap<i64, Job>,
    apps: AppCache,
    pending: Vec<Pending>,
    pending_since: Option<Instant>,
    release: Vec<i64>,
    draining: bool,
    lost: bool,
    /// The master was told the database cannot be reached (until a status says otherwise).
    told_unreachable: bool,
    next_lease: [Instant; 2],
    lease_pause: [Duration; 2],
    last_heartbeat: Instant,
    last_kill_poll: Instant,
    last_expire: Instant,
    last_status: Instant,
    /// Jobs users killed, with when the kill was seen: the end of their process is noted.
    user_kills: HashMap<i64, Instant>,
}

/// How much lower than the job-running threads the store thread runs.
pub const BOOKKEEPING_NICE: i32 = 10;

/// Flush pending writes when this many transitions wait...
const FLUSH_COUNT: usize = 2000;
/// ... or the oldest waited this long.
const FLUSH_AGE: Duration = Duration::from_millis(25);

impl StoreThread {
    fn run(&mut self, rx: Receiver<ToStore>) {
        process::lower_thread_priority(BOOKKEEPING_NICE);
        let mut finish = false;
        loop {
            let tick = if self.pending.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(5)
            };
            match rx.recv_timeout(tick) {
                Ok(m) => finish |= self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => finish = true,
            }
            while let Ok(m) = rx.try_recv() {
                finish |= self.handle(m);
            }
            let count: usize = self.pending.iter().map(|p| p.ts.len()).sum();
            let old = self.pending_since.is_some_and(|t| t.elapsed() >= FLUSH_AGE);
            if finish
                || count >= FLUSH_COUNT
                || old
                || (!self.release.is_empty() && self.pending.is_empty())
            {
                self.flush();
            }
            if finish {
                self.finish();
                return;
            }
            if self.lost {
                continue;
            }
            self.periodic();
            if !self.draining {
                self.lease(Class::Serial);
                self.lease(Class::Mpi);
            }
        }
    }

    /// Returns true on Finish.
    fn handle(&mut self, m: ToStore) -> bool {
        match m {
            ToStore::Started(v) => {
                for (pk, place) in v {
                    let Some(job) = self.leased.get(&pk) else {
                        continue;
                    };
                    let t = Transition::new(pk, job.state, State::Running, place);
                    self.push(Pending {
                        pk,
                        ts: vec![t],
                        kind: Kind::Start,
                        job: None,
                    });
                }
            }
            ToStore::Finished(v) => {
                for f in v {
                    self.finished(f);
                }
            }
            ToStore::Release(pks) => {
                for pk in pks {
                    self.leased.remove(&pk);
                    self.release.push(pk);
                }
            }
            ToStore::Handover(jobs) => {
                // Jobs are becoming runnable: lease again without waiting out the pause.
                self.next_lease = [Instant::now(), Instant::now()];
                self.lease_pause = [Duration::from_millis(20), Duration::from_millis(20)];
                self.handover(jobs)
            }
            ToStore::Draining => self.draining = true,
            ToStore::Finish => return true,
        }
        false
    }

    /// Takes over jobs the fast path made runnable, if this launcher can and wants to run them.
    fn handover(&mut self, jobs: Vec<Handover>) {
        let mut ready: [Vec<Runnable>; 2] = [Vec::new(), Vec::new()];
        for h in jobs {
            let class = self.classify(&h.job).filter(|c| {
                let queued =
                    self.demand.queued(*c).load(Ordering::Acquire) + ready[*c as usize].len();
                !self.draining && !self.lost && queued < self.demand.target(*c) * 2
            });
            let Some(class) = class else {
                self.release.push(h.job.pk);
                continue;
            };
            match self.prepare(&h.job, class, h.parent_ids) {
                Ok(r) => {
                    self.leased.insert(h.job.pk, h.job);
                    ready[class as usize].push(r);
                }
                Err(e) => self.cannot_start(&h.job, e),
            }
        }
        for (c, jobs) in [
            (Class::Serial, std::mem::take(&mut ready[0])),
            (Class::Mpi, std::mem::take(&mut ready[1])),
        ] {
            if !jobs.is_empty() {
                self.demand
                    .queued(c)
                    .fetch_add(jobs.len(), Ordering::AcqRel);
                let _ = self.tx.send(FromStore::Runnable(jobs));
            }
        }
    }

    /// The class a job would be leased as, if this launcher runs it at all.
    fn classify(&self, job: &Job) -> Option<Class> {
        let wall_ok = self.cfg.deadline.is_none_or(|d| {
            u64::from(job.spec.wall_time_minutes) * 60
                <= d.saturating_duration_since(Instant::now()).as_secs()
        });
        let fits = |f: &LeaseFilter| {
            (!f.serial_only || job.is_serial())
                && (!f.mpi_only || !job.is_serial())
                && f.max_nodes
                    .is_none_or(|n| job.spec.num_nodes + job.spec.coschedule_num_nodes <= n)
        };
        if !wall_ok {
            return None;
        }
        if self.cfg.serial_filter.as_ref().is_some_and(fits) {
            return Some(Class::Serial);
        }
        if self.cfg.mpi_filter.as_ref().is_some_and(fits) {
            return Some(Class::Mpi);
        }
        None
    }

    fn cannot_start(&mut self, job: &Job, e: crate::Error) {
        if matches!(&e, crate::Error::Store(s) if self.unreachable(s)) {
            // Not the job's fault: given back, to be leased again.
            self.release.push(job.pk);
            return;
        }
        tracing::warn!("{}: cannot be started: {e}", job.cute_id());
        let t = Transition::new(
            job.pk,
            job.state,
            State::Failed,
            format!("cannot be started: {e}"),
        );
        self.push(Pending {
            pk: job.pk,
            ts: vec![t],
            kind: Kind::Fail,
            job: None,
        });
    }

    fn push(&mut self, p: Pending) {
        if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.push(p);
    }

    fn finished(&mut self, f: JobFinished) {
        let pk = f.pk;
        if let Some(seen) = self.user_kills.remove(&pk) {
            if f.started {
                self.note_death(&f, seen);
            }
        }
        if !f.started && f.killed.is_some() {
            // Dropped from a worker's queue before it started: nothing happened to it.
            self.leased.remove(&pk);
            self.release.push(pk);
            return;
        }
        let Some(job) = self.leased.remove(&pk) else {
            return;
        };
        let app = self.apps.get(&mut self.store, &job.spec.application).ok();
        let run = RunResult {
            status: &f.status,
            killed: f.killed,
            tail: &f.tail,
            elapsed: Duration::from_millis(f.elapsed_ms),
        };
        let mut plan = after_run(&job, app.as_deref(), &run, self.draining);
        if plan.transitions.is_empty() {
            // Killed by its user or a lost session: no writes, only the lease goes back.
            self.release.push(pk);
            return;
        }
        if !f.started {
            // It never ran (missing executable...): RUNNING first, as the state machine wants.
            let why = match &f.status {
                ExitStatus::NotStarted(w) => format!("starting: {w}"),
                _ => String::new(),
            };
            plan.transitions
                .insert(0, Transition::new(pk, job.state, State::Running, why));
        }
        let kind = Kind::After {
            needs_processing: plan.needs_processing,
        };
        self.push(Pending {
            pk,
            ts: plan.transitions,
            kind,
            job: Some(job),
        });
    }

    fn flush(&mut self) {
        if self.lost {
            self.pending.clear();
            self.release.clear();
            self.pending_since = None;
            return;
        }
        if !self.pending.is_empty() {
            let ts: Vec<Transition> = self
                .pending
                .iter()
                .flat_map(|p| p.ts.iter().cloned())
                .collect();
            match self.store.apply(&ts, Some(self.cfg.session)) {
                Ok(outcomes) => self.settle(outcomes),
                Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
                Err(e) => {
                    // Kept for the next flush; a database that stays broken ends in the
                    // session expiring, which is safe.
                    if !self.unreachable(&e) {
                        tracing::error!("writing {} state changes failed: {e}; retrying", ts.len());
                    }
                    self.pending_since = Some(Instant::now());
                    return;
                }
            }
        }
        if !self.release.is_empty() {
            let pks = std::mem::take(&mut self.release);
            if let Err(e) = self.store.release(self.cfg.session, &pks) {
                if !self.unreachable(&e) {
                    tracing::warn!("releasing {} jobs failed: {e}", pks.len());
                }
            }
        }
    }

    fn settle(&mut self, outcomes: Vec<Outcome>) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        let mut i = 0;
        let mut conflicts = Vec::new();
        let mut ended = false;
        for p in pending {
            let outs = &outcomes[i..i + p.ts.len()];
            i += p.ts.len();
            let conflict = outs.iter().find_map(|o| match o {
                Outcome::Conflict(s) => Some(*s),
                _ => None,
            });
            let last = match outs.last() {
                Some(Outcome::Applied(s)) => Some(*s),
                _ => None,
            };
            match p.kind {
                Kind::Start => {
                    if let Some(actual) = conflict {
                        tracing::info!(
                            "job #{}: is {actual}, not runnable any more; stopping it",
                            p.pk
                        );
                        conflicts.push(p.pk);
                    } else if let Some(j) = self.leased.get_mut(&p.pk) {
                        j.state = State::Running;
                    }
                }
                Kind::After { needs_processing } => {
                    let final_state = conflict.or(last);
                    ended |= final_state.is_some_and(|s| s.is_end());
                    match (p.job, conflict, last) {
                        (Some(mut job), None, Some(s)) if needs_processing && !s.is_end() => {
                            job.state = s;
                            if let Some(pool) = &self.pool {
                                pool.handoff(job);
                            }
                        }
                        // An end state reached by this write released the lease already.
                        (_, None, Some(s)) if s.is_end() => {}
                        _ => self.release.push(p.pk),
                    }
                }
                Kind::Fail => {
                    self.leased.remove(&p.pk);
                    self.release.push(p.pk);
                }
            }
        }
        if !conflicts.is_empty() {
            let _ = self.tx.send(FromStore::Conflict(conflicts));
        }
        if ended {
            // Finished parents may have made children ready.
            if let Some(pool) = &self.pool {
                pool.wake();
            }
        }
    }

    fn periodic(&mut self) {
        let hb =
            (self.cfg.lease_expiry / 4).clamp(Duration::from_millis(500), Duration::from_secs(10));
        if self.last_heartbeat.elapsed() >= hb {
            self.last_heartbeat = Instant::now();
            match self.store.heartbeat(self.cfg.session) {
                Ok(()) => {}
                Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
                Err(e) => {
                    if !self.unreachable(&e) {
                        tracing::warn!("heartbeat failed: {e}")
                    }
                }
            }
        }
        if self.last_kill_poll.elapsed() >= Duration::from_millis(400) {
            self.last_kill_poll = Instant::now();
            match self.store.killed_jobs(self.cfg.session) {
                Ok(pks) if !pks.is_empty() => {
                    for pk in &pks {
                        self.leased.remove(pk);
                        self.user_kills.insert(*pk, Instant::now());
                    }
                    tracing::info!("{} jobs killed by their users", pks.len());
                    self.release.extend(pks.iter().copied());
                    let _ = self.tx.send(FromStore::Kill(pks));
                }
                Ok(_) => {}
                Err(e) => {
                    if !self.unreachable(&e) {
                        tracing::warn!("polling for killed jobs failed: {e}")
                    }
                }
            }
        }
        let every = self
            .cfg
            .lease_expiry
            .clamp(Duration::from_secs(2), Duration::from_secs(30));
        if self.last_expire.elapsed() >= every {
            self.last_expire = Instant::now();
            match self.store.expire_sessions(self.cfg.lease_expiry) {
                Ok(expired) => {
                    for e in expired {
                        tracing::warn!(
                            "expired silent session {} ({}:{}): {} running jobs to RESTART_READY, {} released",
                            e.session.id, e.session.host, e.session.pid, e.restarted, e.released
                        );
                    }
                }
                Err(e) => {
                    if !self.unreachable(&e) {
                        tracing::warn!("expiring sessions failed: {e}")
                    }
                }
            }
        }
        if self.last_status.elapsed() >= Duration::from_millis(500) {
            self.last_status = Instant::now();
            let (has_work, unreachable) = match self.store.has_work(&self.cfg.wf_filter) {
                Ok(w) => {
                    self.told_unreachable = false;
                    (w, false)
                }
                Err(e) => (true, self.unreachable(&e)),
            };
            let busy = unreachable
                || !self.pending.is_empty()
                || self.pool.as_ref().is_some_and(|p| p.in_flight() > 0);
            let _ = self.tx.send(FromStore::Status { has_work, busy });
        }
    }

    fn lease(&mut self, class: Class) {
        let filter = match class {
            Class::Serial => self.cfg.serial_filter.clone(),
            Class::Mpi => self.cfg.mpi_filter.clone(),
        };
        let Some(mut filter) = filter else { return };
        let i = class as usize;
        let target = self.demand.target(class);
        let queued = self.demand.queued(class).load(Ordering::Acquire);
        if target == 0 || queued > target / 2 || Instant::now() < self.next_lease[i] {
            return;
        }
        if let Some(d) = self.cfg.deadline {
            let left = d.saturating_duration_since(Instant::now());
            filter.max_wall_minutes = Some((left.as_secs() / 60) as u32);
        }
        let jobs = match self.store.lease(
            self.cfg.session,
            LeaseGroup::Runnable,
            &filter,
            target - queued,
        ) {
            Ok(j) => j,
            Err(balsam_store::Error::SessionEnded(_)) => return self.session_lost(),
            Err(e) => {
                if !self.unreachable(&e) {
                    tracing::warn!("leasing runnable jobs failed: {e}");
                }
                Vec::new()
            }
        };
        if jobs.is_empty() {
            self.next_lease[i] = Instant::now() + self.lease_pause[i];
            self.lease_pause[i] = (self.lease_pause[i] * 2).min(Duration::from_millis(250));
            return;
        }
        self.lease_pause[i] = Duration::from_millis(50);
        let mut ready = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.prepare(&job, class, None) {
                Ok(r) => {
                    self.leased.insert(job.pk, job);
                    ready.push(r);
                }
                Err(e) => self.cannot_start(&job, e),
            }
        }
        if !ready.is_empty() {
            self.demand
                .queued(class)
                .fetch_add(ready.len(), Ordering::AcqRel);
            let _ = self.tx.send(FromStore::Runnable(ready));
        }
    }

    fn prepare(
        &mut self,
        job: &Job,
        class: Class,
        parents: Option<Vec<balsam_store::Uuid>>,
    ) -> crate::Result<Runnable> {
        let app = self.apps.get(&mut self.store, &job.spec.application)?;
        let argv = process::command_argv(&app.executable, &job.spec.args)?;
        let parents = match parents {
            Some(p) => p,
            None => self.store.parent_ids(job.pk)?,
        };
        let env = job_environment(job, &parents, &self.cfg.db.root, Some(&self.cfg.launcher));
        let workdir = job.workdir(&self.cfg.db.root);
        let out_name: String = job
            .spec
            .name
            .chars()
            .map(|c| if c == '/' || c == '\0' { '_' } else { c })
            .collect();
        let output = workdir.join(format!("{out_name}.out"));
        let envscript = Some(app.envscript.trim().to_string()).filter(|s| !s.is_empty());
        Ok(Runnable {
            job: job.clone(),
            class,
            argv,
            envscript,
            env,
            workdir,
            output,
        })
    }

    /// Whether `e` says the database cannot be reached (the store itself says so once, and
    /// once when it is back). The first time, the master hears at once that this thread is
    /// busy: while nobody knows what work remains, an outage is no idle time to exit on,
    /// however long this thread's calls wait for the server.
    fn unreachable(&mut self, e: &balsam_store::Error) -> bool {
        if !e.is_unavailable() {
            return false;
        }
        if !self.told_unreachable {
            self.told_unreachable = true;
            let _ = self.tx.send(FromStore::Status {
                has_work: true,
                busy: true,
            });
        }
        true
    }

    /// Notes in a killed job's history when, and how, its process ended (the event's time is
    /// the time of death, to the few milliseconds a report takes).
    fn note_death(&mut self, f: &JobFinished, seen: Instant) {
        // The pid is in the job's RUNNING event ("..., pid 1234, ...").
        let pid = self.store.history(f.pk).ok().and_then(|h| {
            h.iter()
                .rev()
                .find(|e| e.to_state == State::Running)
                .and_then(|e| pid_in(&e.message))
        });
        let what = pid.map_or_else(|| "its process".to_string(), |p| format!("process {p}"));
        let msg = format!(
            "{what} ended ({}) {:.2} s after the kill was seen",
            f.status.describe(),
            seen.elapsed().as_secs_f64()
        );
        if let Err(e) = self.store.note(f.pk, Some(self.cfg.session), &msg) {
            tracing::warn!("job #{}: cannot note the end of its process: {e}", f.pk);
        }
    }

    fn session_lost(&mut self) {
        if !self.lost {
            tracing::error!(
                "launcher session {} expired (no heartbeat for {} s?); its jobs belong to other launchers now",
                self.cfg.session,
                self.cfg.lease_expiry.as_secs()
            );
            self.lost = true;
            self.pending.clear();
            self.release.clear();
            let _ = self.tx.send(FromStore::SessionLost);
        }
    }

    fn finish(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.stop(Duration::from_secs(10));
        }
        if !self.lost {
            match self.store.end_session(self.cfg.session) {
                Ok((restarted, released)) => tracing::info!(
                    "session {} ended ({restarted} running jobs to RESTART_READY, {released} leases released)",
                    self.cfg.session
                ),
                Err(e) => tracing::error!("ending session {}: {e}", self.cfg.session),
            }
        }
        let _ = self.tx.send(FromStore::Ended);
    }
}

/// The number after "pid " in a RUNNING event's message.
fn pid_in(message: &str) -> Option<u32> {
    let rest = &message[message.find("pid ")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_read_from_the_running_event() {
        assert_eq!(pid_in("on nid0001 (rank 1, pid 4242, slot 0)"), Some(4242));
        assert_eq!(pid_in("MPI launch, pid 17"), Some(17));
        assert_eq!(pid_in("starting: nothing"), None);
    }
}
