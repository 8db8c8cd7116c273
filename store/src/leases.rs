//! Launcher sessions and job leases. A session (a launcher or the service) takes jobs by setting
//! their `lease_session` in one transaction (SQLite: the write lock; PostgreSQL: `FOR UPDATE
//! SKIP LOCKED`), so two sessions can never hold the same job. Sessions heartbeat; when one
//! falls silent for longer than the expiry, or its process is seen gone, its running jobs go to
//! RESTART_READY (through the state machine, counting restarts) and its other leases are
//! released.
//!
//! On PostgreSQL a lease holds its session's row under a share lock while it takes jobs, and
//! ending a session locks that row first: a session is never ended while a lease of its own is
//! being written, so no job is ever left leased by a session that ended.

use std::time::Duration;

use crate::db::Store;
use crate::error::{Error, Result};
use crate::jobs::{get_job, job_from_row, JOB_COLS};
use crate::lifecycle::{apply_batch, Transition};
use crate::model::{format_time_us, now_us, Job, Session, SessionInfo};
use crate::sql::{params, Backend, Row, Tx, P};
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

/// State codes for SQL.
fn codes(states: &[State]) -> String {
    states
        .iter()
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

fn session_from_row(r: &Row) -> Result<Session> {
    Ok(Session {
        id: r.i64(0)?,
        kind: r.text(1)?,
        host: r.text(2)?,
        pid: r.i64(3)?,
        batch_job_id: r.text(4)?,
        job_mode: r.text(5)?,
        wf_filter: r.text(6)?,
        started_us: r.i64(7)?,
        heartbeat_us: r.i64(8)?,
        ended_us: r.opt_i64(9)?,
        proc_id: r.text(10)?,
    })
}

const SESSION_COLS: &str = "id, kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, \
     heartbeat_us, ended_us, proc_id";

/// The session, if it is live. `lock`: the session's row is held so it cannot end meanwhile
/// (share lock: leases of one session do not wait for each other) or, with `exclusive`, so
/// this transaction alone may end it.
fn live_session(tx: &mut Tx, id: i64, exclusive: bool) -> Result<Session> {
    let lock = if exclusive {
        tx.for_update()
    } else {
        tx.for_share()
    };
    let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1{lock}");
    let s = tx
        .query_opt(&sql, params![id])?
        .map(|r| session_from_row(&r))
        .transpose()?
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

/// Ends a session whose row this transaction holds: its running jobs go to RESTART_READY (or
/// FAILED past their restart bound), every lease is released.
fn end_session_tx(tx: &mut Tx, s: &Session, why: Ending) -> Result<(usize, usize)> {
    let running: Vec<i64> = tx
        .query(
            "SELECT pk FROM jobs WHERE lease_session = ?1 AND state = ?2",
            params![s.id, State::Running],
        )?
        .iter()
        .map(|r| r.i64(0))
        .collect::<Result<_>>()?;
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
    let ts: Vec<Transition> = running
        .iter()
        .map(|pk| Transition::new(*pk, State::Running, State::RestartReady, msg.clone()))
        .collect();
    apply_batch(tx, &ts, None)?;
    let released = tx.exec(
        "UPDATE jobs SET lease_session = NULL WHERE lease_session = ?1",
        params![s.id],
    )? as usize;
    tx.exec(
        "UPDATE sessions SET ended_us = ?1 WHERE id = ?2",
        params![now_us(), s.id],
    )?;
    Ok((running.len(), released.saturating_sub(running.len())))
}

impl Store {
    /// Registers a session and returns its id.
    pub fn start_session(&mut self, info: &SessionInfo) -> Result<i64> {
        // The identity is of the calling process: sessions are started by the process that
        // holds them (a launcher's rank 0, the service).
        let proc_id = if info.pid == std::process::id() as i64 {
            crate::procid::this_process()
        } else {
            crate::procid::process(info.pid).unwrap_or_default()
        };
        self.write(|tx| {
            let now = now_us();
            tx.query_one(
                "INSERT INTO sessions (kind, host, pid, batch_job_id, job_mode, wf_filter, started_us, heartbeat_us, proc_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8) RETURNING id",
                params![&info.kind, &info.host, info.pid, &info.batch_job_id, &info.job_mode, &info.wf_filter, now, &proc_id],
            )?
            .i64(0)
        })
    }

    /// Records that the session is alive. Fails with [`Error::SessionEnded`] when it was expired
    /// meanwhile: its jobs belong to others now and it must stop running them.
    pub fn heartbeat(&mut self, session: i64) -> Result<()> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE sessions SET heartbeat_us = ?1 WHERE id = ?2 AND ended_us IS NULL",
                params![now_us(), session],
            )?;
            if n == 0 {
                live_session(tx, session, false)?;
            }
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
        let states = match group {
            LeaseGroup::Runnable => codes(&RUNNABLE_STATES),
            LeaseGroup::Processable => codes(
                &PROCESSABLE_STATES
                    .iter()
                    .copied()
                    .filter(|s| *s != State::AwaitingParents)
                    .collect::<Vec<_>>(),
            ),
        };
        let mut cond = format!("state IN ({states}) AND lease_session IS NULL");
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
        let limit = limit.min(i64::MAX as usize) as i64;
        self.write(|tx| {
            live_session(tx, session, false)?;
            if tx.backend() == Backend::Postgres {
                // With a LIMIT, PostgreSQL's planner prefers scanning the table from its start,
                // expecting matches anywhere; in a campaign the runnable jobs sit behind
                // hundreds of thousands of finished ones, and each lease would read them all.
                // The state index finds them wherever they are.
                tx.exec("SET LOCAL enable_seqscan = off", &[])?;
            }
            // On PostgreSQL the chosen rows go through an array: `pk IN (subquery)` becomes a
            // semi-join, which the planner may run as a hash join over every row of the table.
            // `ARRAY(subquery)` is computed once, and the rows are then fetched by primary key.
            let sql = match tx.backend() {
                Backend::Sqlite => format!(
                    "UPDATE jobs SET lease_session = ?1 WHERE pk IN \
                     (SELECT pk FROM jobs WHERE {cond} LIMIT ?2) RETURNING {JOB_COLS}"
                ),
                Backend::Postgres => format!(
                    "UPDATE jobs SET lease_session = ?1 WHERE pk = ANY(ARRAY( \
                     SELECT pk FROM jobs WHERE {cond} LIMIT ?2{})) RETURNING {JOB_COLS}",
                    tx.skip_locked()
                ),
            };
            let rows = if filter.wf_filter.is_empty() {
                tx.query(&sql, params![session, limit])?
            } else {
                tx.query(&sql, params![session, limit, &filter.wf_filter])?
            };
            let mut jobs: Vec<Job> = rows.iter().map(job_from_row).collect::<Result<_>>()?;
            jobs.sort_unstable_by_key(|j| j.pk);
            Ok(jobs)
        })
    }

    /// Gives leased jobs back (they stay in their state for another session to take).
    pub fn release(&mut self, session: i64, pks: &[i64]) -> Result<usize> {
        self.write(|tx| {
            let mut n = 0;
            for chunk in pks.chunks(crate::jobs::CHUNK) {
                let sql = format!(
                    "UPDATE jobs SET lease_session = NULL WHERE lease_session = ?2 AND {}",
                    tx.in_list("pk", "?1")
                );
                n += tx.exec(&sql, &[P::Ints(chunk), P::Int(session)])? as usize;
            }
            Ok(n)
        })
    }

    /// Ends a session: jobs still RUNNING under it go to RESTART_READY, all its leases are
    /// released. A launcher calls this after marking its own jobs on the way out.
    pub fn end_session(&mut self, session: i64) -> Result<(usize, usize)> {
        self.write(|tx| match live_session(tx, session, true) {
            Ok(s) => end_session_tx(tx, &s, Ending::Clean),
            Err(Error::SessionEnded(_)) => Ok((0, 0)),
            Err(e) => Err(e),
        })
    }

    /// Expires every session silent for longer than `expiry`.
    pub fn expire_sessions(&mut self, expiry: Duration) -> Result<Vec<Expired>> {
        let cutoff = now_us() - expiry.as_micros() as i64;
        self.write(|tx| {
            // Sessions another process is expiring right now are left to it.
            let sql = format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL AND heartbeat_us < ?1{}",
                tx.skip_locked()
            );
            let stale: Vec<Session> = tx
                .query(&sql, params![cutoff])?
                .iter()
                .map(session_from_row)
                .collect::<Result<_>>()?;
            let mut out = Vec::new();
            for s in stale {
                let (restarted, released) = end_session_tx(tx, &s, Ending::Silent)?;
                out.push(Expired {
                    session: s,
                    restarted,
                    released,
                });
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
            tx.query(
                &format!(
                    "SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL AND host = ?1 AND proc_id != ''"
                ),
                params![this_host],
            )?
            .iter()
            .map(session_from_row)
            .collect()
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
                let s = match live_session(tx, *id, true) {
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
            tx.query(
                "SELECT pk, state FROM jobs WHERE lease_session = ?1 ORDER BY pk",
                params![session],
            )?
            .iter()
            .map(|r| Ok((r.i64(0)?, r.state(1)?)))
            .collect()
        })
    }

    /// Runnable jobs of a workflow filter that no session holds, grouped by shape, each group
    /// with an example job.
    pub fn runnable_overview(&mut self, wf_filter: &str) -> Result<Vec<RunnableGroup>> {
        let mut sql = format!(
            "SELECT num_nodes + coschedule_num_nodes, num_nodes = 1 AND ranks_per_node = 1, \
             wall_time_minutes, count(*), min(pk) FROM jobs \
             WHERE state IN ({}) AND lease_session IS NULL",
            codes(&RUNNABLE_STATES)
        );
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        self.read(|tx| {
            let rows = if wf_filter.is_empty() {
                tx.query(&sql, &[])?
            } else {
                tx.query(&sql, params![wf_filter])?
            };
            rows.iter()
                .map(|r| {
                    Ok(RunnableGroup {
                        nodes_needed: r.u32(0)?,
                        serial: r.bool(1)?,
                        wall_time_minutes: r.u32(2)?,
                        count: r.u64(3)?,
                        example: get_job(tx, r.i64(4)?)?.cute_id(),
                    })
                })
                .collect()
        })
    }

    /// What could still arrive for `session`, a launcher with workflow filter `wf_filter`.
    pub fn work_outlook(&mut self, session: i64, wf_filter: &str) -> Result<Outlook> {
        let counts_sql = format!(
            "SELECT state, count(*) FROM jobs WHERE lease_session IS NULL AND state IN ({}){} GROUP BY state",
            live_codes(),
            if wf_filter.is_empty() { "" } else { " AND instr(workflow, ?1) > 0" }
        );
        let held_sql = format!(
            "SELECT lease_session, count(*) FROM jobs WHERE lease_session IS NOT NULL \
             AND lease_session != ?1{} GROUP BY lease_session",
            if wf_filter.is_empty() {
                ""
            } else {
                " AND instr(workflow, ?2) > 0"
            }
        );
        self.read(|tx| {
            let mut out = Outlook::default();
            let rows = if wf_filter.is_empty() {
                tx.query(&counts_sql, &[])?
            } else {
                tx.query(&counts_sql, params![wf_filter])?
            };
            for r in rows {
                let (st, n) = (r.state(0)?, r.u64(1)?);
                if st.is_runnable() {
                    out.runnable_free += n;
                } else if st == State::AwaitingParents {
                    out.awaiting_parents += n;
                } else if st.is_processable() {
                    out.processable_free += n;
                }
            }
            let held = if wf_filter.is_empty() {
                tx.query(&held_sql, params![session])?
            } else {
                tx.query(&held_sql, params![session, wf_filter])?
            };
            for r in held {
                let (sid, n) = (r.i64(0)?, r.u64(1)?);
                let live = tx.query_opt(
                    &format!(
                        "SELECT {SESSION_COLS} FROM sessions WHERE id = ?1 AND ended_us IS NULL"
                    ),
                    params![sid],
                )?;
                if let Some(s) = live {
                    out.held_by_others += n;
                    out.others.push(session_from_row(&s)?);
                }
            }
            out.service_live = tx.exists(
                "SELECT 1 FROM sessions WHERE ended_us IS NULL AND kind = 'service' AND id != ?1",
                params![session],
            )?;
            Ok(out)
        })
    }

    /// Jobs of `session` that a user killed (the launcher must stop their processes).
    pub fn killed_jobs(&mut self, session: i64) -> Result<Vec<i64>> {
        self.read(|tx| {
            tx.query(
                "SELECT pk FROM jobs WHERE lease_session = ?1 AND state = ?2",
                params![session, State::UserKilled],
            )?
            .iter()
            .map(|r| r.i64(0))
            .collect()
        })
    }

    /// Jobs leased by `session`.
    pub fn leased_jobs(&mut self, session: i64) -> Result<Vec<Job>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE lease_session = ?1 ORDER BY pk"),
                params![session],
            )?
            .iter()
            .map(job_from_row)
            .collect()
        })
    }

    /// A session by id.
    pub fn session(&mut self, id: i64) -> Result<Session> {
        self.read(|tx| {
            tx.query_opt(
                &format!("SELECT {SESSION_COLS} FROM sessions WHERE id = ?1"),
                params![id],
            )?
            .map(|r| session_from_row(&r))
            .transpose()?
            .ok_or_else(|| Error::Refused(format!("launcher session {id} does not exist")))
        })
    }

    /// Sessions that have not ended.
    pub fn live_sessions(&mut self) -> Result<Vec<Session>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {SESSION_COLS} FROM sessions WHERE ended_us IS NULL ORDER BY id"),
                &[],
            )?
            .iter()
            .map(session_from_row)
            .collect()
        })
    }

    /// The work no launcher holds yet, grouped by shape: runnable jobs, and jobs on their way to
    /// being runnable (CREATED, READY, STAGED_IN) that the next transitions will make runnable.
    /// Jobs AWAITING_PARENTS are not counted: they cannot run until their parents did (run the
    /// transitions first, so that new children with unfinished parents are in that state).
    pub fn waiting_work(&mut self, wf_filter: &str) -> Result<Vec<WorkShape>> {
        let mut states = RUNNABLE_STATES.to_vec();
        states.extend([State::Created, State::Ready, State::StagedIn]);
        let mut sql = format!(
            "SELECT num_nodes + coschedule_num_nodes, wall_time_minutes, node_packing_count, count(*) \
             FROM jobs WHERE state IN ({}) AND lease_session IS NULL",
            codes(&states)
        );
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" GROUP BY 1, 2, 3 ORDER BY 1, 2, 3");
        self.read(|tx| {
            let rows = if wf_filter.is_empty() {
                tx.query(&sql, &[])?
            } else {
                tx.query(&sql, params![wf_filter])?
            };
            rows.iter()
                .map(|r| {
                    Ok(WorkShape {
                        num_nodes: r.u32(0)?,
                        wall_time_minutes: r.u32(1)?,
                        node_packing_count: r.u32(2)?,
                        count: r.u64(3)?,
                    })
                })
                .collect()
        })
    }

    /// How many jobs, in any state, a workflow filter matches (`submit-launch` refuses a filter
    /// that matches none: a typo would otherwise start a launcher that does nothing).
    pub fn count_wf_filter(&mut self, wf_filter: &str) -> Result<u64> {
        self.read(|tx| {
            tx.query_one(
                "SELECT count(*) FROM jobs WHERE instr(workflow, ?1) > 0",
                params![wf_filter],
            )?
            .u64(0)
        })
    }

    /// Whether any job is runnable or processable for a workflow filter (a launcher without
    /// `--persistent` exits when none is, and none runs).
    pub fn has_work(&mut self, wf_filter: &str) -> Result<bool> {
        let mut states = RUNNABLE_STATES.to_vec();
        states.extend(PROCESSABLE_STATES);
        states.push(State::Running);
        let mut sql = format!("SELECT 1 FROM jobs WHERE state IN ({})", codes(&states));
        if !wf_filter.is_empty() {
            sql.push_str(" AND instr(workflow, ?1) > 0");
        }
        sql.push_str(" LIMIT 1");
        self.read(|tx| {
            if wf_filter.is_empty() {
                tx.exists(&sql, &[])
            } else {
                tx.exists(&sql, params![wf_filter])
            }
        })
    }
}
