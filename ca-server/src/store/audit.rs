//! Queries behind the audit log.

use std::fmt;
use std::str::FromStr;

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};

/// What kind of decision an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A certificate was issued.
    Issued,
    /// A request was refused.
    Denied,
    /// An authority changed state.
    Authority,
    /// The start of a pruned log: records the hash the chain continues from.
    Anchor,
    /// A retention prune (chained like any other event).
    Prune,
}

impl EventKind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Denied => "denied",
            Self::Authority => "authority",
            Self::Anchor => "anchor",
            Self::Prune => "prune",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "issued" => Ok(Self::Issued),
            "denied" => Ok(Self::Denied),
            "authority" => Ok(Self::Authority),
            "anchor" => Ok(Self::Anchor),
            "prune" => Ok(Self::Prune),
            other => Err(format!(
                "unknown event kind {other:?} (expected issued, denied, authority or prune)"
            )),
        }
    }
}

/// One audit event as stored. Field order is the canonical encoding's order (see
/// [`event_hash`]), so do not reorder fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRow {
    /// Position in the log, from 1.
    pub seq: i64,
    /// When the decision was made, unix milliseconds.
    pub time_ms: i64,
    /// What kind of decision.
    pub kind: EventKind,
    /// The identity issued or asked for.
    pub spiffe_id: Option<String>,
    /// The caller's namespace.
    pub namespace: Option<String>,
    /// The caller's service account.
    pub service_account: Option<String>,
    /// The caller's pod, from the token's `kubernetes.io` claim.
    pub pod_name: Option<String>,
    /// The caller's pod uid.
    pub pod_uid: Option<String>,
    /// The issuer (`iss`) of the caller's token.
    pub token_issuer: Option<String>,
    /// The certificate's serial, lowercase hex.
    pub serial: Option<String>,
    /// The certificate's notBefore, unix seconds.
    pub not_before: Option<i64>,
    /// The certificate's notAfter, unix seconds.
    pub not_after: Option<i64>,
    /// The authority that signed (or changed).
    pub authority_id: Option<i64>,
    /// SHA-256 of the certified public key (SubjectPublicKeyInfo DER), hex.
    pub public_key_sha256: Option<String>,
    /// SHA-256 of the CSR's DER, hex.
    pub csr_sha256: Option<String>,
    /// The caller's address.
    pub peer: Option<String>,
    /// The gRPC code of a refusal, e.g. `UNAUTHENTICATED`.
    pub code: Option<String>,
    /// Why: the refusal's message, or what an authority event did.
    pub reason: Option<String>,
    /// How many refusals this event stands for, when aggregated.
    pub count: Option<i64>,
    /// The OS user behind an authority change.
    pub operator: Option<String>,
    /// The hash of the previous event (or of the anchor), hex.
    #[serde(skip)]
    pub prev_hash: String,
    /// SHA-256 over `prev_hash` and this event's canonical encoding, hex.
    #[serde(skip)]
    pub hash: String,
}

/// Filters of `audit list` (and of the gRPC audit service, later). Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact namespace.
    pub namespace: Option<String>,
    /// Exact service account.
    pub service_account: Option<String>,
    /// Exact serial, lowercase hex.
    pub serial: Option<String>,
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

const COLUMNS: &str = "seq, time_ms, kind, spiffe_id, namespace, service_account, pod_name, \
     pod_uid, token_issuer, serial, not_before, not_after, authority_id, public_key_sha256, \
     csr_sha256, peer, code, reason, count, operator, prev_hash, hash";

