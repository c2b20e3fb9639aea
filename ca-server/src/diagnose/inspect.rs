//! `ca-server inspect`: what a certificate chain, a bundle or a CSR says, checked against
//! what this CA knows (its bundle, its authorities, its audit log). Every problem names the
//! layer that fails (`expiry`, `identity`, `trust`, `profile`, `chain`) and what to do.

use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::{Findings, Layer};
use crate::audit::EventKind;
use crate::spiffe::SpiffeId;
use crate::store::{AuditQuery, AuthorityRecord, AuthorityState, Store};
use crate::x509::sha256_hex;

/// What a certificate is in the file it came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    /// The end-entity certificate, first in a chain.
    #[serde(rename = "leaf")]
    Leaf,
    /// A CA between the leaf and the root.
    #[serde(rename = "intermediate")]
    Intermediate,
    /// A self-signed CA, or any certificate of a bundle.
    #[serde(rename = "root")]
    Root,
    /// A CA certificate first in its file (not a leaf, not self-signed).
    #[serde(rename = "CA")]
    Ca,
    /// A certificate later in a chain that is not a CA.
    #[serde(rename = "certificate")]
    Other,
}

impl Role {
    /// Its name, as printed and in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Leaf => "leaf",
            Self::Intermediate => "intermediate",
            Self::Root => "root",
            Self::Ca => "CA",
            Self::Other => "certificate",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Inspected {
    /// A certificate chain.
    #[default]
    Chain,
    /// A trust bundle (PEM or SPIFFE JWKS).
    Bundle,
    /// A certificate signing request.
    Csr,
}

/// One certificate, as a person reads it.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// What it is in its file.
    pub role: Role,
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// The URI SANs.
    pub uris: Vec<String>,
    /// The DNS and IP SANs.
    pub names: Vec<String>,
    /// notBefore, RFC 3339.
    pub not_before: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Seconds until notAfter (negative once expired).
    pub seconds_left: i64,
    /// e.g. `ECDSA P-256`.
    pub key: String,
    /// Key usages and extended key usages.
    pub usages: Vec<String>,
    /// SHA-256 of the DER, hex.
    pub fingerprint_sha256: String,
}

/// What inspection found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// What was inspected.
    pub kind: Inspected,
    /// The certificates, in the file's order.
    pub certificates: Vec<CertInfo>,
    /// What holds (chain, trust, authority, audit) and what fails.
    #[serde(flatten)]
    pub findings: Findings,
}

/// What the store tells about trust, gathered once.
pub struct Known {
    /// The bundle's roots (DER) and its sequence.
    pub roots: Vec<Vec<u8>>,
    /// The bundle sequence.
    pub sequence: i64,
    /// Every authority, with its signing certificate's DER.
    pub authorities: Vec<(AuthorityRecord, Vec<u8>)>,
    /// The mesh's trust domain (that of the newest authority's root).
    pub trust_domain: Option<String>,
}

impl Known {
    /// Reads the bundle and the authorities.
    pub async fn load(store: &Store) -> Result<Self, crate::store::StoreError> {
        let (sequence, roots_pem) = store.bundle().await?;
        let roots = roots_pem
            .iter()
            .filter_map(|p| crate::x509::pem_to_der(p).ok())
            .map(|d| d.as_ref().to_vec())
            .collect();
        let records = store.authorities().await?;
        let trust_domain = records.iter().rev().find_map(|a| {
            let der = crate::x509::pem_to_der(&a.root_pem).ok()?;
            SpiffeId::from_certificate(&der).map(|id| id.trust_domain().to_string())
        });
        let authorities = records
            .into_iter()
            .filter_map(|a| {
                let der = crate::x509::pem_to_der(&a.cert_pem).ok()?.as_ref().to_vec();
                Some((a, der))
            })
            .collect();
        Ok(Self {
            roots,
            sequence,
            authorities,
            trust_domain,
        })
    }
}

