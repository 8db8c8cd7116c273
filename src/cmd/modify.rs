//! `balsam modify ID FIELD VALUE`: change one field of a job, typed (`False` means false).

use anyhow::Result;
use balsam_store::fields;
use balsam_store::{RestartCount, State};

use super::{find_job, Ctx};

/// Arguments of `balsam modify`.
#[derive(clap::Args)]
pub struct ModifyArgs {
    /// Job id (any unique prefix)
    pub id: String,
    /// Field name (see `balsam job --help`), or `state`
    pub field: String,
    /// New value
    #[arg(allow_hyphen_values = true)]
    pub value: String,
}

/// Applies the change; a state change goes through the state machine and the history.
pub fn run(ctx: &mut Ctx, a: &ModifyArgs) -> Result<()> {
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
