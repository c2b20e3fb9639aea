//! Break glass through the real binaries: when the active root has expired, or must be
//! abandoned at once, `root prepare --activate` puts a new one in charge immediately, and the
//! agents recover by themselves, without a restart: those whose bundle predates the new root
//! reach the server with the outgoing root's certificate while that root is valid and in the
//! bundle, and those whose root has expired find the new one in the `--ca-bundle` file the
//! server publishes.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::time::{Duration, Instant};

use ca_tests::mesh::mtls_handshake;
use ca_tests::pki::{ca_params, corporate_root, write_cacerts};
use ca_tests::workload::{AgentProcess, agent_proxy};
use ca_tests::*;

/// The issuer (subject) of the certificate the server presents now.
fn served_issuer(server: &TestServer) -> String {
    let chain = server.served_chain();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    leaf.issuer().to_string()
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    log: impl Fn() -> String,
    mut done: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_is_replaced_at_once_and_the_agents_recover_by_themselves() {
    const AGENTS: usize = 3;
    // How long the imported CA lives: long enough to set up, short enough to wait out.
    const LIFE: Duration = Duration::from_secs(16);
    let f = Fixture::start(&[]);
    let server = &f.server;

    // The mesh runs on a plug-in CA whose certificate, and root, expire in LIFE.
    let mut pki = corporate_root();
    let expires = ::time::OffsetDateTime::now_utc() + LIFE;
    pki.root_params.not_after = expires;
    let key = rcgen::KeyPair::generate().unwrap();
    pki.root_pem = pki.root_params.self_signed(&pki.root_key).unwrap().pem();
    let mut params = ca_params("Example Corp Mesh CA");
    params.not_after = expires;
    let cacerts = f.dir.path().join("cacerts");
    write_cacerts(&cacerts, &pki, params, &key);
    server.cli_ok(&["root", "prepare", "--import-dir", cacerts.to_str().unwrap()]);
    server.activate("2");
    server.cli_ok(&["root", "retire", "1", "--force"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the server renews onto 2, it presents 1's certificate, whose root the bundle
    // file no longer holds: the handshake fails, and is tried again.
    let serving_2 = || {
        server.try_served_chain().is_ok_and(|chain| {
            let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
            leaf.issuer().to_string().contains("Example Corp Mesh CA")
        })
    };
    while !serving_2() {
        assert!(Instant::now() < deadline, "the server never served 2's");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Agents whose --ca-bundle is the bundle the server publishes (a mounted ConfigMap).
    let agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            AgentProcess::start_following(
                server,
                &f.dir.path().join(format!("agent-{i}")),
                &f.issuer.token("shop", &format!("svc-{i}")),
                &[],
            )
        })
        .collect();
    for agent in &agents {
        agent.wait_ready(Duration::from_secs(10));
        let held = agent_proxy(&agent.socket).await.held();
        assert!(held.leaf_issuer.contains("Example Corp Mesh CA"));
        assert_eq!(held.roots.len(), 1);
    }

    // The root expires: the server can neither sign nor be verified, and the agents, which
    // trust nothing else, lose it.
    let left = (expires - ::time::OffsetDateTime::now_utc()).unsigned_abs();
    tokio::time::sleep(left + Duration::from_secs(1)).await;
    let check = server.cli(&["root", "status", "--check"]);
    assert!(!check.status.success());
    wait_until(
        Duration::from_secs(30),
        "an agent noticing it lost the CA",
        || agents[0].log(),
        || async { agents[0].log().contains("Agent lost the server") },
    )
    .await;

    // Nor did they ask again and again as the end neared (each renewal clamped to the same
    // notAfter, at half the life left): once a renewal gained nothing, every 10 s at most.
    for agent in &agents {
        let log = agent.log();
        let renewals = log.matches("Renewed the certificate").count();
        assert!(
            renewals <= 3,
            "{renewals} renewals before the expiry:\n{log}"
        );
    }

    // Break glass: a new root, active at once.
    let out = server.cli(&["root", "prepare", "--activate"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    let broke = Instant::now();

    // Every agent, retrying on its own, finds root 3 in the file and renews from it.
    for agent in &agents {
        wait_until(
            Duration::from_secs(45),
            "an agent on root 3",
            || agent.log(),
            || async {
                let held = agent_proxy(&agent.socket).await.held();
                held.leaf_issuer.contains("root 3") && held.roots.len() == 2
            },
        )
        .await;
    }
    eprintln!(
        "{AGENTS} agents recovered {:?} after the break glass",
        broke.elapsed()
    );
    // And they make mTLS with each other again.
    for i in 0..AGENTS {
        let a = agent_proxy(&agents[i].socket).await;
        let b = agent_proxy(&agents[(i + 1) % AGENTS].socket).await;
        mtls_handshake(&a, &b).unwrap();
    }
    assert!(server.cli_ok(&["root", "status"]).contains("active"));
    assert_audit_intact(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_root_is_replaced_at_once_and_an_agent_with_the_old_bundle_reconnects() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    let old_bundle = server.bundle_pem();
    let dir = f.dir.path().join("agent");
    let token = f.issuer.token("shop", "web");
    let mut agent = AgentProcess::start_with_bundle(server, &dir, &token, &old_bundle, &[]);
    agent.wait_ready(Duration::from_secs(10));
    assert!(
        agent_proxy(&agent.socket)
            .await
            .held()
            .leaf_issuer
            .contains("root 1")
    );
    // The agent is away (its node rebooting, say) while the operator abandons root 1.
    agent.terminate();

    let out = server.cli(&["root", "prepare", "--activate"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    server.cli_ok(&["root", "taint", "1"]);
    // The server now signs with 2, and still presents the certificate 1 signed, for clients
    // like this agent whose bundle has only root 1.
    std::thread::sleep(Duration::from_millis(2200));
    let status = server.cli_ok(&["root", "status"]);
    assert!(status.contains("retiring TAINTED"), "{status}");
    assert!(served_issuer(server).contains("root 1"));
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(&mut client, Some(&f.issuer.token("shop", "db")), &csr, 0)
        .await
        .unwrap();
    let leaf_der = der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert!(leaf.issuer().to_string().contains("root 2"));

    // Back, with its files and its bootstrap bundle from before: it reaches the server,
    // learns the new bundle, and renews at once (a tainted authority signed what it holds).
    let agent = AgentProcess::start_with_bundle(server, &dir, &token, &old_bundle, &[]);
    agent.wait_ready(Duration::from_secs(10));
    let took = wait_until(
        Duration::from_secs(10),
        "the agent on root 2",
        || agent.log(),
        || async {
            agent_proxy(&agent.socket)
                .await
                .held()
                .leaf_issuer
                .contains("root 2")
        },
    )
    .await;
    eprintln!("the agent with the old bundle moved to root 2 {took:?} after its start");
    assert!(
        agent.log().contains("a tainted authority signed it"),
        "{}",
        agent.log()
    );

    // Once 1 retires, the server presents 2's certificate.
    server.cli_ok(&["root", "retire", "1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served_issuer(server).contains("root 2") {
        assert!(Instant::now() < deadline, "the server still presents 1's");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_audit_intact(server);
}
