//! Load tools for the issuance benchmark (`bench/issuance.sh`):
//!
//!     ca-load body --out FILE                 the gRPC body h2load sends (a framed request)
//!     ca-load crypto [--seconds S]            the crypto limit, measured in-process
//!     ca-load burst --server URL --ca-bundle FILE --token-file FILE [--requests N]
//!                                             N requests at once; exits non-zero on any
//!                                             error but RESOURCE_EXHAUSTED or any answer
//!                                             slower than 2 s
//!     ca-load flood --server-addr 127.0.0.1:PORT --ca-bundle FILE --token-file FILE...
//!                   --database-url URL --pid PID [--seconds S] [--legit-rate N]
//!                                             a hostile peer (127.0.0.2) floods at full
//!                                             speed while honest clients (127.0.0.1) ask at
//!                                             N/s; their success rate and latency, the audit
//!                                             rows and bytes the flood added, the server's
//!                                             peak RSS

use std::time::{Duration, Instant};

use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn p2csr() -> (String, rcgen::KeyPair) {
    ca_tests::csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[])
}

/// `body`: a length-prefixed gRPC message (flag byte, 4-byte big-endian length, protobuf).
fn body(args: &[String]) -> anyhow::Result<()> {
    let out = arg(args, "--out").ok_or_else(|| anyhow::anyhow!("--out FILE"))?;
    let (csr, _) = p2csr();
    let message = IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    framed.extend_from_slice(&message);
    std::fs::write(out, framed)?;
    Ok(())
}

/// `crypto`: what one core does per second of the work no CA can skip: verify the CSR's
/// signature (P-256), sign the leaf (P-256), verify a token (ES256).
fn crypto(args: &[String]) -> anyhow::Result<()> {
    use ca_server::issuance::{check_csr, profile};
    let seconds: f64 = arg(args, "--seconds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    let ca_key = rcgen::KeyPair::generate()?;
    let td = ca_server::TrustDomain::new("cluster.local").map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca_params = ca_server::authority::root_params(&td, 1, time::OffsetDateTime::now_utc());
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let (csr, _) = p2csr();
    let id = ca_server::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = tempfile::tempdir()?;
    let dev = ca_server::auth::dev::DevIssuer::load_or_create(dir.path())?;
    let token = dev.mint("a", "b", "istio-ca", 3600, None)?;
    let jwk: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&dev.jwks_json())?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk.keys[0])?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["istio-ca"]);

    let run = |with_token: bool| -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            let checked = check_csr(&csr)?;
            let now = time::OffsetDateTime::now_utc();
            let validity = profile::Validity {
                not_before: now,
                not_after: now + time::Duration::hours(1),
            };
            let params = profile::leaf_params(
                &id,
                checked.key,
                validity,
                ca_server::x509::random_serial().0,
            )?;
            let public = rcgen::SubjectPublicKeyInfo::from_der(&checked.spki_der)?;
            std::hint::black_box(params.signed_by(&public, &issuer)?);
            if with_token {
                std::hint::black_box(jsonwebtoken::decode::<serde_json::Value>(
                    &token,
                    &key,
                    &validation,
                )?);
            }
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let without = run(false)?;
    let with = run(true)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("crypto_per_core_csr_sign={without:.0}");
    println!("crypto_per_core_csr_sign_token={with:.0}");
    println!("cores={cores}");
    println!("crypto_floor_us={:.1}", floor_us(&csr, seconds)?);
    Ok(())
}

