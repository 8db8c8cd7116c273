//! `settings.json` in the database directory, with the talk's keys. Every key is optional; a bad
//! value is reported by key with the form expected.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Checked settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `CobaltScheduler`, `SlurmScheduler`, `PBSScheduler` or `LocalScheduler`.
    pub scheduler_class: String,
    /// Path of the submit program (qsub, sbatch); empty: look it up on PATH.
    pub scheduler_submit_exe: String,
    /// Path of the status program (qstat, squeue); empty: look it up on PATH.
    pub scheduler_status_exe: String,
    /// Path of the cancel program (qdel, scancel); empty: look it up on PATH.
    pub scheduler_cancel_exe: String,
    /// Project charged when none is given.
    pub default_project: String,
    /// Seconds between service passes.
    pub service_period: u64,
    /// Transition worker threads in a launcher.
    pub num_transition_threads: usize,
    /// MPI jobs a launcher runs at once.
    pub max_concurrent_mpiruns: usize,
    /// trace, debug, info, warn, error.
    pub log_handler_level: String,
    /// Rotated log files kept.
    pub log_backup_count: usize,
    /// Bytes before a log rotates.
    pub log_file_size_limit: u64,
    /// Queue policy file, relative to the database directory or absolute ('' = built-in).
    pub queue_policy: String,
    /// Batch job template, relative to the database directory or absolute ('' = built-in).
    pub job_template: String,
    /// MPI launch command for multi-rank jobs: auto, aprun, mpiexec or srun.
    pub mpi_launcher: String,
    /// Optional template for the MPI launch command (overrides `mpi_launcher`).
    pub mpi_launch_template: String,
    /// Seconds of silence after which a launcher's leases expire.
    pub lease_expiry_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            scheduler_class: "LocalScheduler".into(),
            scheduler_submit_exe: String::new(),
            scheduler_status_exe: String::new(),
            scheduler_cancel_exe: String::new(),
            default_project: String::new(),
            service_period: 1,
            num_transition_threads: 5,
            max_concurrent_mpiruns: 1000,
            log_handler_level: "INFO".into(),
            log_backup_count: 5,
            log_file_size_limit: 104_857_600,
            queue_policy: String::new(),
            job_template: String::new(),
            mpi_launcher: "auto".into(),
            mpi_launch_template: String::new(),
            lease_expiry_seconds: 180,
        }
    }
}

const LEVELS: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "WARNING", "ERROR"];
const SCHEDULERS: [&str; 4] = [
    "CobaltScheduler",
    "SlurmScheduler",
    "PBSScheduler",
    "LocalScheduler",
];

impl Settings {
    /// The file `balsam init` writes: every key with its default, so users see what exists.
    pub fn default_file_text() -> String {
        let d = Settings::default();
        let v = serde_json::json!({
            "SCHEDULER_CLASS": d.scheduler_class,
            "SCHEDULER_SUBMIT_EXE": d.scheduler_submit_exe,
            "SCHEDULER_STATUS_EXE": d.scheduler_status_exe,
            "SCHEDULER_CANCEL_EXE": d.scheduler_cancel_exe,
            "DEFAULT_PROJECT": d.default_project,
            "SERVICE_PERIOD": d.service_period,
            "NUM_TRANSITION_THREADS": d.num_transition_threads,
            "MAX_CONCURRENT_MPIRUNS": d.max_concurrent_mpiruns,
            "LOG_HANDLER_LEVEL": d.log_handler_level,
            "LOG_BACKUP_COUNT": d.log_backup_count,
            "LOG_FILE_SIZE_LIMIT": d.log_file_size_limit,
            "QUEUE_POLICY": d.queue_policy,
            "JOB_TEMPLATE": d.job_template,
            "MPI_LAUNCHER": d.mpi_launcher,
            "MPI_LAUNCH_TEMPLATE": d.mpi_launch_template,
            "LEASE_EXPIRY_SECONDS": d.lease_expiry_seconds,
        });
        let mut s = serde_json::to_string_pretty(&v).expect("settings serialize");
        s.push('\n');
        s
    }

