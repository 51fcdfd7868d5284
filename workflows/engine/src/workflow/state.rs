//! The stored states of a workflow, of a journaled step and of a step's external call (layer 1:
//! pure, no SQL). The strings are what the database holds; these enums are how the runtime
//! reads and writes them.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Declares a stored state: the enum, its stored names, `ALL`, `Display` and `FromStr`.
macro_rules! stored_state {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant),)+].len()] = [$($name::$variant,)+];

            /// The name as stored.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $name::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| Error::Invalid(format!(concat!("unknown ", $what, " {:?}"), s)))
            }
        }
    };
}

stored_state!(
    /// Where a workflow instance is in its life.
    WorkflowState, "workflow state", {
        /// A step is due or running.
        Running => "running",
        /// Waiting for a signal, a timer, or the settling of an in-doubt call.
        Waiting => "waiting",
        /// Finished successfully.
        Completed => "completed",
        /// A step failed permanently (or a compensation exhausted its attempts).
        Failed => "failed",
        /// Undoing completed steps (sagas).
        Compensating => "compensating",
        /// Completed steps were undone.
        Compensated => "compensated",
        /// Stopped by an operator.
        Cancelled => "cancelled",
    }
);

impl WorkflowState {
    /// True once no step of the instance will run again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            WorkflowState::Completed
                | WorkflowState::Failed
                | WorkflowState::Compensated
                | WorkflowState::Cancelled
        )
    }
}

stored_state!(
    /// A step's journal row (`workflow_steps.status`).
    StepStatus, "step status", {
        /// The intent of the step's external call is recorded; the step has not checkpointed.
        Calling => "calling",
        /// Checkpointed with its output; never run again.
        Completed => "completed",
        /// Failed permanently (or its call is to be sent again: see `Reconciled::NotReceived`).
        Failed => "failed",
        /// Its external call's outcome is unknown: a reconcile hook or an admin decides.
        InDoubt => "in_doubt",
        /// Undone by its compensation.
        Compensated => "compensated",
    }
);

impl StepStatus {
    /// True when the step's body may run (again) on a delivery: no row, an operator's retry of
    /// a failed step, or an intent whose call the run must look at.
    pub fn reruns(status: Option<StepStatus>) -> bool {
        matches!(
            status,
            None | Some(StepStatus::Failed) | Some(StepStatus::Calling)
        )
    }

    /// True when the step's output counts as an output of the workflow's past.
    pub fn has_output(self) -> bool {
        matches!(self, StepStatus::Completed | StepStatus::Compensated)
    }
}

stored_state!(
    /// A step's external call (`workflow_steps.call_state`).
    CallState, "call state", {
        /// The intent is recorded; no answer yet (or the process died during the call).
        Calling => "calling",
        /// The provider answered; the answer is recorded.
        Answered => "answered",
        /// The provider refused; nothing happened.
        Rejected => "rejected",
        /// Certainly never delivered: sent again under the same key.
        NotSent => "not_sent",
        /// It may or may not have taken effect.
        Unknown => "unknown",
    }
);

impl CallState {
    /// True when the call has no definite answer: the step must not send it again blindly.
    pub fn in_doubt(self) -> bool {
        matches!(self, CallState::Calling | CallState::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_are_unchanged_and_round_trip() {
        let workflow: Vec<&str> = WorkflowState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            workflow,
            [
                "running",
                "waiting",
                "completed",
                "failed",
                "compensating",
                "compensated",
                "cancelled"
            ]
        );
        let steps: Vec<&str> = StepStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            steps,
            ["calling", "completed", "failed", "in_doubt", "compensated"]
        );
        let calls: Vec<&str> = CallState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            calls,
            ["calling", "answered", "rejected", "not_sent", "unknown"]
        );
        for s in WorkflowState::ALL {
            assert_eq!(s.as_str().parse::<WorkflowState>().ok(), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for s in StepStatus::ALL {
            assert_eq!(s.as_str().parse::<StepStatus>().ok(), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for s in CallState::ALL {
            assert_eq!(s.as_str().parse::<CallState>().ok(), Some(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
    }

    #[test]
    fn unknown_names_are_refused_with_the_name() {
        let e = "paused".parse::<WorkflowState>().map(|_| ());
        assert!(matches!(e, Err(Error::Invalid(m)) if m.contains("\"paused\"")));
        assert!("done".parse::<StepStatus>().is_err());
        assert!("".parse::<CallState>().is_err());
    }

    #[test]
    fn which_steps_rerun_and_which_calls_are_in_doubt() {
        assert!(StepStatus::reruns(None));
        assert!(StepStatus::reruns(Some(StepStatus::Failed)));
        assert!(StepStatus::reruns(Some(StepStatus::Calling)));
        assert!(!StepStatus::reruns(Some(StepStatus::Completed)));
        assert!(!StepStatus::reruns(Some(StepStatus::InDoubt)));
        assert!(!StepStatus::reruns(Some(StepStatus::Compensated)));
        assert!(CallState::Calling.in_doubt() && CallState::Unknown.in_doubt());
        assert!(!CallState::Answered.in_doubt() && !CallState::NotSent.in_doubt());
    }
}
