//! Diagnosis: authorities near expiry are announced (log, /metrics, `root status --check`)
//! while the server stays ready; `explain` maps pasted errors to layers and commands.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::process::Command;

use ca_tests::*;

fn explain(input: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .arg("explain")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_authority_near_expiry_is_announced_while_the_server_stays_ready() {
    // Roots are valid ten years: a window of 3,651 days puts the first one inside it.
    let f = Fixture::start(&["--expiry-warning", "3651d"]);
    let server = &f.server;
    let log = server.stderr();
    assert!(
        log.contains("expiry: authority 1 (active) expires in") && log.contains("root prepare"),
        "{log}"
    );
    let (status, _) = http_get(server.http, "/readyz").unwrap();
    assert_eq!(
        status, 200,
        "an expiring root does not make the server unready"
    );
    let (_, metrics) = http_get(server.http, "/metrics").unwrap();
    assert!(
        metrics.contains(r#"ca_authority_expiring{authority_id="1",state="active"} 1"#),
        "{metrics}"
    );

    // root status marks it; --check turns it into an exit status for monitoring.
    let table = server.cli_ok(&["root", "status", "--expiry-warning", "3651d"]);
    assert!(table.contains("EXPIRING"), "{table}");
    let out = server.cli(&["root", "status", "--check", "--expiry-warning", "3651d"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expiry: authority 1 (active)"), "{stderr}");
    let json = server.cli_ok(&[
        "root",
        "status",
        "--format",
        "json",
        "--expiry-warning",
        "3651d",
    ]);
    assert!(json.contains(r#""expiring":true"#), "{json}");

    // With the default window of 30 days, nothing is flagged.
    let out = server.cli(&["root", "status", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!server.cli_ok(&["root", "status"]).contains("EXPIRING"));
}

#[tokio::test]
async fn a_prepared_ca_that_expires_soon_fails_the_check() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    // A plug-in intermediate valid for two more days.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.distinguished_name = rcgen::DistinguishedName::new();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Short Root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    root_params.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
    root_params.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(2);
    let root_pem = root_params.self_signed(&root_key).unwrap().pem();
    let dir = f.dir.path().join("cacerts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &root_pem).unwrap();
    std::fs::write(dir.join("ca-key.pem"), root_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), &root_pem).unwrap();
    std::fs::write(dir.join("root-cert.pem"), &root_pem).unwrap();
    let id = server.cli_ok(&["root", "prepare", "--import-dir", dir.to_str().unwrap()]);

    let out = server.cli(&["root", "status", "--check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "expiry: authority {} (prepared) expires in",
            id.trim()
        )) && stderr.contains("prepare a newer one"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("authority 1"),
        "the active root is far from expiry: {stderr}"
    );
}

#[tokio::test]
async fn explain_maps_pasted_errors_to_layers_and_commands() {
    let (code, out, _) = explain(None, &["TLSV1_ALERT_UNKNOWN_CA"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("trust: unknown CA"), "{out}");
    assert!(out.contains("$ ca-server root status"), "{out}");

    let (code, out, _) = explain(
        Some(
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n",
        ),
        &[],
    );
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("transport: upstream connect error"),
        "{out}"
    );
    assert!(out.contains("ca-server check HOST:PORT"), "{out}");

    let (_, out, _) = explain(None, &["SSL routines:ssl3_get_record:wrong version number"]);
    assert!(out.contains("partial sidecar injection"), "{out}");

    // This server's own refusal, as a proxy would log it.
    let f = Fixture::start(&[]);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let refused = create_certificate(&mut f.server.client().await, None, &csr, 0)
        .await
        .unwrap_err();
    let pasted = format!("gRPC status {:?}: {}", refused.code(), refused.message());
    let (code, out, _) = explain(None, &[&pasted]);
    assert_eq!(code, Some(0), "{pasted}");
    assert!(out.starts_with("token: token refused"), "{pasted}\n{out}");
    assert!(out.contains("audit list --kind denied"), "{out}");

    let (code, _, err) = explain(None, &["everything is fine"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no known error") && err.contains("unknown CA"),
        "{err}"
    );
}

/// Runs `inspect` on `pem` (written to a file) against `server`'s store.
fn inspect(server: &TestServer, dir: &std::path::Path, name: &str, pem: &str) -> (i32, String) {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    let out = server.cli(&["inspect", path.to_str().unwrap()]);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A leaf made with this CA's own key (read from the data dir), as a broken issuer would.
fn leaf_from_the_ca(
    server: &TestServer,
    sans: Vec<rcgen::SanType>,
    not_before: ::time::OffsetDateTime,
    not_after: ::time::OffsetDateTime,
) -> String {
    let key_pem = std::fs::read_to_string(server.data_dir.join("keys/1.key.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let root_pem = server.bundle_pem();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    params.not_before = not_before;
    params.not_after = not_after;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    format!(
        "{}{root_pem}",
        params.signed_by(&key, &issuer).unwrap().pem()
    )
}

fn uri(text: &str) -> rcgen::SanType {
    rcgen::SanType::URI(text.try_into().unwrap())
}

#[tokio::test]
async fn inspect_reports_each_broken_case_by_layer() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    let dir = f.dir.path();
    let now = ::time::OffsetDateTime::now_utc();
    let day = ::time::Duration::days(1);

    // A good certificate: identity, trust, authority and audit all answer.
    let token = f.issuer.token("shop", "web");
    let (csr_pem, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let good = create_certificate(&mut server.client().await, Some(&token), &csr_pem, 0)
        .await
        .unwrap()
        .concat();
    let (code, out) = inspect(server, dir, "good.pem", &good);
    assert_eq!(code, 0, "{out}");
    for fact in [
        "identity: spiffe://cluster.local/ns/shop/sa/web (a valid SPIFFE ID)",
        "trust: its root is in the current bundle",
        "authority: signed by authority 1 (active)",
        "issued to spiffe://cluster.local/ns/shop/sa/web",
        "no problems found",
    ] {
        assert!(out.contains(fact), "{fact:?} missing:\n{out}");
    }
    let path = dir.join("good.pem");
    let json = server.cli_ok(&["inspect", path.to_str().unwrap(), "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["certificates"][0]["role"], "leaf");
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    // Expired.
    let expired = leaf_from_the_ca(
        server,
        vec![uri("spiffe://cluster.local/ns/shop/sa/old")],
        now - day * 2,
        now - day,
    );
    let (code, out) = inspect(server, dir, "expired.pem", &expired);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("expiry: certificate 1 (leaf") && out.contains("renew it"),
        "{out}"
    );

    // Another trust domain.
    let foreign_td = leaf_from_the_ca(
        server,
        vec![uri("spiffe://other.example/ns/shop/sa/web")],
        now - day,
        now + day,
    );
    let (code, out) = inspect(server, dir, "td.pem", &foreign_td);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("identity: trust domain other.example is not this mesh's (cluster.local)"),
        "{out}"
    );

    // No SPIFFE ID: a DNS name only.
    let dns_only = leaf_from_the_ca(
        server,
        vec![rcgen::SanType::DnsName("web.shop.svc".try_into().unwrap())],
        now - day,
        now + day,
    );
    let (code, out) = inspect(server, dir, "dns.pem", &dns_only);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("identity: the leaf has no URI SAN"), "{out}");

    // An unknown CA.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let mut stranger = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let stranger_pem = stranger.self_signed(&stranger_key).unwrap().pem();
    let stranger_issuer = rcgen::Issuer::from_params(&stranger, &stranger_key);
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/web")];
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let unknown = format!(
        "{}{stranger_pem}",
        leaf.signed_by(&leaf_key, &stranger_issuer).unwrap().pem()
    );
    let (code, out) = inspect(server, dir, "unknown.pem", &unknown);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("trust: its root") && out.contains("is not in the current bundle"),
        "{out}"
    );
    assert!(
        out.contains("authority: not signed by any authority"),
        "{out}"
    );

    // Out of order: the root first.
    let swapped: String = {
        let parts: Vec<&str> = good
            .split_inclusive("-----END CERTIFICATE-----\n")
            .collect();
        parts.iter().rev().copied().collect()
    };
    let (code, out) = inspect(server, dir, "swapped.pem", &swapped);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("chain: certificate 1"), "{out}");

    // A CSR asking for a name that is not a SPIFFE ID.
    let (dns_csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &["https://web.example.com"]);
    let (code, out) = inspect(server, dir, "req.pem", &dns_csr);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("identity: asks for"), "{out}");

    // The SPIFFE JWKS bundle: each root, in the bundle, with its authority.
    let jwks = server.cli_ok(&["bundle", "show", "--format", "jwks"]);
    let (code, out) = inspect(server, dir, "bundle.json", &jwks);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("trust: root 1") && out.contains("authority 1 (active)"),
        "{out}"
    );

    // A retired root: the certificate issued under it is reported so.
    let id = server.cli_ok(&["root", "prepare"]);
    server.activate(id.trim());
    server.cli_ok(&["root", "retire", "1", "--force"]);
    let (code, out) = inspect(server, dir, "good.pem", &good);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("trust: signed by authority 1, retired")
            && out.contains("not in the current bundle"),
        "{out}"
    );
}

/// Runs `check` against `target` with `chain`/`key`, extra flags; returns (exit, output).
fn check(
    server: &TestServer,
    dir: &std::path::Path,
    target: &str,
    chain: &str,
    key: &str,
    extra: &[&str],
) -> (i32, String) {
    let cert_path = dir.join("check-chain.pem");
    let key_path = dir.join("check-key.pem");
    std::fs::write(&cert_path, chain).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let mut args = vec![
        "check",
        target,
        "--cert",
        cert_path.to_str().unwrap(),
        "--key",
        key_path.to_str().unwrap(),
    ];
    args.extend(extra);
    let out = server.cli(&args);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn check_reports_the_handshake_in_layers() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    let dir = f.dir.path();
    let token = f.issuer.token("shop", "web");
    let (csr_pem, key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut server.client().await, Some(&token), &csr_pem, 0)
        .await
        .unwrap()
        .concat();
    let key_pem = key.serialize_pem();
    let grpc = server.grpc.to_string();

    // A peer that trusts our CA and is trusted by us: both identities reported.
    let (code, out) = check(server, dir, &grpc, &chain, &key_pem, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tls: handshake complete"), "{out}");
    assert!(
        out.contains("accepted our certificate (spiffe://cluster.local/ns/shop/sa/web)"),
        "{out}"
    );

    // The server is not who we expected.
    let (code, out) = check(
        server,
        dir,
        &grpc,
        &chain,
        &key_pem,
        &["--expect-id", "spiffe://cluster.local/ns/shop/sa/db"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("identity: the server's certificate has no SPIFFE ID; expected spiffe://cluster.local/ns/shop/sa/db"), "{out}");

    // Plaintext where TLS is expected: the health port speaks plain HTTP.
    let (code, out) = check(server, dir, &server.http.to_string(), &chain, &key_pem, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("transport:") && out.contains("TLS"), "{out}");

    // We do not trust the server's CA.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let mut stranger = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    stranger.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let stranger_pem = stranger.self_signed(&stranger_key).unwrap().pem();
    let foreign_bundle = dir.join("foreign-bundle.pem");
    std::fs::write(&foreign_bundle, &stranger_pem).unwrap();
    let (code, out) = check(
        server,
        dir,
        &grpc,
        &chain,
        &key_pem,
        &["--ca-bundle", foreign_bundle.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("trust: the server's certificate") && out.contains("unknown CA"),
        "{out}"
    );

    // The server does not trust ours: a certificate from another CA.
    let issuer = rcgen::Issuer::from_params(&stranger, &stranger_key);
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![uri("spiffe://cluster.local/ns/shop/sa/web")];
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let foreign_chain = format!(
        "{}{stranger_pem}",
        leaf.signed_by(&leaf_key, &issuer).unwrap().pem()
    );
    let (code, out) = check(
        server,
        dir,
        &grpc,
        &foreign_chain,
        &leaf_key.serialize_pem(),
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("trust: the server refused our certificate") && out.contains("UnknownCA"),
        "{out}"
    );
}

/// A mesh peer on loopback: mTLS with `config` (client certificates required), saying hello.
fn serve_mtls(config: std::sync::Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = std::sync::Arc::clone(&config);
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let _ = tls.write_all(b"hello\n").and_then(|()| tls.flush());
                std::thread::sleep(std::time::Duration::from_secs(1));
            });
        }
    });
    addr
}

#[tokio::test]
async fn check_names_the_peers_identity_and_a_mismatch() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    let dir = f.dir.path();
    // The peer: a proxy for shop/db, serving mTLS with its certificate from this CA.
    let db = ca_tests::mesh::Proxy::start(server, f.issuer.token("shop", "db"), 3600, false).await;
    let peer = serve_mtls(db.server_config()).to_string();
    // The workload checking it: shop/web.
    let (csr_pem, key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(
        &mut server.client().await,
        Some(&f.issuer.token("shop", "web")),
        &csr_pem,
        0,
    )
    .await
    .unwrap()
    .concat();
    let key_pem = key.serialize_pem();

    let (code, out) = check(
        server,
        dir,
        &peer,
        &chain,
        &key_pem,
        &["--expect-id", "spiffe://cluster.local/ns/shop/sa/db"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("accepted our certificate (spiffe://cluster.local/ns/shop/sa/web)"),
        "{out}"
    );
    assert!(
        out.contains("identity: the server is spiffe://cluster.local/ns/shop/sa/db"),
        "{out}"
    );

    let (code, out) = check(
        server,
        dir,
        &peer,
        &chain,
        &key_pem,
        &["--expect-id", "spiffe://cluster.local/ns/shop/sa/cart"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("identity: the server is spiffe://cluster.local/ns/shop/sa/db, not spiffe://cluster.local/ns/shop/sa/cart"),
        "{out}"
    );
}
