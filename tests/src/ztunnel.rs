//! A client that talks to the CA as Istio's ztunnel (the ambient node proxy) does: HTTP/2 over
//! TLS 1.3 with AES-GCM suites only, verifying the server against the URL's host (an IP here),
//! its own token as `authorization`, `clusterid: Kubernetes`, a 24 h `validity_duration`, the
//! pod's identity in `ImpersonatedIdentity`, and the CSR ztunnel makes (empty subject, EC
//! P-256, one critical URI SAN); and it checks the answer as ztunnel does.

use std::sync::{Arc, Mutex};

use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{TestIssuer, TestServer, der};

/// The TTL ztunnel asks for (its `SECRET_TTL` default).
pub const ZTUNNEL_TTL_SECS: i64 = 86_400;

/// What the handshake settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The TLS version.
    pub version: Option<rustls::ProtocolVersion>,
    /// The cipher suite.
    pub suite: Option<rustls::CipherSuite>,
}

/// A ztunnel-like CA client.
pub struct Ztunnel {
    client: IstioCertificateServiceClient<Channel>,
    /// What the last handshake settled on.
    pub negotiated: Arc<Mutex<Option<Negotiated>>>,
}

/// A request as ztunnel makes it.
#[derive(Debug, Clone)]
pub struct ZtunnelRequest<'a> {
    /// Its own token.
    pub token: &'a str,
    /// The identity it wants a certificate for (its CSR's URI SAN).
    pub identity: &'a str,
    /// Whether it names the identity in `ImpersonatedIdentity` (shared mode) or not (its
    /// dedicated mode, asking for its own identity).
    pub impersonate: bool,
}

impl Ztunnel {
    /// Connects to `server` at `https://127.0.0.1:PORT`, trusting only its bundle file.
    pub async fn connect(server: &TestServer) -> Self {
        let config = Arc::new(ztunnel_tls(server));
        let addr = server.grpc;
        let negotiated = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&negotiated);
        let connector = tower::service_fn(move |_: Uri| {
            let config = Arc::clone(&config);
            let seen = Arc::clone(&seen);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                // The URL's host is an IP literal: the server's certificate needs an IP SAN.
                let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                let (_, conn) = tls.get_ref();
                *seen.lock().expect("lock") = Some(Negotiated {
                    alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                    version: conn.protocol_version(),
                    suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
                });
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_with_connector(connector)
            .await
            .expect("ztunnel connects");
        Self {
            client: IstioCertificateServiceClient::new(channel),
            negotiated,
        }
    }

    /// Sends `request`; the chain as the server answered it.
    pub async fn fetch(
        &mut self,
        request: &ZtunnelRequest<'_>,
    ) -> Result<Vec<String>, tonic::Status> {
        let (csr, _key) = ztunnel_csr(request.identity);
        let metadata = request.impersonate.then(|| {
            let mut metadata = prost_types::Struct::default();
            metadata.fields.insert(
                "ImpersonatedIdentity".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        request.identity.to_owned(),
                    )),
                },
            );
            metadata
        });
        let mut grpc = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: ZTUNNEL_TTL_SECS,
            metadata,
        });
        let headers = grpc.metadata_mut();
        headers.insert(
            "authorization",
            format!("Bearer {}", request.token).parse().expect("header"),
        );
        headers.insert("clusterid", "Kubernetes".parse().expect("header"));
        self.client
            .create_certificate(grpc)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

/// What ztunnel's TLS client offers: TLS 1.3 only, AES-GCM suites only, ALPN `h2`; trusting
/// only `server`'s bundle file.
pub fn ztunnel_tls(server: &TestServer) -> rustls::ClientConfig {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..default_provider()
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::rustls_pemfile_certs(&mut server.bundle_pem().as_bytes()) {
        roots
            .add(rustls_pki_types::CertificateDer::from(cert))
            .expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// The CSR ztunnel makes for `identity`: empty subject, a new EC P-256 key, one URI SAN
/// (critical, since the subject is empty).
pub fn ztunnel_csr(identity: &str) -> (String, rcgen::KeyPair) {
    crate::csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[identity])
}

/// What ztunnel checks of an answer before it uses it: a chain of more than one element whose
/// last is taken as the root, and a leaf whose first URI SAN is the identity asked for.
pub fn ztunnel_accepts(chain: &[String], identity: &str) -> Result<(), String> {
    if chain.len() < 2 {
        return Err(format!(
            "a chain of {} element(s): ztunnel needs the root last",
            chain.len()
        ));
    }
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("the leaf has no SAN")?;
    let first_uri = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    if first_uri != Some(identity) {
        return Err(format!(
            "the leaf's first URI SAN is {first_uri:?}, not {identity}"
        ));
    }
    Ok(())
}

/// The token of ztunnel's pod `istio-system/ztunnel-abc`: pod-bound, naming `node` where
/// the cluster puts nodes in tokens (Kubernetes 1.30 and later).
pub fn ztunnel_token(issuer: &TestIssuer, node: Option<&str>) -> String {
    let mut claims = issuer.claims("istio-system", "ztunnel");
    claims["kubernetes.io"]["pod"] =
        serde_json::json!({"name": "ztunnel-abc", "uid": "uid-ztunnel-abc"});
    match node {
        Some(node) => {
            claims["kubernetes.io"]["node"] = serde_json::json!({"name": node, "uid": "uid-node"})
        }
        None => {
            claims["kubernetes.io"]
                .as_object_mut()
                .expect("claims")
                .remove("node");
        }
    }
    issuer.sign(&claims)
}
