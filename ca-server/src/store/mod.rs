//! The database: the single source of truth for authorities, the bundle sequence and the audit
//! log. SQLite (embedded, WAL) by default; every query is runtime-checked, so no database is
//! needed at build time.

mod audit;
mod authorities;

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr, SqlitePool};

pub use audit::{
    AuditQuery, AuditWriter, Checkpoint, EventKind, EventRow, GENESIS_HASH, Head, Pruned,
    event_hash,
};
pub use authorities::{AuthorityKind, AuthorityRecord, AuthorityState, NewAuthority};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one this build understands.
    #[error("unsupported database URL {0:?}: use sqlite://PATH")]
    UnsupportedUrl(String),
    /// The database could not be opened or queried.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An operation the current state does not allow (the message says why and what to do).
    #[error("{0}")]
    Refused(String),
    /// A row holds a value this version cannot read.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table holding the row.
        table: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    options: SqliteConnectOptions,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("init"),
        MigrationType::Simple,
        include_str!("migrations/0001_init.sql").into_sql_str(),
        false,
    )])
}

fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    if !url.starts_with("sqlite:") {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    }
    Ok(SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a committed audit event survives a power cut, not only a crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true))
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = sqlite_options(url)?.create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A local file needs no liveness ping before each use; the ping is a round trip
            // on every audit commit.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        migrator().run(&pool).await?;
        Ok(Self { pool, options })
    }

    /// Opens an existing database for reading only (the audit commands use this, so they
    /// work on a live server's store and on a copy of it).
    pub async fn open_read_only(url: &str) -> Result<Self, StoreError> {
        let options = sqlite_options(url)?.read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options.clone())
            .await?;
        Ok(Self { pool, options })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(self.pool()).await?;
        Ok(())
    }

    /// A connection outside the pool, with a larger page cache, for a task that keeps it.
    pub(crate) async fn connect_dedicated(&self) -> Result<sqlx::SqliteConnection, StoreError> {
        use sqlx::ConnectOptions;
        // 4 MiB: the pages an append touches (the tail of the table and of each index, and
        // the interior pages above them) stay in memory.
        let options = self
            .options
            .clone()
            .pragma("cache_size", "-4096")
            // A writer holding the lock for long is a fault to report, not to wait out: the
            // requests behind it are waiting for their answers.
            .busy_timeout(Duration::from_millis(500));
        Ok(options.connect().await?)
    }

    /// The connection pool, for the query modules.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection, waiting for them to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `sqlite://<data-dir>/ca.db`, the default database URL.
pub fn default_url(data_dir: &std::path::Path) -> String {
    format!("sqlite://{}", data_dir.join("ca.db").display())
}
