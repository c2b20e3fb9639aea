//! Root rotation on a live server, done with the CLI, never breaks mTLS between proxies that
//! follow the bundle; the bundle is published as PEM, SPIFFE JWKS and a gRPC stream.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ca_tests::mesh::{Proxy, mtls_handshake};
use ca_tests::*;

fn start() -> (tempfile::TempDir, TestServer, TestIssuer) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    (dir, server, issuer)
}

fn cli_err(server: &TestServer, args: &[&str]) -> String {
    let out = server.cli(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Waits (up to `limit`) until `done` holds; returns how long it took.
async fn within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_never_breaks_mtls_between_proxies_that_follow_the_bundle() {
    let (_dir, server, issuer) = start();
    let ttl = 6;
    let a = Arc::new(Proxy::start(&server, issuer.token("shop", "web"), ttl, true).await);
    let b = Arc::new(Proxy::start(&server, issuer.token("shop", "db"), ttl, true).await);
    // A proxy that got a long-lived certificate from the old root and never renews.
    let stale = Proxy::start(&server, issuer.token("shop", "legacy"), 3600, false).await;
    let seq0 = a.held().sequence;
    assert!(a.held().leaf_issuer.ends_with("root 1"));

    // Handshakes both ways, all the time, each with what the proxies hold at that moment.
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicU32::new(0));
    let pinger = {
        let (a, b, stop, handshakes) = (a.clone(), b.clone(), stop.clone(), handshakes.clone());
        tokio::task::spawn_blocking(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (client, server, dir) in [(&a, &b, "a→b"), (&b, &a, "b→a")] {
                    if let Err(e) = mtls_handshake(client, server) {
                        failures.push(format!(
                            "{dir}: {e} (a {:?}, b {:?})",
                            a.held().leaf_issuer,
                            b.held().leaf_issuer
                        ));
                    }
                    handshakes.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Prepare: the new root joins the bundle; every proxy has it within 2 s.
    let new_id = server.cli_ok(&["root", "prepare"]).trim().to_owned();
    assert_eq!(new_id, "2");
    let took = within(
        Duration::from_secs(2),
        "prepared root reaches the proxies",
        || {
            a.held().sequence == seq0 + 1
                && b.held().sequence == seq0 + 1
                && a.held().roots.len() == 2
        },
    )
    .await;
    eprintln!("prepare reached the proxies in {took:?}");

    // 2. Activate: new certificates come from the new root as the proxies renew.
    server.activate("2");
    let activated = Instant::now();
    within(
        Duration::from_secs(ttl as u64 + 4),
        "renewals under the new root",
        || a.held().leaf_issuer.ends_with("root 2") && b.held().leaf_issuer.ends_with("root 2"),
    )
    .await;
    assert_eq!(
        a.held().sequence,
        seq0 + 1,
        "activation does not change the bundle"
    );

    // 3. Retire: refused while certificates from the old root are unexpired.
    let refused = cli_err(&server, &["root", "retire", "1"]);
    assert!(
        refused.contains("unexpired certificate(s) chain to authority 1"),
        "{refused}"
    );
    assert!(refused.contains("--force"), "{refused}");
    // Wait out the renewing proxies' old leaves; the stale proxy's still holds it back.
    tokio::time::sleep((Duration::from_secs(ttl as u64 + 1)).saturating_sub(activated.elapsed()))
        .await;
    let refused = cli_err(&server, &["root", "retire", "1"]);
    assert!(
        refused.contains("1 unexpired certificate(s)"),
        "only the stale one is left: {refused}"
    );
    server.cli_ok(&["root", "retire", "1", "--force"]);
    within(
        Duration::from_secs(2),
        "retirement reaches the proxies",
        || {
            a.held().sequence == seq0 + 2
                && b.held().sequence == seq0 + 2
                && a.held().roots.len() == 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    let failures = pinger.await.unwrap();
    let count = handshakes.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {count} handshakes failed: {failures:#?}",
        failures.len()
    );
    assert!(count > 100, "only {count} handshakes");
    assert!(
        a.held().certificates >= 3 && b.held().certificates >= 3,
        "renewals happened"
    );

    // The proxy still holding an old-root certificate is rejected both ways.
    let err = mtls_handshake(&stale, &a).unwrap_err();
    assert!(
        err.contains("server side") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let err = mtls_handshake(&a, &stale).unwrap_err();
    assert!(err.contains("client side"), "{err}");

    // Every operation is in the audit log, with who did it; the chain verifies; state
    // survives a restart.
    let authority_events = audit_json(&server, &["--kind", "authority"]);
    let reasons: Vec<&str> = authority_events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(authority_events.len(), 4, "{reasons:#?}");
    assert!(reasons[0].contains("retired authority 1") && reasons[0].contains("--force"));
    assert!(
        reasons[1].contains("activated authority 2")
            && reasons[1].contains("authority 1 is now retiring")
    );
    assert!(reasons[2].contains("prepared a self-signed root"));
    assert!(authority_events.iter().all(|e| e["operator"].is_string()));
    assert!(
        server
            .cli_ok(&["audit", "verify"])
            .starts_with("audit log intact")
    );
}

#[tokio::test]
async fn the_bundle_is_published_as_pem_jwks_and_a_stream() {
    use ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient;
    use ca_proto::ca::v1::{GetTrustBundleRequest, WatchTrustBundleRequest};

    let (_dir, mut server, _issuer) = start();
    let https = https_client(&server);

    let (status, headers, body) = https.get(&server, "/trust-bundle", None);
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let etag = headers.get("etag").cloned().unwrap();
    assert_eq!(etag, "\"1\"");
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["spiffe_sequence"], 1);
    assert_eq!(jwks["spiffe_refresh_hint"], 300);
    let check_jwks = |jwks: &serde_json::Value, pem_bundle: &str| {
        use base64::Engine;
        let keys = jwks["keys"].as_array().unwrap();
        // Beside the roots, each authority's JWT-SVID key (jwt_keys.rs checks them whole).
        let (roots, jwt): (Vec<_>, Vec<_>) = keys.iter().partition(|k| k["use"] == "x509-svid");
        assert!(!jwt.is_empty());
        for k in &jwt {
            assert_eq!(k["use"], "jwt-svid");
            assert!(k["kid"].is_string());
        }
        let from_jwks: Vec<Vec<u8>> = roots
            .iter()
            .map(|k| {
                assert_eq!(k["use"], "x509-svid");
                assert!(k.get("kid").is_none());
                assert_eq!(k["kty"], "EC");
                base64::engine::general_purpose::STANDARD
                    .decode(k["x5c"][0].as_str().unwrap())
                    .unwrap()
            })
            .collect();
        let from_pem: Vec<Vec<u8>> = pem_certs(pem_bundle);
        assert_eq!(from_jwks, from_pem, "the JWKS roots equal the PEM bundle's");
    };
    let (_, _, pem) = https.get(&server, "/trust-bundle.pem", None);
    check_jwks(&jwks, &pem);
    assert_eq!(pem, server.bundle_pem(), "the file and the endpoint agree");
    assert_eq!(https.get(&server, "/trust-bundle", Some(&etag)).0, 304);
    assert_eq!(https.get(&server, "/trust-bundle.pem", Some(&etag)).0, 304);

    let channel = tonic::transport::Channel::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(server.bundle_pem())),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = TrustBundleServiceClient::new(channel);
    let got = client
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            got.trust_domain.as_str(),
            got.sequence,
            got.refresh_hint_seconds
        ),
        ("cluster.local", 1, 300)
    );
    let mut stream = client
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().sequence,
        1,
        "the current bundle at once"
    );

    // Each change arrives within 2 s; the sequence moves on each change and never otherwise.
    server.cli_ok(&["root", "prepare"]);
    let (msg, took) = next(&mut stream).await;
    assert_eq!((msg.sequence, msg.root_certificates.len()), (2, 2));
    eprintln!("prepare delivered in {took:?}");
    server.activate("2");
    // Activation leaves the roots alone: no message, no new sequence.
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), stream.message())
            .await
            .is_err()
    );
    server.cli_ok(&["root", "retire", "1"]);
    let (msg, _) = next(&mut stream).await;
    assert_eq!((msg.sequence, msg.root_certificates.len()), (3, 1));

    // The server re-minted its own certificate at activation: a client that trusts only
    // the new root (the bundle after retirement) connects without any restart.
    let https = https_client(&server);
    assert_eq!(pem_certs(&server.bundle_pem()).len(), 1);
    let (status, headers, body) = https.get(&server, "/trust-bundle", Some(&etag));
    assert_eq!(status, 200, "a stale ETag gets the new bundle");
    assert_eq!(headers.get("etag").map(String::as_str), Some("\"3\""));
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["spiffe_sequence"], 3);
    let file = server.bundle_pem();
    check_jwks(&jwks, &file);
    assert_eq!(
        pem_certs(&file),
        vec![der(&msg.root_certificates[0])],
        "trust-bundle.pem was rewritten"
    );

    // The CLI shows the same bundle, read from the store.
    assert_eq!(server.cli_ok(&["bundle", "show"]), file);
    let shown: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    assert_eq!(shown, jwks);

    // State survives a restart.
    let status_before = server.cli_ok(&["root", "status", "--format", "json"]);
    server.restart();
    assert_eq!(
        server.cli_ok(&["root", "status", "--format", "json"]),
        status_before
    );
    let states: Vec<serde_json::Value> = status_before
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(states[0]["state"], "retired");
    assert_eq!(states[1]["state"], "active");
    for s in &states {
        for key in [
            "id",
            "state",
            "subject",
            "not_before",
            "not_after",
            "fingerprint_sha256",
        ] {
            assert!(!s[key].is_null(), "{key} in {s}");
        }
    }
    assert_eq!(server.bundle_pem(), file);
}

