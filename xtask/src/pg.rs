//! PostgreSQL for tests: reuse `TEST_DATABASE_URL`/`DATABASE_URL`, or start and provision the
//! local Debian cluster (`15/main`) with a `ledgerflow` superuser role and database.
//!
//! Everything goes through the `psql`, `pg_isready`, `pg_lsclusters`, `pg_ctlcluster` and
//! `pg_createcluster` command-line tools, so xtask needs no database driver. Every step checks
//! before acting, so running it again (or concurrently) is harmless and, once set up, takes a
//! few milliseconds. The server configuration (`postgresql.conf`, `pg_hba.conf`) is never
//! modified: benchmarks compare against peers on the stock configuration.

use crate::cmd::{self, redact_url};
use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Major version and name of the Debian cluster xtask starts when no URL is given.
const PG_MAJOR: &str = "15";
const CLUSTER: &str = "main";
/// The server binary whose presence says the Debian `postgresql-15` package is installed.
const SERVER_BINARY: &str = "/usr/lib/postgresql/15/bin/postgres";
const DEFAULT_PORT: u16 = 5432;
/// Role, password and database created for tests (stock `pg_hba.conf` allows
/// `scram-sha-256` over TCP on 127.0.0.1).
const ROLE: &str = "ledgerflow";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of the per-test clones made by `ledgerflow_engine::testing::TestDb`.
const TEST_DB_PATTERN: &str = r"lf\_test\_%";
/// Parallel sessions used to drop stale test databases.
const DROP_SESSIONS: usize = 8;

/// Returns the URL of a Postgres server the tests can use as a superuser, starting and
/// provisioning the local cluster if needed.
///
/// * `TEST_DATABASE_URL` (else `DATABASE_URL`) set: used as is, only checked to be reachable.
/// * Otherwise the Debian cluster `15/main` is started if nothing listens on 127.0.0.1:5432
///   (installing `postgresql-15` first when running as root and it is missing), and the role
///   and database `ledgerflow` are created if missing.
pub fn ensure_postgres() -> Result<String> {
    if let Some((var, url)) = url_from_env() {
        println!("using {var}={}", redact_url(&url));
        require_tool("psql", "postgresql-client")?;
        check_reachable(&url)
            .with_context(|| format!("{var} is set, but its server does not answer `select 1`"))?;
        return Ok(url);
    }

    let port = if accepts_tcp(DEFAULT_PORT) {
        DEFAULT_PORT
    } else {
        start_cluster()?
    };
    require_tool("psql", "postgresql-client")?;
    require_tool("pg_isready", "postgresql-client")?;
    wait_ready(port)?;

    let url = local_url(port);
    if superuser_check(&url).is_ok() {
        println!("postgres ready: {}", redact_url(&url));
        return Ok(url);
    }
    println!("creating role and database `{ROLE}` (if missing)");
    // Concurrent runs may race (`tuple concurrently updated` on the role): check and retry.
    for attempt in 1.. {
        match provision(port) {
            Ok(()) => break,
            Err(_) if superuser_check(&url).is_ok() => break,
            Err(e) if attempt >= 3 => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    superuser_check(&url).with_context(|| {
        format!(
            "created role and database `{ROLE}`, but cannot log in as a superuser with {} \
             (does pg_hba.conf allow password logins over TCP on 127.0.0.1?)",
            redact_url(&url)
        )
    })?;
    println!("postgres ready: {}", redact_url(&url));
    Ok(url)
}

/// Drops every per-test database (`lf_test_*`) left over from earlier runs.
///
/// Databases that currently have sessions are skipped, since they belong to a test run that is
/// still going (another terminal, another engineer); leftovers of crashed or killed runs have
/// none. Templates (`lf_template_*`) are kept: they are reused while the migrations are
/// unchanged. A database that cannot be dropped is reported, not fatal.
pub fn drop_stale_test_databases(url: &str) -> Result<()> {
    let listing = cmd::read(psql(url).arg("-c").arg(format!(
        "SELECT d.datname, EXISTS (SELECT FROM pg_stat_activity a \
                                   WHERE a.datid = d.oid AND a.pid <> pg_backend_pid()) \
         FROM pg_database d WHERE d.datname LIKE '{TEST_DB_PATTERN}' ORDER BY 1"
    )))
    .context("could not list the test databases")?;

    let mut stale = Vec::new();
    let mut in_use = 0;
    for line in listing.lines().filter(|l| !l.is_empty()) {
        match line.rsplit_once('|') {
            Some((name, "f")) => stale.push(name.to_string()),
            Some((_, _)) => in_use += 1,
            None => bail!("unexpected psql output: {line:?}"),
        }
    }
    if in_use > 0 {
        println!("keeping {in_use} test database(s) in use by a running test process");
    }
    if stale.is_empty() {
        println!("no stale test databases");
        return Ok(());
    }

    // Each DROP DATABASE waits for a checkpoint (about a second here), but concurrent drops
    // share checkpoints, so a few sessions in parallel make a big cleanup several times faster.
    // Without ON_ERROR_STOP a failing drop doesn't stop the rest of its session.
    let per_session = stale.len().div_ceil(DROP_SESSIONS);
    let outputs: Vec<Result<Output>> = std::thread::scope(|scope| {
        let sessions: Vec<_> = stale
            .chunks(per_session)
            .map(|names| {
                let script: String = names
                    .iter()
                    .map(|name| {
                        format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE);\n",
                            quote_ident(name)
                        )
                    })
                    .collect();
                scope.spawn(move || psql_script(psql(url).args(["-v", "ON_ERROR_STOP=0"]), &script))
            })
            .collect();
        sessions
            .into_iter()
            .map(|session| {
                session
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a psql session panicked")))
            })
            .collect()
    });
    let mut failed = 0;
    let mut errors = String::new();
    for out in outputs {
        let out = out?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        failed += stderr.lines().filter(|l| l.contains("ERROR")).count();
        errors.push_str(&stderr);
        if !out.status.success() {
            errors.push_str(&format!("psql exited with {}\n", out.status));
        }
    }
    if !errors.trim().is_empty() {
        eprintln!(
            "warning: could not drop {failed} of {} stale test database(s):\n{}",
            stale.len(),
            errors.trim()
        );
    }
    println!(
        "dropped {} stale test database(s)",
        stale.len().saturating_sub(failed)
    );
    Ok(())
}

