//! Following the store: authority changes made by the CLI or another replica become the
//! server's signer, bundle and `trust-bundle.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::authority::{Authority, AuthorityError, KeyStore};
use crate::bundle;
use crate::issuance::Active;
use crate::server::http::Readiness;
use crate::store::{AuthorityChanges, AuthorityState, AuthorityVersion, Store, StoreError};

/// How often a server polls the store for authority changes (made by the CLI or another
/// replica): changes reach every server within two polls.
pub const STORE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The signing certificates (PEM) of the authorities not retired: who may have issued a
/// client certificate this server accepts.
pub(in crate::server) async fn client_issuers(store: &Store) -> Result<Vec<String>, StoreError> {
    Ok(store
        .authorities()
        .await?
        .into_iter()
        .filter(|a| a.state != AuthorityState::Retired)
        .map(|a| a.cert_pem)
        .collect())
}

/// What following the store needs besides the channel it writes.
pub(in crate::server) struct Follow {
    /// The store followed.
    pub store: Store,
    /// Where `trust-bundle.pem` is written.
    pub data_dir: PathBuf,
    /// Where the authorities' keys are.
    pub keys: Arc<KeyStore>,
    /// Told whether an active authority is loaded.
    pub readiness: Arc<Readiness>,
}

impl Follow {
    /// Polls the store for authority changes made by the CLI (or another server) and
    /// publishes them: the new signer, the new bundle, and `trust-bundle.pem`. The one writer
    /// of `active`.
    pub(in crate::server) async fn run(
        self,
        mut version: AuthorityVersion,
        active: watch::Sender<Arc<Active>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Self {
            store,
            data_dir,
            keys,
            readiness,
        } = self;
        // On PostgreSQL a change made through any replica or the CLI is announced; the poll
        // stays as the fallback should the listening connection drop.
        let mut changes = store.authority_changes().await.unwrap_or_else(|e| {
            warn!(error = %e, "Listening for authority changes failed; polling only");
            AuthorityChanges::none()
        });
        loop {
            tokio::select! {
                _ = tokio::time::sleep(STORE_POLL_INTERVAL) => {}
                notified = changes.next() => {
                    if let Err(e) = notified {
                        warn!(error = %e, "Listening for authority changes failed; polling only");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let current = match store.authority_version().await {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "Polling the store for authority changes failed");
                    continue;
                }
            };
            if current == version {
                continue;
            }
            match reload(&store, &data_dir, &keys, current, &active).await {
                Ok(()) => {
                    readiness.authority.store(true, Ordering::Release);
                    version = current;
                }
                Err(e) => {
                    // Keep signing with what we have; retry on the next poll.
                    error!(error = %e, "Applying an authority change failed; retrying");
                    if current.active.is_none() {
                        readiness.authority.store(false, Ordering::Release);
                    }
                }
            }
        }
    }
}

/// Why an authority change could not be applied (the server keeps what it has).
#[derive(Debug, thiserror::Error)]
pub(in crate::server) enum ReloadError {
    /// Reading the store.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Loading the authority now active.
    #[error("{0}")]
    Authority(#[from] AuthorityError),
    /// Writing `trust-bundle.pem`.
    #[error("writing {}: {source}", .path.display())]
    BundleFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Publishes the authorities as they stand at `version`: the active one (loaded again only
/// if it changed), the bundle (and its file, if its sequence moved), the client issuers.
async fn reload(
    store: &Store,
    data_dir: &Path,
    keys: &KeyStore,
    version: AuthorityVersion,
    active: &watch::Sender<Arc<Active>>,
) -> Result<(), ReloadError> {
    let current = Arc::clone(&active.borrow());
    let (authority, jwt) = match version.active {
        Some(id) if id == current.authority.id() && current.jwt.is_some() => {
            (Arc::clone(&current.authority), current.jwt.clone())
        }
        Some(_) => {
            let record = store
                .active_authority()
                .await?
                .ok_or(AuthorityError::NoneActive)?;
            let jwt = crate::authority::load_jwt_key(store, keys, record.id).await?;
            (Arc::new(Authority::load(&record, keys)?), jwt.map(Arc::new))
        }
        None => return Err(AuthorityError::NoneActive.into()),
    };
    let bundle = bundle::load(store).await?;
    if bundle.sequence != current.bundle.sequence {
        bundle::write_bundle_file(data_dir, &bundle).map_err(|source| ReloadError::BundleFile {
            path: bundle::bundle_file(data_dir),
            source,
        })?;
    }
    let issuers = client_issuers(store).await?;
    info!(
        authority_id = authority.id(),
        bundle_sequence = version.sequence,
        roots = bundle.roots_pem.len(),
        authorities = issuers.len(),
        "Applied an authority change"
    );
    active.send_replace(Arc::new(crate::server::tls::active(
        authority, jwt, bundle, &issuers,
    )?));
    Ok(())
}
