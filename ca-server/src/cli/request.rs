//! `ca-server request` and `ca-server agent`: the reference proxy-side client. `request`
//! gets one certificate; `agent` keeps it renewed and follows the trust bundle. Both write
//! `cert-chain.pem` (the leaf and any intermediates), `key.pem` (0600) and `root-cert.pem`
//! (the trust bundle: every root peers' certificates may chain to).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient;
use ca_proto::ca::v1::{GetTrustBundleRequest, WatchTrustBundleRequest};
use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use clap::{Args, ValueEnum};
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{parse_duration, read_text};
use crate::x509::{pem_to_der, serial_hex};

/// Key types the client can generate.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum ClientKeyType {
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

/// Flags of `request` and `agent`.
#[derive(Debug, Args)]
pub(super) struct RequestArgs {
    /// The server, e.g. https://127.0.0.1:15012
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    server: String,
    /// CA bundle (PEM) to verify the server with at first, e.g. <data-dir>/trust-bundle.pem
    #[arg(long)]
    ca_bundle: PathBuf,
    /// File holding the service-account token (read again for every request, so a rotated
    /// projected token is picked up)
    #[arg(long)]
    token_file: PathBuf,
    /// Directory to write cert-chain.pem, key.pem and root-cert.pem into
    #[arg(long)]
    out_dir: PathBuf,
    /// Key type to generate
    #[arg(long, value_enum, default_value = "ec-p256")]
    key_type: ClientKeyType,
    /// Requested TTL (absent: the server's default)
    #[arg(long)]
    ttl: Option<String>,
}

impl RequestArgs {
    fn ttl_secs(&self) -> anyhow::Result<i64> {
        match &self.ttl {
            Some(text) => Ok(parse_duration(text)
                .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
                .whole_seconds()),
            None => Ok(0),
        }
    }

    fn token(&self) -> anyhow::Result<Zeroizing<String>> {
        let token = Zeroizing::new(
            read_text(&self.token_file, "--token-file")?
                .trim()
                .to_owned(),
        );
        if token.is_empty() {
            bail!("--token-file {} is empty", self.token_file.display());
        }
        Ok(token)
    }
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
        return crate::x509::pem("PRIVATE KEY", &v1);
    }
    key.serialize_pem()
}

/// A TLS channel to `server`, verifying it against `bundle_pem`.
async fn connect(server: &str, bundle_pem: &str) -> anyhow::Result<Channel> {
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
struct Obtained {
    chain: Vec<String>,
    key_pem: Zeroizing<String>,
    spiffe_id: String,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// Generates a key, sends a CSR with `token`, and checks what comes back.
async fn obtain(
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
        key_pem: Zeroizing::new(private_key_pem(&key)),
        spiffe_id,
        serial: serial_hex(parsed.raw_serial()),
        not_before: parsed.validity().not_before.to_datetime(),
        not_after: parsed.validity().not_after.to_datetime(),
        chain,
    })
}

fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    crate::files::write_atomic(&path, contents, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the key before the certificate, each atomically, so a reader that sees a new
/// certificate also finds its key.
fn write_credentials(dir: &Path, obtained: &Obtained) -> anyhow::Result<()> {
    write_file(dir, "key.pem", obtained.key_pem.as_bytes(), 0o600)?;
    let without_root = &obtained.chain[..obtained.chain.len() - 1];
    write_file(
        dir,
        "cert-chain.pem",
        without_root.concat().as_bytes(),
        0o644,
    )
}

/// Requests one certificate and writes the files.
pub(super) async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let bundle = read_text(&args.ca_bundle, "--ca-bundle")?;
    let channel = connect(&args.server, &bundle).await?;
    let obtained = obtain(
        channel.clone(),
        &args.token()?,
        args.key_type,
        args.ttl_secs()?,
    )
    .await?;
    let roots = TrustBundleServiceClient::new(channel)
        .get_trust_bundle(GetTrustBundleRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("fetching the trust bundle: {}", s.message()))?
        .into_inner()
        .root_certificates;
    write_credentials(&args.out_dir, &obtained)?;
    write_file(
        &args.out_dir,
        "root-cert.pem",
        roots.concat().as_bytes(),
        0o644,
    )?;
    println!(
        "{} serial {} valid until {} -> {}",
        obtained.spiffe_id,
        obtained.serial,
        crate::rfc3339::text(obtained.not_after),
        args.out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// When to renew a certificate received at `received` and valid until `not_after`: between 40%
/// and 50% of that life (`jitter` in [0, 1) picks the point), so a fleet started together does
/// not renew together; never negative.
pub(super) fn renew_in(
    received: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    jitter: f64,
) -> Duration {
    let life = not_after - received;
    let at = received + life * (0.5 - 0.1 * jitter.clamp(0.0, 1.0));
    let wait = at - now;
    if wait.is_negative() {
        Duration::ZERO
    } else {
        wait.unsigned_abs()
    }
}

/// Exponential backoff: 1 s, 2 s, 4 s … up to 30 s.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        wait
    }
}

