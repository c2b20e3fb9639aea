//! What `start` builds before anything serves: the data dir, the listeners, the first root
//! (on a first start), the authenticator, the impersonation policy and the gRPC routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ca_proto::ca::v1::audit_service_server::AuditServiceServer;
use ca_proto::ca::v1::jwt_svid_service_server::JwtSvidServiceServer;
use ca_proto::ca::v1::trust_bundle_service_server::TrustBundleServiceServer;
use ca_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::config::{
    AUDIT_QUEUE, IssuerApi, IssuerKeysFrom, MAX_JWT_REQUEST_BYTES, MAX_REQUEST_BYTES, Settings,
    StartError,
};
use super::http::Readiness;
use super::{Active, CertificateAuthority, audit_service, grpc, publish, tasks, tls};
use crate::audit::{AuditKey, AuditLog, operator_name};
use crate::audit::{EventKind, EventRow};
use crate::auth::dev::{DEV_ISSUER, DevIssuer};
use crate::auth::node::{ClusterCheck, ImpersonationPolicy, NodeAuthorizer, NodeCheck};
use crate::auth::{Authenticator, Fetcher, IssuerId, IssuerKeys, TokenIssuer};
use crate::authority::{self, Authority, AuthorityError, KeyType};
use crate::bundle;
use crate::store::{AuthorityState, AuthorityVersion, Store};

pub(super) fn create_data_dir(path: &std::path::Path) -> Result<(), StartError> {
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

/// How many connections may wait to be accepted. Pods starting together open their
/// connections within milliseconds of each other; with the common default of 128 the rest of
/// their SYNs are dropped and retried a second later. The kernel caps this at
/// `net.core.somaxconn` (4096 on current kernels), which is what Go's listeners ask for too.
const LISTEN_BACKLOG: u32 = 65_535;

pub(super) fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    // As std's bind does: a restarted server binds at once, whatever TIME_WAIT remains.
    #[cfg(unix)]
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Both listeners, bound, and where they listen (the port chosen, for port 0).
pub(super) struct Listeners {
    /// gRPC and HTTPS.
    pub grpc: TcpListener,
    /// Where it listens.
    pub grpc_addr: SocketAddr,
    /// Plain HTTP: health.
    pub http: TcpListener,
    /// Where it listens.
    pub http_addr: SocketAddr,
}

impl Listeners {
    /// Binds `--grpc-listen` and `--http-listen`.
    pub(super) fn bind(settings: &Settings) -> Result<Self, StartError> {
        let grpc = bind(settings.grpc_listen)?;
        let http = bind(settings.http_listen)?;
        Ok(Self {
            grpc_addr: local_addr(&grpc, settings.grpc_listen)?,
            http_addr: local_addr(&http, settings.http_listen)?,
            grpc,
            http,
        })
    }
}

/// What start-up opened and made before anything serves.
pub(super) struct Opened {
    /// The store.
    pub store: Store,
    /// Its audit writer.
    pub audit: AuditLog,
    /// What `/readyz` answers from.
    pub readiness: Arc<Readiness>,
    /// The key checkpoints are signed with.
    pub audit_key: AuditKey,
    /// The server's own certificate.
    pub server_cert: tls::ServerCert,
    /// The authorities as `active` was built from them.
    pub version: AuthorityVersion,
    /// The signer and bundle, published (its one writer: the store follower).
    pub active_tx: watch::Sender<Arc<Active>>,
}

/// Opens the store and its audit writer, loads (or on a first start creates) the active
/// authority, writes `trust-bundle.pem`, mints the server's certificate, signs the log's
/// head and checks expiry, so that all of it is done, and logged, before anything serves.
pub(super) async fn open(settings: &Settings) -> Result<Opened, StartError> {
    let store = Store::open(&settings.database_url).await?;
    let audit = AuditLog::start(store.clone(), AUDIT_QUEUE).map_err(StartError::Threads)?;
    let readiness = Arc::new(Readiness::default());
    let authority = Arc::new(active_authority(&store, settings).await?);
    readiness.authority.store(true, Ordering::Release);
    info!(authority_id = authority.id(), subject = authority.subject(), not_after = %crate::rfc3339::text(authority.not_after()), "Loaded the active authority");
    // Authorities made before JWT-SVIDs get their signing key now (it joins the bundle).
    let added = crate::authority::ensure_jwt_keys(&store, &settings.keys).await?;
    if added > 0 {
        info!(
            added,
            "Made JWT-SVID signing keys for authorities that had none"
        );
    }
    let bundle = bundle::load(&store).await?;
    bundle::write_bundle_file(&settings.data_dir, &bundle).map_err(|source| {
        StartError::BundleFile {
            path: bundle::bundle_file(&settings.data_dir),
            source,
        }
    })?;
    readiness.bundle_file.store(true, Ordering::Release);
    let audit_key = AuditKey::load_or_create(&settings.data_dir)?;
    let server_cert = tls::mint_server_cert(&authority, &settings.server_names, &audit).await?;
    // The log as it stands at start is signed before any request can move its head, so an
    // auditor's first checkpoint of this run never covers a request of it; likewise an
    // expiry warning is in the log before the server reports ready.
    tasks::sign_checkpoint(&store, &audit_key)
        .instrument(info_span!("checkpoints"))
        .await;
    tasks::check_expiry(&store, settings.expiry_warning)
        .instrument(info_span!("expiry"))
        .await;
    let version = store.authority_version().await?;
    let issuers = tasks::client_issuers(&store).await?;
    let jwt = crate::authority::load_jwt_key(&store, &settings.keys, authority.id())
        .await?
        .map(Arc::new);
    let (active_tx, _) = watch::channel(Arc::new(tls::active(authority, jwt, bundle, &issuers)?));
    Ok(Opened {
        store,
        audit,
        readiness,
        audit_key,
        server_cert,
        version,
        active_tx,
    })
}

/// Where `listener`, bound to `asked`, listens (the port chosen, for port 0).
pub(super) fn local_addr(
    listener: &TcpListener,
    asked: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        addr: asked,
        source,
    })
}

