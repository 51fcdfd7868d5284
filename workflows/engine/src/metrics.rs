//! The workflow runtime's Prometheus metrics: how long step bodies run and
//! what their external calls answered. A [`WorkflowRuntime`](crate::WorkflowRuntime)
//! owns one set in a registry of its own (not the process-global default
//! registry, so runtimes in parallel tests never see each other's counts); the
//! worker process registers it in the registry its ops endpoint serves
//! (`docs/metrics.md` is the catalogue).
//!
//! Labels are the workflow kind and step name (both come from the code's
//! definitions, so they are bounded) and a small fixed outcome set; never a
//! workflow id.
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Buckets for step bodies: a checkpoint-only step takes well under a
/// millisecond, an exchange call seconds.
const STEP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The runtime's metrics. Cheap to clone (the vectors share their series).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    step_duration: HistogramVec,
    external_calls: IntCounterVec,
}

/// What a step body's run came to, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepRunOutcome {
    /// The body returned its output.
    Ok,
    /// The body returned an error (retried or failed by the workflow's policy).
    Error,
    /// The body's external call left it in doubt.
    InDoubt,
}

impl StepRunOutcome {
    fn label(self) -> &'static str {
        match self {
            StepRunOutcome::Ok => "ok",
            StepRunOutcome::Error => "error",
            StepRunOutcome::InDoubt => "in_doubt",
        }
    }
}

/// The answer an external call got, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// A definite answer.
    Answered,
    /// A definite refusal.
    Rejected,
    /// Known not to have reached the other side.
    NotSent,
    /// Unknown: the step goes in doubt.
    InDoubt,
}

impl CallOutcome {
    fn label(self) -> &'static str {
        match self {
            CallOutcome::Answered => "answered",
            CallOutcome::Rejected => "rejected",
            CallOutcome::NotSent => "not_sent",
            CallOutcome::InDoubt => "in_doubt",
        }
    }
}

impl Metrics {
    /// Fresh metrics in a fresh registry. Fails only on an invalid metric
    /// definition (a bug the catalogue test catches).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let step_duration = HistogramVec::new(
            HistogramOpts::new(
                "ledgerflow_workflow_step_duration_seconds",
                "Time a workflow step's body ran (its checkpoint excluded), per workflow kind, \
                 step and outcome",
            )
            .buckets(STEP_BUCKETS.to_vec()),
            &["workflow", "step", "outcome"],
        )?;
        let external_calls = IntCounterVec::new(
            Opts::new(
                "ledgerflow_external_calls_total",
                "External calls made by workflow steps, per workflow kind and answer",
            ),
            &["workflow", "outcome"],
        )?;
        registry.register(Box::new(step_duration.clone()))?;
        registry.register(Box::new(external_calls.clone()))?;
        Ok(Self {
            registry,
            step_duration,
            external_calls,
        })
    }

    /// The registry holding these metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers these metrics in `other` too (the process's registry).
    pub fn register_in(&self, other: &Registry) -> Result<(), prometheus::Error> {
        other.register(Box::new(self.step_duration.clone()))?;
        other.register(Box::new(self.external_calls.clone()))
    }

    /// Records one run of a step body.
    pub(crate) fn step_ran(
        &self,
        workflow: &str,
        step: &str,
        outcome: StepRunOutcome,
        took: std::time::Duration,
    ) {
        self.step_duration
            .with_label_values(&[workflow, step, outcome.label()])
            .observe(took.as_secs_f64());
    }

    /// Counts one external call's answer.
    pub(crate) fn call_answered(&self, workflow: &str, outcome: CallOutcome) {
        self.external_calls
            .with_label_values(&[workflow, outcome.label()])
            .inc();
    }
}
