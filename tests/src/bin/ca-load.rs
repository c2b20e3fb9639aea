//! Load tools for the issuance benchmark (`bench/issuance.sh`):
//!
//!     ca-load body --out FILE                 the gRPC body h2load sends (a framed request)
//!     ca-load crypto [--seconds S]            the crypto limit, measured in-process
//!     ca-load burst --server URL --ca-bundle FILE --token-file FILE [--requests N]
//!                                             N requests at once; exits non-zero on any
//!                                             error but RESOURCE_EXHAUSTED or any answer
//!                                             slower than 2 s

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
                ca_server::authority::random_serial().0,
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
    Ok(())
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("body") => body(&args),
        Some("crypto") => crypto(&args),
        Some("burst") => burst(&args).await,
        _ => anyhow::bail!("usage: ca-load body|crypto|burst …"),
    }
}
