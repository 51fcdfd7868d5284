//! The notifier conformance suite: one [`exercise`] that every [`Notifier`]
//! implementation must pass, called once per implementation (as the
//! exchange's [`crate::exchange::conformance`] is).
//!
//! It needs a fresh provider simulator behind `notifier` (it uses fixed ids)
//! and the [`NotifierControls`] that steer it. It panics, with the case's
//! name, on the first deviation: it is test code shipped in the library so
//! that the in-process and the HTTP adapter, and any future one, share it.
//!
//! Covered: one delivery per id for a repeated send (same receipt) and for
//! concurrent sends; an id reused for another message is refused; transient
//! failures are retryable and deliver once after the outage; permanent
//! refusals are final and deliver nothing; a lost answer is `Unknown`, was
//! delivered, and its retry gets the original receipt; the trade and
//! withdrawal templates reach the provider exactly as rendered. The
//! reconcile query ([`Notifier::delivery_status`]): absent for an id never
//! sent, refused or lost on its way in (and a send after that delivers
//! once); the original receipt for a delivered id, also after a lost
//! answer; `Unavailable` while the provider can't be reached; never a send.

use super::{
    Channel, Delivery, DeliveryCounters, Error, Notification, Notifier, NotifierControls,
    NotifyFault, Result, SendReceipt,
};
use crate::workflows::notification::render_template;
use serde_json::json;
use std::sync::Arc;

fn ok<T>(r: Result<T>, case: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("[{case}] unexpected error: {e}"),
    }
}

/// An email to a fixed address with `id`.
pub fn sample_notification(id: &str) -> Notification {
    Notification {
        id: id.into(),
        channel: Channel::Email,
        to: "ada@example.com".into(),
        subject: "Trade filled".into(),
        body: "0.5 BTC bought at 43210.12 USD".into(),
    }
}

async fn counters(c: &dyn NotifierControls, id: &str, case: &str) -> DeliveryCounters {
    ok(c.counters(id).await, case)
}

async fn delivery(c: &dyn NotifierControls, id: &str, case: &str) -> Option<Delivery> {
    ok(c.delivery(id).await, case)
}

/// Sends `note`, then reads back what the provider delivered.
async fn send_and_read_back(
    n: &dyn Notifier,
    c: &dyn NotifierControls,
    note: &Notification,
    case: &str,
) -> Delivery {
    ok(n.send(note).await, case);
    delivery(c, &note.id, case)
        .await
        .unwrap_or_else(|| panic!("[{case}] not delivered"))
}

/// Runs every case against `notifier`, steered by `controls`.
pub async fn exercise(notifier: Arc<dyn Notifier>, controls: &dyn NotifierControls) {
    delivered_once_per_id(&*notifier, controls).await;
    id_reuse_with_other_content(&*notifier, controls).await;
    concurrent_sends(&notifier, controls).await;
    transient_failures(&*notifier, controls).await;
    permanent_failures(&*notifier, controls).await;
    lost_answer(&*notifier, controls).await;
    lookups(&*notifier, controls).await;
    lost_before_delivery(&*notifier, controls).await;
    lookup_outage(&*notifier, controls).await;
    renders_templates(&*notifier, controls).await;
}

async fn delivered_once_per_id(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "delivered once per id";
    let note = sample_notification("conf:once");
    let first = ok(n.send(&note).await, case);
    assert!(!first.duplicate, "[{case}] the first send delivers");
    assert!(
        !first.provider_message_id.is_empty(),
        "[{case}] a receipt names the message"
    );
    let again = ok(n.send(&note).await, case);
    assert_eq!(
        again,
        SendReceipt {
            provider_message_id: first.provider_message_id.clone(),
            duplicate: true,
        },
        "[{case}] a resend returns the original receipt"
    );
    let counters = counters(c, &note.id, case).await;
    assert_eq!(counters.delivered, 1, "[{case}] exactly one delivery");
    assert_eq!(counters.attempts, 2, "[{case}] both sends arrived");
    let d = delivery(c, &note.id, case)
        .await
        .unwrap_or_else(|| panic!("[{case}] no delivery recorded"));
    assert_eq!(d.notification, note, "[{case}] delivered as sent");
    assert_eq!(d.provider_message_id, first.provider_message_id, "[{case}]");

    // A different id is a different message.
    let other = ok(n.send(&sample_notification("conf:once-2")).await, case);
    assert!(!other.duplicate, "[{case}]");
    assert_ne!(
        other.provider_message_id, first.provider_message_id,
        "[{case}] each delivery has its own message id"
    );
}

