//! CA keys in a PKCS#11 token (SoftHSM2, from Debian's `softhsm2`): generated inside it,
//! used through it, found again after a restart, and asked for by name when missing.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::path::Path;
use std::process::Command;

use ca_tests::*;
use x509_parser::prelude::FromDer;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token labelled `ca`, its files under a test's directory.
struct SoftHsm {
    /// `SOFTHSM2_CONF` for every process that uses it.
    conf: String,
    /// `--pkcs11-module … --pkcs11-token ca --pkcs11-pin-file …`.
    token_flags: Vec<String>,
}

impl SoftHsm {
    fn token_flags(&self) -> Vec<&str> {
        self.token_flags.iter().map(String::as_str).collect()
    }

    /// A server trusting `issuer`'s tokens, with its keys in this token.
    fn start(&self, data: &Path, issuer: &TestIssuer) -> TestServer {
        let mut flags = issuer.flags();
        flags.extend(self.token_flags.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        TestServer::start_with_env(data, &flags, &[("SOFTHSM2_CONF", &self.conf)])
    }
}

/// A SoftHSM2 configuration with its token directory under `dir`, and a token labelled
/// `ca` initialised in it (user PIN in a 0600 file).
fn softhsm(dir: &Path) -> Option<SoftHsm> {
    if !Path::new(MODULE).exists() {
        eprintln!("skipped: {MODULE} is missing (apt-get install softhsm2; .ci/run does)");
        return None;
    }
    use std::os::unix::fs::PermissionsExt;
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "ca",
            "--pin",
            "4321",
            "--so-pin",
            "8765",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pin = dir.join("pin");
    std::fs::write(&pin, "4321\n").unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some(SoftHsm {
        conf: conf.display().to_string(),
        token_flags: vec![
            "--pkcs11-module".into(),
            MODULE.into(),
            "--pkcs11-token".into(),
            "ca".into(),
            "--pkcs11-pin-file".into(),
            pin.display().to_string(),
        ],
    })
}

#[tokio::test]
async fn root_keys_live_in_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let Some(hsm) = softhsm(dir.path()) else {
        return;
    };
    let token_flags = hsm.token_flags();
    let issuer = TestIssuer::new(dir.path());
    let data = dir.path().join("data");
    let mut server = hsm.start(&data, &issuer);

    // The first root's key was made in the token: no key file, a pkcs11: reference.
    let text = server.cli_ok(&["root", "status", "--format", "json"]);
    assert!(
        text.contains("pkcs11:token=ca;object=ca-server-authority-1"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(data.join("keys"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );

    // Its JWT-SVID key is in the token too.
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&server.database_url())
            .await
            .unwrap();
        let (key_ref,): (String,) = sqlx::query_as("SELECT key_ref FROM jwt_keys")
            .fetch_one(&mut db)
            .await
            .unwrap();
        db.close().await.unwrap();
        assert!(
            key_ref.starts_with("pkcs11:token=ca;object=ca-server-jwt-1-"),
            "{key_ref}"
        );
    }

    // Leaves it signs verify with webpki and OpenSSL against the root.
    let token = issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut server.client().await, Some(&token), &csr, 0)
        .await
        .unwrap();
    let root = server.bundle_pem();
    webpki_verify(&chain, &root).unwrap();
    openssl_verify(dir.path(), &chain, "sslclient").unwrap();
    // The token signs JWT-SVIDs too, and they verify with the bundle's key.
    jwt_svid_verifies(&server, &token).await;

    // A second root prepared through the CLI (P-384) is made in the token too, and signs
    // once active; after a restart the server finds its key there again.
    let mut prepare = vec!["root", "prepare", "--key-type", "ec-p384"];
    prepare.extend(&token_flags);
    let id = server.cli_ok(&prepare);
    server.activate(id.trim());
    server.restart();
    let chain = create_certificate(&mut server.client().await, Some(&token), &csr, 0)
        .await
        .unwrap();
    let leaf_der = der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert!(
        leaf.issuer().to_string().contains("root 2"),
        "{}",
        leaf.issuer()
    );
    assert_eq!(
        leaf.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.3",
        "ecdsa-with-SHA384"
    );
    jwt_svid_verifies(&server, &token).await;
    let new_root = chain.last().unwrap();
    assert!(server.bundle_pem().contains(new_root.trim()));
    webpki_verify(&chain, new_root).unwrap();

    let status = server.cli_ok(&["root", "status", "--format", "json"]);
    assert!(
        status.contains("pkcs11:token=ca;object=ca-server-authority-2"),
        "{status}"
    );

