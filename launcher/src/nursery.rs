//! The process nursery: the one process that is the parent of a rank's jobs, so that a job's
//! whole process tree lives and dies with the job, and with the rank.
//!
//! Why a process of its own: a rank can die at any moment (kill -9, an abort of the MPI job, a
//! crash), and a dead process cleans up nothing. Its jobs' descendants would then run on as
//! orphans of init, and once the leases expired another launcher would run the same jobs a
//! second time beside them. So each rank starts a small nursery once (an exec of this very
//! binary in a hidden mode, [`NURSERY_ARG`]), and the nursery starts the jobs:
//!
//! - It is a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever a job leaves behind, double
//!   forks and `setsid` daemons included, is reparented to it instead of to init, and the
//!   [`Engine`] in it kills a job's leftovers when the job ends (see [`crate::executor`]).
//! - It watches the rank: EOF on its socket, and `PR_SET_PDEATHSIG` (SIGUSR2, checked against
//!   `getppid()`) when the thread that started it dies. Either way it SIGKILLs every job's
//!   process group and every process reparented to it, reaps them, and exits.
//! - Each job's main process gets `PR_SET_PDEATHSIG` = SIGKILL towards the nursery, so a nursery
//!   killed on its own takes its jobs along; what they leave goes to the rank, itself a subreaper
//!   (see `main.rs`), which then kills it and aborts ([`fatal_loss`]).
//! - It ignores SIGTERM, SIGINT and SIGHUP and sits in a process group of its own: signals meant
//!   for the launcher (Ctrl-C, the batch system's SIGTERM, a kill of the launcher's group) go to
//!   the ranks, which decide what happens to the jobs; the nursery only follows its rank.
//!
//! The rank talks to it over a socketpair: [`Nursery`] sends jobs and kills, and gets back what
//! started and ended (and the nursery's log lines), as length-prefixed bincode frames. The
//! nursery starts the next job the moment one ends, in the process that reaped it, so the
//! transport adds no round trip per job; a spawn from the small nursery is as cheap as from the
//! rank. Pre- and postprocess scripts run through a nursery too ([`ScriptNursery`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::executor::{Engine, Event, Executor, ExecutorConfig, Request};
use crate::messages::{ExitStatus, KillReason, RunJob};
use crate::process::{self, SpawnError, Spawner};

/// The hidden first argument that makes `balsam-mpi-launcher` a nursery.
pub const NURSERY_ARG: &str = "--balsam-process-nursery";

/// The name a nursery shows in `ps` (and the name `pkill balsam-mpi-launcher` does not match).
pub const NURSERY_NAME: &str = "balsam-nursery";

/// The nursery's descriptor for its socket to the rank.
const SOCKET_FD: RawFd = 3;

/// The signal a nursery gets when the thread that started it dies (`PR_SET_PDEATHSIG`).
const PARENT_DEATH_SIGNAL: libc::c_int = libc::SIGUSR2;

/// How long a nursery may take to kill and reap everything when its rank is gone, and how long
/// a rank waits for its nursery to end.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(10);

/// How long a nursery with jobs queued may hold back what happened before telling its rank:
/// the rank does not need each event at once while the nursery has work (it reports to rank 0
/// every few milliseconds anyway), and every frame wakes it. A nursery whose queue runs out
/// tells at once, so that more jobs come.
const HOLD_EVENTS: Duration = Duration::from_millis(2);

/// Rank → nursery.
#[derive(Debug, Serialize, Deserialize)]
enum ToNursery {
    /// First and once: how to run jobs.
    Setup(ExecutorConfig),
    /// Queue a job.
    Run(RunJob),
    /// Stop these jobs.
    Kill(Vec<i64>, KillReason),
    /// Stop every job.
    KillAll(KillReason),
    /// Give these jobs back if they have not started ([`crate::executor::Engine::reclaim`]).
    Reclaim(Vec<i64>),
}

/// Nursery → rank: what happened since the last frame.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FromNursery {
    events: Vec<Event>,
    /// Log lines (`LEVEL message`), for the rank's log.
    log: Vec<String>,
}

fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_std_write(msg, out, bincode::config::standard())
        .expect("writing to a Vec cannot fail");
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Decodes the complete frames at the start of `buf`, removing them.
fn decode_frames<T: for<'de> Deserialize<'de>>(
    buf: &mut Vec<u8>,
) -> std::result::Result<Vec<T>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        if buf.len() - at - 4 < len {
            break;
        }
        let body = &buf[at + 4..at + 4 + len];
        let (msg, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(|e| format!("undecodable nursery frame: {e}"))?;
        if used != len {
            return Err(format!("nursery frame of {len} bytes has trailing bytes"));
        }
        out.push(msg);
        at += 4 + len;
    }
    buf.drain(..at);
    Ok(out)
}

/// Reads what is available on a non-blocking socket into `buf`. False on EOF or error.
fn read_available(sock: &mut UnixStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match sock.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes as much of `out` as the socket takes now. False when the other end is gone.
fn write_available(sock: &mut UnixStream, out: &mut Vec<u8>) -> bool {
    let mut done = 0;
    let ok = loop {
        if done == out.len() {
            break true;
        }
        match sock.write(&out[done..]) {
            Ok(0) => break false,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    out.drain(..done);
    ok
}

/// The program to start as a nursery: this very one when it is the launcher (through
/// /proc/self/exe, so that a binary replaced on disk meanwhile is not mixed with the running
/// one), else the launcher binary beside it (tests and examples run from `target/*/deps` or
/// `target/*/examples`), else on PATH.
fn program() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| Error::io("cannot find the running program", e))?;
    // A binary replaced on disk reads as "NAME (deleted)".
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    if name.is_some_and(|n| n.starts_with(crate::LAUNCHER_BIN)) {
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    let beside = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(crate::LAUNCHER_BIN));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(crate::LAUNCHER_BIN));
    beside
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Config(format!(
                "cannot find {} (it runs the jobs' processes) beside {} or on PATH; build or install it",
                crate::LAUNCHER_BIN,
                exe.display()
            ))
        })
}

/// A rank's end of its nursery: jobs and kills go in, what started and ended comes out. Single
/// threaded; [`Nursery::wait`] sleeps in poll(2) on the socket (and one more descriptor, if
/// given). Dropping it ends the nursery, which kills whatever still runs, and waits for that.
pub struct Nursery {
    sock: UnixStream,
    child: Option<Child>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    events: Vec<Event>,
    queued: usize,
    running: usize,
    lost: bool,
}

