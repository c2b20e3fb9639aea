//! `run`'s settings: each flag, else its config-file key, else the default, checked and
//! turned into `server::Settings`, one section of the server at a time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::{FileIssuer, FileRunConfig, RunArgs};
use crate::auth::node::NodeAccount;
use crate::cli::{Common, parse_duration};
use crate::issuance::{LeafPolicy, LimitSettings};
use crate::kube::KubeApi;
use crate::limits::Rate;
use crate::server::{ConnectionLimits, IssuerApi, IssuerKeysFrom, IssuerSettings, Settings};
use crate::spiffe::TrustDomain;

/// Resolves `run`'s flags and config file into the server's settings.
pub(crate) fn settings(mut args: RunArgs, common: Common) -> anyhow::Result<Settings> {
    let keys = Arc::new(common.key_store()?);
    let mut file = common.file.run;
    let token_review = args.token_review || file.token_review.unwrap_or(false);
    let publish_configmap = args
        .publish_configmap
        .take()
        .or(file.publish_configmap.take());
    let trust_domain = args
        .trust_domain
        .take()
        .or(file.trust_domain.take())
        .unwrap_or_else(|| "cluster.local".to_owned());
    let trust_domain = TrustDomain::new(&trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain {trust_domain:?} {e}"))?;
    let issuers = issuers(&mut args, &mut file)?;
    let trusted_node_accounts = or_list(
        std::mem::take(&mut args.trusted_node_accounts),
        file.trusted_node_account.take(),
        &[],
    )
    .iter()
    .map(|a| {
        a.parse::<NodeAccount>()
            .map_err(|e| anyhow::anyhow!("--trusted-node-account {e}"))
    })
    .collect::<anyhow::Result<Vec<_>>>()?;
    let pod_certificates = pod_certificates(&mut args, &mut file)?;
    let kube_used = if token_review || publish_configmap.is_some() || pod_certificates.is_some() {
        KubeUse::Required
    } else if !trusted_node_accounts.is_empty() {
        KubeUse::Wanted
    } else {
        KubeUse::None
    };
    let kube_api = kube_api(
        kube_used,
        args.kube_api_url.take().or(file.kube_api_url.take()),
        args.kube_token_file.take().or(file.kube_token_file.take()),
        args.kube_ca_file.take().or(file.kube_ca_file.take()),
    )?;
    let auditors = or_list(std::mem::take(&mut args.auditors), file.auditor.take(), &[])
        .iter()
        .map(|id| {
            crate::spiffe::SpiffeId::parse(id).map_err(|e| anyhow::anyhow!("--auditor {id:?} {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
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
        jwt_issuer: jwt_issuer(&mut args, &mut file)?,
        server_names: or_list(
            std::mem::take(&mut args.server_names),
            file.server_name.take(),
            &["localhost", "127.0.0.1"],
        ),
        issuers,
        kube_api,
        token_review,
        max_token_reviews: at_least_one(
            "--max-token-reviews",
            args.max_token_reviews.or(file.max_token_reviews),
            crate::auth::review::DEFAULT_MAX_REVIEWS,
        )?,
        connections: connections(&mut args, &mut file)?,
        trusted_node_accounts,
        impersonation_without_node_check: args.allow_impersonation_without_node_check
            || file.allow_impersonation_without_node_check.unwrap_or(false),
        publish_configmap,
        pod_certificates,
        expiry_warning: duration(
            "--expiry-warning",
            args.expiry_warning.take().or(file.expiry_warning.take()),
            crate::authority::expiry::DEFAULT_WARNING,
        )?,
        audiences: or_list(
            std::mem::take(&mut args.token_audiences),
            file.token_audience.take(),
            &["istio-ca"],
        ),
        jwks_ca_file: args.token_jwks_ca.take().or(file.token_jwks_ca.take()),
        dev: args.dev || file.dev.unwrap_or(false),
        leaf_policy: leaf_policy(&mut args, &mut file)?,
        bundle_refresh_hint: at_least_a_second(
            "--bundle-refresh-hint",
            args.bundle_refresh_hint
                .take()
                .or(file.bundle_refresh_hint.take()),
            time::Duration::minutes(5),
        )?,
        auditors,
        checkpoint_interval: at_least_a_second(
            "--audit-checkpoint-interval",
            args.audit_checkpoint_interval
                .take()
                .or(file.audit_checkpoint_interval.take()),
            time::Duration::minutes(1),
        )?
        .unsigned_abs(),
        limits: limits(&args, &file)?,
    })
}

/// `value` read as a duration, or `default`.
fn duration(
    flag: &str,
    value: Option<String>,
    default: time::Duration,
) -> anyhow::Result<time::Duration> {
    match value {
        Some(text) => parse_duration(&text).map_err(|e| anyhow::anyhow!("{flag}: {e}")),
        None => Ok(default),
    }
}

/// [`duration`], refused below a second.
fn at_least_a_second(
    flag: &str,
    value: Option<String>,
    default: time::Duration,
) -> anyhow::Result<time::Duration> {
    let d = duration(flag, value, default)?;
    if d < time::Duration::SECOND {
        bail!("{flag} must be at least 1s");
    }
    Ok(d)
}

/// A count, or `default`; refused at 0.
fn at_least_one(flag: &str, value: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match value {
        Some(0) => bail!("{flag} must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// The token issuers: the flags' one (this cluster's), then the config file's
/// `[[token_issuers]]`, each other cluster's.
fn issuers(args: &mut RunArgs, file: &mut FileRunConfig) -> anyhow::Result<Vec<IssuerSettings>> {
    let refresh = at_least_a_second(
        "--token-jwks-refresh",
        args.token_jwks_refresh
            .take()
            .or(file.token_jwks_refresh.take()),
        time::Duration::try_from(crate::auth::jwks::DEFAULT_REFRESH)?,
    )?;
    let jwks_url = args.token_jwks_url.take().or(file.token_jwks_url.take());
    if let Some(url) = &jwks_url {
        require_https("--token-jwks-url", url)?;
    }
    let local = |issuer: String, keys: IssuerKeysFrom| IssuerSettings {
        issuer,
        keys,
        refresh: refresh.unsigned_abs(),
        cluster_id: None,
        api: IssuerApi::Local,
    };
    let issuer = args.token_issuer.take().or(file.token_issuer.take());
    let jwks_file = args.token_jwks_file.take().or(file.token_jwks_file.take());
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
    for (i, entry) in file.token_issuers.take().into_iter().flatten().enumerate() {
        let issuer = file_issuer(i, entry, refresh, &issuers)?;
        issuers.push(issuer);
    }
    Ok(issuers)
}

/// `[[token_issuers]]` entry `i`, checked against the issuers before it.
fn file_issuer(
    i: usize,
    entry: FileIssuer,
    refresh: time::Duration,
    before: &[IssuerSettings],
) -> anyhow::Result<IssuerSettings> {
    let name = format!("token_issuers[{i}] ({})", entry.issuer);
    let keys = match (entry.jwks_file, entry.jwks_url) {
        (Some(path), None) => IssuerKeysFrom::File(path),
        (None, Some(url)) => {
            require_https(&format!("{name} jwks_url"), &url)?;
            IssuerKeysFrom::Url(url)
        }
        _ => bail!("{name} in the config file needs exactly one of jwks_file and jwks_url"),
    };
    if before.iter().any(|other| {
        other.issuer == entry.issuer
            || (entry.cluster_id.is_some() && other.cluster_id == entry.cluster_id)
    }) {
        bail!("{name} repeats an issuer or a cluster_id already configured");
    }
    let refresh = duration(&format!("{name} jwks_refresh"), entry.jwks_refresh, refresh)?;
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
        _ => {
            bail!("{name}: kube_api_url needs kube_token_file (and kube_ca_file for a private CA)")
        }
    };
    Ok(IssuerSettings {
        issuer: entry.issuer,
        keys,
        refresh: refresh.unsigned_abs(),
        cluster_id: entry.cluster_id,
        api,
    })
}

/// The leaves' TTLs: `--default-ttl` and `--max-ttl`.
fn leaf_policy(args: &mut RunArgs, file: &mut FileRunConfig) -> anyhow::Result<LeafPolicy> {
    let defaults = LeafPolicy::default();
    let policy = LeafPolicy {
        default_ttl: duration(
            "--default-ttl",
            args.default_ttl.take().or(file.default_ttl.take()),
            defaults.default_ttl,
        )?,
        max_ttl: duration(
            "--max-ttl",
            args.max_ttl.take().or(file.max_ttl.take()),
            defaults.max_ttl,
        )?,
        clock_skew: defaults.clock_skew,
    };
    if policy.default_ttl <= time::Duration::ZERO || policy.max_ttl <= time::Duration::ZERO {
        bail!("--default-ttl and --max-ttl must be positive");
    }
    if policy.default_ttl > policy.max_ttl {
        bail!(
            "--default-ttl ({}) is above --max-ttl ({})",
            policy.default_ttl,
            policy.max_ttl
        );
    }
    Ok(policy)
}

/// The connection caps and the idle timeout.
fn connections(args: &mut RunArgs, file: &mut FileRunConfig) -> anyhow::Result<ConnectionLimits> {
    let idle = at_least_a_second(
        "--idle-timeout",
        args.idle_timeout.take().or(file.idle_timeout.take()),
        time::Duration::try_from(ConnectionLimits::DEFAULT.idle)?,
    )?;
    Ok(ConnectionLimits {
        total: at_least_one(
            "--max-connections",
            args.max_connections.or(file.max_connections),
            ConnectionLimits::DEFAULT.total,
        )?,
        per_ip: at_least_one(
            "--max-connections-per-ip",
            args.max_connections_per_ip.or(file.max_connections_per_ip),
            ConnectionLimits::DEFAULT.per_ip,
        )?,
        idle: idle.unsigned_abs(),
    })
}

/// The abuse limits: per identity, and failed authentications per peer.
fn limits(args: &RunArgs, file: &FileRunConfig) -> anyhow::Result<LimitSettings> {
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
    Ok(LimitSettings {
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
    })
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

/// `--pod-certificate-signer` and its companions, checked.
fn pod_certificates(
    args: &mut RunArgs,
    file: &mut FileRunConfig,
) -> anyhow::Result<Option<crate::server::PodCertificateSettings>> {
    let signer = args
        .pod_certificate_signer
        .take()
        .or(file.pod_certificate_signer.take());
    let namespaces = or_list(
        std::mem::take(&mut args.pod_certificate_exclude_namespaces),
        file.pod_certificate_exclude_namespace.take(),
        &[],
    );
    let accounts = or_list(
        std::mem::take(&mut args.pod_certificate_exclude_service_accounts),
        file.pod_certificate_exclude_service_account.take(),
        &[],
    );
    let publish =
        args.publish_cluster_trust_bundle || file.publish_cluster_trust_bundle.unwrap_or(false);
    let watch_timeout = args
        .pod_certificate_watch_timeout
        .take()
        .or(file.pod_certificate_watch_timeout.take());
    let Some(signer) = signer else {
        if publish || !namespaces.is_empty() || !accounts.is_empty() || watch_timeout.is_some() {
            bail!(
                "--publish-cluster-trust-bundle, --pod-certificate-exclude-* and \
                 --pod-certificate-watch-timeout need --pod-certificate-signer (the signer \
                 name they are for)"
            );
        }
        return Ok(None);
    };
    let watch_timeout = at_least_a_second(
        "--pod-certificate-watch-timeout",
        watch_timeout,
        time::Duration::minutes(5),
    )?
    .unsigned_abs();
    check_signer_name(&signer)?;
    let excluded_accounts = accounts
        .iter()
        .map(|a| match a.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok((ns.to_owned(), sa.to_owned()))
            }
            _ => bail!("--pod-certificate-exclude-service-account {a:?}: expected NAMESPACE/NAME"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(crate::server::PodCertificateSettings {
        signer,
        excluded_namespaces: namespaces,
        excluded_accounts,
        publish_cluster_trust_bundle: publish,
        watch_timeout,
    }))
}

/// A signer name as Kubernetes takes one: `<domain>/<name>`, the domain a DNS name with a
/// dot and not Kubernetes' own (`kubernetes.io`, `k8s.io` and their subdomains are
/// reserved), the name of letters, digits, `-`, `_` and `.`.
fn check_signer_name(signer: &str) -> anyhow::Result<()> {
    let what = format!("--pod-certificate-signer {signer:?}");
    let Some((domain, name)) = signer.split_once('/') else {
        bail!("{what}: expected DOMAIN/NAME, e.g. example.com/spiffe");
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        bail!("{what}: the domain must be a lowercase DNS name with a dot, e.g. example.com");
    }
    if ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|k| domain == *k || domain.ends_with(&format!(".{k}")))
    {
        bail!("{what}: {domain} is reserved for Kubernetes' own signers; use a domain you own");
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("{what}: the name after the / must be letters, digits, '-', '_' or '.'");
    }
    if signer.len() > 253 {
        bail!("{what}: longer than 253 characters");
    }
    Ok(())
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
                 --publish-configmap, --pod-certificate-signer or --trusted-node-account"
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

/// `--jwt-issuer`: an https URL without a query or fragment, as OIDC wants an issuer; by
/// default the server's first name and the gRPC port, where discovery is served.
fn jwt_issuer(args: &mut RunArgs, file: &mut FileRunConfig) -> anyhow::Result<String> {
    let given = args.jwt_issuer.take().or(file.jwt_issuer.take());
    let issuer = match given {
        Some(url) => url,
        None => {
            let name = args
                .server_names
                .first()
                .cloned()
                .or_else(|| file.server_name.as_ref().and_then(|n| n.first().cloned()))
                .unwrap_or_else(|| "localhost".to_owned());
            let port = args
                .grpc_listen
                .or(file.grpc_listen)
                .map_or(15012, |addr| addr.port());
            let host = if name.contains(':') {
                format!("[{name}]")
            } else {
                name
            };
            format!("https://{host}:{port}")
        }
    };
    let valid = issuer
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(['?', '#', ' ']));
    if !valid {
        anyhow::bail!(
            "--jwt-issuer {issuer:?}: an https URL without query or fragment, e.g. https://ca.example.com"
        );
    }
    Ok(issuer.trim_end_matches('/').to_owned())
}
