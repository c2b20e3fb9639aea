//! A stand-in for the parts of the Kubernetes API a pod-certificate signer uses
//! (`certificates.k8s.io/v1beta1`): PodCertificateRequests listed, watched (chunked JSON
//! lines, 410 for a resourceVersion compacted away), read and answered through `status`,
//! and ClusterTrustBundles. It enforces what the API server enforces: a write naming a stale
//! resourceVersion is a 409 Conflict; a status that breaks a rule (more or less than one
//! terminal condition, a chain that is not only certificates or longer than 100 KiB,
//! notBefore/notAfter unlike the leaf's, notBefore more than 5 minutes off, a lifetime under
//! an hour or over maxExpirationSeconds, beginRefreshAt outside [notBefore + 10 min,
//! notAfter − 10 min], a leaf for another key, a second answer) is a 422 Invalid; a
//! ClusterTrustBundle whose name does not start with its signer's, or whose bundle holds
//! anything but CA certificates, or one twice, is a 422 too.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use x509_parser::prelude::FromDer;

/// A request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path and query.
    pub path: String,
    /// What it answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion given out.
    version: u64,
    /// Watches from a version below this are 410 Gone.
    compacted: u64,
    /// PodCertificateRequests by (namespace, name).
    requests: BTreeMap<(String, String), serde_json::Value>,
    /// ClusterTrustBundles by name.
    bundles: BTreeMap<String, serde_json::Value>,
    /// Every change: (version, type, object).
    events: Vec<(u64, &'static str, serde_json::Value)>,
    /// Bumped to end every open watch.
    watch_generation: u64,
    seen: Vec<Seen>,
    /// Status writes answered 422, with the reason.
    rejected: Vec<String>,
    /// When set, the next status write to this request is preceded by another writer's
    /// change to it (its version moves on, it stays unanswered).
    interfere: Option<((String, String), Interference)>,
    /// Status writes answered 403, as without the RBAC to make them.
    forbid_status_writes: bool,
    /// What the next watches do instead of serving, one each.
    watch_trouble: std::collections::VecDeque<WatchTrouble>,
    /// Padding an endless line got into the socket before its reader hung up.
    endless_bytes_sent: usize,
    /// The one version PodCertificateRequests are served in (`v1beta1` unless started
    /// otherwise); the other is 404.
    served_version: &'static str,
}

/// A watch gone wrong, as a broken proxy or a hostile API server would serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchTrouble {
    /// One line that never ends: padding sent until the reader hangs up (64 MiB at most).
    EndlessLine,
    /// The response's headers, then nothing at all, not even the end at `timeoutSeconds`
    /// (a connection a load balancer dropped without a word), for up to two minutes.
    Silent,
    /// Events no API server sends: objects of the wrong shape (a number for the signer, a
    /// string for the object, an unknown type), then a line nested 100,000 deep.
    Garbage,
}

/// What another writer does to a request just before the signer's next status write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interference {
    /// Changes it (a label): it stays unanswered, its version moves on.
    Touch,
    /// Answers it (`Failed`, as another signer).
    Answer,
}

/// The fake API server, until dropped.
pub struct FakeCertificatesApi {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Its CA (PEM file) for `--kube-ca-file`.
    pub ca_file: PathBuf,
    /// A token file for `--kube-token-file`.
    pub token_file: PathBuf,
    state: Arc<(Mutex<State>, Condvar)>,
}

/// The key a request carries, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    /// `pkixPublicKey` + `proofOfPossession` (1.35).
    Pkix,
    /// `stubPKCS10Request` (1.36).
    Stub,
}

/// A key made with OpenSSL, in the forms a kubelet sends.
pub struct PodKey {
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// A CSR holding only the key, DER.
    pub stub_der: Vec<u8>,
}

