//! The step jobs' wire format: why a step job runs ([`Wake`]), its arguments and unique keys,
//! and the steps' idempotency keys (layer 1: pure). Stored in job rows, so changed only
//! compatibly; the golden tests below pin it byte for byte.
use crate::NewJob;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

/// The job kind that runs workflow steps; [`crate::workflow::WorkflowRuntime::handler`] runs it.
pub const WORKFLOW_JOB_KIND: &str = "ledgerflow.workflow";

/// A workflow instance's id (UUID v7).
pub type WorkflowId = Uuid;

/// The deterministic idempotency key of `step` in `workflow_id`.
pub fn idempotency_key(workflow_id: WorkflowId, step: &str) -> String {
    format!("{workflow_id}:{step}")
}

/// Why a step job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Wake {
    /// The step's first run (also after a timer).
    #[default]
    Entry,
    /// A signal arrived for the waiting step.
    Signal { signal_id: i64 },
    /// The step's `wait_seq`-th signal wait timed out.
    Timeout { wait_seq: i32 },
    /// An operator re-runs the failed step (`seq` is the workflow's `wait_seq`
    /// at the time, so each retry gets its own job).
    Retry { seq: i32 },
    /// The `n`-th ask of the reconcile hook of the step that went in doubt
    /// at the workflow's `wait_seq` `seq`.
    Reconcile { seq: i32, n: i32 },
    /// Run the completed step's compensation (`seq`: the workflow's
    /// `wait_seq` when compensating reached the step).
    Compensate { seq: i32 },
}

/// A step job's arguments (a wire format: change compatibly).
#[derive(Debug, Deserialize)]
pub(crate) struct StepArgs {
    pub workflow_id: WorkflowId,
    pub step: String,
    #[serde(default)]
    wake: Option<String>,
    #[serde(default)]
    signal_id: Option<i64>,
    #[serde(default)]
    wait_seq: Option<i32>,
    #[serde(default)]
    n: Option<i32>,
}

impl StepArgs {
    /// Why the job runs.
    pub fn wake(&self) -> Wake {
        match (self.wake.as_deref(), self.signal_id, self.wait_seq) {
            (Some("signal"), Some(signal_id), _) => Wake::Signal { signal_id },
            (Some("timeout"), _, Some(wait_seq)) => Wake::Timeout { wait_seq },
            (Some("retry"), _, Some(seq)) => Wake::Retry { seq },
            (Some("reconcile"), _, Some(seq)) => Wake::Reconcile {
                seq,
                n: self.n.unwrap_or(1),
            },
            (Some("compensate"), _, Some(seq)) => Wake::Compensate { seq },
            _ => Wake::Entry,
        }
    }
}

/// The job that runs `step` of `workflow_id`, under its unique key.
pub(crate) fn step_job(
    workflow_id: WorkflowId,
    queue: &str,
    step: &str,
    wake: Wake,
    run_at: Option<DateTime<Utc>>,
    max_attempts: Option<i32>,
) -> NewJob {
    let seq = match wake {
        Wake::Entry => "0".to_string(),
        Wake::Signal { signal_id } => format!("s{signal_id}"),
        Wake::Timeout { wait_seq } => format!("t{wait_seq}"),
        Wake::Retry { seq } => format!("r{seq}"),
        Wake::Reconcile { seq, n } => format!("q{seq}.{n}"),
        Wake::Compensate { seq } => format!("x{seq}"),
    };
    let args = match wake {
        Wake::Entry => json!({ "workflow_id": workflow_id, "step": step, "wake": "entry" }),
        Wake::Signal { signal_id } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "signal", "signal_id": signal_id
        }),
        Wake::Timeout { wait_seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "timeout", "wait_seq": wait_seq
        }),
        Wake::Retry { seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "retry", "wait_seq": seq
        }),
        Wake::Reconcile { seq, n } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "reconcile", "wait_seq": seq, "n": n
        }),
        Wake::Compensate { seq } => json!({
            "workflow_id": workflow_id, "step": step, "wake": "compensate", "wait_seq": seq
        }),
    };
    let mut job = NewJob::new(WORKFLOW_JOB_KIND, args)
        .queue(queue)
        .workflow(workflow_id, step)
        .unique(format!("wf:{workflow_id}:{step}:{seq}"));
    if let Some(at) = run_at {
        job = job.run_at(at);
    }
    if let Some(n) = max_attempts {
        job = job.max_attempts(n);
    }
    job
}

