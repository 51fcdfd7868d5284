//! Read-side queries for the admin API: filtered, keyset-paginated job and
//! workflow listings, Kafka dead-letter pages, the job selection behind bulk
//! operator actions, and the cheap gauges that `/metrics` exports (live-queue
//! depths, workflows per state, outbox backlog, pending dead letters).
//!
//! Filters arrive from HTTP, so this module is where "never build SQL from
//! input" is kept for them: every value is a bound parameter, the only text
//! ever pushed into a statement is a constant fragment chosen by a `match`
//! over a closed enum ([`JobSortColumn`]), and the free-text search escapes
//! `LIKE` wildcards so that `%` and `_` in a search mean themselves.
use crate::dead_letter::{DEAD_LETTER_COLUMNS, DeadLetter};
use crate::job::JOB_COLUMNS;
use crate::workflow::{WorkflowId, WorkflowRow, WorkflowState};
use crate::{Job, JobId, JobState, Result, Store};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

/// The most rows one listing or one bulk selection returns.
pub const MAX_PAGE: u32 = 1000;

/// Which jobs a listing or bulk action covers. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Exact queue name.
    pub queue: Option<String>,
    /// Exact job kind.
    pub kind: Option<String>,
    /// Any of these states (all states when empty).
    pub states: Vec<JobState>,
    /// `created_at >= created_from`.
    pub created_from: Option<DateTime<Utc>>,
    /// `created_at < created_to`.
    pub created_to: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the job's args rendered as JSON text.
    pub search: Option<String>,
}

/// The columns a listing may be sorted by: a closed set, so a sort parameter
/// can never reach the SQL text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobSortColumn {
    /// Creation time (the default).
    CreatedAt,
    /// When the job is (or was) due.
    RunAt,
    /// Priority (lower runs first).
    Priority,
    /// The id alone (v7, so roughly creation order).
    Id,
}

impl JobSortColumn {
    /// Every sortable column.
    pub const ALL: [JobSortColumn; 4] = [
        JobSortColumn::CreatedAt,
        JobSortColumn::RunAt,
        JobSortColumn::Priority,
        JobSortColumn::Id,
    ];

    /// The column's name, as accepted by [`std::str::FromStr`] and used in SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            JobSortColumn::CreatedAt => "created_at",
            JobSortColumn::RunAt => "run_at",
            JobSortColumn::Priority => "priority",
            JobSortColumn::Id => "id",
        }
    }
}

impl std::str::FromStr for JobSortColumn {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        JobSortColumn::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| crate::Error::Invalid(format!("cannot sort jobs by {s:?}")))
    }
}

/// A listing's order: a column, then the id as a tie-breaker, in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSort {
    pub column: JobSortColumn,
    pub descending: bool,
}

impl Default for JobSort {
    fn default() -> Self {
        Self {
            column: JobSortColumn::CreatedAt,
            descending: true,
        }
    }
}

/// The sort-column value of the last row of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// For `created_at` and `run_at`.
    Time(DateTime<Utc>),
    /// For `priority`.
    Int(i64),
    /// For `id` (the id is the whole key).
    None,
}

/// Where the next page starts: strictly after this (sort key, id) in the
/// listing's order. Keyset pagination stays correct while rows are inserted
/// and costs the same on page 1 and page 1,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor {
    pub key: SortKey,
    pub id: JobId,
}

impl JobCursor {
    /// The cursor just after `job` in an order by `column`.
    pub fn after(job: &Job, column: JobSortColumn) -> Self {
        let key = match column {
            JobSortColumn::CreatedAt => SortKey::Time(job.created_at),
            JobSortColumn::RunAt => SortKey::Time(job.run_at),
            JobSortColumn::Priority => SortKey::Int(i64::from(job.priority)),
            JobSortColumn::Id => SortKey::None,
        };
        Self { key, id: job.id }
    }
}

