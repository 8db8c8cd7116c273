//! A private PostgreSQL server whose data lives in a database directory (`balsam init DIR
//! --postgres`, `balsam server start|stop|status`): processes and files only, no SQL.
//!
//! - The data folder is `DIR/balsamdb`, the server's log `DIR/log/postgresql.log`; `server-info`
//!   names the address clients connect to, `pgpass` (mode 0600) holds the generated password.
//! - Every connection proves that password (scram-sha-256): `pg_hba.conf` has no `trust` and no
//!   `peer` line. The server listens on every interface, since compute nodes reach a login node
//!   through whichever network the site gives them; it has no Unix socket, as a socket file on a
//!   shared file system is at best useless to other hosts.
//! - PostgreSQL refuses to run as root. When root creates or starts the server, it runs as an
//!   unprivileged user (`postgres`, which Debian's package creates, unless told otherwise) that
//!   owns the data folder; every folder above it is made searchable for that user.
//! - The server is found, signalled and stopped by the pid in `postmaster.pid`, after checking
//!   that this pid is the postmaster of this data folder (the pid of a server of another host,
//!   or of a stale file, may name any process here).
//! - It runs where `server-info` says clients connect: `start` refuses on any other host.

use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::server_info::{ServerInfo, SERVER_INFO_FILE};

/// The server's data folder inside the database directory.
pub const DATA_DIR: &str = "balsamdb";
/// The server's log, relative to the database directory.
pub const LOG_FILE: &str = "log/postgresql.log";
/// The database user and database name of a private server.
pub const DB_USER: &str = "balsam";
/// The user the server runs as when root starts it.
pub const DEFAULT_OS_USER: &str = "postgres";
/// How long starting may take before it counts as failed.
const START_TIMEOUT_S: u32 = 60;
/// How long a fast shutdown may take before the server is stopped at once.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `status` waits for the server's port to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The settings balsam adds to the server's `postgresql.conf`, and why.
const CONF: &str = "\
# --- balsam: a private server for one database directory ---
# Compute nodes connect over TCP through whichever network reaches this host; pg_hba.conf asks
# every connection for the password (scram-sha-256).
listen_addresses = '*'
password_encryption = scram-sha-256
# No socket file: clients use TCP, and a socket on a shared file system serves no other host.
unix_socket_directories = ''
# Every launcher holds a few connections (its store thread, its transition threads).
max_connections = 400
# A commit returns before its WAL reaches the disk: a crash of this machine may lose the last
# fraction of a second of commits, never corrupts the database (fsync and full_page_writes stay
# on). These are the semantics of SQLite's WAL with synchronous=NORMAL, the embedded backend's,
# at a fraction of the cost of a disk flush per state change on a shared file system.
synchronous_commit = off
# Fewer checkpoints during bulk imports of a large campaign.
max_wal_size = 4GB
";

/// The whole of `pg_hba.conf`.
const HBA: &str = "\
# balsam: every connection proves the password (scram-sha-256); never `trust`, never `peer`.
# TYPE  DATABASE  USER  ADDRESS    METHOD
host    all       all   0.0.0.0/0  scram-sha-256
host    all       all   ::/0       scram-sha-256
";

/// What `balsam init --postgres` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The name or address clients connect to (default: this machine's host name).
    pub host: Option<String>,
    /// The TCP port (default: a free one).
    pub port: Option<u16>,
    /// The system user the server runs as when the caller is root (default `postgres`).
    pub os_user: Option<String>,
}

/// A private server made by [`create`], running.
#[derive(Debug)]
pub struct Created {
    /// Its address, for `server-info`.
    pub info: ServerInfo,
    /// The generated password, for `pgpass`.
    pub password: String,
    /// What `pg_ctl start` printed.
    pub start_output: String,
    /// What was done that the user should know (the user it runs as, folders made
    /// searchable, a host other hosts may not reach).
    pub notes: Vec<String>,
}

/// The state of a database directory's server, as seen from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The postmaster's pid, when it runs on this host.
    pub pid: Option<i32>,
    /// The postmaster's own word on its state (`ready`, `starting`, `stopping`), when it runs
    /// on this host.
    pub state: Option<String>,
    /// Whether something answers at the address in `server-info`.
    pub answers: bool,
}

impl Status {
    /// The server runs (here or on its host).
    pub fn is_running(&self) -> bool {
        self.pid.is_some() || self.answers
    }
}

