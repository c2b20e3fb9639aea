//! `server::start` in this process: the same settings `run` resolves from its flags, the real
//! listeners and store, a real gRPC client over TLS, then `shutdown`, after which what was
//! issued is in the audit log and the ports are free again. No child process, no polling for
//! readiness: `start` returns once the server is ready.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use ca_server::audit::EventKind;
use ca_server::store::{AuditQuery, Store};
use ca_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_serves_and_shuts_down_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = ca_server::cli::Cli::parse_args([
        "ca-server",
        "--data-dir",
        data.to_str().unwrap(),
        "run",
        "--dev",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let settings = ca_server::cli::run_settings(cli).unwrap();
    let server = ca_server::server::start(settings).await.unwrap();
    let (grpc, http) = (server.grpc_addr, server.http_addr);

    // Ready the moment `start` returns.
    let (status, body) = tokio::task::spawn_blocking(move || http_get(http, "/readyz"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let bundle = std::fs::read_to_string(data.join("trust-bundle.pem")).unwrap();
    let channel = Channel::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&bundle)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IstioCertificateServiceClient::new(channel);
    let token = ca_server::auth::dev::DevIssuer::load_or_create(&data)
        .unwrap()
        .mint("shop", "web", "istio-ca", 3600, Some("web-0"))
        .unwrap();
    let (csr, _key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .unwrap();
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let serial = ca_server::x509::serial_hex(cert.raw_serial());
    let refused = create_certificate(&mut client, None, &csr, 0)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    drop(client);

    server.shutdown().await;

    // Everything the server decided is committed: the issuance, and the refusal (written
    // from its aggregation at shutdown).
    let url = format!("sqlite://{}", data.join("ca.db").display());
    let store = Store::open_read_only(&url).await.unwrap();
    let issued = store
        .audit_events(&AuditQuery {
            kind: Some(EventKind::Issued),
            spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].serial.as_deref(), Some(serial.as_str()));
    assert_eq!(issued[0].pod_name.as_deref(), Some("web-0"));
    let denied = store
        .audit_events(&AuditQuery {
            kind: Some(EventKind::Denied),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].code.as_deref(), Some("UNAUTHENTICATED"));
    store.close().await;

    // Both ports are free again.
    std::net::TcpListener::bind(grpc).unwrap();
    std::net::TcpListener::bind(http).unwrap();
}
