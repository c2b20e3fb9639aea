//! Pod certificates through the real binary against a fake Kubernetes API that enforces
//! the API server's rules (`ca_tests::podcert`): PodCertificateRequests of 1.35 (a
//! `pkixPublicKey`) and 1.36 (a `stubPKCS10Request`) answered with X509-SVIDs that OpenSSL
//! verifies, each refusal with its condition, every answer in the audit log before its status
//! write, nothing answered twice across a restart, a relist after 410 Gone, a conflict and
//! two replicas racing; the ClusterTrustBundle through a rotation.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ca_tests::podcert::{FakeCertificatesApi, Interference, KeyField, PodKey, WatchTrouble};
use ca_tests::*;

const SIGNER: &str = "example.com/spiffe";

struct Cluster {
    dir: tempfile::TempDir,
    api: FakeCertificatesApi,
    issuer: TestIssuer,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let api = FakeCertificatesApi::start(dir.path());
        let issuer = TestIssuer::new(dir.path());
        Self { dir, api, issuer }
    }

    fn flags(&self, extra: &[&str]) -> Vec<String> {
        let mut flags = self.issuer.flags();
        flags.extend(self.api.api_flags());
        flags.extend(["--pod-certificate-signer".into(), SIGNER.into()]);
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }

    fn server(&self, extra: &[&str]) -> TestServer {
        let flags = self.flags(extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        TestServer::start(&self.dir.path().join("data"), &flags)
    }

    fn key(&self, key_type: &str) -> PodKey {
        PodKey::generate(self.dir.path(), key_type)
    }
}

fn condition(status: &serde_json::Value) -> (String, String) {
    let c = &status["conditions"][0];
    (
        c["type"].as_str().unwrap().to_owned(),
        c["reason"].as_str().unwrap().to_owned(),
    )
}

fn parse_time(status: &serde_json::Value, field: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        status[field].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// The audit events answering request `uid`.
fn events_for(server: &TestServer, uid: &str) -> Vec<serde_json::Value> {
    audit_json(server, &[])
        .into_iter()
        .filter(|e| e["request_uid"] == uid)
        .collect()
}

/// The one audit event of request `name`: a refusal with `reason`.
fn the_refusal(server: &TestServer, name: &str, reason: &str) -> serde_json::Value {
    let mut events = events_for(server, &format!("uid-{name}"));
    assert_eq!(events.len(), 1, "{name}: {events:?}");
    let event = events.remove(0);
    assert_eq!(event["kind"], "denied", "{event}");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("Denied {reason}:")),
        "{event}"
    );
    event
}

/// Successful status writes per request name.
fn status_writes(api: &FakeCertificatesApi) -> BTreeMap<String, usize> {
    let mut writes = BTreeMap::new();
    for seen in api.seen() {
        if seen.method == "PUT" && seen.path.ends_with("/status") && seen.status == 200 {
            let name = seen.path.rsplit('/').nth(1).unwrap().to_owned();
            *writes.entry(name).or_default() += 1;
        }
    }
    writes
}

/// How many times the requests have been listed (not watched).
fn lists(api: &FakeCertificatesApi) -> usize {
    api.seen()
        .iter()
        .filter(|s| {
            s.method == "GET"
                && !s.path.contains("watch=true")
                && s.path.contains("podcertificaterequests?")
        })
        .count()
}