/// What [`start`] did.
#[derive(Debug)]
pub enum Started {
    /// It was running already (pid on this host).
    AlreadyRunning(i32),
    /// Started now; what `pg_ctl start` printed.
    Started {
        /// `pg_ctl`'s output ("waiting for server to start.... done / server started").
        output: String,
    },
}

/// What [`stop`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// No server of this directory runs on this host.
    NotRunning,
    /// The postmaster with this pid stopped.
    Stopped(i32),
}

/// The data folder of a database directory's private server.
pub fn data_dir(db_dir: &Path, info: &ServerInfo) -> PathBuf {
    db_dir.join(&info.data_dir)
}

/// Creates a private server in `db_dir` (which must not hold a database yet), and starts it.
/// On failure nothing of it is left: the data folder is removed and no process runs.
pub fn create(db_dir: &Path, opts: &CreateOptions) -> Result<Created> {
    for f in [crate::dir::DB_FILE, SERVER_INFO_FILE] {
        if db_dir.join(f).exists() {
            return Err(Error::AlreadyExists(db_dir.to_path_buf()));
        }
    }
    let data = db_dir.join(DATA_DIR);
    if data.exists() {
        return Err(Error::Refused(format!(
            "{} already exists: a server's data folder from an earlier `balsam init`? Remove it or choose another directory",
            data.display()
        )));
    }
    let initdb = find_bin("initdb")?;
    let mut notes = Vec::new();
    let runner = Runner::for_new_server(opts.os_user.as_deref())?;
    if let Some(u) = &runner.user {
        notes.push(format!(
            "the server runs as the user {}: PostgreSQL refuses to run as root",
            u.name
        ));
    }
    let host = match &opts.host {
        Some(h) => h.clone(),
        None => this_host()?,
    };
    match is_local(&host) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::Refused(format!(
                "--pg-host {host} is not an address of this machine: the server runs here, so clients must reach it under a name or address of this host"
            )))
        }
        Err(e) => return Err(e),
    }
    if let Some(p) = opts.port {
        let (lo, hi) = ephemeral_ports();
        if (lo..=hi).contains(&p) {
            notes.push(format!(
                "port {p} is in this host's range for outgoing connections ({lo}-{hi}): when the server restarts, a client's connection may hold it"
            ));
        }
    }
    if resolves_to_loopback_only(&host) {
        notes.push(format!(
            "{host} resolves to a loopback address here: other hosts may not reach the server; pass --pg-host with this host's address on the network compute nodes use"
        ));
    }

    // The database directory, private when made here (others need not read jobs' data; the
    // server's user, if any, only needs to pass through).
    if !db_dir.exists() {
        std::fs::create_dir_all(db_dir)
            .map_err(|e| Error::io(format!("cannot create {}", db_dir.display()), e))?;
        let mode = if runner.user.is_some() { 0o711 } else { 0o700 };
        set_mode(db_dir, mode)?;
    }
    let db_dir = std::fs::canonicalize(db_dir)
        .map_err(|e| Error::io(format!("cannot resolve {}", db_dir.display()), e))?;
    let data = db_dir.join(DATA_DIR);
    let made = (|| -> Result<Created> {
        if let Some(u) = &runner.user {
            for d in make_searchable(&db_dir, u)? {
                notes.push(format!(
                    "made {} searchable by others (o+x) so that {} reaches the server's data",
                    d.display(),
                    u.name
                ));
            }
        }
        create_owned_dir(&data, 0o700, runner.user.as_ref())?;
        let log_dir = db_dir.join("log");
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| Error::io(format!("cannot create {}", log_dir.display()), e))?;
        create_owned_file(&db_dir.join(LOG_FILE), runner.user.as_ref())?;

        let password = new_password()?;
        // initdb reads the password from a file the server's user can read; it never appears
        // on a command line.
        let pwfile = db_dir.join(format!(".initdb-password-{}", std::process::id()));
        let _ = std::fs::remove_file(&pwfile);
        create_owned_file(&pwfile, runner.user.as_ref())?;
        std::fs::write(&pwfile, format!("{password}\n"))
            .map_err(|e| Error::io(format!("cannot write {}", pwfile.display()), e))?;
        let out = runner
            .command(&initdb, &db_dir)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                DB_USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output();
        let _ = std::fs::remove_file(&pwfile);
        let out = out.map_err(|e| Error::io(format!("cannot run {}", initdb.display()), e))?;
        if !out.status.success() {
            return Err(Error::Refused(format!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // Rewritten in place: the files keep their owner, the server's user.
        rewrite(&data.join("pg_hba.conf"), HBA, false)?;
        rewrite(&data.join("postgresql.conf"), CONF, true)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            // A later line wins: a retry on another port appends its own.
            rewrite(
                &data.join("postgresql.conf"),
                &format!("port = {port}\n"),
                true,
            )?;
            let info = ServerInfo {
                backend: "postgres".into(),
                host: host.clone(),
                port,
                user: DB_USER.into(),
                dbname: DB_USER.into(),
                data_dir: DATA_DIR.into(),
                os_user: runner
                    .user
                    .as_ref()
                    .map(|u| u.name.clone())
                    .unwrap_or_default(),
            };
            match pg_ctl_start(&db_dir, &info, &runner) {
                Ok(start_output) => {
                    return Ok(Created {
                        info,
                        password,
                        start_output,
                        notes: std::mem::take(&mut notes),
                    })
                }
                // Someone took the free port meanwhile: take another.
                Err(e)
                    if opts.port.is_none()
                        && tries < 3
                        && e.to_string().contains("Address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    })();
    if made.is_err() {
        if let Some(pid) = postmaster_here(&data) {
            let _ = stop_pid(pid);
        }
        let _ = std::fs::remove_dir_all(&data);
    }
    made
}

/// Removes a private server's data folder (after a failed `balsam init`); the server must be
/// stopped.
pub fn remove_data(db_dir: &Path, info: &ServerInfo) -> Result<()> {
    if info.data_dir.is_empty() {
        return Ok(());
    }
    let data = data_dir(db_dir, info);
    match std::fs::remove_dir_all(&data) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", data.display()), e)),
    }
}

/// The server as seen from here: its postmaster on this host, and whether its address answers.
pub fn status(db_dir: &Path, info: &ServerInfo) -> Status {
    let here = runs_here(db_dir, info).map(|pid| (pid, pid_file_state(&data_dir(db_dir, info))));
    Status {
        pid: here.as_ref().map(|(p, _)| *p),
        state: here.and_then(|(_, s)| s),
        answers: answers(&info.host, info.port, PROBE_TIMEOUT),
    }
}

/// Starts the private server of `db_dir` unless it runs. Refused for a site's server and on a
/// host other than the one clients connect to.
pub fn start(db_dir: &Path, info: &ServerInfo) -> Result<Started> {
    managed(db_dir, info)?;
    let data = data_dir(db_dir, info);
    if !is_local(&info.host)? {
        let what = if answers(&info.host, info.port, PROBE_TIMEOUT) {
            "it answers there"
        } else {
            "nothing answers there"
        };
        return Err(Error::Refused(format!(
            "the server of {} runs on {} (clients connect to {}; {what}): start it on that host with `balsam server start`",
            db_dir.display(),
            info.host,
            info.address()
        )));
    }
    if let Some(pid) = postmaster_here(&data) {
        return Ok(Started::AlreadyRunning(pid));
    }
    let runner = Runner::for_server(info)?;
    match pg_ctl_start(db_dir, info, &runner) {
        Ok(output) => Ok(Started::Started { output }),
        Err(e) => match postmaster_here(&data) {
            // Another `balsam server start` (another shell's balsamactivate) won the race.
            Some(pid) => Ok(Started::AlreadyRunning(pid)),
            None => Err(e),
        },
    }
}

/// Stops the private server of `db_dir` if it runs on this host: a fast shutdown (sessions are
/// ended, committed work is kept), then an immediate one if it takes over a minute.
pub fn stop(db_dir: &Path, info: &ServerInfo) -> Result<Stopped> {
    managed(db_dir, info)?;
    match runs_here(db_dir, info) {
        None => Ok(Stopped::NotRunning),
        Some(pid) => {
            stop_pid(pid)?;
            Ok(Stopped::Stopped(pid))
        }
    }
}

/// The pid of the directory's postmaster when it runs on this host, the host clients connect
/// to. (Another host may show a process of the same pid, or, sharing its process table as
/// network namespaces do, the very process: neither is "here".)
fn runs_here(db_dir: &Path, info: &ServerInfo) -> Option<i32> {
    if info.data_dir.is_empty() || !is_local(&info.host).unwrap_or(false) {
        return None;
    }
    postmaster_here(&data_dir(db_dir, info))
}

/// Refuses a site's server (`balsam init --db-url`): balsam does not run it.
fn managed(db_dir: &Path, info: &ServerInfo) -> Result<()> {
    if info.data_dir.is_empty() {
        return Err(Error::Refused(format!(
            "{} uses the site's database server at {}, which balsam does not run; ask the site to start it",
            db_dir.display(),
            info.address()
        )));
    }
    Ok(())
}

/// Runs `pg_ctl start` and waits until the server accepts connections; the log's last lines
/// when it fails.
fn pg_ctl_start(db_dir: &Path, info: &ServerInfo, runner: &Runner) -> Result<String> {
    let pg_ctl = find_bin("pg_ctl")?;
    let data = data_dir(db_dir, info);
    let log = db_dir.join(LOG_FILE);
    if !log.exists() {
        create_owned_file(&log, runner.user.as_ref())?;
    }
    let out = runner
        .command(&pg_ctl, db_dir)
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", &START_TIMEOUT_S.to_string(), "start"])
        .output()
        .map_err(|e| Error::io(format!("cannot run {}", pg_ctl.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let tail = || {
        std::fs::read_to_string(&log)
            .map(|t| {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            })
            .unwrap_or_default()
    };
    if !out.status.success() {
        return Err(Error::Refused(format!(
            "the database server did not start ({}): {}{}\n{} says:\n{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr),
            log.display(),
            tail()
        )));
    }
    // The server runs once it could listen on any address; clients need the one they use.
    if !answers(&info.host, info.port, PROBE_TIMEOUT) {
        if let Some(pid) = postmaster_here(&data) {
            let _ = stop_pid(pid);
        }
        return Err(Error::Refused(format!(
            "the database server started but does not answer at {}, so it was stopped again. {} says:\n{}",
            info.address(),
            log.display(),
            tail()
        )));
    }
    Ok(text)
}

/// Asks the postmaster `pid` to stop and waits for it.
fn stop_pid(pid: i32) -> Result<()> {
    // SIGINT: fast shutdown (rolls back open transactions, writes a checkpoint).
    signal(pid, libc::SIGINT)?;
    if wait_gone(pid, STOP_TIMEOUT) {
        return Ok(());
    }
    // SIGQUIT: immediate shutdown; the next start recovers from the WAL.
    signal(pid, libc::SIGQUIT)?;
    if wait_gone(pid, Duration::from_secs(10)) {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "the database server (pid {pid}) did not stop"
    )))
}

fn signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) on the pid of a postmaster checked to be this data folder's.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(Error::io(
        format!("cannot signal the server (pid {pid})"),
        e,
    ))
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// A live, non-zombie process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The pid in `DATA/postmaster.pid` when that process runs here and is this folder's
/// postmaster.
fn postmaster_here(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0 && alive(pid) && is_postmaster_of(pid, data)).then_some(pid)
}

/// The state line of `postmaster.pid` (`ready`, `starting`, `stopping`, `standby`).
fn pid_file_state(data: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines()
        .nth(7)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether process `pid` is a postmaster of `data`: its working directory is the data folder
/// (the server changes into it), or, when that cannot be read, its command line names it.
fn is_postmaster_of(pid: i32, data: &Path) -> bool {
    let Ok(data) = std::fs::canonicalize(data) else {
        return false;
    };
    if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
        return cwd == data;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_postgres = args
        .first()
        .is_some_and(|a| Path::new(std::ffi::OsStr::from_bytes(a)).ends_with("postgres"));
    is_postgres
        && args.windows(2).any(|w| {
            w[0] == b"-D"
                && std::fs::canonicalize(std::ffi::OsStr::from_bytes(w[1])).ok()
                    == Some(data.clone())
        })
}

/// Whether a TCP connection to `host:port` is accepted within `timeout`.
pub fn answers(host: &str, port: u16, timeout: Duration) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    let t = Instant::now();
    addrs.into_iter().any(|a| {
        let left = timeout.saturating_sub(t.elapsed());
        !left.is_zero() && TcpStream::connect_timeout(&a, left).is_ok()
    })
}

/// Whether `host` names this machine: one of its addresses can be bound here.
pub fn is_local(host: &str) -> Result<bool> {
    let addrs: Vec<_> = (host, 0)
        .to_socket_addrs()
        .map_err(|e| {
            Error::Refused(format!(
                "cannot resolve the database server's host {host:?} here: {e}"
            ))
        })?
        .collect();
    Ok(addrs.iter().any(|a| TcpListener::bind((a.ip(), 0)).is_ok()))
}

fn resolves_to_loopback_only(host: &str) -> bool {
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let v: Vec<_> = addrs.collect();
            !v.is_empty() && v.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// This machine's host name.
pub fn this_host() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(Error::io(
            "cannot read this machine's host name",
            std::io::Error::last_os_error(),
        ));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// A port nobody uses now, outside the range the kernel hands out to outgoing connections: a
/// port in that range may be held by a client's connection when the server restarts (seen
/// here: the server came back on IPv6 only, unreachable on IPv4).
fn free_port() -> Result<u16> {
    let (lo, hi) = ephemeral_ports();
    let candidates: Vec<u16> = if lo > 11_000 {
        (10_000..lo).collect()
    } else {
        (hi.saturating_add(1)..=65_535).collect()
    };
    if candidates.is_empty() {
        return Err(Error::Refused(
            "no TCP port outside this host's range for outgoing connections; pass --pg-port PORT"
                .into(),
        ));
    }
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|e| Error::io("cannot read /dev/urandom", e))?;
    let start = u64::from_le_bytes(seed) as usize;
    (0..500)
        .map(|i| candidates[(start + i * 7919) % candidates.len()])
        .find(|p| port_is_free(*p))
        .ok_or_else(|| {
            Error::Refused("no free TCP port found for the server; pass --pg-port PORT".into())
        })
}

/// Nothing listens on or holds `port`, on IPv4 or IPv6.
fn port_is_free(port: u16) -> bool {
    let v6 = match TcpListener::bind(("::", port)) {
        Ok(_) => true,
        // No IPv6 on this host: only IPv4 counts.
        Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
    };
    v6 && TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The kernel's range of ports for outgoing connections.
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// 32 random bytes from the kernel, as hex (no character a `.pgpass` line must escape).
fn new_password() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| Error::io("cannot read /dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A PostgreSQL program: `BALSAM_PG_BIN`, the newest `/usr/lib/postgresql/*/bin` (Debian keeps
/// the server programs off PATH), `pg_config --bindir`, then PATH.
pub fn find_bin(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("BALSAM_PG_BIN") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(Vec<u32>, PathBuf)> = rd
            .flatten()
            .map(|e| {
                let v = e
                    .file_name()
                    .to_string_lossy()
                    .split('.')
                    .map(|p| p.parse().unwrap_or(0))
                    .collect();
                (v, e.path().join("bin"))
            })
            .collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev().map(|(_, p)| p));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            dirs.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Refused(format!(
                "PostgreSQL's {name} not found (looked in $BALSAM_PG_BIN, /usr/lib/postgresql/*/bin, `pg_config --bindir` and PATH); install the server (Debian: apt-get install postgresql) or set BALSAM_PG_BIN to the folder that holds initdb and pg_ctl"
            ))
        })
}

