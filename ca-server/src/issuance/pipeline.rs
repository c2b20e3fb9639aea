//! The certificate pipeline behind `CreateCertificate`: authenticate, check, sign, record,
//! and only then answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::active::Active;
use super::pool::CryptoPool;
use super::refusal::Refusal;
use super::refusals::{Known, REFUSAL_WINDOW, RefusalKey, event_for};
use crate::audit::AuditLog;
use crate::audit::{EventKind, EventRow};
use crate::auth::node::ImpersonationPolicy;
use crate::auth::{AuthError, Authenticator, BearerToken, Identity};
use crate::issuance::{self, Issued, LeafPolicy};
use crate::limits::{Aggregator, Rate, RateLimiter, peer_key};
use crate::untrusted;

/// Who a request comes from, as the transport received it: the caller's address and its
/// credential. Its `Debug` leaves the `authorization` header out: it carries the token.
pub struct Caller {
    /// The caller's address.
    pub peer: Option<SocketAddr>,
    /// The `authorization` header, if any.
    pub authorization: Option<String>,
    /// The `clusterid` header (Istio's `CLUSTER_ID`), if any.
    pub cluster_id: Option<String>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("peer", &self.peer)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("cluster_id", &self.cluster_id)
            .finish()
    }
}

/// A certificate request, as the transport received it.
pub struct CsrRequest {
    /// Who asks.
    pub caller: Caller,
    /// The PEM CSR.
    pub csr: String,
    /// Requested TTL in seconds; 0 for the default.
    pub validity_secs: i64,
    /// The identity asked for through `ImpersonatedIdentity`, if any.
    pub impersonated_identity: Option<String>,
}

impl std::fmt::Debug for CsrRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrRequest")
            .field("caller", &self.caller)
            .field("csr_bytes", &self.csr.len())
            .field("validity_secs", &self.validity_secs)
            .field("impersonated_identity", &self.impersonated_identity)
            .finish()
    }
}

/// The certificate authority: everything a request needs.
pub struct CertificateAuthority {
    authn: Arc<Authenticator>,
    impersonation: ImpersonationPolicy,
    pub(super) audit: AuditLog,
    pub(super) policy: LeafPolicy,
    pub(super) active: watch::Receiver<Arc<Active>>,
    pub(super) pool: CryptoPool,
    limits: Limits,
    /// The `iss` of JWT-SVIDs (`--jwt-issuer`).
    pub(super) jwt_issuer: Option<String>,
    pub(super) refusals: Aggregator<RefusalKey, EventRow>,
}

/// The abuse limits of [`CertificateAuthority`].
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Issuances per SPIFFE ID.
    pub per_identity: Rate,
    /// Failed authentications per peer address.
    pub unauthenticated_per_peer: Rate,
}

struct Limits {
    settings: LimitSettings,
    per_identity: RateLimiter<String>,
    unauthenticated: RateLimiter<IpAddr>,
}

impl CertificateAuthority {
    /// A pipeline over these parts.
    pub fn new(
        authn: Arc<Authenticator>,
        impersonation: ImpersonationPolicy,
        audit: AuditLog,
        policy: LeafPolicy,
        active: watch::Receiver<Arc<Active>>,
        pool: CryptoPool,
        limits: LimitSettings,
    ) -> Self {
        Self {
            authn,
            impersonation,
            audit,
            policy,
            active,
            pool,
            limits: Limits {
                settings: limits,
                per_identity: RateLimiter::new(limits.per_identity),
                unauthenticated: RateLimiter::new(limits.unauthenticated_per_peer),
            },
            jwt_issuer: None,
            refusals: Aggregator::new(REFUSAL_WINDOW),
        }
    }

    /// JWT-SVIDs name `issuer` as their `iss` (and the OIDC discovery document does too).
    pub fn with_jwt_issuer(mut self, issuer: String) -> Self {
        self.jwt_issuer = Some(issuer);
        self
    }

