//! `ca-server run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use tracing::info;

use super::{Common, parse_duration};
use crate::auth::node::NodeAccount;
use crate::issuance::LeafPolicy;
use crate::issuance::LimitSettings;
use crate::kube::KubeApi;
use crate::limits::Rate;
use crate::server::{self, ConnectionLimits, IssuerApi, IssuerKeysFrom, IssuerSettings, Settings};
use crate::spiffe::TrustDomain;

/// Flags of `run`. Each may also be set in the config file (same name, `_` for `-`).
#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// gRPC and HTTPS listener (TLS) [default: 127.0.0.1:15012]
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Plain HTTP listener for /healthz and /readyz [default: 127.0.0.1:15014]
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// The mesh's trust domain [default: cluster.local]
    #[arg(long)]
    trust_domain: Option<String>,
    /// DNS name or IP of this server, for its own certificate (repeatable)
    /// [default: localhost, 127.0.0.1]
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// The `iss` of accepted service-account tokens
    #[arg(long)]
    token_issuer: Option<String>,
    /// The issuer's JWKS, as the API server serves it at /openid/v1/jwks
    #[arg(long)]
    token_jwks_file: Option<PathBuf>,
    /// URL of the issuer's JWKS (fetched, cached, refetched on an unknown kid)
    #[arg(long)]
    token_jwks_url: Option<String>,
    /// Extra CA certificate (PEM) trusted when fetching --token-jwks-url
    #[arg(long)]
    token_jwks_ca: Option<PathBuf>,
    /// How often the issuers' JWKS (file or URL) are read again: a key removed from them
    /// stops verifying then, and tokens it verified are forgotten [default: 5m]
    #[arg(long)]
    token_jwks_refresh: Option<String>,
    /// Accepted token audience (repeatable) [default: istio-ca]
    #[arg(long = "token-audience")]
    token_audiences: Vec<String>,
    /// Have the Kubernetes API server check tokens (TokenReview) that no --token-issuer
    /// claims; in a pod it is found as client-go finds it, elsewhere give --kube-api-url
    #[arg(long)]
    token_review: bool,
    /// The most TokenReviews waiting for the API server at once; more are refused with
    /// RESOURCE_EXHAUSTED [default: 32]
    #[arg(long)]
    max_token_reviews: Option<usize>,
    /// The Kubernetes API server, e.g. https://10.0.0.1:6443 [default: in-cluster]
    #[arg(long)]
    kube_api_url: Option<String>,
    /// File holding this server's own token for the API server (re-read on each use)
    /// [default: the pod's service-account token]
    #[arg(long)]
    kube_token_file: Option<PathBuf>,
    /// The CA (PEM) that signed the API server's certificate [default: the pod's ca.crt]
    #[arg(long)]
    kube_ca_file: Option<PathBuf>,
    /// Warn (log, /metrics ca_authority_expiring) when an authority in the bundle expires
    /// within this long [default: 30d]
    #[arg(long)]
    expiry_warning: Option<String>,
    /// Publish the trust bundle (PEM, key root-cert.pem) into a ConfigMap of this name in
    /// every namespace, as istiod does with istio-ca-root-cert; uses the Kubernetes API as
    /// --token-review does
    #[arg(long)]
    publish_configmap: Option<String>,
    /// TTL of a certificate when the request asks for none [default: 1h]
    #[arg(long)]
    default_ttl: Option<String>,
    /// Largest TTL a request may ask for [default: 24h]
    #[arg(long)]
    max_ttl: Option<String>,
    /// How often bundle pollers should check for changes (the SPIFFE refresh hint)
    /// [default: 5m]
    #[arg(long)]
    bundle_refresh_hint: Option<String>,
    /// SPIFFE ID allowed to query the audit log over gRPC with mTLS (repeatable)
    #[arg(long = "auditor")]
    auditors: Vec<String>,
    /// How often the audit log's head is signed into a checkpoint [default: 1m]
    #[arg(long)]
    audit_checkpoint_interval: Option<String>,
    /// Certificates one SPIFFE ID may get per second, on average; 0 for no limit
    /// [default: 100]
    #[arg(long)]
    identity_rate: Option<f64>,
    /// Certificates one SPIFFE ID may get at once, beyond its rate [default: 1000]
    #[arg(long)]
    identity_burst: Option<f64>,
    /// Failed authentications one peer address may make per second before its requests are
    /// refused unread; 0 for no limit [default: 5]
    #[arg(long)]
    unauthenticated_rate: Option<f64>,
    /// Failed authentications one peer address may make at once [default: 50]
    #[arg(long)]
    unauthenticated_burst: Option<f64>,
    /// Open connections the gRPC/HTTPS listener (and, separately, the health listener)
    /// accepts in all; more are closed at once [default: 20000]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Open connections one peer address (IPv6: one /64) may hold on each listener; sized
    /// for a node's pods behind one SNAT address [default: 1000]
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// A connection with no request and no stream in progress this long is closed (clients
    /// reconnect when they next need to) [default: 2m]
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Service account NS/SA whose callers may ask for other identities through
    /// ImpersonatedIdentity: a node proxy such as Istio's ztunnel (istio-system/ztunnel);
    /// repeatable. With the Kubernetes API, only for pods on the caller's own node
    #[arg(long = "trusted-node-account", value_name = "NS/SA")]
    trusted_node_accounts: Vec<String>,
    /// Without Kubernetes API access, let trusted node accounts have any identity in the
    /// trust domain (no node check): a compromised node proxy could then get every identity
    #[arg(long)]
    allow_impersonation_without_node_check: bool,
    /// Add a local development token issuer (see `ca-server token issue`)
    #[arg(long)]
    dev: bool,
}

