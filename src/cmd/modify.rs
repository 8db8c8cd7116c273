//! `balsam modify [--type jobs|apps] ID FIELD VALUE`: change one field of a job, typed (`False`
//! means false), or of an application, as legacy's `modify --type apps`.

use anyhow::Result;
use balsam_store::fields;
use balsam_store::{Application, RestartCount, State, Store};

use super::{find_job, Ctx};

/// What `balsam modify` changes.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Default, Debug)]
pub enum ModifyWhat {
    /// A job (the default)
    #[default]
    Jobs,
    /// An application
    Apps,
}

/// Arguments of `balsam modify`.
#[derive(clap::Args)]
pub struct ModifyArgs {
    /// jobs or apps
    #[arg(long = "type", value_enum, default_value = "jobs")]
    pub what: ModifyWhat,
    /// Job id (any unique prefix); for apps, the application's name (or its number in
    /// `balsam ls apps --json`)
    pub id: String,
    /// Field name (see `balsam job --help`), or `state`; for apps: name, description,
    /// executable, preprocess, postprocess or envscript
    pub field: String,
    /// New value
    #[arg(allow_hyphen_values = true)]
    pub value: String,
}

/// Applies the change; a state change goes through the state machine and the history.
pub fn run(ctx: &mut Ctx, a: &ModifyArgs) -> Result<()> {
    if a.what == ModifyWhat::Apps {
        return modify_app(&mut ctx.store, a);
    }
    let job = find_job(&mut ctx.store, &a.id)?;
    if a.field == "state" {
        let to: State = a.value.parse()?;
        // A person at a terminal resets the job on purpose; a script (an error handler) sending
        // it back counts toward max_restarts.
        let count = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            RestartCount::Reset
        } else {
            RestartCount::Count
        };
        let after = ctx.store.set_state_by_user(job.pk, to, "", count)?;
        tracing::info!(job = %job.job_id, from = %job.state, to = %after.state, "state set by user");
        println!("{}: state: {} -> {}", job.cute_id(), job.state, after.state);
        return Ok(());
    }
    let f = fields::field(&a.field)?;
    let value = f.parse_str(&a.value)?;
    let before = fields::get_text(&job.spec, f.name).unwrap_or_default();
    let after = ctx.store.modify_field(job.pk, f.name, &value)?;
    let now = fields::get_text(&after.spec, f.name).unwrap_or_default();
    tracing::info!(job = %job.job_id, field = f.name, %before, %now, "field modified");
    println!("{}: {}: {} -> {}", job.cute_id(), f.name, before, now);
    Ok(())
}

/// The application named `id` (or numbered, as legacy's ids were).
fn find_app(store: &mut Store, id: &str) -> Result<Application> {
    match store.app(id) {
        Ok(app) => Ok(app),
        Err(e) => match id.parse::<i64>() {
            Ok(n) => store
                .apps()?
                .into_iter()
                .find(|a| a.id == n)
                .ok_or_else(|| e.into()),
            Err(_) => Err(e.into()),
        },
    }
}

/// Changes one field of an application. Scripts are resolved as `balsam app` resolves them
/// (a `.py` runs under python3, a relative path becomes absolute).
fn modify_app(store: &mut Store, a: &ModifyArgs) -> Result<()> {
    let app = find_app(store, &a.id)?;
    let value = match a.field.as_str() {
        "executable" => super::app::resolve_script(&a.value, "executable")?,
        "preprocess" => super::app::resolve_script(&a.value, "preprocess script")?,
        "postprocess" => super::app::resolve_script(&a.value, "postprocess script")?,
        "envscript" => super::app::resolve_envscript(&a.value)?,
        _ => a.value.clone(),
    };
    let before = app_field(&app, &a.field);
    let after = store.modify_app(&app.name, &a.field, &value)?;
    let now = app_field(&after, &a.field);
    tracing::info!(app = %app.name, field = %a.field, %before, %now, "application modified");
    println!("application {}: {}: {before} -> {now}", app.name, a.field);
    Ok(())
}

fn app_field(app: &Application, field: &str) -> String {
    match field {
        "name" => app.name.clone(),
        "description" => app.description.clone(),
        "executable" => app.executable.clone(),
        "preprocess" => app.preprocess.clone(),
        "postprocess" => app.postprocess.clone(),
        "envscript" => app.envscript.clone(),
        _ => String::new(),
    }
}
