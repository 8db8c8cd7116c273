//! Queued launches: the batch jobs that run launchers, as `submit-launch` and the service record
//! them and `balsam ls queues` shows them.

use crate::db::Store;
use crate::error::{Error, Result};
use crate::model::{now_us, QueuedLaunch};
use crate::sql::{params, Row};

const LAUNCH_COLS: &str = "id, scheduler_id, scheduler, project, queue, nodes, wall_minutes, job_mode, \
    wf_filter, command, state, sched_flags, from_balsam, prescheduled_only, reason, created_us, updated_us";

fn launch_from_row(r: &Row) -> Result<QueuedLaunch> {
    Ok(QueuedLaunch {
        id: r.i64(0)?,
        scheduler_id: r.text(1)?,
        scheduler: r.text(2)?,
        project: r.text(3)?,
        queue: r.text(4)?,
        nodes: r.u32(5)?,
        wall_minutes: r.u32(6)?,
        job_mode: r.text(7)?,
        wf_filter: r.text(8)?,
        command: r.text(9)?,
        state: r.text(10)?,
        sched_flags: r.text(11)?,
        from_balsam: r.bool(12)?,
        prescheduled_only: r.bool(13)?,
        reason: r.text(14)?,
        created_us: r.i64(15)?,
        updated_us: r.i64(16)?,
    })
}

/// Launch states that still hold or wait for nodes.
pub const ACTIVE_LAUNCH_STATES: [&str; 5] =
    ["creating", "submitted", "queued", "running", "exiting"];

impl Store {
    /// Records a launch (state `creating` until the scheduler accepts it); returns it with its id.
    pub fn create_launch(&mut self, l: &QueuedLaunch) -> Result<QueuedLaunch> {
        self.write(|tx| {
            let now = now_us();
            let id = tx
                .query_one(
                    "INSERT INTO launches (scheduler_id, scheduler, project, queue, nodes, wall_minutes, \
                     job_mode, wf_filter, command, state, sched_flags, from_balsam, prescheduled_only, \
                     reason, created_us, updated_us) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15) RETURNING id",
                    params![
                        &l.scheduler_id,
                        &l.scheduler,
                        &l.project,
                        &l.queue,
                        l.nodes,
                        l.wall_minutes,
                        &l.job_mode,
                        &l.wf_filter,
                        &l.command,
                        &l.state,
                        &l.sched_flags,
                        l.from_balsam,
                        l.prescheduled_only,
                        &l.reason,
                        now
                    ],
                )?
                .i64(0)?;
            Ok(QueuedLaunch {
                id,
                created_us: now,
                updated_us: now,
                ..l.clone()
            })
        })
    }

    /// Updates a launch's scheduler id, command, state and reason.
    pub fn update_launch(&mut self, l: &QueuedLaunch) -> Result<()> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE launches SET scheduler_id = ?1, command = ?2, state = ?3, reason = ?4, updated_us = ?5 WHERE id = ?6",
                params![&l.scheduler_id, &l.command, &l.state, &l.reason, now_us(), l.id],
            )?;
            if n == 0 {
                return Err(Error::Refused(format!(
                    "queued launch {} does not exist",
                    l.id
                )));
            }
            Ok(())
        })
    }

    /// Forgets a launch (one whose submission the scheduler refused).
    pub fn delete_launch(&mut self, id: i64) -> Result<()> {
        self.write(|tx| {
            tx.exec("DELETE FROM launches WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// Launches, newest last; only those still queued or running with `active_only`.
    pub fn launches(&mut self, active_only: bool) -> Result<Vec<QueuedLaunch>> {
        let sql = if active_only {
            let states: Vec<String> = ACTIVE_LAUNCH_STATES
                .iter()
                .map(|s| format!("'{s}'"))
                .collect();
            format!(
                "SELECT {LAUNCH_COLS} FROM launches WHERE state IN ({}) ORDER BY id",
                states.join(",")
            )
        } else {
            format!("SELECT {LAUNCH_COLS} FROM launches ORDER BY id")
        };
        self.read(|tx| tx.query(&sql, &[])?.iter().map(launch_from_row).collect())
    }

    /// The launch with this scheduler id, if recorded.
    pub fn launch_by_scheduler_id(&mut self, scheduler_id: &str) -> Result<Option<QueuedLaunch>> {
        self.read(|tx| {
            tx.query_opt(
                &format!(
                    "SELECT {LAUNCH_COLS} FROM launches WHERE scheduler_id = ?1 ORDER BY id DESC LIMIT 1"
                ),
                params![scheduler_id],
            )?
            .map(|r| launch_from_row(&r))
            .transpose()
        })
    }
}
