//! The crate's errors.
//!
//! Every message names what is wrong and, where the user can act, how to fix it. Errors from a
//! scheduler program keep its stderr verbatim: "unknown project", "over quota" or "no such queue"
//! are the scheduler's words, and the user needs exactly those words, not our paraphrase.

use std::path::PathBuf;

/// Everything this crate can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A scheduler or MPI program could not be found (not on PATH, or the configured path is wrong).
    #[error("cannot run {program:?}: program not found. Install it, put it on PATH, or set {setting} in settings.json to its full path")]
    ProgramNotFound {
        /// The program as configured (bare name or path).
        program: PathBuf,
        /// The settings key that chooses this program.
        setting: &'static str,
    },
    /// The program exists but could not be started (permissions, not executable, ...).
    #[error("cannot run {program:?}: {source}. Check the file, or set {setting} in settings.json to another program")]
    Spawn {
        /// The program as configured.
        program: PathBuf,
        /// The settings key that chooses this program.
        setting: &'static str,
        /// Why the operating system refused.
        source: std::io::Error,
    },
    /// The program ran and exited non-zero. `stderr` is exactly what it printed.
    #[error("`{command}` failed ({}):\n{}", exit_description(*code), scheduler_words(stderr, stdout))]
    ProgramFailed {
        /// The command line that ran, shell-quoted.
        command: String,
        /// Its exit code; None when a signal killed it.
        code: Option<i32>,
        /// Its standard error, verbatim.
        stderr: String,
        /// Its standard output, verbatim (some schedulers print errors there).
        stdout: String,
    },
    /// The program did not finish in time and was killed.
    #[error("`{command}` did not finish within {seconds} s and was killed; the scheduler may be overloaded or unreachable. Try again later")]
    Timeout {
        /// The command line that ran, shell-quoted.
        command: String,
        /// The time limit that expired.
        seconds: u64,
    },
    /// A scheduler program printed something this crate cannot read.
    #[error("cannot read the output of `{command}`: {problem}. Output was:\n{output}")]
    UnexpectedOutput {
        /// The command line that ran, shell-quoted.
        command: String,
        /// What was expected and not found.
        problem: String,
        /// What it printed (stdout, then stderr if any).
        output: String,
    },
    /// A node list (Cobalt partition name, Slurm hostlist, node file) is malformed.
    #[error("bad node list {input:?}: {problem}")]
    BadNodeList {
        /// The text given.
        input: String,
        /// What is wrong, and the expected form.
        problem: String,
    },
    /// An environment variable set by the batch scheduler has a value this crate cannot use.
    #[error("environment variable {var}={value:?} is invalid: expected {expected}")]
    BadEnv {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// The form it should take.
        expected: String,
    },
    /// A scheduler name (SCHEDULER_CLASS) that is not known.
    #[error("unknown scheduler {0:?}; valid names are: CobaltScheduler, SlurmScheduler, PBSScheduler, LocalScheduler (or cobalt, slurm, pbs, local)")]
    UnknownScheduler(String),
    /// An MPI launcher name that is not known.
    #[error("unknown MPI launcher {0:?}; valid names are: aprun, mpich (mpiexec), srun, or a template containing {{{{ ... }}}}")]
    UnknownMpiLauncher(String),
    /// A CPU affinity name that is not known.
    #[error("unknown cpu_affinity {0:?}; valid values are: none, depth")]
    UnknownCpuAffinity(String),
    /// A submit or launch request that cannot be carried out as given.
    #[error("{0}")]
    BadRequest(String),
    /// A template (job script or MPI launch command) failed to render.
    #[error("{name}{}: {problem}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Template {
        /// The template file (or a description of where the template came from).
        name: String,
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// What is wrong.
        problem: String,
    },
    /// The queue policy file is malformed.
    #[error("{file}:{line}: {}{problem}", key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Policy {
        /// The policy file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// The key concerned, when there is one.
        key: Option<String>,
        /// What is wrong and the expected form.
        problem: String,
    },
    /// No job with this id is known to the local scheduler.
    #[error("no local batch job has id {0:?}; see `balsam ls queues` for the ids")]
    UnknownLocalJob(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What the scheduler printed on stderr when it refused, verbatim; None for other errors.
    ///
    /// The CLI shows this to the user as is: it is the scheduler's own explanation.
    pub fn scheduler_stderr(&self) -> Option<&str> {
        match self {
            Error::ProgramFailed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

fn exit_description(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    }
}

/// The scheduler's own words: stderr, or stdout when stderr is empty (Cobalt prints some refusals
/// on stdout).
fn scheduler_words<'a>(stderr: &'a str, stdout: &'a str) -> &'a str {
    if stderr.trim().is_empty() {
        if stdout.trim().is_empty() {
            "(it printed nothing)"
        } else {
            stdout.trim_end()
        }
    } else {
        stderr.trim_end()
    }
}