/// Keeps a certificate renewed and the trust bundle current, reconnecting with backoff.
/// Runs until interrupted.
pub(super) async fn agent(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let mut bundle = read_text(&args.ca_bundle, "--ca-bundle")?;
    let ttl_secs = args.ttl_secs()?;
    let mut current: Option<(OffsetDateTime, OffsetDateTime)> = None;
    let mut backoff = Backoff(Backoff::FIRST);
    loop {
        let session = session(&args, ttl_secs, &mut bundle, &mut current, &mut backoff);
        tokio::select! {
            result = session => {
                if let Err(e) = result {
                    let wait = backoff.next();
                    warn!(error = format!("{e:#}"), retry_in = ?wait, "Agent lost the server");
                    tokio::time::sleep(wait).await;
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// One connection's worth of work: follow the bundle, renew when due.
async fn session(
    args: &RequestArgs,
    ttl_secs: i64,
    bundle: &mut String,
    current: &mut Option<(OffsetDateTime, OffsetDateTime)>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let channel = connect(&args.server, bundle).await?;
    let mut stream = TrustBundleServiceClient::new(channel.clone())
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("watching the trust bundle: {}", s.message()))?
        .into_inner();
    *backoff = Backoff(Backoff::FIRST);
    let jitter: f64 = rand::random();
    loop {
        let wait = match current {
            Some((nb, na)) => renew_in(*nb, *na, OffsetDateTime::now_utc(), jitter),
            None => Duration::ZERO,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let obtained = obtain(channel.clone(), &args.token()?, args.key_type, ttl_secs).await?;
                write_credentials(&args.out_dir, &obtained)?;
                info!(spiffe_id = %obtained.spiffe_id, serial = %obtained.serial, not_after = %crate::rfc3339::text(obtained.not_after), "Renewed the certificate");
                // The life is measured from receipt, not from notBefore: the server backdates
                // notBefore for skewed clocks, and a short certificate would otherwise look
                // half-spent the moment it arrives.
                let received = OffsetDateTime::now_utc().max(obtained.not_before);
                *current = Some((received, obtained.not_after));
            }
            message = stream.message() => {
                let message = message
                    .map_err(|s| anyhow::anyhow!("trust bundle stream: {}", s.message()))?
                    .ok_or_else(|| anyhow::anyhow!("the server closed the trust bundle stream"))?;
                *bundle = message.root_certificates.concat();
                write_file(&args.out_dir, "root-cert.pem", bundle.as_bytes(), 0o644)?;
                info!(sequence = message.sequence, roots = message.root_certificates.len(), "Updated the trust bundle");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renews_between_40_and_50_percent_of_life() {
        let nb = datetime!(2026-01-01 0:00 UTC);
        let na = datetime!(2026-01-01 10:00 UTC);
        assert_eq!(renew_in(nb, na, nb, 0.0), Duration::from_secs(5 * 3600));
        assert_eq!(renew_in(nb, na, nb, 1.0), Duration::from_secs(4 * 3600));
        assert_eq!(
            renew_in(nb, na, datetime!(2026-01-01 6:00 UTC), 0.3),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut b = Backoff(Backoff::FIRST);
        let waits: Vec<u64> = (0..7).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
    }
}
