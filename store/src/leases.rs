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

/// State codes of every state but the end states, for SQL.
fn live_codes() -> String {
    crate::state::ALL_STATES
        .iter()
        .filter(|s| !s.is_end())
        .map(|s| s.code().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

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

/// Runnable jobs of one shape that no launcher holds: what a launcher that can run none of
/// them explains on its stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnableGroup {
    /// Nodes each job needs (num_nodes + coschedule_num_nodes).
    pub nodes_needed: u32,
    /// One node and one rank: a job for the serial task farm.
    pub serial: bool,
    /// Each job's wall time, minutes.
    pub wall_time_minutes: u32,
    /// How many jobs of this shape.
    pub count: u64,
    /// One of them, `[name | id8]`.
    pub example: String,
}

/// What could still arrive for a launcher: the facts its idle-exit decision needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outlook {
    /// Runnable jobs of the filter that no session holds.
    pub runnable_free: u64,
    /// Processable jobs (on their way to runnable, or to their end state after a run) that no
    /// session holds; AWAITING_PARENTS not included.
    pub processable_free: u64,
    /// Jobs of the filter waiting for their parents.
    pub awaiting_parents: u64,
    /// Jobs of the filter, in any state but an end state, held by other live sessions.
    pub held_by_others: u64,
    /// Those sessions.
    pub others: Vec<Session>,
    /// Whether a service session is live (it runs transitions and submits launchers).
    pub service_live: bool,
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
        proc_id: r.get(10)?,
    })
}

const SESSION_COLS: &str = "id, kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, \
     heartbeat_us, ended_us, proc_id";

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

/// Why a session is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// It ended itself.
    Clean,
    /// It fell silent for longer than the expiry.
    Silent,
    /// Its process is gone (seen from the same host).
    ProcessGone,
}

