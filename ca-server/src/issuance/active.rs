//! What rotates together, published by the server and read by every request.

use std::sync::Arc;

use super::TrustAnchors;
use crate::authority::{Authority, AuthorityError, JwtKey};
use crate::bundle::Bundle;

/// What rotates together: the signing authority, the bundle, and the authorities whose
/// certificates clients may present. One task writes it; every request reads the latest
/// value.
#[derive(Debug)]
pub struct Active {
    /// The authority that signs.
    pub authority: Arc<Authority>,
    /// Its JWT-SVID key (none only for an authority made by a replica that predates them,
    /// until a restart makes it one).
    pub jwt: Option<Arc<JwtKey>>,
    /// The published roots.
    pub bundle: Bundle,
    /// The same roots, parsed for the self-check of every issued chain.
    pub anchors: TrustAnchors,
    /// Verifies client certificates: issued by an authority of this CA that is not retired,
    /// and valid now. Not merely chaining to some root of the bundle: an imported
    /// intermediate's root may sign for others too.
    pub clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl Active {
    /// The authority (and its JWT-SVID key) and bundle, with the bundle's roots parsed as
    /// trust anchors, and `clients`, the verifier of client certificates.
    pub fn new(
        authority: Arc<Authority>,
        jwt: Option<Arc<JwtKey>>,
        bundle: Bundle,
        clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<Self, AuthorityError> {
        let anchors =
            TrustAnchors::from_bundle(&bundle).map_err(|e| AuthorityError::BadCertificate {
                id: authority.id(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            authority,
            jwt,
            bundle,
            anchors,
            clients,
        })
    }
}
