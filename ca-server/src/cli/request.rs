//! `ca-server request`: the reference proxy-side client. It gets one certificate and writes
//! `cert-chain.pem` (the leaf and any intermediates), `key.pem` (0600) and `root-cert.pem`
//! (the trust bundle: every root peers' certificates may chain to). `ca-server agent`
//! (`cli::agent`) takes the same flags and keeps them current.

use std::path::PathBuf;
use std::process::ExitCode;

use ca_proto::ca::v1::GetTrustBundleRequest;
use ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient;
use clap::Args;

use super::{parse_duration, read_text};
use crate::agent::client::{self, ClientKeyType};
use crate::agent::persist;

/// Flags of `request` and `agent`.
#[derive(Debug, Args)]
pub(super) struct RequestArgs {
    /// The server, e.g. https://127.0.0.1:15012
    #[arg(long, default_value = "https://127.0.0.1:15012")]
    pub(super) server: String,
    /// CA bundle (PEM) to verify the server with, e.g. <data-dir>/trust-bundle.pem or a
    /// mounted ConfigMap's file (`agent` reads it again at each reconnection, beside the
    /// bundle it last received)
    #[arg(long)]
    pub(super) ca_bundle: PathBuf,
    /// File holding the service-account token (read again for every request, so a rotated
    /// projected token is picked up)
    #[arg(long)]
    pub(super) token_file: PathBuf,
    /// Directory to write cert-chain.pem, key.pem and root-cert.pem into
    #[arg(long)]
    pub(super) out_dir: PathBuf,
    /// Key type to generate
    #[arg(long, value_enum, default_value = "ec-p256")]
    pub(super) key_type: ClientKeyType,
    /// Requested TTL (absent: the server's default)
    #[arg(long)]
    ttl: Option<String>,
}

impl RequestArgs {
    pub(super) fn ttl_secs(&self) -> anyhow::Result<i64> {
        match &self.ttl {
            Some(text) => Ok(parse_duration(text)
                .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
                .whole_seconds()),
            None => Ok(0),
        }
    }
}

/// Requests one certificate and writes the files.
pub(super) async fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let bundle = read_text(&args.ca_bundle, "--ca-bundle")?;
    let channel = client::connect(&args.server, &bundle).await?;
    let obtained = client::obtain(
        channel.clone(),
        &persist::read_token(&args.token_file)?,
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
    persist::write_credentials(&args.out_dir, &obtained)?;
    persist::write_roots(&args.out_dir, &roots.concat())?;
    println!(
        "{} serial {} valid until {} -> {}",
        obtained.spiffe_id,
        obtained.serial,
        crate::rfc3339::text(obtained.not_after),
        args.out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
