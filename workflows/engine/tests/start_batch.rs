//! Group-committed `workflow_start`s against a real database: concurrent starts share
//! statements yet keep one workflow and one job per unique key (also a key another
//! transaction holds meanwhile), every id returned is committed, a start Postgres refuses
//! fails alone, NOTIFY goes once per queue, and a lone start is not delayed.
//!
//! Rows inserted by one statement share their `xmin` (the inserting transaction), which is
//! how these tests see which starts went out together. Starts are put in one batch
//! deterministically by polling their futures once each on a current-thread runtime: a
//! start queues its item before its first `.await`, and the batching task cannot run
//! before the test task yields.
use chrono::{DateTime, Utc};
use futures::FutureExt;
use ledgerflow_engine::notify::JOBS_CHANNEL;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    Error, ExecConfig, Inline, ManualClock, Outcome, Result, RetryPolicy, StepCtx, StepOutcome,
    Store, StoreConfig, Workflow, WorkflowId, WorkflowRegistry, WorkflowRuntime, workflow_start_in,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

struct Env {
    db: TestDb,
    store: Store,
    /// A pool of its own: what a reader that is not the starter sees.
    other: PgPool,
}

impl Env {
    async fn new(notify: bool) -> Result<Self> {
        let db = TestDb::with_pool_size(16).await?;
        let store = Store::with_config(
            db.pool.clone(),
            StoreConfig {
                lease_ttl: Duration::from_secs(30),
                notify,
                retry: RetryPolicy {
                    base: Duration::from_secs(10),
                    max: Duration::from_secs(3600),
                    jitter: 0.0,
                },
            },
        )
        .with_clock(Arc::new(ManualClock::new(t0())));
        let other = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db.url)
            .await?;
        Ok(Self { db, store, other })
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.other).await?)
    }

    /// The transaction that inserted workflow `id`.
    async fn xmin(&self, id: WorkflowId) -> Result<String> {
        Ok(
            sqlx::query_scalar("SELECT xmin::text FROM workflows WHERE id = $1")
                .bind(id)
                .fetch_one(&self.other)
                .await?,
        )
    }

    /// Claims and runs due step jobs until none is left; returns how many ran.
    async fn drain(&self, registry: &WorkflowRegistry) -> Result<usize> {
        let owner: Arc<str> = Arc::from("worker");
        let mut ran = 0;
        loop {
            self.store.job_promote_due(1000).await?;
            let jobs = self.store.job_claim("default", &owner, 50).await?;
            if jobs.is_empty() {
                return Ok(ran);
            }
            for job in &jobs {
                // One step per job, so that `ran` counts steps.
                let config = ExecConfig::default().inline(Inline::OFF);
                let runtime =
                    WorkflowRuntime::with_config(self.store.clone(), registry.clone(), config);
                let outcome = runtime.handler().run(job).await.outcome;
                if !job.lease.is_finished() {
                    self.store.job_finish(&job.lease, &outcome).await?;
                }
                assert_eq!(outcome, Outcome::Complete, "{job:?}");
                ran += 1;
            }
        }
    }
}

/// `order`: two steps that need nothing but their checkpoints; the output
/// carries the input's `n`.
fn order() -> Workflow {
    Workflow::new("order", 1)
        .step("a", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(json!({ "n": ctx.input()["n"] })))
        })
        .step("b", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(
                ctx.output("a").cloned().unwrap_or(Value::Null),
            ))
        })
}

fn registry() -> Result<WorkflowRegistry> {
    WorkflowRegistry::new().register(order())
}

type Start<'a> = Pin<Box<dyn Future<Output = Result<WorkflowId>> + 'a>>;

