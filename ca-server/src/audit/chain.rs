//! Verifying the hash chain: each event's hash covers the previous event's hash and the
//! event's canonical encoding (`store::event_hash`, applied as events are appended). The walk
//! reads the log in pages, so it runs in constant memory however long the log is.

use std::collections::BTreeMap;

use super::checkpoint::{TrustedKeys, verify_signature};
use crate::audit::{EventKind, EventRow, GENESIS_HASH, event_hash};
use crate::store::{Checkpoint, Store, StoreError};

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every event links to the one before and hashes to its recorded hash.
    Intact {
        /// How many events were checked.
        events: u64,
        /// The first retained event (1, or the anchor's after a prune).
        first: i64,
        /// The last event's sequence number.
        head_seq: i64,
        /// The last event's hash: the head of the chain.
        head: String,
        /// How many signed checkpoints were checked against the chain.
        checkpoints: usize,
    },
    /// The first event where the chain breaks, and how.
    Broken {
        /// The sequence number of the first bad event.
        seq: i64,
        /// What is wrong there, for a person.
        problem: String,
    },
}

fn broken(seq: i64, problem: String) -> Result<VerifyReport, StoreError> {
    Ok(VerifyReport::Broken { seq, problem })
}

/// Why a checkpoint under a key nobody pinned is tampering, naming the key.
fn untrusted_key(what: &str, cp: &Checkpoint, trusted: &TrustedKeys) -> String {
    format!(
        "{what} is signed by audit key {}, which is not trusted (trusted: {}): someone who \
         can write the database may have rewritten the log and signed it anew; if that key is \
         another replica's, pin it with --trusted-audit-key",
        crate::untrusted::claim(&cp.public_key),
        trusted.describe()
    )
}

