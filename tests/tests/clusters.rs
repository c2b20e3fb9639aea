//! Several clusters: each cluster's token issuer in the config file's `[[token_issuers]]`,
//! chosen by the `clusterid` header Istio's proxies send (their `CLUSTER_ID`).

#![allow(clippy::unwrap_used)] // Tests may unwrap: a panic is a failed assertion.

use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_tests::*;
use tonic::Code;

/// Asks for a certificate with `token`, sending `clusterid` if given; returns the leaf's
/// SPIFFE ID or the refusal.
async fn request(
    server: &TestServer,
    token: &str,
    cluster: Option<&str>,
) -> Result<String, tonic::Status> {
    let (csr, _) = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    let headers = request.metadata_mut();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(cluster) = cluster {
        headers.insert("clusterid", cluster.parse().unwrap());
    }
    let chain = server
        .client()
        .await
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain;
    let leaf = der(&chain[0]);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    Ok(format!("{:?}", san.value.general_names))
}

#[tokio::test]
async fn the_clusterid_header_selects_the_clusters_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let mut east = TestIssuer::new(&dir.path().join("east"));
    east.iss = "https://oidc.east.example".into();
    let mut west = TestIssuer::new(&dir.path().join("west"));
    west.iss = "https://oidc.west.example".into();
    let config = dir.path().join("ca-server.toml");
    std::fs::write(
        &config,
        format!(
            "[[token_issuers]]\nissuer = \"{}\"\njwks_file = \"{}\"\ncluster_id = \"east\"\n\n\
             [[token_issuers]]\nissuer = \"{}\"\njwks_file = \"{}\"\ncluster_id = \"west\"\n",
            east.iss,
            east.jwks_path.display(),
            west.iss,
            west.jwks_path.display()
        ),
    )
    .unwrap();
    let server = TestServer::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let east_token = east.token("shop", "web");
    let west_token = west.token("shop", "cart");
    let id = |sa: &str| format!(r#"[URI("spiffe://cluster.local/ns/shop/sa/{sa}")]"#);

    // Each cluster's proxies, naming their cluster.
    assert_eq!(
        request(&server, &east_token, Some("east")).await.unwrap(),
        id("web")
    );
    assert_eq!(
        request(&server, &west_token, Some("west")).await.unwrap(),
        id("cart")
    );

    // A token from east presented as west's is refused, naming both issuers.
    let refused = request(&server, &east_token, Some("west"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains(&east.iss)
            && refused.message().contains(&west.iss)
            && refused.message().contains("CLUSTER_ID"),
        "{}",
        refused.message()
    );

    // Without the header, or naming a cluster with no issuer of its own, the token's `iss`
    // chooses among the configured issuers.
    assert_eq!(
        request(&server, &west_token, None).await.unwrap(),
        id("cart")
    );
    assert_eq!(
        request(&server, &east_token, Some("Kubernetes"))
            .await
            .unwrap(),
        id("web")
    );

    // The audit says which issuer vouched.
    let issued = audit_json(&server, &["--kind", "issued", "--service-account", "cart"]);
    assert!(
        issued
            .iter()
            .all(|e| e["token_issuer"] == west.iss.as_str())
    );
}

#[test]
fn an_issuer_entry_without_keys_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ca-server.toml");
    std::fs::write(
        &config,
        "[[token_issuers]]\nissuer = \"https://oidc.east.example\"\ncluster_id = \"east\"\n",
    )
    .unwrap();
    let out = ca_server(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("token_issuers[0]") && stderr.contains("jwks_file"),
        "{stderr}"
    );
}
