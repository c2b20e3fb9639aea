//! The gRPC services.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ca_proto::ca::v1::jwt_svid_service_server::JwtSvidService;
use ca_proto::ca::v1::trust_bundle_service_server::TrustBundleService;
use ca_proto::ca::v1::{
    GetTrustBundleRequest, TaintedAuthority, TrustBundle, WatchTrustBundleRequest,
};
use ca_proto::ca::v1::{MintJwtSvidRequest, MintJwtSvidResponse};
use ca_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use ca_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use futures_util::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use super::propagation::BundleClients;
use super::status;
use crate::class::{Class, Classify};
use crate::issuance::{Active, Caller, CertificateAuthority, CsrRequest, JwtRequest};
use crate::spiffe::TrustDomain;
use crate::store::Via;

/// The caller's address, put into each request's extensions by the connection handler.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Whether the caller presented a client certificate (verified during the handshake, or
/// the handshake it resumed), and what it is; put into each request's extensions by the
/// connection handler. A call that relies on it checks it again ([`PeerCertificate`]): the
/// certificate may have expired, or its authority been retired, since the handshake.
#[derive(Debug, Clone)]
pub enum PeerIdentity {
    /// No client certificate.
    Anonymous,
    /// A client certificate.
    Certificate(Arc<PeerCertificate>),
}

/// A client certificate as presented: the chain, to check again, and its SPIFFE ID.
#[derive(Debug)]
pub struct PeerCertificate {
    /// The leaf.
    pub leaf: rustls_pki_types::CertificateDer<'static>,
    /// The certificates the client sent above it.
    pub intermediates: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The leaf's SPIFFE ID, if it carries one.
    pub spiffe_id: Option<crate::spiffe::SpiffeId>,
}

impl PeerCertificate {
    /// The chain a client presented, leaf first.
    pub fn new(
        leaf: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Self {
        Self {
            spiffe_id: crate::spiffe::SpiffeId::from_certificate(leaf),
            leaf: leaf.clone().into_owned(),
            intermediates: intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        }
    }

    /// Checks the certificate now with `verifier`: still valid, and from an authority of
    /// this CA that is not retired.
    pub fn check_now(
        &self,
        verifier: &dyn rustls::server::danger::ClientCertVerifier,
    ) -> Result<(), rustls::Error> {
        verifier
            .verify_client_cert(
                &self.leaf,
                &self.intermediates,
                rustls_pki_types::UnixTime::now(),
            )
            .map(drop)
    }
}

/// The longest a certificate request may take, whatever deadline the client sets.
pub(super) const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// How much before the client's deadline the server stops, so that its answer (with the
/// reason) arrives while the client still listens.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// The `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(text: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Who a request comes from (its address and credential), and the deadline the server holds
/// it to: the client's `grpc-timeout` less a margin, never above [`REQUEST_DEADLINE`].
fn caller_of<T>(request: &Request<T>) -> (Caller, Duration) {
    let metadata = request.metadata();
    let deadline = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        // Give up a little before the client does, so that it hears why.
        .map(|d| d.saturating_sub(DEADLINE_MARGIN).max(d / 2))
        .map_or(REQUEST_DEADLINE, |d| d.min(REQUEST_DEADLINE));
    let caller = Caller {
        peer: request.extensions().get::<PeerAddr>().map(|p| p.0),
        authorization: metadata
            .get("authorization")
            .map(|v| v.to_str().map(str::to_owned).unwrap_or_default()),
        cluster_id: metadata
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
    };
    (caller, deadline)
}

/// The metadata key ztunnel uses to ask for a pod's identity.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// `istio.v1.auth.IstioCertificateService`.
pub(super) struct CertificateService {
    ca: Arc<CertificateAuthority>,
}

impl CertificateService {
    /// The service over `ca`.
    pub(super) fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self { ca }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let (caller, deadline) = caller_of(&request);
        let body = request.into_inner();
        let impersonated_identity = body.metadata.as_ref().and_then(|m| {
            m.fields
                .get(IMPERSONATED_IDENTITY)
                .and_then(|v| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => {
                        Some(s.clone())
                    }
                    _ => None,
                })
        });
        let work = self.ca.create_certificate(CsrRequest {
            caller,
            csr: body.csr,
            validity_secs: body.validity_duration,
            impersonated_identity,
        });
        // Past the deadline nobody waits for the answer: stop. (If the audit record was
        // already committed, the log shows a certificate that was never delivered, which is
        // safe; the reverse cannot happen.)
        let chain = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| status::to_status(&DeadlinePassed(deadline)))?
            .map_err(|r| status::to_status(&r))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// `ca.v1.JwtSvidService`.
