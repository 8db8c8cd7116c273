//! `balsam server start|stop|status`: the private PostgreSQL server of a database directory made
//! by `balsam init --postgres` (legacy's `balsam server`). `source balsamactivate DIR` starts it
//! when it is not running.

use std::path::Path;

use anyhow::{bail, Result};
use balsam_store::pgserver::{self, Started, Stopped};
use balsam_store::{Backend, DbDir, ServerInfo};

/// Arguments of `balsam server`.
#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with the server.
#[derive(clap::Subcommand, Clone, Copy)]
pub enum Action {
    /// start the database server, unless it runs
    Start,
    /// stop the database server (a fast shutdown: committed work is kept)
    Stop,
    /// say whether the database server runs (exit code 0) or not (3)
    Status,
}

/// Exit code of `status` when the server does not run (as `pg_ctl status`).
const NOT_RUNNING: i32 = 3;

/// Runs the action on the active database's server.
pub fn run(db: Option<&Path>, a: &ServerArgs) -> Result<()> {
    let dir = DbDir::locate(db)?;
    if dir.backend() == Backend::Sqlite {
        bail!(
            "{} uses the embedded SQLite database: there is no server to manage (`balsam init DIR --postgres` makes a database with one)",
            dir.root.display()
        );
    }
    let info = ServerInfo::load(&dir.root)?;
    match a.action {
        Action::Start => start(&dir, &info),
        Action::Stop => {
            match pgserver::stop(&dir.root, &info)? {
                Stopped::Stopped(pid) => {
                    println!("Balsam DB server at {} stopped (pid {pid})", info.address())
                }
                Stopped::NotRunning => {
                    let elsewhere = if pgserver::is_local(&info.host).unwrap_or(true) {
                        String::new()
                    } else {
                        format!("; it runs on {}: stop it there", info.host)
                    };
                    println!(
                        "Balsam DB server of {} is not running on this host{elsewhere}",
                        dir.root.display()
                    )
                }
            }
            Ok(())
        }
        Action::Status => {
            let st = pgserver::status(&dir.root, &info);
            match (st.pid, st.answers) {
                (Some(pid), _) => println!(
                    "Balsam DB server at {}: running on this host (pid {pid}, {})",
                    info.address(),
                    st.state.as_deref().unwrap_or("state unknown")
                ),
                (None, true) => {
                    let here = pgserver::is_local(&info.host).unwrap_or(false);
                    println!(
                        "Balsam DB server at {}: answers ({})",
                        info.address(),
                        if here {
                            "its process is not one this user may inspect".to_string()
                        } else {
                            format!("it runs on {}", info.host)
                        }
                    )
                }
                (None, false) => {
                    println!(
                        "Balsam DB server at {}: not running (nothing answers there); start it with `balsam server start`",
                        info.address()
                    );
                    std::process::exit(NOT_RUNNING);
                }
            }
            Ok(())
        }
    }
}

fn start(dir: &DbDir, info: &ServerInfo) -> Result<()> {
    match pgserver::start(&dir.root, info)? {
        Started::AlreadyRunning(pid) => println!(
            "Balsam DB server already running at {} (pid {pid})",
            info.address()
        ),
        Started::Started { output } => {
            println!("Launching Balsam DB server");
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                println!(
                    "(as the user {}: PostgreSQL refuses to run as root)",
                    info.os_user
                );
            }
            print!("{output}");
        }
    }
    Ok(())
}
