//! JWT-SVIDs from the CA (`ca.v1.JwtSvidService/MintJwtSvid`), through the real binary over
//! TLS: what a token says and who can verify it (jsonwebtoken against the SPIFFE bundle, PyJWT
//! through OIDC discovery), that each is in the audit log, what is refused, and how a rotation
//! moves the signing key.

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use ca_tests::mint_jwt_svid as mint;
use ca_tests::*;
use tonic::Code;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The `jwt-svid` keys of the CA's SPIFFE bundle, by kid.
fn bundle_keys(server: &TestServer) -> Vec<(String, jsonwebtoken::DecodingKey)> {
    let shown: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| {
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.clone()).unwrap();
            (
                k["kid"].as_str().unwrap().to_owned(),
                jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            )
        })
        .collect()
}

/// Verifies `token` for `audience` with the bundle's key its header names; returns the kid
/// and the claims.
fn verify(server: &TestServer, token: &str, audience: &str) -> (String, serde_json::Value) {
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.unwrap();
    let keys = bundle_keys(server);
    let (_, key) = keys
        .iter()
        .find(|(k, _)| *k == kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the bundle"));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
        .unwrap()
        .claims;
    (kid, claims)
}

#[tokio::test]
async fn a_jwt_svid_names_the_verified_caller_and_is_in_the_audit_log_first() {
    let f = Fixture::start(&[]);
    let token = f.issuer.token("shop", "web");
    let minted = mint(&f.server, Some(&token), &["db"], 0).await.unwrap();
    assert_eq!(minted.spiffe_id, WEB);
    assert_eq!(
        minted.expires_at - minted.issued_at,
        300,
        "5 minutes by default"
    );
    let (kid, claims) = verify(&f.server, &minted.token, "db");
    assert_eq!(claims["sub"], WEB);
    assert_eq!(claims["aud"], "db", "one audience is a string");
    assert_eq!(
        claims["iss"],
        format!("https://localhost:{}", f.server.grpc.port())
    );
    assert_eq!(claims["iat"], minted.issued_at);
    assert_eq!(claims["exp"], minted.expires_at);
    let jti = claims["jti"].as_str().unwrap().to_owned();
    assert_eq!(jti.len(), 32, "128 random bits, hex");

    // The issuance, as any certificate's: kind issued, the caller's identity, the jti as
    // serial, iat and exp as the validity, the audiences.
    let events = audit_json(&f.server, &["--serial", &jti]);
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["kind"], "issued");
    assert_eq!(event["spiffe_id"], WEB);
    assert_eq!(event["authority_id"], 1);
    assert_eq!(event["audience"], r#"["db"]"#);
    assert!(event["public_key_sha256"].is_null(), "it certifies no key");
    let at = |unix: i64| {
        time::OffsetDateTime::from_unix_timestamp(unix)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    assert_eq!(event["not_before"], at(minted.issued_at));
    assert_eq!(event["not_after"], at(minted.expires_at));
    let current = bundle_keys(&f.server);
    assert_eq!(current.len(), 1);
    assert_eq!(kid, current[0].0);

    // Several audiences (a repeat once), and a TTL of its own.
    let minted = mint(&f.server, Some(&token), &["db", "cache", "db"], 60)
        .await
        .unwrap();
    assert_eq!(minted.expires_at - minted.issued_at, 60);
    let (_, claims) = verify(&f.server, &minted.token, "cache");
    assert_eq!(claims["aud"], serde_json::json!(["db", "cache"]));
    let mut other = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    other.set_audience(&["elsewhere"]);
    assert!(
        jsonwebtoken::decode::<serde_json::Value>(&minted.token, &current[0].1, &other).is_err(),
        "not for an audience it does not name"
    );
    let recorded = audit_json(&f.server, &["--kind", "issued", "--spiffe-id", WEB]);
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0]["audience"], r#"["db","cache"]"#);
    assert_audit_intact(&f.server);
}

#[tokio::test]
async fn what_a_jwt_svid_request_may_not_be() {
    let f = Fixture::start(&[]);
    let token = f.issuer.token("shop", "web");
    let long = "a".repeat(257);
    let seventeen: Vec<String> = (0..17).map(|i| format!("aud-{i}")).collect();
    let seventeen: Vec<&str> = seventeen.iter().map(String::as_str).collect();
    // (token, audiences, TTL, code, what the message says)
    type Case<'a> = (Option<&'a str>, Vec<&'a str>, i64, Code, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (None, vec!["db"], 0, Code::Unauthenticated, "token"),
        (
            Some("not-a-jwt"),
            vec!["db"],
            0,
            Code::Unauthenticated,
            "token",
        ),
        (Some(&token), vec![], 0, Code::InvalidArgument, "audience"),
        (
            Some(&token),
            seventeen,
            0,
            Code::InvalidArgument,
            "at most 16",
        ),
        (
            Some(&token),
            vec!["db", &long],
            0,
            Code::InvalidArgument,
            "audience 1 is 257 bytes",
        ),
        (
            Some(&token),
            vec!["db\u{1b}[31m"],
            0,
            Code::InvalidArgument,
            "not printable",
        ),
        (Some(&token), vec![""], 0, Code::InvalidArgument, "empty"),
        (
            Some(&token),
            vec!["db"],
            -1,
            Code::InvalidArgument,
            "negative",
        ),
        (
            Some(&token),
            vec!["db"],
            3601,
            Code::InvalidArgument,
            "maximum of 3600s",
        ),
    ];
    for (token, audience, ttl, code, says) in cases {
        let status = mint(&f.server, token, &audience, ttl).await.unwrap_err();
        assert_eq!(status.code(), code, "{audience:?} {ttl}: {status:?}");
        assert!(
            status.message().contains(says),
            "{audience:?} {ttl}: {}",
            status.message()
        );
    }
    // A message far above the largest real request is refused by the transport, unread.
    let huge = "x".repeat(200);
    let many: Vec<&str> = std::iter::repeat_n(huge.as_str(), 100).collect();
    let status = mint(&f.server, Some(&token), &many, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("limit is: 8192"), "{status:?}");
    assert!(mint(&f.server, Some(&token), &["db"], 0).await.is_ok());

    // Each refusal is recorded (alike ones in a burst as one event with a count, written at
    // the latest when the server stops), saying it was a JWT-SVID request and what it asked
    // for, escaped; the ones whose token checked out name the caller.
    let mut server = f.server;
    assert!(
        server
            .terminate(std::time::Duration::from_secs(10))
            .is_some()
    );
    let denied = audit_json(&server, &["--kind", "denied"]);
    let count = |e: &serde_json::Value| e["count"].as_i64().unwrap_or(1);
    assert_eq!(denied.iter().map(count).sum::<i64>(), 9, "{denied:?}");
    assert!(
        denied.iter().all(|e| e["requested"]
            .as_str()
            .unwrap()
            .starts_with("JWT-SVID for audience")),
        "{denied:?}"
    );
    assert_eq!(
        denied
            .iter()
            .filter(|e| e["spiffe_id"] == WEB)
            .map(count)
            .sum::<i64>(),
        7,
        "{denied:?}"
    );
    assert!(
        denied
            .iter()
            .all(|e| !e["requested"].as_str().unwrap().contains('\u{1b}')),
        "no raw control characters in the log"
    );
    assert_eq!(
        audit_json(&server, &["--kind", "issued", "--spiffe-id", WEB]).len(),
        1
    );
    assert_audit_intact(&server);
}