/// The `run` keys of the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRunConfig {
    grpc_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    trust_domain: Option<String>,
    server_name: Option<Vec<String>>,
    token_issuer: Option<String>,
    token_jwks_file: Option<PathBuf>,
    token_jwks_url: Option<String>,
    token_jwks_ca: Option<PathBuf>,
    token_jwks_refresh: Option<String>,
    token_audience: Option<Vec<String>>,
    token_issuers: Option<Vec<FileIssuer>>,
    token_review: Option<bool>,
    max_token_reviews: Option<usize>,
    kube_api_url: Option<String>,
    kube_token_file: Option<PathBuf>,
    kube_ca_file: Option<PathBuf>,
    publish_configmap: Option<String>,
    expiry_warning: Option<String>,
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    bundle_refresh_hint: Option<String>,
    auditor: Option<Vec<String>>,
    audit_checkpoint_interval: Option<String>,
    identity_rate: Option<f64>,
    identity_burst: Option<f64>,
    unauthenticated_rate: Option<f64>,
    unauthenticated_burst: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    idle_timeout: Option<String>,
    trusted_node_account: Option<Vec<String>>,
    allow_impersonation_without_node_check: Option<bool>,
    dev: Option<bool>,
}

/// One entry of the config file's `[[token_issuers]]`: a cluster whose tokens are accepted,
/// for meshes spanning several clusters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIssuer {
    /// The tokens' `iss`.
    issuer: String,
    /// The issuer's JWKS file.
    jwks_file: Option<PathBuf>,
    /// The issuer's JWKS URL.
    jwks_url: Option<String>,
    /// The `clusterid` proxies of that cluster send (Istio's `CLUSTER_ID`); requests naming
    /// it are checked against this issuer only.
    cluster_id: Option<String>,
    /// How often its JWKS is read again (default: `token_jwks_refresh`).
    jwks_refresh: Option<String>,
    /// That cluster's Kubernetes API, so that its node proxies' requests for other
    /// identities can be checked there (without it they are refused).
    kube_api_url: Option<String>,
    /// This server's token for that API.
    kube_token_file: Option<PathBuf>,
    /// The CA (PEM) of that API server's certificate.
    kube_ca_file: Option<PathBuf>,
}

impl FileRunConfig {
    /// The config file's bundle refresh hint, if it names one.
    pub(super) fn bundle_refresh_hint(&self) -> Option<&str> {
        self.bundle_refresh_hint.as_deref()
    }

    /// The config file's trust domain, if it names one.
    pub(super) fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }
}

fn or_list(flag: Vec<String>, file: Option<Vec<String>>, default: &[&str]) -> Vec<String> {
    if !flag.is_empty() {
        flag
    } else {
        file.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    }
}

