//! The admin API's request parameters: opaque keyset cursors (base64url of
//! the sort column, direction, the last row's sort key and id), text
//! filters, job-state lists, page limits and reasons — parsed and checked
//! once here for every admin module ([`crate::admin`] re-exports them).
use crate::admin::JobFilterBody;
use crate::error::{Error, Result};
use crate::input::{TextKind, check_text};
use crate::types::Text;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ledgerflow_engine::admin_query::{JobCursor, JobFilter, JobSort, JobSortColumn, SortKey};
use ledgerflow_engine::{Job, JobState};
use ledgerflow_payments::audit;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest accepted search string, queue or kind filter.
const FILTER_TEXT_MAX: usize = 200;

// ------------------------------------------------------------------ cursors

/// What a job listing's cursor encodes.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JobCursorWire {
    /// Sort column.
    s: String,
    /// Descending.
    d: bool,
    /// Sort key: RFC 3339 time, an integer, or absent for `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<i64>,
    id: Uuid,
}

pub(crate) fn encode_cursor<T: Serialize>(wire: &T) -> Result<String> {
    let json = serde_json::to_vec(wire).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

pub(crate) fn decode_cursor<T: for<'de> Deserialize<'de>>(cursor: &str) -> Result<T> {
    let bad = || Error::Validation("cursor is malformed; use next_cursor as given".into());
    if cursor.len() > 512 {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

pub(crate) fn job_cursor(sort: JobSort, job: &Job) -> Result<String> {
    let c = JobCursor::after(job, sort.column);
    let (t, n) = match c.key {
        SortKey::Time(t) => (Some(t), None),
        SortKey::Int(n) => (None, Some(n)),
        SortKey::None => (None, None),
    };
    encode_cursor(&JobCursorWire {
        s: sort.column.as_str().to_string(),
        d: sort.descending,
        t,
        n,
        id: c.id,
    })
}

pub(crate) fn parse_job_cursor(sort: JobSort, cursor: &str) -> Result<JobCursor> {
    let w: JobCursorWire = decode_cursor(cursor)?;
    if w.s != sort.column.as_str() || w.d != sort.descending {
        return Err(Error::Validation(
            "cursor belongs to a different sort order".into(),
        ));
    }
    let key = match (sort.column, w.t, w.n) {
        (JobSortColumn::Id, None, None) => SortKey::None,
        (JobSortColumn::CreatedAt | JobSortColumn::RunAt, Some(t), None) => SortKey::Time(t),
        (JobSortColumn::Priority, None, Some(n)) => SortKey::Int(n),
        _ => return Err(Error::Validation("cursor is malformed".into())),
    };
    Ok(JobCursor { key, id: w.id })
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct AuditCursorWire {
    pub(crate) t: DateTime<Utc>,
    pub(crate) id: Uuid,
}

// ------------------------------------------------------------------ parsing

/// A text filter: absent when empty, otherwise one line of at most
/// [`FILTER_TEXT_MAX`] visible characters (see [`crate::input`]).
pub(crate) fn text_filter(name: &str, value: Option<String>) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => {
            check_text(name, &v, FILTER_TEXT_MAX, TextKind::Line)?;
            Ok(Some(v))
        }
    }
}

pub(crate) fn parse_states<'a>(states: impl IntoIterator<Item = &'a str>) -> Result<Vec<JobState>> {
    let mut out = Vec::new();
    for s in states {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        let state: JobState = s.parse().map_err(Error::from)?;
        if !out.contains(&state) {
            out.push(state);
        }
    }
    Ok(out)
}

pub(crate) fn filter_from(body: &JobFilterBody) -> Result<JobFilter> {
    let filter = JobFilter {
        queue: text_filter("queue", body.queue.clone().map(|t| t.0))?,
        kind: text_filter("kind", body.kind.clone().map(|t| t.0))?,
        states: parse_states(body.states.iter().flatten().map(Text::as_str))?,
        created_from: body.created_after,
        created_to: body.created_before,
        search: text_filter("q", body.q.clone().map(|t| t.0))?,
    };
    check_range(&filter)?;
    Ok(filter)
}

pub(crate) fn check_range(filter: &JobFilter) -> Result<()> {
    if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
        && from > to
    {
        return Err(Error::Validation(
            "created_after is later than created_before".into(),
        ));
    }
    Ok(())
}

pub(crate) fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32> {
    match limit.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(Error::Validation(format!("limit must be 1..={max}"))),
    }
}

/// Cuts a page fetched with `limit + 1` rows down to `limit` and returns the cursor of its last
/// row when the extra row showed that more follow (`None` on the last page).
pub(crate) fn next_page<T>(
    rows: &mut Vec<T>,
    limit: u32,
    cursor_of: impl FnOnce(&T) -> Result<String>,
) -> Result<Option<String>> {
    let limit = limit as usize;
    if rows.len() <= limit {
        return Ok(None);
    }
    rows.truncate(limit);
    rows.last().map(cursor_of).transpose()
}

/// A mutation's reason: prose (line breaks allowed, no other control,
/// bidi character), not blank, at most [`audit::MAX_REASON_CHARS`] characters.
pub(crate) fn reason(text: &str) -> Result<String> {
    check_text("reason", text, audit::MAX_REASON_CHARS, TextKind::Prose)?;
    audit::check_reason(text)
        .map(str::to_string)
        .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let sort = JobSort::default();
        let wire = JobCursorWire {
            s: "created_at".into(),
            d: true,
            t: Some(Utc::now()),
            n: None,
            id: Uuid::now_v7(),
        };
        let text = encode_cursor(&wire).unwrap_or_default();
        assert!(parse_job_cursor(sort, &text).is_ok());
        let other = JobSort {
            column: JobSortColumn::RunAt,
            descending: true,
        };
        assert!(parse_job_cursor(other, &text).is_err());
        assert!(parse_job_cursor(sort, "'; DROP TABLE jobs; --").is_err());
        assert!(parse_job_cursor(sort, "e30").is_err()); // "{}"
    }

    #[test]
    fn states_parse_strictly() {
        assert_eq!(
            parse_states("failed, discarded,failed".split(',')).ok(),
            Some(vec![JobState::Failed, JobState::Discarded])
        );
        assert!(parse_states(["running' OR '1'='1"]).is_err());
    }
}
