//! The audit writer: one task commits events in groups (many events, one transaction), and
//! answers each caller only after its event is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::audit::EventRow;
use crate::store::{AuditWriter, Store};

/// Largest group committed in one transaction.
const MAX_GROUP: usize = 512;

/// Longest a group waits for the events announced to it.
const GATHER: Duration = Duration::from_millis(1);

/// How often the writer tries a write while the store is failing, to notice it has recovered.
const PROBE_FAILING: Duration = Duration::from_secs(1);

/// How often an idle writer checks the store can still be written.
const PROBE_IDLE: Duration = Duration::from_secs(5);

/// Why an event was not recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The store could not commit; the caller must not get what the event records.
    #[error("the audit log cannot be written ({0}); no certificate is issued without its record")]
    Unavailable(String),
    /// The writer's queue is full.
    #[error("the audit log is overloaded; retry shortly")]
    Overloaded,
}

impl crate::class::Classify for AuditError {
    fn class(&self) -> crate::class::Class {
        match self {
            Self::Unavailable(_) => crate::class::Class::Unavailable,
            Self::Overloaded => crate::class::Class::Overloaded,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "audit_unavailable",
            Self::Overloaded => "audit_overloaded",
        }
    }
}

struct Pending {
    /// `None` asks the writer to stop once everything queued before it is committed.
    event: Option<EventRow>,
    reply: oneshot::Sender<Result<i64, AuditError>>,
}

/// A handle for recording events; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
    coming: Arc<AtomicUsize>,
    health: Arc<Health>,
}

/// Whether the last write (a commit or a probe) succeeded, and if not, why.
#[derive(Debug, Default)]
struct Health(std::sync::Mutex<Option<String>>);

impl Health {
    fn set(&self, failure: Option<String>) {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match (&*current, &failure) {
            (None, Some(e)) => {
                error!(error = %e, "The audit log cannot be written; refusing issuance until it can")
            }
            (Some(_), None) => warn!("The audit log can be written again; issuing"),
            _ => {}
        }
        *current = failure;
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A request on its way to the audit log (see [`AuditLog::expect`]); dropping it says the
/// event is queued, or will not come.
#[derive(Debug)]
pub struct Expected(Arc<AtomicUsize>);

impl Drop for Expected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl AuditLog {
    /// Starts the writer task on `store`, with a queue of `capacity` events.
    pub fn start(store: Store, capacity: usize) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        let coming = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::default());
        tokio::spawn(write_loop(
            store,
            rx,
            Arc::clone(&coming),
            Arc::clone(&health),
        ));
        Self {
            queue,
            coming,
            health,
        }
    }

    /// Why the audit log cannot be written, if the last commit or probe failed (`/readyz`).
    pub fn failure(&self) -> Option<String> {
        self.health.get()
    }

    /// Tells the writer an event is on its way (a request is being checked and signed); the
    /// writer waits briefly for such events so that one commit carries them all.
    pub fn expect(&self) -> Expected {
        self.coming.fetch_add(1, Ordering::AcqRel);
        Expected(Arc::clone(&self.coming))
    }

    /// Records `event` and waits until it is committed; returns its sequence number.
    pub async fn record(&self, event: EventRow) -> Result<i64, AuditError> {
        let (reply, done) = oneshot::channel();
        self.queue
            .try_send(Pending {
                event: Some(event),
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AuditError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    AuditError::Unavailable("the audit writer has stopped".into())
                }
            })?;
        done.await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    /// Waits until every event queued so far is committed, then stops the writer and closes
    /// its connection; later events are refused. For shutdown.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .queue
            .send(Pending { event: None, reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    coming: Arc<AtomicUsize>,
    health: Arc<Health>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut writer = None;
    loop {
        let pause = if health.get().is_some() {
            PROBE_FAILING
        } else {
            PROBE_IDLE
        };
        let received = tokio::select! {
            n = rx.recv_many(&mut group, MAX_GROUP) => n,
            _ = tokio::time::sleep(pause) => {
                // Nothing to write for a while: check the store still takes writes, so that
                // `/readyz` tells the truth without traffic, and notices a recovery.
                health.set(probe(&store, &mut writer).await.err().map(|e| e.to_string()));
                continue;
            }
        };
        if received == 0 {
            return;
        }
        // Events announced but not queued yet are a crypto operation away: gather them (for
        // GATHER at most) so that one commit, one fsync, carries them all.
        let deadline = tokio::time::Instant::now() + GATHER;
        while group.len() < MAX_GROUP && coming.load(Ordering::Acquire) > 0 {
            let room = MAX_GROUP - group.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut group, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let mut events = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut closing = Vec::new();
        for p in group.drain(..) {
            match p.event {
                Some(event) => {
                    events.push(event);
                    replies.push(p.reply);
                }
                None => closing.push(p.reply),
            }
        }
        let result = if events.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let result = commit_with_retry(&store, &mut writer, &mut events).await;
            let m = crate::metrics::metrics();
            m.audit_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            m.audit_batch_events.observe(events.len() as f64);
            health.set(match &result {
                Err(AuditError::Unavailable(e)) => Some(e.clone()),
                _ => None,
            });
            result
        };
        for (event, reply) in events.iter().zip(replies) {
            // A caller that gave up (its request was cancelled) no longer listens: fine.
            let _ = reply.send(result.clone().map(|()| event.seq));
        }
        if !closing.is_empty() {
            rx.close();
            // Anything that slipped in after the close request is refused, not lost silently.
            while let Ok(late) = rx.try_recv() {
                let _ = late.reply.send(Err(AuditError::Unavailable(
                    "the server is shutting down".into(),
                )));
            }
            if let Some(w) = writer.take() {
                w.close().await;
            }
            debug!("Audit writer stopped");
            for reply in closing {
                let _ = reply.send(Ok(0));
            }
            return;
        }
    }
}

/// A write that changes nothing, committed (and synced) like an append.
async fn probe(
    store: &Store,
    writer: &mut Option<AuditWriter>,
) -> Result<(), crate::store::StoreError> {
    let result = match writer {
        Some(w) => w.probe().await,
        None => match store.audit_writer().await {
            Ok(w) => writer.insert(w).probe().await,
            Err(e) => Err(e),
        },
    };
    if result.is_err() {
        *writer = None;
    }
    result
}

/// Commits a group. A failure is retried twice: at once (the head the writer remembered may be
/// stale because another writer, such as the CLI, appended), then after a pause (a busy or
/// failing store); after that the whole group fails, and the next group starts on a new
/// connection.
async fn commit_with_retry(
    store: &Store,
    writer: &mut Option<AuditWriter>,
    events: &mut [EventRow],
) -> Result<(), AuditError> {
    let mut attempt = 0;
    loop {
        let result = match writer {
            Some(w) => w.append(events).await,
            None => match store.audit_writer().await {
                Ok(w) => writer.insert(w).append(events).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if attempt == 0 => {
                attempt += 1;
                debug!(error = %e, "Audit commit failed; retrying with the head read afresh");
            }
            Err(e) if attempt < 2 => {
                attempt += 1;
                warn!(error = %e, attempt, "Audit commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                error!(error = %e, events = events.len(), "Audit commit failed; refusing the requests");
                *writer = None;
                return Err(AuditError::Unavailable(e.to_string()));
            }
        }
    }
}
