//! Abuse limits: token buckets per key (a caller's identity, a peer's address), and the
//! aggregation of repeated refusals into one audit event, so that a flood can neither starve
//! other callers nor fill the disk with identical records.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys a limiter or aggregator tracks; past it, the idle ones are forgotten first.
const MAX_KEYS: usize = 100_000;

/// A rate: `per_second` on average, up to `burst` at once. A zero rate means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: f64,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Self = Self {
        per_second: 0.0,
        burst: 0.0,
    };

    fn is_unlimited(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets, one per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// Buckets filling at `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        bucket.at = now;
    }

    /// Takes one token for `key`; when there is none, how long until there is.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.apply(key, now, true)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.apply(key, now, false)
    }

    fn apply(&self, key: &K, now: Instant, take: bool) -> Result<(), Duration> {
        if self.rate.is_unlimited() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            // Forget the keys whose buckets are full again: they hold no state worth keeping.
            let full = self.rate.burst;
            let rate = self.rate.per_second;
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < full
            });
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.rate.burst,
            at: now,
        });
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Duration::from_secs_f64(missing / self.rate.per_second))
        }
    }
}

/// A run of identical refusals being counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeated<T> {
    /// The latest refusal of the run (what the aggregated event records).
    pub sample: T,
    /// How many were suppressed after the first, which was recorded on its own.
    pub count: u64,
}

#[derive(Debug)]
struct Window<T> {
    opened: Instant,
    suppressed: Option<Repeated<T>>,
}

/// Decides which refusals get an audit event of their own: the first of a kind (same key) in
/// each window; the rest are counted and come out of [`Aggregator::due`] as one event.
#[derive(Debug)]
pub struct Aggregator<K, T> {
    window: Duration,
    windows: Mutex<HashMap<K, Window<T>>>,
}

impl<K: Eq + Hash + Clone, T> Aggregator<K, T> {
    /// Windows of `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this refusal should be recorded now (`true`) or has been counted (`false`);
    /// and a run of this key whose window had closed unreported, to record as well.
    pub fn admit(&self, key: K, refusal: T, now: Instant) -> (bool, Option<Repeated<T>>) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = windows.get_mut(&key) {
            if now.saturating_duration_since(w.opened) < self.window {
                match &mut w.suppressed {
                    Some(r) => {
                        r.sample = refusal;
                        r.count += 1;
                    }
                    None => {
                        w.suppressed = Some(Repeated {
                            sample: refusal,
                            count: 1,
                        })
                    }
                }
                return (false, None);
            }
            // Its window closed: this refusal opens a new one.
            let ended = w.suppressed.take();
            w.opened = now;
            return (true, ended);
        }
        if windows.len() < MAX_KEYS {
            windows.insert(
                key,
                Window {
                    opened: now,
                    suppressed: None,
                },
            );
        }
        // Past MAX_KEYS distinct kinds at once, each is recorded rather than the map growing
        // without bound (the per-peer limit keeps that rare).
        (true, None)
    }

    /// The runs whose window has closed (or all of them, when `all`), to be recorded as one
    /// event each; closed windows are forgotten.
    pub fn due(&self, now: Instant, all: bool) -> Vec<(K, Repeated<T>)> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        windows.retain(|key, w| {
            let closed = all || now.saturating_duration_since(w.opened) >= self.window;
            if closed && let Some(run) = w.suppressed.take() {
                out.push((key.clone(), run));
            }
            !closed
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate() {
        let limiter = RateLimiter::new(Rate {
            per_second: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take(&"a", t0).unwrap();
        }
        let wait = limiter.take(&"a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        limiter.take(&"b", t0).expect("keys are independent");
        limiter
            .take(&"a", t0 + Duration::from_millis(500))
            .expect("refilled");
        assert!(
            limiter
                .check(&"a", t0 + Duration::from_millis(500))
                .is_err()
        );
        assert!(
            RateLimiter::new(Rate::UNLIMITED).take(&"a", t0).is_ok(),
            "a zero rate is no limit"
        );
    }

    #[test]
    fn repeats_in_a_window_become_one_event() {
        let agg = Aggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(
            agg.admit("peer", 1, t0),
            (true, None),
            "the first is recorded"
        );
        for i in 2..=100 {
            assert_eq!(
                agg.admit("peer", i, t0 + Duration::from_millis(i)),
                (false, None)
            );
        }
        assert_eq!(agg.admit("other", 1, t0), (true, None), "another key");
        assert!(agg.due(t0 + Duration::from_secs(1), false).is_empty());
        let due = agg.due(t0 + Duration::from_secs(10), false);
        assert_eq!(
            due,
            vec![(
                "peer",
                Repeated {
                    sample: 100,
                    count: 99
                }
            )]
        );
        assert_eq!(
            agg.admit("peer", 101, t0 + Duration::from_secs(11)),
            (true, None)
        );
        // A run whose window closed before `due` saw it comes out with the next refusal.
        assert_eq!(
            agg.admit("peer", 102, t0 + Duration::from_secs(12)),
            (false, None)
        );
        assert_eq!(
            agg.admit("peer", 103, t0 + Duration::from_secs(22)),
            (
                true,
                Some(Repeated {
                    sample: 102,
                    count: 1
                })
            )
        );
    }
}
