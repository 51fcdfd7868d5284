//! kill -9 at every step boundary of every flow, then a restart: money moves once.
use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Flow {
    /// Buy 0.5 BTC at 100 USDT with 1000 USDT.
    Trade,
    /// 1.5 BTC of 5: above the threshold, needs the second admin.
    BigWithdrawal,
    /// 0.5 BTC of 2: no approval.
    SmallWithdrawal,
}

impl Flow {
    pub(crate) fn steps(self) -> &'static [&'static str; 6] {
        match self {
            Flow::Trade => &TRADE_STEPS,
            Flow::BigWithdrawal | Flow::SmallWithdrawal => &WITHDRAWAL_STEPS,
        }
    }

    /// The step that calls the exchange.
    pub(crate) fn call_step(self) -> &'static str {
        match self {
            Flow::Trade => "place_order",
            Flow::BigWithdrawal | Flow::SmallWithdrawal => "submit",
        }
    }
}

/// One workflow, stopped at one boundary.
pub(crate) struct Case {
    pub(crate) flow: Flow,
    pub(crate) point: &'static str,
    /// The second admin approves before the kill (the point lies past the
    /// approval); otherwise the approval comes while no worker is alive.
    pub(crate) approve: bool,
    /// The exchange's fill/confirmation is delivered before the kill (the
    /// point lies past its wait); otherwise it is held back until then, so
    /// that the workflow really waits at a `waiting:` point.
    pub(crate) events: bool,
    /// The saga undoes the workflow: its call was rejected; the hold is
    /// released. (A call never sent is sent again, not undone.)
    pub(crate) compensated: bool,
    /// Set at the exchange for the call's key before the first worker runs.
    pub(crate) fault: Option<Fault>,
}

pub(crate) fn case(flow: Flow, point: &'static str) -> Case {
    Case {
        flow,
        point,
        approve: false,
        events: false,
        compensated: false,
        fault: None,
    }
}

impl Case {
    pub(crate) fn approve(mut self) -> Self {
        self.approve = true;
        self
    }

    pub(crate) fn events(mut self) -> Self {
        self.events = true;
        self
    }

    pub(crate) fn compensated(mut self) -> Self {
        self.compensated = true;
        self
    }

    pub(crate) fn fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    pub(crate) fn rejected(&self) -> bool {
        matches!(self.fault, Some(Fault::Reject { .. }))
    }

    /// `(calls, created)` at the exchange once the workflow finished.
    pub(crate) fn calls_at_end(&self) -> (u64, u64) {
        match (self.compensated, self.rejected()) {
            (false, _) => (1, 1),
            (true, true) => (1, 0),
            (true, false) => (0, 0),
        }
    }
}

pub(crate) fn cases() -> Vec<Case> {
    use Flow::{BigWithdrawal as Big, SmallWithdrawal as Small, Trade};
    vec![
        case(Trade, "before:validate"),
        case(Trade, "after:validate"),
        case(Trade, "after:hold"),
        // Killed after the intent, before the call: the exchange never got
        // it, so it is placed again under the same key — the crash changes
        // nothing for the user.
        case(Trade, "hang_before:place_order"),
        case(Trade, "hang_after:place_order"),
        case(Trade, "answered:place_order"),
        case(Trade, "after:place_order"),
        case(Trade, "waiting:await_fill"),
        case(Trade, "after:await_fill").events(),
        case(Trade, "after:settle").events(),
        case(Trade, "after:notify").events(),
        case(Trade, "reconcile:place_order").fault(Fault::AcceptThenTimeout),
        case(Trade, "compensate:hold")
            .fault(Fault::reject("no liquidity"))
            .compensated(),
        case(Big, "before:validate"),
        case(Big, "after:validate"),
        case(Big, "after:hold"),
        case(Big, "waiting:await_approval"),
        case(Big, "after:await_approval").approve(),
        case(Big, "hang_before:submit").approve(),
        case(Big, "hang_after:submit").approve(),
        case(Big, "answered:submit").approve(),
        case(Big, "after:submit").approve(),
        case(Big, "waiting:await_confirmation").approve(),
        case(Big, "after:await_confirmation").approve().events(),
        case(Big, "after:finalize").approve().events(),
        case(Small, "after:await_approval"),
        case(Small, "hang_after:submit"),
        case(Small, "after:finalize").events(),
        case(Small, "reconcile:submit").fault(Fault::AcceptThenTimeout),
        case(Small, "compensate:hold")
            .fault(Fault::reject("address blocked"))
            .compensated(),
    ]
}