impl PodKey {
    /// A key of the projection's `keyType` (`ECDSAP256`, `ECDSAP384`, `ECDSAP521`,
    /// `ED25519`, `RSA3072`, `RSA4096`), made in `dir`.
    pub fn generate(dir: &Path, key_type: &str) -> Self {
        let key = dir.join(format!("{key_type}.key"));
        let mut args: Vec<&str> = vec!["genpkey", "-out", key.to_str().expect("path")];
        match key_type {
            "ECDSAP256" => args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            "ECDSAP384" => args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
            "ECDSAP521" => args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"]),
            "ED25519" => args.extend(["-algorithm", "ED25519"]),
            "RSA3072" => args.extend(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"]),
            "RSA4096" => args.extend(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"]),
            other => panic!("no key type {other}"),
        }
        openssl(&args);
        let spki = dir.join(format!("{key_type}.spki"));
        openssl(&[
            "pkey",
            "-in",
            key.to_str().expect("path"),
            "-pubout",
            "-outform",
            "DER",
            "-out",
            spki.to_str().expect("path"),
        ]);
        let stub = dir.join(format!("{key_type}.csr"));
        openssl(&[
            "req",
            "-new",
            "-key",
            key.to_str().expect("path"),
            "-subj",
            "/",
            "-outform",
            "DER",
            "-out",
            stub.to_str().expect("path"),
        ]);
        Self {
            key_pem: std::fs::read_to_string(&key).expect("key"),
            spki_der: std::fs::read(&spki).expect("spki"),
            stub_der: std::fs::read(&stub).expect("csr"),
        }
    }
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for these tests (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}

impl FakeCertificatesApi {
    /// Starts it, serving PodCertificateRequests in `v1beta1` (1.35, 1.36), writing its CA
    /// and token files into `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_serving(dir, "v1beta1")
    }

    /// Starts it, serving PodCertificateRequests in `version` only.
    pub fn start_serving(dir: &Path, version: &'static str) -> Self {
        let (config, ca_pem) = crate::kube::loopback_tls("fake certificates api ca");
        let ca_file = dir.join("certs-api-ca.crt");
        std::fs::write(&ca_file, ca_pem).expect("write ca");
        let token_file = dir.join("certs-api-token");
        std::fs::write(&token_file, "signer-token\n").expect("write token");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let state = Arc::new((
            Mutex::new(State {
                served_version: version,
                ..State::default()
            }),
            Condvar::new(),
        ));
        {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    // As an API server does (Go sets it on every connection).
                    let _ = stream.set_nodelay(true);
                    let config = Arc::clone(&config);
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(conn, stream), &state);
                    });
                }
            });
        }
        Self {
            url: format!("https://{addr}"),
            ca_file,
            token_file,
            state,
        }
    }

    /// The `run` flags pointing the server here.
    pub fn api_flags(&self) -> Vec<String> {
        vec![
            "--kube-api-url".into(),
            self.url.clone(),
            "--kube-ca-file".into(),
            self.ca_file.display().to_string(),
            "--kube-token-file".into(),
            self.token_file.display().to_string(),
        ]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().expect("lock")
    }

    /// Creates a request as a kubelet would for pod `pod` (service account `sa`) in `ns`,
    /// for `signer`, with `key` in `field`; returns its name.
    #[allow(clippy::too_many_arguments)]
    pub fn create_request(
        &self,
        ns: &str,
        pod: &str,
        sa: &str,
        signer: &str,
        key: &PodKey,
        field: KeyField,
        max_expiration_secs: Option<i64>,
    ) -> String {
        let mut key_fields = serde_json::Map::new();
        match field {
            KeyField::Pkix => {
                key_fields.insert("pkixPublicKey".into(), b64(&key.spki_der).into());
                key_fields.insert(
                    "proofOfPossession".into(),
                    b64(b"checked-by-the-api-server").into(),
                );
            }
            KeyField::Stub => {
                key_fields.insert("stubPKCS10Request".into(), b64(&key.stub_der).into());
            }
        }
        self.create_request_with_key_fields(ns, pod, sa, signer, key_fields, max_expiration_secs)
    }

    /// As [`FakeCertificatesApi::create_request`], with the key fields of the spec given as
    /// they are (what no API server would let through: a key that is not base64, or none).
    pub fn create_request_with_key_fields(
        &self,
        ns: &str,
        pod: &str,
        sa: &str,
        signer: &str,
        key_fields: serde_json::Map<String, serde_json::Value>,
        max_expiration_secs: Option<i64>,
    ) -> String {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let name = format!("{pod}-pcr-{version}");
        let mut spec = serde_json::json!({
            "signerName": signer,
            "podName": pod,
            "podUID": format!("pod-uid-{pod}"),
            "serviceAccountName": sa,
            "serviceAccountUID": format!("sa-uid-{sa}"),
            "nodeName": "node-1",
            "nodeUID": "node-uid-1",
            "maxExpirationSeconds": max_expiration_secs.unwrap_or(86_400),
        });
        for (field, value) in key_fields {
            spec[field] = value;
        }
        let object = serde_json::json!({
            "apiVersion": format!("certificates.k8s.io/{}", state.served_version),
            "kind": "PodCertificateRequest",
            "metadata": {
                "namespace": ns,
                "name": name,
                "uid": format!("uid-{name}"),
                "resourceVersion": version.to_string(),
                "generation": 1,
                "creationTimestamp": now_text(),
            },
            "spec": spec,
            "status": {},
        });
        state
            .requests
            .insert((ns.to_owned(), name.clone()), object.clone());
        state.events.push((version, "ADDED", object));
        self.state.1.notify_all();
        name
    }

    /// The request `ns`/`name` as stored.
    pub fn request(&self, ns: &str, name: &str) -> serde_json::Value {
        self.lock()
            .requests
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
            .expect("no such request")
    }

    /// Waits until `ns`/`name` is answered; its status.
    pub fn wait_answered(&self, ns: &str, name: &str, limit: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let object = self.request(ns, name);
            if terminal(&object).is_some() {
                return object["status"].clone();
            }
            assert!(
                start.elapsed() < limit,
                "{ns}/{name} not answered within {limit:?}; rejected writes: {:?}",
                self.rejected()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Another writer answers `ns`/`name` with `Failed` (its version moves on).
    pub fn answer_as_another_signer(&self, ns: &str, name: &str) {
        self.modify(ns, name, |object, _| {
            object["status"] = serde_json::json!({"conditions": [{"type": "Failed", "status": "True", "reason": "OtherSigner", "message": "answered elsewhere", "lastTransitionTime": now_text()}]});
        });
    }

    /// Another writer changes `ns`/`name` (a label): a MODIFIED event, still unanswered.
    pub fn touch(&self, ns: &str, name: &str) {
        self.modify(ns, name, |object, version| {
            object["metadata"]["labels"] = serde_json::json!({"touched": version.to_string()});
        });
    }

    /// Another writer's change to `ns`/`name`: `change`, a new version, a MODIFIED event.
    fn modify(&self, ns: &str, name: &str, change: impl FnOnce(&mut serde_json::Value, u64)) {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let object = state
            .requests
            .get_mut(&(ns.to_owned(), name.to_owned()))
            .expect("no such request");
        change(object, version);
        object["metadata"]["resourceVersion"] = version.to_string().into();
        let object = object.clone();
        state.events.push((version, "MODIFIED", object));
        self.state.1.notify_all();
    }

    /// Before the next status write to a request of pod `ns`/`pod`, another writer does
    /// `what` to it: the write names a stale version.
    pub fn interfere_before_next_write(&self, ns: &str, pod: &str, what: Interference) {
        self.lock().interfere = Some(((ns.to_owned(), pod.to_owned()), what));
    }

    /// Status writes are refused (403) while `on`, as for a signer without its RBAC.
    pub fn forbid_status_writes(&self, on: bool) {
        self.lock().forbid_status_writes = on;
    }

    /// The next watch opened does `what` instead of serving (once; calls queue up).
    pub fn trouble_next_watch(&self, what: WatchTrouble) {
        self.lock().watch_trouble.push_back(what);
    }

    /// How much of the endless lines so far got into the socket before the reader hung up.
    pub fn endless_bytes_sent(&self) -> usize {
        self.lock().endless_bytes_sent
    }

    /// How many watches have been opened so far.
    pub fn watches_opened(&self) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.method == "GET" && s.path.contains("watch=true"))
            .count()
    }

    /// Forgets the history: a watch from any version given out so far is 410 Gone.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted = state.version + 1;
        state.events.clear();
    }

    /// Ends every open watch (as the API server does at its timeout, or on a restart).
    pub fn end_watches(&self) {
        self.lock().watch_generation += 1;
        self.state.1.notify_all();
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Status writes refused as invalid, and why.
    pub fn rejected(&self) -> Vec<String> {
        self.lock().rejected.clone()
    }

    /// The ClusterTrustBundles.
    pub fn cluster_trust_bundles(&self) -> BTreeMap<String, serde_json::Value> {
        self.lock().bundles.clone()
    }
}

