//! Istio ambient mode: ztunnel, the node proxy, asks for the identities of the pods on its node
//! with its own token and `ImpersonatedIdentity`. A trusted node account gets them only for pods
//! the Kubernetes API shows on the caller's node; everyone else, and every other case, is
//! refused with a reason naming both identities. Against a local HTTPS server speaking the
//! pods API, with a client that talks as ztunnel does.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::time::{Duration, Instant};

use ca_tests::kube::{FakeKubeApi, FakePods, pod, review_authenticated};
use ca_tests::ztunnel::{Ztunnel, ZtunnelRequest, ztunnel_accepts, ztunnel_csr, ztunnel_token};
use ca_tests::*;
use tonic::Code;
use x509_parser::prelude::FromDer;

const ZTUNNEL_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// A cluster of two nodes: ztunnel and shop/web-1 on node-a, a finished shop/batch job there
/// too, shop/web-2 and shop/db-1 on node-b.
fn cluster() -> FakePods {
    let pods = FakePods::default();
    for (ns, name, sa, node, phase) in [
        (
            "istio-system",
            "ztunnel-abc",
            "ztunnel",
            "node-a",
            "Running",
        ),
        ("shop", "web-1", "web", "node-a", "Running"),
        ("shop", "batch-1", "batch", "node-a", "Succeeded"),
        ("shop", "web-2", "web", "node-b", "Running"),
        ("shop", "db-1", "db", "node-b", "Running"),
    ] {
        pods.add(pod(ns, name, &format!("uid-{name}"), sa, node, phase));
    }
    pods
}

/// A server trusting a test issuer, with the fake API serving [`cluster`] for the node check,
/// ztunnel's account trusted, and a ztunnel-like client connected.
struct Ambient {
    dir: tempfile::TempDir,
    issuer: TestIssuer,
    pods: FakePods,
    api: FakeKubeApi,
    server: TestServer,
    ztunnel: Ztunnel,
}

impl Ambient {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TestIssuer::new(dir.path());
        let pods = cluster();
        let api = FakeKubeApi::start(dir.path(), pods.handler());
        let mut flags = issuer.flags();
        flags.extend(api.api_flags());
        flags.extend([
            "--trusted-node-account".into(),
            "istio-system/ztunnel".into(),
        ]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = TestServer::start(&dir.path().join("data"), &flags);
        let ztunnel = Ztunnel::connect(&server).await;
        Self {
            dir,
            issuer,
            pods,
            api,
            server,
            ztunnel,
        }
    }
}

fn ask<'a>(token: &'a str, identity: &'a str) -> ZtunnelRequest<'a> {
    ZtunnelRequest {
        token,
        identity,
        impersonate: true,
    }
}

/// The pod-list requests made (first pages only: one per list).
fn lists(api: &FakeKubeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p.starts_with("/api/v1/pods?") && !p.contains("continue="))
        .collect()
}

