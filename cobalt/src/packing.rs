//! The service's decision: given the runnable work, the launcher jobs already queued or running,
//! and the queue policy, which launcher jobs (if any) to submit now.
//!
//! A pure function, so that it can be tested case by case and its reasons shown to users as they
//! are. Work is measured in node-minutes: an MPI job costs `num_nodes × wall`, a single-node job
//! with node_packing_count `k` costs `wall / k` (k of them share a node). Launches already in a
//! queue cover what fits in them; only the rest asks for a new launch. For each queue that may
//! take a submission (submit-jobs on, below max-queued) and each of its windows, the smallest node
//! count whose launch finishes the remaining work within the window's longest wall time is chosen,
//! never fewer nodes than the largest job and never less time than the longest job plus the
//! margin. The launch that finishes everything with the fewest node-minutes wins; if none can,
//! the one that runs the most is submitted and the rest is planned again, while queues have room.
//! A window plans only for the jobs it can take, so jobs that need different windows each get a
//! launch; jobs that no window of the policy can take at all (too many nodes, too long) are set
//! aside, named in the reason, and never hold back a launch for the others.
//!
//! How long N nodes take is estimated from above, as the smaller of two bounds: running each kind
//! of job in rounds (a round of identical jobs fills every node slot; rounds run one after the
//! other), and total work / N plus the longest job (list scheduling's bound).

use std::collections::BTreeMap;

use crate::policy::{QueuePolicy, Window};
use crate::scheduler::{BatchJobState, BatchJobStatus};

/// Jobs of one shape waiting to run (the store can aggregate them with a GROUP BY).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunnableWork {
    /// Nodes each job needs.
    pub num_nodes: usize,
    /// Each job's expected wall time, minutes.
    pub wall_time_minutes: u64,
    /// How many such jobs share a node (single-node jobs only; 1 = a whole node each).
    pub node_packing_count: usize,
    /// How many jobs of this shape.
    pub count: usize,
}

impl RunnableWork {
    /// Node-minutes one job of this shape costs.
    pub fn job_node_minutes(&self) -> f64 {
        let wall = self.wall_time_minutes.max(1) as f64;
        if self.nodes() == 1 {
            wall / self.packing() as f64
        } else {
            self.nodes() as f64 * wall
        }
    }

    /// Node-minutes all jobs of this shape cost.
    pub fn node_minutes(&self) -> f64 {
        self.job_node_minutes() * self.count as f64
    }

    fn nodes(&self) -> usize {
        self.num_nodes.max(1)
    }

    fn packing(&self) -> usize {
        if self.nodes() == 1 {
            self.node_packing_count.max(1)
        } else {
            1
        }
    }
}

/// One of our launcher jobs already in a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveLaunch {
    /// Its queue.
    pub queue: String,
    /// Its nodes.
    pub nodes: usize,
    /// Wall minutes if queued, minutes remaining if running.
    pub minutes: u64,
    /// Its state (queued, running and exiting launches count against max-queued).
    pub state: BatchJobState,
}

impl ActiveLaunch {
    /// From a scheduler status line; None for jobs no longer in the queue (or in an unknown state).
    pub fn from_status(s: &BatchJobStatus) -> Option<ActiveLaunch> {
        let minutes = match s.state {
            BatchJobState::Queued => s.wall_minutes?,
            BatchJobState::Running => s.time_remaining_minutes.or(s.wall_minutes)?,
            BatchJobState::Exiting => 0,
            _ => return None,
        };
        Some(ActiveLaunch {
            queue: s.queue.clone(),
            nodes: s.nodes.unwrap_or(0),
            minutes,
            state: s.state.clone(),
        })
    }
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct PackingInput<'a> {
    /// Runnable jobs not yet covered by a launch, grouped by shape.
    pub work: &'a [RunnableWork],
    /// Our launcher jobs queued or running now.
    pub launches: &'a [ActiveLaunch],
    /// The queue policy.
    pub policy: &'a QueuePolicy,
    /// Node-minutes covered by other means (e.g. launchers running outside any listed launch).
    pub covered_node_minutes: f64,
    /// Minutes at the end of a launch the launcher does not use (templates stop it 2 minutes
    /// early); a job must fit in wall − margin.
    pub margin_minutes: u64,
}

/// What the service should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Submit a launcher job.
    Submit {
        /// Queue to submit to.
        queue: String,
        /// Nodes to ask for.
        nodes: usize,
        /// Wall time to ask for, minutes.
        minutes: u64,
        /// Why, in words shown to users and logged.
        reason: String,
    },
    /// Submit nothing.
    Nothing {
        /// Why, in words shown to users and logged.
        reason: String,
    },
}

