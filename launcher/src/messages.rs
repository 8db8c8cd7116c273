//! The one protocol between rank 0 (the master) and the worker ranks. Every message that crosses
//! MPI is a [`Message`], encoded with bincode 2's serde API; the tag carries nothing.
//!
//! The protocol is shaped for throughput: the master sends jobs in batches ([`Message::Run`]),
//! a worker reports everything that happened since its last report in one [`Message::Report`],
//! and a message stays well below MPICH's eager limit so a send never waits for the receiver
//! (see [`MAX_JOBS_PER_MESSAGE`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The MPI tag of every launcher message.
pub const TAG: i32 = 7;

/// Upper bound of jobs in one [`Message::Run`]: keeps a message around 16 KiB or less, under
/// MPICH's eager threshold, so a blocking send returns at once even while the receiver sleeps.
pub const MAX_JOBS_PER_MESSAGE: usize = 24;

/// A message between rank 0 and a worker rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Worker → master, first thing after start: who and where the worker is.
    Hello {
        /// The worker's MPI rank.
        rank: i32,
        /// Its host name (MPI processor name).
        host: String,
        /// CPUs it may use.
        cpus: u32,
        /// Its index in the batch node list when the batch system says (Slurm's
        /// `SLURM_NODEID`): node names and host names differ on some clusters.
        node_index: Option<u32>,
    },
    /// Master → worker, once every worker said hello: the session and what the worker needs to
    /// run jobs.
    Welcome(WorkerSetup),
    /// Master → worker: jobs to run, in order. The worker starts each as soon as its node has
    /// room for it (the master never sends more than fits plus a small backlog).
    Run(Vec<RunJob>),
    /// Worker → master: processes started and ended since the previous report.
    Report {
        /// Jobs whose process started.
        started: Vec<JobStarted>,
        /// Jobs whose process ended (or could not start, or were dropped before starting).
        finished: Vec<JobFinished>,
    },
    /// Master → worker: stop these jobs (SIGTERM to the process group, a grace period, SIGKILL).
    /// Jobs not started yet are dropped. Each is reported back as finished, with the reason.
    Kill {
        /// The jobs' row numbers.
        pks: Vec<i64>,
        /// Why, so the master knows what to record.
        reason: KillReason,
    },
    /// Master → worker: give these jobs back if they have not started (the master places them
    /// elsewhere). Each one still queued is dropped and reported finished, not started, with
    /// [`KillReason::Reclaimed`]; one that started meanwhile runs on as if nothing was asked.
    Reclaim {
        /// The jobs' row numbers.
        pks: Vec<i64>,
    },
    /// Master → worker: kill everything still running for `reason`, report, say [`Message::Bye`]
    /// and exit.
    Shutdown {
        /// Why the launcher stops.
        reason: KillReason,
    },
    /// Worker → master: every child is reaped and reported; the worker finalizes MPI and exits.
    Bye,
}

/// What a worker needs to know once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSetup {
    /// The launcher session (names the log file).
    pub session: i64,
    /// Where the worker writes its log (`<db>/log/launcher-<session>.rank<r>.log`).
    pub log_file: Option<PathBuf>,
    /// GPUs per node; each running job gets `CUDA_VISIBLE_DEVICES` = its slot mod this (0: unset).
    pub gpus_per_node: u32,
    /// Capacity of the worker in packing units (see [`crate::packing`]).
    pub capacity: u64,
    /// Grace between SIGTERM and SIGKILL when a job is killed, milliseconds.
    pub kill_grace_ms: u64,
}

/// One job to run on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunJob {
    /// The job's row number, how every report refers to it.
    pub pk: i64,
    /// `[name | id8]`, for logs.
    pub cute_id: String,
    /// Program and arguments, already split (no shell).
    pub argv: Vec<String>,
    /// A script to source in bash before the command, if the application has one.
    pub envscript: Option<String>,
    /// Working directory.
    pub workdir: PathBuf,
    /// File for stdout and stderr (appended to).
    pub output: PathBuf,
    /// Environment on top of the launcher's own (MPI variables scrubbed).
    pub env: Vec<(String, String)>,
    /// Share of a node it takes, in packing units.
    pub cost: u64,
    /// Kill it after this many seconds (`--enforce-wall-time`).
    pub wall_time_limit_s: Option<u64>,
}

/// A job's process started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStarted {
    /// The job.
    pub pk: i64,
    /// Its process id (and process group).
    pub pid: u32,
    /// The packing slot it runs in (for GPU assignment and logs).
    pub slot: u32,
}

/// How a job's process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It never started: the executable is missing, not executable, the workdir is gone...
    NotStarted(String),
    /// It never started because the launcher cannot write the job's files (its output file or
    /// working directory: disk full, over quota, read-only, missing, permission denied). Not the
    /// job's fault: it should run again later, as it was.
    Infrastructure(String),
}

impl ExitStatus {
    /// Exit 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }

    /// The number recorded as the job's return code: the exit code, or -signal (as Python's
    /// subprocess reports it, which legacy users know), or 127 when the program could not start.
    pub fn return_code(&self) -> i32 {
        match self {
            ExitStatus::Code(c) => *c,
            ExitStatus::Signal(s) => -s,
            ExitStatus::NotStarted(_) | ExitStatus::Infrastructure(_) => 127,
        }
    }

