//! Notification digests in process: a burst of one user's settled trades sends one message
//! that carries them all, another user's go in their own, nothing goes out before the window,
//! and an event after a digest began goes in the next one.
mod payments_env;

use ledgerflow_payments::UserId;
use ledgerflow_payments::workflows::WorkflowsConfig;
use ledgerflow_payments::workflows::digest::NotificationDigest;
use payments_env::{Env, TestResult};
use std::time::Duration;

fn config() -> WorkflowsConfig {
    WorkflowsConfig {
        notification_digest: Some(NotificationDigest {
            window: Duration::from_secs(2),
            max_wait: Duration::from_secs(30),
        }),
        ..Env::default_config()
    }
}

impl Env {
    /// The digest ids that carry `user`'s notifications, each with its rows' statuses.
    async fn digests(&self, user: UserId) -> TestResult<Vec<(Option<String>, Vec<String>)>> {
        Ok(sqlx::query_as(
            "SELECT digest_id, array_agg(status ORDER BY id) FROM notifications
             WHERE user_id = $1 GROUP BY digest_id ORDER BY min(created_at)",
        )
        .bind(user)
        .fetch_all(&self.db.pool)
        .await?)
    }

    fn advance(&self, d: Duration) {
        self.clock
            .set(self.clock.get() + chrono::TimeDelta::from_std(d).expect("a short duration"));
    }
}

#[tokio::test]
async fn a_burst_of_settled_trades_sends_one_digest_per_user() -> TestResult {
    let env = Env::with_config(config()).await?;
    let (a, b) = (
        env.user_with("USDT", "10000").await?,
        env.user_with("USDT", "10000").await?,
    );
    let mut trades = Vec::new();
    for _ in 0..5 {
        trades.push(env.start_trade(a, "buy", "0.1", "100").await?);
    }
    trades.push(env.start_trade(b, "buy", "0.2", "100").await?);
    env.run().await?;
    env.deliver().await?;
    for t in &trades {
        assert_eq!(env.state(*t).await?, "completed");
    }
    assert!(
        env.notifier.deliveries().is_empty(),
        "nothing before the window"
    );
    assert_eq!(
        env.digests(a).await?,
        vec![(None, vec!["pending".into(); 5])]
    );

    env.advance(Duration::from_secs(2));
    env.run().await?;
    let sent = env.notifier.deliveries();
    assert_eq!(sent.len(), 2, "one message per user: {sent:?}");
    let of_a = env.digests(a).await?;
    assert_eq!(of_a.len(), 1);
    let (Some(digest_a), statuses) = &of_a[0] else {
        panic!("a's notifications carry no digest: {of_a:?}");
    };
    assert_eq!(statuses, &vec!["sent".to_string(); 5]);
    assert_eq!(env.notifier.delivered_count(digest_a), 1);
    let message = sent
        .iter()
        .find(|n| &n.id == digest_a)
        .ok_or("a's digest was not delivered")?;
    assert_eq!(message.subject, "5 updates on your account");
    assert_eq!(message.body.lines().count(), 5);
    assert!(message.body.contains(&trades[0].to_string()));
    let of_b = env.digests(b).await?;
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].1, vec!["sent".to_string()]);
    assert_ne!(of_b[0].0.as_ref(), Some(digest_a));

    // After a's digest went out, a's next event goes in a new one.
    let late = env.start_trade(a, "buy", "0.1", "100").await?;
    env.run().await?;
    env.deliver().await?;
    assert_eq!(env.state(late).await?, "completed");
    env.advance(Duration::from_secs(2));
    env.run().await?;
    let of_a = env.digests(a).await?;
    assert_eq!(of_a.len(), 2);
    assert_eq!(of_a[1].1, vec!["sent".to_string()]);
    assert_eq!(env.notifier.deliveries().len(), 3);
    env.assert_ledger_balanced().await
}
