//! Starting and stopping a job's process, without a shell.
//!
//! - argv is the application's executable plus the job's args, split the way a shell would split
//!   them ([`command_argv`]); a `.py` program runs under `python3`. With an envscript the command
//!   runs as `bash -c 'source "$0" && exec "$@"' envscript argv...`, so no quoting is involved.
//! - stdout and stderr go to one file, appended to (a restarted job keeps its earlier output).
//! - The process leads its own session (and process group), so a kill reaches everything it
//!   started, and whatever is left of it when it ends can be found (see [`crate::nursery`]).
//! - Its environment is the launcher's minus the MPI variables ([`base_environment`]): a child
//!   that inherits PMI_* from its rank hangs in MPI_Init (MPICH) or fails (Open MPI).
//! - The program is resolved on PATH here, once per name.
//! - [`Spawner`] starts it (see there for what the child inherits and why).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::messages::ExitStatus;

/// Prefixes of the variables MPI launchers set for their ranks (MPICH/hydra, PMIx, Open MPI,
/// PRRTE).
const MPI_PREFIXES: [&str; 9] = [
    "PMI_",
    "PMIX_",
    "HYDI_",
    "HYDRA_",
    "MPIR_CVAR_",
    "OMPI_",
    "ORTE_",
    "OPAL_",
    "PRTE_",
];

/// Whether `name` is a variable an MPI launcher set for this rank (never passed to jobs).
pub fn is_mpi_variable(name: &str) -> bool {
    name == "MPI_LOCALNRANKS"
        || name == "MPI_LOCALRANKID"
        || MPI_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The launcher's environment without MPI variables: what every job and script starts from.
/// With `balsam_dir`, that directory goes first on PATH so scripts find `balsam` (the CLI the
/// launcher was installed with).
pub fn base_environment(balsam_dir: Option<&Path>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !is_mpi_variable(&k.to_string_lossy()))
        .collect();
    if let Some(dir) = balsam_dir {
        let old = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let already = std::env::split_paths(&old).any(|p| p == dir);
        if !already {
            let mut paths = vec![dir.to_path_buf()];
            paths.extend(std::env::split_paths(&old));
            if let Ok(joined) = std::env::join_paths(paths) {
                env.retain(|(k, _)| k != "PATH");
                env.push(("PATH".into(), joined));
            }
        }
    }
    env
}

/// The directory of the running executable when it holds the `balsam` CLI (it does when the
/// launcher is installed or built beside it).
pub fn balsam_cli_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    dir.join("balsam").is_file().then(|| dir.to_path_buf())
}

/// Splits `executable args` like a shell would, without running one; a `.py` program is run
/// with `python3` (legacy ran `.py` applications with the Python interpreter).
pub fn command_argv(executable: &str, args: &str) -> Result<Vec<String>> {
    let split = |s: &str| {
        shell_words::split(s).map_err(|e| Error::BadCommandLine {
            line: s.to_string(),
            problem: e.to_string(),
        })
    };
    let mut argv = split(executable)?;
    if argv.is_empty() {
        return Err(Error::BadCommandLine {
            line: executable.to_string(),
            problem: "the application's executable is empty".into(),
        });
    }
    argv.extend(split(args)?);
    if argv[0].ends_with(".py") {
        argv.insert(0, "python3".into());
    }
    Ok(argv)
}

/// Wraps argv so an envscript is sourced first, in bash, without any quoting.
pub fn with_envscript(argv: Vec<String>, envscript: Option<&str>) -> Vec<String> {
    match envscript {
        Some(script) if !script.trim().is_empty() => {
            let mut v = vec![
                "bash".to_string(),
                "-c".to_string(),
                r#"source "$0" && exec "$@""#.to_string(),
                script.trim().to_string(),
            ];
            v.extend(argv);
            v
        }
        _ => argv,
    }
}

/// Finds programs on the PATH of a given environment, remembering the answers.
#[derive(Debug, Default)]
pub struct ProgramPaths {
    path: Vec<PathBuf>,
    found: HashMap<String, Option<PathBuf>>,
}

