//! Durable cron: schedules, their next fire times, and the tick ledger.
//!
//! A schedule is a row of `cron_schedules`: a cron expression evaluated in an
//! IANA time zone, a catch-up policy, an overlap policy, and the job each tick
//! enqueues. Every handled tick is a row of `cron_ticks` with a unique
//! `(schedule, fire_at)`, inserted in the same transaction as the job it
//! starts (contract rule 1); the job also gets the unique key
//! `cron:{schedule}:{fire_at RFC 3339}`. Fire times come from the stored
//! `next_fire_at` and "now" from the store's clock (the database's `now()` in
//! production), so any number of scheduler replicas, whatever their local
//! clocks say, fire each tick exactly once: due rows are locked
//! `FOR UPDATE SKIP LOCKED`, ticks are inserted `ON CONFLICT DO NOTHING`, and
//! `next_fire_at` advances in the same transaction.
//!
//! # Expressions
//! - 5 fields (`min hour day-of-month month day-of-week`): standard Unix cron.
//!   It is turned into the `cron` crate's form by prefixing a seconds field of
//!   `0`; numeric days of the week follow Unix cron (0 and 7 are Sunday) and
//!   are translated to names, because the `cron` crate numbers them 1–7 from
//!   Sunday.
//! - 6 or 7 fields (`sec min hour dom month dow [year]`) and `@daily`-style
//!   shorthands: the `cron` crate's syntax, verbatim (days of week 1–7 =
//!   SUN–SAT; names work in both forms).
//!
//! # Time zones and daylight-saving time
//! Expressions match the wall clock of the schedule's zone. Around DST
//! transitions (the rule Vixie cron uses):
//! - a schedule with a fixed hour field (e.g. `30 2 * * *`) fires once a day:
//!   a wall time skipped by spring-forward fires shifted forward by the gap
//!   (02:30 in Europe/Paris on the spring-forward day fires at 03:30 CEST), and
//!   a wall time repeated by fall-back fires at its first occurrence only;
//! - a schedule whose hour field is `*` follows real time: skipped wall times
//!   do not exist (every real minute still matches one that does), and a
//!   repeated wall time fires at both of its instants.
//!
//! # Catch-up
//! A due tick less than [`MISFIRE_GRACE`] old is on time. Older due ticks
//! were missed (every scheduler down, or the schedule paused) and are handled
//! per the schedule's [`CatchUp`] policy: `all` fires every missed tick within
//! `catch_up_window` (at least the grace), `latest` fires only the most recent
//! due tick, `skip` fires none (only on-time ticks). Dropped ticks are not
//! enumerated one by one (an every-second schedule down for a day would write
//! 86,400 rows): each gap is one `skipped_catchup` row at the first dropped
//! fire time, whose `skipped_until` is the exclusive end of the dropped range.
//!
//! # Overlap
//! With [`Overlap::Skip`], a tick whose previous job (`last_job_id`) is not
//! finished yet is recorded as `skipped_overlap`, without a job. A job that
//! was pruned counts as finished. Manual triggers ignore the overlap policy.
use crate::{Error, JobId, NewJob, Result, Store};
use ::cron::TimeUnitSpec;
use chrono::{DateTime, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use std::str::FromStr;
use std::time::Duration;

/// A due tick younger than this is on time, not missed: it fires whatever
/// the catch-up policy.
pub const MISFIRE_GRACE: Duration = Duration::from_secs(30);

/// Most ticks one schedule fires in one transaction; the rest stay due and
/// are fired by the next transaction.
pub const MAX_TICKS_PER_TX: usize = 1_000;

/// Catch-up window used when none is given.
pub const DEFAULT_CATCH_UP_WINDOW_SECS: u32 = 3_600;

/// How a transition is looked for around an instant (longer than any DST
/// shift, shorter than the time between two transitions).
const TRANSITION_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(3);

/// What to do with ticks missed while no scheduler ran or the schedule was
/// paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatchUp {
    /// Fire every missed tick within the catch-up window (the default: no
    /// iteration is skipped after a short outage).
    #[default]
    All,
    /// Fire only the most recent due tick.
    Latest,
    /// Fire none; continue with the next tick.
    Skip,
}

impl CatchUp {
    /// The policy's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::All => "all",
            CatchUp::Latest => "latest",
            CatchUp::Skip => "skip",
        }
    }
}

impl FromStr for CatchUp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(CatchUp::All),
            "latest" => Ok(CatchUp::Latest),
            "skip" => Ok(CatchUp::Skip),
            _ => Err(Error::Invalid(format!("unknown catch-up policy {s:?}"))),
        }
    }
}

/// What to do when a tick comes while the previous tick's job is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// Enqueue anyway (the default).
    #[default]
    Allow,
    /// Record the tick as `skipped_overlap` and enqueue nothing.
    Skip,
}

impl Overlap {
    /// The policy's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Skip => "skip",
        }
    }
}

impl FromStr for Overlap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(Overlap::Allow),
            "skip" => Ok(Overlap::Skip),
            _ => Err(Error::Invalid(format!("unknown overlap policy {s:?}"))),
        }
    }
}

/// What became of a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickOutcome {
    /// A job was enqueued.
    Enqueued,
    /// The previous job was unfinished and the overlap policy is `skip`.
    SkippedOverlap,
    /// Missed ticks dropped by the catch-up policy (one row per gap).
    SkippedCatchup,
    /// An operator triggered the schedule by hand.
    Manual,
}

impl TickOutcome {
    /// The outcome's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            TickOutcome::Enqueued => "enqueued",
            TickOutcome::SkippedOverlap => "skipped_overlap",
            TickOutcome::SkippedCatchup => "skipped_catchup",
            TickOutcome::Manual => "manual",
        }
    }
}

impl FromStr for TickOutcome {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "enqueued" => Ok(TickOutcome::Enqueued),
            "skipped_overlap" => Ok(TickOutcome::SkippedOverlap),
            "skipped_catchup" => Ok(TickOutcome::SkippedCatchup),
            "manual" => Ok(TickOutcome::Manual),
            _ => Err(Error::Invalid(format!("unknown tick outcome {s:?}"))),
        }
    }
}

