//! Pod certificates: the answer to a Kubernetes PodCertificateRequest, decided and recorded
//! the way `CreateCertificate`'s is, pure of the Kubernetes API. The API server vouches for
//! the request (the pod runs as that service account on the node whose kubelet asked, and
//! the kubelet holds the key), so there is no token to check: the identity is the pod's
//! service account, the policy may still refuse it, and the key must be one we certify.
//! Every answer is in the audit log before it is returned, so before any status write.

use std::sync::Arc;

use time::{Duration, OffsetDateTime};
use tracing::{error, info};

use super::pipeline::CertificateAuthority;
use super::refusal::Refusal;
use super::refusals::{Known, event_for};
use crate::audit::{EventKind, EventRow};
use crate::auth::{Identity, IssuerId};
use crate::class::{Class, Classify};
use crate::issuance::{self, CheckedCsr, CsrError, LeafPolicy, leaf_validity};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::untrusted;

/// The shortest lifetime the API server accepts for a pod certificate.
pub const MIN_LIFETIME: Duration = Duration::hours(1);
/// `maxExpirationSeconds` when a request has none (the API server's default).
pub const DEFAULT_MAX_EXPIRATION_SECS: i64 = 86_400;
/// The most notBefore is backdated: the API server wants it within 5 minutes of its clock.
pub const MAX_BACKDATE: Duration = Duration::minutes(4);
/// How far from either end of the life `beginRefreshAt` must be.
pub const REFRESH_MARGIN: Duration = Duration::minutes(10);

/// The key a request asks to have certified.
#[derive(Clone, PartialEq, Eq)]
pub enum PodKey {
    /// `pkixPublicKey`: a DER SubjectPublicKeyInfo (1.35).
    Pkix(Vec<u8>),
    /// `stubPKCS10Request`: a DER PKCS#10 request holding only the key (1.36 on).
    Stub(Vec<u8>),
}

impl std::fmt::Debug for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pkix(der) => write!(f, "Pkix({} bytes)", der.len()),
            Self::Stub(der) => write!(f, "Stub({} bytes)", der.len()),
        }
    }
}

/// A PodCertificateRequest, as the API server admitted it.
#[derive(Debug, Clone)]
pub struct PodRequest {
    /// Its namespace (the pod's).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its `metadata.uid`.
    pub uid: String,
    /// The pod.
    pub pod_name: String,
    /// Its uid.
    pub pod_uid: String,
    /// The service account the pod runs as.
    pub service_account: String,
    /// The node it runs on.
    pub node_name: String,
    /// The key.
    pub key: PodKey,
    /// `maxExpirationSeconds`, if set.
    pub max_expiration_secs: Option<i64>,
}

/// Who may have pod certificates.
#[derive(Debug, Clone, Default)]
pub struct PodPolicy {
    /// The trust domain the SPIFFE IDs are in.
    pub trust_domain: Option<TrustDomain>,
    /// Namespaces whose pods are refused (`--pod-certificate-exclude-namespace`).
    pub excluded_namespaces: Vec<String>,
    /// Service accounts (namespace, name) refused
    /// (`--pod-certificate-exclude-service-account`).
    pub excluded_accounts: Vec<(String, String)>,
    /// The API server vouching for the requests (recorded as `token_issuer`).
    pub api_url: String,
}

/// A certificate for a request, recorded.
#[derive(Debug, Clone)]
pub struct PodIssued {
    /// PEM: the leaf first, then the intermediates; not the root.
    pub chain_pem: String,
    /// The leaf's serial, hex.
    pub serial: String,
    /// The leaf's notBefore.
    pub not_before: OffsetDateTime,
    /// The leaf's notAfter.
    pub not_after: OffsetDateTime,
    /// When the kubelet should start asking again: about half the life.
    pub begin_refresh_at: OffsetDateTime,
    /// The SPIFFE ID.
    pub spiffe_id: String,
}

/// The answer to a request. `Denied` and `Failed` carry the condition's reason (CamelCase,
/// as Kubernetes conditions want) and message.
#[derive(Debug, Clone)]
pub enum PodAnswer {
    /// Issued.
    Issued(PodIssued),
    /// The signer will not issue it: policy, or a key it does not certify.
    Denied {
        /// The condition's reason.
        reason: &'static str,
        /// The condition's message.
        message: String,
    },
    /// The signer cannot issue it now (its authority, its own policy).
    Failed {
        /// The condition's reason.
        reason: &'static str,
        /// The condition's message.
        message: String,
    },
}

