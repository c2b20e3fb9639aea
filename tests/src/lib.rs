//! Helpers for the end-to-end tests: run the real `ca-server` binary on free loopback ports
//! with a temporary data dir, talk to it over gRPC/TLS trusting only its bundle file, and mint
//! test tokens with a test issuer whose JWKS the server reads from a file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod jwks;
pub mod kube;
pub mod mesh;
pub mod peer;
pub mod pki;
pub mod podcert;
pub mod workload;
pub mod ztunnel;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ca_proto::istio::v1::auth::IstioCertificateRequest;
use ca_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The `ca-server` binary that `cargo test --workspace` built beside this test.
pub fn bin() -> PathBuf {
    if let Ok(path) = std::env::var("CA_SERVER_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> → target/<profile>/ca-server
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join("ca-server");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p ca-server`) first",
        path.display()
    );
    path
}

/// Runs `ca-server ARGS` to completion.
pub fn ca_server(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ca-server")
}

/// A port on 127.0.0.1 that was free a moment ago, for a server started next.
///
/// It is taken from below the kernel's ephemeral range (`ip_local_port_range`), so no
/// outgoing connection (to PostgreSQL, say) can be given it as its source port between this
/// check and the server's bind; a port that `bind(0)` hands out can be. Within this process
/// each call moves on to the next port, so parallel tests never pick the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (first, count) = ports_below_ephemeral();
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..count {
        let port =
            first + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % count) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The ports `free_port` takes from: up to 12,000 just below the ephemeral range, never under
/// 10,000.
fn ports_below_ephemeral() -> (u16, u32) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let first = low.saturating_sub(12_000).max(10_000);
    (first, u32::from(low.saturating_sub(first)).max(1))
}

/// A plain HTTP GET on loopback; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The environment variable naming a PostgreSQL server for the suite. Set to an
/// administrator's URL (`postgres://postgres:postgres@127.0.0.1:5432/postgres`), it makes
/// every [`TestServer`] (and its CLI calls) use a database of its own on that server
/// instead of the embedded SQLite file, so the same tests run against both stores.
pub const POSTGRES_ENV: &str = "CA_TEST_POSTGRES_URL";

/// The PostgreSQL administrator URL the suite runs against, if any (see [`POSTGRES_ENV`]).
pub fn postgres_admin_url() -> Option<String> {
    std::env::var(POSTGRES_ENV).ok().filter(|v| !v.is_empty())
}

/// True when the suite runs on SQLite; a test of something only SQLite has (its files, its
/// locks) calls this first and returns early otherwise, saying so.
pub fn sqlite_only(what: &str) -> bool {
    if postgres_admin_url().is_some() {
        eprintln!("skipped on PostgreSQL: {what} is about the SQLite file");
        return false;
    }
    true
}

/// A database of its own on the PostgreSQL server for `data_dir` (named after the path, so a
/// server started again on the same data dir finds its store), created if missing. Returns
/// its URL.
pub fn postgres_database_for(admin_url: &str, data_dir: &Path) -> String {
    let name = format!("ca_test_{:016x}", path_hash(data_dir));
    let exists = admin_query(
        admin_url,
        format!("SELECT datname FROM pg_database WHERE datname = '{name}'"),
    );
    if exists.is_empty() {
        admin_query(admin_url, format!("CREATE DATABASE {name}"));
    }
    database_url_on(admin_url, &name)
}

/// `admin_url` pointing at database `name` instead.
fn database_url_on(admin_url: &str, name: &str) -> String {
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("an admin URL ending in /DATABASE");
    format!("{base}/{name}")
}

/// Runs one statement as the PostgreSQL administrator (on a thread of its own, so that sync
/// and async tests alike can call it); returns the first column of each row, as text.
fn admin_query(admin_url: &str, statement: String) -> Vec<String> {
    let admin = admin_url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use sqlx::{Connection, Row};
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("connect to the PostgreSQL server named by CA_TEST_POSTGRES_URL");
            let rows = sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
            rows.iter()
                .map(|r| r.try_get::<String, _>(0).unwrap_or_default())
                .collect()
        })
    })
    .join()
    .expect("a PostgreSQL administration statement")
}

