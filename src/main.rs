//! `balsam`: the command line of the Balsam workflow manager. Each subcommand lives in its own
//! file under `cmd/`; this file only parses arguments, finds the database and dispatches.

mod cmd;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Balsam command line interface
#[derive(Parser)]
#[command(
    name = "balsam",
    version,
    about = "Balsam command line interface",
    propagate_version = true
)]
struct Cli {
    /// The Balsam database directory (default: $BALSAM_DB_PATH)
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// add a new application definition
    App(cmd::app::AppArgs),
    /// add a new Balsam job (or many, with --from-file)
    Job(cmd::job::JobArgs),
    /// add a dependency between two existing jobs
    Dep(cmd::dep::DepArgs),
    /// list jobs, applications, workflows or queued launches
    Ls(cmd::ls::LsArgs),
    /// alter a job
    Modify(cmd::modify::ModifyArgs),
    /// remove jobs or applications from the database
    Rm(cmd::rm::RmArgs),
    /// kill a job without removing it from the DB
    Killjob(cmd::killjob::KilljobArgs),
    /// create a child job of the current job (run inside a job: uses BALSAM_JOB_ID)
    Mkchild(cmd::mkchild::MkchildArgs),
    /// start a local instance of the balsam launcher
    Launcher(cmd::launcher::LauncherArgs),
    /// submit a launcher job to the batch scheduler
    #[command(
        name = "submit-launch",
        alias = "submit_launch",
        args_override_self = true
    )]
    SubmitLaunch(cmd::submit_launch::SubmitLaunchArgs),
    /// keep launcher jobs flowing into the batch scheduler as work comes and goes
    Service(cmd::service::ServiceArgs),
    /// create a new Balsam database directory
    Init(cmd::init::InitArgs),
    /// add N dummy jobs, for testing
    #[command(name = "make_dummies", alias = "make-dummies")]
    MakeDummies(cmd::make_dummies::MakeDummiesArgs),
    /// show the active database
    Which(cmd::which::WhichArgs),
    /// follow the database's logs
    Log(cmd::log::LogArgs),
}

fn main() -> ExitCode {
    cmd::install_panic_hook();
    let cli = Cli::parse();
    // `balsam ls | head`: end quietly when the reader leaves, as Unix tools do (Rust ignores
    // SIGPIPE, and a print to the closed pipe would otherwise panic). Not for the service, a
    // daemon that must outlive whatever reads its stderr.
    if !matches!(cli.command, Command::Service(_)) {
        // SAFETY: restoring the default disposition of one signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Init(a) => cmd::init::run(&a),
        Command::Which(a) => cmd::which::run(cli.db.as_deref(), &a),
        Command::Service(a) => cmd::service::run(cli.db.as_deref(), &a),
        // Commands that only read never take the write lock.
        other => match if matches!(other, Command::Ls(_) | Command::Log(_)) {
            cmd::Ctx::open_read_only(cli.db.as_deref())
        } else {
            cmd::Ctx::open(cli.db.as_deref())
        } {
            Err(e) => Err(e),
            Ok(mut ctx) => match other {
                Command::App(a) => cmd::app::run(&mut ctx, &a),
                Command::Job(a) => cmd::job::run(&mut ctx, &a),
                Command::Dep(a) => cmd::dep::run(&mut ctx, &a),
                Command::Ls(a) => cmd::ls::run(&mut ctx, &a),
                Command::Modify(a) => cmd::modify::run(&mut ctx, &a),
                Command::Rm(a) => cmd::rm::run(&mut ctx, &a),
                Command::Killjob(a) => cmd::killjob::run(&mut ctx, &a),
                Command::Mkchild(a) => cmd::mkchild::run(&mut ctx, &a),
                Command::MakeDummies(a) => cmd::make_dummies::run(&mut ctx, &a),
                Command::Log(a) => cmd::log::run(&mut ctx, &a),
                Command::SubmitLaunch(a) => cmd::submit_launch::run(&mut ctx, &a),
                Command::Launcher(a) => cmd::launcher::run(&ctx.store.dir, &a).map(|code| {
                    if code != 0 {
                        std::process::exit(code);
                    }
                }),
                Command::Init(_) | Command::Which(_) | Command::Service(_) => {
                    unreachable!("handled above")
                }
            },
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `balsam ls | head`: the reader left; stop quietly, as other Unix tools do.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("balsam: error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a message that already includes its cause's text
/// (`f.jsonl:1: bad value ...` wrapping `bad value ...`) is not followed by it again.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}
