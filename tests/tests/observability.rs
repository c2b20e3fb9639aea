//! What operators watch: `/metrics` and JSON logs.
#![allow(clippy::unwrap_used)]

use ca_tests::{Fixture, create_certificate, csr, http_get};

/// The value of the sample `name` (with its labels, exactly as exposed), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_issuances_refusals_commits_and_expiry() {
    let f = Fixture::start(&[]);
    let (server, issuer) = (&f.server, &f.issuer);
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let token = issuer.token("shop", "web");
    for _ in 0..2 {
        create_certificate(&mut client, Some(&token), &csr, 0)
            .await
            .unwrap();
    }
    create_certificate(&mut client, Some("not-a-jwt"), &csr, 0)
        .await
        .unwrap_err();

    let (status, text) = http_get(server.http, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(sample(&text, "ca_issuances_total"), Some(2.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "ca_refusals_total{code=\"UNAUTHENTICATED\",reason=\"token\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ca_issuance_duration_seconds_count"),
        Some(2.0),
        "{text}"
    );
    // The server's own certificate and the three decisions: at least one commit, four events.
    assert!(
        sample(&text, "ca_audit_commit_events_sum").unwrap() >= 4.0,
        "{text}"
    );
    assert!(sample(&text, "ca_audit_commit_duration_seconds_count").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "ca_token_cache_hits_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ca_token_cache_misses_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(sample(&text, "ca_bundle_sequence"), Some(1.0), "{text}");
    let expiry = sample(
        &text,
        "ca_authority_expiry_seconds{authority_id=\"1\",state=\"active\"}",
    )
    .unwrap();
    let nine_years = 9.0 * 365.0 * 86_400.0;
    assert!(expiry > nine_years, "{expiry}");

    // A rotation shows in the bundle sequence and the second authority's series, once the
    // health task has read the store again (each second: a scrape never queries it).
    assert!(server.cli(&["root", "prepare"]).status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let (_, text) = http_get(server.http, "/metrics").unwrap();
        if sample(&text, "ca_bundle_sequence") == Some(2.0) || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&text, "ca_bundle_sequence"), Some(2.0), "{text}");
    assert!(
        sample(
            &text,
            "ca_authority_expiry_seconds{authority_id=\"2\",state=\"prepared\"}"
        )
        .is_some(),
        "{text}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let f = Fixture::start(&["--log-format", "json"]);
    let server = &f.server;
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some("not-a-jwt"), &csr, 0)
        .await
        .unwrap_err();

    let log = server.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "Listening" && l["grpc"].is_string()),
        "{log}"
    );
    assert!(
        lines.iter().any(
            |l| l["message"] == "Refused certificate request" && l["code"] == "UNAUTHENTICATED"
        ),
        "{log}"
    );
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let f = Fixture::start(&[]);
    let server = &f.server;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = tokio_stream::iter(vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "istio.v1.auth.IstioCertificateService".into(),
        )),
    ]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "istio.v1.auth.IstioCertificateService",
        "ca.v1.TrustBundleService",
        "ca.v1.AuditService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for the CSR service");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // And the health service answers over the same port.
    assert_eq!(
        server.grpc_health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
