//! How jobs and applications are printed: the talk's confirmation block and aligned tables.

use std::io::Write;

use balsam_store::fields::{get_text, py_bool};
use balsam_store::{Application, Job};
use tabwriter::TabWriter;

/// The talk's confirmation block for a job (`BalsamJob <id>` then `field: value` lines).
pub fn job_block(job: &Job, parents: &[String], executed: &str, workdir: &str) -> String {
    let s = &job.spec;
    let mut out = format!("BalsamJob {}\n-----\n", job.job_id);
    let lock = job
        .lease_session
        .map(|n| format!("launcher session {n}"))
        .unwrap_or_default();
    let mut line = |k: &str, v: &str| {
        out.push_str(k);
        out.push(':');
        if !v.is_empty() {
            out.push(' ');
            out.push_str(v);
        }
        out.push('\n');
    };
    line("workflow", &s.workflow);
    line("name", &s.name);
    line("description", &s.description);
    line("lock", &lock);
    line(
        "parents",
        &format!(
            "[{}]",
            parents
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    for f in [
        "input_files",
        "stage_in_url",
        "stage_out_files",
        "stage_out_url",
        "wall_time_minutes",
        "num_nodes",
        "coschedule_num_nodes",
        "ranks_per_node",
        "cpu_affinity",
        "threads_per_rank",
        "threads_per_core",
        "node_packing_count",
        "environ_vars",
        "mpi_flags",
        "application",
        "args",
        "user_workdir",
    ] {
        line(f, &get_text(s, f).unwrap_or_default());
    }
    line("wait_for_parents", &py_bool(s.wait_for_parents));
    line("post_error_handler", &py_bool(s.post_error_handler));
    line("post_timeout_handler", &py_bool(s.post_timeout_handler));
    line("auto_timeout_retry", &py_bool(s.auto_timeout_retry));
    line("max_restarts", &s.max_restarts.to_string());
    line("num_restarts", &job.num_restarts.to_string());
    line("state", job.state.as_str());
    line(
        "return_code",
        &job.return_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    line(
        "queued_launch_id",
        &job.queued_launch_id
            .map(|c| c.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    line("data", &s.data.to_string());
    out.push_str(&format!("*** Executed command: {executed}\n"));
    out.push_str(&format!("*** Working directory: {workdir}\n"));
    out
}

/// The command a job runs: the application's executable, then the job's args.
pub fn app_cmd(app: Option<&Application>, job: &Job) -> String {
    let exe = app
        .map(|a| a.executable.as_str())
        .unwrap_or("<unknown application>");
    if job.spec.args.is_empty() {
        exe.to_string()
    } else {
        format!("{exe} {}", job.spec.args)
    }
}

/// The talk's application block.
pub fn app_block(app: &Application) -> String {
    let mut out = format!("Application {}:\n-----\n", app.id);
    for (k, v) in [
        ("Name", &app.name),
        ("Description", &app.description),
        ("Executable", &app.executable),
        ("Preprocess", &app.preprocess),
        ("Postprocess", &app.postprocess),
        ("Envscript", &app.envscript),
    ] {
        out.push_str(format!("{:<15}{}", format!("{k}:"), v).trim_end());
        out.push('\n');
    }
    out
}

/// Prints rows as aligned columns with a header.
pub fn table(out: &mut impl Write, header: &[String], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut tw = TabWriter::new(Vec::new()).padding(3);
    writeln!(tw, "{}", header.join("\t"))?;
    for r in rows {
        // A tab or newline inside a value would break the columns.
        let cells: Vec<String> = r.iter().map(|c| c.replace(['\t', '\n'], " ")).collect();
        writeln!(tw, "{}", cells.join("\t"))?;
    }
    tw.flush()?;
    let bytes = tw
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    for line in String::from_utf8_lossy(&bytes).lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
