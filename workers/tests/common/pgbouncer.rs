//! A private PgBouncer (Debian's `pgbouncer`, which `cargo xtask test` installs) in front of
//! one Postgres server: a free port on 127.0.0.1, every database name passed through (`*`),
//! trust auth (the private clusters trust 127.0.0.1), stopped and removed on drop.
//! [`PgBouncer::repoint`] rewrites its `[databases]` entry and reloads it (SIGHUP), the
//! classic way a PgBouncer follows a promoted standby.
//!
//! PgBouncer refuses to run as root, so as root it runs as the `postgres` OS user.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A running PgBouncer; stopped (SIGTERM) and deleted on drop.
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    mode: &'static str,
    run_as: Option<&'static str>,
}

impl PgBouncer {
    /// Starts one in front of `upstream` with `pool_mode = mode` (`session` or `transaction`).
    pub fn start(upstream: SocketAddr, mode: &'static str) -> Result<PgBouncer, Error> {
        let root =
            String::from_utf8_lossy(&Command::new("id").arg("-u").output()?.stdout).trim() == "0";
        let dir = std::env::temp_dir().join(format!(
            "ledgerflow-pgbouncer-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let bouncer = PgBouncer {
            dir,
            port,
            mode,
            run_as: root.then_some("postgres"),
        };
        std::fs::write(bouncer.dir.join("userlist.txt"), "\"postgres\" \"\"\n")?;
        bouncer.write_ini(upstream)?;
        if root {
            check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&bouncer.dir)
                    .output()?,
                "chown the pgbouncer directory",
            )?;
        }
        let mut c = match bouncer.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "pgbouncer"]);
                c
            }
            None => Command::new("pgbouncer"),
        };
        check(
            c.arg("-d")
                .arg(bouncer.dir.join("pgbouncer.ini"))
                .output()?,
            "pgbouncer -d (is Debian's pgbouncer installed? `cargo xtask test` installs it)",
        )?;
        // Daemonized: wait until it listens.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "pgbouncer not listening on {port}: {}",
                    std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Sends new server connections to `upstream` (the ini rewritten, then SIGHUP).
    pub fn repoint(&self, upstream: SocketAddr) -> Result<(), Error> {
        self.write_ini(upstream)?;
        self.signal("-HUP")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }

    fn write_ini(&self, upstream: SocketAddr) -> Result<(), Error> {
        // Pools big enough for every client connection of the processes (session mode holds
        // a server connection per client); `extra_float_digits` is a startup parameter sqlx
        // sends that PgBouncer does not track.
        let ini = format!(
            "[databases]\n* = host={} port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {}\nunix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
             pool_mode = {}\ndefault_pool_size = 120\nmax_client_conn = 1000\n\
             ignore_startup_parameters = extra_float_digits\nserver_login_retry = 1\n\
             logfile = {}\npidfile = {}\n",
            upstream.ip(),
            upstream.port(),
            self.port,
            self.dir.join("userlist.txt").display(),
            self.mode,
            self.log_path().display(),
            self.dir.join("pgbouncer.pid").display(),
        );
        let path = self.dir.join("pgbouncer.ini");
        std::fs::write(&path, ini)?;
        Ok(())
    }

    fn signal(&self, signal: &str) -> Result<(), Error> {
        let pid = std::fs::read_to_string(self.dir.join("pgbouncer.pid"))?;
        check(
            Command::new("kill").args([signal, pid.trim()]).output()?,
            &format!("kill {signal} pgbouncer"),
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.signal("-TERM");
        if std::env::var_os("LF_KEEP_PG").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn check(out: std::process::Output, what: &str) -> Result<(), Error> {
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