async fn id_reuse_with_other_content(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "id reuse with other content";
    let mut note = sample_notification("conf:once");
    note.body = "something else entirely".into();
    match n.send(&note).await {
        Err(e @ Error::Rejected(_)) => assert!(!e.is_retryable(), "[{case}]"),
        other => panic!("[{case}] expected Rejected, got {other:?}"),
    }
    let d = delivery(c, "conf:once", case)
        .await
        .unwrap_or_else(|| panic!("[{case}] the original delivery is gone"));
    assert_eq!(
        d.notification,
        sample_notification("conf:once"),
        "[{case}] the original message stands"
    );
    assert_eq!(
        counters(c, "conf:once", case).await.delivered,
        1,
        "[{case}]"
    );
}

async fn concurrent_sends(n: &Arc<dyn Notifier>, c: &dyn NotifierControls) {
    let case = "concurrent sends";
    const SENDERS: u64 = 8;
    let note = sample_notification("conf:concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SENDERS {
        let (n, note) = (Arc::clone(n), note.clone());
        tasks.spawn(async move { n.send(&note).await });
    }
    let mut receipts = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => receipts.push(ok(r, case)),
            Err(e) => panic!("[{case}] a sender panicked: {e}"),
        }
    }
    let fresh = receipts.iter().filter(|r| !r.duplicate).count();
    assert_eq!(fresh, 1, "[{case}] one send delivers: {receipts:?}");
    assert!(
        receipts
            .iter()
            .all(|r| r.provider_message_id == receipts[0].provider_message_id),
        "[{case}] every sender gets the same message id: {receipts:?}"
    );
    let counters = counters(c, &note.id, case).await;
    assert_eq!(counters.delivered, 1, "[{case}] exactly one delivery");
    assert_eq!(counters.attempts, SENDERS, "[{case}] every send arrived");
}

async fn transient_failures(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "transient failures";
    let note = sample_notification("conf:transient");
    ok(c.fail_next(2, NotifyFault::Unavailable).await, case);
    for attempt in 1..=2 {
        match n.send(&note).await {
            Err(e @ Error::Unavailable(_)) => {
                assert!(e.is_retryable(), "[{case}] attempt {attempt}");
            }
            other => panic!("[{case}] attempt {attempt}: expected Unavailable, got {other:?}"),
        }
        assert!(
            delivery(c, &note.id, case).await.is_none(),
            "[{case}] nothing went out during the outage"
        );
    }
    let receipt = ok(n.send(&note).await, case);
    assert!(!receipt.duplicate, "[{case}] the retry delivers");
    let counters = counters(c, &note.id, case).await;
    assert_eq!(counters.delivered, 1, "[{case}]");
    assert_eq!(counters.attempts, 3, "[{case}]");
}

