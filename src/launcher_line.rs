//! The launcher's command line: the options of `balsam launcher`, and the check that a rendered
//! job script starts a launcher whose options parse.
//!
//! A launcher job whose script does not start a launcher is accepted by the scheduler, waits in
//! the queue, burns its allocation and runs nothing, and the user learns it hours later. So
//! `submit-launch` and the service read the rendered script before submitting it: some line must
//! run `balsam launcher` or `balsam-mpi-launcher` (behind aprun, srun, mpiexec or anything else),
//! and the words after it must be options those commands accept.

use balsam_launcher::LaunchOptions;
use clap::Parser;

/// Worker ranks `balsam launcher` may start on one host: more than any node has cores.
pub const MAX_WORKERS: i64 = 1024;

/// Arguments of `balsam launcher`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct LauncherArgs {
    /// Worker ranks to start here, 0 to 1024 (the launcher runs N+1 MPI ranks; rank 0 is the
    /// master, and with no workers runs the serial jobs itself) [default: 1]. Inside a batch job
    /// the launcher runs one rank per node of the allocation instead.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=MAX_WORKERS))]
    pub num_workers: Option<u32>,
    #[command(flatten)]
    pub opts: LaunchOptions,
}

/// `balsam launcher ...` as a script runs it.
#[derive(Parser)]
#[command(name = "balsam launcher", no_binary_name = true)]
struct BalsamLauncherLine {
    #[command(flatten)]
    args: LauncherArgs,
    /// `--db` is global to `balsam`.
    #[arg(long)]
    db: Option<String>,
}

/// `balsam-mpi-launcher ...` as a script runs it.
#[derive(Parser)]
#[command(name = "balsam-mpi-launcher", no_binary_name = true)]
struct MpiLauncherLine {
    #[arg(long)]
    db: Option<String>,
    #[command(flatten)]
    opts: LaunchOptions,
}

/// Words that end a command on a shell line.
const SHELL_OPERATORS: [&str; 6] = [";", "&&", "||", "|", "&", "|&"];

/// Checks that `script` starts a launcher. Err says what is wrong, naming the line.
pub fn check_script(script: &str) -> Result<(), String> {
    let mut problems: Vec<String> = Vec::new();
    for (lineno, line) in logical_lines(script) {
        let Some(found) = launcher_on_line(&line) else {
            continue;
        };
        match found {
            Ok(()) => return Ok(()),
            Err(e) => problems.push(format!("line {lineno} `{}`: {e}", line.trim())),
        }
    }
    if problems.is_empty() {
        return Err("it starts no launcher: no line runs `balsam launcher` or \
                    balsam-mpi-launcher, so the batch job would run no jobs"
            .into());
    }
    Err(problems.join("; "))
}

/// The script's lines with backslash continuations joined, numbered from 1 by their first line.
fn logical_lines(script: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in script.lines().enumerate() {
        let (start, mut text) = current.take().unwrap_or((i + 1, String::new()));
        match raw.strip_suffix('\\') {
            Some(head) => {
                text.push_str(head);
                text.push(' ');
                current = Some((start, text));
            }
            None => {
                text.push_str(raw);
                out.push((start, text));
            }
        }
    }
    if let Some(rest) = current {
        out.push(rest);
    }
    out
}

