//! Appending to the audit log: linking events onto the head, and the multi-row inserts of
//! the CLI and of PostgreSQL.

use sqlx::{AnyConnection, AssertSqlSafe};

use super::{COLUMN_COUNT, COLUMNS};
use crate::audit::encoding::{GENESIS_HASH, event_hash};
use crate::audit::event::{EventRow, FieldValue};
use crate::store::{Store, StoreError, column};

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
pub(super) fn link(events: &mut [EventRow], head: &Head) -> Head {
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
pub(super) const RAISE_MAX_LIFETIME: &str = "UPDATE audit_meta SET max_lifetime = \
     CASE WHEN max_lifetime < $1 THEN $1 ELSE max_lifetime END WHERE id = 1";

/// Rows per multi-row INSERT: 25 columns each, well under SQLite's 32,766 variables and
/// PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 512;

/// `<verb> audit_events (…) VALUES ($n, …), …` for `rows` rows, numbering placeholders on
/// from `*bound` (which it advances).
pub(super) fn insert_sql(rows: usize, verb: &str, bound: &mut usize) -> String {
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
}