/// Decides which launches to submit. Returns one `Nothing`, or one or more `Submit`s.
pub fn decide(input: &PackingInput<'_>) -> Vec<Decision> {
    let groups: Vec<Group> = input
        .work
        .iter()
        .filter(|w| w.count > 0)
        .map(|w| Group {
            nodes: w.nodes(),
            wall: w.wall_time_minutes.max(1),
            packing: w.packing(),
            job_cost: w.job_node_minutes(),
            left: w.node_minutes(),
            count: w.count,
        })
        .collect();
    let job_count: usize = input.work.iter().map(|w| w.count).sum();
    if groups.is_empty() {
        return vec![Decision::Nothing {
            reason: "no runnable jobs: nothing to submit".into(),
        }];
    }
    let need: f64 = groups.iter().map(|g| g.left).sum();
    let largest = groups.iter().map(|g| g.nodes).max().unwrap_or(1);
    let longest = groups.iter().map(|g| g.wall).max().unwrap_or(1);
    let margin = input.margin_minutes;

    // Jobs that no window of any queue can take would block every launch for the others: they
    // are set aside, and the decision says so.
    let windows: Vec<&Window> = input
        .policy
        .queues
        .iter()
        .flat_map(|q| q.windows.iter())
        .collect();
    let (mut groups, skipped): (Vec<Group>, Vec<Group>) = groups
        .into_iter()
        .partition(|g| windows.iter().any(|w| fits(g, w, margin)));
    let summary = format!(
        "{} {} {} node-minutes",
        plural(job_count, "runnable job", "runnable jobs"),
        if job_count == 1 { "needs" } else { "need" },
        fmt_nm(need)
    );
    let summary = if skipped.is_empty() {
        summary
    } else {
        format!(
            "{summary}{}; {}",
            shape(largest, longest),
            describe_skipped(&skipped, &windows, margin)
        )
    };
    // The shape is said once: with the skipped jobs, or before the plan.
    let shape_once = |largest: usize, longest: u64| {
        if skipped.is_empty() {
            shape(largest, longest)
        } else {
            String::new()
        }
    };

    // What the launches already in queues cover. Big jobs first: they fit fewer launches.
    groups.sort_by(|a, b| b.nodes.cmp(&a.nodes).then(b.wall.cmp(&a.wall)));
    let mut capacity_total = 0.0;
    for launch in input.launches {
        let usable = launch.minutes.saturating_sub(margin);
        if launch.state == BatchJobState::Exiting || usable == 0 || launch.nodes == 0 {
            continue;
        }
        let mut cap = launch.nodes as f64 * usable as f64;
        capacity_total += cap;
        for g in groups.iter_mut() {
            if g.nodes <= launch.nodes && g.wall <= usable && cap > 0.0 {
                let take = g.left.min(cap);
                g.left -= take;
                cap -= take;
            }
        }
    }
    let mut other_cover = input.covered_node_minutes.max(0.0);
    for g in groups.iter_mut().rev() {
        let take = g.left.min(other_cover);
        g.left -= take;
        other_cover -= take;
    }
    groups.retain(|g| g.left > 1e-9);

    let coverage = describe_coverage(input, capacity_total);

    if groups.is_empty() {
        return vec![Decision::Nothing {
            reason: format!("{summary}; {coverage}: nothing to submit"),
        }];
    }
    let largest = groups.iter().map(|g| g.nodes).max().unwrap_or(1);
    let longest = groups.iter().map(|g| g.wall).max().unwrap_or(1);

    // Room in each queue.
    let mut in_queue: BTreeMap<&str, usize> = BTreeMap::new();
    for l in input.launches.iter().filter(|l| l.state.is_active()) {
        *in_queue.entry(l.queue.as_str()).or_default() += 1;
    }
    let mut slots: Vec<usize> = input
        .policy
        .queues
        .iter()
        .map(|q| {
            q.max_queued
                .saturating_sub(in_queue.get(q.name.as_str()).copied().unwrap_or(0))
        })
        .collect();

    let mut decisions = Vec::new();
    let mut refusals: Vec<String> = Vec::new();
    for _ in 0..1000 {
        let remaining: f64 = groups.iter().map(|g| g.left).sum();
        if remaining <= 1e-9 {
            break;
        }
        let mut best: Option<(Plan, usize)> = None;
        refusals.clear();
        for (qi, q) in input.policy.queues.iter().enumerate() {
            if !q.submit_jobs {
                refusals.push(format!("{}: submit-jobs is off", q.name));
                continue;
            }
            if slots[qi] == 0 {
                let n = in_queue.get(q.name.as_str()).copied().unwrap_or(0)
                    + decisions_in(&decisions, &q.name);
                refusals.push(format!(
                    "{}: max-queued {} reached ({} of our launches queued or running)",
                    q.name, q.max_queued, n
                ));
                continue;
            }
            for w in &q.windows {
                match plan(&groups, w, margin) {
                    Ok(p) => {
                        if best.as_ref().is_none_or(|(b, _)| p.better_than(b)) {
                            best = Some((p, qi));
                        }
                    }
                    Err(why) => refusals.push(format!("{}: {why}", q.name)),
                }
            }
        }
        let Some((p, qi)) = best else { break };
        let q = &input.policy.queues[qi];
        slots[qi] -= 1;
        let w = p.window;
        let continued = if decisions.is_empty() {
            ""
        } else {
            " (continued)"
        };
        let reason = if p.finishes || p.capacity + 1e-9 >= remaining {
            format!(
                "{summary}{}; {coverage}; submitting {} nodes x {} min to {} (window {}-{} nodes, {}-{} min) to run the remaining {} node-minutes{continued}",
                shape_once(largest, longest),
                p.nodes,
                p.minutes,
                q.name,
                w.min_nodes,
                w.max_nodes,
                w.min_minutes,
                w.max_minutes,
                fmt_nm(remaining),
            )
        } else if p.finishes_part {
            format!(
                "{summary}{}; {coverage}; submitting {} nodes x {} min to {} (window {}-{} nodes, {}-{} min) to run the {} node-minutes of the jobs that window can take, of the remaining {}{continued}",
                shape_once(largest, longest),
                p.nodes,
                p.minutes,
                q.name,
                w.min_nodes,
                w.max_nodes,
                w.min_minutes,
                w.max_minutes,
                fmt_nm(p.covered()),
                fmt_nm(remaining),
            )
        } else {
            format!(
                "{summary}{}; {coverage}; submitting the largest launch {} allows, {} nodes x {} min (window {}-{} nodes, {}-{} min): it covers about {} of the remaining {} node-minutes",
                shape_once(largest, longest),
                q.name,
                p.nodes,
                p.minutes,
                w.min_nodes,
                w.max_nodes,
                w.min_minutes,
                w.max_minutes,
                fmt_nm(p.covered()),
                fmt_nm(remaining),
            )
        };
        decisions.push(Decision::Submit {
            queue: q.name.clone(),
            nodes: p.nodes,
            minutes: p.minutes,
            reason,
        });
        if p.finishes {
            groups.clear();
        } else if p.finishes_part {
            groups.retain(|g| !fits(g, &w, margin));
        } else {
            let mut cap = p.capacity;
            for g in groups.iter_mut() {
                if fits(g, &w, margin) && g.nodes <= p.nodes && g.wall + margin <= p.minutes {
                    let take = g.left.min(cap);
                    g.left -= take;
                    cap -= take;
                }
            }
            groups.retain(|g| g.left > 1e-9);
        }
    }

    if decisions.is_empty() {
        let why = if refusals.is_empty() {
            "the policy lists no queues".to_string()
        } else {
            refusals.join("; ")
        };
        return vec![Decision::Nothing {
            reason: format!(
                "{summary}{}; {coverage}; no queue can take a launch now: {why}",
                shape_once(largest, longest)
            ),
        }];
    }
    decisions
}

