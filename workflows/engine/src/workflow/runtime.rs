//! [`WorkflowRuntime`] (layer 6): a process's workflow definitions, the batching tasks that run
//! their steps and starts, and the [`ExecConfig`] that says which execution mechanisms are on.
//! Its handler (`WorkflowRuntime::handler`, in `exec`) is the one way to run the
//! [`crate::workflow::WORKFLOW_JOB_KIND`] job kind; `WorkflowRuntime::start` (in `entry`) the
//! batched way to start a workflow.
use super::batch::checkpoint::Checkpointer;
use super::batch::gates::Gates;
use super::batch::held::{LockBatchStats, LockBatcher};
use super::batch::start::StartBatcher;
use super::registry::WorkflowRegistry;
use crate::Store;
use crate::metrics::Metrics;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How far one delivery of a step job may carry its workflow inline: after a step's
/// checkpoint, a successor due now in the same queue runs in the same delivery, on the same job
/// row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inline {
    /// Steps run after the delivered one, at most.
    pub max_steps: u32,
    /// No step is moved on to once this long has passed since the delivery started, so one
    /// workflow does not hold a worker slot for long.
    pub budget: Duration,
}

impl Inline {
    /// One step per delivery: every successor is enqueued as its own job.
    pub const OFF: Inline = Inline {
        max_steps: 0,
        budget: Duration::ZERO,
    };
}

impl Default for Inline {
    /// Up to 8 more steps within 250 ms: enough to run short workflows in one delivery, short
    /// enough that a long chain yields its slot (and the next delivery is claimed in priority
    /// order like any other job).
    fn default() -> Self {
        Self {
            max_steps: 8,
            budget: Duration::from_millis(250),
        }
    }
}

/// Which execution mechanisms run a workflow's steps. Each is an optimisation over the
/// one-at-a-time locked path; switching one off takes the path that is already its fallback,
/// and every combination keeps the same guarantees (the engine's conformance suite runs every
/// workflow behaviour under each and compares the rows they leave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecConfig {
    /// Inline continuation ([`Inline::OFF`]: every successor is a job of its own).
    pub inline: Inline,
    /// Deliveries' first steps that arrive together run under one transaction's locks and
    /// checkpoint in one statement (decision 0004). Off: each locks on its own.
    pub locked_batches: bool,
    /// Steps that ran without the lock and need nothing but their checkpoint go to the group
    /// committer (many workflows' checkpoints, one statement). Off: they take the locked path.
    pub group_commit: bool,
}

impl Default for ExecConfig {
    /// Today's production behaviour: everything on.
    fn default() -> Self {
        Self {
            inline: Inline::default(),
            locked_batches: true,
            group_commit: true,
        }
    }
}

impl ExecConfig {
    /// Only the one-at-a-time locked path: one step per delivery, each in its own transaction.
    pub const LOCKED_ONLY: ExecConfig = ExecConfig {
        inline: Inline::OFF,
        locked_batches: false,
        group_commit: false,
    };

    /// The same with `inline` continuation.
    pub fn inline(self, inline: Inline) -> Self {
        Self { inline, ..self }
    }

    /// The same with locked batches on or off.
    pub fn locked_batches(self, on: bool) -> Self {
        Self {
            locked_batches: on,
            ..self
        }
    }

    /// The same with group commit on or off.
    pub fn group_commit(self, on: bool) -> Self {
        Self {
            group_commit: on,
            ..self
        }
    }
}

/// A process's workflow runtime; cheap to clone (clones share everything).
#[derive(Debug, Clone)]
pub struct WorkflowRuntime {
    /// The store its starts and steps use (a runtime made by [`WorkflowRuntime::with_notify`]
    /// differs from its origin only here).
    store: Store,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Arc<WorkflowRegistry>,
    config: ExecConfig,
    /// The batching tasks, started on first use (on the runtime of that caller).
    checkpointer: OnceLock<Checkpointer>,
    lock_batcher: OnceLock<LockBatcher>,
    start_batcher: OnceLock<StartBatcher>,
    /// In-process turns of one workflow's deliveries.
    gates: Arc<Gates>,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Step durations and external call outcomes (`None` only if they could not be built).
    metrics: Option<Metrics>,
}