/// Escapes `\`, `%` and `_` so that `s` matches literally in a `LIKE`
/// pattern whose escape character is the default backslash.
pub fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Appends `filter`'s conditions (each starting with ` AND `) to `q`, whose
/// text already ends in a `WHERE` clause.
fn push_filter(q: &mut QueryBuilder<'_, Postgres>, filter: &JobFilter) {
    if let Some(queue) = &filter.queue {
        q.push(" AND queue = ").push_bind(queue.clone());
    }
    if let Some(kind) = &filter.kind {
        q.push(" AND kind = ").push_bind(kind.clone());
    }
    if !filter.states.is_empty() {
        q.push(" AND state = ANY(")
            .push_bind(filter.states.clone())
            .push(")");
    }
    if let Some(from) = filter.created_from {
        q.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = filter.created_to {
        q.push(" AND created_at < ").push_bind(to);
    }
    if let Some(search) = &filter.search {
        let pattern = format!("%{}%", escape_like(search));
        q.push(" AND args::text ILIKE ")
            .push_bind(pattern)
            .push(r" ESCAPE '\'");
    }
}

fn validate(filter: &JobFilter, limit: u32) -> Result<()> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(crate::Error::Invalid(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
        && from > to
    {
        return Err(crate::Error::Invalid(
            "created_from is after created_to".into(),
        ));
    }
    Ok(())
}

/// The states `states` narrowed to `allowed` (all of `allowed` when `states` is empty).
fn narrow(states: &[JobState], allowed: &[JobState]) -> Vec<JobState> {
    if states.is_empty() {
        allowed.to_vec()
    } else {
        states
            .iter()
            .copied()
            .filter(|s| allowed.contains(s))
            .collect()
    }
}

impl Store {
    /// One page of jobs matching `filter`, in `sort` order, starting after
    /// `after` (the cursor of the previous page's last row), at most `limit`
    /// (1..=[`MAX_PAGE`]) rows.
    pub async fn job_list(
        &self,
        filter: &JobFilter,
        sort: JobSort,
        after: Option<&JobCursor>,
        limit: u32,
    ) -> Result<Vec<Job>> {
        validate(filter, limit)?;
        let mut q =
            QueryBuilder::<Postgres>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE true"));
        push_filter(&mut q, filter);
        // Both fragments below are constants picked by `match`, never input.
        let col = sort.column.as_str();
        let (cmp, dir) = if sort.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some(cursor) = after {
            match (sort.column, cursor.key) {
                (JobSortColumn::Id, _) => {
                    q.push(format_args!(" AND id {cmp} ")).push_bind(cursor.id);
                }
                (JobSortColumn::CreatedAt | JobSortColumn::RunAt, SortKey::Time(t)) => {
                    q.push(format_args!(" AND ({col}, id) {cmp} ("))
                        .push_bind(t)
                        .push(", ")
                        .push_bind(cursor.id)
                        .push(")");
                }
                (JobSortColumn::Priority, SortKey::Int(p)) => {
                    let p = i16::try_from(p)
                        .map_err(|_| crate::Error::Invalid("cursor out of range".into()))?;
                    q.push(format_args!(" AND ({col}, id) {cmp} ("))
                        .push_bind(p)
                        .push(", ")
                        .push_bind(cursor.id)
                        .push(")");
                }
                _ => {
                    return Err(crate::Error::Invalid(
                        "cursor does not match the sort column".into(),
                    ));
                }
            }
        }
        if sort.column == JobSortColumn::Id {
            q.push(format_args!(" ORDER BY id {dir}"));
        } else {
            q.push(format_args!(" ORDER BY {col} {dir}, id {dir}"));
        }
        q.push(" LIMIT ").push_bind(i64::from(limit));
        Ok(q.build_query_as::<Job>().fetch_all(self.pool()).await?)
    }

    /// How many jobs match `filter` with a state in `allowed` — what a bulk
    /// action over `filter` would touch (its dry run). Changes nothing.
    pub async fn job_count_for_action(
        &self,
        filter: &JobFilter,
        allowed: &[JobState],
    ) -> Result<i64> {
        validate(filter, 1)?;
        let states = narrow(&filter.states, allowed);
        if states.is_empty() {
            return Ok(0);
        }
        let mut q = QueryBuilder::<Postgres>::new("SELECT count(*) FROM jobs WHERE true");
        push_filter(
            &mut q,
            &JobFilter {
                states,
                ..filter.clone()
            },
        );
        Ok(q.build_query_scalar::<i64>().fetch_one(self.pool()).await?)
    }

    /// Locks and returns up to `limit` ids of jobs matching `filter` with a
    /// state in `allowed`, oldest first, on the caller's connection (inside
    /// the transaction that will act on them and write its audit row). Rows
    /// are locked in id order so that concurrent bulk actions cannot deadlock.
    pub async fn job_ids_for_action_in(
        &self,
        conn: &mut PgConnection,
        filter: &JobFilter,
        allowed: &[JobState],
        limit: u32,
    ) -> Result<Vec<JobId>> {
        validate(filter, limit)?;
        let states = narrow(&filter.states, allowed);
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Postgres>::new("SELECT id FROM jobs WHERE true");
        push_filter(
            &mut q,
            &JobFilter {
                states,
                ..filter.clone()
            },
        );
        q.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(limit))
            .push(" FOR UPDATE");
        Ok(q.build_query_scalar::<JobId>()
            .fetch_all(&mut *conn)
            .await?)
    }

    /// Live jobs per (queue, state) for the states that still have work
    /// ahead (`available`, `scheduled`, `retryable`, `running`). Each state
    /// is served by its partial index, so the cost follows the live backlog,
    /// never the size of the finished history. A queue with any live job has
    /// all four states (0 for those it has none in), in queue then state order,
    /// so its gauge series do not come and go with each job.
    pub async fn queue_depths(&self) -> Result<Vec<(String, JobState, i64)>> {
        let rows = sqlx::query(
            "SELECT queue, state, count(*) AS n FROM jobs WHERE state = 'available' GROUP BY 1, 2
             UNION ALL
             SELECT queue, state, count(*) FROM jobs WHERE state IN ('scheduled', 'retryable') GROUP BY 1, 2
             UNION ALL
             SELECT queue, state, count(*) FROM jobs WHERE state = 'running' GROUP BY 1, 2",
        )
        .fetch_all(self.pool())
        .await?;
        let mut depths: std::collections::BTreeMap<String, [i64; 4]> = Default::default();
        for r in &rows {
            let state: JobState = r.try_get("state")?;
            if let Some(slot) = LIVE_STATES.iter().position(|s| *s == state) {
                depths.entry(r.try_get("queue")?).or_default()[slot] = r.try_get("n")?;
            }
        }
        Ok(depths
            .into_iter()
            .flat_map(|(queue, counts)| {
                LIVE_STATES
                    .iter()
                    .zip(counts)
                    .map(move |(state, n)| (queue.clone(), *state, n))
            })
            .collect())
    }
}

// ------------------------------------------------------------ workflows

/// Which workflows a listing covers. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkflowFilter {
    /// Exact workflow kind (its name, e.g. `payments.withdrawal`).
    pub kind: Option<String>,
    /// Any of these states (all states when empty).
    pub states: Vec<WorkflowState>,
    /// `created_at >= created_from`.
    pub created_from: Option<DateTime<Utc>>,
    /// `created_at < created_to`.
    pub created_to: Option<DateTime<Utc>>,
}