fn default_timezone() -> String {
    "UTC".to_string()
}
fn default_window() -> u32 {
    DEFAULT_CATCH_UP_WINDOW_SECS
}
fn default_args() -> serde_json::Value {
    serde_json::json!({})
}
fn default_queue() -> String {
    crate::job::DEFAULT_QUEUE.to_string()
}
fn default_max_attempts() -> i32 {
    crate::job::DEFAULT_MAX_ATTEMPTS
}

/// A schedule's definition, as configured (kebab-case when deserialized):
///
/// ```json
/// { "name": "nightly-report", "expression": "30 2 * * *", "timezone": "Europe/Paris",
///   "catch-up": "latest", "overlap": "skip", "job-kind": "report.nightly",
///   "job-args": {"format": "pdf"}, "job-queue": "reports", "job-max-attempts": 5 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleDef {
    /// Unique name (1..=128 bytes).
    pub name: String,
    /// A 5-field Unix cron expression, or the `cron` crate's 6/7-field form.
    pub expression: String,
    /// IANA time zone the expression is evaluated in (default `UTC`).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Catch-up policy for missed ticks (default `all`).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// How far back `all` still fires missed ticks, in seconds (default 3600).
    #[serde(default = "default_window")]
    pub catch_up_window_secs: u32,
    /// Overlap policy (default `allow`).
    #[serde(default)]
    pub overlap: Overlap,
    /// The kind of job each tick enqueues.
    pub job_kind: String,
    /// Its arguments (default `{}`).
    #[serde(default = "default_args")]
    pub job_args: serde_json::Value,
    /// Its queue (default `default`).
    #[serde(default = "default_queue")]
    pub job_queue: String,
    /// Its attempts (default 20).
    #[serde(default = "default_max_attempts")]
    pub job_max_attempts: i32,
}

impl ScheduleDef {
    /// A schedule `name` firing `expression` (UTC) that enqueues `job_kind`
    /// with `{}` args on the default queue; catch-up `all` within an hour,
    /// overlap `allow`.
    pub fn new(
        name: impl Into<String>,
        expression: impl Into<String>,
        job_kind: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            expression: expression.into(),
            timezone: default_timezone(),
            catch_up: CatchUp::default(),
            catch_up_window_secs: DEFAULT_CATCH_UP_WINDOW_SECS,
            overlap: Overlap::default(),
            job_kind: job_kind.into(),
            job_args: default_args(),
            job_queue: default_queue(),
            job_max_attempts: default_max_attempts(),
        }
    }

    /// Sets the time zone (IANA name).
    pub fn timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = tz.into();
        self
    }

    /// Sets the catch-up policy and window.
    pub fn catch_up(mut self, policy: CatchUp, window: Duration) -> Self {
        self.catch_up = policy;
        self.catch_up_window_secs = u32::try_from(window.as_secs()).unwrap_or(u32::MAX);
        self
    }

    /// Sets the overlap policy.
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Sets the job's arguments.
    pub fn args(mut self, args: serde_json::Value) -> Self {
        self.job_args = args;
        self
    }

    /// Sets the job's queue.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.job_queue = queue.into();
        self
    }

    /// Sets the job's attempts.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.job_max_attempts = n.max(1);
        self
    }

    /// Checks everything the database would refuse, and parses the
    /// expression in its zone.
    pub fn validate(&self) -> Result<CronSpec> {
        let bad = |what: String| Err(Error::Invalid(what));
        if self.name.is_empty() || self.name.len() > 128 {
            return bad("cron schedule name must be 1..=128 bytes".into());
        }
        if self.job_kind.is_empty() || self.job_kind.len() > 128 {
            return bad(format!(
                "cron schedule {:?}: job kind must be 1..=128 bytes",
                self.name
            ));
        }
        if self.job_queue.is_empty() || self.job_queue.len() > 128 {
            return bad(format!(
                "cron schedule {:?}: queue must be 1..=128 bytes",
                self.name
            ));
        }
        if self.job_max_attempts < 1 {
            return bad(format!(
                "cron schedule {:?}: max attempts must be >= 1",
                self.name
            ));
        }
        if i32::try_from(self.catch_up_window_secs).is_err() {
            return bad(format!(
                "cron schedule {:?}: catch-up window too large",
                self.name
            ));
        }
        CronSpec::parse(&self.expression, &self.timezone)
            .map_err(|e| Error::Invalid(format!("cron schedule {:?}: {e}", self.name)))
    }
}

