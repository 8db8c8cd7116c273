//! The job fields users may set, by name, with their types. One table serves `balsam modify`,
//! the CSV and JSON-lines importers and `BALSAM_LS_FIELDS`, so a field is parsed the same way
//! everywhere: `False` means false, a count must be a non-negative integer, and so on.

use crate::error::{Error, Result};
use crate::model::JobSpec;

/// How a field's value is written and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any text.
    Text,
    /// A non-negative integer.
    Count,
    /// A positive integer.
    Positive,
    /// true/false (also True/False, yes/no, on/off, 1/0).
    Bool,
    /// `none` or `depth`.
    Affinity,
    /// `A=1:B=2`.
    Environ,
    /// A JSON object.
    Json,
    /// Command-line words, split as a shell would (quotes must balance).
    Args,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Count => "a non-negative integer",
            Kind::Positive => "a positive integer",
            Kind::Bool => "true or false (True/False, yes/no, on/off, 1/0 also work)",
            Kind::Affinity => "none or depth",
            Kind::Environ => "NAME=VALUE pairs separated by colons, e.g. A=1:B=2",
            Kind::Json => "a JSON object, e.g. {\"key\": 1}",
            Kind::Args => "command-line words with balanced quotes, e.g. --x 'a b'",
        }
    }
}

/// A job field: its name (also its column), kind, and for integers the largest value allowed.
pub struct Field {
    /// Name users type and the database column.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Largest value of an integer field (0 for other kinds). Bounds keep absurd numbers out at
    /// entry, where the message can name the field, instead of failing later in arithmetic.
    pub max: u32,
}

/// Largest node count of a job (num_nodes, coschedule_num_nodes, and their sum).
pub const MAX_NODES: u32 = 1_000_000;
/// Largest wall time of a job: a year.
pub const MAX_WALL_TIME_MINUTES: u32 = 525_600;

/// Every settable job field, in the order of the talk's confirmation block.
pub const FIELDS: &[Field] = &[
    Field {
        name: "workflow",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "name",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "description",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "input_files",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "stage_in_url",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "stage_out_files",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "stage_out_url",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "wall_time_minutes",
        kind: Kind::Count,
        max: MAX_WALL_TIME_MINUTES,
    },
    Field {
        name: "num_nodes",
        kind: Kind::Positive,
        max: MAX_NODES,
    },
    Field {
        name: "coschedule_num_nodes",
        kind: Kind::Count,
        max: MAX_NODES,
    },
    Field {
        name: "ranks_per_node",
        kind: Kind::Positive,
        max: 100_000,
    },
    Field {
        name: "cpu_affinity",
        kind: Kind::Affinity,
        max: 0,
    },
    Field {
        name: "threads_per_rank",
        kind: Kind::Positive,
        max: 100_000,
    },
    Field {
        name: "threads_per_core",
        kind: Kind::Positive,
        max: 64,
    },
    Field {
        name: "node_packing_count",
        kind: Kind::Positive,
        max: 100_000,
    },
    Field {
        name: "environ_vars",
        kind: Kind::Environ,
        max: 0,
    },
    Field {
        name: "mpi_flags",
        kind: Kind::Args,
        max: 0,
    },
    Field {
        name: "application",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "args",
        kind: Kind::Args,
        max: 0,
    },
    Field {
        name: "user_workdir",
        kind: Kind::Text,
        max: 0,
    },
    Field {
        name: "wait_for_parents",
        kind: Kind::Bool,
        max: 0,
    },
    Field {
        name: "post_error_handler",
        kind: Kind::Bool,
        max: 0,
    },
    Field {
        name: "post_timeout_handler",
        kind: Kind::Bool,
        max: 0,
    },
    Field {
        name: "auto_timeout_retry",
        kind: Kind::Bool,
        max: 0,
    },
    Field {
        name: "max_restarts",
        kind: Kind::Count,
        max: 1_000_000,
    },
    Field {
        name: "data",
        kind: Kind::Json,
        max: 0,
    },
];

