//! `ca-server root status|prepare|activate|taint|retire`: the authority lifecycle, acting on the
//! store directly. Running servers notice within 2 seconds.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use time::OffsetDateTime;

use super::Common;
use crate::audit::{AuditKey, operator_name, record_checkpoint};
use crate::audit::{EventKind, EventRow};
use crate::authority::convergence::Convergence;
use crate::authority::{self, KeyType};
use crate::rfc3339::secs_text as rfc3339;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{AuthorityRecord, AuthorityState, Store};

/// Output formats of `root status`.
/// Key types on the command line: the authority's own names and descriptions.
impl ValueEnum for KeyType {
    fn value_variants<'a>() -> &'a [Self] {
        &KeyType::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()).help(self.describe()))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum StatusFormat {
    /// Aligned columns for a person
    Table,
    /// One JSON object per authority, one per line
    Json,
}

/// `root` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum RootCommand {
    /// Show every authority and its state
    Status {
        /// Output format
        #[arg(long, value_enum, default_value = "table")]
        format: StatusFormat,
        /// Exit 1, naming each, if an authority in the bundle expires within
        /// --expiry-warning or has expired, or if none is active (for monitoring)
        #[arg(long)]
        check: bool,
        /// How close to expiry an authority is flagged [default: 30d]
        #[arg(long, default_value = "30d")]
        expiry_warning: String,
    },
    /// Add an authority whose root joins the bundle but does not sign yet; prints its id
    Prepare {
        /// Import a plug-in CA from a directory in Istio's cacerts layout (ca-cert.pem,
        /// ca-key.pem, cert-chain.pem, root-cert.pem) instead of generating a root
        #[arg(long)]
        import_dir: Option<PathBuf>,
        /// With --import-dir: the CA's key is this key pair in the PKCS#11 token (made by
        /// `root csr`), and the directory has no ca-key.pem
        #[arg(long, requires = "import_dir")]
        pkcs11_object: Option<String>,
        /// Key type of a generated root
        #[arg(long, value_enum, default_value = "ec-p256")]
        key_type: KeyType,
        /// Trust domain of a generated root [default: that of the current roots, else the
        /// config file's, else cluster.local]
        #[arg(long)]
        trust_domain: Option<String>,
        /// Break glass: activate it at once, as `root activate ID --force` (the active root
        /// expired, or must be abandoned now). Servers keep serving the outgoing root's
        /// certificate while that root is in the bundle and valid, and agents read their
        /// --ca-bundle again when they reconnect, so both kinds of laggard recover
        #[arg(long)]
        activate: bool,
    },
    /// Generate an intermediate CA's key in the PKCS#11 token and print a CSR for it, to be
    /// signed by an offline root; then `root prepare --import-dir DIR --pkcs11-object LABEL`
    Csr {
        /// Key type (EC only in a token)
        #[arg(long, value_enum, default_value = "ec-p256")]
        key_type: KeyType,
        /// Trust domain named in the CSR [default: that of the current roots, else the
        /// config file's, else cluster.local]
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Make an authority the one that signs; the one active before starts retiring.
    /// Refused while a client seen within its server's refresh hint still holds a bundle
    /// without this authority's root
    Activate {
        /// The authority's id (see `root status`)
        id: i64,
        /// Activate even though some clients do not trust its root yet
        #[arg(long)]
        force: bool,
    },
    /// Mark a prepared or retiring authority compromised: its root stays in the bundle for
    /// now, the bundle names it, agents holding its certificates renew at once, and it may
    /// be retired as soon as none of its certificates is any holder's newest
    Taint {
        /// The authority's id (see `root status`)
        id: i64,
    },
    /// Take an authority's root out of the bundle
    Retire {
        /// The authority's id (see `root status`)
        id: i64,
        /// Retire even though unexpired certificates chain to it
        #[arg(long)]
        force: bool,
    },
}

fn authority_event() -> EventRow {
    let mut event = EventRow::new(EventKind::Authority);
    event.operator = Some(operator_name());
    event
}

/// The trust domain named in a root's URI SAN (`spiffe://<td>`).
fn trust_domain_of(record: &AuthorityRecord) -> Option<TrustDomain> {
    let der = crate::x509::pem_to_der(&record.root_pem).ok()?;
    SpiffeId::from_certificate(&der).map(|id| id.trust_domain().clone())
}