/// A schedule as stored.
#[derive(Debug, Clone, Serialize)]
pub struct CronSchedule {
    pub name: String,
    pub expression: String,
    pub timezone: String,
    pub catch_up: CatchUp,
    pub catch_up_window_secs: i32,
    pub overlap: Overlap,
    pub job_kind: String,
    pub job_args: serde_json::Value,
    pub job_queue: String,
    pub job_max_attempts: i32,
    pub enabled: bool,
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<JobId>,
    pub paused_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SCHEDULE_COLUMNS: &str = "name, expression, timezone, catch_up, catch_up_window_secs, \
    overlap, job_kind, job_args, job_queue, job_max_attempts, enabled, next_fire_at, \
    last_fire_at, last_job_id, paused_at, created_at, updated_at";

impl CronSchedule {
    fn from_row(r: &sqlx::postgres::PgRow) -> Result<Self> {
        Ok(Self {
            name: r.try_get("name")?,
            expression: r.try_get("expression")?,
            timezone: r.try_get("timezone")?,
            catch_up: r.try_get::<String, _>("catch_up")?.parse()?,
            catch_up_window_secs: r.try_get("catch_up_window_secs")?,
            overlap: r.try_get::<String, _>("overlap")?.parse()?,
            job_kind: r.try_get("job_kind")?,
            job_args: r.try_get("job_args")?,
            job_queue: r.try_get("job_queue")?,
            job_max_attempts: r.try_get("job_max_attempts")?,
            enabled: r.try_get("enabled")?,
            next_fire_at: r.try_get("next_fire_at")?,
            last_fire_at: r.try_get("last_fire_at")?,
            last_job_id: r.try_get("last_job_id")?,
            paused_at: r.try_get("paused_at")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

/// A tick handled by [`Store::cron_fire_due`] or [`Store::cron_trigger_in`],
/// or read back with [`Store::cron_tick_list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FiredTick {
    pub schedule: String,
    pub fire_at: DateTime<Utc>,
    pub outcome: TickOutcome,
    /// The job the tick started (`enqueued` and `manual` only).
    pub job_id: Option<JobId>,
    /// For `skipped_catchup`: the exclusive end of the dropped range.
    pub skipped_until: Option<DateTime<Utc>>,
}

/// The unique key of the job a tick starts.
pub fn cron_job_key(schedule: &str, fire_at: DateTime<Utc>) -> String {
    format!(
        "cron:{schedule}:{}",
        fire_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

// ------------------------------------------------------------ expressions

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Turns an expression into the `cron` crate's syntax: 5-field Unix cron
/// gets a `0` seconds field and named days of the week; 6/7-field
/// expressions and `@` shorthands are returned as they are.
pub fn cron_normalize(expr: &str) -> Result<String> {
    let expr = expr.trim();
    if expr.starts_with('@') {
        return Ok(expr.to_string());
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields.len() {
        5 => {
            let dow = unix_days_of_week(fields[4])?;
            Ok(format!(
                "0 {} {} {} {} {dow}",
                fields[0], fields[1], fields[2], fields[3]
            ))
        }
        6 | 7 => Ok(fields.join(" ")),
        n => Err(Error::Invalid(format!(
            "cron expression {expr:?} has {n} fields; expected 5 (Unix cron) or 6/7 (with seconds)"
        ))),
    }
}

/// Unix cron days of week (0–7, 0 and 7 = Sunday) → names.
fn unix_days_of_week(field: &str) -> Result<String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let bad = || Error::Invalid(format!("bad day-of-week field {field:?}"));
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let mut out: Vec<String> = Vec::new();
    for item in field.split(',') {
        if item.chars().any(|c| c.is_ascii_alphabetic()) {
            out.push(item.to_string());
            continue;
        }
        let (base, step) = match item.split_once('/') {
            Some((b, s)) => (b, Some(num(s)?)),
            None => (item, None),
        };
        let (lo, hi) = if base == "*" || base == "?" {
            (0, 6)
        } else if let Some((a, b)) = base.split_once('-') {
            (num(a)?, num(b)?)
        } else {
            let a = num(base)?;
            (a, if step.is_some() { 7 } else { a })
        };
        let step = step.unwrap_or(1);
        if lo > hi || hi > 7 || step == 0 {
            return Err(bad());
        }
        for d in (lo..=hi).step_by(step as usize) {
            let name = DAY_NAMES[(d % 7) as usize].to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out.join(","))
}

/// A parsed expression in its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    schedule: ::cron::Schedule,
    tz: Tz,
    /// The hour field is `*`: follow real time across DST transitions.
    every_hour: bool,
}

impl CronSpec {
    /// Parses `expr` (see the module docs) for the IANA zone `tz`.
    pub fn parse(expr: &str, tz: &str) -> Result<Self> {
        let tz: Tz = tz
            .parse()
            .map_err(|_| Error::Invalid(format!("unknown time zone {tz:?}")))?;
        let normalized = cron_normalize(expr)?;
        let schedule = ::cron::Schedule::from_str(&normalized)
            .map_err(|e| Error::Invalid(format!("bad cron expression {expr:?}: {e}")))?;
        let every_hour = schedule.hours().is_all();
        Ok(Self {
            schedule,
            tz,
            every_hour,
        })
    }

    /// The zone.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    fn offset_secs(&self, t: DateTime<Utc>) -> i32 {
        self.tz
            .offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    }

    /// The first fire time strictly after `after`, or `None` when the
    /// expression never fires again (the `cron` crate stops at year 2100).
    ///
    /// Walks offset segments (the spans between two transitions), in each
    /// of which wall time and real time move together, so the cost does not
    /// depend on how often the schedule fires.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let one = chrono::TimeDelta::seconds(1);
        let secs = |s: i32| chrono::TimeDelta::seconds(i64::from(s));
        // Fire times are whole seconds: the first candidate instant.
        let mut from = after.with_nanosecond(0)? + one;
        loop {
            let offset = self.offset_secs(from);
            // The first wall time at or after `w` that matches.
            let first_match = |w: NaiveDateTime| {
                self.schedule
                    .after(&Utc.from_utc_datetime(&(w - one)))
                    .next()
                    .map(|c| c.naive_utc())
            };
            let mut lower = from.naive_utc() + secs(offset);
            let mut shifted: Option<DateTime<Utc>> = None;
            // A transition shortly before `from` (DST shifts are < 3 h).
            let before = self.offset_secs(from - TRANSITION_MARGIN);
            let recent = (!self.every_hour && before != offset)
                .then(|| self.first_transition(from - TRANSITION_MARGIN, from, before))
                .flatten();
            if let Some(t) = recent {
                if offset > before {
                    // Spring-forward: wall times in [t + before, t + offset)
                    // never showed; fire them shifted by the gap.
                    let gap_end = t.naive_utc() + secs(offset);
                    let w = (t.naive_utc() + secs(before)).max(from.naive_utc() + secs(before));
                    shifted = first_match(w)
                        .filter(|c| *c < gap_end)
                        .map(|c| (c - secs(before)).and_utc());
                } else {
                    // Fall-back: wall times before t + before already
                    // fired in the previous segment.
                    lower = lower.max(t.naive_utc() + secs(before));
                }
            }
            let regular = first_match(lower).map(|c| (c - secs(offset)).and_utc());
            let regular_end = match regular {
                Some(at) => self.first_transition(from, at, offset),
                None => None,
            };
            let in_segment = regular.filter(|_| regular_end.is_none());
            match (shifted, in_segment) {
                (Some(a), Some(b)) => return Some(a.min(b)),
                (Some(a), None) | (None, Some(a)) => return Some(a),
                (None, None) => match regular_end {
                    // The segment ended before the match: go on in the next.
                    Some(t) => from = t,
                    None => return None,
                },
            }
        }
    }

    /// The first instant in `(from, until]` whose offset is not `offset`.
    fn first_transition(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        offset: i32,
    ) -> Option<DateTime<Utc>> {
        // Transitions are months apart: probing weekly finds a span that
        // holds one, if any (the end is always probed).
        let week = chrono::TimeDelta::days(7);
        let mut lo = from;
        let hi = loop {
            let probe = (lo + week).min(until);
            if self.offset_secs(probe) != offset {
                break probe;
            }
            if probe >= until {
                return None;
            }
            lo = probe;
        };
        // Bisect to the second: `lo` has `offset`, `hi` does not.
        let (mut lo, mut hi) = (lo, hi);
        while hi - lo > chrono::TimeDelta::seconds(1) {
            let mid = lo + (hi - lo) / 2;
            if self.offset_secs(mid) == offset {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(hi)
    }

    /// The first fire time at or after `t`.
    pub fn first_at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let c = self.next_after(t - chrono::TimeDelta::seconds(1))?;
        if c < t { self.next_after(c) } else { Some(c) }
    }

    /// The last fire time in `[from, until]` (`None` if there is none).
    fn last_in(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Look back from `until` in growing windows so that a long outage of
        // a frequent schedule costs a few iterations, not one per tick.
        let windows = [
            chrono::TimeDelta::minutes(1),
            chrono::TimeDelta::hours(1),
            chrono::TimeDelta::days(1),
            chrono::TimeDelta::days(32),
            chrono::TimeDelta::days(400),
        ];
        let mut starts: Vec<DateTime<Utc>> =
            windows.iter().map(|w| (until - *w).max(from)).collect();
        starts.push(from);
        for start in starts {
            let Some(mut last) = self.first_at_or_after(start).filter(|t| *t <= until) else {
                if start == from {
                    return None;
                }
                continue;
            };
            while let Some(next) = self.next_after(last).filter(|t| *t <= until) {
                last = next;
            }
            return Some(last);
        }
        None
    }
}

/// The first fire time of `expr` in zone `tz` strictly after `after`
/// (`Ok(None)`: it never fires again). Pure; see the module docs for the
/// syntax and the DST rules.
pub fn cron_next_after(
    expr: &str,
    tz: &str,
    after: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    Ok(CronSpec::parse(expr, tz)?.next_after(after))
}

// ----------------------------------------------------------------- planning

/// What one transaction does for one due schedule.
#[derive(Debug, PartialEq)]
struct Plan {
    /// Missed ticks dropped: `[first, until)`.
    dropped: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Ticks to fire, in order.
    fire: Vec<DateTime<Utc>>,
    /// The schedule's new `next_fire_at`.
    next: Option<DateTime<Utc>>,
}

fn plan(
    spec: &CronSpec,
    policy: CatchUp,
    window: Duration,
    next: DateTime<Utc>,
    now: DateTime<Utc>,
    max_ticks: usize,
) -> Plan {
    let delta = |d: Duration| chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
    let first_kept = match policy {
        CatchUp::Latest => spec.last_in(next, now),
        CatchUp::All | CatchUp::Skip => {
            let keep = if policy == CatchUp::All {
                window.max(MISFIRE_GRACE)
            } else {
                MISFIRE_GRACE
            };
            let cutoff = now.checked_sub_signed(delta(keep)).unwrap_or(next);
            if next >= cutoff {
                Some(next)
            } else {
                spec.first_at_or_after(cutoff)
            }
        }
    };
    let mut fire = Vec::new();
    let mut cursor = first_kept;
    while let Some(t) = cursor {
        if t > now || fire.len() >= max_ticks {
            break;
        }
        fire.push(t);
        cursor = spec.next_after(t);
        if policy == CatchUp::Latest {
            break;
        }
    }
    // `cursor` is now the first tick this transaction does not handle.
    match first_kept {
        Some(kept) => Plan {
            dropped: (kept > next).then_some((next, kept)),
            fire,
            next: cursor,
        },
        // No due tick is kept: drop everything up to the next fire time.
        None => {
            let after_now = spec.next_after(now);
            Plan {
                dropped: Some((next, after_now.unwrap_or(now))),
                fire,
                next: after_now,
            }
        }
    }
}

// -------------------------------------------------------------------- store

impl Store {
    /// "Now" on the store's timeline (the clock's reading, else the
    /// database's `now()`), read on `conn`.
    async fn cron_now(&self, conn: &mut PgConnection) -> Result<DateTime<Utc>> {
        Ok(
            sqlx::query_scalar("SELECT coalesce($1::timestamptz, now())")
                .bind(self.now())
                .fetch_one(&mut *conn)
                .await?,
        )
    }

    /// Creates or updates a schedule from its definition (config, admin API)
    /// on the caller's connection. Updating keeps `next_fire_at` (so missed
    /// ticks are still caught up after a restart) unless the expression or
    /// time zone changed, in which case it is recomputed from now and ticks
    /// missed under the old expression are not caught up. Never changes
    /// `enabled`: a pause by an admin survives a restart with the same config.
    pub async fn cron_upsert_in(
        &self,
        conn: &mut PgConnection,
        def: &ScheduleDef,
    ) -> Result<CronSchedule> {
        let spec = def.validate()?;
        let now = self.cron_now(conn).await?;
        let next = spec.next_after(now);
        let window = i32::try_from(def.catch_up_window_secs).unwrap_or(i32::MAX);
        let sql = format!(
            "INSERT INTO cron_schedules AS s (name, expression, timezone, catch_up,
                 catch_up_window_secs, overlap, job_kind, job_args, job_queue, job_max_attempts,
                 enabled, next_fire_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, true, $11, $12, $12)
             ON CONFLICT (name) DO UPDATE SET
                 expression = EXCLUDED.expression, timezone = EXCLUDED.timezone,
                 catch_up = EXCLUDED.catch_up, catch_up_window_secs = EXCLUDED.catch_up_window_secs,
                 overlap = EXCLUDED.overlap, job_kind = EXCLUDED.job_kind,
                 job_args = EXCLUDED.job_args, job_queue = EXCLUDED.job_queue,
                 job_max_attempts = EXCLUDED.job_max_attempts,
                 next_fire_at = CASE
                     WHEN (s.expression, s.timezone) IS DISTINCT FROM (EXCLUDED.expression, EXCLUDED.timezone)
                     THEN EXCLUDED.next_fire_at ELSE s.next_fire_at END,
                 updated_at = EXCLUDED.updated_at
             WHERE (s.expression, s.timezone, s.catch_up, s.catch_up_window_secs, s.overlap,
                    s.job_kind, s.job_args, s.job_queue, s.job_max_attempts)
                   IS DISTINCT FROM
                   (EXCLUDED.expression, EXCLUDED.timezone, EXCLUDED.catch_up,
                    EXCLUDED.catch_up_window_secs, EXCLUDED.overlap, EXCLUDED.job_kind,
                    EXCLUDED.job_args, EXCLUDED.job_queue, EXCLUDED.job_max_attempts)
             RETURNING {SCHEDULE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(&def.name)
            .bind(&def.expression)
            .bind(&def.timezone)
            .bind(def.catch_up.as_str())
            .bind(window)
            .bind(def.overlap.as_str())
            .bind(&def.job_kind)
            .bind(&def.job_args)
            .bind(&def.job_queue)
            .bind(def.job_max_attempts)
            .bind(next)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
        match row {
            Some(row) => CronSchedule::from_row(&row),
            // Unchanged: nothing was written.
            None => self
                .cron_get_in(conn, &def.name)
                .await?
                .ok_or_else(|| not_found(&def.name)),
        }
    }

    /// Upserts a schedule in its own transaction.
    pub async fn cron_upsert(&self, def: &ScheduleDef) -> Result<CronSchedule> {
        let mut conn = self.pool().acquire().await?;
        self.cron_upsert_in(&mut conn, def).await
    }

    /// One schedule by name, on the caller's connection.
    pub async fn cron_get_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<CronSchedule>> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM cron_schedules WHERE name = $1");
        sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| CronSchedule::from_row(&r))
            .transpose()
    }

    /// One schedule by name.
    pub async fn cron_get(&self, name: &str) -> Result<Option<CronSchedule>> {
        let mut conn = self.pool().acquire().await?;
        self.cron_get_in(&mut conn, name).await
    }

    /// Every schedule, by name.
    pub async fn cron_list(&self) -> Result<Vec<CronSchedule>> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM cron_schedules ORDER BY name");
        sqlx::query(&sql)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(CronSchedule::from_row)
            .collect()
    }

    /// The latest `limit` ticks of a schedule, newest first.
    pub async fn cron_tick_list(&self, name: &str, limit: u32) -> Result<Vec<FiredTick>> {
        sqlx::query(
            "SELECT schedule, fire_at, outcome, job_id, skipped_until FROM cron_ticks
             WHERE schedule = $1 ORDER BY fire_at DESC LIMIT $2",
        )
        .bind(name)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(FiredTick {
                schedule: r.try_get("schedule")?,
                fire_at: r.try_get("fire_at")?,
                outcome: r.try_get::<String, _>("outcome")?.parse()?,
                job_id: r.try_get("job_id")?,
                skipped_until: r.try_get("skipped_until")?,
            })
        })
        .collect()
    }

