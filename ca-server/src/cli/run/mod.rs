//! `ca-server run`.

mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tracing::info;

pub(crate) use settings::settings;

use super::Common;
use crate::server;

/// Flags of `run`. Each may also be set in the config file (same name, `_` for `-`).
#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// gRPC and HTTPS listener (TLS) [default: 127.0.0.1:15012]
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Plain HTTP listener for /healthz and /readyz [default: 127.0.0.1:15014]
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// The mesh's trust domain [default: cluster.local]
    #[arg(long)]
    trust_domain: Option<String>,
    /// DNS name or IP of this server, for its own certificate (repeatable)
    /// [default: localhost, 127.0.0.1]
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// The `iss` of the JWT-SVIDs this CA signs, an https URL where its OIDC discovery
    /// document is served (`<URL>/.well-known/openid-configuration`)
    /// [default: https://<first --server-name>:<--grpc-listen's port>]
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// The `iss` of accepted service-account tokens
    #[arg(long)]
    token_issuer: Option<String>,
    /// The issuer's JWKS, as the API server serves it at /openid/v1/jwks
    #[arg(long)]
    token_jwks_file: Option<PathBuf>,
    /// URL of the issuer's JWKS (fetched, cached, refetched on an unknown kid)
    #[arg(long)]
    token_jwks_url: Option<String>,
    /// Extra CA certificate (PEM) trusted when fetching --token-jwks-url
    #[arg(long)]
    token_jwks_ca: Option<PathBuf>,
    /// How often the issuers' JWKS (file or URL) are read again: a key removed from them
    /// stops verifying then, and tokens it verified are forgotten [default: 5m]
    #[arg(long)]
    token_jwks_refresh: Option<String>,
    /// Accepted token audience (repeatable) [default: istio-ca]
    #[arg(long = "token-audience")]
    token_audiences: Vec<String>,
    /// Have the Kubernetes API server check tokens (TokenReview) that no --token-issuer
    /// claims; in a pod it is found as client-go finds it, elsewhere give --kube-api-url
    #[arg(long)]
    token_review: bool,
    /// The most TokenReviews waiting for the API server at once; more are refused with
    /// RESOURCE_EXHAUSTED [default: 32]
    #[arg(long)]
    max_token_reviews: Option<usize>,
    /// The Kubernetes API server, e.g. https://10.0.0.1:6443 [default: in-cluster]
    #[arg(long)]
    kube_api_url: Option<String>,
    /// File holding this server's own token for the API server (re-read on each use)
    /// [default: the pod's service-account token]
    #[arg(long)]
    kube_token_file: Option<PathBuf>,
    /// The CA (PEM) that signed the API server's certificate [default: the pod's ca.crt]
    #[arg(long)]
    kube_ca_file: Option<PathBuf>,
    /// Warn (log, /metrics ca_authority_expiring) when an authority in the bundle expires
    /// within this long [default: 30d]
    #[arg(long)]
    expiry_warning: Option<String>,
    /// Publish the trust bundle (PEM, key root-cert.pem) into a ConfigMap of this name in
    /// every namespace, as istiod does with istio-ca-root-cert; uses the Kubernetes API as
    /// --token-review does
    #[arg(long)]
    publish_configmap: Option<String>,
    /// Sign Kubernetes PodCertificateRequests (1.35+) for this signer name, a name of your
    /// choosing under a domain you own, e.g. example.com/spiffe: each pod gets
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>; uses the Kubernetes API
    #[arg(long, value_name = "DOMAIN/NAME")]
    pod_certificate_signer: Option<String>,
    /// Deny pod certificates to pods in this namespace (repeatable)
    #[arg(long = "pod-certificate-exclude-namespace", value_name = "NS")]
    pod_certificate_exclude_namespaces: Vec<String>,
    /// Deny pod certificates to this service account (repeatable)
    #[arg(long = "pod-certificate-exclude-service-account", value_name = "NS/SA")]
    pod_certificate_exclude_service_accounts: Vec<String>,
    /// Publish the trust bundle's roots as a ClusterTrustBundle for the
    /// --pod-certificate-signer, for clusterTrustBundle projections
    #[arg(long)]
    publish_cluster_trust_bundle: bool,
    /// How long the API server is asked to keep a PodCertificateRequest watch open before
    /// it is opened again; a watch silent for a quarter longer is given up as dead.
    /// Shorten it when a proxy or load balancer before the API server cuts idle
    /// connections sooner [default: 5m]
    #[arg(long, value_name = "DURATION")]
    pod_certificate_watch_timeout: Option<String>,
    /// TTL of a certificate when the request asks for none [default: 1h]
    #[arg(long)]
    default_ttl: Option<String>,
    /// Largest TTL a request may ask for [default: 24h]
    #[arg(long)]
    max_ttl: Option<String>,
    /// How often bundle pollers should check for changes (the SPIFFE refresh hint)
    /// [default: 5m]
    #[arg(long)]
    bundle_refresh_hint: Option<String>,
    /// SPIFFE ID allowed to query the audit log over gRPC with mTLS (repeatable)
    #[arg(long = "auditor")]
    auditors: Vec<String>,
    /// How often the audit log's head is signed into a checkpoint [default: 1m]
    #[arg(long)]
    audit_checkpoint_interval: Option<String>,
    /// Certificates one SPIFFE ID may get per second, on average; 0 for no limit
    /// [default: 100]
    #[arg(long)]
    identity_rate: Option<f64>,
    /// Certificates one SPIFFE ID may get at once, beyond its rate [default: 1000]
    #[arg(long)]
    identity_burst: Option<f64>,
    /// Failed authentications one peer address may make per second before its requests are
    /// refused unread; 0 for no limit [default: 5]
    #[arg(long)]
    unauthenticated_rate: Option<f64>,
    /// Failed authentications one peer address may make at once [default: 50]
    #[arg(long)]
    unauthenticated_burst: Option<f64>,
    /// Open connections the gRPC/HTTPS listener (and, separately, the health listener)
    /// accepts in all; more are closed at once [default: 20000]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Open connections one peer address (IPv6: one /64) may hold on each listener; sized
    /// for a node's pods behind one SNAT address [default: 1000]
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// A connection with no request and no stream in progress this long is closed (clients
    /// reconnect when they next need to) [default: 2m]
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Service account NS/SA whose callers may ask for other identities through
    /// ImpersonatedIdentity: a node proxy such as Istio's ztunnel (istio-system/ztunnel);
    /// repeatable. With the Kubernetes API, only for pods on the caller's own node
    #[arg(long = "trusted-node-account", value_name = "NS/SA")]
    trusted_node_accounts: Vec<String>,
    /// Without Kubernetes API access, let trusted node accounts have any identity in the
    /// trust domain (no node check): a compromised node proxy could then get every identity
    #[arg(long)]
    allow_impersonation_without_node_check: bool,
    /// Add a local development token issuer (see `ca-server token issue`)
    #[arg(long)]
    dev: bool,
}