/// A copy of `server`'s store, which must be stopped, for a test to tamper with: the SQLite
/// files copied to `to` (a path for the copy's file), or on PostgreSQL a database created
/// from the server's as a template. Returns the copy's URL; a second call replaces the copy.
pub fn copy_store(server: &TestServer, to: &Path) -> String {
    if let Some(admin) = postgres_admin_url() {
        let original = server.database_url();
        let (_, name) = original.rsplit_once('/').expect("database URL");
        let copy = format!("{name}_copy");
        admin_query(&admin, format!("DROP DATABASE IF EXISTS {copy}"));
        admin_query(&admin, format!("CREATE DATABASE {copy} TEMPLATE {name}"));
        return database_url_on(&admin, &copy);
    }
    let file = to.file_name().expect("file name").to_string_lossy();
    for suffix in ["", "-wal", "-shm"] {
        let from = server.data_dir.join(format!("ca.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, to.with_file_name(format!("{file}{suffix}"))).expect("copy");
        }
    }
    format!("sqlite://{}", to.display())
}

/// Runs `statements` on the store at `url` (either database), as someone with access to
/// the database behind the server's back would.
pub async fn run_sql(url: &str, statements: &[&str]) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(url).await.expect("connect");
    for s in statements {
        sqlx::query(sqlx::AssertSqlSafe(s.to_string()))
            .execute(&mut db)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    db.close().await.expect("close");
}

/// FNV-1a of a path: a stable, short name for its database.
fn path_hash(path: &Path) -> u64 {
    path.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A running `ca-server run`, killed on drop.
pub struct TestServer {
    /// Its data dir (kept across restarts).
    pub data_dir: PathBuf,
    /// gRPC/HTTPS.
    pub grpc: SocketAddr,
    /// Health.
    pub http: SocketAddr,
    args: Vec<String>,
    /// `--database-url` for it and its CLI calls: its own database when the suite runs on
    /// PostgreSQL, or another server's store (see [`TestServer::start_on`]).
    store_url: Option<String>,
    /// Extra environment for it and its CLI calls.
    env: Vec<(String, String)>,
    child: Option<Child>,
    stderr_path: PathBuf,
    /// `RUST_LOG` for the server (default `info`).
    pub log_filter: String,
    /// A command the server runs under (`prlimit --nofile=…`, say), if any.
    wrapper: Vec<String>,
}

impl TestServer {
    /// Starts the server on `data_dir` with `args` (beyond data dir and listeners) and waits
    /// until `/readyz` answers 200.
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(data_dir, args, &[])
    }

    /// [`TestServer::start`] with extra environment variables (for it and its CLI calls).
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut server = Self::configured(data_dir, args);
        server.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        server.spawn();
        server
    }

    /// [`TestServer::start`] on the store at `database_url` (another server's, say: a
    /// replica).
    pub fn start_on(data_dir: &Path, database_url: &str, args: &[&str]) -> Self {
        let mut server = Self::configured(data_dir, args);
        server.store_url = Some(database_url.to_owned());
        server.spawn();
        server
    }

    /// [`TestServer::start`] under `wrapper` (a command that runs the binary it is given
    /// last, such as `prlimit --nofile=128:128`).
    pub fn start_wrapped(data_dir: &Path, args: &[&str], wrapper: &[&str]) -> Self {
        let mut server = Self::configured(data_dir, args);
        server.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        server.spawn();
        server
    }

    /// [`TestServer::start`] logging everything, down to `trace`.
    pub fn start_verbose(data_dir: &Path, args: &[&str]) -> Self {
        let mut server = Self::configured(data_dir, args);
        server.log_filter = "trace".into();
        server.spawn();
        server
    }

    /// A server not started yet: free loopback ports, its own store (a PostgreSQL database
    /// when the suite runs there), logging at `info`.
    fn configured(data_dir: &Path, args: &[&str]) -> Self {
        let mut server = Self::stopped();
        server.data_dir = data_dir.to_owned();
        server.grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        server.http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        server.args = args.iter().map(|s| s.to_string()).collect();
        server.store_url =
            postgres_admin_url().map(|admin| postgres_database_for(&admin, data_dir));
        server.stderr_path = data_dir.with_extension("stderr.log");
        server
    }

    fn spawn(&mut self) {
        let stderr = std::fs::File::create(&self.stderr_path).expect("stderr log");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = command
            .arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .args(
                self.store_url
                    .iter()
                    .flat_map(|url| ["--database-url", url.as_str()]),
            )
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", &self.log_filter)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ca-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(self.http, "/readyz") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("ca-server exited with {status}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "ca-server not ready after 60 s:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the server logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The value of the sample `series` (a metric's name with its labels, as exported,
    /// e.g. `ca_refusals_total{code="UNAUTHENTICATED",reason="token"}`) in `/metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = http_get(self.http, "/metrics").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// CPU time the server process has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let pid = self.child.as_ref().expect("the server is running").id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
        // The fields after the command (in parentheses, which may hold spaces): utime and
        // stime are the 12th and 13th, in clock ticks (100 a second on Linux).
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        ticks as f64 / 100.0
    }

    /// The server process's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Kills the server (SIGKILL) and starts it again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A server that is not running (a placeholder).
    pub fn stopped() -> Self {
        Self {
            data_dir: PathBuf::new(),
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            args: Vec::new(),
            store_url: None,
            env: Vec::new(),
            child: None,
            stderr_path: PathBuf::new(),
            log_filter: "info".into(),
            wrapper: Vec::new(),
        }
    }

    /// Sends SIGTERM and waits (up to `limit`) for the process to exit; returns its status, or
    /// `None` if it was still running at the limit (it is then killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts the server again after [`TestServer::kill`] or [`TestServer::terminate`].
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// `<data-dir>/trust-bundle.pem`.
    pub fn bundle_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("trust-bundle.pem")).expect("bundle file")
    }

    /// The chain the gRPC listener presents in a TLS handshake (verified against the bundle
    /// file), leaf first.
    pub fn served_chain(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.try_served_chain().expect("handshake")
    }

    /// [`TestServer::served_chain`], or why the handshake failed (a chain the bundle file
    /// does not hold the root of yet, say).
    pub fn try_served_chain(
        &self,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
        let config = Arc::new(crate::ztunnel::ztunnel_tls(self));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("a DNS name");
        let mut conn = rustls::ClientConnection::new(config, name).expect("a client session");
        let mut tcp = std::net::TcpStream::connect(self.grpc).expect("connect");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
        }
        Ok(conn.peer_certificates().expect("a chain").to_vec())
    }

    /// `sqlite://<data-dir>/ca.db`, or its PostgreSQL database's URL.
    pub fn database_url(&self) -> String {
        match &self.store_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("ca.db").display()),
        }
    }

    /// A gRPC client over TLS trusting only the bundle file, connecting to `https://127.0.0.1:PORT`
    /// (so the server's IP SAN is what gets verified).
    pub async fn client(&self) -> IstioCertificateServiceClient<Channel> {
        IstioCertificateServiceClient::new(self.channel().await)
    }

    /// The TLS channel behind [`TestServer::client`], for the other services.
    pub async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.bundle_pem()));
        Channel::from_shared(format!("https://{}", self.grpc))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    }

    /// The `grpc.health.v1` status of `service` ("" for the server as a whole).
    pub async fn grpc_health(&self, service: &str) -> i32 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    }

    /// Runs a CLI subcommand against this server's data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<&str> = args.to_vec();
        let dir = self.data_dir.to_str().expect("utf-8 path");
        full.extend(["--data-dir", dir]);
        if let Some(url) = &self.store_url {
            full.extend(["--database-url", url]);
        }
        Command::new(bin())
            .args(&full)
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run ca-server")
    }
}

