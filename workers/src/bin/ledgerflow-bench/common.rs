//! What every benchmark shares: the common CLI settings, a throwaway database per workload, a
//! dedicated connection, the machine-load sampler and the percentile rule.

use anyhow::{Context, Result, ensure};
use ledgerflow_engine::MIGRATOR;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Server to benchmark on; each workload creates (and drops) its own database there.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://ledgerflow:ledgerflow@127.0.0.1:5432/ledgerflow",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Also write the results to this JSON file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<std::path::PathBuf>,

    /// Other load on the machine (CPU busy %) considered quiet.
    #[arg(long, default_value_t = 15)]
    pub quiet_pct: u32,

    /// Wait at most this many seconds for the machine to be quiet before each workload
    /// (0: sample once for 1 s and go on).
    #[arg(long, default_value_t = 30)]
    pub quiet_max: u64,

    /// Keep the benchmark databases instead of dropping them (for inspection).
    #[arg(long)]
    pub keep_db: bool,
}

/// The pool the store (runner and enqueuer) uses.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PoolArgs {
    /// Connections in the pool.
    #[arg(long, default_value_t = 16)]
    pub pool_size: u32,

    /// `PgPoolOptions::test_before_acquire` (sqlx's default, like the `ledgerflow` binary's
    /// pool): a ping before each checkout.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub test_before_acquire: bool,
}

/// The sample at rank ⌊p/100·n⌋ of sorted `xs` (the peers' scripts use the same rule).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).floor() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A freshly created and migrated database, dropped by [`BenchDb::finish`].
pub struct BenchDb {
    pub server: PgConnectOptions,
    pub name: String,
    pub options: PgConnectOptions,
    pub pool: PgPool,
    pub keep: bool,
}

impl BenchDb {
    pub async fn create(common: &CommonArgs, pool: &PoolArgs) -> Result<Self> {
        let PoolArgs {
            pool_size,
            test_before_acquire,
        } = *pool;
        let server = PgConnectOptions::from_str(&common.database_url)
            .context("DATABASE_URL is not a valid Postgres URL")?;
        let name = format!(
            "bench_lf_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut admin = PgConnection::connect_with(&server).await.with_context(|| {
            format!(
                "cannot connect to {} (is Postgres running? `cargo xtask bench` starts it)",
                server.to_url_lossy()
            )
        })?;
        sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .test_before_acquire(test_before_acquire)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await.context("migrating")?;
        Ok(Self {
            server,
            name,
            options,
            pool,
            keep: common.keep_db,
        })
    }

    /// Drops the database (unless `--keep-db`) whatever the workload's result `out` is.
    pub async fn finish<T>(self, out: Result<T>) -> Result<T> {
        self.pool.close().await;
        if self.keep {
            eprintln!("kept database {}", self.name);
        } else if let Err(e) = self.drop_db().await {
            eprintln!("warning: could not drop database {}: {e:#}", self.name);
        }
        out
    }

    async fn drop_db(&self) -> Result<()> {
        let mut admin = PgConnection::connect_with(&self.server).await?;
        sqlx::raw_sql(&format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.name
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(())
    }

    /// A connection outside the pool.
    pub async fn connect(&self) -> Result<Conn> {
        Ok(Conn(PgConnection::connect_with(&self.options).await?))
    }
}

/// A dedicated connection (not from the pool).
pub struct Conn(pub PgConnection);

impl Conn {
    pub async fn close(self) {
        let _ = self.0.close().await;
    }
}

/// Samples whole-machine CPU for 1 s, repeating (up to `--quiet-max` s) while it is at or above
/// `--quiet-pct`; returns the last reading.
pub async fn quiet(common: &CommonArgs) -> Result<u32> {
    let end = Instant::now() + Duration::from_secs(common.quiet_max);
    loop {
        let busy = cpu_busy(Duration::from_secs(1)).await?;
        if busy < common.quiet_pct || Instant::now() >= end {
            return Ok(busy);
        }
        eprintln!("machine busy ({busy}%), waiting");
    }
}

/// Whole-machine CPU busy % over `window`, from the first line of `/proc/stat` (the same
/// arithmetic as the peers' `cpu_busy`: idle = idle + iowait over user..steal).
pub async fn cpu_busy(window: Duration) -> Result<u32> {
    fn read() -> Result<Vec<u64>> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        line.split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse::<u64>().context("parsing /proc/stat"))
            .collect()
    }
    let a = read()?;
    tokio::time::sleep(window).await;
    let b = read()?;
    ensure!(a.len() == 8 && b.len() == 8, "unexpected /proc/stat format");
    let delta: Vec<u64> = b
        .iter()
        .zip(&a)
        .map(|(b, a)| b.saturating_sub(*a))
        .collect();
    let total: u64 = delta.iter().sum();
    let idle = delta[3] + delta[4];
    Ok(u32::try_from(
        (100 * (total - idle)).checked_div(total).unwrap_or(0),
    )?)
}

/// CPU time used so far (user + system) by this process and by the Postgres backends connected
/// to one database, in milliseconds: read before and after a workload, the difference is what
/// the workload cost, which unlike its rate hardly depends on other load on the machine (other
/// databases' backends are not counted; the server's shared WAL writer and checkpointer are
/// not either). A backend that exits between the readings is missed, so keep the pool open.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub this_ms: f64,
    pub postgres_ms: f64,
}

impl CpuUse {
    pub fn now(database: &str) -> Self {
        // Linux reports these in clock ticks of 1/100 s (USER_HZ) on every platform Ledgerflow
        // runs on.
        const MS_PER_TICK: f64 = 10.0;
        let ticks = |stat: &str| -> Option<(String, u64)> {
            // `pid (comm) state ...`: comm may hold spaces, so split at the last ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_string();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after `state`.
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((comm, utime + stime))
        };
        let mut out = CpuUse::default();
        if let Some((_, t)) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(ticks)
        {
            out.this_ms = t as f64 * MS_PER_TICK;
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // A backend's title: `postgres: 15/main: user database host(port) state`.
            let Ok(title) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if !String::from_utf8_lossy(&title).contains(&format!(" {database} ")) {
                continue;
            }
            if let Some((comm, t)) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .as_deref()
                .and_then(ticks)
                && comm == "postgres"
            {
                out.postgres_ms += t as f64 * MS_PER_TICK;
            }
        }
        out
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: CpuUse) -> CpuUse {
        CpuUse {
            this_ms: self.this_ms - earlier.this_ms,
            postgres_ms: self.postgres_ms - earlier.postgres_ms,
        }
    }
}

/// Prints `rows` as the two-column Markdown table every benchmark ends with.
pub fn print_table(rows: &[(&str, String)]) {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!("| {:width$} | value |", "metric");
    println!("|{}|-------|", "-".repeat(width + 2));
    for (k, v) in rows {
        println!("| {k:width$} | {v} |");
    }
    println!();
}

/// Writes `doc` to `--json PATH`, if given.
pub fn write_json(path: Option<&std::path::Path>, doc: &serde_json::Value) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_the_peers_rank_rule() {
        let xs: Vec<f64> = (1..=500).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 251.0);
        assert_eq!(percentile(&xs, 99.0), 496.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
