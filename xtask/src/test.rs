//! `cargo xtask test`: everything CI checks, as an ordered list of timed steps that stops at the
//! first failure (Postgres and PgBouncer setup, fmt, clippy, tests, doctests, the deploy
//! pipeline's checks).

use crate::{cmd, pg};
use anyhow::{Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    cargo xtask test                      # what CI runs\n  \
    cargo xtask test --no-lint -- jobs::  # quick loop: only tests matching `jobs::`")]
pub struct Args {
    /// Skip `cargo fmt --check` and `cargo clippy` (quick local loop).
    #[arg(long)]
    pub no_lint: bool,

    /// Passed to the test runner (`cargo nextest run`, or `cargo test` without nextest), e.g. a
    /// test-name filter. Doctests are skipped when these are given.
    #[arg(last = true, value_name = "RUNNER_ARGS")]
    pub runner_args: Vec<String>,
}

/// What the steps share.
struct Ctx {
    args: Args,
    /// Server URL for tests, set by the `postgres` step.
    database_url: Option<String>,
    /// Bootstrap servers of the shared broker, set by the `kafka` step. The
    /// Kafka tests start brokers of their own (they restart them); this one
    /// serves `dev --smoke`.
    kafka_brokers: Option<String>,
    /// The binary the Dockerfile's build commands produced, set by the `image` step.
    image_binary: Option<std::path::PathBuf>,
    /// That broker when this run started it: stopped when the run ends.
    kafka_node: Option<crate::apache_kafka::Node>,
    /// Where the tests find Apache Kafka's jars (`LEDGERFLOW_KAFKA_LIBS`, ...).
    kafka_env: Vec<(&'static str, String)>,
}

impl Ctx {
    /// A `cargo` command in the workspace root with the test services in its environment.
    fn cargo(&self) -> Command {
        let mut c = cmd::cargo();
        if let Some(url) = &self.database_url {
            c.env("TEST_DATABASE_URL", url).env("DATABASE_URL", url);
        }
        c.envs(self.kafka_env.iter().map(|(k, v)| (k, v)));
        c
    }
}

type StepFn = fn(&mut Ctx) -> Result<()>;

struct Step {
    name: &'static str,
    run: StepFn,
    /// Why the step doesn't run this time, if it doesn't.
    skip: Option<&'static str>,
}

/// The steps, in order. New ones go here.
fn steps(args: &Args) -> Vec<Step> {
    let lint = args.no_lint.then_some("--no-lint");
    let filtered = (!args.runner_args.is_empty()).then_some("runner args given");
    vec![
        Step {
            name: "postgres",
            run: postgres,
            skip: None,
        },
        Step {
            name: "kafka",
            run: kafka,
            skip: None,
        },
        Step {
            name: "fmt",
            run: fmt,
            skip: lint,
        },
        Step {
            name: "clippy",
            run: clippy,
            skip: lint,
        },
        Step {
            name: "layers",
            run: layers,
            skip: lint,
        },
        // Before the tests: the console's browser test (workers/tests/console_e2e.rs) runs
        // among them and fails without Chromium and playwright-core.
        Step {
            name: "browser",
            run: browser,
            skip: None,
        },
        Step {
            name: "tests",
            run: tests,
            skip: None,
        },
        Step {
            name: "doctests",
            run: doctests,
            skip: filtered,
        },
        Step {
            name: "actionlint",
            run: actionlint,
            skip: lint,
        },
        // The image's binary, built by the Dockerfile's own commands (a release build):
        // helm-check runs the chart's container args through it.
        Step {
            name: "image",
            run: image,
            skip: filtered,
        },
        Step {
            name: "helm-check",
            run: helm_check,
            skip: filtered,
        },
        Step {
            name: "dev-smoke",
            run: dev_smoke,
            skip: filtered,
        },
    ]
}

pub fn run(args: Args) -> Result<()> {
    let steps = steps(&args);
    let mut ctx = Ctx {
        args,
        database_url: None,
        kafka_brokers: None,
        image_binary: None,
        kafka_node: None,
        kafka_env: Vec::new(),
    };
    let started = Instant::now();
    let total = steps.len();
    let mut summary: Vec<(&str, String)> = Vec::new();

    for (i, step) in steps.iter().enumerate() {
        if let Some(reason) = step.skip {
            println!(
                "\n==> [{}/{total}] {}: skipped ({reason})",
                i + 1,
                step.name
            );
            summary.push((step.name, "skipped".into()));
            continue;
        }
        println!("\n==> [{}/{total}] {}", i + 1, step.name);
        let t = Instant::now();
        let result = (step.run)(&mut ctx);
        let took = secs(t.elapsed());
        match result {
            Ok(()) => {
                println!("<== {}: ok in {took}", step.name);
                summary.push((step.name, format!("ok in {took}")));
            }
            Err(e) => {
                println!("<== {}: FAILED after {took}", step.name);
                summary.push((step.name, format!("FAILED after {took}")));
                print_summary(&summary, started);
                return Err(e).with_context(|| format!("step `{}` failed", step.name));
            }
        }
    }
    print_summary(&summary, started);
    if let Some(mut node) = ctx.kafka_node.take() {
        node.stop();
    }
    Ok(())
}

fn print_summary(summary: &[(&str, String)], started: Instant) {
    println!("\n==> summary ({} total)", secs(started.elapsed()));
    for (name, outcome) in summary {
        println!("    {name:<10} {outcome}");
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn postgres(ctx: &mut Ctx) -> Result<()> {
    // The failover tests run PgBouncers of their own in front of private clusters.
    crate::pgbouncer::ensure_installed()?;
    let url = pg::ensure_postgres()?;
    pg::drop_stale_test_databases(&url)?;
    println!(
        "tests get TEST_DATABASE_URL and DATABASE_URL = {}",
        cmd::redact_url(&url)
    );
    ctx.database_url = Some(url);
    Ok(())
}

/// Apache Kafka's jars (resolved with Maven once per machine) for the tests, which start
/// brokers of their own, and the shared broker for `dev --smoke`.
fn kafka(ctx: &mut Ctx) -> Result<()> {
    ctx.kafka_env = crate::kafka::test_env()?;
    let (brokers, node) = crate::kafka::broker()?;
    ctx.kafka_brokers = Some(brokers);
    ctx.kafka_node = node;
    Ok(())
}

fn fmt(ctx: &mut Ctx) -> Result<()> {
    cmd::run(ctx.cargo().args(["fmt", "--all", "--", "--check"]))
}

fn layers(_: &mut Ctx) -> Result<()> {
    crate::layers::run(cmd::workspace_root())
}

fn clippy(ctx: &mut Ctx) -> Result<()> {
    cmd::run(ctx.cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn browser(_: &mut Ctx) -> Result<()> {
    crate::browser::ensure_toolchain()
}

fn tests(ctx: &mut Ctx) -> Result<()> {
    let mut c = ctx.cargo();
    if cmd::which("cargo-nextest").is_some() {
        c.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        println!("(cargo-nextest not on PATH: using cargo test)");
        c.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd::run(c.args(&ctx.args.runner_args))
}

fn actionlint(_: &mut Ctx) -> Result<()> {
    crate::pipeline::actionlint(cmd::workspace_root())
}

fn image(ctx: &mut Ctx) -> Result<()> {
    ctx.image_binary = Some(crate::pipeline::image_binary(cmd::workspace_root())?);
    Ok(())
}

fn helm_check(ctx: &mut Ctx) -> Result<()> {
    match &ctx.image_binary {
        Some(binary) => crate::helm_check::run_with_binary(cmd::workspace_root(), binary),
        None => crate::helm_check::run(cmd::workspace_root()),
    }
}

fn dev_smoke(ctx: &mut Ctx) -> Result<()> {
    crate::dev::run(crate::dev::Args::smoke(
        ctx.database_url.clone(),
        ctx.kafka_brokers.clone(),
    ))
}

fn doctests(ctx: &mut Ctx) -> Result<()> {
    cmd::run(
        ctx.cargo()
            .args(["test", "--workspace", "--doc", "--no-fail-fast"]),
    )
}
