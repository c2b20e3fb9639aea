//! `ca-server check`: a TLS handshake to a peer with a workload's identity and the mesh's
//! bundle, reported in the layers an operator walks by hand: is it TLS at all, did the
//! server's certificate verify (and why not), did the server accept ours, is the server who
//! we expected.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use super::Layer;
use crate::spiffe::SpiffeId;

/// How long to wait for the connection, the handshake, and an alert after it.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait, after the handshake, for the server to say it refused our certificate
/// (TLS 1.3 servers do that after the client thinks the handshake is done).
const AFTER_HANDSHAKE: Duration = Duration::from_millis(700);

/// What the handshake showed.
pub type CheckReport = super::Findings;

/// What to check.
pub struct CheckTarget<'a> {
    /// `host:port`.
    pub target: &'a str,
    /// Our chain (leaf first) and key.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// The roots we trust (the mesh's bundle).
    pub roots: Vec<CertificateDer<'static>>,
    /// The SPIFFE ID the server should have.
    pub expect_id: Option<String>,
}

/// Verifies the server's chain against the bundle (not its name: mesh peers are named by
/// SPIFFE ID) and keeps what it saw.
#[derive(Debug)]
struct Recorder {
    roots: rustls::RootCertStore,
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Mutex<Option<Vec<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(chain);
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn spiffe_of(chain: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    chain.first().and_then(|c| SpiffeId::from_certificate(c))
}

/// Connects, shakes hands, and reports.
pub fn check(t: CheckTarget<'_>) -> CheckReport {
    let mut report = CheckReport::default();
    let ours = spiffe_of(&t.chain)
        .map(|id| id.to_string())
        .unwrap_or_else(|| "no SPIFFE ID".into());
    let Some((config, recorder)) = client_config(&t, &mut report) else {
        return report;
    };
    let host = t.target.rsplit_once(':').map_or(t.target, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid name"));
    let Some(tcp) = connect(t.target, &mut report) else {
        return report;
    };
    let conn = match rustls::ClientConnection::new(Arc::new(config), name) {
        Ok(conn) => conn,
        Err(e) => {
            report.problem(Layer::Tls, e.to_string());
            return report;
        }
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let handshake = loop {
        if !tls.conn.is_handshaking() {
            break Ok(());
        }
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            break Err(e);
        }
    };
    let seen = recorder
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Err(e) = handshake {
        explain_failure(&mut report, &e, seen.as_deref(), t.target, &ours);
        return report;
    }
    let version = tls
        .conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    report.facts.push(format!(
        "tls: handshake complete ({version}); the server's certificate verifies against the bundle"
    ));

    // A TLS 1.3 server refuses a client certificate after the client's handshake is done:
    // listen briefly for that alert.
    let _ = tls.sock.set_read_timeout(Some(AFTER_HANDSHAKE));
    let _ = tls.flush();
    let mut buf = [0u8; 1];
    match tls.read(&mut buf) {
        Err(e) if rustls_error(&e).is_some() => {
            explain_failure(&mut report, &e, seen.as_deref(), t.target, &ours);
            return report;
        }
        _ => report
            .facts
            .push(format!("tls: the server accepted our certificate ({ours})")),
    }
    check_identity(
        &mut report,
        seen.as_deref().and_then(spiffe_of),
        t.expect_id.as_deref(),
    );
    report
}

/// A client configuration presenting the workload's chain and recording (and verifying
/// against the bundle) what the server presents; `None`, with the problem reported, if the
/// chain and key do not go together.
fn client_config(
    t: &CheckTarget<'_>,
    report: &mut CheckReport,
) -> Option<(rustls::ClientConfig, Arc<Recorder>)> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in &t.roots {
        if let Err(e) = roots.add(root.clone()) {
            report.problem(
                Layer::Trust,
                format!("a root of the bundle is unusable: {e}"),
            );
        }
    }
    let recorder = Arc::new(Recorder {
        roots,
        provider: Arc::clone(&provider),
        seen: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(recorder.clone() as Arc<dyn ServerCertVerifier>)
                .with_client_auth_cert(t.chain.clone(), t.key.clone_key())
        });
    match config {
        Ok(Ok(config)) => Some((config, recorder)),
        Ok(Err(e)) | Err(e) => {
            report.problem(
                Layer::Profile,
                format!("our certificate and key do not go together: {e}"),
            );
            None
        }
    }
}

/// A TCP connection to `target`, with read and write timeouts; `None`, with the problem
/// reported, if it does not resolve or connect.
fn connect(target: &str, report: &mut CheckReport) -> Option<TcpStream> {
    let Ok(Some(addr)) = target.to_socket_addrs().map(|mut a| a.next()) else {
        report.problem(Layer::Transport, format!("{target} does not resolve"));
        return None;
    };
    match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(tcp) => {
            let _ = tcp.set_read_timeout(Some(TIMEOUT));
            let _ = tcp.set_write_timeout(Some(TIMEOUT));
            report.facts.push(format!("transport: connected to {addr}"));
            Some(tcp)
        }
        Err(e) => {
            report.problem(
                Layer::Transport,
                format!("cannot connect to {target}: {e} (is it listening? a NetworkPolicy?)"),
            );
            None
        }
    }
}