async fn permanent_failures(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "permanent failure";
    let note = sample_notification("conf:rejected");
    ok(
        c.fail_next(
            1,
            NotifyFault::Reject {
                reason: "recipient unsubscribed".into(),
            },
        )
        .await,
        case,
    );
    match n.send(&note).await {
        Err(e @ Error::Rejected(_)) => {
            assert!(!e.is_retryable(), "[{case}] final");
            assert!(
                e.to_string().contains("recipient unsubscribed"),
                "[{case}] the provider's reason is kept: {e}"
            );
        }
        other => panic!("[{case}] expected Rejected, got {other:?}"),
    }
    assert!(delivery(c, &note.id, case).await.is_none(), "[{case}]");
    assert_eq!(counters(c, &note.id, case).await.delivered, 0, "[{case}]");

    let case = "empty recipient";
    let mut note = sample_notification("conf:no-recipient");
    note.to = "  ".into();
    match n.send(&note).await {
        Err(e @ Error::Rejected(_)) => assert!(!e.is_retryable(), "[{case}]"),
        other => panic!("[{case}] expected Rejected, got {other:?}"),
    }
    assert!(delivery(c, &note.id, case).await.is_none(), "[{case}]");
}

async fn lost_answer(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "lost answer";
    let note = sample_notification("conf:lost-answer");
    ok(c.fail_next(1, NotifyFault::AcceptThenTimeout).await, case);
    match n.send(&note).await {
        Err(e @ Error::Unknown(_)) => assert!(e.is_retryable(), "[{case}]"),
        other => panic!("[{case}] expected Unknown, got {other:?}"),
    }
    // The provider did deliver: the answer, not the message, was lost.
    let d = delivery(c, &note.id, case)
        .await
        .unwrap_or_else(|| panic!("[{case}] the message went out before the answer was lost"));
    // So the retry that an unknown outcome calls for sends nothing new.
    let retry = ok(n.send(&note).await, case);
    assert_eq!(
        retry,
        SendReceipt {
            provider_message_id: d.provider_message_id,
            duplicate: true,
        },
        "[{case}] the retry is answered from the dedupe table"
    );
    let counters = counters(c, &note.id, case).await;
    assert_eq!(counters.delivered, 1, "[{case}] exactly one delivery");
    assert_eq!(counters.attempts, 2, "[{case}]");
}

async fn lookups(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "lookup of an id never sent";
    assert_eq!(
        ok(n.delivery_status("conf:never-sent").await, case),
        None,
        "[{case}]"
    );
    let never = counters(c, "conf:never-sent", case).await;
    assert_eq!(
        (never.attempts, never.delivered, never.lookups),
        (0, 0, 1),
        "[{case}] the query arrived and sent nothing"
    );

    let case = "lookup of a delivered id";
    let first = sample_notification("conf:once");
    let original = delivery(c, &first.id, case)
        .await
        .unwrap_or_else(|| panic!("[{case}] conf:once was delivered earlier"));
    let before = counters(c, &first.id, case).await;
    let found = ok(n.delivery_status(&first.id).await, case);
    assert_eq!(
        found,
        Some(SendReceipt {
            provider_message_id: original.provider_message_id,
            duplicate: true,
        }),
        "[{case}] the original receipt, as a repeat would get it"
    );
    let after = counters(c, &first.id, case).await;
    assert_eq!(
        (after.attempts, after.delivered, after.lookups),
        (before.attempts, 1, before.lookups + 1),
        "[{case}] a lookup sends nothing"
    );

    let case = "lookup after a lost answer";
    let lost = delivery(c, "conf:lost-answer", case)
        .await
        .unwrap_or_else(|| panic!("[{case}] conf:lost-answer was delivered earlier"));
    assert_eq!(
        ok(n.delivery_status("conf:lost-answer").await, case).map(|r| r.provider_message_id),
        Some(lost.provider_message_id),
        "[{case}] the reconcile query finds what the lost answer hid"
    );

    let case = "lookup of a refused id";
    assert_eq!(
        ok(n.delivery_status("conf:rejected").await, case),
        None,
        "[{case}] a refusal delivered nothing"
    );
}

