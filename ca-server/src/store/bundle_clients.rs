//! Who holds which bundle: each server's sightings of its clients (the sequence it last gave
//! each address, over a watch stream or a poll), shared through the store so that the CLI
//! and every replica see the fleet's view.

use super::{Store, StoreError, column};

/// How a client gets the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// `WatchTrustBundle`: every change is pushed.
    Watch,
    /// `GetTrustBundle`, `GET /trust-bundle` or `/trust-bundle.pem`: it asks again within
    /// the refresh hint.
    Poll,
}

impl Via {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Watch => "watch",
            Self::Poll => "poll",
        }
    }
}

/// One sighting: `client` was given bundle `sequence` at `seen_at` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The address (IPv6 by its /64), or `(others)` past a server's cap.
    pub client: String,
    /// How.
    pub via: Via,
    /// The bundle sequence it was given.
    pub sequence: i64,
    /// When, unix seconds.
    pub seen_at: i64,
}

/// A sighting as stored, still within its server's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenClient {
    /// See [`Sighting`].
    pub client: String,
    /// `watch` or `poll`.
    pub via: String,
    /// See [`Sighting`].
    pub sequence: i64,
    /// See [`Sighting`].
    pub seen_at: i64,
}

/// How long a sighting is kept at most, whatever the window (a day).
const KEEP_SECS: i64 = 86_400;

impl Store {
    /// Records `sightings` by server `replica`, whose refresh hint is `window_secs`; forgets
    /// sightings older than a day.
    pub async fn record_sightings(
        &self,
        replica: &str,
        window_secs: i64,
        sightings: &[Sighting],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for s in sightings {
            sqlx::query(
                "INSERT INTO bundle_clients (replica, client, via, sequence, seen_at, window_secs) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (replica, client, via) DO UPDATE \
                 SET sequence = excluded.sequence, seen_at = excluded.seen_at, \
                 window_secs = excluded.window_secs",
            )
            .bind(replica)
            .bind(&s.client)
            .bind(s.via.as_str())
            .bind(s.sequence)
            .bind(s.seen_at)
            .bind(window_secs)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM bundle_clients WHERE seen_at < $1")
            .bind(now - KEEP_SECS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The sightings still within their server's window at `now`.
    pub async fn seen_clients(&self, now: i64) -> Result<Vec<SeenClient>, StoreError> {
        let rows = sqlx::query(
            "SELECT client, via, sequence, seen_at FROM bundle_clients \
             WHERE seen_at >= $1 - window_secs ORDER BY client, via",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SeenClient {
                    client: column(row, "client")?,
                    via: column(row, "via")?,
                    sequence: column(row, "sequence")?,
                    seen_at: column(row, "seen_at")?,
                })
            })
            .collect()
    }
}