fn end_session_tx(tx: &Transaction, s: &Session, why: Ending) -> Result<(usize, usize)> {
    let running: Vec<i64> = tx
        .prepare_cached("SELECT pk FROM jobs WHERE lease_session = ?1 AND state = ?2")?
        .query_map(params![s.id, State::Running.code()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let msg = match why {
        Ending::Silent => format!(
            "launcher session {} ({}:{}) silent since {}; lease expired",
            s.id,
            s.host,
            s.pid,
            format_time_us(s.heartbeat_us)
        ),
        Ending::ProcessGone => format!(
            "launcher session {} ({}:{}): its process is gone (last heartbeat {}); lease ended",
            s.id,
            s.host,
            s.pid,
            format_time_us(s.heartbeat_us)
        ),
        Ending::Clean => format!(
            "launcher session {} ({}:{}) ended while it ran",
            s.id, s.host, s.pid
        ),
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
            // The identity is of the calling process: sessions are started by the process that
            // holds them (a launcher's rank 0, the service).
            let proc_id = if info.pid == std::process::id() as i64 {
                crate::procid::this_process()
            } else {
                crate::procid::process(info.pid).unwrap_or_default()
            };
            tx.execute(
                "INSERT INTO sessions (kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, heartbeat_us, proc_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
                params![info.kind, info.host, info.pid, info.batch_job_id, info.job_mode, info.wf_filter, now, proc_id],
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
            Ok(s) => end_session_tx(tx, &s, Ending::Clean),
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
                let (restarted, released) = end_session_tx(tx, &s, Ending::Silent)?;
                out.push(Expired { session: s, restarted, released });
            }
            Ok(out)
        })
    }

    /// Ends at once every live session on `this_host` whose process is gone (see
    /// [`crate::procid`]): a launcher killed with kill -9 gives its jobs back without waiting
    /// for the expiry. Sessions of other hosts, or without a recorded identity, are left to
    /// [`Store::expire_sessions`].
    pub fn expire_dead_sessions(&mut self, this_host: &str) -> Result<Vec<Expired>> {
        let candidates: Vec<Session> = self.read(|tx| {
            Ok(tx
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL AND host = ?1 AND proc_id != ''"
                ))?
                .query_map([this_host], session_from_row)?
                .collect::<rusqlite::Result<_>>()?)
        })?;
        let dead: Vec<i64> = candidates
            .iter()
            .filter(|s| crate::procid::is_gone(s.pid, &s.proc_id))
            .map(|s| s.id)
            .collect();
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| {
            let mut out = Vec::new();
            for id in &dead {
                // It may have been ended meanwhile (by itself or another launcher).
                let s = match live_session(tx, *id) {
                    Ok(s) => s,
                    Err(Error::SessionEnded(_)) => continue,
                    Err(e) => return Err(e),
                };
                let (restarted, released) = end_session_tx(tx, &s, Ending::ProcessGone)?;
                out.push(Expired {
                    session: s,
                    restarted,
                    released,
                });
            }
            Ok(out)
        })
    }

    /// Every job `session` leases, with its state now: a launcher compares it with what it
    /// holds to find jobs removed (`balsam rm`) or changed (`balsam modify`, `killjob`) by
    /// users meanwhile.
    pub fn lease_states(&mut self, session: i64) -> Result<Vec<(i64, State)>> {
        self.read(|tx| {
            let rows: Vec<(i64, i64)> = tx
                .prepare_cached("SELECT pk, state FROM jobs WHERE lease_session = ?1")?
                .query_map([session], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(pk, s)| Ok((pk, State::from_code(s)?)))
                .collect()
        })
    }

    /// Runnable jobs of a workflow filter that no session holds, grouped by shape, each group
    /// with an example job.
    pub fn runnable_overview(&mut self, wf_filter: &str) -> Result<Vec<RunnableGroup>> {
        let states: Vec<String> = RUNNABLE_STATES
            .iter()
            .map(|s| s.code().to_string())
            .collect();
        let mut sql = format!(
            "SELECT num_nodes + coschedule_num_nodes, num_nodes = 1 AND ranks_per_node = 1, \
             wall_time_minutes, count(*), min(pk) FROM jobs \
             WHERE state IN ({}) AND lease_session IS NULL",
            states.join(",")
        );
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&sql)?;
            let row = |r: &rusqlite::Row| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            };
            let rows: Vec<(u32, bool, u32, u64, i64)> = if wf_filter.is_empty() {
                stmt.query_map([], row)?.collect::<rusqlite::Result<_>>()?
            } else {
                stmt.query_map([wf_filter], row)?
                    .collect::<rusqlite::Result<_>>()?
            };
            rows.into_iter()
                .map(|(nodes_needed, serial, wall_time_minutes, count, pk)| {
                    Ok(RunnableGroup {
                        nodes_needed,
                        serial,
                        wall_time_minutes,
                        count,
                        example: crate::jobs::get_job(tx, pk)?.cute_id(),
                    })
                })
                .collect()
        })
    }

    /// What could still arrive for `session`, a launcher with workflow filter `wf_filter`.
    pub fn work_outlook(&mut self, session: i64, wf_filter: &str) -> Result<Outlook> {
        let wf_cond = if wf_filter.is_empty() {
            ""
        } else {
            " AND instr(workflow, ?2) > 0"
        };
        let counts_sql = format!(
            "SELECT state, count(*) FROM jobs WHERE lease_session IS NULL AND ?1 = ?1{wf_cond} \
             AND state IN ({}) GROUP BY state",
            live_codes()
        );
        let held_sql = format!(
            "SELECT lease_session, count(*) FROM jobs WHERE lease_session IS NOT NULL \
             AND lease_session != ?1{wf_cond} GROUP BY lease_session"
        );
        self.read(|tx| {
            let mut out = Outlook::default();
            let mut counts = tx.prepare_cached(&counts_sql)?;
            let count_row = |r: &rusqlite::Row| Ok((r.get::<_, i64>(0)?, r.get::<_, u64>(1)?));
            let rows: Vec<(i64, u64)> = if wf_filter.is_empty() {
                counts.query_map([session], count_row)?.collect::<rusqlite::Result<_>>()?
            } else {
                counts
                    .query_map(params![session, wf_filter], count_row)?
                    .collect::<rusqlite::Result<_>>()?
            };
            for (code, n) in rows {
                let st = State::from_code(code)?;
                if st.is_runnable() {
                    out.runnable_free += n;
                } else if st == State::AwaitingParents {
                    out.awaiting_parents += n;
                } else if st.is_processable() {
                    out.processable_free += n;
                }
            }
            let mut held = tx.prepare_cached(&held_sql)?;
            let held_rows: Vec<(i64, u64)> = if wf_filter.is_empty() {
                held.query_map([session], count_row)?.collect::<rusqlite::Result<_>>()?
            } else {
                held.query_map(params![session, wf_filter], count_row)?
                    .collect::<rusqlite::Result<_>>()?
            };
            let mut get = tx.prepare_cached(&format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1 AND ended_us IS NULL"
            ))?;
            for (sid, n) in held_rows {
                if let Some(s) = get.query_row([sid], session_from_row).optional()? {
                    out.held_by_others += n;
                    out.others.push(s);
                }
            }
            out.service_live = tx
                .prepare_cached(
                    "SELECT 1 FROM sessions WHERE ended_us IS NULL AND kind = 'service' AND id != ?1",
                )?
                .exists([session])?;
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