fn refused(result: Result<Vec<String>, tonic::Status>, code: Code, parts: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{}", status.message());
    for part in parts {
        assert!(
            status.message().contains(part),
            "{:?} lacks {part:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn a_trusted_ztunnel_gets_the_identities_of_pods_on_its_node_and_nothing_else() {
    let Ambient {
        dir,
        issuer,
        pods,
        api,
        server,
        mut ztunnel,
    } = Ambient::start().await;
    let token = ztunnel_token(&issuer, Some("node-a"));
    let web = spiffe("shop", "web");

    // The CSR is ztunnel's: empty subject, one critical URI SAN.
    let (csr_pem, _) = ztunnel_csr(&web);
    let csr_der = der_of_csr(&csr_pem);
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der).unwrap();
    assert!(
        csr.certification_request_info
            .subject
            .iter()
            .next()
            .is_none()
    );
    let san_critical = csr
        .certification_request_info
        .attributes()
        .iter()
        .filter_map(|a| match a.parsed_attribute() {
            x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => {
                Some(&r.extensions)
            }
            _ => None,
        })
        .flatten()
        .any(|e| {
            e.critical
                && matches!(
                    e.parsed_extension(),
                    x509_parser::extensions::ParsedExtension::SubjectAlternativeName(_)
                )
        });
    assert!(san_critical, "the CSR asks for a critical SAN");

    let chain = ztunnel.fetch(&ask(&token, &web)).await.unwrap();
    ztunnel_accepts(&chain, &web).unwrap();
    let negotiated = ztunnel.negotiated.lock().unwrap().clone().unwrap();
    assert_eq!(negotiated.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(negotiated.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(
        matches!(
            negotiated.suite,
            Some(
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                    | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            )
        ),
        "{negotiated:?}"
    );
    // The root ztunnel takes (the last element) is the mesh's, and both verifiers accept the
    // leaf under it for both ends of mTLS.
    assert_eq!(der(chain.last().unwrap()), der(&server.bundle_pem()));
    webpki_verify(&chain, &server.bundle_pem()).unwrap();
    openssl_verify(dir.path(), &chain, "sslclient").unwrap();
    openssl_verify(dir.path(), &chain, "sslserver").unwrap();
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (86_400..=86_400 + 180).contains(&lifetime),
        "ztunnel asked for 24 h, got {lifetime} s"
    );

    // The node's pods were listed by node, with our own credentials, page by page; a second
    // request within the cache's life lists nothing.
    let first_lists = lists(&api);
    assert_eq!(first_lists.len(), 1, "{first_lists:?}");
    assert!(
        first_lists[0].contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{first_lists:?}"
    );
    let requests = api.requests();
    assert!(requests.iter().any(|r| r.path.contains("continue=from-2")));
    assert!(requests.iter().all(|r| r.authorization.as_deref()
        == Some(format!("Bearer {}", FakeKubeApi::CA_TOKEN).as_str())));
    let again = Instant::now();
    let second = ztunnel.fetch(&ask(&token, &web)).await.unwrap();
    ztunnel_accepts(&second, &web).unwrap();
    if again.elapsed() < Duration::from_secs(4) {
        assert_eq!(lists(&api).len(), 1, "a fresh list answers again");
    }

    // The audit event names the identity issued, the caller, its node and the pod found; it is
    // found under either identity, and by node.
    let serial = serial_of(&chain[0]);
    let events = audit_json(&server, &["--spiffe-id", &web, "--kind", "issued"]);
    let event = events
        .iter()
        .find(|e| e["serial"] == serial.as_str())
        .expect("issued under the pod's identity");
    assert_eq!(event["spiffe_id"], web.as_str(), "{event}");
    assert_eq!(event["caller"], ZTUNNEL_ID, "{event}");
    assert_eq!(event["node"], "node-a", "{event}");
    assert_eq!(event["namespace"], "shop", "{event}");
    assert_eq!(event["service_account"], "web", "{event}");
    assert_eq!(event["pod_name"], "web-1", "{event}");
    assert_eq!(event["pod_uid"], "uid-web-1", "{event}");
    assert_eq!(event["token_issuer"], issuer.iss.as_str(), "{event}");
    // inspect, given the chain, says who asked for it.
    let chain_file = dir.path().join("web-chain.pem");
    std::fs::write(&chain_file, chain.concat()).unwrap();
    let out = server.cli(&["inspect", chain_file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("issued to {web}"))
            && text.contains(&format!("asked for by {ZTUNNEL_ID} on node node-a")),
        "{text}"
    );
    for filter in [["--spiffe-id", ZTUNNEL_ID], ["--node", "node-a"]] {
        let found = audit_json(&server, &[filter[0], filter[1], "--kind", "issued"]);
        assert!(
            found.iter().any(|e| e["serial"] == serial.as_str()),
            "{filter:?} does not find it"
        );
    }

    // A pod on another node, a pod that does not exist, a finished pod: refused, naming both
    // identities and the node.
    for (sa, why) in [
        ("db", "no running pod with service account shop/db"),
        ("ghost", "no running pod with service account shop/ghost"),
        ("batch", "no running pod with service account shop/batch"),
    ] {
        let id = spiffe("shop", sa);
        refused(
            ztunnel.fetch(&ask(&token, &id)).await,
            Code::PermissionDenied,
            &[ZTUNNEL_ID, &id, "node-a", why],
        );
    }
    // Another trust domain, whatever runs where.
    let foreign = "spiffe://other.mesh/ns/shop/sa/web";
    refused(
        ztunnel.fetch(&ask(&token, foreign)).await,
        Code::PermissionDenied,
        &[
            ZTUNNEL_ID,
            foreign,
            "trust domain other.mesh",
            "cluster.local",
        ],
    );
    // Not a SPIFFE ID at all.
    refused(
        ztunnel.fetch(&ask(&token, "shop/web")).await,
        Code::InvalidArgument,
        &["ImpersonatedIdentity", "not a SPIFFE ID"],
    );
    // A workload that is no node proxy, asking for a neighbour on its own node.
    let web_token = issuer.token("shop", "web");
    let batch = spiffe("shop", "batch");
    refused(
        ztunnel.fetch(&ask(&web_token, &batch)).await,
        Code::PermissionDenied,
        &[&web, &batch, "--trusted-node-account"],
    );

    // The refusals are in the audit log under the caller, who proved its identity; what it
    // asked for is kept as its claim (`requested`), never as an identity the CA vouches for.
    let db = spiffe("shop", "db");
    assert!(
        audit_json(&server, &["--spiffe-id", &db, "--kind", "denied"]).is_empty(),
        "a claim is not found as an identity"
    );
    let by_caller = audit_json(&server, &["--spiffe-id", ZTUNNEL_ID, "--kind", "denied"]);
    let event = by_caller
        .iter()
        .find(|e| e["requested"] == db.as_str())
        .expect("the refusal is recorded");
    assert_eq!(event["code"], "PERMISSION_DENIED", "{event}");
    assert_eq!(event["caller"], ZTUNNEL_ID, "{event}");
    assert_eq!(event["node"], "node-a", "{event}");
    assert!(
        event["spiffe_id"].is_null() && event["namespace"].is_null(),
        "{event}"
    );
    // One event at once for each kind of refusal (the node check, the trust domain, the
    // malformed ID); the node check's next two refusals are counted into the first's run.
    for claim in [db.as_str(), foreign, "shop/web"] {
        assert!(
            by_caller.iter().any(|e| e["requested"] == claim),
            "{claim}: {by_caller:?}"
        );
    }

    // A pod scheduled a moment ago is found: a miss lists the node again (at most once a
    // second).
    let api_id = spiffe("shop", "api");
    refused(
        ztunnel.fetch(&ask(&token, &api_id)).await,
        Code::PermissionDenied,
        &["no running pod"],
    );
    pods.add(pod(
        "shop",
        "api-1",
        "uid-api-1",
        "api",
        "node-a",
        "Pending",
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let chain = ztunnel.fetch(&ask(&token, &api_id)).await.unwrap();
    ztunnel_accepts(&chain, &api_id).unwrap();

    // Dedicated mode: ztunnel asks for its own identity, without ImpersonatedIdentity; no node
    // check is needed for that.
    let before = api.requests().len();
    let own = ZtunnelRequest {
        token: &token,
        identity: ZTUNNEL_ID,
        impersonate: false,
    };
    let chain = ztunnel.fetch(&own).await.unwrap();
    ztunnel_accepts(&chain, ZTUNNEL_ID).unwrap();
    assert_eq!(api.requests().len(), before);
    let own_events = audit_json(&server, &["--serial", &serial_of(&chain[0])]);
    assert_eq!(own_events[0]["caller"], serde_json::Value::Null);
    assert_eq!(own_events[0]["node"], "node-a");

    assert_audit_intact(&server);
    let log = server.stderr();
    assert!(!log.contains(&token) && !log.contains(FakeKubeApi::CA_TOKEN));
}

/// The DER of a PEM CSR.
fn der_of_csr(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

#[tokio::test]
async fn without_a_node_in_its_token_the_callers_node_comes_from_its_pod() {
    let Ambient {
        dir: _dir,
        issuer,
        api,
        server,
        mut ztunnel,
        ..
    } = Ambient::start().await;
    // As clusters before Kubernetes 1.30 issue them: the pod, no node.
    let token = ztunnel_token(&issuer, None);
    let web = spiffe("shop", "web");
    let chain = ztunnel.fetch(&ask(&token, &web)).await.unwrap();
    ztunnel_accepts(&chain, &web).unwrap();
    let caller_pod = "/api/v1/namespaces/istio-system/pods/ztunnel-abc";
    let gets = |api: &FakeKubeApi| {
        api.requests()
            .iter()
            .filter(|r| r.path == caller_pod)
            .count()
    };
    assert_eq!(gets(&api), 1);
    let event = &audit_json(&server, &["--serial", &serial_of(&chain[0])])[0];
    assert_eq!(event["node"], "node-a", "{event}");
    // A pod never moves: its node is remembered.
    ztunnel.fetch(&ask(&token, &web)).await.unwrap();
    assert_eq!(gets(&api), 1);
    // From node-a, node-b's pods stay out of reach.
    refused(
        ztunnel.fetch(&ask(&token, &spiffe("shop", "db"))).await,
        Code::PermissionDenied,
        &["node-a", "shop/db"],
    );

    // A token of a pod since replaced by another of the same name (another uid).
    let mut claims = issuer.claims("istio-system", "ztunnel");
    claims["kubernetes.io"]["pod"] = serde_json::json!({"name": "ztunnel-abc", "uid": "uid-gone"});
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("node");
    refused(
        ztunnel.fetch(&ask(&issuer.sign(&claims), &web)).await,
        Code::PermissionDenied,
        &[ZTUNNEL_ID, &web, "node is unknown", "another pod"],
    );
    // A token bound to no pod at all.
    let mut claims = issuer.claims("istio-system", "ztunnel");
    claims.as_object_mut().unwrap().remove("kubernetes.io");
    refused(
        ztunnel.fetch(&ask(&issuer.sign(&claims), &web)).await,
        Code::PermissionDenied,
        &["names neither a node nor a pod"],
    );

    // An API that will not answer makes the request retryable; one that forbids it names the
    // permission to grant.
    let node_token = ztunnel_token(&issuer, Some("node-c"));
    api.set_handler(std::sync::Arc::new(|_| {
        (500, serde_json::json!({"kind": "Status"}))
    }));
    refused(
        ztunnel.fetch(&ask(&node_token, &web)).await,
        Code::Unavailable,
        &["Kubernetes API", "HTTP 500"],
    );
    // An overloaded API is left alone for a while: meanwhile, requests are refused unasked.
    let asked = api.requests().len();
    refused(
        ztunnel.fetch(&ask(&node_token, &web)).await,
        Code::Unavailable,
        &["Kubernetes API", "not called for another"],
    );
    assert_eq!(api.requests().len(), asked, "no call during the backoff");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    api.set_handler(std::sync::Arc::new(|_| {
        (
            403,
            serde_json::json!({"kind": "Status", "reason": "Forbidden"}),
        )
    }));
    refused(
        ztunnel
            .fetch(&ask(&ztunnel_token(&issuer, Some("node-d")), &web))
            .await,
        Code::Unavailable,
        &["list pods", "ClusterRole"],
    );
    // A success whose body is not a pod list (a broken or hostile API) is no answer, and
    // never a grant.
    api.set_handler(std::sync::Arc::new(|_| {
        (
            200,
            serde_json::json!({"kind": "Status", "items": "not a list"}),
        )
    }));
    refused(
        ztunnel
            .fetch(&ask(&ztunnel_token(&issuer, Some("node-e")), &web))
            .await,
        Code::Unavailable,
        &["Kubernetes API", "not the object expected"],
    );
    // An answer past the body cap (4 MiB) is cut off, not read into memory whole.
    api.set_handler(std::sync::Arc::new(|_| {
        (
            200,
            serde_json::json!({"items": [], "padding": "x".repeat(5 << 20)}),
        )
    }));
    refused(
        ztunnel
            .fetch(&ask(&ztunnel_token(&issuer, Some("node-f")), &web))
            .await,
        Code::Unavailable,
        &["Kubernetes API", "length limit exceeded"],
    );
}

#[tokio::test]
async fn a_reviewed_token_names_the_callers_node() {
    let dir = tempfile::tempdir().unwrap();
    // An issuer the CA knows nothing of: only the API server's TokenReview vouches.
    let issuer = TestIssuer::new(dir.path());
    let pods = cluster();
    let answer_pods = pods.clone();
    let api = FakeKubeApi::start(
        dir.path(),
        std::sync::Arc::new(move |request| {
            if request.path.ends_with("/tokenreviews") {
                let mut review = review_authenticated(
                    "istio-system",
                    "ztunnel",
                    "ztunnel-abc",
                    "uid-ztunnel-abc",
                );
                review["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"] =
                    serde_json::json!(["node-b"]);
                return (201, review);
            }
            answer_pods
                .answer(request)
                .unwrap_or((404, serde_json::json!({"kind": "Status"})))
        }),
    );
    let mut flags = api.flags();
    flags.extend([
        "--trusted-node-account".into(),
        "istio-system/ztunnel".into(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let mut ztunnel = Ztunnel::connect(&server).await;
    let token = ztunnel_token(&issuer, None);
    let db = spiffe("shop", "db");
    let chain = ztunnel.fetch(&ask(&token, &db)).await.unwrap();
    ztunnel_accepts(&chain, &db).unwrap();
    let event = &audit_json(&server, &["--serial", &serial_of(&chain[0])])[0];
    assert_eq!(event["node"], "node-b", "{event}");
    assert_eq!(event["pod_name"], "db-1", "{event}");
    assert_eq!(event["caller"], ZTUNNEL_ID, "{event}");
    // The node came from the review: the caller's pod was never looked up.
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.path.contains("/pods/ztunnel-abc"))
    );
}

#[tokio::test]
async fn without_api_access_impersonation_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let config = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "token_issuer = \"{}\"\ntoken_jwks_file = \"{}\"\n\
                 trusted_node_account = [\"istio-system/ztunnel\"]\n{extra}",
                issuer.iss,
                issuer.jwks_path.display()
            ),
        )
        .unwrap();
        path
    };
    // Not in a pod, and no --kube-api-url: no node check is possible.
    let not_in_a_pod = [("KUBERNETES_SERVICE_HOST", "")];
    let strict = config("strict.toml", "");
    let server = TestServer::start_with_env(
        &dir.path().join("strict"),
        &["--config", strict.to_str().unwrap()],
        &not_in_a_pod,
    );
    assert!(
        server
            .stderr()
            .contains("Trusted node accounts are configured but the Kubernetes API is not"),
        "{}",
        server.stderr()
    );
    let mut ztunnel = Ztunnel::connect(&server).await;
    let token = ztunnel_token(&issuer, Some("node-a"));
    let web = spiffe("shop", "web");
    refused(
        ztunnel.fetch(&ask(&token, &web)).await,
        Code::PermissionDenied,
        &[ZTUNNEL_ID, &web, "--allow-impersonation-without-node-check"],
    );
    drop(server);

    let lax = config(
        "lax.toml",
        "allow_impersonation_without_node_check = true\n",
    );
    let server = TestServer::start_with_env(
        &dir.path().join("lax"),
        &["--config", lax.to_str().unwrap()],
        &not_in_a_pod,
    );
    assert!(server.stderr().contains("Impersonation WITHOUT node check"));
    let mut ztunnel = Ztunnel::connect(&server).await;
    let chain = ztunnel.fetch(&ask(&token, &web)).await.unwrap();
    ztunnel_accepts(&chain, &web).unwrap();
    let event = &audit_json(&server, &["--serial", &serial_of(&chain[0])])[0];
    assert_eq!(event["caller"], ZTUNNEL_ID, "{event}");
    assert_eq!(event["node"], "node-a", "{event}");
    assert_eq!(
        event["pod_name"],
        serde_json::Value::Null,
        "no pod was checked"
    );
    // The trust domain and the caller's trust still hold.
    refused(
        ztunnel
            .fetch(&ask(&token, "spiffe://other.mesh/ns/shop/sa/web"))
            .await,
        Code::PermissionDenied,
        &["other.mesh"],
    );
    refused(
        ztunnel
            .fetch(&ask(&issuer.token("shop", "web"), &spiffe("shop", "db")))
            .await,
        Code::PermissionDenied,
        &["--trusted-node-account"],
    );
}

#[test]
fn a_bad_trusted_node_account_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = ca_server(&[
        "run",
        "--dev",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--trusted-node-account",
        "ztunnel",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--trusted-node-account") && stderr.contains("NS/SA"),
        "{stderr}"
    );
}
