//! The accept loops of both listeners, and what keeps a peer from holding them: caps on open
//! connections (in all, and per peer address), a deadline for the TLS handshake and for the
//! first request (which also bounds the protocol sniff of a client that names no ALPN), an
//! HTTP/1 header timeout, HTTP/2 keepalive with a timeout, and an idle timeout for a
//! connection with no request or stream in progress.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;
use tracing::{debug, warn};

use super::grpc::{PeerAddr, PeerCertificate, PeerIdentity};
use crate::limits::peer_key;

/// How long a client has to finish its TLS handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may go from its start (the TCP accept) to its first request. This
/// bounds the protocol sniff of a client that named no ALPN protocol, and a client that
/// connects and says nothing.
pub(super) const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may stay open with no request and no stream (a bundle watch counts
/// as one) in progress, by default (`--idle-timeout`); it is then closed (HTTP/2: GOAWAY), and
/// a client reconnects when it next needs to.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long HTTP/1 headers may take to arrive.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings on a connection with nothing to say, and how long an answer may take before
/// the connection is dropped (a peer that stopped reading).
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
pub(super) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a closing connection may finish what it started (at shutdown, or when idle).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// After an accept error (out of file descriptors, say), the loop waits this long rather
/// than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Open connections allowed, per listener, and how long one may idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In all (`--max-connections`).
    pub total: usize,
    /// Per peer address, IPv6 per /64 (`--max-connections-per-ip`).
    pub per_ip: usize,
    /// With nothing in progress (`--idle-timeout`).
    pub idle: Duration,
}

impl ConnectionLimits {
    /// Sized for a large mesh: every proxy keeps about one connection, and a node's pods may
    /// all come from one SNAT address (Kubernetes allows up to 110 pods a node by default,
    /// big nodes several hundred).
    pub const DEFAULT: Self = Self {
        total: 20_000,
        per_ip: 1000,
        idle: IDLE_TIMEOUT,
    };
}