fn url_from_env() -> Option<(&'static str, String)> {
    ["TEST_DATABASE_URL", "DATABASE_URL"]
        .into_iter()
        .find_map(|var| match std::env::var(var) {
            Ok(url) if !url.trim().is_empty() => Some((var, url)),
            _ => None,
        })
}

fn local_url(port: u16) -> String {
    format!("postgres://{ROLE}:{ROLE}@127.0.0.1:{port}/{ROLE}")
}

/// `psql` on `url`, unaligned tuples-only output, never prompting for a password.
fn psql(url: &str) -> Command {
    let mut c = Command::new("psql");
    c.arg(format!("--dbname={url}"));
    psql_flags(&mut c);
    c
}

fn psql_flags(c: &mut Command) {
    c.args(["-X", "-w", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .env("PGCONNECT_TIMEOUT", "5");
}

/// Runs `psql` with `script` on stdin; returns its output whatever the exit status.
fn psql_script(c: &mut Command, script: &str) -> Result<Output> {
    let shown = cmd::display(c);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    // Written from another thread so a chatty psql can't fill its pipes and block us.
    let writer = child.stdin.take().map(|mut stdin| {
        let script = script.to_string();
        std::thread::spawn(move || stdin.write_all(script.as_bytes()))
    });
    let out = child
        .wait_with_output()
        .with_context(|| format!("`{shown}` did not finish"))?;
    if let Some(writer) = writer {
        match writer.join() {
            Ok(written) => written.with_context(|| format!("could not write to `{shown}`"))?,
            Err(_) => bail!("writing to `{shown}` panicked"),
        }
    }
    Ok(out)
}

fn check_reachable(url: &str) -> Result<()> {
    cmd::read(psql(url).args(["-c", "select 1"]))?;
    Ok(())
}

/// Succeeds if `url` logs in as a superuser.
fn superuser_check(url: &str) -> Result<()> {
    let answer = cmd::read(psql(url).args([
        "-c",
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
    ]))?;
    if answer != "t" {
        bail!("{} logs in, but not as a superuser", redact_url(url));
    }
    Ok(())
}

fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

fn require_tool(tool: &str, package: &str) -> Result<()> {
    if cmd::which(tool).is_none() {
        bail!("`{tool}` is not on PATH: install it (Debian: `apt-get install -y {package}`)");
    }
    Ok(())
}

/// A Debian cluster as listed by `pg_lsclusters`.
struct ClusterInfo {
    port: u16,
    online: bool,
}

fn find_cluster() -> Result<Option<ClusterInfo>> {
    let listing = cmd::read(Command::new("pg_lsclusters").arg("--no-header"))?;
    for line in listing.lines() {
        // Ver Cluster Port Status Owner Data-directory Log-file
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [ver, name, port, status, ..] = fields[..]
            && ver == PG_MAJOR
            && name == CLUSTER
        {
            let port = port
                .parse()
                .with_context(|| format!("unexpected pg_lsclusters line: {line:?}"))?;
            return Ok(Some(ClusterInfo {
                port,
                online: status.starts_with("online"),
            }));
        }
    }
    Ok(None)
}

/// Starts (creating it first if needed) the Debian cluster and returns its port.
fn start_cluster() -> Result<u16> {
    ensure_server_installed()?;
    let hint = format!(
        "as root, `pg_ctlcluster {PG_MAJOR} {CLUSTER} start` starts it; or set TEST_DATABASE_URL \
         to a server you run yourself"
    );
    match find_cluster()? {
        None => {
            println!("no {PG_MAJOR}/{CLUSTER} cluster yet: creating it");
            cmd::run(
                Command::new("pg_createcluster")
                    .args([PG_MAJOR, CLUSTER, "--start"])
                    .stdin(Stdio::null()),
            )
            .with_context(|| format!("could not create the {PG_MAJOR}/{CLUSTER} cluster"))?
        }
        Some(c) if c.online => {
            println!("cluster {PG_MAJOR}/{CLUSTER} is online on port {}", c.port);
            return Ok(c.port);
        }
        Some(_) => {
            println!("cluster {PG_MAJOR}/{CLUSTER} is down: starting it");
            cmd::run(
                Command::new("pg_ctlcluster")
                    .args([PG_MAJOR, CLUSTER, "start"])
                    .stdin(Stdio::null()),
            )
            .with_context(|| format!("could not start the {PG_MAJOR}/{CLUSTER} cluster: {hint}"))?
        }
    }
    match find_cluster()? {
        Some(c) => Ok(c.port),
        None => bail!("the {PG_MAJOR}/{CLUSTER} cluster is missing after creating it"),
    }
}

fn ensure_server_installed() -> Result<()> {
    if Path::new(SERVER_BINARY).exists() && cmd::which("pg_ctlcluster").is_some() {
        return Ok(());
    }
    if !cmd::is_root()? {
        bail!(
            "PostgreSQL {PG_MAJOR} is not installed ({SERVER_BINARY} is missing): install it with \
             `sudo apt-get install -y postgresql-{PG_MAJOR}`, or set TEST_DATABASE_URL to a server \
             you run yourself"
        );
    }
    println!("PostgreSQL {PG_MAJOR} is not installed: installing postgresql-{PG_MAJOR}");
    cmd::apt_install(&[&format!("postgresql-{PG_MAJOR}")])?;
    if !Path::new(SERVER_BINARY).exists() {
        bail!("installed postgresql-{PG_MAJOR}, but {SERVER_BINARY} is still missing");
    }
    Ok(())
}

fn wait_ready(port: u16) -> Result<()> {
    let port = port.to_string();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let out = cmd::capture(Command::new("pg_isready").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "2",
        ]))?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "postgres on 127.0.0.1:{port} is not accepting connections after {}s ({}); \
                 see /var/log/postgresql/postgresql-{PG_MAJOR}-{CLUSTER}.log",
                READY_TIMEOUT.as_secs(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `psql` as the `postgres` OS user over the Unix socket (peer authentication).
fn postgres_psql(port: u16) -> Result<Command> {
    let me = cmd::read(Command::new("id").arg("-un"))?;
    let mut c = if me == "postgres" {
        Command::new("psql")
    } else if cmd::is_root()? {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "psql"]);
        c
    } else {
        bail!(
            "role `{ROLE}` is missing and only root or `postgres` can create it; run once:\n  \
             sudo -u postgres psql -c \"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{ROLE}'\" \
             -c 'CREATE DATABASE {ROLE} OWNER {ROLE}'\nor set TEST_DATABASE_URL"
        );
    };
    c.args(["-p", &port.to_string(), "-d", "postgres"])
        // Connect through the socket whatever the caller's environment says.
        .env_remove("PGHOST")
        .env_remove("PGHOSTADDR")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env_remove("PGSERVICE")
        // The postgres user may not be able to enter the caller's directory.
        .current_dir("/");
    psql_flags(&mut c);
    Ok(c)
}

