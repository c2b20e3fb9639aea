//! Appending to the audit log: linking events onto the head, the multi-row inserts, and the
//! server's writer with its own connection (one round trip per group on SQLite).

use sqlx::{AnyConnection, AssertSqlSafe};

use super::{COLUMN_COUNT, COLUMNS};
use crate::audit::encoding::{GENESIS_HASH, event_hash};
use crate::audit::event::{EventRow, FieldValue};
use crate::store::{Dialect, Store, StoreError, column};

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
pub(in crate::store) async fn append_in_tx(
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

pub(super) async fn insert_row(tx: &mut AnyConnection, e: &EventRow) -> Result<(), StoreError> {
    let sql = insert_sql(1, "INSERT INTO", &mut 0);
    bind_rows(sqlx::query(AssertSqlSafe(sql)), std::slice::from_ref(e))
        .execute(&mut *tx)
        .await?;
    Ok(())
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
}
