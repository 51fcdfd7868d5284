//! Crash points: where a child worker dies or hangs (a plan per run), and the exchange
//! wrapper and handlers that carry it out.
use super::*;

/// Where a planned workflow stops in the child (a `crash_plan.point`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Point {
    /// `before:S` — the job of step S is claimed and never run.
    Before(String),
    /// `after:S` — S's checkpoint committed; the next job blocks unrun.
    After(String),
    /// `waiting:S` — S's signal wait is checkpointed (the workflow waits);
    /// a wake-up job blocks unrun.
    Waiting(String),
    /// `hang_before:S` — S's external call has its intent recorded and is
    /// never sent.
    HangBefore(String),
    /// `hang_after:S` — S's external call reached the exchange; its answer
    /// is never recorded.
    HangAfter(String),
    /// `answered:S` — S's external call is answered and the answer
    /// recorded; the step's checkpoint never commits (its domain write
    /// waits for a row lock the child holds).
    Answered(String),
    /// `compensate:S` — the saga reached S: the job of S's compensation is
    /// claimed and never run.
    Compensate(String),
    /// `reconcile:S` — S is in doubt: the first job of its reconcile hook
    /// is claimed and never run.
    Reconcile(String),
}

/// What [`CrashExchange`] does with a planned call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hang {
    Before,
    After,
    Answered,
}

impl Point {
    pub(crate) fn parse(s: &str) -> Option<Point> {
        let (kind, step) = s.split_once(':')?;
        let step = step.to_string();
        Some(match kind {
            "before" => Point::Before(step),
            "after" => Point::After(step),
            "waiting" => Point::Waiting(step),
            "hang_before" => Point::HangBefore(step),
            "hang_after" => Point::HangAfter(step),
            "answered" => Point::Answered(step),
            "compensate" => Point::Compensate(step),
            "reconcile" => Point::Reconcile(step),
            _ => return None,
        })
    }
}

/// The child's view of the plan.
#[derive(Clone)]
pub(crate) struct Plan {
    pub(crate) pool: PgPool,
    pub(crate) points: Arc<HashMap<Uuid, Point>>,
}

