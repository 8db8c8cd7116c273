//! The allocation a launcher runs in, read from the batch scheduler's environment variables.
//!
//! A launcher started by a batch job must know its nodes and when the scheduler will kill it.
//! Cobalt, Slurm, PBS and the local scheduler each say so through different variables; this module
//! turns them into one [`Allocation`]. It reads from a lookup function rather than the process
//! environment so that tests (and callers that scrub the environment) can pass their own.
//!
//! When several schedulers' variables are present, the innermost wins: a local job started inside
//! a Slurm allocation is the local job. Order: local, Cobalt, Slurm, PBS.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::local::{ENV_END_TIME, ENV_JOB_ID, ENV_NODES};
use crate::nodelist::{expand_cobalt_partname, expand_hostlist, read_nodefile};
use crate::scheduler::SchedulerKind;

/// The batch job a launcher runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The scheduler that granted it.
    pub scheduler: SchedulerKind,
    /// The scheduler's id for the batch job.
    pub job_id: String,
    /// Distinct node names in allocation order: Cobalt node ids as plain integers (`1001`), host
    /// names elsewhere; `localhost` for a local job.
    pub nodes: Vec<String>,
    /// Number of nodes the batch job holds (for a local job: the virtual nodes it asked for, all
    /// on this host).
    pub node_count: usize,
    /// When the scheduler ends the job, if it says.
    pub end_time: Option<SystemTime>,
}

impl Allocation {
    /// Reads the allocation from a map of environment variables; None outside any batch job.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<Option<Allocation>> {
        Self::from_env(|k| env.get(k).cloned())
    }

    /// Reads the allocation from this process's environment.
    pub fn from_process_env() -> Result<Option<Allocation>> {
        Self::from_env(|k| std::env::var(k).ok())
    }

    /// Reads the allocation through a lookup function; None outside any batch job.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Allocation>> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if let Some(id) = get(ENV_JOB_ID) {
            let count = match get(ENV_NODES) {
                Some(v) => parse_count(ENV_NODES, &v)?,
                None => 1,
            };
            return Ok(Some(Allocation {
                scheduler: SchedulerKind::Local,
                job_id: id,
                nodes: vec!["localhost".to_string()],
                node_count: count,
                end_time: epoch_var(&get, ENV_END_TIME)?,
            }));
        }
        if let Some(id) = get("COBALT_JOBID") {
            let nodes = if let Some(part) = get("COBALT_PARTNAME") {
                expand_cobalt_partname(&part)?
            } else if let Some(file) = get("COBALT_NODEFILE") {
                read_nodefile(Path::new(&file))?
            } else {
                return Err(Error::BadEnv {
                    var: "COBALT_PARTNAME".into(),
                    value: String::new(),
                    expected: "COBALT_PARTNAME (Theta) or COBALT_NODEFILE (clusters) to be set inside a Cobalt job".into(),
                });
            };
            let count = match get("COBALT_JOBSIZE")
                .map(|v| ("COBALT_JOBSIZE", v))
                .or_else(|| get("COBALT_PARTSIZE").map(|v| ("COBALT_PARTSIZE", v)))
            {
                Some((var, v)) => parse_count(var, &v)?,
                None => nodes.len(),
            };
            return Ok(Some(Allocation {
                scheduler: SchedulerKind::Cobalt,
                job_id: id,
                nodes,
                node_count: count,
                end_time: epoch_var(&get, "COBALT_ENDTIME")?,
            }));
        }
        if let Some(id) = get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID")) {
            let list = get("SLURM_JOB_NODELIST")
                .or_else(|| get("SLURM_NODELIST"))
                .ok_or_else(|| Error::BadEnv {
                    var: "SLURM_JOB_NODELIST".into(),
                    value: String::new(),
                    expected: "a Slurm hostlist such as nid0[1-3,7] inside a Slurm job".into(),
                })?;
            let nodes = expand_hostlist(&list)?;
            let count = match get("SLURM_NNODES")
                .map(|v| ("SLURM_NNODES", v))
                .or_else(|| get("SLURM_JOB_NUM_NODES").map(|v| ("SLURM_JOB_NUM_NODES", v)))
            {
                Some((var, v)) => parse_count(var, &v)?,
                None => nodes.len(),
            };
            return Ok(Some(Allocation {
                scheduler: SchedulerKind::Slurm,
                job_id: id,
                nodes,
                node_count: count,
                end_time: epoch_var(&get, "SLURM_JOB_END_TIME")?,
            }));
        }
        if let Some(id) = get("PBS_JOBID") {
            let file = get("PBS_NODEFILE").ok_or_else(|| Error::BadEnv {
                var: "PBS_NODEFILE".into(),
                value: String::new(),
                expected: "the path of the job's node file inside a PBS job".into(),
            })?;
            let nodes = read_nodefile(Path::new(&file))?;
            return Ok(Some(Allocation {
                scheduler: SchedulerKind::Pbs,
                job_id: id,
                node_count: nodes.len(),
                nodes,
                end_time: None,
            }));
        }
        Ok(None)
    }
}

fn parse_count(var: &str, value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::BadEnv {
            var: var.to_string(),
            value: value.to_string(),
            expected: "a positive whole number of nodes".into(),
        })
}

fn epoch_var(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<SystemTime>> {
    let Some(v) = get(var) else {
        return Ok(None);
    };
    // Cobalt may print a fractional epoch.
    let secs: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| Error::BadEnv {
            var: var.to_string(),
            value: v.clone(),
            expected: "a Unix time in seconds".into(),
        })?;
    // Slurm writes 0 when there is no end time (an unlimited job).
    if secs == 0.0 {
        return Ok(None);
    }
    Ok(Some(UNIX_EPOCH + Duration::from_secs_f64(secs)))
}

