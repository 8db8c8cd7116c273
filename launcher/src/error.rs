//! The launcher's errors: one enum for the library, with the store's errors inside.

use std::path::PathBuf;

/// Everything the launcher library can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed.
    #[error(transparent)]
    Store(#[from] balsam_store::Error),
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command line (executable, args, script) that cannot be split into words.
    #[error("cannot split command line {line:?}: {problem}")]
    BadCommandLine {
        /// The text.
        line: String,
        /// Why.
        problem: String,
    },
    /// A glob pattern that does not parse.
    #[error("bad file pattern {pattern:?} in {field}: {problem}")]
    BadPattern {
        /// The job field it came from.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// Why.
        problem: String,
    },
    /// A stage-in or stage-out location that does not exist or is not supported.
    #[error("{field} {url:?}: {problem}")]
    BadUrl {
        /// The job field.
        field: &'static str,
        /// Its value.
        url: String,
        /// Why.
        problem: String,
    },
    /// A pre- or postprocess script failed.
    #[error("{what} script {script:?} {problem}; see {}", log.display())]
    Script {
        /// `preprocess` or `postprocess`.
        what: &'static str,
        /// The script's command line.
        script: String,
        /// Exit code, signal or timeout, in words.
        problem: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The launcher's configuration is wrong (flags, node lists, launch commands).
    #[error("{0}")]
    Config(String),
    /// The file system under the database directory cannot be written (full, over quota,
    /// read-only, not permitted, gone): not the job's fault, it is left as it was.
    #[error("cannot write job files: {0}")]
    FileSystem(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The launcher's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
