//! Launcher sessions and job leases. A session (a launcher or the service) takes jobs by setting
//! their `lease_session` in one `BEGIN IMMEDIATE` transaction, so two sessions can never hold the
//! same job. Sessions heartbeat; when one falls silent for longer than the expiry, its running
//! jobs go to RESTART_READY (through the state machine, counting restarts) and its other leases
//! are released.

use std::time::Duration;

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::Store;
use crate::error::{Error, Result};
use crate::jobs::{job_from_row, JOB_COLS};
use crate::lifecycle::{apply_one, Transition};
use crate::model::{format_time_us, now_us, Job, Session, SessionInfo};
use crate::state::{State, PROCESSABLE_STATES, RUNNABLE_STATES};

/// Which jobs a lease may take.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    /// Workflow substring ('' = any), legacy's `--wf-filter`.
    pub wf_filter: String,
    /// Only jobs of one node and one rank (serial mode).
    pub serial_only: bool,
    /// Only jobs that are not serial (MPI mode in a mixed launcher).
    pub mpi_only: bool,
    /// Only jobs whose wall time fits the time left.
    pub max_wall_minutes: Option<u32>,
    /// Only jobs that fit the launcher's nodes.
    pub max_nodes: Option<u32>,
}

/// Which group of states to lease from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseGroup {
    /// PREPROCESSED, RESTART_READY: to run.
    Runnable,
    /// Legacy's processable states except AWAITING_PARENTS (children are woken by their parents):
    /// for the transition workers.
    Processable,
}

/// Jobs of one shape waiting for a launcher: the service's measure of the work to submit for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkShape {
    /// Nodes each job needs (num_nodes + coschedule_num_nodes).
    pub num_nodes: u32,
    /// Each job's wall time, minutes.
    pub wall_time_minutes: u32,
    /// How many share a node (single-node jobs).
    pub node_packing_count: u32,
    /// How many jobs of this shape.
    pub count: u64,
}

/// A session that fell silent and was expired.
#[derive(Debug, Clone)]
pub struct Expired {
    /// The session.
    pub session: Session,
    /// Its running jobs that were set to RESTART_READY (or FAILED past their restart bound).
    pub restarted: usize,
    /// Its other leases that were released.
    pub released: usize,
}

fn session_from_row(r: &rusqlite::Row) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get(0)?,
        kind: r.get(1)?,
        host: r.get(2)?,
        pid: r.get(3)?,
        batch_job_id: r.get(4)?,
        job_mode: r.get(5)?,
        wf_filter: r.get(6)?,
        started_us: r.get(7)?,
        heartbeat_us: r.get(8)?,
        ended_us: r.get(9)?,
    })
}

const SESSION_COLS: &str =
    "id, kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, heartbeat_us, ended_us";

fn live_session(tx: &Transaction, id: i64) -> Result<Session> {
    let s = tx
        .prepare_cached(&format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"
        ))?
        .query_row([id], session_from_row)
        .optional()?
        .ok_or_else(|| Error::Refused(format!("launcher session {id} does not exist")))?;
    if s.ended_us.is_some() {
        return Err(Error::SessionEnded(id));
    }
    Ok(s)
}

