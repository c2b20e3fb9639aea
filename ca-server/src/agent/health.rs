//! The agent's health endpoint (`--health-listen`): what it serves and until when, and
//! whether it reaches the CA, so an outage is visible without reading logs. `GET /healthz`
//! answers JSON, 200 while an unexpired SVID and a bundle are served (a CA outage alone does
//! not fail it: the workload keeps working until the SVID ends), 503 otherwise.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use time::OffsetDateTime;

use super::state::Shelf;
use crate::rfc3339;

/// How the agent's link to the CA stands.
#[derive(Debug, Clone)]
struct LinkState {
    connected: bool,
    since: OffsetDateTime,
    last_error: Option<String>,
}

/// The link to the CA, as the renewal loop last saw it.
#[derive(Debug, Clone)]
pub struct Link(Arc<Mutex<LinkState>>);

impl Default for Link {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(LinkState {
            connected: false,
            since: OffsetDateTime::now_utc(),
            last_error: None,
        })))
    }
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The CA answered (the bundle watch is open).
    pub fn up(&self) {
        let mut state = self.lock();
        if !state.connected {
            state.connected = true;
            state.since = OffsetDateTime::now_utc();
        }
    }

    /// The CA could not be reached or refused, with why.
    pub fn down(&self, error: &str) {
        let mut state = self.lock();
        if state.connected {
            state.connected = false;
            state.since = OffsetDateTime::now_utc();
        }
        state.last_error = Some(crate::untrusted::cut(error, 512));
    }
}

#[derive(Clone)]
struct Health {
    shelf: Shelf,
    link: Link,
}

async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    let held = health.shelf.now();
    let link = health.link.lock().clone();
    let now = OffsetDateTime::now_utc();
    let serving = held
        .svid
        .as_ref()
        .filter(|svid| svid.not_after > now && held.roots.is_some());
    let status = if serving.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "serving": serving.is_some(),
        "spiffe_id": held.svid.as_ref().map(|svid| svid.spiffe_id.to_string()),
        "not_after": held.svid.as_ref().map(|svid| rfc3339::text(svid.not_after)),
        "bundle_roots": held.roots.as_ref().map(|roots| roots.certificates.len()),
        // The CA's bundle sequence last received (0: read back from disk), to see a rotation
        // reach this agent.
        "bundle_sequence": held.roots.as_ref().map(|roots| roots.sequence),
        "ca": {
            "connected": link.connected,
            "since": rfc3339::text(link.since),
            "last_error": link.last_error,
        },
    });
    (status, axum::Json(body))
}

/// Serves `/healthz` on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, shelf: Shelf, link: Link) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .with_state(Health { shelf, link });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "The health endpoint stopped");
    }
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--health-listen {addr}: {e}"))
}