/// Names of the settable fields plus `state`, for error messages.
pub fn field_names() -> Vec<&'static str> {
    let mut v: Vec<_> = FIELDS.iter().map(|f| f.name).collect();
    v.push("state");
    v
}

/// Looks a field up by name.
pub fn field(name: &str) -> Result<&'static Field> {
    FIELDS
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| Error::UnknownField(name.to_string()))
}

/// A checked value, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text-like fields.
    Text(String),
    /// Integer fields.
    Int(u32),
    /// Boolean fields.
    Bool(bool),
    /// JSON fields.
    Json(serde_json::Value),
}

fn bad(field: &Field, value: &str) -> Error {
    let expected = match field.kind {
        Kind::Count => format!("an integer from 0 to {}", field.max),
        Kind::Positive => format!("an integer from 1 to {}", field.max),
        other => other.expected().to_string(),
    };
    Error::BadValue {
        field: field.name.to_string(),
        value: value.to_string(),
        expected,
    }
}

/// Parses a boolean the way users write it.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Checks `A=1:B=2`.
pub fn valid_environ(s: &str) -> bool {
    s.is_empty()
        || s.split(':').all(|kv| {
            kv.split_once('=')
                .map(|(k, _)| {
                    let k = k.trim();
                    !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !k.starts_with(|c: char| c.is_ascii_digit())
                })
                .unwrap_or(false)
        })
}

impl Field {
    /// Parses text as typed on a command line or in a CSV cell.
    pub fn parse_str(&self, s: &str) -> Result<Value> {
        match self.kind {
            Kind::Text => Ok(Value::Text(s.to_string())),
            Kind::Count | Kind::Positive => {
                let n: u32 = s.trim().parse().map_err(|_| bad(self, s))?;
                if (self.kind == Kind::Positive && n == 0) || n > self.max {
                    return Err(bad(self, s));
                }
                Ok(Value::Int(n))
            }
            Kind::Args => match shell_words::split(s) {
                Ok(_) => Ok(Value::Text(s.to_string())),
                Err(e) => Err(Error::BadValue {
                    field: self.name.to_string(),
                    value: s.to_string(),
                    expected: format!("{} ({e})", self.kind.expected()),
                }),
            },
            Kind::Bool => parse_bool(s).map(Value::Bool).ok_or_else(|| bad(self, s)),
            Kind::Affinity => match s.trim() {
                "none" | "depth" => Ok(Value::Text(s.trim().to_string())),
                _ => Err(bad(self, s)),
            },
            Kind::Environ => {
                if valid_environ(s) {
                    Ok(Value::Text(s.to_string()))
                } else {
                    Err(bad(self, s))
                }
            }
            Kind::Json => {
                let v: serde_json::Value = serde_json::from_str(s).map_err(|_| bad(self, s))?;
                if v.is_object() {
                    Ok(Value::Json(v))
                } else {
                    Err(bad(self, s))
                }
            }
        }
    }

