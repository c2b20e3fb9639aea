//! Audit queries as people and remote auditors write them: text filters, validated here, so
//! the CLI (`audit list`) and the gRPC `AuditService` run exactly the same query.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::EventKind;
use crate::store::AuditQuery;

/// Filters as text, one per flag (or request field). Empty means "any".
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Exact SPIFFE ID: the identity issued (or asked for), or the caller's.
    pub spiffe_id: Option<String>,
    /// Exact namespace.
    pub namespace: Option<String>,
    /// Exact service account.
    pub service_account: Option<String>,
    /// Serial, hex; colons and case are ignored.
    pub serial: Option<String>,
    /// Exact node name: events of callers running there.
    pub node: Option<String>,
    /// `issued`, `denied`, `authority` or `prune`.
    pub kind: Option<String>,
    /// RFC 3339: events at or after.
    pub since: Option<String>,
    /// RFC 3339: events at or before.
    pub until: Option<String>,
    /// Events about this authority.
    pub authority: Option<i64>,
    /// RFC 3339: issuances whose certificate was valid at that moment.
    pub valid_at: Option<String>,
}

/// A filter value that cannot be used; `field` is the flag's name without dashes
/// (`valid-at`), so each front end can name it its own way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} {problem}")]
pub struct FilterError {
    /// Which filter.
    pub field: &'static str,
    /// What was given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FilterError {
    /// The message with the field named `field` (each front end spells it its own way: the
    /// CLI `valid-at`, gRPC `valid_at`); the value is left as given.
    pub fn naming(&self, field: &str) -> String {
        format!("{field} {:?} {}", self.value, self.problem)
    }
}

impl crate::class::Classify for FilterError {
    fn class(&self) -> crate::class::Class {
        crate::class::Class::Caller
    }

    fn reason(&self) -> &'static str {
        "filter"
    }
}

fn bad(field: &'static str, value: &str, problem: impl Into<String>) -> FilterError {
    FilterError {
        field,
        value: value.to_owned(),
        problem: problem.into(),
    }
}

fn time(field: &'static str, text: &str) -> Result<OffsetDateTime, FilterError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        bad(
            field,
            text,
            "is not an RFC 3339 time (e.g. 2026-11-23T16:00:00Z)",
        )
    })
}

/// Normalizes a serial as the log writes it: lowercase hex, no colons, no sign-padding zero.
pub fn normalize_serial(text: &str) -> Result<String, FilterError> {
    let hex = text.replace(':', "").to_ascii_lowercase();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("serial", text, "is not hexadecimal"));
    }
    let trimmed = hex.trim_start_matches("00");
    Ok(if trimmed.is_empty() {
        hex
    } else {
        trimmed.to_owned()
    })
}

impl Filters {
    /// The query these filters describe, newest first, at most `limit` events, before
    /// `before_seq` (for paging).
    pub fn to_query(&self, limit: i64, before_seq: Option<i64>) -> Result<AuditQuery, FilterError> {
        if limit <= 0 {
            return Err(bad(
                "limit",
                &limit.to_string(),
                "must be a positive number",
            ));
        }
        let non_empty = |field: &'static str, v: &Option<String>| match v.as_deref() {
            Some("") => Err(bad(field, "", "is empty")),
            other => Ok(other.map(str::to_owned)),
        };
        let kind = match self.kind.as_deref() {
            None => None,
            Some(k) => match k.parse::<EventKind>() {
                Ok(kind) if EventKind::LISTED.contains(&kind) => Some(kind),
                _ => {
                    return Err(bad(
                        "kind",
                        k,
                        "is not one of issued, denied, authority, prune",
                    ));
                }
            },
        };
        let since = self
            .since
            .as_deref()
            .map(|t| time("since", t))
            .transpose()?;
        let until = self
            .until
            .as_deref()
            .map(|t| time("until", t))
            .transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(bad(
                "until",
                self.until.as_deref().unwrap_or_default(),
                "is before --since",
            ));
        }
        let valid_at = self
            .valid_at
            .as_deref()
            .map(|t| time("valid-at", t))
            .transpose()?;
        if let Some(id) = self.authority
            && id <= 0
        {
            return Err(bad("authority", &id.to_string(), "is not an authority id"));
        }
        Ok(AuditQuery {
            spiffe_id: non_empty("spiffe-id", &self.spiffe_id)?,
            namespace: non_empty("namespace", &self.namespace)?,
            service_account: non_empty("service-account", &self.service_account)?,
            serial: self.serial.as_deref().map(normalize_serial).transpose()?,
            node: non_empty("node", &self.node)?,
            kind,
            authority_id: self.authority,
            valid_at: valid_at.map(|t| t.unix_timestamp()),
            since_ms: since.map(crate::rfc3339::unix_ms),
            until_ms: until.map(crate::rfc3339::unix_ms),
            before_seq,
            limit: Some(limit),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_filter() {
        let cases: Vec<(Filters, &str)> = vec![
            (
                Filters {
                    since: Some("yesterday".into()),
                    ..Default::default()
                },
                "since",
            ),
            (
                Filters {
                    until: Some("2026-13-01T00:00:00Z".into()),
                    ..Default::default()
                },
                "until",
            ),
            (
                Filters {
                    valid_at: Some("now".into()),
                    ..Default::default()
                },
                "valid-at",
            ),
            (
                Filters {
                    kind: Some("anchor".into()),
                    ..Default::default()
                },
                "kind",
            ),
            (
                Filters {
                    serial: Some("xyz".into()),
                    ..Default::default()
                },
                "serial",
            ),
            (
                Filters {
                    authority: Some(0),
                    ..Default::default()
                },
                "authority",
            ),
            (
                Filters {
                    namespace: Some(String::new()),
                    ..Default::default()
                },
                "namespace",
            ),
            (
                Filters {
                    since: Some("2026-02-01T00:00:00Z".into()),
                    until: Some("2026-01-01T00:00:00Z".into()),
                    ..Default::default()
                },
                "until",
            ),
        ];
        for (filters, field) in cases {
            assert_eq!(filters.to_query(10, None).unwrap_err().field, field);
        }
        assert_eq!(
            Filters::default().to_query(0, None).unwrap_err().field,
            "limit"
        );
    }

    #[test]
    fn serials_are_normalized() {
        assert_eq!(normalize_serial("00:AB:cd").unwrap(), "abcd");
        assert_eq!(normalize_serial("0a0b").unwrap(), "0a0b");
        let q = Filters {
            serial: Some("EF:01".into()),
            ..Default::default()
        }
        .to_query(5, Some(9))
        .unwrap();
        assert_eq!(q.serial.as_deref(), Some("ef01"));
        assert_eq!((q.limit, q.before_seq), (Some(5), Some(9)));
    }
}