    /// Reads `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Settings> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        Settings::parse(path, &text)
    }

    /// Parses the text of a settings file.
    pub fn parse(path: &Path, text: &str) -> Result<Settings> {
        let err = |key: &str, problem: String| Error::Settings {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem,
        };
        let root: Value = serde_json::from_str(text)
            .map_err(|e| err("(file)", format!("not valid JSON: {e}")))?;
        let Value::Object(map) = root else {
            return Err(err("(file)", "expected a JSON object of KEY: value".into()));
        };
        let mut s = Settings::default();
        let r = Reader {
            map: &map,
            err: &err,
        };
        if let Some(v) = r.string("SCHEDULER_CLASS")? {
            if !SCHEDULERS.iter().any(|k| {
                k.eq_ignore_ascii_case(&v)
                    || k.trim_end_matches("Scheduler").eq_ignore_ascii_case(&v)
            }) {
                return Err(err(
                    "SCHEDULER_CLASS",
                    format!(
                        "{v:?} is not a scheduler; expected one of {}",
                        SCHEDULERS.join(", ")
                    ),
                ));
            }
            s.scheduler_class = v;
        }
        if let Some(v) = r.string("SCHEDULER_SUBMIT_EXE")? {
            s.scheduler_submit_exe = v;
        }
        if let Some(v) = r.string("SCHEDULER_STATUS_EXE")? {
            s.scheduler_status_exe = v;
        }
        if let Some(v) = r.string("SCHEDULER_CANCEL_EXE")? {
            s.scheduler_cancel_exe = v;
        }
        if let Some(v) = r.string("DEFAULT_PROJECT")? {
            s.default_project = v;
        }
        if let Some(v) = r.int("SERVICE_PERIOD", 1)? {
            s.service_period = v;
        }
        if let Some(v) = r.int("NUM_TRANSITION_THREADS", 1)? {
            s.num_transition_threads = v as usize;
        }
        if let Some(v) = r.int("MAX_CONCURRENT_MPIRUNS", 1)? {
            s.max_concurrent_mpiruns = v as usize;
        }
        if let Some(v) = r.string("LOG_HANDLER_LEVEL")? {
            if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(&v)) {
                return Err(err(
                    "LOG_HANDLER_LEVEL",
                    format!("{v:?} is not a level; expected one of DEBUG, INFO, WARNING, ERROR"),
                ));
            }
            s.log_handler_level = v.to_ascii_uppercase();
        }
        if let Some(v) = r.int("LOG_BACKUP_COUNT", 0)? {
            s.log_backup_count = v as usize;
        }
        if let Some(v) = r.int("LOG_FILE_SIZE_LIMIT", 1024)? {
            s.log_file_size_limit = v;
        }
        if let Some(v) = r.string("QUEUE_POLICY")? {
            s.queue_policy = v;
        }
        if let Some(v) = r.string("JOB_TEMPLATE")? {
            s.job_template = v;
        }
        if let Some(v) = r.string("MPI_LAUNCHER")? {
            let v = v.to_ascii_lowercase();
            if !["auto", "aprun", "mpiexec", "mpirun", "srun"].contains(&v.as_str()) {
                return Err(err(
                    "MPI_LAUNCHER",
                    format!("{v:?} is not known; expected auto, aprun, mpiexec or srun"),
                ));
            }
            s.mpi_launcher = v;
        }
        if let Some(v) = r.string("MPI_LAUNCH_TEMPLATE")? {
            s.mpi_launch_template = v;
        }
        if let Some(v) = r.int("LEASE_EXPIRY_SECONDS", 5)? {
            s.lease_expiry_seconds = v;
        }
        Ok(s)
    }

    /// A path setting resolved against the database directory; None when unset.
    pub fn resolve(db_root: &Path, value: &str) -> Option<PathBuf> {
        if value.is_empty() {
            return None;
        }
        let p = PathBuf::from(value);
        Some(if p.is_absolute() { p } else { db_root.join(p) })
    }
}

struct Reader<'a, F: Fn(&str, String) -> Error> {
    map: &'a Map<String, Value>,
    err: &'a F,
}

impl<F: Fn(&str, String) -> Error> Reader<'_, F> {
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err((self.err)(key, format!("expected a string, found {other}"))),
        }
    }

    fn int(&self, key: &str, min: u64) -> Result<Option<u64>> {
        let v = match self.map.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        match v {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err((self.err)(
                key,
                format!(
                    "expected an integer of at least {min}, found {}",
                    self.map.get(key).map(|v| v.to_string()).unwrap_or_default()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let s = Settings::parse(Path::new("s.json"), &Settings::default_file_text()).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn talk_keys_are_honoured() {
        let text = r#"{"SCHEDULER_CLASS": "CobaltScheduler", "SCHEDULER_SUBMIT_EXE": "/usr/bin/qsub",
            "DEFAULT_PROJECT": "datascience", "SERVICE_PERIOD": 1, "NUM_TRANSITION_THREADS": 5,
            "MAX_CONCURRENT_MPIRUNS": 1000, "LOG_HANDLER_LEVEL": "INFO", "LOG_BACKUP_COUNT": 5,
            "LOG_FILE_SIZE_LIMIT": 104857600, "QUEUE_POLICY": "theta_policy.ini",
            "JOB_TEMPLATE": "job-templates/theta.cobaltscheduler.tmpl"}"#;
        let s = Settings::parse(Path::new("s.json"), text).unwrap();
        assert_eq!(s.scheduler_class, "CobaltScheduler");
        assert_eq!(s.default_project, "datascience");
        assert_eq!(s.queue_policy, "theta_policy.ini");
    }

    #[test]
    fn bad_values_name_key_and_form() {
        let e = Settings::parse(Path::new("s.json"), r#"{"SERVICE_PERIOD": "soon"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SERVICE_PERIOD") && e.contains("integer"), "{e}");
        let e = Settings::parse(Path::new("s.json"), r#"{"SCHEDULER_CLASS": "Torque"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SCHEDULER_CLASS") && e.contains("CobaltScheduler"),
            "{e}"
        );
        let e = Settings::parse(Path::new("s.json"), "{oops")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
}
