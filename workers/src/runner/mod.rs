//! Job runners: the worker side of the engine's queue.
//!
//! Per queue, a fetcher claims batches of jobs under leases (woken by
//! LISTEN/NOTIFY, with a polling fallback) and feeds them to an apalis worker
//! whose service runs the handler and records its outcome through the lease
//! fence. Shared by all queues of a runner:
//! - the in-flight registry, which the heartbeat task uses to extend leases;
//! - the completer, which commits successful attempts in batches (one
//!   statement and one commit for many jobs — group commit);
//! - maintenance: the lease reaper, the promoter of due scheduled/retryable
//!   jobs, and (optionally) the pruner.
//!
//! Shutdown stops claiming, lets in-flight attempts finish within the grace
//! period, then releases the leases of whatever is unfinished (including jobs
//! prefetched but not started) so another worker picks them up at once.
mod backend;
mod completer;
mod dispatch;
mod fetcher;
mod handler;
mod maintenance;

pub use backend::EngineBackend;
pub use handler::{Handler, JobContext, Registry};

use apalis_core::worker::builder::WorkerBuilder;
use ledgerflow_engine::notify::{Listener, Wakeup};
use ledgerflow_engine::{JobId, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::limit::ConcurrencyLimitLayer;
use uuid::Uuid;

/// One queue a runner works.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The queue's name.
    pub name: String,
    /// Handlers running at once in this process.
    pub concurrency: usize,
    /// Jobs claimed ahead of free handler slots, so claims and completions
    /// are batched even when handlers are fast.
    pub prefetch: usize,
}

impl QueueConfig {
    /// A queue with `concurrency` handler slots and as many prefetched jobs.
    pub fn new(name: impl Into<String>, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            name: name.into(),
            concurrency,
            prefetch: concurrency,
        }
    }

    /// Sets the prefetch depth.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Parses `name=concurrency[:prefetch]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("queue spec {spec:?} is not name=concurrency"))?;
        let (conc, pre) = match rest.split_once(':') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let conc: usize = conc
            .parse()
            .map_err(|_| format!("bad concurrency in queue spec {spec:?}"))?;
        let mut q = QueueConfig::new(name.trim(), conc);
        if let Some(p) = pre {
            q.prefetch = p
                .parse()
                .map_err(|_| format!("bad prefetch in queue spec {spec:?}"))?;
        }
        if q.name.is_empty() {
            return Err(format!("empty queue name in {spec:?}"));
        }
        Ok(q)
    }
}

/// Settings of a [`Runner`].
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This process's worker id (lease owner).
    pub worker_id: String,
    /// The queues to work.
    pub queues: Vec<QueueConfig>,
    /// LISTEN for wake-ups (turn off behind poolers that can't LISTEN).
    pub listen: bool,
    /// How often to look for work without a wake-up.
    pub poll_interval: Duration,
    /// How often leases of in-flight attempts are extended.
    pub heartbeat_interval: Duration,
    /// How often the reaper looks for expired leases.
    pub rescue_interval: Duration,
    /// How often due scheduled/retryable jobs are made available.
    pub promote_interval: Duration,
    /// How long finished jobs are kept (None: never pruned by this runner).
    pub retention: Option<Retention>,
    /// Most jobs claimed by one statement.
    pub max_claim_batch: usize,
    /// Most completions committed by one statement.
    pub max_complete_batch: usize,
    /// Where job durations, outcomes and claim-to-start latencies are
    /// recorded (`None`: not measured).
    pub metrics: Option<crate::metrics::RunnerMetrics>,
    /// Priority aging: every period, each available job with a priority above 0 that has
    /// waited longer than the period moves up a level (None: no aging by this runner).
    pub priority_aging: Option<Duration>,
}

/// How long finished jobs are kept before the pruner deletes them.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Completed jobs.
    pub completed: Duration,
    /// Failed, cancelled and discarded jobs (dead letters).
    pub dead: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", Uuid::new_v4().simple()),
            queues: vec![QueueConfig::new(ledgerflow_engine::job::DEFAULT_QUEUE, 32)],
            listen: true,
            poll_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(3),
            rescue_interval: Duration::from_secs(1),
            promote_interval: Duration::from_millis(250),
            retention: Some(Retention {
                completed: Duration::from_secs(24 * 3600),
                dead: Duration::from_secs(30 * 24 * 3600),
            }),
            max_claim_batch: 500,
            max_complete_batch: 1000,
            metrics: None,
            priority_aging: Some(Duration::from_secs(60)),
        }
    }
}

/// State shared by the runner's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub registry: Registry,
    pub owner: Arc<str>,
    /// Leases held by this process: job id → token.
    pub in_flight: Mutex<HashMap<JobId, Uuid>>,
    /// Stop claiming.
    pub stop_claiming: CancellationToken,
    /// Stop background services.
    pub stop_services: CancellationToken,
    pub config: RunnerConfig,
}

impl Shared {
    pub(crate) fn hold(&self, id: JobId, token: Uuid) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, token);
    }

    pub(crate) fn drop_lease(&self, id: JobId) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub(crate) fn held(&self) -> Vec<(JobId, Uuid)> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}

/// Builds and starts runners.
#[derive(Debug)]
pub struct Runner;

/// A started runner. Drop does not stop it: call [`RunnerHandle::shutdown`].
#[derive(Debug)]
pub struct RunnerHandle {
    shared: Arc<Shared>,
    fetchers: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    services: Vec<JoinHandle<()>>,
    completer: completer::CompleterHandle,
    executing: Arc<dispatch::Executing>,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Attempts still running when the grace period ended (aborted).
    pub aborted: usize,
    /// Leases given back so other workers can take the jobs at once.
    pub released: u64,
}

