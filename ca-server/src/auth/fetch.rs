//! Fetching issuer JWKS documents.

use std::time::Duration;

use crate::outbound::{self, Bounds};

/// Largest JWKS document accepted, and how long one fetch may take.
const BOUNDS: Bounds = Bounds {
    timeout: Duration::from_secs(10),
    max_body: 1 << 20,
};

/// Fetches documents over HTTPS (system roots, plus an optional extra CA); never plain HTTP,
/// where anyone in the middle could hand us keys of their own.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: outbound::Client,
}

impl Fetcher {
    /// A client trusting the system's roots and, if given, the CA certificates in `extra_ca`
    /// (PEM).
    pub fn new(extra_ca: Option<&str>) -> Result<Self, outbound::Error> {
        Ok(Self {
            client: outbound::Client::new(extra_ca)?,
        })
    }

    /// GETs `url` and returns its body; any status but 200 is an error.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, outbound::Error> {
        Ok(self.client.get_ok(url, BOUNDS).await?.to_vec())
    }
}
