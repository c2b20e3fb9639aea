//! `--pod-certificate-signer NAME`: this server as the signer of Kubernetes
//! PodCertificateRequests for NAME. It lists the requests for the signer in every
//! namespace, watches from the list's resourceVersion (relisting when the API server says
//! 410 Gone), and answers each unanswered one once: claimed in the store first (replicas on
//! one store never both sign a request), decided and recorded in the audit log
//! (`CertificateAuthority::answer_pod_request`), then written through the `status`
//! subresource naming the resourceVersion it read. A conflict there means someone else
//! wrote first: the request is read again, and if another writer answered it, the
//! certificate signed here is dropped and recorded as never delivered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::class::Classify;
use crate::issuance::CertificateAuthority;
use crate::issuance::pod::{PodAnswer, PodKey, PodPolicy, PodRequest};
use crate::kube::types::{List, PodCertificateRequest};
use crate::kube::{Error as KubeError, KubeClient};
use crate::store::Store;

/// The API versions tried, in order: `v1beta1` (1.35, 1.36), then `v1` (1.37 on).
pub const API_VERSIONS: [&str; 2] = ["v1beta1", "v1"];
/// Requests per page of a list.
const PAGE: usize = 500;
/// A claim older than this may be taken over: its holder stopped before answering.
pub const CLAIM_STALE_SECS: i64 = 60;
/// How often requests put off (claimed elsewhere, or not answerable yet) are looked at again.
const RECHECK: Duration = Duration::from_secs(5);
/// The most requests put off at once; past it, they wait for the next relist.
const MAX_DEFERRED: usize = 10_000;
/// The first pause after a failed list or watch, doubling to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long an answer waits after our RBAC refused its write.
const FORBIDDEN_RETRY: Duration = Duration::from_secs(30);
/// Status writes tried for one answer before it is put off.
const WRITE_TRIES: usize = 3;

/// The signer: what it answers for and with.
pub struct PodSigner {
    /// The API.
    pub client: KubeClient,
    /// The signer name, e.g. `example.com/spiffe`.
    pub signer: String,
    /// The pipeline that decides and records.
    pub ca: Arc<CertificateAuthority>,
    /// Where claims are kept.
    pub store: Store,
    /// Who may have certificates.
    pub policy: PodPolicy,
    /// This process, in claims.
    pub replica: String,
    /// How long the API server is asked to keep a watch open before ending it (we then
    /// watch again from the last version seen).
    pub watch_timeout: Duration,
}

impl PodSigner {
    /// A watch with nothing (not even a bookmark) for this long is given up and reopened:
    /// a quarter past the watch's own timeout, at which the API server would have ended it.
    fn watch_idle(&self) -> Duration {
        self.watch_timeout + self.watch_timeout / 4
    }
}

/// This process's name in claims: the host (a pod's name) and a random part, new at each
/// start.
pub fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!(
        "{}#{:016x}",
        crate::untrusted::cut(&host, 64),
        rand::random::<u64>()
    )
}

/// A request put off, and when to look at it again.
struct Deferred {
    namespace: String,
    name: String,
    at: Instant,
}

/// The signer's running state.
struct Signing<'a> {
    signer: &'a PodSigner,
    version: &'static str,
    /// Requests put off, by uid.
    deferred: HashMap<String, Deferred>,
    /// Answers recorded whose status write did not land or whose fate is unknown, by
    /// request uid: written again (not decided again) when the request is next seen still
    /// unanswered, while the API server would still take them; else settled.
    unsettled: HashMap<String, PodAnswer>,
    /// Requests this replica saw answered (its own write landed, or it read the answer),
    /// oldest first: a watch event from before the answer is then stale, not a new request.
    answered: Answered,
    /// Requests being answered now (at most [`MAX_IN_FLIGHT`]), each with the newest
    /// version of it seen meanwhile, to look at once its answer is done.
    in_flight: HashMap<String, Option<serde_json::Value>>,
    /// Their answers: several at once, so that a storm of new pods shares audit commits
    /// and overlaps its status writes instead of queueing behind each one.
    work: FuturesUnordered<BoxFuture<'a, Done>>,
    /// Requests seen while in flight, to handle again now that they are not.
    again: VecDeque<serde_json::Value>,
}

/// Requests answered at once; more wait for a place.
const MAX_IN_FLIGHT: usize = 32;

