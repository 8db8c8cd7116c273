//! Batch schedulers and MPI launch commands for Balsam.
//!
//! Everything Balsam needs to know about the machine it runs on, kept out of the store and the
//! launcher so that a new site means a new file here and nowhere else:
//!
//! - [`Scheduler`]: submit a launcher job, list the user's batch jobs, cancel one; for Cobalt,
//!   Slurm, PBS and the local workstation, one file each, chosen by [`from_config`].
//! - [`Allocation`]: the nodes and end time of the batch job a launcher runs in, from the
//!   scheduler's environment variables; [`nodelist`] expands the node lists.
//! - [`build_mpi_command`]: the `aprun`/`mpiexec`/`srun` command line for one MPI job.
//! - [`render_job_template`]: the batch script that starts the launcher.
//! - [`QueuePolicy`] and [`decide`]: the service's choice of what to submit.
//!
//! Scheduler programs run with a time limit; when a scheduler refuses, its stderr is passed up
//! verbatim in [`Error::ProgramFailed`].

// The modules are public for their scheduler-specific helpers (output parsers, argument
// builders) that fixtures and tests use; the re-exports below are the everyday surface.
pub mod allocation;
pub mod cobalt;
mod error;
mod exec;
pub mod launch;
pub mod local;
pub mod nodelist;
pub mod packing;
pub mod pbs;
pub mod policy;
pub mod scheduler;
pub mod slurm;
pub mod template;
#[cfg(test)]
mod testutil;

pub use allocation::{launcher_time_limit_minutes, time_remaining_minutes, Allocation};
pub use cobalt::CobaltScheduler;
pub use error::{Error, Result};
pub use launch::{
    aprun_nid, build_mpi_command, launcher_ranks_command, CpuAffinity, LaunchConfig, MpiLaunchSpec,
    MpiLauncherKind,
};
pub use local::LocalScheduler;
pub use packing::{decide, ActiveLaunch, Decision, PackingInput, RunnableWork};
pub use pbs::PbsScheduler;
pub use policy::{QueuePolicy, QueueRule, Window, LOCAL_POLICY, THETA_POLICY};
pub use scheduler::{
    current_user, from_config, BatchJobState, BatchJobStatus, Scheduler, SchedulerConfig,
    SchedulerKind, SubmitRequest, CANCEL_EXE_SETTING, DEFAULT_TIMEOUT, STATUS_EXE_SETTING,
    SUBMIT_EXE_SETTING,
};
pub use slurm::SlurmScheduler;
pub use template::{
    default_template, default_template_name, render_job_template, render_job_template_file,
    wf_filter_option, TemplateVars,
};
