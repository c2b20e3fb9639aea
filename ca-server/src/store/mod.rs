//! The database: the single source of truth for authorities, the bundle sequence and the audit
//! log. SQLite (embedded, WAL) by default; every query is runtime-checked, so no database is
//! needed at build time.

mod audit;
mod authorities;
mod bundle_clients;
mod pod_claims;

use std::borrow::Cow;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Executor, SqlSafeStr, Transaction};

pub use audit::{AuditQuery, AuditWriter, Checkpoint, Head, Pruned};
pub use authorities::{
    AuthorityKind, AuthorityRecord, AuthorityState, AuthorityVersion, BundleRows, JwtKeyRecord,
    NewAuthority, NewJwtKey,
};
pub use authorities::{
    Holder, Leaves, NewestByHolder, Standing, TaintedRow, TransitionError, UnexpiredCertificate,
};
pub use bundle_clients::{SeenClient, Sighting, Via};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one this build understands.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://HOST/DATABASE")]
    UnsupportedUrl(String),
    /// The database could not be opened or queried.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The audit writer's own SQLite connection failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A transition of an authority that does not exist (its rule should have refused it).
    #[error("no authority with id {0}")]
    NoSuchAuthority(i64),
    /// A row holds a value this version cannot read.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table holding the row.
        table: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// Which database a store is: the SQL they share is written once, and the few places where
/// they differ ask this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// An embedded SQLite file (WAL): one server, the default.
    Sqlite,
    /// A PostgreSQL database shared by several replicas.
    Postgres,
}

impl Dialect {
    /// The dialect a database URL names.
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }
}

/// The PostgreSQL channel on which authority changes are announced (`NOTIFY`), so that every
/// replica reloads at once rather than at its next poll.
pub const AUTHORITY_CHANNEL: &str = "ca_authorities";

/// The advisory lock every PostgreSQL write transaction takes first: writers queue as they
/// do on SQLite's single write lock, so the audit chain has one head and authority changes
/// never interleave.
const WRITE_LOCK: i64 = 0x6361_2d73_6572_7665; // "ca-serve"

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// The URL, for connections outside the pool (the SQLite audit writer, the PostgreSQL
    /// listener). It may hold a password: never shown.
    url: std::sync::Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// The schema's migrations, in order: a name, then the SQLite and the PostgreSQL text. A
/// schema change is a new line here and a new file in each dialect's directory, never an
/// edit of an old one.
const MIGRATIONS: [(&str, &str, &str); 11] = [
    (
        "init",
        include_str!("migrations/sqlite/0001_init.sql"),
        include_str!("migrations/postgres/0001_init.sql"),
    ),
    (
        "sealed keys",
        include_str!("migrations/sqlite/0002_sealed_keys.sql"),
        include_str!("migrations/postgres/0002_sealed_keys.sql"),
    ),
    (
        "caller and node",
        include_str!("migrations/sqlite/0003_caller_and_node.sql"),
        include_str!("migrations/postgres/0003_caller_and_node.sql"),
    ),
    (
        "requested",
        include_str!("migrations/sqlite/0004_requested.sql"),
        include_str!("migrations/postgres/0004_requested.sql"),
    ),
    (
        "prune anchor",
        include_str!("migrations/sqlite/0005_prune_anchor.sql"),
        include_str!("migrations/postgres/0005_prune_anchor.sql"),
    ),
    (
        "jwt keys",
        include_str!("migrations/sqlite/0006_jwt_keys.sql"),
        include_str!("migrations/postgres/0006_jwt_keys.sql"),
    ),
    (
        "audience",
        include_str!("migrations/sqlite/0007_audience.sql"),
        include_str!("migrations/postgres/0007_audience.sql"),
    ),
    (
        "taint",
        include_str!("migrations/sqlite/0008_taint.sql"),
        include_str!("migrations/postgres/0008_taint.sql"),
    ),
    (
        "bundle clients",
        include_str!("migrations/sqlite/0009_bundle_clients.sql"),
        include_str!("migrations/postgres/0009_bundle_clients.sql"),
    ),
    (
        "pod certificates",
        include_str!("migrations/sqlite/0010_pod_certificates.sql"),
        include_str!("migrations/postgres/0010_pod_certificates.sql"),
    ),
    (
        "undelivered index",
        include_str!("migrations/sqlite/0011_undelivered_index.sql"),
        include_str!("migrations/postgres/0011_undelivered_index.sql"),
    ),
];