/// Counts open connections; admits a new one only within the limits.
#[derive(Debug)]
pub(super) struct Gate {
    limits: ConnectionLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// An admitted connection; it leaves the count when dropped.
#[derive(Debug)]
pub(super) struct Admitted {
    gate: Arc<Gate>,
    key: IpAddr,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// `--max-connections`.
    Total,
    /// `--max-connections-per-ip`.
    PerIp,
}

impl Gate {
    /// A gate with `limits`.
    pub(super) fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`, or says which limit it is over. The per-address map
    /// holds only addresses with open connections, so it is bounded by the total.
    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Full> {
        let key = peer_key(peer);
        let mut open = self.lock();
        if open.0 >= self.limits.total {
            return Err(Full::Total);
        }
        let mine = open.1.entry(key).or_insert(0);
        if *mine >= self.limits.per_ip {
            return Err(Full::PerIp);
        }
        *mine += 1;
        open.0 += 1;
        Ok(Admitted {
            gate: Arc::clone(self),
            key,
        })
    }

    /// Open connections in all.
    pub(super) fn open(&self) -> usize {
        self.lock().0
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.gate.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

/// Requests in progress on one connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    started: Instant,
    idle: Duration,
    in_progress: AtomicUsize,
    /// Milliseconds after `started` when a request last began or ended; `u64::MAX` before
    /// the first.
    last: AtomicU64,
}

impl Activity {
    /// A connection accepted at `started`, closed after `idle` with nothing in progress.
    fn new(started: Instant, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            started,
            idle,
            in_progress: AtomicUsize::new(0),
            last: AtomicU64::new(u64::MAX),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last.store(ms, Ordering::Release);
    }

    fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InProgress(Arc::clone(self))
    }

    /// When the connection should be closed for doing nothing, if nothing happens first:
    /// `None` while a request is in progress.
    fn idle_deadline(&self) -> Option<Instant> {
        if self.in_progress.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last.load(Ordering::Acquire) {
            u64::MAX => self.started + FIRST_REQUEST_TIMEOUT,
            ms => self.started + Duration::from_millis(ms) + self.idle,
        })
    }
}

/// One request (or stream) in progress, until its response body is done.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that counts as a request in progress until it is finished or dropped.
struct Tracked<B> {
    inner: B,
    _in_progress: InProgress,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP settings shared by both listeners.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(super::MAX_HEADER_BYTES)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    builder
}

/// Which protocol a connection speaks, when TLS settled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Not negotiated: read the first bytes to tell (bounded by [`FIRST_REQUEST_TIMEOUT`]).
    Sniff,
}

/// What the accept loop needs to serve connections.
#[derive(Clone)]
pub(super) struct Serving {
    /// The routes.
    pub app: axum::Router,
    /// Open connections, within limits.
    pub gate: Arc<Gate>,
    /// Flips to `true` at shutdown.
    pub shutdown: watch::Receiver<bool>,
}

/// Accepts TLS connections and serves gRPC (HTTP/2) and HTTPS on them, until shutdown; then
/// lets open connections finish what they started (up to [`CLOSE_GRACE`]).
pub(super) async fn serve_tls(
    listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    serving: Serving,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    accept_loop(listener, serving, move |tcp, peer, serving| {
        let acceptor = acceptor.clone();
        async move {
            let started = Instant::now();
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let (io, protocol, identity) = session(tls);
            serve_connection(io, peer, identity, protocol, started, serving).await;
        }
    })
    .await;
}

/// What a finished handshake settled: the protocol (from ALPN) and the client certificate.
/// A plain function, so the connection's future borrows the stream here rather than holding
/// a second copy of it (a local borrowed in an async block keeps its storage to the end).
fn session(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> (
    TokioIo<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    Protocol,
    PeerIdentity,
) {
    let session = tls.get_ref().1;
    let protocol = match session.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        Some(b"http/1.1") => Protocol::Http1,
        _ => Protocol::Sniff,
    };
    // Verified against the authorities during the handshake, if presented (and checked
    // again on every call that relies on it).
    let identity = match session.peer_certificates() {
        Some(chain @ [leaf, ..]) => {
            PeerIdentity::Certificate(Arc::new(PeerCertificate::new(leaf, &chain[1..])))
        }
        _ => PeerIdentity::Anonymous,
    };
    (TokioIo::new(tls), protocol, identity)
}

/// Accepts plain TCP connections (the health listener) and serves HTTP/1 on them, with the
/// same limits and timeouts.
pub(super) async fn serve_plain(listener: TcpListener, serving: Serving) {
    accept_loop(listener, serving, |tcp, peer, serving| async move {
        let started = Instant::now();
        serve_connection(
            TokioIo::new(tcp),
            peer,
            PeerIdentity::Anonymous,
            Protocol::Http1,
            started,
            serving,
        )
        .await;
    })
    .await;
}

/// Accepts connections until shutdown, admitting each through the gate and handing it to
/// `handle` on a task of its own; survives accept errors.
async fn accept_loop<F, Fut>(listener: TcpListener, serving: Serving, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, Serving) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut shutdown = serving.shutdown.clone();
    let mut connections = JoinSet::new();
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
            // Reap finished connection tasks as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, say: back off rather than spin; open connections
                // keep being served meanwhile.
                warn!(error = %e, "Accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let admitted = match serving.gate.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(full) => {
                refused += 1;
                crate::metrics::metrics()
                    .connections_refused
                    .get_or_create(&crate::metrics::ConnectionLabels {
                        limit: match full {
                            Full::Total => "max_connections",
                            Full::PerIp => "max_connections_per_ip",
                        },
                    })
                    .inc();
                // Logged once in a while, not once per connection of a flood.
                if refused.is_power_of_two() {
                    warn!(%peer, limit = ?full, refused, "Refused connections over the limit");
                }
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // A combinator rather than an async block awaiting `work`: the block would keep its
        // captured copy of the future beside the one it polls (6 KiB a connection).
        let work = handle(tcp, peer, serving.clone()).map(move |()| drop(admitted));
        connections.spawn(work);
    }
    // New connections are refused from here on; open ones finish what they started.
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), drain)
        .await
        .is_err()
    {
        warn!("Connections still open after shutdown's grace; closing them");
        connections.abort_all();
    }
}

/// The HTTP settings for each protocol, built once: a connection borrows its builder, and a
/// `'static` one lets the connection be built outside the future that drives it.
fn builder(protocol: Protocol) -> &'static auto::Builder<TokioExecutor> {
    static BUILDERS: LazyLock<[auto::Builder<TokioExecutor>; 3]> = LazyLock::new(|| {
        [
            http_builder().http1_only(),
            http_builder().http2_only(),
            http_builder(),
        ]
    });
    let index = match protocol {
        Protocol::Http1 => 0,
        Protocol::Http2 => 1,
        Protocol::Sniff => 2,
    };
    &BUILDERS[index]
}

/// Serves HTTP on one connection until the peer closes it, it idles past its deadline, or
/// the server shuts down.
///
/// Not an async fn: one would keep `io` (a TLS stream, ~1 KiB) in its arguments for the
/// connection's life beside the HTTP connection that owns it; built here, the future holds
/// the connection (boxed once) and a few handles, which matters with thousands open.
fn serve_connection<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    identity: PeerIdentity,
    protocol: Protocol,
    started: Instant,
    serving: Serving,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The first-request deadline counts from the accept, handshake included.
    let activity = Activity::new(started, serving.gate.limits.idle);
    let app = serving.app;
    let tracker = Arc::clone(&activity);
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            request.extensions_mut().insert(identity.clone());
            let in_progress = tracker.begin();
            let mut app = app.clone();
            async move {
                let response = app.call(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(Tracked {
                        inner: body,
                        _in_progress: in_progress,
                    })
                }))
            }
        });
    let conn = Box::pin(builder(protocol).serve_connection(io, service));
    drive(conn, activity, serving.shutdown, peer)
}