fn event_from_row(row: &SqliteRow) -> Result<EventRow, StoreError> {
    let kind: String = row.try_get("kind")?;
    Ok(EventRow {
        seq: row.try_get("seq")?,
        time_ms: row.try_get("time_ms")?,
        kind: kind.parse().map_err(|detail| StoreError::Corrupt {
            table: "audit_events",
            detail,
        })?,
        spiffe_id: row.try_get("spiffe_id")?,
        namespace: row.try_get("namespace")?,
        service_account: row.try_get("service_account")?,
        pod_name: row.try_get("pod_name")?,
        pod_uid: row.try_get("pod_uid")?,
        token_issuer: row.try_get("token_issuer")?,
        serial: row.try_get("serial")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        authority_id: row.try_get("authority_id")?,
        public_key_sha256: row.try_get("public_key_sha256")?,
        csr_sha256: row.try_get("csr_sha256")?,
        peer: row.try_get("peer")?,
        code: row.try_get("code")?,
        reason: row.try_get("reason")?,
        count: row.try_get("count")?,
        operator: row.try_get("operator")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// The canonical encoding of an event: its fields as JSON, in declaration order, without the
/// two hashes. The order and names are fixed by [`EventRow`]; changing either breaks every
/// existing chain, so it needs a new encoding version, not an edit.
fn canonical_encoding(event: &EventRow) -> Vec<u8> {
    // Serializing a struct of strings and integers cannot fail.
    serde_json::to_vec(event).unwrap_or_default()
}

/// `hex(SHA-256(prev_hash as hex text || "\n" || canonical encoding))`: each event's hash
/// covers the previous event's hash and its own contents.
pub fn event_hash(event: &EventRow) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(event.prev_hash.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical_encoding(event));
    hex::encode(hasher.finalize())
}

/// The `prev_hash` of the first event of a log.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl EventRow {
    /// An event of `kind` made now, every optional field empty; the log fills in `seq` and
    /// the hashes when it commits.
    pub fn new(kind: EventKind) -> Self {
        let time_ms =
            i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
                .unwrap_or(i64::MAX);
        Self {
            seq: 0,
            time_ms,
            kind,
            spiffe_id: None,
            namespace: None,
            service_account: None,
            pod_name: None,
            pod_uid: None,
            token_issuer: None,
            serial: None,
            not_before: None,
            not_after: None,
            authority_id: None,
            public_key_sha256: None,
            csr_sha256: None,
            peer: None,
            code: None,
            reason: None,
            count: None,
            operator: None,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
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

async fn read_head(tx: &mut sqlx::SqliteConnection) -> Result<Head, StoreError> {
    let row = sqlx::query(
        "SELECT (SELECT max_lifetime FROM audit_meta WHERE id = 1) AS max_lifetime, \
         seq, hash FROM (SELECT 0 AS seq, ? AS hash UNION ALL \
         SELECT seq, hash FROM audit_events) ORDER BY seq DESC LIMIT 1",
    )
    .bind(GENESIS_HASH)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Head {
        seq: row.try_get("seq")?,
        hash: row.try_get("hash")?,
        max_lifetime: row.try_get("max_lifetime")?,
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
    tx: &mut sqlx::SqliteConnection,
    events: &mut [EventRow],
) -> Result<Head, StoreError> {
    let before = read_head(tx).await?;
    let head = link(events, &before);
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let (sql, _) = insert_sql(chunk.len());
        bind_rows(sqlx::query(AssertSqlSafe(sql)), chunk)
            .execute(&mut *tx)
            .await?;
    }
    if head.max_lifetime > before.max_lifetime {
        sqlx::query("UPDATE audit_meta SET max_lifetime = MAX(max_lifetime, ?) WHERE id = 1")
            .bind(head.max_lifetime)
            .execute(&mut *tx)
            .await?;
    }
    Ok(head)
}

/// Rows per multi-row INSERT: 22 columns each, well under SQLite's 32,766 variables.
const ROWS_PER_INSERT: usize = 512;

/// `INSERT OR ROLLBACK INTO audit_events (…) VALUES (?, …), …` for `rows` rows, and its bind
/// count. A conflict (a stale head: someone else appended) rolls back the whole transaction,
/// which is what the writer wants anyway; and with nothing to undo statement by statement,
/// SQLite keeps no statement journal, a page copy per touched page on every commit.
fn insert_sql(rows: usize) -> (String, usize) {
    let mut sql = format!("INSERT OR ROLLBACK INTO audit_events ({COLUMNS}) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    (sql, rows * 22)
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds `rows` in the order of [`insert_sql`]'s columns.
fn bind_rows<'q>(mut query: Query<'q>, rows: &'q [EventRow]) -> Query<'q> {
    for e in rows {
        query = query
            .bind(e.seq)
            .bind(e.time_ms)
            .bind(e.kind.as_str())
            .bind(&e.spiffe_id)
            .bind(&e.namespace)
            .bind(&e.service_account)
            .bind(&e.pod_name)
            .bind(&e.pod_uid)
            .bind(&e.token_issuer)
            .bind(&e.serial)
            .bind(e.not_before)
            .bind(e.not_after)
            .bind(e.authority_id)
            .bind(&e.public_key_sha256)
            .bind(&e.csr_sha256)
            .bind(&e.peer)
            .bind(&e.code)
            .bind(&e.reason)
            .bind(e.count)
            .bind(&e.operator)
            .bind(&e.prev_hash)
            .bind(&e.hash);
    }
    query
}

async fn insert_row(tx: &mut sqlx::SqliteConnection, e: &EventRow) -> Result<(), StoreError> {
    let (sql, _) = insert_sql(1);
    bind_rows(sqlx::query(AssertSqlSafe(sql)), std::slice::from_ref(e))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn checkpoint_from_row(r: &SqliteRow) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        time_ms: r.try_get("time_ms")?,
        public_key: r.try_get("public_key")?,
        signature: r.try_get("signature")?,
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

/// A value bound to a dynamically built query.
enum Bind {
    Text(String),
    Int(i64),
}

/// [`Store::append_events_after`] on `conn`.
async fn append_on(
    conn: &mut sqlx::SqliteConnection,
    head: &mut Option<Head>,
    events: &mut [EventRow],
) -> Result<(), StoreError> {
    // Without a remembered head, read it outside the transaction: if another writer appends
    // before ours begins, our first row collides with theirs on seq and nothing is written.
    let known = match head.take() {
        Some(known) => known,
        None => read_head(conn).await?,
    };
    let new_head = link(events, &known);
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for chunk in events.chunks(ROWS_PER_INSERT) {
        sql.push_str(&insert_sql(chunk.len()).0);
        sql.push(';');
    }
    if new_head.max_lifetime > known.max_lifetime {
        sql.push_str(&format!(
            "UPDATE audit_meta SET max_lifetime = MAX(max_lifetime, {}) WHERE id = 1;",
            new_head.max_lifetime
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
            Err(e.into())
        }
    }
}

/// The audit writer's own connection and the chain head it remembers between commits. A
/// pooled connection would do, but SQLite drops a connection's page cache whenever another
/// connection commits; on a connection of its own the pages a commit touches stay cached.
pub struct AuditWriter {
    conn: sqlx::SqliteConnection,
    head: Option<Head>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("head", &self.head)
            .finish()
    }
}

impl AuditWriter {
    /// Chains `events` onto the log and commits them in one transaction, all or none (see
    /// [`Store::append_events_after`]). After a failure the head is read afresh next time.
    pub async fn append(&mut self, events: &mut [EventRow]) -> Result<(), StoreError> {
        append_on(&mut self.conn, &mut self.head, events).await
    }

    /// A write transaction that changes nothing, committed: fails as an append would if the
    /// store is locked, read-only or full.
    pub async fn probe(&mut self) -> Result<(), StoreError> {
        let result = sqlx::query(
            "BEGIN IMMEDIATE; UPDATE audit_meta SET max_lifetime = max_lifetime WHERE id = 1; \
             COMMIT;",
        )
        .execute(&mut self.conn)
        .await;
        if result.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        }
        result.map(drop).map_err(StoreError::from)
    }

    /// Closes the connection cleanly.
    pub async fn close(self) {
        let _ = sqlx::Connection::close(self.conn).await;
    }
}

impl Store {
    /// Appends events in one transaction, all or none. Each event is chained onto the log's
    /// head as read inside that (immediate, so exclusive) transaction: `seq`, `prev_hash` and
    /// `hash` are filled in here. Several writers (a server and the CLI) therefore never fork
    /// the chain.
    pub async fn append_events(&self, events: &mut [EventRow]) -> Result<(), StoreError> {
        self.append_events_after(&mut None, events).await
    }

    /// [`Store::append_events`] for a writer that remembers the head between commits (`head`,
    /// `None` at first). With a remembered head the whole transaction (begin, insert,
    /// commit) is one statement list, one round trip to SQLite's thread: the cost of a group
    /// commit stays that of one write. If someone else appended since (the CLI, say), the
    /// insert collides with their row (seq is the primary key) and fails; `head` is then
    /// forgotten, and a retry reads it afresh.
    pub async fn append_events_after(
        &self,
        head: &mut Option<Head>,
        events: &mut [EventRow],
    ) -> Result<(), StoreError> {
        let mut conn = self.pool().acquire().await?;
        append_on(&mut conn, head, events).await
    }

    /// A connection of its own for the audit writer (see [`AuditWriter`]).
    pub async fn audit_writer(&self) -> Result<AuditWriter, StoreError> {
        Ok(AuditWriter {
            conn: self.connect_dedicated().await?,
            head: None,
        })
    }

    /// The last event's sequence number and hash, if the log is not empty.
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| Ok((r.try_get("seq")?, r.try_get("hash")?)))
            .transpose()
    }

    /// Events matching `query`, newest first.
    pub async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<EventRow>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM audit_events WHERE 1 = 1");
        let mut binds = Vec::new();
        let mut text = |sql: &mut String, column: &str, value: &Option<String>| {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                binds.push(Bind::Text(v.clone()));
            }
        };
        text(&mut sql, "spiffe_id", &query.spiffe_id);
        text(&mut sql, "namespace", &query.namespace);
        text(&mut sql, "service_account", &query.service_account);
        text(&mut sql, "serial", &query.serial);
        // kind and authority_id have few distinct values: next to a selective filter, their
        // indexes would make SQLite walk most of the log, so `+` keeps it off them (the
        // planner has no statistics on a read-only copy of the store).
        let selective = query.spiffe_id.is_some()
            || query.namespace.is_some()
            || query.service_account.is_some()
            || query.serial.is_some()
            || query.valid_at.is_some();
        let weak = if selective { "+" } else { "" };
        text(
            &mut sql,
            &format!("{weak}kind"),
            &query.kind.map(|k| k.as_str().to_owned()),
        );
        if let Some(t) = query.valid_at {
            // Bounded by the longest lifetime in the log, so the notBefore index does the work.
            sql.push_str(
                " AND +kind = 'issued' AND not_before <= ? AND not_after >= ? \
                 AND not_before >= ? - (SELECT max_lifetime FROM audit_meta WHERE id = 1)",
            );
            binds.push(Bind::Int(t));
            binds.push(Bind::Int(t));
            binds.push(Bind::Int(t));
        }
        let authority = if selective {
            " AND +authority_id = ?"
        } else {
            " AND authority_id = ?"
        };
        for (clause, value) in [
            (authority, query.authority_id),
            (" AND time_ms >= ?", query.since_ms),
            (" AND time_ms <= ?", query.until_ms),
            (" AND seq < ?", query.before_seq),
        ] {
            if let Some(v) = value {
                sql.push_str(clause);
                binds.push(Bind::Int(v));
            }
        }
        sql.push_str(" ORDER BY seq DESC");
        if let Some(limit) = query.limit {
            sql.push_str(" LIMIT ?");
            binds.push(Bind::Int(limit));
        }
        // The SQL text is built only from the fixed fragments above; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for b in binds {
            q = match b {
                Bind::Text(s) => q.bind(s),
                Bind::Int(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(self.pool()).await?;
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
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        // The newest event older than the cut; never the head, so the log never empties.
        let last = sqlx::query(
            "SELECT seq, hash, time_ms FROM audit_events WHERE time_ms < ? \
             AND seq < (SELECT MAX(seq) FROM audit_events) ORDER BY seq DESC LIMIT 1",
        )
        .bind(before_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(last) = last else {
            return Ok(None);
        };
        let seq: i64 = last.try_get("seq")?;
        let hash: String = last.try_get("hash")?;
        let time_ms: i64 = last.try_get("time_ms")?;
        let removed: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM audit_events WHERE seq <= ? AND kind != 'anchor'",
        )
        .bind(seq)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        sqlx::query("DELETE FROM audit_events WHERE seq <= ?")
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
            "INSERT OR REPLACE INTO audit_checkpoints (seq, hash, time_ms, public_key, signature) \
             VALUES (?, ?, ?, ?, ?)",
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
             WHERE seq >= ? AND seq <= ? ORDER BY seq",
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
        let sql = format!("SELECT {COLUMNS} FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?");
        // Fixed text: COLUMNS is a constant.
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after_seq)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(event_from_row).collect()
    }
}
