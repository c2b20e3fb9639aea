//! Issuer keys: a JWK Set (as the API server serves at `/openid/v1/jwks`) turned into
//! verifying keys, each with the algorithms it may be used with.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::AuthError;
use super::fetch::Fetcher;

/// The only algorithms a token may use: never `none`, never HMAC.
pub const ALLOWED_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
];

/// A key that can verify tokens.
#[derive(Clone)]
pub struct VerifyingKey {
    pub(super) key: DecodingKey,
    pub(super) algorithms: Vec<Algorithm>,
}

/// The keys of one issuer, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<VerifyingKey>>,
    /// Keys without a `kid`, usable only when the set holds exactly one key.
    unnamed: Vec<Arc<VerifyingKey>>,
}

impl KeySet {
    /// Parses a JWK Set, keeping the keys we can use (RSA, EC P-256/P-384) and skipping the
    /// rest (HMAC secrets, other curves) with a log line.
    pub fn from_json(json: &[u8]) -> Result<Self, String> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWK Set: {e}"))?;
        let mut keys = KeySet::default();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            match verifying_key(jwk) {
                Ok(key) => match kid {
                    Some(kid) => {
                        keys.by_kid.insert(kid, Arc::new(key));
                    }
                    None => keys.unnamed.push(Arc::new(key)),
                },
                Err(why) => warn!(kid = kid.as_deref().unwrap_or(""), why, "Skipping JWKS key"),
            }
        }
        Ok(keys)
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    /// Whether the set holds no usable key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for `kid`; without a `kid`, the set's only key.
    pub fn find(&self, kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
        match kid {
            Some(kid) => self.by_kid.get(kid).cloned(),
            None if self.len() == 1 => self
                .by_kid
                .values()
                .next()
                .or(self.unnamed.first())
                .cloned(),
            None => None,
        }
    }
}

fn verifying_key(jwk: &Jwk) -> Result<VerifyingKey, &'static str> {
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported curve"),
        },
        AlgorithmParameters::OctetKey(_) => return Err("symmetric (HMAC) keys are never accepted"),
        _ => return Err("unsupported key type"),
    };
    // A JWK that names its algorithm may only be used with that one.
    let algorithms = match jwk.common.key_algorithm {
        Some(named) => {
            let named = key_algorithm(named).ok_or("unsupported alg")?;
            if !family.contains(&named) {
                return Err("alg does not match the key type");
            }
            vec![named]
        }
        None => family,
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "malformed key")?;
    Ok(VerifyingKey { key, algorithms })
}

fn key_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Keys fixed at start (a JWKS file, or the development issuer).
    Static,
    /// A JWKS URL, fetched at start, refetched on an unknown `kid` at most once per
    /// [`REFETCH_INTERVAL`].
    Url(String),
}

/// The least time between two fetches of a JWKS URL.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// An issuer's current keys, refreshed from its source when needed.
pub struct IssuerKeys {
    source: KeySource,
    /// Read on every request; written only after a fetch.
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching; remembers when the last fetch started.
    last_fetch: Mutex<Option<Instant>>,
}

impl IssuerKeys {
    /// Keys that never change.
    pub fn fixed(keys: KeySet) -> Self {
        Self {
            source: KeySource::Static,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(None),
        }
    }

    /// Keys read from a JWKS file once, at start.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let json = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys = KeySet::from_json(&json).map_err(|e| format!("{}: {e}", path.display()))?;
        if keys.is_empty() {
            return Err(format!(
                "{}: no usable key (RSA or EC P-256/P-384)",
                path.display()
            ));
        }
        Ok(Self::fixed(keys))
    }

    /// Keys fetched from a URL (the first fetch happens on first use, so a server can start
    /// while the API server is briefly away).
    pub fn from_url(url: String) -> Self {
        Self {
            source: KeySource::Url(url),
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_fetch: Mutex::new(None),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        // A poisoned lock only means a writer panicked between two whole assignments.
        self.keys
            .read()
            .map(|k| Arc::clone(&k))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// The key for `kid`, refetching a URL source if it is unknown (rate-limited).
    pub async fn find(
        &self,
        kid: Option<&str>,
        fetcher: &Fetcher,
    ) -> Result<Arc<VerifyingKey>, AuthError> {
        if let Some(key) = self.current().find(kid) {
            return Ok(key);
        }
        if let KeySource::Url(url) = &self.source {
            let mut last_fetch = self.last_fetch.lock().await;
            // Another request may have fetched while we waited for the lock.
            if let Some(key) = self.current().find(kid) {
                return Ok(key);
            }
            if last_fetch.is_none_or(|t| t.elapsed() >= REFETCH_INTERVAL) {
                *last_fetch = Some(Instant::now());
                match fetcher
                    .get(url)
                    .await
                    .and_then(|body| KeySet::from_json(&body))
                {
                    Ok(keys) => {
                        info!(url, keys = keys.len(), "Fetched issuer JWKS");
                        let keys = Arc::new(keys);
                        match self.keys.write() {
                            Ok(mut k) => *k = Arc::clone(&keys),
                            Err(p) => *p.into_inner() = Arc::clone(&keys),
                        }
                        if let Some(key) = keys.find(kid) {
                            return Ok(key);
                        }
                    }
                    Err(e) => {
                        warn!(url, error = %e, "Fetching issuer JWKS failed");
                        return Err(AuthError::KeysUnavailable(e));
                    }
                }
            }
        }
        Err(match kid {
            Some(kid) => AuthError::UnknownKid(kid.to_owned()),
            None => AuthError::NoKid(self.current().len()),
        })
    }
}