/// The columns a workflow listing may be sorted by (a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkflowSortColumn {
    /// Start time (the default).
    CreatedAt,
    /// Last change.
    UpdatedAt,
    /// The id alone (v7, so roughly start order).
    Id,
}

impl WorkflowSortColumn {
    /// Every sortable column.
    pub const ALL: [WorkflowSortColumn; 3] = [
        WorkflowSortColumn::CreatedAt,
        WorkflowSortColumn::UpdatedAt,
        WorkflowSortColumn::Id,
    ];

    /// The column's name, as accepted by [`std::str::FromStr`] and used in SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowSortColumn::CreatedAt => "created_at",
            WorkflowSortColumn::UpdatedAt => "updated_at",
            WorkflowSortColumn::Id => "id",
        }
    }
}

impl std::str::FromStr for WorkflowSortColumn {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        WorkflowSortColumn::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| crate::Error::Invalid(format!("cannot sort workflows by {s:?}")))
    }
}

/// A workflow listing's order: a column, then the id, in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkflowSort {
    pub column: WorkflowSortColumn,
    pub descending: bool,
}

impl Default for WorkflowSort {
    fn default() -> Self {
        Self {
            column: WorkflowSortColumn::CreatedAt,
            descending: true,
        }
    }
}

/// Where the next page of workflows starts: strictly after this (time, id)
/// in the listing's order (`time` is ignored when sorting by id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkflowCursor {
    pub time: Option<DateTime<Utc>>,
    pub id: WorkflowId,
}

