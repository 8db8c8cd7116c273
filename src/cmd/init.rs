//! `balsam init PATH`: create a database directory.

use std::path::PathBuf;

use anyhow::Result;
use balsam_store::Store;

/// Arguments of `balsam init`.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Where to create the database directory
    pub path: PathBuf,
}

/// Creates the database and says how to activate it.
pub fn run(a: &InitArgs) -> Result<()> {
    let store = Store::create(&a.path)?;
    let root = &store.dir.root;
    super::which::remember(root);
    let name = a.path.display();
    println!("*****");
    println!("Successfully created Balsam DB at: {}", root.display());
    println!("Use `source balsamactivate {name}` to begin working.");
    println!("*****");
    Ok(())
}
