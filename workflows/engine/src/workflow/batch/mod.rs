//! The workflow runtime's batching tasks (layer 3), without their SQL (which is in `db`):
//! group commit of checkpoints ([`checkpoint`]), locked batches of first steps ([`held`]) and
//! their in-process turns ([`gates`]), and group commit of starts ([`start`]). The runtime owns
//! them and their lifecycle.
pub(crate) mod checkpoint;
pub(crate) mod conn;
pub(crate) mod gates;
pub(crate) mod held;
pub(crate) mod start;

use tokio::sync::{mpsc, watch};

/// The runtime's shutdown signal, as a batching task watches it (`true`: shutting down).
pub(crate) type Stop = watch::Receiver<bool>;

/// The next batch of requests: whatever piled up while the previous batch was in flight (at
/// least one). Once the runtime shuts down (or is gone) the channel is closed — new requests
/// are refused and take their fallback path — and what is queued still goes out; `0` when
/// nothing is left.
pub(crate) async fn recv_batch<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    buf: &mut Vec<T>,
    max: usize,
    stop: &mut Stop,
) -> usize {
    if !*stop.borrow() {
        tokio::select! {
            biased;
            n = rx.recv_many(buf, max) => return n,
            _ = stop.wait_for(|stopping| *stopping) => {}
        }
    }
    rx.close();
    rx.recv_many(buf, max).await
}
