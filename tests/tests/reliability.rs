//! Failing closed: the self-check, crashes, store faults, shutdown, and secrets in logs.
#![allow(clippy::unwrap_used)]

use ca_tests::{
    Fixture, TestIssuer, TestServer, audit_json, create_certificate, csr, http_get,
    postgres_admin_url, recorded_serials, sqlite_only,
};
use sqlx::Connection;
use tonic::Code;

/// A connection to the server's store, whichever database it is.
async fn db(server: &TestServer) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(&server.database_url())
        .await
        .unwrap()
}

/// Polls `f` every 50 ms for up to `secs` seconds.
async fn eventually<F: FnMut() -> bool>(secs: u64, mut f: F) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test]
async fn a_chain_that_fails_the_self_check_is_withheld() {
    let f = Fixture::start(&[]);
    let mut client = f.server.client().await;
    let token = f.issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("issued while the store is sound");

    // Corrupt the store: the published root is no longer the one the active key signs under.
    // (The connection above stays up: it was verified against the real root.)
    let real_root: String = sqlx::query_scalar("SELECT root_pem FROM authorities")
        .fetch_one(&mut db(&f.server).await)
        .await
        .unwrap();
    let stranger = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let swap_root = |pem: String| async {
        let mut db = db(&f.server).await;
        sqlx::query("UPDATE authorities SET root_pem = $1 WHERE state = 'active'")
            .bind(pem)
            .execute(&mut db)
            .await
            .unwrap();
        sqlx::query("UPDATE bundle SET sequence = sequence + 1")
            .execute(&mut db)
            .await
            .unwrap();
    };
    swap_root(stranger.clone()).await;
    let bundle_file = f.server.data_dir.join("trust-bundle.pem");
    assert!(
        eventually(5, || std::fs::read_to_string(&bundle_file).unwrap()
            == stranger)
        .await,
        "the server follows the store"
    );

    let before = audit_json(&f.server, &["--kind", "issued"]).len();
    let status = create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect_err("withheld");
    assert_eq!(status.code(), Code::Internal, "{}", status.message());
    assert!(
        status.message().contains("self-check")
            && status
                .message()
                .contains("does not verify against the published bundle"),
        "{}",
        status.message()
    );
    assert_eq!(
        audit_json(&f.server, &["--kind", "issued"]).len(),
        before,
        "nothing issued is recorded"
    );
    let denied = audit_json(&f.server, &["--kind", "denied"]);
    assert_eq!(denied[0]["code"], "INTERNAL");
    assert!(
        denied[0]["reason"].as_str().unwrap().contains("self-check"),
        "{}",
        denied[0]
    );
    assert!(
        f.server
            .stderr()
            .lines()
            .any(|l| l.contains("ALERT") && l.contains("self-check")),
        "an alert in the log:\n{}",
        f.server.stderr()
    );

    // Repaired, it issues again.
    swap_root(real_root.clone()).await;
    assert!(
        eventually(5, || std::fs::read_to_string(&bundle_file).unwrap()
            == real_root)
        .await,
        "the server follows the store"
    );
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("issued again");
    let _ = http_get(f.server.http, "/readyz");
}

