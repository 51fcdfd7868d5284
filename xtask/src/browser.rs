//! `cargo xtask e2e`: the browser toolchain of the admin console's end-to-end test, and running it.
//!
//! The test is an ordinary cargo test (`workers/tests/console_e2e.rs`) that drives headless
//! Chromium through `e2e/console.spec.mjs`. It needs Node.js >= 20, Chromium (Debian's package;
//! playwright's own browser download does not work here) and playwright-core in
//! `e2e/node_modules`, pinned by the committed `e2e/package-lock.json`. The test fails, saying
//! how to install them, when one is missing; [`ensure_toolchain`] installs them idempotently,
//! and `cargo xtask test` runs it before the tests so a fresh CI machine has them.

use crate::{cmd, pg};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    cargo xtask e2e           # install what is missing, then run the console e2e test\n  \
    cargo xtask e2e --setup   # only install Chromium and playwright-core")]
pub struct Args {
    /// Only install the toolchain; don't run the test.
    #[arg(long)]
    pub setup: bool,
}

/// The playwright version the lockfile pins must match what `node_modules` holds.
const PACKAGE: &str = "playwright-core";
/// Node.js major version playwright-core requires (its `engines`).
const NODE_MAJOR_MIN: u32 = 20;

pub fn run(args: Args) -> Result<()> {
    ensure_toolchain()?;
    if args.setup {
        return Ok(());
    }
    let url = pg::ensure_postgres()?;
    cmd::run(
        cmd::cargo()
            .env("TEST_DATABASE_URL", &url)
            .env("DATABASE_URL", &url)
            .args(["test", "-p", "ledgerflow-workers", "--test", "console_e2e"]),
    )
}

/// Installs Chromium (apt-get) and playwright-core (`npm ci`) unless already present, and
/// checks Node.js. Cheap when everything is there.
pub fn ensure_toolchain() -> Result<()> {
    let chromium = ensure_chromium()?;
    let node = ensure_node()?;
    ensure_playwright()?;
    println!(
        "browser toolchain: {} ({}), node {node}, {PACKAGE} {}",
        chromium.display(),
        cmd::read(Command::new(&chromium).arg("--version")).unwrap_or_else(|_| "?".into()),
        locked_version(&e2e_dir())?,
    );
    Ok(())
}

fn e2e_dir() -> PathBuf {
    cmd::workspace_root().join("e2e")
}

/// `CHROMIUM` if set, else `/usr/bin/chromium`, installed with apt-get when missing.
fn ensure_chromium() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        let path = PathBuf::from(path);
        if !path.exists() {
            bail!("CHROMIUM={} does not exist", path.display());
        }
        return Ok(path);
    }
    let path = PathBuf::from("/usr/bin/chromium");
    if path.exists() {
        return Ok(path);
    }
    if cmd::which("apt-get").is_none() {
        bail!(
            "Chromium is not installed and apt-get is not available: install Chromium and set \
             CHROMIUM to its path"
        );
    }
    if !cmd::is_root()? {
        bail!(
            "Chromium is not installed: run `sudo apt-get install -y chromium chromium-driver` \
             (or set CHROMIUM to an installed Chromium)"
        );
    }
    println!("Chromium missing: installing Debian's chromium with apt-get");
    cmd::apt_install(&["chromium", "chromium-driver"])?;
    if !path.exists() {
        bail!(
            "apt-get installed chromium but {} is missing",
            path.display()
        );
    }
    Ok(path)
}

/// Node's version (e.g. `v20.20.2`), or an error saying how to install a recent one.
fn ensure_node() -> Result<String> {
    let how = format!(
        "the console e2e test needs Node.js >= {NODE_MAJOR_MIN} with npm (Debian 12's own nodejs \
         is too old: use NodeSource's packages or nodejs.org)"
    );
    if cmd::which("node").is_none() || cmd::which("npm").is_none() {
        bail!("node/npm not found on PATH: {how}");
    }
    let version = cmd::read(Command::new("node").arg("--version"))?;
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unexpected `node --version` output {version:?}"))?;
    if major < NODE_MAJOR_MIN {
        bail!("node {version} is too old: {how}");
    }
    Ok(version)
}

/// `npm ci` in `e2e/` unless `node_modules` already holds the locked playwright-core.
fn ensure_playwright() -> Result<()> {
    let dir = e2e_dir();
    let locked = locked_version(&dir)?;
    let installed = installed_version(&dir);
    if installed.as_deref() == Some(locked.as_str()) {
        return Ok(());
    }
    println!(
        "{PACKAGE} {} in e2e/node_modules, lockfile wants {locked}: npm ci",
        installed.as_deref().unwrap_or("missing")
    );
    cmd::run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    )?;
    match installed_version(&dir) {
        Some(v) if v == locked => Ok(()),
        other => bail!("npm ci left {PACKAGE} at {other:?}, expected {locked}"),
    }
}

fn locked_version(dir: &Path) -> Result<String> {
    let path = dir.join("package-lock.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let lock: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    lock["packages"][format!("node_modules/{PACKAGE}")]["version"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} does not pin {PACKAGE}", path.display()))
}

fn installed_version(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("node_modules").join(PACKAGE).join("package.json"))
        .ok()?;
    let pkg: serde_json::Value = serde_json::from_str(&text).ok()?;
    pkg["version"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_lockfile_pins_playwright_core() {
        let version = locked_version(&e2e_dir()).unwrap_or_default();
        assert!(
            version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
            "unexpected pinned version {version:?}"
        );
    }
}
