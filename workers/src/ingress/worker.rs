//! A partition's worker: batches of messages applied in one transaction each (inbox rows and
//! the handler's effect), a failed batch re-applied one message at a time, offsets stored
//! after the commit, and room reserved in the job queue first.
use super::*;

pub(super) fn business_id(
    how: &BusinessId,
    headers: &serde_json::Value,
    payload: Option<&[u8]>,
) -> Option<String> {
    match how {
        BusinessId::Header(name) => headers
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        BusinessId::Field(field) => {
            let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
            json_text(v.get(field))
        }
        BusinessId::None => None,
    }
}

/// Processes one partition's messages in batches, in offset order.
pub(super) async fn partition_worker(
    shared: Arc<Shared>,
    tp: (String, i32),
    topic: TopicConfig,
    handler: Arc<dyn MessageHandler>,
    state: Arc<PartState>,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    // Double buffering: a batch is at most half the buffer, so while one is
    // being applied the next one is fetched (the partition stays resumed),
    // and committing a batch always brings the buffer down to half, where a
    // paused partition resumes.
    let low_water = shared.config.partition_buffer.max(1) / 2;
    let max_batch = low_water.max(1);
    let mut pending: VecDeque<Item> = VecDeque::new();
    loop {
        if pending.is_empty() {
            let first = tokio::select! {
                () = shared.cancel.cancelled() => return,
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            pending.push_back(first);
        }
        while pending.len() < max_batch {
            match rx.try_recv() {
                Ok(i) => pending.push_back(i),
                Err(_) => break,
            }
        }
        // Revoked since they were fetched: their next owner has them.
        let epoch = state.epoch.load(Ordering::SeqCst);
        let before = pending.len();
        pending.retain(|i| i.epoch == epoch);
        release(&shared, &tp, &state, before - pending.len(), low_water);
        if pending.is_empty() {
            continue;
        }
        let Some((room, backlog)) =
            wait_for_room(&shared, &topic, &tp, &state, pending.len()).await
        else {
            return;
        };
        if state.epoch.load(Ordering::SeqCst) != epoch {
            if let Some(b) = &backlog {
                b.finished(room);
            }
            continue; // revoked while waiting: drop the stale ones first
        }
        let batch: Vec<IngressMessage> = pending
            .drain(..room.min(pending.len()))
            .map(|i| i.msg)
            .collect();
        let done = process_batch(&shared, &*handler, &batch).await;
        if let Some(b) = &backlog {
            b.finished(room);
        }
        if !done {
            return;
        }
        release(&shared, &tp, &state, batch.len(), low_water);
    }
}

/// `n` messages of the partition left memory: count them out and resume the
/// partition once its buffer has drained to `low_water`.
fn release(shared: &Shared, tp: &(String, i32), state: &PartState, n: usize, low_water: usize) {
    if n == 0 {
        return;
    }
    let left = state
        .buffered
        .fetch_sub(n, Ordering::SeqCst)
        .saturating_sub(n);
    shared.stats.buffered.fetch_sub(n, Ordering::SeqCst);
    state.room.notify_waiters();
    if left <= low_water && state.paused_buffer.load(Ordering::SeqCst) {
        set_paused(shared, tp, state, Reason::Buffer, false);
    }
}

/// Waits until the topic's queue has room (pausing the partition while it
/// has none) and reserves it for up to `want` messages. Returns how many
/// may be applied now and the reservation to release afterwards; `None`
/// when cancelled while waiting.
async fn wait_for_room(
    shared: &Shared,
    topic: &TopicConfig,
    tp: &(String, i32),
    state: &PartState,
    want: usize,
) -> Option<(usize, Option<Arc<Backlog>>)> {
    let Some(queue) = &topic.queue else {
        return Some((want, None));
    };
    let backlog = shared.backlog(queue);
    let limit = shared.config.max_backlog.max(1);
    let max_age = shared.config.commit_interval;
    loop {
        if let Room::Granted(n) = backlog.reserve(want, limit, max_age) {
            if state.paused_backlog.load(Ordering::SeqCst) {
                set_paused(shared, tp, state, Reason::Backlog, false);
            }
            return Some((n, Some(backlog)));
        }
        let snapshot = backlog.snapshot();
        match queue_available_backlog(shared.store.pool(), queue, limit + 1).await {
            Ok(n) => {
                backlog.measured(n, snapshot);
                if let Room::Granted(n) = backlog.reserve(want, limit, max_age) {
                    if state.paused_backlog.load(Ordering::SeqCst) {
                        set_paused(shared, tp, state, Reason::Backlog, false);
                    }
                    return Some((n, Some(backlog)));
                }
                set_paused(shared, tp, state, Reason::Backlog, true);
            }
            Err(e) => tracing::warn!(error = %e, "backlog check failed"),
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return None,
            () = tokio::time::sleep(shared.config.commit_interval.min(Duration::from_millis(250))) => {}
        }
    }
}

/// Applies a batch in one transaction and stores the last offset; on an
/// error, re-applies it one message at a time. False when cancelled before
/// everything was applied (offsets of the rest not stored).
async fn process_batch(
    shared: &Shared,
    handler: &dyn MessageHandler,
    batch: &[IngressMessage],
) -> bool {
    let Some(last) = batch.last() else {
        return true;
    };
    if batch.len() > 1 {
        match apply_batch(&shared.store, handler, batch).await {
            Ok(new) => {
                shared.stats.batches.fetch_add(1, Ordering::SeqCst);
                shared.stats.applied.fetch_add(new, Ordering::SeqCst);
                shared
                    .stats
                    .duplicates
                    .fetch_add(batch.len() as u64 - new, Ordering::SeqCst);
                store_offset(shared, last);
                return true;
            }
            Err(e) => {
                tracing::debug!(error = %e.error, index = ?e.index, size = batch.len(), "batch failed; applying its messages one by one");
                for (i, msg) in batch.iter().enumerate() {
                    let prior = (e.index == Some(i)).then(|| e.error.clone());
                    if !process(shared, handler, msg, prior).await {
                        return false;
                    }
                }
                return true;
            }
        }
    }
    process(shared, handler, last, None).await
}

fn store_offset(shared: &Shared, msg: &IngressMessage) {
    match shared
        .consumer
        .store_offset(&msg.topic, msg.partition, msg.offset)
    {
        Ok(()) => {
            let parts = shared.parts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = parts.get(&(msg.topic.clone(), msg.partition)) {
                state
                    .stored_next
                    .fetch_max(msg.offset + 1, Ordering::SeqCst);
            }
        }
        // Revoked meanwhile: the next owner redelivers it and the inbox skips it.
        Err(e) => {
            tracing::debug!(error = %e, topic = %msg.topic, offset = msg.offset, "offset not stored")
        }
    }
}

/// Applies one message until it is applied, a duplicate or dead-lettered,
/// then stores its offset. `prior` is the error of an attempt already made
/// (in a failed batch). False when cancelled first (offset not stored).
async fn process(
    shared: &Shared,
    handler: &dyn MessageHandler,
    msg: &IngressMessage,
    mut prior: Option<HandlerError>,
) -> bool {
    let mut failures: u32 = 0;
    let mut transient: u32 = 0;
    let max = shared.config.max_attempts.max(1);
    loop {
        let result = match prior.take() {
            Some(e) => Err(e),
            None => apply(&shared.store, handler, msg).await,
        };
        let error = match result {
            Ok(inserted) => {
                let counter = if inserted.is_new() {
                    &shared.stats.applied
                } else {
                    &shared.stats.duplicates
                };
                counter.fetch_add(1, Ordering::SeqCst);
                break;
            }
            Err(HandlerError::Poison(e)) => {
                failures += 1;
                Some(format!("poison message: {e}"))
            }
            Err(HandlerError::Failed(e)) => {
                failures += 1;
                (failures >= max).then(|| format!("failed {failures} times; last error: {e}"))
            }
            Err(HandlerError::Transient(e)) => {
                transient += 1;
                tracing::warn!(error = %e, topic = %msg.topic, offset = msg.offset, "transient failure; retrying");
                None
            }
        };
        if let Some(error) = error {
            let recorded = dead_letters::record(
                &shared.store,
                &shared.config,
                &shared.stats.dead_letters,
                &shared.copier,
                &shared.cancel,
                (msg, &error, failures),
            )
            .await;
            if !recorded {
                return false;
            }
            shared.stats.dead_lettered.fetch_add(1, Ordering::SeqCst);
            break;
        }
        let delay = backoff(
            shared.config.retry_backoff,
            failures.max(transient),
            Duration::from_secs(30),
        );
        tokio::select! {
            () = shared.cancel.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
    }
    store_offset(shared, msg);
    true
}

/// The message's inbox row (its source and dedupe key computed by the caller).
fn inbox_entry<'a>(
    msg: &'a IngressMessage,
    source: &'a str,
    dedupe_key: &'a str,
) -> InboxEntry<'a> {
    InboxEntry {
        source,
        dedupe_key,
        topic: Some(&msg.topic),
        partition: Some(msg.partition),
        offset: Some(msg.offset),
        business_id: msg.business_id.as_deref(),
        payload: msg.payload.as_deref(),
        headers: Some(&msg.headers),
        processed: true,
    }
}

