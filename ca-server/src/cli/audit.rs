//! `ca-server audit list|verify`: read the audit log straight from the database (read-only),
//! so it works on a live server's store and on a copy of it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Common;
use crate::audit::render::{KEYS, rfc3339_ms, rfc3339_secs, to_json, values};
use crate::audit::{
    AuditKey, FilterError, Filters, TrustedKeys, VerifyReport, operator_name, record_checkpoint,
    verify_chain,
};
use crate::audit::{EventKind, EventRow};
use crate::store::{AuditQuery, Checkpoint, Store};

/// Output formats of `audit list`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum Format {
    /// Aligned columns for a person
    Table,
    /// One JSON object per line
    Json,
    /// Comma-separated, with a header
    Csv,
}

/// Event kinds on the command line: those a filter may name, with the log's own words.
impl ValueEnum for EventKind {
    fn value_variants<'a>() -> &'a [Self] {
        &EventKind::LISTED
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()).help(self.describe()))
    }
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// List events, newest first
    List {
        /// Only this SPIFFE ID: the identity issued or asked for, or the caller's (a node
        /// proxy asking for its pods' identities)
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only this namespace
        #[arg(long)]
        namespace: Option<String>,
        /// Only this service account
        #[arg(long)]
        service_account: Option<String>,
        /// Only this serial (hex; colons and case are ignored)
        #[arg(long)]
        serial: Option<String>,
        /// Only callers on this Kubernetes node (from their tokens)
        #[arg(long)]
        node: Option<String>,
        /// Only this kind of event
        #[arg(long, value_enum)]
        kind: Option<EventKind>,
        /// Only events at or after this time (RFC 3339)
        #[arg(long)]
        since: Option<String>,
        /// Only events at or before this time (RFC 3339)
        #[arg(long)]
        until: Option<String>,
        /// Only events about this authority (issuances it signed, changes to it)
        #[arg(long)]
        authority: Option<i64>,
        /// Only certificates that were valid at this moment (RFC 3339)
        #[arg(long)]
        valid_at: Option<String>,
        /// At most this many events
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Output format
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Every field of the event(s) for one serial, and whether that certificate is valid now
    Show {
        /// The certificate's serial (hex; colons and case are ignored)
        serial: String,
    },
    /// Recompute the hash chain and report the first event that breaks it
    Verify {
        /// Also check the log against a checkpoint exported earlier (`audit checkpoint`)
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Also trust checkpoints signed by this public key (`audit key` of another replica);
        /// repeatable. The data dir's own audit key is always trusted; a checkpoint under any
        /// other key is reported as tampering
        #[arg(long = "trusted-audit-key", value_name = "FILE")]
        trusted_audit_keys: Vec<PathBuf>,
    },
    /// Print the latest signed checkpoint (one JSON line) for safekeeping elsewhere
    Checkpoint {
        /// Sign and record a checkpoint of the current head first
        #[arg(long)]
        now: bool,
        /// Also trust checkpoints signed by this public key; repeatable (see `audit verify`).
        /// A checkpoint under a key not trusted is never exported
        #[arg(long = "trusted-audit-key", value_name = "FILE")]
        trusted_audit_keys: Vec<PathBuf>,
    },
    /// Print this server's audit public key (PEM), for other replicas and auditors to pin
    /// with --trusted-audit-key
    Key,
    /// Remove events older than a time, keeping the chain verifiable
    Prune {
        /// Remove events before this time (RFC 3339)
        #[arg(long)]
        before: String,
    },
}

/// Names a filter as the command line spells it.
fn flag_error(e: FilterError) -> anyhow::Error {
    anyhow::anyhow!("--{e}")
}

/// Opens the store read-only, with a clear error if there is none.
pub(super) async fn open(common: &Common) -> anyhow::Result<Store> {
    if let Some(path) = common.database_url.strip_prefix("sqlite://")
        && !std::path::Path::new(path).exists()
    {
        anyhow::bail!(
            "no database at {path}: point --data-dir or --database-url at a server's store"
        );
    }
    Store::open_read_only(&common.database_url)
        .await
        .with_context(|| format!("opening {}", crate::store::redact_url(&common.database_url)))
}