/// Whole minutes left in the allocation at `now` (0 once past its end); None when the scheduler
/// gave no end time.
pub fn time_remaining_minutes(alloc: &Allocation, now: SystemTime) -> Option<u64> {
    let end = alloc.end_time?;
    Some(
        end.duration_since(now)
            .map(|d| d.as_secs() / 60)
            .unwrap_or(0),
    )
}

/// The time limit for a launcher: minutes remaining minus `margin_minutes` (time to mark running
/// jobs RUN_TIMEOUT and release them before the scheduler kills everything); Some(0) means stop
/// now; None when the allocation has no known end.
pub fn launcher_time_limit_minutes(
    alloc: &Allocation,
    now: SystemTime,
    margin_minutes: u64,
) -> Option<u64> {
    time_remaining_minutes(alloc, now).map(|m| m.saturating_sub(margin_minutes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn outside_a_job() {
        assert_eq!(
            Allocation::from_env_map(&env(&[("HOME", "/h")])).unwrap(),
            None
        );
    }

    #[test]
    fn cobalt_theta() {
        let a = Allocation::from_env_map(&env(&[
            ("COBALT_JOBID", "278079"),
            ("COBALT_PARTNAME", "1001-1003,1030"),
            ("COBALT_PARTSIZE", "4"),
            ("COBALT_ENDTIME", "1538600000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.scheduler, SchedulerKind::Cobalt);
        assert_eq!(a.job_id, "278079");
        assert_eq!(a.nodes, vec!["1001", "1002", "1003", "1030"]);
        assert_eq!(a.node_count, 4);
        assert_eq!(
            a.end_time,
            Some(UNIX_EPOCH + Duration::from_secs(1538600000))
        );
        let now = UNIX_EPOCH + Duration::from_secs(1538600000 - 600 - 30);
        assert_eq!(time_remaining_minutes(&a, now), Some(10));
        assert_eq!(launcher_time_limit_minutes(&a, now, 2), Some(8));
        assert_eq!(launcher_time_limit_minutes(&a, now, 20), Some(0));
        let later = UNIX_EPOCH + Duration::from_secs(1538600100);
        assert_eq!(time_remaining_minutes(&a, later), Some(0));
    }

    #[test]
    fn cobalt_cluster_nodefile_and_jobsize() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nodefile");
        std::fs::write(&f, "cc001\ncc002\n").unwrap();
        let a = Allocation::from_env_map(&env(&[
            ("COBALT_JOBID", "5"),
            ("COBALT_NODEFILE", f.to_str().unwrap()),
            ("COBALT_JOBSIZE", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.nodes, vec!["cc001", "cc002"]);
        assert_eq!(a.node_count, 2);
        assert_eq!(a.end_time, None);
        assert_eq!(time_remaining_minutes(&a, SystemTime::now()), None);
    }

    #[test]
    fn cobalt_without_nodes_is_an_error() {
        let err = Allocation::from_env_map(&env(&[("COBALT_JOBID", "5")])).unwrap_err();
        assert!(err.to_string().contains("COBALT_NODEFILE"), "{err}");
    }

    #[test]
    fn slurm() {
        // The variables the test cluster's jobs get.
        let a = Allocation::from_env_map(&env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_NNODES", "2"),
            ("SLURM_SUBMIT_DIR", "/tmp"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.scheduler, SchedulerKind::Slurm);
        assert_eq!(a.nodes, vec!["n1", "n2"]);
        assert_eq!(a.node_count, 2);
        assert_eq!(a.end_time, None);
        let b = Allocation::from_env_map(&env(&[
            ("SLURM_JOBID", "9"),
            ("SLURM_NODELIST", "nid0[1-3,7]"),
            ("SLURM_JOB_END_TIME", "1795644722"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(b.node_count, 4);
        assert!(b.end_time.is_some());
    }

    #[test]
    fn slurm_bad_values_name_the_variable() {
        let err = Allocation::from_env_map(&env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_NNODES", "two"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("SLURM_NNODES") && err.contains("two"), "{err}");
        let err = Allocation::from_env_map(&env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_JOB_END_TIME", "soon"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("SLURM_JOB_END_TIME"), "{err}");
        assert!(Allocation::from_env_map(&env(&[("SLURM_JOB_ID", "1")])).is_err());
    }

    #[test]
    fn pbs_dedupes_nodefile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("nodes");
        std::fs::write(&f, "x1\nx1\nx1\nx2\nx2\nx2\n").unwrap();
        let a = Allocation::from_env_map(&env(&[
            ("PBS_JOBID", "1234.server"),
            ("PBS_NODEFILE", f.to_str().unwrap()),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.scheduler, SchedulerKind::Pbs);
        assert_eq!(a.nodes, vec!["x1", "x2"]);
        assert_eq!(a.node_count, 2);
    }

    #[test]
    fn local_wins_inside_slurm() {
        let a = Allocation::from_env_map(&env(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n1"),
            (ENV_JOB_ID, "4242"),
            (ENV_NODES, "3"),
            (ENV_END_TIME, "1795644722"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.scheduler, SchedulerKind::Local);
        assert_eq!(a.job_id, "4242");
        assert_eq!(a.nodes, vec!["localhost"]);
        assert_eq!(a.node_count, 3);
        assert!(a.end_time.is_some());
    }

    #[test]
    fn closure_lookup() {
        let a = Allocation::from_env(|k| match k {
            "PBS_JOBID" => Some("1.s".into()),
            "PBS_NODEFILE" => Some("/nonexistent/nodefile".into()),
            _ => None,
        })
        .unwrap_err();
        assert!(a.to_string().contains("/nonexistent/nodefile"), "{a}");
    }
}
