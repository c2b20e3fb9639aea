//! The development issuer: a local token issuer whose key lives in the data dir, enabled by
//! `run --dev`, with which `ca-server token issue` mints service-account tokens.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::KeySet;

/// The `iss` of development tokens.
pub const DEV_ISSUER: &str = "ca-server-dev";

/// What went wrong with the development issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    /// Its key file could not be read or written.
    #[error("development issuer key {path}: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Signing a token failed.
    #[error("signing the token failed: {0}")]
    Sign(String),
}

/// The development issuer's key (ES256, P-256).
pub struct DevIssuer {
    key_pem: Zeroizing<String>,
    public_raw: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Claims of a minted token, shaped like a projected Kubernetes service-account token.
#[derive(serde::Serialize)]
struct MintedClaims<'a> {
    iss: &'a str,
    sub: String,
    aud: Vec<&'a str>,
    exp: i64,
    iat: i64,
    nbf: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: serde_json::Value,
}

impl DevIssuer {
    /// Where the key lives: `<data-dir>/dev-issuer/key.pem`.
    pub fn key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("dev-issuer").join("key.pem")
    }

    /// Loads the key, creating it (0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, DevIssuerError> {
        let path = Self::key_path(data_dir);
        let err = |detail: String| DevIssuerError::Key {
            path: path.clone(),
            detail,
        };
        let key_pem = crate::files::read_or_create_private(&path, || {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map(|pair| Zeroizing::new(pair.serialize_pem()))
                .map_err(|e| e.to_string())
        })
        .map_err(err)?;
        let pair = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| err(e.to_string()))?;
        if pair.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(err("not an ECDSA P-256 key".into()));
        }
        let public_raw = pair.public_key_raw().to_vec();
        let kid = hex::encode(&Sha256::digest(&public_raw)[..8]);
        Ok(Self {
            key_pem,
            public_raw,
            kid,
        })
    }

    /// Its key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Its public key as a JWK Set document.
    pub fn jwks_json(&self) -> String {
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        let (x, y) = self.public_raw[1..].split_at(32);
        serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
            }]
        })
        .to_string()
    }

    /// Its public key, for the authenticator.
    pub fn key_set(&self) -> KeySet {
        // Our own JWKS always parses.
        KeySet::from_json(self.jwks_json().as_bytes()).unwrap_or_default()
    }

    /// Mints a token for `namespace`/`service_account`, valid `ttl_secs` from now.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl_secs: i64,
        pod_name: Option<&str>,
    ) -> Result<String, DevIssuerError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut kubernetes = serde_json::json!({
            "namespace": namespace,
            "serviceaccount": { "name": service_account, "uid": uuid_like(namespace, service_account) },
        });
        if let Some(pod) = pod_name {
            kubernetes["pod"] =
                serde_json::json!({ "name": pod, "uid": uuid_like(namespace, pod) });
        }
        let claims = MintedClaims {
            iss: DEV_ISSUER,
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
            aud: vec![audience],
            exp: now + ttl_secs,
            iat: now,
            nbf: now,
            kubernetes,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_pem(self.key_pem.as_bytes())
            .map_err(|e| DevIssuerError::Sign(e.to_string()))?;
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| DevIssuerError::Sign(e.to_string()))
    }
}

/// A stable uid-shaped string for development tokens.
fn uuid_like(a: &str, b: &str) -> String {
    let d = Sha256::digest(format!("{a}/{b}"));
    let h = hex::encode(&d[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