fn now_text() -> String {
    ca_server::rfc3339::text(time::OffsetDateTime::now_utc())
}

/// The terminal condition of `object`, if answered.
fn terminal(object: &serde_json::Value) -> Option<String> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| {
            c["status"] == "True"
                && matches!(c["type"].as_str(), Some("Issued" | "Denied" | "Failed"))
        })
        .and_then(|c| c["type"].as_str().map(str::to_owned))
}

fn serve<S: Read + Write>(stream: S, state: &(Mutex<State>, Condvar)) {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(crate::kube::ApiRequest {
            method, path, body, ..
        }) = crate::kube::read_request(&mut reader)
        else {
            return;
        };
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), crate::kube::percent_decode(v)))
            .collect();
        let mut parts: Vec<&str> = route.trim_start_matches('/').split('/').collect();
        let stream = reader.get_mut();
        // Routes below spell the requests' version v1beta1; the one served is answered as
        // that, the other is not there.
        if parts.get(3) == Some(&"podcertificaterequests")
            || parts.get(5) == Some(&"podcertificaterequests")
        {
            let served = state.0.lock().expect("lock").served_version;
            if parts.get(2) == Some(&served) {
                parts[2] = "v1beta1";
            } else {
                record(state, &method, &path, 404);
                let missing = status(404, "NotFound", "the server could not find the resource");
                if respond(stream, 404, &missing).is_err() {
                    return;
                }
                continue;
            }
        }
        if method == "GET"
            && params.get("watch").map(String::as_str) == Some("true")
            && matches!(
                parts.as_slice(),
                [
                    "apis",
                    "certificates.k8s.io",
                    "v1beta1",
                    "podcertificaterequests"
                ]
            )
        {
            record(state, &method, &path, 200);
            if watch(stream, state, &params).is_err() {
                return;
            }
            continue;
        }
        let (code, json) = answer(state, &method, &parts, &params, &body);
        record(state, &method, &path, code);
        if respond(stream, code, &json).is_err() {
            return;
        }
    }
}

