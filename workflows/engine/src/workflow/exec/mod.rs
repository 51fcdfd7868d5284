//! Execution (layer 7): what one delivery of a step job does, on every path.
//!
//! A delivery runs its step and — with inline continuation — the successors that are due now
//! in the same queue, each checkpointed before the next starts ([`StepHandler::run`]). Which
//! path a step takes:
//! - the **locked** path ([`locked`]): a transaction of its own, fenced by the lease, holding
//!   the workflow row while the body runs; signals, timeouts, retries, compensations
//!   ([`saga`]), reconcile hooks ([`in_doubt`]) and re-deliveries always go this way;
//! - a delivery's first step may be **held** by a locked batch (`batch::held`), and a successor
//!   moved on inline runs **optimistically** ([`optimistic`]): both run the body without a
//!   transaction of their own, open one lazily when the body needs the database or makes its
//!   external call, and otherwise checkpoint through the batch or the group committer;
//! - whatever ends a step on the locked path ([`after`]) — its checkpoint, its failure, its
//!   doubt, its signal wait — is written by the `db` layer's transitions.
use super::db::StepAt;
use super::db::lock::{Journal, Locked};
use super::definition::Workflow;
use super::runtime::WorkflowRuntime;
use super::state::WorkflowState;
use super::wire::{StepArgs, WORKFLOW_JOB_KIND};
use crate::metrics::StepRunOutcome;
use crate::store::ClaimedJob;
use crate::{Outcome, Store};
use std::collections::{HashMap, HashSet};
use tracing::Instrument;

pub(crate) mod after;
pub(crate) mod in_doubt;
pub(crate) mod locked;
pub(crate) mod optimistic;
pub(crate) mod saga;

/// What [`StepHandler::run`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepsRun {
    /// The outcome for the runner: whenever a step checkpointed, the job's outcome is committed
    /// with it already (the lease reports [`crate::Lease::is_finished`]); otherwise — a step
    /// error, a stale lease, a database error — the `Retry` is for the runner to record.
    pub outcome: Outcome,
    /// The step the last run was for (`None` when the job's arguments were not a step's).
    pub last_step: Option<String>,
    /// How many steps ran (1 + those continued inline).
    pub steps: u32,
}

/// The handler of [`WORKFLOW_JOB_KIND`] jobs: runs the step a claimed job stands for (and,
/// inline, its due successors) with its runtime's [`super::runtime::ExecConfig`]. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct StepHandler {
    runtime: WorkflowRuntime,
}

impl WorkflowRuntime {
    /// The one handler of the [`WORKFLOW_JOB_KIND`] job kind for this runtime: register it
    /// with the worker's runner (the worker binary, the benchmark and the tests all do).
    pub fn handler(&self) -> StepHandler {
        StepHandler {
            runtime: self.clone(),
        }
    }
}

impl StepHandler {
    /// The job kind this handler runs.
    pub const KIND: &'static str = WORKFLOW_JOB_KIND;

    /// The runtime it runs with.
    pub fn runtime(&self) -> &WorkflowRuntime {
        &self.runtime
    }

    /// Runs the step `job` stands for, and its due successors inline when the runtime's
    /// configuration allows.
    ///
    /// A row is moved on only when the per-step attempt accounting stays exact: on its first
    /// attempt (the successor starts at attempt 1 too, and the row has no `job_attempts` rows to
    /// collide with), with the workflow's attempt budget, and without a job timeout (the
    /// runner's timeout covers the whole call, which could cut a later step short). Timers,
    /// signal waits, compensations, in-doubt steps, other queues and a cancelled workflow end
    /// the chain the ordinary way; so does the inline bound. Every step still commits its own
    /// lease-fenced checkpoint before the next one starts, so a crash between steps leaves the
    /// row `running` on the next step; its lease expires, the reaper makes it available again
    /// and the re-delivery reads the journal (a completed step never runs again).
    pub async fn run(&self, job: &ClaimedJob) -> StepsRun {
        let rt = &self.runtime;
        let inline = rt.config().inline;
        let deadline = std::time::Instant::now().checked_add(inline.budget);
        let mut current = std::borrow::Cow::Borrowed(job);
        let mut steps: u32 = 0;
        // What the last checkpoint knows of the workflow after moving the row on itself: the
        // successor runs against it without reading it again.
        let mut carried: Option<Snapshot> = None;
        loop {
            let args: StepArgs = match serde_json::from_value(current.args.clone()) {
                Ok(a) => a,
                Err(e) => {
                    let outcome = Outcome::fail(format!("bad workflow step arguments: {e}"));
                    return StepsRun {
                        outcome: record_inlined(rt.store(), &current, steps, outcome).await,
                        last_step: None,
                        steps,
                    };
                }
            };
            // Checked again at the checkpoint: the step's own run counts too.
            let may_move = (steps < inline.max_steps
                && current.timeout.is_none()
                && current.lease.attempt == 1)
                .then_some(deadline)
                .flatten();
            let run = Run {
                rt,
                job: &current,
                args: &args,
                inline: may_move,
            };
            let mut next = Continued::default();
            let outcome = match locked::run_step(run, carried.take(), &mut next)
                .instrument(step_span(&current, &args))
                .await
            {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::warn!(job_id = %current.id, workflow_id = %args.workflow_id,
                        step = %args.step, error = %e, "workflow step not checkpointed");
                    Outcome::retry(e)
                }
            };
            steps = steps.saturating_add(1);
            match next.moved {
                Some(moved) => {
                    current = std::borrow::Cow::Owned(moved);
                    carried = next.carry;
                }
                None => {
                    return StepsRun {
                        outcome: record_inlined(rt.store(), &current, steps, outcome).await,
                        last_step: Some(args.step),
                        steps,
                    };
                }
            }
        }
    }
}

