//! Runs jobs' processes and watches them: the engine of a worker rank, and of rank 0's runner
//! for MPI jobs (whose processes are `mpiexec`/`aprun`/`srun`).
//!
//! The [`Engine`] is single-threaded: it queues jobs, starts each when its node has room
//! (packing units, see [`crate::packing`]), kills on request (SIGTERM to the process group, a
//! grace period, SIGKILL) or past the job's wall time, and records what happened. Its
//! [`Engine::wait`] sleeps in `poll(2)` on a pidfd per child: a child's exit wakes the very thread
//! that then reaps it and starts the next job — one wake-up per job, like a plain spawn-and-wait
//! loop. It waits for its own children only (`waitpid(pid)`), so scripts other threads run are
//! never reaped by mistake. Where pidfds are missing (kernels before 5.3) a small thread per child
//! waits instead and rings the engine's eventfd.
//!
//! A worker rank drives an engine from its MPI loop directly (no thread hop per job); rank 0 runs
//! one in a thread ([`Executor`]) for its MPI jobs.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::messages::{ExitStatus, JobFinished, JobStarted, KillReason, RunJob};
use crate::process::{self, Spawner};

/// How an engine behaves.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
pub enum Event {
    /// Its process started.
    Started(JobStarted),
    /// It ended, could not start, or was dropped.
    Finished(JobFinished),
}

struct Running {
    job: RunJob,
    pidfd: Option<libc::c_int>,
    pid: u32,
    slot: u32,
    start: Instant,
    wall_deadline: Option<Instant>,
    kill: Option<(KillReason, Instant, bool)>,
}

/// The single-threaded process engine.
pub struct Engine {
    cfg: ExecutorConfig,
    queue: VecDeque<RunJob>,
    running: HashMap<u32, Running>,
    by_pk: HashMap<i64, u32>,
    used: u64,
    slots: BTreeSet<u32>,
    spawner: Spawner,
    bell: Arc<Bell>,
    events: Vec<Event>,
    /// Exits seen by fallback waiting threads (no pidfd).
    exit_tx: Sender<(u32, std::process::ExitStatus)>,
    exit_rx: Receiver<(u32, std::process::ExitStatus)>,
    fds: Vec<libc::pollfd>,
}

impl Engine {
    /// A new engine with nothing to run.
    pub fn new(cfg: ExecutorConfig) -> Engine {
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded();
        let spawner = Spawner::new(&cfg.base_env);
        Engine {
            cfg,
            queue: VecDeque::new(),
            running: HashMap::new(),
            by_pk: HashMap::new(),
            used: 0,
            slots: BTreeSet::new(),
            spawner,
            bell: Arc::new(Bell::new()),
            events: Vec::new(),
            exit_tx,
            exit_rx,
            fds: Vec::new(),
        }
    }

    /// Queues a job; it starts when it fits (at the latest in the next [`Engine::wait`]).
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

