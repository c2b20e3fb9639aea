//! Connections from a chosen loopback address (127.0.0.2 is another peer than 127.0.0.1 to
//! the server), over TLS trusting only the server's bundle, optionally with a client
//! certificate: what a test needs to be a hostile peer, or an honest one beside it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::TestServer;

/// A TCP connection to `to` from `source` (any port).
pub async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(to).await?;
    // As gRPC clients do: without it, small writes wait for delayed ACKs (tens of ms each).
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TLS client configuration trusting only `server`'s bundle, offering `alpn`, with a client
/// certificate if `identity` gives one (chain PEM, key PEM).
pub fn tls_config(
    server: &TestServer,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    tls_config_trusting(&server.bundle_pem(), identity, alpn)
}

/// [`tls_config`] trusting the roots in `bundle_pem`.
pub fn tls_config_trusting(
    bundle_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::rustls_pemfile_certs(&mut bundle_pem.as_bytes()) {
        roots
            .add(rustls_pki_types::CertificateDer::from(cert))
            .expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain");
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A TLS connection to `server` from `source`, with `config`.
pub async fn tls_from(
    server: &TestServer,
    source: IpAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(source, server.grpc).await?;
    let name = rustls_pki_types::ServerName::IpAddress(server.grpc.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A gRPC channel to `server` from `source`, over connections made with `config` (which
/// must offer `h2`). Connections made from one `config` resume each other's TLS sessions.
pub async fn channel_with(
    server: &TestServer,
    source: IpAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    channel_to(server.grpc, source, config).await
}

/// [`channel_with`] to the server at `server_addr`, whose certificate names that IP.
pub async fn channel_to(
    server_addr: SocketAddr,
    source: IpAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let name = server_addr.ip();
    let connector = tower::service_fn(move |_: Uri| {
        let config = Arc::clone(&config);
        async move {
            let tcp = tcp_from(source, server_addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(rustls_pki_types::ServerName::IpAddress(name.into()), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{server_addr}"))
        .expect("uri")
        .connect_with_connector(connector)
        .await
}

/// A CSR client of `server` connecting from `source`.
pub async fn client_from(
    server: &TestServer,
    source: IpAddr,
) -> IstioCertificateServiceClient<Channel> {
    let config = Arc::new(tls_config(server, None, &[b"h2"]));
    IstioCertificateServiceClient::new(channel_with(server, source, config).await.expect("connect"))
}

/// `127.0.0.N`.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}
