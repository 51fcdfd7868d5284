//! A single-node Apache Kafka broker (KRaft, combined controller + broker) run from its
//! Maven jars as a child JVM, with its log in a directory on disk: the reference broker of
//! the tests, the benchmark and `cargo xtask dev`.
//!
//! std only, and included with `#[path]` by the workers' Kafka tests
//! (`tests/common/broker.rs`), the `ledgerflow-bench` binary and xtask, so that all three
//! start the broker the same way (a crate of its own would be one more workspace member for
//! the image build to copy, for a file of launcher code). `cargo xtask` resolves the jars
//! with Maven into [`Jars::default_libs`] and exports `LEDGERFLOW_KAFKA_LIBS`; this file only
//! uses them. What Kafka's own `bin/kafka-storage.sh format` and `bin/kafka-server-start.sh`
//! do is done here with the same main classes (`kafka.tools.StorageTool`, `kafka.Kafka`).
// Each includer uses a different part of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Apache Kafka release everything is tested against (`org.apache.kafka:kafka_2.13`).
pub const KAFKA_VERSION: &str = "4.4.0";

/// Every node formats with this cluster id: each test broker is a cluster of its own, so
/// nothing needs them to differ (a fixed id spares a JVM start for `random-uuid`).
const CLUSTER_ID: &str = "bGVkZ2VyZmxvdy1rYWZrYQ";

/// The node id of the single node (controller and broker).
const NODE_ID: u32 = 1;

type Result<T> = std::result::Result<T, String>;

/// The resolved jars and the `java` to run them with.
#[derive(Debug, Clone)]
pub struct Jars {
    /// The directory holding every jar of the classpath.
    pub libs: PathBuf,
    /// The `java` launcher.
    pub java: PathBuf,
}

impl Jars {
    /// Where `cargo xtask` caches the jars of [`KAFKA_VERSION`]:
    /// `$HOME/.cache/ledgerflow/kafka-<version>/libs`.
    pub fn default_libs() -> Option<PathBuf> {
        let home = std::env::var_os("HOME")?;
        Some(
            PathBuf::from(home)
                .join(".cache")
                .join("ledgerflow")
                .join(format!("kafka-{KAFKA_VERSION}"))
                .join("libs"),
        )
    }

    /// `LEDGERFLOW_KAFKA_LIBS` (exported by `cargo xtask test` and `bench`), else the
    /// default cache when it holds the broker's jar; `None` when neither has the jars.
    /// `java` is `LEDGERFLOW_KAFKA_JAVA`, else `$JAVA_HOME/bin/java`, else `java` on PATH.
    pub fn find() -> Option<Jars> {
        let libs = std::env::var_os("LEDGERFLOW_KAFKA_LIBS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(Self::default_libs)?;
        if !libs
            .join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
            .is_file()
        {
            return None;
        }
        let java = std::env::var_os("LEDGERFLOW_KAFKA_JAVA")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("JAVA_HOME")
                    .map(|h| PathBuf::from(h).join("bin").join("java"))
                    .filter(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("java"));
        Some(Jars { libs, java })
    }

    /// The classpath: every jar of the directory (the JVM expands `dir/*`).
    pub fn classpath(&self) -> String {
        format!("{}/*", self.libs.display())
    }

    fn java(&self, heap: &str) -> Command {
        let mut c = Command::new(&self.java);
        c.args(heap.split_whitespace())
            .arg("-Djava.awt.headless=true")
            .arg("-cp")
            .arg(self.classpath());
        c
    }
}

/// How the JVM is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Small heap, serial GC and the C1 compiler only: many brokers start on 2 cores,
    /// each with little to do.
    Test,
    /// Kafka's own defaults (1 GiB heap, G1, both JIT tiers): benchmarks and `xtask dev`.
    Server,
}

impl Profile {
    fn jvm_options(self) -> &'static str {
        match self {
            Profile::Test => "-Xms64m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss1m",
            Profile::Server => {
                "-Xms1g -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
                 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent"
            }
        }
    }
}

/// One broker process and its directory (`server.properties`, `log4j2.properties`,
/// `server.log` and the data in `data/`). Dropping it kills the process; the directory
/// stays unless [`Node::remove_on_drop`] was called.
#[derive(Debug)]
pub struct Node {
    jars: Jars,
    dir: PathBuf,
    /// The client listener.
    pub port: u16,
    /// The controller listener.
    pub controller_port: u16,
    profile: Profile,
    child: Option<Child>,
    remove: bool,
    own_group: bool,
}

impl Node {
    /// A node in `dir` on the given ports (nothing runs until [`Node::start`]).
    pub fn new(jars: Jars, dir: impl Into<PathBuf>, port: u16, controller_port: u16) -> Node {
        Node {
            jars,
            dir: dir.into(),
            port,
            controller_port,
            profile: Profile::Test,
            child: None,
            remove: false,
            own_group: false,
        }
    }

