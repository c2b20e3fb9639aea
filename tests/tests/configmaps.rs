//! `--publish-configmap`: the trust bundle in a ConfigMap of every namespace, kept current
//! through a rotation and written into namespaces created later.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ca_tests::kube::{ApiRequest, FakeKubeApi};
use ca_tests::*;
use serde_json::{Value, json};

/// The part of the API the publisher uses: namespaces, and ConfigMaps with resourceVersion
/// checks, held in memory.
#[derive(Default)]
struct Cluster {
    namespaces: Vec<String>,
    configmaps: HashMap<(String, String), Value>,
    version: u64,
}

fn answer(cluster: &Mutex<Cluster>, request: &ApiRequest) -> (u16, Value) {
    let mut c = cluster.lock().unwrap();
    let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces"]) => {
            let items: Vec<Value> = c
                .namespaces
                .iter()
                .map(|n| json!({"metadata": {"name": n}, "status": {"phase": "Active"}}))
                .collect();
            (200, json!({"kind": "NamespaceList", "items": items}))
        }
        ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match c.configmaps.get(&(ns.to_string(), name.to_string())) {
                Some(cm) => (200, cm.clone()),
                None => (404, json!({"kind": "Status", "reason": "NotFound"})),
            }
        }
        ("POST", ["api", "v1", "namespaces", ns, "configmaps"]) => {
            let name = request.body["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned();
            let key = (ns.to_string(), name);
            if c.configmaps.contains_key(&key) {
                return (409, json!({"kind": "Status", "reason": "AlreadyExists"}));
            }
            c.version += 1;
            let mut cm = request.body.clone();
            cm["metadata"]["resourceVersion"] = json!(c.version.to_string());
            c.configmaps.insert(key, cm.clone());
            (201, cm)
        }
        ("PUT", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let key = (ns.to_string(), name.to_string());
            let stored = c.configmaps.get(&key).cloned();
            match stored {
                Some(old)
                    if old["metadata"]["resourceVersion"]
                        == request.body["metadata"]["resourceVersion"] =>
                {
                    c.version += 1;
                    let mut cm = request.body.clone();
                    cm["metadata"]["resourceVersion"] = json!(c.version.to_string());
                    c.configmaps.insert(key, cm.clone());
                    (200, cm)
                }
                Some(_) => (409, json!({"kind": "Status", "reason": "Conflict"})),
                None => (404, json!({"kind": "Status", "reason": "NotFound"})),
            }
        }
        _ => (404, json!({"kind": "Status", "reason": "NotFound"})),
    }
}

/// The published PEM in every namespace, if each has one.
fn published(cluster: &Mutex<Cluster>) -> Option<Vec<String>> {
    let c = cluster.lock().unwrap();
    c.namespaces
        .iter()
        .map(|ns| {
            c.configmaps
                .get(&(ns.clone(), "istio-ca-root-cert".to_owned()))
                .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned))
        })
        .collect()
}

async fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "waited {secs} s for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_bundle_is_published_into_every_namespace_and_kept_current() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let cluster = Arc::new(Mutex::new(Cluster {
        namespaces: vec!["default".into(), "shop".into()],
        ..Cluster::default()
    }));
    let handler_cluster = Arc::clone(&cluster);
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(move |request| answer(&handler_cluster, request)),
    );
    let mut flags = issuer.flags();
    flags.extend(api.api_flags());
    flags.extend(["--publish-configmap".into(), "istio-ca-root-cert".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);

    let bundle = server.bundle_pem();
    wait_until(5, "the ConfigMaps", || {
        published(&cluster).is_some_and(|all| all.iter().all(|pem| *pem == bundle))
    })
    .await;
    let first = api.requests();
    assert!(first.iter().all(|r| r.authorization.as_deref()
        == Some(format!("Bearer {}", FakeKubeApi::CA_TOKEN).as_str())));
    {
        let c = cluster.lock().unwrap();
        let cm = &c.configmaps[&("shop".to_owned(), "istio-ca-root-cert".to_owned())];
        assert_eq!(
            cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "ca-server"
        );
    }

    // A second root joins the bundle: every namespace gets both roots.
    server.cli_ok(&["root", "prepare"]);
    wait_until(5, "the bundle file to carry two roots", || {
        server.bundle_pem().matches("BEGIN CERTIFICATE").count() == 2
    })
    .await;
    let two_roots = server.bundle_pem();
    wait_until(5, "the ConfigMaps to carry both roots", || {
        published(&cluster).is_some_and(|all| all.iter().all(|pem| *pem == two_roots))
    })
    .await;

    // A namespace created later gets the ConfigMap within a resync.
    cluster.lock().unwrap().namespaces.push("late".into());
    wait_until(15, "the new namespace's ConfigMap", || {
        published(&cluster).is_some_and(|all| all.iter().all(|pem| *pem == two_roots))
    })
    .await;

    // In steady state only the namespace list is read: nothing is rewritten.
    let before = api.requests().len();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after = api.requests();
    assert!(
        after[before..]
            .iter()
            .all(|r| r.method == "GET" && r.path == "/api/v1/namespaces"),
        "{:?}",
        &after[before..]
    );
}
