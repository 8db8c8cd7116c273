//! The Balsam database: one row per planned application run, its dependencies, its full state
//! history, and the launcher sessions and batch launches that run it.
//!
//! All SQL lives in this crate; the command line, the launcher and the service call the typed
//! functions of [`Store`]. The state machine ([`state`]) is enforced here and only here, every
//! state change writes its event, and leases ([`leases`]) guarantee that no two launchers hold
//! the same job.

pub mod db;
pub mod dir;
pub mod error;
pub mod fields;
pub mod jobs;
pub mod launches;
pub mod leases;
pub mod lifecycle;
pub mod model;
mod pg;
pub mod procid;
mod schema;
pub mod server_info;
pub mod settings;
pub mod sql;
pub mod state;

pub use db::{Store, DEFAULT_PATIENCE, PG_SCHEMA_VERSION, SCHEMA_VERSION};
pub use dir::{DbDir, DB_FILE};
pub use error::{Error, Result};
pub use jobs::{ImportLine, JobFilter, NewJob, WorkflowSummary};
pub use leases::{Expired, LeaseFilter, LeaseGroup, Outlook, RunnableGroup, WorkShape};
pub use lifecycle::{Outcome, RestartCount, Transition};
pub use model::{
    format_time_us, new_job_id, now_us, parse_environ_vars, Application, Event, Job, JobSpec,
    QueuedLaunch, Session, SessionInfo, DEFAULT_MAX_RESTARTS,
};
pub use server_info::ServerInfo;
pub use settings::Settings;
pub use sql::Backend;
pub use state::{Actor, State, ALL_STATES, END_STATES, PROCESSABLE_STATES, RUNNABLE_STATES};
pub use uuid::Uuid;
