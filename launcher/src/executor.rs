//! Runs jobs' processes and watches them, with everything they start.
//!
//! Two halves:
//! - The [`Engine`] runs inside a rank's process nursery ([`crate::nursery`]), the one process
//!   that is the parent of the rank's jobs. It queues jobs, starts each when its node has room
//!   (packing units, see [`crate::packing`]), kills on request (SIGTERM to the job's group, a
//!   grace period, SIGKILL) or past the job's wall time, and records what happened. A job's whole
//!   process tree lives and dies with the job: when its main process ends, what is left of its
//!   process group is killed before the main process is reaped, and, the nursery being a child
//!   subreaper, every process that leaves the job's group and is orphaned comes back to it,
//!   where it is found, attributed to its job and killed when that job ends (see
//!   [`Engine::reap`]). The engine starts the next job the moment one ends, in the process that
//!   reaped it: no round trip per job.
//! - The [`Executor`] is a rank's handle on a nursery from a thread of its own, driven through a
//!   channel; rank 0 runs its MPI jobs (the `mpiexec`/`aprun`/`srun` processes) with one, and
//!   serial jobs on its own node with another. Worker ranks drive their nursery from their MPI
//!   loop directly ([`crate::nursery::Nursery`]), without the thread.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::io::RawFd;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde::{Deserialize, Serialize};

use crate::messages::{ExitStatus, JobFinished, JobStarted, KillReason, RunJob};
use crate::nursery::Nursery;
use crate::process::{self, ChildList, Spawner};

/// How an engine behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutorConfig {
    /// Room on the node, in packing units (u64::MAX: no limit, the owner decides).
    pub capacity: u64,
    /// GPUs per node for `CUDA_VISIBLE_DEVICES` (0: leave it alone).
    pub gpus_per_node: u32,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// The environment every job starts from (MPI variables scrubbed).
    pub base_env: Vec<(OsString, OsString)>,
}

/// What happened to a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// Its process started.
    Started(JobStarted),
    /// It ended, could not start, or was dropped.
    Finished(JobFinished),
}

struct Running {
    job: RunJob,
    pid: u32,
    slot: u32,
    start: Instant,
    wall_deadline: Option<Instant>,
    kill: Option<(KillReason, Instant, bool)>,
    /// `BALSAM_JOB_ID=...` as the job's environment has it: how an orphan that left the job's
    /// session (a `setsid` daemon) is recognised as the job's while the job runs.
    marker: Option<Vec<u8>>,
}

/// The environment variable that names a job in every process it starts (see
/// [`crate::jobenv`]).
const JOB_MARKER: &str = "BALSAM_JOB_ID";

/// How soon to look again for orphans after killing some (their children are reparented to the
/// nursery as they die, and are then killed in turn).
const RESWEEP: Duration = Duration::from_millis(100);

/// The single-threaded process engine of a nursery. It reaps every child of its process
/// (`waitid(P_ALL)`), so it must be the only thing in its process that starts processes.
pub struct Engine {
    cfg: ExecutorConfig,
    queue: VecDeque<RunJob>,
    running: HashMap<u32, Running>,
    by_pk: HashMap<i64, u32>,
    used: u64,
    slots: BTreeSet<u32>,
    spawner: Spawner,
    events: Vec<Event>,
    children: ChildList,
    /// Scratch list of children.
    kids: Vec<u32>,
    /// Children that are not a job's main process (orphans of jobs), with the job (its main
    /// pid) each belongs to, or None once killed.
    orphans: HashMap<u32, Option<u32>>,
    /// A child ended: look for orphans of jobs that ended.
    sweep_due: bool,
    /// Look again then (orphans were killed; their children come next).
    resweep_at: Option<Instant>,
}

impl Engine {
    /// A new engine with nothing to run.
    pub fn new(cfg: ExecutorConfig) -> Engine {
        let spawner = Spawner::new(&cfg.base_env);
        Engine {
            cfg,
            queue: VecDeque::new(),
            running: HashMap::new(),
            by_pk: HashMap::new(),
            used: 0,
            slots: BTreeSet::new(),
            spawner,
            events: Vec::new(),
            children: ChildList::open(),
            kids: Vec::new(),
            orphans: HashMap::new(),
            sweep_due: false,
            resweep_at: None,
        }
    }

