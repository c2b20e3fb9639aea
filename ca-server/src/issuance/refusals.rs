//! What the pipeline records: the event of each decision, and refusals counted into runs so
//! that a flood fills neither the disk nor the log.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tracing::{error, info, warn};

use super::pipeline::CertificateAuthority;
use super::refusal::Refusal;
use crate::audit::{EventKind, EventRow};
use crate::auth::Identity;
use crate::class::{Class, Classify};
use crate::limits::{Repeated, peer_key};
use crate::untrusted;

/// Refusals alike enough to be counted in one event: the peer's address (IPv6 by its /64),
/// the code, the check that refused, and the identity the caller proved, if it got that
/// far. Never anything the caller merely claims, nor the message, which a flood can vary
/// at will.
pub(super) type RefusalKey = (Option<IpAddr>, &'static str, &'static str, Option<String>);

/// How long identical refusals are counted before their event is written.
pub(super) const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// What an event can say about the request.
#[derive(Default)]
pub(super) struct Known {
    /// The identity issued (or to be): the caller's own, or the one it may have instead.
    pub(super) identity: Option<Identity>,
    /// The caller, once its token checked out, when it asked for an identity other than
    /// its own.
    pub(super) caller: Option<Identity>,
    pub(super) csr_sha256: Option<String>,
    pub(super) public_key_sha256: Option<String>,
}

impl CertificateAuthority {
    /// Writes one event for each run of refusals whose window has closed (all of them when
    /// `all`, at shutdown).
    pub async fn flush_refusals(&self, all: bool) {
        for (key, run) in self.refusals.due(Instant::now(), all) {
            self.record_run(key, run).await;
        }
    }

    async fn record_run(&self, key: Option<RefusalKey>, run: Repeated<EventRow>) {
        let mut event = run.sample;
        event.count = Some(i64::try_from(run.count).unwrap_or(i64::MAX));
        let like = match &key {
            Some(_) => "refusals like this one",
            // Past the cap on kinds counted at once: refusals of many kinds, many peers.
            None => "refusals of many kinds (too many to count apart), the last like this one,",
        };
        event.reason = Some(untrusted::cut(
            &format!(
                "{} ({} {like} within {} s)",
                event.reason.as_deref().unwrap_or_default(),
                run.count,
                run.window.as_secs()
            ),
            untrusted::REASON_BYTES,
        ));
        let peer = key.and_then(|(peer, ..)| peer);
        info!(code = event.code.as_deref().unwrap_or_default(), peer = ?peer, count = run.count, "Refused certificate requests (repeated)");
        if let Err(e) = self.audit.record(event).await {
            warn!(error = %e, "Refusals could not be recorded in the audit log");
        }
    }

    /// Counts, logs and records a refusal. The event holds only what a verified credential
    /// or the node check established; what the caller asked for goes into `requested`, which
    /// the caller cuts and escapes ([`untrusted::claim`]).
    pub(super) async fn refuse(
        &self,
        peer: Option<SocketAddr>,
        requested: Option<String>,
        now: OffsetDateTime,
        known: Known,
        refusal: &Refusal,
    ) {
        let class = refusal.class();
        let code = class.code().name;
        let check = refusal.reason();
        crate::metrics::metrics()
            .refusals
            .get_or_create(&crate::metrics::RefusalLabels {
                code,
                reason: check,
            })
            .inc();
        let mut event = event_for(EventKind::Denied, now, &known, peer);
        event.code = Some(code.to_owned());
        event.reason = Some(untrusted::cut(
            &refusal.to_string(),
            untrusted::REASON_BYTES,
        ));
        event.requested = requested;
        event.csr_sha256 = known.csr_sha256;
        event.public_key_sha256 = known.public_key_sha256;
        if class == Class::Internal {
            // Not the caller's doing: a bug or a broken authority. Someone must look.
            error!(alert = true, reason = %refusal, peer = ?peer, "ALERT: certificate request failed inside the CA; nothing was returned");
        }
        // Refusals of one kind in a burst become one event with a count, so that a flood can
        // fill neither the disk with records nor the log with lines.
        let proven = known
            .caller
            .as_ref()
            .or(known.identity.as_ref())
            .map(|id| id.spiffe_id.to_string());
        let key = (peer.map(|p| peer_key(p.ip())), code, check, proven);
        let (record_now, ended) = self.refusals.admit(key, event.clone(), Instant::now());
        if let Some((key, run)) = ended {
            self.record_run(key, run).await;
        }
        if record_now {
            if class != Class::Internal {
                info!(code, reason = %refusal, peer = ?peer, "Refused certificate request");
            }
            if let Err(e) = self.audit.record(event).await {
                warn!(error = %e, "Refusal could not be recorded in the audit log");
            }
        }
    }
}

/// An event of `kind` about what is `known` of the request, with the common fields filled
/// in: the identity issued (or asked for), and the caller when that is someone else.
pub(super) fn event_for(
    kind: EventKind,
    now: OffsetDateTime,
    known: &Known,
    peer: Option<SocketAddr>,
) -> EventRow {
    let mut event = EventRow::new(kind);
    event.time_ms = crate::rfc3339::unix_ms(now);
    event.peer = peer.map(|p| p.to_string());
    if let Some(id) = &known.identity {
        event.spiffe_id = Some(id.spiffe_id.to_string());
        event.namespace = Some(id.namespace.clone());
        event.service_account = Some(id.service_account.clone());
        event.pod_name = id.pod_name.clone();
        event.pod_uid = id.pod_uid.clone();
        event.token_issuer = Some(id.issuer.to_string());
        event.node = id.node.clone();
    }
    if let Some(caller) = &known.caller {
        event.caller = Some(caller.spiffe_id.to_string());
        event.token_issuer = Some(caller.issuer.to_string());
        if event.node.is_none() {
            event.node = caller.node.clone();
        }
    }
    event
}
