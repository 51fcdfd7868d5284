//! Queue controls (pause/resume) and per-queue statistics.
//!
//! A paused queue is honoured by every worker process because the claim
//! statement itself checks the `queues` row; the NOTIFY on the control
//! channel only makes workers notice sooner.
use crate::notify::CONTROL_CHANNEL;
use crate::{JobState, Result, Store};
use serde::Serialize;
use sqlx::{PgConnection, Row};
use std::collections::BTreeMap;

/// A queue with its live counts.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    /// Jobs per state. Finished states count only what has not been pruned.
    pub counts: BTreeMap<String, i64>,
}

impl Store {
    /// Pauses `queue` for every worker; no new claims until resumed.
    /// In-flight attempts finish normally.
    pub async fn queue_pause_in(&self, conn: &mut PgConnection, queue: &str) -> Result<()> {
        self.queue_set_paused(conn, queue, true).await
    }

    /// Resumes `queue`.
    pub async fn queue_resume_in(&self, conn: &mut PgConnection, queue: &str) -> Result<()> {
        self.queue_set_paused(conn, queue, false).await
    }

    /// Pauses `queue` (own transaction).
    pub async fn queue_pause(&self, queue: &str) -> Result<()> {
        let mut conn = self.pool().acquire().await?;
        self.queue_pause_in(&mut conn, queue).await
    }

    /// Resumes `queue` (own transaction).
    pub async fn queue_resume(&self, queue: &str) -> Result<()> {
        let mut conn = self.pool().acquire().await?;
        self.queue_resume_in(&mut conn, queue).await
    }

    async fn queue_set_paused(
        &self,
        conn: &mut PgConnection,
        queue: &str,
        paused: bool,
    ) -> Result<()> {
        if queue.is_empty() || queue.len() > 128 {
            return Err(crate::Error::Invalid(
                "queue name must be 1..=128 bytes".into(),
            ));
        }
        sqlx::query(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n),
             up AS (
               INSERT INTO queues (name, paused, paused_at, created_at, updated_at)
               SELECT $1, $2, CASE WHEN $2 THEN t.n END, t.n, t.n FROM t
               ON CONFLICT (name) DO UPDATE
                 SET paused = EXCLUDED.paused, paused_at = EXCLUDED.paused_at,
                     updated_at = EXCLUDED.updated_at
               RETURNING name
             )
             SELECT pg_notify($4, name)::text FROM up",
        )
        .bind(queue)
        .bind(paused)
        .bind(self.now())
        .bind(CONTROL_CHANNEL)
        .execute(&mut *conn)
        .await?;
        if !paused && self.config().notify {
            sqlx::query("SELECT pg_notify($1, $2)::text")
                .bind(crate::notify::JOBS_CHANNEL)
                .bind(queue)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// True when `queue` has a control row or any job (the queues
    /// [`Store::queue_list`] shows). For a queue that has neither this
    /// reads the whole `jobs` table, as `queue_list` does; it serves the
    /// admin API's pause/resume, not a hot path.
    pub async fn queue_exists_in(&self, conn: &mut PgConnection, queue: &str) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM queues WHERE name = $1)
                 OR EXISTS (SELECT 1 FROM jobs WHERE queue = $1)",
        )
        .bind(queue)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// True when `queue` is paused.
    pub async fn queue_is_paused(&self, queue: &str) -> Result<bool> {
        Ok(
            sqlx::query_scalar::<_, bool>("SELECT paused FROM queues WHERE name = $1")
                .bind(queue)
                .fetch_optional(self.pool())
                .await?
                .unwrap_or(false),
        )
    }

    /// Every queue that has jobs or a control row, with counts per state.
    pub async fn queue_list(&self) -> Result<Vec<QueueInfo>> {
        let rows = sqlx::query(
            "SELECT coalesce(c.queue, q.name) AS name, coalesce(q.paused, false) AS paused,
                    c.state, coalesce(c.n, 0) AS n
             FROM (SELECT queue, state::text AS state, count(*) AS n FROM jobs GROUP BY queue, state) c
             FULL OUTER JOIN queues q ON q.name = c.queue
             ORDER BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out: BTreeMap<String, QueueInfo> = BTreeMap::new();
        for r in rows {
            let name: String = r.try_get("name")?;
            let paused: bool = r.try_get("paused")?;
            let info = out.entry(name.clone()).or_insert_with(|| QueueInfo {
                name,
                paused,
                counts: JobState::ALL.iter().map(|s| (s.to_string(), 0)).collect(),
            });
            if let Some(state) = r.try_get::<Option<String>, _>("state")? {
                info.counts.insert(state, r.try_get("n")?);
            }
        }
        Ok(out.into_values().collect())
    }
}
