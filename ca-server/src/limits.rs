//! Abuse limits: token buckets per key (a caller's identity, a peer's address), and the
//! aggregation of repeated refusals into one audit event, so that a flood can neither starve
//! other callers nor fill the disk with identical records.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys a limiter tracks; past it, the keys whose buckets are full again are forgotten,
/// and if none is, new keys share one overflow bucket: memory stays bounded whatever the
/// peers send.
const MAX_KEYS: usize = 100_000;

/// Most runs of refusals counted at once; past it, refusals of new kinds are counted in one
/// overflow run.
pub const MAX_RUNS: usize = 4096;

/// The key a peer's address is limited and counted under: an IPv4 address as it is, an
/// IPv6 address by its /64 (one host's interface usually owns a whole /64, so a bucket per
/// /128 is no limit at all), an IPv4-mapped IPv6 address as the IPv4 address.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

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

#[derive(Debug)]
struct Buckets<K> {
    by_key: HashMap<K, Bucket>,
    /// Shared by the keys that found the map full.
    overflow: Option<Bucket>,
}

/// Token buckets, one per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<Buckets<K>>,
    max_keys: usize,
}

/// What to do with a bucket's token.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    Take,
    Check,
    GiveBack,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// Buckets filling at `rate`.
    pub fn new(rate: Rate) -> Self {
        Self::with_capacity(rate, MAX_KEYS)
    }

    fn with_capacity(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            buckets: Mutex::new(Buckets {
                by_key: HashMap::new(),
                overflow: None,
            }),
            max_keys,
        }
    }

    /// Takes one token for `key`; when there is none, how long until there is.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.apply(key, now, Op::Take)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.apply(key, now, Op::Check)
    }

    /// Puts back a token taken for `key` (the work it paid for turned out to be a success).
    pub fn give_back(&self, key: &K, now: Instant) {
        let _ = self.apply(key, now, Op::GiveBack);
    }

    fn apply(&self, key: &K, now: Instant, op: Op) -> Result<(), Duration> {
        if self.rate.is_unlimited() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Buckets { by_key, overflow } = &mut *buckets;
        if !by_key.contains_key(key) && by_key.len() >= self.max_keys {
            // Forget the keys whose buckets are full again: they hold no state worth keeping.
            let (full, rate) = (self.rate.burst, self.rate.per_second);
            by_key.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < full
            });
        }
        let fresh = Bucket {
            tokens: self.rate.burst,
            at: now,
        };
        let bucket = if by_key.contains_key(key) || by_key.len() < self.max_keys {
            by_key.entry(key.clone()).or_insert(fresh)
        } else {
            overflow.get_or_insert(fresh)
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        bucket.at = now;
        if op == Op::GiveBack {
            bucket.tokens = (bucket.tokens + 1.0).min(self.rate.burst);
            return Ok(());
        }
        if bucket.tokens >= 1.0 {
            if op == Op::Take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Duration::from_secs_f64(missing / self.rate.per_second))
        }
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.lock().unwrap().by_key.len()
    }
}

/// A finished run, to be recorded: its key (`None` for the overflow run) and its count.
pub type Run<K, T> = (Option<K>, Repeated<T>);

/// A run of refusals of one kind being counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeated<T> {
    /// The latest refusal of the run (what the aggregated event records).
    pub sample: T,
    /// How many refusals the run stands for (none of which was recorded on its own).
    pub count: u64,
    /// The window it was counted in.
    pub window: Duration,
}

#[derive(Debug)]
struct Window<T> {
    opened: Instant,
    /// How long this window stays open: the aggregator's window at first, twice as long
    /// each time it closes with refusals counted, up to [`MAX_WINDOW_GROWTH`] times that.
    length: Duration,
    suppressed: Option<Repeated<T>>,
}

/// How many times its first length a run's window may grow to while refusals keep coming:
/// a flood that goes on is written once a minute (with 10 s windows), not six times.
pub const MAX_WINDOW_GROWTH: u32 = 6;

impl<T> Window<T> {
    fn new(opened: Instant, length: Duration) -> Self {
        Self {
            opened,
            length,
            suppressed: None,
        }
    }

    fn closed(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.opened) >= self.length
    }

    /// Opens the next window of a run that is still busy: longer, up to `max`.
    fn reopen(&mut self, now: Instant, max: Duration) {
        self.opened = now;
        self.length = (self.length * 2).min(max);
    }

    fn count(&mut self, refusal: T) {
        match &mut self.suppressed {
            Some(r) => {
                r.sample = refusal;
                r.count += 1;
            }
            None => {
                self.suppressed = Some(Repeated {
                    sample: refusal,
                    count: 1,
                    window: self.length,
                })
            }
        }
    }
}

