//! `balsam ls [jobs|apps|wf|queues]`: list what the database holds, as the talk shows it.

use std::collections::HashSet;
use std::io::Write;

use anyhow::Result;
use balsam_store::fields::get_text;
use balsam_store::{format_time_us, Job, JobFilter, State, Store};

use super::Ctx;
use crate::output::table;

/// What to list.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Default)]
pub enum LsWhat {
    /// Jobs (the default)
    #[default]
    Jobs,
    /// Applications
    Apps,
    /// Workflows with their jobs per state
    Wf,
    /// Launcher jobs in the batch queue
    Queues,
}

/// Arguments of `balsam ls`.
#[derive(clap::Args)]
pub struct LsArgs {
    /// jobs, apps, wf or queues
    #[arg(default_value = "jobs")]
    pub what: LsWhat,
    /// Jobs whose name contains this, ignoring case
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs whose id contains this
    #[arg(long)]
    pub id: Option<String>,
    /// Jobs in this state
    #[arg(long)]
    pub state: Option<String>,
    /// Jobs whose workflow contains this, ignoring case
    #[arg(long)]
    pub wf: Option<String>,
    /// Show each job's state history
    #[arg(long)]
    pub history: bool,
    /// Show jobs as a dependency tree
    #[arg(long)]
    pub tree: bool,
    /// Group jobs by state
    #[arg(long)]
    pub by_states: bool,
    /// More columns
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// JSON for scripts
    #[arg(long)]
    pub json: bool,
}

const BASE_COLS: [&str; 5] = ["job_id", "name", "workflow", "application", "state"];
const VERBOSE_COLS: [&str; 6] = [
    "num_nodes",
    "ranks_per_node",
    "wall_time_minutes",
    "return_code",
    "num_restarts",
    "launcher",
];

/// BALSAM_LS_LIMIT: rows shown, 1 to 10000000 (default 5000).
fn limit() -> Result<usize> {
    let Ok(v) = std::env::var("BALSAM_LS_LIMIT") else {
        return Ok(5000);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => anyhow::bail!(
            "BALSAM_LS_LIMIT={v:?}: expected a whole number of rows from 1 to 10000000 (unset it for 5000)"
        ),
    }
}

fn columns(verbose: bool) -> Result<Vec<String>> {
    let mut cols: Vec<String> = BASE_COLS.iter().map(|s| s.to_string()).collect();
    if verbose {
        cols.extend(VERBOSE_COLS.iter().map(|s| s.to_string()));
    }
    if let Ok(extra) = std::env::var("BALSAM_LS_FIELDS") {
        for f in extra.split(':').map(str::trim).filter(|f| !f.is_empty()) {
            if !cols.iter().any(|c| c == f) {
                if cell(&sample_job(), f).is_none() {
                    balsam_store::fields::field(f)
                        .map_err(|e| anyhow::anyhow!("BALSAM_LS_FIELDS: {e}"))?;
                }
                cols.push(f.to_string());
            }
        }
    }
    Ok(cols)
}

fn sample_job() -> Job {
    super::job::preview(Default::default(), balsam_store::Uuid::nil())
}

fn cell(j: &Job, col: &str) -> Option<String> {
    Some(match col {
        "job_id" => j.job_id.to_string(),
        "state" => j.state.to_string(),
        "return_code" => j.return_code.map(|c| c.to_string()).unwrap_or_default(),
        "num_restarts" => j.num_restarts.to_string(),
        "launcher" | "lease_session" => j
            .lease_session
            .map(|s| format!("session {s}"))
            .unwrap_or_default(),
        "queued_launch_id" => j
            .queued_launch_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        other => get_text(&j.spec, other)?,
    })
}

fn job_rows(jobs: &[Job], cols: &[String]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            cols.iter()
                .map(|c| cell(j, c).unwrap_or_default())
                .collect()
        })
        .collect()
}

