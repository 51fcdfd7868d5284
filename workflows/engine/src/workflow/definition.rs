//! How a workflow is defined (layer 5): its steps' bodies, compensations and reconcile
//! hooks, and the [`Workflow`] builder that puts them together and checks them.
use super::ctx::StepCtx;
use super::outcome::{CompensationResult, ReconcileResult, StepResult};
use crate::job::DEFAULT_MAX_ATTEMPTS;
use crate::{Error, Result};
use futures::future::BoxFuture;
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;

/// Default of [`Workflow::reconcile_attempts`].
pub const DEFAULT_RECONCILE_ATTEMPTS: i32 = 5;

/// Default of [`Workflow::max_resends`].
pub const DEFAULT_MAX_RESENDS: i32 = 5;

/// A step's body: an async function of its [`StepCtx`].
pub trait StepFn: Send + Sync + 'static {
    /// Runs the step once.
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, StepResult>;
}

impl<F, Fut> StepFn for F
where
    F: Fn(StepCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx) -> BoxFuture<'static, StepResult> {
        Box::pin(self(ctx))
    }
}

/// A step's compensation: undoes the step, given its context and the step's
/// journaled output (e.g. the hold reference to release).
pub trait CompensateFn: Send + Sync + 'static {
    /// Runs the compensation once.
    fn call(&self, ctx: StepCtx, output: Value) -> BoxFuture<'static, CompensationResult>;
}

impl<F, Fut> CompensateFn for F
where
    F: Fn(StepCtx, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CompensationResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx, output: Value) -> BoxFuture<'static, CompensationResult> {
        Box::pin(self(ctx, output))
    }
}

/// A step's reconcile hook: asks the outside world (by the step's
/// idempotency key) what became of an in-doubt call.
pub trait ReconcileFn: Send + Sync + 'static {
    /// Runs the hook once.
    fn call(&self, ctx: StepCtx, idempotency_key: String) -> BoxFuture<'static, ReconcileResult>;
}

impl<F, Fut> ReconcileFn for F
where
    F: Fn(StepCtx, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ReconcileResult> + Send + 'static,
{
    fn call(&self, ctx: StepCtx, idempotency_key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self(ctx, idempotency_key))
    }
}

#[derive(Clone)]
pub struct StepDef {
    /// The step's name: stable, unique within the workflow (it is stored).
    pub name: &'static str,
    /// Its body.
    pub run: Arc<dyn StepFn>,
    /// Undoes the completed step when a later step fails (sagas).
    pub compensate: Option<Arc<dyn CompensateFn>>,
    /// Settles the step's in-doubt external call.
    pub reconcile: Option<Arc<dyn ReconcileFn>>,
}

impl std::fmt::Debug for StepDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepDef")
            .field("name", &self.name)
            .field("compensate", &self.compensate.is_some())
            .field("reconcile", &self.reconcile.is_some())
            .finish()
    }
}

/// A workflow definition: one version of one kind.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// A stable kind name (stored; never a Rust type name).
    pub kind: &'static str,
    /// The definition's version (≥ 1). Instances keep the version they
    /// started with; new starts use the newest registered.
    pub version: i32,
    /// The steps, in order.
    pub steps: Vec<StepDef>,
    /// The queue the step jobs go to.
    pub queue: String,
    /// Attempts each step job gets.
    pub max_attempts: i32,
    /// How many times a step's reconcile hook is asked (at once, then with
    /// the store's backoff) before an in-doubt step is left to an admin.
    pub reconcile_attempts: i32,
    /// How many times one step's call is sent again after its reconcile hook
    /// found it [`Reconciled::NotReceived`] before the step fails instead.
    pub max_resends: i32,
    /// The workflow-wide flow key of an instance, from its input (see [`Workflow::flow_key`]).
    pub flow_key: Option<FlowKeyFn>,
    misplaced: Option<String>,
}

/// How a definition derives an instance's workflow-wide flow key from its input.
#[derive(Clone)]
pub struct FlowKeyFn(Arc<KeyOf>);

/// A function from an instance's input to its key.
type KeyOf = dyn Fn(&serde_json::Value) -> Option<String> + Send + Sync;

impl FlowKeyFn {
    /// The key of an instance with `input` (`None`: the instance is not limited).
    pub fn key(&self, input: &serde_json::Value) -> Option<String> {
        (self.0)(input)
    }
}

impl std::fmt::Debug for FlowKeyFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowKeyFn")
    }
}

