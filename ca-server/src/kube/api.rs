//! The calls this server makes to the Kubernetes API, each with its request and its answer
//! typed (`types`), and the answers that are not one (a status, an RBAC refusal, a body that
//! does not parse) as [`Error`]s that say what to grant or check.

use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::types::{NamespaceList, Pod, PodList, TokenReview};
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
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::CreateTokenReviews => "create tokenreviews",
            Self::ReadPods => "get and list pods",
            Self::ListNamespaces => "list namespaces",
            Self::WriteConfigMaps => "get, create and update configmaps",
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

    async fn write(
        &self,
        method: http::Method,
        path: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(object).map_err(|e| self.decode_error(path, &e))?;
        let answer = self.call(method, path, Some(body)).await?;
        self.check(path, &answer, Permission::WriteConfigMaps)
    }

    /// An error unless `answer` is a success.
    fn check(&self, path: &str, answer: &Answer, needs: Permission) -> Result<(), Error> {
        match answer.status {
            s if s.is_success() => Ok(()),
            s @ (http::StatusCode::FORBIDDEN | http::StatusCode::UNAUTHORIZED) => {
                Err(Error::Forbidden {
                    url: self.url().to_owned(),
                    path: path.to_owned(),
                    status: s,
                    needs,
                })
            }
            s => Err(Error::Status {
                url: self.url().to_owned(),
                path: path.to_owned(),
                status: s,
            }),
        }
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