/// Why a request is refused, before its event is written.
struct PodRefusal {
    /// `Denied` or `Failed`.
    denied: bool,
    /// The condition's reason.
    reason: &'static str,
    /// The metrics' and events' check.
    check: &'static str,
    class: Class,
    message: String,
}

impl PodRefusal {
    fn denied(reason: &'static str, check: &'static str, class: Class, message: String) -> Self {
        Self {
            denied: true,
            reason,
            check,
            class,
            message,
        }
    }

    fn failed(reason: &'static str, check: &'static str, message: String) -> Self {
        Self {
            denied: false,
            reason,
            check,
            class: Class::Unavailable,
            message,
        }
    }
}

/// The lifetime a request gets: `maxExpirationSeconds` and the policy's maximum, whichever
/// is shorter, at least the hour the API server requires; and how far notBefore is
/// backdated (the policy's skew, at most [`MAX_BACKDATE`]). The TTL handed to the profile is
/// the lifetime less the backdating, so that notAfter − notBefore is the lifetime.
pub fn pod_lifetime(
    max_expiration_secs: Option<i64>,
    policy: &LeafPolicy,
) -> Result<(Duration, Duration), String> {
    let asked = Duration::seconds(max_expiration_secs.unwrap_or(DEFAULT_MAX_EXPIRATION_SECS));
    let lifetime = asked.min(policy.max_ttl);
    if lifetime < MIN_LIFETIME {
        return Err(format!(
            "the longest lifetime allowed is {} s (maxExpirationSeconds {} s, --max-ttl {} s), \
             less than the hour a pod certificate must last",
            lifetime.whole_seconds(),
            asked.whole_seconds(),
            policy.max_ttl.whole_seconds()
        ));
    }
    let backdate = policy.clock_skew.clamp(Duration::ZERO, MAX_BACKDATE);
    Ok((lifetime, backdate))
}

/// `beginRefreshAt`: half-way through the life, kept [`REFRESH_MARGIN`] from either end.
pub fn begin_refresh_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let half: OffsetDateTime = not_before + (not_after - not_before) / 2;
    half.max(not_before + REFRESH_MARGIN)
        .min(not_after - REFRESH_MARGIN)
}

/// The key of `key`, checked as a CSR's would be (the stub CSR's signature too, though the
/// API server checked it).
fn check_key(key: &PodKey) -> Result<CheckedCsr, CsrError> {
    match key {
        PodKey::Pkix(der) => issuance::check_spki(der),
        PodKey::Stub(der) => issuance::check_csr_der(der),
    }
}

impl CertificateAuthority {
    /// Answers `request` under `policy`, the answer recorded in the audit log before this
    /// returns. An error means nothing was recorded and nothing may be written to the
    /// request: the audit log or the crypto pool is unavailable, or the identity is over its
    /// budget (`--identity-rate`); ask again later.
    pub async fn answer_pod_request(
        &self,
        request: &PodRequest,
        policy: &PodPolicy,
    ) -> Result<PodAnswer, Refusal> {
        let now = OffsetDateTime::now_utc();
        let mut known = Known::default();
        let coming = self.audit.expect();
        let decided = self.decide_pod(request, policy, now, &mut known).await;
        drop(coming);
        let kind = match &decided {
            Ok(Ok(_)) => EventKind::Issued,
            _ => EventKind::Denied,
        };
        let mut event = event_for(kind, now, &known, None);
        event.request = Some(format!("{}/{}", request.namespace, request.name));
        event.request_uid = Some(request.uid.clone());
        event.public_key_sha256 = known.public_key_sha256.clone();
        event.csr_sha256 = known.csr_sha256.clone().filter(|h| !h.is_empty());
        match decided? {
            Ok((issued, spiffe_id)) => {
                event.serial = Some(issued.serial.clone());
                event.not_before = Some(issued.validity.not_before.unix_timestamp());
                event.not_after = Some(issued.validity.not_after.unix_timestamp());
                event.authority_id = Some(issued.authority_id);
                self.audit.record(event).await?;
                crate::metrics::metrics().issuances.inc();
                let (not_before, not_after) =
                    (issued.validity.not_before, issued.validity.not_after);
                // The root stays out: pods get their trust from the ClusterTrustBundle.
                let without_root = issued.chain.len().saturating_sub(1).max(1);
                Ok(PodAnswer::Issued(PodIssued {
                    chain_pem: issued.chain[..without_root].concat(),
                    serial: issued.serial,
                    not_before,
                    not_after,
                    begin_refresh_at: begin_refresh_at(not_before, not_after),
                    spiffe_id,
                }))
            }
            Err(refusal) => {
                let code = refusal.class.code().name;
                crate::metrics::metrics()
                    .refusals
                    .get_or_create(&crate::metrics::RefusalLabels {
                        code,
                        reason: refusal.check,
                    })
                    .inc();
                let condition = if refusal.denied { "Denied" } else { "Failed" };
                event.code = Some(code.to_owned());
                event.reason = Some(untrusted::cut(
                    &format!("{condition} {}: {}", refusal.reason, refusal.message),
                    untrusted::REASON_BYTES,
                ));
                self.audit.record(event).await?;
                info!(request = %format!("{}/{}", request.namespace, request.name), condition, reason = refusal.reason, message = %refusal.message, "Refused a PodCertificateRequest");
                Ok(if refusal.denied {
                    PodAnswer::Denied {
                        reason: refusal.reason,
                        message: refusal.message,
                    }
                } else {
                    PodAnswer::Failed {
                        reason: refusal.reason,
                        message: refusal.message,
                    }
                })
            }
        }
    }