/// Whether a launch in window `w` can run jobs of group `g` at all.
fn fits(g: &Group, w: &Window, margin: u64) -> bool {
    g.nodes <= w.max_nodes && (g.wall + margin).max(w.min_minutes).max(margin + 1) <= w.max_minutes
}

/// `skipping 1 job that no policy window can take (600 nodes x 10 min; ...)`.
fn describe_skipped(skipped: &[Group], windows: &[&Window], margin: u64) -> String {
    let count: usize = skipped.iter().map(|g| g.count).sum();
    let shapes: Vec<String> = skipped
        .iter()
        .map(|g| {
            format!(
                "{} of {} x {} min",
                plural(g.count, "job", "jobs"),
                plural(g.nodes, "node", "nodes"),
                g.wall
            )
        })
        .collect();
    let limits = match (
        windows.iter().map(|w| w.max_nodes).max(),
        windows.iter().map(|w| w.max_minutes).max(),
    ) {
        (Some(n), Some(m)) => format!(
            "the policy's windows allow at most {} and {m} min, {margin} min of which the launcher keeps free",
            plural(n, "node", "nodes")
        ),
        _ => "the policy lists no windows".to_string(),
    };
    format!(
        "skipping {} that no policy window can take ({}; {limits}): change {} or the queue policy",
        plural(count, "job", "jobs"),
        shapes.join(", "),
        if count == 1 { "that job" } else { "those jobs" }
    )
}

