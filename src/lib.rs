//! What the `balsam` command does beyond one store query: launcher jobs in the batch queue
//! ([`batch`]: `submit-launch`, `ls queues`) and the service that keeps them flowing
//! ([`service`]). The store, the launcher's transitions and the scheduler adapters do the work;
//! these modules tie them to one database directory and its settings.

pub mod batch;
pub mod service;