#[tokio::test]
async fn every_key_type_the_projection_allows_and_our_profile_allows_is_issued_in_both_styles() {
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let root = server.bundle_pem();
    let cases = [
        ("ECDSAP256", KeyField::Pkix),
        ("ECDSAP256", KeyField::Stub),
        ("ECDSAP384", KeyField::Stub),
        ("ED25519", KeyField::Pkix),
        ("RSA3072", KeyField::Stub),
        ("RSA4096", KeyField::Pkix),
    ];
    let mut names = Vec::new();
    for (i, (key_type, field)) in cases.iter().enumerate() {
        let key = cluster.key(key_type);
        let pod = format!("web-{i}");
        let name = api.create_request("shop", &pod, "web", SIGNER, &key, *field, None);
        names.push((name, key));
    }
    // A request for another signer is not ours to answer.
    let other_key = cluster.key("ECDSAP256");
    let other = api.create_request(
        "shop",
        "x",
        "web",
        "other.example/signer",
        &other_key,
        KeyField::Stub,
        None,
    );

    for ((name, key), (key_type, field)) in names.iter().zip(cases) {
        let status = api.wait_answered("shop", name, Duration::from_secs(20));
        assert_eq!(
            condition(&status),
            ("Issued".into(), "Issued".into()),
            "{key_type} {field:?}: {status}"
        );
        let chain = status["certificateChain"].as_str().unwrap();
        let blocks = ca_server::x509::split_pem(chain);
        assert_eq!(
            blocks.len(),
            1,
            "the leaf alone (no intermediates here, no root)"
        );
        let (_, leaf) = x509_parser::pem::parse_x509_pem(blocks[0].as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.contents).unwrap();
        // The SPIFFE ID of the pod's service account, and the kubelet's key.
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(uris, ["URI(spiffe://cluster.local/ns/shop/sa/web)"]);
        assert_eq!(cert.public_key().raw, key.spki_der.as_slice());
        // Lifetime: maxExpirationSeconds (a day) and --max-ttl (24h) agree; refresh at half.
        let (nb, na) = (
            parse_time(&status, "notBefore"),
            parse_time(&status, "notAfter"),
        );
        assert_eq!(na - nb, time::Duration::hours(24), "{status}");
        let refresh = parse_time(&status, "beginRefreshAt");
        assert_eq!(refresh - nb, time::Duration::hours(12));
        // OpenSSL verifies the chain to the bundle's root for both ends of mTLS.
        let work = cluster.dir.path().join(format!("verify-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        for purpose in ["sslclient", "sslserver"] {
            openssl_verify(&work, &[blocks[0].clone(), root.clone()], purpose)
                .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        }
        // The audit log holds the issuance, with the pod, node and request.
        let uid = format!("uid-{name}");
        let events = events_for(&server, &uid);
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e["kind"], "issued");
        assert_eq!(e["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(e["request"], format!("shop/{name}"));
        assert_eq!(e["node"], "node-1");
        assert!(e["pod_name"].as_str().unwrap().starts_with("web-"));
        assert!(e["pod_uid"].as_str().unwrap().starts_with("pod-uid-web-"));
        assert_eq!(e["serial"], serial_of(&blocks[0]));
        assert!(
            e["token_issuer"]
                .as_str()
                .unwrap()
                .starts_with("PodCertificateRequest https://127.0.0.1:")
        );
    }
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());
    std::thread::sleep(Duration::from_millis(500));
    assert!(api.request("shop", &other)["status"]["conditions"].is_null());
    assert_audit_intact(&server);
}

#[tokio::test]
async fn what_the_profile_or_the_policy_refuses_is_denied_with_its_reason_and_recorded() {
    let cluster = Cluster::new();
    let server = cluster.server(&[
        "--pod-certificate-exclude-namespace",
        "kube-system",
        "--pod-certificate-exclude-service-account",
        "shop/legacy",
        "--max-ttl",
        "8h",
    ]);
    let api = &cluster.api;
    let p256 = cluster.key("ECDSAP256");
    let p521 = cluster.key("ECDSAP521");
    let unsupported = api.create_request("shop", "a", "web", SIGNER, &p521, KeyField::Stub, None);
    let namespace = api.create_request(
        "kube-system",
        "b",
        "coredns",
        SIGNER,
        &p256,
        KeyField::Stub,
        None,
    );
    let account = api.create_request("shop", "c", "legacy", SIGNER, &p256, KeyField::Pkix, None);
    let hour = api.create_request(
        "shop",
        "d",
        "web",
        SIGNER,
        &p256,
        KeyField::Stub,
        Some(3600),
    );
    let long = api.create_request(
        "shop",
        "e",
        "web",
        SIGNER,
        &p256,
        KeyField::Stub,
        Some(7_862_400),
    );

    for (name, ns, reason) in [
        (&unsupported, "shop", "UnsupportedKeyType"),
        (&namespace, "kube-system", "NamespaceExcluded"),
        (&account, "shop", "ServiceAccountExcluded"),
    ] {
        let status = api.wait_answered(ns, name, Duration::from_secs(20));
        assert_eq!(
            condition(&status),
            ("Denied".into(), reason.into()),
            "{status}"
        );
        // Only the condition: nothing else of an issued status.
        assert!(status["certificateChain"].is_null() && status["notAfter"].is_null());
        assert!(
            !status["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        let event = the_refusal(&server, name, reason);
        assert_eq!(event["request"], format!("{ns}/{name}"));
        assert!(event["serial"].is_null());
    }
    // The P-521 refusal names the key types that would do.
    let status = api.request("shop", &unsupported)["status"].clone();
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ECDSAP256")
    );

    // The lifetime is maxExpirationSeconds, or --max-ttl when that is shorter.
    let status = api.wait_answered("shop", &hour, Duration::from_secs(20));
    let life = parse_time(&status, "notAfter") - parse_time(&status, "notBefore");
    assert_eq!(life, time::Duration::hours(1));
    let status = api.wait_answered("shop", &long, Duration::from_secs(20));
    let life = parse_time(&status, "notAfter") - parse_time(&status, "notBefore");
    assert_eq!(life, time::Duration::hours(8));
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());

    // A --max-ttl under the hour a pod certificate needs: Failed, saying why.
    drop(server);
    let cluster2 = Cluster::new();
    let server2 = cluster2.server(&["--max-ttl", "30m", "--default-ttl", "30m"]);
    let key = cluster2.key("ECDSAP256");
    let name = cluster2
        .api
        .create_request("shop", "f", "web", SIGNER, &key, KeyField::Stub, None);
    let status = cluster2
        .api
        .wait_answered("shop", &name, Duration::from_secs(20));
    assert_eq!(
        condition(&status),
        ("Failed".into(), "LifetimeTooShort".into())
    );
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("--max-ttl")
    );
    assert_eq!(events_for(&server2, &format!("uid-{name}")).len(), 1);
}

