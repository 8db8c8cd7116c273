//! The job state machine: the 14 states users know from legacy Balsam, their groups, and the
//! transitions the system may make. Every state change in the store goes through
//! [`check_transition`], so the rules live in exactly one place.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A job's state. The integer codes are stored in the database and must never be renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum State {
    /// Just added; parents not yet checked.
    Created = 0,
    /// Waiting for at least one parent to reach JOB_FINISHED.
    AwaitingParents = 1,
    /// Parents are done (or not waited for); ready to stage in.
    Ready = 2,
    /// Working directory made and input files in place.
    StagedIn = 3,
    /// Preprocess script ran (or there was none): runnable.
    Preprocessed = 4,
    /// A launcher is running the job's process.
    Running = 5,
    /// The process exited 0.
    RunDone = 6,
    /// The postprocess script ran (or there was none).
    Postprocessed = 7,
    /// Done, outputs staged out: an end state.
    JobFinished = 8,
    /// Still running when the launcher stopped, or past its wall time.
    RunTimeout = 9,
    /// The process exited non-zero, was killed by a signal, or could not start.
    RunError = 10,
    /// Waiting to be run again.
    RestartReady = 11,
    /// Given up on: an end state.
    Failed = 12,
    /// Killed by the user: an end state that only the user can have set.
    UserKilled = 13,
}

/// Every state, in lifecycle order.
pub const ALL_STATES: [State; 14] = [
    State::Created,
    State::AwaitingParents,
    State::Ready,
    State::StagedIn,
    State::Preprocessed,
    State::Running,
    State::RunDone,
    State::Postprocessed,
    State::JobFinished,
    State::RunTimeout,
    State::RunError,
    State::RestartReady,
    State::Failed,
    State::UserKilled,
];

/// States a transition worker acts on (legacy's PROCESSABLE_STATES).
pub const PROCESSABLE_STATES: [State; 8] = [
    State::Created,
    State::AwaitingParents,
    State::Ready,
    State::StagedIn,
    State::RunDone,
    State::Postprocessed,
    State::RunTimeout,
    State::RunError,
];

/// States a launcher may start (legacy's RUNNABLE_STATES).
pub const RUNNABLE_STATES: [State; 2] = [State::Preprocessed, State::RestartReady];

/// States in which a process is running.
pub const ACTIVE_STATES: [State; 1] = [State::Running];

/// States a job never leaves on its own.
pub const END_STATES: [State; 3] = [State::JobFinished, State::Failed, State::UserKilled];

/// Who asks for a state change: the system obeys the state machine, a user may set any state
/// except leave USER_KILLED (legacy's `balsam modify` rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A launcher, the service, or a transition.
    System,
    /// A person or script through `balsam modify` / `balsam killjob`.
    User,
}

impl State {
    /// The name users see and type (`RUN_DONE`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "CREATED",
            State::AwaitingParents => "AWAITING_PARENTS",
            State::Ready => "READY",
            State::StagedIn => "STAGED_IN",
            State::Preprocessed => "PREPROCESSED",
            State::Running => "RUNNING",
            State::RunDone => "RUN_DONE",
            State::Postprocessed => "POSTPROCESSED",
            State::JobFinished => "JOB_FINISHED",
            State::RunTimeout => "RUN_TIMEOUT",
            State::RunError => "RUN_ERROR",
            State::RestartReady => "RESTART_READY",
            State::Failed => "FAILED",
            State::UserKilled => "USER_KILLED",
        }
    }

    /// The integer stored in the database.
    pub fn code(self) -> i64 {
        self as u8 as i64
    }

    /// The state for a stored integer.
    pub fn from_code(code: i64) -> Result<State> {
        ALL_STATES
            .iter()
            .copied()
            .find(|s| s.code() == code)
            .ok_or_else(|| Error::Corrupt(format!("unknown state code {code} in the database")))
    }

    /// Legacy's PROCESSABLE group.
    pub fn is_processable(self) -> bool {
        PROCESSABLE_STATES.contains(&self)
    }

    /// Legacy's RUNNABLE group.
    pub fn is_runnable(self) -> bool {
        RUNNABLE_STATES.contains(&self)
    }

    /// RUNNING.
    pub fn is_active(self) -> bool {
        ACTIVE_STATES.contains(&self)
    }

    /// JOB_FINISHED, FAILED, USER_KILLED.
    pub fn is_end(self) -> bool {
        END_STATES.contains(&self)
    }

    /// Whether the system may move a job from `self` to `to` (the rules of legacy §2).
    pub fn system_may_move_to(self, to: State) -> bool {
        use State::*;
        if self.is_end() {
            return false;
        }
        // Any live job may be killed by the user's request or fail on an error in a transition.
        if matches!(to, UserKilled | Failed) {
            return true;
        }
        matches!(
            (self, to),
            (Created, AwaitingParents)
                | (Created, Ready)
                | (AwaitingParents, Ready)
                | (Ready, StagedIn)
                | (StagedIn, Preprocessed)
                | (Preprocessed, Running)
                | (RestartReady, Running)
                | (Running, RunDone)
                | (Running, RunError)
                | (Running, RunTimeout)
                // A launcher whose lease expired: the job is run again.
                | (Running, RestartReady)
                | (RunDone, Postprocessed)
                | (RunTimeout, RestartReady)
                | (RunError, RestartReady)
                | (Postprocessed, JobFinished)
        )
    }
}

