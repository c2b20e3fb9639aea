//! The running server: start-up, the TLS listener (gRPC and HTTPS on one port), the plain
//! HTTP health listener, certificate renewal, and shutdown.

mod audit_service;
mod ca;
pub mod configmap;
mod grpc;
mod http;
pub mod limits;
mod listener;
mod pool;
mod publish;
pub mod status;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ca_proto::ca::v1::audit_service_server::AuditServiceServer;
use ca_proto::ca::v1::trust_bundle_service_server::TrustBundleServiceServer;
use ca_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use ca::{Active, CertificateAuthority, CsrRequest, LimitSettings};
pub use grpc::{PeerAddr, PeerCertificate, PeerIdentity};
pub use http::Readiness;
pub use listener::ConnectionLimits;
pub use tls::{SERVER_CERT_TTL, renew_in};

use crate::audit::{AuditKey, AuditLog, operator_name, record_checkpoint};
use crate::auth::dev::{DEV_ISSUER, DevIssuer};
use crate::auth::{Authenticator, Fetcher, IssuerKeys, TokenIssuer};
use crate::authority::{self, Authority, AuthorityError, KeyType};
use crate::bundle;
use crate::issuance::LeafPolicy;
use crate::spiffe::TrustDomain;
use crate::store::{AuthorityState, AuthorityVersion, EventKind, EventRow, Store, StoreError};

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

/// The largest header block a request may send (the token is at most 16 KiB).
pub const MAX_HEADER_BYTES: u32 = 32 * 1024;

/// How many requests may wait for the crypto pool. At about 10,000 issuances a second, a
/// full queue drains in a fifth of a second; beyond it, callers are told to retry at once.
pub const CRYPTO_QUEUE: usize = 2048;

/// How often a server polls the store for authority changes (made by the CLI or another
/// replica): changes reach every server within two polls.
pub const STORE_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    /// The issuer configuration is wrong.
    #[error("token issuer configuration: {0}")]
    Issuer(String),
    /// The data dir could not be created.
    #[error("data dir {path}: {source}")]
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
    ServerCert(#[from] tls::ServerCertError),
    /// The bundle file.
    #[error("writing {path}: {source}")]
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

/// A started server.
pub struct RunningServer {
    /// Where gRPC/HTTPS listens.
    pub grpc_addr: SocketAddr,
    /// Where health listens.
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    audit: AuditLog,
    store: Store,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish (up to 10 s), commits what the audit
    /// writer holds (up to 5 s more), and closes the store.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            warn!("Shutdown timed out; dropping remaining connections");
        }
        if tokio::time::timeout(Duration::from_secs(5), self.audit.close())
            .await
            .is_err()
        {
            error!("The audit writer did not finish within 5 s of shutdown");
        }
        self.store.close().await;
        info!("Shut down");
    }
}

/// Loads the active authority, creating the first root if the store has none.
async fn active_authority(store: &Store, settings: &Settings) -> Result<Authority, StartError> {
    if store.active_authority().await?.is_none() {
        if !store.authorities().await?.is_empty() {
            return Err(AuthorityError::NoneActive.into());
        }
        let mut event = EventRow::new(EventKind::Authority);
        event.operator = Some(operator_name());
        event.reason = Some(format!(
            "created self-signed root for {} on first start and activated it",
            settings.trust_domain
        ));
        let id = authority::create_self_signed_root(
            store,
            &settings.keys,
            &settings.trust_domain,
            KeyType::EcP256,
            AuthorityState::Active,
            event,
        )
        .await?;
        info!(authority_id = id, "Created the first root");
    }
    let record = store
        .active_authority()
        .await?
        .ok_or(AuthorityError::NoneActive)?;
    Ok(Authority::load(&record, &settings.keys)?)
}

