//! `ca-server explain`: the error texts people paste from Envoy, OpenSSL, Go and gRPC, and
//! this server's own refusals, mapped to the layer that likely failed and the commands that
//! confirm it.

use super::Layer;

/// One kind of failure: what it looks like, what it means and how to confirm it.
#[derive(Debug)]
pub struct Explanation {
    /// A short name for the failure.
    pub name: &'static str,
    /// The layer that fails.
    pub layer: Layer,
    /// Lowercase fragments any one of which identifies it.
    patterns: &'static [&'static str],
    /// What it means.
    pub meaning: &'static str,
    /// Likely causes, most likely first.
    pub causes: &'static [&'static str],
    /// Commands that confirm or rule out each cause.
    pub confirm: &'static [&'static str],
}

/// What is known. Order matters only for the output: the more specific entries first.
pub const EXPLANATIONS: &[Explanation] = &[
    Explanation {
        name: "unknown CA",
        layer: Layer::Trust,
        patterns: &[
            "unknown_ca",
            "unknown ca",
            "unknown authority",
            "unable to get local issuer",
            "unable to get issuer certificate",
            "self signed certificate in certificate chain",
            "self-signed certificate in certificate chain",
            "unknownissuer",
        ],
        meaning: "a peer does not trust the CA that signed the other side's certificate: the root it chains to is not in the peer's bundle",
        causes: &[
            "a root rotation not yet seen by every proxy: the peer's bundle (istio-ca-root-cert) lacks the new root",
            "a root retired while certificates signed under it were still in use",
            "two meshes, or istiod and this CA, issuing under different roots",
        ],
        confirm: &[
            "ca-server root status            # which roots are in the bundle, and their states",
            "ca-server bundle show             # the bundle proxies should hold",
            "ca-server inspect CHAIN.pem       # which root a certificate chains to, and whether the bundle has it",
            "kubectl get configmap istio-ca-root-cert -n NAMESPACE -o jsonpath='{.data.root-cert\\.pem}' | ca-server inspect -",
        ],
    },
    Explanation {
        name: "certificate expired",
        layer: Layer::Expiry,
        patterns: &[
            "certificate has expired",
            "certificate_expired",
            "certificate expired",
            "expired certificate",
            "certificate is expired",
            "x509: certificate has expired or is not yet valid",
            "not yet valid",
        ],
        meaning: "a certificate in the chain is outside its validity period, by the verifier's clock",
        causes: &[
            "the proxy stopped renewing its certificate (the agent cannot reach the CA, or its token expired)",
            "the root or intermediate itself expired",
            "the verifier's clock is wrong (not yet valid)",
        ],
        confirm: &[
            "ca-server inspect CHAIN.pem       # validity of each certificate, and time left",
            "ca-server root status --check     # authorities expiring or expired",
            "ca-server audit list --spiffe-id SPIFFE_ID --limit 5   # when the workload last got a certificate",
            "date -u                           # on both hosts",
        ],
    },
    Explanation {
        name: "certificate verification failed",
        layer: Layer::Trust,
        patterns: &[
            "certificate_verify_failed",
            "certificate verify failed",
            "verify error",
            "x509: certificate signed by",
            "bad certificate",
            "bad_certificate",
            "invalid peer certificate",
            "badcertificate",
        ],
        meaning: "the certificate a peer presented did not verify; the reason is in the verifier's detail: an unknown CA, expiry, or a wrong name",
        causes: &[
            "the chain leads to a root the verifier does not trust (see `explain unknown ca`)",
            "a certificate in the chain expired (see `explain certificate has expired`)",
            "the SPIFFE ID or name is not the one expected (see `explain san`)",
        ],
        confirm: &[
            "ca-server inspect CHAIN.pem",
            "ca-server check HOST:PORT --cert CHAIN.pem --key KEY.pem   # the handshake, layer by layer",
        ],
    },
    Explanation {
        name: "peer certificate required",
        layer: Layer::Tls,
        patterns: &[
            "certificate_required",
            "certificate required",
            "peer did not return a certificate",
            "no certificate presented",
            "handshake_failure",
            "handshake failure",
        ],
        meaning: "the server wanted a client certificate (mTLS) and the client sent none, or the two sides agreed on nothing",
        causes: &[
            "the client has no sidecar, or its sidecar does not originate mTLS to this destination (DestinationRule tls mode)",
            "the client's certificate files are missing or unreadable",
        ],
        confirm: &[
            "ca-server check HOST:PORT --cert CHAIN.pem --key KEY.pem",
            "istioctl x describe pod POD       # the mTLS mode each side uses",
        ],
    },
    Explanation {
        name: "not TLS",
        layer: Layer::Transport,
        patterns: &[
            "wrong_version_number",
            "wrong version number",
            "http request to an https server",
            "packet length too long",
            "record overflow",
            "first record does not look like a tls handshake",
            "invalidcontenttype",
            "corrupt message",
            "unexpected eof",
            "tls: oversized record",
        ],
        meaning: "one side spoke plaintext where the other expected TLS",
        causes: &[
            "partial sidecar injection: one pod has a proxy doing mTLS, the other has none and speaks plaintext",
            "PeerAuthentication PERMISSIVE on one side and STRICT or DISABLE on the other",
            "a port named or declared with the wrong protocol",
        ],
        confirm: &[
            "ca-server check HOST:PORT --cert CHAIN.pem --key KEY.pem   # says whether the port speaks TLS at all",
            "kubectl get pod POD -o jsonpath='{.spec.containers[*].name}'   # is istio-proxy there",
        ],
    },
    Explanation {
        name: "upstream connect error",
        layer: Layer::Transport,
        patterns: &[
            "upstream connect error",
            "disconnect/reset before headers",
            "connection termination",
            "reset reason",
            "503",
            "connection reset by peer",
            "connection refused",
        ],
        meaning: "Envoy could not get a response from the upstream; with mTLS this is most often the TLS handshake failing underneath",
        causes: &[
            "an mTLS mismatch: plaintext on one side (see `explain wrong version number`)",
            "the upstream rejected the client's certificate (unknown CA after a rotation, expired)",
            "the upstream is not listening, or is not ready",
        ],
        confirm: &[
            "ca-server check HOST:PORT --cert CHAIN.pem --key KEY.pem",
            "istioctl proxy-config secret POD  # the certificate and roots the proxy holds",
            "ca-server root status",
        ],
    },
    Explanation {
        name: "wrong identity",
        layer: Layer::Identity,
        patterns: &[
            "subject alternative name",
            "san mismatch",
            "does not match",
            "not valid for",
            "certificate is valid for",
            "spiffe id",
            "unexpected identity",
            "subjectaltname",
            "hostname mismatch",
            "notvalidforname",
        ],
        meaning: "the peer's certificate names another identity than the one expected",
        causes: &[
            "the workload runs under another service account than the authorization policy names",
            "a trust-domain mismatch (cluster.local against the mesh's real trust domain)",
            "a client verifying a DNS name against a certificate that carries only a SPIFFE ID",
        ],
        confirm: &[
            "ca-server inspect CHAIN.pem       # the SPIFFE ID and trust domain",
            "ca-server check HOST:PORT --cert CHAIN.pem --key KEY.pem --expect-id SPIFFE_ID",
        ],
    },
    Explanation {
        name: "token refused",
        layer: Layer::Token,
        patterns: &[
            "unauthenticated",
            "bearer token",
            "token expired",
            "token issuer",
            "audience",
            "signature does not verify",
            "no key with kid",
            "tokenreview",
            "kubernetes api server refused",
        ],
        meaning: "the CA refused the proxy's service-account token, so the proxy gets no certificate",
        causes: &[
            "the token's audience is not the CA's (projected token audience istio-ca)",
            "the CA is configured with another issuer, or stale JWKS after the API server's key rotated",
            "an expired or legacy (non-projected) token",
        ],
        confirm: &[
            "ca-server audit list --kind denied --limit 10   # the refusals, with the reason",
            "kubectl get --raw /.well-known/openid-configuration   # the cluster's issuer",
        ],
    },
    Explanation {
        name: "request refused",
        layer: Layer::Request,
        patterns: &[
            "invalid_argument",
            "invalid argument",
            "csr",
            "permission_denied",
            "permission denied",
            "impersonat",
            "no running pod with service account",
            "its node is unknown",
            "resource_exhausted",
            "identity rate",
            "peer rate",
            "rate limit",
            "too many requests",
        ],
        meaning: "the CA refused the certificate request itself: the CSR, the identity asked for, or a rate limit",
        causes: &[
            "a CSR with a SAN other than the caller's own SPIFFE ID, a weak key, or a bad signature",
            "asking for another identity without being a trusted node account",
            "a node proxy (ztunnel) asking for a pod that is not running on its own node, or \
             before the pod is scheduled; or the CA has no Kubernetes API to check the node",
            "too many requests for one identity (--identity-rate)",
        ],
        confirm: &[
            "ca-server audit list --kind denied --limit 10",
            "ca-server audit list --node NODE --kind denied (what a node's proxy was refused)",
            "kubectl get pods -A --field-selector spec.nodeName=NODE -o wide",
        ],
    },
    Explanation {
        name: "CA unavailable",
        layer: Layer::Ca,
        patterns: &[
            "unavailable",
            "audit log",
            "the store",
            "database",
            "deadline exceeded",
            "deadline_exceeded",
        ],
        meaning: "the CA could not answer: it issues nothing it cannot record, and says so",
        causes: &[
            "the audit log cannot be written (disk full, read-only, locked, database down)",
            "the CA is overloaded or restarting",
        ],
        confirm: &[
            "curl -s http://CA_HOST:15014/readyz   # what keeps it from being ready",
            "curl -s http://CA_HOST:15014/metrics | grep ca_refusals_total",
        ],
    },
];

