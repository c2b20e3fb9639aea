//! The calls this server makes to the Kubernetes API, each with its request and its answer
//! typed (`types`), and the answers that are not one (a status, an RBAC refusal, a body that
//! does not parse) as [`Error`]s that say what to grant or check.

use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::types::{
    ClusterTrustBundle, List, NamespaceList, Pod, PodCertificateRequest, PodList, Status,
    TokenReview,
};
use super::{Answer, Error, KubeClient};

/// Where TokenReviews are created.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// The permission a call needs, named as an RBAC rule would grant it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `create` on `tokenreviews`.
    CreateTokenReviews,
    /// `get` and `list` on `pods`.
    ReadPods,
    /// `list` on `namespaces`.
    ListNamespaces,
    /// `get`, `create` and `update` on `configmaps`.
    WriteConfigMaps,
    /// `list` and `watch` on `podcertificaterequests` (`certificates.k8s.io`).
    WatchPodCertificateRequests,
    /// `update` on `podcertificaterequests/status`, and `sign` on the signer.
    SignPodCertificateRequests,
    /// `get`, `create` and `update` on `clustertrustbundles`, and `attest` on the signer.
    WriteClusterTrustBundles,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CreateTokenReviews => "create tokenreviews",
            Self::ReadPods => "get and list pods",
            Self::ListNamespaces => "list namespaces",
            Self::WriteConfigMaps => "get, create and update configmaps",
            Self::WatchPodCertificateRequests => {
                "list and watch podcertificaterequests (certificates.k8s.io)"
            }
            Self::SignPodCertificateRequests => {
                "update podcertificaterequests/status and sign for the signer (certificates.k8s.io signers)"
            }
            Self::WriteClusterTrustBundles => {
                "get, create and update clustertrustbundles and attest for the signer (certificates.k8s.io signers)"
            }
        })
    }
}

