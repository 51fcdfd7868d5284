//! `cargo xtask`: project automation (lint + test harness, and more subcommands as modules).
//!
//! Each subcommand lives in its own module exposing `Args` (a `clap::Args`) and
//! `run(Args) -> anyhow::Result<()>`. Adding one is three lines: the `mod`, the
//! `Command` variant and its `match` arm.

/// The Apache Kafka launcher the tests and the benchmark share (std only).
#[path = "../../workers/testkit/apache_kafka.rs"]
mod apache_kafka;
mod bench;
mod browser;
mod cmd;
mod dev;
mod helm_check;
mod helm_crds;
mod http;
mod kafka;
mod kafka_jars;
mod layers;
mod metrics_check;
mod openapi;
mod pg;
mod pgbouncer;
mod pipeline;
mod prometheus;
mod schemathesis;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ledgerflow project automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start/prepare Postgres, then fmt, clippy and the whole test suite (what CI runs).
    Test(test::Args),
    /// Run the whole system locally (`--smoke`: one job end to end, then exit).
    Dev(dev::Args),
    /// Benchmarks (`queue`), printed as a table and optionally written as JSON.
    Bench(bench::Args),
    /// Lint, render and validate the Helm chart offline; check its container args against the binary.
    HelmCheck,
    /// Check the engine's import rules: layer order in the workflow runtime, no file cycles.
    Layers,
    /// The deploy pipeline's checks: actionlint on .github/workflows, the Dockerfile's build
    /// commands run here, and helm-check against the binary they built.
    Pipeline,
    /// Write the OpenAPI specs to api/openapi/.
    Openapi(openapi::Args),
    /// Property-based tests generated from the OpenAPI specs against a running system.
    Schemathesis(schemathesis::Args),
    /// Install Chromium and playwright-core if missing, then run the admin console's browser test.
    E2e(browser::Args),
    /// Resolve Apache Kafka's jars (cached) and print the environment the Kafka tests read.
    KafkaEnv,
}

fn main() -> ExitCode {
    let result: Result<()> = match Cli::parse().command {
        Command::Test(args) => test::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Bench(args) => bench::run(args),
        Command::HelmCheck => helm_check::run(cmd::workspace_root()),
        Command::Layers => layers::run(cmd::workspace_root()),
        Command::Pipeline => pipeline::run(cmd::workspace_root()),
        Command::Openapi(args) => openapi::run(args),
        Command::Schemathesis(args) => schemathesis::run(args),
        Command::E2e(args) => browser::run(args),
        Command::KafkaEnv => kafka::print_test_env(),
    };
    // Print the error chain on one line, without the backtrace `RUST_BACKTRACE` would add.
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