/// The `run` keys of the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRunConfig {
    grpc_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    trust_domain: Option<String>,
    server_name: Option<Vec<String>>,
    jwt_issuer: Option<String>,
    token_issuer: Option<String>,
    token_jwks_file: Option<PathBuf>,
    token_jwks_url: Option<String>,
    token_jwks_ca: Option<PathBuf>,
    token_jwks_refresh: Option<String>,
    token_audience: Option<Vec<String>>,
    token_issuers: Option<Vec<FileIssuer>>,
    token_review: Option<bool>,
    max_token_reviews: Option<usize>,
    kube_api_url: Option<String>,
    kube_token_file: Option<PathBuf>,
    kube_ca_file: Option<PathBuf>,
    publish_configmap: Option<String>,
    pod_certificate_signer: Option<String>,
    pod_certificate_exclude_namespace: Option<Vec<String>>,
    pod_certificate_exclude_service_account: Option<Vec<String>>,
    publish_cluster_trust_bundle: Option<bool>,
    pod_certificate_watch_timeout: Option<String>,
    expiry_warning: Option<String>,
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    bundle_refresh_hint: Option<String>,
    auditor: Option<Vec<String>>,
    audit_checkpoint_interval: Option<String>,
    identity_rate: Option<f64>,
    identity_burst: Option<f64>,
    unauthenticated_rate: Option<f64>,
    unauthenticated_burst: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    idle_timeout: Option<String>,
    trusted_node_account: Option<Vec<String>>,
    allow_impersonation_without_node_check: Option<bool>,
    dev: Option<bool>,
}

/// One entry of the config file's `[[token_issuers]]`: a cluster whose tokens are accepted,
/// for meshes spanning several clusters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIssuer {
    /// The tokens' `iss`.
    issuer: String,
    /// The issuer's JWKS file.
    jwks_file: Option<PathBuf>,
    /// The issuer's JWKS URL.
    jwks_url: Option<String>,
    /// The `clusterid` proxies of that cluster send (Istio's `CLUSTER_ID`); requests naming
    /// it are checked against this issuer only.
    cluster_id: Option<String>,
    /// How often its JWKS is read again (default: `token_jwks_refresh`).
    jwks_refresh: Option<String>,
    /// That cluster's Kubernetes API, so that its node proxies' requests for other
    /// identities can be checked there (without it they are refused).
    kube_api_url: Option<String>,
    /// This server's token for that API.
    kube_token_file: Option<PathBuf>,
    /// The CA (PEM) of that API server's certificate.
    kube_ca_file: Option<PathBuf>,
}

impl FileRunConfig {
    /// The config file's bundle refresh hint, if it names one.
    pub(super) fn bundle_refresh_hint(&self) -> Option<&str> {
        self.bundle_refresh_hint.as_deref()
    }

    /// The config file's trust domain, if it names one.
    pub(super) fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub(super) async fn run(args: RunArgs, common: Common) -> anyhow::Result<ExitCode> {
    let settings = settings(args, common)?;
    let running = server::start(settings).await?;
    wait_for_signal().await.context("waiting for a signal")?;
    info!("Shutting down");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}