fn filter(a: &LsArgs) -> Result<JobFilter> {
    Ok(JobFilter {
        name: a.name.clone(),
        id: a.id.clone(),
        state: a.state.as_deref().map(str::parse::<State>).transpose()?,
        workflow: a.wf.clone(),
    })
}

fn json_job(store: &mut Store, j: &Job) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(j)?;
    let parents: Vec<String> = store
        .parent_ids(j.pk)?
        .iter()
        .map(|u| u.to_string())
        .collect();
    v["parents"] = serde_json::json!(parents);
    v["workdir"] = serde_json::json!(j.workdir(&store.dir.root));
    Ok(v)
}

/// Lists what was asked.
pub fn run(ctx: &mut Ctx, a: &LsArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match a.what {
        LsWhat::Apps => return list_apps(ctx, a, &mut out),
        LsWhat::Wf => return list_workflows(ctx, a, &mut out),
        LsWhat::Queues => return list_queues(ctx, a, &mut out),
        LsWhat::Jobs => {}
    }
    let f = filter(a)?;
    let lim = limit()?;
    let store = &mut ctx.store;
    if a.json {
        let (jobs, _) = store.list_jobs(&f, lim)?;
        let mut arr = Vec::with_capacity(jobs.len());
        for j in &jobs {
            let mut v = json_job(store, j)?;
            if a.history {
                let h: Vec<serde_json::Value> = store
                    .history(j.pk)?
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                    "time": format_time_us(e.time_us), "state": e.to_state, "message": e.message})
                    })
                    .collect();
                v["history"] = serde_json::json!(h);
            }
            arr.push(v);
        }
        serde_json::to_writer_pretty(&mut out, &arr)?;
        writeln!(out)?;
        return Ok(());
    }
    if a.history {
        let (jobs, total) = store.list_jobs(&f, lim)?;
        for j in &jobs {
            writeln!(out, "Job {} [{}]\n-----", j.spec.name, j.job_id)?;
            for e in store.history(j.pk)? {
                writeln!(out, "{}", e.history_line())?;
            }
            writeln!(out)?;
        }
        more(&mut out, total, jobs.len())?;
        return Ok(());
    }
    if a.tree {
        return tree(store, &f, lim, &mut out);
    }
    let cols = columns(a.verbose)?;
    if a.by_states {
        for (state, n) in store.count_by_state(&f)? {
            writeln!(out, "{state} ({n} BalsamJobs)")?;
            let jobs = store.list_jobs_first(
                &JobFilter {
                    state: Some(state),
                    ..f.clone()
                },
                lim,
            )?;
            table(&mut out, &cols, &job_rows(&jobs, &cols))?;
            more(&mut out, n, jobs.len())?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let (jobs, total) = store.list_jobs(&f, lim)?;
    if jobs.is_empty() {
        writeln!(out, "No BalsamJobs match the query")?;
        return Ok(());
    }
    table(&mut out, &cols, &job_rows(&jobs, &cols))?;
    more(&mut out, total, jobs.len())?;
    Ok(())
}

fn more(out: &mut impl Write, total: u64, shown: usize) -> Result<()> {
    if total > shown as u64 {
        writeln!(
            out,
            "({} more BalsamJobs not shown...)",
            total - shown as u64
        )?;
    }
    Ok(())
}

fn tree(store: &mut Store, f: &JobFilter, lim: usize, out: &mut impl Write) -> Result<()> {
    let (jobs, _) = store.list_jobs(f, lim)?;
    let shown: HashSet<i64> = jobs.iter().map(|j| j.pk).collect();
    let mut printed = HashSet::new();
    for j in &jobs {
        // Roots: jobs none of whose parents are in the listing.
        let parents = store.parents(j.pk)?;
        if parents.iter().any(|p| shown.contains(&p.pk)) {
            continue;
        }
        branch(store, j, 0, out, &mut printed)?;
    }
    Ok(())
}

fn branch(
    store: &mut Store,
    j: &Job,
    depth: usize,
    out: &mut impl Write,
    printed: &mut HashSet<i64>,
) -> Result<()> {
    let prefix = if depth == 0 {
        String::new()
    } else {
        format!("{}|--", "|  ".repeat(depth - 1))
    };
    let again = !printed.insert(j.pk);
    writeln!(
        out,
        "{prefix}{} {} [{}]{}",
        j.spec.name,
        j.id8(),
        j.state,
        if again { " (see above)" } else { "" }
    )?;
    if again {
        return Ok(());
    }
    for c in store.children(j.pk)? {
        branch(store, &c, depth + 1, out, printed)?;
    }
    Ok(())
}

fn list_apps(ctx: &mut Ctx, a: &LsArgs, out: &mut impl Write) -> Result<()> {
    let apps = ctx.store.apps()?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &apps)?;
        writeln!(out)?;
        return Ok(());
    }
    if a.verbose {
        for app in &apps {
            writeln!(out, "{}", crate::output::app_block(app))?;
        }
        return Ok(());
    }
    let header: Vec<String> = ["name", "executable", "description"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows: Vec<Vec<String>> = apps
        .iter()
        .map(|a| vec![a.name.clone(), a.executable.clone(), a.description.clone()])
        .collect();
    table(out, &header, &rows)?;
    Ok(())
}

