//! Queries behind the audit log.

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

mod append;
mod writer;

pub use append::Head;
pub(in crate::store) use append::append_in_tx;
use append::insert_row;
pub use writer::AuditWriter;

use super::{Bind, Dialect, DynamicSql, Store, StoreError, column};
use crate::audit::event::{EventKind, EventRow, FIELDS, FieldReader, UnknownKind};

/// Filters of `audit list` (and of the gRPC audit service, later). Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Exact SPIFFE ID, issued (or asked for) or the caller's.
    pub spiffe_id: Option<String>,
    /// Exact namespace.
    pub namespace: Option<String>,
    /// Exact service account.
    pub service_account: Option<String>,
    /// Exact serial, lowercase hex.
    pub serial: Option<String>,
    /// Exact node of the caller.
    pub node: Option<String>,
    /// Kind of event.
    pub kind: Option<EventKind>,
    /// Signed by this authority.
    pub authority_id: Option<i64>,
    /// Issuances whose certificate was valid at this moment (unix seconds).
    pub valid_at: Option<i64>,
    /// Events at or after, unix milliseconds.
    pub since_ms: Option<i64>,
    /// Events at or before, unix milliseconds.
    pub until_ms: Option<i64>,
    /// Events with a sequence number below this (for paging backwards).
    pub before_seq: Option<i64>,
    /// At most this many events.
    pub limit: Option<i64>,
}

/// The columns of `audit_events`, in the order rows are written and read: the fixed parts,
/// then every field of [`FIELDS`], then the two hashes.
static COLUMNS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut names = vec!["seq", "time_ms", "kind"];
    names.extend(FIELDS.iter().map(|f| f.name));
    names.extend(["prev_hash", "hash"]);
    names.join(", ")
});

/// How many columns [`COLUMNS`] names.
const COLUMN_COUNT: usize = 3 + FIELDS.len() + 2;

/// Reads the optional fields of an event from a row.
struct RowReader<'r>(&'r AnyRow);

impl FieldReader for RowReader<'_> {
    type Error = StoreError;

    fn text(&mut self, name: &'static str) -> Result<Option<String>, StoreError> {
        column(self.0, name)
    }

    fn int(&mut self, name: &'static str) -> Result<Option<i64>, StoreError> {
        column(self.0, name)
    }
}

fn event_from_row(row: &AnyRow) -> Result<EventRow, StoreError> {
    let kind: String = column(row, "kind")?;
    let kind = kind.parse().map_err(|e: UnknownKind| StoreError::Corrupt {
        table: "audit_events",
        detail: e.to_string(),
    })?;
    let mut event = EventRow::read(
        column(row, "seq")?,
        column(row, "time_ms")?,
        kind,
        &mut RowReader(row),
    )?;
    event.prev_hash = column(row, "prev_hash")?;
    event.hash = column(row, "hash")?;
    Ok(event)
}

fn checkpoint_from_row(r: &AnyRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        seq: column(r, "seq")?,
        hash: column(r, "hash")?,
        time_ms: column(r, "time_ms")?,
        public_key: column(r, "public_key")?,
        signature: column(r, "signature")?,
    })
}

/// What a prune removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// How many events were removed.
    pub removed: i64,
    /// The anchor's sequence number (the last removed event's).
    pub anchor_seq: i64,
    /// The hash the chain continues from.
    pub anchor_hash: String,
}

/// A signed checkpoint: the head of the chain at some moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The event it covers.
    pub seq: i64,
    /// That event's hash.
    pub hash: String,
    /// When it was signed, unix milliseconds.
    pub time_ms: i64,
    /// The audit key's public half (Ed25519, base64).
    pub public_key: String,
    /// The signature (base64).
    pub signature: String,
}