fn build_authenticator(settings: &Settings) -> Result<Authenticator, StartError> {
    let mut issuers = Vec::new();
    for issuer in &settings.issuers {
        let keys = match &issuer.keys {
            IssuerKeysFrom::File(path) => {
                IssuerKeys::from_file(path, issuer.refresh).map_err(StartError::Issuer)?
            }
            IssuerKeysFrom::Url(url) => IssuerKeys::from_url(url.clone(), issuer.refresh),
        };
        issuers.push(
            TokenIssuer::new(issuer.issuer.clone(), settings.audiences.clone(), keys)
                .for_cluster(issuer.cluster_id.clone()),
        );
    }
    if settings.dev {
        let dev = DevIssuer::load_or_create(&settings.data_dir)
            .map_err(|e| StartError::Issuer(e.to_string()))?;
        warn!(
            issuer = DEV_ISSUER,
            "Development issuer enabled: anyone who can read the data dir can mint tokens"
        );
        issuers.push(TokenIssuer::new(
            DEV_ISSUER.to_owned(),
            settings.audiences.clone(),
            IssuerKeys::fixed(dev.key_set()),
        ));
    }
    if issuers.is_empty() && !settings.token_review {
        return Err(StartError::NoIssuer);
    }
    let extra_ca =
        match &settings.jwks_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                StartError::Issuer(format!("--token-jwks-ca {}: {e}", path.display()))
            })?),
            None => None,
        };
    let fetcher = Fetcher::new(extra_ca.as_deref()).map_err(StartError::Issuer)?;
    let authn = Authenticator::new(settings.trust_domain.clone(), issuers, fetcher);
    Ok(
        match settings.kube_api.as_ref().filter(|_| settings.token_review) {
            Some(api) => {
                info!(api = %api.url, "Tokens no issuer claims go to the Kubernetes TokenReview API");
                authn.with_reviewer(
                    crate::auth::review::TokenReviewer::new(
                        api.clone(),
                        settings.audiences.clone(),
                        settings.max_token_reviews,
                    )
                    .map_err(StartError::Issuer)?,
                )
            }
            None => authn,
        },
    )
}

/// Who may ask for identities other than their own, and how that is checked for the callers
/// of each cluster; says so in the log, with a warning where the check is off or impossible.
fn impersonation_policy(
    settings: &Settings,
) -> Result<crate::auth::node::ImpersonationPolicy, StartError> {
    use crate::auth::node::{ClusterCheck, ImpersonationPolicy, NodeAuthorizer, NodeCheck};
    let trusted = settings.trusted_node_accounts.clone();
    let td = settings.trust_domain.clone();
    if trusted.is_empty() {
        if settings.impersonation_without_node_check {
            warn!(
                "--allow-impersonation-without-node-check has no effect without \
                 --trusted-node-account"
            );
        }
        return Ok(ImpersonationPolicy::nobody(td));
    }
    let names = trusted
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let authorizer = |api: &crate::kube::KubeApi| {
        NodeAuthorizer::new(api.clone())
            .map(|a| NodeCheck::Api(Arc::new(a)))
            .map_err(StartError::Issuer)
    };
    let local = match &settings.kube_api {
        Some(api) => {
            info!(
                trusted_node_accounts = %names,
                api = %api.url,
                "Node proxies may ask for the identities of pods on their own node, checked \
                 through the Kubernetes API"
            );
            authorizer(api)?
        }
        None if settings.impersonation_without_node_check => {
            warn!(
                trusted_node_accounts = %names,
                "Impersonation WITHOUT node check: these accounts may get a certificate for any \
                 identity in the trust domain; give the server the Kubernetes API to check \
                 that the identity runs on the caller's node"
            );
            NodeCheck::Skipped
        }
        None => {
            warn!(
                trusted_node_accounts = %names,
                "Trusted node accounts are configured but the Kubernetes API is not: their \
                 requests for other identities will be refused; give the server the API \
                 (--kube-api-url) or pass --allow-impersonation-without-node-check"
            );
            NodeCheck::Unavailable
        }
    };
    // The local cluster's issuers (the flags' issuer, the development one, TokenReview)
    // share its check; each other cluster is checked against its own API, or not at all.
    let local_check = |check: &NodeCheck| match check {
        NodeCheck::Api(a) => NodeCheck::Api(Arc::clone(a)),
        NodeCheck::Skipped => NodeCheck::Skipped,
        NodeCheck::Unavailable => NodeCheck::Unavailable,
        NodeCheck::Unreachable => NodeCheck::Unreachable,
    };
    let mut clusters = std::collections::HashMap::new();
    let mut local_issuers: Vec<String> = vec![DEV_ISSUER.to_owned()];
    if let Some(api) = &settings.kube_api {
        local_issuers.push(crate::auth::review::issuer_name(&api.url));
    }
    for issuer in &settings.issuers {
        let cluster = match &issuer.cluster_id {
            Some(id) => format!("{id} (issuer {})", issuer.issuer),
            None => issuer.issuer.clone(),
        };
        let check = match &issuer.api {
            IssuerApi::Local => {
                local_issuers.push(issuer.issuer.clone());
                continue;
            }
            IssuerApi::Own(api) => authorizer(api)?,
            IssuerApi::None if settings.impersonation_without_node_check => NodeCheck::Skipped,
            IssuerApi::None => {
                warn!(
                    cluster = %cluster,
                    "This cluster's node proxies may not ask for other identities: its \
                     [[token_issuers]] entry gives no Kubernetes API to check their nodes with \
                     (kube_api_url)"
                );
                NodeCheck::Unreachable
            }
        };
        clusters.insert(issuer.issuer.clone(), ClusterCheck { cluster, check });
    }
    for issuer in local_issuers {
        clusters.insert(
            issuer.clone(),
            ClusterCheck {
                cluster: issuer,
                check: local_check(&local),
            },
        );
    }
    Ok(ImpersonationPolicy::new(td, trusted, clusters))
}

