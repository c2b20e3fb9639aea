//! Ambient mode: a node proxy (Istio's ztunnel) runs once per node and asks for the
//! identities of the pods on its node, naming each in the request's `ImpersonatedIdentity`.
//! Only configured node accounts may do that, and only for identities that really run on the
//! caller's node: the Kubernetes API says which pods are scheduled there.
//!
//! The caller's node comes from its token (the `kubernetes.io` claim's `node`, or the
//! TokenReview's `node-name` extra); older clusters put no node in tokens, and then the
//! caller's own pod is looked up. A node's pods are listed with a field selector on
//! `spec.nodeName`, indexed by service account, and kept for [`POD_LIST_FRESH`]; a lookup that
//! finds nothing lists again if the list is older than [`MISS_REFETCH_AFTER`], so a pod
//! scheduled a moment ago is found, and a flood of misses costs at most one list a second per
//! node. Concurrent lookups on one node share one list.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Identity;
use super::IssuerId;
use crate::kube::{KubeApi, KubeClient};
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// How long a node's pod list answers lookups before the API is asked again.
pub const POD_LIST_FRESH: Duration = Duration::from_secs(5);

/// A lookup that finds nothing lists the node again if its list is at least this old.
pub const MISS_REFETCH_AFTER: Duration = Duration::from_secs(1);

/// How many nodes' pod lists (and callers' nodes) are remembered.
const MAX_ENTRIES: usize = 10_000;

/// Pods per page of a list.
const PAGE_SIZE: usize = 500;

/// A service account whose callers may ask for other identities: `NS/SA`
/// (`--trusted-node-account`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub service_account: String,
}

impl FromStr for NodeAccount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not NS/SA (e.g. istio-system/ztunnel)");
        let (namespace, service_account) = text.split_once('/').ok_or_else(bad)?;
        let valid = |s: &str| is_dns_name(s) && !s.contains('.');
        if !valid(namespace) || !is_dns_name(service_account) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for NodeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Why a caller may not have the identity it asked for. Each message names both identities.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationError {
    /// The caller is not a trusted node account.
    #[error(
        "caller {caller} asked for identity {requested} through ImpersonatedIdentity; only \
         trusted node accounts may do that (--trusted-node-account NS/SA)"
    )]
    NotTrusted {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
    },
    /// `ImpersonatedIdentity` is not a SPIFFE ID.
    #[error(
        "ImpersonatedIdentity {requested:?} (from caller {caller}) is not a SPIFFE ID: it {reason}"
    )]
    NotSpiffeId {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
        /// What is wrong with it.
        reason: SpiffeIdError,
    },
    /// The identity is in another trust domain.
    #[error(
        "caller {caller} asked for identity {requested}, which is in trust domain {theirs}; \
         this CA issues only for trust domain {ours}"
    )]
    OtherTrustDomain {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
        /// Its trust domain.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The identity is not `/ns/<ns>/sa/<sa>`.
    #[error(
        "caller {caller} asked for identity {requested}, which is not a service-account \
         identity (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
    )]
    NotServiceAccount {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
    },
    /// Without the Kubernetes API, nothing can say where the identity runs.
    #[error(
        "caller {caller} asked for identity {requested}, but this server has no Kubernetes API \
         access to check that a pod with that identity runs on the caller's node: give it the \
         API (in a pod it is found by itself; elsewhere --kube-api-url), or accept any identity \
         from trusted node accounts with --allow-impersonation-without-node-check"
    )]
    NoNodeCheck {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
    },
    /// The caller's node is not known.
    #[error("caller {caller} asked for identity {requested}, but its node is unknown: {detail}")]
    CallerNode {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
        /// Why the node could not be found.
        detail: String,
    },
    /// No pod with the identity is scheduled on the caller's node.
    #[error(
        "caller {caller} on node {node} asked for identity {requested}, but no running pod \
         with service account {namespace}/{service_account} is scheduled on node {node}; a \
         node proxy may ask only for the identities of pods on its own node"
    )]
    NotOnNode {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
        /// The caller's node.
        node: String,
        /// The identity's namespace.
        namespace: String,
        /// The identity's service account.
        service_account: String,
    },
    /// The caller's token comes from a cluster whose API this server cannot ask, so nothing
    /// can say which pods run on the caller's node there.
    #[error(
        "caller {caller} asked for identity {requested}, but its token comes from cluster \
         {cluster}, whose Kubernetes API this server cannot ask which pods run on the \
         caller's node; give that cluster's [[token_issuers]] entry kube_api_url, \
         kube_token_file and kube_ca_file"
    )]
    ClusterUnreachable {
        /// The caller's own identity.
        caller: String,
        /// What it asked for.
        requested: String,
        /// The caller's cluster: its `cluster_id` and issuer.
        cluster: String,
    },
    /// The Kubernetes API could not answer.
    #[error("the node check for {requested} could not reach the Kubernetes API: {detail}")]
    Api {
        /// What was asked for.
        requested: String,
        /// What went wrong.
        detail: String,
    },
}

