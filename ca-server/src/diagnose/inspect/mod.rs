//! `ca-server inspect`: what a certificate chain, a bundle or a CSR says, checked against
//! what this CA knows (its bundle, its authorities, its audit log). Every problem names the
//! layer that fails (`expiry`, `identity`, `trust`, `profile`, `chain`) and what to do.

use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

mod checks;

use super::{Findings, Layer};
use crate::spiffe::SpiffeId;
use crate::store::{AuthorityRecord, Store};
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
        let rows = store.bundle().await?;
        let sequence = rows.sequence;
        let roots = rows
            .roots
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
    if parsed.iter().all(|c| is_ca(c) && self_signed(c)) {
        report.kind = Inspected::Bundle;
    }
    let n = parsed.len();
    for (i, (cert, der)) in parsed.iter().zip(ders).enumerate() {
        let role = role_of(cert, i, n, report.kind);
        report.certificates.push(info(cert, der, role, now));
    }
    checks::expiry(&mut report, &parsed, now);
    if report.kind == Inspected::Bundle {
        for (i, der) in ders.iter().enumerate() {
            checks::trust_of_root(&mut report, i, der, known);
        }
        return report;
    }
    checks::links(&mut report, &parsed);
    checks::trust_of_chain(&mut report, &parsed, ders, known);
    if let Some(k) = known {
        checks::authority(&mut report, &parsed[0], k);
    }
    if report.certificates[0].role == Role::Leaf {
        checks::leaf(&mut report, &parsed[0], known);
        if let Some(store) = store {
            checks::audit(&mut report, store).await;
        }
    }
    report
}

/// What certificate `i` of `n` is: every one of a bundle is a root; in a chain, the leaf
/// comes first and a self-signed CA last.
fn role_of(cert: &X509Certificate<'_>, i: usize, n: usize, kind: Inspected) -> Role {
    if kind == Inspected::Bundle || (i == n - 1 && self_signed(cert)) {
        Role::Root
    } else if i == 0 && !is_ca(cert) {
        Role::Leaf
    } else if is_ca(cert) {
        if i == 0 { Role::Ca } else { Role::Intermediate }
    } else {
        Role::Other
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