/// Starts the server: binds both listeners, opens the store, loads (or creates) the
/// authority, mints the server's certificate, writes the bundle file.
pub async fn start(settings: Settings) -> Result<RunningServer, StartError> {
    create_data_dir(&settings.data_dir)?;
    let authn = build_authenticator(&settings)?;
    // Bound before anything is written, so a port in use stops a first start before it
    // creates a root. Connections wait in the backlog until the server serves.
    let grpc_listener = bind(settings.grpc_listen).await?;
    let http_listener = bind(settings.http_listen).await?;
    let store = Store::open(&settings.database_url).await?;
    let audit = AuditLog::start(store.clone(), 16 * 1024);
    let readiness = Arc::new(Readiness::default());

    let authority = Arc::new(active_authority(&store, &settings).await?);
    readiness.authority.store(true, Ordering::Release);
    info!(authority_id = authority.id(), subject = authority.subject(), not_after = %authority.not_after(), "Loaded the active authority");

    let bundle = bundle::load(&store).await?;
    bundle::write_bundle_file(&settings.data_dir, &bundle).map_err(|source| {
        StartError::BundleFile {
            path: bundle::bundle_file(&settings.data_dir),
            source,
        }
    })?;
    readiness.bundle_file.store(true, Ordering::Release);

    let audit_key = AuditKey::load_or_create(&settings.data_dir)
        .map_err(|e| StartError::Issuer(e.to_string()))?;

    let server_cert = tls::mint_server_cert(&authority, &settings.server_names, &audit).await?;
    // The log as it stands at start is signed before any request can move its head, so an
    // auditor's first checkpoint of this run never covers a request of it.
    sign_checkpoint(&store, &audit_key)
        .instrument(info_span!("checkpoints"))
        .await;
    // Likewise an expiry warning is in the log before the server reports ready.
    check_expiry(&store, settings.expiry_warning)
        .instrument(info_span!("expiry"))
        .await;
    let (cert_tx, cert_rx) = watch::channel(Arc::clone(&server_cert.certified));

    let version = store.authority_version().await?;
    let issuers = client_issuers(&store).await?;
    let (active_tx, active_rx) = watch::channel(Arc::new(Active::new(
        Arc::clone(&authority),
        bundle,
        &issuers,
    )?));
    let client_verifier = tls::AuthorityClientVerifier::new(active_rx.clone());
    let tls_config = tls::server_config(cert_rx, Arc::new(client_verifier));
    let pool = pool::CryptoPool::per_core(CRYPTO_QUEUE).map_err(StartError::Threads)?;
    let authn = Arc::new(authn);
    let ca = Arc::new(CertificateAuthority::new(
        Arc::clone(&authn),
        impersonation_policy(&settings)?,
        audit.clone(),
        settings.leaf_policy,
        active_rx.clone(),
        pool,
        settings.limits,
    ));
    let refusals_ca = Arc::clone(&ca);
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: settings.grpc_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: settings.http_listen,
            source,
        })?;

    let hint = settings.bundle_refresh_hint.whole_seconds();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Server reflection: grpcurl and friends can list and call the services without .proto files.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ca_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let app = tonic::service::Routes::new(
        IstioCertificateServiceServer::new(grpc::CertificateService::new(ca))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        TrustBundleServiceServer::new(grpc::BundleService::new(
            active_rx.clone(),
            settings.trust_domain.clone(),
            hint,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        AuditServiceServer::new(audit_service::RemoteAudit::new(
            store.clone(),
            settings.auditors.clone(),
            active_rx.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(health_service)
    .add_service(reflection)
    .into_axum_router()
    .merge(publish::bundle_routes(active_rx.clone(), hint));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let shutdown_rx_for_refusals = shutdown_rx.clone();
    let mut tasks = JoinSet::new();
    let grpc_gate = listener::Gate::new(settings.connections);
    tasks.spawn(
        listener::serve_tls(
            grpc_listener,
            tls_config,
            listener::Serving {
                app,
                gate: Arc::clone(&grpc_gate),
                shutdown: shutdown_rx.clone(),
            },
        )
        .instrument(info_span!("grpc", addr = %grpc_addr)),
    );
    readiness.grpc.store(true, Ordering::Release);
    let health = http::health_routes(Arc::clone(&readiness));
    tasks.spawn(
        refresh_keys(Arc::clone(&authn), shutdown_rx.clone()).instrument(info_span!("token_keys")),
    );
    tasks.spawn(
        warn_of_expiry(store.clone(), settings.expiry_warning, shutdown_rx.clone())
            .instrument(info_span!("expiry")),
    );
    if let (Some(name), Some(api)) = (&settings.publish_configmap, &settings.kube_api) {
        let client = crate::kube::KubeClient::new(api.clone()).map_err(StartError::Issuer)?;
        info!(configmap = %name, api = %api.url, "Publishing the trust bundle into every namespace");
        tasks.spawn(
            configmap::publish_configmaps(
                client,
                name.clone(),
                active_rx.clone(),
                shutdown_rx.clone(),
            )
            .instrument(info_span!("configmaps")),
        );
    }
    tasks.spawn(renew_server_cert(
        server_cert.clone(),
        active_rx,
        settings.server_names.clone(),
        audit.clone(),
        cert_tx,
        shutdown_rx.clone(),
    ));
    tasks.spawn(
        checkpoints(
            store.clone(),
            audit_key,
            settings.checkpoint_interval,
            shutdown_rx.clone(),
        )
        .instrument(info_span!("checkpoints")),
    );
    tasks.spawn(
        follow_store(
            store.clone(),
            settings.data_dir.clone(),
            Arc::clone(&settings.keys),
            version,
            active_tx,
            Arc::clone(&readiness),
            shutdown_rx.clone(),
        )
        .instrument(info_span!("follow_store")),
    );

    // What the health listener serves is known before it serves.
    readiness.check(&store, &audit).await;
    http::refresh_store_gauges(&store, settings.expiry_warning).await;
    tasks.spawn(
        health_checks(
            health_reporter,
            Arc::clone(&readiness),
            store.clone(),
            audit.clone(),
            settings.expiry_warning,
            grpc_gate,
            shutdown_rx_for_refusals.clone(),
        )
        .instrument(info_span!("health")),
    );
    let mut refusals_shutdown = shutdown_rx_for_refusals;
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => refusals_ca.flush_refusals(false).await,
                _ = async { let _ = refusals_shutdown.wait_for(|stop| *stop).await; } => {
                    refusals_ca.flush_refusals(true).await;
                    return;
                }
            }
        }
    });

    info!(grpc = %grpc_addr, http = %http_addr, trust_domain = %settings.trust_domain, "Listening");
    // The health listener serves last: once `/readyz` answers, everything above is done and
    // logged.
    tasks.spawn(
        listener::serve_plain(
            http_listener,
            listener::Serving {
                app: health,
                gate: listener::Gate::new(settings.connections),
                shutdown: shutdown_rx,
            },
        )
        .instrument(info_span!("health_listener", addr = %http_addr)),
    );
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        shutdown,
        tasks,
        audit,
        store,
    })
}

