//! The queue policy: which queues the service may submit launcher jobs to, how many at a time, and
//! which sizes each queue accepts.
//!
//! The file is the legacy `.ini` (settings key `QUEUE_POLICY`), in Python configparser style so
//! that users' existing files keep working:
//!
//! ```ini
//! [debug-flat-quad]
//! submit-jobs = on
//! max-queued = 1
//! policy = [
//!     {"min-nodes": 1, "max-nodes": 16, "min-time": 0, "max-time": 1}
//!   ]
//! ```
//!
//! `policy` is a JSON list of windows continued on indented lines (or until its brackets close).
//! **Times: `min-time`/`max-time` are hours**, fractions allowed, as in legacy Balsam's
//! `theta_policy.ini` (Theta's debug queues: `"max-time": 1` = one hour; the default queue's
//! 30-minute minimum is `"min-time": 0.5`). Windows may instead give `min-minutes`/`max-minutes`.
//! Internally every time is in minutes. `#` and `;` start comment lines; key names are
//! case-insensitive and `_` may stand for `-`; a `[DEFAULT]` section (upper case, as in
//! configparser: Theta has a queue named `default`) gives defaults to all queues.
//! The parser is hand-written because the JSON continuation lines (closing `]` at the margin, as
//! the talk shows) are not something an ini crate handles, and because errors must name the line.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The shipped policy for ALCF Theta (Cobalt).
pub const THETA_POLICY: &str = include_str!("../templates/theta_policy.ini");
/// The shipped policy for a workstation (local scheduler).
pub const LOCAL_POLICY: &str = include_str!("../templates/local_policy.ini");

/// Keys a queue section may have.
const KEYS: &str = "submit-jobs, max-queued, policy";

/// One size window a queue accepts: a job of `min_nodes..=max_nodes` nodes for
/// `min_minutes..=max_minutes` minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Fewest nodes.
    pub min_nodes: usize,
    /// Most nodes.
    pub max_nodes: usize,
    /// Shortest wall time, minutes.
    pub min_minutes: u64,
    /// Longest wall time, minutes.
    pub max_minutes: u64,
}

/// The rules for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRule {
    /// Queue name (the section name).
    pub name: String,
    /// Whether the service may submit to it (`submit-jobs = on`).
    pub submit_jobs: bool,
    /// Most batch jobs of ours queued or running in it at once (`max-queued`).
    pub max_queued: usize,
    /// Sizes it accepts (`policy`).
    pub windows: Vec<Window>,
}

/// The whole policy file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueuePolicy {
    /// Queues in file order (earlier queues are preferred on ties).
    pub queues: Vec<QueueRule>,
}

impl QueuePolicy {
    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<QueuePolicy> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses policy text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<QueuePolicy> {
        let sections = split_sections(file, text)?;
        let mut defaults: Vec<Entry> = Vec::new();
        let mut queues = Vec::new();
        for section in &sections {
            // Case-sensitive, as in configparser: Theta has a queue named "default".
            if section.name == "DEFAULT" {
                defaults = section.entries.clone();
                continue;
            }
        }
        for section in sections.iter().filter(|s| s.name != "DEFAULT") {
            queues.push(queue_rule(file, section, &defaults)?);
        }
        if queues.is_empty() {
            return Err(Error::Policy {
                file: file.into(),
                line: text.lines().count().max(1),
                key: None,
                problem: "the policy names no queues; add a section like [debug-cache-quad] with submit-jobs, max-queued and policy".into(),
            });
        }
        Ok(QueuePolicy { queues })
    }

    /// The rule for a queue, by name.
    pub fn queue(&self, name: &str) -> Option<&QueueRule> {
        self.queues.iter().find(|q| q.name == name)
    }
}

/// A `key = value` with the line it starts on.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    line: usize,
    value: String,
}

#[derive(Debug)]
struct Section {
    name: String,
    line: usize,
    entries: Vec<Entry>,
}