    /// Pauses a schedule on the caller's connection (the admin API calls
    /// this inside its audited transaction): no ticks fire until resumed.
    pub async fn cron_pause_in(&self, conn: &mut PgConnection, name: &str) -> Result<CronSchedule> {
        self.cron_set_enabled(conn, name, false).await
    }

    /// Resumes a paused schedule. Ticks missed while paused are handled by
    /// its catch-up policy on the next pass of a scheduler.
    pub async fn cron_resume_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<CronSchedule> {
        self.cron_set_enabled(conn, name, true).await
    }

    async fn cron_set_enabled(
        &self,
        conn: &mut PgConnection,
        name: &str,
        enabled: bool,
    ) -> Result<CronSchedule> {
        let sql = format!(
            "WITH t AS (SELECT coalesce($3::timestamptz, now()) AS n)
             UPDATE cron_schedules s
             SET enabled = $2,
                 paused_at = CASE WHEN $2 THEN NULL ELSE coalesce(s.paused_at, t.n) END,
                 updated_at = t.n
             FROM t WHERE s.name = $1
             RETURNING {}",
            SCHEDULE_COLUMNS
                .split(", ")
                .map(|c| format!("s.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .bind(enabled)
            .bind(self.now())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| not_found(name))?;
        CronSchedule::from_row(&row)
    }

    /// Fires a schedule now, by hand, on the caller's connection: a tick with
    /// outcome `manual` at the current instant and its job, committed with
    /// the caller's transaction. Works on a paused schedule and ignores the
    /// overlap policy; does not move `next_fire_at`.
    pub async fn cron_trigger_in(&self, conn: &mut PgConnection, name: &str) -> Result<FiredTick> {
        let sql =
            format!("SELECT {SCHEDULE_COLUMNS} FROM cron_schedules WHERE name = $1 FOR UPDATE");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| not_found(name))?;
        let schedule = CronSchedule::from_row(&row)?;
        let now = self.cron_now(conn).await?;
        let job_id = self
            .cron_start_tick(conn, &schedule, now, TickOutcome::Manual, now)
            .await?
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "cron schedule {name:?} already has a tick at {now}"
                ))
            })?;
        sqlx::query(
            "UPDATE cron_schedules SET last_job_id = $2,
                 last_fire_at = greatest(last_fire_at, $3) WHERE name = $1",
        )
        .bind(name)
        .bind(job_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(FiredTick {
            schedule: name.to_string(),
            fire_at: now,
            outcome: TickOutcome::Manual,
            job_id: Some(job_id),
            skipped_until: None,
        })
    }

    /// Inserts a tick row and its job (same connection, so the same
    /// transaction). Returns the job's id, or `None` when the tick already
    /// existed (another replica fired it) and nothing was written.
    async fn cron_start_tick(
        &self,
        conn: &mut PgConnection,
        s: &CronSchedule,
        fire_at: DateTime<Utc>,
        outcome: TickOutcome,
        now: DateTime<Utc>,
    ) -> Result<Option<JobId>> {
        let job = NewJob::new(s.job_kind.clone(), s.job_args.clone())
            .queue(s.job_queue.clone())
            .max_attempts(s.job_max_attempts)
            .unique(cron_job_key(&s.name, fire_at));
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO cron_ticks (schedule, fire_at, job_id, outcome, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (schedule, fire_at) DO NOTHING
             RETURNING schedule",
        )
        .bind(&s.name)
        .bind(fire_at)
        .bind(job.id())
        .bind(outcome.as_str())
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
        if inserted.is_none() {
            return Ok(None);
        }
        let id = self.job_insert_in(conn, &job).await?.id();
        if id != job.id() {
            // The key was already taken by an older job of this tick.
            sqlx::query("UPDATE cron_ticks SET job_id = $3 WHERE schedule = $1 AND fire_at = $2")
                .bind(&s.name)
                .bind(fire_at)
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(Some(id))
    }

    /// Fires the due ticks of up to `limit` schedules, one transaction per
    /// schedule (each transaction handles at most [`MAX_TICKS_PER_TX`]
    /// ticks; a schedule with more stays due and is taken again). Safe to
    /// call from any number of replicas at once. Returns every tick handled,
    /// including skipped ones.
    pub async fn cron_fire_due(&self, limit: u32) -> Result<Vec<FiredTick>> {
        let mut out = Vec::new();
        for _ in 0..limit {
            let mut tx = self.pool().begin().await?;
            let sql = format!(
                "SELECT {SCHEDULE_COLUMNS}, coalesce($1::timestamptz, now()) AS db_now
                 FROM cron_schedules
                 WHERE enabled AND next_fire_at <= coalesce($1::timestamptz, now())
                 ORDER BY next_fire_at
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED"
            );
            let Some(row) = sqlx::query(&sql)
                .bind(self.now())
                .fetch_optional(&mut *tx)
                .await?
            else {
                tx.commit().await?;
                break;
            };
            let schedule = CronSchedule::from_row(&row)?;
            let now: DateTime<Utc> = row.try_get("db_now")?;
            let fired = self.cron_fire_one(&mut tx, &schedule, now).await?;
            tx.commit().await?;
            out.extend(fired);
        }
        Ok(out)
    }

    async fn cron_fire_one(
        &self,
        conn: &mut PgConnection,
        s: &CronSchedule,
        now: DateTime<Utc>,
    ) -> Result<Vec<FiredTick>> {
        let Some(next) = s.next_fire_at else {
            return Ok(Vec::new());
        };
        let spec = match CronSpec::parse(&s.expression, &s.timezone) {
            Ok(spec) => spec,
            Err(e) => {
                // Written by hand with a bad expression: stop it firing (and
                // blocking the due index) until it is upserted correctly.
                tracing::error!(schedule = %s.name, error = %e, "cron schedule cannot be parsed; it will not fire");
                sqlx::query("UPDATE cron_schedules SET next_fire_at = NULL WHERE name = $1")
                    .bind(&s.name)
                    .execute(&mut *conn)
                    .await?;
                return Ok(Vec::new());
            }
        };
        let window = Duration::from_secs(u64::try_from(s.catch_up_window_secs).unwrap_or(0));
        let p = plan(&spec, s.catch_up, window, next, now, MAX_TICKS_PER_TX);
        let mut out = Vec::with_capacity(p.fire.len() + 1);

        if let Some((first, until)) = p.dropped {
            tracing::warn!(schedule = %s.name, from = %first, until = %until, policy = s.catch_up.as_str(),
                "missed cron ticks dropped by the catch-up policy");
            let wrote = sqlx::query(
                "INSERT INTO cron_ticks (schedule, fire_at, outcome, skipped_until, created_at)
                 VALUES ($1, $2, 'skipped_catchup', $3, $4)
                 ON CONFLICT (schedule, fire_at) DO NOTHING",
            )
            .bind(&s.name)
            .bind(first)
            .bind(until)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            if wrote.rows_affected() == 1 {
                out.push(FiredTick {
                    schedule: s.name.clone(),
                    fire_at: first,
                    outcome: TickOutcome::SkippedCatchup,
                    job_id: None,
                    skipped_until: Some(until),
                });
            }
        }

        let mut last_job = s.last_job_id;
        let mut last_busy: Option<bool> = None;
        let mut last_fire = s.last_fire_at;
        for fire_at in p.fire {
            if s.overlap == Overlap::Skip {
                let busy = match last_busy {
                    Some(b) => b,
                    None => self.cron_job_busy(conn, last_job).await?,
                };
                last_busy = Some(busy);
                if busy {
                    let wrote = sqlx::query(
                        "INSERT INTO cron_ticks (schedule, fire_at, outcome, created_at)
                         VALUES ($1, $2, 'skipped_overlap', $3)
                         ON CONFLICT (schedule, fire_at) DO NOTHING",
                    )
                    .bind(&s.name)
                    .bind(fire_at)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                    if wrote.rows_affected() == 1 {
                        out.push(FiredTick {
                            schedule: s.name.clone(),
                            fire_at,
                            outcome: TickOutcome::SkippedOverlap,
                            job_id: None,
                            skipped_until: None,
                        });
                    }
                    continue;
                }
            }
            if let Some(id) = self
                .cron_start_tick(conn, s, fire_at, TickOutcome::Enqueued, now)
                .await?
            {
                last_job = Some(id);
                last_busy = Some(true);
                last_fire = Some(last_fire.map_or(fire_at, |l| l.max(fire_at)));
                out.push(FiredTick {
                    schedule: s.name.clone(),
                    fire_at,
                    outcome: TickOutcome::Enqueued,
                    job_id: Some(id),
                    skipped_until: None,
                });
            }
        }

        sqlx::query(
            "UPDATE cron_schedules SET next_fire_at = $2, last_fire_at = $3, last_job_id = $4
             WHERE name = $1",
        )
        .bind(&s.name)
        .bind(p.next)
        .bind(last_fire)
        .bind(last_job)
        .execute(&mut *conn)
        .await?;
        Ok(out)
    }

    /// True when `job` exists and has not finished.
    async fn cron_job_busy(&self, conn: &mut PgConnection, job: Option<JobId>) -> Result<bool> {
        let Some(id) = job else {
            return Ok(false);
        };
        let state: Option<crate::JobState> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        Ok(state.is_some_and(|s| !s.is_finished()))
    }

    /// How long until the earliest enabled schedule is due, on the store's
    /// timeline (zero if one is due now; `None` if nothing will fire).
    pub async fn cron_wait_hint(&self) -> Result<Option<Duration>> {
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(next_fire_at) - coalesce($1::timestamptz, now()))::float8
             FROM cron_schedules WHERE enabled AND next_fire_at IS NOT NULL",
        )
        .bind(self.now())
        .fetch_one(self.pool())
        .await?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}