#[tokio::test]
async fn a_flood_for_one_identity_waits_for_its_budget_and_is_never_denied_for_it() {
    let cluster = Cluster::new();
    let server = cluster.server(&["--identity-rate", "2", "--identity-burst", "2"]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let started = Instant::now();
    let names: Vec<String> = (0..8)
        .map(|i| {
            api.create_request(
                "shop",
                &format!("f{i}"),
                "web",
                SIGNER,
                &key,
                KeyField::Stub,
                None,
            )
        })
        .collect();
    // The ones over budget show as waiting.
    let waiting = "ca_pod_certificate_requests_waiting";
    wait_until(
        Duration::from_secs(5),
        "requests waiting in /metrics",
        || server.metric(waiting).is_some_and(|n| n > 0.0),
    );
    for name in &names {
        let status = api.wait_answered("shop", name, Duration::from_secs(30));
        assert_eq!(condition(&status).0, "Issued", "{status}");
    }
    wait_until(Duration::from_secs(10), "none waiting in /metrics", || {
        server.metric(waiting) == Some(0.0)
    });
    // 2 at once, then 2 a second: the last waited for the budget.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let issued = audit_json(&server, &[])
        .into_iter()
        .filter(|e| {
            e["request_uid"]
                .as_str()
                .is_some_and(|u| u.starts_with("uid-f"))
        })
        .count();
    assert_eq!(
        issued,
        names.len(),
        "one event per request, no refusal recorded for waiting"
    );
}

#[tokio::test]
async fn without_the_rbac_to_answer_the_signer_says_which_and_signs_nothing_more() {
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    api.forbid_status_writes(true);
    let name = api.create_request("shop", "a", "web", SIGNER, &key, KeyField::Stub, None);
    let uid = format!("uid-{name}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server
        .stderr()
        .contains("update podcertificaterequests/status and sign")
    {
        assert!(Instant::now() < deadline, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let events = events_for(&server, &uid);
    assert_eq!(
        events.len(),
        1,
        "one decision, kept while the write is refused: {events:?}"
    );
    // Granted: the same certificate goes in, nothing is signed again.
    api.forbid_status_writes(false);
    let status = api.wait_answered("shop", &name, Duration::from_secs(45));
    let chain = status["certificateChain"].as_str().unwrap();
    assert_eq!(serial_of(chain), events[0]["serial"].as_str().unwrap());
    assert_eq!(events_for(&server, &uid).len(), 1);
}

#[tokio::test]
async fn nothing_is_answered_before_its_audit_record_is_committed() {
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let first = api.create_request("shop", "a", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &first, Duration::from_secs(20));

    // Another writer holds the store's write lock: the audit log cannot commit.
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut other = sqlx::AnyConnection::connect(&server.database_url())
        .await
        .unwrap();
    let lock = if postgres_admin_url().is_some() {
        "BEGIN; LOCK TABLE audit_events, pod_certificate_claims IN EXCLUSIVE MODE"
    } else {
        "BEGIN EXCLUSIVE"
    };
    sqlx::raw_sql(lock).execute(&mut other).await.unwrap();
    let blocked = api.create_request("shop", "b", "web", SIGNER, &key, KeyField::Stub, None);
    // While it is being answered (stuck), others change it: the newer versions wait for
    // that answer instead of starting a second one. And another request joins it.
    std::thread::sleep(Duration::from_secs(1));
    api.touch("shop", &blocked);
    let also = api.create_request("shop", "c", "web", SIGNER, &key, KeyField::Pkix, None);
    std::thread::sleep(Duration::from_secs(1));
    api.touch("shop", &blocked);
    std::thread::sleep(Duration::from_secs(2));
    for name in [&blocked, &also] {
        assert!(
            api.request("shop", name)["status"]["conditions"].is_null(),
            "answered without a record"
        );
        assert!(!status_writes(api).contains_key(name));
    }
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    for name in [&blocked, &also] {
        let status = api.wait_answered("shop", name, Duration::from_secs(30));
        assert_eq!(condition(&status).0, "Issued");
    }
    std::thread::sleep(Duration::from_secs(1));
    let writes = status_writes(api);
    for name in [&blocked, &also] {
        assert_eq!(writes.get(name.as_str()), Some(&1), "{name}: {writes:?}");
        let events = events_for(&server, &format!("uid-{name}"));
        assert_eq!(events.len(), 1, "{name}: {events:?}");
    }
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());
}

#[tokio::test]
async fn a_restart_and_a_relist_after_410_answer_nothing_twice() {
    let cluster = Cluster::new();
    let mut server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let mut names: Vec<String> = (0..5)
        .map(|i| {
            api.create_request(
                "shop",
                &format!("p{i}"),
                "web",
                SIGNER,
                &key,
                KeyField::Stub,
                None,
            )
        })
        .collect();
    for name in &names {
        api.wait_answered("shop", name, Duration::from_secs(20));
    }

    // Down: requests pile up; the history is compacted meanwhile.
    server.kill();
    names.extend((5..8).map(|i| {
        api.create_request(
            "shop",
            &format!("p{i}"),
            "web",
            SIGNER,
            &key,
            KeyField::Pkix,
            None,
        )
    }));
    api.compact();
    server.restart();
    for name in &names {
        api.wait_answered("shop", name, Duration::from_secs(20));
    }

    // The watch's version compacted away under it: 410, a relist, and new requests still
    // answered.
    relist_after_410(api);
    let late = api.create_request("shop", "late", "web", SIGNER, &key, KeyField::Stub, None);
    names.push(late.clone());
    api.wait_answered("shop", &late, Duration::from_secs(20));
    assert!(
        server.stderr().contains("listing again"),
        "{}",
        server.stderr()
    );

    // Each request written once, and issued once in the log.
    std::thread::sleep(Duration::from_secs(1));
    let writes = status_writes(api);
    for name in &names {
        assert_eq!(writes.get(name), Some(&1), "{name}: {writes:?}");
        let events = events_for(&server, &format!("uid-{name}"));
        assert_eq!(events.len(), 1, "{name}: {events:?}");
    }
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());
    assert_audit_intact(&server);
}

#[tokio::test]
async fn a_stale_resource_version_is_retried_and_an_answer_elsewhere_drops_ours() {
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");

    // The request changes under the signer (a label): 409, read again, written again.
    api.interfere_before_next_write("shop", "t", Interference::Touch);
    let touched = api.create_request("shop", "t", "web", SIGNER, &key, KeyField::Stub, None);
    let status = api.wait_answered("shop", &touched, Duration::from_secs(20));
    assert_eq!(condition(&status).0, "Issued");
    let puts: Vec<u16> = api
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains(&touched))
        .map(|s| s.status)
        .collect();
    assert_eq!(puts, [409, 200]);
    assert_eq!(events_for(&server, &format!("uid-{touched}")).len(), 1);

    // Another writer answers first: our certificate is dropped and recorded as never
    // delivered; the other answer stands.
    let live = || {
        let status = server.cli_ok(&["root", "status", "--format", "json"]);
        let authority: serde_json::Value =
            serde_json::from_str(status.lines().next().unwrap()).unwrap();
        (
            authority["live_certificates"].as_i64().unwrap(),
            authority["unexpired_certificates"].as_i64().unwrap(),
        )
    };
    let before = live();
    api.interfere_before_next_write("shop", "r", Interference::Answer);
    let raced = api.create_request("shop", "r", "web", SIGNER, &key, KeyField::Stub, None);
    let status = api.wait_answered("shop", &raced, Duration::from_secs(20));
    assert_eq!(condition(&status), ("Failed".into(), "OtherSigner".into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = events_for(&server, &format!("uid-{raced}"));
        if events.len() == 2 || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(events.len(), 2, "{events:?}");
    // Newest first: the drop, naming the serial the issuance recorded.
    assert_eq!(events[1]["kind"], "issued");
    assert_eq!(events[0]["kind"], "denied");
    assert_eq!(events[0]["code"], "ABORTED");
    assert_eq!(events[0]["serial"], events[1]["serial"]);
    assert!(
        events[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not delivered")
    );
    assert_eq!(status_writes(api).get(&raced), None);
    // A certificate that never left is nobody's: convergence and `root retire` leave it out.
    assert_eq!(live(), before, "the dropped certificate counted as held");
}

#[tokio::test]
async fn two_replicas_watching_answer_each_request_once() {
    let cluster = Cluster::new();
    // Replicas share their keys through the store, sealed under one KEK.
    let kek = cluster.dir.path().join("kek");
    std::fs::write(&kek, "07".repeat(32) + "\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let kek = ["--key-encryption-key-file", kek.to_str().unwrap()];
    let first = cluster.server(&kek);
    let flags = cluster.flags(&kek);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let second = TestServer::start_on(
        &cluster.dir.path().join("data-2"),
        &first.database_url(),
        &flags,
    );
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let names: Vec<String> = (0..30)
        .map(|i| {
            api.create_request(
                "shop",
                &format!("p{i}"),
                &format!("sa{}", i % 3),
                SIGNER,
                &key,
                KeyField::Stub,
                None,
            )
        })
        .collect();
    for name in &names {
        api.wait_answered("shop", name, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    let writes = status_writes(api);
    let log = audit_json(&first, &[]);
    let mut answered_by = BTreeMap::<String, usize>::new();
    for e in log.iter().filter(|e| e["kind"] == "issued") {
        if let Some(uid) = e["request_uid"].as_str() {
            *answered_by.entry(uid.to_owned()).or_default() += 1;
        }
    }
    for name in &names {
        assert_eq!(writes.get(name), Some(&1), "{name}: {writes:?}");
        assert_eq!(answered_by.get(&format!("uid-{name}")), Some(&1), "{name}");
    }
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());
    // Both watched (each listed and opened a watch).
    assert!(first.stderr().contains("Signing PodCertificateRequests"));
    assert!(second.stderr().contains("Signing PodCertificateRequests"));
    // One chain, both replicas' checkpoints in it.
    let second_key = second.data_dir.with_extension("audit-key.pub");
    std::fs::write(&second_key, second.cli_ok(&["audit", "key"])).unwrap();
    first.cli_ok(&[
        "audit",
        "verify",
        "--trusted-audit-key",
        second_key.to_str().unwrap(),
    ]);
}

#[tokio::test]
async fn the_cluster_trust_bundle_follows_a_rotation_and_is_written_only_when_it_changes() {
    let cluster = Cluster::new();
    let server = cluster.server(&["--publish-cluster-trust-bundle"]);
    let api = &cluster.api;
    let name = "example.com:spiffe:ca-server";
    let roots_in = |want: usize| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(b) = api.cluster_trust_bundles().get(name) {
                let pem = b["spec"]["trustBundle"].as_str().unwrap().to_owned();
                if pem.matches("BEGIN CERTIFICATE").count() == want {
                    assert_eq!(b["spec"]["signerName"], SIGNER);
                    assert_eq!(
                        b["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                        "ca-server"
                    );
                    return pem;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no bundle of {want} roots: {:?}",
                api.cluster_trust_bundles()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let one = roots_in(1);
    assert_eq!(one.trim(), server.bundle_pem().trim());

    // Prepared: both roots, so pods trust the new one before anything is signed by it.
    server.cli_ok(&["root", "prepare"]);
    let two = roots_in(2);
    assert!(two.contains(one.trim()));
    server.activate("2");
    // The activation does not change the roots: no write.
    let writes = || {
        api.seen()
            .iter()
            .filter(|s| {
                s.path.contains("clustertrustbundles")
                    && matches!(s.method.as_str(), "PUT" | "POST")
            })
            .count()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = writes();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(writes(), before, "written again with nothing changed");
    // Retired: only the new root.
    server.cli_ok(&["root", "retire", "1", "--force"]);
    let last = roots_in(1);
    assert!(!last.contains(one.trim()));
    assert_eq!(last.trim(), server.bundle_pem().trim());
}

#[tokio::test]
async fn where_only_v1_is_served_the_requests_are_listed_watched_and_answered_in_v1() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster {
        api: FakeCertificatesApi::start_serving(dir.path(), "v1"),
        issuer: TestIssuer::new(dir.path()),
        dir,
    };
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let listed = api.create_request("shop", "early", "web", SIGNER, &key, KeyField::Stub, None);
    let status = api.wait_answered("shop", &listed, Duration::from_secs(20));
    assert_eq!(condition(&status).0, "Issued", "{status}");
    // One arriving on the watch, too.
    let watched = api.create_request("shop", "late", "web", SIGNER, &key, KeyField::Pkix, None);
    let status = api.wait_answered("shop", &watched, Duration::from_secs(20));
    assert_eq!(condition(&status).0, "Issued", "{status}");
    // And after a relist (410).
    relist_after_410(api);
    let relisted = api.create_request("shop", "later", "web", SIGNER, &key, KeyField::Stub, None);
    let status = api.wait_answered("shop", &relisted, Duration::from_secs(20));
    assert_eq!(condition(&status).0, "Issued", "{status}");

    // v1beta1 was tried once, found missing, and never asked again.
    let seen = api.seen();
    let calls: Vec<&str> = seen
        .iter()
        .filter(|s| s.path.contains("podcertificaterequests"))
        .map(|s| s.path.as_str())
        .collect();
    assert!(calls[0].contains("/v1beta1/"), "{calls:?}");
    assert!(
        calls[1..]
            .iter()
            .all(|p| p.contains("/certificates.k8s.io/v1/")),
        "{calls:?}"
    );
    assert!(calls.iter().any(|p| p.contains("watch=true")), "{calls:?}");
    let v1_lists = calls
        .iter()
        .filter(|p| p.contains("/v1/podcertificaterequests?") && !p.contains("watch=true"))
        .count();
    assert!(v1_lists >= 2, "no relist after 410: {calls:?}");
    assert_eq!(status_writes(api).len(), 3);
    assert!(
        server
            .stderr()
            .contains("PodCertificateRequests are served in this version"),
        "{}",
        server.stderr()
    );
}

#[tokio::test]
async fn keys_that_are_not_keys_are_denied_and_recorded() {
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let b64 = |bytes: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let fields = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str())))
            .collect::<serde_json::Map<_, _>>()
    };
    // A stub request whose signature does not match its key: one byte of it flipped.
    let key = cluster.key("ECDSAP256");
    let mut forged = key.stub_der.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    let cases = [
        (
            "not-base64",
            fields(&[("pkixPublicKey", "%%% not base64 %%%".into())]),
        ),
        (
            "noise",
            fields(&[("stubPKCS10Request", b64(&[0x30, 0x82, 0xff, 0xff, 1, 2, 3]))]),
        ),
        ("forged", fields(&[("stubPKCS10Request", b64(&forged))])),
        ("no-key", fields(&[])),
        // A CSR where a bare key belongs, and a key where a CSR belongs.
        ("swapped", fields(&[("pkixPublicKey", b64(&key.stub_der))])),
        (
            "swapped-stub",
            fields(&[("stubPKCS10Request", b64(&key.spki_der))]),
        ),
    ];
    let names: Vec<String> = cases
        .iter()
        .map(|(pod, fields)| {
            api.create_request_with_key_fields("shop", pod, "web", SIGNER, fields.clone(), None)
        })
        .collect();
    // A good one after them: the bad ones cost nothing but their own answers.
    let good = api.create_request("shop", "good", "web", SIGNER, &key, KeyField::Stub, None);
    for (name, (pod, _)) in names.iter().zip(&cases) {
        let status = api.wait_answered("shop", name, Duration::from_secs(20));
        assert_eq!(
            condition(&status),
            ("Denied".into(), "InvalidKey".into()),
            "{pod}: {status}"
        );
        assert!(status["certificateChain"].is_null(), "{pod}: {status}");
        let event = the_refusal(&server, name, "InvalidKey");
        // Nothing of a key that is not one is recorded as if it were.
        assert!(event["public_key_sha256"].is_null(), "{pod}: {event}");
    }
    let status = api.wait_answered("shop", &good, Duration::from_secs(20));
    assert_eq!(condition(&status).0, "Issued", "{status}");
    assert!(api.rejected().is_empty(), "{:?}", api.rejected());
    let answers = |condition: &str| {
        server.metric(&format!(
            "ca_pod_certificate_answers_total{{condition=\"{condition}\"}}"
        ))
    };
    assert_eq!(answers("Denied"), Some(cases.len() as f64));
    assert_eq!(answers("Issued"), Some(1.0));
    assert_eq!(answers("Failed"), Some(0.0));
    assert_audit_intact(&server);
}

/// Compacts the history under the open watch and ends it: the signer's next watch is
/// 410 Gone, and it lists again (waited for).
fn relist_after_410(api: &FakeCertificatesApi) {
    let before = lists(api);
    api.compact();
    api.end_watches();
    wait_until(Duration::from_secs(10), "a relist after 410", || {
        lists(api) != before
    });
}

/// Ends the open watch so that the next one, once the signer has opened it, does `trouble`.
fn reopen_watch_with(api: &FakeCertificatesApi, trouble: WatchTrouble) {
    let opened = api.watches_opened();
    api.trouble_next_watch(trouble);
    api.end_watches();
    wait_until(Duration::from_secs(10), "the watch reopened", || {
        api.watches_opened() != opened
    });
}

#[tokio::test]
async fn a_watch_that_floods_or_goes_silent_is_dropped_and_the_signer_keeps_answering() {
    let cluster = Cluster::new();
    // Watches of 8 s, so one silent for 10 s is given up: longer than the signer's own 5 s
    // recheck timer, which must not keep a dead watch alive.
    let server = cluster.server(&["--pod-certificate-watch-timeout", "8s"]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let first = api.create_request("shop", "first", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &first, Duration::from_secs(20));

    // A line that never ends: cut at the 4 MiB cap, listed again, answered meanwhile.
    let lists_before = lists(api);
    reopen_watch_with(api, WatchTrouble::EndlessLine);
    let flooded = api.create_request("shop", "flooded", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &flooded, Duration::from_secs(20));
    assert!(
        server
            .stderr()
            .contains("a watch event longer than 4194304 bytes"),
        "{}",
        server.stderr()
    );
    assert!(
        lists(api) > lists_before,
        "no relist after the endless line"
    );
    // The reader hung up near the cap: what got into the socket is the cap and the kernel's
    // buffers, not the 64 MiB offered.
    let sent = api.endless_bytes_sent();
    assert!(
        sent < 16 << 20,
        "{sent} bytes of one line read before hanging up"
    );
    let rss = server.peak_rss_kib();
    assert!(
        rss < 128 << 10,
        "peak RSS {rss} KiB after an endless watch line"
    );

    // Objects of the wrong shape are skipped; a line nested too deep ends that watch (listed
    // again), and nothing of either is answered or recorded.
    let lists_before = lists(api);
    let events_before = audit_json(&server, &[]).len();
    reopen_watch_with(api, WatchTrouble::Garbage);
    let after_garbage =
        api.create_request("shop", "garbage", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &after_garbage, Duration::from_secs(20));
    assert!(lists(api) > lists_before, "no relist after the nested line");
    let log = server.stderr();
    assert!(log.contains("is not a PodCertificateRequest"), "{log}");
    assert!(log.contains("recursion limit"), "{log}");
    assert_eq!(audit_json(&server, &[]).len(), events_before + 1);

    // A watch that sends nothing at all, not even its end: given up a quarter past its
    // timeout, and watched again from where it was (no relist).
    reopen_watch_with(api, WatchTrouble::Silent);
    let lists_before = lists(api);
    let silenced = Instant::now();
    let late = api.create_request("shop", "late", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &late, Duration::from_secs(30));
    let took = silenced.elapsed();
    assert!(
        took >= Duration::from_secs(8),
        "answered after {took:?}: the silent watch was not the one open"
    );
    assert!(
        server.stderr().contains("watch went silent"),
        "{}",
        server.stderr()
    );
    assert_eq!(
        lists(api),
        lists_before,
        "a silent watch is watched again, not relisted"
    );
    let restarts = |cause: &str| {
        server
            .metric(&format!(
                "ca_pod_certificate_watch_restarts_total{{cause=\"{cause}\"}}"
            ))
            .unwrap_or_default()
    };
    assert_eq!(restarts("stalled"), 1.0);
    assert!(restarts("failed") >= 1.0, "the endless line");
    assert!(restarts("ended") >= 2.0, "the watches ended by the fake");

    std::thread::sleep(Duration::from_secs(1));
    let writes = status_writes(api);
    for name in [&first, &flooded, &after_garbage, &late] {
        assert_eq!(writes.get(name.as_str()), Some(&1), "{name}: {writes:?}");
        assert_eq!(events_for(&server, &format!("uid-{name}")).len(), 1);
    }
    assert_audit_intact(&server);
}

#[test]
fn a_signer_name_must_be_one_of_our_own() {
    let dir = tempfile::tempdir().unwrap();
    let signer = |name| vec!["--pod-certificate-signer", name];
    let cases: [(Vec<&str>, &str); 7] = [
        (signer("spiffe"), "expected DOMAIN/NAME"),
        (signer("kubernetes.io/kube-apiserver-client"), "reserved"),
        (signer("Example.com/x"), "lowercase DNS name"),
        (signer("example.com/"), "letters, digits"),
        (
            vec!["--publish-cluster-trust-bundle"],
            "need --pod-certificate-signer",
        ),
        (
            vec!["--pod-certificate-watch-timeout", "1m"],
            "need --pod-certificate-signer",
        ),
        (
            [
                signer("example.com/spiffe"),
                vec!["--pod-certificate-watch-timeout", "0s"],
            ]
            .concat(),
            "--pod-certificate-watch-timeout must be at least 1s",
        ),
    ];
    for (extra, says) in cases {
        let mut args = vec![
            "run",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--dev",
            "--kube-api-url",
            "https://127.0.0.1:1",
        ];
        args.extend_from_slice(&extra);
        let out = ca_server(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}

/// Not a test: `bench/pod-certificates.sh` runs it (release build) and it prints figures. A
/// storm of new pods, each a request created at once: how long until every one is answered,
/// and the server's CPU per answer.
#[tokio::test]
#[ignore = "a benchmark: bench/pod-certificates.sh"]
async fn pod_certificate_storm_figures() {
    let storm: usize = std::env::var("STORM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let cluster = Cluster::new();
    let server = cluster.server(&[]);
    let api = &cluster.api;
    let key = cluster.key("ECDSAP256");
    let warm = api.create_request("shop", "warm", "web", SIGNER, &key, KeyField::Stub, None);
    api.wait_answered("shop", &warm, Duration::from_secs(20));
    let cpu_before = server.cpu_seconds();
    let start = Instant::now();
    // Pods of 50 deployments (identities), one key (the fake does not care; the signer
    // checks each request's afresh).
    let names: Vec<String> = (0..storm)
        .map(|i| {
            let account = format!("svc-{}", i % 50);
            let pod = format!("{account}-{i}");
            api.create_request("shop", &pod, &account, SIGNER, &key, KeyField::Stub, None)
        })
        .collect();
    for name in &names {
        let status = api.wait_answered("shop", name, Duration::from_secs(300));
        assert_eq!(condition(&status).0, "Issued", "{status}");
    }
    let took = start.elapsed();
    let cpu = server.cpu_seconds() - cpu_before;
    let events = audit_json(&server, &["--kind", "issued"]);
    let mut uids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["request_uid"].as_str())
        .collect();
    let issued = uids.len();
    uids.sort_unstable();
    uids.dedup();
    assert_eq!(uids.len(), issued, "a request issued twice");
    assert_eq!(issued, storm + 1, "every answer in the audit log");
    println!(
        "pod certificate storm: {storm} requests, all answered in {:.2} s ({:.0}/s); server CPU \
         {:.0} us per answer; peak RSS {:.1} MiB; {issued} issued events",
        took.as_secs_f64(),
        storm as f64 / took.as_secs_f64(),
        cpu * 1e6 / storm as f64,
        server.peak_rss_kib() as f64 / 1024.0,
    );
}
