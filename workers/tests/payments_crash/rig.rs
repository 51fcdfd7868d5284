//! The parent's rig: the database, the simulated exchange over HTTP, the child worker
//! processes it starts and kills, and the reads the checks use.
use super::*;

/// The parent's side: database, simulator, and the current child.
pub(crate) struct Rig {
    pub(crate) db: TestDb,
    pub(crate) sim: Option<RunningSimulator>,
    pub(crate) sim_url: String,
    pub(crate) controls: HttpSimControls,
    /// The parent's own client, to ask the exchange what it holds.
    pub(crate) exchange: HttpExchange,
    pub(crate) store: Store,
    pub(crate) registry: WorkflowRegistry,
    pub(crate) approver: Admin,
    pub(crate) child: Option<Child>,
    pub(crate) generation: u32,
    /// `LF_PAYCRASH_WAITS_MS` for the children, if set.
    pub(crate) waits: Option<String>,
}

impl Rig {
    pub(crate) async fn new(sim_config: SimServerConfig) -> TestResult<Rig> {
        let db = TestDb::with_pool_size(10).await?;
        for sql in [
            "CREATE TABLE crash_plan (workflow_id uuid PRIMARY KEY, point text NOT NULL)",
            "CREATE TABLE crash_paused (workflow_id uuid PRIMARY KEY)",
        ] {
            sqlx::query(sql).execute(&db.pool).await?;
        }
        let sim = RunningSimulator::start(sim_config).await?;
        let controls = HttpSimControls::new(&sim.base_url(), None)?;
        let exchange = HttpExchange::new(&sim.base_url(), HttpConfig::default())?;
        let store = store(&db.pool);
        let registry = workflows::registry(Deps {
            exchange: Arc::new(HttpExchange::new(&sim.base_url(), HttpConfig::default())?),
            notifier: Arc::new(SimulatedNotifier::new()),
            config: workflows_config()?,
        })?;
        let mut conn = db.pool.acquire().await?;
        let (id, _) = users::create_admin(&mut conn, "second-eyes", AdminRole::Approver).await?;
        drop(conn);
        Ok(Rig {
            db,
            sim_url: sim.base_url(),
            sim: Some(sim),
            controls,
            exchange,
            store,
            registry,
            approver: Admin {
                id,
                name: "second-eyes".to_string(),
                role: AdminRole::Approver,
            },
            child: None,
            generation: 0,
            waits: None,
        })
    }

    pub(crate) fn worker_id(&self) -> String {
        format!("paycrash-g{}", self.generation)
    }

