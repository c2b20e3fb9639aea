//! CA keys in a PKCS#11 token (an HSM, or SoftHSM2): generated inside it, marked sensitive
//! and not extractable, and used only through `C_Sign`. An authority's `key_ref` names the
//! token and the key object as an RFC 7512 URI: `pkcs11:token=<label>;object=<label>`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, KeyType as Pkcs11KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{KeyError, KeyType};

/// DER of the P-256 curve's OID (CKA_EC_PARAMS).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of the P-384 curve's OID.
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Which token to use and how to log in.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// A file holding the user PIN.
    pub pin_file: PathBuf,
}

/// An open, logged-in session on the token. Signing goes through one session at a time.
pub struct Token {
    label: String,
    session: Mutex<Session>,
    // Keeps the module loaded for as long as the session lives.
    _context: Pkcs11,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("label", &self.label).finish()
    }
}

fn error(what: &str, e: impl std::fmt::Display) -> KeyError {
    KeyError::Pkcs11(format!("{what}: {e}"))
}

/// Which curve a key is on.
#[derive(Debug, Clone, Copy)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn of(key_type: KeyType) -> Result<Self, KeyError> {
        match key_type {
            KeyType::EcP256 => Ok(Self::P256),
            KeyType::EcP384 => Ok(Self::P384),
            KeyType::Rsa3072 => Err(KeyError::Pkcs11(
                "keys in a PKCS#11 token are EC (ec-p256 or ec-p384) for now".into(),
            )),
        }
    }

    fn params(self) -> &'static [u8] {
        match self {
            Self::P256 => P256_PARAMS,
            Self::P384 => P384_PARAMS,
        }
    }

    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    fn digest(self, msg: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Self::P256 => sha2::Sha256::digest(msg).to_vec(),
            Self::P384 => sha2::Sha384::digest(msg).to_vec(),
        }
    }
}

impl Token {
    /// Loads the module, finds the token by label and logs in with the PIN in the file.
    pub fn open(config: &Pkcs11Config) -> Result<Arc<Self>, KeyError> {
        let context = Pkcs11::new(&config.module)
            .map_err(|e| error(&format!("loading {}", config.module.display()), e))?;
        context
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| error("initializing the PKCS#11 module", e))?;
        let slots = context
            .get_slots_with_token()
            .map_err(|e| error("listing tokens", e))?;
        let mut labels = Vec::new();
        let mut found = None;
        for slot in slots {
            let info = context
                .get_token_info(slot)
                .map_err(|e| error("reading a token", e))?;
            if info.label().trim() == config.token {
                found = Some(slot);
                break;
            }
            labels.push(info.label().trim().to_owned());
        }
        let slot = found.ok_or_else(|| {
            KeyError::Pkcs11(format!(
                "no token labelled {:?} in {} (tokens: {})",
                config.token,
                config.module.display(),
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ))
        })?;
        let pin = read_pin(&config.pin_file)?;
        let session = context
            .open_rw_session(slot)
            .map_err(|e| error("opening a session", e))?;
        session
            .login(UserType::User, Some(&pin))
            .map_err(|e| error(&format!("logging in to token {:?}", config.token), e))?;
        Ok(Arc::new(Self {
            label: config.token.clone(),
            session: Mutex::new(session),
            _context: context,
        }))
    }

    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generates a key pair labelled `object` in the token: the private half sensitive, not
    /// extractable, for signing only.
    pub fn generate(self: &Arc<Self>, object: &str, key_type: KeyType) -> Result<HsmKey, KeyError> {
        let curve = Curve::of(key_type)?;
        let label = object.as_bytes().to_vec();
        let public_template = [
            Attribute::Token(true),
            Attribute::Verify(true),
            Attribute::EcParams(curve.params().to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(label.clone()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label.clone()),
            Attribute::Id(label),
        ];
        let (public, private) = self
            .session()
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| error("generating a key in the token", e))?;
        let point = self.ec_point(public)?;
        Ok(HsmKey {
            token: Arc::clone(self),
            handle: private,
            curve,
            public: point,
        })
    }

    /// The key pair labelled `object`.
    pub fn find(self: &Arc<Self>, object: &str) -> Result<HsmKey, KeyError> {
        let label = object.as_bytes().to_vec();
        let one = |class: ObjectClass| -> Result<ObjectHandle, KeyError> {
            let found = self
                .session()
                .find_objects(&[Attribute::Class(class), Attribute::Label(label.clone())])
                .map_err(|e| error("searching the token", e))?;
            found.first().copied().ok_or_else(|| {
                KeyError::Pkcs11(format!(
                    "token {:?} holds no {} labelled {object:?}",
                    self.label,
                    if class == ObjectClass::PRIVATE_KEY {
                        "private key"
                    } else {
                        "public key"
                    }
                ))
            })
        };
        let private = one(ObjectClass::PRIVATE_KEY)?;
        let public = one(ObjectClass::PUBLIC_KEY)?;
        let attributes = self
            .session()
            .get_attributes(public, &[AttributeType::KeyType, AttributeType::EcParams])
            .map_err(|e| error("reading the public key", e))?;
        let mut curve = None;
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(t) if t != Pkcs11KeyType::EC => {
                    return Err(KeyError::Pkcs11(format!(
                        "key {object:?} in token {:?} is not an EC key",
                        self.label
                    )));
                }
                Attribute::EcParams(p) if p == P256_PARAMS => curve = Some(Curve::P256),
                Attribute::EcParams(p) if p == P384_PARAMS => curve = Some(Curve::P384),
                _ => {}
            }
        }
        let curve = curve.ok_or_else(|| {
            KeyError::Pkcs11(format!(
                "key {object:?} in token {:?} is on a curve other than P-256 or P-384",
                self.label
            ))
        })?;
        Ok(HsmKey {
            token: Arc::clone(self),
            handle: private,
            curve,
            public: self.ec_point(public)?,
        })
    }

    /// The public point (uncompressed) of a public key object.
    fn ec_point(&self, public: ObjectHandle) -> Result<Vec<u8>, KeyError> {
        let attributes = self
            .session()
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(|e| error("reading the public key", e))?;
        let der = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| KeyError::Pkcs11("the public key has no EC point".into()))?;
        unwrap_octet_string(&der)
            .ok_or_else(|| KeyError::Pkcs11("the public key's EC point is malformed".into()))
    }
}

