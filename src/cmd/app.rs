//! `balsam app`: register an application.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use balsam_store::Application;

use super::Ctx;
use crate::output::app_block;

/// Arguments of `balsam app`.
#[derive(clap::Args)]
pub struct AppArgs {
    /// Unique application name
    #[arg(long)]
    pub name: String,
    /// Command line jobs run, before their args (a .py script runs with python3)
    #[arg(long, visible_alias = "exec")]
    pub executable: String,
    /// Free-text description
    #[arg(long, default_value = "")]
    pub description: String,
    /// Script run once before a job's first run
    #[arg(long, default_value = "")]
    pub preprocess: String,
    /// Script run after each run (and on errors/timeouts with the handlers)
    #[arg(long, default_value = "")]
    pub postprocess: String,
    /// Script sourced in bash before the command
    #[arg(long, default_value = "")]
    pub envscript: String,
}

fn on_path(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        return Path::new(prog).is_file().then(|| PathBuf::from(prog));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// A `.py` script becomes `python3 /abs/path/script.py`, as legacy did, so jobs run from any
/// working directory.
pub fn resolve_script(cmd: &str, what: &str) -> Result<String> {
    if cmd.trim().is_empty() {
        return Ok(String::new());
    }
    let words = shell_split(cmd, what)?;
    let first = &words[0];
    if first.ends_with(".py") {
        let abs = std::fs::canonicalize(first)
            .with_context(|| format!("{what} {first}: no such file"))?;
        let python =
            on_path("python3").context("a .py application needs python3, which is not on PATH")?;
        let mut out = vec![python.display().to_string(), abs.display().to_string()];
        out.extend(words[1..].iter().cloned());
        return Ok(shell_words::join(out));
    }
    if on_path(first).is_none() {
        if Path::new(first).exists() {
            // A relative path that exists here: store it absolute.
            let abs = std::fs::canonicalize(first)?;
            let mut out = vec![abs.display().to_string()];
            out.extend(words[1..].iter().cloned());
            return Ok(shell_words::join(out));
        }
        tracing::warn!(
            "{what} {first:?} is not on PATH here; it must be found where the launcher runs"
        );
    }
    Ok(cmd.to_string())
}

/// An envscript as an absolute path (empty for none).
pub fn resolve_envscript(path: &str) -> Result<String> {
    if path.is_empty() {
        return Ok(String::new());
    }
    Ok(std::fs::canonicalize(path)
        .with_context(|| format!("envscript {path}: no such file"))?
        .display()
        .to_string())
}

fn shell_split(cmd: &str, what: &str) -> Result<Vec<String>> {
    let words = shell_words::split(cmd).with_context(|| format!("cannot parse {what} {cmd:?}"))?;
    if words.is_empty() {
        bail!("{what} is empty");
    }
    Ok(words)
}

/// Registers the application and prints the talk's block.
pub fn run(ctx: &mut Ctx, a: &AppArgs) -> Result<()> {
    let app = Application {
        id: 0,
        name: a.name.trim().to_string(),
        description: a.description.clone(),
        executable: resolve_script(&a.executable, "executable")?,
        preprocess: resolve_script(&a.preprocess, "preprocess script")?,
        postprocess: resolve_script(&a.postprocess, "postprocess script")?,
        envscript: resolve_envscript(&a.envscript)?,
    };
    let app = ctx.store.add_app(&app)?;
    tracing::info!(name = %app.name, executable = %app.executable, "application added");
    print!("{}", app_block(&app));
    println!("Added app to database");
    Ok(())
}