fn respond<S: Write>(stream: &mut S, code: u16, json: &serde_json::Value) -> std::io::Result<()> {
    let text = json.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

fn record(state: &(Mutex<State>, Condvar), method: &str, path: &str, status: u16) {
    state.0.lock().expect("lock").seen.push(Seen {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
    });
}

fn signer_of(params: &BTreeMap<String, String>) -> Option<String> {
    params
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("spec.signerName="))
        .map(str::to_owned)
}

/// A watch: every change after `resourceVersion` for the signer, then new ones as they come,
/// chunked, until `timeoutSeconds` or [`FakeCertificatesApi::end_watches`].
fn watch<S: Write>(
    stream: &mut S,
    state: &(Mutex<State>, Condvar),
    params: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let signer = signer_of(params).unwrap_or_default();
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )?;
    stream.flush()?;
    let chunk = |stream: &mut S, value: &serde_json::Value| -> std::io::Result<()> {
        let line = format!("{value}\n");
        write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
        stream.flush()
    };
    let (lock, changed) = state;
    let mut guard = lock.lock().expect("lock");
    if from < guard.compacted {
        let gone = serde_json::json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({})", guard.compacted))});
        drop(guard);
        chunk(stream, &gone)?;
        write!(stream, "0\r\n\r\n")?;
        return stream.flush();
    }
    let generation = guard.watch_generation;
    if let Some(trouble) = guard.watch_trouble.pop_front() {
        drop(guard);
        return troubled(stream, state, trouble, generation);
    }
    let deadline = Instant::now() + timeout;
    let mut sent = from;
    loop {
        let due: Vec<serde_json::Value> = guard
            .events
            .iter()
            .filter(|(v, _, o)| *v > sent && o["spec"]["signerName"] == *signer)
            .map(|(_, t, o)| serde_json::json!({"type": t, "object": o}))
            .collect();
        sent = guard.version;
        if !due.is_empty() {
            drop(guard);
            for event in &due {
                chunk(stream, event)?;
            }
            guard = lock.lock().expect("lock");
            continue;
        }
        if guard.watch_generation != generation || Instant::now() >= deadline {
            drop(guard);
            write!(stream, "0\r\n\r\n")?;
            return stream.flush();
        }
        guard = changed
            .wait_timeout(guard, Duration::from_millis(100))
            .expect("lock")
            .0;
    }
}

