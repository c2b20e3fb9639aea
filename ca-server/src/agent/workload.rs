//! The SPIFFE Workload API on the agent's socket (`/SpiffeWorkloadAPI/...`). Every request
//! must carry `workload.spiffe.io: true` (so a browser or a confused proxy cannot be made to
//! call it); a stream sends the whole set at once and again on every change, and stays open
//! until the agent stops.

use std::pin::Pin;

use ca_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use ca_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::jwt::{self, Minter};
use super::state::{Held, Shelf};

/// The metadata every Workload API request carries, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// A server stream of the Workload API.
type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API, answering from the agent's shelf, and minting JWT-SVIDs with `minter`.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    shelf: Shelf,
    minter: std::sync::Arc<Minter>,
}

impl WorkloadApi {
    /// Serves what `shelf` holds, and JWT-SVIDs through `minter`.
    pub fn new(shelf: Shelf, minter: std::sync::Arc<Minter>) -> Self {
        Self { shelf, minter }
    }

    /// A stream of `render(held)` for what is held now and after each change; refused at
    /// once while there is nothing to render.
    fn updates<T: Send + 'static>(
        &self,
        render: fn(&Held) -> Option<T>,
    ) -> Result<Response<Updates<T>>, Status> {
        let changes = self.shelf.subscribe();
        if render(&changes.borrow()).is_none() {
            return Err(no_identity());
        }
        let stream = WatchStream::new(changes).filter_map(move |held| render(&held).map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(value) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The SVID with its bundle, when both are held.
fn x509_svid(held: &Held) -> Option<X509svidResponse> {
    let (svid, roots) = (held.svid.as_ref()?, held.roots.as_ref()?);
    Some(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id.to_string(),
            x509_svid: svid.chain.concat(),
            x509_svid_key: svid.key.to_vec(),
            bundle: roots.concatenated(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    })
}

/// The bundle keyed by its trust domain, once an identity is held (the socket serves that
/// identity's workloads alone).
fn x509_bundles(held: &Held) -> Option<X509BundlesResponse> {
    held.svid.as_ref()?;
    let roots = held.roots.as_ref()?;
    Some(X509BundlesResponse {
        crl: Vec::new(),
        bundles: [(roots.trust_domain_id.clone(), roots.concatenated())].into(),
    })
}

/// The JWT bundle (a JWK Set) keyed by its trust domain, once an identity is held.
fn jwt_bundles(held: &Held) -> Option<JwtBundlesResponse> {
    held.svid.as_ref()?;
    let roots = held.roots.as_ref()?;
    Some(JwtBundlesResponse {
        bundles: [(
            roots.trust_domain_id.clone(),
            roots.jwt_jwks.clone().into_bytes(),
        )]
        .into(),
    })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Updates<X509svidResponse>;
    type FetchX509BundlesStream = Updates<X509BundlesResponse>;
    type FetchJWTBundlesStream = Updates<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        self.updates(x509_svid)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        self.updates(x509_bundles)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let audience = crate::issuance::jwt_svid::check_audience(&request.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The socket serves one identity: asking for another gets nothing, as when none is
        // held.
        let held = self.shelf.now().svid.map(|svid| svid.spiffe_id.to_string());
        if !request.spiffe_id.is_empty() && held.as_deref() != Some(&request.spiffe_id) {
            return Err(no_identity());
        }
        let minted = self.minter.fetch(audience).await?;
        if !request.spiffe_id.is_empty() && minted.spiffe_id != request.spiffe_id {
            return Err(no_identity());
        }
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: minted.spiffe_id.clone(),
                svid: minted.token.to_string(),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        self.updates(jwt_bundles)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        let roots = self
            .shelf
            .now()
            .roots
            .ok_or_else(|| Status::unavailable("the agent holds no trust bundle yet"))?;
        let (spiffe_id, claims) = jwt::validate(&roots, &request.audience, &request.svid)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            claims: Some(jwt::to_struct(claims)),
        }))
    }
}
