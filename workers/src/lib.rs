//! Ledgerflow's worker process.
//!
//! - [`runner`] — job runners: claim with leases, run handlers on apalis
//!   workers, heartbeat, finish through the lease fence, rescue and promote,
//!   drain gracefully on shutdown.
//!
//! Kafka ingress consumers, the cron scheduler and the outbox relay join this
//! crate as their own modules; [`telemetry`] installs every binary's logs and
//! traces, [`ingress::trace`] continues a consumed message's trace.

pub mod dead_letters;
pub mod ingress;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod relay;
pub mod runner;
pub mod scheduler;
pub mod telemetry;

pub use runner::{Handler, JobContext, QueueConfig, Registry, Runner, RunnerConfig, RunnerHandle};