fn err(file: &str, line: usize, key: Option<&str>, problem: impl Into<String>) -> Error {
    Error::Policy {
        file: file.into(),
        line,
        key: key.map(str::to_string),
        problem: problem.into(),
    }
}

/// Bracket depth of JSON text, ignoring brackets inside strings.
fn json_depth(text: &str) -> i64 {
    let mut depth = 0i64;
    let mut in_str = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    depth
}

fn split_sections(file: &str, text: &str) -> Result<Vec<Section>> {
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        let indented = raw.starts_with([' ', '\t']);
        let open_value = sections
            .last()
            .and_then(|s| s.entries.last())
            .is_some_and(|e| json_depth(&e.value) > 0);
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        // A continuation line: indented, or inside a JSON value whose brackets are still open.
        if open_value || (indented && sections.last().is_some_and(|s| !s.entries.is_empty())) {
            if let Some(entry) = sections.last_mut().and_then(|s| s.entries.last_mut()) {
                entry.value.push('\n');
                entry.value.push_str(raw);
                continue;
            }
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| err(file, n, None, format!("section header {trimmed:?} has no closing ']'; write it as [queue-name]")))?
                .trim();
            if name.is_empty() {
                return Err(err(
                    file,
                    n,
                    None,
                    "empty section name; write the queue name as [queue-name]",
                ));
            }
            if let Some(prev) = sections.iter().find(|s| s.name == name) {
                return Err(err(
                    file,
                    n,
                    None,
                    format!(
                        "queue [{name}] appears twice (first on line {}); merge the two sections",
                        prev.line
                    ),
                ));
            }
            sections.push(Section {
                name: name.to_string(),
                line: n,
                entries: Vec::new(),
            });
            continue;
        }
        let split = trimmed.find(['=', ':']);
        let Some(pos) = split else {
            return Err(err(file, n, None, format!("cannot read {trimmed:?}: expected [queue-name], key = value, or an indented continuation of the previous value")));
        };
        let key = normalise_key(&trimmed[..pos]);
        let value = trimmed[pos + 1..].trim().to_string();
        let Some(section) = sections.last_mut() else {
            return Err(err(
                file,
                n,
                Some(&key),
                "this key is outside any queue section; put a [queue-name] line before it",
            ));
        };
        if key.is_empty() {
            return Err(err(
                file,
                n,
                None,
                format!("missing key name before '{}'", &trimmed[pos..pos + 1]),
            ));
        }
        if let Some(prev) = section.entries.iter().find(|e| e.key == key) {
            return Err(err(
                file,
                n,
                Some(&key),
                format!(
                    "given twice in [{}] (first on line {})",
                    section.name, prev.line
                ),
            ));
        }
        section.entries.push(Entry {
            key,
            line: n,
            value,
        });
    }
    if let Some(entry) = sections.last().and_then(|s| s.entries.last()) {
        if json_depth(&entry.value) > 0 {
            return Err(err(
                file,
                entry.line,
                Some(&entry.key),
                "the JSON list is not closed: a ']' or '}' is missing",
            ));
        }
    }
    Ok(sections)
}

fn normalise_key(k: &str) -> String {
    k.trim().to_ascii_lowercase().replace('_', "-")
}

/// A scalar value without a trailing ` # comment`.
fn scalar(value: &str) -> &str {
    let mut end = value.len();
    for pat in [" #", "\t#", " ;", "\t;"] {
        if let Some(p) = value.find(pat) {
            end = end.min(p);
        }
    }
    value[..end].trim()
}

