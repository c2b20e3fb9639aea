//! The trust bundle: the roots and JWT-SVID keys of every authority not retired, with a
//! sequence that goes up on every change of its contents; rendered as PEM (the roots) and as
//! a SPIFFE bundle (a JWK Set of both).

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_SIG_ED25519};
use x509_parser::public_key::PublicKey;

use crate::x509::CertError;

/// The bundle as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Goes up by one on every change of the roots, and never otherwise.
    pub sequence: i64,
    /// Root certificates, PEM, oldest authority first.
    pub roots_pem: Vec<String>,
    /// JWT-SVID signing keys' public halves, oldest authority first.
    pub jwt_keys: Vec<crate::authority::jwt::JwtPublicKey>,
    /// The tainted authorities still in the bundle, oldest first.
    pub tainted: Vec<TaintedAuthority>,
}

/// An authority marked compromised (`root taint`): its root stays in the bundle while its
/// holders renew from the active authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintedAuthority {
    /// Its id.
    pub authority_id: i64,
    /// Its signing certificate, PEM: an agent whose leaf it signed renews at once.
    pub cert_pem: String,
    /// Its root, PEM.
    pub root_pem: String,
    /// Whether every authority in the bundle under that root is tainted.
    pub root_tainted: bool,
    /// Its JWT-SVID key's `kid`, if it has one.
    pub jwt_kid: Option<String>,
}

impl Bundle {
    /// The roots as concatenated PEM (`trust-bundle.pem`).
    pub fn to_pem(&self) -> String {
        self.roots_pem.concat()
    }

    /// The SPIFFE bundle: a JWK Set with one `x509-svid` key per root (`x5c` holding the
    /// root's DER, no `kid`) and one `jwt-svid` key per JWT signing key (with its `kid`),
    /// `spiffe_sequence` and `spiffe_refresh_hint`. The keys of tainted authorities carry
    /// `"tainted": true` (a root only when every authority under it is tainted).
    pub fn to_spiffe_jwks(&self, refresh_hint_secs: i64) -> Result<serde_json::Value, CertError> {
        let mut keys = self
            .roots_pem
            .iter()
            .map(|pem| {
                let mut jwk = root_jwk(&crate::x509::pem_to_der(pem)?)?;
                if self
                    .tainted
                    .iter()
                    .any(|t| t.root_tainted && t.root_pem == *pem)
                {
                    jwk["tainted"] = true.into();
                }
                Ok(jwk)
            })
            .collect::<Result<Vec<_>, CertError>>()?;
        keys.extend(self.jwt_authorities());
        Ok(serde_json::json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        }))
    }
}

impl Bundle {
    /// The JWT-SVID keys as JWKs with their `kid` and `use: jwt-svid`.
    pub fn jwt_authorities(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.jwt_keys.iter().map(|key| {
            let mut jwk = key.jwk.clone();
            jwk["kid"] = key.kid.clone().into();
            jwk["use"] = "jwt-svid".into();
            if self.is_tainted_kid(&key.kid) {
                jwk["tainted"] = true.into();
            }
            jwk
        })
    }

    /// Whether `kid` is a tainted authority's JWT-SVID key.
    pub fn is_tainted_kid(&self, kid: &str) -> bool {
        self.tainted
            .iter()
            .any(|t| t.jwt_kid.as_deref() == Some(kid))
    }

    /// The JWT bundle: a JWK Set of the JWT-SVID keys alone.
    pub fn jwt_jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.jwt_authorities().collect::<Vec<_>>() })
    }
}