/// Refuses a URL that is not `https://`: over plain HTTP anyone on the path could hand us
/// keys or answers of their own, and so mint any identity.
fn require_https(flag: &str, url: &str) -> anyhow::Result<()> {
    if url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    {
        return Ok(());
    }
    bail!(
        "{flag} {url:?}: only https:// is accepted (over plain HTTP anyone on the path could \
         substitute keys or answers and mint any identity); for a private CA give its \
         certificate ({})",
        if flag.contains("kube") {
            "--kube-ca-file"
        } else {
            "--token-jwks-ca"
        }
    )
}

/// Who uses the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KubeUse {
    /// Nothing.
    None,
    /// The node check of trusted node accounts: used where it is found, and without it
    /// impersonation is refused (or unchecked), not the start.
    Wanted,
    /// `--token-review` or `--publish-configmap`: the server cannot work without it.
    Required,
}

/// The Kubernetes API, if something uses it: the in-cluster one, with each flag given
/// overriding its part.
fn kube_api(
    used: KubeUse,
    url: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
) -> anyhow::Result<Option<KubeApi>> {
    if used == KubeUse::None {
        if url.is_some() || token_file.is_some() || ca_file.is_some() {
            bail!(
                "--kube-api-url, --kube-token-file and --kube-ca-file need --token-review, \
                 --publish-configmap or --trusted-node-account"
            );
        }
        return Ok(None);
    }
    if let Some(url) = &url {
        require_https("--kube-api-url", url)?;
    }
    let mut api = match url {
        Some(url) => KubeApi {
            url: url.trim_end_matches('/').to_owned(),
            token_file: PathBuf::from(crate::kube::IN_CLUSTER_TOKEN),
            ca_pem: std::fs::read_to_string(crate::kube::IN_CLUSTER_CA).ok(),
        },
        None => match KubeApi::in_cluster() {
            Ok(api) => api,
            // Not in a pod: the node check is off, and start-up says what that means.
            Err(_) if used == KubeUse::Wanted => return Ok(None),
            Err(e) => bail!("the Kubernetes API: {e}"),
        },
    };
    if let Some(path) = token_file {
        api.token_file = path;
    }
    if let Some(path) = ca_file {
        api.ca_pem = Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("--kube-ca-file {}", path.display()))?,
        );
    }
    Ok(Some(api))
}