    /// Starts what fits, then sleeps until a child exits, the bell rings, a kill or wall-time
    /// deadline passes, or `timeout` ends; reaps, escalates kills, and starts what fits again.
    pub fn wait(&mut self, timeout: Duration) {
        self.start_queued();
        let wait = match self.next_deadline() {
            Some(d) => d.saturating_duration_since(Instant::now()).min(timeout),
            None => timeout,
        };
        // Round up so a deadline is never polled for in a busy loop of 0 ms sleeps.
        let timeout_ms = wait.as_micros().div_ceil(1000).min(3_600_000) as libc::c_int;
        self.fds.clear();
        self.fds.push(libc::pollfd {
            fd: self.bell.0,
            events: libc::POLLIN,
            revents: 0,
        });
        for r in self.running.values() {
            if let Some(fd) = r.pidfd {
                self.fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // SAFETY: poll(2) on a valid array of pollfd structs of the given length.
        let n = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n > 0 {
            if self.fds[0].revents != 0 {
                self.bell.clear();
            }
            let ready: Vec<libc::c_int> = self.fds[1..]
                .iter()
                .filter(|f| f.revents != 0)
                .map(|f| f.fd)
                .collect();
            if !ready.is_empty() {
                let pids: Vec<u32> = self
                    .running
                    .values()
                    .filter(|r| r.pidfd.is_some_and(|fd| ready.contains(&fd)))
                    .map(|r| r.pid)
                    .collect();
                for pid in pids {
                    self.reap(pid);
                }
            }
        }
        while let Ok((pid, st)) = self.exit_rx.try_recv() {
            self.exited(pid, st);
        }
        self.check_deadlines();
        self.start_queued();
    }

    /// A handle that wakes [`Engine::wait`] from another thread.
    fn bell(&self) -> Arc<Bell> {
        self.bell.clone()
    }

    fn reap(&mut self, pid: u32) {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            self.exited(pid, std::process::ExitStatus::from_raw(status));
        } else if r < 0 {
            tracing::error!("waiting for pid {pid}: {}", std::io::Error::last_os_error());
            self.exited(pid, std::process::ExitStatus::from_raw(255 << 8));
        }
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
        match self.spawner.spawn(argv, &job.workdir, &job.output, env) {
            Ok(pid) => {
                let pidfd = pidfd_open(pid);
                if pidfd.is_none() {
                    self.wait_in_thread(pid);
                }
                let now = Instant::now();
                let wall_deadline = job.wall_time_limit_s.map(|s| now + Duration::from_secs(s));
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
                        pidfd,
                        pid,
                        slot,
                        start: now,
                        wall_deadline,
                        kill: None,
                    },
                );
            }
            Err(why) => {
                tracing::warn!("{}: {why}", job.cute_id);
                self.events.push(Event::Finished(JobFinished {
                    pk: job.pk,
                    status: ExitStatus::NotStarted(why),
                    tail: String::new(),
                    elapsed_ms: 0,
                    killed: None,
                    started: false,
                }));
            }
        }
    }

    /// Fallback without pidfds: a small thread blocks in waitpid(pid) and rings the bell.
    fn wait_in_thread(&self, pid: u32) {
        let tx = self.exit_tx.clone();
        let bell = self.bell.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut status: libc::c_int = 0;
                // SAFETY: waitpid on a child of this process with a valid status pointer.
                let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
                if r == pid as libc::pid_t {
                    let _ = tx.send((pid, std::process::ExitStatus::from_raw(status)));
                    bell.ring();
                }
            });
        if spawned.is_err() {
            tracing::error!("cannot start a thread to wait for pid {pid}");
        }
    }

    fn exited(&mut self, pid: u32, st: std::process::ExitStatus) {
        let Some(r) = self.running.remove(&pid) else {
            return;
        };
        if let Some(fd) = r.pidfd {
            // SAFETY: closes the pidfd this entry owned.
            unsafe { libc::close(fd) };
        }
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

    /// The next kill escalation or wall-time limit.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.running
            .values()
            .filter_map(|r| match r.kill {
                Some((_, t, false)) => Some(t),
                Some((_, _, true)) => None,
                None => r.wall_deadline,
            })
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

impl Drop for Engine {
    fn drop(&mut self) {
        for r in self.running.values() {
            if let Some(fd) = r.pidfd {
                // SAFETY: closes pidfds this engine owns.
                unsafe { libc::close(fd) };
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

/// An [`Engine`] in a thread of its own, driven through a channel; every event is delivered at
/// once. Rank 0 runs its MPI jobs with one.
pub struct Executor {
    tx: Option<Sender<Request>>,
    bell: Arc<Bell>,
    /// Events, in the order they happened.
    pub events: Receiver<Event>,
    handle: Option<JoinHandle<()>>,
}

impl Executor {
    /// Starts the executor thread.
    pub fn start(cfg: ExecutorConfig) -> Executor {
        let (tx, rx) = crossbeam_channel::unbounded::<Request>();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let engine = Engine::new(cfg);
        let bell = engine.bell();
        let handle = std::thread::Builder::new()
            .name("executor".into())
            .spawn(move || drive(engine, rx, ev_tx))
            .expect("cannot start the executor thread");
        Executor {
            tx: Some(tx),
            bell,
            events: ev_rx,
            handle: Some(handle),
        }
    }

    /// Sends a request.
    pub fn send(&self, req: Request) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(req);
            self.bell.ring();
        }
    }
}

fn drive(mut engine: Engine, rx: Receiver<Request>, events: Sender<Event>) {
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Request::Run(job)) => engine.submit(job),
                Ok(Request::Kill(pks, reason)) => {
                    for pk in pks {
                        engine.kill(pk, reason);
                    }
                }
                Ok(Request::KillAll(reason)) => engine.kill_all(reason),
                Ok(Request::Reclaim(pks)) => {
                    for pk in pks {
                        engine.reclaim(pk);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        for e in engine.take_events() {
            let _ = events.send(e);
        }
        if !open && engine.is_idle() {
            return;
        }
        engine.wait(Duration::from_secs(3600));
        for e in engine.take_events() {
            let _ = events.send(e);
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

/// An eventfd: any thread rings it, the engine sleeps on it in poll(2).
struct Bell(libc::c_int);

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

/// A pidfd for a child, when the kernel has them.
fn pidfd_open(pid: u32) -> Option<libc::c_int> {
    // SAFETY: pidfd_open(2) on our own unreaped child; returns a new fd (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then_some(fd as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packing;

    fn job(dir: &std::path::Path, pk: i64, cmd: &str, cost: u64) -> RunJob {
        RunJob {
            pk,
            cute_id: format!("[j{pk}]"),
            argv: vec!["sh".into(), "-c".into(), cmd.into()],
            envscript: None,
            workdir: dir.to_path_buf(),
            output: dir.join(format!("j{pk}.out")),
            env: vec![("JOBVAR".into(), pk.to_string())],
            cost,
            wall_time_limit_s: None,
        }
    }

    fn finished(ex: &Executor, n: usize) -> Vec<JobFinished> {
        let mut out = Vec::new();
        while out.len() < n {
            match ex
                .events
                .recv_timeout(Duration::from_secs(20))
                .expect("event in time")
            {
                Event::Finished(f) => out.push(f),
                Event::Started(_) => {}
            }
        }
        out.sort_by_key(|f| f.pk);
        out
    }

    fn cfg() -> ExecutorConfig {
        ExecutorConfig {
            capacity: packing::NODE,
            gpus_per_node: 0,
            kill_grace: Duration::from_millis(300),
            base_env: process::base_environment(None),
        }
    }

    #[test]
    fn runs_reports_and_kills() {
        let dir = tempfile::tempdir().unwrap();
        let ex = Executor::start(cfg());
        ex.send(Request::Run(job(
            dir.path(),
            1,
            "echo out $JOBVAR",
            packing::cost(4),
        )));
        ex.send(Request::Run(job(
            dir.path(),
            2,
            "echo oops >&2; exit 3",
            packing::cost(4),
        )));
        ex.send(Request::Run(job(
            dir.path(),
            3,
            "trap '' TERM; echo ready; sleep 30",
            packing::cost(4),
        )));
        let mut j4 = job(dir.path(), 4, "x", packing::cost(4));
        j4.argv = vec!["/no/such/program".into()];
        ex.send(Request::Run(j4));
        let f = finished(&ex, 3);
        assert_eq!(f[0].status, ExitStatus::Code(0));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("j1.out")).unwrap(),
            "out 1\n"
        );
        assert_eq!(f[1].status, ExitStatus::Code(3));
        assert_eq!(f[1].tail, "oops");
        assert!(matches!(&f[2].status, ExitStatus::NotStarted(w) if w.contains("not found")));
        // Job 3 ignores SIGTERM: the kill escalates to SIGKILL after the grace.
        while std::fs::read_to_string(dir.path().join("j3.out"))
            .unwrap_or_default()
            .is_empty()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        ex.send(Request::Kill(vec![3], KillReason::User));
        let f = finished(&ex, 1);
        assert_eq!(f[0].status, ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(f[0].killed, Some(KillReason::User));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn packing_limits_concurrency_and_wall_time_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let ex = Executor::start(cfg());
        let log = dir.path().join("log");
        let cmd = format!(
            "echo start >> {0}; sleep 0.3; echo end >> {0}",
            log.display()
        );
        for pk in 0..4 {
            ex.send(Request::Run(job(dir.path(), pk, &cmd, packing::cost(2))));
        }
        let mut slow = job(dir.path(), 9, "sleep 30", packing::cost(2));
        slow.wall_time_limit_s = Some(1);
        let f = finished(&ex, 4);
        assert!(f.iter().all(|f| f.status.success()));
        let text = std::fs::read_to_string(&log).unwrap();
        let (mut now, mut max) = (0, 0);
        for l in text.lines() {
            now += if l == "start" { 1 } else { -1 };
            max = max.max(now);
        }
        assert_eq!(max, 2, "{text}");
        ex.send(Request::Run(slow));
        let f = finished(&ex, 1);
        assert_eq!(f[0].killed, Some(KillReason::WallTime));
    }

    #[test]
    fn gpus_are_assigned_per_slot() {
        let dir = tempfile::tempdir().unwrap();
        let ex = Executor::start(ExecutorConfig {
            gpus_per_node: 2,
            ..cfg()
        });
        for pk in 0..3 {
            ex.send(Request::Run(job(
                dir.path(),
                pk,
                "echo $CUDA_VISIBLE_DEVICES; sleep 0.2",
                packing::cost(4),
            )));
        }
        finished(&ex, 3);
        let gpus: Vec<String> = (0..3)
            .map(|pk| std::fs::read_to_string(dir.path().join(format!("j{pk}.out"))).unwrap())
            .collect();
        assert_eq!(gpus, ["0\n", "1\n", "0\n"]);
    }
}
