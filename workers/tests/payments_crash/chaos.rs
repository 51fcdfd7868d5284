//! Randomized chaos: trades and withdrawals with exchange faults while workers are killed at
//! random; the books, the exchange and the notifications agree afterwards.
use super::*;

/// SplitMix64: a tiny, seedable generator (no dependency needed).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        &items[i]
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

pub(crate) fn seed() -> u64 {
    match std::env::var("LF_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => seed,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(42),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Trade,
    Withdrawal,
}

/// Starts a random trade or withdrawal for a random user, with a random
/// exchange fault set for its idempotency key. The start commits only after
/// the fault is in place, so a live worker can't make the call first.
pub(crate) async fn start_random(
    rig: &Rig,
    rng: &mut Rng,
    users: &[UserId],
    flows: &mut Vec<(Uuid, Kind, &'static str)>,
    faults: &mut BTreeMap<&'static str, u32>,
) -> TestResult {
    let user = *rng.pick(users);
    let roll = rng.below(100);
    let (kind, input) = if roll < 65 {
        let (side, amount, price) = if roll < 45 {
            (
                "buy",
                *rng.pick(&["0.5", "1", "2", "3"]),
                *rng.pick(&["50", "100", "150"]),
            )
        } else {
            (
                "sell",
                *rng.pick(&["0.5", "1", "1.5"]),
                *rng.pick(&["80", "120"]),
            )
        };
        let input = json!({ "user_id": user, "side": side, "base": "BTC", "quote": "USDT",
                            "base_amount": amount, "limit_price": price });
        (Kind::Trade, input)
    } else {
        let amount = *rng.pick(&["0.2", "0.7", "1.2", "2"]);
        let input = json!({ "user_id": user, "asset": "BTC", "amount": amount,
                            "address": "bc1q5l69k094s5qgfay7jpzf5dds375aalx7gdt6p4" });
        (Kind::Withdrawal, input)
    };
    let fault = match rng.below(100) {
        0..40 => None,
        40..55 => Some(("accept_then_timeout", Fault::AcceptThenTimeout)),
        55..70 => Some(("duplicate_fill", Fault::DuplicateFill)),
        70..85 => Some(("late_fill", Fault::late_fill(rng.millis(200, 3000)))),
        _ => Some(("reject", Fault::reject("simulated rejection"))),
    };
    let mut tx = rig.db.pool.begin().await?;
    let (id, key) = match kind {
        Kind::Trade => {
            let id = workflow_start_in(
                &mut tx,
                &rig.store,
                &rig.registry,
                trade::KIND,
                &input,
                None,
            )
            .await?;
            (id, trade::order_key(id))
        }
        Kind::Withdrawal => {
            let id = workflow_start_in(
                &mut tx,
                &rig.store,
                &rig.registry,
                withdrawal::KIND,
                &input,
                None,
            )
            .await?;
            (id, withdrawal::submit_key(id))
        }
    };
    let label = match fault {
        Some((label, fault)) => {
            rig.controls.set_fault_for(&key, fault).await?;
            label
        }
        None => "none",
    };
    tx.commit().await?;
    *faults.entry(label).or_default() += 1;
    flows.push((id, kind, label));
    Ok(())
}

/// One parent-side iteration of the chaos: deliver what the exchange has
/// due (losing one webhook in ten: the fill timeout and the confirmation
/// poll must find out from the exchange), approve some withdrawals, and
/// check no balance is negative. Returns how many events were lost.
pub(crate) async fn chaos_tick(rig: &Rig, rng: &mut Rng, approve_all: bool) -> TestResult<u32> {
    let mut lost = 0;
    for event in rig.due_events(rng.millis(50, 400)).await? {
        if rng.chance(10) {
            lost += 1;
            continue;
        }
        rig.deliver(&event).await?;
    }
    for id in rig.approvable().await? {
        if approve_all || rng.chance(40) {
            rig.approve(id).await?;
        }
    }
    assert_eq!(
        rig.negative_accounts().await?,
        0,
        "a balance is negative mid-run"
    );
    Ok(lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn randomized_trades_and_withdrawals_with_faults_and_kills_keep_the_books()
-> TestResult {
    let seed = seed();
    eprintln!("randomized payments crash test: seed = {seed} (replay with LF_SEED={seed})");
    let mut rng = Rng(seed);
    let mut rig = Rig::new(SimServerConfig {
        // Longer than the children's 2 s client timeout: an
        // accept-then-time-out answer is lost.
        hang_for: Duration::from_secs(4),
        ..SimServerConfig::default()
    })
    .await?;

    // Tight balances: most users can't afford everything they ask for.
    let mut users = Vec::new();
    for _ in 0..6 {
        users.push(rig.user_with(&[("USDT", "400"), ("BTC", "3")]).await?);
    }
    rig.waits = Some("4000,3000".to_string());
    let mut lost = 0;
    let total = 60 + rng.below(21); // 60..=80
    let mut flows: Vec<(Uuid, Kind, &'static str)> = Vec::new();
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    // Workflows start all along, with workers alive or dead, so that every
    // kill lands on work in flight.
    let kills = 4 + rng.below(3); // 4..=6
    for _ in 0..kills {
        rig.spawn()?;
        let life = rng.millis(400, 2500);
        let born = Instant::now();
        while born.elapsed() < life {
            rig.check_child()?;
            if (flows.len() as u64) < total && rng.chance(70) {
                start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
            }
            lost += chaos_tick(&rig, &mut rng, false).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        rig.kill()?;
        // Requests, events and approvals keep coming while no worker is alive.
        let down = rng.millis(0, 800);
        let died = Instant::now();
        while died.elapsed() < down {
            if (flows.len() as u64) < total && rng.chance(70) {
                start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
            }
            lost += chaos_tick(&rig, &mut rng, false).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    while (flows.len() as u64) < total {
        start_random(&rig, &mut rng, &users, &mut flows, &mut faults).await?;
    }

    // The last generation runs until nothing is left to do.
    rig.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut quiet = 0;
    while quiet < 3 {
        rig.check_child()?;
        lost += chaos_tick(&rig, &mut rng, true).await?;
        quiet = if rig.unsettled().await? == 0 {
            quiet + 1
        } else {
            0
        };
        if Instant::now() > deadline {
            let stuck: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT kind, state, current_step, wait_reason FROM workflows
                 WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
            )
            .fetch_all(&rig.db.pool)
            .await?;
            return Err(format!("seed {seed}: workflows never settled: {stuck:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.kill()?;

    // Every workflow is finished or waits for a named reason.
    let open: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT id, state, wait_reason FROM workflows
         WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')",
    )
    .fetch_all(&rig.db.pool)
    .await?;
    for (id, state, reason) in &open {
        let named = state == "waiting"
            && reason
                .as_deref()
                .is_some_and(|r| r.starts_with("in_doubt:") || r.starts_with("signal:"));
        assert!(named, "seed {seed}: workflow {id} is {state} ({reason:?})");
    }

    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    let mut settled_keys = HashSet::new();
    for (id, kind, fault) in &flows {
        let what = format!("seed {seed}: {kind:?} {id} (fault {fault})");
        let state = rig.state(*id).await?;
        *tally.entry(format!("{kind:?}:{state}")).or_default() += 1;
        if state == "failed" {
            // Only a business refusal may fail a workflow (no retries ran
            // out, no crash left it half done).
            let error = rig
                .text(
                    "SELECT coalesce(error, '') FROM workflows WHERE id = $1",
                    *id,
                )
                .await?;
            assert!(
                error.contains("insufficient funds") || error.contains("daily withdrawal limit"),
                "{what}: failed with {error:?}"
            );
        }
        let active_holds = rig
            .i64(
                "SELECT count(*) FROM holds
                 WHERE state = 'active' AND reference LIKE '%' || $1::text || '%'",
                *id,
            )
            .await?;
        if state != "waiting" {
            assert_eq!(
                active_holds, 0,
                "{what}: finished ({state}) with an active hold"
            );
        }
        match kind {
            Kind::Trade => {
                let key = trade::order_key(*id);
                let c = rig.counters(&key).await?;
                let placed = rig.step_status(*id, "place_order").await?;
                assert!(
                    c.place_calls <= 1,
                    "{what}: order sent {} times",
                    c.place_calls
                );
                assert_eq!(
                    c.orders_created,
                    // `compensated`: placed, then cancelled by the saga.
                    u64::from(matches!(
                        placed.as_deref(),
                        Some("completed" | "compensated")
                    )),
                    "{what}: orders at the exchange vs place_order {placed:?}"
                );
                let settled = rig.transfers(&trade::settle_reference(*id)).await?;
                assert_eq!(
                    settled,
                    i64::from(state == "completed"),
                    "{what}: settlements"
                );
                let status = rig
                    .text("SELECT status FROM trades WHERE id = $1", *id)
                    .await?;
                match state.as_str() {
                    "completed" => assert_eq!(status, "settled", "{what}"),
                    "compensated" => assert!(
                        status == "cancelled" || status == "rejected",
                        "{what}: {status}"
                    ),
                    "failed" => assert_eq!(status, "rejected", "{what}"),
                    _ => {}
                }
                if state == "completed" {
                    settled_keys.insert(format!("trade:{id}:settled"));
                }
                // The books agree with the exchange: a settled trade's order
                // filled there, an undone trade's order (if any) is cancelled,
                // and the key of an order the exchange rejected answers that.
                let order = match rig.exchange.get_order_by_key(&key).await {
                    Ok(order) => order,
                    Err(ledgerflow_payments::exchange::Error::Rejected(_))
                        if status == "rejected" =>
                    {
                        None
                    }
                    Err(e) => return Err(e.into()),
                };
                let expected = match state.as_str() {
                    "completed" => Some(OrderState::Filled),
                    _ if c.orders_created == 1 => Some(OrderState::Cancelled),
                    _ => None,
                };
                assert_eq!(
                    order.map(|o| o.state),
                    expected,
                    "{what}: order at the exchange"
                );
            }
            Kind::Withdrawal => {
                let key = withdrawal::submit_key(*id);
                let c = rig.counters(&key).await?;
                let submitted = rig.step_status(*id, "submit").await?;
                assert!(
                    c.withdrawal_calls <= 1,
                    "{what}: withdrawal sent {} times",
                    c.withdrawal_calls
                );
                assert_eq!(
                    c.withdrawals_created,
                    u64::from(matches!(
                        submitted.as_deref(),
                        Some("completed" | "compensated")
                    )),
                    "{what}: withdrawals at the exchange vs submit {submitted:?}"
                );
                let captured = rig.transfers(&withdrawal::capture_reference(*id)).await?;
                assert_eq!(
                    captured,
                    i64::from(state == "completed"),
                    "{what}: captures"
                );
                if state == "completed" {
                    settled_keys.insert(format!("withdrawal:{id}:completed"));
                    let at_exchange = rig.exchange.get_withdrawal_by_key(&key).await?;
                    assert_eq!(
                        at_exchange.map(|w| w.state),
                        Some(WithdrawalState::Confirmed),
                        "{what}: withdrawal at the exchange"
                    );
                }
            }
        }
    }
    // One notification per completed trade or withdrawal, each sent once.
    let sent: Vec<String> =
        sqlx::query_scalar("SELECT id FROM notifications WHERE status = 'sent' ORDER BY id")
            .fetch_all(&rig.db.pool)
            .await?;
    let sent: HashSet<String> = sent.into_iter().collect();
    assert_eq!(sent, settled_keys, "seed {seed}: notifications");
    rig.assert_books().await?;
    let completed = tally
        .iter()
        .filter(|(k, _)| k.ends_with(":completed"))
        .map(|(_, n)| *n)
        .sum::<u32>();
    assert!(completed > 0, "seed {seed}: nothing completed: {tally:?}");
    let rescued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_attempts WHERE outcome = 'lease_expired'")
            .fetch_one(&rig.db.pool)
            .await?;
    let reconciled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workflow_steps WHERE resolved_by = 'reconcile'")
            .fetch_one(&rig.db.pool)
            .await?;
    eprintln!(
        "seed {seed}: {} workflows, {kills} kills ({rescued} attempts rescued from dead \
         workers, {reconciled} in-doubt calls reconciled, {lost} webhooks lost), faults {faults:?}, \
         outcomes {tally:?}",
        flows.len(),
    );
    rig.stop().await
}
