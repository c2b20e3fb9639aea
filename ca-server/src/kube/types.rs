//! The Kubernetes objects this server reads and writes, as far as it reads them: the fields
//! of `core/v1` and `authentication.k8s.io/v1` it uses, with their API names. Unknown fields
//! are ignored; a missing optional field is its default, as the API documents it.

use std::collections::HashMap;

use serde::Deserialize;

/// `metadata` of any object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ObjectMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
}

/// `metadata` of a list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ListMeta {
    /// `metadata.continue`: the token of the next page, empty on the last.
    #[serde(rename = "continue")]
    pub continue_token: String,
}

/// A `Pod`, as far as the node check reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its spec.
    pub spec: PodSpec,
    /// Its status.
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    /// The service account it runs as (empty: `default`, which admission fills in).
    pub service_account_name: String,
    /// The node it is scheduled on (empty: not scheduled yet).
    pub node_name: String,
}

/// `Pod.status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
}

/// A page of `PodList`. `items` must be there: an answer without it is not a list.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodList {
    /// Its metadata (the next page's token).
    #[serde(default)]
    pub metadata: ListMeta,
    /// The pods.
    pub items: Vec<Pod>,
}

/// A `Namespace`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Namespace {
    /// Its metadata.
    pub metadata: ObjectMeta,
    /// Its status.
    pub status: NamespaceStatus,
}

/// `Namespace.status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NamespaceStatus {
    /// `Active` or `Terminating`.
    pub phase: String,
}

/// A `NamespaceList`. `items` must be there: an answer without it is not a list.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamespaceList {
    /// The namespaces.
    pub items: Vec<Namespace>,
}

/// A `TokenReview` as the API server answers it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TokenReview {
    /// What it found.
    pub status: Option<TokenReviewStatus>,
}

/// `TokenReview.status`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TokenReviewStatus {
    /// Whether the token is valid.
    pub authenticated: bool,
    /// Who it belongs to.
    pub user: Option<UserInfo>,
    /// The audiences the token was checked against and is valid for.
    pub audiences: Vec<String>,
    /// Why not, when it is not.
    pub error: String,
}

/// `TokenReview.status.user`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UserInfo {
    /// `system:serviceaccount:<namespace>:<name>` for a service account.
    pub username: String,
    /// Extra attributes, e.g. the pod a token is bound to.
    pub extra: HashMap<String, Vec<String>>,
}

/// `metadata` of an object this server writes back: what [`ObjectMeta`] reads, and the
/// `resourceVersion` a write must name to be refused when someone else wrote first.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VersionedMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
}

/// A `PodCertificateRequest` (`certificates.k8s.io/v1beta1`): a kubelet asking a signer for
/// a certificate for one of its pods' keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PodCertificateRequest {
    /// Its metadata.
    pub metadata: VersionedMeta,
    /// What is asked (immutable).
    pub spec: PodCertificateRequestSpec,
    /// The signer's answer, once there is one.
    pub status: PodCertificateRequestStatus,
}

/// `PodCertificateRequest.spec`. The API server set every field but the key and the
/// lifetime itself, from the pod, and checked that they agree.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodCertificateRequestSpec {
    /// The signer asked.
    pub signer_name: String,
    /// The pod.
    pub pod_name: String,
    /// Its uid.
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    /// The service account it runs as.
    pub service_account_name: String,
    /// That account's uid.
    #[serde(rename = "serviceAccountUID")]
    pub service_account_uid: String,
    /// The node it runs on.
    pub node_name: String,
    /// That node's uid.
    #[serde(rename = "nodeUID")]
    pub node_uid: String,
    /// The longest lifetime the certificate may have (the API server defaults it to 86400).
    pub max_expiration_seconds: Option<i64>,
    /// The key, a DER SubjectPublicKeyInfo, base64 (1.35; deprecated in 1.36).
    pub pkix_public_key: Option<String>,
    /// A DER PKCS#10 request with nothing in it but the key, base64 (1.36 on).
    #[serde(rename = "stubPKCS10Request")]
    pub stub_pkcs10_request: Option<String>,
}

/// `PodCertificateRequest.status`, as far as this server reads it: whether it is answered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodCertificateRequestStatus {
    /// `Issued`, `Denied` or `Failed` (status `True`) once answered.
    pub conditions: Vec<Condition>,
    /// The chain issued (PEM, leaf first), once issued.
    pub certificate_chain: String,
}

impl PodCertificateRequest {
    /// Whether some signer has answered it: once it has, its status never changes again.
    pub fn answered(&self) -> bool {
        self.status.conditions.iter().any(|c| {
            c.status == "True" && matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed")
        })
    }
}

/// A `metav1.Condition`, as far as it is read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Condition {
    /// Its type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Why, CamelCase.
    pub reason: String,
}

/// A page of a list of `T`, with the resourceVersion a watch continues from.
#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    /// Its metadata.
    #[serde(default)]
    pub metadata: VersionedListMeta,
    /// The objects.
    pub items: Vec<T>,
}

/// `metadata` of a list a watch continues from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VersionedListMeta {
    /// The version of the whole list (of its first page, when paged).
    pub resource_version: String,
    /// The next page's token, empty on the last.
    #[serde(rename = "continue")]
    pub continue_token: String,
}

/// One line of a watch: what happened, and to which object (or, for `ERROR`, a `Status`).
#[derive(Debug, Clone, Deserialize)]
pub struct WatchEvent {
    /// `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The object as it is now (kept as JSON: a status write sends it back whole).
    pub object: serde_json::Value,
}

/// A `Status` (an error's body, or a watch's `ERROR` event).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The HTTP code it stands for (410 for a resourceVersion too old to watch from).
    pub code: u16,
    /// `Expired`, `Gone`, `Conflict`, `Invalid`, ...
    pub reason: String,
    /// In words.
    pub message: String,
}

/// A `ClusterTrustBundle` (`certificates.k8s.io/v1beta1`), as far as it is read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ClusterTrustBundle {
    /// Its metadata.
    pub metadata: VersionedMeta,
    /// What it holds.
    pub spec: ClusterTrustBundleSpec,
}

/// `ClusterTrustBundle.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClusterTrustBundleSpec {
    /// The signer whose trust it carries.
    pub signer_name: String,
    /// PEM CA certificates.
    pub trust_bundle: String,
}
