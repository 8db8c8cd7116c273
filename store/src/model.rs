//! The records the store keeps: jobs, applications, state events, launcher sessions and queued
//! launches. Field names are legacy Balsam's, which users know from `balsam job` and `balsam ls`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::state::State;

/// The fields a user sets when adding a job (`balsam job`, `--from-file`, `mkchild`).
/// Defaults are legacy Balsam's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobSpec {
    /// Workflow label, used to filter launchers and listings.
    pub workflow: String,
    /// Job name; with the id's first 8 characters it names the working directory.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Glob patterns of parents' files to copy into the working directory (`ln:PATTERN` links).
    pub input_files: String,
    /// A file or directory copied into the working directory before the run.
    pub stage_in_url: String,
    /// Glob patterns of files to copy out after the run.
    pub stage_out_files: String,
    /// Where stage-out copies to.
    pub stage_out_url: String,
    /// Expected run time; the launcher never starts a job that cannot finish in its time.
    pub wall_time_minutes: u32,
    /// Nodes for an MPI job.
    pub num_nodes: u32,
    /// Extra nodes to reserve beside the job's own.
    pub coschedule_num_nodes: u32,
    /// MPI ranks per node.
    pub ranks_per_node: u32,
    /// `none` or `depth` (aprun -cc).
    pub cpu_affinity: String,
    /// OpenMP threads per rank (aprun -d).
    pub threads_per_rank: u32,
    /// Hardware threads per core (aprun -j).
    pub threads_per_core: u32,
    /// A serial job uses 1/node_packing_count of a node.
    pub node_packing_count: u32,
    /// Extra environment, `A=1:B=2`.
    pub environ_vars: String,
    /// Extra flags for the MPI launch command.
    pub mpi_flags: String,
    /// Name of a registered application.
    pub application: String,
    /// Appended to the application's executable.
    pub args: String,
    /// Overrides the working directory.
    pub user_workdir: String,
    /// Wait for parents to finish before running.
    pub wait_for_parents: bool,
    /// Run the postprocess script on RUN_ERROR, with BALSAM_JOB_ERROR=TRUE.
    pub post_error_handler: bool,
    /// Run the postprocess script on RUN_TIMEOUT, with BALSAM_JOB_TIMEOUT=TRUE.
    pub post_timeout_handler: bool,
    /// A timed-out job is run again automatically.
    pub auto_timeout_retry: bool,
    /// How many times the system may restart the job before it is FAILED (legacy had no bound).
    pub max_restarts: u32,
    /// Free-form user data, a JSON object.
    pub data: serde_json::Value,
}

/// A new job's id.
///
/// Jobs are stored under a time-ordered key, 6 bytes of milliseconds since the epoch then 10
/// random bytes, so a million new jobs append to the id index instead of scattering over it
/// (random keys made the import index-bound). Users see the key rotated: the 10 random bytes
/// come first, so ids differ from their first characters as legacy Balsam's random ids did.
/// Short prefixes (`balsam modify fab5 ...`) and the `name_id8` of working directories stay
/// unique; only the store knows the stored order ([`job_key`]).
pub fn new_job_id() -> Uuid {
    let ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let mut key = [0u8; 16];
    key[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    // Randomness from the uuid crate's source (the operating system's).
    key[6..].copy_from_slice(&Uuid::new_v4().as_bytes()[..10]);
    id_from_key(&key)
}

/// Bytes of the key's time part, rotated to the end of the displayed id.
const ID_ROTATION: usize = 6;

/// The stored key of a job id.
pub(crate) fn job_key(id: &Uuid) -> [u8; 16] {
    let mut k = *id.as_bytes();
    k.rotate_right(ID_ROTATION);
    k
}

/// The job id of a stored key.
pub(crate) fn id_from_key(key: &[u8]) -> Uuid {
    let mut b = [0u8; 16];
    let n = key.len().min(16);
    b[..n].copy_from_slice(&key[..n]);
    b.rotate_left(ID_ROTATION);
    Uuid::from_bytes(b)
}

/// SQL for the hex digits of a stored key's id, as users see it (upper case).
pub(crate) const ID_HEX_SQL: &str = "(hex(substr(job_id, 7, 10)) || hex(substr(job_id, 1, 6)))";

/// Default bound on automatic restarts of one job.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            workflow: String::new(),
            name: String::new(),
            description: String::new(),
            input_files: "*".into(),
            stage_in_url: String::new(),
            stage_out_files: String::new(),
            stage_out_url: String::new(),
            wall_time_minutes: 1,
            num_nodes: 1,
            coschedule_num_nodes: 0,
            ranks_per_node: 1,
            cpu_affinity: "none".into(),
            threads_per_rank: 1,
            threads_per_core: 1,
            node_packing_count: 1,
            environ_vars: String::new(),
            mpi_flags: String::new(),
            application: String::new(),
            args: String::new(),
            user_workdir: String::new(),
            wait_for_parents: true,
            post_error_handler: false,
            post_timeout_handler: false,
            auto_timeout_retry: true,
            max_restarts: DEFAULT_MAX_RESTARTS,
            data: serde_json::json!({}),
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Internal row number; stable, used for edges and events.
    #[serde(skip)]
    pub pk: i64,
    /// The job's identity.
    pub job_id: Uuid,
    /// Everything the user set.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Current state.
    pub state: State,
    /// Exit code of the last run, if it ran.
    pub return_code: Option<i32>,
    /// Automatic restarts so far.
    pub num_restarts: u32,
    /// The queued launch (batch job) the job was scheduled into.
    pub queued_launch_id: Option<i64>,
    /// The launcher or service session holding the job, if any.
    pub lease_session: Option<i64>,
}