#[tokio::test]
async fn sigterm_finishes_the_requests_in_flight() {
    // One identity asking hundreds of times at once: no rate limit here.
    let mut f = Fixture::start(&["--identity-rate", "0"]);
    let client = f.server.client().await;
    let token = f.issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);

    // Enough requests on one connection that many are inside the server when SIGTERM lands:
    // it is sent as soon as the first answer arrives, the server busy with the rest.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let mut client = client.clone();
        let (token, csr) = (token.clone(), csr.clone());
        let answered = std::sync::Arc::clone(&answered);
        calls.spawn(async move {
            let r = create_certificate(&mut client, Some(&token), &csr, 0).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (r, std::time::Instant::now())
        });
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while answered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no answer in 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let term_at = std::time::Instant::now();
    let status = tokio::task::spawn_blocking({
        let mut server = std::mem::replace(&mut f.server, placeholder());
        move || {
            let status = server.terminate(std::time::Duration::from_secs(20));
            (server, status)
        }
    });
    let mut issued = Vec::new();
    let mut refused = 0;
    let mut answered_after_term = 0;
    while let Some(joined) = calls.join_next().await {
        let (result, at) = joined.unwrap();
        match result {
            Ok(chain) => {
                issued.push(ca_tests::serial_of(&chain[0]));
                if at > term_at {
                    answered_after_term += 1;
                }
            }
            // Streams the server had not begun when it sent GOAWAY, or that the client had
            // not sent when the connection closed, fail on the client's side in several ways.
            // Whether any request the server began was dropped shows below, in the audit log.
            Err(_) => {
                refused += 1;
            }
        }
    }
    let (server, status) = status.await.unwrap();
    f.server = server;
    eprintln!(
        "{} issued ({answered_after_term} answered after SIGTERM), {refused} refused",
        issued.len()
    );
    let status = status.expect("exited within 20 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        answered_after_term > 0,
        "requests in flight at SIGTERM were answered ({} issued, {refused} refused)",
        issued.len()
    );
    assert!(
        f.server.stderr().contains("Shut down"),
        "{}",
        f.server.stderr()
    );

    // The log is intact, and it records exactly the certificates the client received: a
    // request the server began (and so recorded) but never answered would show up here.
    ca_tests::assert_audit_intact(&f.server);
    let recorded = recorded_serials(&f.server, "spiffe://cluster.local/ns/shop/sa/web");
    let received: std::collections::BTreeSet<String> = issued.into_iter().collect();
    assert_eq!(recorded, received, "issued and recorded differ");
    assert!(
        audit_json(&f.server, &["--kind", "denied"]).is_empty(),
        "nothing was refused by the server itself"
    );
}

/// A stopped stand-in while the real server is moved to a blocking task.
fn placeholder() -> TestServer {
    TestServer::stopped()
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_record_twenty_times() {
    let mut f = Fixture::start(&["--identity-rate", "0"]);
    let root = f.server.bundle_pem();
    let token = f.issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut received = std::collections::BTreeSet::new();
    for round in 0..20 {
        let client = f.server.client().await;
        let mut load = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let mut client = client.clone();
            let (token, csr) = (token.clone(), csr.clone());
            load.spawn(async move {
                let mut serials = Vec::new();
                // Until the server dies under us.
                while let Ok(chain) = create_certificate(&mut client, Some(&token), &csr, 0).await {
                    serials.push(ca_tests::serial_of(&chain[0]));
                }
                serials
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(150 + 10 * round)).await;
        f.server.kill();
        let mut this_round = 0;
        while let Some(serials) = load.join_next().await {
            let serials = serials.unwrap();
            this_round += serials.len();
            received.extend(serials);
        }
        assert!(this_round > 0, "round {round}: the load ran");
        eprintln!("round {round}: {this_round} certificates received before SIGKILL");
        f.server.start_again();
        assert_eq!(
            f.server.bundle_pem(),
            root,
            "round {round}: the root is unchanged"
        );
    }

    ca_tests::assert_audit_intact(&f.server);
    let recorded = recorded_serials(&f.server, "spiffe://cluster.local/ns/shop/sa/web");
    let missing: Vec<_> = received.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} of {} serials a client received are not in the audit log: {missing:?}",
        missing.len(),
        received.len()
    );
    // One authority, never re-created by a restart.
    let status = f.server.cli(&["root", "status", "--format", "json"]);
    let stdout = String::from_utf8_lossy(&status.stdout);
    let roots: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(roots.len(), 1, "{stdout}");
    assert_eq!(roots[0]["state"], "active");
}

/// Asks for a certificate and expects UNAVAILABLE naming the audit log and `cause`.
async fn refused_for_the_store(f: &Fixture, cause: &str) {
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let status = create_certificate(&mut client, Some(&f.issuer.token("shop", "web")), &csr, 0)
        .await
        .expect_err("no certificate while the audit log cannot be written");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("audit log cannot be written")
            && status.message().contains(cause),
        "{}",
        status.message()
    );
    // Nor a JWT-SVID.
    let status =
        ca_tests::mint_jwt_svid(&f.server, Some(&f.issuer.token("shop", "web")), &["db"], 0)
            .await
            .expect_err("no JWT-SVID while the audit log cannot be written");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("audit log cannot be written"),
        "{}",
        status.message()
    );
}