/// None when the line starts no launcher; else whether its options parse.
fn launcher_on_line(line: &str) -> Option<Result<(), String>> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') {
        return None;
    }
    let words = shell_words::split(trimmed).ok()?;
    let base = |w: &str| w.rsplit('/').next().unwrap_or(w).to_string();
    let (kind, at) = words.iter().enumerate().find_map(|(i, w)| {
        let b = base(w);
        if b == balsam_launcher::LAUNCHER_BIN {
            Some((Kind::Mpi, i + 1))
        } else if b == "balsam" {
            // `balsam [--db PATH] launcher ...`
            let mut j = i + 1;
            loop {
                match words.get(j).map(String::as_str) {
                    Some("--db") => j += 2,
                    Some(w) if w.starts_with("--db=") => j += 1,
                    Some("launcher") => return Some((Kind::Balsam, j + 1)),
                    _ => return None,
                }
            }
        } else {
            None
        }
    })?;
    let mut args: Vec<String> = Vec::new();
    for w in &words[at..] {
        if SHELL_OPERATORS.contains(&w.as_str())
            || w.starts_with('>')
            || w.starts_with('<')
            || w.starts_with("2>")
            || w.starts_with("&>")
        {
            break;
        }
        // `... --time-limit-minutes=28; next` or `... &`: the operator ends the command.
        if let Some(head) = w.strip_suffix(';').or_else(|| w.strip_suffix('&')) {
            if !head.is_empty() {
                args.push(head.to_string());
            }
            break;
        }
        args.push(w.clone());
    }
    let parsed = match kind {
        Kind::Balsam => BalsamLauncherLine::try_parse_from(&args).map(|_| ()),
        Kind::Mpi => MpiLauncherLine::try_parse_from(&args).map(|_| ()),
    };
    Some(match parsed {
        Ok(()) => Ok(()),
        // A value the shell fills in (`--time-limit-minutes=$T`) cannot be checked here.
        Err(_) if line.contains('$') || line.contains('`') => Ok(()),
        Err(e) => Err(first_line(&e.to_string())),
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Balsam,
    Mpi,
}

/// clap's message without its `error: ` tag and usage lines.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or(text).trim();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_talks_template_as_legacy_rendered_it_starts_a_launcher() {
        let script = "#!/bin/bash -x\n#COBALT -n 2\nsource balsamactivate /db\nsleep 2\n\n\
                      balsam launcher --consume-all --job-mode=serial --time-limit-minutes=28\n\
                      source balsamdeactivate\n";
        assert_eq!(check_script(script), Ok(()));
        let script = "balsam launcher --wf-filter=gdb7 --job-mode=mpi --time-limit-minutes=3\n";
        assert_eq!(check_script(script), Ok(()));
    }

    #[test]
    fn the_talks_template_with_an_empty_filter_is_refused() {
        // What `--{{ wf_filter }}` gave when wf_filter was '' for all jobs.
        let script = "#!/bin/bash\nbalsam launcher -- --job-mode=serial --time-limit-minutes=28\n";
        let err = check_script(script).unwrap_err();
        assert!(
            err.starts_with(
                "line 2 `balsam launcher -- --job-mode=serial --time-limit-minutes=28`: "
            ),
            "{err}"
        );
        assert!(err.contains("unexpected argument"), "{err}");
    }

    #[test]
    fn shipped_launcher_lines_pass() {
        for line in [
            "aprun -n 2 -N 1 -cc none /opt/bin/balsam-mpi-launcher --job-mode=serial --consume-all --time-limit-minutes=3",
            "srun -n 16 --ntasks-per-node=1 --overlap --cpus-per-task=${SLURM_CPUS_ON_NODE:-1} --cpu-bind=none \\\n  balsam-mpi-launcher --job-mode=mixed --wf-filter='my wf' --time-limit-minutes=0.5",
            "mpiexec -n 3 balsam-mpi-launcher --job-mode=serial --consume-all --time-limit-minutes=58 > out.txt 2>&1",
            "balsam launcher --consume-all --job-mode mixed --num-workers 2; echo done",
            "/usr/bin/balsam --db /x launcher --consume-all",
        ] {
            assert_eq!(check_script(line), Ok(()), "{line}");
        }
    }

    #[test]
    fn no_launcher_or_bad_options_are_named() {
        let err =
            check_script("#!/bin/bash\necho hello\n# balsam launcher --consume-all\n").unwrap_err();
        assert!(err.starts_with("it starts no launcher"), "{err}");
        let err = check_script("x\nballs\nbalsam-mpi-launcher --job-mode=fast\n").unwrap_err();
        assert!(
            err.starts_with("line 3 `balsam-mpi-launcher --job-mode=fast`: invalid value 'fast'"),
            "{err}"
        );
        let err = check_script("balsam launcher --num-workers 4294967295\n").unwrap_err();
        assert!(err.contains("4294967295 is not in 0..=1024"), "{err}");
        // Values the shell fills in are taken on trust.
        assert_eq!(
            check_script("balsam launcher --time-limit-minutes=$((T-2))\n"),
            Ok(())
        );
    }
}
