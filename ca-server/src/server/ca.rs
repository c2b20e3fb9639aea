//! The certificate pipeline behind `CreateCertificate`: authenticate, check, sign, record,
//! and only then answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::limits::{Aggregator, Rate, RateLimiter, Repeated, peer_key};
use super::pool::CryptoPool;
use super::status::{Refusal, code_name};
use crate::audit::AuditLog;
use crate::auth::node::ImpersonationPolicy;
use crate::auth::{AuthError, Authenticator, BearerToken, Identity};
use crate::authority::{Authority, AuthorityError};
use crate::bundle::Bundle;
use crate::issuance::{self, Issued, LeafPolicy, TrustAnchors};
use crate::store::{EventKind, EventRow};
use crate::untrusted;

/// What rotates together: the signing authority, the bundle, and the authorities whose
/// certificates clients may present. One task writes it; every request reads the latest
/// value.
#[derive(Debug)]
pub struct Active {
    /// The authority that signs.
    pub authority: Arc<Authority>,
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
    /// The authority and bundle, with the bundle's roots parsed as trust anchors, and
    /// client certificates verified against `issuers`: the signing certificates (PEM) of
    /// every authority not retired.
    pub fn new(
        authority: Arc<Authority>,
        bundle: Bundle,
        issuers: &[String],
    ) -> Result<Self, AuthorityError> {
        let bad = |detail: String| AuthorityError::BadCertificate {
            id: authority.id(),
            detail,
        };
        let anchors = TrustAnchors::from_bundle(&bundle).map_err(bad)?;
        let clients = super::tls::client_verifier(issuers).map_err(bad)?;
        Ok(Self {
            authority,
            bundle,
            anchors,
            clients,
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
    /// The `clusterid` header (Istio's `CLUSTER_ID`), if any.
    pub cluster_id: Option<String>,
    /// The PEM CSR.
    pub csr: String,
    /// Requested TTL in seconds; 0 for the default.
    pub validity_secs: i64,
    /// The identity asked for through `ImpersonatedIdentity`, if any.
    pub impersonated_identity: Option<String>,
}

/// The certificate authority: everything a request needs.
pub struct CertificateAuthority {
    authn: Arc<Authenticator>,
    impersonation: ImpersonationPolicy,
    audit: AuditLog,
    policy: LeafPolicy,
    active: watch::Receiver<Arc<Active>>,
    pool: CryptoPool,
    limits: Limits,
    refusals: Aggregator<RefusalKey, EventRow>,
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

/// Refusals alike enough to be counted in one event: the peer's address (IPv6 by its /64),
/// the code, the check that refused, and the identity the caller proved, if it got that
/// far. Never anything the caller merely claims, nor the message, which a flood can vary
/// at will.
type RefusalKey = (Option<IpAddr>, &'static str, &'static str, Option<String>);

/// How long identical refusals are counted before their event is written.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// What an event can say about the request.
#[derive(Default)]
struct Known {
    /// The identity issued (or to be): the caller's own, or the one it may have instead.
    identity: Option<Identity>,
    /// The caller, once its token checked out, when it asked for an identity other than
    /// its own.
    caller: Option<Identity>,
    csr_sha256: Option<String>,
    public_key_sha256: Option<String>,
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
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
            refusals: Aggregator::new(REFUSAL_WINDOW),
        }
    }

    /// Writes one event for each run of refusals whose window has closed (all of them when
    /// `all`, at shutdown).
    pub async fn flush_refusals(&self, all: bool) {
        for (key, run) in self.refusals.due(Instant::now(), all) {
            self.record_run(key, run).await;
        }
    }

    async fn record_run(&self, key: Option<RefusalKey>, run: Repeated<EventRow>) {
        let mut event = run.sample;
        event.count = Some(i64::try_from(run.count).unwrap_or(i64::MAX));
        let like = match &key {
            Some(_) => "refusals like this one",
            // Past the cap on kinds counted at once: refusals of many kinds, many peers.
            None => "refusals of many kinds (too many to count apart), the last like this one,",
        };
        event.reason = Some(untrusted::cut(
            &format!(
                "{} ({} {like} within {} s)",
                event.reason.as_deref().unwrap_or_default(),
                run.count,
                run.window.as_secs()
            ),
            untrusted::REASON_BYTES,
        ));
        let peer = key.and_then(|(peer, ..)| peer);
        info!(code = event.code.as_deref().unwrap_or_default(), peer = ?peer, count = run.count, "Refused certificate requests (repeated)");
        if let Err(e) = self.audit.record(event).await {
            warn!(error = %e, "Refusals could not be recorded in the audit log");
        }
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
                let mut event = event_for(EventKind::Issued, now, &known, request.peer);
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
                self.refuse(&request, now, known, &refusal).await;
                Err(refusal)
            }
        }
    }

