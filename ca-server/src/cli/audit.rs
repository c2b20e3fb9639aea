//! `ca-server audit list|verify`: read the audit log straight from the database (read-only),
//! so it works on a live server's store and on a copy of it.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Common;
use crate::audit::{VerifyReport, verify_chain};
use crate::store::{AuditQuery, EventKind, EventRow, Store};

/// Output formats of `audit list`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// Aligned columns for a person
    Table,
    /// One JSON object per line
    Json,
    /// Comma-separated, with a header
    Csv,
}

/// Event kinds a filter can name.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Issued,
    Denied,
    Authority,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List events, newest first
    List {
        /// Only this SPIFFE ID
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
        /// Only this kind of event
        #[arg(long, value_enum)]
        kind: Option<Kind>,
        /// Only events at or after this time (RFC 3339)
        #[arg(long)]
        since: Option<String>,
        /// Only events at or before this time (RFC 3339)
        #[arg(long)]
        until: Option<String>,
        /// At most this many events
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Output format
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Recompute the hash chain and report the first event that breaks it
    Verify,
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<i64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        anyhow::anyhow!("{flag} {text:?} is not an RFC 3339 time (e.g. 2026-11-23T16:00:00Z): {e}")
    })?;
    Ok(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
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
        .with_context(|| format!("opening {}", common.database_url))
}

/// Runs an `audit` subcommand.
pub async fn audit(cmd: AuditCommand, common: &Common) -> anyhow::Result<ExitCode> {
    let store = open(common).await?;
    match cmd {
        AuditCommand::List {
            spiffe_id,
            namespace,
            service_account,
            serial,
            kind,
            since,
            until,
            limit,
            format,
        } => {
            if limit <= 0 {
                anyhow::bail!("--limit must be a positive number");
            }
            let serial = match serial {
                Some(s) => {
                    let s = s.replace(':', "").to_ascii_lowercase();
                    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                        anyhow::bail!("--serial {s:?} is not hexadecimal");
                    }
                    Some(s)
                }
                None => None,
            };
            let query = AuditQuery {
                spiffe_id,
                namespace,
                service_account,
                serial,
                kind: kind.map(|k| match k {
                    Kind::Issued => EventKind::Issued,
                    Kind::Denied => EventKind::Denied,
                    Kind::Authority => EventKind::Authority,
                }),
                since_ms: since.map(|t| parse_time("--since", &t)).transpose()?,
                until_ms: until.map(|t| parse_time("--until", &t)).transpose()?,
                before_seq: None,
                limit: Some(limit),
            };
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
        AuditCommand::Verify => match verify_chain(&store).await? {
            VerifyReport::Intact { events, head } => {
                println!("audit log intact: {events} events, head {head}");
                Ok(ExitCode::SUCCESS)
            }
            VerifyReport::Broken { seq, problem } => {
                println!("audit log BROKEN at event {seq}: {problem}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

fn rfc3339_secs(secs: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// Event times: RFC 3339, UTC, always three fractional digits.
fn rfc3339_ms(ms: i64) -> Option<String> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
}

/// The keys of DESIGN.md, in its order.
const KEYS: [&str; 22] = [
    "seq",
    "time",
    "kind",
    "spiffe_id",
    "namespace",
    "service_account",
    "pod_name",
    "pod_uid",
    "token_issuer",
    "serial",
    "not_before",
    "not_after",
    "authority_id",
    "public_key_sha256",
    "csr_sha256",
    "peer",
    "code",
    "reason",
    "count",
    "operator",
    "hash",
    "prev_hash",
];

fn values(e: &EventRow) -> [serde_json::Value; 22] {
    use serde_json::Value;
    let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    let i = |v: Option<i64>| v.map_or(Value::Null, Value::from);
    [
        Value::from(e.seq),
        rfc3339_ms(e.time_ms).map_or(Value::Null, Value::String),
        Value::String(e.kind.as_str().to_owned()),
        s(&e.spiffe_id),
        s(&e.namespace),
        s(&e.service_account),
        s(&e.pod_name),
        s(&e.pod_uid),
        s(&e.token_issuer),
        s(&e.serial),
        e.not_before
            .and_then(rfc3339_secs)
            .map_or(Value::Null, Value::String),
        e.not_after
            .and_then(rfc3339_secs)
            .map_or(Value::Null, Value::String),
        i(e.authority_id),
        s(&e.public_key_sha256),
        s(&e.csr_sha256),
        s(&e.peer),
        s(&e.code),
        s(&e.reason),
        i(e.count),
        s(&e.operator),
        Value::String(e.hash.clone()),
        Value::String(e.prev_hash.clone()),
    ]
}

fn to_json(e: &EventRow) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        KEYS.iter().map(|k| k.to_string()).zip(values(e)).collect();
    serde_json::Value::Object(map).to_string()
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn write_csv(out: &mut impl Write, events: &[EventRow]) -> std::io::Result<()> {
    writeln!(out, "{}", KEYS.join(","))?;
    for e in events {
        let row: Vec<String> = values(e)
            .iter()
            .map(|v| {
                let s = plain(v);
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
            [
                e.seq.to_string(),
                rfc3339_ms(e.time_ms).unwrap_or_default(),
                e.kind.as_str().to_owned(),
                e.spiffe_id.clone().unwrap_or_else(|| "-".into()),
                e.serial.clone().unwrap_or_else(|| "-".into()),
                e.not_after
                    .and_then(rfc3339_secs)
                    .unwrap_or_else(|| "-".into()),
                e.code.clone().unwrap_or_else(|| "-".into()),
                e.reason.clone().unwrap_or_default(),
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