/// The trust domain of the newest root, else the config file's, else `cluster.local`.
async fn current_trust_domain(common: &Common, store: &Store) -> anyhow::Result<TrustDomain> {
    let existing = store.authorities().await?;
    match existing.iter().rev().find_map(trust_domain_of) {
        Some(td) => Ok(td),
        None => common.trust_domain(),
    }
}

/// Runs a `root` subcommand.
pub(super) async fn root(cmd: RootCommand, common: &Common) -> anyhow::Result<ExitCode> {
    let store = super::open_store(common).await?;
    let changed = !matches!(cmd, RootCommand::Status { .. } | RootCommand::Csr { .. });
    let code = run(cmd, common, &store).await?;
    if changed {
        // Every authority change is covered by a signed checkpoint at once.
        let key = AuditKey::load_or_create(&common.data_dir)?;
        record_checkpoint(&store, &key).await?;
    }
    Ok(code)
}

async fn run(cmd: RootCommand, common: &Common, store: &Store) -> anyhow::Result<ExitCode> {
    match cmd {
        RootCommand::Status {
            format,
            check,
            expiry_warning,
        } => status(store, format, check, &expiry_warning).await,
        RootCommand::Csr {
            key_type,
            trust_domain,
        } => {
            let td = chosen_trust_domain(trust_domain, common, store).await?;
            let (key, object) = common.key_store()?.generate_in_token(key_type)?;
            let csr = authority::intermediate_csr(&td, &key)?;
            print!("{csr}");
            eprintln!(
                "The key is {object:?} in the PKCS#11 token. Have the root sign this CSR as a \
                 CA certificate, put ca-cert.pem, cert-chain.pem and root-cert.pem in a \
                 directory, then run `ca-server root prepare --import-dir DIR \
                 --pkcs11-object {object}`."
            );
            Ok(ExitCode::SUCCESS)
        }
        RootCommand::Prepare {
            import_dir,
            pkcs11_object,
            key_type,
            trust_domain,
            activate: activate_now,
        } => {
            let id = match import_dir {
                Some(dir) => prepare_import(common, store, &dir, pkcs11_object.as_deref()).await?,
                None => {
                    let td = chosen_trust_domain(trust_domain, common, store).await?;
                    let mut event = authority_event();
                    event.reason = Some(format!("prepared a self-signed root for {td}"));
                    authority::create_self_signed_root(
                        store,
                        &common.key_store()?,
                        &td,
                        key_type,
                        AuthorityState::Prepared,
                        event,
                    )
                    .await?
                }
            };
            println!("{id}");
            if activate_now {
                return activate(store, id, true).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        RootCommand::Activate { id, force } => activate(store, id, force).await,
        RootCommand::Taint { id } => {
            crate::authority::lifecycle::taint(store, id, authority_event()).await?;
            eprintln!(
                "authority {id} is tainted: agents holding its certificates renew from the \
                 active authority now. Watch `ca-server root status` until it shows no live \
                 certificate from {id}, then `ca-server root retire {id}`."
            );
            Ok(ExitCode::SUCCESS)
        }
        RootCommand::Retire { id, force } => {
            crate::authority::lifecycle::retire(store, id, force, authority_event()).await?;
            eprintln!("authority {id} is retired; its root leaves the bundle");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Makes authority `id` the one that signs, refusing while clients seen within the refresh
/// hint lack its root unless `force`.
async fn activate(store: &Store, id: i64, force: bool) -> anyhow::Result<ExitCode> {
    let behind = clients_without_root(store, id).await?;
    if !behind.is_empty() {
        let named: Vec<String> = behind
            .iter()
            .take(10)
            .map(|l| format!("{} ({}, sequence {})", l.client, l.via, l.sequence))
            .collect();
        let more = behind.len().saturating_sub(named.len());
        let list = if more > 0 {
            format!("{} and {more} more", named.join(", "))
        } else {
            named.join(", ")
        };
        if !force {
            eprintln!(
                "error: {} client(s) seen within the refresh hint still hold a bundle \
                 without authority {id}'s root: {list}. Activating now would give them \
                 peers they do not trust. Wait until they fetch the bundle again \
                 (`ca-server root status` counts them), or pass --force",
                behind.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        eprintln!(
            "warning: activating with --force while {} client(s) do not trust authority \
             {id}'s root yet: {list}",
            behind.len()
        );
    }
    let previous = crate::authority::lifecycle::activate(store, id, authority_event()).await?;
    match previous {
        Some(prev) => eprintln!(
            "authority {id} is active; authority {prev} is retiring. Retire it with \
             `ca-server root retire {prev}` once its certificates have expired."
        ),
        None => eprintln!("authority {id} is active"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The clients seen within their window whose bundle predates authority `id`'s root (none if
/// it is unknown when that root joined, or the rules refuse the activation anyway).
async fn clients_without_root(
    store: &Store,
    id: i64,
) -> anyhow::Result<Vec<crate::authority::convergence::Lagging>> {
    let authorities = store.authorities().await?;
    // An activation the rules refuse anyway (retired, tainted, already active) is not told
    // to wait: the transition says why.
    let Some(joined) = authorities
        .iter()
        .find(|a| a.id == id)
        .filter(|a| {
            a.tainted_at.is_none()
                && matches!(a.state, AuthorityState::Prepared | AuthorityState::Retiring)
        })
        .and_then(|a| a.joined_sequence)
    else {
        return Ok(Vec::new());
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Ok(crate::authority::convergence::lagging(
        &store.seen_clients(now).await?,
        joined,
    ))
}

/// `--trust-domain`, else the trust domain of the authorities there are.
async fn chosen_trust_domain(
    flag: Option<String>,
    common: &Common,
    store: &Store,
) -> anyhow::Result<TrustDomain> {
    match flag {
        Some(td) => TrustDomain::new(&td).map_err(|e| anyhow::anyhow!("--trust-domain {td:?} {e}")),
        None => current_trust_domain(common, store).await,
    }
}

/// `root prepare --import-dir DIR`: a plug-in CA, its key in files or in the token.
async fn prepare_import(
    common: &Common,
    store: &Store,
    dir: &std::path::Path,
    pkcs11_object: Option<&str>,
) -> anyhow::Result<i64> {
    let mut event = authority_event();
    event.reason = Some(match pkcs11_object {
        Some(object) => format!(
            "prepared an imported CA from {} with key {object} in the PKCS#11 token",
            dir.display()
        ),
        None => format!("prepared an imported CA from {}", dir.display()),
    });
    Ok(authority::import_authority(store, &common.key_store()?, dir, pkcs11_object, event).await?)
}

/// `root status`: the authorities as a table or JSON lines; with `--check`, exit 1 if one is
/// near its end or none is active.
async fn status(
    store: &Store,
    format: StatusFormat,
    check: bool,
    expiry_warning: &str,
) -> anyhow::Result<ExitCode> {
    let authorities = store.authorities().await?;
    let sequence = store.bundle_sequence().await?;
    let window = super::parse_duration(expiry_warning)
        .map_err(|e| anyhow::anyhow!("--expiry-warning: {e}"))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expiring = crate::authority::expiry::expiring(&authorities, now, window);
    let active = authorities
        .iter()
        .find(|a| a.state == AuthorityState::Active)
        .map(|a| a.id);
    let converging = crate::authority::convergence::from_store(store, now, active).await?;
    let seen = store.seen_clients(now).await?;
    let mut out = std::io::stdout().lock();
    match format {
        StatusFormat::Json => {
            for a in &authorities {
                let mut json = status_json(a, &expiring, &converging);
                if a.state == AuthorityState::Prepared {
                    json["bundle_clients"] = crate::authority::convergence::clients(&seen).into();
                    json["clients_without_root"] = a
                        .joined_sequence
                        .map_or(0, |joined| {
                            crate::authority::convergence::lagging(&seen, joined).len()
                        })
                        .into();
                }
                writeln!(out, "{json}")?;
            }
        }
        StatusFormat::Table if authorities.is_empty() => writeln!(
            out,
            "no authorities yet: `ca-server run` creates the first root on its first start"
        )?,
        StatusFormat::Table => {
            write_status_table(&mut out, &authorities, &expiring, &converging)?;
            writeln!(out, "\nbundle sequence {sequence}")?;
            let count = crate::authority::convergence::clients(&seen);
            writeln!(out, "bundle clients seen within the refresh hint: {count}")?;
            for a in authorities
                .iter()
                .filter(|a| a.state == AuthorityState::Prepared)
            {
                if let Some(joined) = a.joined_sequence {
                    let behind = crate::authority::convergence::lagging(&seen, joined);
                    writeln!(
                        out,
                        "prepared authority {}: {} of them still hold a bundle without its root{}",
                        a.id,
                        behind.len(),
                        if behind.is_empty() {
                            " (ready to activate)"
                        } else {
                            ""
                        }
                    )?;
                }
            }
            if let Some(active) = active {
                writeln!(
                    out,
                    "rotation: {} of {} identities ({:.0}%) hold their newest certificate from \
                     active authority {active}",
                    converging.on_active,
                    converging.identities,
                    converging.ratio() * 100.0
                )?;
            }
            for e in &expiring {
                writeln!(out, "{e}")?;
            }
        }
    }
    if !check {
        return Ok(ExitCode::SUCCESS);
    }
    let mut problems: Vec<String> = expiring.iter().map(ToString::to_string).collect();
    if !authorities
        .iter()
        .any(|a| a.state == AuthorityState::Active)
    {
        problems.push("ca: no authority is active: `ca-server root activate ID`".to_owned());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One authority as `root status --format json` prints it.
fn status_json(
    a: &AuthorityRecord,
    expiring: &[crate::authority::expiry::Expiring],
    converging: &Convergence,
) -> serde_json::Value {
    let used = converging.of(a.id);
    let mut json = serde_json::json!({
        "id": a.id,
        "state": a.state.as_str(),
        "kind": a.kind.as_str(),
        "subject": a.subject,
        "not_before": rfc3339(a.not_before),
        "not_after": rfc3339(a.not_after),
        "fingerprint_sha256": a.fingerprint_sha256,
        "key": a.key_ref,
        "expiring": expiring.iter().any(|e| e.id == a.id),
        "in_bundle": a.state != AuthorityState::Retired,
        "prepared_at": rfc3339(a.created_at),
        "activated_at": a.activated_at.map(rfc3339),
        "retiring_at": a.retiring_at.map(rfc3339),
        "retired_at": a.retired_at.map(rfc3339),
        "tainted": a.tainted_at.is_some(),
        "tainted_at": a.tainted_at.map(rfc3339),
        "unexpired_certificates": used.unexpired,
        "live_certificates": used.live,
        "live_identities": used.identities,
        "last_certificate_not_after": used.last_not_after.map(rfc3339),
    });
    if a.state == AuthorityState::Active {
        json["converged_ratio"] = converging.ratio().into();
        json["identities"] = converging.identities.into();
        json["identities_on_active"] = converging.on_active.into();
    }
    json
}

fn write_status_table(
    out: &mut impl Write,
    authorities: &[AuthorityRecord],
    expiring: &[crate::authority::expiry::Expiring],
    converging: &Convergence,
) -> std::io::Result<()> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let header = [
        "ID",
        "STATE",
        "SUBJECT",
        "NOT AFTER",
        "LIVE (IDENTITIES)",
        "LAST LEAF ENDS",
        "FINGERPRINT (SHA-256)",
    ];
    let rows: Vec<[String; 7]> = authorities
        .iter()
        .map(|a| {
            let days = (a.not_after - now) / 86_400;
            let used = converging.of(a.id);
            [
                a.id.to_string(),
                if a.tainted_at.is_some() {
                    format!("{} TAINTED", a.state)
                } else {
                    a.state.as_str().to_owned()
                },
                a.subject.clone(),
                if expiring.iter().any(|e| e.id == a.id) {
                    format!("{} ({days} days) EXPIRING", rfc3339(a.not_after))
                } else {
                    format!("{} ({days} days)", rfc3339(a.not_after))
                },
                format!("{} ({})", used.live, used.identities),
                used.last_not_after
                    .map(rfc3339)
                    .unwrap_or_else(|| "-".into()),
                a.fingerprint_sha256[..16.min(a.fingerprint_sha256.len())].to_owned() + "…",
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.map(String::from).to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.to_vec()))?;
    }
    Ok(())
}
