//! The workload agent (`ca-server agent`): keeps the one identity its token proves (the
//! sidecar model) renewed and the trust bundle current, and hands both to workloads on a Unix
//! socket (the SPIFFE Workload API, `workload`) and as files in its directory, which are also
//! what it serves from after a restart while the CA is unreachable.
//!
//! `client` talks to the CA, `state` holds what is served and wakes the streams, `socket`
//! binds the Unix socket, `persist` reads and writes the files, `jwt` mints JWT-SVIDs through
//! the CA and validates them against the bundle.

pub mod authority;
pub mod client;
pub mod health;
pub mod jwt;
pub mod persist;
pub mod sds;
pub mod socket;
pub mod state;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ca_proto::ca::v1::WatchTrustBundleRequest;
use ca_proto::ca::v1::trust_bundle_service_client::TrustBundleServiceClient;
use ca_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use ca_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use time::OffsetDateTime;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use self::client::{ClientKeyType, Obtained};
use self::state::{Roots, Shelf, Svid};
use crate::spiffe::SpiffeId;
use crate::x509::pem_to_der;

/// What the agent is given.
#[derive(Debug)]
pub struct AgentConfig {
    /// The CA, e.g. `https://ca.example:15012`.
    pub server: String,
    /// The bundle to verify the CA with at first (PEM); the watched bundle replaces it.
    pub ca_bundle_pem: String,
    /// Where that came from: read again at each connection and trusted beside the watched
    /// bundle, so that an agent whose bundle predates a new root (the old one expired, or
    /// was abandoned at once) finds it there, as published to a ConfigMap, without a restart.
    pub ca_bundle_file: PathBuf,
    /// The service-account token, read again for every request.
    pub token_file: PathBuf,
    /// Where the files go (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
    pub out_dir: PathBuf,
    /// The key type of each new SVID.
    pub key_type: ClientKeyType,
    /// Requested TTL in seconds (0: the CA's default).
    pub ttl_secs: i64,
    /// Requested TTL of JWT-SVIDs in seconds (0: the CA's default).
    pub jwt_ttl_secs: i64,
    /// The Workload API socket, if served.
    pub socket: Option<PathBuf>,
    /// A group to open the socket to (mode 0660 instead of 0600).
    pub socket_group: Option<String>,
    /// Where to answer `/healthz`, if anywhere.
    pub health_listen: Option<std::net::SocketAddr>,
}

/// When to renew a certificate received at `received` and valid until `not_after`: between 40%
/// and 50% of that life (`jitter` in [0, 1) picks the point), so a fleet started together does
/// not renew together; never negative.
pub fn renew_in(
    received: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    jitter: f64,
) -> Duration {
    let life = not_after - received;
    let at = received + life * (0.5 - 0.1 * jitter.clamp(0.0, 1.0));
    let wait = at - now;
    if wait.is_negative() {
        Duration::ZERO
    } else {
        wait.unsigned_abs()
    }
}

/// Exponential backoff: 1 s, 2 s, 4 s … up to 30 s.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        wait
    }
}

