//! A test proxy: holds a certificate from the server (renewed at half its life) and the
//! bundle it follows over `WatchTrustBundle`, and builds rustls configurations from them for
//! mutual TLS with other proxies, the way a sidecar does.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ca_proto::ca::v1::WatchTrustBundleRequest;
use ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::Channel;

use crate::{TestServer, create_certificate, csr, der};

/// What a proxy holds right now.
#[derive(Clone)]
pub struct Held {
    /// Its certificate chain (leaf first, without the root) and key.
    pub certified: Arc<CertifiedKey>,
    /// The issuer (subject) of its leaf, e.g. `O=cluster.local, CN=cluster.local root 1`.
    pub leaf_issuer: String,
    /// The roots it trusts.
    pub roots: Vec<CertificateDer<'static>>,
    /// The bundle sequence it follows.
    pub sequence: i64,
    /// How many certificates it has obtained.
    pub certificates: u32,
}

/// A proxy following the server.
pub struct Proxy {
    held: Arc<RwLock<Held>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

async fn obtain(
    client: &mut IstioCertificateServiceClient<Channel>,
    token: &str,
    ttl_secs: i64,
) -> Result<(Arc<CertifiedKey>, String), String> {
    let (csr, key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(client, Some(token), &csr, ttl_secs)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let certs: Vec<CertificateDer<'static>> = chain[..chain.len() - 1]
        .iter()
        .map(|p| CertificateDer::from(der(p)))
        .collect();
    let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| e.to_string())?;
    let issuer = leaf.issuer().to_string();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| e.to_string())?;
    Ok((Arc::new(CertifiedKey::new(certs, signing)), issuer))
}

fn roots_of(pems: &[String]) -> Vec<CertificateDer<'static>> {
    pems.iter().map(|p| CertificateDer::from(der(p))).collect()
}

impl Proxy {
    /// Obtains a certificate with `token` (TTL `ttl_secs`), follows the bundle, and, if
    /// `renew`, renews at half the TTL.
    pub async fn start(server: &TestServer, token: String, ttl_secs: i64, renew: bool) -> Self {
        let mut certs = server.client().await;
        let (certified, leaf_issuer) = obtain(&mut certs, &token, ttl_secs)
            .await
            .expect("first certificate");
        let channel = Channel::from_shared(format!("https://{}", server.grpc))
            .expect("uri")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(server.bundle_pem())),
            )
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let mut bundles = TrustBundleServiceClient::new(channel)
            .watch_trust_bundle(WatchTrustBundleRequest {})
            .await
            .expect("watch")
            .into_inner();
        let first = bundles
            .message()
            .await
            .expect("stream")
            .expect("first bundle");
        let held = Arc::new(RwLock::new(Held {
            certified,
            leaf_issuer,
            roots: roots_of(&first.root_certificates),
            sequence: first.sequence,
            certificates: 1,
        }));
        let mut tasks = Vec::new();
        let h = Arc::clone(&held);
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(bundle)) = bundles.message().await {
                let mut held = h.write().expect("lock");
                held.roots = roots_of(&bundle.root_certificates);
                held.sequence = bundle.sequence;
            }
        }));
        if renew {
            let h = Arc::clone(&held);
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(ttl_secs as u64 * 500)).await;
                    match obtain(&mut certs, &token, ttl_secs).await {
                        Ok((certified, issuer)) => {
                            let mut held = h.write().expect("lock");
                            held.certified = certified;
                            held.leaf_issuer = issuer;
                            held.certificates += 1;
                        }
                        Err(e) => panic!("renewal failed: {e}"),
                    }
                }
            }));
        }
        Self { held, tasks }
    }

    /// A proxy that holds `held` and follows nothing (for material another agent serves).
    pub fn holding(held: Held) -> Self {
        Self {
            held: Arc::new(RwLock::new(held)),
            tasks: Vec::new(),
        }
    }

    /// A snapshot of what it holds.
    pub fn held(&self) -> Held {
        self.held.read().expect("lock").clone()
    }

    /// A server configuration: its certificate, and client certificates required to chain to
    /// the roots it trusts.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let held = self.held();
        let mut roots = rustls::RootCertStore::empty();
        for root in &held.roots {
            roots.add(root.clone()).expect("root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .expect("client verifier");
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(Fixed(Arc::clone(&held.certified)))),
        )
    }

    /// A client configuration: its certificate, and servers verified against the roots it
    /// trusts (by SPIFFE chain, not by DNS name).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let held = self.held();
        let anchors = held
            .roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .expect("anchor")
                    .to_owned()
            })
            .collect();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
                    anchors,
                    provider: provider(),
                }))
                .with_client_cert_resolver(Arc::new(Fixed(Arc::clone(&held.certified)))),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer's chain up to the trusted roots, as SPIFFE peers do (no DNS names).
#[derive(Debug)]
struct SpiffeVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            }
            other => rustls::Error::General(other.to_string()),
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A full mutual-TLS handshake between `client` and `server` in memory, then one message each
/// way. Errors name the side that failed and why.
pub fn mtls_handshake(client: &Proxy, server: &Proxy) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut c = rustls::ClientConnection::new(
        client.client_config(),
        ServerName::try_from("peer.mesh.invalid").expect("name"),
    )
    .map_err(|e| e.to_string())?;
    let mut s = rustls::ServerConnection::new(server.server_config()).map_err(|e| e.to_string())?;
    c.writer().write_all(b"ping").map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    for _ in 0..20 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets()
            .map_err(|e| format!("server side: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets()
            .map_err(|e| format!("client side: {e}"))?;
        let mut chunk = [0u8; 16];
        if let Ok(n) = s.reader().read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
        }
        if !c.is_handshaking() && !s.is_handshaking() && got == b"ping" {
            return Ok(());
        }
    }
    Err("handshake did not complete".into())
}
