//! `ca-server agent`: the workload agent (`crate::agent`), with `request`'s flags and the
//! Workload API socket.

use std::process::ExitCode;

use clap::Args;

use super::request::RequestArgs;
use super::{parse_duration, read_text};
use crate::agent::{AgentConfig, socket};

/// Flags of `agent`.
#[derive(Debug, Args)]
pub(super) struct AgentArgs {
    #[command(flatten)]
    request: RequestArgs,
    /// Serve the SPIFFE Workload API and Envoy SDS on this Unix socket, e.g.
    /// unix:///run/spiffe/agent.sock
    /// (with Istio: unix:///var/run/secrets/workload-spiffe-uds/socket)
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: Option<String>,
    /// Open the socket to this group (a name or a GID; mode 0660) rather than to the agent's
    /// user alone (0600)
    #[arg(long, requires = "socket")]
    socket_group: Option<String>,
    /// Answer GET /healthz (JSON: what is served until when, and whether the CA is reached)
    /// on this address, e.g. 127.0.0.1:15021
    #[arg(long)]
    health_listen: Option<std::net::SocketAddr>,
    /// TTL of the JWT-SVIDs the agent asks for, e.g. 5m (absent: the server's default, 5
    /// minutes; at most 1h)
    #[arg(long)]
    jwt_ttl: Option<String>,
}

/// Runs the agent until SIGINT or SIGTERM.
pub(super) async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let request = args.request;
    let config = AgentConfig {
        ca_bundle_pem: read_text(&request.ca_bundle, "--ca-bundle")?,
        ca_bundle_file: request.ca_bundle.clone(),
        ttl_secs: request.ttl_secs()?,
        jwt_ttl_secs: match &args.jwt_ttl {
            Some(text) => parse_duration(text)
                .map_err(|e| anyhow::anyhow!("--jwt-ttl: {e}"))?
                .whole_seconds(),
            None => 0,
        },
        server: request.server,
        token_file: request.token_file,
        out_dir: request.out_dir,
        key_type: request.key_type,
        socket: args.socket.as_deref().map(socket::path_of).transpose()?,
        socket_group: args.socket_group,
        health_listen: args.health_listen,
    };
    crate::agent::run(config).await?;
    Ok(ExitCode::SUCCESS)
}