    /// Starts a new child worker process (a new generation).
    pub(crate) fn spawn(&mut self) -> TestResult {
        self.generation += 1;
        let stderr = if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let mut command = Command::new(std::env::current_exe()?);
        if let Some(waits) = &self.waits {
            command.env(CHILD_WAITS, waits);
        }
        let child = command
            .args([
                "payments_crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &self.db.url)
            .env(CHILD_SIM, &self.sim_url)
            .env(CHILD_WORKER, self.worker_id())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the current child and reaps it.
    pub(crate) fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Fails if the current child exited on its own.
    pub(crate) fn check_child(&mut self) -> TestResult {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            return Err(format!("child worker {} exited: {status}", self.worker_id()).into());
        }
        Ok(())
    }

    /// A user with the given deposits (asset, amount).
    pub(crate) async fn user_with(&self, deposits: &[(&str, &str)]) -> TestResult<UserId> {
        let mut conn = self.db.pool.acquire().await?;
        let email = format!("u{}@example.com", Uuid::now_v7().simple());
        let user = users::create_user(&mut conn, &email, "Crash Test").await?;
        for (asset, amount) in deposits {
            let accounts = ledger::ensure_user_accounts(&mut conn, user, &[asset]).await?;
            let scale = ledger::asset(&mut conn, asset)
                .await?
                .ok_or("a seeded asset")?
                .scale;
            ledger::deposit(
                &mut conn,
                &format!("deposit:{user}:{asset}"),
                accounts[0].1,
                Amount::parse(amount, scale)?,
            )
            .await?;
        }
        Ok(user)
    }

    /// Starts a workflow of `kind` in its own statement.
    pub(crate) async fn start(
        &self,
        kind: &str,
        input: &serde_json::Value,
    ) -> ledgerflow_engine::Result<Uuid> {
        let mut conn = self.store.pool().acquire().await?;
        workflow_start_in(&mut conn, &self.store, &self.registry, kind, input, None).await
    }

    pub(crate) async fn start_trade(
        &self,
        user: UserId,
        side: &str,
        amount: &str,
        price: &str,
    ) -> TestResult<Uuid> {
        let input = json!({ "user_id": user, "side": side, "base": "BTC", "quote": "USDT",
                            "base_amount": amount, "limit_price": price });
        Ok(self.start(trade::KIND, &input).await?)
    }

    pub(crate) async fn start_withdrawal(&self, user: UserId, amount: &str) -> TestResult<Uuid> {
        let input = json!({ "user_id": user, "asset": "BTC", "amount": amount,
                            "address": "bc1q5l69k094s5qgfay7jpzf5dds375aalx7gdt6p4" });
        Ok(self.start(withdrawal::KIND, &input).await?)
    }

    /// Hands `event` to the webhook-processing workflow, as the intake does.
    pub(crate) async fn deliver(&self, event: &Event) -> TestResult {
        let mut tx = self.db.pool.begin().await?;
        webhook::start_in(&mut tx, &self.store, &self.registry, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves the simulator's clock and returns the events now due.
    pub(crate) async fn due_events(&self, by: Duration) -> TestResult<Vec<Event>> {
        Ok(self.controls.advance(by).await?)
    }

    /// Withdrawals that wait for (or may already get) their approval.
    pub(crate) async fn approvable(&self) -> TestResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM withdrawals
             WHERE requires_approval AND approved_by IS NULL
               AND status IN ('validated', 'held', 'awaiting_approval')
             ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// The second admin approves withdrawal `id`.
    /// A worker may refuse the withdrawal (funds, limit) between our read
    /// and the approval: then the approval is refused too, and changes
    /// nothing.
    pub(crate) async fn approve(&self, id: Uuid) -> TestResult {
        let mut tx = self.db.pool.begin().await?;
        match withdrawal::approve_in(&mut tx, &self.store, &self.approver, id, "crash test").await {
            Ok(_) => tx.commit().await?,
            Err(ledgerflow_payments::Error::Invalid(reason))
                if reason.contains("is rejected; it cannot be approved") =>
            {
                tx.rollback().await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    pub(crate) async fn counters(&self, key: &IdempotencyKey) -> TestResult<KeyCounters> {
        Ok(self.controls.counters_for(key).await?)
    }

    pub(crate) async fn i64(&self, sql: &str, id: Uuid) -> TestResult<i64> {
        Ok(sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    pub(crate) async fn text(&self, sql: &str, id: Uuid) -> TestResult<String> {
        Ok(sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.db.pool)
            .await?)
    }

    pub(crate) async fn transfers(&self, reference: &str) -> TestResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM ledger_transfers WHERE reference = $1")
                .bind(reference)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    /// `(balance, held)` of `user`'s `asset`, normalized ("949.95", "0").
    pub(crate) async fn balance(&self, user: UserId, asset: &str) -> TestResult<(String, String)> {
        let mut conn = self.db.pool.acquire().await?;
        let b = ledger::balances(&mut conn, user).await?;
        Ok(b.iter()
            .find(|b| b.asset == asset)
            .map(|b| {
                (
                    b.balance.normalize().to_string(),
                    b.held.normalize().to_string(),
                )
            })
            .unwrap_or_else(|| ("0".to_string(), "0".to_string())))
    }

    /// Accounts that may not go negative and are (balance, held or
    /// available): must always be none.
    pub(crate) async fn negative_accounts(&self) -> TestResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM account_balances
             WHERE NOT allow_negative AND (balance < 0 OR held < 0 OR balance - held < 0)",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    /// Double entry holds, balances match postings and holds, nothing is
    /// negative, and the SQL constraint that forbids it is in force.
    pub(crate) async fn assert_books(&self) -> TestResult {
        let mut conn = self.db.pool.acquire().await?;
        let sums = ledger::ledger_sums(&mut conn).await?;
        assert!(!sums.is_empty(), "the run posted something");
        for (asset, sum) in sums {
            assert!(sum.is_zero(), "postings of {asset} sum to {sum}");
        }
        let drift = ledger::balance_drift(&mut conn).await?;
        assert!(
            drift.is_empty(),
            "balances drifted from postings: {drift:?}"
        );
        drop(conn);
        assert_eq!(
            self.negative_accounts().await?,
            0,
            "a balance went negative"
        );
        let enforced: bool = sqlx::query_scalar(
            "SELECT convalidated FROM pg_constraint
             WHERE conname = 'account_balances_available_nonnegative'
               AND conrelid = 'account_balances'::regclass",
        )
        .fetch_one(&self.db.pool)
        .await?;
        assert!(enforced, "the non-negative balance constraint is validated");
        Ok(())
    }

    /// Workflows that are neither finished nor waiting for an admin's
    /// in-doubt decision.
    pub(crate) async fn unsettled(&self) -> TestResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM workflows
             WHERE state NOT IN ('completed', 'compensated', 'failed', 'cancelled')
               AND NOT (state = 'waiting' AND wait_reason LIKE 'in\\_doubt:%')",
        )
        .fetch_one(&self.db.pool)
        .await?)
    }

    pub(crate) async fn state(&self, id: Uuid) -> TestResult<String> {
        self.text("SELECT state FROM workflows WHERE id = $1", id)
            .await
    }

    pub(crate) async fn step_status(&self, id: Uuid, step: &str) -> TestResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT status FROM workflow_steps WHERE workflow_id = $1 AND step = $2",
        )
        .bind(id)
        .bind(step)
        .fetch_optional(&self.db.pool)
        .await?)
    }

    pub(crate) async fn stop(mut self) -> TestResult {
        self.kill()?;
        if let Some(sim) = self.sim.take() {
            sim.stop().await?;
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // A failed assertion must not leave a worker process behind.
        let _ = self.kill();
    }
}
