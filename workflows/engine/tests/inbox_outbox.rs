//! Inbox, dead letters and outbox against a real Postgres: duplicates never
//! abort the caller's transaction, dead letters are recorded once and can be
//! redriven (a large one keeps its prefix, size and hash; its topic copy is
//! claimed once, retried after a failure, and published), and two relays claiming the outbox concurrently never hold the
//! same key (so they can't publish a key out of order).
use ledgerflow_engine::dead_letter::{
    CopyState, dead_letter_copies_claim, dead_letter_copy_failed, dead_letter_copy_published,
    dead_letter_copy_retry_in,
};
use ledgerflow_engine::inbox::{
    InboxEntry, InboxInserted, NewDeadLetter, dead_letter_insert_in, dead_letter_list,
    dead_letter_redrive_in, inbox_insert_in, inbox_list, queue_available_backlog,
};
use ledgerflow_engine::outbox::{
    NewOutboxEvent, outbox_claim_in, outbox_mark_published_in, outbox_pending,
};
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{NewJob, Store};
use std::collections::HashSet;
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn entry<'a>(key: &'a str, offset: i64) -> InboxEntry<'a> {
    InboxEntry {
        source: "kafka:orders",
        dedupe_key: key,
        topic: Some("orders"),
        partition: Some(0),
        offset: Some(offset),
        business_id: Some(key),
        payload: Some(b"{}"),
        headers: None,
        processed: true,
    }
}

#[tokio::test]
async fn inbox_duplicate_keeps_the_transaction_usable() -> TestResult {
    let db = TestDb::new().await?;
    let store = Store::new(db.pool.clone());
    let mut tx = db.pool.begin().await?;
    let first = inbox_insert_in(&mut tx, &entry("id:e1", 1)).await?;
    assert!(first.is_new());
    // Same business id at another offset: a duplicate, and the transaction
    // goes on (the job below commits with it).
    let again = inbox_insert_in(&mut tx, &entry("id:e1", 7)).await?;
    assert_eq!(again, InboxInserted::Duplicate);
    store
        .job_insert_in(&mut tx, &NewJob::new("k", serde_json::json!({})).queue("q"))
        .await?;
    tx.commit().await?;

    // A second transaction sees the committed row as a duplicate too.
    let mut tx = db.pool.begin().await?;
    assert_eq!(
        inbox_insert_in(&mut tx, &entry("id:e1", 9)).await?,
        InboxInserted::Duplicate
    );
    assert!(
        inbox_insert_in(&mut tx, &entry("id:e2", 10))
            .await?
            .is_new()
    );
    tx.commit().await?;

    let rows = inbox_list(&db.pool, "kafka:orders", 10).await?;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.processed_at.is_some()));
    assert_eq!(queue_available_backlog(&db.pool, "q", 100).await?, 1);
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_recorded_once_and_redriven_once() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let letter = NewDeadLetter {
        source: "kafka:orders",
        topic: Some("orders"),
        partition: Some(2),
        offset: Some(41),
        key: Some(b"k"),
        payload: Some(b"not json"),
        headers: None,
        error: "payload is not JSON",
        attempts: 3,
        ..NewDeadLetter::default()
    };
    let id = dead_letter_insert_in(&mut conn, &letter)
        .await?
        .ok_or("first insert wrote nothing")?;
    assert_eq!(dead_letter_insert_in(&mut conn, &letter).await?, None);
    let pending = dead_letter_list(&db.pool, true, 10).await?;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 3);
    assert_eq!(pending[0].error, "payload is not JSON");

    let redriven = dead_letter_redrive_in(&mut conn, id)
        .await?
        .ok_or("not redriven")?;
    assert!(redriven.redriven_at.is_some());
    assert!(dead_letter_redrive_in(&mut conn, id).await?.is_none());
    assert!(dead_letter_list(&db.pool, true, 10).await?.is_empty());
    assert_eq!(dead_letter_list(&db.pool, false, 10).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_claims_never_share_a_key_and_see_earlier_commits() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    // Keys a, b, c with three events each, interleaved.
    for i in 0..3 {
        for key in ["a", "b", "c"] {
            let payload = format!("{key}{i}");
            ledgerflow_engine::outbox::outbox_insert_in(
                &mut conn,
                &NewOutboxEvent {
                    topic: "events",
                    key: Some(key),
                    headers: None,
                    payload: payload.as_bytes(),
                },
            )
            .await?;
        }
    }
    drop(conn);

    // Relay 1 claims two rows, a0 and b0: it now holds keys a and b.
    let mut tx1 = db.pool.begin().await?;
    let claimed1 = outbox_claim_in(&mut tx1, 2).await?;
    let keys1: HashSet<_> = claimed1.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys1, HashSet::from(["a".to_string(), "b".to_string()]));
    // Relay 2 concurrently gets only what relay 1 does not hold.
    let mut tx2 = db.pool.begin().await?;
    let claimed2 = outbox_claim_in(&mut tx2, 100).await?;
    let keys2: HashSet<_> = claimed2.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys2, HashSet::from(["c".to_string()]));
    assert_eq!(claimed2.len(), 3);
    // Rows come in creation order within a claim.
    let payloads: Vec<_> = claimed2.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![b"c0".to_vec(), b"c1".to_vec(), b"c2".to_vec()]
    );
    outbox_mark_published_in(&mut tx2, &claimed2.iter().map(|r| r.id).collect::<Vec<_>>()).await?;
    tx2.commit().await?;

    // Relay 1 publishes only a0 and b0 (say), commits; the next claim by
    // anyone continues with a1 and b1, never re-claiming a0 or b0.
    let first_ids: Vec<_> = claimed1
        .iter()
        .filter(|r| r.payload.ends_with(b"0"))
        .map(|r| r.id)
        .collect();
    outbox_mark_published_in(&mut tx1, &first_ids).await?;
    tx1.commit().await?;
    let mut tx3 = db.pool.begin().await?;
    let claimed3 = outbox_claim_in(&mut tx3, 100).await?;
    let payloads: Vec<_> = claimed3.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            b"a1".to_vec(),
            b"b1".to_vec(),
            b"a2".to_vec(),
            b"b2".to_vec()
        ]
    );
    tx3.rollback().await?;
    assert_eq!(outbox_pending(&db.pool, 100).await?.len(), 4);
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_over_the_limit_keeps_its_prefix_size_and_hash() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let payload: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    for (offset, limit) in [(1, Some(100)), (2, Some(1000)), (3, None)] {
        let letter = NewDeadLetter {
            source: "kafka:orders",
            topic: Some("orders"),
            partition: Some(0),
            offset: Some(offset),
            payload: Some(&payload),
            error: "too big to parse",
            attempts: 1,
            copy_topic: Some("orders.dlq"),
            max_payload: limit,
            ..NewDeadLetter::default()
        };
        dead_letter_insert_in(&mut conn, &letter)
            .await?
            .ok_or("not recorded")?;
    }
    let letters = dead_letter_list(&db.pool, false, 10).await?;
    let by_offset = |o: i64| {
        letters
            .iter()
            .find(|l| l.offset == Some(o))
            .ok_or("missing")
    };
    let sha: Vec<u8> = sqlx::query_scalar("SELECT sha256($1::bytea)")
        .bind(&payload)
        .fetch_one(&db.pool)
        .await?;
    let cut = by_offset(1)?;
    assert_eq!(cut.payload.as_deref(), Some(&payload[..100]));
    assert!(cut.payload_truncated);
    assert_eq!(cut.payload_size, Some(1000));
    assert_eq!(cut.payload_sha256.as_deref(), Some(sha.as_slice()));
    for o in [2, 3] {
        let whole = by_offset(o)?;
        assert_eq!(whole.payload.as_deref(), Some(payload.as_slice()));
        assert!(!whole.payload_truncated);
        assert_eq!(whole.payload_size, Some(1000));
        assert_eq!(whole.copy_state()?, CopyState::Pending);
        assert_eq!(whole.copy_topic.as_deref(), Some("orders.dlq"));
    }
    Ok(())
}

