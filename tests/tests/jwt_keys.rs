//! Every authority's JWT-SVID signing key: made with it, published in the SPIFFE bundle with
//! `use: jwt-svid` while the authority is not retired, kept private (a 0600 file, or sealed
//! under the KEK), and made at start for authorities from before JWT-SVIDs.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ca_tests::*;
use sha2::{Digest, Sha256};

fn jwks(server: &TestServer) -> serde_json::Value {
    serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap()
}

/// The `jwt-svid` keys of a SPIFFE bundle, each checked: EC P-256, `kid` its RFC 7638
/// thumbprint.
fn jwt_kids(bundle: &serde_json::Value) -> Vec<String> {
    bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| {
            assert_eq!(
                (k["kty"].as_str(), k["crv"].as_str()),
                (Some("EC"), Some("P-256")),
                "{k}"
            );
            let canonical = format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                k["x"].as_str().unwrap(),
                k["y"].as_str().unwrap()
            );
            let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical));
            assert_eq!(
                k["kid"],
                thumbprint.as_str(),
                "the kid is the key's thumbprint"
            );
            thumbprint
        })
        .collect()
}

fn jwt_key_files(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(data.join("keys"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().contains(".jwt."))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn each_authority_publishes_a_jwt_svid_key_that_comes_and_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &["--dev"]);
    let first = jwks(&server);
    let kids = jwt_kids(&first);
    assert_eq!(kids.len(), 1, "{first}");
    let files = jwt_key_files(&data);
    assert_eq!(files.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A prepared authority brings its key into the bundle, with a new sequence.
    server.cli_ok(&["root", "prepare"]);
    let prepared = jwks(&server);
    let both = jwt_kids(&prepared);
    assert_eq!(both.len(), 2);
    assert_eq!(both[0], kids[0]);
    assert!(prepared["spiffe_sequence"].as_i64() > first["spiffe_sequence"].as_i64());

    // Retired, authority 1's key leaves the bundle.
    server.activate("2");
    server.cli_ok(&["root", "retire", "1", "--force"]);
    let after = jwks(&server);
    assert_eq!(jwt_kids(&after), vec![both[1].clone()]);
    // (rotation.rs checks that the server's /trust-bundle is the bundle `bundle show` gives.)
}

#[tokio::test]
async fn authorities_from_before_jwt_svids_get_their_key_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &["--dev"]);
    server.cli_ok(&["root", "prepare"]);
    let before = jwks(&server);
    assert_eq!(jwt_kids(&before).len(), 2);
    // As a data dir from before migration 0006 would have it: no keys.
    server.kill();
    run_sql(&server.database_url(), &["DELETE FROM jwt_keys"]).await;
    server.start_again();
    let after = jwks(&server);
    let kids = jwt_kids(&after);
    assert_eq!(kids.len(), 2, "{after}");
    assert!(after["spiffe_sequence"].as_i64() > before["spiffe_sequence"].as_i64());
    // Restarting again changes nothing.
    server.restart();
    assert_eq!(jwks(&server), after);
}

#[tokio::test]
async fn with_a_kek_the_jwt_key_is_sealed_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    std::fs::write(&kek, "07".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(
        &data,
        &["--dev", "--key-encryption-key-file", kek.to_str().unwrap()],
    );
    assert_eq!(jwt_kids(&jwks(&server)).len(), 1);
    assert!(jwt_key_files(&data).is_empty(), "no key file with a KEK");
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&server.database_url())
        .await
        .unwrap();
    let (key_ref, sealed): (String, Option<String>) =
        sqlx::query_as("SELECT key_ref, sealed_key FROM jwt_keys")
            .fetch_one(&mut db)
            .await
            .unwrap();
    db.close().await.unwrap();
    assert!(key_ref.starts_with("sealed:"), "{key_ref}");
    assert!(sealed.is_some_and(|s| s.starts_with("v1:") && !s.contains("PRIVATE KEY")));
}

#[test]
fn pyjwt_finds_the_jwt_svid_keys_through_oidc_discovery() {
    if !ca_tests::workload::python_has("jwt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, &["--dev"]);
    let issuer = format!("https://localhost:{}", server.grpc.port());
    let discover = || {
        ca_tests::workload::python_json(&[
            ca_tests::workload::py_script("oidc_keys.py")
                .to_str()
                .unwrap(),
            &issuer,
            data.join("trust-bundle.pem").to_str().unwrap(),
        ])
    };
    let found = discover();
    assert_eq!(
        found["issuer"],
        issuer.as_str(),
        "by default, this server's name and port"
    );
    assert_eq!(found["jwks_uri"], format!("{issuer}/keys"));
    assert_eq!(found["algs"], serde_json::json!(["ES256"]));
    assert_eq!(found["key_types"], serde_json::json!(["ECPublicKey"]));
    assert_eq!(
        found["kids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        jwt_kids(&jwks(&server)),
        "the keys of the SPIFFE bundle"
    );
    // A prepared authority's key is there as soon as the server has noticed it.
    server.cli_ok(&["root", "prepare"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while discover()["kids"].as_array().unwrap().len() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the prepared key not served"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_jwt_issuer_must_be_an_https_url() {
    for bad in [
        "http://ca.example",
        "ca.example",
        "https://",
        "https://ca.example/?x=1",
    ] {
        let out = ca_server(&[
            "run",
            "--dev",
            "--jwt-issuer",
            bad,
            "--data-dir",
            "/nonexistent/x",
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--jwt-issuer"), "{bad}: {stderr}");
    }
}
