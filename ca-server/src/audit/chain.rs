//! Verifying the hash chain: each event's hash covers the previous event's hash and the
//! event's canonical encoding (`store::event_hash`, applied as events are appended).

use crate::store::{GENESIS_HASH, Store, StoreError, event_hash};

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every event links to the one before and hashes to its recorded hash.
    Intact {
        /// How many events were checked.
        events: u64,
        /// The last event's hash: the head of the chain.
        head: String,
    },
    /// The first event where the chain breaks, and how.
    Broken {
        /// The sequence number of the first bad event.
        seq: i64,
        /// What is wrong there, for a person.
        problem: String,
    },
}

/// Walks the whole log in order and recomputes the chain.
pub async fn verify_chain(store: &Store) -> Result<VerifyReport, StoreError> {
    const PAGE: i64 = 10_000;
    let mut expected_seq = 1;
    let mut prev = GENESIS_HASH.to_owned();
    let mut checked = 0u64;
    loop {
        let page = store.audit_events_after(expected_seq - 1, PAGE).await?;
        if page.is_empty() {
            // A removed tail cannot be seen from the events alone: checkpoints (exported
            // heads) cover that.
            return Ok(VerifyReport::Intact {
                events: checked,
                head: prev,
            });
        }
        for event in page {
            if event.seq != expected_seq {
                return Ok(VerifyReport::Broken {
                    seq: expected_seq,
                    problem: format!(
                        "event {expected_seq} is missing (the next event is {})",
                        event.seq
                    ),
                });
            }
            if event.prev_hash != prev {
                return Ok(VerifyReport::Broken {
                    seq: event.seq,
                    problem: format!(
                        "event {} does not follow event {}: it links to {} but that event hashes to {}",
                        event.seq,
                        event.seq - 1,
                        event.prev_hash,
                        prev
                    ),
                });
            }
            let recomputed = event_hash(&event);
            if recomputed != event.hash {
                return Ok(VerifyReport::Broken {
                    seq: event.seq,
                    problem: format!(
                        "event {} was altered: its contents hash to {recomputed}, not the recorded {}",
                        event.seq, event.hash
                    ),
                });
            }
            prev = event.hash;
            expected_seq += 1;
            checked += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EventKind, EventRow};

    #[test]
    fn hash_covers_every_field_and_the_link() {
        let mut e = EventRow::new(EventKind::Issued);
        e.seq = 1;
        e.prev_hash = GENESIS_HASH.to_owned();
        e.serial = Some("0a".into());
        let h = event_hash(&e);
        assert_eq!(h.len(), 64);
        let mut edited = e.clone();
        edited.serial = Some("0b".into());
        assert_ne!(event_hash(&edited), h);
        let mut relinked = e.clone();
        relinked.prev_hash = "1".repeat(64);
        assert_ne!(event_hash(&relinked), h);
        let mut renumbered = e.clone();
        renumbered.seq = 2;
        assert_ne!(event_hash(&renumbered), h);
        // A field moved between None and Some("") changes the hash too.
        let mut emptied = e;
        emptied.reason = Some(String::new());
        assert_ne!(event_hash(&emptied), h);
    }
}
