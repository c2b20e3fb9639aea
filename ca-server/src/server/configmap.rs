//! `--publish-configmap NAME`: the trust bundle, as PEM under `root-cert.pem`, in a ConfigMap
//! of that name in every namespace, as istiod publishes `istio-ca-root-cert`; Istio's sidecar
//! injector mounts the proxies' root from there. Written on start, on every bundle change,
//! and into new namespaces as they appear.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::issuance::Active;
use crate::kube::KubeClient;

/// The key the PEM bundle is published under (Istio's).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// How often new namespaces are looked for.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Publishes until shutdown. Any replica may run it: the writes are idempotent.
pub async fn publish_configmaps(
    client: KubeClient,
    name: String,
    mut active: watch::Receiver<Arc<Active>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Namespace → the bundle sequence last published there.
    let mut published: HashMap<String, i64> = HashMap::new();
    loop {
        let (pem, sequence) = {
            let current = active.borrow_and_update();
            (current.bundle.to_pem(), current.bundle.sequence)
        };
        match sync(&client, &name, &pem, sequence, &mut published).await {
            Ok(0) => {}
            Ok(n) => info!(
                configmap = %name,
                namespaces = n,
                bundle_sequence = sequence,
                "Published the trust bundle"
            ),
            Err(e) => {
                warn!(configmap = %name, error = %e, "Publishing the trust bundle failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESYNC) => {}
            changed = active.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Brings every namespace's ConfigMap to `pem`; returns how many were written.
async fn sync(
    client: &KubeClient,
    name: &str,
    pem: &str,
    sequence: i64,
    published: &mut HashMap<String, i64>,
) -> Result<usize, String> {
    let namespaces = list_namespaces(client).await?;
    published.retain(|ns, _| namespaces.contains(ns));
    let mut written = 0;
    let mut failed = Vec::new();
    for ns in namespaces {
        if published.get(&ns) == Some(&sequence) {
            continue;
        }
        match put_configmap(client, &ns, name, pem).await {
            Ok(()) => {
                published.insert(ns, sequence);
                written += 1;
            }
            Err(e) => failed.push(format!("{ns}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(written)
    } else {
        Err(failed.join("; "))
    }
}

/// The namespaces that are not being deleted.
async fn list_namespaces(client: &KubeClient) -> Result<Vec<String>, String> {
    let answer = client
        .call(http::Method::GET, "/api/v1/namespaces", None)
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status.is_success() {
        return Err(format!(
            "listing namespaces: HTTP {}{}",
            answer.status,
            forbidden_hint(answer.status, "list namespaces")
        ));
    }
    let list: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("listing namespaces: not JSON: {e}"))?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ns| ns["status"]["phase"] != "Terminating")
        .filter_map(|ns| ns["metadata"]["name"].as_str().map(str::to_owned))
        .collect())
}

/// Creates or updates ConfigMap `name` in `ns` to hold `pem`; leaves it alone if it does.
async fn put_configmap(client: &KubeClient, ns: &str, name: &str, pem: &str) -> Result<(), String> {
    let path = format!("/api/v1/namespaces/{ns}/configmaps/{name}");
    let current = client
        .call(http::Method::GET, &path, None)
        .await
        .map_err(|e| e.to_string())?;
    let (method, path, body) = match current.status {
        http::StatusCode::NOT_FOUND => {
            let body = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": { "app.kubernetes.io/managed-by": "ca-server" },
                },
                "data": { ROOT_CERT_KEY: pem },
            });
            (
                http::Method::POST,
                format!("/api/v1/namespaces/{ns}/configmaps"),
                body,
            )
        }
        status if status.is_success() => {
            let mut existing: serde_json::Value = serde_json::from_slice(&current.body)
                .map_err(|e| format!("reading the ConfigMap: not JSON: {e}"))?;
            if existing["data"][ROOT_CERT_KEY] == pem {
                return Ok(());
            }
            // The object as read, resourceVersion included: a concurrent writer makes this
            // a conflict, retried on the next round, rather than a lost update.
            existing["data"][ROOT_CERT_KEY] = serde_json::Value::from(pem);
            (http::Method::PUT, path, existing)
        }
        status => {
            return Err(format!(
                "reading the ConfigMap: HTTP {status}{}",
                forbidden_hint(status, "get configmaps")
            ));
        }
    };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let written = client
        .call(method, &path, Some(body))
        .await
        .map_err(|e| e.to_string())?;
    if written.status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "writing the ConfigMap: HTTP {}{}",
            written.status,
            forbidden_hint(written.status, "create and update configmaps")
        ))
    }
}

fn forbidden_hint(status: http::StatusCode, what: &str) -> String {
    if status == http::StatusCode::FORBIDDEN {
        format!(" (this server's service account may not {what}: see deploy/kubernetes/rbac.yaml)")
    } else {
        String::new()
    }
}
