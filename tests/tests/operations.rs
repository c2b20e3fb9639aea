//! The operator's view, end to end: the README's demo with the real binary, health, the TLS
//! the server offers, the audit commands, the JWKS URL source, and start-up refusals.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::net::TcpListener;
use std::sync::Arc;

use ca_tests::*;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn openssl(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    stdout(&out)
}

#[test]
fn a_log_written_to_a_file_has_no_colour_codes_and_rfc3339_times() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--dev"]);
    let log = server.stderr();
    assert!(!log.contains('\u{1b}'), "{log}");
    let loaded = log
        .lines()
        .find(|l| l.contains("Loaded the active authority"))
        .unwrap_or_else(|| panic!("{log}"));
    let not_after = loaded.split("not_after=").nth(1).unwrap();
    let not_after = not_after.split_whitespace().next().unwrap();
    assert!(
        time::OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{loaded}"
    );
}

#[test]
fn readme_demo_dev_token_then_request_then_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--dev"]);

    let token = stdout(&server.cli(&[
        "token",
        "issue",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--pod-name",
        "web-0",
    ]));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let bundle = server.data_dir.join("trust-bundle.pem");

    for key_type in ["ec-p256", "ec-p384", "rsa-2048", "ed25519"] {
        let out_dir = dir.path().join(key_type);
        let printed = stdout(&server.cli(&[
            "request",
            "--server",
            &format!("https://{}", server.grpc),
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--key-type",
            key_type,
            "--ttl",
            "15m",
        ]));
        assert!(
            printed.starts_with("spiffe://cluster.local/ns/default/sa/web serial "),
            "{printed}"
        );
        // Times print as RFC 3339, as everywhere else.
        let until = printed.split(" valid until ").nth(1).unwrap();
        let until = until.split(" -> ").next().unwrap();
        assert!(
            time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{printed}"
        );

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out_dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem must be private");

        let chain = out_dir.join("cert-chain.pem");
        let root = out_dir.join("root-cert.pem");
        let text = openssl(&["x509", "-in", chain.to_str().unwrap(), "-noout", "-text"]);
        assert!(
            text.contains("URI:spiffe://cluster.local/ns/default/sa/web"),
            "{text}"
        );
        openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            root.to_str().unwrap(),
            chain.to_str().unwrap(),
        ]);
        // The certificate certifies the key that was written.
        let cert_key = openssl(&["x509", "-in", chain.to_str().unwrap(), "-noout", "-pubkey"]);
        let key_pub = openssl(&[
            "pkey",
            "-in",
            out_dir.join("key.pem").to_str().unwrap(),
            "-pubout",
        ]);
        assert_eq!(cert_key, key_pub, "{key_type}");
    }

    let events = audit_json(
        &server,
        &[
            "--kind",
            "issued",
            "--spiffe-id",
            "spiffe://cluster.local/ns/default/sa/web",
        ],
    );
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["pod_name"], "web-0");
    assert_eq!(events[0]["token_issuer"], "ca-server-dev");
    let ttl = ::time::OffsetDateTime::parse(
        events[0]["not_after"].as_str().unwrap(),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap()
        - ::time::OffsetDateTime::now_utc();
    assert!(
        ttl.whole_minutes() <= 15 && ttl.whole_minutes() >= 14,
        "--ttl 15m: {ttl}"
    );

    // A token for the wrong audience is refused through the same client, with the reason.
    let other = stdout(&server.cli(&[
        "token",
        "issue",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--audience",
        "api",
    ]));
    std::fs::write(&token_file, other).unwrap();
    let out = server.cli(&[
        "request",
        "--server",
        &format!("https://{}", server.grpc),
        "--ca-bundle",
        bundle.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--out-dir",
        dir.path().join("refused").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Unauthenticated")
            && stderr.contains("audience [api] does not include istio-ca"),
        "{stderr}"
    );
}

#[test]
fn health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--dev"]);
    assert_eq!(http_get(server.http, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(server.http, "/readyz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(http_get(server.http, "/nope").unwrap().0, 404);
}

#[test]
fn tls_offers_h2_with_tls13_aes_gcm_and_its_cert_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--dev"]);

    // What ztunnel offers: TLS 1.3, AES-GCM suites only, ALPN h2.
    let config = ca_tests::ztunnel::ztunnel_tls(&server);

    let mut served_serials = Vec::new();
    for name in ["localhost", "127.0.0.1"] {
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config.clone()), server_name).unwrap();
        let mut tcp = std::net::TcpStream::connect(server.grpc).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .unwrap_or_else(|e| panic!("{name}: handshake: {e}"));
        }
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        served_serials.push(serial_of_der(&conn.peer_certificates().unwrap()[0]));
        // The leaf alone: the root is the client's own, from its bundle.
        assert_eq!(conn.peer_certificates().unwrap().len(), 1);
    }
    // The server's own certificate is an issuance like any other.
    let issued = audit_json(&server, &["--kind", "issued"]);
    let event = issued
        .iter()
        .find(|e| e["serial"].as_str() == Some(&served_serials[0]))
        .expect("the served certificate's serial is in the audit log");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .contains("server TLS certificate for localhost, 127.0.0.1")
    );
}

