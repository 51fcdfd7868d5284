//! Handlers, the context they receive, and the registry that maps job kinds
//! to handlers.
use futures::future::BoxFuture;
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::{FencedTx, Lease, Outcome, Store};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// Runs one kind of job. Return an [`Outcome`]; the engine decides what it
/// means for the row. To commit your own writes together with the job's
/// completion, open [`JobContext::begin`] and finish through it.
pub trait Handler: Send + Sync + 'static {
    /// Performs one attempt.
    fn perform(&self, ctx: JobContext) -> BoxFuture<'static, Outcome>;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn perform(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(self(ctx))
    }
}

/// What a handler gets: the claimed job and the store.
#[derive(Debug, Clone)]
pub struct JobContext {
    job: Arc<ClaimedJob>,
    store: Store,
}

impl JobContext {
    /// A context for `job` (the runner builds these; tests may too).
    pub fn new(job: ClaimedJob, store: Store) -> Self {
        Self {
            job: Arc::new(job),
            store,
        }
    }

    /// The claimed job.
    pub fn job(&self) -> &ClaimedJob {
        &self.job
    }

    /// The attempt's lease.
    pub fn lease(&self) -> &Lease {
        &self.job.lease
    }

    /// The store (to enqueue follow-up work).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The job's arguments decoded as `T`.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.job.args)
    }

    /// Opens a transaction fenced by this attempt's lease: the handler's writes
    /// and the job's outcome commit together, or — if the lease was lost —
    /// not at all.
    pub async fn begin(&self) -> ledgerflow_engine::Result<FencedTx> {
        FencedTx::begin(&self.store, &self.job.lease).await
    }
}

/// Job kind → handler.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for jobs of `kind` (a stable string, not a type name).
    pub fn register(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Registers a workflow runtime's step handler for its job kind
    /// ([`ledgerflow_engine::WORKFLOW_JOB_KIND`]): the one way workflows are wired.
    pub fn workflows(self, handler: ledgerflow_engine::StepHandler) -> Self {
        self.register(
            ledgerflow_engine::StepHandler::KIND,
            move |ctx: JobContext| {
                let handler = handler.clone();
                async move { handler.run(ctx.job()).await.outcome }
            },
        )
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }
}
