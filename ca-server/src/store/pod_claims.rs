//! Claims on PodCertificateRequests: the replica that claims a request is the one that signs
//! it, so replicas on one store never both sign one request. A claim older than the
//! holder's deadline may be taken over (the holder stopped before answering).

use super::{Store, StoreError};

/// How long a claim is kept at most: far longer than a request stays unanswered.
const KEEP_SECS: i64 = 86_400;

impl Store {
    /// Claims request `uid` for `replica` at `now` (unix seconds): true if it is now
    /// `replica`'s (it was no one's, already its own, or its holder's claim is older than
    /// `stale_secs`), false if another replica holds it.
    pub async fn claim_pod_request(
        &self,
        uid: &str,
        replica: &str,
        now: i64,
        stale_secs: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let claimed = sqlx::query(
            "INSERT INTO pod_certificate_claims (request_uid, replica, claimed_at) \
             VALUES ($1, $2, $3) ON CONFLICT (request_uid) DO UPDATE \
             SET replica = excluded.replica, claimed_at = excluded.claimed_at \
             WHERE pod_certificate_claims.replica = excluded.replica \
             OR pod_certificate_claims.claimed_at < $4",
        )
        .bind(uid)
        .bind(replica)
        .bind(now)
        .bind(now - stale_secs)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Gives up `replica`'s claim on `uid` (it could not answer: another replica may).
    pub async fn release_pod_request(&self, uid: &str, replica: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM pod_certificate_claims WHERE request_uid = $1 AND replica = $2")
            .bind(uid)
            .bind(replica)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets claims older than a day.
    pub async fn prune_pod_claims(&self, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let removed = sqlx::query("DELETE FROM pod_certificate_claims WHERE claimed_at < $1")
            .bind(now - KEEP_SECS)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(removed)
    }
}
