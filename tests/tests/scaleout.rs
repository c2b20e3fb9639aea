//! Several replicas on one store: keys sealed under a shared key-encryption key, authority
//! changes reaching every replica within 2 s, one verifiable audit chain, no serial twice.
//! Run on PostgreSQL (`CA_TEST_POSTGRES_URL`, as `.ci/run` does) this is the scale-out path;
//! on SQLite the replicas share one file on one host.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ca_tests::*;

/// A key-encryption key file (32 bytes as hex, mode 0600).
fn kek_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{byte:02x}").repeat(32) + "\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The stored authorities' (id, key_ref, sealed_key).
async fn stored_keys(url: &str) -> Vec<(i64, String, Option<String>)> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(url).await.unwrap();
    let rows = sqlx::query_as("SELECT id, key_ref, sealed_key FROM authorities ORDER BY id")
        .fetch_all(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    rows
}

#[tokio::test]
async fn authority_keys_sealed_under_a_kek_live_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let kek = kek_file(dir.path(), "kek", 1);
    let kek_arg = kek.to_str().unwrap();
    let mut flags = issuer.flags();
    flags.extend(["--key-encryption-key-file".into(), kek_arg.into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let data = dir.path().join("data");
    let mut server = TestServer::start(&data, &flags);

    // A root prepared through the CLI with the same KEK is sealed too, and the server
    // signs with it once it is activated.
    let id = server.cli_ok(&["root", "prepare", "--key-encryption-key-file", kek_arg]);
    server.activate(id.trim());
    let new_root = format!("root {}", id.trim());
    let token = issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let chain = create_certificate(&mut server.client().await, Some(&token), &csr, 0)
            .await
            .unwrap();
        let issuer_name = x509_parser::parse_x509_certificate(&der(&chain[0]))
            .unwrap()
            .1
            .issuer()
            .to_string();
        if issuer_name.contains(&new_root) {
            break;
        }
        assert!(Instant::now() < deadline, "still signed by {issuer_name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No key file anywhere; in the store, ciphertext only.
    let key_files = std::fs::read_dir(data.join("keys"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(key_files, 0, "no key under the data dir");
    let rows = stored_keys(&server.database_url()).await;
    assert_eq!(rows.len(), 2);
    for (id, key_ref, sealed) in &rows {
        assert!(key_ref.starts_with("sealed:"), "authority {id}: {key_ref}");
        let sealed = sealed.as_deref().unwrap();
        assert!(sealed.starts_with("v1:") && !sealed.contains("PRIVATE KEY"));
    }

    // Without the KEK, or with another one, the server says which key it needs.
    server.kill();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--database-url",
        ];
        let url = server.database_url();
        args.push(&url);
        args.extend([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]);
        let issuer_flags = issuer.flags();
        args.extend(issuer_flags.iter().map(String::as_str));
        args.extend(extra);
        let out = ca_server(&args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let kek_id = rows[1].1.strip_prefix("sealed:").unwrap().to_owned();
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&kek_id) && stderr.contains("--key-encryption-key-file"),
        "{stderr}"
    );
    let other = kek_file(dir.path(), "other-kek", 2);
    let (code, stderr) = run(&["--key-encryption-key-file", other.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&kek_id) && stderr.contains("same KEK"),
        "{stderr}"
    );
    assert!(!stderr.contains("PRIVATE KEY"));

    // A sealed key moved onto another authority's row does not open.
    let url = server.database_url();
    let statement = format!(
        "UPDATE authorities SET sealed_key = '{}' WHERE id = {}",
        rows[0].2.as_deref().unwrap(),
        rows[1].0
    );
    run_sql(&url, &[&statement]).await;
    let (code, stderr) = run(&["--key-encryption-key-file", kek_arg]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not open"), "{stderr}");
}

/// Requests certificates from `server` until `stop`, recording every serial; any refusal
/// fails the test.
async fn keep_issuing(
    server: &TestServer,
    issuer: &TestIssuer,
    sa: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(BTreeSet<String>, Vec<String>)> {
    let mut client = server.client().await;
    let token = issuer.token("shop", sa);
    tokio::spawn(async move {
        let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        let mut serials = BTreeSet::new();
        let mut issuers = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let chain = create_certificate(&mut client, Some(&token), &csr, 0)
                .await
                .unwrap_or_else(|s| panic!("refused during the rotation: {s:?}"));
            assert!(serials.insert(serial_of(&chain[0])), "a serial twice");
            issuers.push(chain.last().unwrap().clone());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (serials, issuers)
    })
}

#[tokio::test]
async fn two_replicas_share_authorities_the_bundle_and_the_audit_chain() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let kek = kek_file(dir.path(), "kek", 9);
    let kek_arg = kek.to_str().unwrap();
    let mut flags = issuer.flags();
    flags.extend(["--key-encryption-key-file".into(), kek_arg.into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = TestServer::start(&dir.path().join("a"), &flags);
    let b = TestServer::start_on(&dir.path().join("b"), &a.database_url(), &flags);
    assert_eq!(a.bundle_pem(), b.bundle_pem(), "one root, found by both");

    // Clients use replica B, and replica A, while the root is rotated through A's CLI.
    let stop = Arc::new(AtomicBool::new(false));
    let on_b = keep_issuing(&b, &issuer, "web", Arc::clone(&stop)).await;
    let on_a = keep_issuing(&a, &issuer, "cart", Arc::clone(&stop)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let id = a.cli_ok(&["root", "prepare", "--key-encryption-key-file", kek_arg]);
    let prepared = Instant::now();
    let new_root = a
        .cli_ok(&["bundle", "show"])
        .split_inclusive("-----END CERTIFICATE-----\n")
        .last()
        .unwrap()
        .to_owned();
    wait_for(2, "B's bundle to carry the prepared root", || {
        b.bundle_pem().contains(new_root.trim())
    })
    .await;
    let reached = prepared.elapsed();

    a.activate(id.trim());
    let activated = Instant::now();
    let token = issuer.token("shop", "probe");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut client = b.client().await;
    loop {
        let chain = create_certificate(&mut client, Some(&token), &csr, 0)
            .await
            .unwrap();
        if chain.last().unwrap().trim() == new_root.trim() {
            break;
        }
        assert!(
            activated.elapsed() < Duration::from_secs(2),
            "B still signs under the old root 2 s after the activation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "prepared root reached B in {reached:?}; B signed under it {:?} after activation",
        activated.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (serials_b, roots_b) = on_b.await.unwrap();
    let (serials_a, roots_a) = on_a.await.unwrap();

    // Both replicas went on issuing through the rotation, and ended under the new root.
    assert!(serials_a.len() > 10 && serials_b.len() > 10);
    assert_eq!(roots_a.last().unwrap().trim(), new_root.trim());
    assert_eq!(roots_b.last().unwrap().trim(), new_root.trim());
    assert!(serials_a.is_disjoint(&serials_b), "no serial issued twice");

    // One audit chain, written by both, holds every certificate either one issued. Each
    // replica signs checkpoints with its own key: verified from one, the other's is pinned;
    // without it, the other's checkpoints are reported.
    let b_key = b.data_dir.with_extension("audit-key.pub");
    std::fs::write(&b_key, b.cli_ok(&["audit", "key"])).unwrap();
    let unpinned = a.cli(&["audit", "verify"]);
    assert!(!unpinned.status.success());
    assert!(
        String::from_utf8_lossy(&unpinned.stdout).contains("--trusted-audit-key"),
        "{}",
        String::from_utf8_lossy(&unpinned.stdout)
    );
    a.cli_ok(&[
        "audit",
        "verify",
        "--trusted-audit-key",
        b_key.to_str().unwrap(),
    ]);
    let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
    assert_eq!(recorded_serials(&b, &spiffe("web")), serials_b);
    assert_eq!(recorded_serials(&a, &spiffe("cart")), serials_a);
}

/// Polls `f` every 20 ms for up to `secs` seconds; fails naming `what` if it never holds.
async fn wait_for<F: FnMut() -> bool>(secs: u64, what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "waited {secs} s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
