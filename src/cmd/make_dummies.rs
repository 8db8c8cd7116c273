//! `balsam make_dummies N`: N jobs of a do-nothing application, for trying launchers out.

use anyhow::Result;
use balsam_store::{Application, JobSpec, NewJob};

use super::Ctx;

/// Arguments of `balsam make_dummies`.
#[derive(clap::Args)]
pub struct MakeDummiesArgs {
    /// How many jobs (1 to 10000000)
    #[arg(value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub num: usize,
    /// Their workflow
    #[arg(long, default_value = "dummy")]
    pub workflow: String,
}

/// Adds the `dummy` application if needed (`true`), then the jobs in batched transactions.
pub fn run(ctx: &mut Ctx, a: &MakeDummiesArgs) -> Result<()> {
    if ctx.store.app("dummy").is_err() {
        ctx.store.add_app(&Application {
            id: 0,
            name: "dummy".into(),
            description: "does nothing (balsam make_dummies)".into(),
            executable: "true".into(),
            preprocess: String::new(),
            postprocess: String::new(),
            envscript: String::new(),
        })?;
    }
    // In chunks, so that ten million dummies do not need ten million jobs in memory at once.
    const CHUNK: usize = 50_000;
    for start in (0..a.num).step_by(CHUNK) {
        let jobs: Vec<NewJob> = (start..(start + CHUNK).min(a.num))
            .map(|i| NewJob {
                job_id: None,
                spec: JobSpec {
                    name: format!("dummy{i}"),
                    workflow: a.workflow.clone(),
                    application: "dummy".into(),
                    ..JobSpec::default()
                },
                parents: vec![],
            })
            .collect();
        ctx.store.add_jobs(&jobs, &mut |_| {})?;
    }
    println!("Added {} dummy jobs", a.num);
    Ok(())
}
