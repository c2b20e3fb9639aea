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
    /// The `Retry-After` the server sent, in seconds.
    pub retry_after: Option<Duration>,
}

/// Calls the Kubernetes API. When the API server says it is overloaded (429, or a 5xx) or
/// does not answer, calls stop for a while (its `Retry-After`, else a backoff doubling from
/// [`BACKOFF_FIRST`] to [`BACKOFF_MAX`]) and fail at once meanwhile: our callers retry at
/// their own pace, the API server is not asked at theirs.
pub struct KubeClient {
    api: KubeApi,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    backoff: std::sync::Mutex<Backoff>,
}

/// The first pause after the API server is overloaded or away.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// The longest pause.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// When the API server may be called again, and how long the next pause is.
#[derive(Debug, Default)]
struct Backoff {
    until: Option<std::time::Instant>,
    why: String,
    next: Duration,
}

impl Backoff {
    /// The pause after a failure: `retry_after` if the server named one (within the bounds),
    /// else the next step of the doubling.
    fn fail(&mut self, now: std::time::Instant, retry_after: Option<Duration>, why: String) {
        let step = if self.next.is_zero() {
            BACKOFF_FIRST
        } else {
            self.next
        };
        let pause = retry_after
            .unwrap_or(step)
            .clamp(BACKOFF_FIRST, BACKOFF_MAX);
        self.next = (step * 2).min(BACKOFF_MAX);
        self.until = Some(now + pause);
        self.why = why;
    }

    fn succeed(&mut self) {
        *self = Self::default();
    }

    /// Why calls are paused and for how long, if they are at `now`.
    fn paused(&self, now: std::time::Instant) -> Option<(Duration, &str)> {
        let until = self.until?;
        (now < until).then(|| (until - now, self.why.as_str()))
    }
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
            backoff: std::sync::Mutex::new(Backoff::default()),
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
        if let Some((left, why)) = self.backoff().paused(std::time::Instant::now()) {
            return Err(fail(format!(
                "not called for another {} ms: {why}",
                left.as_millis()
            )));
        }
        let answer = self.send(method, path, body).await;
        let mut backoff = self.backoff();
        let now = std::time::Instant::now();
        match &answer {
            Ok(a)
                if a.status == http::StatusCode::TOO_MANY_REQUESTS
                    || a.status.is_server_error() =>
            {
                backoff.fail(
                    now,
                    a.retry_after,
                    format!("the API server answered HTTP {}", a.status),
                );
            }
            Ok(_) => backoff.succeed(),
            Err(e) => backoff.fail(now, None, format!("the last call failed ({e})")),
        }
        answer
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(
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
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_api_is_left_alone_for_a_while() {
        let t0 = std::time::Instant::now();
        let mut b = Backoff::default();
        assert!(b.paused(t0).is_none());
        b.fail(t0, None, "HTTP 429".into());
        assert_eq!(b.paused(t0).map(|p| p.0), Some(BACKOFF_FIRST));
        assert!(b.paused(t0 + BACKOFF_FIRST).is_none());
        // Each failure in a row doubles the pause, up to the maximum.
        let mut pauses = Vec::new();
        for _ in 0..10 {
            b.fail(t0, None, "HTTP 503".into());
            pauses.push(b.paused(t0).unwrap().0.as_millis());
        }
        assert_eq!(pauses[..4], [1000, 2000, 4000, 8000]);
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX.as_millis());
        // The server's Retry-After wins, within the bounds.
        b.fail(t0, Some(Duration::from_secs(7)), "HTTP 429".into());
        assert_eq!(b.paused(t0).unwrap().0, Duration::from_secs(7));
        b.fail(t0, Some(Duration::from_secs(3600)), "HTTP 429".into());
        assert_eq!(b.paused(t0).unwrap().0, BACKOFF_MAX);
        b.succeed();
        assert!(b.paused(t0).is_none());
    }
}