impl Nursery {
    /// Starts a nursery that runs jobs as `cfg` says. The calling thread becomes its parent
    /// (`PR_SET_PDEATHSIG` is tied to it): call it from a thread that lives as long as the rank.
    pub fn start(cfg: &ExecutorConfig) -> Result<Nursery> {
        let exe = program()?;
        // Both ends are close-on-exec; the nursery's end is moved to SOCKET_FD in the child.
        let (mine, theirs) =
            UnixStream::pair().map_err(|e| Error::io("cannot make a socket pair", e))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.arg0(NURSERY_NAME)
            .arg(NURSERY_ARG)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .process_group(0);
        // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == SOCKET_FD {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            Error::io(
                format!("cannot start the process nursery {}", exe.display()),
                e,
            )
        })?;
        drop(theirs);
        mine.set_nonblocking(true)
            .map_err(|e| Error::io("cannot set up the nursery's socket", e))?;
        let mut n = Nursery {
            sock: mine,
            child: Some(child),
            out: Vec::new(),
            inbuf: Vec::new(),
            events: Vec::new(),
            queued: 0,
            running: 0,
            lost: false,
        };
        n.push(&ToNursery::Setup(cfg.clone()));
        n.flush();
        Ok(n)
    }

    /// The nursery's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn push(&mut self, msg: &ToNursery) {
        encode_frame(msg, &mut self.out);
    }

    fn flush(&mut self) {
        if !self.out.is_empty() && !write_available(&mut self.sock, &mut self.out) {
            self.lost = true;
        }
    }

    /// Queues a job (sent at the next [`Nursery::wait`]).
    pub fn submit(&mut self, job: RunJob) {
        self.queued += 1;
        self.push(&ToNursery::Run(job));
    }

    /// Stops jobs: queued ones are dropped, running ones get SIGTERM, then SIGKILL after the
    /// grace.
    pub fn kill(&mut self, pks: Vec<i64>, reason: KillReason) {
        if !pks.is_empty() {
            self.push(&ToNursery::Kill(pks, reason));
        }
    }

    /// Gives jobs back if they have not started: each one still queued is dropped and reported
    /// finished, not started, with [`KillReason::Reclaimed`]; one that started runs on.
    pub fn reclaim(&mut self, pks: Vec<i64>) {
        if !pks.is_empty() {
            self.push(&ToNursery::Reclaim(pks));
        }
    }

    /// Stops every job.
    pub fn kill_all(&mut self, reason: KillReason) {
        self.push(&ToNursery::KillAll(reason));
    }

    /// Sends what is pending, then sleeps until the nursery reports, `extra` is readable, or
    /// `timeout` passes; collects the reports. True when `extra` is readable.
    pub fn wait(&mut self, timeout: Duration, extra: Option<RawFd>) -> bool {
        self.flush();
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN
                    | if self.out.is_empty() {
                        0
                    } else {
                        libc::POLLOUT
                    },
                revents: 0,
            },
            libc::pollfd {
                fd: extra.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Round up so a deadline is never polled for in a busy loop of 0 ms sleeps.
        let ms = timeout.as_micros().div_ceil(1000).min(3_600_000) as libc::c_int;
        let n = if self.lost { 0 } else { ms };
        // SAFETY: poll(2) on a valid array of two pollfd structs (a negative fd is skipped).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, n) };
        if r > 0 && fds[0].revents != 0 {
            if fds[0].revents & libc::POLLOUT != 0 {
                self.flush();
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.receive();
            }
        }
        r > 0 && fds[1].revents != 0
    }

    fn receive(&mut self) {
        if !read_available(&mut self.sock, &mut self.inbuf) {
            self.lost = true;
        }
        let frames: Vec<FromNursery> = match decode_frames(&mut self.inbuf) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("{e}");
                self.lost = true;
                return;
            }
        };
        for f in frames {
            for line in &f.log {
                relay_log(line);
            }
            for e in f.events {
                match &e {
                    Event::Started(_) => {
                        self.queued = self.queued.saturating_sub(1);
                        self.running += 1;
                    }
                    Event::Finished(f) if f.started => {
                        self.running = self.running.saturating_sub(1)
                    }
                    Event::Finished(_) => self.queued = self.queued.saturating_sub(1),
                }
                self.events.push(e);
            }
        }
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether events are waiting to be taken.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Jobs sent and not started yet.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Jobs whose process runs.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queued == 0 && self.running == 0
    }

    /// Whether the nursery ended (or broke its protocol) while it was needed.
    pub fn is_lost(&self) -> bool {
        self.lost
    }
}

