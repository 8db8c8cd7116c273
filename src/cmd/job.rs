//! `balsam job`: add one job (with the talk's confirmation block), or many from a JSON-lines or
//! CSV file or a pipe (`--from-file`), in one transaction: a bad line inserts nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use balsam_store::fields;
use balsam_store::{Error as StoreError, Job, JobSpec, NewJob, State, Store, Uuid};

use super::bulk::{self, Format};
use super::Ctx;
use crate::output::{app_cmd, job_block};

/// A value parser that checks a flag with its job field's rules (types and ranges live in the
/// store's field table, so a flag, `balsam modify` and a bulk line accept the same values).
fn field_value(
    name: &'static str,
) -> impl Fn(&str) -> std::result::Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| match fields::field(name).and_then(|f| f.parse_str(s)) {
        Ok(_) => Ok(s.to_string()),
        Err(StoreError::BadValue { expected, .. }) => Err(format!("expected {expected}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The job fields as flags; shared by `balsam job` and `balsam mkchild`. Each is checked by its
/// field's rules as it is parsed.
#[derive(clap::Args, Default, Clone)]
pub struct JobFlags {
    /// Job name
    #[arg(long, value_parser = field_value("name"))]
    pub name: Option<String>,
    /// Workflow label
    #[arg(long, visible_alias = "wf", value_parser = field_value("workflow"))]
    pub workflow: Option<String>,
    /// Application name (see `balsam ls apps`)
    #[arg(long, visible_alias = "app", value_parser = field_value("application"))]
    pub application: Option<String>,
    /// Free-text description
    #[arg(long, value_parser = field_value("description"))]
    pub description: Option<String>,
    /// Arguments appended to the application's executable (shell words; quotes must balance)
    #[arg(long, allow_hyphen_values = true, value_parser = field_value("args"))]
    pub args: Option<String>,
    /// Expected run time in minutes
    #[arg(long, value_name = "MINUTES", value_parser = field_value("wall_time_minutes"))]
    pub wall_time_minutes: Option<String>,
    /// Nodes
    #[arg(long, value_name = "N", value_parser = field_value("num_nodes"))]
    pub num_nodes: Option<String>,
    /// Extra nodes reserved beside the job's own
    #[arg(long, value_name = "N", value_parser = field_value("coschedule_num_nodes"))]
    pub coschedule_num_nodes: Option<String>,
    /// Serial jobs sharing one node
    #[arg(long, value_name = "N", value_parser = field_value("node_packing_count"))]
    pub node_packing_count: Option<String>,
    /// MPI ranks per node
    #[arg(long, value_name = "N", value_parser = field_value("ranks_per_node"))]
    pub ranks_per_node: Option<String>,
    /// OpenMP threads per rank
    #[arg(long, value_name = "N", value_parser = field_value("threads_per_rank"))]
    pub threads_per_rank: Option<String>,
    /// Hardware threads per core
    #[arg(long, value_name = "N", value_parser = field_value("threads_per_core"))]
    pub threads_per_core: Option<String>,
    /// none or depth
    #[arg(long, value_name = "AFFINITY", value_parser = field_value("cpu_affinity"))]
    pub cpu_affinity: Option<String>,
    /// Glob patterns of parents' files to copy in (ln:PATTERN: link, for huge inputs)
    #[arg(long, value_parser = field_value("input_files"))]
    pub input_files: Option<String>,
    /// File or directory copied in before the run
    #[arg(long, value_parser = field_value("stage_in_url"))]
    pub url_in: Option<String>,
    /// Where stage-out copies to
    #[arg(long, value_parser = field_value("stage_out_url"))]
    pub url_out: Option<String>,
    /// Glob patterns of files to stage out
    #[arg(long, value_parser = field_value("stage_out_files"))]
    pub stage_out_files: Option<String>,
    /// Extra environment, NAME=VALUE (repeatable)
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Extra flags for the MPI launch command
    #[arg(long, allow_hyphen_values = true, value_parser = field_value("mpi_flags"))]
    pub mpi_flags: Option<String>,
    /// Working directory instead of data/WORKFLOW/NAME_ID
    #[arg(long, value_parser = field_value("user_workdir"))]
    pub user_workdir: Option<String>,
    /// Run even if parents did not finish
    #[arg(long)]
    pub no_wait_for_parents: bool,
    /// Run the postprocess script on RUN_ERROR
    #[arg(long)]
    pub post_handle_error: bool,
    /// Run the postprocess script on RUN_TIMEOUT
    #[arg(long)]
    pub post_handle_timeout: bool,
    /// Do not restart a timed-out job automatically
    #[arg(long)]
    pub disable_auto_timeout_retry: bool,
    /// Bound on automatic restarts
    #[arg(long, value_name = "N", value_parser = field_value("max_restarts"))]
    pub max_restarts: Option<String>,
    /// User data, a JSON object
    #[arg(long, value_parser = field_value("data"))]
    pub data: Option<String>,
}

impl JobFlags {
    /// Applies the given flags over `spec`, each through its field's parser.
    pub fn apply(&self, spec: &mut JobSpec) -> Result<()> {
        fn set(spec: &mut JobSpec, name: &str, text: &str) -> Result<()> {
            let f = fields::field(name)?;
            let v = f.parse_str(text)?;
            f.apply(spec, v);
            Ok(())
        }
        let texts: [(&str, &Option<String>); 20] = [
            ("name", &self.name),
            ("workflow", &self.workflow),
            ("application", &self.application),
            ("description", &self.description),
            ("args", &self.args),
            ("wall_time_minutes", &self.wall_time_minutes),
            ("num_nodes", &self.num_nodes),
            ("coschedule_num_nodes", &self.coschedule_num_nodes),
            ("node_packing_count", &self.node_packing_count),
            ("ranks_per_node", &self.ranks_per_node),
            ("threads_per_rank", &self.threads_per_rank),
            ("threads_per_core", &self.threads_per_core),
            ("cpu_affinity", &self.cpu_affinity),
            ("input_files", &self.input_files),
            ("stage_in_url", &self.url_in),
            ("stage_out_url", &self.url_out),
            ("stage_out_files", &self.stage_out_files),
            ("mpi_flags", &self.mpi_flags),
            ("user_workdir", &self.user_workdir),
            ("max_restarts", &self.max_restarts),
        ];
        for (name, v) in texts {
            if let Some(v) = v {
                set(spec, name, v)?;
            }
        }
        if !self.env.is_empty() {
            for kv in &self.env {
                if !fields::valid_environ(kv) || kv.contains(':') {
                    bail!("bad value {kv:?} for --env: expected NAME=VALUE (one per --env; no ':' in values)");
                }
            }
            let mut all: Vec<String> = spec
                .environ_vars
                .split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            all.extend(self.env.iter().cloned());
            set(spec, "environ_vars", &all.join(":"))?;
        }
        if self.no_wait_for_parents {
            spec.wait_for_parents = false;
        }
        if self.post_handle_error {
            spec.post_error_handler = true;
        }
        if self.post_handle_timeout {
            spec.post_timeout_handler = true;
        }
        if self.disable_auto_timeout_retry {
            spec.auto_timeout_retry = false;
        }
        if let Some(d) = &self.data {
            set(spec, "data", d)?;
        }
        Ok(())
    }
}

/// Arguments of `balsam job`.
#[derive(clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub flags: JobFlags,
    /// Add without asking for confirmation
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Add many jobs: a JSON-lines file (one job object per line) or a CSV file with a header
    /// of field names; `-` reads standard input (a pipe); flags given beside it are defaults
    /// for every line
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Format of --from-file (default: from its extension; .csv is CSV, else JSON lines)
    #[arg(long, value_parser = ["jsonl", "csv"])]
    pub format: Option<String>,
}

/// Prints the block for a job about to be added (or just added).
pub fn describe(store: &mut Store, job: &Job, parents: &[String]) -> String {
    let app = store.app(&job.spec.application).ok();
    job_block(
        job,
        parents,
        &app_cmd(app.as_ref(), job),
        &job.workdir(&store.dir.root).display().to_string(),
    )
}

/// A job as it will be stored, for the confirmation block before insertion.
pub fn preview(spec: JobSpec, id: Uuid) -> Job {
    Job {
        pk: 0,
        job_id: id,
        spec,
        state: State::Created,
        return_code: None,
        num_restarts: 0,
        queued_launch_id: None,
        lease_session: None,
    }
}

/// Adds one job, or many with --from-file.
pub fn run(ctx: &mut Ctx, a: &JobArgs) -> Result<()> {
    if let Some(file) = &a.from_file {
        return import(ctx, a, file);
    }
    let mut spec = JobSpec::default();
    a.flags.apply(&mut spec)?;
    if a.flags.name.is_none() || a.flags.application.is_none() {
        bail!("a job needs --name and --application (--app); see `balsam job --help`");
    }
    // Check the application before showing a block that could never be added.
    ctx.store.app(&spec.application)?;
    let id = balsam_store::new_job_id();
    let job = preview(spec.clone(), id);
    print!("{}", describe(&mut ctx.store, &job, &[]));
    let existing = ctx.store.count_in_workflow(&spec.workflow)?;
    if existing > 0 {
        println!(
            "*** The workflow {:?} already has {existing} jobs",
            spec.workflow
        );
    }
    if !a.yes && !super::confirm("Confirm adding job to DB")? {
        bail!("not added: not confirmed (pass --yes to add without asking)");
    }
    let added = ctx.store.add_job(&NewJob {
        job_id: Some(id),
        spec,
        parents: vec![],
    })?;
    tracing::info!(job = %added.job_id, name = %added.spec.name, "job added");
    println!("Added job to database");
    Ok(())
}

/// Imports the jobs of `file` (`-`: standard input) in one transaction, reading it once as a
/// stream and parsing each line once: the first bad line is reported and nothing is inserted.
fn import(ctx: &mut Ctx, a: &JobArgs, file: &Path) -> Result<()> {
    let format = match a.format.as_deref() {
        Some("csv") => Format::Csv,
        Some(_) => Format::JsonLines,
        None if file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
        {
            Format::Csv
        }
        None => Format::JsonLines,
    };
    let mut defaults = JobSpec::default();
    a.flags.apply(&mut defaults)?;
    let (reader, name) = bulk::open(file)?;
    let mut jobs = bulk::read_ahead(bulk::Jobs::new(reader, name.clone(), format, defaults)?);
    // The total is unknown until the end of a stream: a count, on a terminal only.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} jobs checked ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let pks = ctx
        .store
        .import_jobs(&name, &mut jobs, &mut |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    let count = pks?.len();
    tracing::info!(file = %name, count, "jobs imported");
    println!("Added {count} jobs from {name}");
    Ok(())
}
