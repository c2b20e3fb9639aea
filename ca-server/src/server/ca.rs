//! The certificate pipeline behind `CreateCertificate`: authenticate, check, sign, record,
//! and only then answer.

use std::net::SocketAddr;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::pool::CryptoPool;
use super::status::{Refusal, code_name};
use crate::audit::AuditLog;
use crate::auth::{AuthError, Authenticator, BearerToken, Identity};
use crate::authority::{Authority, AuthorityError};
use crate::bundle::Bundle;
use crate::issuance::{self, Issued, LeafPolicy, TrustAnchors};
use crate::store::{EventKind, EventRow};

/// What rotates together: the signing authority and the bundle. One task writes it; every
/// request reads the latest value.
#[derive(Debug)]
pub struct Active {
    /// The authority that signs.
    pub authority: Arc<Authority>,
    /// The published roots.
    pub bundle: Bundle,
    /// The same roots, parsed for the self-check of every issued chain.
    pub anchors: TrustAnchors,
}

impl Active {
    /// The authority and bundle, with the bundle's roots parsed as trust anchors.
    pub fn new(authority: Arc<Authority>, bundle: Bundle) -> Result<Self, AuthorityError> {
        let anchors = TrustAnchors::from_bundle(&bundle).map_err(|detail| {
            AuthorityError::BadCertificate {
                id: authority.id(),
                detail,
            }
        })?;
        Ok(Self {
            authority,
            bundle,
            anchors,
        })
    }
}

/// A certificate request, as the transport received it.
#[derive(Debug)]
pub struct CsrRequest {
    /// The caller's address.
    pub peer: Option<SocketAddr>,
    /// The `authorization` header, if any.
    pub authorization: Option<String>,
    /// The PEM CSR.
    pub csr: String,
    /// Requested TTL in seconds; 0 for the default.
    pub validity_secs: i64,
    /// The identity asked for through `ImpersonatedIdentity`, if any.
    pub impersonated_identity: Option<String>,
}

/// The certificate authority: everything a request needs.
pub struct CertificateAuthority {
    authn: Authenticator,
    audit: AuditLog,
    policy: LeafPolicy,
    active: watch::Receiver<Arc<Active>>,
    pool: CryptoPool,
}

/// What a refusal event can say about the request.
#[derive(Default)]
struct Known {
    identity: Option<Identity>,
    csr_sha256: Option<String>,
    public_key_sha256: Option<String>,
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

impl CertificateAuthority {
    /// A pipeline over these parts.
    pub fn new(
        authn: Authenticator,
        audit: AuditLog,
        policy: LeafPolicy,
        active: watch::Receiver<Arc<Active>>,
        pool: CryptoPool,
    ) -> Self {
        Self {
            authn,
            audit,
            policy,
            active,
            pool,
        }
    }

