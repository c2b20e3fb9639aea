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
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tls_from(&f.server, loopback(2), Arc::clone(&config))
                .await
                .unwrap(),
        );
    }
    assert!(
        tls_from(&f.server, loopback(2), Arc::clone(&config))
            .await
            .is_err(),
        "a fifth connection from one address is closed at once"
    );
    for _ in 0..2 {
        held.push(
            tls_from(&f.server, loopback(3), Arc::clone(&config))
                .await
                .unwrap(),
        );
    }
    assert!(
        tls_from(&f.server, loopback(4), Arc::clone(&config))
            .await
            .is_err(),
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
        if let Ok(tls) = tls_from(&f.server, loopback(4), Arc::clone(&config)).await {
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
    // HTTP/1.1 headers that never end.
    let slow_headers = async {
        let config = Arc::new(tls_config(server, None, &[b"http/1.1"]));
        let mut tls = tls_from(server, loopback(4), config).await.unwrap();
        tls.write_all(b"GET /trust-bundle.pem HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        closed_within(&mut tls, Duration::from_secs(15)).await
    };
    // HTTP/1.1 keep-alive after one answer: closed once idle.
    let idle_h1 = async {
        let config = Arc::new(tls_config(server, None, &[b"http/1.1"]));
        let mut tls = tls_from(server, loopback(5), config).await.unwrap();
        tls.write_all(b"GET /trust-bundle.pem HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
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