/// One root as a JWK: its public key, `use: x509-svid`, and `x5c` with its DER.
fn root_jwk(der: &[u8]) -> Result<serde_json::Value, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::Unparsable(e.to_string()))?;
    let spki = cert.public_key();
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let unsupported = |why: String| CertError::UnsupportedKey(why);
    let mut jwk = match spki.parsed().map_err(|e| unsupported(e.to_string()))? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| unsupported("EC key without a named curve".into()))?;
            let (crv, len) = if curve == OID_EC_P256 {
                ("P-256", 32)
            } else if curve == OID_NIST_EC_P384 {
                ("P-384", 48)
            } else {
                return Err(unsupported(format!("unsupported curve {curve}")));
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(unsupported("EC point is not uncompressed".into()));
            }
            serde_json::json!({
                "kty": "EC", "crv": crv,
                "x": b64(&data[1..=len]), "y": b64(&data[1 + len..]),
            })
        }
        PublicKey::RSA(rsa) => {
            let trim =
                |b: &[u8]| -> Vec<u8> { b.iter().copied().skip_while(|x| *x == 0).collect() };
            serde_json::json!({
                "kty": "RSA", "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent)),
            })
        }
        _ if spki.algorithm.algorithm == OID_SIG_ED25519 => serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64(&spki.subject_public_key.data),
        }),
        _ => return Err(unsupported("unsupported root key type".into())),
    };
    jwk["use"] = "x509-svid".into();
    jwk["x5c"] = serde_json::json!([STANDARD.encode(der)]);
    Ok(jwk)
}

/// The current bundle, from the store.
pub async fn load(store: &crate::store::Store) -> Result<Bundle, crate::store::StoreError> {
    let rows = store.bundle().await?;
    let corrupt = |detail| crate::store::StoreError::Corrupt {
        table: "jwt_keys",
        detail,
    };
    let jwt_keys = rows
        .jwt_keys
        .iter()
        .map(|jwk| crate::authority::jwt::JwtPublicKey::from_stored(jwk))
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    let tainted = rows
        .tainted
        .into_iter()
        .map(|t| {
            let jwt_kid = t
                .jwt_key
                .as_deref()
                .map(crate::authority::jwt::JwtPublicKey::from_stored)
                .transpose()
                .map_err(corrupt)?
                .map(|k| k.kid);
            Ok(TaintedAuthority {
                authority_id: t.authority_id,
                cert_pem: t.cert_pem,
                root_pem: t.root_pem,
                root_tainted: t.root_tainted,
                jwt_kid,
            })
        })
        .collect::<Result<_, crate::store::StoreError>>()?;
    Ok(Bundle {
        sequence: rows.sequence,
        roots_pem: rows.roots,
        jwt_keys,
        tainted,
    })
}

/// `<data-dir>/trust-bundle.pem`.
pub fn bundle_file(data_dir: &Path) -> PathBuf {
    data_dir.join("trust-bundle.pem")
}

/// Rewrites `<data-dir>/trust-bundle.pem` atomically.
pub fn write_bundle_file(data_dir: &Path, bundle: &Bundle) -> std::io::Result<()> {
    crate::files::write_atomic(&bundle_file(data_dir), bundle.to_pem().as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{CaKey, KeyType, root_params};
    use crate::spiffe::TrustDomain;

    #[test]
    fn spiffe_bundle_has_one_x509_svid_key_per_root() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut roots = Vec::new();
        for (id, key_type) in [(1, KeyType::EcP256), (2, KeyType::EcP384)] {
            let key = CaKey::generate(key_type).unwrap();
            let cert = root_params(&td, id, time::OffsetDateTime::now_utc())
                .self_signed(&key)
                .unwrap();
            roots.push(cert.pem());
        }
        let jwt = crate::authority::jwt::JwtKey::generate().unwrap();
        let bundle = Bundle {
            sequence: 7,
            roots_pem: roots.clone(),
            jwt_keys: vec![jwt.public().clone()],
            tainted: Vec::new(),
        };
        let jwks = bundle.to_spiffe_jwks(300).unwrap();
        assert_eq!(jwks["spiffe_sequence"], 7);
        assert_eq!(jwks["spiffe_refresh_hint"], 300);
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2]["use"], "jwt-svid");
        assert_eq!(keys[2]["kid"], jwt.public().kid.as_str());
        assert_eq!(
            (&keys[2]["kty"], &keys[2]["crv"]),
            (&"EC".into(), &"P-256".into())
        );
        let keys = &keys[..2];
        assert_eq!(keys[0]["crv"], "P-256");
        assert_eq!(keys[1]["crv"], "P-384");
        for (key, pem) in keys.iter().zip(&roots) {
            assert_eq!(key["use"], "x509-svid");
            assert!(key.get("kid").is_none());
            let der = STANDARD.decode(key["x5c"][0].as_str().unwrap()).unwrap();
            assert_eq!(der, crate::x509::pem_to_der(pem).unwrap().as_ref());
        }
    }
}
