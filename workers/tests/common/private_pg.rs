//! A private PostgreSQL 15 cluster for one fault test: `initdb` into a temp
//! directory, trust auth on 127.0.0.1 (a free port) and on a unix socket in
//! that directory, started and restarted with `pg_ctl`, removed on drop.
//!
//! Fault tests that restart Postgres must not touch the shared test cluster
//! (other test binaries use it in parallel), so they start one of these.
//! As root, every server command runs as the `postgres` OS user (initdb
//! refuses root), which then owns the directory.
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
        let root = is_root()?;
        let dir = std::env::temp_dir().join(format!(
            "ledgerflow-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut pg = PrivatePg {
            dir,
            port,
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
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 64MB\nlog_min_messages = warning\n",
            pg.dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
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
