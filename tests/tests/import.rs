//! Plug-in CAs: an intermediate from a corporate root, imported from Istio's `cacerts` layout.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::path::Path;

use ca_tests::pki::{ca_params, corporate_root, write_cacerts};
use ca_tests::*;
use rcgen::{IsCa, KeyPair, KeyUsagePurpose};

fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = server.cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_imported_intermediate_signs_leaves_that_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let pki = corporate_root();
    let key = KeyPair::generate().unwrap();
    let cacerts = dir.path().join("cacerts");
    let intermediate = write_cacerts(&cacerts, &pki, ca_params("Example Corp Mesh CA"), &key);

    let (ok, out, err) = cli(
        &server,
        &["root", "prepare", "--import-dir", cacerts.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.data_dir.join("keys/2.key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the imported key is kept private");
    let (ok, _, err) = cli(&server, &["root", "activate", "2"]);
    assert!(ok, "{err}");
    // Servers notice within 2 s.
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;

    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&issuer.token("shop", "web")), &csr, 0)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "[leaf, intermediate, root]");
    assert_eq!(der(&chain[1]), der(&intermediate));
    assert_eq!(der(&chain[2]), der(&pki.root_pem));
    let work = tempfile::tempdir().unwrap();
    for purpose in ["sslclient", "sslserver"] {
        openssl_verify(work.path(), &chain, purpose).unwrap_or_else(|e| panic!("{purpose}: {e}"));
    }
    webpki_verify(&chain, &pki.root_pem).unwrap();

    // The corporate root is in the bundle beside the old one until that is retired.
    let bundle = server.bundle_pem();
    assert!(bundle.contains(pki.root_pem.trim()));
    let (_, status, _) = cli(&server, &["root", "status", "--format", "json"]);
    let imported: serde_json::Value = serde_json::from_str(status.lines().nth(1).unwrap()).unwrap();
    assert_eq!(imported["kind"], "imported");
    assert_eq!(imported["state"], "active");
    assert_eq!(
        imported["subject"],
        "O=Example Corp, CN=Example Corp Mesh CA"
    );

    // The server still presents the certificate the outgoing authority signed (for clients
    // whose bundle predates the corporate root) while that root is in the bundle; once it is
    // retired, its own chains through the intermediate, which it presents (the corporate
    // root it leaves to the client's bundle).
    let served = server.served_chain();
    assert_eq!(
        served.len(),
        1,
        "[the outgoing authority's server certificate]"
    );
    let (ok, _, err) = cli(&server, &["root", "retire", "1", "--force"]);
    assert!(ok, "{err}");
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let served = server.served_chain();
    assert_eq!(served.len(), 2, "[server certificate, intermediate]");
    assert_eq!(served[1].as_ref(), der(&intermediate));
    let audit = audit_json(&server, &["--kind", "issued"]);
    assert!(audit.iter().any(|e| {
        e["authority_id"] == 2
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("server TLS"))
    }));
}

#[test]
fn bad_cacerts_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), &["--dev"]);
    let pki = corporate_root();
    let prepare = |d: &Path| {
        let (ok, _, err) = cli(
            &server,
            &["root", "prepare", "--import-dir", d.to_str().unwrap()],
        );
        assert!(!ok, "{} should be refused", d.display());
        err
    };

    // The key is not the certificate's.
    let d = dir.path().join("mismatch");
    write_cacerts(
        &d,
        &pki,
        ca_params("Mesh CA"),
        &KeyPair::generate().unwrap(),
    );
    std::fs::write(
        d.join("ca-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    assert!(prepare(&d).contains("ca-key.pem does not match ca-cert.pem"));

    // Not a CA.
    let d = dir.path().join("not-ca");
    let mut leafish = ca_params("Not A CA");
    leafish.is_ca = IsCa::ExplicitNoCa;
    leafish.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    write_cacerts(&d, &pki, leafish, &KeyPair::generate().unwrap());
    assert!(prepare(&d).contains("cannot sign certificates"));

    // A CA without keyCertSign.
    let d = dir.path().join("no-certsign");
    let mut no_sign = ca_params("No CertSign");
    no_sign.key_usages = vec![KeyUsagePurpose::CrlSign];
    write_cacerts(&d, &pki, no_sign, &KeyPair::generate().unwrap());
    assert!(prepare(&d).contains("keyCertSign"));

    // The chain does not lead to root-cert.pem.
    let d = dir.path().join("other-root");
    write_cacerts(
        &d,
        &pki,
        ca_params("Mesh CA"),
        &KeyPair::generate().unwrap(),
    );
    let other = corporate_root();
    std::fs::write(d.join("root-cert.pem"), &other.root_pem).unwrap();
    std::fs::write(
        d.join("cert-chain.pem"),
        std::fs::read_to_string(d.join("ca-cert.pem")).unwrap(),
    )
    .unwrap();
    let err = prepare(&d);
    assert!(
        err.contains("the chain is broken") && err.contains("signature does not verify"),
        "{err}"
    );

    // A missing file is named.
    let d = dir.path().join("missing");
    write_cacerts(
        &d,
        &pki,
        ca_params("Mesh CA"),
        &KeyPair::generate().unwrap(),
    );
    std::fs::remove_file(d.join("cert-chain.pem")).unwrap();
    assert!(prepare(&d).contains("cert-chain.pem"));

    // Nothing was added, and the key files of refused imports were not kept.
    let (_, status, _) = cli(&server, &["root", "status", "--format", "json"]);
    assert_eq!(status.lines().count(), 1);
    assert!(!server.data_dir.join("keys/2.key.pem").exists());
}
