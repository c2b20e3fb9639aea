//! Refreshing the token issuers' keys.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::Authenticator;

/// Reads the issuers' JWKS again as their refresh comes due (see
/// [`Authenticator::refresh_keys`]); the first pass, at start, fetches JWKS URLs.
pub(in crate::server) async fn refresh_keys(
    authn: Arc<Authenticator>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        authn.refresh_keys().await;
        if !super::tick(Duration::from_secs(1), &mut shutdown).await {
            return;
        }
    }
}
