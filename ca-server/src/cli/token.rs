//! `ca-server token issue`: mint a development service-account token.

use std::process::ExitCode;

use clap::Subcommand;

use super::{Common, parse_duration};
use crate::auth::dev::DevIssuer;

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Mint a token with the development issuer (the server must run with --dev)
    Issue {
        /// The service account's namespace
        #[arg(long)]
        namespace: String,
        /// The service account
        #[arg(long)]
        service_account: String,
        /// How long the token is valid
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The token's audience
        #[arg(long, default_value = "istio-ca")]
        audience: String,
        /// A pod name to put in the kubernetes.io claim
        #[arg(long)]
        pod_name: Option<String>,
    },
}

/// Runs a `token` subcommand; prints the token on stdout.
pub(super) fn token(cmd: TokenCommand, common: &Common) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue {
            namespace,
            service_account,
            ttl,
            audience,
            pod_name,
        } => {
            let ttl = parse_duration(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            if ttl <= time::Duration::ZERO {
                anyhow::bail!("--ttl must be positive");
            }
            for (flag, value) in [
                ("--namespace", &namespace),
                ("--service-account", &service_account),
            ] {
                if value.is_empty() || value.contains(['/', ':']) {
                    anyhow::bail!("{flag} {value:?} is not a Kubernetes name");
                }
            }
            std::fs::create_dir_all(&common.data_dir)?;
            let issuer = DevIssuer::load_or_create(&common.data_dir)?;
            let token = issuer.mint(
                &namespace,
                &service_account,
                &audience,
                ttl.whole_seconds(),
                pod_name.as_deref(),
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
