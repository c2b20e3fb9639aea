//! The gRPC services.

use std::net::SocketAddr;
use std::sync::Arc;

use ca_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use ca_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};

use super::ca::{CertificateAuthority, CsrRequest};

/// The caller's address, put into each request's extensions by the connection handler.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The metadata key ztunnel uses to ask for a pod's identity.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// `istio.v1.auth.IstioCertificateService`.
pub struct CertificateService {
    ca: Arc<CertificateAuthority>,
}

impl CertificateService {
    /// The service over `ca`.
    pub fn new(ca: Arc<CertificateAuthority>) -> Self {
        Self { ca }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().map(str::to_owned).unwrap_or_default());
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
        let chain = self
            .ca
            .create_certificate(CsrRequest {
                peer,
                authorization,
                csr: body.csr,
                validity_secs: body.validity_duration,
                impersonated_identity,
            })
            .await
            .map_err(|r| r.to_status())?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
