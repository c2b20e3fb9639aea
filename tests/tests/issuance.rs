//! Issuance end to end: the real binary, a real gRPC client over TLS trusting only
//! `trust-bundle.pem`, OpenSSL and rustls-webpki checking what comes back.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use ca_tests::*;
use tonic::Code;
use x509_parser::prelude::*;

const TD: &str = "cluster.local";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: TestServer,
    issuer: TestIssuer,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    Fixture {
        _dir: dir,
        server,
        issuer,
    }
}

/// Checks the X509-SVID profile of DESIGN.md on `leaf_pem`.
fn assert_svid_profile(leaf_pem: &str, id: &str, rsa: bool) {
    let der = der(leaf_pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("leaf parses");
    assert!(
        cert.subject().iter().next().is_none(),
        "subject must be empty"
    );

    let san = cert.subject_alternative_name().unwrap().expect("SAN");
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(id)]);

    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basic constraints");
    assert!(bc.critical && !bc.value.ca);

    let ku = cert.key_usage().unwrap().expect("key usage");
    assert!(ku.critical && ku.value.digital_signature());
    assert_eq!(ku.value.key_encipherment(), rsa);
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());

    let eku = cert.extended_key_usage().unwrap().expect("EKU");
    assert!(eku.value.server_auth && eku.value.client_auth);

    assert!(
        cert.get_extension_unique(&oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );
    assert!(
        cert.get_extension_unique(&oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .is_some()
    );

    let serial = cert.raw_serial();
    let significant: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
    assert_eq!(significant.len(), 16, "128-bit serial");
    assert!(serial[0] & 0x80 == 0, "serial must be positive");

    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        (now - 125..=now - 115).contains(&nb),
        "notBefore backdated 2 min: {nb} vs {now}"
    );
    assert!((now + 3595..=now + 3605).contains(&na), "default TTL 1h");
}

#[tokio::test]
async fn issues_verifiable_svids_for_every_key_type() {
    let f = start();
    let mut client = f.server.client().await;
    let token = f.issuer.token("shop", "web");
    let id = spiffe("shop", "web");
    let bundle = f.server.bundle_pem();
    let work = tempfile::tempdir().unwrap();

    for (alg, name) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256"),
        (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384"),
        (&rcgen::PKCS_RSA_SHA256, "RSA-2048"),
        (&rcgen::PKCS_ED25519, "Ed25519"),
    ] {
        // One CSR with the SAN set, one with none: both get the caller's identity.
        for sans in [vec![id.as_str()], vec![]] {
            let (csr, key) = csr(alg, &sans);
            let chain = create_certificate(&mut client, Some(&token), &csr, 0)
                .await
                .unwrap_or_else(|s| panic!("{name}: {s:?}"));
            assert_eq!(chain.len(), 2, "{name}: leaf then root");
            assert_eq!(
                der(chain.last().unwrap()),
                der(&bundle),
                "{name}: root is the bundle's"
            );
            assert_svid_profile(&chain[0], &id, alg == &rcgen::PKCS_RSA_SHA256);

            let leaf_der = der(&chain[0]);
            let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
            use rcgen::PublicKeyData;
            assert_eq!(
                leaf.public_key().raw,
                key.subject_public_key_info().as_slice(),
                "{name}: leaf carries the CSR's key"
            );

            webpki_verify(&chain, &bundle).unwrap_or_else(|e| panic!("{name}: webpki: {e}"));
            for purpose in ["sslclient", "sslserver"] {
                openssl_verify(work.path(), &chain, purpose)
                    .unwrap_or_else(|e| panic!("{name}: openssl {purpose}: {e}"));
            }
        }
    }

    // A TTL within the maximum is honoured.
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&token), &csr, 86_400)
        .await
        .unwrap();
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 86_395..=now + 86_405).contains(&leaf.validity().not_after.timestamp()));
}

#[tokio::test]
async fn csr_asking_for_ca_never_gets_a_ca() {
    let f = start();
    let mut client = f.server.client().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = create_certificate(&mut client, Some(&f.issuer.token("a", "b")), &csr, 0)
        .await
        .expect("issued");
    assert_svid_profile(&chain[0], &spiffe("a", "b"), false);
}

async fn refused(
    client: &mut ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient<tonic::transport::Channel>,
    token: Option<&str>,
    csr: &str,
    ttl: i64,
    code: Code,
    message: &str,
) {
    let status = create_certificate(client, token, csr, ttl)
        .await
        .expect_err(&format!("expected {code:?} ({message})"));
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(message),
        "message {:?} should contain {message:?}",
        status.message()
    );
    if let Some(token) = token {
        assert!(
            !status.message().contains(token),
            "the token must never be echoed"
        );
    }
}

