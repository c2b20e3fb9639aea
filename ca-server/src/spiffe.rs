//! SPIFFE trust domains and IDs, parsed and validated per the SPIFFE-ID specification.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string is empty.
    #[error("is empty")]
    Empty,
    /// The scheme is not `spiffe://` (the scheme is lowercase and case-sensitive).
    #[error("does not start with spiffe://")]
    WrongScheme,
    /// The trust domain part is empty.
    #[error("has no trust domain")]
    MissingTrustDomain,
    /// The trust domain holds a character other than `a-z 0-9 . - _`.
    #[error("trust domain has a character other than lowercase letters, digits, '.', '-' or '_'")]
    BadTrustDomainChar,
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("path has an empty segment or a trailing '/'")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    /// The path holds a character other than `a-z A-Z 0-9 . - _`.
    #[error("path has a character other than letters, digits, '.', '-' or '_'")]
    BadPathChar,
    /// The whole ID is longer than 2048 bytes.
    #[error("is longer than 2048 bytes")]
    TooLong,
}

/// A SPIFFE trust domain, such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > 255 {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(SpiffeIdError::BadTrustDomainChar);
        }
        Ok(Self(name.to_owned()))
    }

    /// The name, such as `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, used as the URI SAN of its roots.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(domain)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                validate_segment(segment)?;
            }
        }
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    /// The identity of a Kubernetes service account: `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn for_service_account(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        })
    }

    /// The SPIFFE ID in a DER certificate's first URI SAN, if it has a valid one.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Self::parse(uri).ok(),
            _ => None,
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path part: empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace and service account of a `/ns/<ns>/sa/<sa>` identity, the form this CA
    /// issues; `None` for any other path.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.path.strip_prefix("/ns/")?;
        let (namespace, rest) = rest.split_once('/')?;
        let service_account = rest.strip_prefix("sa/")?;
        (!service_account.contains('/')).then_some((namespace, service_account))
    }
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadPathChar);
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for id in [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://example.org",
            "spiffe://a_b-c.d/x.y/Z-1_",
        ] {
            assert_eq!(SpiffeId::parse(id).unwrap().to_string(), id);
        }
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        use SpiffeIdError::*;
        let cases = [
            ("", Empty),
            ("http://cluster.local/ns/a", WrongScheme),
            ("SPIFFE://cluster.local", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///ns/a", MissingTrustDomain),
            ("spiffe://Cluster.local", BadTrustDomainChar),
            ("spiffe://cluster.local:8080", BadTrustDomainChar),
            ("spiffe://user@cluster.local", BadTrustDomainChar),
            ("spiffe://cluster.local/", EmptySegment),
            ("spiffe://cluster.local/ns//sa", EmptySegment),
            ("spiffe://cluster.local/ns/../sa", DotSegment),
            ("spiffe://cluster.local/ns/a%20b", BadPathChar),
            ("spiffe://cluster.local/ns?q=1", BadPathChar),
        ];
        for (id, want) in cases {
            assert_eq!(SpiffeId::parse(id), Err(want), "{id}");
        }
        let long = format!("spiffe://{}", "a".repeat(256));
        assert_eq!(SpiffeId::parse(&long), Err(TrustDomainTooLong));
        let too_long = format!("spiffe://td/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::parse(&too_long), Err(TooLong));
    }

    #[test]
    fn builds_service_account_ids() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::for_service_account(&td, "istio-system", "ztunnel").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(id.path(), "/ns/istio-system/sa/ztunnel");
        assert_eq!(id.service_account(), Some(("istio-system", "ztunnel")));
        assert!(SpiffeId::for_service_account(&td, "a/b", "c").is_err());
        for other in [
            "spiffe://td",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/ns/a/pod/b",
            "spiffe://td/x/ns/a/sa/b",
        ] {
            assert_eq!(
                SpiffeId::parse(other).unwrap().service_account(),
                None,
                "{other}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Every valid ID prints as it was written and parses back to itself.
            #[test]
            fn valid_ids_round_trip(
                td in "[a-z0-9][a-z0-9.\\-_]{0,40}",
                segments in proptest::collection::vec("[A-Za-z0-9\\-_][A-Za-z0-9.\\-_]{0,20}", 0..6),
            ) {
                let text = format!("spiffe://{td}{}", segments.iter().map(|s| format!("/{s}")).collect::<String>());
                let id = SpiffeId::parse(&text).unwrap();
                prop_assert_eq!(id.to_string(), text.clone());
                prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id.clone());
                prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            }

            /// Whatever the input, parsing never panics, and what it accepts round-trips.
            #[test]
            fn any_text_parses_or_is_refused(text in "\\PC{0,80}", tail in "[a-z/.%:@A-Z0-9]{0,40}") {
                for candidate in [text.clone(), format!("spiffe://{tail}"), format!("spiffe://td{tail}")] {
                    if let Ok(id) = SpiffeId::parse(&candidate) {
                        prop_assert_eq!(id.to_string(), candidate.clone());
                        prop_assert!(!id.path().ends_with('/'));
                        prop_assert!(!id.path().contains("//"));
                    }
                }
            }

            /// Service-account IDs built from valid names parse back to the same ID.
            #[test]
            fn service_account_ids_round_trip(ns in "[a-z0-9][a-z0-9\\-]{0,30}", sa in "[a-z0-9][a-z0-9\\-.]{0,30}") {
                let td = TrustDomain::new("cluster.local").unwrap();
                let id = SpiffeId::for_service_account(&td, &ns, &sa).unwrap();
                prop_assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
            }
        }
    }
}
