//! Envoy's Secret Discovery Service on the agent's socket, beside the Workload API (as SPIRE
//! serves both): `default` (the SVID and its key, `TlsCertificate`) and `ROOTCA` (the bundle,
//! `CertificateValidationContext`), PEM in `inline_bytes`. A stream answers the names asked
//! for, then pushes a new version whenever what they hold changes; the client ACKs (the
//! nonce, no error) or NACKs (the nonce with `error_detail`) as xDS does, and a request
//! carrying an older nonce is stale and ignored. `DeltaSecrets` is not served.

use std::pin::Pin;

use ca_proto::envoy::config::core::v3::DataSource;
use ca_proto::envoy::config::core::v3::data_source::Specifier;
use ca_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use ca_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use ca_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::state::{Held, Shelf};
use crate::x509::pem;

/// The type of every resource SDS serves.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload's certificate and key (Istio's name for it).
pub const DEFAULT: &str = "default";
/// The trust bundle (Istio's name for it).
pub const ROOTCA: &str = "ROOTCA";

/// A server stream of SDS.
type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// SDS, answering from the agent's shelf.
#[derive(Debug, Clone)]
pub struct Sds {
    shelf: Shelf,
}

impl Sds {
    /// Serves what `shelf` holds.
    pub fn new(shelf: Shelf) -> Self {
        Self { shelf }
    }
}

/// Checks a request's type and names; the names it asks for (none: both).
fn requested(request: &DiscoveryRequest) -> Result<Vec<String>, Status> {
    if !request.type_url.is_empty() && request.type_url != SECRET_TYPE {
        return Err(Status::invalid_argument(format!(
            "type_url {}: this server serves {SECRET_TYPE}",
            crate::untrusted::cut(&request.type_url, 200)
        )));
    }
    if let Some(name) = request
        .resource_names
        .iter()
        .find(|name| *name != DEFAULT && *name != ROOTCA)
    {
        return Err(Status::invalid_argument(format!(
            "unknown resource name {}: this agent serves \"{DEFAULT}\" and \"{ROOTCA}\"",
            crate::untrusted::cut(name, 200)
        )));
    }
    if request.resource_names.is_empty() {
        return Ok(vec![DEFAULT.to_owned(), ROOTCA.to_owned()]);
    }
    Ok(request.resource_names.clone())
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
    })
}

/// The secrets `names` ask for, encoded as `Any`; None until an SVID and a bundle are held.
fn render(names: &[String], held: &Held) -> Option<Vec<prost_types::Any>> {
    let (svid, roots) = (held.svid.as_ref()?, held.roots.as_ref()?);
    let secrets = names.iter().map(|name| {
        let kind = if name == DEFAULT {
            let chain: String = svid
                .chain
                .iter()
                .map(|der| pem("CERTIFICATE", der))
                .collect();
            let key = zeroize::Zeroizing::new(pem("PRIVATE KEY", &svid.key));
            secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain.into_bytes()),
                private_key: inline(key.as_bytes().to_vec()),
            })
        } else {
            let trusted: String = roots
                .certificates
                .iter()
                .map(|der| pem("CERTIFICATE", der))
                .collect();
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(trusted.into_bytes()),
            })
        };
        let secret = Secret {
            name: name.clone(),
            r#type: Some(kind),
        };
        prost_types::Any {
            type_url: SECRET_TYPE.to_owned(),
            value: secret.encode_to_vec(),
        }
    });
    Some(secrets.collect())
}

/// A version that changes exactly when the resources do.
fn version_of(resources: &[prost_types::Any]) -> String {
    let mut hash = Sha256::new();
    for resource in resources {
        hash.update((resource.value.len() as u64).to_be_bytes());
        hash.update(&resource.value);
    }
    hex::encode(&hash.finalize()[..8])
}

/// One `StreamSecrets` stream's xDS state.
#[derive(Debug, Default)]
struct Subscription {
    /// The names asked for; None before the first request.
    names: Option<Vec<String>>,
    /// The last response sent: its nonce and version.
    sent: Option<(String, String)>,
    nonces: u64,
}