impl WorkflowRuntime {
    /// A runtime with the production [`ExecConfig`].
    pub fn new(store: Store, registry: impl Into<Arc<WorkflowRegistry>>) -> Self {
        Self::with_config(store, registry, ExecConfig::default())
    }

    /// A runtime with explicit execution mechanisms.
    pub fn with_config(
        store: Store,
        registry: impl Into<Arc<WorkflowRegistry>>,
        config: ExecConfig,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            store,
            inner: Arc::new(Inner {
                registry: registry.into(),
                config,
                checkpointer: OnceLock::new(),
                lock_batcher: OnceLock::new(),
                start_batcher: OnceLock::new(),
                gates: Arc::default(),
                stop,
                tasks: std::sync::Mutex::new(Vec::new()),
                metrics: Metrics::new()
                    .inspect_err(|e| tracing::error!(error = %e, "workflow metrics unavailable"))
                    .ok(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Its step and external call metrics, to register in the process's registry.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.inner.metrics.as_ref()
    }

    /// The same runtime (sharing its batching tasks) whose starts send NOTIFY or not: a caller
    /// that sends its own wake-up after the commit starts workflows with `false`, so its
    /// commits do not take Postgres' global notify lock. Checkpoints send no NOTIFY either way.
    pub fn with_notify(&self, notify: bool) -> Self {
        Self {
            store: self.store.clone().with_notify(notify),
            inner: self.inner.clone(),
        }
    }

    /// The definitions.
    pub fn registry(&self) -> &Arc<WorkflowRegistry> {
        &self.inner.registry
    }

    /// The execution mechanisms.
    pub fn config(&self) -> &ExecConfig {
        &self.inner.config
    }

    /// What the locked batches of deliveries' first steps have done so far (all zero until the
    /// first is needed).
    pub fn lock_batch_stats(&self) -> LockBatchStats {
        self.inner
            .lock_batcher
            .get()
            .map(LockBatcher::stats)
            .unwrap_or_default()
    }

    /// Stops the batching tasks once what they hold has gone out: new checkpoints and starts
    /// take their one-at-a-time paths from now on (the runtime keeps working, unbatched).
    /// Returns when the tasks have ended.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            let _ = task.await;
        }
    }

    fn stopping(&self) -> bool {
        *self.inner.stop.borrow()
    }

    fn keep(&self, task: JoinHandle<()>) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// The group committer, when group commit is on (started on first use).
    pub(crate) fn checkpointer(&self) -> Option<&Checkpointer> {
        if !self.inner.config.group_commit || self.stopping() {
            return None;
        }
        let store = &self.store;
        Some(self.inner.checkpointer.get_or_init(|| {
            let stop = self.inner.stop.subscribe();
            let (batcher, task) = Checkpointer::start(
                store.pool().clone(),
                store.clock().clone(),
                store.config().lease_ttl,
                stop,
            );
            self.keep(task);
            batcher
        }))
    }

    /// The locked batches, when they are on (started on first use).
    pub(crate) fn lock_batcher(&self) -> Option<&LockBatcher> {
        if !self.inner.config.locked_batches || self.stopping() {
            return None;
        }
        let store = &self.store;
        Some(self.inner.lock_batcher.get_or_init(|| {
            let stop = self.inner.stop.subscribe();
            let (batcher, task) = LockBatcher::start(
                store.pool().clone(),
                store.clock().clone(),
                store.config().lease_ttl,
                stop,
            );
            self.keep(task);
            batcher
        }))
    }

    /// The group committer of starts (started on first use; `None` once shutting down).
    pub(crate) fn start_batcher(&self) -> Option<&StartBatcher> {
        if self.stopping() {
            return None;
        }
        let store = &self.store;
        Some(self.inner.start_batcher.get_or_init(|| {
            let stop = self.inner.stop.subscribe();
            let (batcher, task) =
                StartBatcher::start(store.pool().clone(), store.clock().clone(), stop);
            self.keep(task);
            batcher
        }))
    }

    /// The in-process turns of workflow deliveries.
    pub(crate) fn gates(&self) -> &Arc<Gates> {
        &self.inner.gates
    }
}
