//! Helpers shared by the workers' integration tests: polling the database for a condition
//! instead of sleeping a fixed time (robust on a loaded 2-core machine).
use sqlx::PgPool;
use std::time::{Duration, Instant};

/// The `count(*)`-style scalar of `sql`, or -1 while the query fails (e.g. during a restart).
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Waits until `sql` counts at least `at_least`, polling every 50 ms, failing after `within`.
pub async fn wait_for(
    pool: &PgPool,
    sql: &str,
    at_least: i64,
    within: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let start = Instant::now();
    loop {
        let n = count(pool, sql).await;
        if n >= at_least {
            return Ok(());
        }
        if start.elapsed() > within {
            return Err(format!("timed out waiting for `{sql}` >= {at_least} (last {n})").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