#[tokio::test]
async fn refuses_bad_tokens_and_csrs_with_codes_and_reasons() {
    let mut f = start();
    let mut client = f.server.client().await;
    let issuer = &f.issuer;
    let (good_csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = issuer.claims("shop", "web");
    let with = |key: &str, value: serde_json::Value| {
        let mut c = claims.clone();
        c[key] = value;
        issuer.sign(&c)
    };

    let mut bad_tokens: Vec<(String, &str)> = vec![
        (with("exp", serde_json::json!(now - 30)), "token expired at"),
        (
            with("aud", serde_json::json!(["other"])),
            "audience [other] does not include istio-ca",
        ),
        (
            with("iss", serde_json::json!("https://evil.example")),
            "is not the configured issuer",
        ),
        (
            with("sub", serde_json::json!("system:serviceaccount:other:web")),
            "disagrees with the kubernetes.io claim",
        ),
        (
            with("sub", serde_json::json!("admin")),
            "is not system:serviceaccount",
        ),
        (
            issuer.sign_with(
                &rcgen::KeyPair::generate().unwrap(),
                Some("test-key-1"),
                &claims,
            ),
            "signature does not verify",
        ),
        (
            issuer.sign_with(
                &rcgen::KeyPair::generate().unwrap(),
                Some("rotated-away"),
                &claims,
            ),
            "no key with kid \"rotated-away\"",
        ),
        ("not-a-jwt".to_owned(), "not a well-formed JWT"),
    ];
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    bad_tokens.push((issuer.sign(&no_exp), "no exp claim"));
    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"test-key-1"}"#),
        b64(claims.to_string().as_bytes())
    );
    bad_tokens.push((none, "token algorithm \"none\" is not accepted"));
    // HS256 keyed with the issuer's public key (the classic algorithm-confusion attack).
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(issuer.kid.clone());
    let hs = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&issuer.public_key_bytes()),
    )
    .unwrap();
    bad_tokens.push((hs, "token algorithm \"HS256\" is not accepted"));

    for (token, message) in &bad_tokens {
        refused(
            &mut client,
            Some(token),
            &good_csr,
            0,
            Code::Unauthenticated,
            message,
        )
        .await;
    }
    refused(
        &mut client,
        None,
        &good_csr,
        0,
        Code::Unauthenticated,
        "no bearer token",
    )
    .await;

    let token = issuer.token("shop", "web");
    let (other_id, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[&spiffe("shop", "admin")]);
    refused(
        &mut client,
        Some(&token),
        &other_id,
        0,
        Code::PermissionDenied,
        "spiffe://cluster.local/ns/shop/sa/admin",
    )
    .await;
    refused(
        &mut client,
        Some(&token),
        &other_id,
        0,
        Code::PermissionDenied,
        "caller's identity is spiffe://cluster.local/ns/shop/sa/web",
    )
    .await;
    let (other_td, _) = csr(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["spiffe://evil.org/ns/shop/sa/web"],
    );
    refused(
        &mut client,
        Some(&token),
        &other_td,
        0,
        Code::PermissionDenied,
        "spiffe://evil.org/ns/shop/sa/web",
    )
    .await;

    refused(
        &mut client,
        Some(&token),
        "hello",
        0,
        Code::InvalidArgument,
        "not PEM",
    )
    .await;
    let corrupted = good_csr.replacen("MI", "QQ", 1);
    refused(
        &mut client,
        Some(&token),
        &corrupted,
        0,
        Code::InvalidArgument,
        "CSR",
    )
    .await;
    let oversized = format!("{good_csr}{}", "A".repeat(70 * 1024));
    refused(
        &mut client,
        Some(&token),
        &oversized,
        0,
        Code::InvalidArgument,
        "more than the 64 KiB allowed",
    )
    .await;
    let rsa1024 = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:1024",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=weak",
            "-outform",
            "PEM",
        ])
        .output()
        .expect("openssl");
    assert!(
        rsa1024.status.success(),
        "{}",
        String::from_utf8_lossy(&rsa1024.stderr)
    );
    let rsa1024 = String::from_utf8(rsa1024.stdout).unwrap();
    refused(
        &mut client,
        Some(&token),
        &rsa1024,
        0,
        Code::InvalidArgument,
        "1024 bits",
    )
    .await;
    refused(
        &mut client,
        Some(&token),
        &good_csr,
        86_401,
        Code::InvalidArgument,
        "above the maximum",
    )
    .await;
    refused(
        &mut client,
        Some(&token),
        &good_csr,
        -1,
        Code::InvalidArgument,
        "negative",
    )
    .await;

    // The server keeps serving.
    create_certificate(&mut client, Some(&token), &good_csr, 0)
        .await
        .expect("still serving");

    // Every refusal is in the audit log with its code and reason; the chain verifies. An
    // identical refusal repeated within seconds is counted into one event, written when its
    // window closes or at shutdown: stop the server so that every count is written.
    assert!(
        f.server
            .terminate(std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );
    let denied = audit_json(&f.server, &["--kind", "denied"]);
    let expected = bad_tokens.len() + 1 + 3 + 6;
    let refusals: i64 = denied
        .iter()
        .map(|e| e["count"].as_i64().unwrap_or(1))
        .sum();
    assert_eq!(refusals, expected as i64, "{denied:#?}");
    for event in &denied {
        assert!(
            event["code"].is_string() && event["reason"].is_string(),
            "{event}"
        );
        let line = event.to_string();
        for (token, _) in &bad_tokens {
            assert!(
                !line.contains(token.as_str()),
                "a token reached the audit log"
            );
        }
    }
    assert!(denied.iter().any(|e| e["code"] == "PERMISSION_DENIED"
        && e["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web"
        && e["csr_sha256"].is_string()));
    let verify = f.server.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(
        !f.server.stderr().contains(&token),
        "a token reached the log"
    );
}

#[tokio::test]
async fn concurrent_requests_get_distinct_serials_and_survive_a_restart() {
    let mut f = start();
    let client = f.server.client().await;
    let token = f.issuer.token("load", "client");
    let root_before = f.server.bundle_pem();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut client = client.clone();
        let token = token.clone();
        tasks.spawn(async move {
            let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
            create_certificate(&mut client, Some(&token), &csr, 0).await
        });
    }
    let mut serials = std::collections::HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let chain = result.unwrap().expect("issued");
        serials.insert(serial_of(&chain[0]));
    }
    assert_eq!(serials.len(), 200, "200 distinct serials");

    let check_audit = |server: &TestServer| {
        let events = audit_json(
            server,
            &["--spiffe-id", "spiffe://cluster.local/ns/load/sa/client"],
        );
        assert_eq!(events.len(), 200);
        let logged: std::collections::HashSet<String> = events
            .iter()
            .map(|e| e["serial"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            logged, serials,
            "every serial a client received is in the audit log"
        );
        for e in &events {
            assert_eq!(e["kind"], "issued");
            assert_eq!(e["namespace"], "load");
            assert_eq!(e["service_account"], "client");
            assert_eq!(e["pod_name"], "client-pod");
            assert_eq!(
                e["token_issuer"],
                "https://kubernetes.default.svc.cluster.local"
            );
            assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
            assert_eq!(e["public_key_sha256"].as_str().unwrap().len(), 64);
            assert_eq!(e["csr_sha256"].as_str().unwrap().len(), 64);
            assert_eq!(e["authority_id"], 1);
        }
        let verify = server.cli(&["audit", "verify"]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    };
    check_audit(&f.server);

    // SIGKILL and restart on the same data dir: nothing lost, same root.
    f.server.restart();
    assert_eq!(
        f.server.bundle_pem(),
        root_before,
        "a restart keeps the root"
    );
    check_audit(&f.server);
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("issued after restart");
    assert_eq!(der(chain.last().unwrap()), der(&root_before));
}

#[tokio::test]
async fn no_certificate_without_its_audit_record() {
    let f = start();
    let mut client = f.server.client().await;
    let token = f.issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("works before the fault");

    // Make every audit insert fail, as a full or broken disk would.
    let url = f.server.database_url();
    let fail = if postgres_admin_url().is_some() {
        vec![
            "CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'simulated storage failure'; END $$",
            "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION fail_audit()",
        ]
    } else {
        vec![
            "CREATE TRIGGER fail_audit BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'simulated storage failure'); END",
        ]
    };
    run_sql(&url, &fail).await;
    let before = audit_json(&f.server, &[]).len();

    let status = create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect_err("no certificate while the audit log cannot be written");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("audit log"),
        "{}",
        status.message()
    );
    assert_eq!(audit_json(&f.server, &[]).len(), before);

    // The fault clears: service resumes by itself.
    let clear = if postgres_admin_url().is_some() {
        "DROP TRIGGER fail_audit ON audit_events"
    } else {
        "DROP TRIGGER fail_audit"
    };
    run_sql(&url, &[clear]).await;
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("service resumes");
    let verify = f.server.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[tokio::test]
async fn impersonation_needs_a_trusted_node_account() {
    let f = start();
    let mut client = f.server.client().await;
    let token = f.issuer.token("istio-system", "ztunnel");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(spiffe("shop", "web"))),
        },
    );
    let mut request = tonic::Request::new(ca_proto::istio::v1::auth::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: Some(metadata),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let status = client
        .create_certificate(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
    );
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert!(status.message().contains("--trusted-node-account"));
}
