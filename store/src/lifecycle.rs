//! State changes: the one place where the state machine is enforced and every change writes its
//! event. Changes are compare-and-set on the state (and the lease, for launchers), so a user's
//! `killjob` or a script's `modify` that lands first always stands.
//!
//! A launcher writes thousands of changes a second, so a batch is applied set-wise: its rows
//! are read (and on PostgreSQL locked) with one statement, the state machine runs over them in
//! memory, and the new rows and history lines are written back with one statement each
//! (PostgreSQL) or one cheap in-process statement per row (SQLite).

use std::collections::HashMap;

use crate::db::Store;
use crate::error::Result;
use crate::jobs::{get_job, get_job_locked, insert_event, CHUNK};
use crate::model::{now_us, Job};
use crate::sql::{params, Tx, P};
use crate::state::{check_transition, Actor, State};

/// A state change a launcher or transition worker asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The job's row number.
    pub pk: i64,
    /// The state the caller believes the job is in.
    pub from: State,
    /// The state wanted.
    pub to: State,
    /// Why, for the history (an error's output tail, a host name...).
    pub message: String,
    /// Exit code to record, for run outcomes.
    pub return_code: Option<i32>,
}

impl Transition {
    /// A change with a message.
    pub fn new(pk: i64, from: State, to: State, message: impl Into<String>) -> Transition {
        Transition {
            pk,
            from,
            to,
            message: message.into(),
            return_code: None,
        }
    }

    /// Records an exit code with the change.
    pub fn with_code(mut self, code: i32) -> Transition {
        self.return_code = Some(code);
        self
    }
}

/// What became of a requested transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the state the job is now in (FAILED when the restart bound was hit).
    Applied(State),
    /// The job was not in the expected state (or no longer this session's); nothing changed.
    Conflict(State),
    /// The job no longer exists (a user removed it); nothing changed.
    Gone,
}

/// Whether a user's move to RESTART_READY counts toward the job's `max_restarts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCount {
    /// A script (an error handler, a workflow driver) sends the job back: it counts, so a
    /// handler that always restarts cannot loop forever.
    Count,
    /// A person at a terminal resets the job on purpose: the count starts again from zero.
    Reset,
}

/// A job's row as a batch of changes sees it.
struct Current {
    state: State,
    lease: Option<i64>,
    restarts: u32,
    max_restarts: u32,
    return_code: Option<i64>,
    changed: bool,
}

