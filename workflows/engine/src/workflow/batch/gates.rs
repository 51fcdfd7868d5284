//! In-process turns of one workflow's deliveries (layer 3): a duplicate delivery never slips
//! between a locked batch's commit and the lock a released step takes next (see `held`).
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// In-process serialization of one workflow's deliveries (see the module's doc).
#[derive(Debug, Default)]
pub(crate) struct Gates {
    open: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

/// A delivery's turn on its workflow; the next one's comes when it is dropped.
pub(crate) struct Gate {
    gates: Arc<Gates>,
    id: Uuid,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Gates {
    /// Waits for the turn of a delivery of workflow `id`.
    pub(crate) async fn enter(self: &Arc<Self>, id: Uuid) -> Gate {
        let gate = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            open.entry(id).or_default().clone()
        };
        let turn = gate.lock_owned().await;
        Gate {
            gates: self.clone(),
            id,
            turn: Some(turn),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let mut open = self
            .gates
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The map's and this turn's references only: nobody else waits, forget the gate.
        // (New waiters clone it under this same lock, so the count cannot grow meanwhile.)
        if open
            .get(&self.id)
            .is_some_and(|g| Arc::strong_count(g) <= 2)
        {
            open.remove(&self.id);
        }
        drop(open);
        self.turn.take();
    }
}
