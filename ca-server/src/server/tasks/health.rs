//! The once-a-second health check behind `/readyz`, the gRPC health service and the store
//! gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::server::http::{self, Readiness};
use crate::server::listener;
use crate::store::Store;

/// Once a second: checks the store and the audit log for `/readyz` (which answers from what
/// this finds), sets the store's gauges for `/metrics`, and keeps `grpc.health.v1.Health` in
/// step: SERVING when ready, NOT_SERVING otherwise and from shutdown on, for the server as a
/// whole ("") and the CSR service.
pub(in crate::server) struct Health {
    /// The gRPC health service's status.
    pub reporter: tonic_health::server::HealthReporter,
    /// What `/readyz` answers from.
    pub readiness: Arc<Readiness>,
    /// The store checked.
    pub store: Store,
    /// The audit writer checked.
    pub audit: AuditLog,
    /// The window of the expiry gauges.
    pub expiry_warning: time::Duration,
    /// The TLS listener's connections, counted for `/metrics`.
    pub grpc_connections: Arc<listener::Gate>,
}

impl Health {
    /// Runs the checks until shutdown.
    pub(in crate::server) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Self {
            reporter,
            readiness,
            store,
            audit,
            expiry_warning,
            grpc_connections,
        } = self;
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
            // Not before the first tick: it reads every unexpired certificate, and start-up
            // should not wait for it.
            http::refresh_convergence(&store).await;
            crate::metrics::metrics()
                .connections_open
                .set(i64::try_from(grpc_connections.open()).unwrap_or(i64::MAX));
        }
    }
}
