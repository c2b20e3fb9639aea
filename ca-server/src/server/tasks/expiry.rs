//! Warning of authorities near their end.
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::store::Store;

/// How often the authorities' expiry is checked (and warned about, while it is near).
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Logs a warning, hourly, for each authority in the bundle that expires within `window`
/// (`start` makes the first check itself, before it serves). `/readyz` stays green: the
/// server still works; `/metrics` (`ca_authority_expiring`) and `root status --check` carry
/// it to monitoring.
pub(in crate::server) async fn warn_of_expiry(
    store: Store,
    window: time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    while super::tick(EXPIRY_CHECK_INTERVAL, &mut shutdown).await {
        check_expiry(&store, window).await;
    }
}

/// One check of [`warn_of_expiry`].
pub(in crate::server) async fn check_expiry(store: &Store, window: time::Duration) {
    match store.authorities().await {
        Ok(authorities) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for e in crate::authority::expiry::expiring(&authorities, now, window) {
                warn!(authority_id = e.id, state = %e.state, "{e}");
            }
        }
        Err(e) => warn!(error = %e, "Reading the authorities to check their expiry failed"),
    }
}
