//! Compromise response through the real binaries: `root taint` moves every agent holding a
//! tainted authority's certificates to the active one within seconds, with no mTLS failure
//! between them meanwhile; `root status` and `/metrics` show the convergence from the CA's
//! own records; a tainted authority retires once its holders have moved on, and never signs
//! again.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ca_tests::mesh::mtls_handshake;
use ca_tests::workload::{AgentProcess, agent_proxy};
use ca_tests::*;

fn ca() -> (tempfile::TempDir, TestIssuer, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    (dir, issuer, server)
}

/// `root status --format json`, by authority id.
fn status(server: &TestServer) -> std::collections::BTreeMap<i64, serde_json::Value> {
    server
        .cli_ok(&["root", "status", "--format", "json"])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_i64().unwrap(), v)
        })
        .collect()
}

/// Which root signed what the agent on `socket` serves now.
async fn served_issuer(agent: &AgentProcess) -> String {
    agent_proxy(&agent.socket).await.held().leaf_issuer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_taint_every_agent_moves_to_the_active_authority_without_an_mtls_failure() {
    const AGENTS: usize = 20;
    let (dir, issuer, server) = ca();
    let agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            AgentProcess::start(
                &server,
                &dir.path().join(format!("agent-{i}")),
                &issuer.token("shop", &format!("svc-{i}")),
                &[],
            )
        })
        .collect();
    for agent in &agents {
        agent.wait_ready(Duration::from_secs(30));
        assert!(served_issuer(agent).await.contains("root 1"));
    }

    // A new authority, active; the agents' certificates (an hour long) are still from 1.
    server.cli_ok(&["root", "prepare"]);
    server.activate("2");
    for agent in &agents {
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent_proxy(&agent.socket).await.held().roots.len() != 2 {
            assert!(Instant::now() < deadline, "root 2 never reached an agent");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let before = status(&server);
    assert_eq!(before[&1]["live_certificates"], AGENTS, "{before:?}");
    assert_eq!(before[&1]["live_identities"], AGENTS);
    assert_eq!(before[&2]["converged_ratio"], 0.0);
    assert_eq!(before[&2]["identities"], AGENTS);
    // And when the last of 1's certificates ends: an hour from their issuance.
    let last = time::OffsetDateTime::parse(
        before[&1]["last_certificate_not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ahead = last - time::OffsetDateTime::now_utc();
    assert!(
        ahead > time::Duration::minutes(55) && ahead <= time::Duration::minutes(61),
        "{before:?}"
    );
    assert!(before[&2]["last_certificate_not_after"].is_null());

    // Workloads keep making mTLS with their neighbours, with whatever their agents serve.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let sockets: Vec<_> = agents.iter().map(|a| a.socket.clone()).collect();
    let checker = {
        let (stop, failures, handshakes) = (stop.clone(), failures.clone(), handshakes.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for i in 0..sockets.len() {
                    let a = agent_proxy(&sockets[i]).await;
                    let b = agent_proxy(&sockets[(i + 1) % sockets.len()]).await;
                    for (client, server) in [(&a, &b), (&b, &a)] {
                        if let Err(e) = mtls_handshake(client, server) {
                            failures.lock().unwrap().push(format!(
                                "{} -> {}: {e}",
                                client.held().leaf_issuer,
                                server.held().leaf_issuer
                            ));
                        }
                        handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let tainted = Instant::now();
    server.cli_ok(&["root", "taint", "1"]);
    let mut moved = [false; AGENTS];
    while moved.iter().any(|m| !m) {
        for (i, agent) in agents.iter().enumerate() {
            moved[i] = moved[i] || served_issuer(agent).await.contains("root 2");
        }
        assert!(
            tainted.elapsed() < Duration::from_secs(5),
            "agents still on root 1 after 5 s: {:?}",
            moved
                .iter()
                .enumerate()
                .filter(|(_, m)| !**m)
                .map(|(i, _)| agents[i].log())
                .next()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = tainted.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    checker.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "mTLS failed: {failures:?}");
    assert!(
        handshakes.load(Ordering::Relaxed) >= 2 * AGENTS,
        "{} handshakes",
        handshakes.load(Ordering::Relaxed)
    );
    eprintln!(
        "{AGENTS} agents moved in {took:?}; {} handshakes, none failed",
        handshakes.load(Ordering::Relaxed)
    );
    assert!(agents[0].log().contains("a tainted authority signed it"));

    // The CA's records say the same: nobody's newest certificate is from 1 any more.
    let after = status(&server);
    assert_eq!(after[&1]["tainted"], true);
    assert_eq!(after[&1]["live_certificates"], 0, "{after:?}");
    assert_eq!(after[&1]["unexpired_certificates"], AGENTS);
    assert_eq!(after[&2]["live_certificates"], AGENTS);
    assert_eq!(after[&2]["converged_ratio"], 1.0);
    let table = server.cli_ok(&["root", "status"]);
    assert!(table.contains("retiring TAINTED"), "{table}");
    assert!(table.contains("LAST LEAF ENDS"), "{table}");
    assert!(after[&2]["last_certificate_not_after"].is_string());
    assert!(
        table.contains(&format!("rotation: {AGENTS} of {AGENTS} identities (100%)")),
        "{table}"
    );
    // And /metrics.
    wait_until(
        Duration::from_secs(25),
        "the convergence in /metrics",
        || {
            let (_, metrics) = http_get(server.http, "/metrics").unwrap();
            metrics.contains("ca_rotation_converged_ratio 1.0")
                && metrics.contains(&format!(
                    "ca_authority_live_certificates{{authority_id=\"2\",state=\"active\"}} {AGENTS}"
                ))
                && metrics.contains(
                    "ca_authority_live_certificates{authority_id=\"1\",state=\"retiring\"} 0",
                )
        },
    );

    // Its holders have moved on: it retires without --force, unexpired certificates and all.
    server.cli_ok(&["root", "retire", "1"]);
    assert_audit_intact(&server);
}

#[tokio::test]
async fn a_taint_is_published_and_bounded_by_the_rules() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    // A certificate from 1, held by a workload with no agent (it will not move on its own).
    let token = f.issuer.token("shop", "web");
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut server.client().await, Some(&token), &csr, 0)
        .await
        .unwrap();
    let mut watch = ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient::new(
        server.channel().await,
    )
    .watch_trust_bundle(ca_proto::ca::v1::WatchTrustBundleRequest {})
    .await
    .unwrap()
    .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(first.tainted_authorities.is_empty());

    // The active authority cannot be tainted: its holders would have nowhere to go.
    let out = server.cli(&["root", "taint", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("activate another authority first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.cli_ok(&["root", "prepare"]);
    server.activate("2");
    server.cli_ok(&["root", "taint", "1"]);
    let again = server.cli(&["root", "taint", "1"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already tainted"));

    // The watch stream names it, with its signing certificate and JWT key id.
    let authority_1 = server.cli_ok(&["root", "status", "--format", "json"]);
    let tainted = loop {
        let message = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a bundle update")
            .unwrap()
            .unwrap();
        if !message.tainted_authorities.is_empty() {
            break message.tainted_authorities;
        }
    };
    assert_eq!(tainted.len(), 1);
    assert_eq!(tainted[0].authority_id, 1);
    let leaf_issuer_der = der(&tainted[0].certificate);
    assert!(
        x509_parser::parse_x509_certificate(&leaf_issuer_der)
            .unwrap()
            .1
            .subject()
            .to_string()
            .contains("root 1"),
        "{authority_1}"
    );
    // The SPIFFE bundle marks root 1 and its JWT key, and nothing of 2's.
    let jwks: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    let marked: Vec<_> = keys.iter().filter(|k| k["tainted"] == true).collect();
    assert_eq!(marked.len(), 2, "{jwks}");
    assert!(marked.iter().any(|k| k["use"] == "x509-svid"));
    assert!(
        marked
            .iter()
            .any(|k| k["use"] == "jwt-svid" && k["kid"] == tainted[0].jwt_key_id.as_str())
    );

    // The workload's certificate from 1 is still its newest: retiring 1 is refused, saying
    // so, until --force.
    let refused = server.cli(&["root", "retire", "1"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        message.contains("1 holder(s) still have no certificate newer than authority 1's")
            && message.contains("--force"),
        "{message}"
    );
    // Once it has a newer one (from 2), 1 may go.
    create_certificate(&mut server.client().await, Some(&token), &csr, 0)
        .await
        .unwrap();
    server.cli_ok(&["root", "retire", "1"]);
    // A tainted authority never signs again.
    let out = server.cli(&["root", "activate", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let out = server.cli(&["root", "prepare"]);
    assert!(out.status.success());
    server.cli_ok(&["root", "taint", "3"]);
    let out = server.cli(&["root", "activate", "3"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tainted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = audit_json(server, &["--kind", "authority"]);
    assert!(
        events.iter().any(|e| e["reason"]
            .as_str()
            .unwrap()
            .starts_with("tainted authority 1")),
        "{events:?}"
    );
}

#[test]
fn an_agent_renews_at_once_when_its_root_leaves_the_bundle() {
    let (dir, issuer, server) = ca();
    let agent = AgentProcess::start(
        &server,
        &dir.path().join("agent"),
        &issuer.token("shop", "web"),
        &[],
    );
    agent.wait_ready(Duration::from_secs(10));
    server.cli_ok(&["root", "prepare"]);
    server.activate("2");
    // The worst case: retired by force while the agent's certificate (from 1) is unexpired.
    server.cli_ok(&["root", "retire", "1", "--force"]);
    wait_until(Duration::from_secs(5), "a certificate from root 2", || {
        std::fs::read_to_string(agent.out.join("cert-chain.pem"))
            .ok()
            .and_then(|pem| {
                let der = der(&pem);
                x509_parser::parse_x509_certificate(&der)
                    .ok()
                    .map(|(_, c)| c.issuer().to_string().contains("root 2"))
            })
            .unwrap_or(false)
    });
    assert!(
        agent
            .log()
            .contains("its root is no longer in the trust bundle"),
        "{}",
        agent.log()
    );
}