/// The ConfigMap name and a client to publish it with, if `--publish-configmap` asks for it
/// (and the Kubernetes API is known).
pub(super) fn configmap_client(
    settings: &Settings,
) -> Result<Option<(String, crate::kube::KubeClient)>, StartError> {
    let (Some(name), Some(api)) = (&settings.publish_configmap, &settings.kube_api) else {
        return Ok(None);
    };
    let client = crate::kube::KubeClient::new(api.clone())?;
    info!(configmap = %name, api = %api.url, "Publishing the trust bundle into every namespace");
    Ok(Some((name.clone(), client)))
}

/// Loads the active authority, creating the first root if the store has none.
pub(super) async fn active_authority(
    store: &Store,
    settings: &Settings,
) -> Result<Authority, StartError> {
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

pub(super) fn build_authenticator(settings: &Settings) -> Result<Authenticator, StartError> {
    let mut issuers = Vec::new();
    for issuer in &settings.issuers {
        let keys = match &issuer.keys {
            IssuerKeysFrom::File(path) => {
                IssuerKeys::from_file(path, issuer.refresh).map_err(StartError::TokenKeys)?
            }
            IssuerKeysFrom::Url(url) => IssuerKeys::from_url(url.clone(), issuer.refresh),
        };
        issuers.push(
            TokenIssuer::new(issuer.issuer.clone(), settings.audiences.clone(), keys)
                .for_cluster(issuer.cluster_id.clone()),
        );
    }
    if settings.dev {
        let dev = DevIssuer::load_or_create(&settings.data_dir)?;
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
    let extra_ca = match &settings.jwks_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| StartError::JwksCa {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let fetcher = Fetcher::new(extra_ca.as_deref()).map_err(StartError::Fetcher)?;
    let authn = Authenticator::new(settings.trust_domain.clone(), issuers, fetcher);
    Ok(
        match settings.kube_api.as_ref().filter(|_| settings.token_review) {
            Some(api) => {
                info!(api = %api.url, "Tokens no issuer claims go to the Kubernetes TokenReview API");
                authn.with_reviewer(crate::auth::review::TokenReviewer::new(
                    api.clone(),
                    settings.audiences.clone(),
                    settings.max_token_reviews,
                )?)
            }
            None => authn,
        },
    )
}

/// Who may ask for identities other than their own, and how that is checked for the callers
/// of each cluster; says so in the log, with a warning where the check is off or impossible.
pub(super) fn impersonation_policy(settings: &Settings) -> Result<ImpersonationPolicy, StartError> {
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
    let local = local_node_check(settings, &names)?;
    // The local cluster's issuers (the flags' issuer, the development one, TokenReview)
    // share its check; each other cluster is checked against its own API, or not at all.
    let mut clusters = std::collections::HashMap::new();
    let mut local_issuers = vec![IssuerId::jwt(DEV_ISSUER)];
    if let Some(api) = &settings.kube_api {
        local_issuers.push(IssuerId::TokenReview(api.url.clone()));
    }
    for issuer in &settings.issuers {
        let cluster = match &issuer.cluster_id {
            Some(id) => format!("{id} (issuer {})", issuer.issuer),
            None => issuer.issuer.clone(),
        };
        let check = match &issuer.api {
            IssuerApi::Local => {
                local_issuers.push(IssuerId::jwt(&issuer.issuer));
                continue;
            }
            IssuerApi::Own(api) => node_authorizer(api)?,
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
        clusters.insert(
            IssuerId::jwt(&issuer.issuer),
            ClusterCheck { cluster, check },
        );
    }
    for issuer in local_issuers {
        let check = local.clone();
        clusters.insert(
            issuer.clone(),
            ClusterCheck {
                cluster: issuer.to_string(),
                check,
            },
        );
    }
    Ok(ImpersonationPolicy::new(td, trusted, clusters))
}

fn node_authorizer(api: &crate::kube::KubeApi) -> Result<NodeCheck, StartError> {
    Ok(NodeCheck::Api(Arc::new(NodeAuthorizer::new(api.clone())?)))
}

/// The node check for the server's own cluster: through its Kubernetes API, skipped if the
/// operator said so, else impossible (requests for other identities refused).
fn local_node_check(settings: &Settings, names: &str) -> Result<NodeCheck, StartError> {
    Ok(match &settings.kube_api {
        Some(api) => {
            info!(
                trusted_node_accounts = %names,
                api = %api.url,
                "Node proxies may ask for the identities of pods on their own node, checked \
                 through the Kubernetes API"
            );
            node_authorizer(api)?
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
    })
}

/// The TLS listener's routes (the three gRPC services, health and reflection, and the
/// bundle over HTTPS), and the handle that sets the gRPC health status.
pub(super) fn routes(
    settings: &Settings,
    ca: Arc<CertificateAuthority>,
    store: &Store,
    active: &watch::Receiver<Arc<Active>>,
    clients: &Arc<super::propagation::BundleClients>,
) -> Result<(axum::Router, tonic_health::server::HealthReporter), StartError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let hint = settings.bundle_refresh_hint.whole_seconds();
    // Server reflection: grpcurl and friends can list and call the services without .proto
    // files.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ca_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let routes = tonic::service::Routes::new(
        IstioCertificateServiceServer::new(grpc::CertificateService::new(Arc::clone(&ca)))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        JwtSvidServiceServer::new(grpc::JwtService::new(ca))
            .max_decoding_message_size(MAX_JWT_REQUEST_BYTES),
    )
    .add_service(
        TrustBundleServiceServer::new(grpc::BundleService::new(
            active.clone(),
            settings.trust_domain.clone(),
            hint,
            Arc::clone(clients),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        AuditServiceServer::new(audit_service::RemoteAudit::new(
            store.clone(),
            settings.auditors.clone(),
            active.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(health)
    .add_service(reflection)
    .into_axum_router()
    .merge(publish::bundle_routes(
        active.clone(),
        hint,
        Arc::clone(clients),
    ))
    .merge(publish::oidc_routes(
        active.clone(),
        settings.jwt_issuer.clone(),
    ));
    Ok((routes, reporter))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storm of pods connects faster than any accept loop runs: a listener that has not
    /// accepted yet still completes hundreds of TCP handshakes at once (the common default
    /// backlog of 128 would drop the rest of the SYNs, and each would wait a second).
    #[tokio::test]
    async fn the_listener_queues_a_storm_of_connections() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::new();
        for i in 0..600 {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_millis(500), connect).await {
                Ok(Ok(stream)) => open.push(stream),
                other => panic!("connection {i} not queued: {other:?}"),
            }
        }
        drop(listener);
    }
}
