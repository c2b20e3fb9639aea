//! The operator's diagnosis commands: `inspect`, `check` and `explain`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::{Common, audit};

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub(super) struct InspectArgs {
    /// The file (PEM chain or bundle, PEM CSR, or SPIFFE JWKS bundle); `-` for stdin
    file: PathBuf,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    format: InspectFormat,
}

/// How `inspect` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InspectFormat {
    /// For a person.
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// `inspect`: the report, and exit 1 if anything fails.
pub(super) async fn inspect(args: InspectArgs, common: &Common) -> anyhow::Result<ExitCode> {
    use crate::diagnose::inspect::{Known, certificates_in, inspect_certificates, inspect_csr};
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let report = if text.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        inspect_csr(&text)
    } else {
        let ders =
            certificates_in(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
        if ders.is_empty() {
            anyhow::bail!(
                "{}: no certificate, CSR or JWKS bundle in it",
                args.file.display()
            );
        }
        // The store is optional: without it the report says what it could not check.
        let store = match audit::open(common).await {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::debug!(error = %e, "No store to inspect against");
                None
            }
        };
        let known = match &store {
            Some(store) => Known::load(store).await.ok(),
            None => None,
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        inspect_certificates(&ders, known.as_ref(), store.as_ref(), now).await
    };
    match args.format {
        // A certificate's names are anyone's text: escaped before they reach the terminal.
        InspectFormat::Text => print!(
            "{}",
            crate::untrusted::escape_lines(&crate::diagnose::inspect::render(&report))
        ),
        InspectFormat::Json => println!("{}", serde_json::to_string(&report)?),
    }
    Ok(report.findings.exit_code())
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub(super) struct CheckArgs {
    /// The peer, host:port
    target: String,
    /// Our certificate chain (PEM, leaf first)
    #[arg(long)]
    cert: PathBuf,
    /// Our private key (PEM)
    #[arg(long)]
    key: PathBuf,
    /// The roots to trust (PEM) [default: the store's current bundle]
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// The SPIFFE ID the server should have
    #[arg(long)]
    expect_id: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value = "text")]
    format: InspectFormat,
}

/// `check`: the handshake in layers; exit 1 if a layer fails.
pub(super) async fn check(args: CheckArgs, common: &Common) -> anyhow::Result<ExitCode> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&args.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in it", args.cert.display());
    }
    let key_text = zeroize::Zeroizing::new(read(&args.key)?);
    let key = PrivateKeyDer::from_pem_slice(&key_text)
        .map_err(|e| anyhow::anyhow!("{}: no usable private key: {e}", args.key.display()))?;
    let roots_pem = match &args.ca_bundle {
        Some(path) => read(path)?,
        None => {
            let store = audit::open(common).await.context(
                "the bundle to trust comes from the store: pass --data-dir/--database-url, or \
                 --ca-bundle FILE",
            )?;
            crate::bundle::load(&store).await?.to_pem().into_bytes()
        }
    };
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&roots_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("the bundle: {e}"))?;
    let target = crate::diagnose::check::CheckTarget {
        target: &args.target,
        chain,
        key,
        roots,
        expect_id: args.expect_id.clone(),
    };
    let report = tokio::task::block_in_place(|| crate::diagnose::check::check(target));
    match args.format {
        InspectFormat::Text => {
            // What the peer's certificate says is the peer's text: escaped.
            let show = |text: &str| crate::untrusted::escape_lines(text);
            for fact in &report.facts {
                println!("{}", show(&fact.to_string()));
            }
            for p in &report.problems {
                println!("{}: {}", p.layer, show(&p.message));
            }
            if report.problems.is_empty() {
                println!("ok: mTLS with {} works", args.target);
            }
        }
        InspectFormat::Json => println!("{}", serde_json::to_string(&report)?),
    }
    Ok(report.exit_code())
}

/// Arguments of `explain`.
#[derive(Debug, Args)]
pub(super) struct ExplainArgs {
    /// The error text as printed (an OpenSSL or Envoy message, an alert name such as
    /// TLSV1_ALERT_UNKNOWN_CA, or this server's refusal); `-` or nothing reads stdin
    text: Vec<String>,
}

/// `explain`: the layers the text points at, each with what to run to confirm it. Exit 1 if
/// nothing known matches.
pub(super) fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    use crate::diagnose::explain::{EXPLANATIONS, explain, render};
    let text = if args.text.is_empty() || args.text == ["-"] {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading the error text from stdin")?;
        text
    } else {
        args.text.join(" ")
    };
    let found = explain(&text);
    if found.is_empty() {
        let known: Vec<&str> = EXPLANATIONS.iter().map(|e| e.name).collect();
        eprintln!(
            "no known error in that text. Paste the error line as printed (for example \
             TLSV1_ALERT_UNKNOWN_CA or \"certificate verify failed\"). Known: {}",
            known.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    let rendered: Vec<String> = found.into_iter().map(render).collect();
    print!("{}", rendered.join("\n"));
    Ok(ExitCode::SUCCESS)
}
