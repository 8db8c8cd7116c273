//! Batch job scripts rendered from templates.
//!
//! The service and `balsam submit-launch` write a script that starts the launcher inside a batch
//! job; the site decides what goes in it (modules, file systems, environment) by editing a
//! template (settings key `JOB_TEMPLATE`). Legacy Balsam used Jinja2; minijinja speaks the same
//! language, so users' templates keep working, including expressions like
//! `{{ time_minutes-2 }}`. Unknown variables are an error when printed (a typo must not silently
//! become an empty string in a script), but may be tested with `{% if %}`.
//!
//! Default templates for each scheduler ship in `cobalt/templates/` and are built in.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::scheduler::SchedulerKind;

/// The variables a job template can use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateVars {
    /// Project (account) to charge; may be empty.
    pub project: String,
    /// Queue (Slurm partition).
    pub queue: String,
    /// Nodes in the batch job.
    pub nodes: usize,
    /// Wall-time limit in minutes.
    pub time_minutes: u64,
    /// Launcher job mode: `serial`, `mpi` or `mixed`. In `mpi` mode the shipped templates run
    /// the launcher alone on the head (MOM) node; otherwise one launcher rank per node.
    pub job_mode: String,
    /// The workflow filter as the launcher's option without its dashes, as legacy Balsam rendered
    /// it: `consume-all`, or `wf-filter=NAME` (NAME shell-quoted when it needs quotes), so that
    /// `--{{ wf_filter }}` is the launcher's flag. See [`wf_filter_option`].
    pub wf_filter: String,
    /// Directory holding the `balsam` binaries.
    pub balsam_bin: String,
    /// The Balsam database directory.
    pub balsam_db_path: String,
    /// Extra scheduler flags as one string (e.g. `--attrs ssds=required:ssd_size=128`); may be
    /// empty.
    pub sched_flags: String,
    /// Path of the `balsam-mpi-launcher` binary.
    pub launcher_bin: String,
}

/// The `wf_filter` variable for a workflow filter (empty: all jobs): `consume-all` or
/// `wf-filter=NAME`, as legacy Balsam's templates received it, so the talk's
/// `balsam launcher --{{ wf_filter }}` works unchanged. NAME is quoted for the shell when it
/// holds spaces or other special characters.
pub fn wf_filter_option(filter: &str) -> String {
    if filter.is_empty() {
        "consume-all".to_string()
    } else {
        format!("wf-filter={}", shell_words::quote(filter))
    }
}

/// The built-in template for a scheduler.
pub fn default_template(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Cobalt => include_str!("../templates/cobalt.tmpl"),
        SchedulerKind::Slurm => include_str!("../templates/slurm.tmpl"),
        SchedulerKind::Pbs => include_str!("../templates/pbs.tmpl"),
        SchedulerKind::Local => include_str!("../templates/local.tmpl"),
    }
}

/// The file name of the built-in template for a scheduler (for messages and `balsam init`).
pub fn default_template_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Cobalt => "cobalt.tmpl",
        SchedulerKind::Slurm => "slurm.tmpl",
        SchedulerKind::Pbs => "pbs.tmpl",
        SchedulerKind::Local => "local.tmpl",
    }
}

/// Renders a job template. `name` (usually the template's path) appears in errors with the line.
pub fn render_job_template(name: &str, template_text: &str, vars: &TemplateVars) -> Result<String> {
    if vars.nodes == 0 || vars.time_minutes == 0 {
        return Err(Error::BadRequest(format!(
            "a launcher job needs at least 1 node and 1 minute (got {} nodes, {} minutes)",
            vars.nodes, vars.time_minutes
        )));
    }
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    // A script must end with its newline; block tags on their own line leave no blank line.
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.render_named_str(name, template_text, vars)
        .map_err(|e| template_error(name, &e))
}

/// Reads a template file and renders it.
pub fn render_job_template_file(path: &Path, vars: &TemplateVars) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    render_job_template(&path.display().to_string(), &text, vars)
}