/// The certificates (DER) in a PEM text, or the `x5c` of a SPIFFE JWKS bundle.
pub fn certificates_in(text: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let jwks: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut out = Vec::new();
        for key in jwks["keys"].as_array().into_iter().flatten() {
            for cert in key["x5c"].as_array().into_iter().flatten() {
                let b64 = cert.as_str().unwrap_or_default();
                out.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| format!("an x5c entry is not base64: {e}"))?,
                );
            }
        }
        return Ok(out);
    }
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> =
        rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    certs
        .map(|c| c.into_iter().map(|d| d.as_ref().to_vec()).collect())
        .map_err(|e| format!("not PEM certificates: {e}"))
}

fn key_description(cert: &X509Certificate<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(ec)) => format!("ECDSA P-{}", ec.key_size()),
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => "Ed25519".into(),
        _ => format!("algorithm {}", spki.algorithm.algorithm.to_id_string()),
    }
}

fn usages(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(Some(ku)) = cert.key_usage() {
        out.extend(ku.value.to_string().split(", ").map(str::to_owned));
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if eku.value.server_auth {
            out.push("serverAuth".into());
        }
        if eku.value.client_auth {
            out.push("clientAuth".into());
        }
    }
    out.retain(|u| !u.is_empty());
    out
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

fn info(cert: &X509Certificate<'_>, der: &[u8], role: Role, now: i64) -> CertInfo {
    let (mut uris, mut names) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                GeneralName::IPAddress(ip) => names.push(format!("IP:{}", ip_text(ip))),
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.timestamp();
    CertInfo {
        role,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: crate::x509::serial_hex(cert.raw_serial()),
        uris,
        names,
        not_before: crate::rfc3339::secs_text(cert.validity().not_before.timestamp()),
        not_after: crate::rfc3339::secs_text(not_after),
        seconds_left: not_after - now,
        key: key_description(cert),
        usages: usages(cert),
        fingerprint_sha256: sha256_hex(der),
    }
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => hex::encode(bytes),
    }
}