/// A watch gone wrong; always ends the connection (an `Err`).
fn troubled<S: Write>(
    stream: &mut S,
    state: &(Mutex<State>, Condvar),
    trouble: WatchTrouble,
    generation: u64,
) -> std::io::Result<()> {
    let gave_up = || std::io::Error::other("the troubled watch is over");
    match trouble {
        WatchTrouble::EndlessLine => {
            let padding = vec![b'a'; 64 << 10];
            let start = r#"{"type":"ADDED","object":{"padding":""#;
            write!(stream, "{:x}\r\n{start}\r\n", start.len())?;
            for _ in 0..1024 {
                write!(stream, "{:x}\r\n", padding.len())?;
                stream.write_all(&padding)?;
                write!(stream, "\r\n")?;
                stream.flush()?;
                state.0.lock().expect("lock").endless_bytes_sent += padding.len();
            }
            Err(gave_up())
        }
        WatchTrouble::Garbage => {
            let lines = [
                r#"{"type":"ADDED","object":{"metadata":{"uid":"x"},"spec":{"signerName":5}}}"#
                    .to_owned(),
                r#"{"type":"MODIFIED","object":"a string"}"#.to_owned(),
                r#"{"type":"SOMETHING","object":{}}"#.to_owned(),
                format!(r#"{{"type":"ADDED","object":{}"#, "[".repeat(100_000)),
            ];
            for line in lines {
                let line = format!("{line}\n");
                write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
                stream.flush()?;
            }
            Err(gave_up())
        }
        WatchTrouble::Silent => {
            let (lock, changed) = state;
            let until = Instant::now() + Duration::from_secs(120);
            let mut guard = lock.lock().expect("lock");
            while guard.watch_generation == generation && Instant::now() < until {
                guard = changed
                    .wait_timeout(guard, Duration::from_millis(100))
                    .expect("lock")
                    .0;
            }
            Err(gave_up())
        }
    }
}

fn answer(
    state: &(Mutex<State>, Condvar),
    method: &str,
    parts: &[&str],
    params: &BTreeMap<String, String>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (lock, changed) = state;
    let mut state = lock.lock().expect("lock");
    let not_found = (404, status(404, "NotFound", "not found"));
    match (method, parts) {
        (
            "GET",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "podcertificaterequests",
            ],
        ) => {
            let Some(signer) = signer_of(params) else {
                return (
                    400,
                    status(400, "BadRequest", "this fake lists by signer only"),
                );
            };
            let limit: usize = params
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(500);
            let start: usize = params
                .get("continue")
                .and_then(|c| c.strip_prefix("from-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let all: Vec<&serde_json::Value> = state
                .requests
                .values()
                .filter(|o| o["spec"]["signerName"] == *signer)
                .collect();
            let page: Vec<serde_json::Value> = all
                .iter()
                .skip(start)
                .take(limit.max(1))
                .map(|o| (*o).clone())
                .collect();
            let next = start + page.len();
            let cont = if next < all.len() {
                format!("from-{next}")
            } else {
                String::new()
            };
            (
                200,
                serde_json::json!({
                    "apiVersion": format!("certificates.k8s.io/{}", state.served_version),
                    "kind": "PodCertificateRequestList",
                    "metadata": {"resourceVersion": state.version.to_string(), "continue": cont},
                    "items": page,
                }),
            )
        }
        (
            "GET",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "namespaces",
                ns,
                "podcertificaterequests",
                name,
            ],
        ) => match state.requests.get(&((*ns).to_owned(), (*name).to_owned())) {
            Some(o) => (200, o.clone()),
            None => not_found,
        },
        (
            "PUT",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "namespaces",
                ns,
                "podcertificaterequests",
                name,
                "status",
            ],
        ) => {
            let key = ((*ns).to_owned(), (*name).to_owned());
            if state.forbid_status_writes {
                return (
                    403,
                    status(
                        403,
                        "Forbidden",
                        "user cannot update resource podcertificaterequests/status",
                    ),
                );
            }
            let pod = state
                .requests
                .get(&key)
                .map(|o| o["spec"]["podName"].clone());
            if let Some(((target_ns, target_pod), what)) = state.interfere.clone()
                && target_ns == key.0
                && pod.as_ref().and_then(|p| p.as_str()) == Some(target_pod.as_str())
            {
                state.interfere = None;
                state.version += 1;
                let version = state.version;
                if let Some(o) = state.requests.get_mut(&key) {
                    match what {
                        Interference::Touch => {
                            o["metadata"]["labels"] = serde_json::json!({"touched": "yes"});
                        }
                        Interference::Answer => {
                            o["status"] = serde_json::json!({"conditions": [{"type": "Failed", "status": "True", "reason": "OtherSigner", "message": "answered elsewhere", "lastTransitionTime": now_text()}]});
                        }
                    }
                    o["metadata"]["resourceVersion"] = version.to_string().into();
                    let o = o.clone();
                    state.events.push((version, "MODIFIED", o));
                }
            }
            let Some(current) = state.requests.get(&key).cloned() else {
                return not_found;
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return (
                    409,
                    status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ),
                );
            }
            if let Err(why) = validate_status(&current, &body["status"]) {
                state.rejected.push(why.clone());
                return (422, status(422, "Invalid", &why));
            }
            state.version += 1;
            let version = state.version;
            let mut stored = current;
            stored["status"] = body["status"].clone();
            stored["metadata"]["resourceVersion"] = version.to_string().into();
            state.requests.insert(key, stored.clone());
            state.events.push((version, "MODIFIED", stored.clone()));
            changed.notify_all();
            (200, stored)
        }
        (
            "GET",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "clustertrustbundles",
                name,
            ],
        ) => match state.bundles.get(*name) {
            Some(o) => (200, o.clone()),
            None => not_found,
        },
        (
            "POST",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "clustertrustbundles",
            ],
        ) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if state.bundles.contains_key(&name) {
                return (409, status(409, "AlreadyExists", "already exists"));
            }
            if let Err(why) = validate_bundle(body) {
                return (422, status(422, "Invalid", &why));
            }
            state.version += 1;
            let mut stored = body.clone();
            stored["metadata"]["resourceVersion"] = state.version.to_string().into();
            state.bundles.insert(name, stored.clone());
            (201, stored)
        }
        (
            "PUT",
            [
                "apis",
                "certificates.k8s.io",
                "v1beta1",
                "clustertrustbundles",
                name,
            ],
        ) => {
            let Some(current) = state.bundles.get(*name).cloned() else {
                return not_found;
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return (409, status(409, "Conflict", "the object has been modified"));
            }
            if let Err(why) = validate_bundle(body) {
                return (422, status(422, "Invalid", &why));
            }
            if body["spec"]["signerName"] != current["spec"]["signerName"] {
                return (422, status(422, "Invalid", "spec.signerName is immutable"));
            }
            state.version += 1;
            let mut stored = body.clone();
            stored["metadata"]["resourceVersion"] = state.version.to_string().into();
            state.bundles.insert((*name).to_owned(), stored.clone());
            (200, stored)
        }
        _ => not_found,
    }
}