impl Job {
    /// The first 8 characters of the id, as in working directory names.
    pub fn id8(&self) -> String {
        self.job_id.to_string()[..8].to_string()
    }

    /// `name | id8`, how logs refer to a job.
    pub fn cute_id(&self) -> String {
        format!("[{} | {}]", self.spec.name, self.id8())
    }

    /// `user_workdir`, or `data/{workflow}/{name}_{id8}` under the database directory.
    pub fn workdir(&self, db_dir: &Path) -> PathBuf {
        if !self.spec.user_workdir.is_empty() {
            return PathBuf::from(&self.spec.user_workdir);
        }
        let wf = if self.spec.workflow.is_empty() {
            "default"
        } else {
            &self.spec.workflow
        };
        db_dir.join("data").join(sanitize(wf)).join(format!(
            "{}_{}",
            sanitize(&self.spec.name),
            self.id8()
        ))
    }

    /// MPI ranks in all: num_nodes × ranks_per_node.
    pub fn num_ranks(&self) -> u32 {
        self.spec.num_nodes * self.spec.ranks_per_node
    }

    /// One node and one rank: a job for the serial task farm.
    pub fn is_serial(&self) -> bool {
        self.spec.num_nodes == 1 && self.spec.ranks_per_node == 1
    }

    /// The extra environment as pairs (`A=1:B=2`).
    pub fn environ_pairs(&self) -> Vec<(String, String)> {
        parse_environ_vars(&self.spec.environ_vars)
    }
}

/// Splits `A=1:B=2` into pairs; entries without `=` are ignored (validated on input).
pub fn parse_environ_vars(s: &str) -> Vec<(String, String)> {
    s.split(':')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Keeps path components safe: a `/` in a name must not escape the workflow directory.
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        format!("_{cleaned}")
    } else {
        cleaned
    }
}

/// A registered application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    /// Row number, shown as `Application N:`.
    pub id: i64,
    /// Unique name jobs refer to.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The command line jobs run, before their args.
    pub executable: String,
    /// Script run once before the first run.
    pub preprocess: String,
    /// Script run after the run (and on errors/timeouts with the handlers).
    pub postprocess: String,
    /// Sourced in bash before the command.
    pub envscript: String,
}

/// One line of a job's provenance log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Microseconds since the Unix epoch, UTC.
    pub time_us: i64,
    /// State before (None for creation).
    pub from_state: Option<State>,
    /// State after.
    pub to_state: State,
    /// Why.
    pub message: String,
}

