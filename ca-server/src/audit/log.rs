//! The audit writer: one task commits events in groups (many events, one transaction), and
//! answers each caller only after its event is durable.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::store::{EventRow, Head, Store};

/// Largest group committed in one transaction.
const MAX_GROUP: usize = 512;

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

struct Pending {
    event: EventRow,
    reply: oneshot::Sender<Result<i64, AuditError>>,
}

/// A handle for recording events; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Starts the writer task on `store`, with a queue of `capacity` events.
    pub fn start(store: Store, capacity: usize) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        tokio::spawn(write_loop(store, rx));
        Self { queue }
    }

    /// Records `event` and waits until it is committed; returns its sequence number.
    pub async fn record(&self, event: EventRow) -> Result<i64, AuditError> {
        let (reply, done) = oneshot::channel();
        self.queue
            .try_send(Pending { event, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AuditError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    AuditError::Unavailable("the audit writer has stopped".into())
                }
            })?;
        done.await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut head = None;
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (mut events, replies): (Vec<EventRow>, Vec<_>) =
            group.drain(..).map(|p| (p.event, p.reply)).unzip();
        let result = commit_with_retry(&store, &mut head, &mut events).await;
        for (event, reply) in events.iter().zip(replies) {
            // A caller that gave up (its request was cancelled) no longer listens: fine.
            let _ = reply.send(result.clone().map(|()| event.seq));
        }
    }
}

/// Commits a group. A failure is retried twice: at once (the head we remembered may be stale
/// because another writer, such as the CLI, appended), then after a pause (a busy or failing
/// store); after that the whole group fails.
async fn commit_with_retry(
    store: &Store,
    head: &mut Option<Head>,
    events: &mut [EventRow],
) -> Result<(), AuditError> {
    let mut attempt = 0;
    loop {
        match store.append_events_after(head, events).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt == 0 => {
                attempt += 1;
                debug!(error = %e, "Audit commit failed; retrying with the head read afresh");
            }
            Err(e) if attempt < 3 => {
                attempt += 1;
                warn!(error = %e, attempt, "Audit commit failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                error!(error = %e, events = events.len(), "Audit commit failed; refusing the requests");
                return Err(AuditError::Unavailable(e.to_string()));
            }
        }
    }
}