impl Subscription {
    /// What to answer `request`: a response, nothing (an ACK, a NACK, a stale nonce), or a
    /// refusal that ends the stream.
    fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        held: &Held,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        let names = requested(request)?;
        if !request.response_nonce.is_empty() {
            let current = self
                .sent
                .as_ref()
                .is_some_and(|(nonce, _)| *nonce == request.response_nonce);
            if !current {
                debug!("SDS request with a stale nonce; ignored");
                return Ok(None);
            }
            let same_names = self.names.as_ref() == Some(&names);
            if let Some(error) = &request.error_detail {
                warn!(
                    version = %self.sent.as_ref().map(|(_, v)| v.as_str()).unwrap_or(""),
                    error = %crate::untrusted::cut(&error.message, 300),
                    "The SDS client rejected a version (NACK)"
                );
                if same_names {
                    return Ok(None);
                }
            } else if same_names {
                return Ok(None);
            }
        }
        self.names = Some(names);
        Ok(self.respond(held, true))
    }

    /// What to push after the shelf changed: a new version, if the names' content changed.
    fn on_change(&mut self, held: &Held) -> Option<DiscoveryResponse> {
        self.names.as_ref()?;
        self.respond(held, false)
    }

    fn respond(&mut self, held: &Held, always: bool) -> Option<DiscoveryResponse> {
        let resources = render(self.names.as_deref()?, held)?;
        let version = version_of(&resources);
        if !always && self.sent.as_ref().is_some_and(|(_, sent)| *sent == version) {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        self.sent = Some((nonce.clone(), version.clone()));
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            canary: false,
            type_url: SECRET_TYPE.to_owned(),
            nonce,
        })
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Responses<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Responses<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "incremental SDS is not served; use StreamSecrets",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut requests = request.into_inner();
        let mut changes = self.shelf.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut subscription = Subscription::default();
            loop {
                let outcome = tokio::select! {
                    next = requests.message() => match next {
                        Ok(Some(request)) => {
                            let held = changes.borrow_and_update().clone();
                            subscription.on_request(&request, &held)
                        }
                        // The client went away.
                        Ok(None) | Err(_) => break,
                    },
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let held = changes.borrow_and_update().clone();
                        Ok(subscription.on_change(&held))
                    }
                    _ = tx.closed() => break,
                };
                match outcome {
                    Ok(Some(response)) => {
                        if tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let names = requested(request.get_ref())?;
        let resources = render(&names, &self.shelf.now())
            .ok_or_else(|| Status::permission_denied("no identity issued"))?;
        Ok(Response::new(DiscoveryResponse {
            version_info: version_of(&resources),
            resources,
            canary: false,
            type_url: SECRET_TYPE.to_owned(),
            nonce: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::agent::state::{Roots, Svid};

    fn held(serial: u8) -> Held {
        Held {
            svid: Some(Arc::new(Svid {
                spiffe_id: crate::spiffe::SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
                chain: vec![vec![serial; 4]],
                key: zeroize::Zeroizing::new(vec![7; 4]),
                not_after: time::OffsetDateTime::now_utc(),
            })),
            roots: Some(Arc::new(Roots {
                trust_domain_id: "spiffe://td".into(),
                certificates: vec![vec![9; 4]],
                sequence: 1,
                jwt_jwks: "{\"keys\":[]}".into(),
                tainted: Vec::new(),
                tainted_kids: Vec::new(),
            })),
        }
    }

    fn request(names: &[&str], nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| ca_proto::google::rpc::Status {
                code: 3,
                message: "no".into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn acks_nacks_and_stale_nonces_get_no_answer_changes_do() {
        let mut sub = Subscription::default();
        let first = sub
            .on_request(&request(&[DEFAULT], "", false), &held(1))
            .unwrap()
            .unwrap();
        assert_eq!(first.nonce, "1");
        // The ACK, a stale nonce, a NACK: nothing sent.
        assert!(
            sub.on_request(&request(&[DEFAULT], "1", false), &held(1))
                .unwrap()
                .is_none()
        );
        assert!(
            sub.on_request(&request(&[DEFAULT], "0", false), &held(1))
                .unwrap()
                .is_none()
        );
        assert!(
            sub.on_request(&request(&[DEFAULT], "1", true), &held(1))
                .unwrap()
                .is_none()
        );
        // The same content again is no new version; new content is.
        assert!(sub.on_change(&held(1)).is_none());
        let pushed = sub.on_change(&held(2)).unwrap();
        assert_ne!(pushed.version_info, first.version_info);
        assert_eq!(pushed.nonce, "2");
        // New names under the current nonce: answered at once.
        let both = sub
            .on_request(&request(&[DEFAULT, ROOTCA], "2", false), &held(2))
            .unwrap()
            .unwrap();
        assert_eq!(both.resources.len(), 2);
        // Unknown names and types end the stream.
        let err = sub
            .on_request(&request(&["spiffe://td"], "", false), &held(2))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let mut other = request(&[DEFAULT], "", false);
        other.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(
            sub.on_request(&other, &held(2)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn nothing_is_sent_before_an_identity_is_held() {
        let mut sub = Subscription::default();
        assert!(
            sub.on_request(&request(&[DEFAULT], "", false), &Held::default())
                .unwrap()
                .is_none()
        );
        assert!(sub.on_change(&held(1)).is_some(), "sent once it is");
    }
}