async fn lost_before_delivery(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "lost before delivery";
    let note = sample_notification("conf:lost-request");
    ok(c.fail_next(1, NotifyFault::LostBeforeDelivery).await, case);
    match n.send(&note).await {
        Err(Error::Unknown(_)) => {}
        other => panic!("[{case}] expected Unknown, got {other:?}"),
    }
    // The same answer as a lost reply; only the reconcile query tells them apart.
    assert_eq!(
        ok(n.delivery_status(&note.id).await, case),
        None,
        "[{case}] nothing was delivered"
    );
    // Certainly absent: sending again under the same id delivers, once.
    let receipt = ok(n.send(&note).await, case);
    assert!(!receipt.duplicate, "[{case}] the resend delivers");
    let found = ok(n.delivery_status(&note.id).await, case);
    assert_eq!(
        found.map(|r| r.provider_message_id),
        Some(receipt.provider_message_id),
        "[{case}] and the query now finds it"
    );
    let counters = counters(c, &note.id, case).await;
    assert_eq!(
        (counters.attempts, counters.delivered, counters.lookups),
        (2, 1, 2),
        "[{case}]"
    );
}

async fn lookup_outage(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "lookup outage";
    let note = sample_notification("conf:lookup-outage");
    let receipt = ok(n.send(&note).await, case);
    ok(c.fail_next_lookups(2).await, case);
    for attempt in 1..=2 {
        match n.delivery_status(&note.id).await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("[{case}] attempt {attempt}: expected Unavailable, got {other:?}"),
        }
    }
    // The controls' own reads are not lookups: they neither fail nor count.
    assert!(delivery(c, &note.id, case).await.is_some(), "[{case}]");
    assert_eq!(
        ok(n.delivery_status(&note.id).await, case).map(|r| r.provider_message_id),
        Some(receipt.provider_message_id),
        "[{case}] answered again after the outage"
    );
    let counters = counters(c, &note.id, case).await;
    assert_eq!(
        (counters.attempts, counters.delivered, counters.lookups),
        (1, 1, 3),
        "[{case}] failed lookups count, and sent nothing"
    );
}

async fn renders_templates(n: &dyn Notifier, c: &dyn NotifierControls) {
    let case = "trade template";
    let (subject, body) = render_template(
        "trade.settled",
        &json!({
            "trade_id": "0192f7c4-5d1e-7a00-8000-000000000001",
            "side": "buy",
            "base": "BTC",
            "quote": "USD",
        }),
    );
    let note = Notification {
        id: "conf:trade:settled".into(),
        channel: Channel::Email,
        to: "ada@example.com".into(),
        subject,
        body,
    };
    let d = send_and_read_back(n, c, &note, case).await;
    assert_eq!(d.notification.channel, Channel::Email, "[{case}]");
    assert_eq!(
        d.notification.subject, "Your trade was executed",
        "[{case}]"
    );
    assert_eq!(
        d.notification.body,
        "Trade 0192f7c4-5d1e-7a00-8000-000000000001 (buy BTC/USD) was filled and settled.",
        "[{case}]"
    );

    let case = "withdrawal template";
    // Amounts are strings end to end: the smallest BTC unit must arrive
    // exactly as written, never as 1e-8.
    let (subject, body) = render_template(
        "withdrawal.completed",
        &json!({
            "withdrawal_id": "wd_42",
            "amount": "0.00000001",
            "asset": "BTC",
            "address": "bc1qmt4npcrde7q9vkkfxhk23mp7s73v6uv5h06myw",
            "tx_hash": "ab12cd34",
        }),
    );
    let note = Notification {
        id: "conf:withdrawal:completed".into(),
        channel: Channel::Push,
        to: "device-token-éü".into(),
        subject,
        body,
    };
    let d = send_and_read_back(n, c, &note, case).await;
    assert_eq!(d.notification, note, "[{case}] delivered as rendered");
    assert_eq!(d.notification.channel, Channel::Push, "[{case}]");
    assert_eq!(
        d.notification.subject, "Your withdrawal was sent",
        "[{case}]"
    );
    assert_eq!(
        d.notification.body,
        "Withdrawal wd_42 of 0.00000001 BTC to bc1qmt4npcrde7q9vkkfxhk23mp7s73v6uv5h06myw \
         is confirmed (tx ab12cd34).",
        "[{case}]"
    );
}
