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
