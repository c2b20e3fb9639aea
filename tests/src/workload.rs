//! The workload agent in tests: `ca-server agent` as a process serving a socket in a temp
//! dir, and the third-party clients (Python packages installed by `.ci/run`) that talk to it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{TestServer, bin};

/// Whether `python3` can import `module`. `.ci/run` installs the clients and sets
/// `CA_TEST_PYTHON_CLIENTS=1`, and then a missing one fails the test; elsewhere (a plain
/// `cargo test` on a fresh clone) the test says it is skipped.
pub fn python_has(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CA_TEST_PYTHON_CLIENTS").is_none(),
            "python3 cannot import {module}: .ci/run installs it"
        );
        eprintln!("skipped: python3 cannot import {module} (.ci/run installs it)");
    }
    ok
}

/// Runs `python3 ARGS...`, which must succeed, and parses what it printed as JSON.
pub fn python_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "python3 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

/// A script of `tests/py/`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// A process whose stdout lines arrive on a channel.
pub struct LineProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, parsed.
    pub seen: Vec<serde_json::Value>,
}

impl LineProcess {
    /// Starts `command` with stdout piped.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the process");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads what has arrived so far into [`LineProcess::seen`], without waiting.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen
                .push(serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line)));
        }
    }

    /// The next line that satisfies `wanted`, within `limit` (others are skipped).
    pub fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        mut wanted: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let value: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
                    self.seen.push(value.clone());
                    if wanted(&value) {
                        return value;
                    }
                }
                Err(_) => {
                    let last = &self.seen[self.seen.len().saturating_sub(5)..];
                    panic!("{what}: not within {limit:?}; the last lines: {last:?}")
                }
            }
        }
    }
}

impl Drop for LineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ca-server agent` serving a Workload API socket for the identity `token` proves.
pub struct AgentProcess {
    child: Child,
    /// The socket file.
    pub socket: PathBuf,
    /// Its files (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
    pub out: PathBuf,
    log: PathBuf,
}

/// What an agent's `--ca-bundle` is.
enum Bootstrap {
    /// A copy of this bundle, written to the agent's directory.
    Copy(String),
    /// The server's own `trust-bundle.pem`, which it rewrites on every change (as a
    /// ConfigMap the server publishes is, mounted in the agent's pod).
    Follow,
}

impl AgentProcess {
    /// Starts an agent in `dir` against `server`, with `token` (a JWT) and `extra` flags; its
    /// `--ca-bundle` is a copy of the server's bundle as it is now.
    pub fn start(server: &TestServer, dir: &Path, token: &str, extra: &[&str]) -> Self {
        Self::start_with_bundle(server, dir, token, &server.bundle_pem(), extra)
    }

    /// [`AgentProcess::start`] with `bundle` (PEM) as its `--ca-bundle` (an old bundle, say).
    pub fn start_with_bundle(
        server: &TestServer,
        dir: &Path,
        token: &str,
        bundle: &str,
        extra: &[&str],
    ) -> Self {
        Self::launch(
            server,
            dir,
            token,
            extra,
            false,
            Bootstrap::Copy(bundle.to_owned()),
        )
    }

    /// [`AgentProcess::start`] with the server's `trust-bundle.pem` itself as its
    /// `--ca-bundle`, following the bundle as it is published.
    pub fn start_following(server: &TestServer, dir: &Path, token: &str, extra: &[&str]) -> Self {
        Self::launch(server, dir, token, extra, false, Bootstrap::Follow)
    }

    /// [`AgentProcess::start`], naming the socket in `SPIFFE_ENDPOINT_SOCKET` rather than
    /// with `--socket`.
    pub fn start_from_env(server: &TestServer, dir: &Path, token: &str, extra: &[&str]) -> Self {
        Self::launch(
            server,
            dir,
            token,
            extra,
            true,
            Bootstrap::Copy(server.bundle_pem()),
        )
    }

    fn launch(
        server: &TestServer,
        dir: &Path,
        token: &str,
        extra: &[&str],
        env: bool,
        bootstrap: Bootstrap,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("agent dir");
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).expect("token file");
        let bootstrap = match bootstrap {
            Bootstrap::Copy(pem) => {
                let file = dir.join("bootstrap.pem");
                std::fs::write(&file, pem).expect("bootstrap bundle");
                file
            }
            Bootstrap::Follow => server.data_dir.join("trust-bundle.pem"),
        };
        let socket = dir.join("agent.sock");
        let out = dir.join("out");
        let log = dir.join("agent.log");
        let uri = format!("unix://{}", socket.display());
        let mut command = Command::new(bin());
        command.arg("agent");
        if env {
            command.env("SPIFFE_ENDPOINT_SOCKET", &uri);
        } else {
            command.arg("--socket").arg(&uri);
        }
        let child = command
            .arg("--server")
            .arg(format!("https://{}", server.grpc))
            .arg("--ca-bundle")
            .arg(&bootstrap)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--out-dir")
            .arg(&out)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting the agent");
        Self {
            child,
            socket,
            out,
            log,
        }
    }

    /// `unix://<socket>`, as SPIFFE libraries take it.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the socket exists and the agent serves its first certificate and bundle.
    pub fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        let ready = || {
            self.socket.exists()
                && self.out.join("cert-chain.pem").exists()
                && self.out.join("root-cert.pem").exists()
        };
        while !ready() {
            assert!(
                start.elapsed() < limit,
                "agent not ready within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("waiting for the agent")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A channel over the agent's Unix socket.
pub async fn uds_channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_owned();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(socket).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(connector)
        .await
        .expect("connecting to the agent's socket")
}

/// Our own Workload API client on the agent's socket, for the contract's edges (the
/// third-party clients always send the header, so they cannot show what happens without it).
pub async fn uds_client(
    socket: &Path,
) -> ca_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    ca_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        uds_channel(socket).await,
    )
}