    /// In words, for the state history.
    pub fn describe(&self) -> String {
        match self {
            ExitStatus::Code(c) => format!("exit code {c}"),
            ExitStatus::Signal(s) => format!("killed by signal {s} ({})", signal_name(*s)),
            ExitStatus::NotStarted(why) => format!("could not start: {why}"),
            ExitStatus::Infrastructure(why) => {
                format!("could not start, the launcher cannot write the job's files: {why}")
            }
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Why a job's process was stopped by the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KillReason {
    /// A user set the job USER_KILLED: record nothing more.
    User,
    /// The launcher reached its time limit: RUN_TIMEOUT.
    TimeLimit,
    /// The launcher got SIGTERM or SIGINT (the batch system ends the job, a user hit Ctrl-C):
    /// RUN_TIMEOUT, as at the time limit.
    Signal,
    /// The job ran past its wall_time_minutes (`--enforce-wall-time`): RUN_TIMEOUT.
    WallTime,
    /// The launcher lost its session (lease expired): record nothing, other launchers own the
    /// jobs now.
    SessionLost,
    /// The launcher is leaving for another reason (idle exit, startup failure): nothing runs.
    Exit,
    /// The master took a job back before it started, to run it elsewhere ([`Message::Reclaim`]):
    /// nothing happened to it.
    Reclaimed,
}

/// A job's process ended (or the job was dropped before it started).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    /// The job.
    pub pk: i64,
    /// How it ended.
    pub status: ExitStatus,
    /// The last lines of its output file, for errors.
    pub tail: String,
    /// Run time, milliseconds (0 when it never started).
    pub elapsed_ms: u64,
    /// Set when the launcher stopped it, with why.
    pub killed: Option<KillReason>,
    /// False when it was dropped from the worker's queue before it started.
    pub started: bool,
}

impl Message {
    /// Encodes for sending.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("launcher messages always encode")
    }

    /// Decodes a received message.
    pub fn decode(bytes: &[u8]) -> Result<Message> {
        let (msg, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map_err(|e| Error::Config(format!("undecodable launcher message: {e}")))?;
        if used != bytes.len() {
            return Err(Error::Config(format!(
                "launcher message of {} bytes has {} trailing bytes",
                bytes.len(),
                bytes.len() - used
            )));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_job(i: i64) -> RunJob {
        RunJob {
            pk: i,
            cute_id: format!("[job-with-a-longish-name-{i} | 0123abcd]"),
            argv: vec![
                "/usr/bin/python3".into(),
                "/some/long/path/to/the/script.py".into(),
                "--arg".into(),
            ],
            envscript: None,
            workdir: PathBuf::from(format!(
                "/gpfs/projects/campaign/db/data/workflow/job_{i}_0123abcd"
            )),
            output: PathBuf::from(format!(
                "/gpfs/projects/campaign/db/data/workflow/job_{i}_0123abcd/job_{i}.out"
            )),
            env: vec![
                (
                    "BALSAM_JOB_ID".into(),
                    "0123abcd-0000-4000-8000-000000000000".into(),
                ),
                ("BALSAM_PARENT_IDS".into(), "[]".into()),
                ("BALSAM_DB_PATH".into(), "/gpfs/projects/campaign/db".into()),
                ("BALSAM_LAUNCHER_NODES".into(), "128".into()),
                ("BALSAM_JOB_MODE".into(), "mixed".into()),
            ],
            cost: 250_000,
            wall_time_limit_s: Some(60),
        }
    }

    #[test]
    fn round_trip() {
        let msgs = vec![
            Message::Hello {
                rank: 3,
                host: "nid01001".into(),
                cpus: 64,
                node_index: Some(0),
            },
            Message::Run(vec![sample_job(1), sample_job(2)]),
            Message::Report {
                started: vec![JobStarted {
                    pk: 1,
                    pid: 4242,
                    slot: 0,
                }],
                finished: vec![JobFinished {
                    pk: 2,
                    status: ExitStatus::Signal(9),
                    tail: "Traceback...".into(),
                    elapsed_ms: 12,
                    killed: Some(KillReason::User),
                    started: true,
                }],
            },
            Message::Kill {
                pks: vec![1, 2],
                reason: KillReason::WallTime,
            },
            Message::Reclaim { pks: vec![3] },
            Message::Shutdown {
                reason: KillReason::TimeLimit,
            },
            Message::Bye,
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_full_run_message_stays_under_the_eager_limit() {
        let jobs: Vec<RunJob> = (0..MAX_JOBS_PER_MESSAGE as i64).map(sample_job).collect();
        let len = Message::Run(jobs).encode().len();
        assert!(len < 32 * 1024, "{len} bytes");
    }

    #[test]
    fn return_codes_follow_legacy() {
        assert_eq!(ExitStatus::Code(1).return_code(), 1);
        assert_eq!(ExitStatus::Signal(9).return_code(), -9);
        assert!(ExitStatus::Signal(9).describe().contains("SIGKILL"));
        assert!(ExitStatus::Code(0).success());
        let full = ExitStatus::Infrastructure("cannot open output file /d/j.out: No space".into());
        assert_eq!(full.return_code(), 127);
        assert!(!full.success());
        assert!(full.describe().contains("cannot write the job's files"));
    }
}
