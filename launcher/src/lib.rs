//! The Balsam launcher: the pilot that runs a database's jobs inside a batch allocation.
//!
//! `balsam-mpi-launcher` runs as one MPI job (`mpiexec -n N+1`, `aprun -n N -N 1`, `srun`).
//! Rank 0 ([`master`]) leases runnable jobs through its store thread ([`store_thread`]), farms
//! serial jobs out to the worker ranks ([`worker`]) over MPI messages ([`messages`]), packing
//! several per node ([`packing`], [`nodes`]), and starts multi-node jobs itself with the system's
//! MPI launcher ([`mpirun`]) on nodes it reserves. Which job runs where is decided by
//! [`scheduler`], when an idle launcher leaves by [`idle`], and whether jobs may start at all
//! (the database and the job files can be written) is tracked in [`health`]; all three are pure
//! enough to be tested without MPI. Processes are started and watched by [`executor`] through
//! [`process`], inside each rank's process [`nursery`], so that every process a job starts ends
//! with the job, and with its rank. Everything before and after a run — parents, stage-in,
//! pre/postprocess, stage-out — is in [`transitions`], which the service runs too.
//!
//! Failures of jobs never stop the launcher; a failure of the launcher (a panic in any rank)
//! aborts the whole MPI job within seconds, and its leases expire so another launcher finishes
//! its jobs.

pub mod config;
pub mod error;
pub mod executor;
pub mod health;
pub mod idle;
pub mod jobenv;
pub mod logging;
pub mod master;
pub mod messages;
pub mod mpirun;
pub mod nodes;
pub mod nursery;
pub mod packing;
pub mod process;
pub mod scheduler;
pub mod store_thread;
pub mod transitions;
pub mod worker;

pub use config::{Config, JobMode, LaunchOptions};
pub use error::{Error, Result};
pub use jobenv::{job_environment, LauncherContext};
pub use messages::Message;
pub use transitions::{
    after_run, process_pending, AfterRun, RunResult, TransitionOptions, TransitionPool, Transitions,
};

/// Name of the launcher binary (`balsam launcher` looks for it beside itself, then on PATH).
pub const LAUNCHER_BIN: &str = "balsam-mpi-launcher";