impl ProgramPaths {
    /// Searches the PATH of `env`.
    pub fn new(env: &[(OsString, OsString)]) -> ProgramPaths {
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| std::env::split_paths(v).collect())
            .unwrap_or_default();
        ProgramPaths {
            path,
            found: HashMap::new(),
        }
    }

    /// The absolute path of `program` (unchanged when it holds a `/`); None when not found.
    pub fn resolve(&mut self, program: &str) -> Option<PathBuf> {
        if program.contains('/') {
            return Some(PathBuf::from(program));
        }
        if let Some(hit) = self.found.get(program) {
            return hit.clone();
        }
        let hit = self
            .path
            .iter()
            .map(|d| d.join(program))
            .find(|p| is_executable(p));
        self.found.insert(program.to_string(), hit.clone());
        hit
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Starts job processes: the launcher's hot path, and the one place that decides what a job
/// inherits.
///
/// It does what glibc's `posix_spawn` does — `clone(CLONE_VM | CLONE_VFORK)` onto a small stack
/// of its own, so starting a process costs the same whatever the launcher's size (a `fork` of a
/// rank with 200 MB resident is five times slower) — plus what `posix_spawn` cannot:
/// - `PR_SET_PDEATHSIG`: the job is killed when the thread that started it dies (in a
///   launcher, its rank's process nursery, see [`crate::nursery`]), so a job's main process
///   never outlives what watches it.
/// - every inherited descriptor above 2 is closed (`close_range`): jobs must not hold the rank's
///   pipes and sockets to mpiexec, or mpiexec never notices that a rank died.
///
/// Also: a new session, led by the job (kills reach its whole group, and what escapes the group
/// still carries the session id, by which the nursery finds it), every signal back to its
/// default and unblocked (Rust ignores SIGPIPE), stdin from /dev/null, stdout and stderr appended
/// to one file, the working directory entered. The base environment is converted to C strings
/// once; a spawn allocates only the job's own strings.
pub struct Spawner {
    base: Vec<std::ffi::CString>,
    base_keys: Vec<Vec<u8>>,
    paths: ProgramPaths,
    stack: Vec<u8>,
}

/// Everything the cloned child needs, prepared by the parent (the child may not allocate).
#[repr(C)]
struct ChildArgs {
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    output: *const libc::c_char,
    workdir: *const libc::c_char,
    parent: libc::pid_t,
    /// Set by the child when it fails before exec: the errno and which step.
    errno: libc::c_int,
    step: libc::c_int,
}

const STEP_STDIN: libc::c_int = 1;
const STEP_OUTPUT: libc::c_int = 2;
const STEP_CHDIR: libc::c_int = 3;
const STEP_EXEC: libc::c_int = 4;
const STEP_PARENT_GONE: libc::c_int = 5;

/// The child between clone and exec. Runs on its own stack in the parent's memory while the
/// parent is suspended (CLONE_VFORK): raw system calls only, no allocation, no locks.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the ChildArgs the parent keeps alive until the child execs or
    // exits; every pointer in it refers to NUL-terminated strings or NULL-terminated arrays that
    // outlive the call. Only async-signal-safe system calls are made.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        let fail = |a: &mut ChildArgs, step: libc::c_int| -> libc::c_int {
            a.errno = *libc::__errno_location();
            a.step = step;
            libc::_exit(127)
        };
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        libc::setsid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != a.parent {
            return fail(a, STEP_PARENT_GONE);
        }
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if fd < 0 || libc::dup2(fd, 0) < 0 {
            return fail(a, STEP_STDIN);
        }
        if fd != 0 {
            libc::close(fd);
        }
        let fd = libc::open(
            a.output,
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
            0o666,
        );
        if fd < 0 || libc::dup2(fd, 1) < 0 || libc::dup2(fd, 2) < 0 {
            return fail(a, STEP_OUTPUT);
        }
        if fd > 2 {
            libc::close(fd);
        }
        if libc::chdir(a.workdir) < 0 {
            return fail(a, STEP_CHDIR);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.prog, a.argv, a.envp);
        fail(a, STEP_EXEC)
    }
}

/// Stack of the cloned child until it execs.
const CHILD_STACK: usize = 64 * 1024;

