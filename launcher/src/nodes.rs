//! Which nodes the launcher has, and which worker ranks run on each.
//!
//! Every worker rank reports its host at start ([`crate::messages::Message::Hello`]). The batch
//! system's node list comes from the allocation (`COBALT_PARTNAME` ranges such as
//! `1001-1005,1030` or `COBALT_NODEFILE`; `SLURM_JOB_NODELIST` such as `nid0[1-3,7]`;
//! `PBS_NODEFILE`), parsed by `balsam_cobalt`. Ranks are matched to the list by their index in it
//! when the batch system gives one (Slurm's `SLURM_NODEID`), else by host name (`nid01001`
//! matches Cobalt's `1001`). Nodes no worker runs on still serve MPI jobs.
//!
//! **Synthetic nodes.** Outside a batch job (or in a local "virtual node" allocation) there is no
//! node list, and on a workstation every rank shares one host. Then each worker rank is its own
//! node: it packs serial jobs by its own capacity and can be reserved whole for an MPI job, whose
//! launch command then names no hosts (everything runs on this machine). This is what makes a
//! 4-rank launcher on a laptop behave like a 3-node allocation, and what the tests rely on.

/// One node of the launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Host name as the MPI launcher takes it (Cobalt node ids stay plain integers).
    pub name: String,
    /// Worker ranks running on it.
    pub workers: Vec<i32>,
}

/// The launcher's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMap {
    /// The nodes, in allocation order.
    pub nodes: Vec<Node>,
    /// True when each worker rank stands for a node of its own (no batch node list).
    pub synthetic: bool,
    /// Where the list came from, for the log.
    pub source: String,
}

/// Whether two host names denote the same node: equal short names, or the same number when one
/// of them is a bare node id (`1001` and `nid01001`).
pub fn same_host(a: &str, b: &str) -> bool {
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_ascii_lowercase();
    let (a, b) = (short(a), short(b));
    if a == b {
        return true;
    }
    let number = |h: &str| -> Option<u64> {
        let digits: String = h.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() {
            return None;
        }
        digits.chars().rev().collect::<String>().parse().ok()
    };
    let bare = |h: &str| !h.is_empty() && h.chars().all(|c| c.is_ascii_digit());
    (bare(&a) || bare(&b)) && number(&a).is_some() && number(&a) == number(&b)
}

/// Maps worker ranks `(rank, host)` onto the batch node list, or makes synthetic nodes when there
/// is none. `master_host` is rank 0's host (the only node when there are no workers).
pub fn map_nodes(
    batch: Option<(&str, &[String])>,
    workers: &[(i32, String)],
    master_host: &str,
) -> NodeMap {
    match batch {
        Some((source, list)) if !list.is_empty() => {
            let mut nodes: Vec<Node> = list
                .iter()
                .map(|n| Node {
                    name: n.clone(),
                    workers: Vec::new(),
                })
                .collect();
            for (rank, host) in workers {
                match nodes.iter_mut().find(|n| same_host(&n.name, host)) {
                    Some(n) => n.workers.push(*rank),
                    None => {
                        tracing::warn!(
                            "worker rank {rank} runs on {host}, which is not in the {source} node list; using it as an extra node"
                        );
                        match nodes.iter_mut().find(|n| n.name == *host) {
                            Some(n) => n.workers.push(*rank),
                            None => nodes.push(Node {
                                name: host.clone(),
                                workers: vec![*rank],
                            }),
                        }
                    }
                }
            }
            NodeMap {
                nodes,
                synthetic: false,
                source: source.to_string(),
            }
        }
        _ => {
            let nodes = if workers.is_empty() {
                vec![Node {
                    name: master_host.to_string(),
                    workers: Vec::new(),
                }]
            } else {
                workers
                    .iter()
                    .map(|(r, h)| Node {
                        name: h.clone(),
                        workers: vec![*r],
                    })
                    .collect()
            };
            NodeMap {
                nodes,
                synthetic: true,
                source: "worker ranks (one synthetic node per worker)".into(),
            }
        }
    }
}

/// This process's index in the batch node list, when the batch system gives it: Slurm sets
/// `SLURM_NODEID` for every task of a step (and MPICH under Slurm keeps it right per rank).
/// Host names can differ from the node names Slurm lists, and then only the index places a rank.
pub fn batch_node_index() -> Option<u32> {
    std::env::var("SLURM_JOB_ID").ok()?;
    std::env::var("SLURM_NODEID").ok()?.trim().parse().ok()
}

/// The node a rank runs on: the batch list's entry at its index when known, else its host.
pub fn place(list: Option<&[String]>, host: &str, index: Option<u32>) -> String {
    match (list, index) {
        (Some(l), Some(i)) if (i as usize) < l.len() => l[i as usize].clone(),
        _ => host.to_string(),
    }
}

/// The batch allocation's node list and job id from the environment, if the launcher runs inside
/// one with a real node list. A local ("virtual nodes") allocation has none.
pub fn allocation_nodes() -> (
    Option<(String, Vec<String>)>,
    Option<balsam_cobalt::allocation::Allocation>,
) {
    match balsam_cobalt::allocation::Allocation::from_process_env() {
        Ok(Some(a)) => {
            let real = a.scheduler != balsam_cobalt::scheduler::SchedulerKind::Local;
            let list = real.then(|| (format!("{:?}", a.scheduler), a.nodes.clone()));
            (list, Some(a))
        }
        Ok(None) => (None, None),
        Err(e) => {
            tracing::warn!("cannot read the batch allocation from the environment: {e}; using the ranks' hosts");
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_cobalt_ids() {
        assert!(same_host("nid01001", "1001"));
        assert!(same_host("1001", "nid01001"));
        assert!(same_host("node3.cluster.org", "node3"));
        assert!(!same_host("nid01002", "1001"));
        assert!(!same_host("node3", "node13"));
        assert!(!same_host("a1", "b1"));
    }

    #[test]
    fn batch_list_maps_ranks_by_host() {
        let list: Vec<String> = ["1001", "1002", "1003"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let workers = vec![(1, "nid01001".to_string()), (2, "nid01003".to_string())];
        let m = map_nodes(Some(("Cobalt", &list)), &workers, "nid01001");
        assert!(!m.synthetic);
        assert_eq!(m.nodes.len(), 3);
        assert_eq!(m.nodes[0].workers, vec![1]);
        assert!(m.nodes[1].workers.is_empty());
        assert_eq!(m.nodes[2].workers, vec![2]);
    }

    #[test]
    fn without_a_list_each_worker_is_a_node() {
        let workers = vec![
            (1, "vm".to_string()),
            (2, "vm".to_string()),
            (3, "vm".to_string()),
        ];
        let m = map_nodes(None, &workers, "vm");
        assert!(m.synthetic);
        assert_eq!(m.nodes.len(), 3);
        assert_eq!(m.nodes[2].workers, vec![3]);
        let m = map_nodes(None, &[], "vm");
        assert_eq!(m.nodes.len(), 1);
    }
}
