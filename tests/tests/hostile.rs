//! The CA as a hostile peer on the pod network sees it: each attack of SECURITY.md's list,
//! built for real against the binary, with the refusal it gets, how much it can add to the
//! audit log, and that the server goes on serving everyone else.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_tests::kube::{FakeKubeApi, review_authenticated, review_refused};
use ca_tests::peer::{client_from, loopback, tls_config, tls_from};
use ca_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A request with `token` (if any) and `ImpersonatedIdentity` (if any), ending at `deadline`
/// (if any).
fn request(
    token: Option<&str>,
    csr: &str,
    impersonate: Option<&str>,
    deadline: Option<Duration>,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|id| {
        let mut m = prost_types::Struct::default();
        m.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
            },
        );
        m
    });
    let mut r = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 0,
        metadata,
    });
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(d) = deadline {
        r.set_timeout(d);
    }
    r
}

/// The denied events, with the refusals each stands for (1, or its count).
fn refusals(events: &[Value]) -> i64 {
    events
        .iter()
        .map(|e| e["count"].as_i64().unwrap_or(1))
        .sum()
}

/// Whether any text value of `event` holds a control character.
fn has_controls(event: &Value) -> bool {
    event
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_str)
        .any(|s| s.chars().any(char::is_control))
}

#[tokio::test]
async fn claims_stay_claims_and_a_flood_of_them_adds_a_handful_of_rows() {
    let mut f = Fixture::start(&[]);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let victim = "spiffe://cluster.local/ns/victim/sa/db";

    // 300 requests with no token, each claiming a different 2 KiB identity in the victim's
    // namespace, with terminal escapes in it.
    let mut flood = client_from(&f.server, loopback(2)).await;
    let started = Instant::now();
    for i in 0..300 {
        let claim = format!(
            "{victim}-{i}-\u{1b}[2J\u{1b}]0;owned\u{7}{}",
            "x".repeat(2048)
        );
        let status = flood
            .create_certificate(request(None, &csr, Some(&claim), None))
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                Code::Unauthenticated | Code::ResourceExhausted
            ),
            "{status:?}"
        );
        assert!(status.message().len() <= 2048);
    }
    // An authenticated workload, no node proxy, claiming the victim's identity, and one
    // whose CSR names forty 1 KiB SANs.
    let web = f.issuer.token("shop", "web");
    let mut client = f.server.client().await;
    let status = client
        .create_certificate(request(
            Some(&web),
            &csr,
            Some(&format!("={victim}\u{1b}[31m")),
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    let sans: Vec<String> = (0..40)
        .map(|i| format!("spiffe://cluster.local/ns/shop/sa/{i}{}", "s".repeat(1000)))
        .collect();
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let (huge_csr, _) = ca_tests::csr(&rcgen::PKCS_ECDSA_P256_SHA256, &sans);
    assert!(huge_csr.len() > 40 * 1024, "{}", huge_csr.len());
    let status = create_certificate(&mut client, Some(&web), &huge_csr, 0)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{}",
        status.message()
    );
    assert!(status.message().len() <= 2048, "{}", status.message().len());

    // Nothing claimed is found as an identity: not the victim's, not any of the flood's.
    for id in [victim, &format!("{victim}-7")] {
        assert!(
            audit_json(&f.server, &["--spiffe-id", id]).is_empty(),
            "{id}"
        );
    }
    assert!(audit_json(&f.server, &["--namespace", "victim"]).is_empty());
    let denied = audit_json(&f.server, &["--kind", "denied"]);
    for e in &denied {
        assert!(
            e["spiffe_id"].is_null() || e["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web",
            "{e}"
        );
        assert!(
            e["requested"].as_str().is_none_or(|r| r.len() <= 256),
            "{e}"
        );
        assert!(e["reason"].as_str().unwrap().len() <= 512, "{e}");
        assert!(!has_controls(e), "{e}");
    }
    // The workload's claim is its own field, found under the workload that made it.
    let by_web = audit_json(
        &f.server,
        &[
            "--spiffe-id",
            "spiffe://cluster.local/ns/shop/sa/web",
            "--kind",
            "denied",
        ],
    );
    assert!(
        by_web.iter().any(|e| e["requested"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("={victim}\\u{{1b}}[31m")))),
        "{by_web:?}"
    );

    // The flood: a handful of rows, every refusal counted in them once the counts are in.
    let from_flood = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["peer"].as_str().unwrap_or("").starts_with("127.0.0.2:"))
            .cloned()
            .collect()
    };
    // Two kinds (no token; then, the budget spent, the peer's rate): the first of each at
    // once, and one row per kind for each 10 s window the flood lasted beyond the first.
    let windows = 1 + started.elapsed().as_secs() / 10;
    let rows = from_flood(&denied);
    assert!(
        rows.len() as u64 <= 2 * windows,
        "{} rows: {rows:?}",
        rows.len()
    );
    assert!(
        f.server
            .terminate(Duration::from_secs(20))
            .unwrap()
            .success()
    );
    let rows = from_flood(&audit_json(&f.server, &["--kind", "denied"]));
    assert!(
        rows.len() as u64 <= 2 * windows + 2,
        "{} rows: {rows:?}",
        rows.len()
    );
    assert_eq!(refusals(&rows), 300, "{rows:?}");
    assert_audit_intact(&f.server);

    // What people read is safe to print: table and show escape controls, CSV cells never
    // start a formula.
    f.server.start_again();
    let table = f.server.cli_ok(&["audit", "list", "--kind", "denied"]);
    assert!(
        !table.contains('\u{1b}') && table.contains("\\u{1b}"),
        "{table}"
    );
    let csv = f
        .server
        .cli_ok(&["audit", "list", "--kind", "denied", "--format", "csv"]);
    assert!(
        csv.lines()
            .all(|line| !line.contains(",=") && !line.contains(",\"=")),
        "{csv}"
    );
    assert!(csv.contains(",'="), "{csv}");
}

