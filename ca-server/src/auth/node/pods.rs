//! The node check's view of the Kubernetes API: which pods run on a node (listed, cached,
//! listed again on a miss) and which node a caller's pod runs on.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::Identity;
use crate::kube::{KubeApi, KubeClient};

/// How long a node's pod list answers lookups before the API is asked again.
pub const POD_LIST_FRESH: Duration = Duration::from_secs(5);

/// A lookup that finds nothing lists the node again if its list is at least this old.
pub const MISS_REFETCH_AFTER: Duration = Duration::from_secs(1);

/// How many nodes' pod lists (and callers' nodes) are remembered.
pub(super) const MAX_ENTRIES: usize = 10_000;

/// Pods per page of a list.
pub(super) const PAGE_SIZE: usize = 500;

/// A pod, as far as the node check cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: String,
}

/// A node's pods by (namespace, service account), the first by name of each, and when they
/// were listed.
struct NodePods {
    listed: Instant,
    by_account: HashMap<(String, String), Pod>,
}

impl NodePods {
    /// The pod of `key` in `pods`, if a list was made and has one.
    fn find<'a>(pods: &'a Option<Self>, key: &(String, String)) -> Option<&'a Pod> {
        pods.as_ref()?.by_account.get(key)
    }
}

/// Whether a lookup can be answered from a list of `age` (none yet: `None`) that does or does
/// not hold the identity.
pub(super) fn must_list(age: Option<Duration>, found: bool) -> bool {
    match age {
        None => true,
        Some(age) if age >= POD_LIST_FRESH => true,
        Some(age) => !found && age >= MISS_REFETCH_AFTER,
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<NodePods>>>;

/// Where a caller runs, as far as its token and the API tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerNode {
    /// On this node.
    Known(String),
    /// Nobody can say; why.
    Unknown(String),
}

/// Answers "which pods run on this node" and "which node does this pod run on" through the
/// Kubernetes API.
pub struct NodeAuthorizer {
    api: KubeClient,
    nodes: Mutex<HashMap<String, Slot>>,
    /// Pod uid → node: a pod never moves, so the answer holds for the pod's life.
    callers: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for NodeAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeAuthorizer")
            .field("api", &self.api.url())
            .finish()
    }
}

impl NodeAuthorizer {
    /// An authorizer asking `api`.
    pub fn new(api: KubeApi) -> Result<Self, crate::kube::Error> {
        Ok(Self {
            api: KubeClient::new(api)?,
            nodes: Mutex::new(HashMap::new()),
            callers: Mutex::new(HashMap::new()),
        })
    }

    /// The API server's URL.
    pub fn api_url(&self) -> &str {
        self.api.url()
    }

    /// The node `caller` runs on: from its token, or else from its pod. An error is the API
    /// failing to answer.
    pub async fn node_of(&self, caller: &Identity) -> Result<CallerNode, crate::kube::Error> {
        if let Some(node) = &caller.node {
            return Ok(if is_dns_name(node) {
                CallerNode::Known(node.clone())
            } else {
                CallerNode::Unknown(format!("its token names node {node:?}, not a node name"))
            });
        }
        let (Some(name), Some(uid)) = (&caller.pod_name, &caller.pod_uid) else {
            return Ok(CallerNode::Unknown(
                "its token names neither a node nor a pod: give the node proxy a projected, \
                 pod-bound service-account token"
                    .to_owned(),
            ));
        };
        if let Some(node) = lock(&self.callers).get(uid) {
            return Ok(CallerNode::Known(node.clone()));
        }
        let Some(pod) = self.get_pod(&caller.namespace, name).await? else {
            return Ok(CallerNode::Unknown(format!(
                "its pod {}/{name} is not running (not found, finished, or not scheduled)",
                caller.namespace
            )));
        };
        if pod.uid != *uid || pod.service_account != caller.service_account {
            return Ok(CallerNode::Unknown(format!(
                "its pod {}/{name} is now another pod (uid {}, service account {}) than its \
                 token was issued for",
                caller.namespace, pod.uid, pod.service_account
            )));
        }
        let mut callers = lock(&self.callers);
        if callers.len() >= MAX_ENTRIES {
            callers.clear();
        }
        callers.insert(uid.clone(), pod.node.clone());
        Ok(CallerNode::Known(pod.node))
    }

    /// A running pod of `namespace`/`service_account` scheduled on `node` (the first by
    /// name), if there is one.
    pub async fn pod_on_node(
        &self,
        node: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Option<Pod>, crate::kube::Error> {
        let slot = self.slot(node);
        let mut pods = slot.lock().await;
        let key = (namespace.to_owned(), service_account.to_owned());
        let age = pods.as_ref().map(|p| p.listed.elapsed());
        if must_list(age, NodePods::find(&pods, &key).is_some()) {
            let listed = Instant::now();
            let mut by_account: HashMap<(String, String), Pod> = HashMap::new();
            for pod in self.list_node(node).await? {
                let key = (pod.namespace.clone(), pod.service_account.clone());
                if by_account.get(&key).is_none_or(|kept| pod.name < kept.name) {
                    by_account.insert(key, pod);
                }
            }
            *pods = Some(NodePods { listed, by_account });
        }
        Ok(NodePods::find(&pods, &key).cloned())
    }

    /// The slot for `node`'s list, made if need be.
    fn slot(&self, node: &str) -> Slot {
        let mut nodes = lock(&self.nodes);
        if let Some(slot) = nodes.get(node) {
            return Arc::clone(slot);
        }
        if nodes.len() >= MAX_ENTRIES {
            // Keep the slots in use; the others are at worst listed again.
            nodes.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        Arc::clone(nodes.entry(node.to_owned()).or_default())
    }

    /// Every running pod scheduled on `node`, page by page.
    async fn list_node(&self, node: &str) -> Result<Vec<Pod>, crate::kube::Error> {
        if !is_dns_name(node) {
            // Not a node any pod could be on (and not safe in a field selector).
            return Ok(Vec::new());
        }
        let mut pods = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .api
                .pods_on_node(node, PAGE_SIZE, next.as_deref())
                .await?;
            // The API filtered by node; a pod elsewhere would be a broken API, never a grant.
            pods.extend(
                page.items
                    .iter()
                    .filter_map(running)
                    .filter(|p| p.node == node),
            );
            match page.metadata.continue_token {
                token if token.is_empty() => return Ok(pods),
                token => next = Some(token),
            }
        }
    }

    /// The pod `namespace`/`name`, if it exists and is running on a node.
    async fn get_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Pod>, crate::kube::Error> {
        if !is_dns_name(namespace) || !is_dns_name(name) {
            return Ok(None);
        }
        Ok(self
            .api
            .pod(namespace, name)
            .await?
            .as_ref()
            .and_then(running))
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pod object, if it is scheduled and not finished.
pub(super) fn running(pod: &crate::kube::types::Pod) -> Option<Pod> {
    let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    if matches!(pod.status.phase.as_str(), "Failed" | "Succeeded") {
        return None;
    }
    Some(Pod {
        namespace: text(&pod.metadata.namespace)?,
        name: text(&pod.metadata.name)?,
        uid: text(&pod.metadata.uid)?,
        // The API server fills it in on admission; an object without it runs as `default`.
        service_account: text(&pod.spec.service_account_name)
            .unwrap_or_else(|| "default".to_owned()),
        node: text(&pod.spec.node_name)?,
    })
}

/// A Kubernetes object name (DNS-1123 subdomain): safe in a URL path or field selector.
pub(super) fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}