fn time_of(value: &serde_json::Value, field: &str) -> Result<time::OffsetDateTime, String> {
    let text = value[field]
        .as_str()
        .ok_or_else(|| format!("status.{field} is missing"))?;
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("status.{field} {text:?}: {e}"))
}

/// The API server's rules for a status write.
fn validate_status(current: &serde_json::Value, status: &serde_json::Value) -> Result<(), String> {
    if terminal(current).is_some() {
        return Err("status is immutable once a terminal condition is set".into());
    }
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let terminal_conditions: Vec<&serde_json::Value> = conditions
        .iter()
        .filter(|c| matches!(c["type"].as_str(), Some("Issued" | "Denied" | "Failed")))
        .collect();
    if terminal_conditions.len() != 1 {
        return Err(format!(
            "exactly one of Issued, Denied, Failed is required, got {}",
            terminal_conditions.len()
        ));
    }
    let condition = terminal_conditions[0];
    if condition["status"] != "True" {
        return Err("the condition's status must be True".into());
    }
    let reason = condition["reason"].as_str().unwrap_or_default();
    let reason_ok = reason
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && reason
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ':'));
    if !reason_ok || reason.len() > 1024 {
        return Err(format!("condition reason {reason:?} is not CamelCase"));
    }
    if condition["lastTransitionTime"].as_str().is_none() {
        return Err("condition lastTransitionTime is required".into());
    }
    let issued_fields = [
        "certificateChain",
        "notBefore",
        "notAfter",
        "beginRefreshAt",
    ];
    if condition["type"] != "Issued" {
        if let Some(f) = issued_fields.iter().find(|f| !status[**f].is_null()) {
            return Err(format!("status.{f} must be empty unless Issued"));
        }
        return Ok(());
    }
    let chain = status["certificateChain"].as_str().unwrap_or_default();
    if chain.is_empty() {
        return Err("status.certificateChain is required when Issued".into());
    }
    if chain.len() > 100 * 1024 {
        return Err("status.certificateChain is longer than 100 KiB".into());
    }
    let mut blocks = Vec::new();
    let mut rest = chain.as_bytes();
    loop {
        match x509_parser::pem::parse_x509_pem(rest) {
            Ok((r, pem)) => {
                if pem.label != "CERTIFICATE" {
                    return Err(format!(
                        "status.certificateChain holds a {} block",
                        pem.label
                    ));
                }
                blocks.push(pem.contents);
                rest = r;
                if rest.iter().all(u8::is_ascii_whitespace) {
                    break;
                }
            }
            Err(e) => {
                return Err(format!(
                    "status.certificateChain is not PEM certificates: {e}"
                ));
            }
        }
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(&blocks[0])
        .map_err(|e| format!("the leaf does not parse: {e}"))?;
    for (i, der) in blocks.iter().enumerate().skip(1) {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate {i} of the chain does not parse: {e}"))?;
    }
    let nb = time_of(status, "notBefore")?;
    let na = time_of(status, "notAfter")?;
    let refresh = time_of(status, "beginRefreshAt")?;
    if nb.unix_timestamp() != leaf.validity().not_before.timestamp()
        || na.unix_timestamp() != leaf.validity().not_after.timestamp()
    {
        return Err("status.notBefore/notAfter differ from the leaf's".into());
    }
    let now = time::OffsetDateTime::now_utc();
    if (nb - now).abs() > time::Duration::minutes(5) {
        return Err(format!(
            "status.notBefore {nb} is more than 5 minutes from now"
        ));
    }
    let lifetime = na - nb;
    let max = current["spec"]["maxExpirationSeconds"]
        .as_i64()
        .unwrap_or(86_400);
    if lifetime < time::Duration::hours(1) || lifetime > time::Duration::seconds(max) {
        return Err(format!(
            "the lifetime {} s is not within [3600, maxExpirationSeconds {max}]",
            lifetime.whole_seconds()
        ));
    }
    if refresh < nb + time::Duration::minutes(10) || refresh > na - time::Duration::minutes(10) {
        return Err("status.beginRefreshAt is not within [notBefore + 10m, notAfter - 10m]".into());
    }
    let spec = &current["spec"];
    let requested = match (
        spec["stubPKCS10Request"].as_str(),
        spec["pkixPublicKey"].as_str(),
    ) {
        (Some(stub), _) => {
            let der = base64::engine::general_purpose::STANDARD
                .decode(stub)
                .map_err(|e| e.to_string())?;
            let (_, csr) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                    .map_err(|e| e.to_string())?;
            csr.certification_request_info.subject_pki.raw.to_vec()
        }
        (None, Some(pkix)) => base64::engine::general_purpose::STANDARD
            .decode(pkix)
            .map_err(|e| e.to_string())?,
        _ => return Err("the request has no key".into()),
    };
    if leaf.public_key().raw != requested.as_slice() {
        return Err("the leaf certifies another key than the one requested".into());
    }
    Ok(())
}

