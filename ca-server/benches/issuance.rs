//! The issuance pipeline without the network, to watch for regressions:
//!
//!     cargo bench -p ca-server --bench issuance
//!
//! `check_csr` (parse + proof of possession), `issue` (profile + signing), the whole path a
//! request takes through the CPU (token from the cache, CSR check, signing), a token check
//! without the cache, and the audit hash.

#![allow(clippy::unwrap_used)] // A benchmark's setup may unwrap: a panic is a broken setup.

use std::hint::black_box;

use ca_server::TrustDomain;
use ca_server::audit::{EventKind, EventRow, event_hash};
use ca_server::auth::dev::{DEV_ISSUER, DevIssuer};
use ca_server::auth::{Authenticator, BearerToken, Fetcher, IssuerKeys, TokenIssuer};
use ca_server::authority::{Authority, root_params};
use ca_server::bundle::Bundle;
use ca_server::issuance::{LeafPolicy, TrustAnchors, check_csr, issue};
use ca_server::store::{AuthorityRecord, AuthorityState};
use ca_server::x509::sha256_hex;
use criterion::{Criterion, criterion_group, criterion_main};

fn authority(dir: &std::path::Path) -> Authority {
    let td = TrustDomain::new("cluster.local").unwrap();
    // The key goes where the authority loads it from, as the server's does.
    let key = rcgen::KeyPair::generate().unwrap();
    ca_server::files::write_private_new(
        &dir.join("keys/1.key.pem"),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let cert = root_params(&td, 1, time::OffsetDateTime::now_utc())
        .self_signed(&key)
        .unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    let record = AuthorityRecord {
        id: 1,
        state: AuthorityState::Active,
        subject: parsed.subject().to_string(),
        cert_pem: cert.pem(),
        chain_pem: String::new(),
        root_pem: cert.pem(),
        key_ref: "file:keys/1.key.pem".into(),
        sealed_key: None,
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        fingerprint_sha256: sha256_hex(cert.der()),
        kind: ca_server::store::AuthorityKind::SelfSigned,
        created_at: 0,
        activated_at: None,
        retiring_at: None,
        retired_at: None,
    };
    Authority::load(&record, &ca_server::authority::KeyStore::files(dir)).unwrap()
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn bench(c: &mut Criterion) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let authority = authority(dir.path());
    let anchors = TrustAnchors::from_bundle(&Bundle {
        sequence: 1,
        roots_pem: vec![authority.root_pem().to_owned()],
    })
    .unwrap();
    let policy = LeafPolicy::default();
    let csr = csr();
    let dev = DevIssuer::load_or_create(dir.path()).unwrap();
    let token =
        BearerToken::new(&dev.mint("bench", "client", "istio-ca", 3600, None).unwrap()).unwrap();
    let authn = Authenticator::new(
        TrustDomain::new("cluster.local").unwrap(),
        vec![TokenIssuer::new(
            DEV_ISSUER.into(),
            vec!["istio-ca".into()],
            IssuerKeys::fixed(dev.key_set()),
        )],
        Fetcher::new(None).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let identity = runtime
        .block_on(authn.authenticate(&token, None, now))
        .unwrap();

    c.bench_function("check_csr (P-256)", |b| {
        b.iter(|| check_csr(black_box(&csr)).unwrap())
    });
    let checked = check_csr(&csr).unwrap();
    c.bench_function("issue (profile + P-256 sign + self-check)", |b| {
        b.iter(|| {
            issue(
                &authority,
                &anchors,
                &policy,
                &identity,
                checked.clone(),
                time::Duration::hours(1),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap()
        })
    });
    c.bench_function("pipeline (cached token + check_csr + issue)", |b| {
        b.iter(|| {
            let id = runtime
                .block_on(authn.authenticate(&token, None, now))
                .unwrap();
            let checked = check_csr(black_box(&csr)).unwrap();
            issue(
                &authority,
                &anchors,
                &policy,
                &id,
                checked,
                time::Duration::hours(1),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap()
        })
    });
    // What the cache saves: one ES256 signature check and the claims.
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&dev.jwks_json()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["istio-ca"]);
    c.bench_function("token signature check (ES256, what the cache saves)", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<serde_json::Value>(black_box(token.expose()), &key, &validation)
                .unwrap()
        })
    });
    let mut event = EventRow::new(EventKind::Issued);
    event.spiffe_id = Some(identity.spiffe_id.to_string());
    event.serial = Some("00112233445566778899aabbccddeeff".into());
    event.prev_hash = "0".repeat(64);
    c.bench_function("audit event_hash", |b| {
        b.iter(|| event_hash(black_box(&event)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