/// Runs `starts` as one batch: each is polled once (queuing its item; the
/// batching task cannot run in between on this current-thread runtime),
/// then all are awaited.
async fn together(mut starts: Vec<Start<'_>>) -> Vec<Result<WorkflowId>> {
    for start in &mut starts {
        assert!(
            start.as_mut().now_or_never().is_none(),
            "a start answered before the batch ran"
        );
    }
    futures::future::join_all(starts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_starts_give_one_workflow_and_one_job_per_key() -> TestResult {
    let env = Arc::new(Env::new(false).await?);
    let reg = Arc::new(registry()?);
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    let (total, tasks) = (200_usize, 32_usize);
    // Every third start has a key shared with about six others.
    let key = |i: usize| i.is_multiple_of(3).then(|| format!("key-{}", i % 10));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (env, rt) = (env.clone(), rt.clone());
        handles.push(tokio::spawn(async move {
            let mut started = Vec::new();
            for i in (t..total).step_by(tasks) {
                let id = rt
                    .start("order", &json!({ "n": i }), key(i).as_deref())
                    .await?;
                // Committed when it returns: another connection sees the
                // instance and its one job at once.
                let (unique_key, jobs): (Option<String>, i64) = sqlx::query_as(
                    "SELECT w.unique_key,
                            (SELECT count(*) FROM jobs j WHERE j.workflow_id = w.id)
                     FROM workflows w WHERE w.id = $1",
                )
                .bind(id)
                .fetch_one(&env.other)
                .await?;
                assert_eq!((unique_key, jobs), (key(i), 1), "start {i} ({id})");
                started.push((i, id));
            }
            Ok::<_, Error>(started)
        }));
    }
    let mut by_key: HashMap<String, HashSet<WorkflowId>> = HashMap::new();
    let mut unkeyed = HashSet::new();
    for handle in handles {
        for (i, id) in handle.await?? {
            match key(i) {
                Some(k) => {
                    by_key.entry(k).or_default().insert(id);
                }
                None => assert!(unkeyed.insert(id), "id {id} returned twice"),
            }
        }
    }
    assert_eq!(by_key.len(), 10);
    for (k, ids) in &by_key {
        assert_eq!(ids.len(), 1, "callers of {k} got {ids:?}");
    }
    let keyed: HashSet<WorkflowId> = by_key.values().flatten().copied().collect();
    assert!(keyed.is_disjoint(&unkeyed));
    let expected = i64::try_from(unkeyed.len() + keyed.len())?;
    assert_eq!(expected, 133 + 10);
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, expected);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, expected);
    assert_eq!(
        env.count("SELECT count(*) FROM workflows WHERE unique_key IS NOT NULL")
            .await?,
        10
    );
    // The starts did share statements (32 concurrent starters, one batch
    // in flight at a time).
    let statements = env
        .count("SELECT count(DISTINCT xmin::text) FROM workflows")
        .await?;
    assert!(
        statements < expected,
        "{statements} statements for {expected} starts"
    );

    // And they run as any workflow does.
    assert_eq!(env.drain(&reg).await?, 2 * usize::try_from(expected)?);
    assert_eq!(
        env.count("SELECT count(*) FROM workflows WHERE state = 'completed' AND output ? 'n'")
            .await?,
        expected
    );
    assert_eq!(
        env.count("SELECT count(*) FROM jobs WHERE state <> 'completed'")
            .await?,
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM workflow_steps WHERE status = 'completed'")
            .await?,
        2 * expected
    );
    Ok(())
}

#[tokio::test]
async fn one_key_twice_in_one_batch_gives_one_workflow_and_a_taken_key_enqueues_nothing()
-> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    let old = rt.start("order", &json!({ "n": 0 }), Some("old")).await?;

    let started = together(vec![
        Box::pin(rt.start("order", &json!({ "n": 1 }), Some("k"))),
        Box::pin(rt.start("order", &json!({ "n": 2 }), None)),
        Box::pin(rt.start("order", &json!({ "n": 3 }), Some("k"))),
        Box::pin(rt.start("order", &json!({ "n": 4 }), Some("old"))),
    ])
    .await;
    let [k1, free, k2, again] = <[Result<WorkflowId>; 4]>::try_from(started)
        .map_err(|_| "four results")?
        .map(|r| r.expect("every start succeeds"));
    assert_eq!(k1, k2, "both callers of one key get its instance");
    assert_eq!(again, old, "a taken key gives its holder");
    assert_eq!(HashSet::from([old, k1, free]).len(), 3);
    // One statement wrote both new instances; the first of the key's two
    // items (in array order) won.
    assert_eq!(env.xmin(k1).await?, env.xmin(free).await?);
    assert_ne!(env.xmin(k1).await?, env.xmin(old).await?);
    let input: Value = sqlx::query_scalar("SELECT input FROM workflows WHERE id = $1")
        .bind(k1)
        .fetch_one(&env.other)
        .await?;
    assert!(input == json!({ "n": 1 }) || input == json!({ "n": 3 }));
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 3);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 3);
    assert_eq!(
        env.count("SELECT count(DISTINCT workflow_id) FROM jobs")
            .await?,
        3
    );

    // An unknown kind fails before anything is written.
    assert!(matches!(
        rt.start("nope", &json!({}), None).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 3);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 3);
    Ok(())
}

