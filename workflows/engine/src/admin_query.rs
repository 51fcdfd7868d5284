//! Read-side queries for the admin API: filtered, keyset-paginated job
//! listings, the job selection behind bulk operator actions, and the cheap
//! live-queue depths that `/metrics` exports.
//!
//! Filters arrive from HTTP, so this module is where "never build SQL from
//! input" is kept for them: every value is a bound parameter, the only text
//! ever pushed into a statement is a constant fragment chosen by a `match`
//! over a closed enum ([`JobSortColumn`]), and the free-text search escapes
//! `LIKE` wildcards so that `%` and `_` in a search mean themselves.
use crate::job::JOB_COLUMNS;
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
    /// never the size of the finished history.
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
        rows.iter()
            .map(|r| Ok((r.try_get("queue")?, r.try_get("state")?, r.try_get("n")?)))
            .collect()
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