/// The life of the SVID being served, for the renewal schedule: from when it was received
/// (or, read back from disk, its notBefore) to its notAfter.
type Life = (OffsetDateTime, OffsetDateTime);

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let shelf = Shelf::default();
    let mut life: Option<Life> = None;
    let mut bundle = config.ca_bundle_pem.clone();
    match persist::restore(&config.out_dir, OffsetDateTime::now_utc()) {
        Ok(Some((svid, roots, not_before))) => {
            info!(spiffe_id = %svid.spiffe_id, not_after = %crate::rfc3339::text(svid.not_after), "Serving the SVID kept from the last run until the CA answers");
            life = Some((not_before, svid.not_after));
            bundle = roots_pem(&roots);
            shelf.set_svid(svid);
            shelf.set_roots(roots);
        }
        Ok(None) => {}
        Err(e) => warn!(
            error = format!("{e:#}"),
            "Not serving the files kept from the last run"
        ),
    }

    let minter = Arc::new(jwt::Minter::new(
        config.token_file.clone(),
        config.jwt_ttl_secs,
    ));
    let mut socket_file = None;
    let mut server = None;
    if let Some(path) = &config.socket {
        let (listener, file) = socket::bind(path, config.socket_group.as_deref())?;
        info!(socket = %file.path().display(), "Serving the SPIFFE Workload API and Envoy SDS");
        let workload_api = SpiffeWorkloadApiServer::new(workload::WorkloadApi::new(
            shelf.clone(),
            Arc::clone(&minter),
        ));
        let sds = SecretDiscoveryServiceServer::new(sds::Sds::new(shelf.clone()));
        let spellings = std::sync::Arc::new(authority::spellings(file.path()));
        let incoming =
            tokio_stream::wrappers::UnixListenerStream::new(listener).map(move |accepted| {
                accepted.map(|stream| authority::Rewrite::new(stream, Arc::clone(&spellings)))
            });
        socket_file = Some(file);
        server = Some(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(workload_api)
                .add_service(sds)
                .serve_with_incoming(incoming),
        ));
    }

    let link = health::Link::default();
    let mut health_task = None;
    if let Some(addr) = config.health_listen {
        let listener = health::bind(addr).await?;
        info!(%addr, "Serving /healthz");
        health_task = Some(tokio::spawn(health::serve(
            listener,
            shelf.clone(),
            link.clone(),
        )));
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut backoff = Backoff(Backoff::FIRST);
    let mut pause = Duration::ZERO;
    loop {
        // The backoff's wait is part of the attempt, so a signal ends it at once too.
        let attempt = async {
            tokio::time::sleep(pause).await;
            if let Err(e) = session(
                &config,
                &shelf,
                &minter,
                &link,
                &mut bundle,
                &mut life,
                &mut backoff,
            )
            .await
            {
                link.down(&format!("{e:#}"));
                pause = backoff.next();
                let serving = shelf
                    .now()
                    .svid
                    .map(|svid| crate::rfc3339::text(svid.not_after));
                warn!(error = format!("{e:#}"), retry_in = ?pause, serving_until = serving.as_deref().unwrap_or("nothing yet"), "Agent lost the server; serving the current SVID meanwhile");
            }
        };
        tokio::select! {
            () = attempt => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    // Open streams never end on their own: stop serving, then remove the socket.
    if let Some(task) = server {
        task.abort();
    }
    if let Some(task) = health_task {
        task.abort();
    }
    drop(socket_file);
    Ok(())
}

/// The PEM the CA channel verifies with.
fn roots_pem(roots: &Roots) -> String {
    roots
        .certificates
        .iter()
        .map(|der| crate::x509::pem("CERTIFICATE", der))
        .collect()
}

/// The roots the CA channel verifies with: `bundle`, the last one received, and the
/// certificates the `--ca-bundle` file holds now that it lacks (what does not parse is left
/// out: a half-written file must not cost the agent the CA).
fn with_file(bundle: &str, file: &std::path::Path) -> String {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            warn!(file = %file.display(), error = %e, "Cannot read the --ca-bundle file; verifying the CA with the last bundle received");
            return bundle.to_owned();
        }
    };
    let held: Vec<_> = crate::x509::split_pem(bundle)
        .iter()
        .filter_map(|pem| pem_to_der(pem).ok())
        .collect();
    let mut out = bundle.to_owned();
    for der in crate::x509::split_pem(&text)
        .iter()
        .filter_map(|pem| pem_to_der(pem).ok())
    {
        if !held.contains(&der) {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&crate::x509::pem("CERTIFICATE", &der));
        }
    }
    out
}

/// What the CA answered, as served.
fn svid_of(obtained: &Obtained) -> anyhow::Result<Svid> {
    let spiffe_id = SpiffeId::parse(&obtained.spiffe_id)
        .map_err(|e| anyhow::anyhow!("the leaf's SPIFFE ID: {e}"))?;
    let without_root = &obtained.chain[..obtained.chain.len() - 1];
    let chain = without_root
        .iter()
        .map(|pem| pem_to_der(pem).map(|der| der.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("the chain: {e}"))?;
    Ok(Svid {
        spiffe_id,
        chain,
        key: obtained.key_der.clone(),
        not_after: obtained.not_after,
    })
}

/// Why `svid` must be replaced at once under the bundle `roots`, if it must: a tainted
/// authority signed it, or its chain no longer reaches a root of the bundle.
fn replace_now(svid: &Svid, roots: &Roots) -> Option<&'static str> {
    let signed_by = |child: &[u8], parent: &[u8]| {
        let (Ok((_, child)), Ok((_, parent))) = (
            x509_parser::parse_x509_certificate(child),
            x509_parser::parse_x509_certificate(parent),
        ) else {
            return false;
        };
        child.verify_signature(Some(parent.public_key())).is_ok()
    };
    let leaf = svid.chain.first()?;
    if roots.tainted.iter().any(|t| signed_by(leaf, t)) {
        return Some("a tainted authority signed it");
    }
    let top = svid.chain.last()?;
    if !roots
        .certificates
        .iter()
        .any(|root| root == top || signed_by(top, root))
    {
        return Some("its root is no longer in the trust bundle");
    }
    None
}

/// How often a renewal is asked for while renewing gains nothing.
const NO_GAIN_RETRY: Duration = Duration::from_secs(10);