/// Inspects certificates (`ders`, a chain leaf first, or a bundle of roots) against `known`
/// (`None` when there is no store to ask) and, for a leaf, the audit log.
pub async fn inspect_certificates(
    ders: &[Vec<u8>],
    known: Option<&Known>,
    store: Option<&Store>,
    now: i64,
) -> Report {
    let mut report = Report {
        kind: Inspected::Chain,
        ..Report::default()
    };
    let parsed: Vec<X509Certificate<'_>> = ders
        .iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    if parsed.len() != ders.len() || parsed.is_empty() {
        report.findings.problem(
            Layer::Chain,
            "a certificate in the input does not parse as X.509",
        );
        return report;
    }
    let all_roots = parsed.iter().all(|c| is_ca(c) && self_signed(c));
    if all_roots {
        report.kind = Inspected::Bundle;
    }
    let n = parsed.len();
    for (i, (cert, der)) in parsed.iter().zip(ders).enumerate() {
        let role = if report.kind == Inspected::Bundle || (i == n - 1 && self_signed(cert)) {
            Role::Root
        } else if i == 0 && !is_ca(cert) {
            Role::Leaf
        } else if is_ca(cert) {
            if i == 0 { Role::Ca } else { Role::Intermediate }
        } else {
            Role::Other
        };
        report.certificates.push(info(cert, der, role, now));
    }

    // Expiry, for every certificate.
    for (i, c) in report.certificates.clone().iter().enumerate() {
        let which = format!("certificate {} ({}, {})", i + 1, c.role, c.subject);
        if c.seconds_left <= 0 {
            let advice = if c.role == Role::Leaf {
                "renew it; a proxy that stopped renewing cannot reach the CA or has no valid \
                 token (`ca-server audit list --spiffe-id ID` shows its last certificate)"
            } else {
                "the CA must be replaced: `ca-server root prepare`, then `root activate ID`"
            };
            report.findings.problem(
                Layer::Expiry,
                format!(
                    "{which} expired {} ago ({}): {advice}",
                    crate::authority::expiry::span(c.seconds_left),
                    c.not_after
                ),
            );
        } else if parsed[i].validity().not_before.timestamp() > now {
            report.findings.problem(
                Layer::Expiry,
                format!(
                    "{which} is not valid before {}: check the clocks of the hosts involved",
                    c.not_before
                ),
            );
        } else if c.role == Role::Leaf {
            report.findings.facts.push(format!(
                "expiry: the leaf is valid for {} more ({})",
                crate::authority::expiry::span(c.seconds_left),
                c.not_after
            ));
        }
    }

    if report.kind == Inspected::Bundle {
        for (i, der) in ders.iter().enumerate() {
            check_trust_of_root(&mut report, i, der, known);
        }
        return report;
    }

    // Chain: each certificate signed by the next.
    let mut chain_ok = true;
    for i in 0..n.saturating_sub(1) {
        let (child, parent) = (&parsed[i], &parsed[i + 1]);
        if child.issuer() != parent.subject()
            || child.verify_signature(Some(parent.public_key())).is_err()
        {
            chain_ok = false;
            report.findings.problem(
                Layer::Chain,
                format!(
                    "certificate {} ({}) is not signed by certificate {} ({}): the chain is out \
                     of order or mixes CAs; send leaf first, then each issuer",
                    i + 1,
                    child.subject(),
                    i + 2,
                    parent.subject()
                ),
            );
        }
    }
    if chain_ok && n > 1 {
        report
            .findings
            .facts
            .push("chain: each certificate is signed by the next".into());
    }

    // Trust: the root the chain leads to, and the authority that signed the first one.
    let top = &parsed[n - 1];
    let root_der: Option<Vec<u8>> = if self_signed(top) {
        Some(ders[n - 1].clone())
    } else {
        known.and_then(|k| {
            k.roots
                .iter()
                .find(|r| {
                    X509Certificate::from_der(r).is_ok_and(|(_, root)| {
                        top.issuer() == root.subject()
                            && top.verify_signature(Some(root.public_key())).is_ok()
                    })
                })
                .cloned()
        })
    };
    match (known, &root_der) {
        (None, _) => report.findings.facts.push(
            "trust: not checked: no store to compare with (pass --data-dir or --database-url)"
                .into(),
        ),
        (Some(k), Some(root)) if k.roots.contains(root) => report.findings.facts.push(format!(
            "trust: its root is in the current bundle (sequence {})",
            k.sequence
        )),
        (Some(_), Some(root)) => report.findings.problem(
            Layer::Trust,
            format!(
                "its root (SHA-256 {}) is not in the current bundle: peers that follow the \
                 bundle reject it (TLSV1_ALERT_UNKNOWN_CA, certificate verify failed). \
                 `ca-server root status` lists the roots",
                &sha256_hex(root)[..16]
            ),
        ),
        (Some(_), None) => report.findings.problem(
            Layer::Trust,
            format!(
                "the chain stops at {}, and no root in the current bundle signed it: peers \
                 reject it as from an unknown CA. Include the issuing CA in the chain, or it \
                 was not issued under this mesh's roots",
                top.issuer()
            ),
        ),
    }
    if let Some(k) = known {
        check_authority(&mut report, &parsed[0], k);
    }

    if report.certificates[0].role == Role::Leaf {
        check_leaf(&mut report, &parsed[0], known);
        if let Some(store) = store {
            check_audit(&mut report, store).await;
        }
    }
    report
}

fn check_trust_of_root(report: &mut Report, i: usize, der: &[u8], known: Option<&Known>) {
    let Some(k) = known else {
        if i == 0 {
            report
                .findings
                .facts
                .push("trust: not checked: no store to compare with".into());
        }
        return;
    };
    let subject = &report.certificates[i].subject;
    if k.roots.iter().any(|r| r == der) {
        let authority = k
            .authorities
            .iter()
            .find(|(a, _)| crate::x509::pem_to_der(&a.root_pem).is_ok_and(|r| r.as_ref() == der));
        report.findings.facts.push(match authority {
            Some((a, _)) => format!(
                "trust: root {} ({subject}) is in the current bundle: authority {} ({})",
                i + 1,
                a.id,
                a.state
            ),
            None => format!("trust: root {} ({subject}) is in the current bundle", i + 1),
        });
    } else {
        report.findings.problem(
            Layer::Trust,
            format!(
                "root {} ({subject}) is not in the current bundle: a peer holding this bundle \
                 trusts a root this CA no longer publishes (or never did); refresh it from \
                 `ca-server bundle show`",
                i + 1
            ),
        );
    }
}