fn end_session_tx(tx: &Transaction, s: &Session, expired: bool) -> Result<(usize, usize)> {
    let running: Vec<i64> = tx
        .prepare_cached("SELECT pk FROM jobs WHERE lease_session = ?1 AND state = ?2")?
        .query_map(params![s.id, State::Running.code()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let msg = if expired {
        format!(
            "launcher session {} ({}:{}) silent since {}; lease expired",
            s.id,
            s.host,
            s.pid,
            format_time_us(s.heartbeat_us)
        )
    } else {
        format!(
            "launcher session {} ({}:{}) ended while it ran",
            s.id, s.host, s.pid
        )
    };
    for pk in &running {
        apply_one(
            tx,
            &Transition::new(*pk, State::Running, State::RestartReady, msg.clone()),
            None,
        )?;
    }
    let released = tx.execute(
        "UPDATE jobs SET lease_session = NULL WHERE lease_session = ?1",
        [s.id],
    )?;
    tx.execute(
        "UPDATE sessions SET ended_us = ?1 WHERE id = ?2",
        params![now_us(), s.id],
    )?;
    Ok((running.len(), released.saturating_sub(running.len())))
}

impl Store {
    /// Registers a session and returns its id.
    pub fn start_session(&mut self, info: &SessionInfo) -> Result<i64> {
        self.write(|tx| {
            let now = now_us();
            tx.execute(
                "INSERT INTO sessions (kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, heartbeat_us) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![info.kind, info.host, info.pid, info.batch_job_id, info.job_mode, info.wf_filter, now],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Records that the session is alive. Fails with [`Error::SessionEnded`] when it was expired
    /// meanwhile: its jobs belong to others now and it must stop running them.
    pub fn heartbeat(&mut self, session: i64) -> Result<()> {
        self.write(|tx| {
            live_session(tx, session)?;
            tx.execute(
                "UPDATE sessions SET heartbeat_us = ?1 WHERE id = ?2",
                params![now_us(), session],
            )?;
            Ok(())
        })
    }

    /// Takes up to `limit` unleased jobs of `group` matching `filter` for `session`.
    pub fn lease(
        &mut self,
        session: i64,
        group: LeaseGroup,
        filter: &LeaseFilter,
        limit: usize,
    ) -> Result<Vec<Job>> {
        let states: Vec<String> = match group {
            LeaseGroup::Runnable => RUNNABLE_STATES
                .iter()
                .map(|s| s.code().to_string())
                .collect(),
            LeaseGroup::Processable => PROCESSABLE_STATES
                .iter()
                .filter(|s| **s != State::AwaitingParents)
                .map(|s| s.code().to_string())
                .collect(),
        };
        let mut cond = format!("state IN ({}) AND lease_session IS NULL", states.join(","));
        if !filter.wf_filter.is_empty() {
            cond.push_str(" AND instr(workflow, ?3) > 0");
        }
        if filter.serial_only {
            cond.push_str(" AND num_nodes = 1 AND ranks_per_node = 1");
        }
        if filter.mpi_only {
            cond.push_str(" AND (num_nodes > 1 OR ranks_per_node > 1)");
        }
        if let Some(w) = filter.max_wall_minutes {
            cond.push_str(&format!(" AND wall_time_minutes <= {w}"));
        }
        if let Some(n) = filter.max_nodes {
            cond.push_str(&format!(" AND num_nodes + coschedule_num_nodes <= {n}"));
        }
        let sql = format!(
            "UPDATE jobs SET lease_session = ?1 WHERE pk IN \
             (SELECT pk FROM jobs WHERE {cond} LIMIT ?2) RETURNING {JOB_COLS}"
        );
        self.write(|tx| {
            live_session(tx, session)?;
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = if filter.wf_filter.is_empty() {
                stmt.query_map(params![session, limit as i64], job_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            } else {
                stmt.query_map(
                    params![session, limit as i64, filter.wf_filter],
                    job_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(rows)
        })
    }

    /// Gives leased jobs back (they stay in their state for another session to take).
    pub fn release(&mut self, session: i64, pks: &[i64]) -> Result<usize> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE jobs SET lease_session = NULL WHERE pk = ?1 AND lease_session = ?2",
            )?;
            let mut n = 0;
            for pk in pks {
                n += stmt.execute(params![pk, session])?;
            }
            Ok(n)
        })
    }

    /// Ends a session: jobs still RUNNING under it go to RESTART_READY, all its leases are
    /// released. A launcher calls this after marking its own jobs on the way out.
    pub fn end_session(&mut self, session: i64) -> Result<(usize, usize)> {
        self.write(|tx| match live_session(tx, session) {
            Ok(s) => end_session_tx(tx, &s, false),
            Err(Error::SessionEnded(_)) => Ok((0, 0)),
            Err(e) => Err(e),
        })
    }

    /// Expires every session silent for longer than `expiry`.
    pub fn expire_sessions(&mut self, expiry: Duration) -> Result<Vec<Expired>> {
        let cutoff = now_us() - expiry.as_micros() as i64;
        self.write(|tx| {
            let stale: Vec<Session> = tx
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL AND heartbeat_us < ?1"
                ))?
                .query_map([cutoff], session_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for s in stale {
                let (restarted, released) = end_session_tx(tx, &s, true)?;
                out.push(Expired { session: s, restarted, released });
            }
            Ok(out)
        })
    }

    /// Jobs of `session` that a user killed (the launcher must stop their processes).
    pub fn killed_jobs(&mut self, session: i64) -> Result<Vec<i64>> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached("SELECT pk FROM jobs WHERE lease_session = ?1 AND state = ?2")?
                .query_map(params![session, State::UserKilled.code()], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    /// Jobs leased by `session`.
    pub fn leased_jobs(&mut self, session: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached(&format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE lease_session = ?1 ORDER BY pk"
                ))?
                .query_map([session], job_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    /// A session by id.
    pub fn session(&mut self, id: i64) -> Result<Session> {
        self.read(|tx| {
            tx.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"
            ))?
            .query_row([id], session_from_row)
            .optional()?
            .ok_or_else(|| Error::Refused(format!("launcher session {id} does not exist")))
        })
    }

    /// Sessions that have not ended.
    pub fn live_sessions(&mut self) -> Result<Vec<Session>> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL ORDER BY id"
                ))?
                .query_map([], session_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })
    }

    /// The work no launcher holds yet, grouped by shape: runnable jobs, and jobs on their way to
    /// being runnable (CREATED, READY, STAGED_IN) that the next transitions will make runnable.
    /// Jobs AWAITING_PARENTS are not counted: they cannot run until their parents did (run the
    /// transitions first, so that new children with unfinished parents are in that state).
    pub fn waiting_work(&mut self, wf_filter: &str) -> Result<Vec<WorkShape>> {
        let mut states: Vec<String> = RUNNABLE_STATES
            .iter()
            .map(|s| s.code().to_string())
            .collect();
        for s in [State::Created, State::Ready, State::StagedIn] {
            states.push(s.code().to_string());
        }
        let mut sql = format!(
            "SELECT num_nodes + coschedule_num_nodes, wall_time_minutes, node_packing_count, count(*) \
             FROM jobs WHERE state IN ({}) AND lease_session IS NULL",
            states.join(",")
        );
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        let row = |r: &rusqlite::Row| {
            Ok(WorkShape {
                num_nodes: r.get(0)?,
                wall_time_minutes: r.get(1)?,
                node_packing_count: r.get(2)?,
                count: r.get(3)?,
            })
        };
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = if wf_filter.is_empty() {
                stmt.query_map([], row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            } else {
                stmt.query_map([wf_filter], row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            Ok(rows)
        })
    }

    /// How many jobs, in any state, a workflow filter matches (`submit-launch` refuses a filter
    /// that matches none: a typo would otherwise start a launcher that does nothing).
    pub fn count_wf_filter(&mut self, wf_filter: &str) -> Result<u64> {
        self.read(|tx| {
            Ok(tx
                .prepare_cached("SELECT count(*) FROM jobs WHERE instr(workflow, ?1) > 0")?
                .query_row([wf_filter], |r| r.get(0))?)
        })
    }

    /// Whether any job is runnable or processable for a workflow filter (a launcher without
    /// `--persistent` exits when none is, and none runs).
    pub fn has_work(&mut self, wf_filter: &str) -> Result<bool> {
        let mut states: Vec<String> = RUNNABLE_STATES
            .iter()
            .map(|s| s.code().to_string())
            .collect();
        states.extend(PROCESSABLE_STATES.iter().map(|s| s.code().to_string()));
        states.push(State::Running.code().to_string());
        let mut sql = format!("SELECT 1 FROM jobs WHERE state IN ({})", states.join(","));
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" LIMIT 1");
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            Ok(if wf_filter.is_empty() {
                stmt.exists([])?
            } else {
                stmt.exists([wf_filter])?
            })
        })
    }
}