/// Walks the whole log in order and recomputes the chain; checks every stored checkpoint, and
/// `exported` (a checkpoint kept elsewhere) if given, against it. A checkpoint counts only if
/// one of the `trusted` keys signed it: one under any other key is reported as tampering.
pub async fn verify_chain(
    store: &Store,
    exported: Option<&Checkpoint>,
    trusted: &TrustedKeys,
) -> Result<VerifyReport, StoreError> {
    const PAGE: i64 = 2_000;
    if let Some(cp) = exported {
        if let Err(e) = verify_signature(cp) {
            return broken(
                cp.seq,
                format!("the exported checkpoint is not genuine: {e}"),
            );
        }
        if !trusted.trusts(cp) {
            return broken(
                cp.seq,
                untrusted_key("the exported checkpoint", cp, trusted),
            );
        }
    }

    let mut prev = GENESIS_HASH.to_owned();
    let mut expected_seq = 1;
    let mut first = None;
    let mut anchor: Option<(i64, String)> = None;
    let mut anchor_vouched = false;
    let mut checked = 0u64;
    let mut checkpoints = 0usize;
    let mut after = 0;
    loop {
        let page = store.audit_events_after(after, PAGE).await?;
        let (Some(page_first), Some(page_last)) = (page.first(), page.last()) else {
            break;
        };
        // The checkpoints this page must agree with: stored ones, and the exported one.
        let mut expected: BTreeMap<i64, (String, &'static str)> = BTreeMap::new();
        for cp in store
            .checkpoints_between(page_first.seq, page_last.seq)
            .await?
        {
            if verify_signature(&cp).is_err() {
                return broken(
                    cp.seq,
                    format!(
                        "the stored checkpoint at event {} has a bad signature",
                        cp.seq
                    ),
                );
            }
            if !trusted.trusts(&cp) {
                let what = format!("the stored checkpoint at event {}", cp.seq);
                return broken(cp.seq, untrusted_key(&what, &cp, trusted));
            }
            expected.insert(cp.seq, (cp.hash, "a stored checkpoint"));
        }
        if let Some(cp) = exported
            && (page_first.seq..=page_last.seq).contains(&cp.seq)
        {
            expected.insert(cp.seq, (cp.hash.clone(), "the exported checkpoint"));
        }
        checkpoints += expected.len();
        after = page_last.seq;
        for event in page {
            if let Some((hash, what)) = expected.get(&event.seq)
                && *hash != event.hash
            {
                return broken(
                    event.seq,
                    format!(
                        "event {} differs from {what}: the log was rewritten after that checkpoint was signed",
                        event.seq
                    ),
                );
            }
            if first.is_none() {
                first = Some(event.seq);
                if event.kind == EventKind::Anchor {
                    // A pruned log starts at an anchor: it holds the hash the chain continues
                    // from. A prune event later in the chain must vouch for it.
                    prev = event.hash.clone();
                    expected_seq = event.seq + 1;
                    anchor = Some((event.seq, event.hash));
                    checked += 1;
                    continue;
                }
            }
            if event.seq != expected_seq {
                return broken(
                    expected_seq,
                    format!(
                        "event {expected_seq} is missing (the next event is {})",
                        event.seq
                    ),
                );
            }
            if event.kind == EventKind::Anchor {
                return broken(
                    event.seq,
                    format!("event {} is an anchor in the middle of the log", event.seq),
                );
            }
            if event.prev_hash != prev {
                return broken(
                    event.seq,
                    format!(
                        "event {} does not follow event {}: it links to {} but that event hashes to {}",
                        event.seq,
                        event.seq - 1,
                        event.prev_hash,
                        prev
                    ),
                );
            }
            let recomputed = event_hash(&event);
            if recomputed != event.hash {
                return broken(
                    event.seq,
                    format!(
                        "event {} was altered: its contents hash to {recomputed}, not the recorded {}",
                        event.seq, event.hash
                    ),
                );
            }
            if let Some((seq, hash)) = &anchor
                && vouches_for(&event, *seq, hash)
            {
                anchor_vouched = true;
            }
            prev = event.hash;
            expected_seq += 1;
            checked += 1;
        }
    }
    if let Some((seq, _)) = anchor
        && !anchor_vouched
    {
        return broken(
            seq,
            format!("the log starts at an anchor (event {seq}) that no prune event vouches for"),
        );
    }
    let head_seq = expected_seq - 1;
    let first = first.unwrap_or(1);
    // A checkpoint beyond the head means events were removed from the end.
    let latest = store
        .latest_checkpoint()
        .await?
        .map(|c| (c.seq, "a stored checkpoint"));
    let beyond = [latest, exported.map(|c| (c.seq, "the exported checkpoint"))]
        .into_iter()
        .flatten()
        .find(|(seq, _)| *seq > head_seq);
    if let Some((seq, what)) = beyond {
        return broken(
            head_seq + 1,
            format!(
                "{what} covers event {seq}, but the log ends at event {head_seq}: events were removed"
            ),
        );
    }
    if let Some(cp) = exported
        && cp.seq < first
    {
        return broken(
            cp.seq,
            format!(
                "the exported checkpoint covers event {}, which was pruned (the log starts at {first}); it cannot vouch for this log",
                cp.seq
            ),
        );
    }
    Ok(VerifyReport::Intact {
        events: checked,
        first,
        head_seq,
        head: prev,
        checkpoints,
    })
}

/// Whether `event` is a prune that vouches for the anchor `seq` with `hash`: it names them
/// in its `anchor_seq` and `anchor_hash`. A prune written before those fields existed names
/// them only in its reason (`… event SEQ (HASH)`), which its hash covers too.
fn vouches_for(event: &EventRow, seq: i64, hash: &str) -> bool {
    if event.kind != EventKind::Prune {
        return false;
    }
    match (event.anchor_seq, event.anchor_hash.as_deref()) {
        (Some(s), Some(h)) => s == seq && h == hash,
        (None, None) => event
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("event {seq} ({hash})"))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::EventRow;

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

    fn prune() -> EventRow {
        EventRow::new(EventKind::Prune)
    }

    #[test]
    fn a_prune_vouches_for_the_anchor_it_names() {
        let mut typed = prune();
        typed.anchor_seq = Some(41);
        typed.anchor_hash = Some("aa".into());
        // Its reason says something else: the typed fields decide.
        typed.reason = Some("the chain continues from event 7 (bb)".into());
        assert!(vouches_for(&typed, 41, "aa"));
        assert!(!vouches_for(&typed, 41, "ab"));
        assert!(!vouches_for(&typed, 7, "bb"));

        // Written before the fields existed: its reason names the anchor.
        let mut legacy = prune();
        legacy.reason = Some("pruned; the chain continues from event 41 (aa)".into());
        assert!(vouches_for(&legacy, 41, "aa"));
        assert!(!vouches_for(&legacy, 40, "aa"));

        // Half a typed anchor, or another kind of event, vouches for nothing.
        let mut half = legacy.clone();
        half.anchor_seq = Some(41);
        assert!(!vouches_for(&half, 41, "aa"));
        let mut denied = legacy;
        denied.kind = EventKind::Denied;
        assert!(!vouches_for(&denied, 41, "aa"));
    }
}
