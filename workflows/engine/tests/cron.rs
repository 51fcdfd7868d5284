//! Durable cron against a real database: catch-up policies after an outage,
//! replicas with skewed clocks, overlap, atomicity of tick and job, pause,
//! resume and manual triggers.
//!
//! Each test gets its own migrated database and drives time with a
//! [`ManualClock`]; "a scheduler" is a call to `cron_fire_due`, so every
//! interleaving is explicit and nothing sleeps.
use chrono::{DateTime, TimeDelta, Utc};
use ledgerflow_engine::cron::{
    CatchUp, FiredTick, Overlap, ScheduleDef, TickOutcome, cron_job_key,
};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{ManualClock, Outcome, Store, StoreConfig};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// 2030-01-01T00:00:00Z, a whole minute.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).expect("a valid timestamp")
}

fn min(n: i64) -> DateTime<Utc> {
    t0() + TimeDelta::minutes(n)
}

fn store_with(pool: &PgPool, clock: &ManualClock) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            notify: false,
            ..StoreConfig::default()
        },
    )
    .with_clock(Arc::new(clock.clone()))
}

struct Env {
    db: TestDb,
    clock: ManualClock,
    store: Store,
}

impl Env {
    async fn new() -> TestResult<Self> {
        let db = TestDb::new().await?;
        let clock = ManualClock::new(t0());
        let store = store_with(&db.pool, &clock);
        Ok(Self { db, clock, store })
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    async fn count(&self, sql: &str, schedule: &str) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(schedule)
            .fetch_one(self.pool())
            .await?)
    }

    async fn enqueued(&self, schedule: &str) -> TestResult<Vec<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT fire_at FROM cron_ticks WHERE schedule = $1 AND outcome = 'enqueued' ORDER BY fire_at",
        )
        .bind(schedule)
        .fetch_all(self.pool())
        .await?)
    }

    async fn jobs_of(&self, schedule: &str) -> TestResult<i64> {
        self.count(
            "SELECT count(*) FROM jobs WHERE unique_key LIKE 'cron:' || $1 || ':%'",
            schedule,
        )
        .await
    }
}

fn every_minute(name: &str, policy: CatchUp) -> ScheduleDef {
    ScheduleDef::new(name, "* * * * *", "cron.test").catch_up(policy, Duration::from_secs(3600))
}

fn of(ticks: &[FiredTick], schedule: &str, outcome: TickOutcome) -> usize {
    ticks
        .iter()
        .filter(|t| t.schedule == schedule && t.outcome == outcome)
        .count()
}