/// The steps journaled `completed` when the workflow sits at `point`.
pub(crate) fn completed_at(flow: Flow, point: &Point) -> Vec<String> {
    let steps = flow.steps();
    let (step, inclusive) = match point {
        Point::After(s) => (s, true),
        Point::Before(s)
        | Point::Waiting(s)
        | Point::HangBefore(s)
        | Point::HangAfter(s)
        | Point::Answered(s)
        | Point::Reconcile(s) => (s, false),
        // The saga starts once the call failed: everything before it is done.
        Point::Compensate(_) => (&flow.call_step().to_string(), false),
    };
    let at = steps.iter().position(|s| s == step).unwrap_or(steps.len());
    let end = if inclusive { at + 1 } else { at };
    steps[..end.min(steps.len())]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn kill_9_at_every_step_boundary_then_restart_moves_money_once() -> TestResult {
    let mut rig = Rig::new(SimServerConfig::default()).await?;
    let cases = cases();
    struct Started<'a> {
        case: &'a Case,
        id: Uuid,
        user: UserId,
        point: Point,
    }
    let mut started = Vec::new();
    for case in &cases {
        let (user, id) = match case.flow {
            Flow::Trade => {
                let user = rig.user_with(&[("USDT", "1000")]).await?;
                (user, rig.start_trade(user, "buy", "0.5", "100").await?)
            }
            Flow::BigWithdrawal => {
                let user = rig.user_with(&[("BTC", "5")]).await?;
                (user, rig.start_withdrawal(user, "1.5").await?)
            }
            Flow::SmallWithdrawal => {
                let user = rig.user_with(&[("BTC", "2")]).await?;
                (user, rig.start_withdrawal(user, "0.5").await?)
            }
        };
        if let Some(fault) = &case.fault {
            let key = match case.flow {
                Flow::Trade => trade::order_key(id),
                _ => withdrawal::submit_key(id),
            };
            rig.controls.set_fault_for(&key, fault.clone()).await?;
        }
        sqlx::query("INSERT INTO crash_plan (workflow_id, point) VALUES ($1, $2)")
            .bind(id)
            .bind(case.point)
            .execute(&rig.db.pool)
            .await?;
        let point = Point::parse(case.point).ok_or("a valid point")?;
        started.push(Started {
            case,
            id,
            user,
            point,
        });
    }
    let by_id: HashMap<Uuid, &Started> = started.iter().map(|s| (s.id, s)).collect();

    // Generation 1 runs every workflow to its point. Events and approvals
    // go through only for workflows whose point lies past them.
    rig.spawn()?;
    let mut held_back: Vec<Event> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        rig.check_child()?;
        for event in rig.due_events(Duration::from_millis(1)).await? {
            let owner = event
                .idempotency_key
                .as_str()
                .split_once(':')
                .and_then(|(id, _)| id.parse::<Uuid>().ok());
            match owner.and_then(|id| by_id.get(&id)) {
                Some(s) if s.case.events => rig.deliver(&event).await?,
                _ => held_back.push(event),
            }
        }
        for id in rig.approvable().await? {
            if by_id.get(&id).is_some_and(|s| s.case.approve) {
                rig.approve(id).await?;
            }
        }
        let paused: i64 = sqlx::query_scalar("SELECT count(*) FROM crash_paused")
            .fetch_one(&rig.db.pool)
            .await?;
        if paused == i64::try_from(cases.len())? {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = sqlx::query_scalar(
                "SELECT point FROM crash_plan p
                 WHERE NOT EXISTS (SELECT 1 FROM crash_paused c WHERE c.workflow_id = p.workflow_id)",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("never paused at: {missing:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.kill()?; // SIGKILL, every workflow at its boundary

    // The journal is exactly at each planned boundary.
    for s in &started {
        let completed: Vec<String> = sqlx::query_scalar(
            "SELECT step FROM workflow_steps
             WHERE workflow_id = $1 AND status = 'completed' ORDER BY position",
        )
        .bind(s.id)
        .fetch_all(&rig.db.pool)
        .await?;
        assert_eq!(
            completed,
            completed_at(s.case.flow, &s.point),
            "{:?} {}: journal at the crash",
            s.case.flow,
            s.case.point
        );
        let state = rig.state(s.id).await?;
        match &s.point {
            Point::Waiting(step) => {
                let reason = rig
                    .text("SELECT wait_reason FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(state, "waiting", "{}", s.case.point);
                assert!(reason.starts_with("signal:"), "{}: {reason}", s.case.point);
                assert_eq!(
                    rig.text("SELECT current_step FROM workflows WHERE id = $1", s.id)
                        .await?,
                    *step
                );
            }
            Point::HangBefore(step) | Point::HangAfter(step) => {
                let call: (String, Option<String>) = sqlx::query_as(
                    "SELECT status, call_state FROM workflow_steps
                     WHERE workflow_id = $1 AND step = $2",
                )
                .bind(s.id)
                .bind(step)
                .fetch_one(&rig.db.pool)
                .await?;
                assert_eq!(
                    call,
                    ("calling".to_string(), Some("calling".to_string())),
                    "{}: only the call's intent is committed",
                    s.case.point
                );
            }
            Point::Answered(step) => {
                let call: (String, Option<String>) = sqlx::query_as(
                    "SELECT status, call_state FROM workflow_steps
                     WHERE workflow_id = $1 AND step = $2",
                )
                .bind(s.id)
                .bind(step)
                .fetch_one(&rig.db.pool)
                .await?;
                assert_eq!(
                    call,
                    ("calling".to_string(), Some("answered".to_string())),
                    "{}: the answer is recorded, the checkpoint is not",
                    s.case.point
                );
            }
            Point::After(step) if step == "notify" || step == "finalize" => {
                assert_eq!(state, "completed", "{}", s.case.point);
            }
            Point::Before(_) | Point::After(_) => {
                assert_eq!(state, "running", "{}", s.case.point);
            }
            Point::Reconcile(step) => {
                let reason = rig
                    .text("SELECT wait_reason FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    (state.as_str(), reason),
                    ("waiting", format!("in_doubt:{step}")),
                    "{}",
                    s.case.point
                );
            }
            Point::Compensate(step) => {
                let at = rig
                    .text("SELECT current_step FROM workflows WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    (state.as_str(), at.as_str()),
                    ("compensating", step.as_str()),
                    "{}",
                    s.case.point
                );
            }
        }
        // What the exchange saw at the crash.
        let (key, sent) = match s.case.flow {
            Flow::Trade => {
                let c = rig.counters(&trade::order_key(s.id)).await?;
                (trade::order_key(s.id), (c.place_calls, c.orders_created))
            }
            _ => {
                let c = rig.counters(&withdrawal::submit_key(s.id)).await?;
                (
                    withdrawal::submit_key(s.id),
                    (c.withdrawal_calls, c.withdrawals_created),
                )
            }
        };
        let past_call = completed_at(s.case.flow, &s.point)
            .iter()
            .any(|st| st == s.case.flow.call_step())
            || matches!(
                &s.point,
                Point::HangAfter(_) | Point::Answered(_) | Point::Reconcile(_)
            );
        let expected = if s.case.rejected() {
            (1, 0)
        } else if past_call {
            (1, 1)
        } else {
            (0, 0)
        };
        assert_eq!(
            sent, expected,
            "{} at the crash: calls/created for {key}",
            s.case.point
        );
    }
    let dead_leases: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner = 'paycrash-g1'",
    )
    .fetch_one(&rig.db.pool)
    .await?;
    assert!(
        dead_leases >= 2,
        "the dead worker holds leases of claimed jobs ({dead_leases})"
    );

    // While no worker is alive, the held-back events and approvals arrive:
    // they are kept for their waiters.
    for event in std::mem::take(&mut held_back) {
        rig.deliver(&event).await?;
    }
    for id in rig.approvable().await? {
        rig.approve(id).await?;
    }

    // Generation 2: no plan. Everything finishes.
    sqlx::query("DELETE FROM crash_plan")
        .execute(&rig.db.pool)
        .await?;
    rig.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        rig.check_child()?;
        for event in rig.due_events(Duration::from_millis(1)).await? {
            rig.deliver(&event).await?;
        }
        for id in rig.approvable().await? {
            rig.approve(id).await?;
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM workflows
             WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
        )
        .fetch_one(&rig.db.pool)
        .await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            let stuck: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT kind, state, wait_reason FROM workflows
                 WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("workflows never finished: {stuck:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.kill()?;

    for s in &started {
        let what = format!("{:?} killed at {}", s.case.flow, s.case.point);
        let state = rig.state(s.id).await?;
        let done = !s.case.compensated;
        // A rejected call keeps its row `rejected`; an undone one is `cancelled`.
        let undone = if s.case.rejected() {
            "rejected"
        } else {
            "cancelled"
        };
        assert_eq!(
            state,
            if done { "completed" } else { "compensated" },
            "{what}"
        );
        match s.case.flow {
            Flow::Trade => {
                let c = rig.counters(&trade::order_key(s.id)).await?;
                assert_eq!(
                    (c.place_calls, c.orders_created),
                    s.case.calls_at_end(),
                    "{what}: one order, never re-sent"
                );
                assert_eq!(
                    rig.transfers(&trade::settle_reference(s.id)).await?,
                    i64::from(done),
                    "{what}: settlement transfers"
                );
                let status = rig
                    .text("SELECT status FROM trades WHERE id = $1", s.id)
                    .await?;
                assert_eq!(status, if done { "settled" } else { undone }, "{what}");
                let error = rig
                    .text("SELECT coalesce(error, '') FROM trades WHERE id = $1", s.id)
                    .await?;
                assert_eq!(
                    error.is_empty(),
                    done,
                    "{what}: the reason it ended: {error:?}"
                );
                let (usdt, btc) = if done {
                    (("949.95", "0"), ("0.5", "0"))
                } else {
                    (("1000", "0"), ("0", "0"))
                };
                let pair = |(a, b): (&str, &str)| (a.to_string(), b.to_string());
                assert_eq!(rig.balance(s.user, "USDT").await?, pair(usdt), "{what}");
                assert_eq!(rig.balance(s.user, "BTC").await?, pair(btc), "{what}");
                let notified = rig
                    .i64(
                        "SELECT count(*) FROM notifications
                         WHERE id = 'trade:' || $1::text || ':settled' AND status = 'sent'",
                        s.id,
                    )
                    .await?;
                assert_eq!(notified, i64::from(done), "{what}: notification");
            }
            Flow::BigWithdrawal | Flow::SmallWithdrawal => {
                let c = rig.counters(&withdrawal::submit_key(s.id)).await?;
                assert_eq!(
                    (c.withdrawal_calls, c.withdrawals_created),
                    s.case.calls_at_end(),
                    "{what}: one withdrawal, never re-sent"
                );
                assert_eq!(
                    rig.transfers(&withdrawal::capture_reference(s.id)).await?,
                    i64::from(done),
                    "{what}: capture transfers"
                );
                let status = rig
                    .text("SELECT status FROM withdrawals WHERE id = $1", s.id)
                    .await?;
                assert_eq!(status, if done { "completed" } else { undone }, "{what}");
                let error = rig
                    .text(
                        "SELECT coalesce(error, '') FROM withdrawals WHERE id = $1",
                        s.id,
                    )
                    .await?;
                assert_eq!(
                    error.is_empty(),
                    done,
                    "{what}: the reason it ended: {error:?}"
                );
                let btc = match (s.case.flow, done) {
                    (Flow::BigWithdrawal, true) => "3.5",
                    (Flow::BigWithdrawal, false) => "5",
                    (_, true) => "1.5",
                    (_, false) => "2",
                };
                assert_eq!(
                    rig.balance(s.user, "BTC").await?,
                    (btc.to_string(), "0".to_string()),
                    "{what}"
                );
                let notified = rig
                    .i64(
                        "SELECT count(*) FROM notifications
                         WHERE id = 'withdrawal:' || $1::text || ':completed' AND status = 'sent'",
                        s.id,
                    )
                    .await?;
                assert_eq!(notified, i64::from(done), "{what}: notification");
            }
        }
        if let Point::HangBefore(step) | Point::HangAfter(step) | Point::Reconcile(step) = &s.point
        {
            // The crash between intent and answer (or during the reconcile)
            // was settled by the reconcile query, never by sending again.
            let resolved: Option<String> = sqlx::query_scalar(
                "SELECT resolved_by FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
            )
            .bind(s.id)
            .bind(step)
            .fetch_one(&rig.db.pool)
            .await?;
            assert_eq!(resolved.as_deref(), Some("reconcile"), "{what}");
            let status = rig.step_status(s.id, step).await?;
            let expected = if done { "completed" } else { "failed" };
            assert_eq!(status.as_deref(), Some(expected), "{what}");
        }
        if let Point::Answered(step) = &s.point {
            // The recorded answer was reused: no reconcile, no second call.
            let row: (String, Option<String>) = sqlx::query_as(
                "SELECT status, resolved_by FROM workflow_steps
                 WHERE workflow_id = $1 AND step = $2",
            )
            .bind(s.id)
            .bind(step)
            .fetch_one(&rig.db.pool)
            .await?;
            assert_eq!(row, ("completed".to_string(), None), "{what}");
        }
    }
    // The dead worker's claimed jobs were rescued, not lost.
    let expired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired' AND worker = 'paycrash-g1'",
    )
    .fetch_one(&rig.db.pool)
    .await?;
    assert!(
        expired >= 2,
        "rescued attempts of the killed worker: {expired}"
    );
    rig.assert_books().await?;
    rig.stop().await
}
