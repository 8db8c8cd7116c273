//! When a launcher with nothing in hand stops: a pure decision on what could still arrive for it.
//!
//! - `--persistent`: never on its own.
//! - Jobs it can run, or jobs on their way to being runnable (its transitions take them): it
//!   waits for them — they are coming.
//! - Jobs held by other live launcher sessions: they may finish and wake children, add jobs, or
//!   come back if that launcher dies (at once when it ran on this host, else when its lease
//!   expires, LEASE_EXPIRY_SECONDS after its last heartbeat). It waits while they hold them.
//! - A live service (which may bring new work forward): it waits `--idle-exit-seconds`.
//! - Nothing else can arrive: it exits at once.
//!
//! Runnable jobs this launcher cannot run (too long for its time left, too many nodes, another
//! job mode) are not waited for; they are named, with why, on stderr.

use std::time::Duration;

use balsam_store::RunnableGroup;

/// Another live session that holds jobs this launcher could run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherSession {
    /// Its session id.
    pub id: i64,
    /// Its host.
    pub host: String,
    /// Since its last heartbeat.
    pub silent_for: Duration,
}

/// What this launcher can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Its job mode.
    pub job_mode: crate::config::JobMode,
    /// Its nodes.
    pub nodes: u32,
    /// Until its time limit (None: no limit).
    pub time_left: Option<Duration>,
}

impl Capabilities {
    /// Why this launcher cannot run jobs of `shape`; None when it can.
    pub fn why_not(&self, shape: &RunnableGroup) -> Option<String> {
        use crate::config::JobMode;
        if shape.nodes_needed > self.nodes {
            return Some(format!(
                "they need {} nodes and this launcher has {}",
                shape.nodes_needed, self.nodes
            ));
        }
        if !shape.serial && self.job_mode == JobMode::Serial {
            return Some(
                "they are MPI jobs (several nodes or ranks) and this launcher runs serial jobs only (--job-mode serial)"
                    .into(),
            );
        }
        if !crate::scheduler::fits_time(shape.wall_time_minutes, self.time_left) {
            let left = self.time_left.unwrap_or_default().as_secs_f64() / 60.0;
            return Some(format!(
                "their wall_time_minutes ({}) is more than the {left:.1} minutes left before this launcher's time limit",
                shape.wall_time_minutes
            ));
        }
        None
    }
}

/// The runnable jobs a launcher cannot run, in lines for the user: how many, an example, why.
pub fn explain_not_here(shapes: &[RunnableGroup], caps: &Capabilities) -> Vec<String> {
    shapes
        .iter()
        .filter_map(|s| {
            caps.why_not(s).map(|why| {
                format!(
                    "{} {} (e.g. {}): {why}",
                    s.count,
                    if s.count == 1 {
                        "runnable job"
                    } else {
                        "runnable jobs"
                    },
                    s.example
                )
            })
        })
        .collect()
}

/// What could still arrive for this launcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdleFacts {
    /// Runnable jobs nobody holds that this launcher cannot run, with why (see
    /// [`explain_not_here`]): said on stderr, not waited for.
    pub not_here: Vec<String>,
    /// Runnable jobs nobody holds that this launcher can run.
    pub runnable_here: u64,
    /// Jobs nobody holds on their way to being runnable (CREATED, READY, STAGED_IN, and runs
    /// waiting for postprocessing or a handler).
    pub on_their_way: u64,
    /// Jobs waiting for their parents.
    pub awaiting_parents: u64,
    /// Jobs of this launcher's workflow filter that other live sessions hold.
    pub held_by_others: u64,
    /// Those sessions.
    pub others: Vec<OtherSession>,
    /// A service session is live.
    pub service: bool,
}

/// What an idle launcher waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// `--persistent`.
    Persistent,
    /// Jobs coming to it (runnable, or on their way).
    WorkComing,
    /// Jobs other launchers hold.
    OtherLaunchers,
    /// A live service.
    Service,
}

impl WaitKind {
    /// Whether the wait is worth a line on stderr (a user may wonder why the launcher stays).
    pub fn tell_user(self) -> bool {
        matches!(self, WaitKind::OtherLaunchers | WaitKind::Service)
    }
}

