//! The agent's side of the CA: a TLS channel verified against the bundle, a fresh key and CSR
//! for each certificate, and the checks on what comes back. `ca-server request` uses it too.

use anyhow::{Context, bail};
use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use clap::ValueEnum;
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use zeroize::Zeroizing;

use crate::x509::{pem_to_der, serial_hex};

/// Key types the client can generate.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ClientKeyType {
    /// ECDSA P-256
    #[value(name = "ec-p256")]
    EcP256,
    /// ECDSA P-384
    #[value(name = "ec-p384")]
    EcP384,
    /// RSA 2048
    #[value(name = "rsa-2048")]
    Rsa2048,
    /// RSA 3072
    #[value(name = "rsa-3072")]
    Rsa3072,
    /// Ed25519
    #[value(name = "ed25519")]
    Ed25519,
}

fn generate_key(kind: ClientKeyType) -> anyhow::Result<rcgen::KeyPair> {
    let pair = match kind {
        ClientKeyType::EcP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        ClientKeyType::EcP384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        ClientKeyType::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
        ClientKeyType::Rsa2048 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
        ClientKeyType::Rsa3072 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
        }
    };
    pair.context("generating the key")
}

/// The key as PKCS#8 DER that OpenSSL, BoringSSL, rustls and Python's `cryptography` all read.
/// Ed25519 keys come out of the generator as PKCS#8 v2 (with the public key attached), which
/// OpenSSL 3.0 refuses; they are given as v1 (the 32-byte seed alone), which every reader
/// accepts.
fn private_key_der(key: &rcgen::KeyPair) -> Zeroizing<Vec<u8>> {
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = key.serialized_der();
    if der.len() >= 48 && der[..16] == V2_PREFIX {
        let mut v1 = Zeroizing::new(V1_PREFIX.to_vec());
        v1.extend_from_slice(&der[16..48]);
        return v1;
    }
    Zeroizing::new(der.to_vec())
}

/// A TLS channel to `server`, verifying it against `bundle_pem`.
pub async fn connect(server: &str, bundle_pem: &str) -> anyhow::Result<Channel> {
    let uri: tonic::transport::Uri = server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    let host = uri
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name(host);
    Channel::builder(uri)
        .tls_config(tls)
        .context("TLS configuration")?
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))
}

/// A certificate and its key, as obtained.
pub struct Obtained {
    /// PEM, leaf first, root last (as the CA answers).
    pub chain: Vec<String>,
    /// PKCS#8 DER.
    pub key_der: Zeroizing<Vec<u8>>,
    /// The leaf's URI SAN.
    pub spiffe_id: String,
    /// The leaf's serial, hex.
    pub serial: String,
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's validity.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Obtained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Obtained")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Generates a key, sends a CSR with `token`, and checks what comes back.
pub async fn obtain(
    channel: Channel,
    token: &str,
    key_type: ClientKeyType,
    ttl_secs: i64,
) -> anyhow::Result<Obtained> {
    let key = generate_key(key_type)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .context("building the CSR")?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl_secs,
        metadata: None,
    });
    let header = format!("Bearer {token}")
        .parse()
        .context("the token holds characters not allowed in a header")?;
    request.metadata_mut().insert("authorization", header);
    let response = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the server refused: {:?}: {}",
                status.code(),
                status.message()
            )
        })?;
    let chain = response.into_inner().cert_chain;
    if chain.len() < 2 {
        bail!(
            "the server answered with {} certificate(s); expected the leaf, any intermediates and the root",
            chain.len()
        );
    }
    // The leaf must certify the key we generated.
    let leaf_der = pem_to_der(&chain[0]).map_err(|e| anyhow::anyhow!("bad leaf: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf_der)
        .map_err(|e| anyhow::anyhow!("bad leaf: {e}"))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the leaf does not certify the key of our CSR");
    }
    let spiffe_id = crate::spiffe::SpiffeId::from_certificate(&leaf_der)
        .map(|id| id.to_string())
        .unwrap_or_default();
    Ok(Obtained {
        key_der: private_key_der(&key),
        spiffe_id,
        serial: serial_hex(parsed.raw_serial()),
        not_before: parsed.validity().not_before.to_datetime(),
        not_after: parsed.validity().not_after.to_datetime(),
        chain,
    })
}
