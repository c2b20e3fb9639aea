//! Where authorities' private keys live: files under the data dir (the default, for one
//! server), or sealed into the database under a key-encryption key (KEK) that every replica
//! holds and the database never sees.
//!
//! A sealed key is `v1:` followed by base64 of a random 96-bit nonce and the AES-256-GCM
//! ciphertext of the key's PEM. The associated data names the authority, so a sealed key
//! copied onto another authority's row does not open. The authority's `key_ref` says which
//! KEK sealed it (`sealed:<kek id>`), the id being a short hash of the KEK, so a replica
//! given the wrong KEK says so rather than failing to decrypt.

use super::key_ref::KeyRef;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::jwt::JwtKey;

use super::pkcs11::Token;
use super::{AuthorityError, CaKey, KeyError, KeyType};
use crate::store::{AuthorityRecord, JwtKeyRecord};

/// A key-encryption key: 32 bytes for AES-256-GCM.
pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish()
    }
}

impl Kek {
    /// Reads a KEK file: 32 bytes as base64 (`openssl rand -base64 32`), as 64 hex digits,
    /// or raw. Others may not read it, nor the group write it; the group may read it, as
    /// Kubernetes makes a secret volume's files readable by the pod's `fsGroup`.
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        check_kek_mode(path)?;
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?);
        let key = decode_kek(&bytes).ok_or_else(|| KeyError::Invalid {
            path: path.display().to_string(),
            detail: "a key-encryption key is 32 bytes: base64 (`openssl rand -base64 32`), \
                     64 hex digits, or 32 raw bytes"
                .into(),
        })?;
        Self::new(&key).map_err(|detail| KeyError::Invalid {
            path: path.display().to_string(),
            detail,
        })
    }

    /// A KEK from its 32 bytes.
    pub fn new(key: &[u8; 32]) -> Result<Self, String> {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(b"ca-server key-encryption key\n");
        hasher.update(key);
        let id = hex::encode(&hasher.finalize()[..8]);
        let key = UnboundKey::new(&AES_256_GCM, key).map_err(|e| e.to_string())?;
        Ok(Self {
            key: LessSafeKey::new(key),
            id,
        })
    }

    /// Its id: 16 hex digits of a hash of the key, safe to show and store.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` (a key's PEM) for authority `authority_id`.
    pub fn seal(&self, authority_id: i64, plaintext: &[u8]) -> Result<String, KeyError> {
        self.seal_for(&associated_data(authority_id), plaintext)
    }

    /// Opens what [`Kek::seal`] sealed for `authority_id`; `None` if it does not open (another
    /// KEK, another authority's key, or altered).
    pub fn open(&self, authority_id: i64, sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
        self.open_for(&associated_data(authority_id), sealed)
    }

    /// Seals authority `authority_id`'s JWT-SVID key (bound to that use: it never opens as
    /// the authority's X.509 key, nor the other way round).
    pub fn seal_jwt(&self, authority_id: i64, plaintext: &[u8]) -> Result<String, KeyError> {
        self.seal_for(&jwt_associated_data(authority_id), plaintext)
    }

    /// Opens what [`Kek::seal_jwt`] sealed.
    pub fn open_jwt(&self, authority_id: i64, sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
        self.open_for(&jwt_associated_data(authority_id), sealed)
    }

    fn seal_for(&self, associated: &[u8], plaintext: &[u8]) -> Result<String, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| KeyError::Generate("no randomness for a nonce".into()))?;
        let mut buffer = Zeroizing::new(plaintext.to_vec());
        let in_out: &mut Vec<u8> = &mut buffer;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated),
                in_out,
            )
            .map_err(|_| KeyError::Generate("sealing the key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buffer);
        Ok(format!("v1:{}", STANDARD.encode(out)))
    }

    fn open_for(&self, associated: &[u8], sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
        let bytes = STANDARD.decode(sealed.strip_prefix("v1:")?).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(associated), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

fn check_kek_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o027 != 0 {
        return Err(KeyError::Invalid {
            path: path.display().to_string(),
            detail: format!(
                "a key-encryption key must not be readable by others or writable by the group \
                 (mode {mode:o}): run `chmod 600` on it, or 0440 for a Kubernetes secret volume"
            ),
        });
    }
    Ok(())
}

fn associated_data(authority_id: i64) -> Vec<u8> {
    format!("ca-server authority {authority_id} key").into_bytes()
}

fn jwt_associated_data(authority_id: i64) -> Vec<u8> {
    format!("ca-server authority {authority_id} jwt-svid key").into_bytes()
}

/// The 32 bytes of a KEK file's contents, if they are base64, hex or raw 32 bytes.
fn decode_kek(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 && std::str::from_utf8(bytes).is_err() {
        key.copy_from_slice(bytes);
        return Some(key);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() == 64 && hex::decode_to_slice(text, &mut *key).is_ok() {
        return Some(key);
    }
    let decoded = Zeroizing::new(STANDARD.decode(text).ok()?);
    if decoded.len() != 32 {
        return None;
    }
    key.copy_from_slice(&decoded);
    Some(key)
}

/// Where a new key went: the authority's `key_ref`, and its sealed form when it lives in the
/// database.
#[derive(Debug, Clone)]
pub struct StoredKey {
    /// Where it lives.
    pub key_ref: KeyRef,
    /// The sealed key, for the authority's row.
    pub sealed_key: Option<String>,
}

/// Where authorities' keys are kept and found.
#[derive(Debug)]
pub struct KeyStore {
    data_dir: PathBuf,
    kek: Option<Kek>,
    token: Option<Arc<Token>>,
}

impl KeyStore {
    /// Keys as files under `<data_dir>/keys/`, mode 0600.
    pub fn files(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            kek: None,
            token: None,
        }
    }

    /// New keys sealed into the database under `kek`; keys already in files still load.
    pub fn sealed(data_dir: &Path, kek: Kek) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            kek: Some(kek),
            token: None,
        }
    }

    /// New generated keys made inside `token` (imported keys still go to files or the KEK).
    pub fn with_token(mut self, token: Arc<Token>) -> Self {
        self.token = Some(token);
        self
    }

    /// The key pair labelled `object` in the PKCS#11 token, and the reference to it.
    pub fn in_token(&self, object: &str) -> Result<(CaKey, StoredKey), KeyError> {
        let token = self.token.as_ref().ok_or_else(|| {
            KeyError::Pkcs11(
                "no PKCS#11 token: pass --pkcs11-module, --pkcs11-token and --pkcs11-pin-file"
                    .into(),
            )
        })?;
        let key = token.find(object)?;
        Ok((
            CaKey::from_hsm(key),
            StoredKey {
                key_ref: KeyRef::Pkcs11 {
                    token: token.label().to_owned(),
                    object: object.to_owned(),
                },
                sealed_key: None,
            },
        ))
    }

    /// Generates a key pair in the PKCS#11 token for a CA not yet signed (`root csr`);
    /// returns it and its object label.
    pub fn generate_in_token(&self, key_type: KeyType) -> Result<(CaKey, String), KeyError> {
        let token = self.token.as_ref().ok_or_else(|| {
            KeyError::Pkcs11(
                "`root csr` makes the key in a PKCS#11 token: pass --pkcs11-module, \
                 --pkcs11-token and --pkcs11-pin-file"
                    .into(),
            )
        })?;
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix)
            .map_err(|_| KeyError::Generate("no randomness for a key label".into()))?;
        let object = format!("ca-server-csr-{}", hex::encode(suffix));
        let key = token.generate(&object, key_type)?;
        Ok((CaKey::from_hsm(key), object))
    }

    /// Generates authority `id`'s key: inside the PKCS#11 token if there is one, else here,
    /// kept by [`KeyStore::put`].
    pub fn generate(&self, id: i64, key_type: KeyType) -> Result<(CaKey, StoredKey), KeyError> {
        if let Some(token) = &self.token {
            let object = format!("ca-server-authority-{id}");
            let key = token.generate(&object, key_type)?;
            return Ok((
                CaKey::from_hsm(key),
                StoredKey {
                    key_ref: KeyRef::Pkcs11 {
                        token: token.label().to_owned(),
                        object,
                    },
                    sealed_key: None,
                },
            ));
        }
        let key = CaKey::generate(key_type)?;
        let stored = self.put(id, &key.to_pkcs8_pem()?)?;
        Ok((key, stored))
    }

    /// The KEK, if keys are sealed.
    pub fn kek(&self) -> Option<&Kek> {
        self.kek.as_ref()
    }

    /// Keeps `pem` (a private key) as authority `id`'s key.
    pub fn put(&self, id: i64, pem: &str) -> Result<StoredKey, KeyError> {
        if let Some(kek) = &self.kek {
            return Ok(StoredKey {
                key_ref: KeyRef::Sealed {
                    kek: kek.id().to_owned(),
                },
                sealed_key: Some(kek.seal(id, pem.as_bytes())?),
            });
        }
        let rel = format!("keys/{id}.key.pem");
        let path = self.data_dir.join(&rel);
        crate::files::write_private_new(&path, pem.as_bytes()).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(StoredKey {
            key_ref: KeyRef::File(rel),
            sealed_key: None,
        })
    }

    /// Generates authority `id`'s JWT-SVID signing key (EC P-256) where its X.509 key would
    /// go: in the PKCS#11 token if there is one, else sealed under the KEK, else in a 0600
    /// file. Names are new each time (`…-jwt-<id>-<random>`, `keys/<id>.jwt.<random>.key.pem`)
    /// so an earlier attempt or another replica's never collides.
    pub fn generate_jwt(&self, id: i64) -> Result<(JwtKey, StoredKey), KeyError> {
        let mut suffix = [0u8; 4];
        aws_lc_rs::rand::fill(&mut suffix)
            .map_err(|_| KeyError::Generate("no randomness for a key name".into()))?;
        let suffix = hex::encode(suffix);
        if let Some(token) = &self.token {
            let object = format!("ca-server-jwt-{id}-{suffix}");
            let key = token.generate(&object, JwtKey::KEY_TYPE)?;
            let stored = StoredKey {
                key_ref: KeyRef::Pkcs11 {
                    token: token.label().to_owned(),
                    object,
                },
                sealed_key: None,
            };
            return Ok((JwtKey::new(CaKey::from_hsm(key))?, stored));
        }
        let key = JwtKey::generate()?;
        let pem = key.key().to_pkcs8_pem()?;
        if let Some(kek) = &self.kek {
            let stored = StoredKey {
                key_ref: KeyRef::Sealed {
                    kek: kek.id().to_owned(),
                },
                sealed_key: Some(kek.seal_jwt(id, pem.as_bytes())?),
            };
            return Ok((key, stored));
        }
        let rel = format!("keys/{id}.jwt.{suffix}.key.pem");
        let path = self.data_dir.join(&rel);
        crate::files::write_private_new(&path, pem.as_bytes()).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok((
            key,
            StoredKey {
                key_ref: KeyRef::File(rel),
                sealed_key: None,
            },
        ))
    }

    /// Removes a JWT key file [`KeyStore::generate_jwt`] wrote that was not recorded (another
    /// replica recorded one first). A token object is left: it holds no secret outside it.
    pub fn discard_jwt(&self, stored: &StoredKey) {
        if let KeyRef::File(rel) = &stored.key_ref {
            let _ = std::fs::remove_file(self.data_dir.join(rel));
        }
    }

    /// Loads authority `record.authority_id`'s JWT-SVID key from where its row says it lives.
    pub fn load_jwt(&self, record: &JwtKeyRecord) -> Result<JwtKey, AuthorityError> {
        let id = record.authority_id;
        let fail = |detail: String| AuthorityError::SealedKey {
            id,
            detail: format!("its JWT-SVID key: {detail}"),
        };
        let key_ref = record
            .key_ref
            .parse::<KeyRef>()
            .map_err(|e| fail(e.to_string()))?;
        let key = match key_ref {
            KeyRef::File(rel) => CaKey::read_file(&self.data_dir.join(rel))?,
            KeyRef::Pkcs11 { token, object } => self.load_from_token(id, &token, &object)?,
            KeyRef::Sealed { kek: kek_id } => {
                let kek = self.kek.as_ref().filter(|k| k.id() == kek_id).ok_or_else(|| {
                    fail(format!(
                        "sealed under key-encryption key {kek_id}: pass --key-encryption-key-file with that key"
                    ))
                })?;
                let plain = record
                    .sealed_key
                    .as_deref()
                    .and_then(|sealed| kek.open_jwt(id, sealed))
                    .ok_or_else(|| fail("the sealed key does not open".into()))?;
                let pem = std::str::from_utf8(&plain).map_err(|_| fail("not PEM".into()))?;
                CaKey::from_pem(pem, Path::new("the sealed JWT-SVID key"))?
            }
        };
        Ok(JwtKey::new(key)?)
    }

    /// Loads `record`'s key from wherever its `key_ref` says it lives.
    pub fn load(&self, record: &AuthorityRecord) -> Result<CaKey, AuthorityError> {
        let key_ref =
            record
                .key_ref
                .parse::<KeyRef>()
                .map_err(|_| AuthorityError::UnsupportedKeyRef {
                    id: record.id,
                    key_ref: record.key_ref.clone(),
                })?;
        match key_ref {
            KeyRef::File(rel) => Ok(CaKey::read_file(&self.data_dir.join(rel))?),
            KeyRef::Pkcs11 { token, object } => self.load_from_token(record.id, &token, &object),
            KeyRef::Sealed { kek } => self.open_sealed(record, &kek),
        }
    }

    /// Opens `record`'s key, sealed in its row under the KEK `kek_id`.
    fn open_sealed(&self, record: &AuthorityRecord, kek_id: &str) -> Result<CaKey, AuthorityError> {
        let sealed_error = |detail: String| AuthorityError::SealedKey {
            id: record.id,
            detail,
        };
        let Some(kek) = &self.kek else {
            return Err(sealed_error(format!(
                "its key is sealed in the database under key-encryption key {kek_id}: pass \
                 --key-encryption-key-file with that key"
            )));
        };
        if kek.id() != kek_id {
            return Err(sealed_error(format!(
                "its key is sealed under key-encryption key {kek_id}, but \
                 --key-encryption-key-file holds key {}: give every replica the same KEK",
                kek.id()
            )));
        }
        let sealed = record
            .sealed_key
            .as_deref()
            .ok_or_else(|| sealed_error("its row holds no sealed key".into()))?;
        let pem = kek.open(record.id, sealed).ok_or_else(|| {
            sealed_error(
                "its sealed key does not open with the key-encryption key: it was altered or \
                 belongs to another authority"
                    .into(),
            )
        })?;
        let pem = std::str::from_utf8(&pem)
            .map_err(|_| sealed_error("its sealed key is not a PEM text".into()))?;
        let place = PathBuf::from(format!("the sealed key of authority {}", record.id));
        Ok(CaKey::from_pem(pem, &place)?)
    }
}

