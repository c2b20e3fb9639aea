//! Kubernetes TokenReview: the API server checks a token for us (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`), as istiod does when it is given no JWKS.
//! It knows about revoked tokens and deleted pods, which a local JWKS check cannot; it costs
//! a round trip, so positive answers are remembered briefly (by the caller, see
//! [`super::Authenticator`]).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use zeroize::Zeroizing;

use super::{AuthError, BearerToken};

/// The API path of TokenReview.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Where a pod finds its own API credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA a pod trusts the API server with.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How long a positive review is trusted before the API server is asked again (never past
/// the token's own `exp`).
pub const REVIEW_CACHE_SECS: i64 = 60;

/// How long one review may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
const MAX_BODY: usize = 256 * 1024;

/// Extra fields the API server puts in a review of a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How to reach the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubeApi {
    /// `https://host:port`.
    pub url: String,
    /// Our own bearer token (re-read on each use: projected tokens are rotated in place).
    pub token_file: PathBuf,
    /// The CA that signed the API server's certificate (PEM).
    pub ca_pem: Option<String>,
}

impl KubeApi {
    /// The in-cluster API: `KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's service-account
    /// token and CA, as client-go's in-cluster config finds them.
    pub fn in_cluster() -> Result<Self, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "not running in a pod (KUBERNETES_SERVICE_HOST is unset): pass --kube-api-url"
                .to_owned()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self {
            url: format!("https://{host}:{port}"),
            token_file: PathBuf::from(IN_CLUSTER_TOKEN),
            ca_pem: std::fs::read_to_string(IN_CLUSTER_CA).ok(),
        })
    }
}

/// Asks the API server about tokens.
pub struct TokenReviewer {
    api: KubeApi,
    audiences: Vec<String>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("api", &self.api.url)
            .finish()
    }
}

/// What the API server said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// The pod the token is bound to, if any.
    pub pod_name: Option<String>,
    /// That pod's uid.
    pub pod_uid: Option<String>,
}

#[derive(serde::Deserialize)]
struct Review {
    status: Option<ReviewStatus>,
}

#[derive(serde::Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<ReviewUser>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(serde::Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: std::collections::HashMap<String, Vec<String>>,
}

impl TokenReviewer {
    /// A reviewer asking `api`, for tokens meant for one of `audiences`.
    pub fn new(api: KubeApi, audiences: Vec<String>) -> Result<Self, String> {
        Ok(Self {
            client: super::fetch::http_client(api.ca_pem.as_deref())?,
            api,
            audiences,
        })
    }

    /// The API server's URL.
    pub fn api_url(&self) -> &str {
        &self.api.url
    }

    /// Asks the API server whether `token` is valid for our audiences.
    pub async fn review(&self, token: &BearerToken) -> Result<Reviewed, AuthError> {
        let unavailable =
            |detail: String| AuthError::ReviewUnavailable(format!("{}: {detail}", self.api.url));
        let own = Zeroizing::new(std::fs::read_to_string(&self.api.token_file).map_err(|e| {
            unavailable(format!(
                "reading our own API token {}: {e}",
                self.api.token_file.display()
            ))
        })?);
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": { "token": token.expose(), "audiences": self.audiences },
            }))
            .map_err(|e| unavailable(e.to_string()))?,
        );
        let request = http::Request::post(format!("{}{TOKEN_REVIEW_PATH}", self.api.url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            )
            .body(Full::new(Bytes::from(body.to_vec())))
            .map_err(|e| unavailable(e.to_string()))?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        if status == http::StatusCode::FORBIDDEN || status == http::StatusCode::UNAUTHORIZED {
            return Err(unavailable(format!(
                "HTTP {status}: this server's service account may not create tokenreviews \
                 (bind it to a ClusterRole allowing `create` on `tokenreviews`)"
            )));
        }
        if !status.is_success() {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let review: Review = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("not a TokenReview: {e}")))?;
        let status = review
            .status
            .ok_or_else(|| unavailable("the TokenReview has no status".into()))?;
        if !status.authenticated {
            let why = if status.error.is_empty() {
                "not authenticated".to_owned()
            } else {
                status.error
            };
            return Err(AuthError::ReviewRefused(why));
        }
        if !status.audiences.is_empty()
            && !status.audiences.iter().any(|a| self.audiences.contains(a))
        {
            return Err(AuthError::WrongAudience {
                got: status.audiences,
                want: self.audiences.clone(),
            });
        }
        let user = status
            .user
            .ok_or_else(|| AuthError::ReviewRefused("the review names no user".into()))?;
        let first = |key: &str| user.extra.get(key).and_then(|v| v.first()).cloned();
        Ok(Reviewed {
            pod_name: first(POD_NAME_EXTRA),
            pod_uid: first(POD_UID_EXTRA),
            username: user.username,
        })
    }
}