/// The API server's rules for a ClusterTrustBundle.
fn validate_bundle(object: &serde_json::Value) -> Result<(), String> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let signer = object["spec"]["signerName"].as_str().unwrap_or_default();
    if !signer.is_empty() && !name.starts_with(&format!("{}:", signer.replace('/', ":"))) {
        return Err(format!(
            "metadata.name {name:?} must start with {:?}",
            signer.replace('/', ":")
        ));
    }
    let pem = object["spec"]["trustBundle"].as_str().unwrap_or_default();
    if pem.trim().is_empty() {
        return Err("spec.trustBundle is required".into());
    }
    let mut seen = std::collections::HashSet::new();
    let mut rest = pem.as_bytes();
    while !rest.iter().all(u8::is_ascii_whitespace) {
        let (r, block) = x509_parser::pem::parse_x509_pem(rest)
            .map_err(|e| format!("spec.trustBundle is not PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            return Err(format!("spec.trustBundle holds a {} block", block.label));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&block.contents)
            .map_err(|e| format!("spec.trustBundle: {e}"))?;
        if !cert.is_ca() {
            return Err("spec.trustBundle holds a certificate that is not a CA".into());
        }
        if !seen.insert(block.contents.clone()) {
            return Err("spec.trustBundle holds a certificate twice".into());
        }
        rest = r;
    }
    Ok(())
}
