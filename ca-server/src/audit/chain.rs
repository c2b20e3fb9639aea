//! Verifying the hash chain: each event's hash covers the previous event's hash and the
//! event's canonical encoding (`audit::encoding::event_hash`, applied as events are appended). The walk
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

/// Where the chain breaks: the first bad event and what is wrong there.
struct Broken {
    seq: i64,
    problem: String,
}

fn broken(seq: i64, problem: String) -> Result<(), Broken> {
    Err(Broken { seq, problem })
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
    let mut walk = Walk::new(exported, trusted);
    Ok(match walk.run(store).await? {
        Ok(()) => walk.report(),
        Err(Broken { seq, problem }) => VerifyReport::Broken { seq, problem },
    })
}

/// Events per page of the walk: memory stays constant however long the log is.
const PAGE: i64 = 2_000;

/// The walk's state: where the chain stands after the events checked so far.
struct Walk<'a> {
    exported: Option<&'a Checkpoint>,
    trusted: &'a TrustedKeys,
    /// The hash the next event must link to.
    prev: String,
    expected_seq: i64,
    first: Option<i64>,
    /// The anchor a pruned log starts at, and whether a prune event vouched for it.
    anchor: Option<(i64, String)>,
    anchor_vouched: bool,
    checked: u64,
    checkpoints: usize,
}

impl<'a> Walk<'a> {
    fn new(exported: Option<&'a Checkpoint>, trusted: &'a TrustedKeys) -> Self {
        Self {
            exported,
            trusted,
            prev: GENESIS_HASH.to_owned(),
            expected_seq: 1,
            first: None,
            anchor: None,
            anchor_vouched: false,
            checked: 0,
            checkpoints: 0,
        }
    }

    /// The whole walk: the exported checkpoint, every page, then the ends of the log.
    async fn run(&mut self, store: &Store) -> Result<Result<(), Broken>, StoreError> {
        if let Err(b) = self.check_exported() {
            return Ok(Err(b));
        }
        let mut after = 0;
        loop {
            let page = store.audit_events_after(after, PAGE).await?;
            let (Some(page_first), Some(page_last)) = (page.first(), page.last()) else {
                break;
            };
            let stored = store
                .checkpoints_between(page_first.seq, page_last.seq)
                .await?;
            let expected = match self.page_checkpoints(stored, page_first.seq..=page_last.seq) {
                Ok(expected) => expected,
                Err(b) => return Ok(Err(b)),
            };
            after = page_last.seq;
            for event in page {
                if let Err(b) = self.step(event, &expected) {
                    return Ok(Err(b));
                }
            }
        }
        let latest = store.latest_checkpoint().await?;
        Ok(self.check_ends(latest.as_ref()))
    }

    /// The exported checkpoint is genuine and signed by a trusted key.
    fn check_exported(&self) -> Result<(), Broken> {
        let Some(cp) = self.exported else {
            return Ok(());
        };
        if let Err(e) = verify_signature(cp) {
            return broken(
                cp.seq,
                format!("the exported checkpoint is not genuine: {e}"),
            );
        }
        if !self.trusted.trusts(cp) {
            return broken(
                cp.seq,
                untrusted_key("the exported checkpoint", cp, self.trusted),
            );
        }
        Ok(())
    }

    /// The checkpoints a page must agree with, by event: the stored ones (each genuine and
    /// trusted), and the exported one if it falls in the page.
    fn page_checkpoints(
        &mut self,
        stored: Vec<Checkpoint>,
        page: std::ops::RangeInclusive<i64>,
    ) -> Result<BTreeMap<i64, (String, &'static str)>, Broken> {
        let mut expected = BTreeMap::new();
        for cp in stored {
            if verify_signature(&cp).is_err() {
                let problem = format!(
                    "the stored checkpoint at event {} has a bad signature",
                    cp.seq
                );
                return Err(Broken {
                    seq: cp.seq,
                    problem,
                });
            }
            if !self.trusted.trusts(&cp) {
                let what = format!("the stored checkpoint at event {}", cp.seq);
                let problem = untrusted_key(&what, &cp, self.trusted);
                return Err(Broken {
                    seq: cp.seq,
                    problem,
                });
            }
            expected.insert(cp.seq, (cp.hash, "a stored checkpoint"));
        }
        if let Some(cp) = self.exported
            && page.contains(&cp.seq)
        {
            expected.insert(cp.seq, (cp.hash.clone(), "the exported checkpoint"));
        }
        self.checkpoints += expected.len();
        Ok(expected)
    }

    /// One event: it agrees with any checkpoint at it, comes next, links to the one before
    /// and hashes to its recorded hash; a pruned log's first event is its anchor.
    fn step(
        &mut self,
        event: EventRow,
        expected: &BTreeMap<i64, (String, &'static str)>,
    ) -> Result<(), Broken> {
        let seq = event.seq;
        if let Some((hash, what)) = expected.get(&seq)
            && *hash != event.hash
        {
            return broken(
                seq,
                format!(
                    "event {seq} differs from {what}: the log was rewritten after that checkpoint was signed"
                ),
            );
        }
        if self.first.is_none() {
            self.first = Some(seq);
            if event.kind == EventKind::Anchor {
                // A pruned log starts at an anchor: it holds the hash the chain continues
                // from. A prune event later in the chain must vouch for it.
                self.prev = event.hash.clone();
                self.expected_seq = seq + 1;
                self.anchor = Some((seq, event.hash));
                self.checked += 1;
                return Ok(());
            }
        }
        if seq != self.expected_seq {
            let missing = self.expected_seq;
            return broken(
                missing,
                format!("event {missing} is missing (the next event is {seq})"),
            );
        }
        if event.kind == EventKind::Anchor {
            return broken(
                seq,
                format!("event {seq} is an anchor in the middle of the log"),
            );
        }
        if event.prev_hash != self.prev {
            return broken(
                seq,
                format!(
                    "event {seq} does not follow event {}: it links to {} but that event hashes to {}",
                    seq - 1,
                    event.prev_hash,
                    self.prev
                ),
            );
        }
        let recomputed = event_hash(&event);
        if recomputed != event.hash {
            return broken(
                seq,
                format!(
                    "event {seq} was altered: its contents hash to {recomputed}, not the recorded {}",
                    event.hash
                ),
            );
        }
        if let Some((anchor_seq, anchor_hash)) = &self.anchor
            && vouches_for(&event, *anchor_seq, anchor_hash)
        {
            self.anchor_vouched = true;
        }
        self.prev = event.hash;
        self.expected_seq += 1;
        self.checked += 1;
        Ok(())
    }

    /// After the last event: the anchor was vouched for, no checkpoint lies beyond the head
    /// (events removed from the end), and the exported one was not pruned away.
    fn check_ends(&self, latest: Option<&Checkpoint>) -> Result<(), Broken> {
        if let Some((seq, _)) = self.anchor
            && !self.anchor_vouched
        {
            return broken(
                seq,
                format!(
                    "the log starts at an anchor (event {seq}) that no prune event vouches for"
                ),
            );
        }
        let head_seq = self.expected_seq - 1;
        let first = self.first.unwrap_or(1);
        let beyond = [
            latest.map(|c| (c.seq, "a stored checkpoint")),
            self.exported.map(|c| (c.seq, "the exported checkpoint")),
        ]
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
        if let Some(cp) = self.exported
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
        Ok(())
    }

    fn report(self) -> VerifyReport {
        VerifyReport::Intact {
            events: self.checked,
            first: self.first.unwrap_or(1),
            head_seq: self.expected_seq - 1,
            head: self.prev,
            checkpoints: self.checkpoints,
        }
    }
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
