//! `cargo xtask bench`: makes sure Postgres is up, then runs the `ledgerflow-bench` binary (release
//! build) with `DATABASE_URL` pointing at it.
//!
//! Everything after `bench` goes to `ledgerflow-bench` unchanged (`cargo xtask bench --help`
//! shows its help; `queue`, `workflow`, `api` and `ingress` each take `--json PATH`); with
//! nothing after it, `queue` runs with the default workload — the same as
//! the peers' scripts in `../shared/bench/peers`, whose `table.py` reads the `RESULT` line it
//! prints.

use crate::{cmd, pg};
use anyhow::Result;

#[derive(clap::Args, Debug)]
#[command(
    disable_help_flag = true,
    after_help = "Examples:\n  \
    cargo xtask bench                                   # queue benchmark, default workload\n  \
    cargo xtask bench queue --json /tmp/lf-bench.json   # also write the results as JSON\n  \
    cargo xtask bench queue --history 1000000           # with a million finished jobs\n  \
    cargo xtask bench ingress --json /tmp/lf-ingress.json  # Kafka → jobs/s, webhooks/s + p99\n  \
    cargo xtask bench workflow --json /tmp/lf-wf.json   # three-step workflows/s, p99\n  \
    cargo xtask bench api --json /tmp/lf-api.json       # POST /v1/trades requests/s, p99\n  \
    cargo xtask bench --pgbouncer session queue         # the queue through PgBouncer\n  \
    cargo xtask bench --help                            # every ledgerflow-bench option"
)]
pub struct Args {
    /// Reach Postgres through a PgBouncer started for the run, in this pool mode (`session`;
    /// `transaction` needs a PgBouncer that tracks prepared statements, 1.21+: Debian 12's
    /// 1.18 hands sqlx's Bind to other clients' server connections, docs/decisions/0009).
    #[arg(long, value_name = "MODE")]
    pub pgbouncer: Option<String>,

    /// Passed to `ledgerflow-bench` (default: `queue`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "BENCH_ARGS"
    )]
    pub bench_args: Vec<String>,
}

/// The binary's package and name.
const PACKAGE: &str = "ledgerflow-workers";
const BINARY: &str = "ledgerflow-bench";

pub fn run(args: Args) -> Result<()> {
    let bench_args = if args.bench_args.is_empty() {
        vec!["queue".to_string()]
    } else {
        args.bench_args
    };
    // `--help` needs no database.
    let help = bench_args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "help"));
    let mut c = cmd::cargo();
    c.args(["run", "--release", "-p", PACKAGE, "--bin", BINARY, "--"])
        .args(&bench_args);
    let mut _bouncer = None;
    if !help {
        let mut url = pg::ensure_postgres()?;
        if let Some(mode) = &args.pgbouncer {
            let bouncer = crate::pgbouncer::PgBouncer::start(&url, mode)?;
            url = bouncer.url.clone();
            _bouncer = Some(bouncer);
        }
        c.env("DATABASE_URL", url);
        // The ingress benchmark starts its own Apache Kafka broker from the cached jars.
        if bench_args.first().map(String::as_str) == Some("ingress") {
            c.envs(crate::kafka::test_env()?);
        }
    }
    cmd::run(&mut c)
}