/// A token of `issuer` for `shop`/`sa` (which the CA does not know: only a review vouches).
fn review_token(issuer: &TestIssuer, sa: &str) -> String {
    issuer.token("shop", sa)
}

#[tokio::test]
async fn work_before_authentication_is_charged_when_it_starts_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let good = review_token(&issuer, "web");
    let good_in_handler = good.clone();
    // The API server vouches for one token at once, and takes 3 s to refuse any other.
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(move |r| {
            if r.body["spec"]["token"] == good_in_handler.as_str() {
                return (201, review_authenticated("shop", "web", "web-1", "uid-1"));
            }
            std::thread::sleep(Duration::from_secs(3));
            (201, review_refused("token not found"))
        }),
    );
    let mut flags = api.flags();
    flags.extend(
        [
            "--unauthenticated-rate",
            "0.1",
            "--unauthenticated-burst",
            "5",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut peer = client_from(&server, loopback(2)).await;
    peer.create_certificate(request(Some(&good), &csr, None, None))
        .await
        .expect("a good token is reviewed and issued");
    let reviews = || {
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/tokenreviews"))
            .count()
    };
    assert_eq!(reviews(), 1);

    // Twenty unknown tokens whose clients give up after 300 ms, before the API answers: each
    // review is charged when it starts, so the budget of five is spent on the first five,
    // and the rest are refused at once, without asking the API.
    let mut codes = Vec::new();
    for i in 0..20 {
        let token = review_token(&issuer, &format!("forged-{i}"));
        let started = Instant::now();
        let status = peer
            .create_certificate(request(
                Some(&token),
                &csr,
                None,
                Some(Duration::from_millis(300)),
            ))
            .await
            .unwrap_err();
        codes.push(status.code());
        if status.code() == Code::ResourceExhausted {
            assert!(
                status.message().contains("too many failed authentications"),
                "{}",
                status.message()
            );
            assert!(started.elapsed() < Duration::from_millis(250));
        }
    }
    let gave_up = codes
        .iter()
        .filter(|c| **c == Code::DeadlineExceeded)
        .count();
    assert!((5..=6).contains(&gave_up), "{codes:?}");
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count(),
        20 - gave_up,
        "{codes:?}"
    );
    assert!(reviews() <= 1 + 6, "{} reviews", reviews());

    // The good token, verified before, is served at the same address all the same.
    peer.create_certificate(request(Some(&good), &csr, None, None))
        .await
        .expect("a remembered token is never refused for its neighbours");

    // A token without exp (a legacy secret) is refused before anyone is asked.
    let mut claims = issuer.claims("shop", "legacy");
    claims.as_object_mut().unwrap().remove("exp");
    let before = reviews();
    let status = client_from(&server, loopback(3))
        .await
        .create_certificate(request(Some(&issuer.sign(&claims)), &csr, None, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("no exp claim"),
        "{}",
        status.message()
    );
    assert_eq!(reviews(), before);
}

#[tokio::test]
async fn token_reviews_are_bounded_remembered_when_refused_and_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let api = FakeKubeApi::start(
        dir.path(),
        Arc::new(|_| {
            std::thread::sleep(Duration::from_secs(2));
            (201, review_refused("token not found"))
        }),
    );
    let mut flags = api.flags();
    flags.extend(["--max-token-reviews", "2"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start(&dir.path().join("data"), &flags);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let reviews = || {
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/tokenreviews"))
            .count()
    };

    // Two reviews outstanding: a third is refused at once, to be retried.
    let mut waiting = Vec::new();
    let slow: Vec<String> = (0..2)
        .map(|i| review_token(&issuer, &format!("slow-{i}")))
        .collect();
    for (n, token) in [3, 4].into_iter().zip(slow.clone()) {
        let mut client = client_from(&server, loopback(n)).await;
        let csr = csr.clone();
        waiting.push(tokio::spawn(async move {
            client
                .create_certificate(request(Some(&token), &csr, None, None))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = client_from(&server, loopback(5))
        .await
        .create_certificate(request(
            Some(&review_token(&issuer, "third")),
            &csr,
            None,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("--max-token-reviews"),
        "{}",
        status.message()
    );
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(reviews(), 2);

    // A refused token sent again is refused from memory: the API is not asked twice.
    let again = &slow[0];
    let status = client_from(&server, loopback(6))
        .await
        .create_certificate(request(Some(again), &csr, None, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("token not found"),
        "{}",
        status.message()
    );
    assert_eq!(reviews(), 2);

    // An API that answers 429 is left alone for a while, whatever the callers do; and one
    // that names no audience, or none of ours, vouches for nothing.
    api.set_handler(Arc::new(|_| (429, serde_json::json!({"kind": "Status"}))));
    let mut statuses = Vec::new();
    for n in 7..13 {
        let token = review_token(&issuer, &format!("busy-{n}"));
        statuses.push(
            client_from(&server, loopback(n))
                .await
                .create_certificate(request(Some(&token), &csr, None, None))
                .await
                .unwrap_err(),
        );
    }
    assert!(
        statuses.iter().all(|s| s.code() == Code::Unavailable),
        "{statuses:?}"
    );
    assert!(
        statuses[1..]
            .iter()
            .all(|s| s.message().contains("not called for another")),
        "{statuses:?}"
    );
    assert_eq!(reviews(), 3, "one call, then the backoff");
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (i, audiences) in [
        serde_json::json!([]),
        serde_json::json!(["some-other-service"]),
    ]
    .into_iter()
    .enumerate()
    {
        api.set_handler(Arc::new(move |_| {
            let mut answer = review_authenticated("shop", "web", "web-1", "uid-1");
            answer["status"]["audiences"] = audiences.clone();
            (201, answer)
        }));
        let status = client_from(&server, loopback(20))
            .await
            .create_certificate(request(
                Some(&review_token(&issuer, &format!("audience-{i}"))),
                &csr,
                None,
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
        assert!(
            status.message().contains("does not include istio-ca"),
            "{}",
            status.message()
        );
    }
}

/// Calls `call` every 100 ms until it is refused (within 5 s, else fails saying `what` still
/// happens); the refusal.
async fn refused_within_5s<T, F, Fut>(what: &str, mut call: F) -> tonic::Status
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match call().await {
            Err(status) => return status,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("after 5 s, {what} still"),
        }
    }
}

/// Reads from `stream` until the server closes it (or `limit` passes); how long that took.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn connections_are_capped_per_address_and_in_all() {
    let f = Fixture::start(&["--max-connections-per-ip", "4", "--max-connections", "6"]);
    let config = Arc::new(tls_config(&f.server, None, &[b"h2"]));
    let connect = |n| tls_from(&f.server, loopback(n), Arc::clone(&config));
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(2).await.unwrap());
    }
    assert!(
        connect(2).await.is_err(),
        "a fifth connection from one address is closed at once"
    );
    for _ in 0..2 {
        held.push(connect(3).await.unwrap());
    }
    assert!(
        connect(4).await.is_err(),
        "past the total, any address is closed at once"
    );
    let (_, metrics) = http_get(f.server.http, "/metrics").unwrap();
    assert!(
        metrics.contains("ca_connections_refused_total{limit=\"max_connections_per_ip\"} 1")
            && metrics.contains("ca_connections_refused_total{limit=\"max_connections\"} 1"),
        "{metrics}"
    );
    // Once they close, there is room again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut client = loop {
        if let Ok(tls) = connect(4).await {
            drop(tls);
            break client_from(&f.server, loopback(4)).await;
        }
        assert!(
            Instant::now() < deadline,
            "no room after the connections closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&f.issuer.token("shop", "web")), &csr, 0)
        .await
        .expect("served once there is room");

    // The health listener is capped the same way, and still answers others.
    let mut plain = Vec::new();
    for _ in 0..4 {
        plain.push(
            ca_tests::peer::tcp_from(loopback(2), f.server.http)
                .await
                .unwrap(),
        );
    }
    let mut fifth = ca_tests::peer::tcp_from(loopback(2), f.server.http)
        .await
        .unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2))
            .await
            .is_some(),
        "a fifth health connection from one address is closed at once"
    );
    assert_eq!(http_get(f.server.http, "/readyz").unwrap().0, 200);
}

#[tokio::test]
async fn connections_that_say_nothing_or_idle_are_reaped() {
    let f = Fixture::start(&["--idle-timeout", "2s"]);
    let server = &f.server;
    // Silent after TCP: no ClientHello.
    let silent = async {
        let mut tcp = ca_tests::peer::tcp_from(loopback(2), server.grpc)
            .await
            .unwrap();
        closed_within(&mut tcp, Duration::from_secs(15)).await
    };
    // A TLS handshake, then nothing (no ALPN: the protocol would be sniffed from the first
    // bytes, which never come).
    let mute = async {
        let config = Arc::new(tls_config(server, None, &[]));
        let mut tls = tls_from(server, loopback(3), config).await.unwrap();
        closed_within(&mut tls, Duration::from_secs(15)).await
    };
    // An HTTP/1.1 connection from 127.0.0.`n` that has sent `bytes`.
    let h1_sent = |n: u8, bytes: &'static [u8]| async move {
        let config = Arc::new(tls_config(server, None, &[b"http/1.1"]));
        let mut tls = tls_from(server, loopback(n), config).await.unwrap();
        tls.write_all(bytes).await.unwrap();
        tls
    };
    // HTTP/1.1 headers that never end.
    let slow_headers = async {
        let mut tls = h1_sent(4, b"GET /trust-bundle.pem HTTP/1.1\r\nHost: x\r\n").await;
        closed_within(&mut tls, Duration::from_secs(15)).await
    };
    // HTTP/1.1 keep-alive after one answer: closed once idle.
    let idle_h1 = async {
        let mut tls = h1_sent(5, b"GET /trust-bundle.pem HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut head = [0u8; 12];
        tls.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        closed_within(&mut tls, Duration::from_secs(8)).await
    };
    // HTTP/2 with keepalive pings from the client, after one answer: pings do not keep it.
    let idle_h2 = async {
        let config = Arc::new(tls_config(server, None, &[b"h2"]));
        let tls = tls_from(server, loopback(6), config).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_millis(300))
                .keep_alive_while_idle(true)
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                    tls,
                ))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let answer = sender
            .send_request(
                http::Request::get(format!("https://{}/trust-bundle.pem", server.grpc))
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        drop(answer);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(8), conn)
            .await
            .ok()
            .map(|_| started.elapsed())
    };
    let (silent, mute, slow_headers, idle_h1, idle_h2) =
        tokio::join!(silent, mute, slow_headers, idle_h1, idle_h2);
    for (what, took, limit) in [
        ("a silent TCP connection", silent, 12),
        ("a TLS connection that sends nothing", mute, 12),
        ("unfinished HTTP/1 headers", slow_headers, 12),
        ("an idle HTTP/1 connection", idle_h1, 5),
        ("an idle HTTP/2 connection with pings", idle_h2, 5),
    ] {
        let took = took.unwrap_or_else(|| panic!("{what} was never closed:\n{}", server.stderr()));
        assert!(
            took < Duration::from_secs(limit),
            "{what}: closed after {took:?}"
        );
    }
    // Everyone else was served all along.
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    create_certificate(&mut client, Some(&f.issuer.token("shop", "web")), &csr, 0)
        .await
        .unwrap();
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let flags = issuer.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start_wrapped(
        &dir.path().join("data"),
        &flags,
        &["prlimit", "--nofile=96:96", "--"],
    );
    // More connections than the server has descriptors left: accept fails with EMFILE.
    let mut open = Vec::new();
    for _ in 0..150 {
        if let Ok(tcp) = ca_tests::peer::tcp_from(loopback(2), server.grpc).await {
            open.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(open);
    // It goes on accepting once descriptors are free again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let token = issuer.token("shop", "web");
    loop {
        let served = async {
            let mut client = client_from(&server, loopback(3)).await;
            create_certificate(&mut client, Some(&token), &csr, 0).await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), served).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving again:\n{}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        server.stderr().contains("Accept failed"),
        "{}",
        server.stderr()
    );
}

const AUDITOR: &str = "spiffe://cluster.local/ns/audit/sa/reader";

/// A certificate for `ns`/`sa` with `ttl_secs` of life, as (chain without the root, key).
async fn certificate_for(f: &Fixture, ns: &str, sa: &str, ttl_secs: i64) -> (String, String) {
    let (csr, key) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let chain = create_certificate(
        &mut f.server.client().await,
        Some(&f.issuer.token(ns, sa)),
        &csr,
        ttl_secs,
    )
    .await
    .unwrap();
    (chain[..chain.len() - 1].concat(), key.serialize_pem())
}

/// An audit client of `f`'s server over connections made with `config`.
async fn auditor(
    f: &Fixture,
    config: Arc<rustls::ClientConfig>,
) -> ca_proto::ca::v1::audit_service_client::AuditServiceClient<tonic::transport::Channel> {
    ca_proto::ca::v1::audit_service_client::AuditServiceClient::new(
        ca_tests::peer::channel_with(&f.server, loopback(1), config)
            .await
            .unwrap(),
    )
}

async fn list(
    client: &mut ca_proto::ca::v1::audit_service_client::AuditServiceClient<
        tonic::transport::Channel,
    >,
) -> Result<usize, tonic::Status> {
    client
        .list_events(ca_proto::ca::v1::ListEventsRequest::default())
        .await
        .map(|r| r.into_inner().events.len())
}

#[tokio::test]
async fn an_auditor_is_checked_on_every_call_even_on_a_resumed_session() {
    let f = Fixture::start(&["--auditor", AUDITOR]);
    // A certificate that lives five seconds.
    let (chain, key) = certificate_for(&f, "audit", "reader", 5).await;
    let config = Arc::new(tls_config(&f.server, Some((&chain, &key)), &[b"h2"]));
    let mut open = auditor(&f, Arc::clone(&config)).await;
    assert!(list(&mut open).await.unwrap() > 0);
    // A second connection from the same configuration resumes the first's TLS session.
    let resumed = tls_from(&f.server, loopback(1), Arc::clone(&config))
        .await
        .unwrap();
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the session was resumed"
    );
    drop(resumed);

    tokio::time::sleep(Duration::from_secs(6)).await;
    // Expired: refused on the connection it already had...
    let status = list(&mut open).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("no longer accepted") && status.message().contains(AUDITOR),
        "{}",
        status.message()
    );
    // ...and on a session resumed without the certificate being looked at again.
    let tls = tls_from(&f.server, loopback(1), Arc::clone(&config))
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let once = Arc::new(std::sync::Mutex::new(Some(tls)));
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let stream = once.lock().unwrap().take();
        async move {
            stream
                .map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("one connection only"))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.server.grpc))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap();
    let mut resumed = ca_proto::ca::v1::audit_service_client::AuditServiceClient::new(channel);
    let status = list(&mut resumed).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("no longer accepted"),
        "{status:?}"
    );
}

