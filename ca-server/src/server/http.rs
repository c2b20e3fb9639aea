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
    expiry_warning: time::Duration,
}

/// The routes of the plain HTTP listener.
pub fn health_routes(
    readiness: Arc<Readiness>,
    store: Store,
    audit: AuditLog,
    expiry_warning: time::Duration,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            readiness,
            store,
            audit,
            expiry_warning,
        })
}

/// `/metrics`: the counters as they stand, with what the store says set at scrape time.
async fn metrics(State(state): State<HealthState>) -> impl axum::response::IntoResponse {
    let m = crate::metrics::metrics();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Ok(authorities) = state.store.authorities().await {
        // Rebuilt each time: a retired authority's series goes once it is gone from the store.
        m.authority_expiry_seconds.clear();
        m.authority_expiring.clear();
        let expiring = crate::diagnose::expiry::expiring(&authorities, now, state.expiry_warning);
        for a in authorities {
            let labels = crate::metrics::AuthorityLabels {
                authority_id: a.id.to_string(),
                state: a.state.as_str().to_owned(),
            };
            m.authority_expiry_seconds
                .get_or_create(&labels)
                .set((a.not_after - now) as f64);
            m.authority_expiring
                .get_or_create(&labels)
                .set(i64::from(expiring.iter().any(|e| e.id == a.id)));
        }
    }
    if let Ok((sequence, _)) = state.store.authority_version().await {
        m.bundle_sequence.set(sequence);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn readyz(State(state): State<HealthState>) -> (StatusCode, String) {
    let missing = not_ready(&state.readiness, &state.store, &state.audit).await;
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}

/// What keeps the server from being ready, if anything (`/readyz` and gRPC health).
pub async fn not_ready(r: &Readiness, store: &Store, audit: &AuditLog) -> Vec<String> {
    let mut missing = Vec::new();
    if let Err(e) = store.ping().await {
        missing.push(format!("store: {e}"));
    }
    if let Some(e) = audit.failure() {
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
    missing
}