impl WorkflowCursor {
    /// The cursor just after `row` in an order by `column`.
    pub fn after(row: &WorkflowRow, column: WorkflowSortColumn) -> Self {
        let time = match column {
            WorkflowSortColumn::CreatedAt => Some(row.created_at),
            WorkflowSortColumn::UpdatedAt => Some(row.updated_at),
            WorkflowSortColumn::Id => None,
        };
        Self { time, id: row.id }
    }
}

/// The job states with work still ahead, as [`Store::queue_depths`] reports them.
pub const LIVE_STATES: [JobState; 4] = [
    JobState::Available,
    JobState::Scheduled,
    JobState::Retryable,
    JobState::Running,
];

/// The workflow states `/metrics` gauges: the live ones, and `failed`
/// (each needs an operator).
pub const GAUGED_WORKFLOW_STATES: [WorkflowState; 4] = [
    WorkflowState::Running,
    WorkflowState::Waiting,
    WorkflowState::Compensating,
    WorkflowState::Failed,
];

const WORKFLOW_COLUMNS: &str = "id, kind, version, state, input, output, current_step, \
    wait_reason, wait_until, queue, unique_key, error, created_at, updated_at, finished_at, \
    traceparent";

// ---------------------------------------------------------- dead letters

/// Which Kafka dead letters a listing covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Hide the ones already redriven.
    pub pending_only: bool,
    /// Exact topic.
    pub topic: Option<String>,
}

/// What Postgres can tell about the Kafka edge: the outbox backlog and the
/// dead letters waiting for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EdgeBacklog {
    /// Outbox rows not yet published.
    pub outbox_unpublished: i64,
    /// Age in seconds of the oldest unpublished outbox row (0 when none).
    pub outbox_oldest_age_secs: f64,
    /// Dead letters not redriven.
    pub dead_letters_pending: i64,
    /// Dead letters whose copy to the dead-letter topic is still owed.
    pub dead_letter_copies_pending: i64,
    /// Workflow steps in doubt, waiting for their reconcile hook or an admin.
    pub steps_in_doubt: i64,
}

