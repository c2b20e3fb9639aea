//! Bundle propagation, observed: which bundle sequence this server last gave each client
//! address, over a watch stream or a poll, written to the store every couple of seconds
//! (`bundle_clients`) so that `root status`, `root activate` and `/metrics` see the fleet's
//! view across replicas. Bounded: past [`MAX_CLIENTS`] addresses, the rest are counted under
//! one `(others)` entry that keeps the oldest sequence any of them was given.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::limits::peer_key;
use crate::store::{Sighting, Store, Via};

/// Addresses kept apart; beyond them, clients share one entry.
pub const MAX_CLIENTS: usize = 4096;

/// How long sightings gather before they are written (a bundle change reaches every watch
/// stream at once, so their sightings go in one transaction).
pub const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// The name of the shared entry past [`MAX_CLIENTS`].
pub const OTHERS: &str = "(others)";

#[derive(Debug, Clone, Copy)]
struct Seen {
    sequence: i64,
    at: i64,
    dirty: bool,
}

/// The sightings of one server process.
#[derive(Debug)]
pub struct BundleClients {
    replica: String,
    seen: Mutex<HashMap<(Option<IpAddr>, Via), Seen>>,
    /// Wakes the flush when something changed.
    changed: tokio::sync::Notify,
}

impl Default for BundleClients {
    fn default() -> Self {
        let mut id = [0u8; 8];
        rand::fill(&mut id);
        Self {
            replica: hex::encode(id),
            seen: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl BundleClients {
    /// `peer` was given bundle `sequence` by `via`.
    pub fn saw(&self, peer: Option<SocketAddr>, via: Via, sequence: i64) {
        let Some(peer) = peer else { return };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (Some(peer_key(peer.ip())), via);
        if seen
            .get(&key)
            .is_some_and(|s| s.sequence == sequence && s.at >= now - 1)
        {
            // The same answer again within a second: nothing new to write.
            return;
        }
        self.changed.notify_one();
        if !seen.contains_key(&key) && seen.len() >= MAX_CLIENTS {
            key = (None, via);
            // The shared entry keeps the oldest bundle any of its clients holds.
            if let Some(others) = seen.get_mut(&key) {
                others.sequence = others.sequence.min(sequence);
                others.at = now;
                others.dirty = true;
                return;
            }
        }
        seen.insert(
            key,
            Seen {
                sequence,
                at: now,
                dirty: true,
            },
        );
    }

    /// The sightings changed since the last call.
    fn take_changes(&self) -> Vec<Sighting> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Addresses not seen for a day are forgotten here as in the store.
        seen.retain(|_, s| s.at > now - 86_400);
        seen.iter_mut()
            .filter(|(_, s)| s.dirty)
            .map(|((ip, via), s)| {
                s.dirty = false;
                Sighting {
                    client: ip.map_or_else(|| OTHERS.to_owned(), |ip| ip.to_string()),
                    via: *via,
                    sequence: s.sequence,
                    seen_at: s.at,
                }
            })
            .collect()
    }

    /// Writes the changes to the store soon after they happen ([`FLUSH_DELAY`]) until
    /// shutdown (and once more then). `window_secs` is this server's refresh hint.
    pub(super) async fn flush(
        self: std::sync::Arc<Self>,
        store: Store,
        window_secs: i64,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let woken = tokio::select! {
                () = self.changed.notified() => true,
                _ = shutdown.wait_for(|stop| *stop) => false,
            };
            let stopping = !woken || !super::tasks::tick(FLUSH_DELAY, &mut shutdown).await;
            let changes = self.take_changes();
            if !changes.is_empty() {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if let Err(e) = store
                    .record_sightings(&self.replica, window_secs, &changes, now)
                    .await
                {
                    warn!(error = %e, "Recording which bundle clients hold failed");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_past_the_cap_share_one_entry_that_keeps_the_oldest_sequence() {
        let clients = BundleClients::default();
        let addr = |i: u32| Some(SocketAddr::from((std::net::Ipv4Addr::from(i), 443)));
        clients.saw(addr(1), Via::Poll, 5);
        clients.saw(addr(1), Via::Poll, 6);
        clients.saw(addr(1), Via::Watch, 6);
        let changes = clients.take_changes();
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|s| s.sequence == 6));
        assert!(clients.take_changes().is_empty(), "nothing new");
        for i in 2..(MAX_CLIENTS as u32 + 10) {
            clients.saw(addr(i), Via::Poll, 7);
        }
        clients.saw(addr(1_000_000), Via::Poll, 3);
        clients.saw(addr(1_000_001), Via::Poll, 8);
        let changes = clients.take_changes();
        let others: Vec<_> = changes.iter().filter(|s| s.client == OTHERS).collect();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].sequence, 3, "the oldest bundle among them");
        assert!(clients.seen.lock().unwrap().len() <= MAX_CLIENTS + 2);
    }
}
