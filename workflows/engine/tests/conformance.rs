//! The execution-path conformance suite: every workflow behaviour, run under each
//! [`ExecConfig`] — the locked path only; inline continuation without group commit; inline
//! with group commit; production's default with locked batches — must leave the same rows.
//!
//! Each scenario runs on a fresh database with a [`ManualClock`] and returns a normalised dump
//! of `workflows`, `workflow_steps`, the jobs that are not done with (anything but `completed`
//! and `cancelled`: how many step job rows a path uses is its own business) and the steps'
//! effects; ids, times and tokens are left out (workflow ids become `WF1`, `WF2`… in start
//! order). The dumps of all configurations must be equal, and each scenario also asserts what
//! the behaviour means.
use chrono::{DateTime, Utc};
use ledgerflow_engine::store::ClaimedJob;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    CallError, ExecConfig, Inline, ManualClock, NewJob, Outcome, Reconciled, Resolution, StepCtx,
    StepHandler, StepOutcome, Store, WORKFLOW_JOB_KIND, Workflow, WorkflowId, WorkflowRegistry,
    WorkflowRuntime, signal_send, workflow_cancel_in, workflow_resolve_in, workflow_retry_in,
};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The configurations every behaviour runs under. Inline continuation gets a budget no wait in
/// these tests can use up (the default 250 ms is a time limit, which a loaded machine would
/// turn into a different path).
fn configs() -> Vec<(&'static str, ExecConfig)> {
    let inline = Inline {
        budget: Duration::from_secs(120),
        ..Inline::default()
    };
    vec![
        ("locked only", ExecConfig::LOCKED_ONLY),
        (
            "inline, no group commit",
            ExecConfig::LOCKED_ONLY.inline(inline),
        ),
        (
            "inline with group commit",
            ExecConfig::LOCKED_ONLY.inline(inline).group_commit(true),
        ),
        ("default", ExecConfig::default().inline(inline)),
    ]
}

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

/// One configuration's run of a scenario.
struct Rig {
    db: TestDb,
    clock: ManualClock,
    store: Store,
    runtime: WorkflowRuntime,
    handler: StepHandler,
    owner: Arc<str>,
}

impl Rig {
    async fn new(registry: WorkflowRegistry, config: ExecConfig) -> TestResult<Self> {
        let db = TestDb::with_pool_size(16).await?;
        let clock = ManualClock::new(t0());
        let store = ledgerflow_engine::testing::manual_store(&db.pool, &clock);
        sqlx::query("CREATE TABLE effects (workflow_id uuid NOT NULL, what text NOT NULL)")
            .execute(&db.pool)
            .await?;
        let runtime = WorkflowRuntime::with_config(store.clone(), registry, config);
        Ok(Self {
            handler: runtime.handler(),
            runtime,
            db,
            clock,
            store,
            owner: Arc::from("conformance"),
        })
    }

    async fn start(&self, kind: &str) -> TestResult<WorkflowId> {
        Ok(self.runtime.start(kind, &json!({}), None).await?)
    }

    async fn claim(&self, limit: u32) -> TestResult<Vec<ClaimedJob>> {
        self.store.job_promote_due(1000).await?;
        Ok(self.store.job_claim("default", &self.owner, limit).await?)
    }

