//! The server's background tasks, one room each. Every task runs until shutdown is asked
//! (`shutdown` turns true) and is spawned by `server::start`; a new one goes here, with its
//! loop in its own module and its first run, if start-up needs it done, called by `start`
//! before anything serves.

mod checkpoint;
mod expiry;
mod follow;
mod health;
mod keys;
mod refusals;
mod renew;

use std::time::Duration;

use tokio::sync::watch;

pub(super) use checkpoint::{checkpoints, sign_checkpoint};
pub use expiry::EXPIRY_CHECK_INTERVAL;
pub(super) use expiry::{check_expiry, warn_of_expiry};
pub use follow::STORE_POLL_INTERVAL;
pub(super) use follow::{Follow, client_issuers};
pub(super) use health::Health;
pub(super) use keys::refresh_keys;
pub(super) use refusals::flush_refusals;
pub(super) use renew::renew_server_cert;

/// Sleeps for `period`; `false` if shutdown was asked first.
pub(super) async fn tick(period: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}