// ------------------------------------------------------------------- start

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> WorkflowId {
        Uuid::from_u128(0x0192_0000_0000_7000_8000_0000_0000_0001)
    }

    /// Every wake-up's arguments and unique key, byte for byte as stored today.
    #[test]
    fn step_jobs_are_byte_identical_to_the_stored_format() {
        let cases = [
            (
                Wake::Entry,
                r#"{"step":"pay","wake":"entry","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:0",
            ),
            (
                Wake::Signal { signal_id: 42 },
                r#"{"signal_id":42,"step":"pay","wake":"signal","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:s42",
            ),
            (
                Wake::Timeout { wait_seq: 3 },
                r#"{"step":"pay","wait_seq":3,"wake":"timeout","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:t3",
            ),
            (
                Wake::Retry { seq: 4 },
                r#"{"step":"pay","wait_seq":4,"wake":"retry","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:r4",
            ),
            (
                Wake::Reconcile { seq: 5, n: 2 },
                r#"{"n":2,"step":"pay","wait_seq":5,"wake":"reconcile","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:q5.2",
            ),
            (
                Wake::Compensate { seq: 6 },
                r#"{"step":"pay","wait_seq":6,"wake":"compensate","workflow_id":"01920000-0000-7000-8000-000000000001"}"#,
                "wf:01920000-0000-7000-8000-000000000001:pay:x6",
            ),
        ];
        for (wake, args, key) in cases {
            let job = step_job(id(), "payments", "pay", wake, None, Some(3));
            assert_eq!(serde_json::to_string(&job.args).ok().as_deref(), Some(args));
            assert_eq!(job.unique_key.as_deref(), Some(key));
            assert_eq!(job.kind, WORKFLOW_JOB_KIND);
            assert_eq!(job.queue, "payments");
            assert_eq!(job.max_attempts, 3);
            assert_eq!(job.workflow_id, Some(id()));
            assert_eq!(job.workflow_step.as_deref(), Some("pay"));
            let parsed: StepArgs = serde_json::from_str(args).expect("stored args parse");
            assert_eq!(parsed.wake(), wake);
            assert_eq!((parsed.workflow_id, parsed.step.as_str()), (id(), "pay"));
        }
    }

    #[test]
    fn old_and_partial_arguments_wake_a_step_as_an_entry() {
        for args in [
            r#"{"workflow_id":"01920000-0000-7000-8000-000000000001","step":"pay"}"#,
            r#"{"workflow_id":"01920000-0000-7000-8000-000000000001","step":"pay","wake":"signal"}"#,
            r#"{"workflow_id":"01920000-0000-7000-8000-000000000001","step":"pay","wake":"later"}"#,
        ] {
            let parsed: StepArgs = serde_json::from_str(args).expect("args parse");
            assert_eq!(parsed.wake(), Wake::Entry, "{args}");
        }
        let reconcile: StepArgs = serde_json::from_str(
            r#"{"workflow_id":"01920000-0000-7000-8000-000000000001","step":"pay","wake":"reconcile","wait_seq":2}"#,
        )
        .expect("args parse");
        assert_eq!(reconcile.wake(), Wake::Reconcile { seq: 2, n: 1 });
    }

    #[test]
    fn idempotency_keys_name_the_workflow_and_step() {
        assert_eq!(
            idempotency_key(id(), "pay"),
            "01920000-0000-7000-8000-000000000001:pay"
        );
    }
}
