//! `balsam init PATH`: create a database directory, with its database in an embedded SQLite
//! file (the default: one host), on a private PostgreSQL server that runs from the directory
//! (`--postgres`: many hosts), or on a server the site runs (`--db-url`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use balsam_cobalt::{default_template, default_template_name, SchedulerKind};
use balsam_store::pgserver::{self, CreateOptions};
use balsam_store::server_info::redact;
use balsam_store::{ServerInfo, Store};

/// Arguments of `balsam init`.
#[derive(clap::Args)]
pub struct InitArgs {
    /// Where to create the database directory
    pub path: PathBuf,
    /// Keep the database on a private PostgreSQL server whose data lives in PATH, and start it:
    /// for launchers and commands on several hosts that share PATH's file system
    #[arg(long, conflicts_with = "db_url")]
    pub postgres: bool,
    /// The name or address other hosts reach the server at (default: this machine's host name)
    #[arg(long, value_name = "HOST", requires = "postgres")]
    pub pg_host: Option<String>,
    /// The server's TCP port (default: a free one)
    #[arg(long, value_name = "PORT", requires = "postgres")]
    pub pg_port: Option<u16>,
    /// When run as root: the unprivileged user the server runs as (default: postgres)
    #[arg(long, value_name = "USER", requires = "postgres")]
    pub pg_os_user: Option<String>,
    /// Keep the database on a PostgreSQL server the site runs,
    /// postgresql://USER[:PASSWORD]@HOST:PORT/NAME; the password comes from the URL (then kept in
    /// PATH/pgpass, mode 0600), PGPASSFILE or ~/.pgpass
    #[arg(long, value_name = "URL")]
    pub db_url: Option<String>,
}

/// Creates the database and says how to activate it.
pub fn run(a: &InitArgs) -> Result<()> {
    let (store, server_line) = if a.postgres {
        create_private_server(a)?
    } else if let Some(url) = &a.db_url {
        let (info, password) = ServerInfo::from_url(url)?;
        let store = Store::create_on_server(&a.path, &info, password.as_deref())
            .with_context(|| format!("cannot create a database on {}", redact(url)))?;
        let line = format!(
            "Database {} on the site's PostgreSQL server at {}",
            info.dbname,
            info.address()
        );
        (store, Some(line))
    } else {
        (Store::create(&a.path)?, None)
    };
    let root = &store.dir.root;
    super::which::remember(root);
    write_examples(&root.join("job-templates"))?;
    let name = a.path.display();
    println!("*****");
    println!("Successfully created Balsam DB at: {}", root.display());
    if let Some(line) = server_line {
        println!("{line}");
    }
    println!("Use `source balsamactivate {name}` to begin working.");
    println!("*****");
    Ok(())
}

/// `--postgres`: makes and starts the server, then the database on it; on failure stops the
/// server and removes its data, so that `balsam init` can be run again.
fn create_private_server(a: &InitArgs) -> Result<(Store, Option<String>)> {
    let opts = CreateOptions {
        host: a.pg_host.clone(),
        port: a.pg_port,
        os_user: a.pg_os_user.clone(),
    };
    println!("Launching Balsam DB server");
    let made = pgserver::create(&a.path, &opts)?;
    for note in &made.notes {
        println!("({note})");
    }
    print!("{}", made.start_output);
    let store = match Store::create_on_server(&a.path, &made.info, Some(&made.password)) {
        Ok(s) => s,
        Err(e) => {
            let _ = pgserver::stop(&a.path, &made.info);
            let _ = pgserver::remove_data(&a.path, &made.info);
            return Err(e).context("the server started, but the database could not be made on it");
        }
    };
    warn_if_readable(&store.dir.root);
    let line = format!(
        "PostgreSQL server at {} (data in {}, password in {})",
        made.info.address(),
        pgserver::data_dir(&store.dir.root, &made.info).display(),
        store
            .dir
            .root
            .join(balsam_store::server_info::PASSWORD_FILE)
            .display()
    );
    Ok((store, Some(line)))
}

/// Others who can list and read the database directory can read every job's data and logs,
/// and learn where the server is (its password stays in `pgpass`, mode 0600).
fn warn_if_readable(dir: &Path) {
    let Ok(m) = std::fs::metadata(dir) else {
        return;
    };
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        eprintln!(
            "warning: {} can be read by other users (mode {mode:03o}): they can read the jobs' data and logs and find the database server (its password stays in pgpass, mode 0600). Make it private with `chmod o-rw {}`",
            dir.display(),
            dir.display()
        );
    }
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