/// Counts one run of a step body in the runtime's metrics: in doubt when its external call
/// left it so, else by what the body returned.
pub(crate) fn step_timed(
    rt: &WorkflowRuntime,
    (kind, step): (&str, &str),
    started: std::time::Instant,
    result: &crate::workflow::outcome::StepResult,
    flagged: bool,
) {
    let Some(metrics) = rt.metrics() else { return };
    let outcome = match (flagged, result) {
        (true, _) => StepRunOutcome::InDoubt,
        (false, Ok(_)) => StepRunOutcome::Ok,
        (false, Err(_)) => StepRunOutcome::Error,
    };
    metrics.step_ran(kind, step, outcome, started.elapsed());
}

/// Records the outcome of a step that ran inline and did not commit one itself, with that
/// step's own lease (its start; the runner's copy has the first step's). When that fails the
/// runner records it with its copy, which has the same token, attempt and budget.
async fn record_inlined(store: &Store, job: &ClaimedJob, steps: u32, outcome: Outcome) -> Outcome {
    if steps <= 1 || job.lease.is_finished() {
        return outcome;
    }
    match store.job_finish(&job.lease, &outcome).await {
        Ok(()) => job.lease.mark_finished(),
        Err(e) => tracing::warn!(job_id = %job.id, error = %e,
            "recording an inlined step's outcome failed; left to the runner"),
    }
    outcome
}

/// The span of one step attempt (none with tracing off): a child of the job's span, which
/// continues the context stored with the job; the path it takes is recorded by [`record_path`].
fn step_span(job: &ClaimedJob, args: &StepArgs) -> tracing::Span {
    if !crate::trace::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "workflow.step",
        otel.name = %format_args!("step {}", args.step),
        workflow.id = %args.workflow_id,
        workflow.step = %args.step,
        job.id = %job.id,
        attempt = job.lease.attempt,
        lease.token = %job.lease.token,
        exec.path = tracing::field::Empty,
    )
}

/// Records on the current step span which path the step took: `inline` (a successor this
/// delivery moved its row on to, run optimistically), `batch` (a first step held by a locked
/// batch, run optimistically) or `locked`.
pub(crate) fn record_path(path: &'static str) {
    if crate::trace::enabled() {
        tracing::Span::current().record("exec.path", path);
    }
}

/// One delivery's step run: the runtime, the job, its decoded arguments, and until when (if at
/// all) the successor may run inline.
#[derive(Clone, Copy)]
pub(crate) struct Run<'a> {
    pub rt: &'a WorkflowRuntime,
    pub job: &'a ClaimedJob,
    pub args: &'a StepArgs,
    pub inline: Option<std::time::Instant>,
}

impl Run<'_> {
    /// True when a checkpoint of a step of `def` on workflow `wf` may move this job row on to a
    /// successor due now: same queue, same attempt budget, within the inline bound.
    pub fn may_move(&self, wf: &Locked, def: &Workflow) -> bool {
        wf.queue == self.job.queue
            && self.job.lease.max_attempts == def.max_attempts
            && self
                .inline
                .is_some_and(|deadline| std::time::Instant::now() < deadline)
    }
}

/// What a step's run hands to the next round of [`StepHandler::run`]: the job row moved on to
/// the successor, and what the successor may run against without reading it again.
#[derive(Default)]
pub(crate) struct Continued {
    pub moved: Option<ClaimedJob>,
    pub carry: Option<Snapshot>,
}

/// The workflow row and the names and outputs of its journaled steps as a checkpoint that
/// moved its job row on inline left them: what the successor runs against without a lock.
pub(crate) struct Snapshot {
    pub wf: Locked,
    /// Steps with a journal row (any status).
    pub journaled: HashSet<String>,
    /// Outputs of the completed (and compensated) steps.
    pub outputs: HashMap<String, serde_json::Value>,
}

impl Snapshot {
    /// The snapshot a journal read gives (a locked batch's rows).
    pub fn of(wf: Locked, journal: Journal) -> Self {
        Self {
            wf,
            journaled: journal.names,
            outputs: journal.outputs,
        }
    }

    /// True when `step` may run optimistically: it is the workflow's current step, never
    /// journaled (no earlier attempt left an intent, a failure or a doubt behind), and the
    /// workflow runs or sleeps on a timer. Anything else takes the locked path.
    pub fn runs_optimistically(&self, step: &str) -> bool {
        let runnable = match self.wf.state {
            WorkflowState::Running => true,
            WorkflowState::Waiting => self.wf.wait_signal_name.is_none(),
            _ => false,
        };
        runnable && self.wf.current_step.as_deref() == Some(step) && !self.journaled.contains(step)
    }
}

/// Step `idx` of `def` on workflow `wf`, as the `db` layer's statements take it.
pub(crate) fn step_at<'a>(wf: &'a Locked, def: &'a Workflow, idx: usize) -> StepAt<'a> {
    StepAt {
        workflow_id: wf.id,
        queue: &wf.queue,
        step: def.steps[idx].name,
        position: super::db::position(idx),
        max_attempts: def.max_attempts,
    }
}