impl crate::class::Classify for ImpersonationError {
    /// Forbidden, but for a malformed `ImpersonatedIdentity` (the caller's error) and an API
    /// that could not answer (retry later).
    fn class(&self) -> crate::class::Class {
        use crate::class::Class;
        match self {
            Self::Api { .. } => Class::Unavailable,
            Self::NotSpiffeId { .. } => Class::Caller,
            _ => Class::Forbidden,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Api { .. } => "kube_api_unavailable",
            Self::NoNodeCheck { .. } | Self::CallerNode { .. } | Self::NotOnNode { .. } => {
                "impersonation_node"
            }
            _ => "impersonation",
        }
    }
}

/// How requests for another identity are decided.
pub struct ImpersonationPolicy {
    trust_domain: TrustDomain,
    trusted: Vec<NodeAccount>,
    /// How the node is checked, by the issuer of the caller's token: each cluster's callers
    /// against that cluster's own API. An issuer not here is a cluster nobody can ask.
    clusters: HashMap<IssuerId, ClusterCheck>,
}

/// How the callers of one cluster are checked.
pub struct ClusterCheck {
    /// The cluster, for messages: its `cluster_id` and issuer.
    pub cluster: String,
    /// The check.
    pub check: NodeCheck,
}

/// How the identity's node is checked.
#[derive(Clone)]
pub enum NodeCheck {
    /// Through the cluster's Kubernetes API.
    Api(Arc<NodeAuthorizer>),
    /// Not at all (`--allow-impersonation-without-node-check`, without the API).
    Skipped,
    /// It cannot be: impersonation is refused.
    Unavailable,
    /// The cluster's API is not configured: impersonation is refused, naming the cluster.
    Unreachable,
}

impl ImpersonationPolicy {
    /// A policy letting `trusted` accounts ask for identities in `trust_domain`, checked
    /// for the callers of each issuer as `clusters` says.
    pub fn new(
        trust_domain: TrustDomain,
        trusted: Vec<NodeAccount>,
        clusters: HashMap<IssuerId, ClusterCheck>,
    ) -> Self {
        Self {
            trust_domain,
            trusted,
            clusters,
        }
    }

    /// Nobody may ask for another identity.
    pub fn nobody(trust_domain: TrustDomain) -> Self {
        Self::new(trust_domain, Vec::new(), HashMap::new())
    }

