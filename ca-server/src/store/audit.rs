//! Queries behind the audit log.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe};

use super::{Bind, Dialect, DynamicSql, Store, StoreError, column};
use crate::audit::encoding::{GENESIS_HASH, event_hash};
use crate::audit::event::{EventKind, EventRow, FIELDS, FieldReader, FieldValue, UnknownKind};

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

/// The head of the chain as a writer last saw it: the last event's `seq` and `hash`, and the
/// longest certificate lifetime recorded (see `audit_meta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The last event's sequence number (0 for an empty log).
    pub seq: i64,
    /// The last event's hash.
    pub hash: String,
    /// `audit_meta.max_lifetime`.
    pub max_lifetime: i64,
}

async fn read_head<'c, E>(conn: E) -> Result<Head, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let row = sqlx::query(
        "SELECT m.max_lifetime AS max_lifetime, e.seq AS seq, e.hash AS hash \
         FROM audit_meta m LEFT JOIN \
         (SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1) e ON 1 = 1 \
         WHERE m.id = 1",
    )
    .fetch_one(conn)
    .await?;
    let seq: Option<i64> = column(&row, "seq")?;
    let hash: Option<String> = column(&row, "hash")?;
    Ok(Head {
        seq: seq.unwrap_or(0),
        hash: hash.unwrap_or_else(|| GENESIS_HASH.to_owned()),
        max_lifetime: column(&row, "max_lifetime")?,
    })
}

/// Links `events` onto `head`: fills in each one's `seq`, `prev_hash` and `hash`. Returns the
/// new head; its `max_lifetime` takes in the events' certificates.
fn link(events: &mut [EventRow], head: &Head) -> Head {
    let mut head = head.clone();
    for e in events.iter_mut() {
        e.seq = head.seq + 1;
        e.prev_hash = std::mem::take(&mut head.hash);
        e.hash = event_hash(e);
        head.seq = e.seq;
        head.hash = e.hash.clone();
        if let (Some(nb), Some(na)) = (e.not_before, e.not_after) {
            head.max_lifetime = head.max_lifetime.max(na - nb);
        }
    }
    head
}

/// Chains `events` onto the head of the log inside `tx` (which must hold the write lock) and
/// returns the new head.
pub(super) async fn append_in_tx(
    tx: &mut AnyConnection,
    events: &mut [EventRow],
) -> Result<Head, StoreError> {
    let before = read_head(&mut *tx).await?;
    let head = link(events, &before);
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let sql = insert_sql(chunk.len(), "INSERT INTO", &mut 0);
        bind_rows(sqlx::query(AssertSqlSafe(sql)), chunk)
            .execute(&mut *tx)
            .await?;
    }
    if head.max_lifetime > before.max_lifetime {
        sqlx::query(RAISE_MAX_LIFETIME)
            .bind(head.max_lifetime)
            .execute(&mut *tx)
            .await?;
    }
    Ok(head)
}

/// Raises `audit_meta.max_lifetime` to `$1` if that is longer (written without `MAX(a, b)`
/// or `GREATEST`, which only one of the two databases has).
const RAISE_MAX_LIFETIME: &str = "UPDATE audit_meta SET max_lifetime = \
     CASE WHEN max_lifetime < $1 THEN $1 ELSE max_lifetime END WHERE id = 1";

/// Rows per multi-row INSERT: 25 columns each, well under SQLite's 32,766 variables and
/// PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 512;

/// `<verb> audit_events (…) VALUES ($n, …), …` for `rows` rows, numbering placeholders on
/// from `*bound` (which it advances).
fn insert_sql(rows: usize, verb: &str, bound: &mut usize) -> String {
    let mut sql = format!("{verb} audit_events ({}) VALUES ", *COLUMNS);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for column in 0..COLUMN_COUNT {
            if column > 0 {
                sql.push_str(", ");
            }
            *bound += 1;
            sql.push_str(&format!("${bound}"));
        }
        sql.push(')');
    }
    sql
}

/// Binds `rows` in the order of [`insert_sql`]'s columns, on either database's query type.
fn bind_rows<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    rows: &'q [EventRow],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for e in rows {
        query = query.bind(e.seq).bind(e.time_ms).bind(e.kind.as_str());
        for value in e.values() {
            query = match value {
                FieldValue::Text(text) => query.bind(text),
                FieldValue::Int(int) => query.bind(int),
            };
        }
        query = query.bind(&e.prev_hash).bind(&e.hash);
    }
    query
}

