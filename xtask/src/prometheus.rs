//! A real Prometheus for the checks: Debian's `prometheus` package (the server and `promtool`),
//! installed when missing the way `pg.rs` and `pgbouncer.rs` install theirs.
//!
//! - [`check_rules`]: `promtool check rules` and `promtool test rules` on the chart's alert
//!   rules and their unit tests (`helm-check`).
//! - [`Server`]: a throwaway server scraping given targets every second, with a fresh data
//!   directory, queried over its HTTP API (`dev --smoke`, through `metrics_check.rs`).

use crate::{cmd, http};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
/// The rule file and its unit tests, under the chart.
const RULES: &str = "files/prometheus/ledgerflow-rules.yaml";
const RULE_TESTS: &str = "files/prometheus/ledgerflow-rules.test.yaml";

/// Installs Debian's `prometheus` when the server or promtool is missing (as root;
/// otherwise says how). The package's own service is not needed: every check starts a
/// server of its own.
pub fn ensure_installed() -> Result<()> {
    if Path::new(PROMETHEUS).is_file() && Path::new(PROMTOOL).is_file() {
        return Ok(());
    }
    if !cmd::is_root()? {
        bail!("prometheus is not installed: `sudo apt-get install -y prometheus`");
    }
    println!("prometheus is not installed: installing it (Debian)");
    cmd::apt_install(&["prometheus"])?;
    ensure!(
        Path::new(PROMETHEUS).is_file() && Path::new(PROMTOOL).is_file(),
        "installed prometheus, but {PROMETHEUS} or {PROMTOOL} is missing"
    );
    Ok(())
}

/// `promtool check rules` and `promtool test rules` on the chart's rule file.
pub fn check_rules(chart: &Path) -> Result<()> {
    ensure_installed()?;
    let version = cmd::read(Command::new(PROMTOOL).arg("--version"))?;
    println!("  {}", version.lines().next().unwrap_or("promtool").trim());
    for (what, args) in [("check rules", [RULES]), ("test rules", [RULE_TESTS])] {
        let verb: Vec<&str> = what.split(' ').collect();
        // From the chart, so the test file's relative `rule_files` entry resolves.
        let output = Command::new(PROMTOOL)
            .args(&verb)
            .args(args)
            .current_dir(chart)
            .output()
            .with_context(|| format!("running promtool {what}"))?;
        ensure!(
            output.status.success(),
            "promtool {what} {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!("  promtool {what} {}: ok", args.join(" "));
    }
    Ok(())
}

/// A Prometheus server scraping `targets` every second; killed (and its data removed) on drop.
pub struct Server {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:port` of its HTTP API.
    pub addr: String,
}

impl Server {
    /// Starts a server in a fresh directory under `parent`, on `addr`, scraping `/metrics` of
    /// each of `targets` (`host:port`); returns once it answers `/-/ready`.
    pub fn start(parent: &Path, addr: &str, targets: &[&str]) -> Result<Server> {
        ensure_installed()?;
        let dir = parent.join(format!("prometheus-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ledgerflow\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.join("prometheus.yml");
        fs::write(&config_file, config)
            .with_context(|| format!("writing {}", config_file.display()))?;
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let server = Server {
            child,
            dir,
            addr: addr.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http::request(&server.addr, "GET", "/-/ready", &[], None)
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus did not become ready within 20 s; its log: {}",
                    server.dir.join("prometheus.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query's result vector (empty: no data).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let body = format!("query={}", form_encode(promql));
        let response = http::request(
            &self.addr,
            "POST",
            "/api/v1/query",
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(&body),
        )?;
        let json = response.json()?;
        ensure!(
            json["status"] == "success",
            "prometheus refused {promql:?}: {}",
            response.body
        );
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_everything_but_unreserved_bytes() {
        assert_eq!(
            form_encode(r#"sum by (q) (x{a="b"}[1m]) + é"#),
            "sum%20by%20%28q%29%20%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%20%2B%20%C3%A9"
        );
    }
}
