//! The binary's command line: exit statuses and messages for a user's mistakes.

use std::process::Command;

fn ca_server(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ca-server")
}

#[test]
fn run_without_an_issuer_refuses_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = ca_server(&[
        "run",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no token issuer is configured"), "{stderr}");
    assert!(
        stderr.contains("--token-issuer") && stderr.contains("--dev"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout carries only a command's output"
    );
}

#[test]
fn bad_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (args, want) in [
        (
            vec!["run", "--dev", "--trust-domain", "Bad.Domain"],
            "--trust-domain",
        ),
        (vec!["run", "--dev", "--max-ttl", "1y"], "--max-ttl"),
        (
            vec!["run", "--dev", "--default-ttl", "48h"],
            "--default-ttl",
        ),
        (vec!["run", "--token-issuer", "x"], "--token-jwks-file"),
        (
            vec![
                "token",
                "issue",
                "--namespace",
                "a",
                "--service-account",
                "b",
                "--ttl",
                "soon",
            ],
            "--ttl",
        ),
        (vec!["audit", "list"], "no database"),
    ] {
        let mut full = args.clone();
        full.extend(["--data-dir", data]);
        let out = ca_server(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // clap's own usage errors exit 2.
    assert_eq!(
        ca_server(&["audit", "list", "--kind", "bogus"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn token_issue_prints_a_token_and_keeps_the_key_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = ca_server(&[
        "token",
        "issue",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--data-dir",
        data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("dev-issuer/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