impl std::fmt::Display for WaitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WaitKind::Persistent => "persistent",
            WaitKind::WorkComing => "work coming",
            WaitKind::OtherLaunchers => "other launchers",
            WaitKind::Service => "service",
        })
    }
}

/// What the idle launcher does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdleDecision {
    /// Wait; `at_most` bounds the wait (None: as long as the reason holds).
    Wait {
        /// What for.
        kind: WaitKind,
        /// Why, in words for the log and stderr.
        why: String,
        /// Longest wait from the start of the idle time, if bounded.
        at_most: Option<Duration>,
    },
    /// Exit now.
    Exit {
        /// Why, in words.
        why: String,
    },
}

/// The launcher's settings the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleRules {
    /// `--persistent`.
    pub persistent: bool,
    /// `--idle-exit-seconds`: the wait when only a service could bring work.
    pub idle_exit: Duration,
    /// LEASE_EXPIRY_SECONDS.
    pub lease_expiry: Duration,
}

/// Decides, for a launcher idle for `idle_for` with nothing in hand.
pub fn decide_idle(facts: &IdleFacts, idle_for: Duration, rules: &IdleRules) -> IdleDecision {
    if rules.persistent {
        return IdleDecision::Wait {
            kind: WaitKind::Persistent,
            why: "--persistent: waiting for new jobs".into(),
            at_most: None,
        };
    }
    if facts.runnable_here > 0 || facts.on_their_way > 0 {
        return IdleDecision::Wait {
            kind: WaitKind::WorkComing,
            why: format!(
                "{} runnable and {} jobs on their way to runnable are coming to this launcher",
                facts.runnable_here, facts.on_their_way
            ),
            at_most: None,
        };
    }
    if facts.held_by_others > 0 {
        let jobs = facts.held_by_others;
        let who: Vec<String> = facts
            .others
            .iter()
            .map(|o| {
                let comes_back = if o.silent_for >= rules.lease_expiry {
                    "its lease expires now".to_string()
                } else {
                    format!(
                        "its jobs come back in {} s if it stays silent",
                        (rules.lease_expiry - o.silent_for).as_secs()
                    )
                };
                format!(
                    "session {} on {} (last heartbeat {} s ago; {comes_back})",
                    o.id,
                    o.host,
                    o.silent_for.as_secs()
                )
            })
            .collect();
        let parents = if facts.awaiting_parents > 0 {
            format!(", and {} jobs await their parents", facts.awaiting_parents)
        } else {
            String::new()
        };
        return IdleDecision::Wait {
            kind: WaitKind::OtherLaunchers,
            why: format!(
                "waiting while other launchers hold {jobs} jobs of this workflow filter{parents}: they may finish, add jobs, or come back: {}",
                who.join("; ")
            ),
            at_most: None,
        };
    }
    if facts.service {
        if idle_for < rules.idle_exit {
            return IdleDecision::Wait {
                kind: WaitKind::Service,
                why: format!(
                    "a service is running and may bring new work: waiting {:.0} s (--idle-exit-seconds)",
                    rules.idle_exit.as_secs_f64()
                ),
                at_most: Some(rules.idle_exit),
            };
        }
        return IdleDecision::Exit {
            why: format!(
                "no work for this launcher for {:.0} s (--idle-exit-seconds) while a service runs",
                idle_for.as_secs_f64()
            ),
        };
    }
    let mut why = "no work left for this launcher: nothing runnable or on its way, no other launcher holds jobs of its filter, no service".to_string();
    if facts.awaiting_parents > 0 {
        why.push_str(&format!(
            "; {} jobs await parents that will not finish",
            facts.awaiting_parents
        ));
    }
    IdleDecision::Exit { why }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: IdleRules = IdleRules {
        persistent: false,
        idle_exit: Duration::from_secs(10),
        lease_expiry: Duration::from_secs(180),
    };

    fn exits(d: &IdleDecision) -> bool {
        matches!(d, IdleDecision::Exit { .. })
    }

    #[test]
    fn nothing_can_arrive_exit_at_once() {
        let d = decide_idle(&IdleFacts::default(), Duration::ZERO, &RULES);
        assert!(exits(&d), "{d:?}");
    }

    #[test]
    fn persistent_never_exits() {
        let rules = IdleRules {
            persistent: true,
            ..RULES
        };
        let d = decide_idle(&IdleFacts::default(), Duration::from_secs(1 << 20), &rules);
        assert!(!exits(&d));
    }

    #[test]
    fn work_on_its_way_is_waited_for() {
        for facts in [
            IdleFacts {
                runnable_here: 3,
                ..IdleFacts::default()
            },
            IdleFacts {
                on_their_way: 1,
                ..IdleFacts::default()
            },
        ] {
            let d = decide_idle(&facts, Duration::from_secs(3600), &RULES);
            assert!(
                matches!(d, IdleDecision::Wait { at_most: None, .. }),
                "{d:?}"
            );
        }
    }

    #[test]
    fn jobs_held_by_another_launcher_are_waited_for_until_they_come_back() {
        let facts = IdleFacts {
            awaiting_parents: 4,
            held_by_others: 178,
            others: vec![OtherSession {
                id: 7,
                host: "nid00012".into(),
                silent_for: Duration::from_secs(40),
            }],
            ..IdleFacts::default()
        };
        // Long past --idle-exit-seconds: still waiting, and saying why.
        let d = decide_idle(&facts, Duration::from_secs(600), &RULES);
        let IdleDecision::Wait { why, at_most, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(at_most, None);
        for want in [
            "178 jobs",
            "session 7 on nid00012",
            "40 s ago",
            "in 140 s",
            "4 jobs await",
        ] {
            assert!(why.contains(want), "{want:?} not in {why}");
        }
    }

    #[test]
    fn a_service_is_given_the_idle_time() {
        let facts = IdleFacts {
            service: true,
            ..IdleFacts::default()
        };
        let d = decide_idle(&facts, Duration::from_secs(2), &RULES);
        assert!(
            matches!(d, IdleDecision::Wait { at_most: Some(t), .. } if t == RULES.idle_exit),
            "{d:?}"
        );
        assert!(exits(&decide_idle(&facts, Duration::from_secs(10), &RULES)));
    }

    #[test]
    fn runnable_jobs_a_launcher_cannot_run_are_named_with_why() {
        use crate::config::JobMode;
        let caps = Capabilities {
            job_mode: JobMode::Serial,
            nodes: 2,
            time_left: Some(Duration::from_secs(6)),
        };
        let shape = |serial, nodes, _rpn: u32, wall, example: &str| RunnableGroup {
            serial,
            nodes_needed: nodes,
            wall_time_minutes: wall,
            count: 3,
            example: example.into(),
        };
        let lines = explain_not_here(
            &[
                shape(true, 1, 1, 1, "ok | 00000001"),
                shape(true, 1, 1, 5, "t4 | 00000002"),
                shape(false, 1, 2, 1, "m1 | 00000003"),
                shape(false, 4, 1, 1, "big | 00000004"),
            ],
            &caps,
        );
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains("t4 | 00000002")
                && lines[0].contains("wall_time_minutes (5)")
                && lines[0].contains("0.1 minutes left"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("m1") && lines[1].contains("--job-mode serial"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("need 4 nodes and this launcher has 2"),
            "{}",
            lines[2]
        );
        // A 1-minute job fits a 1-minute launcher.
        let one = Capabilities {
            time_left: Some(Duration::from_secs(59)),
            ..caps
        };
        assert_eq!(one.why_not(&shape(true, 1, 1, 1, "x")), None);
    }

    #[test]
    fn children_of_finished_work_alone_do_not_keep_a_launcher() {
        let facts = IdleFacts {
            awaiting_parents: 2,
            ..IdleFacts::default()
        };
        let d = decide_idle(&facts, Duration::ZERO, &RULES);
        let IdleDecision::Exit { why } = d else {
            panic!("{d:?}")
        };
        assert!(why.contains("2 jobs await parents"), "{why}");
    }
}
