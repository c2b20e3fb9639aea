//! What the agent holds for its workloads (its identity's X.509-SVID and the trust bundle),
//! and how each change reaches every open stream: one `watch` channel, so a stream always
//! sends the newest whole set and never a backlog.

use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::spiffe::SpiffeId;

/// An X.509-SVID and its private key.
pub struct Svid {
    /// The identity it certifies.
    pub spiffe_id: SpiffeId,
    /// DER, leaf first, then any intermediates; never the root.
    pub chain: Vec<Vec<u8>>,
    /// Unencrypted PKCS#8 DER.
    pub key: Zeroizing<Vec<u8>>,
    /// The leaf's end.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("chain", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The trust bundle: every root a peer's certificate may chain to.
#[derive(Debug, PartialEq, Eq)]
pub struct Roots {
    /// `spiffe://<trust domain>`, the key SPIFFE bundles go by.
    pub trust_domain_id: String,
    /// DER, one per root.
    pub certificates: Vec<Vec<u8>>,
    /// The CA's bundle sequence it came with (0 when read from a file).
    pub sequence: i64,
    /// The JWT-SVID keys, a JWK Set (JSON), as the CA sent them.
    pub jwt_jwks: String,
    /// The signing certificates (DER) of tainted authorities: an SVID one of them signed is
    /// replaced at once.
    pub tainted: Vec<Vec<u8>>,
    /// The `kid`s of tainted authorities' JWT-SVID keys.
    pub tainted_kids: Vec<String>,
}

impl Roots {
    /// The roots concatenated, as the Workload API carries a bundle.
    pub fn concatenated(&self) -> Vec<u8> {
        self.certificates.concat()
    }
}

/// What the agent serves now.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// None until the first SVID arrives (or is read back from disk).
    pub svid: Option<Arc<Svid>>,
    /// None until the first bundle arrives.
    pub roots: Option<Arc<Roots>>,
}

/// The one place the agent's material changes; streams subscribe to it.
#[derive(Debug, Clone)]
pub struct Shelf(Arc<watch::Sender<Held>>);

impl Default for Shelf {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(Held::default())))
    }
}

impl Shelf {
    /// Puts a new SVID on the shelf; every stream sends the new set.
    pub fn set_svid(&self, svid: Svid) {
        self.0.send_modify(|held| held.svid = Some(Arc::new(svid)));
    }

    /// Puts a bundle on the shelf if it differs from the one there.
    pub fn set_roots(&self, roots: Roots) {
        self.0.send_if_modified(|held| {
            let same = held.roots.as_deref().is_some_and(|old| {
                old.trust_domain_id == roots.trust_domain_id
                    && old.certificates == roots.certificates
                    && old.jwt_jwks == roots.jwt_jwks
                    && old.tainted == roots.tainted
            });
            if !same {
                held.roots = Some(Arc::new(roots));
            }
            !same
        });
    }

    /// What is held now.
    pub fn now(&self) -> Held {
        self.0.borrow().clone()
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<Held> {
        self.0.subscribe()
    }
}
