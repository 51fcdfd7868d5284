//! A Kafka-protocol broker for the test suite: `KAFKA_BROKERS` if set, else a
//! local tansu broker on 127.0.0.1:9092 (installed with cargo if missing,
//! started in the background if nothing listens there).
//!
//! The Kafka tests start their own tansu per test when `KAFKA_BROKERS` is
//! unset; `ensure_broker` makes sure the binary exists (the slow part) and
//! gives `cargo xtask dev`/benchmarks a broker to talk to.

use crate::cmd::{cargo, display, which, workspace_root};
use anyhow::{Context, Result, bail};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu release the project is tested with.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where the local broker listens.
pub const LOCAL_BROKER: &str = "127.0.0.1:9092";

/// Returns bootstrap servers for the tests: `KAFKA_BROKERS` when set,
/// otherwise a local tansu broker on [`LOCAL_BROKER`], installing and starting
/// it as needed and waiting until it accepts connections.
pub fn ensure_broker() -> Result<String> {
    // Left running in the background for the rest of the session.
    let (brokers, _child) = broker()?;
    Ok(brokers)
}

/// Like [`ensure_broker`], and also returns the tansu process when this call
/// started it, so that its caller (`cargo xtask dev`) can stop it on exit.
pub fn broker() -> Result<(String, Option<Child>)> {
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS")
        && !brokers.trim().is_empty()
    {
        println!("kafka: using KAFKA_BROKERS={brokers}");
        return Ok((brokers, None));
    }
    let tansu = ensure_tansu()?;
    let addr: SocketAddr = LOCAL_BROKER.parse().context("bad broker address")?;
    if accepts(&addr) {
        println!("kafka: a broker already listens on {LOCAL_BROKER}");
        return Ok((LOCAL_BROKER.to_string(), None));
    }
    let log_path = workspace_root().join("target").join("tansu.log");
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let url = format!("tcp://{LOCAL_BROKER}");
    let mut cmd = Command::new(&tansu);
    cmd.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
    ])
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    println!("$ {} &  (log: {})", display(&cmd), log_path.display());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", tansu.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !accepts(&addr) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "tansu exited ({status}) before accepting connections; see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "tansu did not accept connections on {LOCAL_BROKER} within 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("kafka: tansu listening on {LOCAL_BROKER}");
    Ok((LOCAL_BROKER.to_string(), Some(child)))
}

/// The tansu binary: on `PATH`, in `$CARGO_HOME/bin` (or `~/.cargo/bin`), or
/// freshly installed there with cargo.
pub fn ensure_tansu() -> Result<PathBuf> {
    if let Some(p) = installed_tansu() {
        return Ok(p);
    }
    let cargo_bin = cargo_home().map(|h| h.join("bin").join("tansu"));
    println!(
        "kafka: tansu not found; installing tansu {TANSU_VERSION} with cargo \
         (slow: about 10-14 minutes on 2 cores; it is cached in $CARGO_HOME/bin afterwards)"
    );
    let mut install = cargo();
    install.args([
        "install",
        "tansu",
        "--version",
        TANSU_VERSION,
        "--locked",
        "--features",
        "dynostore",
    ]);
    crate::cmd::run(&mut install)?;
    which("tansu")
        .or_else(|| cargo_bin.filter(|p| p.is_file()))
        .context(
            "`cargo install tansu` succeeded but the binary is not on PATH or in $CARGO_HOME/bin",
        )
}

/// The tansu binary if it is installed (on `PATH` or in `$CARGO_HOME/bin`).
pub fn installed_tansu() -> Option<PathBuf> {
    which("tansu").or_else(|| {
        cargo_home()
            .map(|h| h.join("bin").join("tansu"))
            .filter(|p| p.is_file())
    })
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

fn accepts(addr: &SocketAddr) -> bool {
    TcpStream::connect_timeout(addr, Duration::from_millis(300)).is_ok()
}
