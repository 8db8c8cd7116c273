//! Node packing in integer units: a node is [`NODE`] units, a serial job with
//! node_packing_count k takes `NODE / k` (rounded down, so k jobs always fit on one node).
//! NODE is a multiple of 1..=16, so common packing counts mix exactly.

/// One whole node.
pub const NODE: u64 = 720_720_000;

/// The share of a node one serial job with this packing count takes.
pub fn cost(node_packing_count: u32) -> u64 {
    NODE / u64::from(node_packing_count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_jobs_fill_a_node_and_never_more() {
        for k in 1..=64u32 {
            let c = cost(k);
            assert!(c * u64::from(k) <= NODE, "k={k}");
            assert!(c * u64::from(k + 1) > NODE, "k={k}");
        }
        assert_eq!(cost(0), NODE);
        assert_eq!(cost(2) + cost(3) + cost(6), NODE);
    }
}
