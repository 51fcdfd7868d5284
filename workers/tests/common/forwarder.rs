//! A TCP forwarder that plays the part of a Kubernetes Service or an RDS
//! endpoint in front of Postgres: one address the processes connect to,
//! repointed at another server by the test (e.g. the promoted standby).
//!
//! A repoint affects new connections only, like a Service's endpoints
//! changing: the connections already forwarded to the old server stay
//! until that server (or the client) closes them.
// Each test binary that includes this uses a different part of it.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The listening forwarder; stops accepting on drop.
pub struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Forwarder> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = Arc::new(Mutex::new(target));
        let shared = target.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *shared.lock().unwrap_or_else(|e| e.into_inner());
                tokio::spawn(async move {
                    // A refused connection (server down) closes the client's
                    // socket at once: the client sees a failed connect.
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Ok(Forwarder { addr, target, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `target` from now on.
    pub fn repoint(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
