//! Where an authority's private key lives, as its row's `key_ref` names it.

use std::fmt;
use std::str::FromStr;

/// Where a key lives: `file:<path under the data dir>`, `sealed:<kek id>` (in the row, under
/// a key-encryption key) or `pkcs11:token=<label>;object=<label>` (in an HSM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A 0600 file, by its path relative to the data dir.
    File(String),
    /// Sealed into the authority's row under the key-encryption key with this id.
    Sealed {
        /// The KEK's id.
        kek: String,
    },
    /// A key pair in a PKCS#11 token.
    Pkcs11 {
        /// The token's label.
        token: String,
        /// The key objects' label.
        object: String,
    },
}

/// A `key_ref` that names no place this build knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported key reference {0:?}")]
pub struct UnknownKeyRef(pub String);

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file:{path}"),
            Self::Sealed { kek } => write!(f, "sealed:{kek}"),
            Self::Pkcs11 { token, object } => write!(f, "pkcs11:token={token};object={object}"),
        }
    }
}

impl FromStr for KeyRef {
    type Err = UnknownKeyRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownKeyRef(s.to_owned());
        let (scheme, rest) = s.split_once(':').ok_or_else(unknown)?;
        match scheme {
            "file" if !rest.is_empty() => Ok(Self::File(rest.to_owned())),
            "sealed" if !rest.is_empty() => Ok(Self::Sealed {
                kek: rest.to_owned(),
            }),
            "pkcs11" => {
                let part = |name: &str| {
                    rest.split(';')
                        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                };
                match (part("token"), part("object")) {
                    (Some(token), Some(object)) => Ok(Self::Pkcs11 { token, object }),
                    _ => Err(unknown()),
                }
            }
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_place_reads_back_as_written() {
        for text in [
            "file:keys/3.key.pem",
            "sealed:5f1c0d2e",
            "pkcs11:token=ca;object=ca-server-authority-3",
        ] {
            let parsed: KeyRef = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            "pkcs11:object=o;token=t".parse::<KeyRef>().unwrap(),
            KeyRef::Pkcs11 {
                token: "t".into(),
                object: "o".into()
            }
        );
        for bad in [
            "",
            "file:",
            "keys/3.key.pem",
            "pkcs11:token=t",
            "s3:bucket/key",
        ] {
            assert!(bad.parse::<KeyRef>().is_err(), "{bad}");
        }
    }
}