    /// Counts, logs and records a refusal. The event holds only what a verified credential
    /// or the node check established; what the caller claimed goes into `requested`, cut and
    /// escaped like the reason.
    async fn refuse(
        &self,
        request: &CsrRequest,
        now: OffsetDateTime,
        known: Known,
        refusal: &Refusal,
    ) {
        let code = refusal.code();
        let check = refusal.metric_reason();
        crate::metrics::metrics()
            .refusals
            .get_or_create(&crate::metrics::RefusalLabels {
                code: code_name(code),
                reason: check,
            })
            .inc();
        let mut event = event_for(EventKind::Denied, now, &known, request.peer);
        event.code = Some(code_name(code).to_owned());
        event.reason = Some(untrusted::cut(
            &refusal.to_string(),
            untrusted::REASON_BYTES,
        ));
        event.requested = request
            .impersonated_identity
            .as_deref()
            .map(untrusted::claim);
        event.csr_sha256 = known.csr_sha256;
        event.public_key_sha256 = known.public_key_sha256;
        if code == tonic::Code::Internal {
            // Not the caller's doing: a bug or a broken authority. Someone must look.
            error!(alert = true, reason = %refusal, peer = ?request.peer, "ALERT: certificate request failed inside the CA; nothing was returned");
        }
        // Refusals of one kind in a burst become one event with a count, so that a flood can
        // fill neither the disk with records nor the log with lines.
        let proven = known
            .caller
            .as_ref()
            .or(known.identity.as_ref())
            .map(|id| id.spiffe_id.to_string());
        let key = (
            request.peer.map(|p| peer_key(p.ip())),
            code_name(code),
            check,
            proven,
        );
        let (record_now, ended) = self.refusals.admit(key, event.clone(), Instant::now());
        if let Some((key, run)) = ended {
            self.record_run(key, run).await;
        }
        if record_now {
            if code != tonic::Code::Internal {
                info!(code = code_name(code), reason = %refusal, peer = ?request.peer, "Refused certificate request");
            }
            if let Err(e) = self.audit.record(event).await {
                warn!(error = %e, "Refusal could not be recorded in the audit log");
            }
        }
    }

    async fn try_issue(
        &self,
        request: &CsrRequest,
        now: OffsetDateTime,
        known: &mut Known,
    ) -> Result<Issued, Refusal> {
        let caller = self.authenticate(request, now).await?;
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
        if let Err(wait) = self.limits.per_identity.take(&limited, Instant::now()) {
            let rate = self.limits.settings.per_identity;
            return Err(Refusal::IdentityRate {
                identity: limited,
                per_second: rate.per_second,
                burst: rate.burst,
                retry_after_ms: wait.as_millis(),
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

impl CertificateAuthority {
    /// The caller's identity from its token. A token verified before (and still good) costs
    /// nothing and is never refused for what others at its address did. Anything else is
    /// charged to the peer's failed-authentication budget before it is looked at, so that
    /// the charge holds whatever happens next (the client gives up, the API server is slow);
    /// it is given back when the token checks out. A peer with no budget left is refused
    /// unread.
    async fn authenticate(
        &self,
        request: &CsrRequest,
        now: OffsetDateTime,
    ) -> Result<Identity, Refusal> {
        let peer = request.peer.map(|p| peer_key(p.ip()));
        let token = match request.authorization.as_deref() {
            Some(header) => BearerToken::from_header(header).ok(),
            None => None,
        };
        if let Some(token) = &token
            && let Some(identity) =
                self.authn
                    .remembered(token, request.cluster_id.as_deref(), now.unix_timestamp())
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
                let header = request.authorization.as_deref().ok_or(AuthError::NoToken)?;
                BearerToken::from_header(header)?
            }
        };
        let identity = self
            .authn
            .verify_new(&token, request.cluster_id.as_deref(), now.unix_timestamp())
            .await?;
        if let Some(peer) = peer {
            self.limits.unauthenticated.give_back(&peer, Instant::now());
        }
        Ok(identity)
    }
}

/// An event of `kind` about what is `known` of the request, with the common fields filled
/// in: the identity issued (or asked for), and the caller when that is someone else.
fn event_for(
    kind: EventKind,
    now: OffsetDateTime,
    known: &Known,
    peer: Option<SocketAddr>,
) -> EventRow {
    let mut event = EventRow::new(kind);
    event.time_ms = unix_ms(now);
    event.peer = peer.map(|p| p.to_string());
    if let Some(id) = &known.identity {
        event.spiffe_id = Some(id.spiffe_id.to_string());
        event.namespace = Some(id.namespace.clone());
        event.service_account = Some(id.service_account.clone());
        event.pod_name = id.pod_name.clone();
        event.pod_uid = id.pod_uid.clone();
        event.token_issuer = Some(id.issuer.clone());
        event.node = id.node.clone();
    }
    if let Some(caller) = &known.caller {
        event.caller = Some(caller.spiffe_id.to_string());
        event.token_issuer = Some(caller.issuer.clone());
        if event.node.is_none() {
            event.node = caller.node.clone();
        }
    }
    event
}