/// Calls `path` (a method the agent may not know) with an empty message and the security
/// header; the status it answers.
pub async fn call_unknown(socket: &Path, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(uds_channel(socket).await);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).expect("a path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary(request, path, codec)
        .await
        .expect_err("an unknown method")
}

/// The X.509-SVID the agent's socket serves now: its leaf's serial (hex, as the audit log
/// gives it) and the whole response.
pub async fn served_svid(socket: &Path) -> (String, ca_proto::workload::X509svidResponse) {
    let mut client = uds_client(socket).await;
    let mut request = tonic::Request::new(ca_proto::workload::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let mut stream = client
        .fetch_x509svid(request)
        .await
        .expect("FetchX509SVID")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("a message")
        .expect("not the end");
    // The chain is DER concatenated; the serial is the first certificate's.
    (crate::serial_of_der(&response.svids[0].x509_svid), response)
}

/// `GET /healthz` on an agent's `--health-listen`: the status and the JSON.
pub fn agent_health(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = crate::http_get(addr, "/healthz").expect("GET /healthz");
    (status, serde_json::from_str(&body).expect("JSON"))
}

/// DER certificates concatenated, as the Workload API carries chains and bundles, apart.
pub fn split_der(mut concatenated: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let mut certificates = Vec::new();
    while !concatenated.is_empty() {
        let (rest, _) =
            x509_parser::parse_x509_certificate(concatenated).expect("a DER certificate");
        let used = concatenated.len() - rest.len();
        certificates.push(rustls::pki_types::CertificateDer::from(
            concatenated[..used].to_vec(),
        ));
        concatenated = rest;
    }
    certificates
}

/// What the agent on `socket` serves now, as a [`crate::mesh::Proxy`] a workload would build
/// from it: the SVID and its key, and the bundle.
pub async fn agent_proxy(socket: &Path) -> crate::mesh::Proxy {
    let (_, response) = served_svid(socket).await;
    let svid = &response.svids[0];
    let chain = split_der(&svid.x509_svid);
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("the leaf");
    let leaf_issuer = leaf.issuer().to_string();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        svid.x509_svid_key.clone(),
    ));
    let signing = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)
        .expect("the SVID's key");
    crate::mesh::Proxy::holding(crate::mesh::Held {
        certified: std::sync::Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
        leaf_issuer,
        roots: split_der(&svid.bundle),
        sequence: 0,
        certificates: 1,
    })
}