fn list_workflows(ctx: &mut Ctx, a: &LsArgs, out: &mut impl Write) -> Result<()> {
    let wfs = ctx.store.workflows()?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &wfs)?;
        writeln!(out)?;
        return Ok(());
    }
    let header: Vec<String> = ["workflow", "jobs", "states"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows: Vec<Vec<String>> = wfs
        .iter()
        .map(|w| {
            let states = w
                .by_state
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            vec![w.workflow.clone(), w.total.to_string(), states]
        })
        .collect();
    table(out, &header, &rows)?;
    Ok(())
}

fn list_queues(ctx: &mut Ctx, a: &LsArgs, out: &mut impl Write) -> Result<()> {
    // States come from the scheduler, refreshed now, which records them: the one write of a
    // listing, on a store of its own (ls opens read-only). When the scheduler cannot be asked or
    // the database not written, the recorded states are shown with a warning rather than
    // nothing.
    let has_active = !ctx.store.launches(true)?.is_empty();
    if has_active {
        let refreshed = balsam::batch::Site::open(&ctx.store.dir).and_then(|site| {
            let mut writable = Store::open(ctx.store.dir.clone())?;
            balsam::batch::refresh_launches(&mut writable, &site, false)
        });
        if let Err(e) = refreshed {
            eprintln!("balsam: warning: states as last recorded; cannot refresh them: {e}")
        }
    }
    let launches = ctx.store.launches(false)?;
    if a.json {
        serde_json::to_writer_pretty(&mut *out, &launches)?;
        writeln!(out)?;
        return Ok(());
    }
    let decision = balsam::service::last_decision(&ctx.store.dir.root);
    if launches.is_empty() {
        writeln!(out, "No queued launches")?;
        if let Some(d) = decision {
            writeln!(out, "{d}")?;
        }
        return Ok(());
    }
    let header: Vec<String> = [
        "id",
        "scheduler_id",
        "queue",
        "project",
        "nodes",
        "wall_minutes",
        "job_mode",
        "wf_filter",
        "state",
        "reason",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let rows: Vec<Vec<String>> = launches
        .iter()
        .map(|l| {
            vec![
                l.id.to_string(),
                l.scheduler_id.clone(),
                l.queue.clone(),
                l.project.clone(),
                l.nodes.to_string(),
                l.wall_minutes.to_string(),
                l.job_mode.clone(),
                l.wf_filter.clone(),
                l.state.clone(),
                l.reason.clone(),
            ]
        })
        .collect();
    table(out, &header, &rows)?;
    if let Some(d) = decision {
        writeln!(out, "\n{d}")?;
    }
    Ok(())
}
