//! Node lists as batch schedulers hand them to a job.
//!
//! The launcher must know which nodes its allocation holds, and each scheduler says it differently:
//! Cobalt on Theta gives `COBALT_PARTNAME=1001-1005,1030` (node ids, which `aprun -L` takes as plain
//! integers); Slurm gives a compressed hostlist such as `nid0[1-3,7]` or `c[1-2]n[1-2]`; Cobalt on
//! clusters and PBS give a node file with one host per line (PBS repeats a host once per rank).
//! These parsers expand them without calling out to `scontrol`, which is not always on the compute
//! nodes and costs a process per call.

use std::path::Path;

use crate::error::{Error, Result};

/// More hosts than this in one expression is certainly a typo (e.g. `n[1-100000000]`), and
/// expanding it would exhaust memory; refuse instead.
pub const MAX_EXPANDED_HOSTS: usize = 1_000_000;

/// Expands a Cobalt `COBALT_PARTNAME` such as `1001-1005,1030` into node ids `["1001", ..., "1005",
/// "1030"]`, formatted as plain integers the way `aprun -L` takes them (no `nid` prefix, no
/// zero padding). A `nid` prefix on an item is accepted and dropped.
pub fn expand_cobalt_partname(partname: &str) -> Result<Vec<String>> {
    let bad = |problem: String| Error::BadNodeList {
        input: partname.to_string(),
        problem,
    };
    let mut out = Vec::new();
    for item in partname.split(',') {
        let item = item.trim();
        if item.is_empty() {
            if partname.trim().is_empty() {
                return Err(bad(
                    "it is empty; expected node ids like 1001-1005,1030".into()
                ));
            }
            continue;
        }
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (item, item),
        };
        let parse = |s: &str| -> Result<u64> {
            let digits = s.strip_prefix("nid").unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!(
                    "{s:?} is not a node id; expected node ids like 1001-1005,1030"
                )));
            }
            digits
                .parse::<u64>()
                .map_err(|_| bad(format!("node id {s:?} is too large")))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if hi < lo {
            return Err(bad(format!(
                "range {item:?} runs backwards; write it as {hi}-{lo}"
            )));
        }
        if (out.len() as u64).saturating_add(hi - lo + 1) > MAX_EXPANDED_HOSTS as u64 {
            return Err(bad(format!(
                "it names more than {MAX_EXPANDED_HOSTS} nodes"
            )));
        }
        out.extend((lo..=hi).map(|n| n.to_string()));
    }
    Ok(out)
}

/// Expands a Slurm hostlist expression: `nid0[1-3,7]` → `nid01 nid02 nid03 nid07`; `a[01-03]b` →
/// `a01b a02b a03b`; `x1,y[2-4]`; several bracket groups multiply out in order (`c[1-2]n[1-2]` →
/// `c1n1 c1n2 c2n1 c2n2`). As in Slurm, a range is zero-padded to the width of its lower bound
/// (`[08-10]` → `08 09 10`, `[8-10]` → `8 9 10`).
pub fn expand_hostlist(expr: &str) -> Result<Vec<String>> {
    let bad = |problem: String| Error::BadNodeList {
        input: expr.to_string(),
        problem,
    };
    let mut out = Vec::new();
    for item in split_top_level(expr).map_err(&bad)? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        // A host pattern is literal text alternating with bracket groups.
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    if rest.contains(']') {
                        return Err(bad(format!("unmatched ']' in {item:?}")));
                    }
                    for n in &mut names {
                        n.push_str(rest);
                    }
                    rest = "";
                }
                Some(open) => {
                    let literal = &rest[..open];
                    if literal.contains(']') {
                        return Err(bad(format!("unmatched ']' in {item:?}")));
                    }
                    let close = rest[open..]
                        .find(']')
                        .map(|c| open + c)
                        .ok_or_else(|| bad(format!("unclosed '[' in {item:?}")))?;
                    let group = &rest[open + 1..close];
                    if group.contains('[') {
                        return Err(bad(format!("nested '[' in {item:?}")));
                    }
                    let suffixes = expand_group(group).map_err(&bad)?;
                    let total = names.len().saturating_mul(suffixes.len());
                    if total.saturating_add(out.len()) > MAX_EXPANDED_HOSTS {
                        return Err(bad(format!(
                            "it names more than {MAX_EXPANDED_HOSTS} hosts"
                        )));
                    }
                    let mut next = Vec::with_capacity(total);
                    for n in &names {
                        for s in &suffixes {
                            next.push(format!("{n}{literal}{s}"));
                        }
                    }
                    names = next;
                    rest = &rest[close + 1..];
                }
            }
        }
        out.extend(names);
    }
    if out.is_empty() {
        return Err(bad(
            "it names no hosts; expected a Slurm hostlist like nid0[1-3,7] or n1,n2".into(),
        ));
    }
    Ok(out)
}

/// Splits on commas that are outside brackets.
fn split_top_level(expr: &str) -> std::result::Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in expr.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| "unmatched ']'".to_string())?
            }
            ',' if depth == 0 => {
                parts.push(&expr[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '['".into());
    }
    parts.push(&expr[start..]);
    Ok(parts)
}

/// Expands the inside of one bracket group: `1-3,7` or `01-03`.
fn expand_group(group: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for range in group.split(',') {
        let range = range.trim();
        if range.is_empty() {
            return Err(format!(
                "empty range in [{group}]; expected ranges like [1-3,7]"
            ));
        }
        let (lo_s, hi_s) = range.split_once('-').unwrap_or((range, range));
        let num = |s: &str| -> std::result::Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{s:?} in [{group}] is not a number; expected ranges like [1-3,7]"
                ));
            }
            s.parse::<u64>().map_err(|_| format!("{s:?} is too large"))
        };
        let (lo, hi) = (num(lo_s)?, num(hi_s)?);
        if hi < lo {
            return Err(format!("range {range:?} runs backwards"));
        }
        if (hi - lo) as usize >= MAX_EXPANDED_HOSTS {
            return Err(format!(
                "range {range:?} names more than {MAX_EXPANDED_HOSTS} hosts"
            ));
        }
        let width = lo_s.len();
        out.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

