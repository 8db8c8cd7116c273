//! State changes: the one place where the state machine is enforced and every change writes its
//! event. Changes are compare-and-set on the state (and the lease, for launchers), so a user's
//! `killjob` or a script's `modify` that lands first always stands.

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::Store;
use crate::error::Result;
use crate::jobs::{get_job, insert_event};
use crate::model::Job;
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

/// Applies a system transition inside `tx`. `session`: when given, the job must still be leased
/// by it, so an expired launcher can never overwrite the work of the one that took over.
pub(crate) fn apply_one(tx: &Transaction, t: &Transition, session: Option<i64>) -> Result<Outcome> {
    let row: Option<(i64, Option<i64>, u32, u32)> = tx
        .prepare_cached(
            "SELECT state, lease_session, num_restarts, max_restarts FROM jobs WHERE pk = ?1",
        )?
        .query_row([t.pk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    let Some((code, lease, restarts, max_restarts)) = row else {
        return Ok(Outcome::Gone);
    };
    let current = State::from_code(code)?;
    if current != t.from || (session.is_some() && lease != session) {
        return Ok(Outcome::Conflict(current));
    }
    check_transition(current, t.to, Actor::System)?;
    let (mut to, mut message, mut restarts) = (t.to, t.message.clone(), restarts);
    if to == State::RestartReady {
        restarts += 1;
        if restarts > max_restarts {
            to = State::Failed;
            message = format!(
                "restart limit reached: {} automatic restarts allowed (max_restarts); not restarted after: {}",
                max_restarts,
                if t.message.is_empty() { t.from.as_str() } else { t.message.as_str() }
            );
            restarts -= 1;
        }
    }
    let release = to.is_end();
    tx.prepare_cached(
        "UPDATE jobs SET state = ?1, return_code = coalesce(?2, return_code), num_restarts = ?3, \
         lease_session = CASE WHEN ?4 THEN NULL ELSE lease_session END WHERE pk = ?5",
    )?
    .execute(params![to.code(), t.return_code, restarts, release, t.pk])?;
    insert_event(tx, t.pk, Some(current), to, &message)?;
    if to.is_end() {
        resolve_children(tx, t.pk)?;
    }
    Ok(Outcome::Applied(to))
}

/// Moves a CREATED or AWAITING_PARENTS job on according to its parents (legacy §2):
/// READY when it has none, does not wait, or all are JOB_FINISHED; FAILED when one is FAILED or
/// USER_KILLED; else AWAITING_PARENTS. Returns the new state, if it changed.
pub(crate) fn resolve_parents(
    tx: &Transaction,
    pk: i64,
    only_awaiting: bool,
) -> Result<Option<State>> {
    let job = get_job(tx, pk)?;
    let eligible = match job.state {
        State::AwaitingParents => true,
        State::Created => !only_awaiting,
        _ => false,
    };
    if !eligible {
        return Ok(None);
    }
    let parents: Vec<(String, i64, Vec<u8>)> = tx
        .prepare_cached(
            "SELECT j.name, j.state, j.job_id FROM deps d JOIN jobs j ON j.pk = d.parent WHERE d.child = ?1",
        )?
        .query_map([pk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let (to, msg) = if parents.is_empty() || !job.spec.wait_for_parents {
        (State::Ready, String::new())
    } else {
        let mut failed = None;
        let mut pending = 0;
        for (name, code, id) in &parents {
            let s = State::from_code(*code)?;
            if matches!(s, State::Failed | State::UserKilled) {
                let id8 = uuid::Uuid::from_slice(id)
                    .map(|u| u.to_string()[..8].to_string())
                    .unwrap_or_default();
                failed = Some(format!("parent [{name} | {id8}] is {s}"));
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
    let out = apply_one(tx, &crate::Transition::new(pk, job.state, to, msg), None)?;
    Ok(match out {
        Outcome::Applied(s) => Some(s),
        Outcome::Conflict(_) | Outcome::Gone => None,
    })
}

/// After `pk` reached an end state: its waiting children move on. A FAILED child ends too, and
/// so on down the graph (through [`apply_one`]'s own call back here).
pub(crate) fn resolve_children(tx: &Transaction, pk: i64) -> Result<()> {
    let kids: Vec<i64> = tx
        .prepare_cached(
            "SELECT d.child FROM deps d JOIN jobs j ON j.pk = d.child WHERE d.parent = ?1 AND j.state = ?2",
        )?
        .query_map(params![pk, State::AwaitingParents.code()], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for k in kids {
        resolve_parents(tx, k, true)?;
    }
    Ok(())
}

impl Store {
    /// Applies system transitions in one transaction (launchers batch their state writes this
    /// way). Each is compare-and-set; a conflict leaves that job as it is.
    pub fn apply(&mut self, ts: &[Transition], session: Option<i64>) -> Result<Vec<Outcome>> {
        self.write(|tx| ts.iter().map(|t| apply_one(tx, t, session)).collect())
    }

    /// Applies one system transition.
    pub fn transition(&mut self, t: Transition, session: Option<i64>) -> Result<Outcome> {
        Ok(self.apply(std::slice::from_ref(&t), session)?.remove(0))
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
            let job = get_job(tx, pk)?;
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
            tx.execute(
                "UPDATE jobs SET state = ?1, num_restarts = ?2 WHERE pk = ?3",
                params![to.code(), restarts, pk],
            )?;
            insert_event(tx, pk, Some(job.state), to, &msg)?;
            if to.is_end() {
                resolve_children(tx, pk)?;
            } else if matches!(to, State::Created | State::AwaitingParents) {
                resolve_parents(tx, pk, to == State::AwaitingParents)?;
            }
            get_job(tx, pk)
        })
    }

    /// Adds a line to a job's history without changing its state (e.g. when the process of a
    /// killed job actually died). `session`: the launcher writing it, if any, named in the
    /// line's place in the log. A note for a job that no longer exists is dropped: returns
    /// whether it was written.
    pub fn note(&mut self, pk: i64, session: Option<i64>, message: &str) -> Result<bool> {
        self.write(|tx| {
            let state: Option<i64> = tx
                .prepare_cached("SELECT state FROM jobs WHERE pk = ?1")?
                .query_row([pk], |r| r.get(0))
                .optional()?;
            let Some(code) = state else {
                return Ok(false);
            };
            let st = State::from_code(code)?;
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
                let mut kids = tx.prepare_cached("SELECT child FROM deps WHERE parent = ?1")?;
                let mut i = 0;
                while i < order.len() {
                    let next: Vec<i64> = kids
                        .query_map([order[i]], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()?;
                    for n in next {
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
                let job = get_job(tx, p)?;
                if job.state.is_end() {
                    continue;
                }
                // The lease stays, so the launcher running the job finds it and kills the process.
                tx.execute(
                    "UPDATE jobs SET state = ?1 WHERE pk = ?2",
                    params![State::UserKilled.code(), p],
                )?;
                let msg = if p == pk {
                    "Killed by user (balsam killjob)".to_string()
                } else {
                    format!(
                        "Killed by user with its ancestor [{}] (balsam killjob --recursive)",
                        root_id8
                    )
                };
                insert_event(tx, p, Some(job.state), State::UserKilled, &msg)?;
                killed_pks.push(p);
            }
            let mut killed = Vec::new();
            for p in killed_pks {
                resolve_children(tx, p)?;
                killed.push(get_job(tx, p)?);
            }
            Ok(killed)
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
