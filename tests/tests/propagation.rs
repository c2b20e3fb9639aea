//! Bundle propagation, observed: the server records which bundle it last gave each client
//! (watch streams by what they were sent, polls of `/trust-bundle` by what they were
//! answered), and `root status`, `/metrics` and `root activate` use it, so that "wait until
//! every proxy trusts the new root" is a fact rather than a guess.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::sync::Arc;
use std::time::Duration;

use ca_tests::peer::{channel_with, loopback, tls_config, tls_from};
use ca_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /trust-bundle` from `source`, with `If-None-Match` if given: the status.
async fn poll_from(server: &TestServer, source: std::net::IpAddr, etag: Option<&str>) -> u16 {
    let config = Arc::new(tls_config(server, None, &[b"http/1.1"]));
    let mut tls = tls_from(server, source, config).await.unwrap();
    let extra = etag
        .map(|t| format!("If-None-Match: {t}\r\n"))
        .unwrap_or_default();
    tls.write_all(
        format!(
            "GET /trust-bundle HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn prepared(server: &TestServer, id: i64) -> serde_json::Value {
    server
        .cli_ok(&["root", "status", "--format", "json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["id"] == id)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_waits_for_every_client_seen_to_hold_the_new_root() {
    let f = Fixture::start(&[]);
    let server = &f.server;
    // A poller at 127.0.0.2 fetches bundle 1; a watcher at 127.0.0.3 follows the stream.
    assert_eq!(poll_from(server, loopback(2), None).await, 200);
    let config = Arc::new(tls_config(server, None, &[b"h2"]));
    let channel = channel_with(server, loopback(3), config).await.unwrap();
    let mut watch =
        ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient::new(channel)
            .watch_trust_bundle(ca_proto::ca::v1::WatchTrustBundleRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().sequence, 1);

    server.cli_ok(&["root", "prepare"]);
    // The watcher is sent bundle 2 as soon as the server notices; the poller still holds 1.
    let pushed = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pushed.sequence, 2);
    wait_until(Duration::from_secs(5), "the push recorded", || {
        let status = prepared(server, 2);
        status["bundle_clients"] == 2 && status["clients_without_root"] == 1
    });
    let table = server.cli_ok(&["root", "status"]);
    assert!(
        table.contains("bundle clients seen within the refresh hint: 2")
            && table
                .contains("prepared authority 2: 1 of them still hold a bundle without its root"),
        "{table}"
    );

    // Activation is refused, naming the client, the count and --force.
    let out = server.cli(&["root", "activate", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 client(s) seen within the refresh hint still hold a bundle without authority 2's root: 127.0.0.2 (poll, sequence 1)")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(
        audit_json(server, &["--kind", "authority"])
            .iter()
            .all(|e| !e["reason"]
                .as_str()
                .unwrap()
                .starts_with("activated authority 2")),
        "nothing changed"
    );
    // /metrics says the same.
    wait_until(Duration::from_secs(25), "the lag in /metrics", || {
        let (_, metrics) = http_get(server.http, "/metrics").unwrap();
        metrics.contains("ca_bundle_clients 2") && metrics.contains("ca_bundle_clients_lagging 1")
    });

    // The poller comes back with its old ETag and gets bundle 2: nobody lags, it activates.
    assert_eq!(poll_from(server, loopback(2), Some("\"1\"")).await, 200);
    let said = server.activate("2");
    assert!(said.contains("authority 2 is active"), "{said}");
    wait_until(Duration::from_secs(25), "no lag in /metrics", || {
        let (_, metrics) = http_get(server.http, "/metrics").unwrap();
        metrics.contains("ca_bundle_clients_lagging 0")
    });

    // With --force it goes ahead, and says whom it leaves behind.
    server.cli_ok(&["root", "prepare"]);
    wait_until(Duration::from_secs(5), "the poller behind again", || {
        prepared(server, 3)["clients_without_root"] == 1
    });
    let out = server.cli(&["root", "activate", "3", "--force"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: activating with --force while 1 client(s)")
            && stderr.contains("127.0.0.2"),
        "{stderr}"
    );
    drop(watch);
}