/// The explanations `text` matches, most specific first.
pub fn explain(text: &str) -> Vec<&'static Explanation> {
    let lower = text.to_lowercase();
    EXPLANATIONS
        .iter()
        .filter(|e| e.patterns.iter().any(|p| lower.contains(p)))
        .collect()
}

/// One explanation as text for a person.
pub fn render(e: &Explanation) -> String {
    let mut out = format!(
        "{}: {}\n  {}\n  likely causes:\n",
        e.layer, e.name, e.meaning
    );
    for cause in e.causes {
        out.push_str(&format!("    - {cause}\n"));
    }
    out.push_str("  confirm with:\n");
    for command in e.confirm {
        out.push_str(&format!("    $ {command}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(text: &str) -> Vec<&'static str> {
        explain(text).iter().map(|e| e.layer.as_str()).collect()
    }

    #[test]
    fn the_errors_people_paste() {
        assert_eq!(layers("TLSV1_ALERT_UNKNOWN_CA")[0], "trust");
        assert_eq!(
            layers(
                "OpenSSL: error:1416F086:SSL routines:tls_process_server_certificate:certificate verify failed"
            )[0],
            "trust"
        );
        assert_eq!(
            layers("x509: certificate has expired or is not yet valid")[0],
            "expiry"
        );
        assert_eq!(
            layers(
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            ),
            ["transport"]
        );
        assert_eq!(
            layers("SSL routines:ssl3_get_record:wrong version number")[0],
            "transport"
        );
        assert!(explain("nothing we know").is_empty());
        // ztunnel's log, after the CA refused a pod that is not on its node.
        let refused = crate::auth::node::ImpersonationError::NotOnNode {
            caller: "spiffe://cluster.local/ns/istio-system/sa/ztunnel".into(),
            requested: "spiffe://cluster.local/ns/shop/sa/db".into(),
            node: "node-a".into(),
            namespace: "shop".into(),
            service_account: "db".into(),
        }
        .to_string();
        let found = explain(&refused);
        assert!(
            found
                .iter()
                .any(|e| e.causes.iter().any(|c| c.contains("ztunnel"))),
            "{refused}"
        );
    }

    #[test]
    fn every_entry_says_how_to_confirm() {
        for e in EXPLANATIONS {
            assert!(!e.causes.is_empty() && !e.confirm.is_empty(), "{}", e.name);
            assert!(
                e.patterns.iter().all(|p| *p == p.to_lowercase()),
                "{}",
                e.name
            );
        }
    }
}
