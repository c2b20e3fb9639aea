//! How far a rotation has reached the fleet, from the CA's own records: for each authority,
//! the certificates still in use (each holder's newest unexpired one), their identities and
//! the last notAfter; and the share of identities whose newest certificate comes from the
//! active authority. Pure: the store gives the unexpired certificates.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::{NewestByHolder, SeenClient, UnexpiredCertificate};

/// What one authority's certificates are doing now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorityUse {
    /// Its unexpired certificates.
    pub unexpired: usize,
    /// Those still the newest of their holder.
    pub live: usize,
    /// The distinct identities among the live ones.
    pub identities: usize,
    /// When the last of its unexpired certificates expires, unix seconds.
    pub last_not_after: Option<i64>,
}

/// The fleet's certificates by authority, and how far it has moved to the active one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Convergence {
    /// By authority id (only those with an unexpired certificate).
    pub by_authority: BTreeMap<i64, AuthorityUse>,
    /// Identities with a live certificate.
    pub identities: usize,
    /// Of those, the ones whose newest certificate comes from the active authority.
    pub on_active: usize,
}

impl Convergence {
    /// `on_active / identities`; 1 when there is nothing to converge.
    pub fn ratio(&self) -> f64 {
        if self.identities == 0 {
            1.0
        } else {
            self.on_active as f64 / self.identities as f64
        }
    }

    /// What authority `id`'s certificates are doing (nothing, if it has none unexpired).
    pub fn of(&self, id: i64) -> AuthorityUse {
        self.by_authority.get(&id).cloned().unwrap_or_default()
    }
}

/// Gathers the unexpired certificates one at a time, then says how they stand.
#[derive(Debug, Default)]
pub struct Tally {
    by_authority: BTreeMap<i64, AuthorityUse>,
    newest: NewestByHolder,
}

impl Tally {
    /// Takes in one unexpired certificate.
    pub fn add(&mut self, cert: UnexpiredCertificate) {
        let use_ = self.by_authority.entry(cert.authority_id).or_default();
        use_.unexpired += 1;
        use_.last_not_after = use_.last_not_after.max(Some(cert.not_after));
        self.newest.add(cert);
    }

    /// How they converge towards `active`.
    pub fn finish(self, active: Option<i64>) -> Convergence {
        let Self {
            mut by_authority,
            newest,
        } = self;
        let mut identities: HashMap<i64, HashSet<&str>> = HashMap::new();
        // Each identity's newest certificate, across its holders.
        let mut newest_of: HashMap<&str, &UnexpiredCertificate> = HashMap::new();
        for cert in newest.live() {
            let id = cert.holder.spiffe_id.as_str();
            by_authority.entry(cert.authority_id).or_default().live += 1;
            identities.entry(cert.authority_id).or_default().insert(id);
            let slot = newest_of.entry(id).or_insert(cert);
            if cert.seq > slot.seq {
                *slot = cert;
            }
        }
        for (authority, ids) in identities {
            by_authority.entry(authority).or_default().identities = ids.len();
        }
        let on_active = newest_of
            .values()
            .filter(|c| Some(c.authority_id) == active)
            .count();
        Convergence {
            by_authority,
            identities: newest_of.len(),
            on_active,
        }
    }
}

/// The convergence of `unexpired` towards `active`.
pub fn convergence(unexpired: &[UnexpiredCertificate], active: Option<i64>) -> Convergence {
    let mut tally = Tally::default();
    for cert in unexpired {
        tally.add(cert.clone());
    }
    tally.finish(active)
}

/// The convergence of the store's unexpired certificates at `now` towards `active`, read one
/// row at a time.
pub async fn from_store(
    store: &crate::store::Store,
    now: i64,
    active: Option<i64>,
) -> Result<Convergence, crate::store::StoreError> {
    let mut tally = Tally::default();
    store
        .each_unexpired_certificate(now, |cert| tally.add(cert))
        .await?;
    Ok(tally.finish(active))
}