impl Spawner {
    /// A spawner for children that start from `base_env`.
    pub fn new(base_env: &[(OsString, OsString)]) -> Spawner {
        use std::os::unix::ffi::OsStrExt;
        let mut base = Vec::new();
        let mut base_keys = Vec::new();
        for (k, v) in base_env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            if let Ok(c) = std::ffi::CString::new(kv) {
                base.push(c);
                base_keys.push(k.as_bytes().to_vec());
            }
        }
        Spawner {
            base,
            base_keys,
            paths: ProgramPaths::new(base_env),
            stack: vec![0u8; CHILD_STACK],
        }
    }

    /// Starts `argv` in `workdir` with stdout and stderr appended to `output`, the base
    /// environment plus `env` (which wins). Returns the pid, or why it could not start.
    pub fn spawn(
        &mut self,
        argv: &[String],
        workdir: &Path,
        output: &Path,
        env: &[(String, String)],
    ) -> std::result::Result<u32, SpawnError> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let Some(program) = argv.first() else {
            return Err(SpawnError::job("empty command line"));
        };
        let resolved = self
            .paths
            .resolve(program)
            .ok_or_else(|| SpawnError::job(format!("executable {program:?} not found on PATH")))?;
        let cstr = |b: &[u8], what: &str| {
            CString::new(b).map_err(|_| SpawnError::job(format!("{what} contains a NUL byte")))
        };
        let prog = cstr(resolved.as_os_str().as_bytes(), "the program path")?;
        let c_argv: Vec<CString> = argv
            .iter()
            .map(|a| cstr(a.as_bytes(), "an argument"))
            .collect::<std::result::Result<_, _>>()?;
        let c_env: Vec<CString> = env
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}").as_bytes(), "an environment variable"))
            .collect::<std::result::Result<_, _>>()?;
        let c_wd = cstr(workdir.as_os_str().as_bytes(), "the working directory")?;
        let c_out = cstr(output.as_os_str().as_bytes(), "the output path")?;
        let mut argv_p: Vec<*const libc::c_char> = c_argv.iter().map(|c| c.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> =
            Vec::with_capacity(self.base.len() + env.len() + 1);
        for (c, k) in self.base.iter().zip(&self.base_keys) {
            if !env.iter().any(|(jk, _)| jk.as_bytes() == k.as_slice()) {
                env_p.push(c.as_ptr());
            }
        }
        env_p.extend(c_env.iter().map(|c| c.as_ptr()));
        env_p.push(std::ptr::null());
        let mut args = ChildArgs {
            prog: prog.as_ptr(),
            argv: argv_p.as_ptr(),
            envp: env_p.as_ptr(),
            output: c_out.as_ptr(),
            workdir: c_wd.as_ptr(),
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            errno: 0,
            step: 0,
        };
        // SAFETY: the child runs `child_main` on `self.stack` (16-byte aligned top) while this
        // thread is suspended (CLONE_VFORK), so `args` and everything it points to stay valid
        // and the stack is not reused concurrently. All signals are blocked across the clone so
        // no handler of the launcher runs on the child's stack; the child resets them first.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let top = self.stack.as_mut_ptr().add(CHILD_STACK) as usize & !15;
            let pid = libc::clone(
                child_main,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&mut args as *mut ChildArgs).cast(),
            );
            let clone_errno = *libc::__errno_location();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(SpawnError::job(format!(
                    "cannot start a process: {}",
                    std::io::Error::from_raw_os_error(clone_errno)
                )));
            }
            pid
        };
        if args.step == 0 {
            return Ok(pid as u32);
        }
        // The child failed before exec and exited: reap it, say why.
        let mut st = 0;
        // SAFETY: waits for the child just created.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        Err(classify(args.step, args.errno, &resolved, workdir, output))
    }
}

/// Why a process could not start, and whose fault it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    /// In words, naming the file or program.
    pub why: String,
    /// True when the launcher cannot write the job's files (disk full, quota, read-only or
    /// missing directory, permissions): the job itself is not at fault and should run later.
    pub infrastructure: bool,
}

impl SpawnError {
    fn job(why: impl Into<String>) -> SpawnError {
        SpawnError {
            why: why.into(),
            infrastructure: false,
        }
    }