/// The crypto floor of one issuance, in microseconds: the three public-key operations every
/// request needs and nothing else (the CSR's signature checked, a leaf's TBS signed, that
/// signature checked as the self-check does), on aws-lc-rs directly.
fn floor_us(csr_pem: &str, seconds: f64) -> anyhow::Result<f64> {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    use x509_parser::prelude::FromDer;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)?;
    let tbs = csr.certification_request_info.raw;
    let csr_sig = &csr.signature_value.data;
    let csr_key = &csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data;
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca_public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, ca.public_key().as_ref().to_vec());
    // A leaf's TBS is about this long.
    let leaf_tbs = vec![0x30u8; 420];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, csr_key.as_ref())
            .verify(tbs, csr_sig)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sig = ca
            .sign(&rng, &leaf_tbs)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ca_public
            .verify(&leaf_tbs, sig.as_ref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// `burst`: N requests at once over a few connections.
async fn burst(args: &[String]) -> anyhow::Result<()> {
    let server = arg(args, "--server").unwrap_or_else(|| "https://127.0.0.1:15012".into());
    let bundle = std::fs::read_to_string(
        arg(args, "--ca-bundle").ok_or_else(|| anyhow::anyhow!("--ca-bundle FILE"))?,
    )?;
    let token = std::fs::read_to_string(
        arg(args, "--token-file").ok_or_else(|| anyhow::anyhow!("--token-file FILE"))?,
    )?;
    let token = token.trim().to_owned();
    let requests: usize = arg(args, "--requests")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5000);
    let connections: usize = arg(args, "--connections")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let channel = Channel::from_shared(server.clone())?
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&bundle)))?
            .connect()
            .await?;
        clients
            .push(IstioCertificateServiceClient::new(channel).max_decoding_message_size(1 << 20));
    }
    let csrs: Vec<String> = (0..64).map(|_| p2csr().0).collect();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..requests {
        let mut client = clients[i % connections].clone();
        let csr = csrs[i % csrs.len()].clone();
        let token = token.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let result = ca_tests::create_certificate(&mut client, Some(&token), &csr, 0).await;
            (result.map(|_| ()).map_err(|s| s.code()), t.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        let (result, latency) = done?;
        latencies.push(latency);
        *codes
            .entry(match result {
                Ok(()) => "OK".to_owned(),
                Err(code) => format!("{code:?}"),
            })
            .or_default() += 1;
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let max = *latencies.last().unwrap_or(&Duration::ZERO);
    println!("burst_requests={requests}");
    println!("burst_seconds={:.3}", elapsed.as_secs_f64());
    for (code, n) in &codes {
        println!("burst_code_{code}={n}");
    }
    println!("burst_p50_ms={:.1}", pct(0.50).as_secs_f64() * 1e3);
    println!("burst_p99_ms={:.1}", pct(0.99).as_secs_f64() * 1e3);
    println!("burst_max_ms={:.1}", max.as_secs_f64() * 1e3);
    let bad: usize = codes
        .iter()
        .filter(|(c, _)| *c != "OK" && *c != "ResourceExhausted")
        .map(|(_, n)| n)
        .sum();
    if bad > 0 || max > Duration::from_secs(2) {
        anyhow::bail!("burst failed: {bad} unexpected errors, slowest answer {max:?}");
    }
    Ok(())
}

/// The server's resident set size now and at its peak (`VmRSS`, `VmHWM`), KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One request of the flood: garbage of a few kinds, each meant to cost the server
/// something or to land in its audit log.
fn hostile_request(i: u64, csr: &str) -> tonic::Request<IstioCertificateRequest> {
    let claim = format!(
        "spiffe://cluster.local/ns/victim/sa/{i}-\u{1b}[2J{}",
        "x".repeat(2048)
    );
    let metadata = i.is_multiple_of(2).then(|| {
        let mut m = prost_types::Struct::default();
        m.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(claim)),
            },
        );
        m
    });
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: 0,
        metadata,
    });
    let header = match i % 4 {
        // No token at all.
        0 => None,
        // A well-formed ES256 token nobody signed, with a new kid and subject each time.
        1 => {
            let b64 = |v: &serde_json::Value| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let header = serde_json::json!({"alg": "ES256", "kid": format!("kid-{i}")});
            let claims = serde_json::json!({
                "iss": "https://kubernetes.default.svc.cluster.local",
                "sub": format!("system:serviceaccount:victim:sa-{i}"),
                "aud": ["istio-ca"], "exp": 4_000_000_000_i64,
            });
            Some(format!("Bearer {}.{}.c2ln", b64(&header), b64(&claims)))
        }
        // Not a JWT.
        2 => Some(format!("Bearer garbage-{i}")),
        // Not even Bearer.
        _ => Some(format!("Basic {i}")),
    };
    if let Some(h) = header.and_then(|h| h.parse().ok()) {
        request.metadata_mut().insert("authorization", h);
    }
    request
}