    /// Runs a claimed job as the runner does: the handler, then the outcome recorded unless
    /// a checkpoint committed it.
    async fn run(&self, job: &ClaimedJob) -> TestResult<Outcome> {
        let outcome = self.handler.run(job).await.outcome;
        if !job.lease.is_finished() {
            match self.store.job_finish(&job.lease, &outcome).await {
                Ok(()) | Err(ledgerflow_engine::Error::StaleLease { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(outcome)
    }

    /// Runs due jobs until none is left.
    async fn drain(&self) -> TestResult {
        for _ in 0..200 {
            let jobs = self.claim(10).await?;
            if jobs.is_empty() {
                return Ok(());
            }
            for job in &jobs {
                self.run(job).await?;
            }
        }
        Err("still busy after 200 rounds".into())
    }

    /// Drains, advancing the clock an hour between rounds so backoffs, timers and timeouts
    /// come due; `rounds` times.
    async fn settle(&self, rounds: usize) -> TestResult {
        for _ in 0..rounds {
            self.drain().await?;
            self.clock.advance(Duration::from_secs(3600));
        }
        self.drain().await
    }

    async fn state(&self, id: WorkflowId) -> TestResult<String> {
        Ok(
            sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1")
                .bind(id)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    async fn effects(&self) -> TestResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT what FROM effects ORDER BY what")
            .fetch_all(&self.db.pool)
            .await?)
    }

    /// The normalised dump (see the module's doc).
    async fn dump(&self) -> TestResult<Value> {
        let ids: Vec<WorkflowId> = sqlx::query_scalar("SELECT id FROM workflows ORDER BY id")
            .fetch_all(&self.db.pool)
            .await?;
        let rows: Value = sqlx::query_scalar(
            "SELECT json_build_object(
               'workflows', (SELECT coalesce(json_agg(json_build_object(
                   'kind', kind, 'state', state, 'output', output, 'current_step', current_step,
                   'wait_reason', wait_reason, 'error', error, 'wait_seq', wait_seq,
                   'finished', finished_at IS NOT NULL) ORDER BY id), '[]') FROM workflows),
               'steps', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'step', step, 'position', position, 'status', status,
                   'output', output, 'error', error, 'key', idempotency_key, 'attempt', attempt,
                   'call_state', call_state, 'call_output', call_output, 'call_error', call_error,
                   'call_resends', call_resends, 'reconcile_attempts', reconcile_attempts,
                   'resolved_by', resolved_by, 'compensation_output', compensation_output,
                   'compensation_error', compensation_error,
                   'compensated', compensated_at IS NOT NULL)
                   ORDER BY workflow_id, position), '[]') FROM workflow_steps),
               'pending_jobs', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'step', workflow_step, 'state', state,
                   'wake', args->>'wake', 'last_error', last_error)
                   ORDER BY workflow_id, workflow_step, state, args->>'wake'), '[]')
                   FROM jobs WHERE state NOT IN ('completed', 'cancelled')),
               'effects', (SELECT coalesce(json_agg(json_build_object(
                   'workflow', workflow_id, 'what', what) ORDER BY workflow_id, what), '[]')
                   FROM effects))",
        )
        .fetch_one(&self.db.pool)
        .await?;
        let mut text = rows.to_string();
        for (n, id) in ids.iter().enumerate() {
            text = text.replace(&id.to_string(), &format!("WF{}", n + 1));
        }
        Ok(serde_json::from_str(&text)?)
    }
}

/// Runs `scenario` under every configuration and asserts the dumps are equal.
async fn conforms<F, Fut>(registry: impl Fn() -> WorkflowRegistry, scenario: F) -> TestResult
where
    F: Fn(Rig) -> Fut,
    Fut: Future<Output = TestResult<Value>>,
{
    let mut first: Option<(&str, Value)> = None;
    for (name, config) in configs() {
        let rig = Rig::new(registry(), config).await?;
        let runtime = rig.runtime.clone();
        let dump = scenario(rig)
            .await
            .map_err(|e| format!("under {name}: {e}"))?;
        runtime.shutdown().await;
        match &first {
            None => first = Some((name, dump)),
            Some((base, expected)) => assert_eq!(
                &dump, expected,
                "{name} left other rows than {base}:\n{name}: {dump:#}\n{base}: {expected:#}"
            ),
        }
    }
    Ok(())
}