impl Store {
    /// The last event's sequence number and hash, if the log is not empty.
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| Ok((column(&r, "seq")?, column(&r, "hash")?)))
            .transpose()
    }

    /// Events matching `query`, newest first.
    pub async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<EventRow>, StoreError> {
        // `sql.text` gathers the conditions (` AND …`) first; the statement is built around
        // them at the end.
        let mut sql = DynamicSql::default();
        let text = |sql: &mut DynamicSql, column: &str, value: &Option<String>| {
            if let Some(v) = value {
                let p = sql.bind(Bind::Text(v.clone()));
                sql.text.push_str(&format!(" AND {column} = {p}"));
            }
        };
        text(&mut sql, "namespace", &query.namespace);
        text(&mut sql, "service_account", &query.service_account);
        text(&mut sql, "serial", &query.serial);
        text(&mut sql, "node", &query.node);
        // kind and authority_id have few distinct values: next to a selective filter, their
        // indexes would make SQLite walk most of the log, so `+` keeps it off them (the
        // planner has no statistics on a read-only copy of the store). PostgreSQL keeps
        // statistics, and has no unary `+` on text.
        let selective = query.spiffe_id.is_some()
            || query.namespace.is_some()
            || query.service_account.is_some()
            || query.serial.is_some()
            || query.node.is_some()
            || query.valid_at.is_some();
        let weak = if selective && self.dialect() == Dialect::Sqlite {
            "+"
        } else {
            ""
        };
        text(
            &mut sql,
            &format!("{weak}kind"),
            &query.kind.map(|k| k.as_str().to_owned()),
        );
        if let Some(t) = query.valid_at {
            // Bounded by the longest lifetime in the log, so the notBefore index does the work.
            let t = sql.bind(Bind::Int(t));
            sql.text.push_str(&format!(
                " AND {weak}kind = 'issued' AND not_before <= {t} AND not_after >= {t} \
                 AND not_before >= {t} - (SELECT max_lifetime FROM audit_meta WHERE id = 1)"
            ));
        }
        for (clause, value) in [
            (format!(" AND {weak}authority_id = "), query.authority_id),
            (" AND time_ms >= ".to_owned(), query.since_ms),
            (" AND time_ms <= ".to_owned(), query.until_ms),
            (" AND seq < ".to_owned(), query.before_seq),
        ] {
            if let Some(v) = value {
                let p = sql.bind(Bind::Int(v));
                sql.text.push_str(&clause);
                sql.text.push_str(&p);
            }
        }
        let conditions = std::mem::take(&mut sql.text);
        let limit = query
            .limit
            .map(|limit| format!(" LIMIT {}", sql.bind(Bind::Int(limit))))
            .unwrap_or_default();
        let columns = &*COLUMNS;
        let select = |first: &str| {
            format!(
                "SELECT {columns} FROM audit_events WHERE {first}{conditions} \
                 ORDER BY seq DESC{limit}"
            )
        };
        sql.text = match &query.spiffe_id {
            None => select("1 = 1"),
            Some(id) => {
                // The identity issued, or the caller's (a node proxy's requests are found
                // under either): two index walks, newest first, merged. `caller` is set only
                // when it differs from `spiffe_id`, so no event is in both. (An `OR` would
                // read every event of the identity and sort them, whatever the limit.)
                let p = sql.bind(Bind::Text(id.clone()));
                format!(
                    "SELECT {columns} FROM ({}) AS issued_to UNION ALL \
                     SELECT {columns} FROM ({}) AS asked_by ORDER BY seq DESC{limit}",
                    select(&format!("spiffe_id = {p}")),
                    select(&format!("caller = {p}")),
                )
            }
        };
        // The SQL text is built only from the fixed fragments above; values are bound.
        let rows = sql.query().fetch_all(self.pool()).await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Removes the events before `before_ms` (a prefix of the log), leaving an anchor that
    /// holds the hash the chain continues from, and appends `event` (a prune event, told what
    /// was removed) after the head. One transaction. `None` if nothing is that old.
    pub async fn prune_before(
        &self,
        before_ms: i64,
        mut event: EventRow,
    ) -> Result<Option<Pruned>, StoreError> {
        let mut tx = self.begin_write().await?;
        // The newest event older than the cut; never the head, so the log never empties.
        let last = sqlx::query(
            "SELECT seq, hash, time_ms FROM audit_events WHERE time_ms < $1 \
             AND seq < (SELECT MAX(seq) FROM audit_events) ORDER BY seq DESC LIMIT 1",
        )
        .bind(before_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(last) = last else {
            return Ok(None);
        };
        let seq: i64 = column(&last, "seq")?;
        let hash: String = column(&last, "hash")?;
        let time_ms: i64 = column(&last, "time_ms")?;
        let removed: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM audit_events WHERE seq <= $1 AND kind != 'anchor'",
        )
        .bind(seq)
        .fetch_one(&mut *tx)
        .await
        .map(|row| column(&row, "n"))??;
        sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        let mut anchor = EventRow::new(EventKind::Anchor);
        anchor.seq = seq;
        anchor.time_ms = time_ms;
        anchor.reason = Some(format!(
            "events up to {seq} were pruned; the chain continues from this event's hash"
        ));
        anchor.prev_hash = String::new();
        anchor.hash = hash.clone();
        insert_row(&mut tx, &anchor).await?;
        event.count = Some(removed);
        event.anchor_seq = Some(seq);
        event.anchor_hash = Some(hash.clone());
        event.reason = Some(format!(
            "{}; the chain continues from event {seq} ({hash})",
            event.reason.as_deref().unwrap_or("pruned")
        ));
        append_in_tx(&mut tx, std::slice::from_mut(&mut event)).await?;
        tx.commit().await?;
        Ok(Some(Pruned {
            removed,
            anchor_seq: seq,
            anchor_hash: hash,
        }))
    }

    /// Records a signed checkpoint.
    pub async fn insert_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, public_key, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO UPDATE SET hash = excluded.hash, \
             time_ms = excluded.time_ms, public_key = excluded.public_key, \
             signature = excluded.signature",
        )
        .bind(checkpoint.seq)
        .bind(&checkpoint.hash)
        .bind(checkpoint.time_ms)
        .bind(&checkpoint.public_key)
        .bind(&checkpoint.signature)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The recorded checkpoints covering events `from..=to`, oldest first.
    pub async fn checkpoints_between(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints \
             WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
        )
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(checkpoint_from_row).collect()
    }

    /// The latest recorded checkpoint.
    pub async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, hash, time_ms, public_key, signature FROM audit_checkpoints \
             ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(checkpoint_from_row).transpose()
    }

    /// Up to `limit` events after `after_seq`, oldest first (for walking the whole chain).
    pub async fn audit_events_after(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
            *COLUMNS
        );
        // Fixed text: COLUMNS is made of the field names.
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after_seq)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(event_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_count_is_the_columns_named() {
        assert_eq!(COLUMNS.split(',').count(), COLUMN_COUNT);
    }
}