#[derive(Debug)]
struct Windows<K, T> {
    by_key: HashMap<K, Window<T>>,
    /// Counts the refusals of new kinds while `by_key` is full.
    overflow: Option<Window<T>>,
}

/// Decides which refusals get an audit event of their own. The first of a kind (same key)
/// after a quiet spell is recorded at once; the rest are counted, and each window's count
/// comes out of [`Aggregator::due`] as one event. While refusals of a kind keep coming, each
/// window yields that one event and nothing more, and the next window is twice as long (up
/// to [`MAX_WINDOW_GROWTH`] times the first): a steady flood writes a few events per kind in
/// its first minute and one a minute after that, whatever it sends.
#[derive(Debug)]
pub struct Aggregator<K, T> {
    window: Duration,
    windows: Mutex<Windows<K, T>>,
    max_runs: usize,
}

impl<K: Eq + Hash + Clone, T> Aggregator<K, T> {
    /// Windows of `window`.
    pub fn new(window: Duration) -> Self {
        Self::with_capacity(window, MAX_RUNS)
    }

    fn with_capacity(window: Duration, max_runs: usize) -> Self {
        Self {
            window,
            windows: Mutex::new(Windows {
                by_key: HashMap::new(),
                overflow: None,
            }),
            max_runs,
        }
    }