    /// Queues a job; it starts when it fits (at the latest in the next [`Engine::tick`]).
    pub fn submit(&mut self, job: RunJob) {
        self.queue.push_back(job);
    }

    /// Jobs queued and not started.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Jobs whose process runs.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// Takes the events recorded so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are waiting to be taken.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Stops a job: a queued one is dropped, a running one gets SIGTERM, then SIGKILL after the
    /// grace. Either way a finished event says why.
    pub fn kill(&mut self, pk: i64, reason: KillReason) {
        if let Some(i) = self.queue.iter().position(|j| j.pk == pk) {
            let job = self.queue.remove(i).expect("index in range");
            self.events.push(Event::Finished(JobFinished {
                pk: job.pk,
                status: ExitStatus::NotStarted("dropped before it started".into()),
                tail: String::new(),
                elapsed_ms: 0,
                killed: Some(reason),
                started: false,
            }));
            return;
        }
        let Some(pid) = self.by_pk.get(&pk).copied() else {
            return;
        };
        let grace = self.cfg.kill_grace;
        if let Some(r) = self.running.get_mut(&pid) {
            if r.kill.is_none() {
                tracing::info!("{}: killing pid {pid} ({reason:?})", r.job.cute_id);
                r.kill = Some((reason, Instant::now() + grace, false));
                process::signal_group(pid, libc::SIGTERM);
            }
        }
    }

    /// Gives a job back if it has not started: it is dropped from the queue and reported
    /// finished, not started, with [`KillReason::Reclaimed`]. A running job is left alone.
    pub fn reclaim(&mut self, pk: i64) {
        if self.queue.iter().any(|j| j.pk == pk) {
            self.kill(pk, KillReason::Reclaimed);
        }
    }

    /// Stops every job, queued or running.
    pub fn kill_all(&mut self, reason: KillReason) {
        let pks: Vec<i64> = self
            .queue
            .iter()
            .map(|j| j.pk)
            .chain(self.by_pk.keys().copied())
            .collect();
        for pk in pks {
            self.kill(pk, reason);
        }
    }

