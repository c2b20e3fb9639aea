//! The audit log at scale: fills a fresh SQLite store with N events (default 1,000,000) through
//! the same append path the server uses, then times each kind of filtered query through the
//! same query code as `ca-server audit list` and the gRPC AuditService, walks the chain as
//! `audit verify` does, and prints the store's bytes per event. Every event names one of 500
//! nodes; one in four is a node proxy's (ztunnel's) request for a pod's identity, so that
//! the node proxy's identity is a caller in 250,000 events.
//!
//!     cargo run --release -p ca-tests --bin audit-bench [-- EVENTS]

use std::time::{Duration, Instant};

use ca_server::audit::{EventKind, EventRow};
use ca_server::audit::{Filters, TrustedKeys, VerifyReport, verify_chain};
use ca_server::store::Store;

const DAY_MS: i64 = 86_400_000;

/// The identity of the node proxy whose requests are a quarter of the log.
const NODE_PROXY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

fn hex(n: u128) -> String {
    format!("{n:032x}")
}

/// A deterministic pseudo-random sequence (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn event(i: i64, start_ms: i64, span_ms: i64, total: i64, rng: &mut Rng) -> EventRow {
    let time_ms = start_ms + span_ms * i / total;
    let ns = format!("ns-{}", rng.next() % 1000);
    let sa = format!("sa-{}", rng.next() % 10);
    let denied = rng.next().is_multiple_of(20);
    let mut e = EventRow::new(if denied {
        EventKind::Denied
    } else {
        EventKind::Issued
    });
    e.time_ms = time_ms;
    e.spiffe_id = Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
    e.namespace = Some(ns);
    e.service_account = Some(sa);
    e.pod_name = Some(format!("pod-{}", rng.next() % 100_000));
    e.pod_uid = Some(hex(u128::from(rng.next())));
    e.token_issuer = Some("https://kubernetes.default.svc.cluster.local".into());
    e.peer = Some(format!(
        "10.{}.{}.{}:40000",
        rng.next() % 256,
        rng.next() % 256,
        rng.next() % 256
    ));
    e.csr_sha256 = Some(format!("{:064x}", u128::from(rng.next())));
    // Taken from `i`, not the generator, so the other fields stay what they always were.
    e.node = Some(format!("node-{}", i % 500));
    if i % 4 == 0 {
        e.caller = Some(NODE_PROXY.to_owned());
    }
    if denied {
        e.code = Some("UNAUTHENTICATED".into());
        e.reason = Some("token expired at 2026-01-01T00:00:00Z".into());
    } else {
        let not_before = time_ms / 1000 - 120;
        e.serial = Some(hex(u128::from(rng.next()) << 64 | u128::from(rng.next())));
        e.not_before = Some(not_before);
        e.not_after = Some(not_before + 120 + 3600);
        // Three authorities over the span, as after two rotations.
        e.authority_id = Some(1 + 3 * i / total);
        e.public_key_sha256 = Some(format!("{:064x}", u128::from(rng.next())));
    }
    e
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let total: i64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let dir = match std::env::var("AUDIT_BENCH_DIR") {
        Ok(keep) => {
            std::fs::create_dir_all(&keep)?;
            tempfile::Builder::new().tempdir_in(keep)?
        }
        Err(_) => dir,
    };
    let url = format!("sqlite://{}", dir.path().join("ca.db").display());
    let store = Store::open(&url).await?;

    let span_ms = 30 * DAY_MS;
    let start_ms = 1_780_000_000_000;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let fill = Instant::now();
    let batch = 10_000;
    let mut probe = None;
    for first in (0..total).step_by(batch) {
        let mut events: Vec<EventRow> = (first..(first + batch as i64).min(total))
            .map(|i| event(i, start_ms, span_ms, total, &mut rng))
            .collect();
        if probe.is_none() {
            probe = events.iter().find(|e| e.serial.is_some()).cloned();
        }
        store.append_events(&mut events).await?;
    }
    let fill = fill.elapsed();
    println!(
        "filled {total} events in {:.1} s ({:.0} events/s, hash-chained, {batch} per transaction)",
        fill.as_secs_f64(),
        total as f64 / fill.as_secs_f64()
    );
    let probe = probe.ok_or_else(|| anyhow::anyhow!("no issuance in the seed"))?;

    let mid = start_ms + span_ms / 2;
    let iso = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .map(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    };
    let cases: Vec<(&str, Filters)> = vec![
        ("newest 100, no filter", Filters::default()),
        (
            "--spiffe-id",
            Filters {
                spiffe_id: probe.spiffe_id.clone(),
                ..Default::default()
            },
        ),
        (
            "--spiffe-id (node proxy, as caller)",
            Filters {
                spiffe_id: Some(NODE_PROXY.to_owned()),
                ..Default::default()
            },
        ),
        (
            "--node",
            Filters {
                node: probe.node.clone(),
                ..Default::default()
            },
        ),
        (
            "--node --kind denied",
            Filters {
                node: probe.node.clone(),
                kind: Some("denied".into()),
                ..Default::default()
            },
        ),
        (
            "--namespace --service-account",
            Filters {
                namespace: probe.namespace.clone(),
                service_account: probe.service_account.clone(),
                ..Default::default()
            },
        ),
        (
            "--namespace --kind issued",
            Filters {
                namespace: probe.namespace.clone(),
                kind: Some("issued".into()),
                ..Default::default()
            },
        ),
        (
            "--serial",
            Filters {
                serial: probe.serial.clone(),
                ..Default::default()
            },
        ),
        (
            "--kind denied",
            Filters {
                kind: Some("denied".into()),
                ..Default::default()
            },
        ),
        (
            "--since/--until (1 hour, mid-log)",
            Filters {
                since: Some(iso(mid)),
                until: Some(iso(mid + 3_600_000)),
                ..Default::default()
            },
        ),
        (
            "--authority 2",
            Filters {
                authority: Some(2),
                ..Default::default()
            },
        ),
        (
            "--valid-at (mid-log)",
            Filters {
                valid_at: Some(iso(mid)),
                ..Default::default()
            },
        ),
        (
            "--valid-at --namespace",
            Filters {
                valid_at: Some(iso(mid)),
                namespace: probe.namespace.clone(),
                ..Default::default()
            },
        ),
        (
            "--since (old) --spiffe-id",
            Filters {
                since: Some(iso(start_ms)),
                spiffe_id: probe.spiffe_id.clone(),
                ..Default::default()
            },
        ),
    ];
    println!(
        "\n{:<38} {:>8} {:>10} {:>10}",
        "query (limit 100)", "events", "median ms", "max ms"
    );
    let mut worst = Duration::ZERO;
    for (name, filters) in cases {
        let query = filters.to_query(100, None)?;
        let mut samples = Vec::new();
        let mut found = 0;
        for _ in 0..7 {
            let t = Instant::now();
            found = store.audit_events(&query).await?.len();
            samples.push(t.elapsed());
        }
        let max = *samples.iter().max().unwrap_or(&Duration::ZERO);
        worst = worst.max(median(samples.clone()));
        println!(
            "{name:<38} {found:>8} {:>10.2} {:>10.2}",
            median(samples).as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    println!(
        "slowest median: {:.2} ms (goal: under 50 ms)",
        worst.as_secs_f64() * 1e3
    );

    let rss_before = peak_rss_kib();
    let t = Instant::now();
    let report = verify_chain(&store, None, &TrustedKeys::default()).await?;
    let verify = t.elapsed();
    match report {
        VerifyReport::Intact { events, .. } => println!(
            "\naudit verify: {events} events in {:.1} s ({:.0} events/s); peak RSS {} MiB before, {} MiB after",
            verify.as_secs_f64(),
            events as f64 / verify.as_secs_f64(),
            rss_before / 1024,
            peak_rss_kib() / 1024
        ),
        VerifyReport::Broken { seq, problem } => {
            anyhow::bail!("the seeded chain is broken at {seq}: {problem}")
        }
    }

    store.close().await;
    let bytes: u64 = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "store: {:.1} MiB for {total} events = {:.0} bytes per event (table and indexes)",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / total as f64
    );
    Ok(())
}

/// The process's peak resident set (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}