/// The server's SPIFFE ID against the one expected.
fn check_identity(report: &mut CheckReport, theirs: Option<SpiffeId>, want: Option<&str>) {
    match (&theirs, want) {
        (Some(id), Some(want)) if id.to_string() != want => report.problem(
            Layer::Identity,
            format!(
                "the server is {id}, not {want}: the Service routes to another workload, or it \
                 runs under another service account"
            ),
        ),
        (None, Some(want)) => report.problem(
            Layer::Identity,
            format!("the server's certificate has no SPIFFE ID; expected {want}"),
        ),
        (Some(id), _) => report.facts.push(format!("identity: the server is {id}")),
        (None, None) => report
            .facts
            .push("identity: the server's certificate has no SPIFFE ID".into()),
    }
}

fn rustls_error(e: &std::io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// Puts a failed handshake (or a refusal after it) in layered terms.
fn explain_failure(
    report: &mut CheckReport,
    e: &std::io::Error,
    seen: Option<&[CertificateDer<'static>]>,
    target: &str,
    ours: &str,
) {
    let Some(error) = rustls_error(e) else {
        let plaintext = matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        );
        report.problem(
            Layer::Transport,
            if plaintext {
                format!(
                    "{target} closed the connection during the handshake ({e}): it may not \
                     speak TLS on this port, or it refused us without an alert"
                )
            } else {
                format!("the handshake with {target} failed: {e}")
            },
        );
        return;
    };
    let theirs = seen
        .and_then(spiffe_of)
        .map(|id| id.to_string())
        .unwrap_or_else(|| "a certificate without a SPIFFE ID".into());
    match error {
        Error::InvalidMessage(_) => {
            report.problem(
                Layer::Transport,
                format!(
                    "{target} does not speak TLS: it answered our ClientHello with something \
                     else (plaintext where mTLS is expected: partial sidecar injection, or a \
                     PERMISSIVE/DISABLE mismatch)"
                ),
            );
        }
        Error::InvalidCertificate(reason) => {
            let (layer, why) = match reason {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    (Layer::Expiry, "it has expired".to_owned())
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                    Layer::Expiry,
                    "it is not valid yet (check the clocks)".to_owned(),
                ),
                CertificateError::UnknownIssuer => (
                    Layer::Trust,
                    "its root is not in our bundle (unknown CA): a rotation not seen by one \
                     side, or another mesh's CA"
                        .to_owned(),
                ),
                CertificateError::BadSignature => (
                    Layer::Chain,
                    "a signature in its chain does not verify".to_owned(),
                ),
                other => (Layer::Trust, format!("{other:?}")),
            };
            report.problem(
                layer,
                format!("the server's certificate ({theirs}) failed verification: {why}"),
            );
        }
        Error::AlertReceived(alert) => {
            let (layer, why) = match alert {
                AlertDescription::UnknownCA => (
                    Layer::Trust,
                    "it does not trust our CA: its bundle lacks the root our certificate \
                     chains to",
                ),
                AlertDescription::CertificateExpired => {
                    (Layer::Expiry, "our certificate has expired")
                }
                AlertDescription::CertificateRequired => {
                    (Layer::Tls, "it requires a client certificate and got none")
                }
                AlertDescription::BadCertificate | AlertDescription::UnsupportedCertificate => {
                    (Layer::Profile, "it found our certificate unusable")
                }
                AlertDescription::AccessDenied => (
                    Layer::Identity,
                    "it refuses our identity (an authorization policy)",
                ),
                _ => (Layer::Tls, "it aborted the handshake"),
            };
            report.problem(
                layer,
                format!("the server refused our certificate ({ours}) with alert {alert:?}: {why}"),
            );
        }
        other => report.problem(
            Layer::Tls,
            format!("the handshake with {target} failed: {other}"),
        ),
    }
}