/// Which authority signed `first`, and whether it still stands.
fn check_authority(report: &mut Report, first: &X509Certificate<'_>, k: &Known) {
    let signer = k.authorities.iter().find(|(_, der)| {
        X509Certificate::from_der(der).is_ok_and(|(_, ca)| {
            first.issuer() == ca.subject() && first.verify_signature(Some(ca.public_key())).is_ok()
        })
    });
    let Some((a, _)) = signer else {
        report
            .findings
            .facts
            .push("authority: not signed by any authority of this CA".into());
        return;
    };
    match a.state {
        AuthorityState::Retired => report.findings.problem(
            Layer::Trust,
            format!(
                "signed by authority {}, retired {}: its root has left the bundle, so peers \
                 reject this certificate; the holder must get a new one (restart its proxy)",
                a.id,
                a.retired_at
                    .map(crate::rfc3339::secs_text)
                    .unwrap_or_default()
            ),
        ),
        state => report
            .findings
            .facts
            .push(format!("authority: signed by authority {} ({state})", a.id)),
    }
}

fn check_leaf(report: &mut Report, leaf: &X509Certificate<'_>, known: Option<&Known>) {
    let uris = report.certificates[0].uris.clone();
    match uris.as_slice() {
        [] => report.findings.problem(
            Layer::Identity,
            "the leaf has no URI SAN, so no SPIFFE ID: Istio peers authorize by SPIFFE ID and \
             reject it; request it from the CA with the pod's service-account token",
        ),
        [uri] => match SpiffeId::parse(uri) {
            Ok(id) => {
                report
                    .findings
                    .facts
                    .push(format!("identity: {id} (a valid SPIFFE ID)"));
                if let Some(td) = known.and_then(|k| k.trust_domain.as_ref())
                    && id.trust_domain().to_string() != *td
                {
                    report.findings.problem(
                        Layer::Identity,
                        format!(
                            "trust domain {} is not this mesh's ({td}): peers expecting \
                             spiffe://{td}/... reject the SAN",
                            id.trust_domain()
                        ),
                    );
                }
            }
            Err(e) => report.findings.problem(
                Layer::Identity,
                format!("{uri:?} is not a valid SPIFFE ID ({e}): peers reject the SAN"),
            ),
        },
        _ => report.findings.problem(
            Layer::Identity,
            format!(
                "the leaf has {} URI SANs; an X509-SVID has exactly one",
                uris.len()
            ),
        ),
    }
    if is_ca(leaf) {
        report.findings.problem(
            Layer::Profile,
            "the leaf is a CA: a workload certificate must not be one",
        );
    }
    let usages = report.certificates[0].usages.clone();
    if !usages.iter().any(|u| u == "Digital Signature") {
        report.findings.problem(
            Layer::Profile,
            "the leaf's key usage lacks digitalSignature: TLS handshakes with it fail",
        );
    }
    for eku in ["serverAuth", "clientAuth"] {
        if !usages.iter().any(|u| u == eku) {
            report.findings.problem(
                Layer::Profile,
                format!("the leaf's extended key usage lacks {eku}: mTLS needs both directions"),
            );
        }
    }
    let key = report.certificates[0].key.clone();
    if let Some(bits) = key.strip_prefix("RSA ").and_then(|b| b.parse::<u32>().ok())
        && bits < 2048
    {
        report.findings.problem(
            Layer::Profile,
            format!("the leaf's {key} key is too weak (2048 bits at least)"),
        );
    }
}