/// A system user.
#[derive(Debug, Clone)]
struct OsUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

fn lookup_user(name: &str) -> Option<OsUser> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; it is read at once, on
    // this thread, before any other call that could overwrite it.
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        if pw.is_null() {
            return None;
        }
        let home = std::ffi::CStr::from_ptr((*pw).pw_dir).to_bytes();
        Some(OsUser {
            name: name.to_string(),
            uid: (*pw).pw_uid,
            gid: (*pw).pw_gid,
            home: PathBuf::from(std::ffi::OsStr::from_bytes(home)),
        })
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the server's programs as the server's user.
struct Runner {
    /// The user to switch to (root only); None: as the caller.
    user: Option<OsUser>,
}

impl Runner {
    /// For a new server: as root, the given user or `postgres`; otherwise the caller.
    fn for_new_server(os_user: Option<&str>) -> Result<Runner> {
        if !is_root() {
            if let Some(u) = os_user {
                return Err(Error::Refused(format!(
                    "--pg-os-user {u}: only root may run the server as another user; without it the server runs as you"
                )));
            }
            return Ok(Runner { user: None });
        }
        let name = os_user.unwrap_or(DEFAULT_OS_USER);
        let user = lookup_user(name).ok_or_else(|| {
            Error::Refused(format!(
                "PostgreSQL refuses to run as root, and there is no user {name:?} to run it as. Run balsam as an ordinary user, create the user (Debian's postgresql package creates `postgres`), or name another with --pg-os-user USER"
            ))
        })?;
        if user.uid == 0 {
            return Err(Error::Refused(format!(
                "the user {name:?} is root, and PostgreSQL refuses to run as root; name an unprivileged user with --pg-os-user USER"
            )));
        }
        Ok(Runner { user: Some(user) })
    }

