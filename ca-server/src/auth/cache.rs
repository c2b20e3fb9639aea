//! The tokens verified before: a bounded cache keyed by the token's SHA-256, each entry
//! remembering who verified it and until when it holds.

use super::{BearerToken, Identity};

/// Which key verified a remembered token: the answer holds only while the issuer still has
/// that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VerifiedBy {
    /// The issuer's index in [`Authenticator::issuers`].
    pub(super) issuer: usize,
    pub(super) kid: Option<String>,
    pub(super) thumbprint: [u8; 32],
}

/// A remembered answer: who the token proves, until when, and by which key (none for a
/// TokenReview, whose answer is kept a short while instead).
#[derive(Debug, Clone)]
pub(super) struct Verified {
    pub(super) identity: Identity,
    pub(super) expires_at: i64,
    pub(super) by: Option<VerifiedBy>,
}

/// Tokens that passed every check, by the SHA-256 of the token (never the token itself), until
/// they expire: the same token gets the same answer, so a proxy renewing with its token does
/// not pay for a signature check each time. Bounded; refusals are never kept here.
pub(super) struct VerifiedTokens {
    pub(super) entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verified>>,
    pub(super) capacity: usize,
}

impl VerifiedTokens {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity,
        }
    }

    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<[u8; 32], Verified>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn key(token: &BearerToken) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(token.expose().as_bytes()).into()
    }

    pub(super) fn get(&self, key: &[u8; 32], now: i64) -> Option<Verified> {
        match self.lock().get(key) {
            Some(v) if now < v.expires_at => Some(v.clone()),
            _ => None,
        }
    }

    pub(super) fn insert(&self, key: [u8; 32], verified: Verified, now: i64) {
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            entries.retain(|_, v| now < v.expires_at);
            if entries.len() >= self.capacity {
                // Still full of live tokens: drop about half (in no particular order) rather
                // than grow; those callers pay for one more signature check.
                let mut n = 0usize;
                entries.retain(|_, _| {
                    n += 1;
                    n.is_multiple_of(2)
                });
            }
        }
        entries.insert(key, verified);
    }

    pub(super) fn remove(&self, key: &[u8; 32]) {
        self.lock().remove(key);
    }

    /// Forgets every answer that `keep` refuses.
    pub(super) fn retain(&self, mut keep: impl FnMut(&Verified) -> bool) {
        self.lock().retain(|_, v| keep(v));
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// How many verified tokens are remembered.
pub(super) const VERIFIED_TOKENS: usize = 10_000;