    /// The job's outcome: [`ExitStatus::Infrastructure`] or [`ExitStatus::NotStarted`].
    pub fn into_status(self) -> ExitStatus {
        if self.infrastructure {
            ExitStatus::Infrastructure(self.why)
        } else {
            ExitStatus::NotStarted(self.why)
        }
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Errors on the job's own files that mean the file system failed the launcher, not the job.
/// The file system errors of [`crate::health`], and a directory that is missing.
fn is_infrastructure_errno(errno: libc::c_int) -> bool {
    errno == libc::ENOENT
        || crate::health::is_file_system_error(&std::io::Error::from_raw_os_error(errno))
}

/// Turns the step that failed before exec, and its errno, into words and a verdict.
fn classify(
    step: libc::c_int,
    errno: libc::c_int,
    program: &Path,
    workdir: &Path,
    output: &Path,
) -> SpawnError {
    let err = std::io::Error::from_raw_os_error(errno);
    let files = |why: String| SpawnError {
        why,
        infrastructure: is_infrastructure_errno(errno),
    };
    match step {
        STEP_OUTPUT => files(format!(
            "cannot open output file {}: {err}",
            output.display()
        )),
        STEP_CHDIR if errno == libc::ENOENT => files(format!(
            "working directory {} does not exist",
            workdir.display()
        )),
        STEP_CHDIR => files(format!(
            "cannot enter working directory {}: {err}",
            workdir.display()
        )),
        STEP_EXEC => SpawnError::job(match err.kind() {
            std::io::ErrorKind::NotFound => format!("executable {} not found", program.display()),
            std::io::ErrorKind::PermissionDenied => format!(
                "executable {} is not executable (permission denied)",
                program.display()
            ),
            _ => format!("cannot execute {}: {err}", program.display()),
        }),
        STEP_PARENT_GONE => SpawnError::job("the launcher thread that started it ended"),
        _ => SpawnError::job(format!("cannot start {}: {err}", program.display())),
    }
}

/// Waits for a child of this process (by pid) and converts its status.
pub fn wait_pid(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    let mut st: libc::c_int = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut st, 0) };
        if r == pid as libc::pid_t {
            return Ok(std::process::ExitStatus::from_raw(st));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Converts a raw wait status.
pub fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        _ => ExitStatus::Code(status.into_raw()),
    }
}

/// Sends `sig` to the process group led by `pid` (and to `pid` itself, in case it left it).
pub fn signal_group(pid: u32, sig: i32) {
    let pid = pid as libc::pid_t;
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a process group id; the worst outcome is ESRCH for a gone group.
    unsafe {
        libc::kill(-pid, sig);
        libc::kill(pid, sig);
    }
}

/// Waits for a child of this process (by pid) that leads its own session; once it has ended,
/// and before it is reaped (so its id cannot be reused meanwhile), kills what is left of its
/// process group. Returns its status.
pub fn wait_pid_and_clear_group(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    loop {
        // SAFETY: waitid(2) on our own child with a valid siginfo; WNOWAIT leaves it a zombie.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    signal_group(pid, libc::SIGKILL);
    wait_pid(pid)
}

/// Makes this process a child subreaper (PR_SET_CHILD_SUBREAPER): processes orphaned below it
/// are reparented to it instead of to init, so it can find, kill and reap them.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl(2) with an integer argument; affects this process only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The process group and session of a process (from `/proc/PID/stat`); None when it is gone.
pub fn group_and_session(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let end = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[end + 1..]).ok()?;
    let mut f = rest.split_ascii_whitespace();
    // state, ppid, pgrp, session
    let pgrp = f.nth(2)?.parse().ok()?;
    let sid = f.next()?.parse().ok()?;
    Some((pgrp, sid))
}

/// Whether the environment a process started with holds `needle` (`NAME=value`) as an entry.
pub fn environment_has(pid: u32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|e| e == needle))
        .unwrap_or(false)
}

/// The children of this process, read from `/proc/self/task/TID/children` (CONFIG_PROC_CHILDREN),
/// with the file kept open so a look costs one `pread`. Only the children of the thread that made
/// it are listed: fine for a single-threaded process such as the nursery, whose orphans are
/// reparented to its one thread. Without the file it scans /proc for processes whose parent is
/// this process.
pub struct ChildList {
    file: Option<File>,
    buf: Vec<u8>,
}

