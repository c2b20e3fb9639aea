//! Authorities close to expiry: the failure mTLS guides are full of ("certificate has expired"
//! everywhere at once) is announced weeks ahead, in the log, in `/metrics` and in
//! `root status --check`.

use std::fmt;

use crate::store::{AuthorityRecord, AuthorityState};

/// How long before an authority's expiry it is reported, unless configured.
pub const DEFAULT_WARNING: time::Duration = time::Duration::days(30);

/// An authority still in the bundle that expires within the warning window (or has expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiring {
    /// Its id.
    pub id: i64,
    /// Its state.
    pub state: AuthorityState,
    /// Its notAfter, unix seconds.
    pub not_after: i64,
    /// Seconds left (negative once expired).
    pub left: i64,
}

/// The authorities of `authorities` not retired whose notAfter is within `window` of `now`.
pub fn expiring(
    authorities: &[AuthorityRecord],
    now: i64,
    window: time::Duration,
) -> Vec<Expiring> {
    authorities
        .iter()
        .filter(|a| a.state != AuthorityState::Retired)
        .filter(|a| a.not_after - now <= window.whole_seconds())
        .map(|a| Expiring {
            id: a.id,
            state: a.state,
            not_after: a.not_after,
            left: a.not_after - now,
        })
        .collect()
}

/// "3 days", "5 hours", "12 minutes": the larger unit that is at least 1.
pub fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("{n} {unit}")
}

impl fmt::Display for Expiring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = crate::rfc3339::secs_text(self.not_after);
        let id = self.id;
        if self.left <= 0 {
            write!(
                f,
                "expiry: authority {id} ({}) expired {} ago ({at}): peers reject what chains to \
                 it with \"certificate has expired\"; ",
                self.state,
                span(self.left)
            )?;
        } else {
            write!(
                f,
                "expiry: authority {id} ({}) expires in {} ({at}); ",
                self.state,
                span(self.left)
            )?;
        }
        match self.state {
            AuthorityState::Active => f.write_str(
                "prepare a new root now (`ca-server root prepare`), let the bundle reach every \
                 proxy, then `ca-server root activate ID`",
            ),
            AuthorityState::Prepared => f.write_str(
                "activating it would buy little time: prepare a newer one instead, and retire \
                 this one (`ca-server root retire ID`)",
            ),
            AuthorityState::Retiring => f.write_str(
                "retire it once the certificates it signed have expired (`ca-server root retire \
                 ID`)",
            ),
            AuthorityState::Retired => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: i64, state: AuthorityState, not_after: i64) -> AuthorityRecord {
        AuthorityRecord {
            id,
            state,
            subject: String::new(),
            cert_pem: String::new(),
            chain_pem: String::new(),
            root_pem: String::new(),
            key_ref: String::new(),
            sealed_key: None,
            not_before: 0,
            not_after,
            fingerprint_sha256: String::new(),
            kind: crate::store::AuthorityKind::SelfSigned,
            created_at: 0,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
            tainted_at: None,
            joined_sequence: None,
        }
    }

    #[test]
    fn only_authorities_in_the_bundle_within_the_window() {
        let day = 86_400;
        let all = [
            record(1, AuthorityState::Active, 10 * day),
            record(2, AuthorityState::Prepared, 40 * day),
            record(3, AuthorityState::Retiring, -day),
            record(4, AuthorityState::Retired, day),
        ];
        let found = expiring(&all, 0, time::Duration::days(30));
        assert_eq!(found.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
        assert!(found[0].to_string().contains("expires in 10 days"));
        assert!(found[0].to_string().contains("root prepare"));
        assert!(found[1].to_string().contains("expired 24 hours ago"));
        assert!(
            expiring(&all, 0, time::Duration::days(1))
                .iter()
                .all(|e| e.id == 3)
        );
    }

    #[test]
    fn spans_read_in_the_larger_unit() {
        assert_eq!(span(3 * 86_400 + 5), "3 days");
        assert_eq!(span(5 * 3_600), "5 hours");
        assert_eq!(span(-600), "10 minutes");
        assert_eq!(span(30), "30 seconds");
    }
}