impl Drop for Nursery {
    fn drop(&mut self) {
        // EOF tells the nursery to kill what is left and exit.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let t = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if t.elapsed() > TEARDOWN_LIMIT => {
                    tracing::error!(
                        "the process nursery {} did not end in {TEARDOWN_LIMIT:?}; killing it",
                        child.id()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Logs a nursery's line at its level.
fn relay_log(line: &str) {
    let (level, msg) = line.trim_start().split_once(' ').unwrap_or(("INFO", line));
    let msg = msg.trim_start();
    match level {
        "ERROR" => tracing::error!("{msg}"),
        "WARN" => tracing::warn!("{msg}"),
        "DEBUG" => tracing::debug!("{msg}"),
        "TRACE" => tracing::trace!("{msg}"),
        _ => tracing::info!("{msg}"),
    }
}

/// The rank lost a nursery while it ran jobs: the jobs' main processes died with it, and what
/// they started came to the rank (a subreaper). Kill and reap all of it, and end the rank at
/// once, so that the MPI job ends and nothing of it runs on unwatched.
pub fn fatal_loss(what: &str) -> ! {
    tracing::error!("{what}: killing every process it left and ending this launcher rank");
    eprintln!("balsam-mpi-launcher: {what}: ending this launcher rank");
    process::kill_and_reap_all_children(Duration::from_secs(5));
    // SAFETY: _exit(2) ends the process at once, without running handlers that might wait for
    // other threads (MPI's among them): the MPI launcher sees a rank die and ends the job.
    unsafe { libc::_exit(70) }
}

/// When this program was started as a nursery, runs it and exits; otherwise returns. Call it
/// first thing in `main`.
pub fn run_if_requested() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == NURSERY_ARG) {
        let parent = args
            .get(2)
            .and_then(|p| p.to_str()?.parse::<libc::pid_t>().ok())
            .unwrap_or(0);
        std::process::exit(serve(parent));
    }
}

/// Log lines of the nursery, sent to the rank with the next frame.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogBuffer;

impl Write for LogBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn take_log() -> Vec<String> {
    let mut buf = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if buf.is_empty() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    buf.clear();
    text.lines().map(String::from).collect()
}

/// The nursery's main loop. `parent`: the rank's pid. Returns the exit code.
fn serve(parent: libc::pid_t) -> i32 {
    // SAFETY: prctl(2) and signal calls that affect this process only; the name is
    // NUL-terminated.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"balsam-nursery".as_ptr());
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    // The rank may have died before PR_SET_PDEATHSIG took effect: then nothing will tell us.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return 0;
    }
    // Descriptors inherited from the rank that are not close-on-exec (its MPI launcher's
    // sockets): holding them would keep the MPI launcher from noticing that the rank died.
    // SAFETY: closes descriptors this process does not use.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (SOCKET_FD + 1) as u32,
            u32::MAX,
            0u32,
        )
    };
    if let Err(e) = process::become_subreaper() {
        eprintln!("{NURSERY_NAME}: cannot become a child subreaper: {e}");
        return 1;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(|| LogBuffer)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let sigfd = match child_signals() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("{NURSERY_NAME}: cannot watch for child processes: {e}");
            return 1;
        }
    };
    // SAFETY: SOCKET_FD is the socket the rank passed us, owned by this process from now on.
    let sock = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    if sock.set_nonblocking(true).is_err() {
        return 1;
    }
    let mut n = Served {
        sock,
        engine: None,
        inbuf: Vec::new(),
        out: Vec::new(),
        held: Vec::new(),
        held_since: None,
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: SOCKET_FD,
                events: libc::POLLIN | if n.out.is_empty() { 0 } else { libc::POLLOUT },
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on a valid array of two pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, n.timeout_ms()) } > 0;
        let mut gone = false;
        if ready && fds[1].revents != 0 && drain_signals(sigfd) {
            // SAFETY: getppid has no preconditions.
            gone |= unsafe { libc::getppid() } != parent;
        }
        if let Some(e) = n.engine.as_mut() {
            e.reap();
        }
        if ready && fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            gone |= !n.receive();
        }
        if let Some(e) = n.engine.as_mut() {
            e.tick();
        }
        gone = gone || !n.send();
        if gone {
            match n.engine.as_mut() {
                Some(e) => e.teardown(TEARDOWN_LIMIT),
                None => process::kill_and_reap_all_children(TEARDOWN_LIMIT),
            }
            return 0;
        }
    }
}

/// A nursery's state between polls.
struct Served {
    sock: UnixStream,
    /// Made by the rank's first frame.
    engine: Option<Engine>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Events not sent yet (see [`HOLD_EVENTS`]), since when.
    held: Vec<Event>,
    held_since: Option<Instant>,
}

impl Served {
    /// Until the next kill escalation, wall time, look for orphans or events due, in ms (-1:
    /// none).
    fn timeout_ms(&self) -> libc::c_int {
        let engine = self.engine.as_ref().and_then(|e| e.next_deadline());
        let events = self.held_since.map(|t| t + HOLD_EVENTS);
        let deadline = match (engine, events) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(d) => d,
                None => return -1,
            },
        };
        // Round up so a deadline is never polled for in a busy loop of 0 ms sleeps.
        deadline
            .saturating_duration_since(Instant::now())
            .as_micros()
            .div_ceil(1000)
            .min(3_600_000) as libc::c_int
    }

    /// Reads and obeys what the rank sent. False when the rank is gone (EOF) or garbled.
    fn receive(&mut self) -> bool {
        let open = read_available(&mut self.sock, &mut self.inbuf);
        let msgs = match decode_frames::<ToNursery>(&mut self.inbuf) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("{e}");
                return false;
            }
        };
        for m in msgs {
            if let ToNursery::Setup(cfg) = m {
                self.engine = Some(Engine::new(cfg));
                continue;
            }
            let Some(e) = self.engine.as_mut() else {
                continue;
            };
            match m {
                ToNursery::Run(job) => e.submit(job),
                ToNursery::Kill(pks, reason) => pks.into_iter().for_each(|pk| e.kill(pk, reason)),
                ToNursery::KillAll(reason) => e.kill_all(reason),
                ToNursery::Reclaim(pks) => pks.into_iter().for_each(|pk| e.reclaim(pk)),
                ToNursery::Setup(_) => {}
            }
        }
        open
    }

    /// Sends what happened when it is due, and the log. False when the rank is gone.
    fn send(&mut self) -> bool {
        if let Some(e) = self.engine.as_mut() {
            if e.has_events() {
                self.held.extend(e.take_events());
                self.held_since.get_or_insert_with(Instant::now);
            }
        }
        let queued = self.engine.as_ref().map_or(0, |e| e.queued());
        let due = self
            .held_since
            .is_some_and(|t| queued == 0 || t.elapsed() >= HOLD_EVENTS);
        let log = take_log();
        if due || !log.is_empty() {
            let events = std::mem::take(&mut self.held);
            self.held_since = None;
            encode_frame(&FromNursery { events, log }, &mut self.out);
        }
        self.out.is_empty() || write_available(&mut self.sock, &mut self.out)
    }
}