fn migrator(dialect: Dialect) -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .into_iter()
            .zip(1..)
            .map(|((name, sqlite, postgres), version)| {
                let sql = match dialect {
                    Dialect::Sqlite => sqlite,
                    Dialect::Postgres => postgres,
                };
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// `url` with SQLite's open mode set (`rwc` creates the file, `ro` only reads).
fn with_sqlite_mode(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode={mode}")
}

/// The SQLite settings of every connection, as pragmas (the `Any` driver takes only a URL):
/// WAL, and FULL sync, so that a committed audit event survives a power cut, not only a crash;
/// a 512 KiB page cache (SQLite's default is 2 MiB a connection; the audit writer, which
/// needs one, has its own, and a walk over the live certificates every few seconds filled
/// each pooled connection's with pages no request reads again).
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -512;";
const SQLITE_READ_ONLY_PRAGMAS: &str = "PRAGMA busy_timeout = 5000;";
/// Settings of every PostgreSQL session: the lock timeout, and no NOTICE chatter (such as
/// "relation already exists, skipping" from the migrator) in the logs.
const POSTGRES_SESSION: &str = "SET lock_timeout = '2s'; SET client_min_messages = warning";

async fn connect_pool(url: &str, dialect: Dialect, read_only: bool) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let options = AnyPoolOptions::new();
    let pool = match dialect {
        Dialect::Sqlite => {
            let pragmas = if read_only {
                SQLITE_READ_ONLY_PRAGMAS
            } else {
                SQLITE_PRAGMAS
            };
            options
                .max_connections(if read_only { 2 } else { 4 })
                // A local file needs no liveness ping before each use.
                .test_before_acquire(false)
                .after_connect(move |conn, _| {
                    Box::pin(async move { conn.execute(pragmas).await.map(drop) })
                })
                .connect(&with_sqlite_mode(url, if read_only { "ro" } else { "rwc" }))
                .await?
        }
        Dialect::Postgres => {
            options
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                // A writer stuck behind another's lock is a fault to report, as SQLite's
                // busy timeout makes it: requests are waiting for their answers.
                .after_connect(|conn, _| {
                    Box::pin(async move { conn.execute(POSTGRES_SESSION).await.map(drop) })
                })
                .connect(url)
                .await?
        }
    };
    Ok(pool)
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let dialect = Dialect::of_url(url)?;
        let pool = connect_pool(url, dialect, false).await?;
        // On PostgreSQL, sqlx's migrator holds an advisory lock while it works, so replicas
        // starting together do not race to create the schema.
        migrator(dialect).run(&pool).await?;
        Ok(Self {
            pool,
            dialect,
            url: url.into(),
        })
    }

    /// Opens an existing database for reading only (the audit commands use this, so they
    /// work on a live server's store and on a copy of it). PostgreSQL connections are
    /// ordinary ones; the commands only read.
    pub async fn open_read_only(url: &str) -> Result<Self, StoreError> {
        let dialect = Dialect::of_url(url)?;
        let pool = connect_pool(url, dialect, true).await?;
        Ok(Self {
            pool,
            dialect,
            url: url.into(),
        })
    }

    /// Which database this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 AS one").execute(self.pool()).await?;
        Ok(())
    }

    /// A write transaction: it holds the database's write lock from its start (SQLite's
    /// `BEGIN IMMEDIATE`; on PostgreSQL an advisory lock every writer takes), so what it
    /// reads stays true until it commits.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        match self.dialect {
            Dialect::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Dialect::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// A read transaction whose statements all see one snapshot.
    pub(crate) async fn begin_read(&self) -> Result<Transaction<'static, Any>, StoreError> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin().await?,
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        })
    }

    /// The announcements of authority changes made by any replica or the CLI. On
    /// PostgreSQL they come through `LISTEN`; on SQLite, where one server owns the file and
    /// polls it, there are none and [`AuthorityChanges::next`] never returns.
    pub async fn authority_changes(&self) -> Result<AuthorityChanges, StoreError> {
        if self.dialect != Dialect::Postgres {
            return Ok(AuthorityChanges { listener: None });
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen(AUTHORITY_CHANNEL).await?;
        Ok(AuthorityChanges {
            listener: Some(listener),
        })
    }

    /// The connection pool, for the query modules.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes every connection, waiting for them to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Announcements that the authorities changed ([`Store::authority_changes`]).
#[derive(Debug)]
pub struct AuthorityChanges {
    listener: Option<sqlx::postgres::PgListener>,
}

impl AuthorityChanges {
    /// None at all: the caller polls.
    pub fn none() -> Self {
        Self { listener: None }
    }

    /// Waits for the next announcement; never returns where there are none. An error means
    /// the announcements stopped (the caller polls from then on).
    pub async fn next(&mut self) -> Result<(), StoreError> {
        let result = match &mut self.listener {
            Some(listener) => listener.recv().await.map(drop).map_err(StoreError::from),
            None => std::future::pending().await,
        };
        if result.is_err() {
            self.listener = None;
        }
        result
    }
}

/// Reads column `name` of `row`.
pub(crate) fn column<T>(row: &AnyRow, name: &str) -> Result<T, StoreError>
where
    T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    use sqlx::Row;
    Ok(row.try_get(name)?)
}

/// A statement built at run time with numbered placeholders (`$1`, `$2`, …), which both
/// SQLite and PostgreSQL read.
#[derive(Default)]
pub(crate) struct DynamicSql {
    pub(crate) text: String,
    pub(crate) binds: Vec<Bind>,
}

/// A value bound to a [`DynamicSql`].
pub(crate) enum Bind {
    Text(String),
    Int(i64),
}

impl DynamicSql {
    /// Binds `value` and returns its placeholder.
    pub(crate) fn bind(&mut self, value: Bind) -> String {
        self.binds.push(value);
        format!("${}", self.binds.len())
    }

    /// The query, every value bound. The text must come from fixed fragments and
    /// placeholders only.
    pub(crate) fn query(self) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.text));
        for b in self.binds {
            q = match b {
                Bind::Text(s) => q.bind(s),
                Bind::Int(i) => q.bind(i),
            };
        }
        q
    }
}

/// `sqlite://<data-dir>/ca.db`, the default database URL.
pub fn default_url(data_dir: &std::path::Path) -> String {
    format!("sqlite://{}", data_dir.join("ca.db").display())
}
