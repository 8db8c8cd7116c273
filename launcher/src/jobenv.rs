//! A job's environment (legacy §7): what its process and its pre/postprocess scripts see on top
//! of the launcher's own environment.

use std::path::Path;

use balsam_store::{Job, Uuid};

/// Facts about the launcher a job may want (absent when the service runs a script).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherContext {
    /// Nodes of the launcher (`BALSAM_LAUNCHER_NODES`).
    pub nodes: u32,
    /// serial, mpi or mixed (`BALSAM_JOB_MODE`).
    pub job_mode: String,
}

/// environ_vars, then `BALSAM_JOB_ID`, `BALSAM_PARENT_IDS` (a JSON list), `BALSAM_DB_PATH`,
/// `OMP_NUM_THREADS` when threads_per_rank > 1, and the launcher's facts.
pub fn job_environment(
    job: &Job,
    parent_ids: &[Uuid],
    db_root: &Path,
    launcher: Option<&LauncherContext>,
) -> Vec<(String, String)> {
    let mut env = job.environ_pairs();
    env.push(("BALSAM_JOB_ID".into(), job.job_id.to_string()));
    let parents: Vec<String> = parent_ids.iter().map(|u| u.to_string()).collect();
    env.push((
        "BALSAM_PARENT_IDS".into(),
        serde_json::to_string(&parents).unwrap_or_else(|_| "[]".into()),
    ));
    env.push(("BALSAM_DB_PATH".into(), db_root.display().to_string()));
    if job.spec.threads_per_rank > 1 {
        env.push((
            "OMP_NUM_THREADS".into(),
            job.spec.threads_per_rank.to_string(),
        ));
    }
    if let Some(l) = launcher {
        env.push(("BALSAM_LAUNCHER_NODES".into(), l.nodes.to_string()));
        env.push(("BALSAM_JOB_MODE".into(), l.job_mode.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use balsam_store::{JobSpec, State};

    #[test]
    fn environment_has_the_legacy_variables() {
        let job = Job {
            pk: 1,
            job_id: Uuid::new_v4(),
            spec: JobSpec {
                environ_vars: "A=1:B=x=y".into(),
                threads_per_rank: 4,
                ..JobSpec::default()
            },
            state: State::Preprocessed,
            return_code: None,
            num_restarts: 0,
            queued_launch_id: None,
            lease_session: None,
        };
        let p = Uuid::new_v4();
        let ctx = LauncherContext {
            nodes: 3,
            job_mode: "serial".into(),
        };
        let env = job_environment(&job, &[p], Path::new("/db"), Some(&ctx));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("A").unwrap(), "1");
        assert_eq!(get("B").unwrap(), "x=y");
        assert_eq!(get("BALSAM_JOB_ID").unwrap(), job.job_id.to_string());
        assert_eq!(get("BALSAM_PARENT_IDS").unwrap(), format!("[\"{p}\"]"));
        assert_eq!(get("BALSAM_DB_PATH").unwrap(), "/db");
        assert_eq!(get("OMP_NUM_THREADS").unwrap(), "4");
        assert_eq!(get("BALSAM_LAUNCHER_NODES").unwrap(), "3");
        assert_eq!(get("BALSAM_JOB_MODE").unwrap(), "serial");
    }
}
