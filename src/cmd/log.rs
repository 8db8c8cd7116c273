//! `balsam log`: follow the database's logs (`log/*.log`), like `tail -F` over all of them: a
//! log rotated meanwhile is followed into its new file.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::Ctx;

/// Arguments of `balsam log`.
#[derive(clap::Args)]
pub struct LogArgs {
    /// Lines of each file to show first (0 to 100000)
    #[arg(short = 'n', long, default_value_t = 10,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    pub lines: usize,
    /// Print and exit instead of following
    #[arg(long)]
    pub no_follow: bool,
}

fn log_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                // Rotated backups (`balsam.log.1`) are history, not what is being written now.
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "log"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Prints the tail of each log, then what they gain, checking twice a second (no busy loop).
pub fn run(ctx: &mut Ctx, a: &LogArgs) -> Result<()> {
    let dir = ctx.store.dir.log_dir();
    let mut offsets: HashMap<PathBuf, u64> = HashMap::new();
    let stdout = std::io::stdout();
    for f in log_files(&dir) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for l in &lines[lines.len().saturating_sub(a.lines)..] {
            writeln!(stdout.lock(), "{name}: {l}")?;
        }
        offsets.insert(f, text.len() as u64);
    }
    if a.no_follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for f in log_files(&dir) {
            let start = *offsets.get(&f).unwrap_or(&0);
            let Ok(mut file) = std::fs::File::open(&f) else {
                continue;
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let start = if len < start { 0 } else { start };
            if len == start {
                continue;
            }
            file.seek(SeekFrom::Start(start))?;
            let mut buf = String::new();
            file.read_to_string(&mut buf)?;
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for l in buf.lines() {
                writeln!(stdout.lock(), "{name}: {l}")?;
            }
            offsets.insert(f, start + buf.len() as u64);
        }
    }
}