/// Drives one HTTP connection to its end, closing it gracefully when idle or at shutdown.
async fn drive<C>(
    mut conn: Pin<Box<C>>,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: GracefulConnection<Error: std::fmt::Display> + Send,
{
    let mut closing: Option<Instant> = None;
    loop {
        // Past its deadline a closing connection is dropped; until then it is idle-checked,
        // at least once per idle period, so that a request begun or ended since the last
        // look moves the deadline (it is then met exactly on the next wake).
        let next_look = Instant::now() + activity.idle;
        let wake = match (closing, activity.idle_deadline()) {
            (Some(at), _) => at + CLOSE_GRACE,
            (None, Some(idle)) => idle.min(next_look),
            (None, None) => next_look,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "Connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                if closing.is_some() {
                    debug!(%peer, "Connection did not close within its grace; dropped");
                    return;
                }
                if activity.idle_deadline().is_some_and(|d| d <= Instant::now()) {
                    debug!(%peer, "Closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            }
            _ = shutdown.wait_for(|stop| *stop), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an open connection's task holds beside the HTTP connection itself: with
    /// thousands open at once (pods starting together), each KiB here is MiBs of RSS.
    #[test]
    fn an_open_connection_holds_little_beside_its_http_state() {
        let (_tx, shutdown) = watch::channel(false);
        let serving = Serving {
            app: axum::Router::new(),
            gate: Gate::new(ConnectionLimits::DEFAULT),
            shutdown,
        };
        let (io, _client) = tokio::io::duplex(64);
        let connection = serve_connection(
            TokioIo::new(io),
            "192.0.2.1:443".parse().unwrap(),
            PeerIdentity::Anonymous,
            Protocol::Http2,
            Instant::now(),
            serving,
        );
        let size = std::mem::size_of_val(&connection);
        assert!(size <= 1024, "{size} bytes");
    }

    #[test]
    fn the_gate_counts_per_address_and_in_all() {
        let gate = Gate::new(ConnectionLimits {
            total: 3,
            per_ip: 2,
            idle: IDLE_TIMEOUT,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Full::PerIp);
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), Full::Total);
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _b2 = gate.admit(b).expect("room again");
        // IPv6 peers count per /64.
        let gate = Gate::new(ConnectionLimits {
            total: 10,
            per_ip: 1,
            idle: IDLE_TIMEOUT,
        });
        let _x = gate.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            gate.admit("2001:db8::ffff".parse().unwrap()).unwrap_err(),
            Full::PerIp
        );
        assert!(gate.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_progress() {
        let activity = Activity::new(Instant::now(), IDLE_TIMEOUT);
        let first = activity.idle_deadline().unwrap();
        assert_eq!(first, activity.started + FIRST_REQUEST_TIMEOUT);
        let request = activity.begin();
        assert!(activity.idle_deadline().is_none());
        drop(request);
        let idle = activity.idle_deadline().unwrap();
        assert!(idle >= activity.started + IDLE_TIMEOUT, "{idle:?}");
    }
}