async fn check_audit(report: &mut Report, store: &Store) {
    let serial = report.certificates[0].serial.clone();
    let query = AuditQuery {
        serial: Some(serial.clone()),
        kind: Some(EventKind::Issued),
        limit: Some(1),
        ..AuditQuery::default()
    };
    match store.audit_events(&query).await {
        Ok(events) => match events.first() {
            Some(e) => {
                // A node proxy's request: the certificate went to the proxy, for the pod.
                let through = match (&e.caller, &e.node) {
                    (Some(caller), Some(node)) => format!(", asked for by {caller} on node {node}"),
                    (Some(caller), None) => format!(", asked for by {caller}"),
                    _ => String::new(),
                };
                report.findings.facts.push(format!(
                    "audit: event {} records serial {serial} issued to {} at {}{through}",
                    e.seq,
                    e.spiffe_id.as_deref().unwrap_or("?"),
                    crate::rfc3339::from_millis(e.time_ms).unwrap_or_default()
                ))
            }
            None => report.findings.facts.push(format!(
                "audit: serial {serial} is not in the audit log (not issued by this CA, or \
                 pruned)"
            )),
        },
        Err(e) => report
            .findings
            .facts
            .push(format!("audit: not checked: {e}")),
    }
}

/// Inspects a PEM CSR with the checks the CA applies to requests.
pub fn inspect_csr(pem: &str) -> Report {
    let mut report = Report {
        kind: Inspected::Csr,
        ..Report::default()
    };
    match crate::issuance::check_csr(pem) {
        Ok(csr) => {
            report
                .findings
                .facts
                .push(format!("profile: key {:?}, signature verifies", csr.key));
            let ids: Vec<&String> = csr
                .requested_sans
                .iter()
                .filter(|s| s.starts_with("spiffe://"))
                .collect();
            if ids.is_empty() {
                report
                    .findings
                    .facts
                    .push("identity: asks for no SPIFFE ID; the CA fills in the caller's".into());
            }
            for san in &csr.requested_sans {
                match san.strip_prefix("spiffe://").map(|_| SpiffeId::parse(san)) {
                    Some(Ok(id)) => report.findings.facts.push(format!(
                        "identity: asks for {id}; granted only if it is the caller's own"
                    )),
                    Some(Err(e)) => report.findings.problem(
                        Layer::Identity,
                        format!("{san:?} is not a valid SPIFFE ID ({e}): the CA refuses it"),
                    ),
                    None => report.findings.problem(
                        Layer::Identity,
                        format!("asks for {san}: the CA certifies SPIFFE IDs only and refuses it"),
                    ),
                }
            }
        }
        Err(e) => report
            .findings
            .problem(Layer::Profile, format!("the CA would refuse it: {e}")),
    }
    report
}

/// The report as text for a person.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for (i, c) in report.certificates.iter().enumerate() {
        out.push_str(&format!("certificate {} ({})\n", i + 1, c.role));
        out.push_str(&format!("  subject      {}\n", c.subject));
        out.push_str(&format!("  issuer       {}\n", c.issuer));
        for uri in &c.uris {
            out.push_str(&format!("  URI SAN      {uri}\n"));
        }
        for name in &c.names {
            out.push_str(&format!("  SAN          {name}\n"));
        }
        let left = if c.seconds_left > 0 {
            format!("{} left", crate::authority::expiry::span(c.seconds_left))
        } else {
            format!(
                "expired {} ago",
                crate::authority::expiry::span(c.seconds_left)
            )
        };
        out.push_str(&format!(
            "  valid        {} to {} ({left})\n",
            c.not_before, c.not_after
        ));
        out.push_str(&format!("  key          {}\n", c.key));
        out.push_str(&format!("  usages       {}\n", c.usages.join(", ")));
        out.push_str(&format!("  serial       {}\n", c.serial));
        out.push_str(&format!("  sha-256      {}\n", c.fingerprint_sha256));
    }
    for fact in &report.findings.facts {
        out.push_str(&format!("{fact}\n"));
    }
    if report.findings.problems.is_empty() {
        out.push_str("no problems found\n");
    } else {
        out.push_str(&format!("{} problem(s):\n", report.findings.problems.len()));
        for p in &report.findings.problems {
            out.push_str(&format!("{}: {}\n", p.layer, p.message));
        }
    }
    out
}