    /// For an existing server: as the user in `server-info` (switching to it needs root).
    fn for_server(info: &ServerInfo) -> Result<Runner> {
        if info.os_user.is_empty() {
            if is_root() {
                return Err(Error::Refused(
                    "PostgreSQL refuses to run as root, and this server was created by another user: start it as that user".into(),
                ));
            }
            return Ok(Runner { user: None });
        }
        let user = lookup_user(&info.os_user).ok_or_else(|| {
            Error::Refused(format!(
                "the server runs as the user {:?}, which does not exist on this host",
                info.os_user
            ))
        })?;
        if is_root() {
            return Ok(Runner { user: Some(user) });
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == user.uid {
            return Ok(Runner { user: None });
        }
        Err(Error::Refused(format!(
            "the server runs as the user {}: start it as {} or as root",
            info.os_user, info.os_user
        )))
    }

    fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(cwd).stdin(std::process::Stdio::null());
        // The server and its tools read these; they must not point elsewhere.
        for v in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            c.env_remove(v);
        }
        if let Some(u) = &self.user {
            // std drops root's supplementary groups when it changes the uid.
            c.uid(u.uid)
                .gid(u.gid)
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name);
        }
        c
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("cannot set the mode of {}", path.display()), e))
}

fn chown(path: &Path, user: &OsUser) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
        Error::io(
            format!("cannot give {} to {}", path.display(), user.name),
            e,
        )
    })
}