impl Store {
    /// One page of workflows matching `filter`, in `sort` order, after
    /// `after`, at most `limit` (1..=[`MAX_PAGE`]) rows. Every value is bound;
    /// the column and direction are constants chosen by `match`.
    pub async fn workflow_list(
        &self,
        filter: &WorkflowFilter,
        sort: WorkflowSort,
        after: Option<&WorkflowCursor>,
        limit: u32,
    ) -> Result<Vec<WorkflowRow>> {
        if limit == 0 || limit > MAX_PAGE {
            return Err(crate::Error::Invalid(format!(
                "limit must be 1..={MAX_PAGE}"
            )));
        }
        if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
            && from > to
        {
            return Err(crate::Error::Invalid(
                "created_from is after created_to".into(),
            ));
        }
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE true"
        ));
        if let Some(kind) = &filter.kind {
            q.push(" AND kind = ").push_bind(kind.clone());
        }
        if !filter.states.is_empty() {
            let states: Vec<&'static str> = filter.states.iter().map(|s| s.as_str()).collect();
            q.push(" AND state = ANY(").push_bind(states).push(")");
        }
        if let Some(from) = filter.created_from {
            q.push(" AND created_at >= ").push_bind(from);
        }
        if let Some(to) = filter.created_to {
            q.push(" AND created_at < ").push_bind(to);
        }
        let col = sort.column.as_str();
        let (cmp, dir) = if sort.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some(cursor) = after {
            match (sort.column, cursor.time) {
                (WorkflowSortColumn::Id, _) => {
                    q.push(format_args!(" AND id {cmp} ")).push_bind(cursor.id);
                }
                (_, Some(t)) => {
                    q.push(format_args!(" AND ({col}, id) {cmp} ("))
                        .push_bind(t)
                        .push(", ")
                        .push_bind(cursor.id)
                        .push(")");
                }
                (_, None) => {
                    return Err(crate::Error::Invalid(
                        "cursor does not match the sort column".into(),
                    ));
                }
            }
        }
        if sort.column == WorkflowSortColumn::Id {
            q.push(format_args!(" ORDER BY id {dir}"));
        } else {
            q.push(format_args!(" ORDER BY {col} {dir}, id {dir}"));
        }
        q.push(" LIMIT ").push_bind(i64::from(limit));
        Ok(q.build_query_as::<WorkflowRow>()
            .fetch_all(self.pool())
            .await?)
    }

    /// Per queue, how long its oldest available job has been due (seconds):
    /// the wait a new job would see before a worker picks it up. Reads only
    /// the `available` rows (the `jobs_claim` partial index).
    pub async fn queue_oldest_available(&self) -> Result<Vec<(String, f64)>> {
        let rows = sqlx::query(
            "SELECT queue,
                    greatest(extract(epoch FROM now() - min(run_at)), 0)::float8 AS age
             FROM jobs WHERE state = 'available' GROUP BY queue",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("queue")?, r.try_get("age")?)))
            .collect()
    }

    /// Workflows per state for `/metrics`, for the states in
    /// [`GAUGED_WORKFLOW_STATES`] (zeros included). Finished states other
    /// than `failed` are left out on purpose: they are history, which grows
    /// without bound, and counting it on every scrape would make the scrape
    /// cost follow the history; the states gauged here are served by the
    /// `workflows_state_created` index (leading column `state`) and stay small in a healthy system.
    pub async fn workflow_state_counts(&self) -> Result<Vec<(WorkflowState, i64)>> {
        let states: Vec<&'static str> = GAUGED_WORKFLOW_STATES.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(
            "SELECT state, count(*) AS n FROM workflows WHERE state = ANY($1) GROUP BY state",
        )
        .bind(states)
        .fetch_all(self.pool())
        .await?;
        let mut out: Vec<(WorkflowState, i64)> =
            GAUGED_WORKFLOW_STATES.iter().map(|s| (*s, 0)).collect();
        for r in &rows {
            let state: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            let state: WorkflowState = state.parse()?;
            if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
        }
        Ok(out)
    }

    /// The outbox backlog, pending dead letters, owed dead-letter copies and
    /// steps in doubt. Every read is served by a partial index (`outbox_unpublished`,
    /// `dead_letters_pending`, `dead_letters_copy_due`, `workflow_steps_in_doubt`), so
    /// their cost follows the backlog, not the history.
    pub async fn edge_backlog(&self) -> Result<EdgeBacklog> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished,
                    (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
                     FROM outbox WHERE published_at IS NULL) AS oldest,
                    (SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL) AS dead,
                    (SELECT count(*) FROM dead_letters WHERE copy_state = 'pending') AS copies,
                    (SELECT count(*) FROM workflow_steps WHERE status = 'in_doubt') AS in_doubt",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(EdgeBacklog {
            outbox_unpublished: row.try_get("unpublished")?,
            outbox_oldest_age_secs: row.try_get::<f64, _>("oldest")?.max(0.0),
            dead_letters_pending: row.try_get("dead")?,
            dead_letter_copies_pending: row.try_get("copies")?,
            steps_in_doubt: row.try_get("in_doubt")?,
        })
    }

    /// One page of Kafka dead letters, newest first, with ids below `before`
    /// (the previous page's last id), at most `limit` (1..=[`MAX_PAGE`]).
    pub async fn dead_letter_page(
        &self,
        filter: &DeadLetterFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        if limit == 0 || limit > MAX_PAGE {
            return Err(crate::Error::Invalid(format!(
                "limit must be 1..={MAX_PAGE}"
            )));
        }
        Ok(sqlx::query_as::<_, DeadLetter>(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters
             WHERE (NOT $1 OR redriven_at IS NULL)
               AND ($2::text IS NULL OR topic = $2)
               AND ($3::bigint IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4"
        ))
        .bind(filter.pending_only)
        .bind(filter.topic.as_deref())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?)
    }

    /// Makes the timeout of the signal wait that workflow `id` is in due
    /// now, on the caller's connection: the waiting step runs again at once
    /// with `timed_out` set and decides (e.g. a withdrawal's approval step
    /// rejects). Returns false when the workflow is not waiting for a signal.
    /// The wait's own timeout job is reused (same unique key), so the step
    /// still runs once for this wait.
    pub async fn workflow_expire_wait_in(
        &self,
        conn: &mut PgConnection,
        id: WorkflowId,
    ) -> Result<bool> {
        let moved: Option<JobId> = sqlx::query_scalar(
            "UPDATE jobs j SET state = 'available', run_at = coalesce($3::timestamptz, now())
             FROM workflows w
             WHERE w.id = $1 AND w.state = 'waiting' AND w.wait_signal_name IS NOT NULL
               AND j.workflow_id = w.id AND j.kind = $2 AND j.state = 'scheduled'
               AND j.args->>'wake' = 'timeout'
               AND (j.args->>'wait_seq')::int = w.wait_seq
             RETURNING j.id",
        )
        .bind(id)
        .bind(crate::WORKFLOW_JOB_KIND)
        .bind(self.now())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(moved.is_some())
    }

    /// One Kafka dead letter.
    pub async fn dead_letter_get(&self, id: i64) -> Result<Option<DeadLetter>> {
        Ok(sqlx::query_as::<_, DeadLetter>(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(escape_like(r"50%_off\"), r"50\%\_off\\");
        assert_eq!(escape_like("plain"), "plain");
    }

    #[test]
    fn sort_columns_are_a_closed_set() {
        assert_eq!(
            "run_at".parse::<JobSortColumn>().ok(),
            Some(JobSortColumn::RunAt)
        );
        assert!("id; DELETE".parse::<JobSortColumn>().is_err());
        assert!("created_at DESC".parse::<JobSortColumn>().is_err());
    }

    #[test]
    fn workflow_sort_columns_are_a_closed_set() {
        assert_eq!(
            "updated_at".parse::<WorkflowSortColumn>().ok(),
            Some(WorkflowSortColumn::UpdatedAt)
        );
        assert!("kind".parse::<WorkflowSortColumn>().is_err());
        assert!(
            "created_at; DROP TABLE workflows"
                .parse::<WorkflowSortColumn>()
                .is_err()
        );
    }

    #[test]
    fn bulk_states_are_narrowed_to_the_allowed_ones() {
        let allowed = [JobState::Failed, JobState::Discarded];
        assert_eq!(narrow(&[], &allowed), allowed.to_vec());
        assert_eq!(
            narrow(&[JobState::Running, JobState::Failed], &allowed),
            vec![JobState::Failed]
        );
        assert!(narrow(&[JobState::Running], &allowed).is_empty());
    }
}