#[tokio::test]
async fn audit_list_filters_and_formats() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let mut client = server.client().await;
    let start = ::time::OffsetDateTime::now_utc();
    let mut serials = Vec::new();
    for (ns, sa) in [("shop", "web"), ("shop", "db"), ("bank", "web")] {
        let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        let chain = create_certificate(&mut client, Some(&issuer.token(ns, sa)), &csr, 0)
            .await
            .unwrap();
        serials.push(serial_of(&chain[0]));
    }
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, None, &csr, 0)
        .await
        .unwrap_err();

    let all = audit_json(&server, &[]);
    // authority creation, server certificate, three issuances, one refusal; newest first.
    assert_eq!(all.len(), 6);
    let seqs: Vec<i64> = all.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![6, 5, 4, 3, 2, 1]);
    let keys: Vec<&str> = all[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "seq",
            "time",
            "kind",
            "spiffe_id",
            "namespace",
            "service_account",
            "pod_name",
            "pod_uid",
            "token_issuer",
            "serial",
            "not_before",
            "not_after",
            "authority_id",
            "public_key_sha256",
            "csr_sha256",
            "peer",
            "code",
            "reason",
            "count",
            "operator",
            "caller",
            "node",
            "requested",
            "anchor_seq",
            "anchor_hash",
            "audience",
            "request",
            "request_uid",
            "hash",
            "prev_hash"
        ]
    );
    assert_eq!(all[0]["kind"], "denied");
    assert_eq!(all[0]["code"], "UNAUTHENTICATED");
    assert_eq!(all[5]["kind"], "authority");
    assert!(all[5]["operator"].is_string());

    let count = |args: &[&str]| audit_json(&server, args).len();
    assert_eq!(count(&["--namespace", "shop"]), 2);
    assert_eq!(count(&["--service-account", "web"]), 2);
    assert_eq!(
        count(&["--namespace", "shop", "--service-account", "web"]),
        1
    );
    assert_eq!(
        count(&["--spiffe-id", "spiffe://cluster.local/ns/bank/sa/web"]),
        1
    );
    assert_eq!(count(&["--serial", &serials[1]]), 1);
    assert_eq!(count(&["--serial", &serials[1].to_uppercase()]), 1);
    assert_eq!(count(&["--kind", "denied"]), 1);
    assert_eq!(count(&["--kind", "authority"]), 1);
    assert_eq!(count(&["--kind", "issued"]), 4);
    assert_eq!(count(&["--limit", "2"]), 2);
    let fmt = ::time::format_description::well_known::Rfc3339;
    let since = (start - ::time::Duration::seconds(1)).format(&fmt).unwrap();
    let later = (::time::OffsetDateTime::now_utc() + ::time::Duration::hours(1))
        .format(&fmt)
        .unwrap();
    assert_eq!(
        count(&["--since", &since, "--kind", "issued", "--namespace", "shop"]),
        2
    );
    assert_eq!(count(&["--since", &later]), 0);
    assert_eq!(count(&["--until", "2000-01-01T00:00:00Z"]), 0);

    let bad = server.cli(&["audit", "list", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));

    let csv = stdout(&server.cli(&["audit", "list", "--format", "csv"]));
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("seq,time,kind,spiffe_id,")
    );
    assert_eq!(lines.count(), 6);
    let table = stdout(&server.cli(&["audit", "list"]));
    assert!(table.lines().next().unwrap().starts_with("SEQ  TIME"));
    assert!(table.contains("no bearer token"));
}