/// The next message of a bundle stream, which must arrive within 2 s.
async fn next(
    stream: &mut tonic::Streaming<ca_proto::ca::v1::TrustBundle>,
) -> (ca_proto::ca::v1::TrustBundle, Duration) {
    let start = Instant::now();
    let msg = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("within 2 s")
        .unwrap()
        .unwrap();
    (msg, start.elapsed())
}

#[test]
fn wrong_transitions_are_refused_with_a_reason() {
    let (_dir, server, _issuer) = start();
    let msg = cli_err(&server, &["root", "retire", "1"]);
    assert!(
        msg.contains("authority 1 is active") && msg.contains("activate another authority first"),
        "{msg}"
    );
    let msg = cli_err(&server, &["root", "activate", "1"]);
    assert!(msg.contains("already active"), "{msg}");
    let msg = cli_err(&server, &["root", "activate", "9"]);
    assert!(msg.contains("no authority with id 9"), "{msg}");
    server.cli_ok(&["root", "prepare", "--key-type", "ec-p384"]);
    server.cli_ok(&["root", "retire", "2"]);
    let msg = cli_err(&server, &["root", "activate", "2"]);
    assert!(
        msg.contains("authority 2 is retired") && msg.contains("prepare a new authority"),
        "{msg}"
    );
    let msg = cli_err(&server, &["root", "retire", "2"]);
    assert!(msg.contains("already retired"), "{msg}");
    assert!(
        server
            .cli_ok(&["audit", "verify"])
            .starts_with("audit log intact")
    );
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

/// A minimal HTTPS/1.1 client over rustls, trusting the server's bundle file.
struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
}

fn https_client(server: &TestServer) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    for der in pem_certs(&server.bundle_pem()) {
        roots
            .add(rustls_pki_types::CertificateDer::from(der))
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    HttpsClient {
        config: Arc::new(config),
    }
}

impl HttpsClient {
    fn get(
        &self,
        server: &TestServer,
        path: &str,
        if_none_match: Option<&str>,
    ) -> (u16, std::collections::HashMap<String, String>, String) {
        use std::io::{Read, Write};
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(server.grpc).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        let extra = if_none_match
            .map(|t| format!("If-None-Match: {t}\r\n"))
            .unwrap_or_default();
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    }
}