/// One attempt: inbox row + effect in one transaction.
async fn apply(
    store: &Store,
    handler: &dyn MessageHandler,
    msg: &IngressMessage,
) -> Result<InboxInserted, HandlerError> {
    let mut tx = store.pool().begin().await?;
    let source = msg.source();
    let dedupe_key = msg.dedupe_key();
    let inserted = inbox_insert_in(&mut tx, &inbox_entry(msg, &source, &dedupe_key)).await?;
    if inserted.is_new() {
        handler
            .handle(&mut tx, store, msg)
            .instrument(super::trace::message_span(msg))
            .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// One attempt at a whole batch: its inbox rows (one statement) + the new
/// messages' effects, in one transaction. Returns how many were new.
async fn apply_batch(
    store: &Store,
    handler: &dyn MessageHandler,
    batch: &[IngressMessage],
) -> Result<u64, BatchError> {
    let mut tx = store.pool().begin().await.map_err(BatchError::whole)?;
    let keys: Vec<(String, String)> = batch.iter().map(|m| (m.source(), m.dedupe_key())).collect();
    let entries: Vec<InboxEntry<'_>> = batch
        .iter()
        .zip(&keys)
        .map(|(m, (source, key))| inbox_entry(m, source, key))
        .collect();
    let inserted = inbox_insert_many_in(&mut tx, &entries)
        .await
        .map_err(BatchError::whole)?;
    // Positions in `batch` of the new messages.
    let fresh: Vec<usize> = inserted
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_new())
        .map(|(n, _)| n)
        .collect();
    if !fresh.is_empty() {
        let msgs: Vec<&IngressMessage> = fresh.iter().map(|&n| &batch[n]).collect();
        handler
            .handle_batch(&mut tx, store, &msgs)
            .await
            .map_err(|e| BatchError {
                index: e.index.and_then(|i| fresh.get(i).copied()),
                error: e.error,
            })?;
    }
    tx.commit().await.map_err(BatchError::whole)?;
    Ok(fresh.len() as u64)
}