/// Runs an `audit` subcommand.
pub(super) async fn audit(cmd: AuditCommand, common: &Common) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::List {
            spiffe_id,
            namespace,
            service_account,
            serial,
            node,
            kind,
            since,
            until,
            authority,
            valid_at,
            limit,
            format,
        } => {
            let filters = Filters {
                spiffe_id,
                namespace,
                service_account,
                serial,
                node,
                kind: kind.map(|k| k.as_str().to_owned()),
                since,
                until,
                authority,
                valid_at,
            };
            list(common, &filters, limit, format).await
        }
        AuditCommand::Show { serial } => show(&open(common).await?, &serial).await,
        AuditCommand::Verify {
            checkpoint,
            trusted_audit_keys,
        } => verify(common, checkpoint.as_deref(), trusted_audit_keys).await,
        AuditCommand::Checkpoint {
            now,
            trusted_audit_keys,
        } => checkpoint(common, now, trusted_audit_keys).await,
        AuditCommand::Key => {
            if !AuditKey::path(&common.data_dir).exists() {
                anyhow::bail!(
                    "no audit key at {}: a server makes one on its first start",
                    AuditKey::path(&common.data_dir).display()
                );
            }
            let key = AuditKey::load_or_create(&common.data_dir)?;
            print!("{}", key.public_key_pem());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune { before } => prune(common, &before).await,
    }
}