/// Blocks SIGCHLD and the parent-death signal and returns a signalfd that reports them.
fn child_signals() -> std::io::Result<RawFd> {
    // SAFETY: signal-mask calls on a local sigset_t; signalfd(2) returns a new descriptor.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, PARENT_DEATH_SIGNAL);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads every pending signal from the signalfd; true when the parent-death signal was among
/// them.
fn drain_signals(fd: RawFd) -> bool {
    let mut parent_died = false;
    loop {
        // SAFETY: reads whole signalfd_siginfo structs into a properly sized buffer.
        let (n, info) = unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            (n, info)
        };
        if n <= 0 {
            return parent_died;
        }
        parent_died |= info.ssi_signo as libc::c_int == PARENT_DEATH_SIGNAL;
    }
}

/// How a script run through [`ScriptRunner`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRun {
    /// Its process id.
    pub pid: u32,
    /// How it ended; None when it ran past its time limit and was killed.
    pub status: Option<ExitStatus>,
}

/// A nursery shared by the threads that run pre- and postprocess scripts in a launcher's rank 0,
/// so that a script's processes, like a job's, end with the script and with the rank.
#[derive(Clone)]
pub struct ScriptNursery(Arc<ScriptHost>);

struct ScriptHost {
    exec: Executor,
    waiters: Arc<Mutex<HashMap<i64, Sender<Event>>>>,
    next: AtomicI64,
}

impl std::fmt::Debug for ScriptNursery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScriptNursery")
    }
}

impl ScriptNursery {
    /// Starts the nursery (from the calling thread, which must live as long as the rank).
    pub fn start(kill_grace: Duration, base_env: Vec<(OsString, OsString)>) -> Result<Self> {
        let waiters: Arc<Mutex<HashMap<i64, Sender<Event>>>> = Arc::default();
        let w = waiters.clone();
        let exec = Executor::with_sink(
            ExecutorConfig {
                capacity: u64::MAX,
                gpus_per_node: 0,
                kill_grace,
                base_env,
            },
            crossbeam_channel::never(),
            move |e| {
                let pk = match &e {
                    Event::Started(s) => s.pk,
                    Event::Finished(f) => f.pk,
                };
                if let Some(tx) = w.lock().unwrap_or_else(|e| e.into_inner()).get(&pk) {
                    let _ = tx.send(e);
                }
            },
        )?;
        Ok(ScriptNursery(Arc::new(ScriptHost {
            exec,
            waiters,
            next: AtomicI64::new(1),
        })))
    }