    /// Reaps every child that ended: a job's main process (its outcome is recorded, and what is
    /// left of its process group is killed first, while the zombie still holds the group's id so
    /// that it cannot name another group), or an orphan. Call it when SIGCHLD arrives.
    pub fn reap(&mut self) {
        loop {
            // SAFETY: waitid(2) with a valid siginfo; WNOWAIT leaves the child to reap below.
            let pid = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let r = libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                );
                if r != 0 {
                    break;
                }
                info.si_pid()
            };
            if pid <= 0 {
                break;
            }
            let pid = pid as u32;
            let is_job = self.running.contains_key(&pid);
            if is_job {
                process::signal_group(pid, libc::SIGKILL);
            }
            let mut status: libc::c_int = 0;
            // SAFETY: reaps the child waitid just reported as ended.
            let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
            if r != pid as libc::pid_t {
                break;
            }
            if is_job {
                self.exited(pid, std::process::ExitStatus::from_raw(status));
            } else {
                self.orphans.remove(&pid);
            }
            self.sweep_due = true;
        }
    }

    /// Kills what past kills and wall times call for, looks for orphans when due, and starts
    /// what fits.
    pub fn tick(&mut self) {
        self.check_deadlines();
        if self.sweep_due || self.resweep_at.is_some_and(|t| t <= Instant::now()) {
            self.sweep();
        }
        self.start_queued();
    }

    /// Every child that is not a running job's main process is an orphan of a job (the nursery
    /// starts nothing else): kept while its job runs, killed with its process group otherwise.
    /// An orphan belongs to the running job whose session or process group it is in, or, having
    /// left both (`setsid`), whose `BALSAM_JOB_ID` its environment carries.
    fn sweep(&mut self) {
        self.sweep_due = false;
        self.resweep_at = None;
        self.children.read(&mut self.kids);
        let mut killed = false;
        for i in 0..self.kids.len() {
            let c = self.kids[i];
            if self.running.contains_key(&c) {
                continue;
            }
            if let Some(Some(owner)) = self.orphans.get(&c) {
                if self.running.contains_key(owner) {
                    continue;
                }
            }
            let ids = process::group_and_session(c);
            match ids.and_then(|(pgrp, sid)| self.owner_of(c, pgrp, sid)) {
                Some(owner) => {
                    self.orphans.insert(c, Some(owner));
                }
                None => {
                    if let Some((pgrp, _)) = ids {
                        // An orphan of a job leads a group of the job's own making, or is in
                        // one: never the nursery's.
                        if pgrp > 1 && pgrp != std::process::id() {
                            // SAFETY: kill(2) of a process group made inside a job.
                            unsafe { libc::kill(-(pgrp as libc::pid_t), libc::SIGKILL) };
                        }
                    }
                    // SAFETY: kill(2) of our own child.
                    unsafe { libc::kill(c as libc::pid_t, libc::SIGKILL) };
                    if self.orphans.insert(c, None).is_none() {
                        tracing::info!("killed pid {c}, left behind by a job that ended");
                    }
                    killed = true;
                }
            }
        }
        if killed {
            self.resweep_at = Some(Instant::now() + RESWEEP);
        }
    }

    /// The running job (its main pid) an orphan belongs to.
    fn owner_of(&self, pid: u32, pgrp: u32, sid: u32) -> Option<u32> {
        if self.running.contains_key(&sid) {
            return Some(sid);
        }
        if self.running.contains_key(&pgrp) {
            return Some(pgrp);
        }
        self.running
            .values()
            .filter_map(|r| r.marker.as_deref().map(|m| (r.pid, m)))
            .find(|(_, m)| process::environment_has(pid, m))
            .map(|(owner, _)| owner)
    }

    /// Kills every process of this nursery, jobs and orphans, and reaps them, for at most
    /// `limit`: the rank is gone, nobody will hear about them.
    pub fn teardown(&mut self, limit: Duration) {
        for pid in self.running.keys() {
            process::signal_group(*pid, libc::SIGKILL);
        }
        if !self.running.is_empty() {
            tracing::warn!("killed {} running jobs", self.running.len());
        }
        self.running.clear();
        process::kill_and_reap_all_children(limit);
    }

    fn start_queued(&mut self) {
        let mut i = 0;
        // First fit: a job that does not fit now does not hold back a smaller one behind it.
        while i < self.queue.len() && i < 64 {
            let cost = self.queue[i].cost.min(self.cfg.capacity);
            if self.used.saturating_add(cost) <= self.cfg.capacity {
                let job = self.queue.remove(i).expect("index in range");
                self.start(job, cost);
            } else {
                i += 1;
            }
        }
    }

    fn start(&mut self, job: RunJob, cost: u64) {
        let slot = (0..).find(|s| !self.slots.contains(s)).unwrap_or(0);
        let wrapped;
        let argv: &[String] = match &job.envscript {
            Some(_) => {
                wrapped = process::with_envscript(job.argv.clone(), job.envscript.as_deref());
                &wrapped
            }
            None => &job.argv,
        };
        let gpu;
        let env: &[(String, String)] = if self.cfg.gpus_per_node > 0 {
            let mut e = job.env.clone();
            e.push((
                "CUDA_VISIBLE_DEVICES".into(),
                (slot % self.cfg.gpus_per_node).to_string(),
            ));
            gpu = e;
            &gpu
        } else {
            &job.env
        };
        let mut spawned = self.spawner.spawn(argv, &job.workdir, &job.output, env);
        if spawned.as_ref().is_err_and(|e| e.infrastructure) && !job.workdir.is_dir() {
            // The working directory is gone (a user removed it, or a job restarted after its
            // files were cleaned up): it is the job's place to run, so it is made again. Should
            // that fail too (a full or read-only file system), the first error stands.
            if std::fs::create_dir_all(&job.workdir).is_ok() {
                tracing::warn!(
                    "{}: its working directory {} was missing; made it again",
                    job.cute_id,
                    job.workdir.display()
                );
                spawned = self.spawner.spawn(argv, &job.workdir, &job.output, env);
            }
        }
        match spawned {
            Ok(pid) => {
                let now = Instant::now();
                let wall_deadline = job.wall_time_limit_s.map(|s| now + Duration::from_secs(s));
                let marker = job
                    .env
                    .iter()
                    .find(|(k, _)| k == JOB_MARKER)
                    .map(|(k, v)| format!("{k}={v}").into_bytes());
                self.used += cost;
                self.slots.insert(slot);
                self.by_pk.insert(job.pk, pid);
                self.events.push(Event::Started(JobStarted {
                    pk: job.pk,
                    pid,
                    slot,
                }));
                self.running.insert(
                    pid,
                    Running {
                        job,
                        pid,
                        slot,
                        start: now,
                        wall_deadline,
                        kill: None,
                        marker,
                    },
                );
            }
            Err(e) => {
                tracing::warn!("{}: {e}", job.cute_id);
                self.events.push(Event::Finished(JobFinished {
                    pk: job.pk,
                    status: e.into_status(),
                    tail: String::new(),
                    elapsed_ms: 0,
                    killed: None,
                    started: false,
                }));
            }
        }
    }

    fn exited(&mut self, pid: u32, st: std::process::ExitStatus) {
        let Some(r) = self.running.remove(&pid) else {
            return;
        };
        self.by_pk.remove(&r.job.pk);
        self.slots.remove(&r.slot);
        self.used = self.used.saturating_sub(r.job.cost.min(self.cfg.capacity));
        let status = process::exit_status(st);
        let killed = r.kill.map(|(reason, _, _)| reason);
        // A process that ended by itself with exit 0 before the kill took effect keeps its
        // outcome; otherwise the kill is what ended it.
        let killed = match (killed, &status) {
            (Some(_), ExitStatus::Code(0)) => None,
            (k, _) => k,
        };
        if let Some(reason) = killed {
            tracing::info!(
                "{}: pid {pid} ended ({}) {:.2} s after the kill ({reason:?})",
                r.job.cute_id,
                status.describe(),
                r.kill
                    .map(|(_, escalate, _)| {
                        (Instant::now() + self.cfg.kill_grace).saturating_duration_since(escalate)
                    })
                    .unwrap_or_default()
                    .as_secs_f64()
            );
        }
        let tail = if status.success() {
            String::new()
        } else {
            let mut t = process::tail_lines(&r.job.output, 16);
            if t.len() > 4096 {
                let cut = (t.len() - 4096..t.len())
                    .find(|i| t.is_char_boundary(*i))
                    .unwrap_or(t.len());
                t = t[cut..].to_string();
            }
            t
        };
        self.events.push(Event::Finished(JobFinished {
            pk: r.job.pk,
            status,
            tail,
            elapsed_ms: r.start.elapsed().as_millis() as u64,
            killed,
            started: true,
        }));
    }

    /// The next kill escalation, wall-time limit or look for orphans.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.running
            .values()
            .filter_map(|r| match r.kill {
                Some((_, t, false)) => Some(t),
                Some((_, _, true)) => None,
                None => r.wall_deadline,
            })
            .chain(self.resweep_at)
            .min()
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let grace = self.cfg.kill_grace;
        for r in self.running.values_mut() {
            match &mut r.kill {
                Some((_, t, sent)) if !*sent && *t <= now => {
                    tracing::warn!(
                        "{}: pid {} still alive after SIGTERM; SIGKILL",
                        r.job.cute_id,
                        r.pid
                    );
                    process::signal_group(r.pid, libc::SIGKILL);
                    *sent = true;
                }
                None if r.wall_deadline.is_some_and(|d| d <= now) => {
                    tracing::info!(
                        "{}: past its wall time; killing pid {}",
                        r.job.cute_id,
                        r.pid
                    );
                    r.kill = Some((KillReason::WallTime, now + grace, false));
                    process::signal_group(r.pid, libc::SIGTERM);
                }
                _ => {}
            }
        }
    }
}