#[tokio::test]
async fn jwt_svids_have_a_budget_per_identity_apart_from_certificates() {
    let f = Fixture::start(&["--identity-rate", "0.01", "--identity-burst", "2"]);
    let token = f.issuer.token("shop", "web");
    for _ in 0..2 {
        mint(&f.server, Some(&token), &["db"], 0).await.unwrap();
    }
    let status = mint(&f.server, Some(&token), &["db"], 0).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("(JWT-SVID)"),
        "{}",
        status.message()
    );
    // The identity's certificates are counted apart.
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut client = f.server.client().await;
    create_certificate(&mut client, Some(&token), &csr, 0)
        .await
        .unwrap();
}

#[tokio::test]
async fn after_a_rotation_the_new_authority_signs_and_old_tokens_still_verify() {
    let f = Fixture::start(&[]);
    let token = f.issuer.token("shop", "web");
    let before = mint(&f.server, Some(&token), &["db"], 0).await.unwrap();
    let (old_kid, _) = verify(&f.server, &before.token, "db");
    f.server.cli_ok(&["root", "prepare"]);
    f.server.activate("2");
    // The server follows the store within a second or so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let after = loop {
        let minted = mint(&f.server, Some(&token), &["db"], 0).await.unwrap();
        if verify(&f.server, &minted.token, "db").0 != old_kid {
            break minted;
        }
        assert!(std::time::Instant::now() < deadline, "still signed by 1");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let claims = verify(&f.server, &after.token, "db").1;
    let event = &audit_json(&f.server, &["--serial", claims["jti"].as_str().unwrap()])[0];
    assert_eq!(event["authority_id"], 2);
    // Authority 1 is still in the bundle: its tokens verify until they expire.
    assert_eq!(verify(&f.server, &before.token, "db").0, old_kid);
}

#[test]
fn pyjwt_verifies_a_jwt_svid_with_the_keys_of_oidc_discovery() {
    if !ca_tests::workload::python_has("jwt") {
        return;
    }
    let f = Fixture::start(&[]);
    let token = f.issuer.token("shop", "web");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let minted = runtime
        .block_on(mint(&f.server, Some(&token), &["test"], 0))
        .unwrap();
    let issuer = format!("https://localhost:{}", f.server.grpc.port());
    let bundle = f.dir.path().join("data/trust-bundle.pem");
    let found = ca_tests::workload::python_json(&[
        ca_tests::workload::py_script("oidc_keys.py")
            .to_str()
            .unwrap(),
        &issuer,
        bundle.to_str().unwrap(),
        &minted.token,
    ]);
    assert_eq!(found["claims"]["sub"], WEB, "{found}");
    assert_eq!(found["claims"]["aud"], "test");
    assert_eq!(found["claims"]["iss"], issuer.as_str());
}