impl Runner {
    /// Starts working `config.queues` with the handlers in `registry`.
    pub async fn start(
        store: Store,
        registry: Registry,
        config: RunnerConfig,
    ) -> ledgerflow_engine::Result<RunnerHandle> {
        let shared = Arc::new(Shared {
            owner: Arc::from(config.worker_id.as_str()),
            store: store.clone(),
            registry,
            in_flight: Mutex::new(HashMap::new()),
            stop_claiming: CancellationToken::new(),
            stop_services: CancellationToken::new(),
            config: config.clone(),
        });
        if let Some(m) = &config.metrics {
            m.declare_queues(config.queues.iter().map(|q| q.name.as_str()));
        }
        let completer = completer::start(shared.clone());
        let executing = Arc::new(dispatch::Executing::default());

        let mut wakers: HashMap<String, Arc<Notify>> = HashMap::new();
        let mut fetchers = Vec::new();
        let mut workers = Vec::new();
        for q in &config.queues {
            let wake = Arc::new(Notify::new());
            wakers.insert(q.name.clone(), wake.clone());
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let capacity = Arc::new(Semaphore::new(q.concurrency + q.prefetch));
            fetchers.push(tokio::spawn(fetcher::run(
                shared.clone(),
                q.clone(),
                wake.clone(),
                capacity.clone(),
                tx,
            )));
            let service = dispatch::Dispatch::new(
                shared.clone(),
                completer.sender(),
                executing.clone(),
                wake,
            );
            let worker = WorkerBuilder::new(format!("{}/{}", config.worker_id, q.name))
                .backend(EngineBackend::new(rx))
                .layer(ConcurrencyLimitLayer::new(q.concurrency))
                .build(service);
            // The worker stops (after its in-flight attempts) once claiming
            // stops; apalis needs the explicit stop to finish.
            let stop = shared.stop_claiming.clone();
            workers.push(tokio::spawn(async move {
                let stopped = async move {
                    stop.cancelled().await;
                    Ok::<(), apalis_core::error::WorkerError>(())
                };
                if let Err(e) = worker.run_until(stopped).await {
                    tracing::error!(error = %e, "apalis worker stopped with an error");
                }
            }));
        }

        let mut services = vec![
            tokio::spawn(maintenance::heartbeat(shared.clone())),
            tokio::spawn(maintenance::reaper(shared.clone())),
            tokio::spawn(maintenance::promoter(shared.clone())),
        ];
        if config.retention.is_some() {
            services.push(tokio::spawn(maintenance::pruner(shared.clone())));
        }
        if config.priority_aging.is_some() {
            services.push(tokio::spawn(maintenance::ager(shared.clone())));
        }
        if config.listen {
            services.push(tokio::spawn(listen(shared.clone(), wakers)));
        }
        Ok(RunnerHandle {
            shared,
            fetchers,
            workers,
            services,
            completer,
            executing,
        })
    }
}

/// Routes LISTEN wake-ups to the fetchers. After a lost connection every
/// fetcher is woken once, since notifications may have been missed.
async fn listen(shared: Arc<Shared>, wakers: HashMap<String, Arc<Notify>>) {
    let wake_all = || wakers.values().for_each(|w| w.notify_one());
    let mut listener: Option<Listener> = None;
    loop {
        if shared.stop_claiming.is_cancelled() {
            return;
        }
        let l = match listener.as_mut() {
            Some(l) => l,
            None => {
                let connected = tokio::select! {
                    _ = shared.stop_claiming.cancelled() => return,
                    r = Listener::connect(shared.store.pool()) => r,
                };
                match connected {
                    Ok(l) => {
                        wake_all();
                        listener.insert(l)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                        tokio::select! {
                            _ = shared.stop_claiming.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                }
            }
        };
        let got = tokio::select! {
            _ = shared.stop_claiming.cancelled() => return,
            r = l.recv() => r,
        };
        match got {
            Ok(Some(Wakeup::Jobs(queue) | Wakeup::Control(queue))) => {
                if let Some(w) = wakers.get(&queue) {
                    w.notify_one();
                }
            }
            Ok(None) => wake_all(),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                listener = None;
                wake_all();
            }
        }
    }
}

impl RunnerHandle {
    /// This runner's worker id (its leases' owner).
    pub fn worker_id(&self) -> &str {
        &self.shared.owner
    }

    /// Attempts currently held (claimed and not yet finished).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Stops claiming, waits up to `grace` for running attempts to finish,
    /// then aborts the rest and releases every lease still held.
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        self.shared.stop_claiming.cancel();
        for f in self.fetchers {
            let _ = f.await;
        }
        // Fetchers are gone, so the backends end once their channels drain;
        // the apalis workers then finish when their last attempt does.
        let drained = async {
            for w in &self.workers {
                while !w.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let timed_out = tokio::time::timeout(grace, drained).await.is_err();
        let mut aborted = 0;
        if timed_out {
            aborted = self.executing.abort_all();
            for w in &self.workers {
                w.abort();
            }
        }
        for w in self.workers {
            let _ = w.await;
        }
        // Commit every completion already handed over before giving back the
        // leases that remain, so no finished work is re-run.
        self.completer.close().await;
        let left = self.shared.held();
        let released = match self.shared.store.job_release(&left).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, leases = left.len(), "could not release leases; the reaper will rescue them");
                0
            }
        };
        self.shared.stop_services.cancel();
        for s in self.services {
            s.abort();
            let _ = s.await;
        }
        ShutdownReport { aborted, released }
    }
}