/// A minijinja error as ours: the template's name, the line, and minijinja's explanation.
pub(crate) fn template_error(name: &str, e: &minijinja::Error) -> Error {
    let mut problem = e.kind().to_string();
    if let Some(detail) = e.detail() {
        problem.push_str(": ");
        problem.push_str(detail);
    }
    if let (Some(src), Some(range)) = (e.template_source(), e.range()) {
        if let Some(snippet) = src.get(range) {
            problem.push_str(&format!(" (in `{snippet}`)"));
        }
    }
    Error::Template {
        name: name.to_string(),
        line: e.line(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> TemplateVars {
        TemplateVars {
            project: "SDL_Workshop".into(),
            queue: "debug-cache-quad".into(),
            nodes: 2,
            time_minutes: 30,
            job_mode: "serial".into(),
            wf_filter: wf_filter_option(""),
            balsam_bin: "/opt/balsam/bin".into(),
            balsam_db_path: "/home/u/test-db".into(),
            sched_flags: "--attrs ssds=required:ssd_size=128".into(),
            launcher_bin: "/opt/balsam/bin/balsam-mpi-launcher".into(),
        }
    }

    #[test]
    fn talks_template_renders() {
        // The legacy template from the talk, as users have it in ~/.balsam.
        let t = "#!/bin/bash -x\n#COBALT -A {{ project }}\n#COBALT -n {{ nodes }}\n\
                 #COBALT -q {{ queue }}\n#COBALT -t {{ time_minutes }}\n\n\
                 balsam launcher --{{ wf_filter }} --job-mode={{ job_mode }} \
                 --time-limit-minutes={{ time_minutes-2 }}\n";
        let out = render_job_template("theta.cobaltscheduler.tmpl", t, &vars()).unwrap();
        assert!(out.contains("#COBALT -A SDL_Workshop\n"));
        assert!(out.contains("#COBALT -t 30\n"));
        assert!(
            out.ends_with(
                "\nbalsam launcher --consume-all --job-mode=serial --time-limit-minutes=28\n"
            ),
            "{out}"
        );
        // With a workflow filter, as legacy rendered it.
        let mut v = vars();
        v.wf_filter = wf_filter_option("gdb7");
        let out = render_job_template("theta.cobaltscheduler.tmpl", t, &v).unwrap();
        assert!(
            out.contains("\nbalsam launcher --wf-filter=gdb7 --job-mode=serial "),
            "{out}"
        );
    }

    #[test]
    fn cobalt_default() {
        let out = render_job_template(
            "cobalt.tmpl",
            default_template(SchedulerKind::Cobalt),
            &vars(),
        )
        .unwrap();
        assert!(out.starts_with("#!/bin/bash -x\n"), "{out}");
        for line in [
            "#COBALT -A SDL_Workshop",
            "#COBALT -n 2",
            "#COBALT -q debug-cache-quad",
            "#COBALT -t 30",
            "#COBALT --attrs ssds=required:ssd_size=128",
            "export MPICH_GNI_FORK_MODE=FULLCOPY",
            "export PMI_NO_FORK=1",
            "export BALSAM_DB_PATH=/home/u/test-db",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "missing {line:?} in:\n{out}"
            );
        }
        let launch = out
            .lines()
            .find(|l| l.contains("balsam-mpi-launcher"))
            .unwrap();
        assert!(launch.starts_with("aprun -n 2 -N 1"), "{launch}");
        assert!(launch.contains("--job-mode=serial"), "{launch}");
        assert!(launch.contains("--consume-all"), "{launch}");
        assert!(launch.contains("--time-limit-minutes=28"), "{launch}");
        // No blank-line litter from block tags.
        assert!(!out.contains("\n\n\n"), "{out}");
    }

    #[test]
    fn cobalt_default_options() {
        let mut v = vars();
        v.sched_flags.clear();
        v.wf_filter = wf_filter_option("my wf");
        v.job_mode = "mpi".into();
        v.project.clear();
        let out = render_job_template("cobalt.tmpl", default_template(SchedulerKind::Cobalt), &v)
            .unwrap();
        assert!(!out.contains("--attrs"), "{out}");
        assert!(!out.contains("#COBALT -A"), "{out}");
        let launch = out
            .lines()
            .find(|l| l.contains("balsam-mpi-launcher"))
            .unwrap();
        // In mpi mode the launcher runs on the MOM node; aprun starts each job from there.
        assert!(
            launch.starts_with("/opt/balsam/bin/balsam-mpi-launcher"),
            "{launch}"
        );
        assert!(launch.contains(" --wf-filter='my wf' "), "{launch}");
        assert!(!launch.contains("--consume-all"), "{launch}");
    }

    #[test]
    fn mixed_mode_starts_one_rank_per_node() {
        let mut v = vars();
        v.job_mode = "mixed".into();
        for kind in SchedulerKind::ALL {
            let out = render_job_template("t", default_template(kind), &v).unwrap();
            let launch = out
                .lines()
                .find(|l| l.contains("balsam-mpi-launcher"))
                .unwrap();
            assert!(!launch.starts_with("/opt/balsam"), "{kind}: {launch}");
            assert!(launch.contains("--job-mode=mixed"), "{kind}: {launch}");
        }
    }

    #[test]
    fn short_jobs_keep_a_positive_time_limit() {
        for kind in SchedulerKind::ALL {
            // Under 4 minutes the launcher keeps half the wall time, so that it still stops
            // before the scheduler does.
            for (minutes, expect) in [(1u64, "0.5"), (2, "1.0"), (3, "1.5"), (4, "2"), (60, "58")] {
                let mut v = vars();
                v.time_minutes = minutes;
                let out = render_job_template("t", default_template(kind), &v).unwrap();
                let want = format!("--time-limit-minutes={expect}\n");
                assert!(
                    out.contains(&want),
                    "{kind} {minutes} min: want {want} in\n{out}"
                );
                assert!(!out.contains("--time-limit-minutes=0\n"), "{out}");
                assert!(!out.contains("--time-limit-minutes=-"), "{out}");
            }
        }
    }

    #[test]
    fn slurm_pbs_local_defaults() {
        let v = vars();
        let slurm =
            render_job_template("slurm.tmpl", default_template(SchedulerKind::Slurm), &v).unwrap();
        assert!(slurm.lines().any(|l| l == "#SBATCH -N 2"), "{slurm}");
        assert!(slurm.lines().any(|l| l == "#SBATCH -t 30"), "{slurm}");
        assert!(
            slurm.lines().any(|l| l == "#SBATCH -A SDL_Workshop"),
            "{slurm}"
        );
        let launch = slurm
            .lines()
            .find(|l| l.contains("balsam-mpi-launcher"))
            .unwrap();
        assert!(
            launch.starts_with("srun -n 2 --ntasks-per-node=1"),
            "{launch}"
        );

        let pbs =
            render_job_template("pbs.tmpl", default_template(SchedulerKind::Pbs), &v).unwrap();
        assert!(pbs.lines().any(|l| l == "#PBS -l select=2"), "{pbs}");
        assert!(
            pbs.lines().any(|l| l == "#PBS -l walltime=00:30:00"),
            "{pbs}"
        );
        let launch = pbs
            .lines()
            .find(|l| l.contains("balsam-mpi-launcher"))
            .unwrap();
        assert!(
            launch.starts_with("mpiexec -n 2 -ppn 1 --hostfile $PBS_NODEFILE"),
            "{launch}"
        );
        let mut long = v.clone();
        long.time_minutes = 125;
        let pbs =
            render_job_template("pbs.tmpl", default_template(SchedulerKind::Pbs), &long).unwrap();
        assert!(
            pbs.lines().any(|l| l == "#PBS -l walltime=02:05:00"),
            "{pbs}"
        );

        let local =
            render_job_template("local.tmpl", default_template(SchedulerKind::Local), &v).unwrap();
        let launch = local
            .lines()
            .find(|l| l.contains("balsam-mpi-launcher"))
            .unwrap();
        assert!(launch.starts_with("mpiexec -n 3 "), "{launch}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let t = "#!/bin/bash\n#COBALT -A {{ project }}\n#COBALT -n {{ ndoes }}\n";
        let err = render_job_template("/home/u/.balsam/job-templates/theta.tmpl", t, &vars())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("/home/u/.balsam/job-templates/theta.tmpl:3:"),
            "{msg}"
        );
        assert!(msg.contains("undefined"), "{msg}");
        assert!(matches!(err, Error::Template { line: Some(3), .. }));

        let t = "line1\n{% if nodes %}\nno endif\n";
        let msg = render_job_template("x.tmpl", t, &vars())
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("x.tmpl:"), "{msg}");
        assert!(msg.contains("syntax error"), "{msg}");
    }

    #[test]
    fn unknown_variables_may_be_tested() {
        // Legacy templates test variables we no longer provide (conda_path): not an error.
        let t = "{% if conda_path %}source activate {{ conda_path }}{% endif %}ok\n";
        assert_eq!(render_job_template("t", t, &vars()).unwrap(), "ok\n");
    }

    #[test]
    fn wf_filter_renders_as_legacy() {
        assert_eq!(wf_filter_option(""), "consume-all");
        assert_eq!(wf_filter_option("gdb7"), "wf-filter=gdb7");
        assert_eq!(wf_filter_option("a b"), "wf-filter='a b'");
        assert_eq!(
            shell_words::split(&format!("--{}", wf_filter_option("it's"))).unwrap(),
            ["--wf-filter=it's"]
        );
    }

    #[test]
    fn zero_nodes_refused() {
        let mut v = vars();
        v.nodes = 0;
        assert!(render_job_template("t", "x", &v).is_err());
    }

    #[test]
    fn from_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tmpl");
        std::fs::write(&p, "nodes={{ nodes }}\n").unwrap();
        assert_eq!(render_job_template_file(&p, &vars()).unwrap(), "nodes=2\n");
        let err = render_job_template_file(&dir.path().join("missing"), &vars()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }
}