/// Waits for `/readyz` to answer `code`, and returns its body.
async fn readyz_becomes(f: &Fixture, code: u16) -> String {
    let mut last = (0, String::new());
    for _ in 0..200 {
        last = http_get(f.server.http, "/readyz").unwrap();
        if last.0 == code {
            return last.1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {code}; last: {last:?}");
}

async fn issues(f: &Fixture) {
    let mut client = f.server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&f.issuer.token("shop", "web")), &csr, 0)
        .await
        .expect("issued");
}

/// Once a store fault clears: ready again, issuing again, and the log holds exactly one more
/// issuance than `before` (nothing was issued without its record) and verifies.
async fn resumes_with_every_record(f: &Fixture, before: usize) {
    readyz_becomes(f, 200).await;
    issues(f).await;
    assert_eq!(
        issued_count(f),
        before + 1,
        "nothing issued without its record"
    );
    ca_tests::assert_audit_intact(&f.server);
}

fn issued_count(f: &Fixture) -> usize {
    audit_json(&f.server, &["--kind", "issued", "--limit", "100000"]).len()
}

#[tokio::test]
async fn a_store_locked_by_another_writer_refuses_then_recovers() {
    let f = Fixture::start(&[]);
    issues(&f).await;
    let before = issued_count(&f);

    let mut other = db(&f.server).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        f.server.grpc_health("").await,
        ServingStatus::Serving as i32
    );
    // Another writer holds the lock and does not let go: SQLite's write lock, or on
    // PostgreSQL an exclusive lock on the log's table.
    let (lock, cause) = if postgres_admin_url().is_some() {
        (
            "BEGIN; LOCK TABLE audit_events IN EXCLUSIVE MODE",
            "lock timeout",
        )
    } else {
        ("BEGIN EXCLUSIVE", "locked")
    };
    sqlx::raw_sql(lock).execute(&mut other).await.unwrap();
    refused_for_the_store(&f, cause).await;
    let body = readyz_becomes(&f, 503).await;
    assert!(body.contains("audit log not writable"), "{body}");
    // /metrics says so too, for the alert.
    let (_, metrics) = http_get(f.server.http, "/metrics").unwrap();
    assert!(metrics.contains("ca_audit_writable 0"), "{metrics}");
    // gRPC health follows /readyz within a second.
    let csr_service = "istio.v1.auth.IstioCertificateService";
    assert!(grpc_health_becomes(&f, csr_service, ServingStatus::NotServing).await);

    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    assert!(grpc_health_becomes(&f, "", ServingStatus::Serving).await);
    let (_, metrics) = http_get(f.server.http, "/metrics").unwrap();
    assert!(metrics.contains("ca_audit_writable 1"), "{metrics}");
    resumes_with_every_record(&f, before).await;
}

/// Polls the gRPC health status of `service` for up to 5 s until it is `status`.
async fn grpc_health_becomes(
    f: &Fixture,
    service: &str,
    status: tonic_health::pb::health_check_response::ServingStatus,
) -> bool {
    for _ in 0..100 {
        if f.server.grpc_health(service).await == status as i32 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// A small tmpfs mounted for the test, unmounted on drop. Needs root (CI runs as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root: this test makes the disk fail for real"
        );
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_then_recovers() {
    if !sqlite_only("a full disk under the store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "16m");
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&disk.0.join("data"), &flags);
    let mut f = Fixture {
        dir,
        server,
        issuer,
    };
    issues(&f).await;
    let before = issued_count(&f);

    // Full: fill what is left of the disk.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    }
    refused_for_the_store(&f, "full").await;
    let body = readyz_becomes(&f, 503).await;
    assert!(body.contains("audit log not writable"), "{body}");
    std::fs::remove_file(&filler).unwrap();
    resumes_with_every_record(&f, before).await;
    f.server.kill();
}

/// Sets or clears the immutable attribute on the store's files: writes through the server's
/// open descriptors then fail (EPERM), as on a file system gone read-only under it.
fn immutable(f: &Fixture, on: bool) {
    for name in ["ca.db", "ca.db-wal", "ca.db-shm"] {
        let path = f.server.data_dir.join(name);
        if path.exists() {
            let status = std::process::Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .arg(&path)
                .status()
                .unwrap();
            assert!(
                status.success(),
                "chattr on {}: needs root on ext4",
                path.display()
            );
        }
    }
}

/// Clears the attribute again however the test ends (an immutable file cannot be deleted).
struct Immutable<'a>(&'a Fixture);

