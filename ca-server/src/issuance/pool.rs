//! The crypto pool: a fixed set of threads, one per core, that run the CPU-bound part of each
//! request (the CSR's proof of possession, signing) off the async reactor. Its queue is
//! bounded: when it is full a request is refused at once (RESOURCE_EXHAUSTED) rather than left
//! to wait, so a burst never turns into a hang.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The queue is full.
    #[error("the server is at capacity ({0} requests queued); retry shortly")]
    Full(usize),
    /// The pool has stopped (the server is shutting down).
    #[error("the server is shutting down")]
    Stopped,
}

impl crate::class::Classify for PoolError {
    fn class(&self) -> crate::class::Class {
        match self {
            Self::Full(_) => crate::class::Class::Overloaded,
            Self::Stopped => crate::class::Class::Unavailable,
        }
    }

    fn reason(&self) -> &'static str {
        "capacity"
    }
}

/// A handle on the pool; cheap to clone.
#[derive(Clone)]
pub struct CryptoPool {
    queue: SyncSender<Job>,
    capacity: usize,
}

impl std::fmt::Debug for CryptoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoPool")
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn work(queue: Arc<Mutex<Receiver<Job>>>) {
    loop {
        // Hold the lock only to take a job, not while running it.
        let job = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

impl CryptoPool {
    /// A pool of `threads` workers with room for `capacity` queued jobs.
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<Self> {
        let (queue, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("crypto-{i}"))
                .spawn(move || work(rx))?;
        }
        Ok(Self { queue, capacity })
    }

    /// A pool with one worker per core.
    pub fn per_core(capacity: usize) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(cores, capacity)
    }

    /// Runs `f` on the pool and waits for its result; refused at once if the queue is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have gone (its request was cancelled): nothing to do then.
            let _ = done.send(f());
        });
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => PoolError::Full(self.capacity),
            TrySendError::Disconnected(_) => PoolError::Stopped,
        })?;
        result.await.map_err(|_| PoolError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_refuses_when_full() {
        let pool = CryptoPool::new(1, 2).unwrap();
        assert_eq!(pool.run(|| 21 * 2).await, Ok(42));

        // Block the only worker, fill the queue, and the next job is refused at once.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(move || gate.recv().is_ok()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(move || i).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(pool.run(|| 0).await, Err(PoolError::Full(2)));
        release.send(()).unwrap();
        assert_eq!(blocker.await.unwrap(), Ok(true));
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.unwrap(), Ok(i));
        }
    }
}
