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