    fn run(
        &self,
        argv: &[String],
        workdir: &Path,
        output: &Path,
        env: &[(String, String)],
        limit: Duration,
    ) -> std::result::Result<ScriptRun, SpawnError> {
        let host = &self.0;
        let id = host.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::unbounded();
        host.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        host.exec.send(Request::Run(RunJob {
            pk: id,
            cute_id: format!(
                "[script {}]",
                argv.first().map(String::as_str).unwrap_or("")
            ),
            argv: argv.to_vec(),
            envscript: None,
            workdir: workdir.to_path_buf(),
            output: output.to_path_buf(),
            env: env.to_vec(),
            cost: 0,
            wall_time_limit_s: None,
        }));
        let deadline = Instant::now() + limit;
        let mut pid = 0;
        let mut killed = false;
        let outcome = loop {
            let wait = if killed {
                TEARDOWN_LIMIT * 6
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(wait) {
                Ok(Event::Started(s)) => pid = s.pid,
                Ok(Event::Finished(f)) if !f.started => {
                    let (why, infrastructure) = match f.status {
                        ExitStatus::Infrastructure(w) => (w, true),
                        ExitStatus::NotStarted(w) => (w, false),
                        other => (other.describe(), false),
                    };
                    break Err(SpawnError {
                        why,
                        infrastructure,
                    });
                }
                Ok(Event::Finished(f)) => {
                    break Ok(ScriptRun {
                        pid,
                        status: (f.killed.is_none()).then_some(f.status),
                    })
                }
                Err(_) if !killed => {
                    host.exec
                        .send(Request::Kill(vec![id], KillReason::WallTime));
                    killed = true;
                }
                Err(_) => {
                    break Err(SpawnError {
                        why: "the script's nursery stopped answering".into(),
                        infrastructure: true,
                    })
                }
            }
        };
        host.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        outcome
    }
}

/// Runs pre- and postprocess scripts to their end within a time limit: through the launcher's
/// [`ScriptNursery`] when there is one, else in this process (the service), where the script
/// leads its own session and what is left of its process group is killed when it ends.
pub struct ScriptRunner {
    spawner: Spawner,
    nursery: Option<ScriptNursery>,
}

impl ScriptRunner {
    /// A runner whose scripts start from `base_env`.
    pub fn new(base_env: &[(OsString, OsString)], nursery: Option<ScriptNursery>) -> Self {
        ScriptRunner {
            spawner: Spawner::new(base_env),
            nursery,
        }
    }

    /// Runs `argv` in `workdir`, output appended to `output`; past `limit`, SIGTERM to its
    /// group, `grace`, SIGKILL.
    pub fn run(
        &mut self,
        argv: &[String],
        workdir: &Path,
        output: &Path,
        env: &[(String, String)],
        limit: Duration,
        grace: Duration,
    ) -> std::result::Result<ScriptRun, SpawnError> {
        if let Some(n) = &self.nursery {
            return n.run(argv, workdir, output, env, limit);
        }
        let pid = self.spawner.spawn(argv, workdir, output, env)?;
        let status = wait_with_timeout(pid, limit, grace).map(process::exit_status);
        Ok(ScriptRun { pid, status })
    }
}

/// Waits for a child at most `limit`; past it, SIGTERM to its group, `grace`, SIGKILL.
/// None when it had to be killed.
fn wait_with_timeout(
    pid: u32,
    limit: Duration,
    grace: Duration,
) -> Option<std::process::ExitStatus> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let waiter = std::thread::spawn(move || {
        let st = process::wait_pid_and_clear_group(pid);
        let _ = tx.send(st);
    });
    let result = match rx.recv_timeout(limit) {
        Ok(Ok(st)) => Some(st),
        Ok(Err(_)) => None,
        Err(_) => {
            process::signal_group(pid, libc::SIGTERM);
            if rx.recv_timeout(grace).is_err() {
                process::signal_group(pid, libc::SIGKILL);
                let _ = rx.recv();
            }
            None
        }
    };
    let _ = waiter.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut buf = Vec::new();
        encode_frame(&ToNursery::KillAll(KillReason::Exit), &mut buf);
        encode_frame(&ToNursery::Kill(vec![1, 2, 3], KillReason::User), &mut buf);
        let whole = buf.clone();
        // Half a frame decodes to nothing and stays buffered.
        let mut part = whole[..3].to_vec();
        assert!(decode_frames::<ToNursery>(&mut part).unwrap().is_empty());
        assert_eq!(part.len(), 3);
        let msgs = decode_frames::<ToNursery>(&mut buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert!(buf.is_empty());
        assert!(matches!(&msgs[1], ToNursery::Kill(p, KillReason::User) if p == &[1, 2, 3]));
        let mut bad = vec![2, 0, 0, 0, 0xff, 0xff];
        assert!(decode_frames::<ToNursery>(&mut bad).is_err());
    }
}