    /// Whether this refusal should be recorded now (`true`) or has been counted (`false`);
    /// and a run of this key whose window had closed unreported, to record as well (its key
    /// `None` for the overflow run).
    pub fn admit(&self, key: K, refusal: T, now: Instant) -> (bool, Option<Run<K, T>>) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (window, max) = (self.window, self.max_window());
        let Windows { by_key, overflow } = &mut *windows;
        let full = by_key.len() >= self.max_runs;
        let (slot, name) = match by_key.get_mut(&key) {
            Some(w) => (w, Some(key)),
            None if !full => {
                by_key.insert(key, Window::new(now, window));
                return (true, None);
            }
            None => match overflow {
                Some(w) => (w, None),
                None => {
                    *overflow = Some(Window::new(now, window));
                    return (true, None);
                }
            },
        };
        if !slot.closed(now) {
            slot.count(refusal);
            return (false, None);
        }
        // Its window closed before `due` saw it: a busy run goes on being counted, a quiet
        // one starts over with this refusal recorded on its own.
        match slot.suppressed.take() {
            Some(ended) => {
                slot.reopen(now, max);
                slot.count(refusal);
                (false, Some((name, ended)))
            }
            None => {
                *slot = Window::new(now, window);
                (true, None)
            }
        }
    }

    /// The runs whose window has closed (or all of them, when `all`), to be recorded as one
    /// event each (the overflow run under `None`). A closed window that counted refusals
    /// opens again, so that a flood going on is counted, not recorded refusal by refusal; a
    /// quiet one is forgotten.
    pub fn due(&self, now: Instant, all: bool) -> Vec<Run<K, T>> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.max_window();
        let closed = |w: &Window<T>| all || w.closed(now);
        let mut out = Vec::new();
        windows.by_key.retain(|key, w| {
            if !closed(w) {
                return true;
            }
            match w.suppressed.take() {
                Some(run) => {
                    out.push((Some(key.clone()), run));
                    w.reopen(now, max);
                    !all
                }
                None => false,
            }
        });
        let mut forget_overflow = false;
        if let Some(w) = windows.overflow.as_mut().filter(|w| closed(w)) {
            match w.suppressed.take() {
                Some(run) => {
                    out.push((None, run));
                    w.reopen(now, max);
                    forget_overflow = all;
                }
                None => forget_overflow = true,
            }
        }
        if forget_overflow {
            windows.overflow = None;
        }
        out
    }

    fn max_window(&self) -> Duration {
        self.window * MAX_WINDOW_GROWTH
    }

    #[cfg(test)]
    fn runs(&self) -> usize {
        self.windows.lock().unwrap().by_key.len()
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
        // A token given back can be taken again at once, but never beyond the burst.
        limiter.give_back(&"a", t0 + Duration::from_millis(500));
        limiter
            .take(&"a", t0 + Duration::from_millis(500))
            .expect("given back");
        for _ in 0..10 {
            limiter.give_back(&"c", t0);
        }
        for _ in 0..3 {
            limiter.take(&"c", t0).unwrap();
        }
        assert!(limiter.take(&"c", t0).is_err(), "no more than the burst");
        assert!(
            RateLimiter::new(Rate::UNLIMITED).take(&"a", t0).is_ok(),
            "a zero rate is no limit"
        );
    }

    #[test]
    fn a_full_limiter_shares_one_bucket_among_new_keys() {
        let limiter = RateLimiter::with_capacity(
            Rate {
                per_second: 1.0,
                burst: 2.0,
            },
            3,
        );
        let t0 = Instant::now();
        // Three keys, each with a bucket in use: none can be forgotten.
        for key in 0..3 {
            limiter.take(&key, t0).unwrap();
        }
        // New keys share one bucket: two between them, then nothing.
        assert!(limiter.take(&10, t0).is_ok() && limiter.take(&11, t0).is_ok());
        assert!(limiter.take(&12, t0).is_err() && limiter.take(&13, t0).is_err());
        assert_eq!(limiter.keys(), 3, "the map never grew");
        // Once the tracked buckets are full again, they make room.
        let later = t0 + Duration::from_secs(5);
        limiter.take(&20, later).unwrap();
        assert!(limiter.keys() <= 3);
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        assert_eq!(peer_key(a).to_string(), "2001:db8:1:2::");
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(peer_key(v4), v4);
        assert_eq!(peer_key("::ffff:10.1.2.3".parse().unwrap()), v4);
    }

    #[test]
    fn a_burst_becomes_one_counted_event() {
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
                Some("peer"),
                Repeated {
                    sample: 100,
                    count: 99,
                    window: Duration::from_secs(10),
                }
            )]
        );
        // The quiet key is forgotten; the busy one is still counted, not recorded anew, in a
        // window twice as long.
        assert_eq!(agg.runs(), 1);
        assert_eq!(
            agg.admit("peer", 101, t0 + Duration::from_secs(11)),
            (false, None)
        );
        assert_eq!(
            agg.admit("peer", 102, t0 + Duration::from_secs(29)),
            (false, None),
            "still inside the 20 s window"
        );
        // A run whose window closed before `due` saw it comes out with the next refusal,
        // which goes on being counted.
        assert_eq!(
            agg.admit("peer", 103, t0 + Duration::from_secs(31)),
            (
                false,
                Some((
                    Some("peer"),
                    Repeated {
                        sample: 102,
                        count: 2,
                        window: Duration::from_secs(20),
                    }
                ))
            )
        );
        // Its window is now 40 s; after it, one event, and then a quiet window forgets it.
        assert!(agg.due(t0 + Duration::from_secs(70), false).is_empty());
        assert_eq!(agg.due(t0 + Duration::from_secs(71), false).len(), 1);
        assert!(agg.due(t0 + Duration::from_secs(131), false).is_empty());
        assert_eq!(agg.runs(), 0);
        // After a quiet window, a refusal is recorded on its own again.
        assert_eq!(
            agg.admit("peer", 104, t0 + Duration::from_secs(132)),
            (true, None)
        );
    }

    #[test]
    fn a_steady_flood_writes_a_few_events_then_one_a_minute() {
        let agg = Aggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        // Events written in each minute of an eleven-minute flood.
        let mut per_minute = [0usize; 11];
        for ms in (0..11 * 60_000u64).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            let (now_too, ended) = agg.admit("flood", ms, now);
            let mut written = usize::from(now_too) + usize::from(ended.is_some());
            if ms % 2000 == 0 {
                written += agg.due(now, false).len();
            }
            per_minute[(ms / 60_000) as usize] += written;
        }
        // The first on its own, then the runs closing at 10 and 30 s (windows of 10, 20 s).
        assert_eq!(per_minute[0], 3, "{per_minute:?}");
        // From then on, about one a minute (windows of 40 s, then 60 s).
        assert!(per_minute[1..].iter().all(|n| *n <= 2), "{per_minute:?}");
        assert!(
            per_minute[1..].iter().sum::<usize>() <= 11,
            "{per_minute:?}"
        );
    }

    #[test]
    fn new_kinds_past_the_cap_share_one_overflow_run() {
        let agg = Aggregator::with_capacity(Duration::from_secs(10), 4);
        let t0 = Instant::now();
        let recorded = (0..1000).filter(|i| agg.admit(*i, *i, t0).0).count();
        // Four kinds recorded on their own, one for the overflow run, the rest counted.
        assert_eq!(recorded, 5);
        assert_eq!(agg.runs(), 4);
        let due = agg.due(t0 + Duration::from_secs(10), false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, None);
        assert_eq!(due[0].1.count, 995);
        assert!(agg.due(t0 + Duration::from_secs(30), true).is_empty());
    }
}