fn create_data_dir(path: &std::path::Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Renews the server's certificate at half its life (retrying every 30 s on failure), and
/// re-mints it whenever another authority becomes active, so that clients that trust only the
/// new root can connect once the old one is retired.
async fn renew_server_cert(
    mut current: tls::ServerCert,
    mut active: watch::Receiver<Arc<Active>>,
    names: Vec<String>,
    audit: AuditLog,
    certs: watch::Sender<Arc<rustls::sign::CertifiedKey>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut signer = active.borrow().authority.id();
    let mut wait = renew_in(
        current.minted_at,
        &current.validity,
        time::OffsetDateTime::now_utc(),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = active.changed() => {
                if changed.is_err() {
                    return;
                }
                if active.borrow_and_update().authority.id() == signer {
                    continue;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let authority = Arc::clone(&active.borrow().authority);
        match tls::mint_server_cert(&authority, &names, &audit).await {
            Ok(cert) => {
                info!(authority_id = authority.id(), not_after = %cert.validity.not_after, "Minted a new server certificate");
                signer = authority.id();
                certs.send_replace(Arc::clone(&cert.certified));
                current = cert;
                wait = renew_in(
                    current.minted_at,
                    &current.validity,
                    time::OffsetDateTime::now_utc(),
                );
            }
            Err(e) => {
                error!(error = %e, "Minting the server certificate failed; retrying in 30 s");
                wait = Duration::from_secs(30);
            }
        }
    }
}

/// Once a second: checks the store and the audit log for `/readyz` (which answers from what
/// this finds), sets the store's gauges for `/metrics`, and keeps `grpc.health.v1.Health` in
/// step: SERVING when ready, NOT_SERVING otherwise and from shutdown on, for the server as a
/// whole ("") and the CSR service.
async fn health_checks(
    reporter: tonic_health::server::HealthReporter,
    readiness: Arc<Readiness>,
    store: Store,
    audit: AuditLog,
    expiry_warning: time::Duration,
    grpc_connections: Arc<listener::Gate>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    const CSR_SERVICE: &str = "istio.v1.auth.IstioCertificateService";
    loop {
        let status = if readiness.not_ready().is_empty() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", CSR_SERVICE] {
            reporter.set_service_status(name, status).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                for name in ["", CSR_SERVICE] {
                    reporter.set_service_status(name, ServingStatus::NotServing).await;
                }
                return;
            }
        }
        readiness.check(&store, &audit).await;
        http::refresh_store_gauges(&store, expiry_warning).await;
        crate::metrics::metrics()
            .connections_open
            .set(i64::try_from(grpc_connections.open()).unwrap_or(i64::MAX));
    }
}

/// Reads the issuers' JWKS again as their refresh comes due (see
/// [`Authenticator::refresh_keys`]); the first pass, at start, fetches JWKS URLs.
async fn refresh_keys(authn: Arc<Authenticator>, mut shutdown: watch::Receiver<bool>) {
    loop {
        authn.refresh_keys().await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The signing certificates (PEM) of the authorities not retired: who may have issued a
/// client certificate this server accepts.
async fn client_issuers(store: &Store) -> Result<Vec<String>, StoreError> {
    Ok(store
        .authorities()
        .await?
        .into_iter()
        .filter(|a| a.state != AuthorityState::Retired)
        .map(|a| a.cert_pem)
        .collect())
}

/// Signs the audit log's head into a checkpoint every `interval` (when it moved); `start`
/// signs the first.
async fn checkpoints(
    store: Store,
    key: AuditKey,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        sign_checkpoint(&store, &key).await;
    }
}

/// Signs the audit log's head if it moved since the last checkpoint. A failure is logged, not
/// fatal: the next interval tries again, and the log itself is unharmed.
async fn sign_checkpoint(store: &Store, key: &AuditKey) {
    match record_checkpoint(store, key).await {
        Ok(Some(cp)) => debug!(seq = cp.seq, "Signed an audit checkpoint"),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "Signing an audit checkpoint failed"),
    }
}

/// Polls the store for authority changes made by the CLI (or another server) and publishes
/// them: the new signer, the new bundle, and `trust-bundle.pem`. The one writer of `active`.
async fn follow_store(
    store: Store,
    data_dir: PathBuf,
    keys: Arc<crate::authority::KeyStore>,
    mut version: AuthorityVersion,
    active: watch::Sender<Arc<Active>>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    // On PostgreSQL a change made through any replica or the CLI is announced; the poll
    // stays as the fallback should the listening connection drop.
    let mut listener = match store.authority_listener().await {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "Listening for authority changes failed; polling only");
            None
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(STORE_POLL_INTERVAL) => {}
            notified = next_notification(&mut listener) => {
                if let Err(e) = notified {
                    warn!(error = %e, "Listening for authority changes failed; polling only");
                    listener = None;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let current = match store.authority_version().await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "Polling the store for authority changes failed");
                continue;
            }
        };
        if current == version {
            continue;
        }
        match reload(&store, &data_dir, &keys, current, &active).await {
            Ok(()) => {
                readiness.authority.store(true, Ordering::Release);
                version = current;
            }
            Err(e) => {
                // Keep signing with what we have; retry on the next poll.
                error!(error = %e, "Applying an authority change failed; retrying");
                if current.active.is_none() {
                    readiness.authority.store(false, Ordering::Release);
                }
            }
        }
    }
}