impl TestServer {
    /// `root activate ID` as an operator runs it: once every bundle client this server has
    /// seen holds the authority's root (the CLI refuses until then, saying so), within 20 s.
    pub fn activate(&self, id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["root", "activate", id]);
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            if out.status.success() {
                return stderr;
            }
            assert!(
                stderr.contains("still hold a bundle without") && Instant::now() < deadline,
                "root activate {id}: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a CLI subcommand against this server's store, asserts it succeeded, and returns
    /// what it printed.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `CreateCertificate` with `token` (if any).
pub async fn create_certificate(
    client: &mut IstioCertificateServiceClient<Channel>,
    token: Option<&str>,
    csr: &str,
    validity_secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity_secs,
        metadata: None,
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    client
        .create_certificate(request)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Sends `MintJwtSvid` to `server` with `token` (if any).
pub async fn mint_jwt_svid(
    server: &TestServer,
    token: Option<&str>,
    audience: &[&str],
    ttl_seconds: i64,
) -> Result<ca_proto::ca::v1::MintJwtSvidResponse, tonic::Status> {
    use ca_proto::ca::v1::jwt_svid_service_client::JwtSvidServiceClient;
    let mut request = tonic::Request::new(ca_proto::ca::v1::MintJwtSvidRequest {
        audience: audience.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds,
    });
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    JwtSvidServiceClient::new(server.channel().await)
        .mint_jwt_svid(request)
        .await
        .map(tonic::Response::into_inner)
}

/// A CSR for a fresh key of `alg`, with the URI SANs given (none for an empty request).
pub fn csr(alg: &'static rcgen::SignatureAlgorithm, uri_sans: &[&str]) -> (String, rcgen::KeyPair) {
    let key = if alg == &rcgen::PKCS_RSA_SHA256 {
        rcgen::KeyPair::generate_rsa_for(alg, rcgen::RsaKeySize::_2048)
    } else {
        rcgen::KeyPair::generate_for(alg)
    }
    .expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = uri_sans
        .iter()
        .map(|s| rcgen::SanType::URI((*s).try_into().expect("uri")))
        .collect();
    let pem = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (pem, key)
}

/// A token issuer for tests: an ES256 key whose JWKS the server reads from a file.
pub struct TestIssuer {
    /// Its `iss`.
    pub iss: String,
    /// Its `kid`.
    pub kid: String,
    key: rcgen::KeyPair,
    /// Where its JWKS is written.
    pub jwks_path: PathBuf,
}

impl TestIssuer {
    /// The node the pods of [`TestIssuer::claims`] run on.
    pub const NODE: &'static str = "test-node";

    /// A new issuer; writes its JWKS into `dir`.
    pub fn new(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        std::fs::create_dir_all(dir).expect("issuer dir");
        let issuer = Self {
            iss: "https://kubernetes.default.svc.cluster.local".to_owned(),
            kid: "test-key-1".to_owned(),
            key,
            jwks_path: dir.join("jwks.json"),
        };
        std::fs::write(&issuer.jwks_path, issuer.jwks()).expect("write jwks");
        issuer
    }

    /// Its JWK Set.
    pub fn jwks(&self) -> String {
        let raw = self.key.public_key_raw();
        let (x, y) = raw[1..].split_at(32);
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string()
    }

    /// The public key bytes (the uncompressed point), as an attacker would have them.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The server flags that configure this issuer.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--token-issuer".into(),
            self.iss.clone(),
            "--token-jwks-file".into(),
            self.jwks_path.display().to_string(),
        ]
    }

    /// Claims of a good projected token for `ns`/`sa`, bound to pod `<sa>-pod` on node
    /// [`TestIssuer::NODE`] (as Kubernetes 1.30 and later issue them).
    pub fn claims(&self, ns: &str, sa: &str) -> serde_json::Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        serde_json::json!({
            "iss": self.iss,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "exp": now + 600, "iat": now, "nbf": now,
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": "sa-uid"},
                "pod": {"name": format!("{sa}-pod"), "uid": "pod-uid"},
                "node": {"name": Self::NODE, "uid": "node-uid"}
            }
        })
    }

    /// Signs `claims` with this issuer's key and kid.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_with(&self.key, Some(&self.kid), claims)
    }

    /// Signs `claims` with `key` under `kid`.
    pub fn sign_with(
        &self,
        key: &rcgen::KeyPair,
        kid: Option<&str>,
        claims: &serde_json::Value,
    ) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        let encoding =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("key");
        jsonwebtoken::encode(&header, claims, &encoding).expect("sign")
    }

    /// A good token for `ns`/`sa`.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.sign(&self.claims(ns, sa))
    }
}

