//! The start statements: a workflow row and its first step's job, inserted together — one
//! start ([`start_in`]), one start recorded with its inbox entry ([`start_for_inbox_in`]), or
//! many callers' starts over arrays ([`start_batch_in`]). All three insert the rows
//! [`start_sql`] describes; `start_statements_leave_identical_rows` in the engine's
//! start-batch tests proves the batch form writes what the one-start form writes.
use crate::inbox::{InboxEntry, InboxInserted};
use crate::workflow::wire::WorkflowId;
use crate::{Error, NewJob, Result, Store};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::HashMap;
use uuid::Uuid;

/// One start: the instance of `kind` at `version` with `input`, and its first step's job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewStart<'a> {
    pub id: WorkflowId,
    pub kind: &'a str,
    pub version: i32,
    pub input: &'a Value,
    pub first_step: &'a str,
    pub queue: &'a str,
    pub unique_key: Option<&'a str>,
    /// The instance's workflow-wide flow key.
    pub flow_key: Option<&'a str>,
    /// The first step's job (due now; its queue is `queue`).
    pub job: &'a NewJob,
    /// Whether the job's queue is woken with NOTIFY.
    pub notify: bool,
}

/// The one-start statement: `$inbox` is an extra CTE (or nothing) that `$input` and `$from`
/// may use; `$tp` is the parameter holding the trace context both rows store (bound after
/// the others, so its number differs between the forms); `$18` is the workflow-wide flow
/// key. The workflow row and its first step's job (due now, with its NOTIFY unless `$17` is
/// false) are inserted by the same parts in both forms. The job part inserts what
/// `Store::job_insert_in` inserts for a job due now.
macro_rules! start_sql {
    ($inbox:literal, $input:literal, $from:literal, $tp:literal, $select:literal) => {
        concat!(
            "WITH t AS (SELECT coalesce($8::timestamptz, now()) AS n)",
            $inbox,
            ",
         wf AS (
           INSERT INTO workflows (id, kind, version, state, input, current_step, queue,
                                  unique_key, flow_key, created_at, updated_at, traceparent)
           SELECT $1, $2, $3, 'running', ",
            $input,
            ", $5, $6, $7, $18, t.n, t.n, ",
            $tp,
            "::text FROM ",
            $from,
            "
           ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
           RETURNING id
         ),
         job AS (
           INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                             run_at, unique_key, workflow_id, workflow_step, created_at,
                             traceparent)
           SELECT $9, $6, $10, $11, 'available'::job_state, $12, $13, $14, t.n, $15, wf.id,
                  $5, t.n, ",
            $tp,
            "
           FROM wf, t
           ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
           RETURNING queue
         ),
         flag AS (
           INSERT INTO queues (name, flow)
           SELECT $6, true FROM wf
           WHERE $18::text IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = $6 AND q.flow)
           ON CONFLICT (name) DO UPDATE SET flow = true, updated_at = now()
         ),
         ntf AS (
           SELECT count(pg_notify($16, queue)) AS n
           FROM (SELECT DISTINCT queue FROM job WHERE $17) q
         )
         SELECT ",
            $select
        )
    };
}

/// Binds `$1`–`$18` of [`start_sql`].
fn bind<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    store: &Store,
    s: &NewStart<'q>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(s.id)
        .bind(s.kind)
        .bind(s.version)
        .bind(s.input)
        .bind(s.first_step)
        .bind(s.queue)
        .bind(s.unique_key)
        .bind(store.now())
        .bind(s.job.id)
        .bind(&s.job.kind)
        .bind(&s.job.args)
        .bind(s.job.priority)
        .bind(s.job.max_attempts)
        .bind(s.job.timeout_ms())
        .bind(&s.job.unique_key)
        .bind(crate::notify::JOBS_CHANNEL)
        .bind(s.notify)
        .bind(s.flow_key)
}

/// The instance holding workflow unique key `key`, after a start found it taken.
async fn started_with_key(conn: &mut PgConnection, key: Option<&str>) -> Result<WorkflowId> {
    let key = key.unwrap_or_default();
    let existing: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM workflows WHERE unique_key = $1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    existing.ok_or_else(|| {
        Error::Invalid(format!(
            "workflow unique key {key:?} is taken by an instance this transaction cannot see"
        ))
    })
}