    /// Records that the certificate `serial` signed for `request` was never delivered: the
    /// request was answered by another writer first. The certificate is dropped.
    pub async fn record_pod_not_delivered(
        &self,
        request: &PodRequest,
        serial: &str,
        spiffe_id: &str,
    ) -> Result<(), Refusal> {
        let mut event = EventRow::new(EventKind::Denied);
        event.spiffe_id = Some(spiffe_id.to_owned());
        event.namespace = Some(request.namespace.clone());
        event.service_account = Some(request.service_account.clone());
        event.pod_name = Some(request.pod_name.clone());
        event.pod_uid = Some(request.pod_uid.clone());
        event.node = Some(request.node_name.clone());
        event.serial = Some(serial.to_owned());
        event.code = Some("ABORTED".to_owned());
        event.reason = Some(format!(
            "not delivered: the request was answered by another writer first; certificate {serial} was dropped"
        ));
        event.request = Some(format!("{}/{}", request.namespace, request.name));
        event.request_uid = Some(request.uid.clone());
        self.audit.record(event).await?;
        Ok(())
    }

    /// The decision: `Ok(Ok(..))` signed, `Ok(Err(..))` refused, `Err` retry later.
    async fn decide_pod(
        &self,
        request: &PodRequest,
        policy: &PodPolicy,
        now: OffsetDateTime,
        known: &mut Known,
    ) -> Result<Result<(issuance::Issued, String), PodRefusal>, Refusal> {
        let Some(trust_domain) = &policy.trust_domain else {
            return Ok(Err(PodRefusal::failed(
                "NoTrustDomain",
                "pod_policy",
                "the signer has no trust domain configured".into(),
            )));
        };
        let spiffe_id = match SpiffeId::for_service_account(
            trust_domain,
            &request.namespace,
            &request.service_account,
        ) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Err(PodRefusal::denied(
                    "InvalidIdentity",
                    "pod_identity",
                    Class::Caller,
                    format!("no SPIFFE ID for this service account: {e}"),
                )));
            }
        };
        let identity = Identity {
            spiffe_id: spiffe_id.clone(),
            namespace: request.namespace.clone(),
            service_account: request.service_account.clone(),
            pod_name: Some(request.pod_name.clone()),
            pod_uid: Some(request.pod_uid.clone()),
            node: Some(request.node_name.clone()),
            issuer: IssuerId::PodCertificateRequest(policy.api_url.clone()),
        };
        known.identity = Some(identity.clone());
        if policy.excluded_namespaces.contains(&request.namespace) {
            return Ok(Err(PodRefusal::denied(
                "NamespaceExcluded",
                "pod_namespace_excluded",
                Class::Forbidden,
                format!(
                    "pods in namespace {} get no certificates from this signer \
                     (--pod-certificate-exclude-namespace)",
                    request.namespace
                ),
            )));
        }
        if policy
            .excluded_accounts
            .iter()
            .any(|(ns, sa)| *ns == request.namespace && *sa == request.service_account)
        {
            return Ok(Err(PodRefusal::denied(
                "ServiceAccountExcluded",
                "pod_account_excluded",
                Class::Forbidden,
                format!(
                    "service account {}/{} gets no certificates from this signer \
                     (--pod-certificate-exclude-service-account)",
                    request.namespace, request.service_account
                ),
            )));
        }
        // A kubelet may ask again and again for its pods (a node compromised, a bug): the
        // identity's budget holds, counted per node as a node proxy's requests are. Over
        // it, nothing is decided: the request waits, unanswered, until there is budget.
        self.take_identity_budget(
            format!("{spiffe_id} (for {})", request.node_name),
            std::time::Instant::now(),
        )?;
        let (lifetime, backdate) = match pod_lifetime(request.max_expiration_secs, &self.policy) {
            Ok(l) => l,
            Err(message) => return Ok(Err(PodRefusal::failed("LifetimeTooShort", "ttl", message))),
        };
        let active = Arc::clone(&self.active.borrow());
        let validity = match leaf_validity(
            now,
            lifetime - backdate,
            backdate,
            active.authority.not_before(),
            active.authority.not_after(),
        ) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Err(PodRefusal::failed(
                    "AuthorityNotValid",
                    "authority_not_valid",
                    e.to_string(),
                )));
            }
        };
        if validity.not_after - validity.not_before < MIN_LIFETIME {
            return Ok(Err(PodRefusal::failed(
                "AuthorityExpiresTooSoon",
                "authority_not_valid",
                format!(
                    "the active authority ends at {}, too soon for a certificate of an hour; \
                     rotate it (ca-server root prepare, root activate)",
                    crate::rfc3339::text(active.authority.not_after())
                ),
            )));
        }
        let leaf_policy = LeafPolicy {
            clock_skew: backdate,
            ..self.policy
        };
        let key = request.key.clone();
        let signing_identity = identity;
        let (checked, result) = self
            .pool
            .run(move || {
                let checked = match check_key(&key) {
                    Ok(c) => c,
                    Err(e) => return (Err(e), None),
                };
                let result = issuance::issue(
                    &active.authority,
                    &active.anchors,
                    &leaf_policy,
                    &signing_identity,
                    checked.clone(),
                    lifetime - backdate,
                    now,
                );
                (Ok(checked), Some(result))
            })
            .await?;
        let checked = match checked {
            Ok(c) => c,
            Err(e) => {
                let (reason, check) = match e {
                    CsrError::UnsupportedKey(_)
                    | CsrError::RsaKeySize(_)
                    | CsrError::SignatureAlgorithm(_) => ("UnsupportedKeyType", "csr"),
                    _ => ("InvalidKey", "csr"),
                };
                return Ok(Err(PodRefusal::denied(
                    reason,
                    check,
                    Class::Caller,
                    format!(
                        "{e}; this signer certifies ECDSAP256, ECDSAP384, ED25519, RSA3072 and \
                         RSA4096 keys"
                    ),
                )));
            }
        };
        known.public_key_sha256 = Some(checked.public_key_sha256);
        known.csr_sha256 = Some(checked.csr_sha256);
        match result {
            Some(Ok(issued)) => Ok(Ok((issued, spiffe_id.to_string()))),
            Some(Err(e)) => {
                if e.class() == Class::Internal {
                    error!(alert = true, reason = %e, "ALERT: a pod certificate failed inside the CA; nothing was written");
                }
                Ok(Err(PodRefusal::failed(
                    "SigningFailed",
                    e.reason(),
                    e.to_string(),
                )))
            }
            None => Ok(Err(PodRefusal::failed(
                "SigningFailed",
                "signing",
                "the key was not checked".into(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifetime_is_the_shorter_of_the_request_and_the_policy_and_at_least_an_hour() {
        let policy = LeafPolicy::default(); // max 24 h, skew 2 min
        assert_eq!(
            pod_lifetime(None, &policy),
            Ok((Duration::hours(24), Duration::minutes(2)))
        );
        assert_eq!(
            pod_lifetime(Some(3600), &policy),
            Ok((Duration::hours(1), Duration::minutes(2)))
        );
        assert_eq!(
            pod_lifetime(Some(7_862_400), &policy).unwrap().0,
            Duration::hours(24)
        );
        let short = LeafPolicy {
            max_ttl: Duration::minutes(30),
            ..policy
        };
        assert!(
            pod_lifetime(None, &short)
                .unwrap_err()
                .contains("--max-ttl 1800 s")
        );
        let skewed = LeafPolicy {
            clock_skew: Duration::minutes(30),
            ..policy
        };
        assert_eq!(pod_lifetime(None, &skewed).unwrap().1, MAX_BACKDATE);
    }

    #[test]
    fn refresh_begins_half_way_and_never_near_either_end() {
        let nb = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(
            begin_refresh_at(nb, nb + Duration::hours(24)),
            nb + Duration::hours(12)
        );
        let at = begin_refresh_at(nb, nb + Duration::hours(1));
        assert!(at >= nb + REFRESH_MARGIN && at <= nb + Duration::hours(1) - REFRESH_MARGIN);
    }
}