    /// A node on two free ports in a fresh directory under the system's temporary
    /// directory, removed when the node is dropped.
    pub fn ephemeral(jars: Jars, name: &str) -> Result<Node> {
        let dir = std::env::temp_dir().join(format!(
            "ledgerflow-kafka-{name}-{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        let mut node = Node::new(jars, dir, free_port()?, free_port()?);
        node.remove = true;
        Ok(node)
    }

    pub fn with_profile(mut self, profile: Profile) -> Node {
        self.profile = profile;
        self
    }

    /// Starts the broker in a process group of its own, so that a terminal's Ctrl-C reaches
    /// only whoever started it, who decides when the broker stops (`cargo xtask dev` stops
    /// it last). Not for tests: a test runner that kills a test's process group on a timeout
    /// should take the broker with it.
    pub fn in_own_process_group(mut self) -> Node {
        self.own_group = true;
        self
    }

    /// Removes the directory when the node is dropped.
    pub fn remove_on_drop(&mut self) {
        self.remove = true;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The broker's own log (log4j), for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `server.properties` of a single node that is controller and broker, with a static
    /// quorum of itself (`controller.quorum.voters`; unlike `--standalone`'s dynamic quorum
    /// it keeps no listener address in the formatted log). Every internal topic has one
    /// replica; groups rebalance without the initial delay; topics are not created on first
    /// use (as on most managed clusters: a missing topic must stay missing for the tests of
    /// it); and a segment rolls at 1 MiB so that compaction has closed segments to work on.
    fn properties(&self) -> String {
        let (port, controller, data) = (self.port, self.controller_port, self.data_dir());
        format!(
            "process.roles=broker,controller\n\
             node.id={NODE_ID}\n\
             controller.quorum.voters={NODE_ID}@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=3\n\
             default.replication.factor=1\n\
             min.insync.replicas=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=3\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=3\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n\
             log.segment.bytes=1048576\n\
             log.cleaner.backoff.ms=1000\n",
            data = data.display()
        )
    }

    /// Log4j 2 configuration: INFO to stdout, which goes to `server.log`.
    const LOG4J: &'static str = "status = warn\n\
        appender.out.type = Console\n\
        appender.out.name = out\n\
        appender.out.layout.type = PatternLayout\n\
        appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
        rootLogger.level = info\n\
        rootLogger.appenderRef.out.ref = out\n\
        logger.state.name = state.change.logger\n\
        logger.state.level = warn\n";

    /// Writes the configuration and formats the data directory, unless it was formatted
    /// before (a restarted node keeps its log).
    pub fn format(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let props = self.dir.join("server.properties");
        std::fs::write(&props, self.properties())
            .map_err(|e| format!("writing {}: {e}", props.display()))?;
        let log4j = self.dir.join("log4j2.properties");
        std::fs::write(&log4j, Self::LOG4J)
            .map_err(|e| format!("writing {}: {e}", log4j.display()))?;
        if self.data_dir().join("meta.properties").is_file() {
            return Ok(());
        }
        let out = self
            .jars
            .java("-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1")
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                CLUSTER_ID,
            ])
            .arg("--config")
            .arg(&props)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run {}: {e}", self.jars.java.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kafka-storage format failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Formats the directory if needed, starts the broker and waits (up to a minute) until it
    /// answers a Metadata request listing itself.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.format()?;
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut java = self.jars.java(self.profile.jvm_options());
        if self.own_group {
            java.process_group(0);
        }
        let child = java
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", self.jars.java.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Waits until the broker answers Metadata with itself in it.
    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "the Kafka broker exited ({status}) before it was ready; see {}",
                    self.log_path().display()
                ));
            }
            if metadata_brokers(&self.bootstrap()).is_ok_and(|n| n > 0) {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(format!(
                    "the Kafka broker on {} was not ready within {within:?}; see {}",
                    self.bootstrap(),
                    self.log_path().display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker cleanly (SIGTERM: it flushes and closes its log), waiting up to
    /// 30 s before killing it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the broker (SIGKILL): its log is recovered at the next start.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the broker process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:x}{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// The number of brokers a Metadata (v1) request to `addr` lists: a broker that answers it
/// serves clients. Hand-written so that xtask needs no Kafka client: request header (api key
/// 3, version 1, correlation id, client id) and a null topic array (all topics); the answer
/// starts with its size, the correlation id and the brokers array's length.
pub fn metadata_brokers(addr: &str) -> std::io::Result<usize> {
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let client = b"ledgerflow-probe";
    let mut body = Vec::new();
    body.extend_from_slice(&3i16.to_be_bytes()); // Metadata
    body.extend_from_slice(&1i16.to_be_bytes()); // v1
    body.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // topics: null = all
    let mut req = (body.len() as i32).to_be_bytes().to_vec();
    req.extend_from_slice(&body);
    s.write_all(&req)?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let correlation = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let brokers = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if correlation != 7 || brokers < 0 {
        return Err(std::io::Error::other("not a Metadata answer"));
    }
    Ok(brokers as usize)
}