fn queue_rule(file: &str, section: &Section, defaults: &[Entry]) -> Result<QueueRule> {
    let get = |key: &str| {
        section
            .entries
            .iter()
            .find(|e| e.key == key)
            .or_else(|| defaults.iter().find(|e| e.key == key))
    };
    for e in &section.entries {
        if !["submit-jobs", "max-queued", "policy"].contains(&e.key.as_str()) {
            return Err(err(
                file,
                e.line,
                Some(&e.key),
                format!("unknown key in [{}]; valid keys are {KEYS}", section.name),
            ));
        }
    }
    let submit_jobs = match get("submit-jobs") {
        None => true,
        Some(e) => match scalar(&e.value).to_ascii_lowercase().as_str() {
            "on" | "yes" | "true" | "1" => true,
            "off" | "no" | "false" | "0" => false,
            other => {
                return Err(err(
                    file,
                    e.line,
                    Some(&e.key),
                    format!("{other:?} is not on or off; write submit-jobs = on (or off)"),
                ))
            }
        },
    };
    let max_queued = match get("max-queued") {
        None => 1,
        Some(e) => scalar(&e.value).parse::<usize>().map_err(|_| {
            err(
                file,
                e.line,
                Some(&e.key),
                format!(
                    "{:?} is not a whole number; write e.g. max-queued = 1",
                    scalar(&e.value)
                ),
            )
        })?,
    };
    let Some(policy) = get("policy") else {
        return Err(err(
            file,
            section.line,
            Some("policy"),
            format!(
                "[{}] has no policy; add e.g. policy = [{{\"min-nodes\": 1, \"max-nodes\": 8, \"min-time\": 0, \"max-time\": 1}}]",
                section.name
            ),
        ));
    };
    let windows = parse_windows(file, policy)?;
    if submit_jobs && windows.is_empty() {
        return Err(err(
            file,
            policy.line,
            Some("policy"),
            format!(
                "[{}] has submit-jobs on but no windows; add a window or set submit-jobs = off",
                section.name
            ),
        ));
    }
    Ok(QueueRule {
        name: section.name.clone(),
        submit_jobs,
        max_queued,
        windows,
    })
}