/// base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// DER of the first certificate in `pem`.
pub fn der(pem: &str) -> Vec<u8> {
    let mut reader = pem.as_bytes();
    rustls_pemfile_certs(&mut reader).remove(0)
}

pub(crate) fn rustls_pemfile_certs(reader: &mut &[u8]) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(reader)
        .map(|c| c.expect("pem").as_ref().to_vec())
        .collect()
}

/// Checks `chain` (leaf first, root last) with rustls-webpki against `root_pem`, for client
/// and server use at the current time.
pub fn webpki_verify(chain: &[String], root_pem: &str) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let root_der = CertificateDer::from(der(root_pem));
    let anchor = webpki::anchor_from_trusted_cert(&root_der).map_err(|e| e.to_string())?;
    let leaf_der = CertificateDer::from(der(&chain[0]));
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| e.to_string())?;
    let intermediates: Vec<CertificateDer<'static>> = chain[1..chain.len() - 1]
        .iter()
        .map(|p| CertificateDer::from(der(p)))
        .collect();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs `openssl verify -x509_strict -purpose PURPOSE` on the leaf of `chain` against its root.
pub fn openssl_verify(dir: &Path, chain: &[String], purpose: &str) -> Result<(), String> {
    let root = dir.join("root.pem");
    let leaf = dir.join("leaf.pem");
    let untrusted = dir.join("untrusted.pem");
    std::fs::write(&root, chain.last().expect("root")).expect("write");
    std::fs::write(&leaf, &chain[0]).expect("write");
    std::fs::write(&untrusted, chain[1..chain.len() - 1].concat()).expect("write");
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(&root);
    if chain.len() > 2 {
        cmd.arg("-untrusted").arg(&untrusted);
    }
    let out = cmd
        .arg(&leaf)
        .output()
        .expect("openssl is needed for these tests (.ci/run installs it)");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Lines of `audit list --format json`, parsed.
pub fn audit_json(server: &TestServer, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "list", "--format", "json"];
    if !extra.contains(&"--limit") {
        args.extend(["--limit", "100000"]);
    }
    args.extend_from_slice(extra);
    let out = server.cli(&args);
    assert!(
        out.status.success(),
        "audit list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// The serial of the first certificate in `pem`, as the audit log writes it (lowercase hex,
/// no sign-padding zero).
pub fn serial_of(pem: &str) -> String {
    serial_of_der(&der(pem))
}

/// The serial of a DER certificate, as the audit log writes it.
pub fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A server on a fresh data dir with a [`TestIssuer`], for the tests that need nothing more.
pub struct Fixture {
    /// Holds the data dir and the issuer's files.
    pub dir: tempfile::TempDir,
    /// The running server.
    pub server: TestServer,
    /// The token issuer it trusts.
    pub issuer: TestIssuer,
}

impl Fixture {
    /// Starts a server trusting a new [`TestIssuer`], with `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = TestIssuer::new(dir.path());
        let mut flags = issuer.flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = TestServer::start(&dir.path().join("data"), &flags);
        Self {
            dir,
            server,
            issuer,
        }
    }
}

/// The serials of the `issued` events for `spiffe_id` in `server`'s audit log.
pub fn recorded_serials(
    server: &TestServer,
    spiffe_id: &str,
) -> std::collections::BTreeSet<String> {
    audit_json(
        server,
        &[
            "--kind",
            "issued",
            "--spiffe-id",
            spiffe_id,
            "--limit",
            "1000000",
        ],
    )
    .iter()
    .filter_map(|e| e["serial"].as_str().map(str::to_owned))
    .collect()
}

/// Asserts that `audit verify` passes on `server`'s store.
pub fn assert_audit_intact(server: &TestServer) {
    let verify = server.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "audit verify failed: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// Polls `done` every 50 ms until it holds; fails naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
