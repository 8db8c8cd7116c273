//! The command that starts a multi-rank job on reserved nodes. The builders for aprun, MPICH
//! `mpiexec`, srun and site templates live in `balsam_cobalt::launch` (shared with the batch
//! scheduler layer); this module is the launcher's seam to them: it picks the launcher kind from
//! settings and environment, finds the programs, and turns a job into a launch spec.

use std::collections::HashMap;
use std::path::PathBuf;

use balsam_cobalt::launch::{
    build_mpi_command, CpuAffinity, LaunchConfig, MpiLaunchSpec, MpiLauncherKind,
};
use balsam_store::{Job, Settings};

use crate::error::{Error, Result};

/// Settings-driven choice of MPI launcher, made once per launcher.
#[derive(Debug, Clone)]
pub struct MpiRun {
    kind: MpiLauncherKind,
    config: LaunchConfig,
}

/// `BALSAM_MPI_LAUNCHER` in the environment overrides the MPI_LAUNCHER setting.
pub const LAUNCHER_ENV: &str = "BALSAM_MPI_LAUNCHER";

impl MpiRun {
    /// The kind from `MPI_LAUNCH_TEMPLATE`, else `BALSAM_MPI_LAUNCHER` or `MPI_LAUNCHER` (auto:
    /// aprun in a Cobalt job on a Cray, srun under Slurm, else MPICH's mpiexec). The programs are
    /// looked up on PATH: `mpiexec.mpich` before `mpiexec` (Debian installs both names when Open
    /// MPI is also present).
    pub fn from_settings(settings: &Settings, path: &[PathBuf]) -> Result<MpiRun> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let setting = if !settings.mpi_launch_template.trim().is_empty() {
            Some(settings.mpi_launch_template.clone())
        } else {
            match env
                .get(LAUNCHER_ENV)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
            {
                Some(s) if s != "auto" => Some(s),
                Some(_) => None,
                None => (settings.mpi_launcher != "auto").then(|| settings.mpi_launcher.clone()),
            }
        };
        let kind = MpiLauncherKind::detect(&env, setting.as_deref())
            .map_err(|e| Error::Config(format!("MPI launcher: {e}")))?;
        let find = |names: &[&str]| -> Option<PathBuf> {
            names
                .iter()
                .find_map(|n| path.iter().map(|d| d.join(n)).find(|p| p.is_file()))
        };
        let config = LaunchConfig {
            aprun_exe: find(&["aprun"]).unwrap_or_else(|| "aprun".into()),
            mpiexec_exe: find(&["mpiexec.mpich", "mpiexec"]).unwrap_or_else(|| "mpiexec".into()),
            srun_exe: find(&["srun"]).unwrap_or_else(|| "srun".into()),
        };
        Ok(MpiRun { kind, config })
    }

    /// The MPI launch command chosen (`balsam launcher` starts the launcher's own ranks with it
    /// inside a batch job).
    pub fn kind(&self) -> &MpiLauncherKind {
        &self.kind
    }

    /// The programs behind each kind.
    pub fn config(&self) -> &LaunchConfig {
        &self.config
    }

    /// Which launcher, for the log.
    pub fn describe(&self) -> String {
        match &self.kind {
            MpiLauncherKind::Aprun => format!("aprun ({})", self.config.aprun_exe.display()),
            MpiLauncherKind::Mpich => format!("mpiexec ({})", self.config.mpiexec_exe.display()),
            MpiLauncherKind::Srun => format!("srun ({})", self.config.srun_exe.display()),
            MpiLauncherKind::Template(t) => format!("template {t:?}"),
        }
    }

    /// The argv starting `job` (its program already split into `argv`) on `nodes` (empty: let
    /// the MPI launcher place the ranks, as on synthetic nodes), with `env` passed to the ranks.
    pub fn command(
        &self,
        job: &Job,
        argv: &[String],
        nodes: &[String],
        env: &[(String, String)],
    ) -> Result<Vec<String>> {
        let spec = MpiLaunchSpec {
            num_ranks: job.num_ranks().max(1) as usize,
            ranks_per_node: job.spec.ranks_per_node.max(1) as usize,
            threads_per_rank: job.spec.threads_per_rank.max(1) as usize,
            threads_per_core: job.spec.threads_per_core.max(1) as usize,
            cpu_affinity: job.spec.cpu_affinity.parse().unwrap_or(CpuAffinity::None),
            nodes: nodes.to_vec(),
            env: env.to_vec(),
            mpi_flags: shell_words::split(&job.spec.mpi_flags).map_err(|e| {
                Error::BadCommandLine {
                    line: job.spec.mpi_flags.clone(),
                    problem: e.to_string(),
                }
            })?,
            argv: argv.to_vec(),
        };
        build_mpi_command(&self.kind, &self.config, &spec).map_err(|e| {
            Error::Config(format!(
                "cannot build the MPI launch command for {}: {e}",
                job.cute_id()
            ))
        })
    }
}

/// PATH of an environment as directories.
pub fn path_dirs(env: &[(std::ffi::OsString, std::ffi::OsString)]) -> Vec<PathBuf> {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::env::split_paths(v).collect())
        .unwrap_or_default()
}
