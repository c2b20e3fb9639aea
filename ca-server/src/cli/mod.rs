//! The command line: one binary, subcommands as `spire-server` and `istioctl` have them.
//! Logs go to stderr; stdout carries only a command's output.

mod agent;
mod audit;
mod bundle;
mod diagnose;
mod request;
mod root;
mod run;
mod token;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// A certificate authority for service meshes: SPIFFE certificates for Kubernetes workloads
/// over Istio's CSR API, with a durable, hash-chained audit log.
#[derive(Debug, Parser)]
#[command(name = "ca-server", version, about)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every subcommand takes.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Directory for keys, the bundle file and the default database [default: ./ca-data]
    #[arg(long, global = true, env = "CA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL [default: sqlite://<data-dir>/ca.db]
    #[arg(long, global = true, env = "CA_DATABASE_URL")]
    database_url: Option<String>,
    /// File holding a 32-byte key-encryption key (base64, hex or raw): new authority keys
    /// are sealed with it (AES-256-GCM) into the database, where every replica finds them,
    /// instead of being written under <data-dir>/keys/
    #[arg(long, global = true, env = "CA_KEY_ENCRYPTION_KEY_FILE")]
    key_encryption_key_file: Option<PathBuf>,
    /// PKCS#11 module holding the token for CA keys (e.g. /usr/lib/softhsm/libsofthsm2.so):
    /// new roots are generated inside the token and never leave it
    #[arg(long, global = true, env = "CA_PKCS11_MODULE")]
    pkcs11_module: Option<PathBuf>,
    /// The PKCS#11 token's label
    #[arg(long, global = true, env = "CA_PKCS11_TOKEN")]
    pkcs11_token: Option<String>,
    /// File holding the PKCS#11 token's user PIN
    #[arg(long, global = true, env = "CA_PKCS11_PIN_FILE")]
    pkcs11_pin_file: Option<PathBuf>,
    /// TOML config file; flags override it
    #[arg(long, global = true, env = "CA_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines as text for people, or as one JSON object per line for collectors
    #[arg(long, global = true, env = "CA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, message, fields).
    Json,
}

impl Cli {
    /// The log format asked for.
    pub fn log_format(&self) -> LogFormat {
        self.global.log_format
    }

    /// Parses a command line (the program's name first), as `main` does.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <Self as clap::Parser>::try_parse_from(args)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server
    Run(Box<run::RunArgs>),
    /// Authorities: status, prepare, activate, retire
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Development tokens
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Request a certificate, as a proxy would (the reference client)
    Request(request::RequestArgs),
    /// Keep a certificate renewed and follow the trust bundle, as a proxy's agent does
    Agent(agent::AgentArgs),
    /// Read the audit log
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Show the trust bundle
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Say which layer an error message points at, and how to confirm it
    Explain(diagnose::ExplainArgs),
    /// Read a certificate chain, a bundle (PEM or SPIFFE JWKS) or a CSR, and check it against
    /// this CA's bundle, authorities and audit log
    Inspect(diagnose::InspectArgs),
    /// Shake hands with HOST:PORT as a workload would (its chain and key, the mesh's
    /// bundle) and say which layer fails
    Check(diagnose::CheckArgs),
}

/// The config file: the same names as the flags, with `_` for `-`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    key_encryption_key_file: Option<PathBuf>,
    pkcs11_module: Option<PathBuf>,
    pkcs11_token: Option<String>,
    pkcs11_pin_file: Option<PathBuf>,
    /// Public keys whose audit checkpoints `audit verify` and `audit checkpoint` believe,
    /// besides the data dir's own (`--trusted-audit-key`).
    trusted_audit_key: Option<Vec<PathBuf>>,
    #[serde(flatten)]
    run: run::FileRunConfig,
}

/// Flags and the config file, merged.
struct Common {
    data_dir: PathBuf,
    database_url: String,
    key_encryption_key_file: Option<PathBuf>,
    pkcs11: Option<crate::authority::pkcs11::Pkcs11Config>,
    file: FileConfig,
}

impl GlobalArgs {
    fn resolve(&self) -> anyhow::Result<Common> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./ca-data"));
        let database_url = self
            .database_url
            .clone()
            .or_else(|| file.database_url.clone())
            .unwrap_or_else(|| crate::store::default_url(&data_dir));
        let key_encryption_key_file = self
            .key_encryption_key_file
            .clone()
            .or_else(|| file.key_encryption_key_file.clone());
        let module = self
            .pkcs11_module
            .clone()
            .or_else(|| file.pkcs11_module.clone());
        let token = self
            .pkcs11_token
            .clone()
            .or_else(|| file.pkcs11_token.clone());
        let pin_file = self
            .pkcs11_pin_file
            .clone()
            .or_else(|| file.pkcs11_pin_file.clone());
        let pkcs11 = match (module, token, pin_file) {
            (None, None, None) => None,
            (Some(module), Some(token), Some(pin_file)) => {
                Some(crate::authority::pkcs11::Pkcs11Config {
                    module,
                    token,
                    pin_file,
                })
            }
            _ => anyhow::bail!(
                "PKCS#11 needs all three of --pkcs11-module, --pkcs11-token and --pkcs11-pin-file"
            ),
        };
        Ok(Common {
            data_dir,
            database_url,
            key_encryption_key_file,
            pkcs11,
            file,
        })
    }
}

