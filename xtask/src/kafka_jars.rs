//! Apache Kafka's jars, resolved from Maven Central with `mvn` into
//! `$HOME/.cache/ledgerflow/kafka-<version>/libs` once per machine (as helm-check caches
//! helm), and the `java` that runs them.
//!
//! A generated `pom.xml` lists the broker (`kafka_2.13`, which brings the server, storage
//! and coordinator modules), `kafka-tools` (the topic command) and log4j's SLF4J binding
//! (without it the broker logs nothing); `mvn dependency:copy-dependencies` copies them and
//! their runtime dependencies flat into `libs/`, which is the classpath, as `libs/*` is in
//! Kafka's own distribution. The pom itself is the cache key: a cache made from another pom
//! is resolved again.

use crate::cmd;
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use crate::apache_kafka::{Jars, KAFKA_VERSION};

/// The maven-dependency-plugin that copies the jars: pinned, as Maven's default (2.8) is
/// whatever the installed Maven's super-POM says.
const DEPENDENCY_PLUGIN: &str = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1";

/// log4j's binding for SLF4J 1.7 (the API Kafka 4.x logs through).
const LOG4J_VERSION: &str = "2.25.5";

/// The oldest Java the broker runs on.
const MIN_JAVA: u32 = 17;

fn pom() -> String {
    let dep = |group: &str, artifact: &str, version: &str| {
        format!(
            "    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>\
             <version>{version}</version></dependency>\n"
        )
    };
    format!(
        "<project xmlns=\"http://maven.apache.org/POM/4.0.0\">\n  \
         <modelVersion>4.0.0</modelVersion>\n  \
         <groupId>ledgerflow</groupId><artifactId>apache-kafka-broker</artifactId>\
         <version>{KAFKA_VERSION}</version><packaging>pom</packaging>\n  \
         <dependencies>\n{}{}{}  </dependencies>\n</project>\n",
        dep("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
        dep("org.apache.kafka", "kafka-tools", KAFKA_VERSION),
        dep(
            "org.apache.logging.log4j",
            "log4j-slf4j-impl",
            LOG4J_VERSION
        ),
    )
}

/// The jars of [`KAFKA_VERSION`] and a `java` that runs them, resolving the jars with
/// Maven when the cache does not have them (about a minute on a fresh machine, 90 jars).
pub fn ensure() -> Result<Jars> {
    let libs = Jars::default_libs().context("HOME is not set; the jars are cached under it")?;
    let root = libs
        .parent()
        .context("the cache directory has no parent")?
        .to_path_buf();
    let pom_path = root.join("pom.xml");
    let stamp = root.join("libs.pom");
    let wanted = pom();
    let cached = libs
        .join(format!("kafka_2.13-{KAFKA_VERSION}.jar"))
        .is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    if !cached {
        resolve(&root, &pom_path, &libs, &wanted)?;
        fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let java = java()?;
    println!(
        "kafka: Apache Kafka {KAFKA_VERSION} jars in {}{}",
        libs.display(),
        if cached { " (cached)" } else { "" }
    );
    Ok(Jars { libs, java })
}

fn resolve(root: &Path, pom_path: &Path, libs: &Path, pom: &str) -> Result<()> {
    ensure!(
        cmd::which("mvn").is_some(),
        "Maven (`mvn`) is not on PATH: it resolves Apache Kafka's jars from Maven Central \
         (Debian: apt-get install maven)"
    );
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    fs::write(pom_path, pom).with_context(|| format!("writing {}", pom_path.display()))?;
    // Copied next to the final directory and renamed, so an interrupted copy never
    // passes for a complete one.
    let scratch = root.join(format!("libs.partial-{}", std::process::id()));
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    let started = Instant::now();
    println!("kafka: resolving Apache Kafka {KAFKA_VERSION} with Maven (once per machine)");
    cmd::run(
        Command::new("mvn")
            .current_dir(root)
            .args(["-B", "-q", "-f"])
            .arg(pom_path)
            .arg(format!("{DEPENDENCY_PLUGIN}:copy-dependencies"))
            .arg("-DincludeScope=runtime")
            .arg(format!("-DoutputDirectory={}", scratch.display())),
    )
    .context("resolving Apache Kafka's jars with Maven (is Maven Central reachable?)")?;
    if libs.exists() {
        fs::remove_dir_all(libs).with_context(|| format!("removing {}", libs.display()))?;
    }
    fs::rename(&scratch, libs).with_context(|| format!("moving the jars to {}", libs.display()))?;
    let count = fs::read_dir(libs)?.count();
    println!(
        "kafka: {count} jars resolved in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `$JAVA_HOME/bin/java` or `java` on PATH, checked to be Java 17 or newer.
fn java() -> Result<PathBuf> {
    let java = std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("java"))
        .filter(|p| p.is_file())
        .or_else(|| cmd::which("java"))
        .context("no `java` (JDK 17 or newer) on PATH or in $JAVA_HOME: the broker is a JVM")?;
    let out = cmd::capture(Command::new(&java).arg("-version"))?;
    // `java -version` prints to stderr: `openjdk version "17.0.15" 2025-04-15`.
    let text = String::from_utf8_lossy(&out.stderr);
    let major = text
        .split('"')
        .nth(1)
        .and_then(|v| v.split(['.', '-', '+']).next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= MIN_JAVA => Ok(java),
        Some(m) => bail!(
            "{} is Java {m}; Apache Kafka {KAFKA_VERSION} needs {MIN_JAVA} or newer \
             (set JAVA_HOME)",
            java.display()
        ),
        None => bail!(
            "could not read the version of {}: {}",
            java.display(),
            text.trim()
        ),
    }
}
