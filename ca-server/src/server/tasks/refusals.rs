//! Writing the aggregated refusals into the audit log.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::tick;
use crate::server::CertificateAuthority;

/// How often the refusals counted so far are written out.
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Every [`FLUSH_INTERVAL`], writes the runs of refusals whose window closed; at shutdown,
/// writes them all.
pub(in crate::server) async fn flush_refusals(
    ca: Arc<CertificateAuthority>,
    mut shutdown: watch::Receiver<bool>,
) {
    while tick(FLUSH_INTERVAL, &mut shutdown).await {
        ca.flush_refusals(false).await;
    }
    ca.flush_refusals(true).await;
}