/// Inserts the instance and its first job in ONE statement, on the caller's connection; a
/// taken unique key returns the holder's id and inserts nothing.
pub(crate) async fn start_in(
    conn: &mut PgConnection,
    store: &Store,
    s: &NewStart<'_>,
) -> Result<WorkflowId> {
    const SQL: &str = start_sql!("", "$4", "t", "$19", "wf.id, (SELECT n FROM ntf) FROM wf");
    let inserted: Option<(Uuid, i64)> = bind(sqlx::query_as(SQL), store, s)
        .bind(&s.job.traceparent)
        .fetch_optional(&mut *conn)
        .await?;
    match inserted {
        Some(_) => Ok(s.id),
        None => started_with_key(conn, s.unique_key).await,
    }
}

/// Records `entry` in the inbox and, when it is new, inserts the instance (its input with
/// `"inbox_id"` set to the new inbox row's id) and its first job — ONE statement.
pub(crate) async fn start_for_inbox_in(
    conn: &mut PgConnection,
    store: &Store,
    s: &NewStart<'_>,
    entry: &InboxEntry<'_>,
) -> Result<(InboxInserted, Option<WorkflowId>)> {
    const SQL: &str = start_sql!(
        ",
         ib AS (
           INSERT INTO inbox (source, dedupe_key, topic, \"partition\", \"offset\", business_id,
                              payload, headers, processed_at)
           SELECT $19, $20, $21, $22, $23, $24, $25, $26, CASE WHEN $27 THEN t.n END FROM t
           ON CONFLICT (source, dedupe_key) DO NOTHING
           RETURNING id
         )",
        "$4::jsonb || jsonb_build_object('inbox_id', ib.id)",
        "t, ib",
        "$28",
        "(SELECT id FROM ib), (SELECT id FROM wf), (SELECT n FROM ntf)"
    );
    let (inbox_id, workflow_id, _notified): (Option<i64>, Option<Uuid>, i64) = entry
        .bind(bind(sqlx::query_as(SQL), store, s))
        .bind(&s.job.traceparent)
        .fetch_one(&mut *conn)
        .await?;
    match (inbox_id, workflow_id) {
        (None, _) => Ok((InboxInserted::Duplicate, None)),
        (Some(id), Some(wf)) => Ok((InboxInserted::Inserted(id), Some(wf))),
        (Some(id), None) => {
            // The event was already taken by the workflow an earlier entry started (same
            // unique key, e.g. a redelivery under another source): this entry's effect is that
            // workflow's, so it is processed; left unmarked, nothing would ever mark it.
            let existing = started_with_key(conn, s.unique_key).await?;
            crate::inbox::inbox_mark_processed_in(conn, id).await?;
            Ok((InboxInserted::Inserted(id), Some(existing)))
        }
    }
}

/// The batch statement: `i` is the starts (`$2`–`$16` and `$18`, one array per column), `$1`
/// the clock's now (`None`: the database's), `$17` the NOTIFY channel. Row by row it inserts what
/// [`start_sql`] inserts for one start.
///
/// Only inserted workflow rows get a job (`wf JOIN i`), so a taken key enqueues nothing.
/// Duplicate keys inside the batch are fine: `DO NOTHING` skips a row that conflicts with one
/// this statement inserted (the first in array order wins; `DO UPDATE` would raise "cannot
/// affect row a second time" instead). The jobs' unique keys name their new workflow's id, so
/// they never conflict with each other. No table is scanned (inserts and CTE joins only), so a
/// generic plan prepared in a fresh, unanalyzed database is as good as any. The NOTIFY goes
/// once per distinct queue that got a job from a start that wants it.
const BATCH_SQL: &str = "WITH t AS (SELECT coalesce($1::timestamptz, now()) AS n),
     i AS (
       SELECT * FROM unnest($2::uuid[], $3::text[], $4::int[], $5::jsonb[], $6::text[],
                            $7::text[], $8::text[], $9::uuid[], $10::text[], $11::jsonb[],
                            $12::int2[], $13::int[], $14::int[], $15::text[], $16::bool[],
                            $18::text[], $19::text[])
         AS i(id, kind, version, input, first_step, queue, unique_key, job, job_kind, args,
              priority, max_attempts, timeout_ms, job_key, notify, flow_key, traceparent)
     ),
     wf AS (
       INSERT INTO workflows (id, kind, version, state, input, current_step, queue,
                              unique_key, flow_key, created_at, updated_at, traceparent)
       SELECT i.id, i.kind, i.version, 'running', i.input, i.first_step, i.queue,
              i.unique_key, i.flow_key, t.n, t.n, i.traceparent
       FROM i, t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING id
     ),
     job AS (
       INSERT INTO jobs (id, queue, kind, args, state, priority, max_attempts, timeout_ms,
                         run_at, unique_key, workflow_id, workflow_step, created_at,
                         traceparent)
       SELECT i.job, i.queue, i.job_kind, i.args, 'available'::job_state, i.priority,
              i.max_attempts, i.timeout_ms, t.n, i.job_key, wf.id, i.first_step, t.n,
              i.traceparent
       FROM wf JOIN i ON i.id = wf.id, t
       ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
       RETURNING queue, workflow_id
     ),
     flag AS (
       INSERT INTO queues (name, flow)
       SELECT DISTINCT i.queue, true FROM wf JOIN i ON i.id = wf.id
       WHERE i.flow_key IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = i.queue AND q.flow)
       ON CONFLICT (name) DO UPDATE SET flow = true, updated_at = now()
     ),
     ntf AS (
       SELECT count(pg_notify($17, q.queue)) AS n
       FROM (SELECT DISTINCT job.queue FROM job JOIN i ON i.id = job.workflow_id
             WHERE i.notify) q
     )
     SELECT wf.id, (SELECT n FROM ntf) FROM wf";