impl ChildList {
    /// Opens the calling thread's list.
    pub fn open() -> ChildList {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        ChildList {
            file: File::open(format!("/proc/self/task/{tid}/children")).ok(),
            buf: Vec::new(),
        }
    }

    /// The pids of this process's children now, into `out`.
    pub fn read(&mut self, out: &mut Vec<u32>) {
        use std::os::unix::fs::FileExt;
        out.clear();
        let Some(f) = &self.file else {
            return children_by_scan(out);
        };
        let mut len = 0;
        loop {
            if self.buf.len() - len < 4096 {
                self.buf.resize(self.buf.len() + 16 * 1024, 0);
            }
            match f.read_at(&mut self.buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return children_by_scan(out),
            }
        }
        out.extend(
            self.buf[..len]
                .split(|b| *b == b' ' || *b == b'\n')
                .filter_map(|w| std::str::from_utf8(w).ok()?.parse::<u32>().ok()),
        );
    }
}

/// Children of this process by a scan of /proc (slow; only where the children file is missing).
fn children_by_scan(out: &mut Vec<u32>) {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(end) = stat.iter().rposition(|b| *b == b')') else {
            continue;
        };
        let ppid = std::str::from_utf8(&stat[end + 1..])
            .ok()
            .and_then(|r| r.split_ascii_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(me) {
            out.push(pid);
        }
    }
}

/// Every child of this process, whatever thread it hangs under.
pub fn all_children() -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_ascii_whitespace()
                        .filter_map(|w| w.parse::<u32>().ok()),
                );
            }
        }
    } else {
        children_by_scan(&mut out);
    }
    out
}

/// Kills every child of this process with its process group, and what gets reparented to it
/// meanwhile (it is a subreaper), reaping them, for at most `limit`. The last resort of a rank
/// that lost its nursery: the jobs' descendants came to it.
pub fn kill_and_reap_all_children(limit: Duration) {
    let deadline = Instant::now() + limit;
    // SAFETY: getpgrp has no preconditions.
    let own_group = unsafe { libc::getpgrp() } as u32;
    loop {
        let mut st = 0;
        // SAFETY: reaps any exited child without blocking.
        while unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) } > 0 {}
        let kids = all_children();
        if kids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for c in kids {
            if let Some((pgrp, _)) = group_and_session(c) {
                if pgrp != own_group && pgrp > 1 {
                    // SAFETY: kill(2) of a process group our child leads or belongs to.
                    unsafe { libc::kill(-(pgrp as libc::pid_t), libc::SIGKILL) };
                }
            }
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last `n` lines of a file (reads at most its last 16 KiB).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(16 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].join("\n")
}

/// Lowers the calling thread's scheduling priority by `nice` steps. Bookkeeping threads (the
/// store thread, the transition feeder) call it so that on a node whose cores are busy with jobs,
/// the threads that start and reap jobs get the CPU first; the bookkeeping is batched and does
/// not mind waiting a few milliseconds.
pub fn lower_thread_priority(nice: i32) {
    // SAFETY: gettid(2) and setpriority(2) on the calling thread only.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19));
    }
}

