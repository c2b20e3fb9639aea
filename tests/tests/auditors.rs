//! Auditors: every filter and format through the real CLI on a seeded store, the same query
//! over gRPC with mTLS, tamper evidence with signed checkpoints, and retention.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::collections::BTreeSet;
use std::time::Duration;

use ca_proto::ca::v1::ListEventsRequest;
use ca_proto::ca::v1::audit_service_client::AuditServiceClient;
use ca_tests::*;
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Seeded {
    dir: tempfile::TempDir,
    server: TestServer,
    issuer: TestIssuer,
    /// A moment between the two halves of the seeding.
    middle: String,
    /// Serial of a 2-second certificate from the first half (expired by now).
    short_lived: String,
}

fn rfc3339(t: ::time::OffsetDateTime) -> String {
    t.format(&::time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn parse(t: &str) -> i64 {
    ::time::OffsetDateTime::parse(t, &::time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

async fn seed(extra: &[&str]) -> Seeded {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let mut flags = issuer.flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let mut client = server.client().await;
    let mut issue = async |ns: &str, sa: &str, ttl: i64| {
        let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        let chain = create_certificate(&mut client, Some(&issuer.token(ns, sa)), &csr, ttl)
            .await
            .unwrap();
        serial_of(&chain[0])
    };
    let short_lived = issue("shop", "web", 2).await;
    issue("shop", "db", 0).await;
    issue("bank", "web", 0).await;
    let (anonymous, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut server.client().await, None, &anonymous, 0)
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let middle = rfc3339(::time::OffsetDateTime::now_utc());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Rotation: later issuances come from authority 2.
    assert!(server.cli(&["root", "prepare"]).status.success());
    server.activate("2");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut client = server.client().await;
    for (ns, sa) in [("shop", "web"), ("bank", "teller")] {
        let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        create_certificate(&mut client, Some(&issuer.token(ns, sa)), &csr, 0)
            .await
            .unwrap();
    }
    let (other, _) = csr(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["spiffe://cluster.local/ns/bank/sa/vault"],
    );
    create_certificate(
        &mut client,
        Some(&issuer.token("bank", "teller")),
        &other,
        0,
    )
    .await
    .unwrap_err();
    Seeded {
        dir,
        server,
        issuer,
        middle,
        short_lived,
    }
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

/// The events of `all` (newest first) for which `keep` holds.
fn expect(all: &[Value], keep: impl Fn(&Value) -> bool) -> Vec<i64> {
    all.iter()
        .filter(|e| keep(e))
        .map(|e| e["seq"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn every_filter_and_format_returns_exactly_the_right_events() {
    let s = seed(&[]).await;
    let server = &s.server;
    let all = audit_json(server, &[]);
    assert_eq!(
        seqs(&all),
        (1..=all.len() as i64).rev().collect::<Vec<_>>(),
        "newest first, no gaps"
    );
    let issued_serials: BTreeSet<String> = all
        .iter()
        .filter(|e| e["kind"] == "issued")
        .map(|e| e["serial"].as_str().unwrap().to_owned())
        .collect();
    assert!(issued_serials.contains(&s.short_lived));

    let check = |args: &[&str], keep: &dyn Fn(&Value) -> bool| {
        let got = seqs(&audit_json(server, args));
        let want = expect(&all, keep);
        assert!(
            !want.is_empty() || args.contains(&"--until"),
            "{args:?} selects nothing in the seed"
        );
        assert_eq!(got, want, "{args:?}");
    };
    check(
        &["--spiffe-id", "spiffe://cluster.local/ns/shop/sa/web"],
        &|e| {
            e["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web"
                || e["caller"] == "spiffe://cluster.local/ns/shop/sa/web"
        },
    );
    check(&["--node", TestIssuer::NODE], &|e| {
        e["node"] == TestIssuer::NODE
    });
    check(&["--namespace", "bank"], &|e| e["namespace"] == "bank");
    check(&["--service-account", "web"], &|e| {
        e["service_account"] == "web"
    });
    check(&["--namespace", "shop", "--service-account", "db"], &|e| {
        e["namespace"] == "shop" && e["service_account"] == "db"
    });
    check(&["--serial", &s.short_lived], &|e| {
        e["serial"] == s.short_lived.as_str()
    });
    check(&["--kind", "issued"], &|e| e["kind"] == "issued");
    check(&["--kind", "denied"], &|e| e["kind"] == "denied");
    check(&["--kind", "authority"], &|e| e["kind"] == "authority");
    check(&["--authority", "2"], &|e| e["authority_id"] == 2);
    check(&["--authority", "1", "--kind", "issued"], &|e| {
        e["authority_id"] == 1 && e["kind"] == "issued"
    });
    check(&["--since", &s.middle], &|e| {
        e["time"].as_str().unwrap() >= s.middle.as_str()
    });
    check(&["--until", &s.middle], &|e| {
        e["time"].as_str().unwrap() <= s.middle.as_str()
    });
    check(&["--since", &s.middle, "--namespace", "bank"], &|e| {
        e["time"].as_str().unwrap() >= s.middle.as_str() && e["namespace"] == "bank"
    });
    let now = rfc3339(::time::OffsetDateTime::now_utc());
    let valid_now = |e: &Value, t: i64| {
        e["kind"] == "issued"
            && parse(e["not_before"].as_str().unwrap()) <= t
            && parse(e["not_after"].as_str().unwrap()) >= t
    };
    check(&["--valid-at", &now], &|e| valid_now(e, parse(&now)));
    // The 2-second certificate was valid in the first half, and is not now.
    let first_half = rfc3339(
        ::time::OffsetDateTime::parse(
            all.last().unwrap()["time"].as_str().unwrap(),
            &::time::format_description::well_known::Rfc3339,
        )
        .unwrap()
            + ::time::Duration::seconds(1),
    );
    check(&["--valid-at", &first_half], &|e| {
        valid_now(e, parse(&first_half))
    });
    assert!(
        audit_json(server, &["--valid-at", &first_half])
            .iter()
            .any(|e| e["serial"] == s.short_lived.as_str())
    );
    assert!(
        !audit_json(server, &["--valid-at", &now])
            .iter()
            .any(|e| e["serial"] == s.short_lived.as_str())
    );
    assert_eq!(
        seqs(&audit_json(server, &["--limit", "3"])),
        seqs(&all)[..3].to_vec()
    );

    // CSV and the table hold the same events.
    let csv = String::from_utf8(
        server
            .cli(&["audit", "list", "--format", "csv", "--limit", "1000"])
            .stdout,
    )
    .unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "seq,time,kind,spiffe_id,namespace,service_account,pod_name,pod_uid,token_issuer,serial,not_before,not_after,authority_id,public_key_sha256,csr_sha256,peer,code,reason,count,operator,caller,node,requested,anchor_seq,anchor_hash,audience,request,request_uid,hash,prev_hash"
    );
    assert_eq!(rows.len(), all.len() + 1);
    for (row, e) in rows[1..].iter().zip(&all) {
        assert!(
            row.starts_with(&format!(
                "{},{},{},",
                e["seq"],
                e["time"].as_str().unwrap(),
                e["kind"].as_str().unwrap()
            )),
            "{row}"
        );
    }
    let table =
        String::from_utf8(server.cli(&["audit", "list", "--limit", "1000"]).stdout).unwrap();
    assert_eq!(table.lines().count(), all.len() + 1);
    let widths: BTreeSet<usize> = table
        .lines()
        .map(|l| {
            l.find("KIND")
                .or_else(|| l.find(|c: char| c.is_ascii_lowercase()))
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(widths.len(), 1, "aligned columns:\n{table}");

    // Bad filter values are refused, naming the flag.
    for (args, flag) in [
        (vec!["--since", "yesterday"], "--since"),
        (vec!["--until", "2026-99-01T00:00:00Z"], "--until"),
        (vec!["--valid-at", "noon"], "--valid-at"),
        (vec!["--serial", "not-hex"], "--serial"),
        (vec!["--authority", "0"], "--authority"),
        (vec!["--limit", "0"], "--limit"),
    ] {
        let mut full = vec!["audit", "list"];
        full.extend(&args);
        let out = server.cli(&full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // `audit show`: every field, validity and the signing authority.
    let shown = String::from_utf8(
        server
            .cli(&["audit", "show", &s.short_lived.to_uppercase()])
            .stdout,
    )
    .unwrap();
    for key in [
        "seq",
        "spiffe_id",
        "pod_name",
        "not_after",
        "public_key_sha256",
        "csr_sha256",
        "peer",
        "hash",
    ] {
        assert!(
            shown.lines().any(|l| l.starts_with(key)),
            "{key} in:\n{shown}"
        );
    }
    assert!(
        shown.contains("expired")
            && shown
                .contains("authority 1 (O=cluster.local, CN=cluster.local root 1), now retiring"),
        "{shown}"
    );
    let newest = all.iter().find(|e| e["kind"] == "issued").unwrap();
    let shown = String::from_utf8(
        server
            .cli(&["audit", "show", newest["serial"].as_str().unwrap()])
            .stdout,
    )
    .unwrap();
    assert!(
        shown.contains("valid,") && shown.contains("left") && shown.contains("authority 2"),
        "{shown}"
    );
    let missing = server.cli(&["audit", "show", "abcdef"]);
    assert_eq!(missing.status.code(), Some(1));
    drop(s.dir);
}

async fn audit_client(
    server: &TestServer,
    identity: Option<(String, String)>,
) -> AuditServiceClient<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server.bundle_pem()));
    if let Some((chain, key)) = identity {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    let channel = Channel::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    AuditServiceClient::new(channel)
}

/// A certificate from the server for `ns`/`sa`, as (chain without root, key) PEM.
async fn identity_for(s: &Seeded, ns: &str, sa: &str) -> (String, String) {
    let (csr, key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(
        &mut s.server.client().await,
        Some(&s.issuer.token(ns, sa)),
        &csr,
        0,
    )
    .await
    .unwrap();
    (chain[..chain.len() - 1].concat(), key.serialize_pem())
}

/// An event from the gRPC service as `audit list --format json` prints it.
fn as_json(e: &ca_proto::ca::v1::AuditEvent) -> Value {
    let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let i = |v: Option<i64>| v.map_or(Value::Null, Value::from);
    serde_json::json!({
        "seq": e.seq, "time": e.time, "kind": e.kind, "spiffe_id": s(&e.spiffe_id),
        "namespace": s(&e.namespace), "service_account": s(&e.service_account), "pod_name": s(&e.pod_name),
        "pod_uid": s(&e.pod_uid), "token_issuer": s(&e.token_issuer), "serial": s(&e.serial),
        "not_before": s(&e.not_before), "not_after": s(&e.not_after), "authority_id": i(e.authority_id),
        "public_key_sha256": s(&e.public_key_sha256), "csr_sha256": s(&e.csr_sha256), "peer": s(&e.peer),
        "code": s(&e.code), "reason": s(&e.reason), "count": i(e.count), "operator": s(&e.operator),
        "caller": s(&e.caller), "node": s(&e.node), "requested": s(&e.requested),
        "anchor_seq": i(e.anchor_seq), "anchor_hash": s(&e.anchor_hash),
        "audience": s(&e.audience),
        "request": s(&e.request),
        "request_uid": s(&e.request_uid),
        "hash": e.hash, "prev_hash": e.prev_hash,
    })
}

#[tokio::test]
async fn remote_auditors_see_what_the_cli_sees_and_no_one_else_does() {
    let s = seed(&["--auditor", "spiffe://cluster.local/ns/audit/sa/reader"]).await;
    let auditor = identity_for(&s, "audit", "reader").await;
    let mut client = audit_client(&s.server, Some(auditor)).await;
    // A JWT-SVID's event too: its audiences reach the auditor.
    ca_tests::mint_jwt_svid(
        &s.server,
        Some(&s.issuer.token("shop", "web")),
        &["db", "cache"],
        0,
    )
    .await
    .unwrap();

    // All pages of a filtered query equal the CLI's answer.
    for (request, cli_args) in [
        (ListEventsRequest::default(), vec![]),
        (
            ListEventsRequest {
                namespace: Some("shop".into()),
                ..Default::default()
            },
            vec!["--namespace", "shop"],
        ),
        (
            ListEventsRequest {
                kind: Some("issued".into()),
                authority: Some(1),
                ..Default::default()
            },
            vec!["--kind", "issued", "--authority", "1"],
        ),
        (
            ListEventsRequest {
                since: Some(s.middle.clone()),
                ..Default::default()
            },
            vec!["--since", &s.middle],
        ),
        (
            ListEventsRequest {
                node: Some(TestIssuer::NODE.into()),
                ..Default::default()
            },
            vec!["--node", TestIssuer::NODE],
        ),
    ] {
        let cli = audit_json(&s.server, &cli_args);
        let mut got = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_events(ListEventsRequest {
                    page_size: 3,
                    page_token: token.clone(),
                    ..request.clone()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.events.len() <= 3);
            got.extend(page.events.iter().map(as_json));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        // The auditor's own certificate was issued after the CLI query ran for the unfiltered
        // case only if it matches; compare on the CLI's events.
        let got: Vec<Value> = got
            .into_iter()
            .filter(|e| cli.iter().any(|c| c["seq"] == e["seq"]))
            .collect();
        assert_eq!(got, cli, "{cli_args:?}");
        if cli_args.is_empty() {
            assert!(
                got.iter().any(|e| e["audience"] == r#"["db","cache"]"#),
                "{got:?}"
            );
        }
    }
    let bad = client
        .list_events(ListEventsRequest {
            since: Some("last week".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("since"), "{}", bad.message());
    // The field is named as the request spells it; the value is quoted as it was sent.
    let bad = client
        .list_events(ListEventsRequest {
            valid_at: Some("2026-13-01".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().starts_with("valid_at \"2026-13-01\" "),
        "{}",
        bad.message()
    );

    // A workload that is not an auditor is refused; so is a caller without a certificate.
    let outsider = identity_for(&s, "shop", "web").await;
    let denied = audit_client(&s.server, Some(outsider))
        .await
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/web is not an auditor"),
        "{}",
        denied.message()
    );
    let anonymous = audit_client(&s.server, None)
        .await
        .list_events(ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert!(anonymous.message().contains("mutual TLS"));
}

/// `audit verify` on the store at `url` (a copy, with no data dir of its own), trusting the
/// audit key in `key` (what `audit key` printed on the server).
fn verify(
    url: &str,
    key: &std::path::Path,
    checkpoint: Option<&std::path::Path>,
) -> (bool, String) {
    let key = key.display().to_string();
    let mut args = vec![
        "audit",
        "verify",
        "--database-url",
        url,
        "--trusted-audit-key",
        &key,
    ];
    let cp;
    if let Some(path) = checkpoint {
        cp = path.display().to_string();
        args.extend(["--checkpoint", &cp]);
    }
    let out = ca_server(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn tampering_is_found_and_a_consistent_rewrite_fails_against_an_exported_checkpoint() {
    let mut s = seed(&[]).await;
    let exported = s.dir.path().join("checkpoint.json");
    let out = s.server.cli(&["audit", "checkpoint", "--now"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&exported, &out.stdout).unwrap();
    let cp: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cp_seq = cp["seq"].as_i64().unwrap();
    let key = s.dir.path().join("audit-key.pub");
    std::fs::write(&key, s.server.cli_ok(&["audit", "key"])).unwrap();
    s.server.kill();
    let copy = s.dir.path().join("copy.db");
    let url = copy_store(&s.server, &copy);
    let (ok, text) = verify(&url, &key, Some(&exported));
    assert!(ok, "{text}");

    let cases: Vec<(Vec<String>, i64, &str)> = vec![
        (vec!["UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 4".into()], 4, "altered"),
        (vec!["DELETE FROM audit_events WHERE seq = 5".into()], 5, "missing"),
        (
            vec![
                "UPDATE audit_events SET seq = 1000 WHERE seq = 6".into(),
                "UPDATE audit_events SET seq = 6 WHERE seq = 7".into(),
                "UPDATE audit_events SET seq = 7 WHERE seq = 1000".into(),
            ],
            6,
            "",
        ),
        (
            // An event slipped in: a copy of event 3 placed after it, the rest moved up.
            vec![
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 3".into(),
                "UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000".into(),
                "INSERT INTO audit_events SELECT 4, time_ms, kind, spiffe_id, namespace, service_account, pod_name, pod_uid, token_issuer, serial, not_before, not_after, authority_id, public_key_sha256, csr_sha256, peer, code, reason, count, operator, prev_hash, hash, caller, node, requested, anchor_seq, anchor_hash, audience, request, request_uid FROM audit_events WHERE seq = 3".into(),
            ],
            4,
            "",
        ),
        (vec![format!("DELETE FROM audit_events WHERE seq >= {cp_seq}")], cp_seq, "events were removed"),
    ];
    for (statements, seq, word) in cases {
        let url = copy_store(&s.server, &copy);
        let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
        run_sql(&url, &statements).await;
        let (ok, text) = verify(&url, &key, None);
        assert!(!ok, "{statements:?} went unnoticed: {text}");
        assert!(
            text.contains(&format!("BROKEN at event {seq}")) && text.contains(word),
            "{statements:?}: {text}"
        );
    }

    // A rewrite that recomputes every hash from event 3 on and drops the stored checkpoints
    // passes a plain verify, but not against the checkpoint exported before.
    let url = copy_store(&s.server, &copy);
    let store = ca_server::store::Store::open(&url).await.unwrap();
    let events = store.audit_events_after(0, 100_000).await.unwrap();
    store.close().await;
    let mut prev = String::new();
    let mut statements = vec!["DELETE FROM audit_checkpoints".to_owned()];
    for mut e in events {
        if e.seq == 3 {
            e.spiffe_id = Some("spiffe://cluster.local/ns/shop/sa/innocent".into());
        }
        if e.seq >= 3 {
            e.prev_hash = prev.clone();
            e.hash = ca_server::audit::event_hash(&e);
            statements.push(format!(
                "UPDATE audit_events SET spiffe_id = {}, prev_hash = '{}', hash = '{}' WHERE seq = {}",
                e.spiffe_id.as_ref().map_or("NULL".into(), |v| format!("'{v}'")),
                e.prev_hash, e.hash, e.seq
            ));
        }
        prev = e.hash.clone();
    }
    let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
    run_sql(&url, &statements).await;
    let (ok, text) = verify(&url, &key, None);
    assert!(
        ok,
        "a consistent rewrite passes the chain check alone: {text}"
    );
    let (ok, text) = verify(&url, &key, Some(&exported));
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("BROKEN at event {cp_seq}")) && text.contains("rewritten"),
        "{text}"
    );

    // A forged checkpoint file is refused.
    let mut forged = cp.clone();
    forged["hash"] = Value::String("0".repeat(64));
    std::fs::write(&exported, forged.to_string()).unwrap();
    let (ok, text) = verify(&copy_store(&s.server, &copy), &key, Some(&exported));
    assert!(!ok && text.contains("not genuine"), "{text}");
}

#[tokio::test]
async fn prune_removes_old_events_and_keeps_the_chain_verifiable() {
    let s = seed(&["--audit-checkpoint-interval", "1s"]).await;
    let server = &s.server;
    let before = audit_json(server, &[]);
    let old = expect(&before, |e| e["time"].as_str().unwrap() < s.middle.as_str());
    let kept = expect(&before, |e| {
        e["time"].as_str().unwrap() >= s.middle.as_str()
    });
    assert!(!old.is_empty() && !kept.is_empty());
    // The first checkpoint the server signed (at start), exported as an auditor would have.
    let early = s.dir.path().join("early.json");
    let first = {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut db = sqlx::AnyConnection::connect(&server.database_url())
            .await
            .unwrap();
        let row: (i64, String, i64, String, String) = sqlx::query_as(
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints ORDER BY seq LIMIT 1",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        serde_json::json!({"seq": row.0, "hash": row.1, "time_ms": row.2, "public_key": row.3, "signature": row.4})
    };
    std::fs::write(&early, first.to_string()).unwrap();
    assert!(
        server
            .cli(&["audit", "verify", "--checkpoint", early.to_str().unwrap()])
            .status
            .success()
    );

    let out = server.cli(&["audit", "prune", "--before", &s.middle]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("pruned {} event(s)", old.len())),
        "{printed}"
    );

    let after = audit_json(server, &[]);
    let remaining: Vec<i64> = after
        .iter()
        .filter(|e| e["kind"] != "anchor")
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    for seq in &old {
        assert!(!remaining.contains(seq), "event {seq} should be gone");
    }
    for seq in &kept {
        assert!(remaining.contains(seq), "event {seq} should be kept");
    }
    let anchor: Vec<&Value> = after.iter().filter(|e| e["kind"] == "anchor").collect();
    assert_eq!(anchor.len(), 1);
    assert_eq!(anchor[0]["seq"].as_i64().unwrap(), *old.first().unwrap());
    let prune = &audit_json(server, &["--kind", "prune"])[0];
    assert_eq!(prune["count"].as_i64().unwrap(), old.len() as i64);
    // The prune names the anchor it vouches for in fields of its own, which its hash covers.
    assert_eq!(prune["anchor_seq"], anchor[0]["seq"], "{prune}");
    assert_eq!(prune["anchor_hash"], anchor[0]["hash"], "{prune}");
    assert!(prune["operator"].is_string());

    let (ok, text) = (
        server.cli(&["audit", "verify"]).status.success(),
        String::from_utf8(server.cli(&["audit", "verify"]).stdout).unwrap(),
    );
    assert!(ok, "{text}");
    // Service continues and the log keeps growing on top of the anchor.
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&s.issuer.token("late", "comer")), &csr, 0)
        .await
        .unwrap();
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A checkpoint taken after the prune verifies; the one before it covers pruned history.
    let late = s.dir.path().join("late.json");
    std::fs::write(&late, server.cli(&["audit", "checkpoint", "--now"]).stdout).unwrap();
    assert!(
        server
            .cli(&["audit", "verify", "--checkpoint", late.to_str().unwrap()])
            .status
            .success()
    );
    let out = server.cli(&["audit", "verify", "--checkpoint", early.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(first["seq"].as_i64().unwrap() < anchor[0]["seq"].as_i64().unwrap());
    assert!(
        !out.status.success() && text.contains("which was pruned"),
        "{text}"
    );
    // A second prune moves the anchor on and still verifies.
    let now = rfc3339(::time::OffsetDateTime::now_utc());
    assert!(
        server
            .cli(&["audit", "prune", "--before", &now])
            .status
            .success()
    );
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Removing the anchor behind the log's back is noticed.
    let url = server.database_url();
    run_sql(&url, &["DELETE FROM audit_events WHERE kind = 'anchor'"]).await;
    let out = server.cli(&["audit", "verify"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