impl Common {
    /// Where authority keys are kept: generated in the PKCS#11 token, if one is given;
    /// otherwise, and for imported keys, sealed in the database under the KEK, if one is
    /// given, else in files under the data dir.
    fn key_store(&self) -> anyhow::Result<crate::authority::KeyStore> {
        use crate::authority::{Kek, KeyStore};
        let keys = match &self.key_encryption_key_file {
            Some(path) => KeyStore::sealed(
                &self.data_dir,
                Kek::read_file(path).context("--key-encryption-key-file")?,
            ),
            None => KeyStore::files(&self.data_dir),
        };
        Ok(match &self.pkcs11 {
            Some(config) => keys.with_token(
                crate::authority::pkcs11::Token::open(config).context("--pkcs11-module")?,
            ),
            None => keys,
        })
    }

    /// The refresh hint the config file names, else 5 minutes, in seconds.
    fn refresh_hint_secs(&self) -> anyhow::Result<i64> {
        match self.file.run.bundle_refresh_hint() {
            Some(text) => Ok(parse_duration(text)
                .map_err(|e| anyhow::anyhow!("bundle_refresh_hint in the config file: {e}"))?
                .whole_seconds()),
            None => Ok(300),
        }
    }

    /// The trust domain the config file names, else `cluster.local`.
    fn trust_domain(&self) -> anyhow::Result<crate::spiffe::TrustDomain> {
        let name = self.file.run.trust_domain().unwrap_or("cluster.local");
        crate::spiffe::TrustDomain::new(name)
            .map_err(|e| anyhow::anyhow!("trust_domain {name:?} in the config file {e}"))
    }
}

/// Opens the store read-write (creating the data dir and the database if needed).
async fn open_store(common: &Common) -> anyhow::Result<crate::store::Store> {
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("creating {}", common.data_dir.display()))?;
    crate::store::Store::open(&common.database_url)
        .await
        .with_context(|| format!("opening {}", crate::store::redact_url(&common.database_url)))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines; in
/// colour only on a terminal, and never with `NO_COLOR` set.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The settings `ca-server … run …` would start the server with: its flags, the config file
/// and the defaults, resolved exactly as `run` resolves them. For starting the server in
/// process (`server::start`), as tests and embedders do.
pub fn run_settings(cli: Cli) -> anyhow::Result<crate::server::Settings> {
    let common = cli.global.resolve()?;
    match cli.command {
        Command::Run(args) => run::settings(*args, common),
        _ => anyhow::bail!("not a `run` command"),
    }
}

/// Runs the command.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let common = cli.global.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(*args, common).await,
            Command::Root(cmd) => root::root(cmd, &common).await,
            Command::Token(cmd) => token::token(cmd, &common),
            Command::Request(args) => request::request(args).await,
            Command::Agent(args) => agent::agent(args).await,
            Command::Audit(cmd) => audit::audit(cmd, &common).await,
            Command::Bundle(cmd) => bundle::bundle(cmd, &common).await,
            Command::Explain(args) => diagnose::explain(args),
            Command::Inspect(args) => diagnose::inspect(args, &common).await,
            Command::Check(args) => diagnose::check(args, &common).await,
        }
    })
}

/// Parses `90s`, `15m`, `1h`, `24h`, `7d` (or bare seconds).
pub fn parse_duration(text: &str) -> Result<time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 90s, 15m, 1h, 24h)"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use s, m, h or d)"
            ));
        }
    };
    n.checked_mul(secs)
        .map(time::Duration::seconds)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// The one line a failed command prints: the error, then each cause the text so far does not
/// already end with (an error whose message shows its source would otherwise say it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Reads a small text file, naming it in the error.
fn read_text(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_says_each_cause_once() {
        let bind = crate::server::StartError::Bind {
            addr: "127.0.0.1:15012".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let e = anyhow::Error::from(bind).context("starting the server");
        assert_eq!(
            error_line(&e),
            "starting the server: cannot listen on 127.0.0.1:15012: address in use"
        );
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("reading the config file /etc/ca.toml");
        assert_eq!(
            error_line(&e),
            "reading the config file /etc/ca.toml: entity not found"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(time::Duration::seconds(90)));
        assert_eq!(parse_duration("15m"), Ok(time::Duration::minutes(15)));
        assert_eq!(parse_duration("24h"), Ok(time::Duration::hours(24)));
        assert_eq!(parse_duration("2d"), Ok(time::Duration::days(2)));
        assert_eq!(parse_duration("30"), Ok(time::Duration::seconds(30)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }
}
