//! The checks of `inspect`, one layer each: expiry, the chain's links, trust, the signing
//! authority, the leaf's profile and identity, and the audit log's record of it.

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use super::{Known, Report, Role, is_ca, self_signed};
use crate::audit::EventKind;
use crate::diagnose::Layer;
use crate::spiffe::SpiffeId;
use crate::store::{AuditQuery, AuthorityState, Store};
use crate::x509::sha256_hex;

/// Expiry, for every certificate: expired, not yet valid, or (for a leaf) how long it has.
pub(super) fn expiry(report: &mut Report, parsed: &[X509Certificate<'_>], now: i64) {
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
}

/// Each certificate of a chain is signed by the next.
pub(super) fn links(report: &mut Report, parsed: &[X509Certificate<'_>]) {
    let mut chain_ok = true;
    for i in 0..parsed.len().saturating_sub(1) {
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
    if chain_ok && parsed.len() > 1 {
        report
            .findings
            .facts
            .push("chain: each certificate is signed by the next".into());
    }
}

/// Trust: the root the chain leads to is in the current bundle.
pub(super) fn trust_of_chain(
    report: &mut Report,
    parsed: &[X509Certificate<'_>],
    ders: &[Vec<u8>],
    known: Option<&Known>,
) {
    let n = parsed.len();
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
}

pub(super) fn trust_of_root(report: &mut Report, i: usize, der: &[u8], known: Option<&Known>) {
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
pub(super) fn authority(report: &mut Report, first: &X509Certificate<'_>, k: &Known) {
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

pub(super) fn leaf(report: &mut Report, leaf: &X509Certificate<'_>, known: Option<&Known>) {
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

pub(super) async fn audit(report: &mut Report, store: &Store) {
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
