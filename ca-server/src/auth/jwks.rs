//! Issuer keys: a JWK Set (as the API server serves at `/openid/v1/jwks`) turned into
//! verifying keys, each with the algorithms it may be used with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    /// SHA-256 of the JWK as published: the same `kid` with other key material is another
    /// key.
    pub(super) thumbprint: [u8; 32],
}

/// The keys of one issuer, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<VerifyingKey>>,
    /// Keys without a `kid`, usable only when the set holds exactly one key.
    unnamed: Vec<Arc<VerifyingKey>>,
}

/// What is wrong with a JWK Set's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not a JWK Set at all.
    #[error("not a JWK Set: {0}")]
    NotJwks(String),
    /// One `kid` named twice: which key a token meant cannot be known.
    #[error("the JWK Set names kid {0:?} more than once")]
    DuplicateKid(String),
}

/// Why an issuer's keys could not be read from their source. Kept (and cloned) as the last
/// error until a read succeeds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The JWKS file could not be read.
    #[error("{}: {reason}", .path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The JWKS URL could not be fetched (the reason names the URL).
    #[error("{0}")]
    Fetch(String),
    /// The document is not a usable JWK Set.
    #[error("{from}: {error}")]
    Format {
        /// The file or URL.
        from: String,
        /// What is wrong.
        error: JwksError,
    },
    /// The file holds no key this server can use.
    #[error("{}: no usable key (RSA or EC P-256/P-384)", .0.display())]
    NoUsableKey(std::path::PathBuf),
}

impl KeySet {
    /// Parses a JWK Set, keeping the keys we can use (RSA, EC P-256/P-384) and skipping the
    /// rest (HMAC secrets, other curves) with a log line. A set that names one `kid` twice is
    /// refused whole: which of the two a token meant cannot be known.
    pub fn from_json(json: &[u8]) -> Result<Self, JwksError> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| JwksError::NotJwks(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for kid in set.keys.iter().filter_map(|k| k.common.key_id.as_deref()) {
            if !seen.insert(kid) {
                return Err(JwksError::DuplicateKid(crate::untrusted::claim(kid)));
            }
        }
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
                Err(why) => warn!(
                    kid = %crate::untrusted::claim(kid.as_deref().unwrap_or("")),
                    why,
                    "Skipping JWKS key"
                ),
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

    /// Whether the key a token was verified with (its `kid` and thumbprint) is still here.
    pub fn still_has(&self, kid: Option<&str>, thumbprint: &[u8; 32]) -> bool {
        self.find(kid).is_some_and(|k| k.thumbprint == *thumbprint)
    }

    /// The kids of `self` that `newer` no longer has (or has with other key material).
    fn removed_in(&self, newer: &KeySet) -> Vec<String> {
        let mut gone: Vec<String> = self
            .by_kid
            .iter()
            .filter(|(kid, key)| !newer.still_has(Some(kid), &key.thumbprint))
            .map(|(kid, _)| kid.clone())
            .collect();
        gone.sort();
        gone
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
    let thumbprint = {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(jwk).map_err(|_| "malformed key")?;
        Sha256::digest(json).into()
    };
    Ok(VerifyingKey {
        key,
        algorithms,
        thumbprint,
    })
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
    /// Keys fixed for the life of the process (the development issuer).
    Static,
    /// A JWKS file, read at start and again every refresh (a mounted ConfigMap changes in
    /// place).
    File(PathBuf),
    /// A JWKS URL, fetched at start and every refresh, and refetched on an unknown `kid` at
    /// most once per [`REFETCH_INTERVAL`].
    Url(String),
}

/// The least time between two fetches of a JWKS URL for an unknown `kid`.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// How often a JWKS file or URL is read again by default (`--token-jwks-refresh`).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// What a refresh changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// The kids that stopped verifying.
    pub removed: Vec<String>,
}

/// An issuer's current keys, refreshed from their source.
pub struct IssuerKeys {
    source: KeySource,
    /// How often the source is read again.
    refresh: Duration,
    /// Read on every request; written only after a fetch.
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching; remembers when the last fetch started (`None`: never).
    last_fetch: Mutex<Option<Instant>>,
    /// Why the last read of the source failed, if it did: a token whose key is unknown
    /// meanwhile is told the keys are unavailable, not that its key does not exist.
    last_error: std::sync::Mutex<Option<KeysError>>,
}

impl IssuerKeys {
    /// Keys that never change.
    pub fn fixed(keys: KeySet) -> Self {
        Self {
            source: KeySource::Static,
            refresh: DEFAULT_REFRESH,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(None),
            last_error: std::sync::Mutex::new(None),
        }
    }

    /// Keys read from a JWKS file at start, and again every `refresh`.
    pub fn from_file(path: &Path, refresh: Duration) -> Result<Self, KeysError> {
        let keys = read_file(path)?;
        if keys.is_empty() {
            return Err(KeysError::NoUsableKey(path.to_owned()));
        }
        Ok(Self {
            source: KeySource::File(path.to_owned()),
            refresh,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(Some(Instant::now())),
            last_error: std::sync::Mutex::new(None),
        })
    }

