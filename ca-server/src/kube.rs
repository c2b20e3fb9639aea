//! A small client for the Kubernetes API: JSON over HTTPS with this server's own
//! service-account token, for TokenReview and for publishing the root ConfigMap.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use zeroize::Zeroizing;

/// Where a pod finds its own API credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA a pod trusts the API server with.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How long one API call may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
const MAX_BODY: usize = 4 << 20;

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
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
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

/// An answer from the API: its status and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: http::StatusCode,
    /// The body (JSON, normally).
    pub body: Bytes,
}

/// Calls the Kubernetes API.
pub struct KubeClient {
    api: KubeApi,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("api", &self.api.url)
            .finish()
    }
}

impl KubeClient {
    /// A client for `api`.
    pub fn new(api: KubeApi) -> Result<Self, String> {
        Ok(Self {
            client: crate::auth::http_client(api.ca_pem.as_deref())?,
            api,
        })
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.api.url
    }

    /// `method path` with a JSON `body`; any answer the server gives is returned, errors are
    /// failures to get one (each naming the API server).
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let fail = |detail: String| format!("{} {path}: {detail}", self.api.url);
        let own = Zeroizing::new(std::fs::read_to_string(&self.api.token_file).map_err(|e| {
            fail(format!(
                "reading our own API token {}: {e}",
                self.api.token_file.display()
            ))
        })?);
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api.url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own.trim()),
            )
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| fail(e.to_string()))?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(Answer { status, body })
    }
}
