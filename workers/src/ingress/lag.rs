//! The consumer-lag monitor: librdkafka's statistics, plus one ListOffsets request for the
//! partitions it does not fetch.
use super::*;

/// Measures the consumer lag every `lag-interval-ms` into the stats.
///
/// From librdkafka's own statistics (no requests): each partition's high
/// watermark as its last fetch response reported it, and the offset the
/// group last committed (read at assignment, then updated by each commit).
/// A paused partition is not fetched, so its high watermark would go stale:
/// for those (and any not fetched yet) the monitor asks the broker
/// (ListOffsets, one request for all of them) and keeps the larger value (a
/// fetch response newer than the listing may have seen more).
pub(super) async fn lag_monitor(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.lag_interval.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(assignment) = shared.consumer.assignment() else {
            continue;
        };
        let figures = shared
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut ask = TopicPartitionList::new();
        {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            for e in assignment.elements() {
                let tp = (e.topic().to_string(), e.partition());
                let paused = parts.get(&tp).is_some_and(|s| s.paused());
                if paused || figures.get(&tp).is_none_or(|f| f.high < 0) {
                    ask.add_partition(&tp.0, tp.1);
                }
            }
        }
        let mut listed: HashMap<(String, i32), i64> = HashMap::new();
        if ask.count() > 0 {
            let consumer = shared.consumer.clone();
            let got = tokio::task::spawn_blocking(move || latest_offsets(&consumer, ask)).await;
            match got {
                Ok(Ok(l)) => listed = l,
                Ok(Err(e)) => tracing::debug!(error = %e, "high watermarks not listed"),
                Err(_) => {}
            }
        }
        let mut lags = Vec::new();
        {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            for e in assignment.elements() {
                let tp = (e.topic().to_string(), e.partition());
                let f = figures.get(&tp).copied().unwrap_or_default();
                let high = f.high.max(listed.get(&tp).copied().unwrap_or(-1));
                if high < 0 {
                    continue; // unknown yet
                }
                let stored = parts
                    .get(&tp)
                    .map(|s| s.stored_next.load(Ordering::SeqCst))
                    .filter(|&o| o > 0);
                let committed = (f.committed >= 0).then_some(f.committed);
                let position = match (committed, stored) {
                    (Some(c), Some(s)) => c.max(s),
                    (Some(o), None) | (None, Some(o)) => o,
                    (None, None) => f.low.max(0),
                };
                lags.push(ConsumerLag {
                    group: shared.config.group_id.clone(),
                    topic: tp.0,
                    partition: tp.1,
                    high_watermark: high,
                    position,
                    lag: (high - position).max(0),
                });
            }
        }
        lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        // Also in Postgres, for the processes that consume nothing (the
        // API's /metrics). A failure only leaves that copy stale.
        if let Err(e) = shared.store.consumer_lag_record(&lags).await {
            tracing::warn!(error = %e, "consumer lag not recorded in Postgres");
        }
        *shared.stats.lag.lock().unwrap_or_else(|p| p.into_inner()) = lags;
    }
}

/// The high watermarks of `tpl`'s partitions (ListOffsets for the latest
/// offset: the special timestamp -1, which is how `Offset::End` is sent).
fn latest_offsets(
    consumer: &IngressConsumer,
    mut tpl: TopicPartitionList,
) -> Result<HashMap<(String, i32), i64>, KafkaError> {
    tpl.set_all_offsets(Offset::End)?;
    let got = consumer.offsets_for_times(tpl, Duration::from_secs(5))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if e.error().is_ok() => {
                Some(((e.topic().to_string(), e.partition()), o))
            }
            _ => None,
        })
        .collect())
}
