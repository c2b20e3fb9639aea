//! Publishing the trust bundle on the TLS port: `GET /trust-bundle` (SPIFFE bundle, a JWK
//! Set) and `GET /trust-bundle.pem`, both with an `ETag` from the sequence and `304` on a
//! matching `If-None-Match`.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use super::grpc::PeerAddr;
use super::propagation::BundleClients;
use crate::issuance::Active;
use crate::store::Via;

#[derive(Clone)]
struct PublishState {
    active: watch::Receiver<Arc<Active>>,
    refresh_hint_secs: i64,
    clients: Arc<BundleClients>,
}

/// The bundle routes; each answer is a sighting of its client in `clients`.
pub(super) fn bundle_routes(
    active: watch::Receiver<Arc<Active>>,
    refresh_hint_secs: i64,
    clients: Arc<BundleClients>,
) -> Router {
    Router::new()
        .route("/trust-bundle", get(jwks))
        .route("/trust-bundle.pem", get(pem))
        .with_state(PublishState {
            active,
            refresh_hint_secs,
            clients,
        })
}

/// The client's address, as the connection handler put it in the request.
fn peer_of(peer: Option<Extension<PeerAddr>>) -> Option<std::net::SocketAddr> {
    peer.map(|Extension(PeerAddr(addr))| addr)
}

/// OIDC discovery for the JWT-SVIDs this CA signs, so cloud providers and Vault can verify
/// them: `/.well-known/openid-configuration` names `issuer` and `jwks_uri`, and `/keys` is
/// the JWT-SVID keys as a plain JWK Set (`use: sig`, `alg: ES256`).
pub(super) fn oidc_routes(active: watch::Receiver<Arc<Active>>, issuer: String) -> Router {
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/keys", get(oidc_keys))
        .with_state(OidcState {
            active,
            issuer: Arc::from(issuer),
        })
}

#[derive(Clone)]
struct OidcState {
    active: watch::Receiver<Arc<Active>>,
    issuer: Arc<str>,
}

async fn openid_configuration(State(state): State<OidcState>) -> Response {
    let document = serde_json::json!({
        "issuer": &*state.issuer,
        "jwks_uri": format!("{}/keys", state.issuer),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.to_string(),
    )
        .into_response()
}

async fn oidc_keys(State(state): State<OidcState>, headers: HeaderMap) -> Response {
    let bundle = state.active.borrow().bundle.clone();
    let keys: Vec<serde_json::Value> = bundle
        .jwt_keys
        .iter()
        .map(|key| {
            let mut jwk = key.jwk.clone();
            jwk["kid"] = key.kid.clone().into();
            jwk["use"] = "sig".into();
            jwk["alg"] = "ES256".into();
            jwk
        })
        .collect();
    let body = serde_json::json!({ "keys": keys }).to_string();
    respond(&headers, bundle.sequence, "application/json", body)
}

fn etag(sequence: i64) -> String {
    format!("\"{sequence}\"")
}

/// `304` if the client's `If-None-Match` names the current sequence.
fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t == tag || t.strip_prefix("W/") == Some(tag)
        })
}

fn respond(
    headers: &HeaderMap,
    sequence: i64,
    content_type: &'static str,
    body: String,
) -> Response {
    let tag = etag(sequence);
    let mut response = if not_modified(headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

async fn jwks(
    State(state): State<PublishState>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
) -> Response {
    let bundle = state.active.borrow().bundle.clone();
    state.clients.saw(peer_of(peer), Via::Poll, bundle.sequence);
    match bundle.to_spiffe_jwks(state.refresh_hint_secs) {
        Ok(json) => respond(
            &headers,
            bundle.sequence,
            "application/json",
            json.to_string(),
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("bundle: {e}\n")).into_response(),
    }
}

async fn pem(
    State(state): State<PublishState>,
    peer: Option<Extension<PeerAddr>>,
    headers: HeaderMap,
) -> Response {
    let bundle = state.active.borrow().bundle.clone();
    state.clients.saw(peer_of(peer), Via::Poll, bundle.sequence);
    respond(
        &headers,
        bundle.sequence,
        "application/x-pem-file",
        bundle.to_pem(),
    )
}
