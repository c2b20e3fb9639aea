//! The agent's socket: the SPIFFE Workload API, driven by clients no one here wrote
//! (py-spiffe), and its contract at the edges (the security header, no identity yet, unknown
//! methods, the socket's mode and its removal).

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::process::Command;
use std::time::Duration;

use ca_tests::workload::{AgentProcess, LineProcess, py_script, python_has};
use ca_tests::*;

/// A CA trusting a test issuer, in a temporary directory.
fn ca() -> (tempfile::TempDir, TestIssuer, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    (dir, issuer, server)
}

/// The agent of `shop/web`, in `<dir>/agent`, once it serves its first SVID.
fn web_agent(
    dir: &tempfile::TempDir,
    issuer: &TestIssuer,
    server: &TestServer,
    extra: &[&str],
) -> AgentProcess {
    let agent = AgentProcess::start(
        server,
        &dir.path().join("agent"),
        &issuer.token("shop", "web"),
        extra,
    );
    agent.wait_ready(Duration::from_secs(10));
    agent
}

/// A Workload API request with the security header.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

#[test]
fn py_spiffe_x509_source_follows_renewals_and_a_root_rotation() {
    if !python_has("spiffe") {
        return;
    }
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &["--ttl", "6s"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is the agent user's alone");

    let mut source = LineProcess::spawn({
        let mut c = Command::new("python3");
        c.arg(py_script("x509_source.py"))
            .arg(agent.uri())
            .arg("60");
        c
    });
    let first = source.wait_for(Duration::from_secs(10), "the first X.509 context", |v| {
        v["event"] == "initial"
    });
    assert_eq!(first["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(first["key_matches"], true);
    assert_eq!(first["chain"], 1, "the leaf; the root is in the bundle");
    assert_eq!(first["roots"].as_array().unwrap().len(), 1);
    // The SVID served is the one the agent holds, which the CA recorded.
    let recorded = audit_json(
        &server,
        &[
            "--kind",
            "issued",
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/web",
        ],
    );
    assert!(
        recorded
            .iter()
            .any(|e| e["serial"].as_str().is_some_and(|s| s
                .trim_start_matches('0')
                .eq_ignore_ascii_case(first["serial"].as_str().unwrap()))),
        "{first} not in {recorded:?}"
    );

    // A renewal (at 40-50% of 6 s) is pushed on the open stream.
    let renewed = source.wait_for(Duration::from_secs(8), "a renewal", |v| {
        v["event"] == "update" && v["serial"] != first["serial"]
    });
    assert_eq!(renewed["key_matches"], true);

    // A prepared root reaches the bundle on the stream, then certificates come from it.
    assert!(server.cli(&["root", "prepare"]).status.success());
    source.wait_for(
        Duration::from_secs(4),
        "the prepared root in the bundle",
        |v| v["roots"].as_array().unwrap().len() == 2,
    );
    server.activate("2");
    let rotated = source.wait_for(Duration::from_secs(10), "an SVID from root 2", |v| {
        v["issuer"].as_str().unwrap().contains("root 2")
    });
    assert_eq!(rotated["key_matches"], true);
    assert_eq!(rotated["roots"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_socket_refuses_what_the_contract_says() {
    let (dir, issuer, server) = ca();
    let mut agent = web_agent(&dir, &issuer, &server, &[]);
    let mut client = ca_tests::workload::uds_client(&agent.socket).await;
    use ca_proto::workload::X509svidRequest;

    // Without the security header: InvalidArgument, before anything else is looked at.
    let status = client.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    // With it: the SVID at once, DER leaf first, the key PKCS#8.
    let request = with_header(X509svidRequest {});
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    let (rest, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    assert!(rest.is_empty(), "a root authority: the leaf alone");
    let key = rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice()).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&key),
        leaf.public_key().raw
    );
    assert_eq!(
        svid.bundle,
        der(&server.bundle_pem()),
        "the bundle: the roots' DER concatenated"
    );

    // Unknown methods (the incubating WIT-SVID calls, say) answer Unimplemented.
    let status =
        ca_tests::workload::call_unknown(&agent.socket, "/SpiffeWorkloadAPI/FetchX509WITSVID")
            .await;
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // SDS on the same socket: FetchSecrets answers at once; DeltaSecrets is not served.
    use ca_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use ca_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let mut sds =
        SecretDiscoveryServiceClient::new(ca_tests::workload::uds_channel(&agent.socket).await);
    let fetched = sds
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into(), "ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.resources.len(), 2);
    let status = sds
        .delta_secrets(tokio_stream::iter(vec![DeltaDiscoveryRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // SIGTERM: the agent stops and takes its socket with it.
    assert!(agent.terminate().success());
    assert!(!agent.socket.exists(), "the socket is removed");
}

#[tokio::test]
async fn with_no_identity_yet_the_socket_says_so() {
    let (dir, _issuer, server) = ca();
    // A token from an issuer the CA does not trust: never an identity.
    let stranger = TestIssuer::new(&dir.path().join("stranger"));
    let agent = AgentProcess::start(
        &server,
        &dir.path().join("agent"),
        &stranger.token("shop", "web"),
        &[],
    );
    let start = std::time::Instant::now();
    while !agent.socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = ca_tests::workload::uds_client(&agent.socket).await;
    let request = with_header(ca_proto::workload::X509svidRequest {});
    let status = client.fetch_x509svid(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
}

#[tokio::test]
async fn through_a_ca_outage_the_agent_serves_what_it_holds_even_after_a_restart() {
    use ca_tests::workload::{agent_health, served_svid};
    let (dir, issuer, mut server) = ca();
    let health: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health_flag = ["--health-listen", &health.to_string()];
    let agent_dir = dir.path().join("agent");
    let token = issuer.token("shop", "web");
    let mut agent = AgentProcess::start(&server, &agent_dir, &token, &health_flag);
    agent.wait_ready(Duration::from_secs(10));
    wait_until(Duration::from_secs(5), "the CA connected", || {
        agent_health(health).1["ca"]["connected"] == true
    });
    let (serial, _) = served_svid(&agent.socket).await;

    // The CA goes away: the agent keeps serving, retries, and says so.
    server.kill();
    wait_until(Duration::from_secs(5), "the outage in /healthz", || {
        agent_health(health).1["ca"]["connected"] == false
    });
    let (status, report) = agent_health(health);
    assert_eq!(status, 200, "still serving a valid SVID: {report}");
    assert_eq!(report["serving"], true);
    assert_eq!(report["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(report["bundle_sequence"], 1, "{report}");
    // First the watch breaks; then each retry finds nobody there.
    wait_until(
        Duration::from_secs(5),
        "a failed reconnect in /healthz",
        || {
            agent_health(health).1["ca"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("connecting to"))
        },
    );
    assert_eq!(served_svid(&agent.socket).await.0, serial);
    wait_until(Duration::from_secs(5), "the outage in the log", || {
        agent.log().contains("Agent lost the server")
    });

    // Restarted during the outage, it serves the SVID it kept. SIGTERM ends it at once, in
    // the middle of a backoff's wait too.
    let stopping = std::time::Instant::now();
    assert!(agent.terminate().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "stopped in {:?}",
        stopping.elapsed()
    );
    assert!(!agent.socket.exists());
    drop(agent);
    let agent = AgentProcess::start(&server, &agent_dir, &token, &health_flag);
    wait_until(
        Duration::from_secs(10),
        "the socket after the restart",
        || agent.socket.exists(),
    );
    assert_eq!(served_svid(&agent.socket).await.0, serial, "the kept SVID");
    let (status, report) = agent_health(health);
    assert_eq!(
        (status, &report["ca"]["connected"]),
        (200, &serde_json::json!(false)),
        "{report}"
    );
    assert!(
        agent
            .log()
            .contains("Serving the SVID kept from the last run")
    );

    // The CA comes back: the agent reconnects on its own.
    server.start_again();
    wait_until(Duration::from_secs(20), "the CA reached again", || {
        agent_health(health).1["ca"]["connected"] == true
    });
}

#[tokio::test]
async fn an_expired_kept_svid_is_not_served() {
    let (dir, issuer, mut server) = ca();
    let agent_dir = dir.path().join("agent");
    let token = issuer.token("shop", "web");
    let mut agent = AgentProcess::start(&server, &agent_dir, &token, &["--ttl", "3s"]);
    agent.wait_ready(Duration::from_secs(10));
    server.kill();
    assert!(agent.terminate().success());
    drop(agent);
    // Past the kept SVID's notAfter (3 s, whole seconds).
    std::thread::sleep(Duration::from_secs(4));
    let agent = AgentProcess::start(&server, &agent_dir, &token, &[]);
    wait_until(Duration::from_secs(10), "the socket", || {
        agent.socket.exists()
    });
    let mut client = ca_tests::workload::uds_client(&agent.socket).await;
    let request = with_header(ca_proto::workload::X509svidRequest {});
    let status = client.fetch_x509svid(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(agent.log().contains("expired"), "{}", agent.log());
}

#[tokio::test]
async fn the_rust_spiffe_crate_fetches_and_streams() {
    use futures_util::StreamExt;
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &[]);
    let uri = agent.uri();

    let client = spiffe::WorkloadApiClient::connect_to(&uri).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        svid.leaf().as_ref(),
        der(&std::fs::read_to_string(agent.out.join("cert-chain.pem")).unwrap()),
        "the SVID the agent holds"
    );
    let domain = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let bundle = bundles.get(&domain).expect("our trust domain's bundle");
    assert_eq!(bundle.authorities().len(), 1);
    assert_eq!(bundle.authorities()[0].as_ref(), der(&server.bundle_pem()));

    // The stream delivers the set at once, then again when the bundle changes.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = contexts.next().await.unwrap().unwrap();
    assert_eq!(
        first.bundle_set().get(&domain).unwrap().authorities().len(),
        1
    );
    assert!(server.cli(&["root", "prepare"]).status.success());
    let next = tokio::time::timeout(Duration::from_secs(5), contexts.next())
        .await
        .expect("an update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        next.bundle_set().get(&domain).unwrap().authorities().len(),
        2
    );

    // Its X509Source, pointed at the same socket.
    let source = spiffe::X509Source::builder()
        .endpoint(&uri)
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
}

fn sds_client(agent: &AgentProcess, name: &str, seconds: u32, mode: &str) -> LineProcess {
    let mut c = Command::new("python3");
    c.arg(py_script("sds_client.py"))
        .arg(agent.uri())
        .arg(name)
        .arg(seconds.to_string())
        .arg(mode);
    LineProcess::spawn(c)
}

/// The leaf's serial and whether `key_pem` is its key, from an SDS `default` secret.
fn default_secret(response: &serde_json::Value) -> (String, bool) {
    let secret = &response["secrets"][0];
    assert_eq!(secret["name"], "default");
    let chain = secret["chain"].as_str().unwrap();
    let leaf = der(chain);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let key = rcgen::KeyPair::from_pem(secret["key"].as_str().unwrap()).unwrap();
    let matches = rcgen::PublicKeyData::subject_public_key_info(&key) == cert.public_key().raw;
    (serial_of(chain), matches)
}

#[test]
fn an_envoy_sds_client_gets_default_and_rootca_acks_and_sees_pushes() {
    if !python_has("envoy.service.secret.v3.sds_pb2_grpc") {
        return;
    }
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &["--ttl", "6s"]);
    let secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    let mut default = sds_client(&agent, "default", 30, "ack");
    let mut rootca = sds_client(&agent, "ROOTCA", 30, "ack");
    let mut nacker = sds_client(&agent, "default", 30, "nack");

    let first = default.wait_for(Duration::from_secs(10), "default", |_| true);
    assert_eq!(first["type_url"], secret_type);
    assert_eq!(first["secrets"][0]["type_url"], secret_type);
    let (serial, key_matches) = default_secret(&first);
    assert!(key_matches, "the key certified by the chain");
    let spiffe =
        x509_parser::parse_x509_certificate(&der(first["secrets"][0]["chain"].as_str().unwrap()))
            .unwrap()
            .1
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect::<Vec<_>>();
    assert!(
        spiffe
            .iter()
            .any(|n| n.contains("spiffe://cluster.local/ns/shop/sa/web")),
        "{spiffe:?}"
    );

    let roots = rootca.wait_for(Duration::from_secs(10), "ROOTCA", |_| true);
    let trusted = roots["secrets"][0]["trusted_ca"].as_str().unwrap();
    assert_eq!(roots["secrets"][0]["name"], "ROOTCA");
    assert_eq!(der(trusted), der(&server.bundle_pem()));

    // After the ACK nothing is resent; the next response is the renewal, pushed.
    let pushed = default.wait_for(Duration::from_secs(8), "the renewal pushed", |_| true);
    let (renewed, key_matches) = default_secret(&pushed);
    assert_ne!(renewed, serial, "a new SVID, not the same version again");
    assert_ne!(pushed["version"], first["version"]);
    assert!(key_matches);

    // A prepared root is pushed to ROOTCA.
    assert!(server.cli(&["root", "prepare"]).status.success());
    let both = rootca.wait_for(Duration::from_secs(5), "the prepared root", |_| true);
    assert_eq!(
        both["secrets"][0]["trusted_ca"]
            .as_str()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );

    // The NACK was heard, and the client still got the next version.
    nacker.wait_for(Duration::from_secs(5), "the NACKed first version", |_| true);
    nacker.wait_for(Duration::from_secs(8), "a later version", |_| true);
    assert!(
        agent.log().contains("rejected a version (NACK)"),
        "{}",
        agent.log()
    );

    // An unknown name is refused.
    let mut unknown = sds_client(&agent, "spiffe://cluster.local/ns/shop/sa/web", 5, "ack");
    let refused = unknown.wait_for(Duration::from_secs(5), "the refusal", |_| true);
    assert_eq!(refused["error"], "INVALID_ARGUMENT", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("unknown resource name")
    );
}

#[test]
fn two_workloads_make_mtls_with_spiffe_tls_through_a_root_rotation() {
    if !python_has("spiffetls") {
        return;
    }
    let (dir, issuer, server) = ca();
    let ttl = ["--ttl", "6s"];
    let web = AgentProcess::start(
        &server,
        &dir.path().join("web"),
        &issuer.token("shop", "web"),
        &ttl,
    );
    let api = AgentProcess::start(
        &server,
        &dir.path().join("api"),
        &issuer.token("shop", "api"),
        &ttl,
    );
    web.wait_ready(Duration::from_secs(10));
    api.wait_ready(Duration::from_secs(10));
    let address = format!("127.0.0.1:{}", free_port());
    let python = |args: &[&str]| {
        let mut c = Command::new("python3");
        c.arg(py_script("mtls_pair.py")).args(args);
        LineProcess::spawn(c)
    };
    let mut listener = python(&[
        "server",
        &address,
        &web.uri(),
        "spiffe://cluster.local/ns/shop/sa/api",
    ]);
    listener.wait_for(Duration::from_secs(10), "listening", |v| {
        v["listening"].is_string()
    });
    let mut dialer = python(&[
        "client",
        &address,
        &api.uri(),
        "spiffe://cluster.local/ns/shop/sa/web",
        "40",
    ]);
    let first = dialer.wait_for(Duration::from_secs(10), "a first round trip", |_| true);
    assert_eq!(first["ok"], true, "{first}");
    assert!(first["peer_issuer"].as_str().unwrap().contains("root 1"));

    // Prepare root 2; once both agents hold it in their bundles, activate it.
    assert!(server.cli(&["root", "prepare"]).status.success());
    let roots = |agent: &AgentProcess| {
        std::fs::read_to_string(agent.out.join("root-cert.pem"))
            .unwrap_or_default()
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    wait_until(Duration::from_secs(5), "root 2 in both bundles", || {
        roots(&web) == 2 && roots(&api) == 2
    });
    server.activate("2");
    // Both sides move to root 2 at their next renewal; the connections keep working.
    dialer.wait_for(
        Duration::from_secs(15),
        "both certificates from root 2",
        |v| {
            v["ok"] == true
                && v["peer_issuer"]
                    .as_str()
                    .is_some_and(|i| i.contains("root 2"))
                && v["own_issuer"]
                    .as_str()
                    .is_some_and(|i| i.contains("root 2"))
        },
    );
    listener.drain();
    let failures: Vec<_> = dialer
        .seen
        .iter()
        .chain(&listener.seen[1..])
        .filter(|v| v["ok"] != true)
        .collect();
    assert!(
        failures.is_empty(),
        "mTLS failed during the rotation: {failures:?}"
    );
    assert!(dialer.seen.len() >= 10, "{} round trips", dialer.seen.len());
}

#[test]
fn a_socket_group_opens_the_socket_to_that_group_alone() {
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &["--socket-group", "daemon"]);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let daemon_gid = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("daemon:x:")?
                .split(':')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap();
    assert_eq!(meta.gid(), daemon_gid);
    // A group that does not exist is refused at start, naming it.
    let out = ca_server(&[
        "agent",
        "--ca-bundle",
        "/dev/null",
        "--token-file",
        "/dev/null",
        "--out-dir",
        dir.path().join("other").to_str().unwrap(),
        "--socket",
        &format!("unix://{}", dir.path().join("other.sock").display()),
        "--socket-group",
        "no-such-group",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-group"), "{stderr}");
}

#[tokio::test]
async fn garbage_and_idle_clients_on_the_socket_do_not_disturb_the_others() {
    use tokio::io::AsyncWriteExt;
    let (dir, issuer, server) = ca();
    // The socket named by SPIFFE_ENDPOINT_SOCKET, as a workload's environment gives it.
    let agent = AgentProcess::start_from_env(
        &server,
        &dir.path().join("agent"),
        &issuer.token("shop", "web"),
        &[],
    );
    agent.wait_ready(Duration::from_secs(10));
    let (serial, _) = ca_tests::workload::served_svid(&agent.socket).await;

    // Not HTTP/2 at all; a preface and then a header block announced at 16 MiB that never
    // comes; a preface and silence; and many streams left open.
    let mut garbage = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    garbage.write_all(&[0xff; 4096]).await.unwrap();
    let mut huge = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    huge.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // The agent may close this connection as soon as it reads the oversized frame's
    // header, so the writes after the preface may fail: that is an answer too.
    let _ = huge
        .write_all(&[0xff, 0xff, 0xff, 0x1, 0x4, 0, 0, 0, 1])
        .await;
    let _ = huge.write_all(&[0x41; 1000]).await;
    let mut silent = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut open = Vec::new();
    let mut client = ca_tests::workload::uds_client(&agent.socket).await;
    for _ in 0..200 {
        let request = with_header(ca_proto::workload::X509svidRequest {});
        open.push(client.fetch_x509svid(request).await.unwrap().into_inner());
    }

    // Everyone else is still served, and the agent is still up.
    for _ in 0..3 {
        let (again, _) = tokio::time::timeout(
            Duration::from_secs(5),
            ca_tests::workload::served_svid(&agent.socket),
        )
        .await
        .expect("served within 5 s");
        assert_eq!(again, serial);
    }
    assert!(agent.socket.exists());
    drop((garbage, huge, silent, open));
}

#[tokio::test]
async fn the_jwt_bundle_reaches_py_spiffe_and_the_rust_crate() {
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &[]);
    // The CA's JWT-SVID key ids, from its SPIFFE bundle.
    let shown: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    let kids: Vec<String> = shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kids.len(), 1);

    // The Rust crate's client.
    let client = spiffe::WorkloadApiClient::connect_to(agent.uri())
        .await
        .unwrap();
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let domain = spiffe::TrustDomain::new("cluster.local").unwrap();
    let bundle = bundles.get(&domain).expect("our trust domain's JWT bundle");
    let got: Vec<String> = bundle
        .jwt_authorities()
        .map(|a| a.key_id().to_owned())
        .collect();
    assert_eq!(got, kids);

    // py-spiffe's.
    if python_has("spiffe") {
        let py: Vec<String> = serde_json::from_value(ca_tests::workload::python_json(&[
            "-c",
                "import json, sys\n\
                 from spiffe import WorkloadApiClient, TrustDomain\n\
                 c = WorkloadApiClient(socket_path=sys.argv[1])\n\
                 b = c.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain('cluster.local'))\n\
                 print(json.dumps(sorted(b.jwt_authorities.keys())))",
            &agent.uri(),
        ]))
        .unwrap();
        assert_eq!(py, kids);
    }

    // A prepared authority's key reaches the agent's stream.
    let mut stream = client.stream_jwt_bundles().await.unwrap();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.get(&domain).unwrap().jwt_authorities().count(), 1);
    assert!(server.cli(&["root", "prepare"]).status.success());
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.get(&domain).unwrap().jwt_authorities().count(), 2);
}

#[test]
fn py_spiffe_fetches_and_validates_jwt_svids() {
    if !python_has("spiffe") {
        return;
    }
    let (dir, issuer, server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &[]);
    let got = ca_tests::workload::python_json(&[
        py_script("jwt_svid.py").to_str().unwrap(),
        &agent.uri(),
        "db",
        "cache",
    ]);
    assert_eq!(got["spiffe_id"], WEB, "{got}");
    assert_eq!(got["audience"], serde_json::json!(["cache", "db"]));
    assert_eq!(got["same_token_again"], true, "kept for its audience set");
    assert_eq!(got["validated_spiffe_id"], WEB);
    assert!(
        got["other_audience"]
            .as_str()
            .unwrap()
            .contains("the JWT-SVID is not valid"),
        "{got}"
    );
    assert_eq!(got["locally_validated"], WEB);
    assert_eq!(got["bundle_keys"], 1);
    // The CA minted once for the set, and recorded it.
    let minted: Vec<serde_json::Value> =
        audit_json(&server, &["--kind", "issued", "--spiffe-id", WEB])
            .into_iter()
            .filter(|e| !e["audience"].is_null())
            .collect();
    assert_eq!(minted.len(), 1, "{minted:?}");
    let mut recorded: Vec<String> =
        serde_json::from_str(minted[0]["audience"].as_str().unwrap()).unwrap();
    recorded.sort();
    assert_eq!(recorded, ["cache", "db"], "the set py-spiffe asked for");
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[tokio::test]
async fn the_rust_spiffe_crate_fetches_and_validates_jwt_svids() {
    let (dir, issuer, mut server) = ca();
    let agent = web_agent(&dir, &issuer, &server, &["--jwt-ttl", "10m"]);
    let client = spiffe::WorkloadApiClient::connect_to(agent.uri())
        .await
        .unwrap();
    let svid = client.fetch_jwt_svid(["db"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    assert_eq!(svid.audience(), ["db".to_owned()]);
    let validated = client.validate_jwt_token("db", svid.token()).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), WEB);
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(svid.token())
        .unwrap()
        .claims;
    let life = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(life, 600, "--jwt-ttl");
    assert!(
        client
            .validate_jwt_token("elsewhere", svid.token())
            .await
            .is_err(),
        "not for an audience it does not name"
    );

    // The contract's edges, with the generated client.
    let mut raw = ca_tests::workload::uds_client(&agent.socket).await;
    use ca_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};
    let ask = |audience: &[&str], spiffe_id: &str| JwtsvidRequest {
        audience: audience.iter().map(|s| (*s).to_owned()).collect(),
        spiffe_id: spiffe_id.to_owned(),
    };
    let status = raw.fetch_jwtsvid(ask(&["db"], "")).await.unwrap_err();
    assert_eq!(status.message(), "security header missing from request");
    let status = raw
        .fetch_jwtsvid(with_header(ask(&[], "")))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::InvalidArgument, "audience must be specified")
    );
    let status = raw
        .fetch_jwtsvid(with_header(ask(
            &["db"],
            "spiffe://cluster.local/ns/x/sa/y",
        )))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::PermissionDenied, "no identity issued")
    );
    let long = "a".repeat(300);
    let status = raw
        .fetch_jwtsvid(with_header(ask(&[&long], "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let validate = |audience: &str, svid: &str| ValidateJwtsvidRequest {
        audience: audience.to_owned(),
        svid: svid.to_owned(),
    };
    let status = raw
        .validate_jwtsvid(validate("db", svid.token()))
        .await
        .unwrap_err();
    assert_eq!(status.message(), "security header missing from request");
    let answer = raw
        .validate_jwtsvid(with_header(validate("db", svid.token())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.spiffe_id, WEB);
    let claims = answer.claims.unwrap();
    assert!(
        matches!(&claims.fields["sub"].kind, Some(prost_types::value::Kind::StringValue(s)) if s == WEB)
    );
    // A token signed by a key outside the bundle (here, a Kubernetes token) is refused.
    let status = raw
        .validate_jwtsvid(with_header(validate("db", &issuer.token("shop", "web"))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("no key with kid"),
        "{}",
        status.message()
    );

    // Through a CA outage the token kept for a set is still handed out; a new set cannot be
    // minted, and the workload hears why.
    server.kill();
    let again = client.fetch_jwt_svid(["db"], None).await.unwrap();
    assert_eq!(again.token(), svid.token());
    let status = raw
        .fetch_jwtsvid(with_header(ask(&["new-audience"], "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Validation needs no CA.
    assert!(client.validate_jwt_token("db", svid.token()).await.is_ok());
}
