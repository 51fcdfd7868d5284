//! Test helpers: a fresh, migrated database per test.
//!
//! The first test of a run migrates a template database (named after a hash of
//! the migrations, so a changed schema gets a new template) under an advisory
//! lock; every test then clones it with `CREATE DATABASE … TEMPLATE`, which is
//! fast and gives full isolation. A passing test drops its clone; `cargo xtask
//! test` drops leftovers (failed or killed tests) before each run.
//!
//! The server comes from `TEST_DATABASE_URL` (or `DATABASE_URL`), defaulting to
//! the role and database that `cargo xtask test` creates.
use crate::{MIGRATOR, ManualClock, Result, RetryPolicy, Store, StoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use std::str::FromStr;

/// The default server URL, matching what `cargo xtask test` sets up.
pub const DEFAULT_TEST_DATABASE_URL: &str =
    "postgres://ledgerflow:ledgerflow@127.0.0.1:5432/ledgerflow";

/// Prefix of every per-test database, so leftovers can be found and dropped.
pub const TEST_DB_PREFIX: &str = "lf_test_";

/// The URL of the test server's maintenance database.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_string())
}

/// A per-test database, cloned from the migrated template.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on the test database.
    pub pool: PgPool,
    /// Its connection URL (for child processes).
    pub url: String,
    /// Its name.
    pub name: String,
}

impl TestDb {
    /// Creates a fresh database with every migration applied.
    pub async fn new() -> Result<Self> {
        Self::with_pool_size(8).await
    }

    /// Like [`TestDb::new`] with a pool of `max` connections.
    pub async fn with_pool_size(max: u32) -> Result<Self> {
        let base = PgConnectOptions::from_str(&server_url())?;
        let template = template_name();
        let mut admin = PgConnection::connect_with(&base).await?;
        ensure_template(&mut admin, &base, &template).await?;
        let name = format!("{TEST_DB_PREFIX}{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!(
            r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        let opts = base.clone().database(&name);
        let url = opts.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .connect_with(opts)
            .await?;
        Ok(Self { pool, url, name })
    }

    /// Connect options for this database (for extra pools in a test).
    pub fn connect_options(&self) -> Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(&self.url)?)
    }
}

impl Drop for TestDb {
    /// Drops the database when its test passed; a failed test's database is kept for inspection
    /// (and dropped by the next `cargo xtask test`). A run of the whole suite otherwise leaves
    /// hundreds of them, gigabytes that once filled the disk.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let name = self.name.clone();
        // Its own thread and runtime: drop may run inside (or after) the test's runtime.
        let dropped = std::thread::spawn(move || drop_database(&name)).join();
        if let Ok(Err(e)) = dropped {
            eprintln!("test database {} left behind: {e}", self.name);
        }
    }
}

fn drop_database(name: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(sqlx::Error::Io)?;
    rt.block_on(async {
        let mut admin =
            PgConnection::connect_with(&PgConnectOptions::from_str(&server_url())?).await?;
        // FORCE ends the test's own pool connections and any child process still attached.
        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(())
    })
}

/// The store the deterministic tests share: on `pool`, driven by `clock`, with 30 s leases, no
/// NOTIFY, and retries from 10 s to an hour without jitter (so every backoff is exact).
pub fn manual_store(pool: &PgPool, clock: &ManualClock) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig {
            lease_ttl: std::time::Duration::from_secs(30),
            notify: false,
            retry: RetryPolicy {
                base: std::time::Duration::from_secs(10),
                max: std::time::Duration::from_secs(3600),
                jitter: 0.0,
            },
        },
    )
    .with_clock(std::sync::Arc::new(clock.clone()))
}

fn template_name() -> String {
    // FNV-1a over every migration's version and checksum: stable across
    // processes, changes whenever a migration does.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for m in MIGRATOR.iter() {
        for b in m.version.to_le_bytes().iter().chain(m.checksum.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("lf_template_{h:016x}")
}

async fn ensure_template(
    admin: &mut PgConnection,
    base: &PgConnectOptions,
    template: &str,
) -> Result<()> {
    // One process migrates; the others wait on the lock and then see it done.
    sqlx::query("SELECT pg_advisory_lock(7216354)")
        .execute(&mut *admin)
        .await?;
    let result = async {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(template)
                .fetch_one(&mut *admin)
                .await?;
        if !exists {
            let building = format!("{template}_building");
            sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{building}""#))
                .execute(&mut *admin)
                .await?;
            sqlx::query(&format!(r#"CREATE DATABASE "{building}""#))
                .execute(&mut *admin)
                .await?;
            let mut conn = PgConnection::connect_with(&base.clone().database(&building)).await?;
            MIGRATOR.run(&mut conn).await?;
            conn.close().await?;
            // Renamed only once complete, so a crash mid-migration never
            // leaves a half-built template behind under the real name.
            sqlx::query(&format!(
                r#"ALTER DATABASE "{building}" RENAME TO "{template}""#
            ))
            .execute(&mut *admin)
            .await?;
        }
        Ok::<_, crate::Error>(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(7216354)")
        .execute(&mut *admin)
        .await?;
    result
}
