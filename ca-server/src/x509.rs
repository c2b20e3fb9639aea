//! PEM, hex and serials: the text forms of certificates and keys, for every module that reads
//! or writes them (issuance, the bundle, TLS, diagnosis). No key material is kept here; the
//! keys themselves are `authority`'s alone.

use rcgen::SerialNumber;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A PEM text that holds no usable certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// Not even one `CERTIFICATE` block.
    #[error("no certificate in PEM")]
    NoCertificate,
    /// A block that does not decode.
    #[error("bad PEM: {0}")]
    Malformed(String),
}

/// A certificate this server cannot use for what it was given for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Its PEM.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// Its DER does not parse as X.509.
    #[error("the certificate does not parse: {0}")]
    Unparsable(String),
    /// Its public key is of a kind this use does not support.
    #[error("its public key is not usable here: {0}")]
    UnsupportedKey(String),
    /// A TLS or WebPKI library refused it (the message says for what).
    #[error("{0}")]
    Refused(String),
}

/// Decodes the first certificate of a PEM text.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PemError> {
    let mut reader = pem.as_bytes();
    match rustls_pemfile::certs(&mut reader).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(PemError::Malformed(e.to_string())),
        None => Err(PemError::NoCertificate),
    }
}

/// Splits concatenated PEM certificates into one string each.
pub fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in pem.lines() {
        let line = line.trim_end();
        if line.starts_with("-----BEGIN ") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// 128 random bits, positive and non-zero: the first byte is never zero, so the DER integer
/// is 16 or 17 bytes and its hex is always 32 digits.
pub fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    loop {
        rand::fill(&mut bytes);
        if bytes[0] != 0 {
            break;
        }
    }
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// A certificate serial as the audit log writes it: lowercase hex of its bytes, without the
/// sign-padding zero byte that DER adds when the top bit is set.
pub fn serial_hex(der_integer_bytes: &[u8]) -> String {
    let start = der_integer_bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(der_integer_bytes.len());
    hex::encode(&der_integer_bytes[start..])
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// PEM text for `der` under `label` (e.g. `CERTIFICATE`), 64 columns a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    // Sized once: a private key's text is never left behind in a reallocated buffer.
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str(&format!("-----BEGIN {label}-----\n"));
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pem_chains() {
        let text = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n\
                    -----BEGIN CERTIFICATE-----\nBB==\n-----END CERTIFICATE-----\n";
        let parts = split_pem(text);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].contains("BB=="));
    }
}
