//! `ca-server agent`: the reference proxy-side loop keeps its files current through renewals,
//! a root rotation and a server restart.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ca_tests::*;

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn leaf_issuer(out: &Path) -> String {
    let chain = read(&out.join("cert-chain.pem"));
    if chain.is_empty() {
        return String::new();
    }
    let der = der(&chain);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.issuer().to_string()
}

fn root_count(out: &Path) -> usize {
    read(&out.join("root-cert.pem"))
        .matches("BEGIN CERTIFICATE")
        .count()
}

#[test]
fn the_agent_renews_follows_the_bundle_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = TestServer::start(&dir.path().join("data"), &flags);
    let token = dir.path().join("token");
    std::fs::write(&token, issuer.token("shop", "web")).unwrap();
    let out = dir.path().join("out");
    let bundle_copy = dir.path().join("bootstrap.pem");
    std::fs::write(&bundle_copy, server.bundle_pem()).unwrap();

    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let _agent = Agent(
        Command::new(bin())
            .args([
                "agent",
                "--server",
                &format!("https://{}", server.grpc),
                "--ttl",
                "4s",
            ])
            .arg("--ca-bundle")
            .arg(&bundle_copy)
            .arg("--token-file")
            .arg(&token)
            .arg("--out-dir")
            .arg(&out)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let agent_log = || read(&dir.path().join("agent.log"));

    wait_until(Duration::from_secs(10), "first certificate", || {
        out.join("cert-chain.pem").exists()
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let first = serial_of(&read(&out.join("cert-chain.pem")));
    wait_until(Duration::from_secs(3), "root-cert.pem", || {
        root_count(&out) == 1
    });

    // Renewed at 40-50% of the life left on receipt (4 s, less up to 1 s because notAfter
    // has whole seconds): within 3 s, and (by the audit log's clock) not before 1.1 s.
    wait_until(Duration::from_secs(3), "a renewal", || {
        serial_of(&read(&out.join("cert-chain.pem"))) != first
    });
    let issued = audit_json(
        &server,
        &[
            "--kind",
            "issued",
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/web",
        ],
    );
    let ms = |e: &serde_json::Value| {
        ::time::OffsetDateTime::parse(
            e["time"].as_str().unwrap(),
            &::time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp_nanos()
            / 1_000_000
    };
    let gap = ms(&issued[issued.len() - 2]) - ms(&issued[issued.len() - 1]);
    assert!(
        gap >= 1100,
        "renewed {gap} ms after the first certificate: too early"
    );

    // Rotation: the new root reaches root-cert.pem within 2 s; after activation the next
    // renewal comes from it.
    let out_prepare = server.cli(&["root", "prepare"]);
    assert!(out_prepare.status.success());
    wait_until(Duration::from_secs(2), "the prepared root", || {
        root_count(&out) == 2
    });
    server.activate("2");
    wait_until(
        Duration::from_secs(6),
        "a certificate from the new root",
        || leaf_issuer(&out).ends_with("root 2"),
    );

    // The server goes away and comes back: the agent reconnects (trusting the bundle it
    // followed, which the server's new certificate chains to) and keeps renewing.
    server.kill();
    wait_until(Duration::from_secs(5), "the agent notices", || {
        agent_log().contains("Agent lost the server")
    });
    server.restart();
    let before = serial_of(&read(&out.join("cert-chain.pem")));
    wait_until(
        Duration::from_secs(15),
        "a renewal after the restart",
        || serial_of(&read(&out.join("cert-chain.pem"))) != before,
    );

    assert!(
        server
            .cli(&["root", "retire", "1", "--force"])
            .status
            .success()
    );
    wait_until(
        Duration::from_secs(3),
        "the retired root leaves root-cert.pem",
        || root_count(&out) == 1,
    );
    let log = agent_log();
    // About one renewal every 2 s over the test, not a storm.
    let renewals = log.matches("Renewed the certificate").count();
    assert!(renewals <= 15, "{renewals} renewals:\n{log}");
    assert!(
        !log.contains(&issuer.token("shop", "web")[..40]),
        "no token in the agent's log"
    );
    // The files are consistent: the key certifies the chain, and the chain verifies.
    let work = tempfile::tempdir().unwrap();
    let chain = read(&out.join("cert-chain.pem"));
    let mut full: Vec<String> = vec![chain.clone()];
    full.push(read(&out.join("root-cert.pem")));
    openssl_verify(work.path(), &full, "sslclient").unwrap();
}