pub(crate) fn settings(args: RunArgs, common: Common) -> anyhow::Result<Settings> {
    let keys = Arc::new(common.key_store()?);
    let file = common.file.run;
    let token_review = args.token_review || file.token_review.unwrap_or(false);
    let publish_configmap = args.publish_configmap.or(file.publish_configmap);
    let trust_domain = args
        .trust_domain
        .or(file.trust_domain)
        .unwrap_or_else(|| "cluster.local".to_owned());
    let trust_domain = TrustDomain::new(&trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain {trust_domain:?} {e}"))?;

    let duration = |flag: &str, value: Option<String>, default: time::Duration| match value {
        Some(text) => parse_duration(&text).map_err(|e| anyhow::anyhow!("{flag}: {e}")),
        None => Ok(default),
    };
    let jwks_refresh = duration(
        "--token-jwks-refresh",
        args.token_jwks_refresh.or(file.token_jwks_refresh),
        time::Duration::try_from(crate::auth::jwks::DEFAULT_REFRESH)?,
    )?;
    if jwks_refresh < time::Duration::SECOND {
        bail!("--token-jwks-refresh must be at least 1s");
    }
    let issuer = args.token_issuer.or(file.token_issuer);
    let jwks_file = args.token_jwks_file.or(file.token_jwks_file);
    let jwks_url = args.token_jwks_url.or(file.token_jwks_url);
    if let Some(url) = &jwks_url {
        require_https("--token-jwks-url", url)?;
    }
    let local = |issuer: String, keys: IssuerKeysFrom| IssuerSettings {
        issuer,
        keys,
        refresh: jwks_refresh.unsigned_abs(),
        cluster_id: None,
        api: IssuerApi::Local,
    };
    let mut issuers = match (issuer, jwks_file, jwks_url) {
        (None, None, None) => Vec::new(),
        (Some(_), Some(_), Some(_)) => {
            bail!("give --token-jwks-file or --token-jwks-url, not both")
        }
        (Some(issuer), Some(file), None) => vec![local(issuer, IssuerKeysFrom::File(file))],
        (Some(issuer), None, Some(url)) => vec![local(issuer, IssuerKeysFrom::Url(url))],
        (Some(_), None, None) => {
            bail!(
                "--token-issuer needs the issuer's keys: add --token-jwks-file or --token-jwks-url"
            )
        }
        (None, _, _) => bail!(
            "--token-jwks-file/--token-jwks-url need --token-issuer (the tokens' iss, e.g. \
             https://kubernetes.default.svc.cluster.local)"
        ),
    };
    for (i, entry) in file.token_issuers.into_iter().flatten().enumerate() {
        let name = format!("token_issuers[{i}] ({})", entry.issuer);
        let keys = match (entry.jwks_file, entry.jwks_url) {
            (Some(path), None) => IssuerKeysFrom::File(path),
            (None, Some(url)) => {
                require_https(&format!("{name} jwks_url"), &url)?;
                IssuerKeysFrom::Url(url)
            }
            _ => bail!("{name} in the config file needs exactly one of jwks_file and jwks_url"),
        };
        if issuers.iter().any(|other| {
            other.issuer == entry.issuer
                || (entry.cluster_id.is_some() && other.cluster_id == entry.cluster_id)
        }) {
            bail!("{name} repeats an issuer or a cluster_id already configured");
        }
        let refresh = duration(
            &format!("{name} jwks_refresh"),
            entry.jwks_refresh,
            jwks_refresh,
        )?;
        if refresh < time::Duration::SECOND {
            bail!("{name} jwks_refresh must be at least 1s");
        }
        let api = match (
            entry.kube_api_url,
            entry.kube_token_file,
            entry.kube_ca_file,
        ) {
            (None, None, None) => IssuerApi::None,
            (Some(url), Some(token_file), ca_file) => {
                require_https(&format!("{name} kube_api_url"), &url)?;
                let ca_pem = match ca_file {
                    Some(path) => Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("{name} kube_ca_file {}", path.display()))?,
                    ),
                    None => None,
                };
                IssuerApi::Own(KubeApi {
                    url: url.trim_end_matches('/').to_owned(),
                    token_file,
                    ca_pem,
                })
            }
            _ => bail!(
                "{name}: kube_api_url needs kube_token_file (and kube_ca_file for a private CA)"
            ),
        };
        issuers.push(IssuerSettings {
            issuer: entry.issuer,
            keys,
            refresh: refresh.unsigned_abs(),
            cluster_id: entry.cluster_id,
            api,
        });
    }

    let ttl = duration;
    let defaults = LeafPolicy::default();
    let leaf_policy = LeafPolicy {
        default_ttl: ttl(
            "--default-ttl",
            args.default_ttl.or(file.default_ttl),
            defaults.default_ttl,
        )?,
        max_ttl: ttl("--max-ttl", args.max_ttl.or(file.max_ttl), defaults.max_ttl)?,
        clock_skew: defaults.clock_skew,
    };
    if leaf_policy.default_ttl <= time::Duration::ZERO
        || leaf_policy.max_ttl <= time::Duration::ZERO
    {
        bail!("--default-ttl and --max-ttl must be positive");
    }
    if leaf_policy.default_ttl > leaf_policy.max_ttl {
        bail!(
            "--default-ttl ({}) is above --max-ttl ({})",
            leaf_policy.default_ttl,
            leaf_policy.max_ttl
        );
    }

    let bundle_refresh_hint = ttl(
        "--bundle-refresh-hint",
        args.bundle_refresh_hint.or(file.bundle_refresh_hint),
        time::Duration::minutes(5),
    )?;
    if bundle_refresh_hint < time::Duration::SECOND {
        bail!("--bundle-refresh-hint must be at least 1s");
    }

    let trusted_node_accounts = or_list(args.trusted_node_accounts, file.trusted_node_account, &[])
        .iter()
        .map(|a| {
            a.parse::<NodeAccount>()
                .map_err(|e| anyhow::anyhow!("--trusted-node-account {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let auditors = or_list(args.auditors, file.auditor, &[])
        .iter()
        .map(|id| {
            crate::spiffe::SpiffeId::parse(id).map_err(|e| anyhow::anyhow!("--auditor {id:?} {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let checkpoint_interval = ttl(
        "--audit-checkpoint-interval",
        args.audit_checkpoint_interval
            .or(file.audit_checkpoint_interval),
        time::Duration::minutes(1),
    )?;
    if checkpoint_interval < time::Duration::SECOND {
        bail!("--audit-checkpoint-interval must be at least 1s");
    }

    let idle_timeout = ttl(
        "--idle-timeout",
        args.idle_timeout.or(file.idle_timeout),
        time::Duration::try_from(ConnectionLimits::DEFAULT.idle)?,
    )?;
    if idle_timeout < time::Duration::SECOND {
        bail!("--idle-timeout must be at least 1s");
    }
    let idle_timeout = idle_timeout.unsigned_abs();

    let rate = |name: &str,
                rate: Option<f64>,
                burst_name: &str,
                burst: Option<f64>,
                defaults: (f64, f64)|
     -> anyhow::Result<Rate> {
        let per_second = rate.unwrap_or(defaults.0);
        let burst = burst.unwrap_or(defaults.1);
        if !per_second.is_finite() || per_second < 0.0 {
            bail!("--{name} must be a number of requests per second, 0 or more");
        }
        if per_second > 0.0 && (!burst.is_finite() || burst < 1.0) {
            bail!("--{burst_name} must be at least 1");
        }
        Ok(Rate { per_second, burst })
    };
    let limits = LimitSettings {
        per_identity: rate(
            "identity-rate",
            args.identity_rate.or(file.identity_rate),
            "identity-burst",
            args.identity_burst.or(file.identity_burst),
            (100.0, 1000.0),
        )?,
        unauthenticated_per_peer: rate(
            "unauthenticated-rate",
            args.unauthenticated_rate.or(file.unauthenticated_rate),
            "unauthenticated-burst",
            args.unauthenticated_burst.or(file.unauthenticated_burst),
            (5.0, 50.0),
        )?,
    };

    Ok(Settings {
        keys,
        data_dir: common.data_dir,
        database_url: common.database_url,
        grpc_listen: args
            .grpc_listen
            .or(file.grpc_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15012))),
        http_listen: args
            .http_listen
            .or(file.http_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15014))),
        trust_domain,
        server_names: or_list(
            args.server_names,
            file.server_name,
            &["localhost", "127.0.0.1"],
        ),
        issuers,
        kube_api: kube_api(
            if token_review || publish_configmap.is_some() {
                KubeUse::Required
            } else if !trusted_node_accounts.is_empty() {
                KubeUse::Wanted
            } else {
                KubeUse::None
            },
            args.kube_api_url.or(file.kube_api_url),
            args.kube_token_file.or(file.kube_token_file),
            args.kube_ca_file.or(file.kube_ca_file),
        )?,
        token_review,
        max_token_reviews: match args.max_token_reviews.or(file.max_token_reviews) {
            Some(0) => bail!("--max-token-reviews must be at least 1"),
            Some(n) => n,
            None => crate::auth::review::DEFAULT_MAX_REVIEWS,
        },
        connections: ConnectionLimits {
            total: match args.max_connections.or(file.max_connections) {
                Some(0) => bail!("--max-connections must be at least 1"),
                Some(n) => n,
                None => ConnectionLimits::DEFAULT.total,
            },
            per_ip: match args.max_connections_per_ip.or(file.max_connections_per_ip) {
                Some(0) => bail!("--max-connections-per-ip must be at least 1"),
                Some(n) => n,
                None => ConnectionLimits::DEFAULT.per_ip,
            },
            idle: idle_timeout,
        },
        trusted_node_accounts,
        impersonation_without_node_check: args.allow_impersonation_without_node_check
            || file.allow_impersonation_without_node_check.unwrap_or(false),
        publish_configmap,
        expiry_warning: ttl(
            "--expiry-warning",
            args.expiry_warning.or(file.expiry_warning),
            crate::authority::expiry::DEFAULT_WARNING,
        )?,
        audiences: or_list(args.token_audiences, file.token_audience, &["istio-ca"]),
        jwks_ca_file: args.token_jwks_ca.or(file.token_jwks_ca),
        dev: args.dev || file.dev.unwrap_or(false),
        leaf_policy,
        bundle_refresh_hint,
        auditors,
        checkpoint_interval: checkpoint_interval.unsigned_abs(),
        limits,
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub(super) async fn run(args: RunArgs, common: Common) -> anyhow::Result<ExitCode> {
    let settings = settings(args, common)?;
    let running = server::start(settings).await?;
    wait_for_signal().await.context("waiting for a signal")?;
    info!("Shutting down");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}