    /// Issues a chain for `request`, or refuses; either way the decision is in the audit log
    /// before this returns (a refusal whose event cannot be written is still refused).
    pub async fn create_certificate(&self, request: CsrRequest) -> Result<Vec<String>, Refusal> {
        let now = OffsetDateTime::now_utc();
        let mut known = Known::default();
        let coming = self.audit.expect();
        let outcome = self.try_issue(&request, now, &mut known).await;
        drop(coming);
        match outcome {
            Ok(issued) => {
                let identity = known.identity.as_ref();
                let mut event = event_for(EventKind::Issued, now, identity, request.peer);
                event.serial = Some(issued.serial.clone());
                event.not_before = Some(issued.validity.not_before.unix_timestamp());
                event.not_after = Some(issued.validity.not_after.unix_timestamp());
                event.authority_id = Some(issued.authority_id);
                event.public_key_sha256 = Some(issued.csr.public_key_sha256.clone());
                event.csr_sha256 = Some(issued.csr.csr_sha256.clone());
                match self.audit.record(event).await {
                    Ok(seq) => {
                        // The audit log is the record of every issuance; this line is for
                        // debugging, and would cost a write per request at info level.
                        debug!(
                            spiffe_id = identity.map(|i| i.spiffe_id.to_string()).unwrap_or_default(),
                            serial = %issued.serial,
                            audit_seq = seq,
                            "Issued certificate"
                        );
                        Ok(issued.chain)
                    }
                    Err(e) => {
                        warn!(serial = %issued.serial, error = %e, "Certificate withheld: its audit record was not committed");
                        Err(Refusal::Audit(e))
                    }
                }
            }
            Err(refusal) => {
                let code = refusal.code();
                let mut event = event_for(
                    EventKind::Denied,
                    now,
                    known.identity.as_ref(),
                    request.peer,
                );
                event.code = Some(code_name(code).to_owned());
                event.reason = Some(refusal.to_string());
                event.csr_sha256 = known.csr_sha256;
                event.public_key_sha256 = known.public_key_sha256;
                if event.spiffe_id.is_none() {
                    event.spiffe_id = request.impersonated_identity.clone();
                }
                if code == tonic::Code::Internal {
                    // Not the caller's doing: a bug or a broken authority. Someone must look.
                    error!(alert = true, reason = %refusal, peer = ?request.peer, "ALERT: certificate request failed inside the CA; nothing was returned");
                } else {
                    info!(code = code_name(code), reason = %refusal, peer = ?request.peer, "Refused certificate request");
                }
                if let Err(e) = self.audit.record(event).await {
                    warn!(error = %e, "Refusal could not be recorded in the audit log");
                }
                Err(refusal)
            }
        }
    }

    async fn try_issue(
        &self,
        request: &CsrRequest,
        now: OffsetDateTime,
        known: &mut Known,
    ) -> Result<Issued, Refusal> {
        let header = request.authorization.as_deref().ok_or(AuthError::NoToken)?;
        let token = BearerToken::from_header(header)?;
        let identity = self
            .authn
            .authenticate(&token, now.unix_timestamp())
            .await?;
        drop(token);
        known.identity = Some(identity.clone());

        if let Some(asked) = &request.impersonated_identity
            && *asked != identity.spiffe_id.to_string()
        {
            return Err(Refusal::Impersonation {
                caller: identity.spiffe_id.to_string(),
                requested: asked.clone(),
            });
        }

        let ttl = issuance::resolve_ttl(request.validity_secs, &self.policy)
            .map_err(issuance::IssueError::from)?;
        let active = Arc::clone(&self.active.borrow());
        let policy = self.policy;
        let csr_pem = request.csr.clone();
        // Proof of possession and signing are CPU work: off the reactor.
        let (csr, result) = self
            .pool
            .run(move || {
                let csr = match issuance::check_csr(&csr_pem) {
                    Ok(csr) => csr,
                    Err(e) => return (None, Err(e.into())),
                };
                let result = issuance::issue(
                    &active.authority,
                    &active.anchors,
                    &policy,
                    &identity,
                    csr.clone(),
                    ttl,
                    now,
                );
                (Some(csr), result)
            })
            .await?;
        if let Some(csr) = csr {
            // A refusal after the CSR checked out still records which CSR it was.
            known.csr_sha256 = Some(csr.csr_sha256);
            known.public_key_sha256 = Some(csr.public_key_sha256);
        }
        Ok(result?)
    }
}

/// An event of `kind` about `identity`, with the common fields filled in.
fn event_for(
    kind: EventKind,
    now: OffsetDateTime,
    identity: Option<&Identity>,
    peer: Option<SocketAddr>,
) -> EventRow {
    let mut event = EventRow::new(kind);
    event.time_ms = unix_ms(now);
    event.peer = peer.map(|p| p.to_string());
    if let Some(id) = identity {
        event.spiffe_id = Some(id.spiffe_id.to_string());
        event.namespace = Some(id.namespace.clone());
        event.service_account = Some(id.service_account.clone());
        event.pod_name = id.pod_name.clone();
        event.pod_uid = id.pod_uid.clone();
        event.token_issuer = Some(id.issuer.clone());
    }
    event
}