fn create_owned_dir(path: &Path, mode: u32, user: Option<&OsUser>) -> Result<()> {
    std::fs::create_dir(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    set_mode(path, mode)?;
    if let Some(u) = user {
        chown(path, u)?;
    }
    Ok(())
}

/// Creates (or keeps) a file of mode 0600 owned by `user`.
fn create_owned_file(path: &Path, user: Option<&OsUser>) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    if let Some(u) = user {
        chown(path, u)?;
    }
    Ok(())
}

/// Writes `text` into an existing file in place (appended, or replacing its contents), so it
/// keeps its owner and mode.
fn rewrite(path: &Path, text: &str, append: bool) -> Result<()> {
    let err = |e| Error::io(format!("cannot write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Adds o+x to every folder from `dir` up that `user` could not pass through; returns them.
fn make_searchable(dir: &Path, user: &OsUser) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for d in dir.ancestors() {
        let m = std::fs::metadata(d)
            .map_err(|e| Error::io(format!("cannot read {}", d.display()), e))?;
        let mode = m.mode();
        let can = if m.uid() == user.uid {
            mode & 0o100 != 0
        } else if m.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can {
            set_mode(d, (mode & 0o7777) | 0o001)?;
            changed.push(d.to_path_buf());
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_rules_ask_every_connection_for_the_password() {
        for line in HBA
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            assert!(line.ends_with("scram-sha-256"), "{line}");
            assert!(line.starts_with("host "), "TCP lines only: {line}");
        }
        assert!(!HBA.contains("trust ") && !HBA.ends_with("trust"));
        assert!(CONF.contains("synchronous_commit = off"));
        assert!(!CONF.contains("fsync = off") && !CONF.contains("full_page_writes = off"));
    }

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local("127.0.0.1").unwrap());
        // 198.51.100.0/24 is reserved for documentation: never an address of this machine.
        assert!(!is_local("198.51.100.7").unwrap());
        assert!(is_local("no-such-host.invalid").is_err());
    }

    #[test]
    fn passwords_are_long_and_differ() {
        let (a, b) = (new_password().unwrap(), new_password().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_dead_pid_or_another_process_is_not_a_postmaster() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("postmaster.pid"),
            format!("{}\n{}\n", std::process::id(), tmp.path().display()),
        )
        .unwrap();
        // This test process is alive but is no postmaster of that folder.
        assert_eq!(postmaster_here(tmp.path()), None);
        std::fs::write(tmp.path().join("postmaster.pid"), "999999999\n").unwrap();
        assert_eq!(postmaster_here(tmp.path()), None);
    }
}