impl Event {
    /// `[10-03-2018 19:04:00.143928 CREATED] message`, the talk's history format.
    pub fn history_line(&self) -> String {
        let head = format!("[{} {}]", format_time_us(self.time_us), self.to_state);
        if self.message.is_empty() {
            head
        } else {
            // Continuation lines are indented so a traceback reads as part of its entry.
            let msg = self.message.trim_end().replace('\n', "\n  ");
            format!("{head} {msg}")
        }
    }
}

/// `MM-DD-YYYY HH:MM:SS.ffffff` in UTC.
pub fn format_time_us(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.format("%m-%d-%Y %H:%M:%S%.6f").to_string(),
        None => format!("@{us}us"),
    }
}

/// Now, in microseconds since the epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A launcher (or service) process that may hold job leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Session number.
    pub id: i64,
    /// `launcher` or `service`.
    pub kind: String,
    /// Host the process runs on.
    pub host: String,
    /// Its pid.
    pub pid: i64,
    /// The batch job it runs in, if any.
    pub batch_job_id: String,
    /// serial, mpi or mixed.
    pub job_mode: String,
    /// Workflow filter ('' = all).
    pub wf_filter: String,
    /// Start, µs since the epoch.
    pub started_us: i64,
    /// Last heartbeat, µs since the epoch.
    pub heartbeat_us: i64,
    /// When it ended or expired, if it did.
    pub ended_us: Option<i64>,
    /// The process's identity on its host (see [`crate::procid`]), '' when unknown.
    pub proc_id: String,
}

/// What a session registers with.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    /// `launcher` or `service`.
    pub kind: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i64,
    /// Batch job id, if inside one.
    pub batch_job_id: String,
    /// serial, mpi, mixed.
    pub job_mode: String,
    /// Workflow filter.
    pub wf_filter: String,
}

/// A batch job that runs a launcher: submitted by `submit-launch` or the service, or found in
/// the scheduler's queue (legacy's QueuedLaunch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedLaunch {
    /// Launch number (`qlaunch<N>.sh`).
    pub id: i64,
    /// The scheduler's id for the batch job ('' until submitted).
    pub scheduler_id: String,
    /// Which scheduler (cobalt, slurm, pbs, local).
    pub scheduler: String,
    /// Allocation/project charged.
    pub project: String,
    /// Queue or partition.
    pub queue: String,
    /// Nodes requested.
    pub nodes: u32,
    /// Wall time requested, minutes.
    pub wall_minutes: u32,
    /// serial, mpi or mixed.
    pub job_mode: String,
    /// Workflow filter ('' = all).
    pub wf_filter: String,
    /// The submitted script.
    pub command: String,
    /// creating, submitted, queued, running, exiting, finished, failed.
    pub state: String,
    /// Extra scheduler flags.
    pub sched_flags: String,
    /// True when balsam submitted it; false when adopted from the queue.
    pub from_balsam: bool,
    /// True for launches that only run jobs explicitly scheduled into them.
    pub prescheduled_only: bool,
    /// Why the service submitted it, or the scheduler's last word.
    pub reason: String,
    /// Creation time, µs since the epoch.
    pub created_us: i64,
    /// Last update, µs since the epoch.
    pub updated_us: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_look_random_but_are_stored_in_time_order() {
        let ids: Vec<Uuid> = (0..200).map(|_| new_job_id()).collect();
        for id in &ids {
            assert_eq!(id_from_key(&job_key(id)), *id);
        }
        // Keys ascend by millisecond (within one millisecond their order is random).
        let keys: Vec<[u8; 16]> = ids.iter().map(job_key).collect();
        assert!(
            keys.windows(2).all(|w| w[0][..6] <= w[1][..6]),
            "keys ascend"
        );
        // The displayed ids differ from their first characters: short prefixes and the id8 of
        // working directories stay unique.
        let id8s: std::collections::HashSet<String> =
            ids.iter().map(|i| i.to_string()[..8].to_string()).collect();
        assert_eq!(id8s.len(), ids.len());
        // And they share no long prefix, even when made in the same millisecond.
        let common = |a: &Uuid, b: &Uuid| {
            a.to_string()
                .chars()
                .zip(b.to_string().chars())
                .take_while(|(x, y)| x == y)
                .count()
        };
        assert!(ids.windows(2).filter(|w| common(&w[0], &w[1]) >= 4).count() <= 2);
    }
}