/// How often the authorities' expiry is checked (and warned about, while it is near).
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Logs a warning, hourly, for each authority in the bundle that expires within `window`
/// (`start` makes the first check itself, before it serves). `/readyz` stays green: the
/// server still works; `/metrics` (`ca_authority_expiring`) and `root status --check` carry
/// it to monitoring.
async fn warn_of_expiry(store: Store, window: time::Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_CHECK_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        check_expiry(&store, window).await;
    }
}

/// One check of [`warn_of_expiry`].
async fn check_expiry(store: &Store, window: time::Duration) {
    match store.authorities().await {
        Ok(authorities) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for e in crate::diagnose::expiry::expiring(&authorities, now, window) {
                warn!(authority_id = e.id, state = %e.state, "{e}");
            }
        }
        Err(e) => warn!(error = %e, "Reading the authorities to check their expiry failed"),
    }
}

/// The next authority change announced to `listener`; never, without one.
async fn next_notification(
    listener: &mut Option<sqlx::postgres::PgListener>,
) -> Result<(), sqlx::Error> {
    match listener {
        Some(listener) => listener.recv().await.map(drop),
        None => std::future::pending().await,
    }
}

async fn reload(
    store: &Store,
    data_dir: &std::path::Path,
    keys: &crate::authority::KeyStore,
    version: AuthorityVersion,
    active: &watch::Sender<Arc<Active>>,
) -> Result<(), StartError> {
    let current = Arc::clone(&active.borrow());
    let authority = match version.active {
        Some(id) if id == current.authority.id() => Arc::clone(&current.authority),
        Some(_) => {
            let record = store
                .active_authority()
                .await?
                .ok_or(AuthorityError::NoneActive)?;
            Arc::new(Authority::load(&record, keys)?)
        }
        None => return Err(AuthorityError::NoneActive.into()),
    };
    let bundle = bundle::load(store).await?;
    if bundle.sequence != current.bundle.sequence {
        bundle::write_bundle_file(data_dir, &bundle).map_err(|source| StartError::BundleFile {
            path: bundle::bundle_file(data_dir),
            source,
        })?;
    }
    let issuers = client_issuers(store).await?;
    info!(
        authority_id = authority.id(),
        bundle_sequence = version.sequence,
        roots = bundle.roots_pem.len(),
        authorities = issuers.len(),
        "Applied an authority change"
    );
    active.send_replace(Arc::new(Active::new(authority, bundle, &issuers)?));
    Ok(())
}
