//! PgBouncer for tests and benchmarks: Debian's `pgbouncer` (installed when missing, as
//! root, the way `pg.rs` installs PostgreSQL), and a throwaway instance in front of a
//! Postgres URL for `cargo xtask bench --pgbouncer`.
//!
//! The failover tests start PgBouncers of their own (`workers/tests/common/pgbouncer.rs`);
//! `cargo xtask test` only makes sure the binary is there.

use crate::cmd;
use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/sbin/pgbouncer";

/// Installs Debian's `pgbouncer` when it is missing (as root; otherwise says how).
pub fn ensure_installed() -> Result<()> {
    if Path::new(BINARY).is_file() {
        println!(
            "{}",
            cmd::read(Command::new(BINARY).arg("--version"))?
                .lines()
                .next()
                .unwrap_or("pgbouncer")
        );
        return Ok(());
    }
    if !cmd::is_root()? {
        bail!("pgbouncer is not installed: `sudo apt-get install -y pgbouncer`");
    }
    println!("pgbouncer is not installed: installing it (Debian)");
    cmd::apt_install(&["pgbouncer"])?;
    ensure!(
        Path::new(BINARY).is_file(),
        "installed pgbouncer, but {BINARY} is missing"
    );
    Ok(())
}

/// A running PgBouncer (daemonized); stopped on drop.
pub struct PgBouncer {
    dir: PathBuf,
    /// The upstream URL with PgBouncer's address in place of the server's.
    pub url: String,
}

/// The parts of a `postgres://user:password@host:port/db` URL PgBouncer needs.
fn split_url(url: &str) -> Result<(String, String, String, u16, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .context("not a postgres:// URL")?;
    let (auth, rest) = rest.rsplit_once('@').context("no user in the URL")?;
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, db) = rest.split_once('/').context("no database in the URL")?;
    let db = db.split('?').next().unwrap_or(db);
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
    Ok((
        user.to_string(),
        password.to_string(),
        host.to_string(),
        port.parse().context("bad port in the URL")?,
        db.to_string(),
    ))
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode = mode` in front of the server of `upstream` (every
    /// database name passed through, the URL's user and password known to it).
    pub fn start(upstream: &str, mode: &str) -> Result<PgBouncer> {
        ensure_installed()?;
        let (user, password, host, port, db) = split_url(upstream)?;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("ledgerflow-xtask-pgbouncer-{listen}"));
        std::fs::create_dir_all(&dir)?;
        let auth = if password.is_empty() {
            "trust"
        } else {
            "scram-sha-256"
        };
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"{user}\" \"{password}\"\n"),
        )?;
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {listen}\nunix_socket_dir =\nauth_type = {auth}\n\
             auth_file = {users}\npool_mode = {mode}\ndefault_pool_size = 100\n\
             max_client_conn = 1000\nignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\npidfile = {pid}\n",
            users = dir.join("userlist.txt").display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini)?;
        // PgBouncer refuses to run as root.
        let root = cmd::is_root()?;
        let mut c = if root {
            cmd::run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
            )?;
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", BINARY]);
            c
        } else {
            Command::new(BINARY)
        };
        cmd::run(
            c.arg("-d")
                .arg(dir.join("pgbouncer.ini"))
                .stdin(Stdio::null()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "pgbouncer is not listening on {listen}; see {}",
                dir.join("pgbouncer.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("postgres://{user}:{password}@127.0.0.1:{listen}/{db}");
        println!("pgbouncer ({mode} pooling) on 127.0.0.1:{listen} in front of {host}:{port}");
        Ok(PgBouncer { dir, url })
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() -> Result<()> {
        assert_eq!(
            split_url("postgres://ledgerflow:ledgerflow@127.0.0.1:5432/ledgerflow")?,
            (
                "ledgerflow".into(),
                "ledgerflow".into(),
                "127.0.0.1".into(),
                5432,
                "ledgerflow".into()
            )
        );
        assert_eq!(split_url("postgres://u@h/d?sslmode=disable")?.4, "d");
        Ok(())
    }
}
