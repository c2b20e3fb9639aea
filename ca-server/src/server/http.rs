//! The plain HTTP listener: `/healthz`, `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::audit::AuditLog;
use crate::store::Store;

/// What `/readyz` waits for, and what the last check found. Probes are answered from here:
/// a probe never costs a database query, however often it comes.
#[derive(Debug, Default)]
pub struct Readiness {
    /// An authority is active and loaded.
    pub authority: AtomicBool,
    /// `trust-bundle.pem` is written.
    pub bundle_file: AtomicBool,
    /// The gRPC listener accepts connections.
    pub grpc: AtomicBool,
    /// What the last [`Readiness::check`] found wrong with the store and the audit log
    /// (`None` before the first).
    store_problems: Mutex<Option<Vec<String>>>,
}

impl Readiness {
    /// Checks the store and the audit log (a query each) and remembers what is wrong: done
    /// once a second by the health task, and once before the health listener serves.
    pub async fn check(&self, store: &Store, audit: &AuditLog) {
        let mut problems = Vec::new();
        if let Err(e) = store.ping().await {
            problems.push(format!("store: {e}"));
        }
        let failure = audit.failure();
        crate::metrics::metrics()
            .audit_writable
            .set(i64::from(failure.is_none()));
        if let Some(e) = failure {
            problems.push(format!("audit log not writable: {e}"));
        }
        *self
            .store_problems
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(problems);
    }

    /// What keeps the server from being ready, as last checked (`/readyz` and gRPC health).
    pub fn not_ready(&self) -> Vec<String> {
        let mut missing = self
            .store_problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| vec!["store not checked yet".to_owned()]);
        if !self.authority.load(Ordering::Acquire) {
            missing.push("no active authority".to_owned());
        }
        if !self.bundle_file.load(Ordering::Acquire) {
            missing.push("trust-bundle.pem not written".to_owned());
        }
        if !self.grpc.load(Ordering::Acquire) {
            missing.push("gRPC listener not accepting".to_owned());
        }
        missing
    }
}

/// The routes of the plain HTTP listener.
pub(super) fn health_routes(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

/// `/metrics`: the counters as they stand; what the store says is set by
/// [`refresh_store_gauges`].
async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::metrics().encode(),
    )
}

/// Sets the gauges read from the store (authority expiry, the bundle sequence): done by the
/// health task once a second, never per scrape.
pub(super) async fn refresh_store_gauges(store: &Store, expiry_warning: time::Duration) {
    let m = crate::metrics::metrics();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Ok(authorities) = store.authorities().await {
        // Rebuilt each time: a retired authority's series goes once it is gone from the store.
        m.authority_expiry_seconds.clear();
        m.authority_expiring.clear();
        let expiring = crate::authority::expiry::expiring(&authorities, now, expiry_warning);
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
    if let Ok(version) = store.authority_version().await {
        m.bundle_sequence.set(version.sequence);
    }
}

/// How often the convergence gauges are computed: they read every unexpired certificate.
const CONVERGENCE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets `ca_authority_live_certificates` and `ca_rotation_converged_ratio`, at most every
/// [`CONVERGENCE_EVERY`].
pub(super) async fn refresh_convergence(store: &Store) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < CONVERGENCE_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
    }
    let Ok(authorities) = store.authorities().await else {
        return;
    };
    let active = authorities
        .iter()
        .find(|a| a.state == crate::store::AuthorityState::Active)
        .map(|a| a.id);
    let Ok(converging) = crate::authority::convergence::from_store(store, now, active).await else {
        return;
    };
    // Whose root the fleet must hold before the next activation.
    let newest_prepared = authorities
        .iter()
        .rev()
        .find(|a| a.state == crate::store::AuthorityState::Prepared)
        .and_then(|a| a.joined_sequence);
    let m = crate::metrics::metrics();
    m.authority_live_certificates.clear();
    for a in authorities {
        if a.state == crate::store::AuthorityState::Retired && converging.of(a.id).live == 0 {
            continue;
        }
        let labels = crate::metrics::AuthorityLabels {
            authority_id: a.id.to_string(),
            state: a.state.as_str().to_owned(),
        };
        m.authority_live_certificates
            .get_or_create(&labels)
            .set(i64::try_from(converging.of(a.id).live).unwrap_or(i64::MAX));
    }
    m.rotation_converged_ratio.set(converging.ratio());
    if let Ok(seen) = store.seen_clients(now).await {
        use crate::authority::convergence::{clients, lagging};
        m.bundle_clients
            .set(i64::try_from(clients(&seen)).unwrap_or(i64::MAX));
        let behind = newest_prepared.map_or(0, |joined| lagging(&seen, joined).len());
        m.bundle_clients_lagging
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
    }
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, String) {
    let missing = readiness.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}
