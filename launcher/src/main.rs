//! `balsam-mpi-launcher`: one MPI job that runs a Balsam database's jobs. Rank 0 is the master,
//! every other rank a worker. Normally started by `balsam launcher` or a batch job template.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use balsam_launcher::{logging, master, nursery, process, worker, LaunchOptions};
use clap::Parser;
use mpi::topology::Communicator;
use mpi::Threading;

/// The Balsam MPI launcher (rank 0: master; other ranks: workers)
#[derive(Parser)]
#[command(name = "balsam-mpi-launcher", version)]
struct Cli {
    /// The Balsam database directory [default: $BALSAM_DB_PATH]
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    #[command(flatten)]
    opts: LaunchOptions,
}

fn main() {
    // The same binary is each rank's process nursery (see `nursery`): that mode takes over here.
    nursery::run_if_requested();
    let cli = Cli::parse();
    // Processes orphaned below this rank come back to it rather than to init: should a nursery
    // die on its own, the rank finds what its jobs left, kills it and ends (nursery::fatal_loss).
    if let Err(e) = process::become_subreaper() {
        eprintln!("balsam-mpi-launcher: cannot become a child subreaper: {e}");
    }
    let Some((universe, _threading)) = mpi::initialize_with_threading(Threading::Funneled) else {
        eprintln!("balsam-mpi-launcher: MPI was already initialized");
        std::process::exit(1);
    };
    let world = universe.world();
    let rank = world.rank();
    let level = std::env::var("BALSAM_LOG_LEVEL").unwrap_or_else(|_| {
        if rank == 0 {
            "info".into()
        } else {
            "warn".into()
        }
    });
    let log = logging::init(rank, &level);
    logging::install_panic_hook();
    // SIGTERM/SIGINT set a flag the master polls; workers ignore them (mpiexec forwards them to
    // every rank, but only the master decides what happens to the jobs).
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, term.clone()) {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let code = if rank == 0 {
        master::run(&world, cli.db, cli.opts, &log, term)
    } else {
        worker::run(&world, &log)
    };
    drop(universe);
    std::process::exit(code);
}
