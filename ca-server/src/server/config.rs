//! What `start` is given: the settings `run` resolved from flags, the config file and
//! defaults, the limits that are not settings, and why a start can fail.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::ConnectionLimits;
use crate::audit::CheckpointError;
use crate::auth::dev::DevIssuerError;
use crate::authority::AuthorityError;
use crate::issuance::LeafPolicy;
use crate::issuance::LimitSettings;
use crate::spiffe::TrustDomain;
use crate::store::StoreError;

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum IssuerKeysFrom {
    /// A JWKS file, read at start.
    File(PathBuf),
    /// A JWKS URL, fetched and refreshed.
    Url(String),
}

/// A configured token issuer.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The `iss` it signs with.
    pub issuer: String,
    /// Where its keys come from.
    pub keys: IssuerKeysFrom,
    /// How often its keys are read again.
    pub refresh: Duration,
    /// The `clusterid` that selects it, for several clusters.
    pub cluster_id: Option<String>,
    /// The Kubernetes API of its cluster, for the node check of its callers.
    pub api: IssuerApi,
}

/// Which Kubernetes API can say where an issuer's callers run.
#[derive(Debug, Clone)]
pub enum IssuerApi {
    /// The server's own (`--kube-api-url`, or in-cluster): the issuer is this cluster's.
    Local,
    /// One of its own (a `[[token_issuers]]` entry with `kube_api_url`).
    Own(crate::kube::KubeApi),
    /// None: its callers may not ask for other identities.
    None,
}

/// Everything `run` needs, resolved from flags, the config file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Keys, the bundle file and (by default) the database live here.
    pub data_dir: PathBuf,
    /// The database.
    pub database_url: String,
    /// Where authority keys are kept.
    pub keys: Arc<crate::authority::KeyStore>,
    /// gRPC + HTTPS (TLS).
    pub grpc_listen: SocketAddr,
    /// Plain HTTP: health.
    pub http_listen: SocketAddr,
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
    /// DNS names and IPs of the server's own certificate.
    pub server_names: Vec<String>,
    /// The `iss` of JWT-SVIDs, where OIDC discovery is served.
    pub jwt_issuer: String,
    /// Accepted token issuers (besides the development one).
    pub issuers: Vec<IssuerSettings>,
    /// Accepted token audiences.
    pub audiences: Vec<String>,
    /// The Kubernetes API, when something needs it.
    pub kube_api: Option<crate::kube::KubeApi>,
    /// Tokens no issuer claims go to the API's TokenReview.
    pub token_review: bool,
    /// The most TokenReviews waiting for the API server at once.
    pub max_token_reviews: usize,
    /// Service accounts whose callers may ask for other identities (node proxies).
    pub trusted_node_accounts: Vec<crate::auth::node::NodeAccount>,
    /// Without the Kubernetes API, let them have any identity in the trust domain.
    pub impersonation_without_node_check: bool,
    /// The ConfigMap to publish the bundle into, in every namespace.
    pub publish_configmap: Option<String>,
    /// Pod certificates: the signer name this server answers PodCertificateRequests for,
    /// and who is refused.
    pub pod_certificates: Option<PodCertificateSettings>,
    /// How long before an authority's expiry it is warned about.
    pub expiry_warning: time::Duration,
    /// Extra CA (PEM file) trusted when fetching JWKS URLs.
    pub jwks_ca_file: Option<PathBuf>,
    /// Enables the development issuer.
    pub dev: bool,
    /// TTL rules.
    pub leaf_policy: LeafPolicy,
    /// How often bundle pollers should check again.
    pub bundle_refresh_hint: time::Duration,
    /// SPIFFE IDs allowed to query the audit log over gRPC (with mTLS).
    pub auditors: Vec<crate::spiffe::SpiffeId>,
    /// How often the audit log's head is signed into a checkpoint (if it moved).
    pub checkpoint_interval: Duration,
    /// Abuse limits.
    pub limits: LimitSettings,
    /// Open connections allowed on each listener.
    pub connections: ConnectionLimits,
}

/// The largest gRPC request message: a CSR at its limit plus room for the metadata.
pub const MAX_REQUEST_BYTES: usize = crate::issuance::MAX_CSR_BYTES + 16 * 1024;

/// The largest JWT-SVID request: its most audiences at their longest, with room to spare.
pub const MAX_JWT_REQUEST_BYTES: usize = 8 * 1024;

/// The largest header block a request may send (the token is at most 16 KiB).
pub const MAX_HEADER_BYTES: u32 = 32 * 1024;

/// How many requests may wait for the crypto pool. At about 10,000 issuances a second, a
/// full queue drains in a fifth of a second; beyond it, callers are told to retry at once.
pub const CRYPTO_QUEUE: usize = 2048;

/// How often a server polls the store for authority changes (made by the CLI or another
/// replica): changes reach every server within two polls.
pub const STORE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How many audit events may wait for the writer.
pub const AUDIT_QUEUE: usize = 16 * 1024;

/// Why the server did not start. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No issuer and no `--dev`.
    #[error(
        "no token issuer is configured, so no caller could be authenticated: pass \
         --token-issuer ISS with --token-jwks-file FILE or --token-jwks-url URL (the cluster's \
         service-account issuer), or --dev for a local development issuer"
    )]
    NoIssuer,
    /// An issuer's JWKS file does not load.
    #[error("token issuer configuration: {0}")]
    TokenKeys(#[source] crate::auth::jwks::KeysError),
    /// The extra CA for JWKS URLs does not load.
    #[error("token issuer configuration: --token-jwks-ca {}: {source}", .path.display())]
    JwksCa {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The client for JWKS URLs could not be built.
    #[error("token issuer configuration: {0}")]
    Fetcher(#[source] crate::outbound::Error),
    /// The development issuer's key.
    #[error("the development issuer: {0}")]
    DevIssuer(#[from] DevIssuerError),
    /// The audit key.
    #[error("the audit key: {0}")]
    AuditKey(#[from] CheckpointError),
    /// A Kubernetes API client (for TokenReview, the node check or the ConfigMaps) could not
    /// be built.
    #[error("{0}")]
    Kube(#[from] crate::kube::Error),
    /// The data dir could not be created.
    #[error("data dir {}: {source}", .path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The authority.
    #[error("{0}")]
    Authority(#[from] AuthorityError),
    /// The descriptors for server reflection did not load (a build problem).
    #[error("gRPC server reflection: {0}")]
    Reflection(String),
    /// The server's certificate.
    #[error("{0}")]
    ServerCert(#[from] super::tls::ServerCertError),
    /// The bundle file.
    #[error("writing {}: {source}", .path.display())]
    BundleFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The crypto pool's threads could not start.
    #[error("starting the crypto threads: {0}")]
    Threads(std::io::Error),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// `--pod-certificate-signer` and its companions.
#[derive(Debug, Clone)]
pub struct PodCertificateSettings {
    /// The signer name, e.g. `example.com/spiffe`.
    pub signer: String,
    /// Namespaces whose pods are denied.
    pub excluded_namespaces: Vec<String>,
    /// Service accounts (namespace, name) denied.
    pub excluded_accounts: Vec<(String, String)>,
    /// Publish the bundle as a ClusterTrustBundle for the signer.
    pub publish_cluster_trust_bundle: bool,
    /// The `timeoutSeconds` asked of each watch (whole seconds; a second at least).
    pub watch_timeout: std::time::Duration,
}
