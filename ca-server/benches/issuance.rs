//! The issuance pipeline without the network, to watch for regressions:
//!
//!     cargo bench -p ca-server --bench issuance
//!
//! Each stage a request passes through: the crypto floor's three operations alone (the CSR's
//! signature checked, a leaf signed, its signature checked: what no implementation can skip),
//! `check_csr` (parse + proof of possession), the leaf built and signed, the self-check,
//! `issue` (all three), the whole path through the CPU (token from the cache, CSR check,
//! issue), the gRPC messages decoded and encoded, a token check without the cache, the audit
//! hash, and the audit writer's commit of one and of 16 events to a SQLite file (fsync
//! included). A stage that regresses shows in its own line.

#![allow(clippy::unwrap_used)] // A benchmark's setup may unwrap: a panic is a broken setup.

use std::hint::black_box;

use ca_server::TrustDomain;
use ca_server::audit::{EventKind, EventRow, event_hash};
use ca_server::auth::dev::{DEV_ISSUER, DevIssuer};
use ca_server::auth::{Authenticator, BearerToken, Fetcher, IssuerKeys, TokenIssuer};
use ca_server::authority::{Authority, root_params};
use ca_server::bundle::Bundle;
use ca_server::issuance::{LeafPolicy, TrustAnchors, check_csr, issue};
use ca_server::issuance::{profile, selfcheck};
use ca_server::store::Store;
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
        tainted_at: None,
        joined_sequence: None,
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
        jwt_keys: Vec::new(),
        tainted: Vec::new(),
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
        .enable_all()
        .build()
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let identity = runtime
        .block_on(authn.authenticate(&token, None, now))
        .unwrap();

    floor(c, &csr);
    c.bench_function("check_csr (P-256)", |b| {
        b.iter(|| check_csr(black_box(&csr)).unwrap())
    });
    let checked = check_csr(&csr).unwrap();
    let issue_at = |now| {
        issue(
            &authority,
            &anchors,
            &policy,
            &identity,
            checked.clone(),
            time::Duration::hours(1),
            now,
        )
        .unwrap()
    };
    c.bench_function("issue (profile + P-256 sign + self-check)", |b| {
        b.iter(|| issue_at(time::OffsetDateTime::now_utc()))
    });
    c.bench_function("leaf built and signed (rcgen, no self-check)", |b| {
        let public = rcgen::SubjectPublicKeyInfo::from_der(&checked.spki_der).unwrap();
        b.iter(|| {
            let now = time::OffsetDateTime::now_utc();
            let validity = profile::Validity {
                not_before: now,
                not_after: now + time::Duration::hours(1),
            };
            let (serial, _) = ca_server::x509::random_serial();
            let params =
                profile::leaf_params(&identity.spiffe_id, checked.key, validity, serial).unwrap();
            authority.sign(&params, &public).unwrap()
        })
    });
    let now_dt = time::OffsetDateTime::now_utc();
    let issued = issue_at(now_dt);
    let leaf = ca_server::x509::pem_to_der(&issued.chain[0]).unwrap();
    c.bench_function("self-check (webpki chain verify + profile)", |b| {
        let expected = selfcheck::Expected {
            spiffe_id: &identity.spiffe_id,
            validity: issued.validity,
            serial_hex: &issued.serial,
            spki_der: &issued.csr.spki_der,
        };
        b.iter(|| {
            selfcheck::check_issued(
                black_box(&leaf),
                authority.intermediates_der(),
                &anchors,
                &expected,
                now_dt,
            )
            .unwrap()
        })
    });
    c.bench_function("gRPC request decoded + response encoded (prost)", |b| {
        use prost::Message;
        let request = ca_proto::istio::v1::auth::IstioCertificateRequest {
            csr: csr.clone(),
            validity_duration: 0,
            metadata: None,
        }
        .encode_to_vec();
        let response = ca_proto::istio::v1::auth::IstioCertificateResponse {
            cert_chain: issued.chain.clone(),
        };
        b.iter(|| {
            let decoded =
                ca_proto::istio::v1::auth::IstioCertificateRequest::decode(black_box(&request[..]))
                    .unwrap();
            (decoded, black_box(&response).encode_to_vec())
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
    audit_commit(c, &runtime, dir.path(), &event);
}

/// The crypto floor: the three public-key operations of an issuance, on aws-lc-rs alone.
fn floor(c: &mut Criterion, csr_pem: &str) {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
    };
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
    let tbs = csr.certification_request_info.raw;
    let signature = csr.signature_value.data.to_vec();
    let key = csr
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    c.bench_function("floor: ECDSA P-256 verify (the CSR's signature)", |b| {
        b.iter(|| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key)
                .verify(black_box(tbs), &signature)
                .unwrap()
        })
    });
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let ca = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let leaf_tbs = vec![0x30u8; 420];
    c.bench_function("floor: ECDSA P-256 sign (a leaf's TBS)", |b| {
        b.iter(|| ca.sign(&rng, black_box(&leaf_tbs)).unwrap())
    });
}

/// The audit writer's commit, as the server's writer thread makes it.
fn audit_commit(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    event: &EventRow,
) {
    let url = format!("sqlite://{}", dir.join("bench.db").display());
    let store = runtime
        .block_on(Store::open(&format!("{url}?mode=rwc")))
        .unwrap();
    let mut writer = store.audit_writer(runtime.handle()).unwrap();
    for n in [1usize, 16] {
        c.bench_function(
            &format!("audit commit of {n} events (SQLite, fsync)"),
            |b| {
                b.iter(|| {
                    let mut events = vec![event.clone(); n];
                    writer.append(&mut events).unwrap()
                })
            },
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
