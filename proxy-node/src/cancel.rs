//! CancelRequest routing. Clients get a key made up by the gateway, never the target's; a
//! cancel carrying that key is forwarded to the target backend it stands for, and wakes the
//! session, which cancels a statement it holds for approval (the target is idle meanwhile, so
//! forwarding alone would let an approval run what the client cancelled).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::upstream::Endpoint;

/// A client-facing (pid, secret) pair.
type ClientKey = (i32, i32);
/// Where a cancel goes: the target's address and its backend's (pid, secret).
type Backend = (Endpoint, i32, i32);

/// A session's key: its target backend (if the target gave one) and the session's signal.
struct Entry {
    backend: Option<Backend>,
    cancelled: Arc<CancelSignal>,
}

/// The CancelRequests a session was sent: a count, so that one arriving while the session is
/// busy elsewhere is not lost, and a wakeup for one waiting.
#[derive(Default)]
pub struct CancelSignal {
    count: AtomicU64,
    notify: Notify,
}

impl CancelSignal {
    /// How many cancels came so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once the count is past `seen`.
    pub async fn past(&self, seen: u64) {
        loop {
            // Registered before the check: a cancel between the two still wakes it.
            let woken = self.notify.notified();
            if self.count() > seen {
                return;
            }
            woken.await;
        }
    }

    fn cancel(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

#[derive(Clone, Default)]
pub struct Cancels {
    keys: Arc<Mutex<HashMap<ClientKey, Entry>>>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Entry>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh client-facing key for a target backend; a cancel with it also counts on
    /// `cancelled`.
    pub fn register(
        &self,
        addr: Endpoint,
        backend: Option<(i32, i32)>,
        cancelled: Arc<CancelSignal>,
    ) -> (i32, i32) {
        loop {
            // A positive pid, as PostgreSQL's are.
            let key: (i32, i32) = (rand_i32() & i32::MAX, rand_i32());
            let mut m = self.lock();
            if let std::collections::hash_map::Entry::Vacant(slot) = m.entry(key) {
                let backend = backend.map(|(pid, secret)| (addr, pid, secret));
                slot.insert(Entry { backend, cancelled });
                return key;
            }
        }
    }

    pub fn remove(&self, key: (i32, i32)) {
        self.lock().remove(&key);
    }

    /// Forward a client's cancel, if its key is known. Unknown keys are ignored, as PostgreSQL does.
    pub async fn forward(&self, pid: i32, secret: i32) {
        let target = match self.lock().get(&(pid, secret)) {
            Some(e) => {
                e.cancelled.cancel();
                e.backend.clone()
            }
            None => None,
        };
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