/// `audit list`.
async fn list(
    common: &Common,
    filters: &Filters,
    limit: i64,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let query = filters.to_query(limit, None).map_err(flag_error)?;
    let store = open(common).await?;
    let events = store.audit_events(&query).await?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for e in &events {
                writeln!(out, "{}", to_json(e))?;
            }
        }
        Format::Csv => write_csv(&mut out, &events)?,
        Format::Table => write_table(&mut out, &events)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit verify`: the chain, every stored checkpoint, and the exported one if given.
async fn verify(
    common: &Common,
    checkpoint: Option<&std::path::Path>,
    trusted_audit_keys: Vec<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let trusted = trusted_keys(common, trusted_audit_keys)?;
    let exported = match checkpoint {
        Some(path) => {
            let text = super::read_text(path, "--checkpoint")?;
            let cp: Checkpoint = serde_json::from_str(text.trim()).with_context(|| {
                format!(
                    "--checkpoint {}: not a checkpoint from `audit checkpoint`",
                    path.display()
                )
            })?;
            Some(cp)
        }
        None => None,
    };
    let store = open(common).await?;
    match verify_chain(&store, exported.as_ref(), &trusted).await? {
        VerifyReport::Intact {
            events,
            first,
            head_seq,
            head,
            checkpoints,
        } => {
            println!(
                "audit log intact: {events} events ({first}..{head_seq}), head {head}, \
                 {checkpoints} signed checkpoint(s) agree"
            );
            Ok(ExitCode::SUCCESS)
        }
        VerifyReport::Broken { seq, problem } => {
            println!("audit log BROKEN at event {seq}: {problem}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `audit checkpoint`: the latest signed head (signed now with `--now`), if a trusted key
/// signed it.
async fn checkpoint(
    common: &Common,
    now: bool,
    trusted_audit_keys: Vec<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if now {
        let store = super::open_store(common).await?;
        let key = AuditKey::load_or_create(&common.data_dir)?;
        record_checkpoint(&store, &key).await?;
    }
    let trusted = trusted_keys(common, trusted_audit_keys)?;
    let store = open(common).await?;
    match store.latest_checkpoint().await? {
        Some(cp) if !trusted.trusts(&cp) => anyhow::bail!(
            "the latest checkpoint (event {}) is signed by audit key {}, which is not \
             trusted (trusted: {}); it is not exported: run `audit verify`, and pin \
             another replica's key with --trusted-audit-key",
            cp.seq,
            crate::untrusted::claim(&cp.public_key),
            trusted.describe()
        ),
        Some(cp) => {
            println!("{}", serde_json::to_string(&cp)?);
            Ok(ExitCode::SUCCESS)
        }
        None => anyhow::bail!(
            "no checkpoint yet: a running server signs one every minute; \
             `audit checkpoint --now` signs one at once"
        ),
    }
}

/// `audit prune --before TIME`.
async fn prune(common: &Common, before: &str) -> anyhow::Result<ExitCode> {
    let cut = OffsetDateTime::parse(before, &Rfc3339).map_err(|_| {
        anyhow::anyhow!("--before {before:?} is not an RFC 3339 time (e.g. 2026-01-01T00:00:00Z)")
    })?;
    let store = super::open_store(common).await?;
    let mut event = EventRow::new(EventKind::Prune);
    event.operator = Some(operator_name());
    event.reason = Some(format!("pruned the events before {before}"));
    let cut_ms = crate::rfc3339::unix_ms(cut);
    match store.prune_before(cut_ms, event).await? {
        Some(pruned) => {
            let key = AuditKey::load_or_create(&common.data_dir)?;
            record_checkpoint(&store, &key).await?;
            println!(
                "pruned {} event(s) up to event {}; the chain continues from {}",
                pruned.removed, pruned.anchor_seq, pruned.anchor_hash
            );
        }
        None => println!("nothing to prune: no event before {before}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The keys whose checkpoints are believed: the data dir's own, those given with
/// `--trusted-audit-key`, and those in the config file's `trusted_audit_key`.
fn trusted_keys(common: &Common, mut files: Vec<PathBuf>) -> anyhow::Result<TrustedKeys> {
    files.extend(common.file.trusted_audit_key.iter().flatten().cloned());
    Ok(TrustedKeys::load(&common.data_dir, &files)?)
}

/// `audit show SERIAL`.
async fn show(store: &Store, serial: &str) -> anyhow::Result<ExitCode> {
    let serial = crate::audit::query::normalize_serial(serial).map_err(flag_error)?;
    let query = AuditQuery {
        serial: Some(serial.clone()),
        limit: Some(100),
        ..AuditQuery::default()
    };
    let events = store.audit_events(&query).await?;
    if events.is_empty() {
        anyhow::bail!("no event has serial {serial}: this CA did not issue it (or it was pruned)");
    }
    let authorities = store.authorities().await?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let width = KEYS.iter().map(|k| k.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for e in &events {
        for (key, value) in KEYS.iter().zip(values(e).iter()) {
            writeln!(out, "{key:<width$}  {}", printable(value))?;
        }
        if e.kind == EventKind::Issued {
            let status = match (e.not_before, e.not_after) {
                (Some(nb), _) if now < nb => "not yet valid".to_owned(),
                (_, Some(na)) if now > na => format!("expired {} ago", human(now - na)),
                (_, Some(na)) => format!("valid, {} left", human(na - now)),
                _ => "unknown".to_owned(),
            };
            writeln!(out, "{:<width$}  {status}", "status")?;
            if let Some(a) = e
                .authority_id
                .and_then(|id| authorities.iter().find(|a| a.id == id))
            {
                writeln!(
                    out,
                    "{:<width$}  authority {} ({}), now {}",
                    "signed_by",
                    a.id,
                    crate::untrusted::escape(&a.subject),
                    a.state
                )?;
            }
        }
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A span of seconds for a person: `3d 4h`, `2h 5m`, `45s`.
fn human(secs: i64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A value as text, exactly as stored (for CSV, which quotes it).
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value for a terminal: control characters escaped, so that what a peer put in a record
/// (a claimed identity, a reason quoting its request) cannot move the cursor, recolour the
/// screen or hide part of a line.
fn printable(v: &serde_json::Value) -> String {
    crate::untrusted::escape(&plain(v)).into_owned()
}

fn write_csv(out: &mut impl Write, events: &[EventRow]) -> std::io::Result<()> {
    writeln!(out, "{}", KEYS.join(","))?;
    for e in events {
        let row: Vec<String> = values(e)
            .iter()
            .map(|v| {
                // A spreadsheet would run a cell that starts like a formula.
                let s = crate::untrusted::csv_safe(&plain(v)).into_owned();
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s
                }
            })
            .collect();
        writeln!(out, "{}", row.join(","))?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, events: &[EventRow]) -> std::io::Result<()> {
    let header = [
        "SEQ",
        "TIME",
        "KIND",
        "SPIFFE ID",
        "SERIAL",
        "NOT AFTER",
        "CODE",
        "REASON",
    ];
    let rows: Vec<[String; 8]> = events
        .iter()
        .map(|e| {
            let text = |v: &Option<String>| {
                v.as_deref().map_or_else(
                    || "-".to_owned(),
                    |s| crate::untrusted::escape(s).into_owned(),
                )
            };
            [
                e.seq.to_string(),
                rfc3339_ms(e.time_ms).unwrap_or_default(),
                e.kind.as_str().to_owned(),
                text(&e.spiffe_id),
                text(&e.serial),
                e.not_after
                    .and_then(rfc3339_secs)
                    .unwrap_or_else(|| "-".into()),
                text(&e.code),
                crate::untrusted::escape(e.reason.as_deref().unwrap_or_default()).into_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == cells.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(&header.map(String::from)))?;
    for row in &rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}
