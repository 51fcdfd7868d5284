//! A `ledgerflow run --roles …` child process of an end-to-end test: spawned
//! with its environment, logging to a file, killed with SIGKILL and
//! restarted under the same configuration; exits nobody asked for are
//! remembered (a process must survive what the test does to its
//! dependencies).
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One `ledgerflow run --roles …` process, restarted under the same
/// configuration after every kill.
pub struct Proc {
    pub name: &'static str,
    pub roles: &'static str,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub starts: u32,
    pub kills: u32,
    /// Exits nobody asked for (status, generation).
    pub unexpected: Vec<String>,
}

impl Proc {
    /// A process not started yet, logging to `log` (emptied now).
    pub fn new(
        name: &'static str,
        roles: &'static str,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> TestResult<Proc> {
        std::fs::write(&log, "")?;
        Ok(Proc {
            name,
            roles,
            env,
            log,
            child: None,
            starts: 0,
            kills: 0,
            unexpected: Vec::new(),
        })
    }

    pub fn spawn(&mut self) -> TestResult {
        self.starts += 1;
        let log = File::options().create(true).append(true).open(&self.log)?;
        use std::io::Write;
        writeln!(&log, "===== {} generation {} =====", self.name, self.starts)?;
        let child = Command::new(env!("CARGO_BIN_EXE_ledgerflow"))
            .args(["run", "--roles", self.roles])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
            self.kills += 1;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for the drain (SIGKILL after it).
    pub fn stop(&mut self, grace: std::time::Duration) -> TestResult {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let deadline = std::time::Instant::now() + grace;
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Err(
                    format!("{} did not stop within {grace:?} of SIGTERM", self.name).into(),
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    /// Restarts the process if it exited on its own (and remembers that).
    pub fn check(&mut self) -> TestResult {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.unexpected
                .push(format!("generation {} exited: {status}", self.starts));
            self.child = None;
            self.spawn()?;
        }
        Ok(())
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
