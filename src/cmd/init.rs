//! `balsam init PATH`: create a database directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use balsam_cobalt::{default_template, default_template_name, SchedulerKind};
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
    write_examples(&root.join("job-templates"))?;
    let name = a.path.display();
    println!("*****");
    println!("Successfully created Balsam DB at: {}", root.display());
    println!("Use `source balsamactivate {name}` to begin working.");
    println!("*****");
    Ok(())
}

/// The shipped job templates and queue policies, as starting points for a site's own: copy one,
/// edit it, and point JOB_TEMPLATE or QUEUE_POLICY at it. Until then the built-in ones are used,
/// so these copies can be edited freely without changing anything by surprise.
fn write_examples(dir: &std::path::Path) -> Result<()> {
    let mut files: Vec<(String, &str)> = SchedulerKind::ALL
        .iter()
        .map(|k| (default_template_name(*k).to_string(), default_template(*k)))
        .collect();
    files.push(("theta_policy.ini".into(), balsam_cobalt::THETA_POLICY));
    files.push(("local_policy.ini".into(), balsam_cobalt::LOCAL_POLICY));
    for (name, text) in files {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}
