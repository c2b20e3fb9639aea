//! The server's audit writer: a synchronous handle for the one thread that commits the
//! server's events (see [`crate::audit::AuditLog`]).
//!
//! On SQLite it owns a connection of its own, opened directly on the file rather than through
//! sqlx: a commit is then a handful of calls on that thread (begin, one cached prepared insert
//! per event, commit), with no hop to a driver thread and no statement text to build and
//! parse per group. SQLite drops a connection's page cache whenever another connection
//! commits; on a connection of its own the pages an append touches stay cached. It remembers
//! the chain's head between commits; if someone else appended since (the CLI, say), the insert
//! collides with their row (`seq` is the primary key), the transaction rolls back, and the
//! events are chained again onto the head read under the write lock.
//!
//! On PostgreSQL other replicas append all the time, so a remembered head would mostly be
//! stale: each commit takes the write lock and reads the head inside its transaction, through
//! the pool, on the runtime.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use sqlx::sqlite::SqliteConnectOptions;

use super::append::{RAISE_MAX_LIFETIME, insert_sql, link};
use super::{COLUMN_COUNT, Head};
use crate::audit::encoding::GENESIS_HASH;
use crate::audit::event::{EventRow, FieldValue};
use crate::store::{Dialect, Store, StoreError};

/// The head of the chain and the longest lifetime recorded.
const READ_HEAD: &str = "SELECT m.max_lifetime, e.seq, e.hash FROM audit_meta m LEFT JOIN \
     (SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1) e ON 1 = 1 WHERE m.id = 1";

/// A write that changes nothing; committed, it fails as an append would.
const NO_OP: &str = "UPDATE audit_meta SET max_lifetime = max_lifetime WHERE id = 1";

/// The audit writer's connection (see the module's documentation). Used from one thread.
pub struct AuditWriter(Inner);

enum Inner {
    Sqlite {
        conn: Connection,
        insert: String,
        head: Option<Head>,
    },
    Postgres {
        store: Store,
        runtime: tokio::runtime::Handle,
    },
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Sqlite { head, .. } => f
                .debug_struct("AuditWriter")
                .field("dialect", &Dialect::Sqlite)
                .field("head", head)
                .finish(),
            Inner::Postgres { .. } => f
                .debug_struct("AuditWriter")
                .field("dialect", &Dialect::Postgres)
                .finish(),
        }
    }
}

impl Store {
    /// The audit writer's connection. `runtime` runs the PostgreSQL commits; the SQLite
    /// writer does not use it.
    pub fn audit_writer(
        &self,
        runtime: &tokio::runtime::Handle,
    ) -> Result<AuditWriter, StoreError> {
        Ok(AuditWriter(match self.dialect() {
            Dialect::Sqlite => Inner::Sqlite {
                conn: open_sqlite(&self.sqlite_path()?)?,
                insert: insert_sql(1, "INSERT OR ROLLBACK INTO", &mut 0),
                head: None,
            },
            Dialect::Postgres => Inner::Postgres {
                store: self.clone(),
                runtime: runtime.clone(),
            },
        }))
    }

    /// The file a SQLite store's URL names.
    fn sqlite_path(&self) -> Result<PathBuf, StoreError> {
        Ok(SqliteConnectOptions::from_str(&self.url)?
            .get_filename()
            .to_owned())
    }
}

/// Opens the existing database file with the settings every writer has (WAL, FULL sync: a
/// committed event survives a power cut), a short busy timeout (a writer holding the lock
/// for long is a fault to report, not to wait out: requests are waiting for their answers)
/// and a 4 MiB page cache (the tail of the table and of each index, and the interior pages
/// above them, stay in memory).
fn open_sqlite(path: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(500))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA cache_size = -4096;",
    )?;
    Ok(conn)
}

fn read_head(conn: &Connection) -> Result<Head, rusqlite::Error> {
    conn.query_row(READ_HEAD, [], |row| {
        Ok(Head {
            max_lifetime: row.get(0)?,
            seq: row.get::<_, Option<i64>>(1)?.unwrap_or(0),
            hash: row
                .get::<_, Option<String>>(2)?
                .unwrap_or_else(|| GENESIS_HASH.to_owned()),
        })
    })
}

/// One transaction: chains `events` onto `known` (or onto the head read under the lock, if
/// none is known) and commits. Returns the new head; a stale `known` fails on `seq` with a
/// constraint violation, and nothing is written.
fn commit_sqlite(
    conn: &mut Connection,
    insert: &str,
    known: Option<Head>,
    events: &mut [EventRow],
) -> Result<Head, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let before = match known {
        Some(head) => head,
        None => read_head(&tx)?,
    };
    let head = link(events, &before);
    {
        let mut stmt = tx.prepare_cached(insert)?;
        for e in events.iter() {
            bind_row(&mut stmt, e)?;
            stmt.raw_execute()?;
        }
    }
    if head.max_lifetime > before.max_lifetime {
        // `$1`, named, is one parameter however often it appears.
        tx.prepare_cached(RAISE_MAX_LIFETIME)?
            .execute([head.max_lifetime])?;
    }
    tx.commit()?;
    Ok(head)
}

/// Binds one event in the order of the insert's columns.
fn bind_row(stmt: &mut rusqlite::Statement<'_>, e: &EventRow) -> Result<(), rusqlite::Error> {
    stmt.raw_bind_parameter(1, e.seq)?;
    stmt.raw_bind_parameter(2, e.time_ms)?;
    stmt.raw_bind_parameter(3, e.kind.as_str())?;
    let mut at = 4;
    for value in e.values() {
        match value {
            FieldValue::Text(text) => stmt.raw_bind_parameter(at, text)?,
            FieldValue::Int(int) => stmt.raw_bind_parameter(at, int)?,
        }
        at += 1;
    }
    stmt.raw_bind_parameter(at, &e.prev_hash)?;
    stmt.raw_bind_parameter(at + 1, &e.hash)?;
    debug_assert_eq!(at + 1, COLUMN_COUNT);
    Ok(())
}

fn is_conflict(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

impl AuditWriter {
    /// Chains `events` onto the log and commits them in one transaction, all or none (see
    /// [`Store::append_events`]). After a failure the head is read afresh next time.
    pub fn append(&mut self, events: &mut [EventRow]) -> Result<(), StoreError> {
        match &mut self.0 {
            Inner::Sqlite { conn, insert, head } => {
                let known = head.take();
                let retry = known.is_some();
                let new_head = match commit_sqlite(conn, insert, known, events) {
                    // Someone else appended: chain onto the head as read under the lock.
                    Err(e) if retry && is_conflict(&e) => commit_sqlite(conn, insert, None, events),
                    other => other,
                }?;
                *head = Some(new_head);
                Ok(())
            }
            Inner::Postgres { store, runtime } => runtime.block_on(store.append_events(events)),
        }
    }

    /// A write transaction that changes nothing, committed: fails as an append would if the
    /// store is locked, read-only, full or unreachable.
    pub fn probe(&mut self) -> Result<(), StoreError> {
        match &mut self.0 {
            Inner::Sqlite { conn, .. } => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute(NO_OP, [])?;
                tx.commit()?;
                Ok(())
            }
            Inner::Postgres { store, runtime } => runtime.block_on(async {
                let mut tx = store.begin_write().await?;
                sqlx::query(NO_OP).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }),
        }
    }
}