    /// Issues a chain for `request`, or refuses; either way the decision is in the audit log
    /// before this returns (a refusal whose event cannot be written is still refused).
    pub async fn create_certificate(&self, request: CsrRequest) -> Result<Vec<String>, Refusal> {
        let started = Instant::now();
        let now = OffsetDateTime::now_utc();
        let mut known = Known::default();
        let coming = self.audit.expect();
        let outcome = self.try_issue(&request, now, &mut known).await;
        drop(coming);
        match outcome {
            Ok(issued) => {
                let identity = known.identity.as_ref();
                let mut event = event_for(EventKind::Issued, now, &known, request.caller.peer);
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
                        let m = crate::metrics::metrics();
                        m.issuances.inc();
                        m.issuance_seconds.observe(started.elapsed().as_secs_f64());
                        Ok(issued.chain)
                    }
                    Err(e) => {
                        warn!(serial = %issued.serial, error = %e, "Certificate withheld: its audit record was not committed");
                        Err(Refusal::Audit(e))
                    }
                }
            }
            Err(refusal) => {
                let requested = request
                    .impersonated_identity
                    .as_deref()
                    .map(untrusted::claim);
                self.refuse(request.caller.peer, requested, now, known, &refusal)
                    .await;
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
        let caller = self.authenticate(&request.caller, now).await?;
        let own_id = caller.spiffe_id.to_string();
        // The rate is per identity issued; a node proxy's are counted per node as well, since
        // every node's proxy asks for the identities of its own pods.
        let (identity, limited) = match request.impersonated_identity.as_deref() {
            Some(asked) if asked != own_id => {
                known.caller = Some(caller.clone());
                let granted = self.impersonation.authorize(&caller, asked).await?;
                let on = granted.node.as_deref().unwrap_or(&own_id);
                let limited = format!("{} (for {on})", granted.spiffe_id);
                (granted, limited)
            }
            _ => (caller, own_id),
        };
        known.identity = Some(identity.clone());
        self.take_identity_budget(limited, Instant::now())?;

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

impl CertificateAuthority {
    /// Takes one from `identity`'s budget (`--identity-rate`), or refuses.
    pub(super) fn take_identity_budget(
        &self,
        identity: String,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.limits
            .per_identity
            .take(&identity, now)
            .map_err(|wait| {
                let rate = self.limits.settings.per_identity;
                Refusal::IdentityRate {
                    identity,
                    per_second: rate.per_second,
                    burst: rate.burst,
                    retry_after_ms: wait.as_millis(),
                }
            })
    }

    /// The caller's identity from its token. A token verified before (and still good) costs
    /// nothing and is never refused for what others at its address did. Anything else is
    /// charged to the peer's failed-authentication budget before it is looked at, so that
    /// the charge holds whatever happens next (the client gives up, the API server is slow);
    /// it is given back when the token checks out. A peer with no budget left is refused
    /// unread.
    pub(super) async fn authenticate(
        &self,
        caller: &Caller,
        now: OffsetDateTime,
    ) -> Result<Identity, Refusal> {
        let peer = caller.peer.map(|p| peer_key(p.ip()));
        let authorization = caller.authorization.as_deref();
        let cluster_id = caller.cluster_id.as_deref();
        let token = match authorization {
            Some(header) => BearerToken::from_header(header).ok(),
            None => None,
        };
        if let Some(token) = &token
            && let Some(identity) = self
                .authn
                .remembered(token, cluster_id, now.unix_timestamp())
        {
            return Ok(identity);
        }
        if let Some(peer) = peer
            && let Err(wait) = self.limits.unauthenticated.take(&peer, Instant::now())
        {
            return Err(Refusal::PeerRate {
                peer,
                retry_after_ms: wait.as_millis(),
            });
        }
        // Only now is the header looked at closely (and its error, if any, given).
        let token = match token {
            Some(token) => token,
            None => {
                let header = authorization.ok_or(AuthError::NoToken)?;
                BearerToken::from_header(header)?
            }
        };
        let identity = self
            .authn
            .verify_new(&token, cluster_id, now.unix_timestamp())
            .await?;
        if let Some(peer) = peer {
            self.limits.unauthenticated.give_back(&peer, Instant::now());
        }
        Ok(identity)
    }
}
