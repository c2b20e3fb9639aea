//! `ca-server bundle show`: the trust bundle as the server publishes it, read from the store.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};

use super::Common;

/// Output formats of `bundle show`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum BundleFormat {
    /// Concatenated PEM roots (what trust-bundle.pem holds)
    Pem,
    /// The SPIFFE bundle (a JWK Set), as GET /trust-bundle serves it
    Jwks,
}

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Print the current trust bundle
    Show {
        /// Output format
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
}

/// Runs a `bundle` subcommand.
pub(super) async fn bundle(cmd: BundleCommand, common: &Common) -> anyhow::Result<ExitCode> {
    let BundleCommand::Show { format } = cmd;
    let store = super::audit::open(common).await?;
    let bundle = crate::bundle::load(&store).await?;
    match format {
        BundleFormat::Pem => print!("{}", bundle.to_pem()),
        BundleFormat::Jwks => {
            let hint = common.refresh_hint_secs()?;
            let jwks = bundle
                .to_spiffe_jwks(hint)
                .map_err(|e| anyhow::anyhow!("rendering the bundle: {e}"))?;
            println!("{}", serde_json::to_string_pretty(&jwks).context("JSON")?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
