//! Prometheus metrics (`/metrics` on the health listener), with the prometheus-client crate.
//! One registry per process: the parts that count (the pipeline, the audit writer, the token
//! cache) reach it through [`metrics`]; what is read from the store (authority expiry, the
//! bundle sequence) is set when scraped.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A refusal's labels: its gRPC code and what kind of check refused it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The gRPC code name, e.g. `UNAUTHENTICATED`.
    pub code: &'static str,
    /// The check, e.g. `token`, `csr`, `identity_rate`.
    pub reason: &'static str,
}

/// A refused connection's label: the limit it was over.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `max_connections` or `max_connections_per_ip`.
    pub limit: &'static str,
}

/// A TokenReview's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `authenticated`, `refused` (the API server said no), `failed` (it could not be asked
    /// or did not answer) or `busy` (too many reviews waiting: not asked).
    pub outcome: &'static str,
}

/// A PodCertificateRequest answer's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodAnswerLabels {
    /// The condition written: `Issued`, `Denied` or `Failed`.
    pub condition: &'static str,
}

/// Why a PodCertificateRequest watch was opened again.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchRestartLabels {
    /// `ended` (the API server's timeout: watched again), `gone` (410: listed again),
    /// `stalled` (silent past its deadline: watched again) or `failed` (an error: listed
    /// again after a pause).
    pub cause: &'static str,
}