impl Workflow {
    /// An empty definition of `kind` at `version`; add steps with [`Workflow::step`].
    pub fn new(kind: &'static str, version: i32) -> Self {
        Self {
            kind,
            version,
            steps: Vec::new(),
            queue: crate::job::DEFAULT_QUEUE.to_string(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            reconcile_attempts: DEFAULT_RECONCILE_ATTEMPTS,
            max_resends: DEFAULT_MAX_RESENDS,
            flow_key: None,
            misplaced: None,
        }
    }

    /// Gives each instance a workflow-wide flow key derived from its input (e.g. `user:{id}`):
    /// an instance holds a slot of its key from its first step's claim until it finishes, so
    /// with a concurrency limit of 1 on the key (a `flow_limits` row of it or its class), the
    /// instances of one key run one at a time, in order, across every process. Later
    /// instances wait, unclaimed, until the slot frees.
    pub fn flow_key(
        mut self,
        key: impl Fn(&serde_json::Value) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.flow_key = Some(FlowKeyFn(Arc::new(key)));
        self
    }

    /// Appends a step.
    pub fn step(mut self, name: &'static str, run: impl StepFn) -> Self {
        self.steps.push(StepDef {
            name,
            run: Arc::new(run),
            compensate: None,
            reconcile: None,
        });
        self
    }

    /// Appends a step with its compensation, which receives the step's
    /// journaled output when a later step fails.
    pub fn step_with_compensation(
        self,
        name: &'static str,
        run: impl StepFn,
        compensate: impl CompensateFn,
    ) -> Self {
        self.step(name, run).compensate(compensate)
    }

    /// Sets the compensation of the last step added.
    pub fn compensate(mut self, compensate: impl CompensateFn) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.compensate = Some(Arc::new(compensate)),
            None => self.misplaced = Some("compensate() before any step".to_string()),
        }
        self
    }

    /// Sets the reconcile hook of the last step added: asked what became of
    /// the step's external call when its outcome is unknown.
    pub fn reconcile(mut self, reconcile: impl ReconcileFn) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.reconcile = Some(Arc::new(reconcile)),
            None => self.misplaced = Some("reconcile() before any step".to_string()),
        }
        self
    }

    /// How many times reconcile hooks are asked (at least 1).
    pub fn reconcile_attempts(mut self, n: i32) -> Self {
        self.reconcile_attempts = n.max(1);
        self
    }

    /// How many times a step's call is sent again after a reconcile hook
    /// found it never received (at least 0).
    pub fn max_resends(mut self, n: i32) -> Self {
        self.max_resends = n.max(0);
        self
    }

    /// Sends the step jobs to `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Attempts per step job (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The index of `step` in the definition.
    pub(crate) fn index_of(&self, step: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == step)
    }

    /// Checks the definition (names, version, steps).
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if let Some(m) = &self.misplaced {
            return bad(format!("workflow {}: {m}", self.kind));
        }
        if self.kind.is_empty() || self.kind.len() > 128 {
            return bad("workflow kind must be 1..=128 bytes".to_string());
        }
        if self.version < 1 {
            return bad(format!("workflow {} version must be >= 1", self.kind));
        }
        if self.steps.is_empty() {
            return bad(format!(
                "workflow {} v{} has no steps",
                self.kind, self.version
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 128 {
                return bad(format!(
                    "workflow {}: step names must be 1..=128 bytes",
                    self.kind
                ));
            }
            if self.steps[..i].iter().any(|o| o.name == s.name) {
                return bad(format!(
                    "workflow {}: duplicate step {:?}",
                    self.kind, s.name
                ));
            }
        }
        Ok(())
    }
}

impl Workflow {
    /// The steps before `below` that have a compensation, in definition order: the candidates
    /// for compensation when step `below` fails or has been compensated.
    pub(crate) fn compensable(&self, below: usize) -> Vec<&'static str> {
        self.steps[..below.min(self.steps.len())]
            .iter()
            .filter(|s| s.compensate.is_some())
            .map(|s| s.name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::outcome::StepOutcome;

    async fn noop(_: StepCtx) -> StepResult {
        Ok(StepOutcome::Continue(Value::Null))
    }

    async fn undo(_: StepCtx, _: Value) -> CompensationResult {
        Ok(Value::Null)
    }

    fn invalid(w: Workflow) -> String {
        match w.validate() {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected an invalid definition, got {other:?}"),
        }
    }

    #[test]
    fn definitions_are_checked() {
        assert!(Workflow::new("trade", 1).step("a", noop).validate().is_ok());
        assert!(invalid(Workflow::new("trade", 1)).contains("has no steps"));
        assert!(invalid(Workflow::new("trade", 0).step("a", noop)).contains("version"));
        assert!(invalid(Workflow::new("", 1).step("a", noop)).contains("kind"));
        let long: &'static str = Box::leak("k".repeat(129).into_boxed_str());
        assert!(invalid(Workflow::new(long, 1).step("a", noop)).contains("kind"));
        let dup = Workflow::new("trade", 1).step("a", noop).step("a", noop);
        assert!(invalid(dup).contains("duplicate step"));
        assert!(invalid(Workflow::new("trade", 1).step("", noop)).contains("step names"));
        let early = Workflow::new("trade", 1).compensate(undo).step("a", noop);
        assert!(invalid(early).contains("compensate() before any step"));
    }

    #[test]
    fn builder_bounds_and_compensable_steps() {
        let w = Workflow::new("trade", 1)
            .step_with_compensation("hold", noop, undo)
            .step("quote", noop)
            .step_with_compensation("place", noop, undo)
            .step("settle", noop)
            .max_attempts(0)
            .reconcile_attempts(-3)
            .max_resends(-1);
        assert_eq!(
            (w.max_attempts, w.reconcile_attempts, w.max_resends),
            (1, 1, 0)
        );
        assert_eq!(w.index_of("place"), Some(2));
        assert_eq!(w.index_of("nope"), None);
        assert_eq!(w.compensable(0), Vec::<&str>::new());
        assert_eq!(w.compensable(2), vec!["hold"]);
        assert_eq!(w.compensable(4), vec!["hold", "place"]);
        assert_eq!(w.compensable(9), vec!["hold", "place"]);
    }
}
