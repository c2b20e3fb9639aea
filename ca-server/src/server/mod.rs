//! The running server: `start` wires the rooms together, `RunningServer::shutdown` takes
//! them apart. `config` is what it is given, `bootstrap` what it builds before serving,
//! `listener` the accept loops, `tasks` what runs in the background.

mod audit_service;
pub mod bootstrap;
pub mod cluster_trust_bundle;
pub mod config;
pub mod configmap;
mod grpc;
mod http;
mod listener;
pub mod pod_certificates;
pub mod propagation;
mod publish;
pub mod status;
mod tasks;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

pub use config::{
    CRYPTO_QUEUE, IssuerApi, IssuerKeysFrom, IssuerSettings, MAX_HEADER_BYTES, MAX_REQUEST_BYTES,
    PodCertificateSettings, Settings, StartError,
};
pub use grpc::{PeerAddr, PeerCertificate, PeerIdentity};
pub use http::Readiness;
pub use listener::ConnectionLimits;
pub use tasks::{EXPIRY_CHECK_INTERVAL, STORE_POLL_INTERVAL};
pub use tls::{SERVER_CERT_TTL, renew_in};

use crate::audit::AuditLog;
use crate::issuance::pool::CryptoPool;
use crate::issuance::{Active, CertificateAuthority};
use crate::store::Store;

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