impl KubeClient {
    /// Asks whether `token` is valid for one of `audiences` (`POST tokenreviews`).
    pub async fn token_review(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<TokenReview, Error> {
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": { "token": token, "audiences": audiences },
            }))
            .map_err(|e| self.decode_error(TOKEN_REVIEW_PATH, &e))?,
        );
        let answer = self
            .call(http::Method::POST, TOKEN_REVIEW_PATH, Some(body.to_vec()))
            .await?;
        self.parse(TOKEN_REVIEW_PATH, answer, Permission::CreateTokenReviews)
    }

    /// One page of the pods scheduled on `node` (a valid node name), from `continue_token`.
    pub async fn pods_on_node(
        &self,
        node: &str,
        page_size: usize,
        continue_token: Option<&str>,
    ) -> Result<PodList, Error> {
        let mut path =
            format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{node}&limit={page_size}");
        if let Some(token) = continue_token {
            path.push_str("&continue=");
            path.push_str(&query_escape(token));
        }
        let answer = self.call(http::Method::GET, &path, None).await?;
        self.parse(&path, answer, Permission::ReadPods)
    }

    /// The pod `namespace`/`name` (valid object names), if it exists.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, Error> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        let answer = self.call(http::Method::GET, &path, None).await?;
        if answer.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.parse(&path, answer, Permission::ReadPods).map(Some)
    }

    /// Every namespace.
    pub async fn namespaces(&self) -> Result<NamespaceList, Error> {
        let path = "/api/v1/namespaces";
        let answer = self.call(http::Method::GET, path, None).await?;
        self.parse(path, answer, Permission::ListNamespaces)
    }

    /// ConfigMap `name` in `namespace` as the API holds it (every field, `resourceVersion`
    /// included, so that writing it back is a conflict if someone else wrote meanwhile), if
    /// it exists.
    pub async fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, Error> {
        let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
        let answer = self.call(http::Method::GET, &path, None).await?;
        if answer.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.parse(&path, answer, Permission::WriteConfigMaps)
            .map(Some)
    }

    /// Creates ConfigMap `object` in `namespace`.
    pub async fn create_config_map(
        &self,
        namespace: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        let path = format!("/api/v1/namespaces/{namespace}/configmaps");
        self.write(http::Method::POST, &path, object).await
    }

    /// Replaces ConfigMap `name` in `namespace` with `object`.
    pub async fn replace_config_map(
        &self,
        namespace: &str,
        name: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        let path = format!("/api/v1/namespaces/{namespace}/configmaps/{name}");
        self.write(http::Method::PUT, &path, object).await
    }

    /// One page of the PodCertificateRequests for `signer` in every namespace, from
    /// `continue_token`, in API group version `version` (`v1beta1`, or `v1` from 1.37). Each
    /// request is kept as JSON too: a status write sends the object back whole.
    pub async fn pod_certificate_requests(
        &self,
        version: &str,
        signer: &str,
        page_size: usize,
        continue_token: Option<&str>,
    ) -> Result<List<serde_json::Value>, Error> {
        let mut path = format!(
            "/apis/certificates.k8s.io/{version}/podcertificaterequests?fieldSelector={}&limit={page_size}",
            query_escape(&format!("spec.signerName={signer}"))
        );
        if let Some(token) = continue_token {
            path.push_str("&continue=");
            path.push_str(&query_escape(token));
        }
        let answer = self.call(http::Method::GET, &path, None).await?;
        self.parse(&path, answer, Permission::WatchPodCertificateRequests)
    }

    /// The path of a watch on the PodCertificateRequests for `signer`, from
    /// `resource_version`, ended by the API server after `timeout_secs`.
    pub fn pod_certificate_watch_path(
        version: &str,
        signer: &str,
        resource_version: &str,
        timeout_secs: u64,
    ) -> String {
        format!(
            "/apis/certificates.k8s.io/{version}/podcertificaterequests?fieldSelector={}&watch=true&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={timeout_secs}",
            query_escape(&format!("spec.signerName={signer}")),
            query_escape(resource_version)
        )
    }

    /// Writes `object` (a PodCertificateRequest as read, its status set) through the
    /// `status` subresource; the answer is the object as stored. A resourceVersion that is
    /// no longer current is [`Error::Conflict`]; a status the API server will not take is
    /// [`Error::Invalid`].
    pub async fn update_pod_certificate_status(
        &self,
        version: &str,
        namespace: &str,
        name: &str,
        object: &serde_json::Value,
    ) -> Result<PodCertificateRequest, Error> {
        let path = format!(
            "/apis/certificates.k8s.io/{version}/namespaces/{namespace}/podcertificaterequests/{name}/status"
        );
        let body = serde_json::to_vec(object).map_err(|e| self.decode_error(&path, &e))?;
        let answer = self.call(http::Method::PUT, &path, Some(body)).await?;
        self.parse(&path, answer, Permission::SignPodCertificateRequests)
    }

    /// The PodCertificateRequest `namespace`/`name`, as JSON, if it exists.
    pub async fn pod_certificate_request(
        &self,
        version: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, Error> {
        let path = format!(
            "/apis/certificates.k8s.io/{version}/namespaces/{namespace}/podcertificaterequests/{name}"
        );
        let answer = self.call(http::Method::GET, &path, None).await?;
        if answer.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.parse(&path, answer, Permission::WatchPodCertificateRequests)
            .map(Some)
    }

    /// ClusterTrustBundle `name`, if it exists.
    pub async fn cluster_trust_bundle(
        &self,
        name: &str,
    ) -> Result<Option<(ClusterTrustBundle, serde_json::Value)>, Error> {
        let path = format!("/apis/certificates.k8s.io/v1beta1/clustertrustbundles/{name}");
        let answer = self.call(http::Method::GET, &path, None).await?;
        if answer.status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let json: serde_json::Value =
            self.parse(&path, answer, Permission::WriteClusterTrustBundles)?;
        let typed =
            serde_json::from_value(json.clone()).map_err(|e| self.decode_error(&path, &e))?;
        Ok(Some((typed, json)))
    }

    /// Creates ClusterTrustBundle `object`.
    pub async fn create_cluster_trust_bundle(
        &self,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        let path = "/apis/certificates.k8s.io/v1beta1/clustertrustbundles";
        self.write_as(
            http::Method::POST,
            path,
            object,
            Permission::WriteClusterTrustBundles,
        )
        .await
    }

    /// Replaces ClusterTrustBundle `name` with `object` (which names the resourceVersion
    /// read).
    pub async fn replace_cluster_trust_bundle(
        &self,
        name: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        let path = format!("/apis/certificates.k8s.io/v1beta1/clustertrustbundles/{name}");
        self.write_as(
            http::Method::PUT,
            &path,
            object,
            Permission::WriteClusterTrustBundles,
        )
        .await
    }

    async fn write(
        &self,
        method: http::Method,
        path: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        self.write_as(method, path, object, Permission::WriteConfigMaps)
            .await
    }

    async fn write_as(
        &self,
        method: http::Method,
        path: &str,
        object: &serde_json::Value,
        needs: Permission,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(object).map_err(|e| self.decode_error(path, &e))?;
        let answer = self.call(method, path, Some(body)).await?;
        self.check(path, &answer, needs)
    }

    /// An error unless `answer` is a success.
    fn check(&self, path: &str, answer: &Answer, needs: Permission) -> Result<(), Error> {
        if answer.status.is_success() {
            return Ok(());
        }
        Err(status_error(
            self.url(),
            path,
            answer.status,
            &answer.body,
            needs,
        ))
    }

    /// `answer`'s body as a `T`, if it is a success.
    fn parse<T: DeserializeOwned>(
        &self,
        path: &str,
        answer: Answer,
        needs: Permission,
    ) -> Result<T, Error> {
        self.check(path, &answer, needs)?;
        serde_json::from_slice(&answer.body).map_err(|e| self.decode_error(path, &e))
    }

    fn decode_error(&self, path: &str, e: &serde_json::Error) -> Error {
        Error::Decode {
            url: self.url().to_owned(),
            path: path.to_owned(),
            reason: e.to_string(),
        }
    }
}

/// The error for an answer that is not a success: an RBAC refusal names `needs`; a
/// conflict, a resourceVersion gone and an invalid object are their own errors (the last
/// with the API server's message, cut).
pub(super) fn status_error(
    url: &str,
    path: &str,
    status: http::StatusCode,
    body: &[u8],
    needs: Permission,
) -> Error {
    let (url, path) = (url.to_owned(), path.to_owned());
    match status {
        http::StatusCode::FORBIDDEN | http::StatusCode::UNAUTHORIZED => Error::Forbidden {
            url,
            path,
            status,
            needs,
        },
        http::StatusCode::CONFLICT => Error::Conflict { url, path },
        http::StatusCode::GONE => Error::Gone { url, path },
        http::StatusCode::UNPROCESSABLE_ENTITY => {
            let said: Status = serde_json::from_slice(body).unwrap_or_default();
            Error::Invalid {
                url,
                path,
                message: crate::untrusted::cut(&said.message, 1024),
            }
        }
        status => Error::Status { url, path, status },
    }
}

/// Percent-encodes a query value: everything but unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continue_token_is_escaped_for_the_query() {
        assert_eq!(query_escape("a=b/c+d e"), "a%3Db%2Fc%2Bd%20e");
        assert_eq!(query_escape("eyJ2-_.~"), "eyJ2-_.~");
    }
}
