//! CA keys in a PKCS#11 token (SoftHSM2, from Debian's `softhsm2`): generated inside it,
//! used through it, found again after a restart, and asked for by name when missing.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::path::{Path, PathBuf};
use std::process::Command;

use ca_tests::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 configuration with its token directory under `dir`, and a token labelled
/// `ca` initialised in it; returns (SOFTHSM2_CONF path, PIN file).
fn softhsm(dir: &Path) -> Option<(PathBuf, PathBuf)> {
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
    Some((conf, pin))
}

#[tokio::test]
async fn root_keys_live_in_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let Some((conf, pin)) = softhsm(dir.path()) else {
        return;
    };
    let conf = conf.to_str().unwrap().to_owned();
    let issuer = TestIssuer::new(dir.path());
    let pin = pin.to_str().unwrap();
    let token_flags = [
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "ca",
        "--pkcs11-pin-file",
        pin,
    ];
    let mut flags = issuer.flags();
    flags.extend(token_flags.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let data = dir.path().join("data");
    let mut server = TestServer::start_with_env(&data, &flags, &[("SOFTHSM2_CONF", &conf)]);

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

    // Leaves it signs verify with webpki and OpenSSL against the root.
    let token = issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut server.client().await, Some(&token), &csr, 0)
        .await
        .unwrap();
    let root = server.bundle_pem();
    webpki_verify(&chain, &root).unwrap();
    openssl_verify(dir.path(), &chain, "sslclient").unwrap();

    // A second root prepared through the CLI (P-384) is made in the token too, and signs
    // once active; after a restart the server finds its key there again.
    let mut prepare = vec!["root", "prepare", "--key-type", "ec-p384"];
    prepare.extend(token_flags);
    let id = server.cli_ok(&prepare);
    server.cli_ok(&["root", "activate", id.trim()]);
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
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PKCS#11 token \"ca\"") && stderr.contains("--pkcs11-pin-file"),
        "{stderr}"
    );
}