/// A batch item whose key another transaction inserted and has not yet
/// committed waits for it; once that transaction ends, the item gets its
/// instance (committed) or inserts its own (rolled back).
async fn a_key_held_by_an_open_transaction(commit: bool) -> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    let mut tx = env.db.pool.begin().await?;
    let held = workflow_start_in(
        &mut tx,
        &env.store,
        &reg,
        "order",
        &json!({ "n": 0 }),
        Some("held"),
    )
    .await?;
    let (one, two) = (json!({ "n": 1 }), json!({ "n": 2 }));
    let mut starts: Vec<Start<'_>> = vec![
        Box::pin(rt.start("order", &one, Some("held"))),
        Box::pin(rt.start("order", &two, None)),
    ];
    for start in &mut starts {
        assert!(start.as_mut().now_or_never().is_none());
    }
    // The batch statement waits for the open transaction's key.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&env.other)
    .await?
        == 0
    {
        assert!(Instant::now() < deadline, "the batch never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    let started = futures::future::join_all(starts).await;
    let [keyed, free] = <[Result<WorkflowId>; 2]>::try_from(started)
        .map_err(|_| "two results")?
        .map(|r| r.expect("both starts succeed"));
    assert_eq!(keyed == held, commit);
    assert_ne!(free, keyed);
    // Both new rows came from the one batch statement, which waited.
    if !commit {
        assert_eq!(env.xmin(keyed).await?, env.xmin(free).await?);
    }
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 2);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 2);
    assert_eq!(
        env.count("SELECT count(DISTINCT workflow_id) FROM jobs")
            .await?,
        2
    );
    Ok(())
}

#[tokio::test]
async fn a_key_another_transaction_commits_meanwhile_gives_its_instance() -> TestResult {
    a_key_held_by_an_open_transaction(true).await
}

#[tokio::test]
async fn a_key_another_transaction_rolls_back_meanwhile_is_started_by_the_batch() -> TestResult {
    a_key_held_by_an_open_transaction(false).await
}

#[tokio::test]
async fn a_start_postgres_refuses_fails_alone_and_the_rest_of_its_batch_starts() -> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    // jsonb has no NUL character: Postgres refuses this input (the whole
    // batch statement with it).
    let bad = json!({ "n": "nul \u{0} inside" });
    let started = together(vec![
        Box::pin(rt.start("order", &json!({ "n": 1 }), None)),
        Box::pin(rt.start("order", &bad, None)),
        Box::pin(rt.start("order", &json!({ "n": 2 }), Some("k2"))),
        Box::pin(rt.start("order", &json!({ "n": 3 }), None)),
    ])
    .await;
    let [g1, refused, g2, g3] =
        <[Result<WorkflowId>; 4]>::try_from(started).map_err(|_| "four results")?;
    assert!(
        matches!(refused, Err(Error::Db(sqlx::Error::Database(_)))),
        "{refused:?}"
    );
    let ids = [g1?, g2?, g3?];
    for (id, n) in ids.iter().zip(1..) {
        let (input, jobs): (Value, i64) = sqlx::query_as(
            "SELECT w.input, (SELECT count(*) FROM jobs j WHERE j.workflow_id = w.id)
             FROM workflows w WHERE w.id = $1",
        )
        .bind(id)
        .fetch_one(&env.other)
        .await?;
        assert_eq!((input, jobs), (json!({ "n": n }), 1));
    }
    assert_eq!(env.count("SELECT count(*) FROM workflows").await?, 3);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 3);
    // The refused batch wrote nothing; each start went on its own.
    assert_eq!(
        env.count("SELECT count(DISTINCT xmin::text) FROM workflows")
            .await?,
        3
    );
    Ok(())
}