    /// Decides whether `caller` may have `requested` (not its own identity). On success, the
    /// identity to issue: `requested`, with the caller's issuer and node, and the first pod
    /// the node check found running it.
    pub async fn authorize(
        &self,
        caller: &Identity,
        requested: &str,
    ) -> Result<Identity, ImpersonationError> {
        let caller_id = caller.spiffe_id.to_string();
        // The claim as messages show it; `requested` itself is what is parsed.
        let shown = crate::untrusted::claim(requested);
        let trusted = self.trusted.iter().any(|a| {
            a.namespace == caller.namespace && a.service_account == caller.service_account
        });
        if !trusted {
            return Err(ImpersonationError::NotTrusted {
                caller: caller_id,
                requested: shown.clone(),
            });
        }
        let asked =
            SpiffeId::parse(requested).map_err(|reason| ImpersonationError::NotSpiffeId {
                caller: caller_id.clone(),
                requested: shown.clone(),
                reason,
            })?;
        if *asked.trust_domain() != self.trust_domain {
            return Err(ImpersonationError::OtherTrustDomain {
                caller: caller_id,
                requested: shown.clone(),
                theirs: asked.trust_domain().to_string(),
                ours: self.trust_domain.to_string(),
            });
        }
        let Some((namespace, service_account)) = asked.service_account() else {
            return Err(ImpersonationError::NotServiceAccount {
                caller: caller_id,
                requested: shown.clone(),
            });
        };
        let mut granted = Identity {
            spiffe_id: asked.clone(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: None,
            pod_uid: None,
            node: caller.node.clone(),
            issuer: caller.issuer.clone(),
        };
        let unreachable = |cluster: &str| ImpersonationError::ClusterUnreachable {
            caller: caller_id.clone(),
            requested: shown.clone(),
            cluster: cluster.to_owned(),
        };
        let Some(cluster) = self.clusters.get(&caller.issuer) else {
            return Err(unreachable(&caller.issuer.to_string()));
        };
        let authorizer = match &cluster.check {
            NodeCheck::Api(authorizer) => authorizer,
            NodeCheck::Skipped => return Ok(granted),
            NodeCheck::Unreachable => return Err(unreachable(&cluster.cluster)),
            NodeCheck::Unavailable => {
                return Err(ImpersonationError::NoNodeCheck {
                    caller: caller_id,
                    requested: shown.clone(),
                });
            }
        };
        let api = |detail: String| ImpersonationError::Api {
            requested: shown.clone(),
            detail,
        };
        let node = match authorizer
            .node_of(caller)
            .await
            .map_err(|e| api(e.to_string()))?
        {
            CallerNode::Known(node) => node,
            CallerNode::Unknown(detail) => {
                return Err(ImpersonationError::CallerNode {
                    caller: caller_id,
                    requested: shown.clone(),
                    detail,
                });
            }
        };
        let found = authorizer
            .pod_on_node(&node, namespace, service_account)
            .await
            .map_err(|e| api(e.to_string()))?;
        let Some(pod) = found else {
            return Err(ImpersonationError::NotOnNode {
                caller: caller_id,
                requested: shown.clone(),
                node,
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            });
        };
        granted.pod_name = Some(pod.name);
        granted.pod_uid = Some(pod.uid);
        granted.node = Some(node);
        Ok(granted)
    }
}

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
fn must_list(age: Option<Duration>, found: bool) -> bool {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pod object, if it is scheduled and not finished.
fn running(pod: &crate::kube::types::Pod) -> Option<Pod> {
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
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> serde_json::Value {
        json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}")},
            "spec": {"serviceAccountName": sa, "nodeName": node},
            "status": {"phase": phase},
        })
    }

    #[test]
    fn node_accounts_read_as_ns_slash_sa() {
        let a: NodeAccount = "istio-system/ztunnel".parse().unwrap();
        assert_eq!(
            (a.namespace.as_str(), a.service_account.as_str()),
            ("istio-system", "ztunnel")
        );
        assert_eq!(a.to_string(), "istio-system/ztunnel");
        for bad in [
            "ztunnel",
            "/ztunnel",
            "istio-system/",
            "a/b/c",
            "A/b",
            "a.b/c",
        ] {
            let err = bad.parse::<NodeAccount>().unwrap_err();
            assert!(err.contains("NS/SA"), "{bad}: {err}");
        }
    }

    #[test]
    fn finished_and_unscheduled_pods_do_not_count() {
        let list = json!({
            "kind": "PodList",
            "metadata": {"continue": "next-page"},
            "items": [
                pod("shop", "web-1", "web", "node-a", "Running"),
                pod("shop", "web-2", "web", "node-a", "Pending"),
                pod("shop", "job-1", "web", "node-a", "Succeeded"),
                pod("shop", "job-2", "web", "node-a", "Failed"),
                {"metadata": {"namespace": "shop", "name": "new", "uid": "u"},
                 "spec": {"serviceAccountName": "web"}, "status": {"phase": "Pending"}},
                {"metadata": {"namespace": "shop", "name": "plain", "uid": "u2"},
                 "spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}},
            ],
        });
        let list: crate::kube::types::PodList = serde_json::from_value(list).unwrap();
        let pods: Vec<Pod> = list.items.iter().filter_map(running).collect();
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web-1", "web-2", "plain"]);
        assert_eq!(pods[2].service_account, "default");
        assert_eq!(list.metadata.continue_token, "next-page");
        assert!(
            serde_json::from_value::<crate::kube::types::PodList>(json!({"kind": "Status"}))
                .is_err()
        );
    }

    #[test]
    fn when_a_node_is_listed_again() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Nothing listed yet, or a list past its freshness: always.
        assert!(must_list(None, false));
        assert!(must_list(Some(POD_LIST_FRESH), true));
        // A fresh list that has the identity answers.
        assert!(!must_list(Some(s(4)), true));
        // A miss lists again, but not more than once a second.
        assert!(!must_list(Some(ms(200)), false));
        assert!(must_list(Some(MISS_REFETCH_AFTER), false));
    }

    #[test]
    fn names_are_checked_before_they_reach_a_url() {
        assert!(is_dns_name("ip-10-0-0-1.ec2.internal"));
        for bad in ["", "Node", "a b", "a/b", "a&b", "a%3Db", &"a".repeat(254)] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    fn caller(node: Option<&str>) -> Identity {
        Identity {
            spiffe_id: SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
                .unwrap(),
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: Some("ztunnel-abc".into()),
            pod_uid: Some("uid-z".into()),
            node: node.map(str::to_owned),
            issuer: IssuerId::jwt("https://kubernetes.default.svc"),
        }
    }

    fn policy(check: NodeCheck) -> ImpersonationPolicy {
        let clusters = HashMap::from([(
            caller(None).issuer,
            ClusterCheck {
                cluster: "local".into(),
                check,
            },
        )]);
        ImpersonationPolicy::new(
            TrustDomain::new("cluster.local").unwrap(),
            vec!["istio-system/ztunnel".parse().unwrap()],
            clusters,
        )
    }

    #[tokio::test]
    async fn what_is_refused_before_any_node_check() {
        let p = policy(NodeCheck::Skipped);
        let c = caller(Some("node-a"));
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let granted = p.authorize(&c, web).await.unwrap();
        assert_eq!(granted.spiffe_id.to_string(), web);
        assert_eq!(
            (granted.namespace.as_str(), granted.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(granted.node.as_deref(), Some("node-a"));
        assert_eq!(granted.issuer, c.issuer);

        let mut other = c.clone();
        other.service_account = "default".into();
        other.spiffe_id =
            SpiffeId::parse("spiffe://cluster.local/ns/istio-system/sa/default").unwrap();
        let err = p.authorize(&other, web).await.unwrap_err();
        assert!(
            matches!(err, ImpersonationError::NotTrusted { .. }),
            "{err}"
        );

        let err = p.authorize(&c, "https://shop/web").await.unwrap_err();
        assert_eq!(
            crate::class::Classify::class(&err),
            crate::class::Class::Caller,
            "{err}"
        );
        let err = p
            .authorize(&c, "spiffe://other.mesh/ns/shop/sa/web")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("trust domain other.mesh") && text.contains("cluster.local"),
            "{text}"
        );
        let err = p
            .authorize(&c, "spiffe://cluster.local/workload/web")
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImpersonationError::NotServiceAccount { .. }),
            "{err}"
        );

        let err = policy(NodeCheck::Unavailable)
            .authorize(&c, web)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("--allow-impersonation-without-node-check"),
            "{err}"
        );
        let err = ImpersonationPolicy::nobody(TrustDomain::new("cluster.local").unwrap())
            .authorize(&c, web)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImpersonationError::NotTrusted { .. }),
            "{err}"
        );

        // A trusted account of another cluster, whose API nobody configured, is refused,
        // naming that cluster, even where the local cluster is not checked at all.
        let mut remote = c.clone();
        remote.issuer = IssuerId::jwt("https://oidc.east.example");
        let err = p.authorize(&remote, web).await.unwrap_err();
        assert!(
            matches!(err, ImpersonationError::ClusterUnreachable { .. })
                && err
                    .to_string()
                    .contains("cluster https://oidc.east.example"),
            "{err}"
        );

        // An issuer is a kind and a name, not a text: a JWT issuer whose `iss` reads like a
        // TokenReview's name does not get that cluster's check.
        let review = IssuerId::TokenReview("https://api.local".into());
        let reviewed = HashMap::from([(
            review.clone(),
            ClusterCheck {
                cluster: "local".into(),
                check: NodeCheck::Skipped,
            },
        )]);
        let p = ImpersonationPolicy::new(
            TrustDomain::new("cluster.local").unwrap(),
            vec!["istio-system/ztunnel".parse().unwrap()],
            reviewed,
        );
        let mut lookalike = c.clone();
        lookalike.issuer = IssuerId::jwt(review.to_string());
        assert_eq!(lookalike.issuer.to_string(), review.to_string());
        let err = p.authorize(&lookalike, web).await.unwrap_err();
        assert!(
            matches!(err, ImpersonationError::ClusterUnreachable { .. }),
            "{err}"
        );
        let mut by_review = c.clone();
        by_review.issuer = review;
        assert!(p.authorize(&by_review, web).await.is_ok());

        // A huge claimed identity is cut before it reaches any message.
        let huge = format!("spiffe://cluster.local/ns/shop/sa/{}", "w".repeat(4096));
        let err = policy(NodeCheck::Unavailable)
            .authorize(&other, &huge)
            .await
            .unwrap_err();
        assert!(err.to_string().len() < 600, "{}", err.to_string().len());
    }
}