/// CKA_EC_POINT holds the point as a DER OCTET STRING; some modules give the raw point.
fn unwrap_octet_string(der: &[u8]) -> Option<Vec<u8>> {
    // Already an uncompressed point (04 || X || Y): 65 bytes for P-256, 97 for P-384. (The
    // DER forms are 67 and 99 bytes.)
    if der.first() == Some(&0x04) && (der.len() == 65 || der.len() == 97) {
        return Some(der.to_vec());
    }
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else if len == 0x81 {
        let (&l, rest) = rest.split_first()?;
        (usize::from(l), rest)
    } else {
        return None;
    };
    (rest.len() == len).then(|| rest.to_vec())
}

fn read_pin(path: &Path) -> Result<AuthPin, KeyError> {
    super::check_private(path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?,
    );
    Ok(AuthPin::from(text.trim().to_owned()))
}

/// A key pair in the token.
pub struct HsmKey {
    token: Arc<Token>,
    handle: ObjectHandle,
    curve: Curve,
    public: Vec<u8>,
}

impl HsmKey {
    /// The uncompressed public point.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The signature algorithm it signs with.
    pub fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.curve.algorithm()
    }

    /// Signs `msg` (hashed here, signed in the token), DER-encoded as X.509 wants it.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest = self.curve.digest(msg);
        let raw = self
            .token
            .session()
            .sign(&Mechanism::Ecdsa, self.handle, &digest)
            .map_err(|e| error("signing in the token", e))?;
        der_signature(&raw)
            .ok_or_else(|| KeyError::Pkcs11("the token returned a malformed signature".into()))
    }
}

/// `r || s` (PKCS#11's ECDSA output) as the DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn der_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let integer = |bytes: &[u8]| {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        let bytes = &bytes[start..];
        let mut out = vec![0x02];
        let pad = bytes[0] & 0x80 != 0;
        out.push(u8::try_from(bytes.len() + usize::from(pad)).unwrap_or(0));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(bytes);
        out
    };
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30];
    if body.len() < 0x80 {
        out.push(u8::try_from(body.len()).ok()?);
    } else {
        out.extend([0x81, u8::try_from(body.len()).ok()?]);
    }
    out.extend(body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_signatures_become_der() {
        // r with its high bit set gets a zero pad; s with leading zeros loses them.
        let mut raw = vec![0x80; 32];
        raw.extend([0u8; 31]);
        raw.push(0x01);
        let der = der_signature(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x21, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(der_signature(&[1, 2, 3]).is_none());
    }

    #[test]
    fn ec_points_are_unwrapped() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut der = vec![0x04, 65];
        der.extend(&point);
        assert_eq!(unwrap_octet_string(&der).unwrap(), point);
        assert_eq!(unwrap_octet_string(&point).unwrap(), point);
        assert!(unwrap_octet_string(&[0x04, 5, 1]).is_none());
    }
}