/// A shape of runnable work with the node-minutes not yet covered.
#[derive(Debug, Clone)]
struct Group {
    nodes: usize,
    wall: u64,
    packing: usize,
    job_cost: f64,
    left: f64,
    /// Jobs of this shape (for messages).
    count: usize,
}

/// A candidate launch in one window.
#[derive(Debug, Clone, Copy)]
struct Plan {
    window: Window,
    nodes: usize,
    minutes: u64,
    /// Node-minutes of work it can run (nodes × (minutes − margin)).
    capacity: f64,
    /// Node-minutes of the remaining work the window can take at all.
    takes: f64,
    /// Whether it runs all the remaining work.
    finishes: bool,
    /// Whether it runs all the work this window can take (not all there is: other jobs need
    /// another window).
    finishes_part: bool,
}

impl Plan {
    /// Node-minutes of the remaining work it runs.
    fn covered(&self) -> f64 {
        self.capacity.min(self.takes)
    }

    fn better_than(&self, other: &Plan) -> bool {
        match (self.finishes, other.finishes) {
            (true, false) => true,
            (false, true) => false,
            // Both finish: the smallest allocation, then the fewest nodes.
            (true, true) => {
                let (a, b) = (
                    self.nodes as u64 * self.minutes,
                    other.nodes as u64 * other.minutes,
                );
                a < b || (a == b && self.nodes < other.nodes)
            }
            // Neither: the one that covers the most, then the smallest allocation.
            (false, false) => {
                let (a, b) = (self.covered(), other.covered());
                a > b + 1e-9
                    || ((a - b).abs() <= 1e-9
                        && self.nodes as u64 * self.minutes < other.nodes as u64 * other.minutes)
            }
        }
    }
}

/// Estimated minutes `nodes` nodes take to run the groups (an upper bound; see module docs).
fn makespan(groups: &[&Group], nodes: usize) -> Option<f64> {
    let mut rounds_total = 0.0;
    let mut work = 0.0;
    let mut longest = 0u64;
    for g in groups {
        let lanes = (nodes / g.nodes) * g.packing;
        if lanes == 0 {
            return None;
        }
        let jobs = (g.left / g.job_cost - 1e-9).ceil().max(1.0);
        rounds_total += (jobs / lanes as f64).ceil() * g.wall as f64;
        work += g.left;
        longest = longest.max(g.wall);
    }
    let list_bound = work / nodes as f64 + longest as f64;
    Some(rounds_total.min(list_bound))
}

