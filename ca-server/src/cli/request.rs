//! `ca-server request`: the reference proxy-side client. Generates a key, sends a CSR with
//! the token, and writes `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use clap::{Args, ValueEnum};
use rcgen::PublicKeyData;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use zeroize::Zeroizing;

use super::{parse_duration, read_text};
use crate::authority::{pem_to_der, serial_hex};

/// Key types the client can generate.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ClientKeyType {
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    Rsa3072,
    #[value(name = "ed25519")]
    Ed25519,
}

/// Flags of `request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The server, e.g. https://127.0.0.1:15012
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    server: String,
    /// CA bundle (PEM) to verify the server with, e.g. <data-dir>/trust-bundle.pem
    #[arg(long)]
    ca_bundle: PathBuf,
    /// File holding the service-account token
    #[arg(long)]
    token_file: PathBuf,
    /// Directory to write cert-chain.pem, key.pem and root-cert.pem into
    #[arg(long)]
    out_dir: PathBuf,
    /// Key type to generate
    #[arg(long, value_enum, default_value = "ec-p256")]
    key_type: ClientKeyType,
    /// Requested TTL (0 or absent: the server's default)
    #[arg(long)]
    ttl: Option<String>,
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

/// The key as PKCS#8 PEM that OpenSSL, BoringSSL and rustls all read. Ed25519 keys come out of
/// the generator as PKCS#8 v2 (with the public key attached), which OpenSSL 3.0 refuses; they
/// are written as v1 (the 32-byte seed alone), which every reader accepts.
fn private_key_pem(key: &rcgen::KeyPair) -> String {
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
        return pem_encode("PRIVATE KEY", &v1);
    }
    key.serialize_pem()
}

/// PEM with 64-column lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Requests a certificate and writes the files.
pub async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let bundle = read_text(&args.ca_bundle, "--ca-bundle")?;
    let token = Zeroizing::new(
        read_text(&args.token_file, "--token-file")?
            .trim()
            .to_owned(),
    );
    if token.is_empty() {
        bail!("--token-file {} is empty", args.token_file.display());
    }
    let ttl_secs = match &args.ttl {
        Some(text) => parse_duration(text)
            .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
            .whole_seconds(),
        None => 0,
    };

    let key = generate_key(args.key_type)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .context("building the CSR")?;

    let uri: tonic::transport::Uri = args
        .server
        .parse()
        .with_context(|| format!("--server {:?} is not a URL", args.server))?;
    let host = uri
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&bundle))
        .domain_name(host);
    let channel = Channel::builder(uri)
        .tls_config(tls)
        .context("TLS configuration")?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl_secs,
        metadata: None,
    });
    let header = format!("Bearer {}", token.as_str())
        .parse()
        .context("the token holds characters not allowed in a header")?;
    request.metadata_mut().insert("authorization", header);
    let response = client.create_certificate(request).await.map_err(|status| {
        anyhow::anyhow!(
            "the server refused: {:?}: {}",
            status.code(),
            status.message()
        )
    })?;
    let chain = response.into_inner().cert_chain;
    let (Some(leaf), Some(root)) = (chain.first(), chain.last()) else {
        bail!("the server answered with an empty chain");
    };
    if chain.len() < 2 {
        bail!("the server answered with a single certificate; expected the leaf and its root");
    }

    // The leaf must certify the key we generated.
    let leaf_der = pem_to_der(leaf).map_err(|e| anyhow::anyhow!("bad leaf: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf_der)
        .map_err(|e| anyhow::anyhow!("bad leaf: {e}"))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the leaf does not certify the key of our CSR");
    }
    let spiffe_id = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })
        .unwrap_or_default();

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let write = |name: &str, contents: &[u8], mode: u32| {
        let path = args.out_dir.join(name);
        crate::files::write_atomic(&path, contents, mode)
            .with_context(|| format!("writing {}", path.display()))
    };
    let key_pem = Zeroizing::new(private_key_pem(&key));
    write("key.pem", key_pem.as_bytes(), 0o600)?;
    write(
        "cert-chain.pem",
        chain[..chain.len() - 1].concat().as_bytes(),
        0o644,
    )?;
    write("root-cert.pem", root.as_bytes(), 0o644)?;

    println!(
        "{spiffe_id} serial {} valid until {} -> {}",
        serial_hex(parsed.raw_serial()),
        parsed.validity().not_after,
        args.out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
