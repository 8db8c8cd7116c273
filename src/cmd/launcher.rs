//! `balsam launcher`: starts the MPI launcher, as `mpiexec -n N+1 balsam-mpi-launcher ...` here
//! (rank 0 the master, N workers) or, inside a batch job, across the allocation's nodes as the job
//! templates do (see [`in_allocation`]), and waits for it. SIGINT and SIGTERM are passed on to
//! mpiexec, which passes them to the ranks: the launcher then stops cleanly (running jobs become
//! RUN_TIMEOUT, then RESTART_READY) and exits 0. mpiexec runs in its own process group so a
//! terminal's Ctrl-C reaches it once, through us, and gets SIGTERM when we die, even by SIGKILL.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use balsam_cobalt::{launcher_ranks_command, Allocation};
use balsam_launcher::mpirun::MpiRun;
use balsam_launcher::{JobMode, LAUNCHER_BIN};
use balsam_store::DbDir;

pub use balsam::launcher_line::LauncherArgs;

/// Runs the launcher and returns its exit code.
pub fn run(db: &DbDir, args: &LauncherArgs) -> Result<i32> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let launcher = find_launcher()?;
    let mut launcher_argv: Vec<String> = vec![
        launcher.display().to_string(),
        "--db".into(),
        db.root.display().to_string(),
    ];
    launcher_argv.extend(args.opts.to_args());
    let argv = match Allocation::from_process_env()
        .context("cannot read the batch job's environment")?
    {
        Some(alloc) => in_allocation(db, args, &alloc, &launcher_argv)?,
        None => {
            let mpiexec = find_program(&["mpiexec.mpich", "mpiexec"]).context(
                "no mpiexec found on PATH; install MPICH (apt-get install mpich) or start balsam-mpi-launcher with your MPI launcher",
            )?;
            let ranks = args.num_workers.unwrap_or(1) + 1;
            let mut argv = vec![
                mpiexec.display().to_string(),
                "-n".into(),
                ranks.to_string(),
            ];
            argv.extend(launcher_argv);
            argv
        }
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("BALSAM_DB_PATH", &db.root)
        .process_group(0);
    // Its own process group keeps mpiexec out of a terminal's signals and of a kill of ours,
    // so without this a `balsam launcher` killed with SIGKILL would leave the pilot running
    // unseen, with no one to wait for it. When this process dies, mpiexec gets SIGTERM, which
    // stops the launcher as Ctrl-C does: running jobs become RESTART_READY.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl(2), getppid(2) and raise(3) are async-signal-safe; the closure allocates
    // nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nothing would ever send it.
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    tracing::info!("starting {}", shell_words::join(&argv));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", argv[0]))?;
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
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", argv[0]))?;
    handle.close();
    let _ = forwarder.join();
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    })
}

/// Inside a batch job the launcher runs where the shipped templates run it: one rank on each
/// node of the allocation, started with the site's MPI launch command, and none on the head
/// (MOM) node where the batch script runs; in job mode mpi, alone on the head node.
fn in_allocation(
    db: &DbDir,
    args: &LauncherArgs,
    alloc: &Allocation,
    launcher_argv: &[String],
) -> Result<Vec<String>> {
    if let Some(n) = args.num_workers {
        bail!(
            "--num-workers {n} starts worker ranks on this host, but this is {} batch job {} \
             with {} node(s): inside a batch job `balsam launcher` runs one launcher rank on each \
             node of the allocation. Leave out --num-workers.",
            alloc.scheduler,
            alloc.job_id,
            alloc.node_count
        );
    }
    let settings = db.settings()?;
    let path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mpirun = MpiRun::from_settings(&settings, &path)?;
    let cpus_on_node = std::env::var("SLURM_CPUS_ON_NODE")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let alone = args.opts.job_mode == JobMode::Mpi;
    let argv = launcher_ranks_command(
        alloc,
        mpirun.kind(),
        mpirun.config(),
        alone,
        cpus_on_node,
        launcher_argv,
    )?;
    // The batch job's output says where the launcher went.
    eprintln!(
        "balsam launcher: in {} batch job {} ({} node(s)): {}",
        alloc.scheduler,
        alloc.job_id,
        alloc.node_count,
        if alone {
            "job mode mpi, the launcher runs here and starts each job with the MPI launch command"
                .to_string()
        } else {
            format!("one launcher rank per node: {}", shell_words::join(&argv))
        }
    );
    Ok(argv)
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
