//! A private PostgreSQL 15 cluster for one fault test: `initdb` into a temp
//! directory, trust auth on 127.0.0.1 (a free port) and on a unix socket in
//! that directory, started and restarted with `pg_ctl`, removed on drop.
//!
//! Fault tests that restart Postgres must not touch the shared test cluster
//! (other test binaries use it in parallel), so they start one of these.
//! As root, every server command runs as the `postgres` OS user (initdb
//! refuses root), which then owns the directory.
//!
//! Failover tests make a synchronous streaming standby of one
//! ([`PrivatePg::standby`]: `pg_basebackup` into a second cluster on another
//! port), kill the primary like a crashed node ([`PrivatePg::kill_9`]) and
//! promote the standby ([`PrivatePg::promote`]).
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Debian's server binaries for major version 15.
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running private cluster; stopped (`-m immediate`) and deleted on drop.
pub struct PrivatePg {
    dir: PathBuf,
    port: u16,
    /// `Some(user)` when the server commands run as another OS user.
    run_as: Option<&'static str>,
    stopped: bool,
}

impl PrivatePg {
    /// Creates, configures and starts a cluster with database `database`.
    pub fn start(database: &str) -> Result<PrivatePg, Error> {
        let mut pg = PrivatePg::empty()?;
        let data = pg.data_dir();
        check(
            pg.server_command("initdb")
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .arg("-D")
                .arg(&data)
                .output()?,
            "initdb",
        )?;
        // Fast and quiet: this cluster holds nothing worth an fsync, and a
        // `-m immediate` restart is a process crash, not a power loss.
        let port = pg.port;
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 64MB\nlog_min_messages = warning\n",
            pg.dir.display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        pg.pg_ctl(&["start", "-w", "-t", "60"])?;
        pg.stopped = false;
        check(
            pg.server_command("createdb")
                .args(["-h"])
                .arg(&pg.dir)
                .args(["-p", &port.to_string(), "-U", "postgres", database])
                .output()?,
            "createdb",
        )?;
        Ok(pg)
    }

    /// A directory (owned by the server's OS user) and a free port; no
    /// cluster yet.
    fn empty() -> Result<PrivatePg, Error> {
        let root = is_root()?;
        let dir = std::env::temp_dir().join(format!(
            "ledgerflow-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let pg = PrivatePg {
            dir,
            port: free_port()?,
            run_as: root.then_some("postgres"),
            stopped: true,
        };
        if root {
            check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&pg.dir)
                    .output()?,
                "chown the cluster directory",
            )?;
        }
        Ok(pg)
    }

    /// A streaming standby of this cluster, started and caught up:
    /// `pg_basebackup` into a new directory, then the same server settings
    /// on its own port, connecting as `application_name = name` (which the
    /// primary names in `synchronous_standby_names` to make it synchronous,
    /// see [`PrivatePg::require_sync_standby`]). It never waits for a
    /// standby of its own, so once promoted it commits alone.
    pub fn standby(&self, name: &str) -> Result<PrivatePg, Error> {
        let mut standby = PrivatePg::empty()?;
        let data = standby.data_dir();
        check(
            standby
                .server_command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args([
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-R",
                    "--no-sync",
                    "-c",
                    "fast",
                ])
                .arg("-D")
                .arg(&data)
                .output()?,
            "pg_basebackup",
        )?;
        // postgresql.auto.conf is read last: these lines win over the
        // primary's settings the backup copied (and over what -R wrote).
        let conf = format!(
            "\nport = {}\nunix_socket_directories = '{}'\n\
             synchronous_standby_names = ''\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'\n\
             wal_retrieve_retry_interval = '200ms'\n",
            standby.port,
            standby.dir.display(),
            self.port
        );
        append(&data.join("postgresql.auto.conf"), &conf)?;
        standby.pg_ctl(&["start", "-w", "-t", "60"])?;
        standby.stopped = false;
        Ok(standby)
    }

    /// Makes commits on this primary wait until standby `name` flushed them
    /// (`synchronous_commit = on`, the default, with
    /// `synchronous_standby_names = 'name'`), once the standby streams.
    pub async fn require_sync_standby(&self, name: &str, within: Duration) -> Result<(), Error> {
        let mut conn = self.admin().await?;
        sqlx::query(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{name}'"
        ))
        .execute(&mut conn)
        .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut conn)
            .await?;
        let deadline = std::time::Instant::now() + within;
        loop {
            let state: Option<String> = sqlx::query_scalar(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
            )
            .bind(name)
            .fetch_optional(&mut conn)
            .await?;
            if state.as_deref() == Some("sync") {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("standby {name} not synchronous: {state:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `SIGKILL` to the postmaster and every process it started, at once,
    /// as when the node dies: nothing shuts down, nothing is flushed, no
    /// backend lives on to notice the postmaster's death. (Its process group
    /// is not enough: every backend leads a group of its own.)
    pub fn kill_9(&mut self) -> Result<(), Error> {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
        let postmaster = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid …; comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        check(
            Command::new("kill").arg("-KILL").args(&pids).output()?,
            "kill -9 the postmaster and its children",
        )?;
        self.stopped = true;
        Ok(())
    }

    /// `pg_ctl promote`: the standby leaves recovery and accepts writes.
    pub fn promote(&self) -> Result<(), Error> {
        self.pg_ctl(&["promote", "-w", "-t", "60"])
    }

    /// Where the server listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A direct superuser connection to the `postgres` database (not
    /// through whatever the processes use), for the test's own checks.
    pub async fn admin(&self) -> Result<sqlx::PgConnection, Error> {
        use sqlx::Connection;
        Ok(sqlx::PgConnection::connect(&self.url("postgres")).await?)
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Where the server log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `pg_ctl restart -m immediate`: every backend dies at once, the
    /// server runs crash recovery and accepts connections again.
    pub fn restart_immediate(&self) -> Result<(), Error> {
        self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "60"])
    }

    /// [`PrivatePg::restart_immediate`] in two halves, for a test that
    /// notes the moment between them: `pg_ctl stop -m immediate` ...
    pub fn stop_immediate(&mut self) -> Result<(), Error> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"])?;
        self.stopped = true;
        Ok(())
    }

    /// ... and `pg_ctl start` (crash recovery, then connections again).
    pub fn start_again(&mut self) -> Result<(), Error> {
        self.pg_ctl(&["start", "-w", "-t", "60"])?;
        self.stopped = false;
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn server_command(&self, program: &str) -> Command {
        let bin = Path::new(BIN).join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), Error> {
        let out = self
            .server_command("pg_ctl")
            .args(args)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            // The server inherits no pipes of ours: `output()` must not wait
            // for the daemon's end of them.
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()?;
        check(out, &format!("pg_ctl {}", args.join(" ")))
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
            self.stopped = true;
        }
        if std::env::var_os("LF_KEEP_PG").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn append(path: &Path, text: &str) -> Result<(), Error> {
    let mut all = std::fs::read_to_string(path).unwrap_or_default();
    all.push_str(text);
    std::fs::write(path, all)?;
    Ok(())
}

fn check(out: Output, what: &str) -> Result<(), Error> {
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
    .into())
}

fn is_root() -> Result<bool, Error> {
    let out = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A port nothing listens on now (the OS picks it).
pub fn free_port() -> Result<u16, Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `pool` answers a query (e.g. after a restart).
pub async fn wait_ready(pool: &sqlx::PgPool, within: Duration) -> Result<(), Error> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match sqlx::query("SELECT 1").execute(pool).await {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("postgres not ready: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
