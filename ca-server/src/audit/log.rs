//! The audit writer: one thread commits events in groups (many events, one transaction), and
//! answers each caller only after its event is durable. It is a thread of its own, not a
//! task, so that a request's event goes from its task to the connection with one hand-off,
//! and back with one wake.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use crate::audit::EventRow;
use crate::store::{AuditWriter, Store, StoreError};

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
    /// `None` asks the writer to stop once everything queued before it is committed. Boxed:
    /// the queue allocates and touches all of its slots up front, and an `EventRow` inline
    /// would make the 16 Ki slots of `AUDIT_QUEUE` 9 MiB resident from the start.
    event: Option<Box<EventRow>>,
    reply: oneshot::Sender<Result<i64, AuditError>>,
}

/// A handle for recording events; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    queue: SyncSender<Pending>,
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
    /// Starts the writer thread on `store`, with a queue of `capacity` events. Must be called
    /// on the runtime, which runs the PostgreSQL commits.
    pub fn start(store: Store, capacity: usize) -> std::io::Result<Self> {
        let (queue, rx) = sync_channel(capacity);
        let coming = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::default());
        let writer = Writer {
            store,
            runtime: tokio::runtime::Handle::current(),
            connection: None,
            coming: Arc::clone(&coming),
            health: Arc::clone(&health),
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            queue,
            coming,
            health,
        })
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
                event: Some(Box::new(event)),
                reply,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => AuditError::Overloaded,
                TrySendError::Disconnected(_) => stopped(),
            })?;
        done.await.map_err(|_| stopped())?
    }

    /// Waits until every event queued so far is committed, then stops the writer and closes
    /// its connection; later events are refused. For shutdown.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        let mut stop = Pending { event: None, reply };
        loop {
            match self.queue.try_send(stop) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) => {
                    stop = again;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = done.await;
    }
}

fn stopped() -> AuditError {
    AuditError::Unavailable("the audit writer has stopped".into())
}

/// The writer thread's state.
struct Writer {
    store: Store,
    runtime: tokio::runtime::Handle,
    /// Opened on first use, and again after a failure.
    connection: Option<AuditWriter>,
    coming: Arc<AtomicUsize>,
    health: Arc<Health>,
}

/// Moves whatever is queued already into `group`, up to [`MAX_GROUP`].
fn take_queued(rx: &Receiver<Pending>, group: &mut Vec<Pending>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(p) => group.push(p),
            Err(_) => return,
        }
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<Pending>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            let pause = if self.health.get().is_some() {
                PROBE_FAILING
            } else {
                PROBE_IDLE
            };
            match rx.recv_timeout(pause) {
                Ok(first) => group.push(first),
                Err(RecvTimeoutError::Timeout) => {
                    // Nothing to write for a while: check the store still takes writes, so
                    // that `/readyz` tells the truth without traffic, and notices a recovery.
                    let probed = self.with_connection(AuditWriter::probe);
                    self.health.set(probed.err().map(|e| e.to_string()));
                    continue;
                }
                // Every handle is gone: nothing more can come.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            take_queued(&rx, &mut group);
            // Events announced but not queued yet are a crypto operation away: gather them
            // (for GATHER at most) so that one commit, one fsync, carries them all.
            let deadline = Instant::now() + GATHER;
            while group.len() < MAX_GROUP && self.coming.load(Ordering::Acquire) > 0 {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                match rx.recv_timeout(left) {
                    Ok(p) => {
                        group.push(p);
                        take_queued(&rx, &mut group);
                    }
                    Err(_) => break,
                }
            }
            if self.commit(&mut group) {
                // Anything that slipped in after the close request is refused, not lost
                // silently.
                while let Ok(late) = rx.try_recv() {
                    let _ = late.reply.send(Err(AuditError::Unavailable(
                        "the server is shutting down".into(),
                    )));
                }
                debug!("Audit writer stopped");
                return;
            }
        }
    }

    /// Commits the events of `group` and answers everyone in it; true if it held a request
    /// to stop (answered once the connection is closed).
    fn commit(&mut self, group: &mut Vec<Pending>) -> bool {
        let mut events = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut closing = Vec::new();
        for p in group.drain(..) {
            match p.event {
                Some(event) => {
                    events.push(*event);
                    replies.push(p.reply);
                }
                None => closing.push(p.reply),
            }
        }
        if !events.is_empty() {
            let started = Instant::now();
            let result = self.commit_with_retry(&mut events);
            let m = crate::metrics::metrics();
            m.audit_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            m.audit_batch_events.observe(events.len() as f64);
            self.health.set(match &result {
                Err(AuditError::Unavailable(e)) => Some(e.clone()),
                _ => None,
            });
            for (event, reply) in events.iter().zip(replies) {
                // A caller that gave up (its request was cancelled) no longer listens: fine.
                let _ = reply.send(result.clone().map(|()| event.seq));
            }
        }
        if closing.is_empty() {
            return false;
        }
        self.connection = None;
        for reply in closing {
            let _ = reply.send(Ok(0));
        }
        true
    }

    /// Runs `f` on the connection, opening it first if needed; a failure drops it, so the
    /// next write starts on a new one.
    fn with_connection<T>(
        &mut self,
        f: impl FnOnce(&mut AuditWriter) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = match &mut self.connection {
            Some(c) => f(c),
            None => match self.store.audit_writer(&self.runtime) {
                Ok(c) => f(self.connection.insert(c)),
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    /// Commits a group. A failure is retried twice: at once (on a new connection), then after
    /// a pause (a busy or failing store); after that the whole group fails.
    fn commit_with_retry(&mut self, events: &mut [EventRow]) -> Result<(), AuditError> {
        let mut attempt = 0;
        loop {
            match self.with_connection(|c| c.append(events)) {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    attempt += 1;
                    debug!(error = %e, "Audit commit failed; retrying");
                }
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    warn!(error = %e, attempt, "Audit commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    error!(error = %e, events = events.len(), "Audit commit failed; refusing the requests");
                    return Err(AuditError::Unavailable(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue's slots are allocated and touched when the server starts, whether or not a
    /// burst ever fills them: a slot must stay a pointer or two, not an event.
    #[test]
    fn a_queue_slot_is_small() {
        assert!(
            std::mem::size_of::<Pending>() <= 32,
            "{}",
            std::mem::size_of::<Pending>()
        );
        assert!(std::mem::size_of::<EventRow>() > 256);
    }
}
