//! `balsam which`: the active database, its name, or the databases this user created.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use balsam_store::DbDir;

/// Arguments of `balsam which`.
#[derive(clap::Args)]
pub struct WhichArgs {
    /// List the databases created by `balsam init` on this account
    #[arg(long)]
    pub list: bool,
    /// Print only the active database's name
    #[arg(long)]
    pub name: bool,
}

fn known_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".balsam").join("databases"))
}

/// Adds a database to `~/.balsam/databases` (best effort: a read-only home is not an error).
pub fn remember(root: &Path) {
    let Some(file) = known_file() else { return };
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
    {
        let _ = writeln!(f, "{}", root.display());
    }
}

/// Prints what was asked.
pub fn run(db: Option<&Path>, a: &WhichArgs) -> Result<()> {
    if a.list {
        let mut seen: Vec<String> = Vec::new();
        let text = known_file()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !seen.iter().any(|s| s == line) && DbDir::open(Path::new(line)).is_ok() {
                seen.push(line.to_string());
            }
        }
        for s in seen {
            println!("{s}");
        }
        return Ok(());
    }
    let dir = DbDir::locate(db)?;
    if a.name {
        println!("{}", dir.display_name());
    } else {
        println!("{}", dir.root.display());
    }
    Ok(())
}
