//! The processes `cargo xtask dev` runs (the exchange simulator, the ledgerflow roles), their
//! start-up in order, and their shutdown (SIGTERM, then SIGKILL after a grace period).
use super::*;

/// The processes this run started, stopped in order by [`Services::stop`]
/// (and killed by `Drop` if an error skipped that).
pub(super) struct Services {
    pub(super) logs: PathBuf,
    /// Whether this run started a child, i.e. wrote the logs.
    pub(super) started: bool,
    pub(super) ledgerflow: Option<Child>,
    pub(super) simulator: Option<Child>,
    pub(super) kafka: Option<crate::apache_kafka::Node>,
}

impl Services {
    pub(super) fn new(logs: PathBuf) -> Self {
        Services {
            logs,
            started: false,
            ledgerflow: None,
            simulator: None,
            kafka: None,
        }
    }

    pub(super) fn log_file(&self, name: &str) -> Result<File> {
        std::fs::create_dir_all(&self.logs)
            .with_context(|| format!("creating {}", self.logs.display()))?;
        let path = self.logs.join(format!("{name}.log"));
        File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    /// Starts `exchange-sim` and returns the address it printed once bound.
    pub(super) fn start_simulator(
        &mut self,
        bin: &Path,
        listen: &str,
        webhook_url: &str,
        secret: &str,
    ) -> Result<String> {
        let log = self.log_file("exchange-sim")?;
        self.started = true;
        let mut child = Command::new(bin)
            .args([
                "--listen",
                listen,
                "--webhook-url",
                webhook_url,
                "--scheme",
                "stripe",
            ])
            // Through the environment, never argv: `ps` shows arguments.
            .env("EXCHANGE_SIM_WEBHOOK_SECRET", secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("exchange-sim stdout")?;
        self.simulator = Some(child);
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        // Returns at the first line, or at EOF if the simulator exits.
        reader.read_line(&mut first)?;
        let addr = first.trim().to_string();
        if addr.is_empty() {
            bail!(
                "exchange-sim exited before listening on {listen}; see {}",
                self.logs.join("exchange-sim.log").display()
            );
        }
        // Keep draining its stdout into the log so it can never block on a full pipe.
        let mut log = log;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut log));
        Ok(addr)
    }

    pub(super) fn start_ledgerflow(&mut self, mut command: Command) -> Result<()> {
        let log = self.log_file("ledgerflow")?;
        self.started = true;
        println!("      logs: {}", self.logs.join("ledgerflow.log").display());
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting ledgerflow")?;
        self.ledgerflow = Some(child);
        Ok(())
    }

    /// Fails if a child exited on its own.
    pub(super) fn check_alive(&mut self) -> Result<()> {
        for (name, child) in [
            ("ledgerflow", &mut self.ledgerflow),
            ("exchange-sim", &mut self.simulator),
        ] {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                *child = None;
                bail!(
                    "{name} exited unexpectedly ({status}); see {}",
                    self.logs.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Waits until `http://{addr}/healthcheck` answers 200.
    pub(super) fn wait_healthy(&mut self, addr: &str, deadline: Option<Instant>) -> Result<()> {
        let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        loop {
            if let Ok(r) = http::request(addr, "GET", "/healthcheck", &[], None)
                && r.status == 200
            {
                return Ok(());
            }
            self.check_alive()?;
            interrupted()?;
            if Instant::now() > deadline {
                bail!("ledgerflow did not answer http://{addr}/healthcheck in time");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops every child in order and waits for each; fails if one did not
    /// exit cleanly.
    pub(super) fn stop(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        // The drain, plus time for the Kafka roles to close their clients.
        let grace = Duration::from_secs(GRACE_SECS + 25);
        for (name, child, within, must_succeed) in [
            ("ledgerflow", self.ledgerflow.take(), grace, true),
            (
                "exchange-sim",
                self.simulator.take(),
                Duration::from_secs(5),
                true,
            ),
        ] {
            let Some(mut child) = child else { continue };
            match terminate(&mut child, within) {
                Ok(status) if status.success() || !must_succeed => {}
                Ok(status) => problems.push(format!("{name} exited with {status}")),
                Err(e) => problems.push(format!("{name}: {e:#}")),
            }
        }
        // Last: the roles' Kafka clients close against it. SIGTERM, so that it
        // closes its log cleanly for the next run.
        if let Some(mut kafka) = self.kafka.take() {
            kafka.stop();
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(problems.join("; ")))
        }
    }

    pub(super) fn print_log_tails(&self) {
        if !self.started {
            return; // the logs there are an earlier run's
        }
        for name in ["ledgerflow", "exchange-sim"] {
            let path = self.logs.join(format!("{name}.log"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- last lines of {} ----", path.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        // The Kafka node kills its broker when it is dropped.
        for child in [&mut self.ledgerflow, &mut self.simulator]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM, then wait up to `within` (or until a second Ctrl-C), then SIGKILL.
pub(super) fn terminate(child: &mut Child, within: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    cmd::read(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline || SIGNALS.load(Ordering::SeqCst) > 1 {
            child.kill()?;
            child.wait()?;
            bail!("did not stop within {within:?} of SIGTERM: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