fn parse_windows(file: &str, e: &Entry) -> Result<Vec<Window>> {
    let json: Value = serde_json::from_str(&e.value).map_err(|je| {
        // The value starts on the key's line, so JSON line 1 is that line.
        err(
            file,
            e.line + je.line().saturating_sub(1),
            Some("policy"),
            format!("not a JSON list of windows ({je}); expected [{{\"min-nodes\": 1, \"max-nodes\": 8, \"min-time\": 0, \"max-time\": 1}}]"),
        )
    })?;
    let list = json.as_array().ok_or_else(|| {
        err(
            file,
            e.line,
            Some("policy"),
            "must be a JSON list [ ... ] of windows",
        )
    })?;
    let mut windows = Vec::with_capacity(list.len());
    for (i, w) in list.iter().enumerate() {
        let what = format!("window {} of the list", i + 1);
        let bad = |problem: String| err(file, e.line, Some("policy"), format!("{what}: {problem}"));
        let obj = w.as_object().ok_or_else(|| bad("must be an object {\"min-nodes\": .., \"max-nodes\": .., \"min-time\": .., \"max-time\": ..}".into()))?;
        for k in obj.keys() {
            if ![
                "min-nodes",
                "max-nodes",
                "min-time",
                "max-time",
                "min-minutes",
                "max-minutes",
            ]
            .contains(&k.as_str())
            {
                return Err(bad(format!("unknown key {k:?}; valid keys are min-nodes, max-nodes, min-time, max-time (hours), min-minutes, max-minutes")));
            }
        }
        let num = |k: &str| -> std::result::Result<Option<f64>, Error> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Some)
                    .ok_or_else(|| bad(format!("{k} is {v}, not a number >= 0"))),
            }
        };
        let nodes = |k: &str| -> std::result::Result<Option<usize>, Error> {
            match num(k)? {
                None => Ok(None),
                Some(x) if x.fract() == 0.0 && x >= 1.0 => Ok(Some(x as usize)),
                Some(x) => Err(bad(format!(
                    "{k} is {x}; node counts are whole numbers >= 1"
                ))),
            }
        };
        let minutes =
            |hours_key: &str, minutes_key: &str| -> std::result::Result<Option<u64>, Error> {
                match (num(hours_key)?, num(minutes_key)?) {
                    (Some(_), Some(_)) => Err(bad(format!(
                        "give {hours_key} (hours) or {minutes_key}, not both"
                    ))),
                    (Some(h), None) => Ok(Some((h * 60.0).round() as u64)),
                    (None, Some(m)) => Ok(Some(m.round() as u64)),
                    (None, None) => Ok(None),
                }
            };
        let min_nodes = nodes("min-nodes")?.unwrap_or(1);
        let max_nodes = nodes("max-nodes")?.ok_or_else(|| bad("max-nodes is missing".into()))?;
        let min_minutes = minutes("min-time", "min-minutes")?.unwrap_or(0);
        let max_minutes = minutes("max-time", "max-minutes")?
            .ok_or_else(|| bad("max-time (hours) or max-minutes is missing".into()))?;
        if max_nodes < min_nodes {
            return Err(bad(format!(
                "max-nodes {max_nodes} is less than min-nodes {min_nodes}"
            )));
        }
        if max_minutes == 0 {
            return Err(bad("the longest wall time is 0 minutes; max-time is in hours (1 = one hour), max-minutes in minutes".into()));
        }
        if max_minutes < min_minutes {
            return Err(bad(format!("the longest wall time ({max_minutes} min) is less than the shortest ({min_minutes} min)")));
        }
        windows.push(Window {
            min_nodes,
            max_nodes,
            min_minutes,
            max_minutes,
        });
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talk_example() {
        // As the talk shows it: the closing ']' at the margin.
        let text = "[debug-flat-quad]\nsubmit-jobs = on\nmax-queued = 1\npolicy = [\n    {\n        \"min-nodes\": 1,\n        \"max-nodes\": 16,\n        \"min-time\": 0,\n        \"max-time\": 1\n    }\n]\n";
        let p = QueuePolicy::parse("theta_policy.ini", text).unwrap();
        assert_eq!(
            p.queues,
            vec![QueueRule {
                name: "debug-flat-quad".into(),
                submit_jobs: true,
                max_queued: 1,
                windows: vec![Window {
                    min_nodes: 1,
                    max_nodes: 16,
                    min_minutes: 0,
                    max_minutes: 60
                }],
            }]
        );
    }

    #[test]
    fn legacy_file_verbatim() {
        // legacy Balsam's balsam/django_config/theta_policy.ini, unchanged.
        let text = "[debug-flat-quad]\nsubmit-jobs = on\nmax-queued = 1\npolicy =  [\n             {\"min-nodes\": 1,\n              \"max-nodes\": 16,\n              \"min-time\": 0,\n              \"max-time\": 1\n             }\n          ]\n\n[default]\nsubmit-jobs = off\nmax-queued = 20\npolicy = [\n             {\"min-nodes\": 128,\n              \"max-nodes\": 255,\n              \"min-time\": 0.5,\n              \"max-time\": 3\n             },\n             {\"min-nodes\": 802,\n              \"max-nodes\": 4392,\n              \"min-time\": 0.5,\n              \"max-time\": 24\n             }\n         ]\n";
        let p = QueuePolicy::parse("theta_policy.ini", text).unwrap();
        assert_eq!(p.queues.len(), 2);
        let d = p.queue("default").unwrap();
        assert!(!d.submit_jobs);
        assert_eq!(d.max_queued, 20);
        assert_eq!(d.windows[0].min_minutes, 30);
        assert_eq!(d.windows[0].max_minutes, 180);
        assert_eq!(d.windows[1].max_minutes, 24 * 60);
    }

    #[test]
    fn shipped_policies_parse() {
        let theta = QueuePolicy::parse("theta_policy.ini", THETA_POLICY).unwrap();
        let names: Vec<&str> = theta.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["debug-cache-quad", "debug-flat-quad", "default"]
        );
        let local = QueuePolicy::parse("local_policy.ini", LOCAL_POLICY).unwrap();
        assert!(local.queues[0].submit_jobs);
    }

    #[test]
    fn minutes_comments_defaults_and_key_spellings() {
        let text = "# site policy\n[DEFAULT]\nmax_queued = 3\n\n[q1]\n; a comment\nSubmit-Jobs = yes  # inline\npolicy: [{\"min-nodes\": 2, \"max-nodes\": 4, \"min-minutes\": 5, \"max-minutes\": 90}]\n[q2]\nsubmit-jobs = off\nmax-queued = 0\npolicy = []\n";
        let p = QueuePolicy::parse("p.ini", text).unwrap();
        let q1 = p.queue("q1").unwrap();
        assert!(q1.submit_jobs);
        assert_eq!(q1.max_queued, 3);
        assert_eq!(
            q1.windows,
            vec![Window {
                min_nodes: 2,
                max_nodes: 4,
                min_minutes: 5,
                max_minutes: 90
            }]
        );
        let q2 = p.queue("q2").unwrap();
        assert_eq!(q2.max_queued, 0);
        assert!(q2.windows.is_empty());
    }

    fn error_of(text: &str) -> String {
        QueuePolicy::parse("p.ini", text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = error_of("[q]\nsubmit-jobs = maybe\npolicy = []\n");
        assert!(e.starts_with("p.ini:2: submit-jobs:"), "{e}");
        assert!(e.contains("on or off"), "{e}");

        let e = error_of("[q]\nmax-queued = lots\npolicy = []\n");
        assert!(e.starts_with("p.ini:2: max-queued:"), "{e}");

        let e = error_of("[q]\nmax-queue = 1\npolicy = []\n");
        assert!(
            e.starts_with("p.ini:2: max-queue:") && e.contains("valid keys"),
            "{e}"
        );

        let e = error_of("submit-jobs = on\n");
        assert!(
            e.starts_with("p.ini:1:") && e.contains("outside any queue"),
            "{e}"
        );

        let e = error_of("[q]\nsubmit-jobs = on\npolicy = [\n  {\"min-nodes\": 1,\n   \"max-nodes\": 2\n   \"max-time\": 1}\n]\n");
        assert!(e.starts_with("p.ini:6: policy:"), "{e}");
        assert!(e.contains("JSON"), "{e}");

        let e = error_of("[q]\npolicy = [{\"min-nodes\": 1, \"max-nodes\": 2}]\n");
        assert!(e.contains("max-time") && e.contains("missing"), "{e}");

        let e = error_of("[q]\npolicy = [{\"min-nodes\": 4, \"max-nodes\": 2, \"max-time\": 1}]\n");
        assert!(e.contains("less than min-nodes"), "{e}");

        let e =
            error_of("[q]\npolicy = [{\"max-nodes\": 2, \"max-time\": 1, \"max-minutes\": 60}]\n");
        assert!(e.contains("not both"), "{e}");

        let e = error_of("[q]\npolicy = [{\"max-nodes\": 2, \"max-time\": 1, \"nodes\": 3}]\n");
        assert!(e.contains("unknown key \"nodes\""), "{e}");

        let e = error_of("[q]\nsubmit-jobs = on\n");
        assert!(
            e.starts_with("p.ini:1: policy:") && e.contains("no policy"),
            "{e}"
        );

        let e = error_of("[q]\npolicy = [\n  {\"max-nodes\": 2, \"max-time\": 1}\n");
        assert!(e.contains("not closed"), "{e}");

        let e = error_of("[q]\npolicy = []\n[q]\npolicy = []\n");
        assert!(e.starts_with("p.ini:3:") && e.contains("twice"), "{e}");

        let e = error_of("[q]\npolicy = []\n");
        assert!(e.contains("no windows"), "{e}");

        let e = error_of("# nothing\n");
        assert!(e.contains("no queues"), "{e}");

        let e = error_of("[q\n");
        assert!(e.contains("closing ']'"), "{e}");

        let e = error_of("[q]\njust words\n");
        assert!(e.starts_with("p.ini:2:") && e.contains("expected"), "{e}");

        let e = error_of("[q]\npolicy = [{\"max-nodes\": 1.5, \"max-time\": 1}]\n");
        assert!(e.contains("whole numbers"), "{e}");
    }

    #[test]
    fn load_missing_file() {
        let err = QueuePolicy::load(Path::new("/nonexistent/policy.ini")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/policy.ini"));
    }
}
