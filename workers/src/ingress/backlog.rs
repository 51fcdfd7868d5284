//! Room in a job queue, shared by the partitions that feed it (`max-backlog`).
use super::*;

/// Room in one job queue, shared by the partitions that feed it.
///
/// The estimate is the last measured count of available jobs plus every
/// reservation that measurement may have missed (batches in flight when it
/// started, and all made since), so it never under-counts what this process
/// added; runners only lower the true count.
#[derive(Default)]
pub(super) struct Backlog {
    inner: Mutex<BacklogInner>,
}

#[derive(Default)]
struct BacklogInner {
    measured: i64,
    measured_at: Option<Instant>,
    since: i64,
    in_flight: i64,
    reserved_total: i64,
}

pub(super) enum Room {
    /// Reserved this many jobs' room.
    Granted(usize),
    /// The estimate is stale or says full: measure first.
    Measure,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, BacklogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn reserve(&self, want: usize, limit: i64, max_age: Duration) -> Room {
        let mut b = self.lock();
        let fresh = b.measured_at.is_some_and(|t| t.elapsed() < max_age);
        let room = limit - (b.measured + b.since);
        if !fresh || room <= 0 {
            return Room::Measure;
        }
        let n = i64::try_from(want).unwrap_or(i64::MAX).min(room);
        b.in_flight += n;
        b.reserved_total += n;
        b.since += n;
        Room::Granted(usize::try_from(n).unwrap_or(0))
    }

    /// What a measurement must add to its count: (in flight, total reserved) now.
    pub(super) fn snapshot(&self) -> (i64, i64) {
        let b = self.lock();
        (b.in_flight, b.reserved_total)
    }

    pub(super) fn measured(&self, count: i64, snapshot: (i64, i64)) {
        let mut b = self.lock();
        b.measured = count;
        b.measured_at = Some(Instant::now());
        b.since = snapshot.0 + (b.reserved_total - snapshot.1);
    }

    pub(super) fn finished(&self, n: usize) {
        let mut b = self.lock();
        b.in_flight -= i64::try_from(n).unwrap_or(0);
    }
}
