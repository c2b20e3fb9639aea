//! A small HTTP(S) client for fetching issuer JWKS documents.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest JWKS document accepted.
const MAX_BODY: usize = 1 << 20;
/// How long one fetch may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches documents over HTTPS (system roots, plus an optional extra CA); never plain HTTP,
/// where anyone in the middle could hand us keys of their own.
#[derive(Clone)]
pub struct Fetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// A client trusting the system's roots and, if given, the CA certificates in `extra_ca`
    /// (PEM), such as a cluster's CA for its API server.
    pub fn new(extra_ca: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            client: http_client(extra_ca)?,
        })
    }

    /// GETs `url` and returns its body; any status but 200 is an error.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        let response = tokio::time::timeout(TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| format!("GET {url} timed out"))?
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        Ok(body.to_bytes().to_vec())
    }
}

/// An HTTP/1.1 client for issuers and the Kubernetes API: HTTPS only, trusting what
/// [`tls_config`] trusts.
pub(crate) fn http_client<B>(
    extra_ca: Option<&str>,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, B>, String>
where
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(extra_ca)?)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// TLS for fetching from issuers and the Kubernetes API: the system's roots and, if given,
/// the CA certificates in `extra_ca` (PEM).
fn tls_config(extra_ca: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_roots());
    if let Some(pem) = extra_ca {
        let mut reader = pem.as_bytes();
        for cert in rustls_pemfile::certs(&mut reader) {
            let cert = cert.map_err(|e| format!("bad CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate: {e}"))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn rustls_native_roots() -> Vec<rustls_pki_types::CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}