#[tokio::test]
async fn a_start_given_up_before_its_batch_went_out_writes_nothing() -> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    let input = json!({ "n": 1 });
    let mut gone: Start<'_> = Box::pin(rt.start("order", &input, Some("gone")));
    assert!(gone.as_mut().now_or_never().is_none(), "queued");
    drop(gone);
    let kept = rt.start("order", &json!({ "n": 2 }), None).await?;
    assert_eq!(
        sqlx::query_scalar::<_, Vec<WorkflowId>>("SELECT array_agg(id) FROM workflows")
            .fetch_one(&env.other)
            .await?,
        vec![kept]
    );
    assert_eq!(env.count("SELECT count(*) FROM jobs").await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_lone_start_after_idle_is_not_delayed() -> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    // The first start also starts the batching task and opens connections.
    rt.start("order", &json!({ "n": 0 }), None).await?;
    for n in 1..=3 {
        let began = Instant::now();
        let id = rt.start("order", &json!({ "n": n }), None).await?;
        let took = began.elapsed();
        // Generous: a start is a few milliseconds; a batcher that lingered
        // for company would show here.
        assert!(took < Duration::from_secs(1), "start {n} took {took:?}");
        assert_eq!(
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE workflow_id = $1")
                .bind(id)
                .fetch_one(&env.other)
                .await?,
            1
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_wakes_each_of_its_queues_once_and_only_when_asked() -> TestResult {
    let env = Env::new(true).await?;
    let reg = WorkflowRegistry::new()
        .register(order())?
        .register(order_on("mail"))?
        .register(order_on("hush"))?;
    let mut listener = PgListener::connect(&env.db.url).await?;
    listener.listen(JOBS_CHANNEL).await?;

    let rt = WorkflowRuntime::new(env.store.clone(), reg);
    let quiet_rt = rt.with_notify(false);
    let started = together(vec![
        Box::pin(rt.start("order", &json!({ "n": 1 }), None)),
        Box::pin(rt.start("mail", &json!({ "n": 2 }), None)),
        Box::pin(rt.start("order", &json!({ "n": 3 }), None)),
        Box::pin(rt.start("mail", &json!({ "n": 4 }), None)),
        Box::pin(quiet_rt.start("hush", &json!({ "n": 5 }), None)),
    ])
    .await;
    let ids = started.into_iter().collect::<Result<Vec<_>>>()?;
    let xmins: HashSet<String> = {
        let mut x = HashSet::new();
        for id in &ids {
            x.insert(env.xmin(*id).await?);
        }
        x
    };
    assert_eq!(xmins.len(), 1, "one statement");
    assert_eq!(
        heard_until_sentinel(&env, &mut listener).await?,
        ["default", "mail"]
    );

    // A runtime without NOTIFY (sharing the batcher) sends none: the
    // `hush` item above woke nothing, nor does this one.
    quiet_rt.start("mail", &json!({ "n": 6 }), None).await?;
    assert!(heard_until_sentinel(&env, &mut listener).await?.is_empty());
    Ok(())
}

/// `order` under the kind `kind`, on the queue of the same name.
fn order_on(kind: &'static str) -> Workflow {
    let mut wf = order().queue(kind);
    wf.kind = kind;
    wf
}

/// The payloads heard on the jobs channel before a sentinel sent now (a
/// later commit's notifications arrive after those of earlier commits).
async fn heard_until_sentinel(env: &Env, listener: &mut PgListener) -> Result<Vec<String>> {
    sqlx::query("SELECT pg_notify($1, 'sentinel')")
        .bind(JOBS_CHANNEL)
        .execute(&env.other)
        .await?;
    let mut heard = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .map_err(|_| Error::Invalid("no sentinel within 10 s".into()))??;
        if n.payload() == "sentinel" {
            heard.sort();
            return Ok(heard);
        }
        heard.push(n.payload().to_string());
    }
}

/// The batch statement inserts, row by row, what the one-start statement inserts: the same
/// workflow row and the same first job (ids and keys aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_statements_leave_identical_rows() -> TestResult {
    let env = Env::new(false).await?;
    let reg = registry()?;
    let rt = WorkflowRuntime::new(env.store.clone(), reg.clone());
    let input = json!({ "n": 7, "nested": { "amount": "1.50" } });
    let one = {
        let mut conn = env.db.pool.acquire().await?;
        workflow_start_in(&mut conn, &env.store, &reg, "order", &input, Some("one")).await?
    };
    let batched = rt.start("order", &input, Some("batched")).await?;
    assert_ne!(env.xmin(one).await?, env.xmin(batched).await?);
    let row = |id: WorkflowId, key: &'static str| {
        let other = env.other.clone();
        async move {
            let (wf, job): (Value, Value) = sqlx::query_as(
                "SELECT to_jsonb(w) - 'id' - 'unique_key',
                        to_jsonb(j) - 'id' - 'unique_key' - 'args' - 'workflow_id'
                                    || jsonb_build_object('args', j.args - 'workflow_id')
                 FROM workflows w JOIN jobs j ON j.workflow_id = w.id
                 WHERE w.id = $1",
            )
            .bind(id)
            .fetch_one(&other)
            .await?;
            let key_of: Option<String> =
                sqlx::query_scalar("SELECT unique_key FROM workflows WHERE id = $1")
                    .bind(id)
                    .fetch_one(&other)
                    .await?;
            assert_eq!(key_of.as_deref(), Some(key));
            Ok::<_, sqlx::Error>((wf, job))
        }
    };
    let (wf_one, job_one) = row(one, "one").await?;
    let (wf_batched, job_batched) = row(batched, "batched").await?;
    assert_eq!(wf_one, wf_batched);
    assert_eq!(job_one, job_batched);
    rt.shutdown().await;
    Ok(())
}