    /// Keys fetched from a URL, at start (by the first [`IssuerKeys::refresh_if_due`], so a
    /// server can start while the API server is briefly away) and every `refresh`.
    pub fn from_url(url: String, refresh: Duration) -> Self {
        Self {
            source: KeySource::Url(url),
            refresh,
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_fetch: Mutex::new(None),
            last_error: std::sync::Mutex::new(None),
        }
    }

    /// The keys as they stand.
    pub fn current(&self) -> Arc<KeySet> {
        // A poisoned lock only means a writer panicked between two whole assignments.
        self.keys
            .read()
            .map(|k| Arc::clone(&k))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    fn set_error(&self, error: Option<KeysError>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    fn last_error(&self) -> Option<KeysError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, keys: KeySet) -> Refreshed {
        self.set_error(None);
        let keys = Arc::new(keys);
        let old = {
            let mut slot = self.keys.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *slot, Arc::clone(&keys))
        };
        Refreshed {
            removed: old.removed_in(&keys),
        }
    }

    /// Reads the source again if `refresh` has passed since the last read (or it was never
    /// read). A source that cannot be read keeps the keys it had, with a warning; `None` when
    /// nothing was read.
    pub async fn refresh_if_due(&self, fetcher: &Fetcher) -> Option<Refreshed> {
        let mut last_fetch = self.last_fetch.lock().await;
        if last_fetch.is_some_and(|t| t.elapsed() < self.refresh) {
            return None;
        }
        let read = match &self.source {
            KeySource::Static => return None,
            KeySource::File(path) => {
                *last_fetch = Some(Instant::now());
                read_file(path)
            }
            KeySource::Url(url) => {
                *last_fetch = Some(Instant::now());
                fetch(fetcher, url).await
            }
        };
        match read {
            Ok(keys) => {
                if keys.is_empty() {
                    warn!(source = ?self.source, "The issuer's JWKS holds no usable key: its tokens will be refused");
                }
                let refreshed = self.replace(keys);
                if !refreshed.removed.is_empty() {
                    info!(source = ?self.source, removed = ?refreshed.removed, "Issuer keys removed from the JWKS no longer verify tokens");
                }
                Some(refreshed)
            }
            Err(e) => {
                warn!(source = ?self.source, error = %e, "Refreshing issuer keys failed; keeping the keys we have");
                self.set_error(Some(e));
                None
            }
        }
    }

    /// The key for `kid`, fetching a URL source if it is unknown (rate-limited).
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
                match fetch(fetcher, url).await {
                    Ok(keys) => {
                        let found = keys.find(kid);
                        self.replace(keys);
                        if let Some(key) = found {
                            return Ok(key);
                        }
                    }
                    Err(e) => {
                        warn!(url, error = %e, "Fetching issuer JWKS failed");
                        let unavailable = AuthError::KeysUnavailable(e.to_string());
                        self.set_error(Some(e));
                        return Err(unavailable);
                    }
                }
            }
        }
        if let Some(e) = self.last_error() {
            return Err(AuthError::KeysUnavailable(e.to_string()));
        }
        Err(match kid {
            Some(kid) => AuthError::UnknownKid(crate::untrusted::claim(kid)),
            None => AuthError::NoKid(self.current().len()),
        })
    }
}

fn read_file(path: &Path) -> Result<KeySet, KeysError> {
    let json = std::fs::read(path).map_err(|e| KeysError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    KeySet::from_json(&json).map_err(|error| KeysError::Format {
        from: path.display().to_string(),
        error,
    })
}

async fn fetch(fetcher: &Fetcher, url: &str) -> Result<KeySet, KeysError> {
    let body = fetcher
        .get(url)
        .await
        .map_err(|e| KeysError::Fetch(e.to_string()))?;
    let keys = KeySet::from_json(&body).map_err(|error| KeysError::Format {
        from: url.to_owned(),
        error,
    })?;
    info!(url, keys = keys.len(), "Fetched issuer JWKS");
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_jwk(kid: &str) -> serde_json::Value {
        use base64::Engine;
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..])})
    }

    #[test]
    fn a_kid_named_twice_refuses_the_whole_set() {
        let set = serde_json::json!({"keys": [ec_jwk("a"), ec_jwk("b"), ec_jwk("a")]});
        let err = KeySet::from_json(set.to_string().as_bytes()).err().unwrap();
        assert_eq!(err, JwksError::DuplicateKid("a".into()));
        let set = serde_json::json!({"keys": [ec_jwk("a"), ec_jwk("b")]});
        assert_eq!(
            KeySet::from_json(set.to_string().as_bytes()).unwrap().len(),
            2
        );
    }

    #[test]
    fn a_kid_with_new_key_material_is_another_key() {
        let (a, b) = (ec_jwk("a"), ec_jwk("b"));
        let old = KeySet::from_json(
            serde_json::json!({"keys": [a.clone(), b]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let new = KeySet::from_json(
            serde_json::json!({"keys": [a, ec_jwk("b"), ec_jwk("c")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(old.removed_in(&new), vec!["b".to_owned()]);
        let b_old = old.find(Some("b")).unwrap();
        assert!(old.still_has(Some("b"), &b_old.thumbprint));
        assert!(!new.still_has(Some("b"), &b_old.thumbprint));
        assert!(new.still_has(Some("a"), &old.find(Some("a")).unwrap().thumbprint));
    }
}