async fn insert_row(tx: &mut AnyConnection, e: &EventRow) -> Result<(), StoreError> {
    let sql = insert_sql(1, "INSERT INTO", &mut 0);
    bind_rows(sqlx::query(AssertSqlSafe(sql)), std::slice::from_ref(e))
        .execute(&mut *tx)
        .await?;
    Ok(())
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

/// [`AuditWriter::append`] on SQLite, with the writer's own connection.
async fn append_sqlite(
    store: &Store,
    conn: &mut sqlx::SqliteConnection,
    head: &mut Option<Head>,
    events: &mut [EventRow],
) -> Result<(), StoreError> {
    // Without a remembered head, read it outside the transaction: if another writer appends
    // before ours begins, our first row collides with theirs on seq and nothing is written.
    let known = match head.take() {
        Some(known) => known,
        None => read_head(store.pool()).await?,
    };
    let new_head = link(events, &known);
    let mut sql = String::from("BEGIN IMMEDIATE;");
    let mut bound = 0;
    for chunk in events.chunks(ROWS_PER_INSERT) {
        // OR ROLLBACK: a conflict (a stale head: someone else appended) rolls back the whole
        // transaction, which is what the writer wants anyway; and with nothing to undo
        // statement by statement, SQLite keeps no statement journal, a page copy per
        // touched page on every commit.
        sql.push_str(&insert_sql(
            chunk.len(),
            "INSERT OR ROLLBACK INTO",
            &mut bound,
        ));
        sql.push(';');
    }
    if new_head.max_lifetime > known.max_lifetime {
        sql.push_str(&format!(
            "UPDATE audit_meta SET max_lifetime = {} WHERE id = 1 AND max_lifetime < {};",
            new_head.max_lifetime, new_head.max_lifetime
        ));
    }
    sql.push_str("COMMIT;");
    // Fixed fragments and an integer we computed; every event value is bound.
    let result = bind_rows(sqlx::query(AssertSqlSafe(sql)), events)
        .execute(&mut *conn)
        .await;
    match result {
        Ok(_) => {
            *head = Some(new_head);
            Ok(())
        }
        Err(e) => {
            // The insert rolls the transaction back on a conflict; anything else may leave it
            // open, and the connection is used again.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            let conflict = matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation());
            if !conflict {
                return Err(e.into());
            }
            // Someone else appended (the CLI, another server on the file): chain onto the
            // head as it is read under the write lock.
            let mut tx = store.begin_write().await?;
            let fresh = append_in_tx(&mut tx, events).await?;
            tx.commit().await?;
            *head = Some(fresh);
            Ok(())
        }
    }
}

/// The audit writer's connection and, on SQLite, the chain head it remembers between
/// commits.
///
/// On SQLite the writer has a connection of its own: SQLite drops a connection's page cache
/// whenever another connection commits, and on a connection of its own the pages a commit
/// touches stay cached. The whole transaction (begin, insert, commit) is one statement list,
/// one round trip to SQLite's thread. If someone else appended since (the CLI, say), the
/// insert collides with their row (seq is the primary key) and rolls back; the events are
/// then chained onto the head as read inside a locked transaction.
///
/// On PostgreSQL other replicas append all the time, so a remembered head would mostly be
/// stale: each commit takes the write lock and reads the head inside its transaction.
pub struct AuditWriter {
    store: Store,
    sqlite: Option<(sqlx::SqliteConnection, Option<Head>)>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("dialect", &self.store.dialect())
            .field("head", &self.sqlite.as_ref().map(|(_, head)| head))
            .finish()
    }
}

impl AuditWriter {
    /// Chains `events` onto the log and commits them in one transaction, all or none (see
    /// [`Store::append_events`]). After a failure the head is read afresh next time.
    pub async fn append(&mut self, events: &mut [EventRow]) -> Result<(), StoreError> {
        match &mut self.sqlite {
            Some((conn, head)) => append_sqlite(&self.store, conn, head, events).await,
            None => self.store.append_events(events).await,
        }
    }

    /// A write transaction that changes nothing, committed: fails as an append would if the
    /// store is locked, read-only, full or unreachable.
    pub async fn probe(&mut self) -> Result<(), StoreError> {
        const NO_OP: &str = "UPDATE audit_meta SET max_lifetime = max_lifetime WHERE id = 1";
        let Some((conn, _)) = &mut self.sqlite else {
            let mut tx = self.store.begin_write().await?;
            sqlx::query(NO_OP).execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(());
        };
        let result = sqlx::query(AssertSqlSafe(format!("BEGIN IMMEDIATE; {NO_OP}; COMMIT;")))
            .execute(&mut *conn)
            .await;
        if result.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        }
        result.map(drop).map_err(StoreError::from)
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        if let Some((conn, _)) = self.sqlite {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

impl Store {
    /// Appends events in one transaction, all or none. Each event is chained onto the log's
    /// head as read inside that transaction, which holds the write lock: `seq`, `prev_hash`
    /// and `hash` are filled in here. Several writers (servers and the CLI) therefore never
    /// fork the chain.
    pub async fn append_events(&self, events: &mut [EventRow]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        append_in_tx(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The audit writer's connection (see [`AuditWriter`]).
    pub async fn audit_writer(&self) -> Result<AuditWriter, StoreError> {
        let sqlite = match self.dialect() {
            Dialect::Sqlite => Some((self.connect_sqlite_dedicated().await?, None)),
            Dialect::Postgres => None,
        };
        Ok(AuditWriter {
            store: self.clone(),
            sqlite,
        })
    }

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
