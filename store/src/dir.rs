//! The database directory: the SQLite file (or `server-info` naming a PostgreSQL server), `data/` (job working directories), `log/`,
//! `qsubmit/` (batch scripts) and `settings.json`. Which one is active comes from `--db`, then
//! `BALSAM_DB_PATH`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::server_info::SERVER_INFO_FILE;
use crate::settings::Settings;
use crate::sql::Backend;

/// The SQLite file inside a database directory.
pub const DB_FILE: &str = "balsamdb.sqlite3";
/// The settings file inside a database directory.
pub const SETTINGS_FILE: &str = "settings.json";

/// A Balsam database directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbDir {
    /// Absolute path of the directory.
    pub root: PathBuf,
}

impl DbDir {
    /// Opens an existing database directory; refuses a path that holds no database.
    pub fn open(path: &Path) -> Result<DbDir> {
        let root = absolute(path)?;
        if root.join(SERVER_INFO_FILE).is_file() {
            return Ok(DbDir { root });
        }
        let file = root.join(DB_FILE);
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() && m.len() == 0 => Err(Error::EmptyDatabase(file)),
            Ok(m) if m.is_file() => Ok(DbDir { root }),
            _ => Err(Error::NotADatabase(root)),
        }
    }

    /// The active database: `explicit` (the `--db` flag) or `BALSAM_DB_PATH`.
    pub fn locate(explicit: Option<&Path>) -> Result<DbDir> {
        match explicit {
            Some(p) => DbDir::open(p),
            None => match std::env::var_os("BALSAM_DB_PATH") {
                Some(p) if !p.is_empty() => DbDir::open(Path::new(&p)),
                _ => Err(Error::NoDatabase),
            },
        }
    }

    /// Creates the directory layout and a default settings file (the SQLite schema is made
    /// by [`crate::Store::create`]).
    pub(crate) fn create_layout(path: &Path) -> Result<DbDir> {
        let root = absolute(path)?;
        if root.join(DB_FILE).exists() || root.join(SERVER_INFO_FILE).exists() {
            return Err(Error::AlreadyExists(root));
        }
        for sub in ["", "data", "log", "qsubmit", "job-templates"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("cannot create {}", d.display()), e))?;
        }
        let settings = root.join(SETTINGS_FILE);
        if !settings.exists() {
            std::fs::write(&settings, Settings::default_file_text())
                .map_err(|e| Error::io(format!("cannot write {}", settings.display()), e))?;
        }
        Ok(DbDir { root })
    }

    /// Where the database lives: PostgreSQL when the directory has a `server-info`, else the
    /// embedded SQLite file.
    pub fn backend(&self) -> Backend {
        if self.root.join(SERVER_INFO_FILE).is_file() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Creates the directory layout for a PostgreSQL database (its `server-info` is written by
    /// whoever sets up the server).
    pub fn create_layout_for_server(path: &Path) -> Result<DbDir> {
        let root = absolute(path)?;
        if root.join(SERVER_INFO_FILE).exists() {
            return Err(Error::AlreadyExists(root));
        }
        DbDir::create_layout(&root)
    }

    /// The SQLite file.
    pub fn db_file(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }

    /// `data/`.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// `log/`.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }

    /// `qsubmit/`.
    pub fn qsubmit_dir(&self) -> PathBuf {
        self.root.join("qsubmit")
    }

    /// `settings.json`.
    pub fn settings_file(&self) -> PathBuf {
        self.root.join(SETTINGS_FILE)
    }

    /// Reads and checks `settings.json` (defaults for a missing file or key).
    pub fn settings(&self) -> Result<Settings> {
        Settings::load(&self.settings_file())
    }

    /// The directory's name, as the prompt shows it (`[BalsamDB: test-db]`).
    pub fn display_name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.root.display().to_string())
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    let p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("cannot read the current directory", e))?
            .join(path)
    };
    // Canonicalize when it exists so the same database always has the same name.
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}