/// A request to a threaded [`Executor`].
#[derive(Debug, Clone)]
pub enum Request {
    /// Queue a job; it starts when it fits.
    Run(RunJob),
    /// Stop these jobs (queued ones are dropped).
    Kill(Vec<i64>, KillReason),
    /// Stop every job, queued or running.
    KillAll(KillReason),
    /// Give back these jobs if they have not started ([`Engine::reclaim`]).
    Reclaim(Vec<i64>),
}

/// A process nursery driven from a thread of its own through a channel; every event is
/// delivered at once. Rank 0 runs its MPI jobs with one.
pub struct Executor {
    tx: Option<Sender<Request>>,
    bell: Arc<Bell>,
    /// Events, in the order they happened.
    pub events: Receiver<Event>,
    handle: Option<JoinHandle<()>>,
}

impl Executor {
    /// Starts a nursery (from the calling thread: it is the nursery's parent, whose end the
    /// nursery watches, so call it from a thread that lives as long as the rank) and the thread
    /// that drives it.
    pub fn start(cfg: ExecutorConfig) -> crate::Result<Executor> {
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        Executor::with_sink(cfg, ev_rx, move |e| {
            let _ = ev_tx.send(e);
        })
    }

    /// Like [`Executor::start`], handing every event to `sink` (on the executor's thread);
    /// `events` is what [`Executor::events`] will be.
    pub(crate) fn with_sink(
        cfg: ExecutorConfig,
        events: Receiver<Event>,
        sink: impl FnMut(Event) + Send + 'static,
    ) -> crate::Result<Executor> {
        let (tx, rx) = crossbeam_channel::unbounded::<Request>();
        let nursery = Nursery::start(&cfg)?;
        let bell = Arc::new(Bell::new());
        let b = bell.clone();
        let handle = std::thread::Builder::new()
            .name("executor".into())
            .spawn(move || drive(nursery, rx, b, sink))
            .map_err(|e| crate::Error::io("cannot start the executor thread", e))?;
        Ok(Executor {
            tx: Some(tx),
            bell,
            events,
            handle: Some(handle),
        })
    }