/// The launch this window would get for the jobs it can take, or why it can take none.
fn plan(all: &[Group], w: &Window, margin: u64) -> Result<Plan, String> {
    let groups: Vec<&Group> = all.iter().filter(|g| fits(g, w, margin)).collect();
    if groups.is_empty() {
        let largest = all.iter().map(|g| g.nodes).max().unwrap_or(1);
        let longest = all.iter().map(|g| g.wall).max().unwrap_or(1);
        if largest > w.max_nodes {
            return Err(format!(
                "the largest job needs {largest} nodes but the window allows at most {}",
                w.max_nodes
            ));
        }
        return Err(format!(
            "the longest job needs {longest} min + {margin} min margin but the window allows at most {} min",
            w.max_minutes
        ));
    }
    let largest = groups.iter().map(|g| g.nodes).max().unwrap_or(1);
    let longest = groups.iter().map(|g| g.wall).max().unwrap_or(1);
    let takes: f64 = groups.iter().map(|g| g.left).sum();
    let all_of_it = groups.len() == all.len();
    let min_minutes = (longest + margin).max(w.min_minutes).max(margin + 1);
    let lo = largest.max(w.min_nodes);
    let hi = w.max_nodes;
    let usable_max = (w.max_minutes - margin) as f64;
    let in_time = |n: usize| makespan(&groups, n).is_some_and(|t| t <= usable_max + 1e-9);
    // The makespan does not grow with more nodes: binary search for the fewest that finish.
    let nodes = if in_time(lo) {
        Some(lo)
    } else if !in_time(hi) {
        None
    } else {
        let (mut bad, mut good) = (lo, hi);
        while good - bad > 1 {
            let mid = bad + (good - bad) / 2;
            if in_time(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        Some(good)
    };
    match nodes {
        Some(n) => {
            let t = makespan(&groups, n).unwrap_or(usable_max);
            let minutes = ((t - 1e-9).ceil() as u64 + margin)
                .max(min_minutes)
                .min(w.max_minutes);
            Ok(Plan {
                window: *w,
                nodes: n,
                minutes,
                capacity: n as f64 * (minutes - margin) as f64,
                takes,
                finishes: all_of_it,
                finishes_part: !all_of_it,
            })
        }
        None => Ok(Plan {
            window: *w,
            nodes: hi,
            minutes: w.max_minutes,
            capacity: (hi as f64 * usable_max).min(takes),
            takes,
            finishes: false,
            finishes_part: false,
        }),
    }
}

fn decisions_in(decisions: &[Decision], queue: &str) -> usize {
    decisions
        .iter()
        .filter(|d| matches!(d, Decision::Submit { queue: q, .. } if q == queue))
        .count()
}

fn describe_coverage(input: &PackingInput<'_>, capacity: f64) -> String {
    let active: Vec<&ActiveLaunch> = input
        .launches
        .iter()
        .filter(|l| l.state.is_active())
        .collect();
    let mut parts = Vec::new();
    if !active.is_empty() {
        let queued = active.iter().any(|l| l.state == BatchJobState::Queued);
        let running = active.iter().any(|l| l.state != BatchJobState::Queued);
        let state = match (queued, running) {
            (true, false) => "queued",
            (false, _) => "running",
            (true, true) => "queued or running",
        };
        let mut queues: Vec<&str> = active.iter().map(|l| l.queue.as_str()).collect();
        queues.dedup();
        queues.sort();
        queues.dedup();
        parts.push(format!(
            "{} already {state} in {} {} {} node-minutes",
            plural(active.len(), "launch", "launches"),
            queues.join(", "),
            if active.len() == 1 { "covers" } else { "cover" },
            fmt_nm(capacity)
        ));
    }
    if input.covered_node_minutes > 0.0 {
        parts.push(format!(
            "{} node-minutes already covered by running launchers",
            fmt_nm(input.covered_node_minutes)
        ));
    }
    if parts.is_empty() {
        "no launch is queued or running".into()
    } else {
        parts.join("; ")
    }
}

fn shape(largest: usize, longest: u64) -> String {
    format!(
        " (largest {}, longest {} min)",
        plural(largest, "node", "nodes"),
        longest
    )
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Node-minutes for people: whole numbers as such, else one decimal.
fn fmt_nm(x: f64) -> String {
    let r = (x * 10.0).round() / 10.0;
    if (r - r.round()).abs() < 1e-9 {
        format!("{}", r.round() as i64)
    } else {
        format!("{r:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::QueueRule;

    fn serial(count: usize, wall: u64, packing: usize) -> RunnableWork {
        RunnableWork {
            num_nodes: 1,
            wall_time_minutes: wall,
            node_packing_count: packing,
            count,
        }
    }

    fn mpi(count: usize, nodes: usize, wall: u64) -> RunnableWork {
        RunnableWork {
            num_nodes: nodes,
            wall_time_minutes: wall,
            node_packing_count: 1,
            count,
        }
    }

    fn queue(name: &str, max_queued: usize, windows: &[(usize, usize, u64, u64)]) -> QueueRule {
        QueueRule {
            name: name.into(),
            submit_jobs: true,
            max_queued,
            windows: windows
                .iter()
                .map(|&(a, b, c, d)| Window {
                    min_nodes: a,
                    max_nodes: b,
                    min_minutes: c,
                    max_minutes: d,
                })
                .collect(),
        }
    }

    fn debug_policy() -> QueuePolicy {
        QueuePolicy {
            queues: vec![queue("debug", 1, &[(1, 8, 0, 60)])],
        }
    }

    fn launch(queue: &str, nodes: usize, minutes: u64, state: BatchJobState) -> ActiveLaunch {
        ActiveLaunch {
            queue: queue.into(),
            nodes,
            minutes,
            state,
        }
    }

    fn run(
        work: &[RunnableWork],
        launches: &[ActiveLaunch],
        policy: &QueuePolicy,
    ) -> Vec<Decision> {
        decide(&PackingInput {
            work,
            launches,
            policy,
            covered_node_minutes: 0.0,
            margin_minutes: 2,
        })
    }

    fn submits(d: &[Decision]) -> Vec<(String, usize, u64)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Submit {
                    queue,
                    nodes,
                    minutes,
                    ..
                } => Some((queue.clone(), *nodes, *minutes)),
                _ => None,
            })
            .collect()
    }

    fn nothing(d: &[Decision]) -> String {
        match d {
            [Decision::Nothing { reason }] => reason.clone(),
            other => panic!("expected Nothing, got {other:#?}"),
        }
    }

    #[test]
    fn costs() {
        assert_eq!(serial(1, 10, 4).job_node_minutes(), 2.5);
        assert_eq!(serial(3, 10, 4).node_minutes(), 7.5);
        assert_eq!(mpi(2, 8, 30).node_minutes(), 480.0);
        // Packing applies to single-node jobs only.
        let m = RunnableWork {
            num_nodes: 2,
            wall_time_minutes: 10,
            node_packing_count: 4,
            count: 1,
        };
        assert_eq!(m.node_minutes(), 20.0);
        // Zero wall time counts as one minute (legacy default is 1).
        assert_eq!(serial(1, 0, 1).node_minutes(), 1.0);
    }

    #[test]
    fn nothing_runnable() {
        let r = nothing(&run(&[], &[], &debug_policy()));
        assert_eq!(r, "no runnable jobs: nothing to submit");
        let r = nothing(&run(&[serial(0, 10, 1)], &[], &debug_policy()));
        assert_eq!(r, "no runnable jobs: nothing to submit");
    }

    #[test]
    fn covered_by_queued_launch_message() {
        // 42 jobs of 3 min, 2 per node: 63 node-minutes; a queued 2-node 42-min launch gives
        // 2 x (42 - 2) = 80.
        let d = run(
            &[serial(42, 3, 2)],
            &[launch("debug", 2, 42, BatchJobState::Queued)],
            &debug_policy(),
        );
        assert_eq!(
            nothing(&d),
            "42 runnable jobs need 63 node-minutes; 1 launch already queued in debug covers 80 node-minutes: nothing to submit"
        );
    }

    #[test]
    fn small_serial_work_gets_one_node() {
        let d = run(&[serial(3, 10, 1)], &[], &debug_policy());
        assert_eq!(submits(&d), vec![("debug".into(), 1, 32)]);
        let Decision::Submit { reason, .. } = &d[0] else {
            unreachable!()
        };
        assert_eq!(
            reason,
            "3 runnable jobs need 30 node-minutes (largest 1 node, longest 10 min); no launch is queued or running; submitting 1 nodes x 32 min to debug (window 1-8 nodes, 0-60 min) to run the remaining 30 node-minutes"
        );
    }

    #[test]
    fn packed_serial_work_uses_the_fewest_nodes_that_finish() {
        // 1000 jobs x 10 min, 64 per node: 156.25 node-minutes. 1 node needs 16 rounds (160 min),
        // 3 nodes 6 rounds (60 > 58 usable), 4 nodes 4 rounds (40 min).
        let d = run(&[serial(1000, 10, 64)], &[], &debug_policy());
        assert_eq!(submits(&d), vec![("debug".into(), 4, 42)]);
    }

    #[test]
    fn size_at_least_largest_job_and_time_at_least_longest() {
        let d = run(&[mpi(1, 6, 20), serial(2, 45, 1)], &[], &debug_policy());
        let s = submits(&d);
        assert_eq!(s.len(), 1);
        let (_, nodes, minutes) = &s[0];
        assert!(*nodes >= 6, "{s:?}");
        assert!(*minutes >= 47, "{s:?}");
        assert!(*minutes <= 60, "{s:?}");
    }

    #[test]
    fn window_minimums_are_respected() {
        let policy = QueuePolicy {
            queues: vec![queue("default", 20, &[(128, 255, 30, 180)])],
        };
        let d = run(&[serial(10, 5, 1)], &[], &policy);
        assert_eq!(submits(&d), vec![("default".into(), 128, 30)]);
    }

    #[test]
    fn job_too_big_for_every_queue() {
        let d = run(&[mpi(1, 600, 10)], &[], &debug_policy());
        assert_eq!(
            nothing(&d),
            "1 runnable job needs 6000 node-minutes (largest 600 nodes, longest 10 min); \
             skipping 1 job that no policy window can take (1 job of 600 nodes x 10 min; the \
             policy's windows allow at most 8 nodes and 60 min, 2 min of which the launcher keeps \
             free): change that job or the queue policy; no launch is queued or running: nothing \
             to submit"
        );
    }

    #[test]
    fn job_too_long_for_every_queue() {
        let r = nothing(&run(&[serial(1, 59, 1)], &[], &debug_policy()));
        assert!(
            r.contains("skipping 1 job that no policy window can take (1 job of 1 node x 59 min;"),
            "{r}"
        );
    }

    #[test]
    fn a_job_too_large_for_every_window_does_not_block_the_others() {
        // One 600-node job no window takes, and 3 one-node jobs of 10 min: a launch is sized
        // for the three, and its reason names the job left out.
        let d = run(&[mpi(1, 600, 10), serial(3, 10, 1)], &[], &debug_policy());
        assert_eq!(submits(&d), vec![("debug".into(), 1, 32)], "{d:#?}");
        let Decision::Submit { reason, .. } = &d[0] else {
            unreachable!()
        };
        assert_eq!(
            reason,
            "4 runnable jobs need 6030 node-minutes (largest 600 nodes, longest 10 min); skipping \
             1 job that no policy window can take (1 job of 600 nodes x 10 min; the policy's \
             windows allow at most 8 nodes and 60 min, 2 min of which the launcher keeps free): \
             change that job or the queue policy; no launch is queued or running; submitting 1 \
             nodes x 32 min to debug (window 1-8 nodes, 0-60 min) to run the remaining 30 \
             node-minutes"
        );
        // A queued launch that covers the others: nothing more, and the skip is still said.
        let r = nothing(&run(
            &[mpi(1, 600, 10), serial(3, 10, 1)],
            &[launch("debug", 1, 32, BatchJobState::Queued)],
            &debug_policy(),
        ));
        assert!(
            r.contains("skipping 1 job that no policy window can take"),
            "{r}"
        );
        assert!(r.ends_with(": nothing to submit"), "{r}");
    }

    #[test]
    fn jobs_that_need_different_windows_each_get_a_launch() {
        // A 100-node job only the big queue takes, and a 59-minute serial job only the long
        // debug window takes: one launch in each queue, neither blocked by the other.
        let policy = QueuePolicy {
            queues: vec![
                queue("big", 1, &[(64, 128, 0, 30)]),
                queue("debug", 1, &[(1, 8, 0, 120)]),
            ],
        };
        let d = run(&[mpi(1, 100, 20), serial(1, 59, 1)], &[], &policy);
        let mut s = submits(&d);
        s.sort();
        assert_eq!(
            s,
            vec![("big".into(), 100, 22), ("debug".into(), 1, 61)],
            "{d:#?}"
        );
    }

    #[test]
    fn submit_jobs_off_and_max_queued() {
        let mut policy = debug_policy();
        policy.queues[0].submit_jobs = false;
        let r = nothing(&run(&[serial(5, 10, 1)], &[], &policy));
        assert!(
            r.ends_with("no queue can take a launch now: debug: submit-jobs is off"),
            "{r}"
        );

        // A queued launch too small for the 16-node job fills debug's only slot.
        let policy = QueuePolicy {
            queues: vec![queue("debug", 1, &[(1, 16, 0, 60)])],
        };
        let r = nothing(&run(
            &[mpi(1, 16, 10)],
            &[launch("debug", 2, 30, BatchJobState::Queued)],
            &policy,
        ));
        assert!(
            r.contains("debug: max-queued 1 reached (1 of our launches queued or running)"),
            "{r}"
        );
        assert!(
            r.contains("1 launch already queued in debug covers 56 node-minutes"),
            "{r}"
        );
    }

    #[test]
    fn partial_coverage_submits_the_rest() {
        // 200 node-minutes of 1-node 10-min jobs; a running 1-node launch has 52 min left (50
        // usable): 150 remain.
        let policy = QueuePolicy {
            queues: vec![queue("debug", 2, &[(1, 8, 0, 60)])],
        };
        let d = run(
            &[serial(20, 10, 1)],
            &[launch("debug", 1, 52, BatchJobState::Running)],
            &policy,
        );
        let s = submits(&d);
        assert_eq!(s.len(), 1, "{d:#?}");
        let (_, nodes, minutes) = s[0].clone();
        assert!(nodes as f64 * (minutes - 2) as f64 >= 150.0, "{s:?}");
        let Decision::Submit { reason, .. } = &d[0] else {
            unreachable!()
        };
        assert!(
            reason.contains("1 launch already running in debug covers 50 node-minutes"),
            "{reason}"
        );
        assert!(
            reason.contains("the remaining 150 node-minutes"),
            "{reason}"
        );
    }

    #[test]
    fn more_work_than_one_launch_uses_free_slots() {
        // 8 nodes x 58 usable min = 464 per launch; 100 one-node 30-min jobs = 3000 node-minutes.
        let policy = QueuePolicy {
            queues: vec![queue("debug", 3, &[(1, 8, 0, 60)])],
        };
        let d = run(&[serial(100, 30, 1)], &[], &policy);
        let s = submits(&d);
        assert_eq!(s.len(), 3, "{d:#?}");
        assert!(
            s.iter()
                .all(|(q, n, m)| q == "debug" && *n == 8 && *m == 60),
            "{s:?}"
        );
        let Decision::Submit { reason, .. } = &d[0] else {
            unreachable!()
        };
        assert!(
            reason.contains("submitting the largest launch debug allows"),
            "{reason}"
        );
    }

    #[test]
    fn prefers_the_queue_with_the_smallest_allocation() {
        let policy = QueuePolicy {
            queues: vec![
                queue("default", 20, &[(128, 255, 30, 180)]),
                queue("debug", 1, &[(1, 8, 0, 60)]),
            ],
        };
        let d = run(&[serial(4, 10, 1)], &[], &policy);
        assert_eq!(submits(&d), vec![("debug".into(), 1, 42)]);
        // Too much for debug within its hour: the production queue finishes it, with the fewest
        // nodes that run 1000 half-hour jobs in at most 178 usable minutes (5 rounds: 200 nodes).
        let d = run(&[serial(1000, 30, 1)], &[], &policy);
        assert_eq!(submits(&d), vec![("default".into(), 200, 152)]);
    }

    #[test]
    fn several_windows_pick_the_one_that_fits() {
        let policy = QueuePolicy {
            queues: vec![queue(
                "default",
                20,
                &[
                    (128, 255, 30, 180),
                    (256, 383, 30, 360),
                    (802, 4392, 30, 1440),
                ],
            )],
        };
        let d = run(&[mpi(1, 300, 200)], &[], &policy);
        assert_eq!(submits(&d), vec![("default".into(), 300, 202)]);
        let d = run(&[mpi(2, 1000, 60)], &[], &policy);
        assert_eq!(submits(&d), vec![("default".into(), 1000, 122)]);
    }

    #[test]
    fn other_coverage_counts() {
        let policy = debug_policy();
        let d = decide(&PackingInput {
            work: &[serial(10, 10, 1)],
            launches: &[],
            policy: &policy,
            covered_node_minutes: 100.0,
            margin_minutes: 2,
        });
        let r = nothing(&d);
        assert_eq!(
            r,
            "10 runnable jobs need 100 node-minutes; 100 node-minutes already covered by running launchers: nothing to submit"
        );
    }

    #[test]
    fn exiting_launch_covers_nothing_but_holds_a_slot() {
        let d = run(
            &[serial(1, 10, 1)],
            &[launch("debug", 8, 0, BatchJobState::Exiting)],
            &debug_policy(),
        );
        let r = nothing(&d);
        assert!(r.contains("max-queued 1 reached"), "{r}");
    }

    #[test]
    fn active_launch_from_status() {
        let s = BatchJobStatus {
            scheduler_id: "1".into(),
            state: BatchJobState::Running,
            raw_state: "running".into(),
            nodes: Some(4),
            wall_minutes: Some(60),
            time_remaining_minutes: Some(12),
            queue: "debug".into(),
            project: String::new(),
            name: String::new(),
        };
        assert_eq!(
            ActiveLaunch::from_status(&s),
            Some(launch("debug", 4, 12, BatchJobState::Running))
        );
        let mut q = s.clone();
        q.state = BatchJobState::Queued;
        assert_eq!(ActiveLaunch::from_status(&q).unwrap().minutes, 60);
        let mut f = s.clone();
        f.state = BatchJobState::Finished;
        assert_eq!(ActiveLaunch::from_status(&f), None);
    }

    #[test]
    fn fractional_node_minutes_are_readable() {
        assert_eq!(fmt_nm(156.25), "156.3");
        assert_eq!(fmt_nm(63.0), "63");
        assert_eq!(fmt_nm(0.04), "0");
    }
}
