//! `balsam job`: add one job (with the talk's confirmation block), or many from a JSON-lines or
//! CSV file (`--from-file`), validated in full before anything is inserted.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use balsam_store::fields::{self, Value};
use balsam_store::{Error as StoreError, Job, JobSpec, NewJob, State, Store, Uuid};

use super::Ctx;
use crate::output::{app_cmd, job_block};

/// The job fields as flags; shared by `balsam job` and `balsam mkchild`.
#[derive(clap::Args, Default, Clone)]
pub struct JobFlags {
    /// Job name
    #[arg(long)]
    pub name: Option<String>,
    /// Workflow label
    #[arg(long, visible_alias = "wf")]
    pub workflow: Option<String>,
    /// Application name (see `balsam ls apps`)
    #[arg(long, visible_alias = "app")]
    pub application: Option<String>,
    /// Free-text description
    #[arg(long)]
    pub description: Option<String>,
    /// Arguments appended to the application's executable
    #[arg(long, allow_hyphen_values = true)]
    pub args: Option<String>,
    /// Expected run time in minutes
    #[arg(long)]
    pub wall_time_minutes: Option<u32>,
    /// Nodes
    #[arg(long)]
    pub num_nodes: Option<u32>,
    /// Extra nodes reserved beside the job's own
    #[arg(long)]
    pub coschedule_num_nodes: Option<u32>,
    /// Serial jobs sharing one node
    #[arg(long)]
    pub node_packing_count: Option<u32>,
    /// MPI ranks per node
    #[arg(long)]
    pub ranks_per_node: Option<u32>,
    /// OpenMP threads per rank
    #[arg(long)]
    pub threads_per_rank: Option<u32>,
    /// Hardware threads per core
    #[arg(long)]
    pub threads_per_core: Option<u32>,
    /// none or depth
    #[arg(long)]
    pub cpu_affinity: Option<String>,
    /// Glob patterns of parents' files to link in
    #[arg(long)]
    pub input_files: Option<String>,
    /// File or directory copied in before the run
    #[arg(long)]
    pub url_in: Option<String>,
    /// Where stage-out copies to
    #[arg(long)]
    pub url_out: Option<String>,
    /// Glob patterns of files to stage out
    #[arg(long)]
    pub stage_out_files: Option<String>,
    /// Extra environment, NAME=VALUE (repeatable)
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Extra flags for the MPI launch command
    #[arg(long, allow_hyphen_values = true)]
    pub mpi_flags: Option<String>,
    /// Working directory instead of data/WORKFLOW/NAME_ID
    #[arg(long)]
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
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// User data, a JSON object
    #[arg(long)]
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
        let texts: [(&str, Option<String>); 19] = [
            ("name", self.name.clone()),
            ("workflow", self.workflow.clone()),
            ("application", self.application.clone()),
            ("description", self.description.clone()),
            ("args", self.args.clone()),
            (
                "wall_time_minutes",
                self.wall_time_minutes.map(|v| v.to_string()),
            ),
            ("num_nodes", self.num_nodes.map(|v| v.to_string())),
            (
                "coschedule_num_nodes",
                self.coschedule_num_nodes.map(|v| v.to_string()),
            ),
            (
                "node_packing_count",
                self.node_packing_count.map(|v| v.to_string()),
            ),
            ("ranks_per_node", self.ranks_per_node.map(|v| v.to_string())),
            (
                "threads_per_rank",
                self.threads_per_rank.map(|v| v.to_string()),
            ),
            (
                "threads_per_core",
                self.threads_per_core.map(|v| v.to_string()),
            ),
            ("cpu_affinity", self.cpu_affinity.clone()),
            ("input_files", self.input_files.clone()),
            ("stage_in_url", self.url_in.clone()),
            ("stage_out_url", self.url_out.clone()),
            ("stage_out_files", self.stage_out_files.clone()),
            ("mpi_flags", self.mpi_flags.clone()),
            ("user_workdir", self.user_workdir.clone()),
        ];
        for (name, v) in texts {
            if let Some(v) = v {
                set(spec, name, &v)?;
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
        if let Some(n) = self.max_restarts {
            spec.max_restarts = n;
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
    /// of field names; flags given beside it are defaults for every line
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Format of --from-file (default: from its extension; .csv is CSV, else JSON lines)
    #[arg(long, value_parser = ["jsonl", "csv"])]
    pub format: Option<String>,
    /// Rows per transaction for --from-file
    #[arg(long, default_value_t = 50_000, hide = true)]
    pub batch_size: usize,
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
    let id = Uuid::new_v4();
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

fn line_err(file: &Path, line: usize, e: StoreError) -> anyhow::Error {
    StoreError::BadLine {
        file: file.display().to_string(),
        line,
        source: Box::new(e),
    }
    .into()
}

fn bad_field(field: &str, value: &str, expected: &str) -> StoreError {
    StoreError::BadValue {
        field: field.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

fn parse_json_line(text: &str, defaults: &JobSpec) -> Result<NewJob, StoreError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| StoreError::Refused(format!("not a JSON object: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(StoreError::Refused(
            "expected a JSON object, one job per line".into(),
        ));
    };
    let mut new = NewJob {
        job_id: None,
        spec: defaults.clone(),
        parents: vec![],
    };
    for (k, v) in &map {
        match k.as_str() {
            "job_id" => {
                let s = v.as_str().unwrap_or_default();
                new.job_id = Some(
                    Uuid::parse_str(s)
                        .map_err(|_| bad_field("job_id", &v.to_string(), "a UUID"))?,
                );
            }
            "parents" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| bad_field("parents", &v.to_string(), "a list of job ids"))?;
                for p in list {
                    let s = p.as_str().unwrap_or_default();
                    new.parents.push(Uuid::parse_str(s).map_err(|_| {
                        bad_field("parents", &p.to_string(), "full job ids (UUIDs)")
                    })?);
                }
            }
            name => {
                let f = fields::field(name)?;
                let val = f.parse_json(v)?;
                f.apply(&mut new.spec, val);
            }
        }
    }
    Ok(new)
}

fn parse_csv_record(
    header: &[String],
    rec: &csv::StringRecord,
    defaults: &JobSpec,
) -> Result<NewJob, StoreError> {
    let mut new = NewJob {
        job_id: None,
        spec: defaults.clone(),
        parents: vec![],
    };
    for (k, v) in header.iter().zip(rec.iter()) {
        match k.as_str() {
            "job_id" => {
                new.job_id = Some(Uuid::parse_str(v).map_err(|_| bad_field("job_id", v, "a UUID"))?)
            }
            "parents" => {
                for p in v.split([' ', ';']).filter(|s| !s.is_empty()) {
                    new.parents.push(Uuid::parse_str(p).map_err(|_| {
                        bad_field("parents", p, "full job ids separated by spaces")
                    })?);
                }
            }
            name => {
                let f = fields::field(name)?;
                // An empty cell keeps the default, so sparse CSVs work.
                if !v.is_empty() || f.kind == fields::Kind::Text {
                    let val: Value = f.parse_str(v)?;
                    f.apply(&mut new.spec, val);
                }
            }
        }
    }
    Ok(new)
}

/// Streams the file's jobs to `sink` with their line numbers.
fn each_job(
    file: &Path,
    csv_format: bool,
    defaults: &JobSpec,
    sink: &mut dyn FnMut(usize, NewJob) -> Result<()>,
) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    if csv_format {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(BufReader::new(f));
        let header: Vec<String> = rdr
            .headers()
            .with_context(|| format!("{}: cannot read the CSV header", file.display()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        for h in &header {
            if h != "job_id" && h != "parents" {
                fields::field(h).map_err(|e| line_err(file, 1, e))?;
            }
        }
        for (i, rec) in rdr.records().enumerate() {
            let lineno = i + 2;
            let rec =
                rec.map_err(|e| line_err(file, lineno, StoreError::Refused(e.to_string())))?;
            let new =
                parse_csv_record(&header, &rec, defaults).map_err(|e| line_err(file, lineno, e))?;
            sink(lineno, new)?;
        }
    } else {
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let lineno = i + 1;
            let line = line.with_context(|| format!("{}:{lineno}: cannot read", file.display()))?;
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let new = parse_json_line(&line, defaults).map_err(|e| line_err(file, lineno, e))?;
            sink(lineno, new)?;
        }
    }
    Ok(())
}

fn import(ctx: &mut Ctx, a: &JobArgs, file: &Path) -> Result<()> {
    let csv_format = match a.format.as_deref() {
        Some(f) => f == "csv",
        None => file
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv")),
    };
    let mut defaults = JobSpec::default();
    a.flags.apply(&mut defaults)?;
    // Pass 1: check every line (fields, names, applications, ids, parents) and insert nothing.
    let apps: HashSet<String> = ctx.store.apps()?.into_iter().map(|a| a.name).collect();
    let mut ids_in_file: HashSet<Uuid> = HashSet::new();
    let mut count = 0usize;
    let store = &mut ctx.store;
    each_job(file, csv_format, &defaults, &mut |lineno, new| {
        let fail = |e: StoreError| line_err(file, lineno, e);
        if new.spec.name.is_empty() {
            return Err(fail(bad_field("name", "", "a non-empty job name")));
        }
        if !apps.contains(&new.spec.application) {
            return Err(fail(StoreError::UnknownApp(new.spec.application.clone())));
        }
        for p in &new.parents {
            if !ids_in_file.contains(p) && store.job_by_id(p).is_err() {
                return Err(fail(StoreError::Refused(format!(
                    "parents: {p} is neither in the database nor on an earlier line"
                ))));
            }
        }
        if let Some(id) = new.job_id {
            if !ids_in_file.insert(id) {
                return Err(fail(StoreError::Refused(format!(
                    "job_id {id} appears twice in the file"
                ))));
            }
            if store.job_by_id(&id).is_ok() {
                return Err(fail(StoreError::Refused(format!(
                    "job_id {id} is already in the database"
                ))));
            }
        }
        count += 1;
        Ok(())
    })?;
    // Pass 2: insert in batched transactions, with a progress bar on a terminal.
    let bar = indicatif::ProgressBar::new(count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} jobs ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let batch = a.batch_size.max(1);
    let mut pending: Vec<NewJob> = Vec::with_capacity(batch.min(count.max(1)));
    let mut done = 0usize;
    let mut flush = |store: &mut Store, pending: &mut Vec<NewJob>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        store.add_jobs(pending, &mut |_| {})?;
        done += pending.len();
        bar.set_position(done as u64);
        pending.clear();
        Ok(())
    };
    let store = &mut ctx.store;
    each_job(file, csv_format, &defaults, &mut |_, new| {
        pending.push(new);
        if pending.len() >= batch {
            flush(store, &mut pending)?;
        }
        Ok(())
    })?;
    flush(store, &mut pending)?;
    bar.finish_and_clear();
    tracing::info!(file = %file.display(), count, "jobs imported");
    println!("Added {count} jobs from {}", file.display());
    Ok(())
}
