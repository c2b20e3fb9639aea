//! `--token-review`: the Kubernetes API server checks tokens, over HTTPS, with this server's
//! own credentials; positive answers are remembered briefly; pod name and uid reach the audit.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::sync::Arc;

use ca_tests::kube::{FakeKubeApi, review_authenticated, review_refused};
use ca_tests::*;
use tonic::Code;

/// A server whose only way to check tokens is the fake API's TokenReview.
fn start(api: &FakeKubeApi, dir: &std::path::Path) -> TestServer {
    let flags = api.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestServer::start(&dir.join("data"), &flags)
}

#[tokio::test]
async fn the_api_server_reviews_tokens_and_its_answer_is_remembered() {
    let dir = tempfile::tempdir().unwrap();
    // The tokens are signed by an issuer the CA knows nothing of: only the review vouches.
    let issuer = TestIssuer::new(dir.path());
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(|_| {
            (
                201,
                review_authenticated("shop", "web", "web-7d9f", "uid-1234"),
            )
        }),
    );
    let server = start(&api, dir.path());
    let mut client = server.client().await;
    let token = issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .unwrap();
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        r#"[URI("spiffe://cluster.local/ns/shop/sa/web")]"#
    );

    // The review: our own token as credentials, the caller's token and our audience asked.
    let requests = api.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let review = &requests[0];
    assert_eq!(review.method, "POST");
    assert_eq!(review.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(
        review.authorization.as_deref(),
        Some(format!("Bearer {}", FakeKubeApi::CA_TOKEN).as_str())
    );
    assert_eq!(review.body["kind"], "TokenReview");
    assert_eq!(review.body["spec"]["token"], token.as_str());
    assert_eq!(review.body["spec"]["audiences"][0], "istio-ca");

    // Renewing with the same token is answered from memory.
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .unwrap();
    assert_eq!(api.requests().len(), 1, "a positive answer is remembered");

    // Pod name and uid from the review's extra fields are in the audit event.
    let issued = audit_json(&server, &["--kind", "issued", "--namespace", "shop"]);
    let event = &issued[0];
    assert_eq!(event["pod_name"], "web-7d9f", "{event}");
    assert_eq!(event["pod_uid"], "uid-1234", "{event}");
    assert!(
        event["token_issuer"]
            .as_str()
            .unwrap()
            .contains("TokenReview"),
        "{event}"
    );

    // A token the API server refuses is refused, with its reason, and not remembered.
    api.set_handler(Arc::new(|_| {
        (201, review_refused("token has been invalidated"))
    }));
    let other = issuer.token("shop", "cart");
    let status = create_certificate(&mut client, Some(&other), &csr, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("token has been invalidated"),
        "{}",
        status.message()
    );

    // An API server that cannot answer makes the request retryable, not refused for good.
    api.set_handler(Arc::new(|_| (500, serde_json::json!({"kind": "Status"}))));
    let third = issuer.token("shop", "api");
    let status = create_certificate(&mut client, Some(&third), &csr, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("TokenReview"),
        "{}",
        status.message()
    );

    // /metrics counts each review by outcome, for the TokenReview alert: one each (the
    // renewal was answered from memory, with no review).
    let (_, metrics) = http_get(server.http, "/metrics").unwrap();
    for outcome in ["authenticated", "refused", "failed"] {
        assert!(
            metrics.contains(&format!(
                "ca_token_reviews_total{{outcome=\"{outcome}\"}} 1"
            )),
            "{outcome}: {metrics}"
        );
    }
    assert!(metrics.contains("ca_token_reviews_total{outcome=\"busy\"} 0"));

    // Neither token reached the log.
    let log = server.stderr();
    for t in [&token, &other, &third] {
        assert!(!log.contains(t.as_str()), "a token in the log");
    }
    assert!(!log.contains(FakeKubeApi::CA_TOKEN));
}

#[tokio::test]
async fn a_forbidden_review_names_the_missing_permission() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(|_| {
            (
                403,
                serde_json::json!({"kind": "Status", "reason": "Forbidden"}),
            )
        }),
    );
    let server = start(&api, dir.path());
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let status = create_certificate(&mut client, Some(&issuer.token("shop", "web")), &csr, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("tokenreviews") && status.message().contains("ClusterRole"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_api_server_certificate_we_do_not_trust_is_named_as_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(|_| (201, review_authenticated("shop", "web", "web-0", "uid-0"))),
    );
    // The server is given another CA than the one the API's certificate chains to.
    let (_, other_ca) = ca_tests::kube::loopback_tls("some other ca");
    let other_ca_file = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    let mut flags = api.flags();
    let at = flags.iter().position(|f| f == "--kube-ca-file").unwrap();
    flags[at + 1] = other_ca_file.display().to_string();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let status = create_certificate(&mut client, Some(&issuer.token("shop", "web")), &csr, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    // Not merely hyper's `client error (Connect)`: the TLS reason.
    assert!(
        status.message().contains("invalid peer certificate")
            && status.message().contains("UnknownIssuer"),
        "{}",
        status.message()
    );
    assert!(api.requests().is_empty());
}