/// Applies system transitions inside `tx`, in order (several may concern one job, each
/// starting where the previous one left it). `session`: when given, each job must still be
/// leased by it, so an expired launcher can never overwrite the work of the one that took
/// over. An illegal transition is an error for that transition only.
pub(crate) fn apply_batch(
    tx: &mut Tx,
    ts: &[Transition],
    session: Option<i64>,
) -> Result<Vec<Result<Outcome>>> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let mut pks: Vec<i64> = ts.iter().map(|t| t.pk).collect();
    pks.sort_unstable();
    pks.dedup();
    let mut rows: HashMap<i64, Current> = HashMap::with_capacity(pks.len());
    for chunk in pks.chunks(CHUNK) {
        // In pk order, so that two batches lock common rows in the same order.
        let sql = format!(
            "SELECT pk, state, lease_session, num_restarts, max_restarts, return_code FROM jobs \
             WHERE {} ORDER BY pk{}",
            tx.in_list("pk", "?1"),
            tx.for_update()
        );
        for r in tx.query(&sql, &[P::Ints(chunk)])? {
            rows.insert(
                r.i64(0)?,
                Current {
                    state: r.state(1)?,
                    lease: r.opt_i64(2)?,
                    restarts: r.u32(3)?,
                    max_restarts: r.u32(4)?,
                    return_code: r.opt_i64(5)?,
                    changed: false,
                },
            );
        }
    }
    let now = now_us();
    let mut events: Vec<crate::pg::NewEvent> = Vec::new();
    let mut ended = Vec::new();
    let mut out = Vec::with_capacity(ts.len());
    for t in ts {
        let Some(cur) = rows.get_mut(&t.pk) else {
            out.push(Ok(Outcome::Gone));
            continue;
        };
        if cur.state != t.from || (session.is_some() && cur.lease != session) {
            out.push(Ok(Outcome::Conflict(cur.state)));
            continue;
        }
        if let Err(e) = check_transition(cur.state, t.to, Actor::System) {
            out.push(Err(e));
            continue;
        }
        let (mut to, mut message, mut restarts) = (t.to, t.message.clone(), cur.restarts);
        if to == State::RestartReady {
            restarts += 1;
            if restarts > cur.max_restarts {
                to = State::Failed;
                message = format!(
                    "restart limit reached: {} automatic restarts allowed (max_restarts); not restarted after: {}",
                    cur.max_restarts,
                    if t.message.is_empty() { t.from.as_str() } else { t.message.as_str() }
                );
                restarts -= 1;
            }
        }
        events.push(crate::pg::NewEvent {
            job: t.pk,
            time_us: now,
            from_state: Some(cur.state.code()),
            to_state: to.code(),
            message,
        });
        cur.state = to;
        cur.restarts = restarts;
        if let Some(c) = t.return_code {
            cur.return_code = Some(c.into());
        }
        if to.is_end() {
            cur.lease = None;
            ended.push(t.pk);
        }
        cur.changed = true;
        out.push(Ok(Outcome::Applied(to)));
    }
    let mut updates: Vec<crate::pg::JobUpdate> = rows
        .iter()
        .filter(|(_, c)| c.changed)
        .map(|(pk, c)| crate::pg::JobUpdate {
            pk: *pk,
            state: c.state.code(),
            return_code: c.return_code,
            num_restarts: c.restarts.into(),
            lease_session: c.lease,
        })
        .collect();
    updates.sort_unstable_by_key(|u| u.pk);
    write_updates(tx, &updates, &events)?;
    if !ended.is_empty() {
        resolve_children(tx, &ended)?;
    }
    Ok(out)
}

/// Writes a batch's new rows and history lines.
fn write_updates(
    tx: &mut Tx,
    updates: &[crate::pg::JobUpdate],
    events: &[crate::pg::NewEvent],
) -> Result<()> {
    match tx {
        Tx::Pg(pg) => {
            for chunk in updates.chunks(CHUNK) {
                crate::pg::update_jobs(pg, chunk)?;
            }
            for chunk in events.chunks(CHUNK) {
                crate::pg::insert_events(pg, chunk)?;
            }
        }
        Tx::Sqlite(_) => {
            for u in updates {
                tx.exec(
                    "UPDATE jobs SET state = ?1, return_code = ?2, num_restarts = ?3, lease_session = ?4 WHERE pk = ?5",
                    params![u.state, u.return_code, u.num_restarts, u.lease_session, u.pk],
                )?;
            }
            for e in events {
                tx.exec(
                    "INSERT INTO events (job, time_us, from_state, to_state, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![e.job, e.time_us, e.from_state, e.to_state, &e.message],
                )?;
            }
        }
    }
    Ok(())
}

/// One transition, its own error returned.
pub(crate) fn apply_one(tx: &mut Tx, t: &Transition, session: Option<i64>) -> Result<Outcome> {
    apply_batch(tx, std::slice::from_ref(t), session)?
        .pop()
        .expect("one outcome per transition")
}