    /// Parses a JSON value from a JSON-lines file: native JSON types, or text parsed as above.
    pub fn parse_json(&self, v: &serde_json::Value) -> Result<Value> {
        use serde_json::Value as J;
        match (self.kind, v) {
            (Kind::Json, J::Object(_)) => Ok(Value::Json(v.clone())),
            (Kind::Bool, J::Bool(b)) => Ok(Value::Bool(*b)),
            (Kind::Count | Kind::Positive, J::Number(n)) => match n.as_u64() {
                Some(x) if x <= u32::MAX as u64 => self.parse_str(&x.to_string()),
                _ => Err(bad(self, &n.to_string())),
            },
            (Kind::Text | Kind::Args, J::Number(n)) => Ok(Value::Text(n.to_string())),
            (_, J::String(s)) => self.parse_str(s),
            (Kind::Environ, J::Object(map)) => {
                // {"A": "1"} is a friendlier way to write A=1 in JSON.
                let s = map
                    .iter()
                    .map(|(k, v)| match v {
                        J::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(":");
                self.parse_str(&s)
            }
            (_, other) => Err(bad(self, &other.to_string())),
        }
    }

    /// Stores a checked value into a spec.
    pub fn apply(&self, spec: &mut JobSpec, v: Value) {
        match (self.name, v) {
            ("workflow", Value::Text(s)) => spec.workflow = s,
            ("name", Value::Text(s)) => spec.name = s,
            ("description", Value::Text(s)) => spec.description = s,
            ("input_files", Value::Text(s)) => spec.input_files = s,
            ("stage_in_url", Value::Text(s)) => spec.stage_in_url = s,
            ("stage_out_files", Value::Text(s)) => spec.stage_out_files = s,
            ("stage_out_url", Value::Text(s)) => spec.stage_out_url = s,
            ("wall_time_minutes", Value::Int(n)) => spec.wall_time_minutes = n,
            ("num_nodes", Value::Int(n)) => spec.num_nodes = n,
            ("coschedule_num_nodes", Value::Int(n)) => spec.coschedule_num_nodes = n,
            ("ranks_per_node", Value::Int(n)) => spec.ranks_per_node = n,
            ("cpu_affinity", Value::Text(s)) => spec.cpu_affinity = s,
            ("threads_per_rank", Value::Int(n)) => spec.threads_per_rank = n,
            ("threads_per_core", Value::Int(n)) => spec.threads_per_core = n,
            ("node_packing_count", Value::Int(n)) => spec.node_packing_count = n,
            ("environ_vars", Value::Text(s)) => spec.environ_vars = s,
            ("mpi_flags", Value::Text(s)) => spec.mpi_flags = s,
            ("application", Value::Text(s)) => spec.application = s,
            ("args", Value::Text(s)) => spec.args = s,
            ("user_workdir", Value::Text(s)) => spec.user_workdir = s,
            ("wait_for_parents", Value::Bool(b)) => spec.wait_for_parents = b,
            ("post_error_handler", Value::Bool(b)) => spec.post_error_handler = b,
            ("post_timeout_handler", Value::Bool(b)) => spec.post_timeout_handler = b,
            ("auto_timeout_retry", Value::Bool(b)) => spec.auto_timeout_retry = b,
            ("max_restarts", Value::Int(n)) => spec.max_restarts = n,
            ("data", Value::Json(j)) => spec.data = j,
            (name, v) => unreachable!("field {name} given a value of the wrong kind: {v:?}"),
        }
    }
}

/// The value of a field of a spec, as text (for listings and `BALSAM_LS_FIELDS`).
pub fn get_text(spec: &JobSpec, name: &str) -> Option<String> {
    Some(match name {
        "workflow" => spec.workflow.clone(),
        "name" => spec.name.clone(),
        "description" => spec.description.clone(),
        "input_files" => spec.input_files.clone(),
        "stage_in_url" => spec.stage_in_url.clone(),
        "stage_out_files" => spec.stage_out_files.clone(),
        "stage_out_url" => spec.stage_out_url.clone(),
        "wall_time_minutes" => spec.wall_time_minutes.to_string(),
        "num_nodes" => spec.num_nodes.to_string(),
        "coschedule_num_nodes" => spec.coschedule_num_nodes.to_string(),
        "ranks_per_node" => spec.ranks_per_node.to_string(),
        "cpu_affinity" => spec.cpu_affinity.clone(),
        "threads_per_rank" => spec.threads_per_rank.to_string(),
        "threads_per_core" => spec.threads_per_core.to_string(),
        "node_packing_count" => spec.node_packing_count.to_string(),
        "environ_vars" => spec.environ_vars.clone(),
        "mpi_flags" => spec.mpi_flags.clone(),
        "application" => spec.application.clone(),
        "args" => spec.args.clone(),
        "user_workdir" => spec.user_workdir.clone(),
        "wait_for_parents" => py_bool(spec.wait_for_parents),
        "post_error_handler" => py_bool(spec.post_error_handler),
        "post_timeout_handler" => py_bool(spec.post_timeout_handler),
        "auto_timeout_retry" => py_bool(spec.auto_timeout_retry),
        "max_restarts" => spec.max_restarts.to_string(),
        "data" => spec.data.to_string(),
        _ => return None,
    })
}

/// `True`/`False`, as the talk's confirmation block prints booleans.
pub fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn false_means_false() {
        let f = field("wait_for_parents").unwrap();
        assert_eq!(f.parse_str("False").unwrap(), Value::Bool(false));
        assert_eq!(f.parse_str("false").unwrap(), Value::Bool(false));
        assert_eq!(f.parse_str("True").unwrap(), Value::Bool(true));
        let err = f.parse_str("maybe").unwrap_err().to_string();
        assert!(
            err.contains("wait_for_parents") && err.contains("true or false"),
            "{err}"
        );
    }

    #[test]
    fn counts_and_positives() {
        assert_eq!(
            field("num_nodes").unwrap().parse_str("4").unwrap(),
            Value::Int(4)
        );
        assert!(field("num_nodes").unwrap().parse_str("0").is_err());
        assert!(field("num_nodes").unwrap().parse_str("-1").is_err());
        assert!(field("num_nodes").unwrap().parse_str("two").is_err());
        assert_eq!(
            field("coschedule_num_nodes")
                .unwrap()
                .parse_str("0")
                .unwrap(),
            Value::Int(0)
        );
    }

    #[test]
    fn environ_and_affinity_and_json() {
        let env = field("environ_vars").unwrap();
        assert!(env.parse_str("OMP_NUM_THREADS=1:A=b=c").is_ok());
        assert!(env.parse_str("nonsense").is_err());
        assert!(env.parse_str("").is_ok());
        assert!(field("cpu_affinity").unwrap().parse_str("depth").is_ok());
        assert!(field("cpu_affinity").unwrap().parse_str("deep").is_err());
        assert!(field("data").unwrap().parse_str("{\"a\": 1}").is_ok());
        assert!(field("data").unwrap().parse_str("[1]").is_err());
    }

    #[test]
    fn json_values_take_native_types() {
        let n = field("num_nodes").unwrap();
        assert_eq!(n.parse_json(&serde_json::json!(3)).unwrap(), Value::Int(3));
        assert_eq!(
            n.parse_json(&serde_json::json!("3")).unwrap(),
            Value::Int(3)
        );
        assert!(n.parse_json(&serde_json::json!(-3)).is_err());
        assert!(n.parse_json(&serde_json::json!(true)).is_err());
        let env = field("environ_vars").unwrap();
        assert_eq!(
            env.parse_json(&serde_json::json!({"A": "1"})).unwrap(),
            Value::Text("A=1".into())
        );
    }

    #[test]
    fn absurd_numbers_and_unbalanced_quotes_are_refused() {
        let n = field("num_nodes").unwrap();
        let e = n.parse_str("4294967295").unwrap_err().to_string();
        assert!(e.contains("num_nodes") && e.contains("1 to 1000000"), "{e}");
        assert!(n.parse_str("1000000").is_ok());
        assert!(field("wall_time_minutes")
            .unwrap()
            .parse_str("525601")
            .is_err());
        let a = field("args").unwrap();
        let e = a.parse_str("'x").unwrap_err().to_string();
        assert!(e.contains("args") && e.contains("quote"), "{e}");
        assert!(a.parse_str("--x 'a b' \"c\"").is_ok());
        assert!(field("mpi_flags").unwrap().parse_str("-x \"y").is_err());
    }

    #[test]
    fn unknown_field_lists_valid_ones() {
        let err = field("nodes").err().unwrap().to_string();
        assert!(err.contains("nodes") && err.contains("num_nodes"), "{err}");
    }

    #[test]
    fn every_field_round_trips_through_a_spec() {
        let mut spec = JobSpec::default();
        for f in FIELDS {
            let text = get_text(&spec, f.name).unwrap();
            let v = f
                .parse_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", f.name));
            f.apply(&mut spec, v);
        }
        assert_eq!(spec, JobSpec::default());
    }
}