/// A request handled: which, and what the loop must remember of it.
struct Done {
    uid: String,
    namespace: String,
    name: String,
    outcome: Outcome,
}

/// What became of a request handled.
enum Outcome {
    /// Answered: our write landed, or another writer's answer was read.
    Answered,
    /// Look at it again after this long; `unsettled` is an answer recorded whose status
    /// write did not land or whose fate is unknown, to write again rather than decide again.
    Later {
        after: Duration,
        unsettled: Option<PodAnswer>,
    },
    /// Deleted meanwhile.
    Gone,
}

/// A bounded set of request uids, forgetting the oldest past [`MAX_ANSWERED`].
#[derive(Default)]
struct Answered {
    set: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

/// The most answered uids remembered (a relist reads every answer afresh anyway).
const MAX_ANSWERED: usize = 100_000;

impl Answered {
    fn insert(&mut self, uid: &str) {
        if self.set.insert(uid.to_owned()) {
            self.order.push_back(uid.to_owned());
            if self.order.len() > MAX_ANSWERED
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, uid: &str) -> bool {
        self.set.contains(uid)
    }
}

impl PodSigner {
    /// Signs until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        info!(signer = %self.signer, api = %self.client.url(), "Signing PodCertificateRequests");
        let mut signing = Signing {
            signer: &self,
            version: API_VERSIONS[0],
            deferred: HashMap::new(),
            unsettled: HashMap::new(),
            answered: Answered::default(),
            in_flight: HashMap::new(),
            work: FuturesUnordered::new(),
            again: VecDeque::new(),
        };
        let mut backoff = BACKOFF_FIRST;
        loop {
            let outcome = tokio::select! {
                outcome = signing.list_and_watch() => outcome,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match outcome {
                Ok(()) => backoff = BACKOFF_FIRST,
                Err(e) => {
                    watch_restarted("failed");
                    warn!(signer = %self.signer, error = %e, retry_in_ms = backoff.as_millis(), "Watching PodCertificateRequests failed; listing again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

impl Signing<'_> {
    /// Lists every request for the signer, answers the unanswered, then watches from the
    /// list's version until the version is gone (`Ok`: list again) or a call fails. The
    /// answers under way are finished before it returns.
    async fn list_and_watch(&mut self) -> Result<(), KubeError> {
        let outcome = self.list_and_watch_once().await;
        while let Some(done) = self.work.next().await {
            self.finish(done);
        }
        // A relist reads them afresh.
        self.again.clear();
        outcome
    }

    async fn list_and_watch_once(&mut self) -> Result<(), KubeError> {
        let (version, items) = self.list().await?;
        debug!(requests = items.len(), resource_version = %version, "Listed PodCertificateRequests");
        let _ = self
            .signer
            .store
            .prune_pod_claims(OffsetDateTime::now_utc().unix_timestamp())
            .await;
        for item in items {
            self.handle(item).await;
        }
        let mut resource_version = version;
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            let path = KubeClient::pod_certificate_watch_path(
                self.version,
                &self.signer.signer,
                &resource_version,
                self.signer.watch_timeout.as_secs().max(1),
            );
            let mut stream = match self
                .signer
                .client
                .watch(&path, self.signer.watch_idle())
                .await
            {
                Ok(stream) => stream,
                Err(KubeError::Gone { .. }) => {
                    watch_restarted("gone");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            loop {
                while let Some(object) = self.again.pop_front() {
                    self.handle(object).await;
                }
                self.count_waiting();
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = recheck.tick() => {
                        self.recheck().await;
                        continue;
                    }
                    Some(done) = self.work.next(), if !self.work.is_empty() => {
                        self.finish(done);
                        continue;
                    }
                };
                let event = match event {
                    Ok(Some(event)) => event,
                    // The API server ended the watch: watch again from where it got to.
                    Ok(None) => {
                        watch_restarted("ended");
                        break;
                    }
                    Err(KubeError::Gone { .. }) => {
                        info!(resource_version = %resource_version, "The watch's resourceVersion is gone; listing again");
                        watch_restarted("gone");
                        return Ok(());
                    }
                    Err(e @ KubeError::Stalled { .. }) => {
                        warn!(error = %e, resource_version = %resource_version, "The PodCertificateRequest watch went silent; watching again");
                        watch_restarted("stalled");
                        break;
                    }
                    Err(e) => return Err(e),
                };
                if let Some(v) = event.object["metadata"]["resourceVersion"].as_str() {
                    resource_version = v.to_owned();
                }
                match event.type_.as_str() {
                    "ADDED" | "MODIFIED" => self.handle(event.object).await,
                    "DELETED" => {
                        if let Some(uid) = event.object["metadata"]["uid"].as_str() {
                            self.deferred.remove(uid);
                            self.unsettled.remove(uid);
                        }
                    }
                    _ => {} // BOOKMARK: only its version.
                }
            }
        }
    }

    /// Every request for the signer and the list's resourceVersion, page by page; the API
    /// version is the one found last time if still served, else the first served.
    async fn list(&mut self) -> Result<(String, Vec<serde_json::Value>), KubeError> {
        let mut last_error = None;
        let current = self.version;
        let others = API_VERSIONS.into_iter().filter(|v| *v != current);
        for version in std::iter::once(current).chain(others) {
            match self.list_in(version).await {
                Ok(listed) => {
                    if self.version != version {
                        info!(version, "PodCertificateRequests are served in this version");
                    }
                    self.version = version;
                    return Ok(listed);
                }
                Err(KubeError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
                    last_error = Some(version);
                }
                Err(e) => return Err(e),
            }
        }
        Err(KubeError::BadRequest {
            url: self.signer.client.url().to_owned(),
            path: "/apis/certificates.k8s.io".into(),
            reason: format!(
                "the API server serves no PodCertificateRequests ({} not found): Kubernetes \
                 1.35 or later with the PodCertificateRequest feature gate and the \
                 certificates.k8s.io/v1beta1 API enabled is needed",
                last_error.unwrap_or_default()
            ),
        })
    }

    async fn list_in(
        &mut self,
        version: &str,
    ) -> Result<(String, Vec<serde_json::Value>), KubeError> {
        let mut items = Vec::new();
        let mut continue_token: Option<String> = None;
        let mut first_version = None;
        loop {
            let page: List<serde_json::Value> = self
                .signer
                .client
                .pod_certificate_requests(
                    version,
                    &self.signer.signer,
                    PAGE,
                    continue_token.as_deref(),
                )
                .await?;
            first_version.get_or_insert(page.metadata.resource_version);
            // Only the unanswered are kept: answered requests (most, in a cluster that has
            // run a while) are handled at once, so a long list costs one page of memory.
            for item in page.items {
                if item["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
                {
                    self.handle(item).await;
                } else {
                    items.push(item);
                }
            }
            if page.metadata.continue_token.is_empty() {
                return Ok((first_version.unwrap_or_default(), items));
            }
            continue_token = Some(page.metadata.continue_token);
        }
    }

    /// Looks again at requests put off whose time has come.
    async fn recheck(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, String, String)> = self
            .deferred
            .iter()
            .filter(|(_, d)| d.at <= now)
            .map(|(uid, d)| (uid.clone(), d.namespace.clone(), d.name.clone()))
            .collect();
        for (uid, namespace, name) in due {
            match self
                .signer
                .client
                .pod_certificate_request(self.version, &namespace, &name)
                .await
            {
                Ok(Some(object)) => self.handle(object).await,
                Ok(None) => {
                    self.deferred.remove(&uid);
                    self.unsettled.remove(&uid);
                }
                Err(e) => {
                    debug!(request = %format!("{namespace}/{name}"), error = %e, "Could not read a request put off");
                    self.defer(&uid, &namespace, &name, RECHECK);
                }
            }
        }
    }

    fn defer(&mut self, uid: &str, namespace: &str, name: &str, after: Duration) {
        if self.deferred.len() >= MAX_DEFERRED && !self.deferred.contains_key(uid) {
            return;
        }
        self.deferred.insert(
            uid.to_owned(),
            Deferred {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                at: Instant::now() + after,
            },
        );
    }

    /// Starts answering `object` if it is an unanswered request for this signer (waiting
    /// for a place among those in flight).
    async fn handle(&mut self, object: serde_json::Value) {
        let Ok(typed) = serde_json::from_value::<PodCertificateRequest>(object.clone()) else {
            warn!("A watch event's object is not a PodCertificateRequest; skipped");
            return;
        };
        let meta = &typed.metadata;
        if typed.spec.signer_name != self.signer.signer || meta.uid.is_empty() {
            return;
        }
        let uid = meta.uid.clone();
        if typed.answered() {
            self.deferred.remove(&uid);
            self.answered.insert(&uid);
            self.settle(&uid, &typed).await;
            return;
        }
        if self.answered.contains(&uid) {
            // An event from before the answer (the watch delivers in order; this one was
            // sent before the write that answered it).
            return;
        }
        if let Some(newest) = self.in_flight.get_mut(&uid) {
            // Never two answers to one request at once: this version waits for that one.
            *newest = Some(object);
            return;
        }
        while self.work.len() >= MAX_IN_FLIGHT {
            if let Some(done) = self.work.next().await {
                self.finish(done);
            }
        }
        self.deferred.remove(&uid);
        self.in_flight.insert(uid.clone(), None);
        let unsettled = self.unsettled.remove(&uid);
        let answering = Answering {
            signer: self.signer,
            version: self.version,
        };
        self.work
            .push(Box::pin(answering.answer(object, typed, unsettled)));
    }

    /// Sets the waiting gauge: being answered, or put off.
    fn count_waiting(&self) {
        let waiting = self.in_flight.len()
            + self
                .deferred
                .keys()
                .filter(|uid| !self.in_flight.contains_key(*uid))
                .count();
        crate::metrics::metrics()
            .pod_certificate_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Remembers what became of a request answered, and looks again at a newer version of
    /// it seen meanwhile.
    fn finish(&mut self, done: Done) {
        let Done {
            uid,
            namespace,
            name,
            outcome,
        } = done;
        let newest = self.in_flight.remove(&uid).flatten();
        match outcome {
            Outcome::Answered => {
                self.deferred.remove(&uid);
                self.answered.insert(&uid);
            }
            Outcome::Later { after, unsettled } => {
                if let Some(answer) = unsettled {
                    self.unsettled.insert(uid.clone(), answer);
                }
                self.defer(&uid, &namespace, &name, after);
            }
            Outcome::Gone => {
                self.deferred.remove(&uid);
                self.unsettled.remove(&uid);
            }
        }
        if let Some(object) = newest
            && !self.answered.contains(&uid)
        {
            self.again.push_back(object);
        }
    }

    /// `typed` is answered: if a certificate of ours for it was unsettled and the answer is
    /// not that certificate, it was never delivered.
    async fn settle(&mut self, uid: &str, typed: &PodCertificateRequest) {
        let Some(PodAnswer::Issued(issued)) = self.unsettled.remove(uid) else {
            return;
        };
        if delivered_serial(typed).as_deref() != Some(issued.serial.as_str()) {
            not_delivered(
                self.signer,
                &to_request(typed),
                &issued.serial,
                &issued.spiffe_id,
            )
            .await;
        }
    }
}

/// One request's answer, from its claim to its status write: what runs in flight.
#[derive(Clone, Copy)]
struct Answering<'a> {
    signer: &'a PodSigner,
    version: &'static str,
}

impl<'a> Answering<'a> {
    /// Claims, decides, records and writes the answer to an unanswered request; with
    /// `unsettled`, writes that answer again instead (while the API server would take it).
    async fn answer(
        self,
        object: serde_json::Value,
        typed: PodCertificateRequest,
        unsettled: Option<PodAnswer>,
    ) -> Done {
        let request = to_request(&typed);
        let outcome = self.outcome(object, &request, unsettled).await;
        Done {
            uid: request.uid,
            namespace: request.namespace,
            name: request.name,
            outcome,
        }
    }

    async fn outcome(
        self,
        object: serde_json::Value,
        request: &PodRequest,
        unsettled: Option<PodAnswer>,
    ) -> Outcome {
        let uid = &request.uid;
        if let Some(answer) = unsettled {
            // Our last write did not land (the request is still unanswered). The same answer
            // goes again while it may: a fresh decision would sign (and record) again.
            if deliverable(&answer, OffsetDateTime::now_utc()) {
                return self.deliver(object, request, &answer).await;
            }
            if let PodAnswer::Issued(issued) = &answer {
                not_delivered(self.signer, request, &issued.serial, &issued.spiffe_id).await;
            }
        }
        let later = |after| Outcome::Later {
            after,
            unsettled: None,
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        match self
            .signer
            .store
            .claim_pod_request(uid, &self.signer.replica, now, CLAIM_STALE_SECS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                debug!(request = %format!("{}/{}", request.namespace, request.name), "Claimed by another replica");
                return later(Duration::from_secs(CLAIM_STALE_SECS.unsigned_abs()));
            }
            Err(e) => {
                warn!(error = %e, "Could not claim a PodCertificateRequest; retrying");
                return later(RECHECK);
            }
        }
        let answer = match self
            .signer
            .ca
            .answer_pod_request(request, &self.signer.policy)
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                let what = format!("{}/{}", request.namespace, request.name);
                if e.class() == crate::class::Class::Overloaded {
                    debug!(request = %what, error = %e, "Over budget; the request waits");
                } else {
                    warn!(request = %what, error = %e, "A PodCertificateRequest could not be answered now (nothing was recorded or written); retrying");
                }
                let _ = self
                    .signer
                    .store
                    .release_pod_request(uid, &self.signer.replica)
                    .await;
                return later(RECHECK);
            }
        };
        self.deliver(object, request, &answer).await
    }

    /// Writes `answer` into `object`'s status; on a conflict reads the request again and
    /// writes again while it is still unanswered.
    async fn deliver(
        self,
        mut object: serde_json::Value,
        request: &PodRequest,
        answer: &PodAnswer,
    ) -> Outcome {
        let what = format!("{}/{}", request.namespace, request.name);
        let dropped = || async {
            if let PodAnswer::Issued(issued) = answer {
                not_delivered(self.signer, request, &issued.serial, &issued.spiffe_id).await;
            }
        };
        for _ in 0..WRITE_TRIES {
            object["status"] = status_of(answer, object["metadata"]["generation"].as_i64());
            let written = self
                .signer
                .client
                .update_pod_certificate_status(
                    self.version,
                    &request.namespace,
                    &request.name,
                    &object,
                )
                .await;
            match written {
                Ok(_) => {
                    let condition = match answer {
                        PodAnswer::Issued(_) => "Issued",
                        PodAnswer::Denied { .. } => "Denied",
                        PodAnswer::Failed { .. } => "Failed",
                    };
                    crate::metrics::metrics()
                        .pod_certificate_answers
                        .get_or_create(&crate::metrics::PodAnswerLabels { condition })
                        .inc();
                    match answer {
                        PodAnswer::Issued(issued) => {
                            info!(request = %what, spiffe_id = %issued.spiffe_id, serial = %issued.serial, not_after = %crate::rfc3339::text(issued.not_after), "Issued a pod certificate")
                        }
                        PodAnswer::Denied { reason, .. } | PodAnswer::Failed { reason, .. } => {
                            debug!(request = %what, reason, "Wrote the refusal")
                        }
                    }
                    return Outcome::Answered;
                }
                Err(KubeError::Conflict { .. }) => {
                    match self
                        .signer
                        .client
                        .pod_certificate_request(self.version, &request.namespace, &request.name)
                        .await
                    {
                        Ok(Some(fresh)) => {
                            let typed: PodCertificateRequest =
                                serde_json::from_value(fresh.clone()).unwrap_or_default();
                            if typed.answered() {
                                info!(request = %what, "Answered by another writer first; this answer is dropped");
                                dropped().await;
                                return Outcome::Answered;
                            }
                            object = fresh;
                        }
                        Ok(None) => {
                            dropped().await;
                            return Outcome::Gone;
                        }
                        Err(e) => {
                            warn!(request = %what, error = %e, "Could not read the request again after a conflict");
                            break;
                        }
                    }
                }
                Err(e @ KubeError::Forbidden { .. }) => {
                    // Our RBAC: nothing to gain by asking at once; the answer is kept.
                    warn!(request = %what, error = %e, "Not allowed to answer PodCertificateRequests; trying again in 30 s");
                    return Outcome::Later {
                        after: FORBIDDEN_RETRY,
                        unsettled: Some(answer.clone()),
                    };
                }
                Err(KubeError::Invalid { message, .. }) => {
                    // Not a race: the API server will never take this answer.
                    tracing::error!(alert = true, request = %what, message = %message, "ALERT: the API server refused the answer to a PodCertificateRequest as invalid");
                    dropped().await;
                    return Outcome::Later {
                        after: Duration::from_secs(CLAIM_STALE_SECS.unsigned_abs()),
                        unsettled: None,
                    };
                }
                Err(e) => {
                    warn!(request = %what, error = %e, "Writing the answer to a PodCertificateRequest failed; trying again shortly");
                    break;
                }
            }
        }
        // The write's fate is unknown: look again shortly, and settle it then.
        Outcome::Later {
            after: RECHECK,
            unsettled: Some(answer.clone()),
        }
    }
}

fn watch_restarted(cause: &'static str) {
    crate::metrics::metrics()
        .pod_certificate_watch_restarts
        .get_or_create(&crate::metrics::WatchRestartLabels { cause })
        .inc();
}

/// Records that the certificate `serial` signed for `request` never reached it.
async fn not_delivered(signer: &PodSigner, request: &PodRequest, serial: &str, spiffe_id: &str) {
    if let Err(e) = signer
        .ca
        .record_pod_not_delivered(request, serial, spiffe_id)
        .await
    {
        warn!(serial, error = %e, "Could not record that a pod certificate was not delivered");
    }
}

/// Whether the API server would still take `answer` at `now`: a certificate while its
/// notBefore is within [`MAX_BACKDATE`] + a minute of now (the API server allows 5 minutes),
/// a refusal always.
fn deliverable(answer: &PodAnswer, now: OffsetDateTime) -> bool {
    match answer {
        PodAnswer::Issued(issued) => {
            now - issued.not_before
                < crate::issuance::pod::MAX_BACKDATE + time::Duration::minutes(1)
        }
        PodAnswer::Denied { .. } | PodAnswer::Failed { .. } => true,
    }
}

/// The serial (hex) of the leaf in `typed`'s issued chain, if any.
fn delivered_serial(typed: &PodCertificateRequest) -> Option<String> {
    let leaf = crate::x509::split_pem(&typed.status.certificate_chain)
        .into_iter()
        .next()?;
    let der = crate::x509::pem_to_der(&leaf).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(crate::x509::serial_hex(cert.raw_serial()))
}

/// The request as the pipeline takes it. A key in neither field, or not base64, is an
/// empty one (refused by the key check, recorded like any other refusal).
fn to_request(typed: &PodCertificateRequest) -> PodRequest {
    let spec = &typed.spec;
    let decode = |b64: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default()
    };
    let key = match (&spec.stub_pkcs10_request, &spec.pkix_public_key) {
        (Some(stub), _) if !stub.is_empty() => PodKey::Stub(decode(stub)),
        (_, Some(pkix)) => PodKey::Pkix(decode(pkix)),
        _ => PodKey::Pkix(Vec::new()),
    };
    PodRequest {
        namespace: typed.metadata.namespace.clone(),
        name: typed.metadata.name.clone(),
        uid: typed.metadata.uid.clone(),
        pod_name: spec.pod_name.clone(),
        pod_uid: spec.pod_uid.clone(),
        service_account: spec.service_account_name.clone(),
        node_name: spec.node_name.clone(),
        key,
        max_expiration_secs: spec.max_expiration_seconds,
    }
}

/// The status that answers: one condition, True; for `Issued` the chain, its validity and
/// when to refresh.
fn status_of(answer: &PodAnswer, generation: Option<i64>) -> serde_json::Value {
    let now = crate::rfc3339::text(OffsetDateTime::now_utc());
    let condition = |type_: &str, reason: &str, message: &str| {
        let mut c = serde_json::json!({
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": crate::untrusted::cut(message, 1024),
            "lastTransitionTime": now,
        });
        if let Some(g) = generation {
            c["observedGeneration"] = g.into();
        }
        c
    };
    match answer {
        PodAnswer::Issued(issued) => serde_json::json!({
            "conditions": [condition("Issued", "Issued", &format!("issued {} under this mesh's CA", issued.spiffe_id))],
            "certificateChain": issued.chain_pem,
            "notBefore": crate::rfc3339::text(issued.not_before),
            "notAfter": crate::rfc3339::text(issued.not_after),
            "beginRefreshAt": crate::rfc3339::text(issued.begin_refresh_at),
        }),
        PodAnswer::Denied { reason, message } => serde_json::json!({
            "conditions": [condition("Denied", reason, message)],
        }),
        PodAnswer::Failed { reason, message } => serde_json::json!({
            "conditions": [condition("Failed", reason, message)],
        }),
    }
}