/// Creates (or repairs) the `ledgerflow` role and database; safe to run concurrently.
fn provision(port: u16) -> Result<()> {
    let role = format!(
        "DO $$ BEGIN \
           IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN \
             ALTER ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{ROLE}'; \
           ELSE \
             CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{ROLE}'; \
           END IF; \
         EXCEPTION WHEN duplicate_object THEN \
           ALTER ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{ROLE}'; \
         END $$"
    );
    let exists = format!("SELECT EXISTS (SELECT FROM pg_database WHERE datname = '{ROLE}')");
    let db_exists = cmd::read(postgres_psql(port)?.args(["-c", &role, "-c", &exists]))
        .context("could not create the role")?;
    if db_exists != "t" {
        let create = format!("CREATE DATABASE {ROLE} OWNER {ROLE}");
        let out = cmd::capture(postgres_psql(port)?.args(["-c", &create]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A concurrent run may have created it in the meantime: that's fine.
        if !out.status.success() && !stderr.contains("already exists") {
            bail!("could not create database `{ROLE}`: {}", stderr.trim());
        }
    }
    Ok(())
}

/// Quotes a Postgres identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("lf_test_1"), "\"lf_test_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn local_url_matches_engine_default() {
        assert_eq!(
            local_url(5432),
            "postgres://ledgerflow:ledgerflow@127.0.0.1:5432/ledgerflow"
        );
    }
}