/// Refuses an illegal transition with an error naming both states.
pub fn check_transition(from: State, to: State, actor: Actor) -> Result<()> {
    let ok = match actor {
        Actor::System => from.system_may_move_to(to),
        Actor::User => from != State::UserKilled,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::IllegalTransition { from, to, actor })
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = Error;

    /// Accepts the exact name in any case (`run_done` works); lists the valid names otherwise.
    fn from_str(s: &str) -> Result<State> {
        let wanted = s.trim();
        ALL_STATES
            .iter()
            .copied()
            .find(|st| st.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| Error::InvalidState(wanted.to_string()))
    }
}

/// The valid state names, space-separated, for error messages.
pub fn valid_state_names() -> String {
    ALL_STATES
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for (i, s) in ALL_STATES.iter().enumerate() {
            assert_eq!(s.code(), i as i64);
            assert_eq!(State::from_code(s.code()).unwrap(), *s);
            assert_eq!(s.as_str().parse::<State>().unwrap(), *s);
        }
        assert!(State::from_code(14).is_err());
    }

    #[test]
    fn serializes_as_the_names_users_type() {
        for s in ALL_STATES {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
    }

    #[test]
    fn groups_match_legacy() {
        assert_eq!(PROCESSABLE_STATES.len(), 8);
        for s in ALL_STATES {
            let groups = [
                s.is_processable(),
                s.is_runnable(),
                s.is_active(),
                s.is_end(),
            ];
            assert_eq!(
                groups.iter().filter(|g| **g).count(),
                1,
                "{s} in exactly one group"
            );
        }
    }

    #[test]
    fn parse_is_case_insensitive_and_lists_valid_names() {
        assert_eq!("run_done".parse::<State>().unwrap(), State::RunDone);
        let err = "DONE".parse::<State>().unwrap_err().to_string();
        assert!(err.contains("DONE"), "{err}");
        assert!(
            err.contains("JOB_FINISHED") && err.contains("RESTART_READY"),
            "{err}"
        );
    }

    #[test]
    fn happy_path_is_legal() {
        use State::*;
        let path = [
            Created,
            Ready,
            StagedIn,
            Preprocessed,
            Running,
            RunDone,
            Postprocessed,
            JobFinished,
        ];
        for w in path.windows(2) {
            check_transition(w[0], w[1], Actor::System).unwrap();
        }
    }

    #[test]
    fn illegal_transitions_name_both_states() {
        let err = check_transition(State::Created, State::Running, Actor::System).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("CREATED") && msg.contains("RUNNING"), "{msg}");
        assert!(check_transition(State::JobFinished, State::Running, Actor::System).is_err());
        assert!(check_transition(State::Failed, State::RestartReady, Actor::System).is_err());
        assert!(check_transition(State::RunError, State::RunDone, Actor::System).is_err());
    }

    #[test]
    fn users_may_set_anything_but_leave_user_killed() {
        for to in ALL_STATES {
            check_transition(State::JobFinished, to, Actor::User).unwrap();
            assert!(check_transition(State::UserKilled, to, Actor::User).is_err());
        }
    }

    #[test]
    fn end_states_are_final_for_the_system() {
        for from in END_STATES {
            for to in ALL_STATES {
                assert!(!from.system_may_move_to(to), "{from} -> {to}");
            }
        }
    }
}
