//! CancelRequest routing. Clients get a key made up by the gateway, never the target's; a
//! cancel carrying that key is forwarded to the target backend it stands for.

use std::collections::HashMap;

use crate::upstream::Endpoint;
use std::sync::{Arc, Mutex};

/// A client-facing (pid, secret) pair.
type ClientKey = (i32, i32);
/// Where a cancel goes: the target's address and its backend's (pid, secret).
type Backend = (Endpoint, i32, i32);

#[derive(Clone, Default)]
pub struct Cancels {
    keys: Arc<Mutex<HashMap<ClientKey, Backend>>>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Backend>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh client-facing key for a target backend.
    pub fn register(&self, addr: Endpoint, backend: Option<(i32, i32)>) -> (i32, i32) {
        loop {
            // A positive pid, as PostgreSQL's are.
            let key: (i32, i32) = (rand_i32() & i32::MAX, rand_i32());
            let mut m = self.lock();
            if let std::collections::hash_map::Entry::Vacant(slot) = m.entry(key) {
                if let Some((pid, secret)) = backend {
                    slot.insert((addr, pid, secret));
                }
                return key;
            }
        }
    }

    pub fn remove(&self, key: (i32, i32)) {
        self.lock().remove(&key);
    }

    /// Forward a client's cancel, if its key is known. Unknown keys are ignored, as PostgreSQL does.
    pub async fn forward(&self, pid: i32, secret: i32) {
        let target = self.lock().get(&(pid, secret)).cloned();
        if let Some((addr, pid, key)) = target
            && let Err(e) = crate::upstream::cancel(addr, pid, key).await
        {
            tracing::warn!(error = %e, "forwarding cancel failed");
        }
    }
}

fn rand_i32() -> i32 {
    let b = uuid::Uuid::new_v4().into_bytes();
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