#[tokio::test]
async fn ten_minutes_down_is_caught_up_per_policy() -> TestResult {
    let env = Env::new().await?;
    for (name, policy) in [
        ("all", CatchUp::All),
        ("latest", CatchUp::Latest),
        ("skip", CatchUp::Skip),
    ] {
        let s = env.store.cron_upsert(&every_minute(name, policy)).await?;
        assert_eq!(s.next_fire_at, Some(min(1)));
    }
    // Running normally: the 00:01 tick fires on time under every policy.
    env.advance(60);
    let fired = env.store.cron_fire_due(100).await?;
    for name in ["all", "latest", "skip"] {
        assert_eq!(of(&fired, name, TickOutcome::Enqueued), 1, "{name}");
    }

    // Every scheduler is down from 00:01 to 00:11:45: ticks 00:02..=00:11
    // (ten of them) are missed, the last one by 45 s (beyond the grace).
    env.advance(10 * 60 + 45);
    // Each replica's config upsert at start must not lose the missed ticks.
    for (name, policy) in [
        ("all", CatchUp::All),
        ("latest", CatchUp::Latest),
        ("skip", CatchUp::Skip),
    ] {
        let s = env.store.cron_upsert(&every_minute(name, policy)).await?;
        assert_eq!(s.next_fire_at, Some(min(2)), "{name}");
    }
    let fired = env.store.cron_fire_due(100).await?;
    assert_eq!(of(&fired, "all", TickOutcome::Enqueued), 10);
    assert_eq!(of(&fired, "latest", TickOutcome::Enqueued), 1);
    assert_eq!(of(&fired, "skip", TickOutcome::Enqueued), 0);
    // A second pass (another replica) finds nothing left to do.
    assert!(env.store.cron_fire_due(100).await?.is_empty());

    let all = env.enqueued("all").await?;
    assert_eq!(all, (1..=11).map(min).collect::<Vec<_>>());
    assert_eq!(env.jobs_of("all").await?, 11);
    assert_eq!(env.enqueued("latest").await?, vec![min(1), min(11)]);
    assert_eq!(env.jobs_of("latest").await?, 2);
    assert_eq!(env.enqueued("skip").await?, vec![min(1)]);
    assert_eq!(env.jobs_of("skip").await?, 1);

    // The dropped ranges are on record, one row per gap.
    let gaps: Vec<(String, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT schedule, fire_at, skipped_until FROM cron_ticks
         WHERE outcome = 'skipped_catchup' ORDER BY schedule",
    )
    .fetch_all(env.pool())
    .await?;
    assert_eq!(
        gaps,
        vec![
            ("latest".to_string(), min(2), Some(min(11))),
            ("skip".to_string(), min(2), Some(min(12))),
        ]
    );

    // Each job carries its tick's key, and each tick names its job.
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cron_ticks t LEFT JOIN jobs j ON j.id = t.job_id
         WHERE t.job_id IS NOT NULL
           AND (j.id IS NULL OR j.unique_key <> 'cron:' || t.schedule || ':' ||
                to_char(t.fire_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))",
    )
    .fetch_one(env.pool())
    .await?;
    assert_eq!(mismatched, 0);
    assert_eq!(cron_job_key("all", min(1)), "cron:all:2030-01-01T00:01:00Z");

    // Back to normal: the next future tick fires under every policy.
    env.advance(15);
    let fired = env.store.cron_fire_due(100).await?;
    for name in ["all", "latest", "skip"] {
        assert_eq!(of(&fired, name, TickOutcome::Enqueued), 1, "{name}");
        assert_eq!(env.enqueued(name).await?.last(), Some(&min(12)), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn catch_up_all_is_bounded_by_its_window() -> TestResult {
    let env = Env::new().await?;
    env.store
        .cron_upsert(
            &every_minute("w", CatchUp::All).catch_up(CatchUp::All, Duration::from_secs(300)),
        )
        .await?;
    env.advance(30 * 60 + 10); // down until 00:30:10
    env.store.cron_fire_due(10).await?;
    // Fire times within 5 minutes of 00:30:10: 00:26..=00:30.
    assert_eq!(
        env.enqueued("w").await?,
        (26..=30).map(min).collect::<Vec<_>>()
    );
    let gap: (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "SELECT fire_at, skipped_until FROM cron_ticks WHERE outcome = 'skipped_catchup'",
    )
    .fetch_one(env.pool())
    .await?;
    assert_eq!(gap, (min(1), min(26)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_skewed_fire_every_tick_exactly_once() -> TestResult {
    let env = Env::new().await?;
    // A second replica: its own pool and a clock 90 s ahead.
    let skewed_clock = ManualClock::new(t0() + TimeDelta::seconds(90));
    let other_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(env.db.connect_options()?)
        .await?;
    let skewed = store_with(&other_pool, &skewed_clock);

    // The leading replica creates the schedules, so that no tick is older
    // than the grace when the first pass of either replica sees it.
    skewed
        .cron_upsert(&ScheduleDef::new("minutely", "* * * * *", "cron.test"))
        .await?;
    skewed
        .cron_upsert(&ScheduleDef::new(
            "ten-seconds",
            "*/10 * * * * *",
            "cron.test",
        ))
        .await?;
    skewed
        .cron_upsert(
            &ScheduleDef::new("ten-seconds-latest", "*/10 * * * * *", "cron.test")
                .catch_up(CatchUp::Latest, Duration::ZERO),
        )
        .await?;

    // Ten simulated minutes in 2-second steps; each step, both replicas run
    // three concurrent passes.
    for _ in 0..300 {
        env.advance(2);
        skewed_clock.advance(Duration::from_secs(2));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let s = if i % 2 == 0 {
                env.store.clone()
            } else {
                skewed.clone()
            };
            tasks.push(tokio::spawn(async move { s.cron_fire_due(10).await }));
        }
        for t in tasks {
            t.await??;
        }
    }
    // The skewed replica is at 00:11:30, the other at 00:10:00.
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT schedule, fire_at FROM cron_ticks
                               GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(env.pool())
    .await?;
    assert_eq!(dupes, 0);
    let ticks: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_ticks WHERE job_id IS NOT NULL")
        .fetch_one(env.pool())
        .await?;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(env.pool())
        .await?;
    assert_eq!(ticks, jobs);
    let distinct_jobs: i64 = sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM cron_ticks")
        .fetch_one(env.pool())
        .await?;
    assert_eq!(distinct_jobs, jobs);
    // No gaps and nothing dropped: every fire time up to the leading clock.
    let end = t0() + TimeDelta::seconds(90 + 600);
    assert_eq!(
        env.enqueued("minutely").await?,
        (2..=11).map(min).collect::<Vec<_>>()
    );
    for name in ["ten-seconds", "ten-seconds-latest"] {
        let want: Vec<DateTime<Utc>> = (10..)
            .map(|k| t0() + TimeDelta::seconds(10 * k))
            .take_while(|t| *t <= end)
            .collect();
        assert_eq!(env.enqueued(name).await?, want, "{name}");
    }
    let skipped: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_ticks WHERE job_id IS NULL")
        .fetch_one(env.pool())
        .await?;
    assert_eq!(skipped, 0);
    Ok(())
}

#[tokio::test]
async fn overlap_skip_waits_for_the_previous_job_and_allow_does_not() -> TestResult {
    let env = Env::new().await?;
    env.store
        .cron_upsert(
            &every_minute("skip", CatchUp::All)
                .overlap(Overlap::Skip)
                .queue("q-skip"),
        )
        .await?;
    env.store
        .cron_upsert(
            &every_minute("allow", CatchUp::All)
                .overlap(Overlap::Allow)
                .queue("q-allow"),
        )
        .await?;

    env.advance(60);
    env.store.cron_fire_due(10).await?; // 00:01: both enqueue
    env.advance(60);
    let fired = env.store.cron_fire_due(10).await?; // 00:02: first job still available
    assert_eq!(of(&fired, "skip", TickOutcome::SkippedOverlap), 1);
    assert_eq!(of(&fired, "allow", TickOutcome::Enqueued), 1);

    // Running counts as unfinished too.
    let owner: Arc<str> = Arc::from("w");
    let claimed = env.store.job_claim("q-skip", &owner, 10).await?;
    assert_eq!(claimed.len(), 1);
    env.advance(60);
    let fired = env.store.cron_fire_due(10).await?; // 00:03
    assert_eq!(of(&fired, "skip", TickOutcome::SkippedOverlap), 1);

    // Once it has finished, the next tick enqueues again.
    env.store
        .job_finish(&claimed[0].lease, &Outcome::Complete)
        .await?;
    env.advance(60);
    let fired = env.store.cron_fire_due(10).await?; // 00:04
    assert_eq!(of(&fired, "skip", TickOutcome::Enqueued), 1);

    let rows: Vec<(DateTime<Utc>, String, bool)> = sqlx::query_as(
        "SELECT fire_at, outcome, job_id IS NOT NULL FROM cron_ticks WHERE schedule = 'skip' ORDER BY fire_at",
    )
    .fetch_all(env.pool())
    .await?;
    assert_eq!(
        rows,
        vec![
            (min(1), "enqueued".to_string(), true),
            (min(2), "skipped_overlap".to_string(), false),
            (min(3), "skipped_overlap".to_string(), false),
            (min(4), "enqueued".to_string(), true),
        ]
    );
    assert_eq!(env.jobs_of("skip").await?, 2);
    assert_eq!(env.jobs_of("allow").await?, 4);

    // Catching up with overlap `skip` enqueues one job for the first missed
    // tick and records the others as overlapping.
    env.advance(3 * 60);
    let fired = env.store.cron_fire_due(10).await?;
    assert_eq!(of(&fired, "skip", TickOutcome::SkippedOverlap), 3);
    assert_eq!(of(&fired, "allow", TickOutcome::Enqueued), 3);
    Ok(())
}

#[tokio::test]
async fn a_tick_and_its_job_commit_together() -> TestResult {
    let env = Env::new().await?;
    env.store
        .cron_upsert(&every_minute("m", CatchUp::All))
        .await?;

    // Rolled back: neither the manual tick nor its job exists.
    let mut tx = env.pool().begin().await?;
    let tick = env.store.cron_trigger_in(&mut tx, "m").await?;
    let job_id = tick.job_id.ok_or("a manual tick has a job")?;
    assert!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?
            == 1
    );
    tx.rollback().await?;
    assert_eq!(
        env.count("SELECT count(*) FROM cron_ticks WHERE schedule = $1", "m")
            .await?,
        0
    );
    assert!(env.store.job_get(job_id).await?.is_none());

    // The scheduler's path: when the job cannot be written, the tick is not
    // written either and `next_fire_at` does not move.
    sqlx::query(
        "CREATE FUNCTION refuse_jobs() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
    )
    .execute(env.pool())
    .await?;
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION refuse_jobs()",
    )
    .execute(env.pool())
    .await?;
    env.advance(60);
    assert!(env.store.cron_fire_due(10).await.is_err());
    assert_eq!(
        env.count("SELECT count(*) FROM cron_ticks WHERE schedule = $1", "m")
            .await?,
        0
    );
    assert_eq!(
        env.store.cron_get("m").await?.and_then(|s| s.next_fire_at),
        Some(min(1))
    );

    sqlx::query("DROP TRIGGER refuse ON jobs")
        .execute(env.pool())
        .await?;
    let fired = env.store.cron_fire_due(10).await?;
    assert_eq!(of(&fired, "m", TickOutcome::Enqueued), 1);
    assert_eq!(env.jobs_of("m").await?, 1);
    Ok(())
}

#[tokio::test]
async fn pause_resume_and_manual_trigger() -> TestResult {
    let env = Env::new().await?;
    env.store
        .cron_upsert(&every_minute("all", CatchUp::All))
        .await?;
    env.store
        .cron_upsert(&every_minute("latest", CatchUp::Latest))
        .await?;
    env.advance(60);
    env.store.cron_fire_due(10).await?;

    // Paused inside the caller's (audited) transaction.
    let mut tx = env.pool().begin().await?;
    for name in ["all", "latest"] {
        let s = env.store.cron_pause_in(&mut tx, name).await?;
        assert!(!s.enabled);
        assert!(s.paused_at.is_some());
    }
    tx.commit().await?;

    env.advance(5 * 60 + 40); // 00:06:40
    assert!(env.store.cron_fire_due(10).await?.is_empty());
    // A restart with the same config does not unpause.
    env.store
        .cron_upsert(&every_minute("all", CatchUp::All))
        .await?;
    assert!(env.store.cron_fire_due(10).await?.is_empty());

    // A manual run works while paused, at the current instant.
    let mut tx = env.pool().begin().await?;
    let manual = env.store.cron_trigger_in(&mut tx, "latest").await?;
    tx.commit().await?;
    assert_eq!(manual.outcome, TickOutcome::Manual);
    assert_eq!(manual.fire_at, env.clock.get());
    let job = env
        .store
        .job_get(manual.job_id.ok_or("manual tick without job")?)
        .await?
        .ok_or("manual job missing")?;
    assert_eq!(job.kind, "cron.test");
    assert_eq!(
        job.unique_key,
        Some(cron_job_key("latest", env.clock.get()))
    );

    // Resumed: the missed 00:02..=00:06 are caught up per policy.
    let mut tx = env.pool().begin().await?;
    for name in ["all", "latest"] {
        assert!(env.store.cron_resume_in(&mut tx, name).await?.enabled);
    }
    tx.commit().await?;
    let fired = env.store.cron_fire_due(10).await?;
    assert_eq!(of(&fired, "all", TickOutcome::Enqueued), 5);
    assert_eq!(of(&fired, "latest", TickOutcome::Enqueued), 1);
    assert_eq!(
        env.enqueued("all").await?,
        (1..=6).map(min).collect::<Vec<_>>()
    );
    assert_eq!(env.enqueued("latest").await?, vec![min(1), min(6)]);

    let ticks = env.store.cron_tick_list("latest", 10).await?;
    let outcomes: Vec<TickOutcome> = ticks.iter().map(|t| t.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            TickOutcome::Manual,
            TickOutcome::Enqueued,
            TickOutcome::SkippedCatchup,
            TickOutcome::Enqueued
        ]
    );

    // Unknown names are clear errors.
    let mut conn = env.pool().acquire().await?;
    assert!(env.store.cron_pause_in(&mut conn, "nope").await.is_err());
    assert!(env.store.cron_trigger_in(&mut conn, "nope").await.is_err());
    Ok(())
}

#[tokio::test]
async fn upsert_validates_and_recomputes_only_on_a_new_expression() -> TestResult {
    let env = Env::new().await?;
    let bad = ScheduleDef::new("bad", "not cron", "k");
    assert!(env.store.cron_upsert(&bad).await.is_err());
    let bad_tz = ScheduleDef::new("bad", "* * * * *", "k").timezone("Nowhere/Land");
    assert!(env.store.cron_upsert(&bad_tz).await.is_err());

    let def = ScheduleDef::new("paris", "30 2 * * *", "k").timezone("Europe/Paris");
    let s = env.store.cron_upsert(&def).await?;
    // 2030-01-01 02:30 CET = 01:30 UTC.
    assert_eq!(s.next_fire_at, Some(t0() + TimeDelta::minutes(90)));
    env.advance(3 * 3600);
    let same = env.store.cron_upsert(&def).await?;
    assert_eq!(same.next_fire_at, s.next_fire_at);
    assert_eq!(same.updated_at, s.updated_at);
    // New args keep the fire time; a new expression recomputes it from now.
    let same = env
        .store
        .cron_upsert(&def.clone().args(serde_json::json!({"a": 1})))
        .await?;
    assert_eq!(same.next_fire_at, s.next_fire_at);
    assert_eq!(same.job_args, serde_json::json!({"a": 1}));
    let moved = env
        .store
        .cron_upsert(&ScheduleDef::new("paris", "0 4 * * *", "k").timezone("Europe/Paris"))
        .await?;
    // 04:00 CET = 03:00 UTC, after now (03:00 UTC)? Strictly after: next day.
    assert_eq!(moved.next_fire_at, Some(t0() + TimeDelta::hours(24 + 3)));
    assert_eq!(env.store.cron_list().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_database_clock_is_the_default() -> TestResult {
    // No injected clock: fire times are computed from the database's now().
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    let s = store
        .cron_upsert(&ScheduleDef::new("sec", "* * * * * *", "k"))
        .await?;
    let db_now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await?;
    let next = s.next_fire_at.ok_or("fires")?;
    assert!(next > db_now - TimeDelta::seconds(2) && next <= db_now + TimeDelta::seconds(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fired = store.cron_fire_due(10).await?;
    assert!(!fired.is_empty());
    let times: BTreeSet<DateTime<Utc>> = fired.iter().map(|t| t.fire_at).collect();
    assert_eq!(times.len(), fired.len());
    Ok(())
}