/// One connection's worth of work: follow the bundle, renew when due.
async fn session(
    config: &AgentConfig,
    shelf: &Shelf,
    minter: &jwt::Minter,
    link: &health::Link,
    bundle: &mut String,
    life: &mut Option<Life>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let channel =
        client::connect(&config.server, &with_file(bundle, &config.ca_bundle_file)).await?;
    let mut stream = TrustBundleServiceClient::new(channel.clone())
        .watch_trust_bundle(WatchTrustBundleRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("watching the trust bundle: {}", s.message()))?
        .into_inner();
    link.up();
    minter.connected(channel.clone());
    *backoff = Backoff(Backoff::FIRST);
    let jitter: f64 = rand::random();
    // Set when a renewal ended no later than the certificate it replaced (the active
    // authority's own end clamps both): renewing at half the life left would then ask again
    // and again as that end nears, for nothing, so the next asks wait this long at least.
    let mut no_gain = Duration::ZERO;
    loop {
        let wait = match life {
            Some((from, to)) => {
                renew_in(*from, *to, OffsetDateTime::now_utc(), jitter).max(no_gain)
            }
            None => Duration::ZERO,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let token = persist::read_token(&config.token_file)?;
                let obtained = client::obtain(channel.clone(), &token, config.key_type, config.ttl_secs).await?;
                // The socket serves it first: a reader that finds the files finds it served.
                shelf.set_svid(svid_of(&obtained)?);
                persist::write_credentials(&config.out_dir, &obtained)?;
                info!(spiffe_id = %obtained.spiffe_id, serial = %obtained.serial, not_after = %crate::rfc3339::text(obtained.not_after), "Renewed the certificate");
                // The life is measured from receipt, not from notBefore: the server backdates
                // notBefore for skewed clocks, and a short certificate would otherwise look
                // half-spent the moment it arrives.
                let received = OffsetDateTime::now_utc().max(obtained.not_before);
                let gained = life.is_none_or(|(_, until)| obtained.not_after > until);
                if !gained && no_gain.is_zero() {
                    warn!(not_after = %crate::rfc3339::text(obtained.not_after), "The renewed certificate ends no later than the one before: the CA's active authority ends then. Asking again every 10 s until another is active");
                }
                no_gain = if gained { Duration::ZERO } else { NO_GAIN_RETRY };
                *life = Some((received, obtained.not_after));
            }
            message = stream.message() => {
                let message = message
                    .map_err(|s| anyhow::anyhow!("trust bundle stream: {}", s.message()))?
                    .ok_or_else(|| anyhow::anyhow!("the server closed the trust bundle stream"))?;
                *bundle = message.root_certificates.concat();
                let ders = |pems: &mut dyn Iterator<Item = &String>| {
                    pems.map(|pem| pem_to_der(pem).map(|der| der.to_vec()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| anyhow::anyhow!("the trust bundle: {e}"))
                };
                let certificates = ders(&mut message.root_certificates.iter())?;
                let tainted = ders(&mut message.tainted_authorities.iter().map(|t| &t.certificate))?;
                let roots = Roots {
                    trust_domain_id: format!("spiffe://{}", message.trust_domain),
                    certificates,
                    sequence: message.sequence,
                    jwt_jwks: message.jwt_authorities_jwks,
                    tainted,
                    tainted_kids: message
                        .tainted_authorities
                        .iter()
                        .map(|t| t.jwt_key_id.clone())
                        .filter(|kid| !kid.is_empty())
                        .collect(),
                };
                minter.forget_signed_by(&roots.tainted_kids);
                if let Some(svid) = shelf.now().svid
                    && let Some(why) = replace_now(&svid, &roots)
                {
                    info!(spiffe_id = %svid.spiffe_id, why, "Renewing the certificate now");
                    *life = None;
                }
                let jwks = roots.jwt_jwks.clone();
                shelf.set_roots(roots);
                persist::write_roots(&config.out_dir, bundle)?;
                persist::write_jwt_bundle(&config.out_dir, &jwks)?;
                info!(sequence = message.sequence, roots = message.root_certificates.len(), tainted = message.tainted_authorities.len(), "Updated the trust bundle");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renews_between_40_and_50_percent_of_life() {
        let nb = datetime!(2026-01-01 0:00 UTC);
        let na = datetime!(2026-01-01 10:00 UTC);
        assert_eq!(renew_in(nb, na, nb, 0.0), Duration::from_secs(5 * 3600));
        assert_eq!(renew_in(nb, na, nb, 1.0), Duration::from_secs(4 * 3600));
        assert_eq!(
            renew_in(nb, na, datetime!(2026-01-01 6:00 UTC), 0.3),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut b = Backoff(Backoff::FIRST);
        let waits: Vec<u64> = (0..7).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
    }
}
