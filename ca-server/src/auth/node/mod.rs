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
use std::sync::Arc;

mod pods;

use pods::is_dns_name;
pub use pods::{CallerNode, MISS_REFETCH_AFTER, NodeAuthorizer, POD_LIST_FRESH, Pod};

use super::Identity;
use super::IssuerId;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

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
        let granted = Identity {
            spiffe_id: asked.clone(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: None,
            pod_uid: None,
            node: caller.node.clone(),
            issuer: caller.issuer.clone(),
        };
        self.check_node(caller, granted, &shown).await
    }

    /// The node check of `granted` (the identity asked for, checked for form and trust
    /// domain): as the caller's cluster says, a running pod with that identity on the
    /// caller's node.
    async fn check_node(
        &self,
        caller: &Identity,
        mut granted: Identity,
        shown: &str,
    ) -> Result<Identity, ImpersonationError> {
        let caller_id = caller.spiffe_id.to_string();
        let unreachable = |cluster: &str| ImpersonationError::ClusterUnreachable {
            caller: caller_id.clone(),
            requested: shown.to_owned(),
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
                    requested: shown.to_owned(),
                });
            }
        };
        let api = |e: crate::kube::Error| ImpersonationError::Api {
            requested: shown.to_owned(),
            detail: e.to_string(),
        };
        let node = match authorizer.node_of(caller).await.map_err(api)? {
            CallerNode::Known(node) => node,
            CallerNode::Unknown(detail) => {
                return Err(ImpersonationError::CallerNode {
                    caller: caller_id,
                    requested: shown.to_owned(),
                    detail,
                });
            }
        };
        let found = authorizer
            .pod_on_node(&node, &granted.namespace, &granted.service_account)
            .await
            .map_err(api)?;
        let Some(pod) = found else {
            return Err(ImpersonationError::NotOnNode {
                caller: caller_id,
                requested: shown.to_owned(),
                node,
                namespace: granted.namespace,
                service_account: granted.service_account,
            });
        };
        granted.pod_name = Some(pod.name);
        granted.pod_uid = Some(pod.uid);
        granted.node = Some(node);
        Ok(granted)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::pods::{must_list, running};
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