/// Records `what` for the step's workflow in its fenced transaction.
async fn effect(ctx: &StepCtx, what: &str) -> Result<(), String> {
    let mut db = ctx.db().await.map_err(|e| e.to_string())?;
    sqlx::query("INSERT INTO effects (workflow_id, what) VALUES ($1, $2)")
        .bind(ctx.workflow_id())
        .bind(what)
        .execute(&mut *db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn registry(wf: Workflow) -> WorkflowRegistry {
    WorkflowRegistry::new()
        .register(wf)
        .expect("a valid definition")
}

/// `abc`: three steps; `a` and `c` need nothing but their checkpoint, `b` writes an effect.
fn abc(runs: Arc<AtomicUsize>) -> Workflow {
    Workflow::new("abc", 1)
        .step("a", move |_ctx: StepCtx| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(StepOutcome::Continue(json!("a")))
            }
        })
        .step("b", |ctx: StepCtx| async move {
            effect(&ctx, "b").await?;
            Ok(StepOutcome::Continue(json!("b")))
        })
        .step("c", |ctx: StepCtx| async move {
            let b = ctx.output("b").cloned().unwrap_or(Value::Null);
            Ok(StepOutcome::Continue(json!({ "c": b })))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_steps_complete() -> TestResult {
    conforms(
        || registry(abc(Arc::default())),
        |rig| async move {
            let id = rig.start("abc").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["b"]);
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_step_is_not_run_again() -> TestResult {
    let runs = Arc::new(AtomicUsize::new(0));
    conforms(
        || registry(abc(runs.clone())),
        |rig| {
            let runs = runs.clone();
            async move {
                runs.store(0, Ordering::SeqCst);
                let id = rig.start("abc").await?;
                rig.drain().await?;
                // A late duplicate delivery of each step (no unique key: a second row).
                for step in ["a", "b", "c"] {
                    let args = json!({ "workflow_id": id, "step": step, "wake": "entry" });
                    let dup = NewJob::new(WORKFLOW_JOB_KIND, args).workflow(id, step);
                    rig.store.job_insert(&dup).await?;
                }
                rig.drain().await?;
                assert_eq!(runs.load(Ordering::SeqCst), 1);
                assert_eq!(rig.effects().await?, ["b"]);
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_run_a_body_once() -> TestResult {
    // `a` writes its effect slowly, so the two deliveries overlap.
    let wf = || {
        Workflow::new("dup", 1)
            .step("a", |ctx: StepCtx| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                effect(&ctx, "a").await?;
                Ok(StepOutcome::Continue(json!("a")))
            })
            .step("b", |ctx: StepCtx| async move {
                effect(&ctx, "b").await?;
                Ok(StepOutcome::Continue(json!("b")))
            })
    };
    conforms(
        || registry(wf()),
        |rig| async move {
            let id = rig.start("dup").await?;
            let args = json!({ "workflow_id": id, "step": "a", "wake": "entry" });
            rig.store
                .job_insert(&NewJob::new(WORKFLOW_JOB_KIND, args).workflow(id, "a"))
                .await?;
            let jobs = rig.claim(2).await?;
            assert_eq!(jobs.len(), 2);
            let (x, y) = tokio::join!(rig.run(&jobs[0]), rig.run(&jobs[1]));
            x?;
            y?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["a", "b"], "each effect exactly once");
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_lease_writes_nothing() -> TestResult {
    conforms(
        || registry(abc(Arc::default())),
        |rig| async move {
            let id = rig.start("abc").await?;
            let jobs = rig.claim(1).await?;
            // The lease is lost: the job was rescued and claimed by someone else.
            sqlx::query("UPDATE jobs SET lease_token = gen_random_uuid() WHERE id = $1")
                .bind(jobs[0].id)
                .execute(&rig.db.pool)
                .await?;
            rig.handler.run(&jobs[0]).await;
            let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM workflow_steps")
                .fetch_one(&rig.db.pool)
                .await?;
            assert_eq!(steps, 0, "a stale attempt journals nothing");
            assert!(rig.effects().await?.is_empty());
            // The new holder's attempt ends; the job runs again and completes.
            sqlx::query(
                "UPDATE jobs SET state = 'available', lease_token = NULL, lease_owner = NULL,
                                 lease_expires_at = NULL
                 WHERE id = $1",
            )
            .bind(jobs[0].id)
            .execute(&rig.db.pool)
            .await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}

/// `flaky`: `b` writes its effect and then fails on its first attempt.
fn flaky(max_attempts: i32, fail_always: bool) -> Workflow {
    Workflow::new("flaky", 1)
        .max_attempts(max_attempts)
        .step("a", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("a")))
        })
        .step("b", move |ctx: StepCtx| async move {
            effect(&ctx, &format!("b{}", ctx.attempt())).await?;
            if fail_always || ctx.attempt() == 1 {
                return Err(format!("b failed on attempt {}", ctx.attempt()));
            }
            Ok(StepOutcome::Continue(json!("b")))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_step_rolls_back_its_writes_and_is_retried() -> TestResult {
    conforms(
        || registry(flaky(3, false)),
        |rig| async move {
            let id = rig.start("flaky").await?;
            rig.settle(2).await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(
                rig.effects().await?,
                ["b2"],
                "attempt 1's write rolled back"
            );
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_exhaust_into_failure() -> TestResult {
    conforms(
        || registry(flaky(2, true)),
        |rig| async move {
            let id = rig.start("flaky").await?;
            rig.settle(3).await?;
            assert_eq!(rig.state(id).await?, "failed");
            assert!(rig.effects().await?.is_empty());
            rig.dump().await
        },
    )
    .await
}

/// `wait`: `a`, then `w` waits for signal `fill`/`o-1` for an hour (on timeout it finishes
/// with `"timed out"`), then `z`.
fn wait() -> Workflow {
    Workflow::new("wait", 1)
        .step("a", |_ctx: StepCtx| async {
            Ok(StepOutcome::Continue(json!("a")))
        })
        .step("w", |ctx: StepCtx| async move {
            if ctx.timed_out() {
                return Ok(StepOutcome::Finish(json!("timed out")));
            }
            Ok(StepOutcome::wait_signal(
                "fill",
                "o-1",
                Duration::from_secs(3600),
            ))
        })
        .step("z", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(json!({ "got": ctx.output("w") })))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_sent_before_the_wait_is_kept() -> TestResult {
    conforms(
        || registry(wait()),
        |rig| async move {
            signal_send(&rig.store, "fill", "o-1", &json!({ "qty": 1 }), "d-1").await?;
            let id = rig.start("wait").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_racing_the_wait_is_never_lost() -> TestResult {
    conforms(
        || registry(wait()),
        |rig| async move {
            let id = rig.start("wait").await?;
            let jobs = rig.claim(1).await?;
            let store = rig.store.clone();
            let send = tokio::spawn(async move {
                signal_send(&store, "fill", "o-1", &json!({ "qty": 2 }), "d-2").await
            });
            rig.run(&jobs[0]).await?;
            send.await??;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            // Which side of the race won decides whether the step found the signal pending
            // (`wait_seq` 0) or waited for it (`wait_seq` 1, and a timeout job that is left to
            // fire as a no-op). Both are correct, so the timeout is let fire and the counter is
            // left out: what the configurations must agree on is everything else.
            rig.settle(1).await?;
            let mut dump = rig.dump().await?;
            strip_key(&mut dump, "wait_seq");
            Ok(dump)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waits_time_out() -> TestResult {
    conforms(
        || registry(wait()),
        |rig| async move {
            let id = rig.start("wait").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "waiting");
            rig.settle(2).await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}

/// Removes every `key` field from `v`, at any depth.
fn strip_key(v: &mut Value, key: &str) {
    match v {
        Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|x| strip_key(x, key));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

/// `nap`: `a` sleeps an hour past the clock's reading, then `b` writes its effect.
fn nap() -> Workflow {
    Workflow::new("nap", 1)
        .step("a", |_ctx: StepCtx| async {
            Ok(StepOutcome::SleepUntil(t0() + chrono::Duration::hours(1)))
        })
        .step("b", |ctx: StepCtx| async move {
            effect(&ctx, "b").await?;
            Ok(StepOutcome::Continue(json!("b")))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timers_fire() -> TestResult {
    conforms(
        || registry(nap()),
        |rig| async move {
            let id = rig.start("nap").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "waiting");
            assert!(rig.effects().await?.is_empty(), "not before its time");
            rig.settle(1).await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}

async fn cancel(rig: &Rig, id: WorkflowId) -> TestResult<bool> {
    let mut tx = rig.db.pool.begin().await?;
    let done = workflow_cancel_in(&mut tx, &rig.store, id, "operator says stop").await?;
    tx.commit().await?;
    Ok(done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_between_steps_stops_the_workflow() -> TestResult {
    conforms(
        || registry(nap()),
        |rig| async move {
            let id = rig.start("nap").await?;
            rig.drain().await?;
            assert!(cancel(&rig, id).await?);
            rig.settle(1).await?;
            assert_eq!(rig.state(id).await?, "cancelled");
            assert!(rig.effects().await?.is_empty());
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_during_a_step_stops_the_workflow_after_it() -> TestResult {
    let (release, released) = tokio::sync::watch::channel(false);
    let release = Arc::new(release);
    // Set when `a`'s body runs (under the workflow's lock on every path here).
    let (enter, entered) = tokio::sync::watch::channel(false);
    let enter = Arc::new(enter);
    let reset = enter.clone();
    let wf = move || {
        let (released, enter) = (released.clone(), enter.clone());
        Workflow::new("slow", 1)
            .step("a", move |_ctx: StepCtx| {
                let (mut released, enter) = (released.clone(), enter.clone());
                async move {
                    enter.send_replace(true);
                    let _ = released.wait_for(|r| *r).await;
                    Ok(StepOutcome::Continue(json!("a")))
                }
            })
            .step("b", |ctx: StepCtx| async move {
                effect(&ctx, "b").await?;
                Ok(StepOutcome::Continue(json!("b")))
            })
    };
    conforms(
        || registry(wf()),
        |rig| {
            let (release, mut entered) = (release.clone(), entered.clone());
            let reset = reset.clone();
            async move {
                release.send_replace(false);
                reset.send_replace(false);
                let id = rig.start("slow").await?;
                let jobs = rig.claim(1).await?;
                let rig = Arc::new(rig);
                let running = {
                    let (rig, job) = (rig.clone(), jobs[0].clone());
                    tokio::spawn(async move { rig.run(&job).await })
                };
                entered.wait_for(|e| *e).await?;
                // The operator's cancel, while `a` runs: it waits for the step's lock.
                let canceller = {
                    let rig = rig.clone();
                    tokio::spawn(async move { cancel(&rig, id).await })
                };
                let pool = rig.db.pool.clone();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    if waiting > 0 {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the cancel never waited"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                release.send_replace(true);
                running.await??;
                assert!(canceller.await??, "the cancel applies after the step");
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "cancelled");
                assert!(rig.effects().await?.is_empty(), "b never ran");
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_retry_resumes_a_failed_workflow() -> TestResult {
    let healed = Arc::new(AtomicUsize::new(0));
    let wf = {
        let healed = healed.clone();
        move || {
            let healed = healed.clone();
            Workflow::new("heal", 1)
                .step("a", |_ctx: StepCtx| async {
                    Ok(StepOutcome::Continue(json!("a")))
                })
                .step("b", move |ctx: StepCtx| {
                    let healed = healed.clone();
                    async move {
                        if healed.load(Ordering::SeqCst) == 0 {
                            return Ok(StepOutcome::Fail("the account is frozen".into()));
                        }
                        effect(&ctx, "b").await?;
                        Ok(StepOutcome::Continue(json!("b")))
                    }
                })
        }
    };
    conforms(
        || registry(wf()),
        |rig| {
            let healed = healed.clone();
            async move {
                healed.store(0, Ordering::SeqCst);
                let id = rig.start("heal").await?;
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "failed");
                healed.store(1, Ordering::SeqCst);
                let mut tx = rig.db.pool.begin().await?;
                assert!(workflow_retry_in(&mut tx, &rig.store, id).await?);
                tx.commit().await?;
                rig.drain().await?;
                assert_eq!(rig.state(id).await?, "completed");
                rig.dump().await
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compensation_runs_in_reverse_order() -> TestResult {
    let undo = |name: &'static str| {
        move |ctx: StepCtx, output: Value| async move {
            let mut db = ctx.db().await.map_err(|e| e.to_string())?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
                .fetch_one(&mut *db)
                .await
                .map_err(|e| e.to_string())?;
            drop(db);
            effect(&ctx, &format!("{n}: undo {name}")).await?;
            Ok(json!({ "undid": output }))
        }
    };
    let wf = move || {
        Workflow::new("saga", 1)
            .step_with_compensation(
                "hold",
                |_ctx: StepCtx| async { Ok(StepOutcome::Continue(json!("held"))) },
                undo("hold"),
            )
            .step("quote", |_ctx: StepCtx| async {
                Ok(StepOutcome::Continue(json!("quoted")))
            })
            .step_with_compensation(
                "place",
                |_ctx: StepCtx| async { Ok(StepOutcome::Continue(json!("placed"))) },
                undo("place"),
            )
            .step("settle", |_ctx: StepCtx| async {
                Ok(StepOutcome::Fail("the exchange refused".into()))
            })
    };
    conforms(
        || registry(wf()),
        |rig| async move {
            let id = rig.start("saga").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "compensated");
            assert_eq!(rig.effects().await?, ["0: undo place", "1: undo hold"]);
            rig.dump().await
        },
    )
    .await
}

/// `call`: `a` writes an effect and makes its external call in one step, whose answer is
/// given by `answer`; its reconcile hook says `verdict` (asked once).
fn call(answer: Result<Value, CallError>, verdict: Reconciled) -> Workflow {
    Workflow::new("call", 1)
        .reconcile_attempts(1)
        .step("a", move |ctx: StepCtx| {
            let answer = answer.clone();
            async move {
                effect(&ctx, "a").await?;
                let got = ctx.external_call(|_key| async move { answer }).await?;
                Ok(StepOutcome::Continue(got))
            }
        })
        .reconcile(move |_ctx: StepCtx, key: String| {
            let verdict = verdict.clone();
            async move {
                Ok(match verdict {
                    Reconciled::Succeeded(v) => {
                        Reconciled::Succeeded(json!({ "v": v, "key": key }))
                    }
                    other => other,
                })
            }
        })
        .step("b", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(json!({ "after": ctx.output("a") })))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_writes_and_calls_out_in_one_step() -> TestResult {
    conforms(
        || registry(call(Ok(json!({ "order": 7 })), Reconciled::Unknown)),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["a"]);
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_doubt_call_is_settled_by_its_reconcile_hook() -> TestResult {
    let timeout = Err(CallError::Unknown("timed out".into()));
    conforms(
        || registry(call(timeout.clone(), Reconciled::Succeeded(json!("found")))),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert!(
                rig.effects().await?.is_empty(),
                "the doubtful step's writes are dropped"
            );
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_doubt_call_is_settled_by_an_admin() -> TestResult {
    let timeout = Err(CallError::Unknown("timed out".into()));
    conforms(
        || registry(call(timeout.clone(), Reconciled::Unknown)),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "waiting");
            let mut tx = rig.db.pool.begin().await?;
            let settled = workflow_resolve_in(
                &mut tx,
                &rig.store,
                rig.runtime.registry(),
                id,
                "a",
                Resolution::Succeeded(json!({ "order": "by hand" })),
            )
            .await?;
            tx.commit().await?;
            assert!(settled);
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}
