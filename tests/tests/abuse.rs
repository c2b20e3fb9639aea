//! Abuse limits: rates per identity and per peer, refusal aggregation, message, header and
//! token sizes, and TLS versions.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use ca_tests::{Fixture, TestIssuer, TestServer, audit_json, create_certificate, csr};
use tonic::Code;

#[tokio::test]
async fn a_looping_identity_is_limited_and_others_are_not_starved() {
    let f = Fixture::start(&["--identity-rate", "1", "--identity-burst", "3"]);
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let looping = f.issuer.token("shop", "looping");
    for _ in 0..3 {
        create_certificate(&mut client, Some(&looping), &csr, 0)
            .await
            .expect("within the burst");
    }
    let status = create_certificate(&mut client, Some(&looping), &csr, 0)
        .await
        .expect_err("past the burst");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/looping asks for certificates faster")
            && status.message().contains("--identity-rate")
            && status.message().contains("retry in"),
        "{}",
        status.message()
    );
    create_certificate(&mut client, Some(&f.issuer.token("shop", "web")), &csr, 0)
        .await
        .expect("another identity is served");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    create_certificate(&mut client, Some(&looping), &csr, 0)
        .await
        .expect("the bucket refills");
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_cut_off_and_recorded_as_a_few_counted_events() {
    let mut f = Fixture::start(&[
        "--unauthenticated-rate",
        "1",
        "--unauthenticated-burst",
        "5",
    ]);
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let forged = f.issuer.sign_with(
        &rcgen::KeyPair::generate().unwrap(),
        Some("test-key"),
        &f.issuer.claims("shop", "web"),
    );
    let (mut unauthenticated, mut cut_off) = (0, 0);
    for _ in 0..200 {
        let status = create_certificate(&mut client, Some(&forged), &csr, 0)
            .await
            .expect_err("forged");
        match status.code() {
            Code::Unauthenticated => unauthenticated += 1,
            Code::ResourceExhausted => {
                assert!(
                    status
                        .message()
                        .contains("too many failed authentications from 127.0.0.1"),
                    "{}",
                    status.message()
                );
                cut_off += 1;
            }
            other => panic!("{other:?}: {}", status.message()),
        }
    }
    assert!(
        (5..=7).contains(&unauthenticated),
        "{unauthenticated} checked before the cut-off"
    );
    assert_eq!(unauthenticated + cut_off, 200);

    // SIGTERM writes the counts still open; then every refusal is accounted for, in a handful
    // of events rather than 200.
    assert!(
        f.server
            .terminate(std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );
    let denied = audit_json(&f.server, &["--kind", "denied", "--limit", "1000"]);
    assert!(denied.len() <= 4, "{} events: {denied:?}", denied.len());
    // An event without a count stands for one refusal; with a count, for that many.
    let total: i64 = denied
        .iter()
        .map(|e| e["count"].as_i64().unwrap_or(1))
        .sum();
    assert_eq!(total, 200, "{denied:?}");
    assert!(
        denied.iter().any(|e| e["code"] == "RESOURCE_EXHAUSTED"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("refusals like this one")),
        "{denied:?}"
    );
    ca_tests::assert_audit_intact(&f.server);
}

#[tokio::test]
async fn oversized_messages_headers_and_tokens_are_refused() {
    let f = Fixture::start(&[]);
    let mut client = f.server.client().await;
    let token = f.issuer.token("shop", "web");

    let huge_csr = "A".repeat(200 * 1024);
    let status = create_certificate(&mut client, Some(&token), &huge_csr, 0)
        .await
        .expect_err("message too large");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    let long_token = "a".repeat(17 * 1024);
    let status = create_certificate(&mut client, Some(&long_token), "x", 0)
        .await
        .expect_err("token too large");
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("larger than 16384 bytes"),
        "{}",
        status.message()
    );

    let mut fresh = f.server.client().await;
    let status = create_certificate(&mut fresh, Some(&"a".repeat(40 * 1024)), "x", 0)
        .await
        .expect_err("header block too large");
    assert_ne!(status.code(), Code::Ok);

    // The server is still there for everyone else.
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("still serving");
}

/// `openssl s_client` against the server with `args`; whether the handshake succeeded.
fn handshake(f: &Fixture, args: &[&str]) -> bool {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &f.server.grpc.to_string(), "-brief"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.contains("CONNECTION ESTABLISHED")
}

#[test]
fn only_tls_1_2_and_1_3_with_modern_suites() {
    let f = Fixture::start(&[]);
    assert!(handshake(&f, &["-tls1_3"]), "TLS 1.3");
    assert!(
        handshake(&f, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
        "TLS 1.2 with ECDHE and AES-GCM"
    );
    assert!(
        !handshake(&f, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        "no TLS 1.1"
    );
    assert!(
        !handshake(&f, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"]),
        "no CBC suites"
    );
    assert!(
        !handshake(&f, &["-tls1_2", "-cipher", "AES128-GCM-SHA256"]),
        "no suites without forward secrecy"
    );
}

#[tokio::test]
async fn a_request_ends_at_the_clients_deadline() {
    // A JWKS endpoint that accepts connections and never answers: authentication hangs.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/openid/v1/jwks", hanging.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in hanging.incoming().take(4) {
            open.push(stream);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--token-issuer",
            "https://slow.example",
            "--token-jwks-url",
            &url,
        ],
    );
    let mut client = server.client().await;
    let mut claims = issuer.claims("shop", "web");
    claims["iss"] = serde_json::json!("https://slow.example");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut request = tonic::Request::new(ca_proto::istio::v1::auth::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", issuer.sign(&claims)).parse().unwrap(),
    );
    // The server stops 50 ms before the client would, and says why.
    request.set_timeout(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = client.create_certificate(request).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{} after {took:?}\n{}",
        status.message(),
        server.stderr()
    );
    assert!(
        status.message().contains("did not complete within 250 ms"),
        "{}",
        status.message()
    );
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    drop(held);
}