/// Runs [`BATCH_SQL`] in autocommit (atomic on its own): the ids of the instances inserted.
pub(crate) async fn start_batch_in(
    conn: &mut PgConnection,
    now: Option<DateTime<Utc>>,
    batch: &[NewStart<'_>],
) -> std::result::Result<Vec<WorkflowId>, sqlx::Error> {
    let id: Vec<Uuid> = batch.iter().map(|s| s.id).collect();
    let kind: Vec<&str> = batch.iter().map(|s| s.kind).collect();
    let version: Vec<i32> = batch.iter().map(|s| s.version).collect();
    let input: Vec<&Value> = batch.iter().map(|s| s.input).collect();
    let first_step: Vec<&str> = batch.iter().map(|s| s.first_step).collect();
    let queue: Vec<&str> = batch.iter().map(|s| s.queue).collect();
    let unique_key: Vec<Option<&str>> = batch.iter().map(|s| s.unique_key).collect();
    let job: Vec<Uuid> = batch.iter().map(|s| s.job.id).collect();
    let job_kind: Vec<&str> = batch.iter().map(|s| s.job.kind.as_str()).collect();
    let args: Vec<&Value> = batch.iter().map(|s| &s.job.args).collect();
    let priority: Vec<i16> = batch.iter().map(|s| s.job.priority).collect();
    let max_attempts: Vec<i32> = batch.iter().map(|s| s.job.max_attempts).collect();
    let timeout_ms: Vec<Option<i32>> = batch.iter().map(|s| s.job.timeout_ms()).collect();
    let job_key: Vec<Option<&str>> = batch.iter().map(|s| s.job.unique_key.as_deref()).collect();
    let notify: Vec<bool> = batch.iter().map(|s| s.notify).collect();
    let flow_key: Vec<Option<&str>> = batch.iter().map(|s| s.flow_key).collect();
    let traceparent: Vec<Option<&str>> =
        batch.iter().map(|s| s.job.traceparent.as_deref()).collect();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(BATCH_SQL)
        .bind(now)
        .bind(&id)
        .bind(&kind)
        .bind(&version)
        .bind(&input)
        .bind(&first_step)
        .bind(&queue)
        .bind(&unique_key)
        .bind(&job)
        .bind(&job_kind)
        .bind(&args)
        .bind(&priority)
        .bind(&max_attempts)
        .bind(&timeout_ms)
        .bind(&job_key)
        .bind(&notify)
        .bind(crate::notify::JOBS_CHANNEL)
        .bind(&flow_key)
        .bind(&traceparent)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

/// The holders of taken keys. One index probe per key: a scalar subquery on `unique_key = k`
/// is planned on the partial unique index even in a fresh database, where `unique_key =
/// ANY($1)` (and a join against `unnest`) got a sequential scan as its generic plan.
const HOLDERS_SQL: &str = "SELECT k.k, (SELECT w.id FROM workflows w WHERE w.unique_key = k.k)
     FROM unnest($1::text[]) AS k(k)";

/// Who holds each of `keys` (`None`: nobody, any more).
pub(crate) async fn key_holders_in(
    conn: &mut PgConnection,
    keys: &[&str],
) -> std::result::Result<HashMap<String, Option<WorkflowId>>, sqlx::Error> {
    let rows: Vec<(String, Option<Uuid>)> = sqlx::query_as(HOLDERS_SQL)
        .bind(keys)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().collect())
}
