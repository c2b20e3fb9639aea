//! Outbound HTTPS: the one client the server reaches other services with (issuers' JWKS, the
//! Kubernetes API). HTTPS only, HTTP/1.1, the system's roots plus an optional extra CA, every
//! call under a deadline and a body cap, and errors that say why a connection failed (a
//! certificate the server did not trust is named as such, not as `client error (Connect)`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The extra CA file does not hold usable certificates.
    #[error("bad CA certificate: {0}")]
    BadCa(String),
    /// The URL does not parse.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL, as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("{method} {url} timed out after {} s", .after.as_secs())]
    TimedOut {
        /// The method.
        method: http::Method,
        /// The URL.
        url: String,
        /// The deadline.
        after: Duration,
    },
    /// The connection or the request failed; `cause` is the whole chain of reasons, down to
    /// the TLS alert or the OS error.
    #[error("{method} {url}: {cause}")]
    Failed {
        /// The method.
        method: http::Method,
        /// The URL.
        url: String,
        /// Why, every level of it.
        cause: String,
    },
    /// The answer was not `200 OK` where only that will do.
    #[error("GET {url}: HTTP {status}")]
    NotOk {
        /// The URL.
        url: String,
        /// What the server answered.
        status: http::StatusCode,
    },
}

/// An answer: its status, `Retry-After` and body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: http::StatusCode,
    /// The `Retry-After` the server sent, in seconds.
    pub retry_after: Option<Duration>,
    /// The body, at most the cap the call gave.
    pub body: Bytes,
}

/// How long a call may take and how much of its answer is read.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// From sending to the last byte of the body.
    pub timeout: Duration,
    /// The largest body read; a longer one is an error.
    pub max_body: usize,
}

/// An HTTPS client (cheap to clone: clones share connections).
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<HttpConnector>,
        Full<Bytes>,
    >,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("outbound::Client")
    }
}

impl Client {
    /// A client trusting the system's roots and, if given, the CA certificates in `extra_ca`
    /// (PEM), such as a cluster's CA for its API server.
    pub fn new(extra_ca: Option<&str>) -> Result<Self, Error> {
        // No Nagle, as Go's and curl's clients: a request that leaves in more than one
        // segment must not wait for the peer's delayed ACK (up to 40 ms) before its last.
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(extra_ca)?)
            .https_only()
            .enable_http1()
            .wrap_connector(tcp);
        Ok(Self {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// Sends `request` and reads the answer within `bounds`. Any status is an answer; errors
    /// are failures to get one.
    pub async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
        bounds: Bounds,
    ) -> Result<Response, Error> {
        let method = request.method().clone();
        let url = request.uri().to_string();
        let failed = |e: &(dyn std::error::Error + 'static)| Error::Failed {
            method: method.clone(),
            url: url.clone(),
            cause: cause(e),
        };
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|e| failed(&e))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), bounds.max_body)
                .collect()
                .await
                .map_err(|e| failed(&*e))?
                .to_bytes();
            Ok(Response {
                status,
                retry_after,
                body,
            })
        };
        match tokio::time::timeout(bounds.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::TimedOut {
                method,
                url,
                after: bounds.timeout,
            }),
        }
    }

    /// Sends `request` and returns as soon as the answer's head arrives (within
    /// `head_timeout`): its status and its body, to be read as it comes (a watch). The
    /// caller bounds what it reads and for how long.
    pub async fn open(
        &self,
        request: http::Request<Full<Bytes>>,
        head_timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let method = request.method().clone();
        let url = request.uri().to_string();
        match tokio::time::timeout(head_timeout, self.inner.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(Error::Failed {
                method,
                url,
                cause: cause(&e),
            }),
            Err(_) => Err(Error::TimedOut {
                method,
                url,
                after: head_timeout,
            }),
        }
    }

    /// GETs `url`.
    pub async fn get(&self, url: &str, bounds: Bounds) -> Result<Response, Error> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let request = http::Request::get(uri)
            .body(Full::default())
            .map_err(|e| Error::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        self.send(request, bounds).await
    }

    /// GETs `url` and returns its body; any status but 200 is an error.
    pub async fn get_ok(&self, url: &str, bounds: Bounds) -> Result<Bytes, Error> {
        let response = self.get(url, bounds).await?;
        if response.status != http::StatusCode::OK {
            return Err(Error::NotOk {
                url: url.to_owned(),
                status: response.status,
            });
        }
        Ok(response.body)
    }
}

/// TLS for outbound calls: the system's roots and, if given, the CA certificates in
/// `extra_ca` (PEM).
fn tls_config(extra_ca: Option<&str>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(pem) = extra_ca {
        let mut reader = pem.as_bytes();
        for cert in rustls_pemfile::certs(&mut reader) {
            let cert = cert.map_err(|e| Error::BadCa(e.to_string()))?;
            roots.add(cert).map_err(|e| Error::BadCa(e.to_string()))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An error and its sources, outermost first, each said once: hyper's `client error
/// (Connect)` becomes `client error (Connect): invalid peer certificate: UnknownIssuer`.
pub fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn a_cause_names_every_level_once() {
        let inner = Layer("invalid peer certificate: UnknownIssuer", None);
        let middle = Layer(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(inner)),
        );
        let outer = Layer("client error (Connect)", Some(Box::new(middle)));
        assert_eq!(
            cause(&outer),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn a_bad_extra_ca_is_refused() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(Client::new(Some(pem)), Err(Error::BadCa(_))));
    }
}
