//! An authority's JWT-SVID signing key: ES256 (P-256, SHA-256, the signature as the fixed 64
//! bytes JWS wants), identified by its RFC 7638 thumbprint, published in the SPIFFE bundle
//! with `use: jwt-svid` for as long as its authority is not retired. A key of its own, not
//! the authority's X.509 key: one key, one protocol.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::{CaKey, KeyError, KeyType};

/// The public half as a JWK (no `kid` or `use`: those are added where it is published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtPublicKey {
    /// RFC 7638 thumbprint, base64url.
    pub kid: String,
    /// `{"crv":"P-256","kty":"EC","x":…,"y":…}`.
    pub jwk: serde_json::Value,
}

/// A JWT-SVID signing key: a P-256 [`CaKey`], so it lives where the authorities' keys do (a
/// 0600 file, sealed under the KEK, or in the PKCS#11 token). Its `Debug` shows the `kid`.
pub struct JwtKey {
    key: CaKey,
    public: JwtPublicKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// The key type every JWT-SVID key has (ES256).
    pub const KEY_TYPE: KeyType = KeyType::EcP256;

    /// `key` as a JWT-SVID key; it must be P-256.
    pub fn new(key: CaKey) -> Result<Self, KeyError> {
        let algorithm = rcgen::PublicKeyData::algorithm(&key);
        let point = key.public_key_raw();
        if algorithm != &rcgen::PKCS_ECDSA_P256_SHA256 || point.len() != 65 || point[0] != 4 {
            return Err(KeyError::Generate("a JWT-SVID key is EC P-256".into()));
        }
        let public = public_key(&point[1..33], &point[33..]);
        Ok(Self { key, public })
    }

    /// A new key held here (tests; the key store makes the ones it keeps).
    pub fn generate() -> Result<Self, KeyError> {
        Self::new(CaKey::generate(Self::KEY_TYPE)?)
    }

    /// The private key, for the key store to keep.
    pub fn key(&self) -> &CaKey {
        &self.key
    }

    /// The public half.
    pub fn public(&self) -> &JwtPublicKey {
        &self.public
    }

    /// Signs `message` (a JWS signing input): the 64-byte `r || s` ES256 wants.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let der = rcgen::SigningKey::sign(&self.key, message)
            .map_err(|e| KeyError::Generate(format!("signing failed: {e}")))?;
        fixed_signature(&der).ok_or_else(|| KeyError::Generate("an unexpected signature".into()))
    }
}

impl JwtKey {
    /// `claims` signed as a JWS in compact serialization, with the header a JWT-SVID has:
    /// `{"alg":"ES256","kid":<this key's>,"typ":"JWT"}`.
    pub fn compact(&self, claims: &serde_json::Value) -> Result<String, KeyError> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.public.kid, "typ": "JWT"});
        let mut out = URL_SAFE_NO_PAD.encode(header.to_string());
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.sign(out.as_bytes())?;
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(out)
    }
}

/// An ECDSA signature as DER (`SEQUENCE { INTEGER r, INTEGER s }`) turned into P-256's
/// fixed 64 bytes, `r || s`, each left-padded to 32.
fn fixed_signature(der: &[u8]) -> Option<Vec<u8>> {
    let (&tag, rest) = der.split_first()?;
    let (&len, body) = rest.split_first()?;
    if tag != 0x30 || usize::from(len) != body.len() || len >= 0x80 {
        return None;
    }
    let mut out = Vec::with_capacity(64);
    let mut body = body;
    for _ in 0..2 {
        let (&tag, rest) = body.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        if tag != 0x02 || rest.len() < len {
            return None;
        }
        let (int, next) = rest.split_at(len);
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        if int.len() > 32 {
            return None;
        }
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        body = next;
    }
    body.is_empty().then_some(out)
}

/// The JWK and its RFC 7638 thumbprint for the point (`x`, `y`).
fn public_key(x: &[u8], y: &[u8]) -> JwtPublicKey {
    let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
    // RFC 7638: the required members only, in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
    JwtPublicKey {
        kid,
        jwk: serde_json::json!({"crv": "P-256", "kty": "EC", "x": x, "y": y}),
    }
}

impl JwtPublicKey {
    /// Parses the JWK as stored; the `kid` is computed again, never trusted from the row.
    pub fn from_stored(jwk: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(jwk).map_err(|e| format!("not JSON: {e}"))?;
        let coordinate = |name: &str| {
            value[name]
                .as_str()
                .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
                .filter(|bytes| bytes.len() == 32)
                .ok_or_else(|| format!("no 32-byte {name}"))
        };
        if value["kty"] != "EC" || value["crv"] != "P-256" {
            return Err("not an EC P-256 key".into());
        }
        Ok(public_key(&coordinate("x")?, &coordinate("y")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn a_key_signs_what_its_published_jwk_verifies_and_is_named_by_its_thumbprint() {
        let key = JwtKey::generate().unwrap();
        let public = key.public().clone();
        // Read back from its PEM and from the stored JWK: the same key, the same kid.
        let pem = key.key().to_pkcs8_pem().unwrap();
        let again = JwtKey::new(CaKey::from_pem(&pem, std::path::Path::new("k")).unwrap()).unwrap();
        assert_eq!(again.public(), &public);
        assert_eq!(
            JwtPublicKey::from_stored(&public.jwk.to_string()).unwrap(),
            public
        );
        // RFC 7638's thumbprint: SHA-256 of the canonical members, base64url.
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            public.jwk["x"].as_str().unwrap(),
            public.jwk["y"].as_str().unwrap()
        );
        assert_eq!(
            public.kid,
            URL_SAFE_NO_PAD.encode(Sha256::digest(canonical))
        );
        let mut point = vec![4u8];
        for c in ["x", "y"] {
            point.extend(
                URL_SAFE_NO_PAD
                    .decode(public.jwk[c].as_str().unwrap())
                    .unwrap(),
            );
        }
        // Many signatures, so r and s with leading zero bytes are among them.
        for i in 0..200u32 {
            let message = format!("header.payload{i}");
            let signature = key.sign(message.as_bytes()).unwrap();
            assert_eq!(signature.len(), 64);
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                .verify(message.as_bytes(), &signature)
                .unwrap();
        }
        assert!(JwtPublicKey::from_stored(r#"{"kty":"RSA"}"#).is_err());
        assert!(JwtKey::new(CaKey::generate(KeyType::EcP384).unwrap()).is_err());
    }

    #[test]
    fn a_compact_jws_verifies_with_the_published_jwk() {
        let key = JwtKey::generate().unwrap();
        let claims = serde_json::json!({"sub": "spiffe://td/ns/a/sa/b", "aud": "x", "exp": 4_000_000_000u64});
        let token = key.compact(&claims).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(key.public().kid.as_str()));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public().jwk.clone()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["x"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims, claims);
        // Another key's signature does not verify.
        let other: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(JwtKey::generate().unwrap().public().jwk.clone()).unwrap();
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                &token,
                &jsonwebtoken::DecodingKey::from_jwk(&other).unwrap(),
                &validation,
            )
            .is_err()
        );
    }

    #[test]
    fn der_signatures_become_fixed_width() {
        // r = 1, s = 0x80 (a leading zero byte keeps it positive in DER).
        let der = [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0x80];
        let fixed = fixed_signature(&der).unwrap();
        assert_eq!(fixed.len(), 64);
        assert_eq!((fixed[31], fixed[63]), (1, 0x80));
        assert!(fixed_signature(&der[..8]).is_none());
        assert!(fixed_signature(&[0x30, 0x00]).is_none());
    }
}