    // Without the token's settings the server says where the key is and what to pass.
    server.kill();
    let url = server.database_url();
    let out = Command::new("timeout")
        .args(["20", bin().to_str().unwrap()])
        .args([
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--database-url",
            &url,
        ])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(issuer.flags())
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PKCS#11 token \"ca\"") && stderr.contains("--pkcs11-pin-file"),
        "{stderr}"
    );
}

/// Mints a JWT-SVID and verifies it with the bundle's key its header names.
async fn jwt_svid_verifies(server: &TestServer, token: &str) {
    let minted = mint_jwt_svid(server, Some(token), &["db"], 0)
        .await
        .unwrap();
    let kid = jsonwebtoken::decode_header(&minted.token)
        .unwrap()
        .kid
        .unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    let jwk = shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} not in {shown}"));
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["db"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &minted.token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "spiffe://cluster.local/ns/shop/sa/web");
}

/// The public key a CSR carries, for signing a certificate for it with rcgen.
struct CsrKey(Vec<u8>);

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// CA parameters as an offline root issues them.
fn ca_params(org: &str, cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, org);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::hours(1);
    p.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::days(365);
    p
}

#[tokio::test]
async fn an_intermediate_key_made_in_the_token_is_signed_offline_and_imported() {
    let dir = tempfile::tempdir().unwrap();
    let Some(hsm) = softhsm(dir.path()) else {
        return;
    };
    let token_flags = hsm.token_flags();
    let issuer = TestIssuer::new(dir.path());
    let server = hsm.start(&dir.path().join("data"), &issuer);

    // The key is made in the token; the CSR comes out, and the label to import it by.
    let mut args = vec!["root", "csr"];
    args.extend(&token_flags);
    let out = server.cli(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr_pem = String::from_utf8(out.stdout).unwrap();
    let advice = String::from_utf8_lossy(&out.stderr).into_owned();
    let object = advice
        .split(['"', ' ', '`', '.'])
        .find(|w| w.starts_with("ca-server-csr-"))
        .expect("the key's label")
        .to_owned();
    assert!(object.starts_with("ca-server-csr-"), "{advice}");
    let csr_der = {
        use base64::Engine;
        let body: String = csr_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    };
    let (_, request) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    request
        .verify_signature()
        .expect("the token signed the CSR");
    assert_eq!(
        request.certification_request_info.subject.to_string(),
        "O=cluster.local, CN=cluster.local intermediate"
    );

    // The offline root signs it; the cacerts directory has no ca-key.pem.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let root_params = ca_params("Example Corp", "Offline Root");
    let root_pem = root_params.self_signed(&root_key).unwrap().pem();
    let offline = rcgen::Issuer::from_params(&root_params, &root_key);
    let mut params = ca_params("cluster.local", "cluster.local intermediate");
    params.use_authority_key_identifier_extension = true;
    let public = CsrKey(
        request
            .certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec(),
    );
    let intermediate = params.signed_by(&public, &offline).unwrap().pem();
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    std::fs::write(cacerts.join("ca-cert.pem"), &intermediate).unwrap();
    std::fs::write(
        cacerts.join("cert-chain.pem"),
        format!("{intermediate}{root_pem}"),
    )
    .unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), &root_pem).unwrap();

    // Imported under another key of the token, it is refused: the key is not the cert's.
    let mut args = vec!["root", "prepare", "--import-dir", cacerts.to_str().unwrap()];
    args.extend(&token_flags);
    let wrong = server.cli(&[&args[..], &["--pkcs11-object", "ca-server-authority-1"]].concat());
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("does not match"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // Imported with its own key, activated, it signs leaves that chain to the offline root.
    let id = server.cli_ok(&[&args[..], &["--pkcs11-object", &object]].concat());
    server.activate(id.trim());
    let status = server.cli_ok(&["root", "status", "--format", "json"]);
    assert!(
        status.contains(&format!("pkcs11:token=ca;object={object}")),
        "{status}"
    );
    let token = issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let chain = loop {
        let chain = create_certificate(&mut server.client().await, Some(&token), &csr, 0)
            .await
            .unwrap();
        if chain.last().unwrap().trim() == root_pem.trim() {
            break chain;
        }
        assert!(std::time::Instant::now() < deadline, "still the old root");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(chain[1].trim(), intermediate.trim());
    webpki_verify(&chain, &root_pem).unwrap();
    openssl_verify(dir.path(), &chain, "sslclient").unwrap();
}
