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
use crate::kube::{Error as KubeError, KubeClient};

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

/// Why publishing failed, namespace by namespace.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    /// The namespaces could not be listed.
    #[error("listing namespaces: {0}")]
    Namespaces(#[source] KubeError),
    /// Some namespaces' ConfigMaps could not be written.
    #[error("{}", .0.iter().map(|(ns, e)| format!("{ns}: {e}")).collect::<Vec<_>>().join("; "))]
    Namespaced(Vec<(String, KubeError)>),
}

/// Brings every namespace's ConfigMap to `pem`; returns how many were written.
async fn sync(
    client: &KubeClient,
    name: &str,
    pem: &str,
    sequence: i64,
    published: &mut HashMap<String, i64>,
) -> Result<usize, SyncError> {
    let namespaces: Vec<String> = client
        .namespaces()
        .await
        .map_err(SyncError::Namespaces)?
        .items
        .into_iter()
        .filter(|ns| ns.status.phase != "Terminating" && !ns.metadata.name.is_empty())
        .map(|ns| ns.metadata.name)
        .collect();
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
            Err(e) => failed.push((ns, e)),
        }
    }
    if failed.is_empty() {
        Ok(written)
    } else {
        Err(SyncError::Namespaced(failed))
    }
}

/// Creates or updates ConfigMap `name` in `ns` to hold `pem`; leaves it alone if it does.
async fn put_configmap(
    client: &KubeClient,
    ns: &str,
    name: &str,
    pem: &str,
) -> Result<(), KubeError> {
    match client.config_map(ns, name).await? {
        None => {
            let object = serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": { "app.kubernetes.io/managed-by": "ca-server" },
                },
                "data": { ROOT_CERT_KEY: pem },
            });
            client.create_config_map(ns, &object).await
        }
        Some(existing) if existing["data"][ROOT_CERT_KEY] == pem => Ok(()),
        Some(mut existing) => {
            // The object as read, resourceVersion included: a concurrent writer makes this
            // a conflict, retried on the next round, rather than a lost update.
            existing["data"][ROOT_CERT_KEY] = serde_json::Value::from(pem);
            client.replace_config_map(ns, name, &existing).await
        }
    }
}