#[tokio::test]
async fn an_auditor_of_a_retired_authority_is_refused_on_its_open_connection() {
    let f = Fixture::start(&["--auditor", AUDITOR]);
    let (chain, key) = certificate_for(&f, "audit", "reader", 3600).await;
    let mut open = auditor(
        &f,
        Arc::new(tls_config(&f.server, Some((&chain, &key)), &[b"h2"])),
    )
    .await;
    assert!(list(&mut open).await.is_ok());
    // A compromise: authority 1 is replaced and retired at once.
    f.server.cli_ok(&["root", "prepare"]);
    f.server.activate("2");
    f.server.cli_ok(&["root", "retire", "1", "--force"]);
    let status = refused_within_5s("the retired authority's auditor reads the log", || {
        let mut open = open.clone();
        async move { list(&mut open).await }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("no longer accepted"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn only_this_cas_authorities_vouch_for_an_auditor_not_their_corporate_root() {
    use ca_tests::pki::{ca_params, corporate_root, write_cacerts};
    let f = Fixture::start(&["--auditor", AUDITOR]);
    // The mesh CA is an intermediate of a corporate root that signs for others too.
    let pki = corporate_root();
    let cacerts = f.dir.path().join("cacerts");
    write_cacerts(
        &cacerts,
        &pki,
        ca_params("Example Corp Mesh CA"),
        &rcgen::KeyPair::generate().unwrap(),
    );
    f.server
        .cli_ok(&["root", "prepare", "--import-dir", cacerts.to_str().unwrap()]);
    f.server.activate("2");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(f.server.bundle_pem().contains(pki.root_pem.trim()));

    // Another team's intermediate under the same root makes itself an auditor certificate.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = ca_params("Example Corp Other Team CA");
    other.use_authority_key_identifier_extension = true;
    let other_issuer = rcgen::Issuer::from_params(&other, &other_key);
    let other_pem = other
        .signed_by(
            &other_key,
            &rcgen::Issuer::from_params(&pki.root_params, &pki.root_key),
        )
        .unwrap()
        .pem();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(AUDITOR.try_into().unwrap())];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_pem = leaf.signed_by(&leaf_key, &other_issuer).unwrap().pem();
    let forged = Arc::new(tls_config(
        &f.server,
        Some((&format!("{leaf_pem}{other_pem}"), &leaf_key.serialize_pem())),
        &[b"h2"],
    ));
    let refused = match ca_tests::peer::channel_with(&f.server, loopback(1), forged).await {
        Err(_) => true,
        Ok(channel) => ca_proto::ca::v1::audit_service_client::AuditServiceClient::new(channel)
            .list_events(ca_proto::ca::v1::ListEventsRequest::default())
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate from another intermediate of the root reads the log"
    );

    // One from the mesh CA itself is an auditor.
    let (chain, key) = certificate_for(&f, "audit", "reader", 3600).await;
    let mut real = auditor(
        &f,
        Arc::new(tls_config(&f.server, Some((&chain, &key)), &[b"h2"])),
    )
    .await;
    assert!(list(&mut real).await.is_ok());
}

#[tokio::test]
async fn a_log_rewritten_and_signed_anew_under_another_key_is_caught() {
    let mut f = Fixture::start(&[]);
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut client = f.server.client().await;
    for sa in ["web", "db", "cart"] {
        create_certificate(&mut client, Some(&f.issuer.token("shop", sa)), &csr, 0)
            .await
            .unwrap();
    }
    f.server.cli_ok(&["audit", "checkpoint", "--now"]);
    assert!(
        f.server
            .terminate(Duration::from_secs(20))
            .unwrap()
            .success()
    );
    assert_audit_intact(&f.server);

    // Someone who can write the database rewrites an event, recomputes every hash after it,
    // drops the checkpoints and signs the new head with a key of their own.
    let url = f.server.database_url();
    let store = ca_server::store::Store::open(&url).await.unwrap();
    let mut events = store.audit_events_after(0, 100_000).await.unwrap();
    let mut prev = String::new();
    let mut statements = vec!["DELETE FROM audit_checkpoints".to_owned()];
    for e in &mut events {
        if e.seq == 4 {
            e.spiffe_id = Some("spiffe://cluster.local/ns/shop/sa/innocent".into());
        }
        if e.seq >= 4 {
            e.prev_hash = prev.clone();
            e.hash = ca_server::audit::event_hash(e);
            statements.push(format!(
                "UPDATE audit_events SET spiffe_id = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {}",
                e.spiffe_id.clone().unwrap_or_default(),
                e.prev_hash,
                e.hash,
                e.seq
            ));
        }
        prev = e.hash.clone();
    }
    let head = events.last().unwrap();
    let forger_dir = tempfile::tempdir().unwrap();
    let forger = ca_server::audit::AuditKey::load_or_create(forger_dir.path()).unwrap();
    let forged = forger.sign(head.seq, &head.hash);
    statements.push(format!(
        "INSERT INTO audit_checkpoints (seq, hash, time_ms, public_key, signature) \
         VALUES ({}, '{}', {}, '{}', '{}')",
        forged.seq, forged.hash, forged.time_ms, forged.public_key, forged.signature
    ));
    store.close().await;
    let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
    run_sql(&url, &statements).await;

    // The chain holds, the signature holds, and verify still reports it, naming the key.
    let out = f.server.cli(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("BROKEN")
            && text.contains(&forged.public_key)
            && text.contains("not trusted"),
        "{text}"
    );
    // Nor is it exported as if it were good.
    let out = f.server.cli(&["audit", "checkpoint"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&forged.public_key),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key that is pinned (another replica's, printed by `audit key`) is trusted.
    let pinned = forger_dir.path().join("replica.pub");
    std::fs::write(&pinned, forger.public_key_pem()).unwrap();
    f.server.cli_ok(&[
        "audit",
        "verify",
        "--trusted-audit-key",
        pinned.to_str().unwrap(),
    ]);
    let key = f.server.cli_ok(&["audit", "key"]);
    assert!(key.starts_with("-----BEGIN PUBLIC KEY-----"), "{key}");
}

#[tokio::test]
async fn token_keys_follow_their_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(dir.path());
    let jwks = ca_tests::jwks::JwksServer::start(&dir.path().join("api"), issuer.jwks());
    let server = TestServer::start(
        &dir.path().join("data"),
        &[
            "--token-issuer",
            &issuer.iss,
            "--token-jwks-url",
            &jwks.url(),
            "--token-jwks-ca",
            jwks.ca_file.to_str().unwrap(),
            "--token-jwks-refresh",
            "1s",
        ],
    );
    let mut client = server.client().await;
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let token = issuer.token("shop", "web");
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("issued");
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .expect("and again, from the verified-token cache");

    // The key leaves the JWKS (rotated out after a leak, say): at the next refresh the token,
    // remembered or not, stops working.
    jwks.set_body(r#"{"keys": []}"#.to_owned());
    let status = refused_within_5s("a key removed from the JWKS verifies", || {
        let (mut client, token, csr) = (client.clone(), token.clone(), csr.clone());
        async move { create_certificate(&mut client, Some(&token), &csr, 0).await }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    assert!(
        status.message().contains("no key with kid"),
        "{}",
        status.message()
    );

    // A JWKS that names one kid twice is refused whole, at start.
    let doubled: Value = {
        let mut set: Value = serde_json::from_str(&issuer.jwks()).unwrap();
        let key = set["keys"][0].clone();
        set["keys"].as_array_mut().unwrap().push(key);
        set
    };
    let file = dir.path().join("doubled.json");
    std::fs::write(&file, doubled.to_string()).unwrap();
    let out = ca_server(&[
        "run",
        "--data-dir",
        dir.path().join("d2").to_str().unwrap(),
        "--token-issuer",
        &issuer.iss,
        "--token-jwks-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("more than once") && err.contains(&issuer.kid),
        "{err}"
    );

    // Plain HTTP for keys or the API is refused at start, naming the flag.
    for (flags, named) in [
        (
            vec![
                "--token-issuer",
                &issuer.iss,
                "--token-jwks-url",
                "http://127.0.0.1:1/jwks",
            ],
            "--token-jwks-url",
        ),
        (
            vec!["--token-review", "--kube-api-url", "http://127.0.0.1:1"],
            "--kube-api-url",
        ),
    ] {
        let mut args = vec!["run", "--data-dir", "/nonexistent/never-created"];
        args.extend(flags);
        let out = ca_server(&args);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named) && err.contains("https://"), "{err}");
        assert!(!std::path::Path::new("/nonexistent/never-created").exists());
    }
}

#[tokio::test]
async fn a_node_proxy_of_another_cluster_is_checked_against_its_own_cluster_or_not_at_all() {
    use ca_tests::kube::{FakePods, pod};
    use ca_tests::ztunnel::{Ztunnel, ZtunnelRequest, ztunnel_token};
    let dir = tempfile::tempdir().unwrap();
    // The local cluster: shop/web runs on its node-a.
    let local = TestIssuer::new(&dir.path().join("local"));
    let local_pods = FakePods::default();
    local_pods.add(pod(
        "shop",
        "web-1",
        "uid-web-1",
        "web",
        "node-a",
        "Running",
    ));
    let local_api = FakeKubeApi::start(dir.path(), local_pods.handler());
    // Cluster east has a node-a too; whether shop/web runs there, only east's API can say.
    let mut east = TestIssuer::new(&dir.path().join("east"));
    east.iss = "https://oidc.east.example".into();
    let east_dir = dir.path().join("east-api");
    std::fs::create_dir_all(&east_dir).unwrap();
    let east_pods = FakePods::default();
    let east_api = FakeKubeApi::start(&east_dir, east_pods.handler());
    let config = |with_api: bool| {
        let mut text = format!(
            "[[token_issuers]]\nissuer = \"{}\"\njwks_file = \"{}\"\ncluster_id = \"east\"\n",
            east.iss,
            east.jwks_path.display()
        );
        if with_api {
            text.push_str(&format!(
                "kube_api_url = \"{}\"\nkube_token_file = \"{}\"\nkube_ca_file = \"{}\"\n",
                east_api.url,
                east_api.token_file.display(),
                east_api.ca_file.display()
            ));
        }
        let path = dir.path().join(format!("ca-server-{with_api}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    for with_api in [false, true] {
        let config = config(with_api);
        let mut flags = local.flags();
        flags.extend(local_api.api_flags());
        flags.extend(
            [
                "--trusted-node-account",
                "istio-system/ztunnel",
                "--config",
                config.to_str().unwrap(),
            ]
            .map(String::from),
        );
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = TestServer::start(&dir.path().join(format!("data-{with_api}")), &flags);
        let mut ztunnel = Ztunnel::connect(&server).await;
        // Local ztunnel on node-a: granted, checked against the local API.
        ztunnel
            .fetch(&ZtunnelRequest {
                token: &ztunnel_token(&local, Some("node-a")),
                identity: web,
                impersonate: true,
            })
            .await
            .expect("the local node proxy gets its node's pod");
        // East's ztunnel, on its own node-a.
        let east_token = ztunnel_token(&east, Some("node-a"));
        let asked = ZtunnelRequest {
            token: &east_token,
            identity: web,
            impersonate: true,
        };
        let local_lists = local_api.requests().len();
        let status = ztunnel.fetch(&asked).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
        assert_eq!(
            local_api.requests().len(),
            local_lists,
            "the local API is never asked about another cluster's node"
        );
        if !with_api {
            assert!(
                status.message().contains("cluster east")
                    && status.message().contains("kube_api_url"),
                "{}",
                status.message()
            );
            continue;
        }
        // With east's API: refused while shop/web does not run on east's node-a...
        assert!(
            status.message().contains("no running pod"),
            "{}",
            status.message()
        );
        // ...granted once it does.
        east_pods.add(pod(
            "shop",
            "web-9",
            "uid-web-9",
            "web",
            "node-a",
            "Running",
        ));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        ztunnel
            .fetch(&asked)
            .await
            .expect("east's node proxy gets east's pod");
        assert!(
            east_api
                .requests()
                .iter()
                .any(|r| r.path.contains("node-a"))
        );
    }
}

#[tokio::test]
async fn printed_output_is_escaped_and_a_shared_out_dir_cannot_redirect_writes() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start(&[]);
    // A shared directory where someone planted links to a file of ours.
    let shared = f.dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let victim = f.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    for name in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        std::os::unix::fs::symlink(&victim, shared.join(name)).unwrap();
    }
    let token_file = f.dir.path().join("token");
    std::fs::write(&token_file, f.issuer.token("shop", "web")).unwrap();
    let out = ca_server(&[
        "request",
        "--server",
        &format!("https://{}", f.server.grpc),
        "--ca-bundle",
        f.server.data_dir.join("trust-bundle.pem").to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--out-dir",
        shared.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&shared).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file(), "{:?}", entry.path());
        names.push(entry.file_name().into_string().unwrap());
    }
    names.sort();
    assert_eq!(
        names,
        ["cert-chain.pem", "key.pem", "root-cert.pem"],
        "no temporary left"
    );
    let mode = std::fs::metadata(shared.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A certificate whose names carry terminal escapes: inspect prints them escaped.
    let evil = "evil\u{1b}[2J\u{1b}]0;owned\u{7}";
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![format!("{evil}.example")]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, evil);
    let file = f.dir.path().join("evil.pem");
    std::fs::write(&file, params.self_signed(&key).unwrap().pem()).unwrap();
    let out = f.server.cli(&["inspect", file.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("evil\\u{1b}[2J"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );

    // A record holding control characters (written by an older version, or by hand) is
    // printed escaped by `audit show` and `audit list`.
    let serial = f.server.cli_ok(&[
        "audit", "list", "--kind", "issued", "--format", "json", "--limit", "1",
    ]);
    let serial: Value = serde_json::from_str(serial.lines().next().unwrap()).unwrap();
    let serial = serial["serial"].as_str().unwrap().to_owned();
    run_sql(
        &f.server.database_url(),
        &[&format!(
            "UPDATE audit_events SET pod_name = 'pod\u{1b}[31m', reason = '=1+1\u{1b}[0m' \
             WHERE serial = '{serial}'"
        )],
    )
    .await;
    for args in [
        vec!["audit", "show", &serial],
        vec!["audit", "list", "--serial", &serial],
    ] {
        let text = f.server.cli_ok(&args);
        assert!(
            !text.contains('\u{1b}') && text.contains("\\u{1b}"),
            "{args:?}: {text}"
        );
    }
    let csv = f
        .server
        .cli_ok(&["audit", "list", "--serial", &serial, "--format", "csv"]);
    assert!(csv.contains(",'=1+1"), "{csv}");
}
