//! `balsam launcher`: placeholder until the launcher lands.

use anyhow::{bail, Result};

/// Arguments of `balsam launcher`.
#[derive(clap::Args)]
pub struct LauncherArgs {}

/// Not yet.
pub fn run(_db: &balsam_store::DbDir, _a: &LauncherArgs) -> Result<i32> {
    bail!("the launcher is not built yet")
}