/// Moves a CREATED or AWAITING_PARENTS job on according to its parents (legacy §2):
/// READY when it has none, does not wait, or all are JOB_FINISHED; FAILED when one is FAILED or
/// USER_KILLED; else AWAITING_PARENTS. Returns the new state, if it changed.
pub(crate) fn resolve_parents(tx: &mut Tx, pk: i64, only_awaiting: bool) -> Result<Option<State>> {
    let job = get_job_locked(tx, pk)?;
    let eligible = match job.state {
        State::AwaitingParents => true,
        State::Created => !only_awaiting,
        _ => false,
    };
    if !eligible {
        return Ok(None);
    }
    // The parents' states are read under a share lock on PostgreSQL: a parent finishing at
    // the same moment either waits for this decision or is seen finished by it, so a child is
    // never left waiting for a parent that already ended.
    let sql = format!(
        "SELECT j.name, j.state, j.job_id FROM deps d JOIN jobs j ON j.pk = d.parent WHERE d.child = ?1{}",
        tx.for_share()
    );
    let parents = tx.query(&sql, params![pk])?;
    let (to, msg) = if parents.is_empty() || !job.spec.wait_for_parents {
        (State::Ready, String::new())
    } else {
        let mut failed = None;
        let mut pending = 0;
        for r in &parents {
            let s = r.state(1)?;
            if matches!(s, State::Failed | State::UserKilled) {
                let id8 = crate::model::id_from_key(r.blob(2)?).to_string()[..8].to_string();
                failed = Some(format!("parent [{} | {id8}] is {s}", r.str(0)?));
                break;
            }
            if s != State::JobFinished {
                pending += 1;
            }
        }
        match failed {
            Some(m) => (State::Failed, m),
            None if pending == 0 => (
                State::Ready,
                format!("all {} parents finished", parents.len()),
            ),
            None => (
                State::AwaitingParents,
                format!("waiting for {pending} of {} parents", parents.len()),
            ),
        }
    };
    if to == job.state {
        return Ok(None);
    }
    let out = apply_one(tx, &Transition::new(pk, job.state, to, msg), None)?;
    Ok(match out {
        Outcome::Applied(s) => Some(s),
        Outcome::Conflict(_) | Outcome::Gone => None,
    })
}

/// After jobs reached an end state: their waiting children move on. A FAILED child ends too,
/// and so on down the graph (through [`apply_batch`]'s own call back here).
pub(crate) fn resolve_children(tx: &mut Tx, pks: &[i64]) -> Result<()> {
    let mut kids = Vec::new();
    for chunk in pks.chunks(CHUNK) {
        let sql = format!(
            "SELECT DISTINCT d.child FROM deps d JOIN jobs j ON j.pk = d.child WHERE {} AND j.state = ?2",
            tx.in_list("d.parent", "?1")
        );
        for r in tx.query(&sql, &[P::Ints(chunk), State::AwaitingParents.into()])? {
            kids.push(r.i64(0)?);
        }
    }
    kids.sort_unstable();
    kids.dedup();
    for k in kids {
        resolve_parents(tx, k, true)?;
    }
    Ok(())
}

