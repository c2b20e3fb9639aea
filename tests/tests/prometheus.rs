//! The alerting rules (`deploy/prometheus/alerts.yaml`) and the Grafana dashboard
//! (`deploy/grafana/ca-server.json`) against Debian's Prometheus: the rules pass their unit
//! tests under `promtool`, and a real Prometheus scraping a real server loads every rule and
//! evaluates it, and every panel's query, without error, on metrics the server exports.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package; .ci/run installs it).
//! Without them the tests say so and pass, unless `CA_TEST_PROMETHEUS` is set, as CI sets it.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ca_tests::*;

/// The alerts the rules file must have, one per failure the operators asked to be told of.
const ALERTS: [&str; 10] = [
    "CaAuthorityExpiring",
    "CaActiveAuthorityExpiresWithinADay",
    "CaNoActiveAuthority",
    "CaAuditLogNotWritable",
    "CaRefusalsRising",
    "CaRotationStalled",
    "CaBundleClientsLagging",
    "CaTokenReviewFailing",
    "CaPodCertificatesWaiting",
    "CaPodCertificateWatchFailing",
];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Whether `tool` runs; if not, panics when CI asked for it, else says it skipped.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CA_TEST_PROMETHEUS").is_none(),
            "{tool} is missing (apt-get install prometheus)"
        );
        eprintln!("skipped: {tool} is missing (apt-get install prometheus; .ci/run does)");
    }
    found
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !have("promtool") {
        return;
    }
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Prometheus in `dir`, scraping `target` every second and evaluating the rules file.
    fn start(dir: &Path, target: SocketAddr) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{:?}]\n\
                 scrape_configs:\n  - job_name: ca-server\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
                deploy("prometheus/alerts.yaml").display().to_string()
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let prometheus = Self { child, addr, log };
        prometheus.wait("ready", Duration::from_secs(30), || {
            http_get(addr, "/-/ready").is_ok_and(|(status, _)| status == 200)
        });
        prometheus
    }

    fn wait(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < limit,
                "Prometheus: {what}, not within {limit:?}\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET `path` on the HTTP API; its JSON.
    fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: {status}, not JSON ({e}): {body}"));
        json
    }

    /// Evaluates `expr` now; the API's answer.
    fn query(&self, expr: &str) -> serde_json::Value {
        self.api(&format!("/api/v1/query?query={}", percent_encode(expr)))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `ca_` metric families an expression names (`ca_x_total`, `ca_x_bucket` → `ca_x`).
fn families(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("ca_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            let name = &expr[start..end];
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            out.insert(family.to_owned());
        }
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_rule_and_panel_on_a_live_server() {
    if !have("prometheus") {
        return;
    }
    let f = Fixture::start(&[]);
    let server = &f.server;
    // Live data: an issuance, a refusal, a prepared root, a bundle client.
    let (csr_der, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut client = server.client().await;
    create_certificate(
        &mut client,
        Some(&f.issuer.token("shop", "web")),
        &csr_der,
        0,
    )
    .await
    .unwrap();
    create_certificate(&mut client, Some("not-a-token"), &csr_der, 0)
        .await
        .unwrap_err();
    server.cli_ok(&["root", "prepare"]);
    http_get(server.http, "/trust-bundle").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(dir.path(), server.http);
    prometheus.wait("the server scraped", Duration::from_secs(30), || {
        let answer = prometheus.query("ca_bundle_sequence");
        answer["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });

    // Every rule loaded, evaluated, and healthy.
    let mut rules = Vec::new();
    prometheus.wait("every rule evaluated", Duration::from_secs(30), || {
        let answer = prometheus.api("/api/v1/rules");
        rules = answer["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")
    });
    let names: BTreeSet<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ALERTS.into_iter().collect::<BTreeSet<_>>());
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert!(
            rule["lastError"].as_str().unwrap_or("").is_empty(),
            "{rule}"
        );
    }

    // Every rule's and every panel's query evaluates, on families the server exports.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/ca-server.json")).unwrap())
            .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 4);
    let mut queries: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            (
                format!("rule {}", r["name"]),
                r["query"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$instance", ".*");
            queries.push((format!("panel {}", panel["title"]), expr));
        }
    }
    let (_, exposition) = http_get(server.http, "/metrics").unwrap();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for (what, expr) in &queries {
        let answer = prometheus.query(expr);
        assert_eq!(answer["status"], "success", "{what}: {expr}: {answer}");
        let named = families(expr);
        assert!(!named.is_empty(), "{what}: {expr} names no ca_ metric");
        for family in named {
            assert!(
                exported.contains(family.as_str()),
                "{what}: {family} is not among the server's metrics"
            );
        }
    }
    // And on live data: what happened above is there.
    let issued = prometheus.query("sum(ca_issuances_total)");
    assert_eq!(issued["data"]["result"][0]["value"][1], "1", "{issued}");
    let refused = prometheus.query("sum(ca_refusals_total)");
    assert_eq!(refused["data"]["result"][0]["value"][1], "1", "{refused}");
    eprintln!(
        "{} rules and {} queries evaluated by Prometheus",
        rules.len(),
        queries.len()
    );
}
