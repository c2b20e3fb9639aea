//! The Kubernetes API client: JSON over HTTPS with this server's own service-account token.
//! `api` holds the calls (TokenReview, pods, namespaces, ConfigMaps), `types` the objects;
//! `KubeClient::call` the transport, with its backoff.

pub mod api;
pub mod types;
pub mod watch;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use zeroize::Zeroizing;

use crate::outbound::{self, Bounds};

/// Where a pod finds its own API credentials.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA a pod trusts the API server with.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How long one API call may take, and the largest answer read.
const BOUNDS: Bounds = Bounds {
    timeout: Duration::from_secs(5),
    max_body: 4 << 20,
};

/// How long our own token is used before its file is read again: projected tokens are
/// rotated in place well before they expire (client-go re-reads each minute, too).
pub const OWN_TOKEN_REREAD: Duration = Duration::from_secs(60);

/// Why a call to the Kubernetes API got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No API to call: not in a pod, and none was named.
    #[error("not running in a pod (KUBERNETES_SERVICE_HOST is unset): pass --kube-api-url")]
    NotInCluster,
    /// The client could not be built (the cluster CA).
    #[error("the Kubernetes API client: {0}")]
    Client(#[source] outbound::Error),
    /// Our own token could not be read.
    #[error("{url}: reading our own API token {}: {source}", .path.display())]
    OwnToken {
        /// The API.
        url: String,
        /// The token file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Calls are paused after the API server was overloaded or away.
    #[error("{url}{path}: not called for another {} ms: {why}", .left.as_millis())]
    Paused {
        /// The API.
        url: String,
        /// The path that was not called.
        path: String,
        /// How long the pause still lasts.
        left: Duration,
        /// What started it.
        why: String,
    },
    /// The request could not be built (a path that is not a URI).
    #[error("{url}{path}: {reason}")]
    BadRequest {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The call failed: no connection, a certificate not trusted, a timeout.
    #[error("{0}")]
    Call(#[source] outbound::Error),
    /// The API server refused: our service account lacks a permission.
    #[error(
        "{url}{path}: HTTP {status}: this server's service account may not {needs} (bind it to \
         a ClusterRole that allows it, as those in deploy/kubernetes/ do)"
    )]
    Forbidden {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// 401 or 403.
        status: http::StatusCode,
        /// What to grant.
        needs: api::Permission,
    },
    /// Another answer than a success.
    #[error("{url}{path}: HTTP {status}")]
    Status {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// What it answered.
        status: http::StatusCode,
    },
    /// A watch asked for a resourceVersion the API server no longer has (HTTP 410, or a
    /// watch `ERROR` event with code 410): list again and watch from the list's version.
    #[error("{url}{path}: the resourceVersion is too old to watch from (410 Gone): relisting")]
    Gone {
        /// The API.
        url: String,
        /// The path.
        path: String,
    },
    /// A watch sent nothing, not even its end, for longer than it was asked to stay open:
    /// the connection is taken as dead (a proxy dropping it silently) and watched anew.
    #[error("{url}{path}: the watch sent nothing for {} s: watching again", .idle.as_secs())]
    Stalled {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// How long it was silent.
        idle: Duration,
    },
    /// A write named a resourceVersion that is no longer the object's: someone else wrote
    /// it first (HTTP 409).
    #[error("{url}{path}: HTTP 409 Conflict: the object changed since it was read")]
    Conflict {
        /// The API.
        url: String,
        /// The path.
        path: String,
    },
    /// The API server refused the object as invalid (HTTP 422), saying why.
    #[error("{url}{path}: HTTP 422 Invalid: {message}")]
    Invalid {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// The Status's message.
        message: String,
    },
    /// A body that is not the object asked for.
    #[error("{url}{path}: not the object expected: {reason}")]
    Decode {
        /// The API.
        url: String,
        /// The path.
        path: String,
        /// What did not parse.
        reason: String,
    },
}

/// How to reach the Kubernetes API.
#[derive(Debug, Clone)]
pub struct KubeApi {
    /// `https://host:port`.
    pub url: String,
    /// Our own bearer token (re-read every [`OWN_TOKEN_REREAD`]: projected tokens are
    /// rotated in place).
    pub token_file: PathBuf,
    /// The CA that signed the API server's certificate (PEM).
    pub ca_pem: Option<String>,
}

impl KubeApi {
    /// The in-cluster API: `KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's service-account
    /// token and CA, as client-go's in-cluster config finds them.
    pub fn in_cluster() -> Result<Self, Error> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or(Error::NotInCluster)?;
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

/// An answer from the API: its status, body and `Retry-After`.
pub type Answer = outbound::Response;

/// Calls the Kubernetes API. When the API server says it is overloaded (429, or a 5xx) or
/// does not answer, calls stop for a while (its `Retry-After`, else a backoff doubling from
/// [`BACKOFF_FIRST`] to [`BACKOFF_MAX`]) and fail at once meanwhile: our callers retry at
/// their own pace, the API server is not asked at theirs.
pub struct KubeClient {
    api: KubeApi,
    client: outbound::Client,
    backoff: std::sync::Mutex<Backoff>,
    own_token: tokio::sync::Mutex<Option<(Instant, Zeroizing<String>)>>,
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
    pub fn new(api: KubeApi) -> Result<Self, Error> {
        Ok(Self {
            client: outbound::Client::new(api.ca_pem.as_deref()).map_err(Error::Client)?,
            api,
            backoff: std::sync::Mutex::new(Backoff::default()),
            own_token: tokio::sync::Mutex::new(None),
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
    ) -> Result<Answer, Error> {
        self.check_paused(path)?;
        let answer = self.send(method, path, body).await;
        let mut backoff = self.backoff();
        let now = Instant::now();
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

    /// An error while calls are paused after the API server was overloaded or away.
    fn check_paused(&self, path: &str) -> Result<(), Error> {
        match self.backoff().paused(Instant::now()) {
            Some((left, why)) => Err(Error::Paused {
                url: self.api.url.clone(),
                path: path.to_owned(),
                left,
                why: why.to_owned(),
            }),
            None => Ok(()),
        }
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Our own bearer token, read from its file (off the reactor) at most every
    /// [`OWN_TOKEN_REREAD`].
    async fn own_token(&self) -> Result<Zeroizing<String>, Error> {
        let mut cached = self.own_token.lock().await;
        if let Some((read, token)) = cached.as_ref()
            && read.elapsed() < OWN_TOKEN_REREAD
        {
            return Ok(token.clone());
        }
        let text = tokio::fs::read_to_string(&self.api.token_file)
            .await
            .map_err(|source| Error::OwnToken {
                url: self.api.url.clone(),
                path: self.api.token_file.clone(),
                source,
            })?;
        let token = Zeroizing::new(text.trim().to_owned());
        drop(Zeroizing::new(text));
        *cached = Some((Instant::now(), token.clone()));
        Ok(token)
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, Error> {
        let request = self.request(method, path, body).await?;
        self.client.send(request, BOUNDS).await.map_err(Error::Call)
    }

    /// Opens a watch on `path` (a URL with `watch=true`): its events are read as they come,
    /// each at most [`watch::MAX_EVENT`] bytes, and the stream ends when nothing (not even
    /// a bookmark) arrives within `idle`.
    pub async fn watch(&self, path: &str, idle: Duration) -> Result<watch::Watch, Error> {
        self.check_paused(path)?;
        let request = self.request(http::Method::GET, path, None).await?;
        let response = self
            .client
            .open(request, BOUNDS.timeout)
            .await
            .map_err(Error::Call)?;
        let status = response.status();
        if !status.is_success() {
            // The body says why (a Status); bounded, as any answer.
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                response.into_body(),
                64 << 10,
            ))
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
            return Err(api::status_error(
                self.url(),
                path,
                status,
                &body,
                api::Permission::WatchPodCertificateRequests,
            ));
        }
        Ok(watch::Watch::new(
            response.into_body(),
            idle,
            self.url().to_owned(),
            path.to_owned(),
        ))
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Request<Full<Bytes>>, Error> {
        let own = self.own_token().await?;
        let authorization = Zeroizing::new(format!("Bearer {}", own.as_str()));
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api.url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, authorization.as_str())
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::BadRequest {
                url: self.api.url.clone(),
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(request)
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
