//! The certificate pipeline behind `CreateCertificate`: authenticate, check, sign, record,
//! and only then answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::limits::{Aggregator, Rate, RateLimiter, Repeated};
use super::pool::CryptoPool;
use super::status::{Refusal, code_name};
use crate::audit::AuditLog;
use crate::auth::node::ImpersonationPolicy;
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
    authn: Authenticator,
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

/// Refusals alike enough to be counted in one event: same peer address, code, identity and
/// reason.
type RefusalKey = (Option<IpAddr>, &'static str, Option<String>, String);

/// How long identical refusals are counted before their event is written.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// What an event can say about the request.
#[derive(Default)]
struct Known {
    /// The identity issued (or to be): the caller's own, or the one it may have instead.
    identity: Option<Identity>,
    /// The caller, when it asked for an identity other than its own.
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
        authn: Authenticator,
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

    /// Writes one event for each run of identical refusals whose window has closed (all of
    /// them when `all`, at shutdown).
    pub async fn flush_refusals(&self, all: bool) {
        for ((peer, code, _, _), run) in self.refusals.due(Instant::now(), all) {
            self.record_run(peer, code, run).await;
        }
    }

    async fn record_run(&self, peer: Option<IpAddr>, code: &str, run: Repeated<EventRow>) {
        let mut event = run.sample;
        event.count = Some(i64::try_from(run.count).unwrap_or(i64::MAX));
        event.reason = Some(format!(
            "{} ({} refusals like this one within {} s; the first was recorded on its own)",
            event.reason.as_deref().unwrap_or_default(),
            run.count,
            REFUSAL_WINDOW.as_secs()
        ));
        info!(code, peer = ?peer, count = run.count, "Refused certificate requests (repeated)");
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
                let code = refusal.code();
                crate::metrics::metrics()
                    .refusals
                    .get_or_create(&crate::metrics::RefusalLabels {
                        code: code_name(code),
                        reason: refusal.metric_reason(),
                    })
                    .inc();
                let mut event = event_for(EventKind::Denied, now, &known, request.peer);
                event.code = Some(code_name(code).to_owned());
                event.reason = Some(refusal.to_string());
                event.csr_sha256 = known.csr_sha256;
                event.public_key_sha256 = known.public_key_sha256;
                if event.spiffe_id.is_none() {
                    // Refused before the identity asked for was granted: record what was
                    // asked, so that the refusal is found under that identity too.
                    event.spiffe_id = request.impersonated_identity.clone();
                    if let Some(asked) = request
                        .impersonated_identity
                        .as_deref()
                        .and_then(|id| crate::spiffe::SpiffeId::parse(id).ok())
                        && let Some((ns, sa)) = asked.service_account()
                    {
                        event.namespace = Some(ns.to_owned());
                        event.service_account = Some(sa.to_owned());
                    }
                }
                let ip = request.peer.map(|p| p.ip());
                if code == tonic::Code::Unauthenticated
                    && let Some(ip) = ip
                {
                    // Counted against the peer: past its limit it is refused before any work.
                    let _ = self.limits.unauthenticated.take(&ip, Instant::now());
                }
                if code == tonic::Code::Internal {
                    // Not the caller's doing: a bug or a broken authority. Someone must look.
                    error!(alert = true, reason = %refusal, peer = ?request.peer, "ALERT: certificate request failed inside the CA; nothing was returned");
                }
                // Identical refusals in a burst become one event with a count, so that a
                // flood cannot fill the disk with records (or the log with lines).
                let key = (
                    ip,
                    code_name(code),
                    event.spiffe_id.clone(),
                    refusal.kind_key(),
                );
                let (record_now, ended) = self.refusals.admit(key, event.clone(), Instant::now());
                if let Some(run) = ended {
                    self.record_run(ip, code_name(code), run).await;
                }
                if record_now {
                    if code != tonic::Code::Internal {
                        info!(code = code_name(code), reason = %refusal, peer = ?request.peer, "Refused certificate request");
                    }
                    if let Err(e) = self.audit.record(event).await {
                        warn!(error = %e, "Refusal could not be recorded in the audit log");
                    }
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
        if let Some(peer) = request.peer
            && let Err(wait) = self
                .limits
                .unauthenticated
                .check(&peer.ip(), Instant::now())
        {
            return Err(Refusal::PeerRate {
                peer: peer.ip(),
                retry_after_ms: wait.as_millis(),
            });
        }
        let header = request.authorization.as_deref().ok_or(AuthError::NoToken)?;
        let token = BearerToken::from_header(header)?;
        let caller = self
            .authn
            .authenticate(&token, request.cluster_id.as_deref(), now.unix_timestamp())
            .await?;
        drop(token);
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