#[tokio::test]
async fn dead_letter_copies_are_claimed_once_retried_after_failure_and_published() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = db.pool.acquire().await?;
    let mut ids = Vec::new();
    for offset in 0..3 {
        let letter = NewDeadLetter {
            source: "kafka:orders",
            topic: Some("orders"),
            partition: Some(0),
            offset: Some(offset),
            payload: Some(b"x"),
            error: "bad",
            attempts: 1,
            copy_topic: (offset < 2).then_some("orders.dlq"),
            ..NewDeadLetter::default()
        };
        ids.push(
            dead_letter_insert_in(&mut conn, &letter)
                .await?
                .ok_or("not recorded")?,
        );
    }
    // Only the two letters that owe a copy are claimed, and a claim hides
    // them from a second copier until its lease runs out.
    let lease = Duration::from_secs(60);
    let claimed = dead_letter_copies_claim(&db.pool, 10, lease, None).await?;
    assert_eq!(claimed.iter().map(|l| l.id).collect::<Vec<_>>(), ids[..2]);
    assert!(
        dead_letter_copies_claim(&db.pool, 10, lease, None)
            .await?
            .is_empty()
    );

    // A failure keeps the copy owed, with its error, due after the backoff.
    let tries =
        dead_letter_copy_failed(&db.pool, ids[0], "topic missing", Duration::ZERO, None).await?;
    assert_eq!(tries, Some(1));
    assert!(dead_letter_copy_published(&db.pool, ids[1], None).await?);
    let again = dead_letter_copies_claim(&db.pool, 10, lease, None).await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, ids[0]);
    assert_eq!(again[0].copy_error.as_deref(), Some("topic missing"));
    assert_eq!(again[0].copy_attempts, 1);

    // An operator makes a claimed (or waiting) copy due at once.
    assert!(dead_letter_copy_retry_in(&mut conn, ids[0], None).await?);
    assert!(!dead_letter_copy_retry_in(&mut conn, ids[1], None).await?);
    assert!(!dead_letter_copy_retry_in(&mut conn, ids[2], None).await?);
    assert!(dead_letter_copy_published(&db.pool, ids[0], None).await?);
    assert!(
        dead_letter_copies_claim(&db.pool, 10, lease, None)
            .await?
            .is_empty()
    );
    let letters = dead_letter_list(&db.pool, false, 10).await?;
    for l in &letters {
        let want = if l.id == ids[2] {
            CopyState::None
        } else {
            CopyState::Published
        };
        assert_eq!(l.copy_state()?, want, "letter {}", l.id);
        if want == CopyState::Published {
            assert!(l.copy_published_at.is_some() && l.copy_error.is_none());
        }
    }
    Ok(())
}
