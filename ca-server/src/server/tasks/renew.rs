//! Renewing the server's own TLS certificate.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use crate::audit::AuditLog;
use crate::issuance::Active;
use crate::server::tls::{self, renew_in};

/// Renews the server's certificate at half its life (retrying every 30 s on failure), and
/// re-mints it whenever another authority becomes active, keeping the outgoing one's beside it
/// (see [`tls::CurrentCert`]) so that clients whose bundle predates the new root still
/// connect, and clients that trust only the new root can once the old one is retired.
pub(in crate::server) async fn renew_server_cert(
    mut current: tls::ServerCert,
    mut active: watch::Receiver<Arc<Active>>,
    names: Vec<String>,
    audit: AuditLog,
    certs: watch::Sender<Arc<tls::Served>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut signer = active.borrow().authority.id();
    let mut outgoing = None;
    let mut wait = renew_in(
        current.minted_at,
        &current.validity,
        time::OffsetDateTime::now_utc(),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = active.changed() => {
                if changed.is_err() {
                    return;
                }
                if active.borrow_and_update().authority.id() == signer {
                    continue;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let authority = Arc::clone(&active.borrow().authority);
        match tls::mint_server_cert(&authority, &names, &audit).await {
            Ok(cert) => {
                info!(authority_id = authority.id(), not_after = %crate::rfc3339::text(cert.validity.not_after), "Minted a new server certificate");
                if authority.id() != signer {
                    outgoing = tls::Outgoing::keep(&current, time::OffsetDateTime::now_utc());
                    if outgoing.is_some() {
                        info!(authority_id = signer, not_after = %crate::rfc3339::text(current.validity.not_after), "Serving the outgoing authority's certificate while its root is in the bundle");
                    }
                }
                signer = authority.id();
                certs.send_replace(Arc::new(tls::Served {
                    current: Arc::clone(&cert.certified),
                    outgoing: outgoing.clone(),
                }));
                current = cert;
                wait = renew_in(
                    current.minted_at,
                    &current.validity,
                    time::OffsetDateTime::now_utc(),
                );
            }
            Err(e) => {
                error!(error = %e, "Minting the server certificate failed; retrying in 30 s");
                wait = Duration::from_secs(30);
            }
        }
    }
}