impl<'a> Immutable<'a> {
    fn set(f: &'a Fixture) -> Self {
        immutable(f, true);
        Self(f)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        immutable(self.0, false);
    }
}

#[tokio::test]
async fn a_read_only_store_refuses_then_recovers() {
    if !sqlite_only("a read-only store") {
        return;
    }
    let f = Fixture::start(&[]);
    issues(&f).await;
    let before = issued_count(&f);

    let guard = Immutable::set(&f);
    refused_for_the_store(&f, "").await;
    let body = readyz_becomes(&f, 503).await;
    drop(guard);
    assert!(body.contains("audit log not writable"), "{body}");
    resumes_with_every_record(&f, before).await;
}

/// The base64 lines of every PEM private key under `dir`, and the whole texts.
fn private_key_material(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path)
                && text.contains("PRIVATE KEY-----")
            {
                found.extend(
                    text.lines()
                        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                        .map(str::to_owned),
                );
            }
        }
    }
    found
}

#[tokio::test]
async fn no_key_or_token_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let mut flags = issuer.flags();
    flags.push("--dev".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = TestServer::start_verbose(&dir.path().join("data"), &flags);

    // A full run: issuance, refusals of bad tokens, a rotation, the audit commands.
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let good = issuer.token("shop", "web");
    let forged = issuer.sign_with(
        &rcgen::KeyPair::generate().unwrap(),
        Some("test-key"),
        &issuer.claims("shop", "web"),
    );
    let mut expired_claims = issuer.claims("shop", "web");
    expired_claims["exp"] = serde_json::json!(1_000_000_000);
    let expired = issuer.sign(&expired_claims);
    create_certificate(&mut client, Some(&good), &csr, 0)
        .await
        .unwrap();
    let jwt_svid = ca_tests::mint_jwt_svid(&server, Some(&good), &["db"], 0)
        .await
        .unwrap()
        .token;
    for bad in [&forged, &expired] {
        create_certificate(&mut client, Some(bad), &csr, 0)
            .await
            .unwrap_err();
    }
    let dev = server.cli(&[
        "token",
        "issue",
        "--namespace",
        "shop",
        "--service-account",
        "dev",
    ]);
    let dev_token = String::from_utf8(dev.stdout).unwrap().trim().to_owned();
    create_certificate(&mut client, Some(&dev_token), &csr, 0)
        .await
        .unwrap();
    for args in [
        &["root", "prepare"][..],
        &["root", "activate", "2"],
        &["audit", "list"],
        &["audit", "verify"],
    ] {
        let out = server.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    create_certificate(&mut client, Some(&good), &csr, 0)
        .await
        .unwrap();
    assert!(
        server
            .terminate(std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );

    // Keys are private files in a private directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&server.data_dir), 0o700, "the data dir is private");
    for key in std::fs::read_dir(server.data_dir.join("keys"))
        .unwrap()
        .flatten()
    {
        assert_eq!(mode(&key.path()), 0o600, "{}", key.path().display());
    }
    assert_eq!(mode(&server.data_dir.join("audit-key.pem")), 0o600);

    let log = server.stderr();
    assert!(log.len() > 1000, "the run logged: {log}");
    let mut secrets: Vec<String> = private_key_material(&server.data_dir);
    secrets.extend(private_key_material(dir.path()));
    assert!(secrets.len() > 10, "keys found: {}", secrets.len());
    for token in [&good, &forged, &expired, &dev_token, &jwt_svid] {
        secrets.push(token.clone());
        // The signature alone is as secret as the token: it makes the token valid.
        secrets.push(token.rsplit('.').next().unwrap().to_owned());
    }
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret reached the log: {secret}"
        );
    }
    assert!(!log.contains("PRIVATE KEY"), "key material in the log");
}