/// A client that, as last seen, holds a bundle older than some sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lagging {
    /// Its address (or `(others)`).
    pub client: String,
    /// How it was last given the newest bundle it holds.
    pub via: String,
    /// That bundle's sequence.
    pub sequence: i64,
}

/// The clients in `seen` (each address once: the newest bundle any server gave it by any
/// means) whose bundle is older than `joined`, the sequence a root joined the bundle at.
pub fn lagging(seen: &[SeenClient], joined: i64) -> Vec<Lagging> {
    let mut newest: BTreeMap<&str, &SeenClient> = BTreeMap::new();
    for s in seen {
        let slot = newest.entry(s.client.as_str()).or_insert(s);
        if s.sequence > slot.sequence {
            *slot = s;
        }
    }
    newest
        .into_values()
        .filter(|s| s.sequence < joined)
        .map(|s| Lagging {
            client: s.client.clone(),
            via: s.via.clone(),
            sequence: s.sequence,
        })
        .collect()
}

/// How many distinct clients `seen` holds.
pub fn clients(seen: &[SeenClient]) -> usize {
    seen.iter()
        .map(|s| s.client.as_str())
        .collect::<HashSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Holder;

    fn cert(seq: i64, id: &str, pod: Option<&str>, authority: i64) -> UnexpiredCertificate {
        UnexpiredCertificate {
            seq,
            holder: Holder {
                spiffe_id: id.into(),
                pod_uid: pod.map(Into::into),
            },
            authority_id: authority,
            not_after: 1_000 + seq,
        }
    }

    #[test]
    fn a_rotation_converges_as_holders_renew_from_the_active_authority() {
        // Two pods of web and one db pod on authority 1.
        let mut certs = vec![
            cert(1, "web", Some("p1"), 1),
            cert(2, "web", Some("p2"), 1),
            cert(3, "db", Some("p3"), 1),
        ];
        let before = convergence(&certs, Some(2));
        assert_eq!(before.identities, 2);
        assert_eq!(before.on_active, 0);
        assert_eq!(before.ratio(), 0.0);
        assert_eq!(
            before.of(1),
            AuthorityUse {
                unexpired: 3,
                live: 3,
                identities: 2,
                last_not_after: Some(1_003),
            }
        );
        // One web pod renews from 2: web's newest certificate is from 2.
        certs.push(cert(4, "web", Some("p1"), 2));
        let midway = convergence(&certs, Some(2));
        assert_eq!(midway.on_active, 1);
        assert_eq!(midway.ratio(), 0.5);
        assert_eq!(midway.of(1).live, 2, "p1's old certificate is replaced");
        assert_eq!(midway.of(1).unexpired, 3);
        assert_eq!(midway.of(2).live, 1);
        // Every pod renews.
        certs.push(cert(5, "web", Some("p2"), 2));
        certs.push(cert(6, "db", Some("p3"), 2));
        let done = convergence(&certs, Some(2));
        assert_eq!(done.ratio(), 1.0);
        assert_eq!(done.of(1).live, 0);
        assert_eq!(done.of(2).identities, 2);
        // Nothing issued: nothing to converge.
        assert_eq!(convergence(&[], Some(2)).ratio(), 1.0);
    }

    #[test]
    fn a_client_lags_until_any_server_gives_it_the_bundle_with_the_root() {
        let seen = |client: &str, via: &str, sequence| SeenClient {
            client: client.into(),
            via: via.into(),
            sequence,
            seen_at: 0,
        };
        let all = vec![
            seen("10.0.0.1", "poll", 3),
            seen("10.0.0.1", "watch", 5),
            seen("10.0.0.2", "poll", 4),
            seen("10.0.0.3", "poll", 6),
        ];
        assert_eq!(clients(&all), 3);
        let behind = lagging(&all, 5);
        assert_eq!(
            behind,
            vec![Lagging {
                client: "10.0.0.2".into(),
                via: "poll".into(),
                sequence: 4
            }]
        );
        assert!(lagging(&all, 4).is_empty());
        assert_eq!(lagging(&all, 7).len(), 3);
    }
}
