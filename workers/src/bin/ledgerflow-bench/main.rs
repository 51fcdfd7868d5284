//! `ledgerflow-bench`: Ledgerflow's benchmarks, one subcommand per workload, one module each.
//!
//! - `queue` ([`queue`]): the two workloads of `../shared/bench/peers` (W1 throughput, W2
//!   enqueue→start latency), comparable with the peers' scripts.
//! - `workflow` ([`workflow`]): three-step durable workflows through the real runner.
//! - `api` ([`api`]): `POST /v1/trades` against the real public API on a socket.
//! - `ingress` ([`ingress`]): Kafka messages → committed jobs, signed webhooks → 2xx.
//!
//! Every workload runs on a fresh database (`bench_lf_<random>`) on the server of
//! `DATABASE_URL` ([`common::BenchDb`]), samples the machine's CPU use first
//! ([`common::quiet`]) because other load skews the figures, prints a table and, with `--json`,
//! writes its results to a file.
//!
//! A new benchmark is a module with an `Args` struct (flattening [`common::CommonArgs`]) and an
//! `async fn run(Args)`, plus one [`Command`] variant and one dispatch line in [`main`].

/// The Apache Kafka launcher the Kafka tests and xtask share (std only).
#[path = "../../../testkit/apache_kafka.rs"]
mod apache_kafka;
mod api;
mod common;
mod ingress;
mod queue;
mod workflow;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ledgerflow_workers::telemetry::{self, LogTo};

#[derive(Parser)]
#[command(
    name = "ledgerflow-bench",
    about = "Ledgerflow benchmarks (same workloads as ../shared/bench/peers)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Queue throughput (W1) and enqueue→start latency (W2).
    Queue(queue::Args),
    /// Three-step durable workflows on the real runner: workflows/s, start→finish latency.
    Workflow(workflow::Args),
    /// `POST /v1/trades` against the real public API on a socket: requests/s and latency.
    Api(api::Args),
    /// Kafka messages → committed jobs/s, and signed webhook deliveries → 2xx/s with p99.
    Ingress(ingress::Args),
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    // The same subscriber as `ledgerflow`'s, so `OTEL_EXPORTER_OTLP_ENDPOINT` measures the
    // cost of tracing (docs/benchmarks.md).
    let telemetry = telemetry::init("error", LogTo::Stderr)?;
    let result = match Cli::parse().command {
        Command::Queue(args) => queue::run(args).await,
        Command::Workflow(args) => workflow::run(args).await,
        Command::Api(args) => api::run(args).await,
        Command::Ingress(args) => ingress::run(args).await,
    };
    telemetry.shutdown().await;
    result
}
