//! The audit log: every decision is one event, committed (in groups) before the answer goes
//! out, and hash-chained so that `audit verify` finds any edit, removal or reordering.

mod chain;
pub mod checkpoint;
pub mod encoding;
pub mod event;
mod log;
pub mod query;
pub mod render;

pub use chain::{VerifyReport, verify_chain};
pub use checkpoint::{AuditKey, CheckpointError, TrustedKeys};
pub use encoding::{GENESIS_HASH, event_hash};
pub use event::{EventKind, EventRow};
pub use query::{FilterError, Filters};

use crate::store::{Checkpoint, Store, StoreError};

/// Signs and records a checkpoint of the current head, unless the latest one already covers
/// it. Returns the new checkpoint, if one was made.
pub async fn record_checkpoint(
    store: &Store,
    key: &AuditKey,
) -> Result<Option<Checkpoint>, StoreError> {
    let Some((seq, hash)) = store.audit_head().await? else {
        return Ok(None);
    };
    if store
        .latest_checkpoint()
        .await?
        .is_some_and(|c| c.seq == seq)
    {
        return Ok(None);
    }
    let checkpoint = key.sign(seq, &hash);
    store.insert_checkpoint(&checkpoint).await?;
    Ok(Some(checkpoint))
}
pub use log::{AuditError, AuditLog};

/// The OS user behind a change, for authority events: `$USER`, else `$LOGNAME`, else the uid.
pub fn operator_name() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var)
            && !name.is_empty()
        {
            return name;
        }
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| {
                    uids.split_whitespace()
                        .next()
                        .map(|uid| format!("uid {uid}"))
                })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