/// The host name of this machine.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::ffi::OsStr::from_bytes(&buf[..end])
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpi_variables_are_recognised() {
        for v in [
            "PMI_RANK",
            "PMIX_NAMESPACE",
            "HYDI_CONTROL_FD",
            "HYDRA_FOO",
            "MPI_LOCALNRANKS",
            "MPI_LOCALRANKID",
            "MPIR_CVAR_CH4_NETMOD",
            "OMPI_COMM_WORLD_RANK",
            "ORTE_X",
            "OPAL_Y",
            "PRTE_Z",
        ] {
            assert!(is_mpi_variable(v), "{v}");
        }
        for v in [
            "PATH",
            "HOME",
            "MPICH_GNI_FORK_MODE",
            "BALSAM_DB_PATH",
            "MPI_HOME",
        ] {
            assert!(!is_mpi_variable(v), "{v}");
        }
    }

    #[test]
    fn argv_is_split_like_a_shell_without_one() {
        assert_eq!(
            command_argv("echo Hello,", "world 3!").unwrap(),
            ["echo", "Hello,", "world", "3!"]
        );
        assert_eq!(
            command_argv("/bin/prog --x 'a b'", r#""c d" $HOME"#).unwrap(),
            ["/bin/prog", "--x", "a b", "c d", "$HOME"]
        );
        assert_eq!(
            command_argv("/apps/fail.py", "").unwrap(),
            ["python3", "/apps/fail.py"]
        );
        assert!(command_argv("echo 'unclosed", "")
            .unwrap_err()
            .to_string()
            .contains("unclosed"));
        assert!(command_argv("  ", "x").is_err());
    }

    #[test]
    fn envscript_wraps_without_quoting() {
        let v = with_envscript(vec!["echo".into(), "a b".into()], Some("/env/setup.sh"));
        assert_eq!(
            v,
            [
                "bash",
                "-c",
                r#"source "$0" && exec "$@""#,
                "/env/setup.sh",
                "echo",
                "a b"
            ]
        );
        assert_eq!(with_envscript(vec!["x".into()], Some(" ")), ["x"]);
    }

    #[test]
    fn spawn_writes_output_and_reports_missing_programs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("j.out");
        let mut sp = Spawner::new(&base_environment(None));
        let argv = command_argv("echo Hello,", "world 1!").unwrap();
        let pid = sp.spawn(&argv, dir.path(), &out, &[]).unwrap();
        assert_eq!(exit_status(wait_pid(pid).unwrap()), ExitStatus::Code(0));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "Hello, world 1!\n");
        let argv = vec!["no-such-program-xyz".to_string()];
        assert!(sp
            .spawn(&argv, dir.path(), &out, &[])
            .unwrap_err()
            .why
            .contains("not found"));
    }

    #[test]
    fn spawner_matches_spawn() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("j.out");
        std::env::set_var("BALSAM_TEST_OVERRIDE", "old");
        let mut sp = Spawner::new(&base_environment(None));
        let argv: Vec<String> = ["sh", "-c", "echo $BALSAM_TEST_OVERRIDE $X; pwd; grep SigIgn /proc/self/status; echo err >&2; ls /proc/self/fd | wc -l"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![
            ("BALSAM_TEST_OVERRIDE".to_string(), "new".to_string()),
            ("X".to_string(), "a b".to_string()),
        ];
        let pid = sp.spawn(&argv, dir.path(), &out, &env).unwrap();
        assert!(wait_pid(pid).unwrap().success());
        let text = std::fs::read_to_string(&out).unwrap();
        let wd = std::fs::canonicalize(dir.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "new a b");
        assert_eq!(lines[1], wd.display().to_string());
        assert_eq!(lines[3], "err");
        // stdin, stdout, stderr and the directory `ls` reads: nothing inherited.
        assert_eq!(lines[4], "4", "{text}");
        // SIGPIPE, which Rust ignores, is back to its default in the job.
        let ignored =
            u64::from_str_radix(lines[2].trim_start_matches("SigIgn:").trim(), 16).unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
        let e = sp
            .spawn(&["/no/such".to_string()], dir.path(), &out, &[])
            .unwrap_err();
        assert!(e.why.contains("not found") && !e.infrastructure, "{e}");
        let e = sp
            .spawn(&["true".to_string()], &dir.path().join("gone"), &out, &[])
            .unwrap_err();
        assert!(e.why.contains("does not exist") && e.infrastructure, "{e}");
        assert!(matches!(e.into_status(), ExitStatus::Infrastructure(_)));
        let e = sp
            .spawn(
                &["true".to_string()],
                dir.path(),
                &dir.path().join("no/such/dir/x.out"),
                &[],
            )
            .unwrap_err();
        assert!(
            e.why.contains("cannot open output file") && e.infrastructure,
            "{e}"
        );
        let noexec = dir.path().join("noexec");
        std::fs::write(&noexec, "#!/bin/sh\n").unwrap();
        let e = sp
            .spawn(&[noexec.display().to_string()], dir.path(), &out, &[])
            .unwrap_err();
        assert!(e.why.contains("not executable") && !e.infrastructure, "{e}");
        assert!(matches!(e.into_status(), ExitStatus::NotStarted(_)));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let t = tail_lines(&p, 3);
        assert_eq!(t, "line 97\nline 98\nline 99");
        assert_eq!(tail_lines(&dir.path().join("none"), 3), "");
    }
}