/// An authority's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabels {
    /// Its id.
    pub authority_id: String,
    /// `prepared`, `active`, `retiring` or `retired`.
    pub state: String,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Certificates issued to workloads.
    pub issuances: Counter,
    /// JWT-SVIDs issued to workloads.
    pub jwt_issuances: Counter,
    /// Requests refused, by code and check.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Time from a request's arrival to its answer, for issued certificates.
    pub issuance_seconds: Histogram,
    /// Events per audit commit.
    pub audit_batch_events: Histogram,
    /// Time an audit commit takes.
    pub audit_commit_seconds: Histogram,
    /// Seconds until each authority's certificate expires (negative once it has).
    pub authority_expiry_seconds: Family<AuthorityLabels, Gauge<f64, AtomicU64>>,
    /// 1 for each authority still in the bundle that expires within the warning window
    /// (`--expiry-warning`), 0 for the others.
    pub authority_expiring: Family<AuthorityLabels, Gauge>,
    /// The published bundle's sequence.
    pub bundle_sequence: Gauge,
    /// Each authority's live certificates (each holder's newest unexpired one).
    pub authority_live_certificates: Family<AuthorityLabels, Gauge>,
    /// The share of identities whose newest certificate comes from the active authority.
    pub rotation_converged_ratio: Gauge<f64, AtomicU64>,
    /// Bundle clients seen within their server's refresh hint (all replicas).
    pub bundle_clients: Gauge,
    /// Of those, the ones whose bundle lacks the newest prepared authority's root.
    pub bundle_clients_lagging: Gauge,
    /// Token checks answered from the verified-token cache.
    pub token_cache_hits: Counter,
    /// Token checks that needed a signature verification.
    pub token_cache_misses: Counter,
    /// Connections closed at accept because a limit was reached.
    pub connections_refused: Family<ConnectionLabels, Counter>,
    /// Connections open on the gRPC/HTTPS listener.
    pub connections_open: Gauge,
    /// TokenReviews, by outcome.
    pub token_reviews: Family<ReviewLabels, Counter>,
    /// 1 while the audit log takes writes (the last health check found no failure), else 0.
    pub audit_writable: Gauge,
    /// PodCertificateRequests answered (status written), by condition.
    pub pod_certificate_answers: Family<PodAnswerLabels, Counter>,
    /// PodCertificateRequests seen unanswered and not answered yet.
    pub pod_certificate_waiting: Gauge,
    /// PodCertificateRequest watches opened again, by cause.
    pub pod_certificate_watch_restarts: Family<WatchRestartLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ca");
        let issuances = Counter::default();
        registry.register(
            "issuances",
            "Certificates issued to workloads",
            issuances.clone(),
        );
        let jwt_issuances = Counter::default();
        registry.register(
            "jwt_issuances",
            "JWT-SVIDs issued to workloads",
            jwt_issuances.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Certificate and JWT-SVID requests refused, by gRPC code and the check that refused them",
            refusals.clone(),
        );
        // 0.5 ms to about 4 s.
        let issuance_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "issuance_duration_seconds",
            "Time from a certificate request's arrival to its answer, for issued certificates",
            issuance_seconds.clone(),
        );
        let audit_batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "audit_commit_events",
            "Events per audit log commit (group commit batch size)",
            audit_batch_events.clone(),
        );
        let audit_commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "audit_commit_duration_seconds",
            "Time an audit log commit takes, fsync included",
            audit_commit_seconds.clone(),
        );
        let authority_expiry_seconds = Family::<AuthorityLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "authority_expiry_seconds",
            "Seconds until each authority's certificate expires (negative once it has)",
            authority_expiry_seconds.clone(),
        );
        let authority_expiring = Family::<AuthorityLabels, Gauge>::default();
        registry.register(
            "authority_expiring",
            "1 if the authority is in the bundle and expires within the warning window \
             (--expiry-warning), else 0",
            authority_expiring.clone(),
        );
        let bundle_sequence = Gauge::default();
        registry.register(
            "bundle_sequence",
            "Sequence of the published trust bundle; it moves on every change of the roots",
            bundle_sequence.clone(),
        );
        let authority_live_certificates = Family::<AuthorityLabels, Gauge>::default();
        registry.register(
            "authority_live_certificates",
            "Certificates from each authority that are still their holder's newest unexpired one",
            authority_live_certificates.clone(),
        );
        let rotation_converged_ratio = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "rotation_converged_ratio",
            "Share of identities with a live certificate whose newest comes from the active \
             authority (1 when a rotation has reached them all)",
            rotation_converged_ratio.clone(),
        );
        let bundle_clients = Gauge::default();
        registry.register(
            "bundle_clients",
            "Clients given the trust bundle (watch or poll) within their server's refresh hint",
            bundle_clients.clone(),
        );
        let bundle_clients_lagging = Gauge::default();
        registry.register(
            "bundle_clients_lagging",
            "Of those, clients whose bundle lacks the newest prepared authority's root",
            bundle_clients_lagging.clone(),
        );
        let token_cache_hits = Counter::default();
        registry.register(
            "token_cache_hits",
            "Token checks answered from the verified-token cache",
            token_cache_hits.clone(),
        );
        let token_cache_misses = Counter::default();
        registry.register(
            "token_cache_misses",
            "Token checks that needed a signature verification",
            token_cache_misses.clone(),
        );
        let connections_refused = Family::<ConnectionLabels, Counter>::default();
        for limit in ["max_connections", "max_connections_per_ip"] {
            drop(connections_refused.get_or_create(&ConnectionLabels { limit }));
        }
        registry.register(
            "connections_refused",
            "Connections closed at accept because --max-connections or \
             --max-connections-per-ip was reached",
            connections_refused.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open on the gRPC/HTTPS listener",
            connections_open.clone(),
        );
        let token_reviews = Family::<ReviewLabels, Counter>::default();
        // Every outcome from the start, at 0 (as every connection limit above): an alert's
        // rate() needs the series before the first failure, not after it.
        for outcome in ["authenticated", "refused", "failed", "busy"] {
            drop(token_reviews.get_or_create(&ReviewLabels { outcome }));
        }
        registry.register(
            "token_reviews",
            "TokenReviews asked of the Kubernetes API server, by outcome (failed: it could not \
             be asked or did not answer)",
            token_reviews.clone(),
        );
        let audit_writable = Gauge::default();
        registry.register(
            "audit_writable",
            "1 while the audit log takes writes, 0 once a write failed (nothing is issued then)",
            audit_writable.clone(),
        );
        let pod_certificate_answers = Family::<PodAnswerLabels, Counter>::default();
        for condition in ["Issued", "Denied", "Failed"] {
            drop(pod_certificate_answers.get_or_create(&PodAnswerLabels { condition }));
        }
        registry.register(
            "pod_certificate_answers",
            "PodCertificateRequests this server answered (its status write landed), by the \
             condition written",
            pod_certificate_answers.clone(),
        );
        let pod_certificate_waiting = Gauge::default();
        registry.register(
            "pod_certificate_requests_waiting",
            "PodCertificateRequests for this signer seen unanswered and not answered yet: being \
             answered, or put off (claimed by another replica, over the identity's budget, a \
             write to try again)",
            pod_certificate_waiting.clone(),
        );
        let pod_certificate_watch_restarts = Family::<WatchRestartLabels, Counter>::default();
        for cause in ["ended", "gone", "stalled", "failed"] {
            drop(pod_certificate_watch_restarts.get_or_create(&WatchRestartLabels { cause }));
        }
        registry.register(
            "pod_certificate_watch_restarts",
            "PodCertificateRequest watches opened again, by cause (ended: the API server's \
             timeout; gone: 410, listed again; stalled: silent past its deadline; failed: an \
             error, listed again after a pause)",
            pod_certificate_watch_restarts.clone(),
        );
        Self {
            registry,
            pod_certificate_answers,
            pod_certificate_waiting,
            pod_certificate_watch_restarts,
            token_reviews,
            audit_writable,
            connections_refused,
            connections_open,
            issuances,
            jwt_issuances,
            refusals,
            issuance_seconds,
            audit_batch_events,
            audit_commit_seconds,
            authority_expiry_seconds,
            authority_expiring,
            bundle_sequence,
            authority_live_certificates,
            rotation_converged_ratio,
            bundle_clients,
            bundle_clients_lagging,
            token_cache_hits,
            token_cache_misses,
        }
    }

    /// The registry in the Prometheus text exposition format (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_in_the_exposition_format() {
        let m = metrics();
        m.issuances.inc();
        m.refusals
            .get_or_create(&RefusalLabels {
                code: "UNAUTHENTICATED",
                reason: "token",
            })
            .inc();
        let text = m.encode();
        assert!(text.contains("# TYPE ca_issuances counter"), "{text}");
        assert!(
            text.contains("ca_refusals_total{code=\"UNAUTHENTICATED\",reason=\"token\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