pub(super) struct JwtService {
    ca: Arc<CertificateAuthority>,
}

impl JwtService {
    /// The service over `ca`.
    pub(super) fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self { ca }
    }
}

#[tonic::async_trait]
impl JwtSvidService for JwtService {
    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let (caller, deadline) = caller_of(&request);
        let body = request.into_inner();
        let work = self.ca.mint_jwt_svid(JwtRequest {
            caller,
            audience: body.audience,
            ttl_secs: body.ttl_seconds,
        });
        let minted = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| status::to_status(&DeadlinePassed(deadline)))?
            .map_err(|r| status::to_status(&r))?;
        Ok(Response::new(MintJwtSvidResponse {
            token: minted.token,
            spiffe_id: minted.spiffe_id,
            issued_at: minted.issued_at,
            expires_at: minted.expires_at,
        }))
    }
}

/// The caller's deadline passed before its certificate was ready.
#[derive(Debug, thiserror::Error)]
#[error("the request did not complete within {} ms", .0.as_millis())]
struct DeadlinePassed(Duration);

impl Classify for DeadlinePassed {
    fn class(&self) -> Class {
        Class::Deadline
    }

    fn reason(&self) -> &'static str {
        "deadline"
    }
}

/// `ca.v1.TrustBundleService`: roots are public, so no token is needed.
pub(super) struct BundleService {
    active: watch::Receiver<Arc<Active>>,
    trust_domain: TrustDomain,
    refresh_hint_secs: i64,
    clients: Arc<BundleClients>,
}

impl BundleService {
    /// The service over the published bundle.
    pub(super) fn new(
        active: watch::Receiver<Arc<Active>>,
        trust_domain: TrustDomain,
        refresh_hint_secs: i64,
        clients: Arc<BundleClients>,
    ) -> Self {
        Self {
            active,
            trust_domain,
            refresh_hint_secs,
            clients,
        }
    }

    fn message(&self, active: &Active) -> TrustBundle {
        bundle_message(
            &self.trust_domain.to_string(),
            active,
            self.refresh_hint_secs,
        )
    }
}

/// The bundle as `TrustBundleService` sends it.
fn bundle_message(trust_domain: &str, active: &Active, refresh_hint_secs: i64) -> TrustBundle {
    TrustBundle {
        trust_domain: trust_domain.to_owned(),
        sequence: active.bundle.sequence,
        root_certificates: active.bundle.roots_pem.clone(),
        refresh_hint_seconds: refresh_hint_secs,
        jwt_authorities_jwks: active.bundle.jwt_jwks().to_string(),
        tainted_authorities: active
            .bundle
            .tainted
            .iter()
            .map(|t| TaintedAuthority {
                authority_id: t.authority_id,
                certificate: t.cert_pem.clone(),
                jwt_key_id: t.jwt_kid.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl TrustBundleService for BundleService {
    async fn get_trust_bundle(
        &self,
        request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let active = Arc::clone(&self.active.borrow());
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        self.clients.saw(peer, Via::Poll, active.bundle.sequence);
        Ok(Response::new(self.message(&active)))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let trust_domain = self.trust_domain.to_string();
        let hint = self.refresh_hint_secs;
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        let clients = Arc::clone(&self.clients);
        let mut last_sequence = None;
        // The current bundle at once, then each change of its contents (an activation
        // changes the signer, not the bundle: those updates are skipped).
        let stream = WatchStream::new(self.active.clone()).filter_map(move |active| {
            if last_sequence == Some(active.bundle.sequence) {
                return None;
            }
            last_sequence = Some(active.bundle.sequence);
            clients.saw(peer, Via::Watch, active.bundle.sequence);
            Some(Ok(bundle_message(&trust_domain, &active, hint)))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