/// Starts the server: binds both listeners, opens the store, loads (or creates) the
/// authority, mints the server's certificate, writes the bundle file, signs the first
/// checkpoint and checks expiry, then serves: gRPC first, the health listener last, so that
/// `/readyz` answers only once every step above is done.
pub async fn start(settings: Settings) -> Result<RunningServer, StartError> {
    bootstrap::create_data_dir(&settings.data_dir)?;
    let authn = Arc::new(bootstrap::build_authenticator(&settings)?);
    let policy = bootstrap::impersonation_policy(&settings)?;
    // Bound before anything is written, so a port in use stops a first start before it
    // creates a root. Connections wait in the backlog until the server serves.
    let listeners = bootstrap::Listeners::bind(&settings)?;
    let opened = bootstrap::open(&settings).await?;
    let active = opened.active_tx.subscribe();
    let (cert_tx, cert_rx) = watch::channel(Arc::new(tls::Served::only(&opened.server_cert)));
    let tls_config = tls::server_config(
        cert_rx,
        active.clone(),
        Arc::new(tls::AuthorityClientVerifier::new(active.clone())),
    );
    let pool = CryptoPool::per_core(CRYPTO_QUEUE).map_err(StartError::Threads)?;
    let ca = Arc::new(
        CertificateAuthority::new(
            Arc::clone(&authn),
            policy,
            opened.audit.clone(),
            settings.leaf_policy,
            active.clone(),
            pool,
            settings.limits,
        )
        .with_jwt_issuer(settings.jwt_issuer.clone()),
    );
    let clients = Arc::new(propagation::BundleClients::default());
    let (app, health_reporter) =
        bootstrap::routes(&settings, Arc::clone(&ca), &opened.store, &active, &clients)?;
    let configmaps = bootstrap::configmap_client(&settings)?;

    let (shutdown, stop) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let grpc_gate = listener::Gate::new(settings.connections);
    let (grpc_addr, http_addr) = (listeners.grpc_addr, listeners.http_addr);
    let serving = |app, gate| listener::Serving {
        app,
        gate,
        shutdown: stop.clone(),
    };
    tasks.spawn(
        listener::serve_tls(
            listeners.grpc,
            tls_config,
            serving(app, Arc::clone(&grpc_gate)),
        )
        .instrument(info_span!("grpc", addr = %grpc_addr)),
    );
    opened.readiness.grpc.store(true, Ordering::Release);
    if let Some((name, client)) = configmaps {
        let publish = configmap::publish_configmaps(client, name, active.clone(), stop.clone());
        tasks.spawn(publish.instrument(info_span!("configmaps")));
    }
    if let (Some(pods), Some(api)) = (&settings.pod_certificates, &settings.kube_api) {
        let signer = pod_certificates::PodSigner {
            client: crate::kube::KubeClient::new(api.clone())?,
            signer: pods.signer.clone(),
            ca: Arc::clone(&ca),
            store: opened.store.clone(),
            policy: crate::issuance::pod::PodPolicy {
                trust_domain: Some(settings.trust_domain.clone()),
                excluded_namespaces: pods.excluded_namespaces.clone(),
                excluded_accounts: pods.excluded_accounts.clone(),
                api_url: api.url.clone(),
            },
            replica: pod_certificates::replica_name(),
            watch_timeout: pods.watch_timeout,
        };
        tasks.spawn(
            signer
                .run(stop.clone())
                .instrument(info_span!("pod_certificates", signer = %pods.signer)),
        );
        if pods.publish_cluster_trust_bundle {
            let publish = cluster_trust_bundle::publish(
                crate::kube::KubeClient::new(api.clone())?,
                pods.signer.clone(),
                active.clone(),
                stop.clone(),
            );
            tasks.spawn(publish.instrument(info_span!("cluster_trust_bundle")));
        }
    }
    tasks.spawn(tasks::refresh_keys(authn, stop.clone()).instrument(info_span!("token_keys")));
    tasks.spawn(
        clients
            .flush(
                opened.store.clone(),
                settings.bundle_refresh_hint.whole_seconds(),
                stop.clone(),
            )
            .instrument(info_span!("bundle_clients")),
    );
    tasks.spawn(tasks::flush_refusals(ca, stop.clone()));
    let health = tasks::Health {
        reporter: health_reporter,
        readiness: Arc::clone(&opened.readiness),
        store: opened.store.clone(),
        audit: opened.audit.clone(),
        expiry_warning: settings.expiry_warning,
        grpc_connections: grpc_gate,
    };
    let (store, audit, readiness) =
        spawn_background(&settings, opened, health, cert_tx, &stop, &mut tasks).await;

    info!(grpc = %grpc_addr, http = %http_addr, trust_domain = %settings.trust_domain, "Listening");
    // The health listener serves last: once `/readyz` answers, everything above is done and
    // logged.
    tasks.spawn(
        listener::serve_plain(
            listeners.http,
            serving(
                http::health_routes(readiness),
                listener::Gate::new(settings.connections),
            ),
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

/// Spawns the tasks that follow the store and keep the server's own state fresh (renewal,
/// checkpoints, expiry), then makes the health check's first pass and spawns it; returns the
/// store, audit writer and readiness for the rest of the wiring.
async fn spawn_background(
    settings: &Settings,
    opened: bootstrap::Opened,
    health: tasks::Health,
    cert_tx: watch::Sender<Arc<tls::Served>>,
    stop: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> (Store, AuditLog, Arc<Readiness>) {
    let bootstrap::Opened {
        store,
        audit,
        readiness,
        audit_key,
        server_cert,
        version,
        active_tx,
    } = opened;
    let active = active_tx.subscribe();
    tasks.spawn(
        tasks::warn_of_expiry(store.clone(), settings.expiry_warning, stop.clone())
            .instrument(info_span!("expiry")),
    );
    tasks.spawn(tasks::renew_server_cert(
        server_cert,
        active,
        settings.server_names.clone(),
        audit.clone(),
        cert_tx,
        stop.clone(),
    ));
    tasks.spawn(
        tasks::checkpoints(
            store.clone(),
            audit_key,
            settings.checkpoint_interval,
            stop.clone(),
        )
        .instrument(info_span!("checkpoints")),
    );
    let follow = tasks::Follow {
        store: store.clone(),
        data_dir: settings.data_dir.clone(),
        keys: Arc::clone(&settings.keys),
        readiness: Arc::clone(&readiness),
    };
    tasks.spawn(
        follow
            .run(version, active_tx, stop.clone())
            .instrument(info_span!("follow_store")),
    );
    // What the health listener serves is known before it serves.
    readiness.check(&store, &audit).await;
    http::refresh_store_gauges(&store, settings.expiry_warning).await;
    tasks.spawn(health.run(stop.clone()).instrument(info_span!("health")));
    (store, audit, readiness)
}
