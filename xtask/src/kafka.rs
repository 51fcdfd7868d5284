//! The Kafka broker of `cargo xtask dev`, `test` and `bench`: `KAFKA_BROKERS` if set, else
//! Apache Kafka ([`KAFKA_VERSION`], jars from Maven, see `kafka_jars.rs`) as a single KRaft
//! node on 127.0.0.1:9092 with its log in `target/kafka/dev` (kept across runs), started
//! here unless a broker already answers there.
//!
//! The Kafka tests start brokers of their own (they stop, kill and restart them); they find
//! the jars through `LEDGERFLOW_KAFKA_LIBS`, which [`test_env`] gives them.

use crate::apache_kafka::{Node, Profile, metadata_brokers};
use crate::cmd::{self, target_dir, workspace_root};
use crate::kafka_jars::{self, Jars};
use anyhow::{Context, Result, anyhow, bail};
use std::process::Command;

pub use crate::apache_kafka::KAFKA_VERSION;

/// Where the local broker listens, and its controller.
pub const LOCAL_BROKER: &str = "127.0.0.1:9092";
const LOCAL_PORT: u16 = 9092;
const LOCAL_CONTROLLER_PORT: u16 = 9093;

/// Bootstrap servers and, when this call started it, the broker (stopped when dropped; call
/// [`Node::stop`] for a clean shutdown).
pub fn broker() -> Result<(String, Option<Node>)> {
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS")
        && !brokers.trim().is_empty()
    {
        println!("kafka: using KAFKA_BROKERS={brokers}");
        return Ok((brokers, None));
    }
    let jars = kafka_jars::ensure()?;
    if metadata_brokers(LOCAL_BROKER).is_ok_and(|n| n > 0) {
        println!("kafka: a broker already answers on {LOCAL_BROKER}");
        return Ok((LOCAL_BROKER.to_string(), None));
    }
    let dir = target_dir(workspace_root()).join("kafka").join("dev");
    let mut node = Node::new(jars, &dir, LOCAL_PORT, LOCAL_CONTROLLER_PORT)
        .with_profile(Profile::Server)
        .in_own_process_group();
    println!(
        "kafka: starting Apache Kafka {KAFKA_VERSION} on {LOCAL_BROKER} (log: {})",
        node.log_path().display()
    );
    node.start().map_err(|e| anyhow!(e))?;
    println!("kafka: Apache Kafka answers on {LOCAL_BROKER}");
    Ok((LOCAL_BROKER.to_string(), Some(node)))
}

/// The environment that lets the Kafka tests and the ingress benchmark start brokers of
/// their own: the jars' directory and the `java` to run them with.
pub fn test_env() -> Result<Vec<(&'static str, String)>> {
    let jars = kafka_jars::ensure()?;
    Ok(vec![
        ("LEDGERFLOW_KAFKA_LIBS", jars.libs.display().to_string()),
        ("LEDGERFLOW_KAFKA_JAVA", jars.java.display().to_string()),
    ])
}

/// `cargo xtask kafka-env`: the [`test_env`] as shell exports, for running the Kafka tests
/// with plain `cargo test` (which finds the default cache without them too).
pub fn print_test_env() -> Result<()> {
    for (name, value) in test_env()? {
        println!("export {name}={value}");
    }
    Ok(())
}

/// Creates `topics` (3 partitions each) with Kafka's own topic command; an existing topic
/// is fine. Real Kafka would create them on first use too, but with the broker's defaults
/// and only once a client asked, which a relay's first send may not wait for.
pub fn create_topics(jars: &Jars, brokers: &str, topics: &[&str]) -> Result<()> {
    for topic in topics {
        let out = cmd::capture(
            Command::new(&jars.java)
                .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp"])
                .arg(jars.classpath())
                .args([
                    "org.apache.kafka.tools.TopicCommand",
                    "--bootstrap-server",
                    brokers,
                    "--create",
                    "--if-not-exists",
                    "--partitions",
                    "3",
                    "--topic",
                    topic,
                ]),
        )?;
        if !out.status.success() {
            bail!(
                "creating topic {topic}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The jars, for callers that create topics on a broker they did not start.
pub fn jars() -> Result<Jars> {
    kafka_jars::ensure().context("Apache Kafka's jars")
}
