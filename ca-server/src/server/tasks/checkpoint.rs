//! Signing the audit log's head into checkpoints.
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::audit::{AuditKey, record_checkpoint};
use crate::store::Store;

/// Signs the audit log's head into a checkpoint every `interval` (when it moved); `start`
/// signs the first.
pub(in crate::server) async fn checkpoints(
    store: Store,
    key: AuditKey,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    while super::tick(interval, &mut shutdown).await {
        sign_checkpoint(&store, &key).await;
    }
}

/// Signs the audit log's head if it moved since the last checkpoint. A failure is logged, not
/// fatal: the next interval tries again, and the log itself is unharmed.
pub(in crate::server) async fn sign_checkpoint(store: &Store, key: &AuditKey) {
    match record_checkpoint(store, key).await {
        Ok(Some(cp)) => debug!(seq = cp.seq, "Signed an audit checkpoint"),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "Signing an audit checkpoint failed"),
    }
}