impl Plan {
    pub(crate) async fn load(pool: &PgPool) -> TestResult<Plan> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT workflow_id, point FROM crash_plan")
            .fetch_all(pool)
            .await?;
        let mut points = HashMap::new();
        for (id, point) in rows {
            let parsed = Point::parse(&point).ok_or_else(|| format!("bad point {point:?}"))?;
            points.insert(id, parsed);
        }
        Ok(Plan {
            pool: pool.clone(),
            points: Arc::new(points),
        })
    }

    /// True once workflow `id` is at its `after`/`waiting` point.
    pub(crate) async fn reached(&self, id: Uuid, point: &Point) -> bool {
        let sql = match point {
            Point::After(_) => {
                "SELECT EXISTS (SELECT 1 FROM workflow_steps
                                WHERE workflow_id = $1 AND step = $2 AND status = 'completed')"
            }
            Point::Waiting(_) => {
                "SELECT EXISTS (SELECT 1 FROM workflows
                                WHERE id = $1 AND state = 'waiting' AND current_step = $2
                                  AND wait_signal_name IS NOT NULL)"
            }
            _ => return false,
        };
        let (Point::After(step) | Point::Waiting(step)) = point else {
            return false;
        };
        // A read error counts as "not yet": the step then simply runs, and
        // the parent's journal check catches a missed pause.
        sqlx::query_scalar(sql)
            .bind(id)
            .bind(step)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
    }

    /// Records that `id` reached its point (the parent waits for this).
    pub(crate) async fn mark(&self, id: Uuid) {
        loop {
            let done = sqlx::query(
                "INSERT INTO crash_paused (workflow_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .execute(&self.pool)
            .await;
            if done.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Marks `id` paused and never returns: the parent's SIGKILL ends it.
    pub(crate) async fn pause_forever(&self, id: Uuid) -> ! {
        self.mark(id).await;
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    /// The planned `hang_*` point of the call with idempotency `key`.
    pub(crate) fn hang_for(&self, key: &IdempotencyKey) -> Option<(Uuid, Hang)> {
        let (id, step) = key.as_str().split_once(':')?;
        let id: Uuid = id.parse().ok()?;
        match self.points.get(&id)? {
            Point::HangBefore(s) if s == step => Some((id, Hang::Before)),
            Point::HangAfter(s) if s == step => Some((id, Hang::After)),
            Point::Answered(s) if s == step => Some((id, Hang::Answered)),
            _ => None,
        }
    }

    /// Locks workflow `id`'s row in `table` (its step's domain write will
    /// wait for it) and returns once locked; marks the workflow paused once
    /// `step`'s answer is recorded. The lock is held until the process dies.
    pub(crate) async fn block_checkpoint(&self, id: Uuid, table: &'static str, step: &str) {
        let (locked, is_locked) = tokio::sync::oneshot::channel();
        let (plan, step) = (self.clone(), step.to_string());
        tokio::spawn(async move {
            let Ok(mut tx) = plan.pool.begin().await else {
                return;
            };
            let lock = format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE");
            if sqlx::query(&lock).bind(id).execute(&mut *tx).await.is_err() {
                return;
            }
            let _ = locked.send(());
            loop {
                let answered: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM workflow_steps
                                    WHERE workflow_id = $1 AND step = $2
                                      AND status = 'calling' AND call_state = 'answered')",
                )
                .bind(id)
                .bind(&step)
                .fetch_one(&plan.pool)
                .await
                .unwrap_or(false);
                if answered {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            plan.mark(id).await;
            loop {
                // `tx` (and its row lock) lives as long as this task.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        // If the lock could not be taken the step runs on, and the parent
        // reports the point as never reached.
        let _ = is_locked.await;
    }
}

/// The HTTP exchange, stopping the mutating calls the plan names: before
/// sending (`hang_before`), after the exchange answered (`hang_after`), or
/// after the answer is returned but before the step can checkpoint
/// (`answered`: `table` is the domain row the step writes next).
pub(crate) struct CrashExchange {
    pub(crate) inner: HttpExchange,
    pub(crate) plan: Plan,
}

impl CrashExchange {
    pub(crate) async fn call<T>(
        &self,
        key: &IdempotencyKey,
        table: &'static str,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        match self.plan.hang_for(key) {
            None => call.await,
            Some((id, Hang::Before)) => self.plan.pause_forever(id).await,
            Some((id, Hang::After)) => {
                let _answer = call.await;
                self.plan.pause_forever(id).await
            }
            Some((id, Hang::Answered)) => {
                let answer = call.await;
                let step = key.as_str().split_once(':').map_or("", |(_, s)| s);
                self.plan.block_checkpoint(id, table, step).await;
                answer
            }
        }
    }
}

#[async_trait]
impl Exchange for CrashExchange {
    async fn place_order(&self, order: &OrderRequest) -> exchange::Result<OrderAck> {
        self.call(
            &order.idempotency_key,
            "trades",
            self.inner.place_order(order),
        )
        .await
    }

    async fn cancel_order(&self, key: &IdempotencyKey) -> exchange::Result<OrderStatus> {
        self.inner.cancel_order(key).await
    }

    async fn get_order_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> exchange::Result<Option<OrderStatus>> {
        self.inner.get_order_by_key(key).await
    }

    async fn submit_withdrawal(&self, w: &WithdrawalRequest) -> exchange::Result<WithdrawalAck> {
        self.call(
            &w.idempotency_key,
            "withdrawals",
            self.inner.submit_withdrawal(w),
        )
        .await
    }

    async fn get_withdrawal_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> exchange::Result<Option<WithdrawalStatus>> {
        self.inner.get_withdrawal_by_key(key).await
    }
}

/// The worker's handler for workflow step jobs, honouring the plan: a job
/// of a planned workflow that is at (or past) its point blocks unrun.
pub(crate) fn handlers(steps: StepHandler, plan: Plan) -> Registry {
    Registry::new().register(StepHandler::KIND, move |ctx: JobContext| {
        let (steps, plan) = (steps.clone(), plan.clone());
        async move {
            let job = ctx.job();
            let point = job
                .workflow_id
                .and_then(|id| Some((id, plan.points.get(&id)?)));
            let Some((id, point)) = point else {
                return steps.run(job).await.outcome;
            };
            let this_step = |step: &String| job.workflow_step.as_deref() == Some(step.as_str());
            let wake = job.args.get("wake").and_then(|w| w.as_str());
            match point {
                Point::Before(step) if this_step(step) => plan.pause_forever(id).await,
                Point::Compensate(step) if this_step(step) && wake == Some("compensate") => {
                    plan.pause_forever(id).await
                }
                Point::Reconcile(step) if this_step(step) && wake == Some("reconcile") => {
                    plan.pause_forever(id).await
                }
                Point::After(_) | Point::Waiting(_) if plan.reached(id, point).await => {
                    plan.pause_forever(id).await
                }
                _ => {}
            }
            let outcome = steps.run(job).await.outcome;
            if plan.reached(id, point).await {
                // The checkpoint is committed (with this job's completion);
                // the workflow's next job will block.
                plan.mark(id).await;
            }
            outcome
        }
    })
}