impl Store {
    /// Applies system transitions in one transaction (launchers batch their state writes this
    /// way). Each is compare-and-set; a conflict leaves that job as it is, and so does an
    /// illegal transition (logged): one job's problem never holds back the others.
    pub fn apply(&mut self, ts: &[Transition], session: Option<i64>) -> Result<Vec<Outcome>> {
        let outs = self.write(|tx| apply_batch(tx, ts, session))?;
        Ok(outs
            .into_iter()
            .zip(ts)
            .map(|(o, t)| match o {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!("job #{}: {e}; left as it is", t.pk);
                    Outcome::Conflict(t.from)
                }
            })
            .collect())
    }

    /// Applies one system transition; an illegal one is an error.
    pub fn transition(&mut self, t: Transition, session: Option<i64>) -> Result<Outcome> {
        self.write(|tx| apply_one(tx, &t, session))
    }

    /// Checks a CREATED or AWAITING_PARENTS job's parents and moves it on.
    pub fn check_parents(&mut self, pk: i64) -> Result<Option<State>> {
        self.write(|tx| resolve_parents(tx, pk, false))
    }

    /// A user's state change (`balsam modify ID state S`): any state but out of USER_KILLED,
    /// recorded as "User mutated state from command line". A move to RESTART_READY of a job
    /// that has run counts toward `max_restarts` with [`RestartCount::Count`] (FAILED past the
    /// bound, as for the system's restarts); [`RestartCount::Reset`] starts the count again.
    pub fn set_state_by_user(
        &mut self,
        pk: i64,
        to: State,
        note: &str,
        count: RestartCount,
    ) -> Result<Job> {
        self.write(|tx| {
            let job = get_job_locked(tx, pk)?;
            check_transition(job.state, to, Actor::User)?;
            let mut msg = "User mutated state from command line".to_string();
            if !note.is_empty() {
                msg = format!("{msg}: {note}");
            }
            let (mut to, mut restarts) = (to, job.num_restarts);
            if to == State::RestartReady {
                match count {
                    RestartCount::Reset => {
                        if restarts > 0 {
                            msg.push_str(&format!(
                                " (restart count reset from {restarts} to 0)"
                            ));
                        }
                        restarts = 0;
                    }
                    RestartCount::Count if has_run(job.state) => {
                        restarts += 1;
                        if restarts > job.spec.max_restarts {
                            to = State::Failed;
                            restarts -= 1;
                            msg = format!(
                                "restart limit reached: {} restarts allowed (max_restarts); not restarted after: {msg}",
                                job.spec.max_restarts
                            );
                        }
                    }
                    RestartCount::Count => {}
                }
            }
            tx.exec(
                "UPDATE jobs SET state = ?1, num_restarts = ?2 WHERE pk = ?3",
                params![to, restarts, pk],
            )?;
            insert_event(tx, pk, Some(job.state), to, &msg)?;
            if to.is_end() {
                resolve_children(tx, &[pk])?;
            } else if matches!(to, State::Created | State::AwaitingParents) {
                resolve_parents(tx, pk, to == State::AwaitingParents)?;
            }
            get_job(tx, pk)
        })
    }

    /// Adds a line to a job's history without changing its state (e.g. when the process of a
    /// killed job actually died). `session`: the launcher writing it, if any, named in the
    /// line. A note for a job that no longer exists is dropped: returns whether it was written.
    pub fn note(&mut self, pk: i64, session: Option<i64>, message: &str) -> Result<bool> {
        self.write(|tx| {
            let sql = format!("SELECT state FROM jobs WHERE pk = ?1{}", tx.for_share());
            let Some(row) = tx.query_opt(&sql, params![pk])? else {
                return Ok(false);
            };
            let st = row.state(0)?;
            let msg = match session {
                Some(s) => format!("{message} (launcher session {s})"),
                None => message.to_string(),
            };
            insert_event(tx, pk, Some(st), st, &msg)?;
            Ok(true)
        })
    }

    /// `balsam killjob`: USER_KILLED for the job (and its descendants with `recursive`).
    /// Jobs already in an end state are left alone. Returns the killed jobs.
    pub fn kill(&mut self, pk: i64, recursive: bool) -> Result<Vec<Job>> {
        self.write(|tx| {
            let root_id8 = get_job(tx, pk)?.id8();
            let mut order = vec![pk];
            if recursive {
                let mut i = 0;
                while i < order.len() {
                    for r in tx.query("SELECT child FROM deps WHERE parent = ?1", params![order[i]])? {
                        let n = r.i64(0)?;
                        if !order.contains(&n) {
                            order.push(n);
                        }
                    }
                    i += 1;
                }
            }
            // Every job is marked first, and only then are children resolved: a descendant
            // must end USER_KILLED like the job itself, not FAILED because its parent was
            // killed a moment earlier.
            let mut killed_pks = Vec::new();
            for p in order {
                let job = get_job_locked(tx, p)?;
                if job.state.is_end() {
                    continue;
                }
                // The lease stays, so the launcher running the job finds it and kills the process.
                tx.exec(
                    "UPDATE jobs SET state = ?1 WHERE pk = ?2",
                    params![State::UserKilled, p],
                )?;
                let msg = if p == pk {
                    "Killed by user (balsam killjob)".to_string()
                } else {
                    format!("Killed by user with its ancestor [{root_id8}] (balsam killjob --recursive)")
                };
                insert_event(tx, p, Some(job.state), State::UserKilled, &msg)?;
                killed_pks.push(p);
            }
            resolve_children(tx, &killed_pks)?;
            killed_pks.iter().map(|p| get_job(tx, *p)).collect()
        })
    }
}

/// States a job is in after its process ran (a return to RESTART_READY from one of them is a
/// restart).
fn has_run(s: State) -> bool {
    matches!(
        s,
        State::Running
            | State::RunDone
            | State::RunError
            | State::RunTimeout
            | State::Postprocessed
            | State::JobFinished
            | State::Failed
    )
}
