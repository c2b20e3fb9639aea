//! `ca.v1.AuditService`: the same queries as `ca-server audit list`, for remote auditors who
//! call with a client certificate whose SPIFFE ID is on `--auditor`.

use std::sync::Arc;

use ca_proto::ca::v1::audit_service_server::AuditService;
use ca_proto::ca::v1::{AuditEvent, ListEventsRequest, ListEventsResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::grpc::PeerIdentity;
use super::status;
use crate::audit::EventRow;
use crate::audit::render::{rfc3339_ms, rfc3339_secs};
use crate::audit::{FilterError, Filters};
use crate::class::{Class, Classify};
use crate::issuance::Active;
use crate::spiffe::SpiffeId;
use crate::store::{Store, StoreError};

/// Events per page when the request names no size.
const DEFAULT_PAGE: i64 = 100;
/// The largest page.
const MAX_PAGE: i64 = 1000;

/// Why an audit query was refused.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error(
        "the audit service needs mutual TLS: call with a client certificate from this CA whose \
         SPIFFE ID is on --auditor"
    )]
    NoClientCertificate,
    #[error(
        "the client certificate ({who}) is no longer accepted: {detail}; it has expired, or the \
         authority that issued it is retired (or was never this CA's): get a new one and \
         reconnect"
    )]
    NoLongerAccepted { who: String, detail: String },
    #[error("{0} is not an auditor: the server allows only the SPIFFE IDs given with --auditor")]
    NotAuditor(SpiffeId),
    #[error(
        "the client certificate carries no SPIFFE ID; auditors are named by SPIFFE ID (--auditor)"
    )]
    NoSpiffeId,
    #[error("page_size {0} is outside 1..={MAX_PAGE}")]
    PageSize(i64),
    #[error("page_token is not one this server handed out")]
    PageToken,
    /// A filter, named as the request's field is (`valid_at`).
    #[error("{}", .0.naming(&.0.field.replace('-', "_")))]
    Filter(FilterError),
    #[error("the audit log cannot be read: {0}")]
    Store(StoreError),
}

impl Classify for QueryError {
    fn class(&self) -> Class {
        match self {
            Self::NoClientCertificate | Self::NoLongerAccepted { .. } => Class::Unauthenticated,
            Self::NotAuditor(_) | Self::NoSpiffeId => Class::Forbidden,
            Self::PageSize(_) | Self::PageToken => Class::Caller,
            Self::Filter(e) => e.class(),
            Self::Store(_) => Class::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::NoClientCertificate | Self::NoLongerAccepted { .. } => "client_certificate",
            Self::NotAuditor(_) | Self::NoSpiffeId => "not_auditor",
            Self::PageSize(_) | Self::PageToken => "page",
            Self::Filter(e) => e.reason(),
            Self::Store(_) => "store",
        }
    }
}

/// The audit service over `store`, for `auditors`.
pub(super) struct RemoteAudit {
    store: Store,
    auditors: Vec<SpiffeId>,
    active: watch::Receiver<Arc<Active>>,
}

impl RemoteAudit {
    /// A service allowing `auditors`, whose certificates are checked against `active`'s
    /// authorities on every call.
    pub(super) fn new(
        store: Store,
        auditors: Vec<SpiffeId>,
        active: watch::Receiver<Arc<Active>>,
    ) -> Self {
        Self {
            store,
            auditors,
            active,
        }
    }

    /// The auditor behind `request`. Checked on every call, not once per connection (nor
    /// skipped for a resumed TLS session): the certificate must be valid now and issued by
    /// an authority of this CA that is not retired, so an auditor whose certificate expired,
    /// or whose authority was retired after a compromise, is refused on the connection it
    /// already has.
    fn authorize<T>(&self, request: &Request<T>) -> Result<SpiffeId, QueryError> {
        let Some(PeerIdentity::Certificate(cert)) = request.extensions().get::<PeerIdentity>()
        else {
            return Err(QueryError::NoClientCertificate);
        };
        let clients = Arc::clone(&self.active.borrow().clients);
        if let Err(e) = cert.check_now(clients.as_ref()) {
            let who = cert.spiffe_id.as_ref().map_or_else(
                || "a certificate without a SPIFFE ID".to_owned(),
                ToString::to_string,
            );
            warn!(caller = %who, error = %e, "Refused an audit query: the client certificate is no longer valid");
            return Err(QueryError::NoLongerAccepted {
                who,
                detail: e.to_string(),
            });
        }
        match &cert.spiffe_id {
            Some(id) if self.auditors.contains(id) => Ok(id.clone()),
            Some(id) => {
                warn!(caller = %id, "Refused an audit query from a non-auditor");
                Err(QueryError::NotAuditor(id.clone()))
            }
            None => Err(QueryError::NoSpiffeId),
        }
    }
}

fn to_proto(e: EventRow) -> AuditEvent {
    AuditEvent {
        seq: e.seq,
        time: rfc3339_ms(e.time_ms).unwrap_or_default(),
        kind: e.kind.as_str().to_owned(),
        spiffe_id: e.spiffe_id,
        namespace: e.namespace,
        service_account: e.service_account,
        pod_name: e.pod_name,
        pod_uid: e.pod_uid,
        token_issuer: e.token_issuer,
        serial: e.serial,
        not_before: e.not_before.and_then(rfc3339_secs),
        not_after: e.not_after.and_then(rfc3339_secs),
        authority_id: e.authority_id,
        public_key_sha256: e.public_key_sha256,
        csr_sha256: e.csr_sha256,
        peer: e.peer,
        code: e.code,
        reason: e.reason,
        count: e.count,
        operator: e.operator,
        caller: e.caller,
        node: e.node,
        requested: e.requested,
        anchor_seq: e.anchor_seq,
        anchor_hash: e.anchor_hash,
        audience: e.audience,
        request: e.request,
        request_uid: e.request_uid,
        hash: e.hash,
        prev_hash: e.prev_hash,
    }
}

#[tonic::async_trait]
impl AuditService for RemoteAudit {
    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        self.list(request).await.map_err(|e| status::to_status(&e))
    }
}

impl RemoteAudit {
    async fn list(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, QueryError> {
        let caller = self.authorize(&request)?;
        let r = request.into_inner();
        let page_size = match i64::from(r.page_size) {
            0 => DEFAULT_PAGE,
            n if (1..=MAX_PAGE).contains(&n) => n,
            n => return Err(QueryError::PageSize(n)),
        };
        let before_seq = match r.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<i64>().map_err(|_| QueryError::PageToken)?),
        };
        let filters = Filters {
            spiffe_id: r.spiffe_id,
            namespace: r.namespace,
            service_account: r.service_account,
            serial: r.serial,
            node: r.node,
            kind: r.kind,
            since: r.since,
            until: r.until,
            authority: r.authority,
            valid_at: r.valid_at,
        };
        // One more than asked, to know whether another page follows.
        let query = filters
            .to_query(page_size + 1, before_seq)
            .map_err(QueryError::Filter)?;
        let mut events = self
            .store
            .audit_events(&query)
            .await
            .map_err(QueryError::Store)?;
        let more = events.len() as i64 > page_size;
        events.truncate(page_size as usize);
        let next_page_token = if more {
            events.last().map(|e| e.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        info!(auditor = %caller, events = events.len(), "Answered an audit query");
        Ok(Response::new(ListEventsResponse {
            events: events.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}