impl KeyStore {
    /// Finds the key `object` in the configured token, which must be `token_label`.
    fn load_from_token(
        &self,
        id: i64,
        token_label: &str,
        object: &str,
    ) -> Result<CaKey, AuthorityError> {
        let fail = |detail: String| AuthorityError::SealedKey { id, detail };
        let Some(token) = &self.token else {
            return Err(fail(format!(
                "its key is in PKCS#11 token {token_label:?}: pass --pkcs11-module, \
                 --pkcs11-token and --pkcs11-pin-file"
            )));
        };
        if token.label() != token_label {
            return Err(fail(format!(
                "its key is in PKCS#11 token {token_label:?}, but --pkcs11-token names {:?}",
                token.label()
            )));
        }
        Ok(CaKey::from_hsm(token.find(object)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_jwt_key_is_kept_and_read_back_as_a_file_or_sealed_never_as_an_authority_key() {
        let dir = tempfile::tempdir().unwrap();
        for keys in [
            KeyStore::files(dir.path()),
            KeyStore::sealed(dir.path(), kek(3)),
        ] {
            let (key, stored) = keys.generate_jwt(4).unwrap();
            let record = JwtKeyRecord {
                authority_id: 4,
                key_ref: stored.key_ref.to_string(),
                sealed_key: stored.sealed_key.clone(),
            };
            let loaded = keys.load_jwt(&record).unwrap();
            assert_eq!(loaded.public(), key.public());
            if let Some(sealed) = &stored.sealed_key {
                // Bound to its use and its authority.
                assert!(keys.kek().unwrap().open(4, sealed).is_none());
                assert!(keys.kek().unwrap().open_jwt(5, sealed).is_none());
            } else {
                let path = dir
                    .path()
                    .join(stored.key_ref.to_string().strip_prefix("file:").unwrap());
                assert_eq!(crate::files::too_open(&path).unwrap(), None);
                keys.discard_jwt(&stored);
                assert!(!path.exists());
            }
        }
    }

    #[test]
    fn sealed_keys_open_only_for_their_authority_and_kek() {
        let k = kek(7);
        let sealed = k.seal(3, b"secret pem").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(k.open(3, &sealed).unwrap().as_slice(), b"secret pem");
        assert!(k.open(4, &sealed).is_none(), "another authority's row");
        assert!(kek(8).open(3, &sealed).is_none(), "another KEK");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            k.open(3, std::str::from_utf8(&altered).unwrap()).is_none(),
            "altered"
        );
        assert_ne!(k.seal(3, b"secret pem").unwrap(), sealed, "fresh nonce");
    }

    #[test]
    fn kek_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, "11".repeat(32)).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o440, true),
            (0o640, true),
            (0o604, false),
            (0o660, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = Kek::read_file(&path);
            assert_eq!(result.is_ok(), ok, "mode {mode:o}: {result:?}");
        }
    }

    #[test]
    fn kek_files_in_base64_hex_or_raw() {
        let raw = [0x5au8; 32];
        let b64 = STANDARD.encode(raw);
        let hex = hex::encode(raw);
        for text in [format!("{b64}\n"), hex] {
            assert_eq!(*decode_kek(text.as_bytes()).unwrap(), raw);
        }
        let binary = [0xffu8; 32];
        assert_eq!(*decode_kek(&binary).unwrap(), binary);
        assert!(decode_kek(b"too short").is_none());
        assert!(decode_kek(STANDARD.encode([1u8; 16]).as_bytes()).is_none());
        assert_eq!(kek(1).id(), kek(1).id());
        assert_ne!(kek(1).id(), kek(2).id());
    }
}
