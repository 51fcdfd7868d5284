//! The apalis backend over the engine's Postgres queue.
//!
//! Claiming is done by the runner's fetcher (batched `FOR UPDATE SKIP LOCKED`
//! claims with leases, see `fetcher.rs`); this backend hands each claimed job
//! to the apalis [`Worker`](apalis_core::worker::Worker) that runs the service
//! stack. It deliberately carries no acknowledgement logic of its own: an
//! attempt's outcome is committed through the lease fence by the dispatch
//! service, never by a deferred ack (see docs/decisions/0001-apalis.md).
use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::task_id::RandomId;
use apalis_core::worker::context::WorkerContext;
use ledgerflow_engine::store::ClaimedJob;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tower::layer::util::Identity;

/// A claimed job on its way to a handler, holding one unit of its queue's
/// capacity (handler slots plus prefetch) until the handler is done.
#[derive(Debug)]
pub struct Claimed {
    /// The job and its lease.
    pub job: ClaimedJob,
    pub(crate) permit: OwnedSemaphorePermit,
    /// When the claim returned it (the claim-to-start latency starts here).
    pub(crate) claimed_at: std::time::Instant,
}

/// Yields claimed jobs to an apalis worker; ends when the fetcher stops.
#[derive(Debug)]
pub struct EngineBackend {
    rx: mpsc::UnboundedReceiver<Claimed>,
}

impl EngineBackend {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<Claimed>) -> Self {
        Self { rx }
    }
}

/// The backend never fails on its own; errors live in the fetcher.
#[derive(Debug, thiserror::Error)]
#[error("engine backend error")]
pub struct BackendError;

impl Backend for EngineBackend {
    type Task = Task<Claimed>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|job| job.map(|j| Ok(Task::new(j))))
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        self.rx.close();
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for EngineBackend {
    type Args = Claimed;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        Identity::new()
    }
}
