//! `balsam launcher`: starts the MPI launcher here, as `mpiexec -n N+1 balsam-mpi-launcher ...`
//! (rank 0 the master, N workers), and waits for it. SIGINT and SIGTERM are passed on to
//! mpiexec, which passes them to the ranks: the launcher then stops cleanly (running jobs become
//! RUN_TIMEOUT, then RESTART_READY) and exits 0. mpiexec runs in its own process group so a
//! terminal's Ctrl-C reaches it once, through us.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use balsam_launcher::{LaunchOptions, LAUNCHER_BIN};
use balsam_store::DbDir;

/// Arguments of `balsam launcher`.
#[derive(clap::Args, Debug)]
pub struct LauncherArgs {
    /// Worker ranks to start (the launcher runs N+1 MPI ranks; rank 0 is the master)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_workers: u32,
    #[command(flatten)]
    pub opts: LaunchOptions,
}

/// Runs the launcher and returns its exit code.
pub fn run(db: &DbDir, args: &LauncherArgs) -> Result<i32> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let launcher = find_launcher()?;
    let mpiexec = find_program(&["mpiexec.mpich", "mpiexec"]).context(
        "no mpiexec found on PATH; install MPICH (apt-get install mpich) or start balsam-mpi-launcher with your MPI launcher",
    )?;
    let mut cmd = Command::new(&mpiexec);
    cmd.arg("-n")
        .arg((args.num_workers + 1).to_string())
        .arg(&launcher)
        .arg("--db")
        .arg(&db.root)
        .args(args.opts.to_args())
        .env("BALSAM_DB_PATH", &db.root)
        .process_group(0);
    tracing::info!("starting {:?}", cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", mpiexec.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
        }
    });
    let status = child.wait().context("waiting for mpiexec")?;
    handle.close();
    let _ = forwarder.join();
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

/// `balsam-mpi-launcher` beside this executable, else on PATH.
fn find_launcher() -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        let p = dir.join(LAUNCHER_BIN);
        if p.is_file() {
            return Ok(p);
        }
    }
    match find_program(&[LAUNCHER_BIN]) {
        Some(p) => Ok(p),
        None => bail!("{LAUNCHER_BIN} is neither beside balsam nor on PATH; install it with balsam (cargo install --path launcher)"),
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}