/// What the audit log holds after `after`: (rows, bytes of their JSON), for the flood's peer
/// and for everyone else.
async fn audit_growth(
    store: &ca_server::store::Store,
    after: i64,
    flood_ip: &str,
) -> anyhow::Result<((u64, u64), (u64, u64))> {
    let (mut flood, mut others) = ((0, 0), (0, 0));
    let mut from = after;
    loop {
        let page = store.audit_events_after(from, 5000).await?;
        let Some(last) = page.last() else { break };
        from = last.seq;
        for e in &page {
            let bytes = ca_server::audit::render::to_json(e).len() as u64;
            let who = if e
                .peer
                .as_deref()
                .is_some_and(|p| p.starts_with(&format!("{flood_ip}:")))
            {
                &mut flood
            } else {
                &mut others
            };
            who.0 += 1;
            who.1 += bytes;
        }
    }
    Ok((flood, others))
}

/// `flood`: a hostile peer at full speed beside honest clients.
async fn flood(args: &[String]) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let addr: std::net::SocketAddr = arg(args, "--server-addr")
        .unwrap_or_else(|| "127.0.0.1:15012".into())
        .parse()?;
    let bundle = std::fs::read_to_string(
        arg(args, "--ca-bundle").ok_or_else(|| anyhow::anyhow!("--ca-bundle FILE"))?,
    )?;
    // One token per honest client, round robin: several identities, as a mesh has, each
    // within its own --identity-rate.
    let tokens: Vec<String> = args
        .iter()
        .zip(args.iter().skip(1))
        .filter(|(flag, _)| *flag == "--token-file")
        .map(|(_, path)| std::fs::read_to_string(path).map(|t| t.trim().to_owned()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!tokens.is_empty(), "--token-file FILE (repeatable)");
    let database_url =
        arg(args, "--database-url").ok_or_else(|| anyhow::anyhow!("--database-url URL"))?;
    let pid: u32 = arg(args, "--pid")
        .ok_or_else(|| anyhow::anyhow!("--pid PID (the server's)"))?
        .parse()?;
    let seconds: f64 = arg(args, "--seconds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(60.0);
    let legit_rate: f64 = arg(args, "--legit-rate")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50.0);
    let flood_connections: usize = arg(args, "--flood-connections")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8);
    let flood_in_flight: usize = arg(args, "--flood-in-flight")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32);
    let (flood_ip, honest_ip) = ("127.0.0.2", "127.0.0.1");

    let store = ca_server::store::Store::open_read_only(&database_url).await?;
    let start_seq = store.audit_head().await?.map_or(0, |(seq, _)| seq);
    let config = Arc::new(ca_tests::peer::tls_config_trusting(&bundle, None, &[b"h2"]));
    let stop = Arc::new(AtomicBool::new(false));

    // The flood: several connections, many requests in flight on each, as fast as answered.
    let sent = Arc::new(AtomicU64::new(0));
    let codes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let (flood_csr, _) = p2csr();
    let mut flooders = tokio::task::JoinSet::new();
    for _ in 0..flood_connections {
        let channel =
            ca_tests::peer::channel_to(addr, flood_ip.parse()?, Arc::clone(&config)).await?;
        for _ in 0..flood_in_flight {
            let mut client = IstioCertificateServiceClient::new(channel.clone());
            let (stop, sent, codes, csr) = (
                Arc::clone(&stop),
                Arc::clone(&sent),
                Arc::clone(&codes),
                flood_csr.clone(),
            );
            flooders.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = sent.fetch_add(1, Ordering::Relaxed);
                    let code = match client.create_certificate(hostile_request(i, &csr)).await {
                        Ok(_) => "OK".to_owned(),
                        Err(s) => format!("{:?}", s.code()),
                    };
                    *codes.lock().expect("lock").entry(code).or_default() += 1;
                }
            });
        }
    }

    // The honest clients: a steady rate over a few connections, each request timed.
    let mut honest = tokio::task::JoinSet::new();
    let clients = 8usize;
    let csrs: Vec<String> = (0..16).map(|_| p2csr().0).collect();
    let period = Duration::from_secs_f64(clients as f64 / legit_rate);
    for c in 0..clients {
        let channel =
            ca_tests::peer::channel_to(addr, honest_ip.parse()?, Arc::clone(&config)).await?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let (stop, token, csr) = (
            Arc::clone(&stop),
            tokens[c % tokens.len()].clone(),
            csrs[c % csrs.len()].clone(),
        );
        honest.spawn(async move {
            let mut results = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                let mut request = tonic::Request::new(IstioCertificateRequest {
                    csr: csr.clone(),
                    validity_duration: 0,
                    metadata: None,
                });
                if let Ok(h) = format!("Bearer {token}").parse() {
                    request.metadata_mut().insert("authorization", h);
                }
                request.set_timeout(Duration::from_secs(10));
                let ok = client.create_certificate(request).await.is_ok();
                results.push((ok, t.elapsed()));
            }
            results
        });
    }

    let started = Instant::now();
    let mut peak_rss = 0;
    while started.elapsed().as_secs_f64() < seconds {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(rss_kib(pid).0);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut ok = 0u64;
    while let Some(done) = honest.join_next().await {
        for (good, latency) in done? {
            ok += u64::from(good);
            latencies.push(latency);
        }
    }
    flooders.abort_all();
    while flooders.join_next().await.is_some() {}
    // Refusals still being counted are written within the aggregation window, 10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let ((flood_rows, flood_bytes), (other_rows, other_bytes)) =
        audit_growth(&store, start_seq, flood_ip).await?;
    let (_, hwm) = rss_kib(pid);
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let total = latencies.len() as u64;
    let minutes = elapsed / 60.0;
    println!("flood_seconds={elapsed:.1}");
    println!("flood_requests={}", sent.load(Ordering::Relaxed));
    println!(
        "flood_requests_per_second={:.0}",
        sent.load(Ordering::Relaxed) as f64 / elapsed
    );
    for (code, n) in codes.lock().expect("lock").iter() {
        println!("flood_code_{code}={n}");
    }
    println!("honest_requests={total}");
    println!("honest_ok={ok}");
    println!(
        "honest_success_percent={:.3}",
        if total == 0 {
            0.0
        } else {
            ok as f64 * 100.0 / total as f64
        }
    );
    println!("honest_p50_ms={:.1}", pct(0.50).as_secs_f64() * 1e3);
    println!("honest_p99_ms={:.1}", pct(0.99).as_secs_f64() * 1e3);
    println!(
        "honest_max_ms={:.1}",
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!("audit_rows_flood={flood_rows}");
    println!("audit_bytes_flood={flood_bytes}");
    println!(
        "audit_bytes_flood_per_minute={:.0}",
        flood_bytes as f64 / minutes
    );
    println!("audit_rows_honest={other_rows}");
    println!("audit_bytes_honest={other_bytes}");
    println!(
        "server_rss_peak_sampled_mib={:.1}",
        peak_rss as f64 / 1024.0
    );
    println!("server_rss_hwm_mib={:.1}", hwm as f64 / 1024.0);
    store.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("body") => body(&args),
        Some("crypto") => crypto(&args),
        Some("burst") => burst(&args).await,
        Some("flood") => flood(&args).await,
        _ => anyhow::bail!("usage: ca-load body|crypto|burst|flood …"),
    }
}