    /// Sends a request.
    pub fn send(&self, req: Request) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(req);
            self.bell.ring();
        }
    }
}

fn drive(
    mut nursery: Nursery,
    rx: Receiver<Request>,
    bell: Arc<Bell>,
    mut sink: impl FnMut(Event),
) {
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Request::Run(job)) => nursery.submit(job),
                Ok(Request::Kill(pks, reason)) => nursery.kill(pks, reason),
                Ok(Request::KillAll(reason)) => nursery.kill_all(reason),
                Ok(Request::Reclaim(pks)) => nursery.reclaim(pks),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        for e in nursery.take_events() {
            sink(e);
        }
        if !open && nursery.is_idle() {
            // Dropping the nursery ends it, and waits for that.
            return;
        }
        if nursery.wait(Duration::from_secs(3600), Some(bell.0)) {
            bell.clear();
        }
        if nursery.is_lost() {
            crate::nursery::fatal_loss("an executor's process nursery ended");
        }
        for e in nursery.take_events() {
            sink(e);
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Closing the channel lets the thread end once nothing runs.
        self.tx.take();
        self.bell.ring();
        if let Some(h) = self.handle.take() {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// An eventfd: any thread rings it, the executor's thread sleeps on it in poll(2).
struct Bell(RawFd);

impl Bell {
    fn new() -> Bell {
        // SAFETY: eventfd(2) with valid flags; the fd is owned by the Bell.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(
            fd >= 0,
            "eventfd failed: {}",
            std::io::Error::last_os_error()
        );
        Bell(fd)
    }
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }
    fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.0, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        // SAFETY: closes the fd this Bell owns.
        unsafe { libc::close(self.0) };
    }
}