/// Reads a node file (`COBALT_NODEFILE`, `PBS_NODEFILE`): one host per line, blank lines and `#`
/// comments ignored, duplicates dropped keeping first-seen order (PBS lists a host once per rank).
pub fn read_nodefile(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let hosts = parse_nodefile(&text);
    if hosts.is_empty() {
        return Err(Error::BadNodeList {
            input: path.display().to_string(),
            problem: "the node file lists no hosts".into(),
        });
    }
    Ok(hosts)
}

/// Parses the text of a node file; see [`read_nodefile`].
pub fn parse_nodefile(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut hosts = Vec::new();
    for line in text.lines() {
        // Some sites write `host slots=N` or `host:N`; the host is the first word before ':'.
        let host = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .split(':')
            .next()
            .unwrap_or("");
        if host.is_empty() || host.starts_with('#') {
            continue;
        }
        if seen.insert(host.to_string()) {
            hosts.push(host.to_string());
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cobalt_partname() {
        assert_eq!(
            expand_cobalt_partname("1001-1005,1030").unwrap(),
            v(&["1001", "1002", "1003", "1004", "1005", "1030"])
        );
        assert_eq!(expand_cobalt_partname("7").unwrap(), v(&["7"]));
        assert_eq!(
            expand_cobalt_partname("nid00012, 0013").unwrap(),
            v(&["12", "13"])
        );
    }

    #[test]
    fn cobalt_partname_errors() {
        for bad in ["", "10-5", "abc", "1-", "12,x3", "1-99999999"] {
            let err = expand_cobalt_partname(bad).unwrap_err();
            assert!(matches!(err, Error::BadNodeList { .. }), "{bad}: {err}");
        }
        let msg = expand_cobalt_partname("10-5").unwrap_err().to_string();
        assert!(msg.contains("backwards"), "{msg}");
    }

    #[test]
    fn hostlist_simple() {
        assert_eq!(expand_hostlist("n1").unwrap(), v(&["n1"]));
        assert_eq!(expand_hostlist("n[1-3]").unwrap(), v(&["n1", "n2", "n3"]));
        assert_eq!(
            expand_hostlist("nid0[1-3,7]").unwrap(),
            v(&["nid01", "nid02", "nid03", "nid07"])
        );
        assert_eq!(
            expand_hostlist("a[01-03]b").unwrap(),
            v(&["a01b", "a02b", "a03b"])
        );
        assert_eq!(
            expand_hostlist("x1,y[2-4]").unwrap(),
            v(&["x1", "y2", "y3", "y4"])
        );
    }

    #[test]
    fn hostlist_padding_follows_lower_bound() {
        assert_eq!(
            expand_hostlist("n[08-10]").unwrap(),
            v(&["n08", "n09", "n10"])
        );
        assert_eq!(expand_hostlist("n[8-10]").unwrap(), v(&["n8", "n9", "n10"]));
        assert_eq!(
            expand_hostlist("nid[00098-00101]").unwrap(),
            v(&["nid00098", "nid00099", "nid00100", "nid00101"])
        );
    }

    #[test]
    fn hostlist_several_groups() {
        assert_eq!(
            expand_hostlist("c[1-2]n[1-2]").unwrap(),
            v(&["c1n1", "c1n2", "c2n1", "c2n2"])
        );
        assert_eq!(
            expand_hostlist("r[1,3]c[01-02]-gpu,login").unwrap(),
            v(&["r1c01-gpu", "r1c02-gpu", "r3c01-gpu", "r3c02-gpu", "login"])
        );
    }

    #[test]
    fn hostlist_real_slurm_value() {
        // SLURM_JOB_NODELIST from the test cluster.
        assert_eq!(expand_hostlist("n[1-2]").unwrap(), v(&["n1", "n2"]));
        assert_eq!(expand_hostlist("localhost").unwrap(), v(&["localhost"]));
    }

    #[test]
    fn hostlist_errors() {
        for bad in [
            "n[1-3",
            "n1-3]",
            "n[3-1]",
            "n[a-b]",
            "n[]",
            "n[1,,2]",
            "",
            "n[[1]]",
            "n[1-2000000]",
        ] {
            let err = expand_hostlist(bad).unwrap_err();
            assert!(matches!(err, Error::BadNodeList { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn nodefile_dedupes_in_order() {
        let text = "node2\nnode2\nnode1\n\n# comment\nnode2\nnode3 slots=4\nnode4:2\n";
        assert_eq!(
            parse_nodefile(text),
            v(&["node2", "node1", "node3", "node4"])
        );
    }

    #[test]
    fn nodefile_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nodes");
        std::fs::write(&p, "a\nb\na\n").unwrap();
        assert_eq!(read_nodefile(&p).unwrap(), v(&["a", "b"]));
        std::fs::write(&p, "\n\n").unwrap();
        assert!(read_nodefile(&p).is_err());
        assert!(matches!(
            read_nodefile(&dir.path().join("missing")).unwrap_err(),
            Error::Io { .. }
        ));
    }
}
