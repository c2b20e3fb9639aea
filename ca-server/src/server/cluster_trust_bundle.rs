//! `--publish-cluster-trust-bundle`: the bundle's roots in a ClusterTrustBundle for the
//! signer (`certificates.k8s.io/v1beta1`), named `<signer with / as :>:ca-server`, created
//! and brought up to date on start, on every bundle change and every minute (someone may
//! have edited it), written only when it differs. Pods mount it with a `clusterTrustBundle`
//! projection by signer name and label, so a root rotation reaches them with no agent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::issuance::Active;
use crate::kube::{Error as KubeError, KubeClient};

/// The label every bundle this server writes carries, for `labelSelector`s.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ca-server");

/// How often the object is checked even when the bundle did not change.
pub const RESYNC: Duration = Duration::from_secs(60);

/// The object's name for `signer`: the API server requires the signer name with `/` turned
/// into `:`, then `:` and a name of one's own.
pub fn object_name(signer: &str) -> String {
    format!("{}:ca-server", signer.replace('/', ":"))
}

/// The PEM the bundle holds: each root once, in the bundle's order, each block ending in a
/// newline.
pub fn trust_bundle_pem(roots_pem: &[String]) -> String {
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for pem in roots_pem {
        let block = pem.trim();
        if seen.insert(block.to_owned()) {
            out.push_str(block);
            out.push('\n');
        }
    }
    out
}

/// Publishes until shutdown. Any replica may run it: writes name the resourceVersion read,
/// and a conflict is retried on the next round.
pub async fn publish(
    client: KubeClient,
    signer: String,
    mut active: watch::Receiver<Arc<Active>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = object_name(&signer);
    loop {
        let (pem, sequence) = {
            let current = active.borrow_and_update();
            (
                trust_bundle_pem(&current.bundle.roots_pem),
                current.bundle.sequence,
            )
        };
        match put(&client, &name, &signer, &pem).await {
            Ok(true) => {
                info!(cluster_trust_bundle = %name, bundle_sequence = sequence, "Published the trust bundle as a ClusterTrustBundle")
            }
            Ok(false) => {}
            Err(e) => {
                warn!(cluster_trust_bundle = %name, error = %e, "Publishing the ClusterTrustBundle failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESYNC) => {}
            changed = active.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Creates or updates the object to hold `pem`; true if it wrote.
async fn put(client: &KubeClient, name: &str, signer: &str, pem: &str) -> Result<bool, KubeError> {
    match client.cluster_trust_bundle(name).await? {
        None => {
            let object = serde_json::json!({
                "apiVersion": "certificates.k8s.io/v1beta1",
                "kind": "ClusterTrustBundle",
                "metadata": {
                    "name": name,
                    "labels": { MANAGED_BY.0: MANAGED_BY.1 },
                },
                "spec": { "signerName": signer, "trustBundle": pem },
            });
            client.create_cluster_trust_bundle(&object).await?;
            Ok(true)
        }
        Some((existing, _)) if existing.spec.trust_bundle == pem => Ok(false),
        Some((_, mut object)) => {
            // As read, resourceVersion included: a concurrent writer makes this a conflict.
            object["spec"]["trustBundle"] = serde_json::Value::from(pem);
            object["spec"]["signerName"] = serde_json::Value::from(signer);
            object["metadata"]["labels"][MANAGED_BY.0] = serde_json::Value::from(MANAGED_BY.1);
            client.replace_cluster_trust_bundle(name, &object).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_starts_with_the_signer_and_roots_appear_once() {
        assert_eq!(
            object_name("example.com/svid"),
            "example.com:svid:ca-server"
        );
        let a = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".to_owned();
        let b = "-----BEGIN CERTIFICATE-----\nBB==\n-----END CERTIFICATE-----".to_owned();
        let pem = trust_bundle_pem(&[a.clone(), b, a]);
        assert_eq!(pem.matches("BEGIN").count(), 2);
        assert!(pem.ends_with("-----END CERTIFICATE-----\n"));
    }
}