fn not_found(name: &str) -> Error {
    Error::Invalid(format!("cron schedule {name:?} not found"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, tz: &str, after: &str) -> Option<DateTime<Utc>> {
        cron_next_after(expr, tz, utc(after)).unwrap()
    }

    fn series(expr: &str, tz: &str, after: &str, n: usize) -> Vec<DateTime<Utc>> {
        let spec = CronSpec::parse(expr, tz).unwrap();
        let mut t = utc(after);
        let mut out = Vec::new();
        for _ in 0..n {
            t = spec.next_after(t).unwrap();
            out.push(t);
        }
        out
    }

    #[test]
    fn five_and_six_field_expressions() {
        assert_eq!(
            next("*/15 * * * *", "UTC", "2026-01-01T10:07:30Z"),
            Some(utc("2026-01-01T10:15:00Z"))
        );
        assert_eq!(
            next("*/10 * * * * *", "UTC", "2026-01-01T10:07:30Z"),
            Some(utc("2026-01-01T10:07:40Z"))
        );
        // Strictly after.
        assert_eq!(
            next("0 * * * *", "UTC", "2026-01-01T10:00:00Z"),
            Some(utc("2026-01-01T11:00:00Z"))
        );
        // 7 fields with a year that is over: never again.
        assert_eq!(
            next("0 0 0 1 1 * 2020", "UTC", "2026-01-01T00:00:00Z"),
            None
        );
        assert!(cron_next_after("* * * *", "UTC", Utc::now()).is_err());
        assert!(cron_next_after("61 * * * *", "UTC", Utc::now()).is_err());
        assert!(cron_next_after("* * * * *", "Mars/Olympus", Utc::now()).is_err());
    }

    #[test]
    fn unix_days_of_week_are_translated() {
        // 2026-01-02 is a Friday. Unix "1-5" is Monday to Friday.
        assert_eq!(
            next("0 9 * * 1-5", "UTC", "2026-01-02T10:00:00Z"),
            Some(utc("2026-01-05T09:00:00Z"))
        );
        // 0 and 7 are Sunday.
        assert_eq!(
            next("0 9 * * 0", "UTC", "2026-01-02T10:00:00Z"),
            Some(utc("2026-01-04T09:00:00Z"))
        );
        assert_eq!(
            next("0 9 * * 7", "UTC", "2026-01-02T10:00:00Z"),
            Some(utc("2026-01-04T09:00:00Z"))
        );
        assert_eq!(
            next("0 9 * * 5-7", "UTC", "2026-01-02T10:00:00Z"),
            Some(utc("2026-01-03T09:00:00Z"))
        );
        assert_eq!(
            cron_normalize("0 9 * * */2").unwrap(),
            "0 0 9 * * SUN,TUE,THU,SAT"
        );
        assert_eq!(
            cron_normalize("0 9 * * mon-fri").unwrap(),
            "0 0 9 * * mon-fri"
        );
        // The crate's own numbering in 6-field form: 2 = Monday.
        assert_eq!(
            next("0 0 9 * * 2", "UTC", "2026-01-02T10:00:00Z"),
            Some(utc("2026-01-05T09:00:00Z"))
        );
        assert!(cron_normalize("0 9 * * 8").is_err());
    }

    #[test]
    fn time_zones() {
        // 09:00 in New York is 14:00 UTC in winter, 13:00 UTC in summer.
        assert_eq!(
            next("0 9 * * *", "America/New_York", "2026-01-15T00:00:00Z"),
            Some(utc("2026-01-15T14:00:00Z"))
        );
        assert_eq!(
            next("0 9 * * *", "America/New_York", "2026-07-15T00:00:00Z"),
            Some(utc("2026-07-15T13:00:00Z"))
        );
        assert_eq!(
            next("0 9 * * *", "Asia/Kolkata", "2026-07-15T00:00:00Z"),
            Some(utc("2026-07-15T03:30:00Z"))
        );
    }

    #[test]
    fn dst_gap_fixed_hour_fires_shifted_once() {
        // Europe/Paris springs forward on 2026-03-29 at 02:00 CET -> 03:00 CEST.
        let got = series("30 2 * * *", "Europe/Paris", "2026-03-27T12:00:00Z", 3);
        assert_eq!(
            got,
            vec![
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:30:00Z"), // 02:30 does not exist: 03:30 CEST
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
            ]
        );
    }

    #[test]
    fn dst_gap_every_hour_follows_real_time() {
        let got = series("0 * * * *", "Europe/Paris", "2026-03-28T23:30:00Z", 4);
        assert_eq!(
            got,
            vec![
                utc("2026-03-29T00:00:00Z"), // 01:00 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST (02:00 never happens)
                utc("2026-03-29T02:00:00Z"),
                utc("2026-03-29T03:00:00Z"),
            ]
        );
    }

    #[test]
    fn dst_overlap_fixed_hour_fires_once() {
        // Europe/Paris falls back on 2026-10-25 at 03:00 CEST -> 02:00 CET.
        let got = series("30 2 * * *", "Europe/Paris", "2026-10-24T12:00:00Z", 3);
        assert_eq!(
            got,
            vec![
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST, the first of the two
                utc("2026-10-26T01:30:00Z"), // 02:30 CET
                utc("2026-10-27T01:30:00Z"),
            ]
        );
    }

    #[test]
    fn dst_overlap_every_hour_fires_every_real_hour() {
        let got = series("0 * * * *", "Europe/Paris", "2026-10-24T22:30:00Z", 5);
        assert_eq!(
            got,
            vec![
                utc("2026-10-24T23:00:00Z"), // 01:00 CEST
                utc("2026-10-25T00:00:00Z"), // 02:00 CEST
                utc("2026-10-25T01:00:00Z"), // 02:00 CET
                utc("2026-10-25T02:00:00Z"), // 03:00 CET
                utc("2026-10-25T03:00:00Z"),
            ]
        );
    }

    #[test]
    fn dst_every_minute_has_no_gap_and_no_repeat_in_real_time() {
        // Across both transitions, an every-minute schedule fires exactly
        // once per real minute.
        for start in ["2026-03-28T23:00:00Z", "2026-10-24T23:00:00Z"] {
            let got = series("* * * * *", "Europe/Paris", start, 300);
            for w in got.windows(2) {
                assert_eq!(w[1] - w[0], chrono::TimeDelta::minutes(1), "{w:?}");
            }
        }
    }

    #[test]
    fn dst_every_second_is_continuous_and_affordable() {
        let start = std::time::Instant::now();
        // Two hours of seconds around the fall-back, then around the gap.
        for from in ["2026-10-25T00:00:00Z", "2026-03-29T00:30:00Z"] {
            let got = series("* * * * * *", "Europe/Paris", from, 7_200);
            for w in got.windows(2) {
                assert_eq!(w[1] - w[0], chrono::TimeDelta::seconds(1), "{w:?}");
            }
        }
        eprintln!("14,400 next_after calls near DST: {:?}", start.elapsed());
    }

    #[test]
    fn dst_fixed_hour_every_second() {
        let start = std::time::Instant::now();
        // Spring-forward day: 02:00:00..02:59:59 CET do not exist and fire
        // shifted, as 03:00:00..03:59:59 CEST (01:00..02:00 UTC).
        let got = series("* * 2 * * *", "Europe/Paris", "2026-03-28T23:00:00Z", 3_601);
        assert_eq!(got[0], utc("2026-03-29T01:00:00Z"));
        assert_eq!(got[3_599], utc("2026-03-29T01:59:59Z"));
        assert_eq!(got[3_600], utc("2026-03-30T00:00:00Z")); // 02:00 CEST
        // Fall-back day: the first 02:xx hour only.
        let got = series("* * 2 * * *", "Europe/Paris", "2026-10-24T23:00:00Z", 3_601);
        assert_eq!(got[0], utc("2026-10-25T00:00:00Z"));
        assert_eq!(got[3_599], utc("2026-10-25T00:59:59Z"));
        assert_eq!(got[3_600], utc("2026-10-26T01:00:00Z")); // 02:00 CET
        eprintln!(
            "7,202 fixed-hour next_after calls near DST: {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn dst_shifted_and_regular_wall_times_meeting_fire_once() {
        // 02:30 is skipped and shifted to 03:30 CEST, which also matches on
        // its own: one tick.
        let got = series("30 2,3 * * *", "Europe/Paris", "2026-03-29T00:00:00Z", 3);
        assert_eq!(
            got,
            vec![
                utc("2026-03-29T01:30:00Z"), // 03:30 CEST
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
                utc("2026-03-30T01:30:00Z"), // 03:30 CEST
            ]
        );
    }

    #[test]
    fn dst_half_hour_shift_lord_howe() {
        // Australia/Lord_Howe moves by 30 minutes: 02:00 -> 02:30 on
        // 2026-10-04 (UTC+10:30 -> UTC+11).
        let got = series(
            "15 2 * * *",
            "Australia/Lord_Howe",
            "2026-10-02T12:00:00Z",
            3,
        );
        assert_eq!(
            got,
            vec![
                utc("2026-10-02T15:45:00Z"), // 02:15 +10:30
                utc("2026-10-03T15:45:00Z"), // 02:15 skipped: 02:45 +11:00
                utc("2026-10-04T15:15:00Z"), // 02:15 +11:00
            ]
        );
    }

    #[test]
    fn plan_catch_up_policies() {
        let spec = CronSpec::parse("* * * * *", "UTC").unwrap();
        let next = utc("2026-01-01T10:01:00Z");
        let now = utc("2026-01-01T10:10:45Z");
        let hour = Duration::from_secs(3600);
        let all = plan(&spec, CatchUp::All, hour, next, now, 1000);
        assert_eq!(all.fire.len(), 10);
        assert_eq!(all.dropped, None);
        assert_eq!(all.next, Some(utc("2026-01-01T10:11:00Z")));

        let latest = plan(&spec, CatchUp::Latest, hour, next, now, 1000);
        assert_eq!(latest.fire, vec![utc("2026-01-01T10:10:00Z")]);
        assert_eq!(latest.dropped, Some((next, utc("2026-01-01T10:10:00Z"))));
        assert_eq!(latest.next, Some(utc("2026-01-01T10:11:00Z")));

        let skip = plan(&spec, CatchUp::Skip, hour, next, now, 1000);
        assert!(skip.fire.is_empty());
        assert_eq!(skip.dropped, Some((next, utc("2026-01-01T10:11:00Z"))));
        assert_eq!(skip.next, Some(utc("2026-01-01T10:11:00Z")));

        // A window of 5 minutes keeps 10:06..=10:10.
        let windowed = plan(
            &spec,
            CatchUp::All,
            Duration::from_secs(300),
            next,
            now,
            1000,
        );
        assert_eq!(windowed.fire.first(), Some(&utc("2026-01-01T10:06:00Z")));
        assert_eq!(windowed.fire.len(), 5);
        assert_eq!(windowed.dropped, Some((next, utc("2026-01-01T10:06:00Z"))));

        // The cap leaves the rest due.
        let capped = plan(&spec, CatchUp::All, hour, next, now, 3);
        assert_eq!(capped.fire.len(), 3);
        assert_eq!(capped.next, Some(utc("2026-01-01T10:04:00Z")));

        // An on-time tick (within the grace) fires under every policy.
        let on_time = utc("2026-01-01T10:01:05Z");
        for policy in [CatchUp::All, CatchUp::Latest, CatchUp::Skip] {
            let p = plan(&spec, policy, hour, next, on_time, 1000);
            assert_eq!(p.fire, vec![next], "{policy:?}");
            assert_eq!(p.dropped, None, "{policy:?}");
        }
    }

    #[test]
    fn latest_after_a_long_outage_is_cheap() {
        let spec = CronSpec::parse("* * * * * *", "UTC").unwrap();
        let next = utc("2025-01-01T00:00:00Z");
        let now = utc("2026-01-01T00:00:00.5Z");
        let p = plan(&spec, CatchUp::Latest, Duration::ZERO, next, now, 1000);
        assert_eq!(p.fire, vec![utc("2026-01-01T00:00:00Z")]);
    }

    #[test]
    fn schedule_def_deserializes_kebab_case_with_defaults() {
        let def: ScheduleDef = serde_json::from_str(
            r#"{"name":"n","expression":"* * * * *","job-kind":"k","catch-up":"latest","overlap":"skip"}"#,
        )
        .unwrap();
        assert_eq!(def.catch_up, CatchUp::Latest);
        assert_eq!(def.overlap, Overlap::Skip);
        assert_eq!(def.timezone, "UTC");
        assert_eq!(def.job_queue, "default");
        assert_eq!(def.job_args, serde_json::json!({}));
        assert!(def.validate().is_ok());
        assert!(
            serde_json::from_str::<ScheduleDef>(
                r#"{"name":"n","expression":"x","job-kind":"k","bogus":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn job_key_is_rfc3339() {
        assert_eq!(
            cron_job_key("s", utc("2026-01-01T10:00:00Z")),
            "cron:s:2026-01-01T10:00:00Z"
        );
    }
}
