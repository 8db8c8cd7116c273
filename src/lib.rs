//! What the `balsam` command does beyond one store query: launcher jobs in the batch queue
//! ([`batch`]: `submit-launch`, `ls queues`), the service that keeps them flowing
//! ([`service`]), and the launcher's command line with the check that a job script starts a
//! launcher ([`launcher_line`]). The store, the launcher's transitions and the scheduler adapters
//! do the work; these modules tie them to one database directory and its settings.

pub mod batch;
pub mod launcher_line;
pub mod service;
