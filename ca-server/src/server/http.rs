//! The plain HTTP listener: `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::audit::AuditLog;
use crate::store::Store;

/// What `/readyz` waits for.
#[derive(Debug, Default)]
pub struct Readiness {
    /// An authority is active and loaded.
    pub authority: AtomicBool,
    /// `trust-bundle.pem` is written.
    pub bundle_file: AtomicBool,
    /// The gRPC listener accepts connections.
    pub grpc: AtomicBool,
}

#[derive(Clone)]
struct HealthState {
    readiness: Arc<Readiness>,
    store: Store,
    audit: AuditLog,
}

/// The routes of the plain HTTP listener.
pub fn health_routes(readiness: Arc<Readiness>, store: Store, audit: AuditLog) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HealthState {
            readiness,
            store,
            audit,
        })
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    let r = &state.readiness;
    let mut missing = Vec::new();
    if let Err(e) = state.store.ping().await {
        missing.push(format!("store: {e}"));
    }
    if let Some(e) = state.audit.failure() {
        missing.push(format!("audit log not writable: {e}"));
    }
    if !r.authority.load(Ordering::Acquire) {
        missing.push("no active authority".to_owned());
    }
    if !r.bundle_file.load(Ordering::Acquire) {
        missing.push("trust-bundle.pem not written".to_owned());
    }
    if !r.grpc.load(Ordering::Acquire) {
        missing.push("gRPC listener not accepting".to_owned());
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}