#[tokio::test]
async fn audit_verify_finds_edited_and_removed_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("data"), &["--dev"]);
    let token = stdout(&server.cli(&[
        "token",
        "issue",
        "--namespace",
        "a",
        "--service-account",
        "b",
    ]));
    let mut client = server.client().await;
    for _ in 0..5 {
        let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        create_certificate(&mut client, Some(token.trim()), &csr, 0)
            .await
            .unwrap();
    }
    server.kill();
    let intact = stdout(&server.cli(&["audit", "verify"]));
    assert!(intact.starts_with("audit log intact: 7 events"), "{intact}");

    let copy = dir.path().join("copy.db");
    // A copy of the database as the killed server left it, edited and verified.
    let tampered = |statements: &'static [&'static str]| {
        let url = copy_store(&server, &copy);
        // The data dir's audit key vouches for the checkpoints in the copy.
        let data_dir = server.data_dir.display().to_string();
        async move {
            run_sql(&url, statements).await;
            let out = ca_server(&[
                "audit",
                "verify",
                "--database-url",
                &url,
                "--data-dir",
                &data_dir,
            ]);
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };

    // An edited field.
    let (code, text) = tampered(&[
        "UPDATE audit_events SET spiffe_id = 'spiffe://cluster.local/ns/a/sa/admin' WHERE seq = 4",
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(
        text.contains("BROKEN at event 4") && text.contains("altered"),
        "{text}"
    );

    // A removed event.
    let (code, text) = tampered(&["DELETE FROM audit_events WHERE seq = 3"]).await;
    assert_eq!(code, Some(1));
    assert!(
        text.contains("BROKEN at event 3") && text.contains("missing"),
        "{text}"
    );

    // Two events swapped (renumbered to hide it).
    let (code, text) = tampered(&[
        "UPDATE audit_events SET seq = 100 WHERE seq = 5",
        "UPDATE audit_events SET seq = 5 WHERE seq = 6",
        "UPDATE audit_events SET seq = 6 WHERE seq = 100",
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(text.contains("BROKEN at event 5"), "{text}");
}

#[test]
fn a_key_file_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir.path().join("data"), &["--dev"]);
    server.kill();
    let key = server.data_dir.join("keys/1.key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ca_server(&[
        "run",
        "--dev",
        "--data-dir",
        server.data_dir.to_str().unwrap(),
        "--database-url",
        &server.database_url(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("readable by group or others") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!stderr.contains("BEGIN"), "no key material in the message");
}

#[test]
fn a_port_in_use_stops_a_first_start_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ca_server(&[
        "run",
        "--dev",
        "--data-dir",
        data.to_str().unwrap(),
        "--grpc-listen",
        &addr,
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert_eq!(
        line,
        format!("error: cannot listen on {addr}: Address already in use (os error 98)"),
        "the address once, the OS error once"
    );
    assert!(!stderr.contains("Created the first root"), "{stderr}");
    assert!(!data.join("ca.db").exists(), "no store was created");
    assert!(!data.join("keys").exists(), "no key was created");
}

/// A tiny HTTP server that serves whatever JWKS it holds and counts requests.
#[tokio::test]
async fn jwks_url_over_https_trusts_the_cluster_ca_given() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(&dir.path().join("issuer"));
    let jwks = ca_tests::jwks::JwksServer::start(&dir.path().join("api"), issuer.jwks());
    let (url, ca_file) = (jwks.url(), jwks.ca_file.clone());
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);

    // Without the cluster CA the keys cannot be fetched: refused as UNAVAILABLE, fail closed.
    let untrusting = TestServer::start(
        &dir.path().join("data1"),
        &["--token-issuer", &issuer.iss, "--token-jwks-url", &url],
    );
    let status = create_certificate(
        &mut untrusting.client().await,
        Some(&issuer.token("a", "b")),
        &csr,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("the issuer's keys are unavailable"),
        "{}",
        status.message()
    );

    // With it, the keys are fetched over HTTPS and the token verifies.
    let server = TestServer::start(
        &dir.path().join("data2"),
        &[
            "--token-issuer",
            &issuer.iss,
            "--token-jwks-url",
            &url,
            "--token-jwks-ca",
            ca_file.to_str().unwrap(),
        ],
    );
    create_certificate(
        &mut server.client().await,
        Some(&issuer.token("a", "b")),
        &csr,
        0,
    )
    .await
    .expect("issued with keys fetched over HTTPS");
    assert_eq!(jwks.hits(), 1);
}

#[tokio::test]
async fn jwks_url_is_fetched_and_refetched_on_an_unknown_kid() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestIssuer::new(&dir.path().join("first"));
    std::fs::create_dir_all(dir.path().join("second")).unwrap();
    let jwks = ca_tests::jwks::JwksServer::start(&dir.path().join("api"), first.jwks());
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--token-issuer",
            &first.iss,
            "--token-jwks-url",
            &jwks.url(),
            "--token-jwks-ca",
            jwks.ca_file.to_str().unwrap(),
        ],
    );
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&first.token("a", "b")), &csr, 0)
        .await
        .expect("first key");
    create_certificate(&mut client, Some(&first.token("a", "b")), &csr, 0)
        .await
        .expect("cached");
    assert_eq!(jwks.hits(), 1, "keys are cached");

    // The API server rotates its signing key: a token with the new kid triggers a refetch.
    std::fs::create_dir_all(dir.path().join("second")).unwrap();
    let mut second = TestIssuer::new(&dir.path().join("second"));
    second.kid = "test-key-2".into();
    let both = {
        let mut a: serde_json::Value = serde_json::from_str(&first.jwks()).unwrap();
        let b: serde_json::Value = serde_json::from_str(&second.jwks()).unwrap();
        a["keys"].as_array_mut().unwrap().push(b["keys"][0].clone());
        a.to_string()
    };
    jwks.set_body(both);
    // Within the refetch interval (10 s) an unknown kid is refused without another fetch...
    let status = create_certificate(&mut client, Some(&second.token("a", "b")), &csr, 0)
        .await
        .unwrap_err();
    assert!(
        status.message().contains("no key with kid \"test-key-2\""),
        "{}",
        status.message()
    );
    assert_eq!(jwks.hits(), 1, "refetches are rate-limited");
    // ...after it, the unknown kid triggers one refetch, and the new key verifies.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    create_certificate(&mut client, Some(&second.token("a", "b")), &csr, 0)
        .await
        .expect("refetched");
    assert_eq!(jwks.hits(), 2);
    // ...and a kid that is nowhere is refused, naming it, with at most one fetch per interval.
    let status = create_certificate(
        &mut client,
        Some(&second.sign_with(
            &rcgen::KeyPair::generate().unwrap(),
            Some("nowhere"),
            &second.claims("a", "b"),
        )),
        &csr,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("no key with kid \"nowhere\""),
        "{}",
        status.message()
    );
    for _ in 0..5 {
        let _ = create_certificate(
            &mut client,
            Some(&second.sign_with(
                &rcgen::KeyPair::generate().unwrap(),
                Some("nowhere"),
                &second.claims("a", "b"),
            )),
            &csr,
            0,
        )
        .await;
    }
    assert!(jwks.hits() <= 3, "refetches are rate-limited");
}
