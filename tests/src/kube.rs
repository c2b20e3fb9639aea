//! A stand-in for the Kubernetes API server: HTTPS on loopback with a certificate of its own,
//! answering what a test tells it to and recording every request, so the server's API client
//! (TokenReview, and later pods) is tested over real TLS and HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One request the fake API received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The `authorization` header.
    pub authorization: Option<String>,
    /// The body, parsed as JSON (`Null` if it is not JSON).
    pub body: serde_json::Value,
}

/// Decides the answer to a request: a status and a JSON body.
pub type Handler = dyn Fn(&ApiRequest) -> (u16, serde_json::Value) + Send + Sync;

/// A fake Kubernetes API server, running until dropped (its thread ends with the test).
pub struct FakeKubeApi {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The CA certificate (PEM file) its certificate chains to, for `--kube-ca-file`.
    pub ca_file: PathBuf,
    /// A token file for `--kube-token-file`, holding [`FakeKubeApi::CA_TOKEN`].
    pub token_file: PathBuf,
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    handler: Arc<Mutex<Arc<Handler>>>,
}

impl FakeKubeApi {
    /// The token the CA server is given to authenticate itself to the API.
    pub const CA_TOKEN: &'static str = "ca-server-own-token";

    /// Starts the server, writing its CA and token files into `dir`.
    pub fn start(dir: &Path, handler: Arc<Handler>) -> Self {
        let (config, ca_pem) = loopback_tls("fake kubernetes ca");
        let ca_file = dir.join("kube-ca.crt");
        std::fs::write(&ca_file, ca_pem).expect("write ca");
        let token_file = dir.join("kube-token");
        std::fs::write(&token_file, format!("{}\n", Self::CA_TOKEN)).expect("write token");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Mutex::new(handler));
        {
            let requests = Arc::clone(&requests);
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    // As an API server does (Go sets it on every connection).
                    let _ = stream.set_nodelay(true);
                    let config = Arc::clone(&config);
                    let requests = Arc::clone(&requests);
                    let handler = Arc::clone(&handler);
                    std::thread::spawn(move || {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        let tls = rustls::StreamOwned::new(conn, stream);
                        serve(tls, &requests, &handler);
                    });
                }
            });
        }
        Self {
            url: format!("https://{addr}"),
            ca_file,
            token_file,
            requests,
            handler,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.requests.lock().expect("lock").clone()
    }

    /// Answers from now on with `handler`.
    pub fn set_handler(&self, handler: Arc<Handler>) {
        *self.handler.lock().expect("lock") = handler;
    }

    /// The `run` flags that point `ca-server` at this API with `--token-review`.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = vec!["--token-review".to_owned()];
        flags.extend(self.api_flags());
        flags
    }

    /// The `run` flags that point `ca-server` at this API.
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
}

/// A TLS server configuration for 127.0.0.1, with a certificate from a new CA named `ca_name`;
/// and that CA's certificate (PEM), for the client to trust.
pub fn loopback_tls(ca_name: &str) -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_pem = ca_params.self_signed(&ca_key).expect("ca").pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls config");
    (Arc::new(config), ca_pem)
}

/// The next HTTP/1.1 request on `reader` (its body parsed as JSON, `Null` if it is not);
/// `None` when the connection closes.
pub fn read_request<R: BufRead>(reader: &mut R) -> Option<ApiRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "authorization" => authorization = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(ApiRequest {
        method,
        path,
        authorization,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    })
}

/// Serves HTTP/1.1 requests on one connection until it closes.
fn serve<S: Read + Write>(
    stream: S,
    requests: &Mutex<Vec<ApiRequest>>,
    handler: &Mutex<Arc<Handler>>,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        requests.lock().expect("lock").push(request.clone());
        let answer = Arc::clone(&handler.lock().expect("lock"));
        let (status, json) = answer(&request);
        let text = json.to_string();
        let stream = reader.get_mut();
        let written = write!(
            stream,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        )
        .and_then(|()| stream.flush());
        if written.is_err() {
            return;
        }
    }
}

/// A TokenReview answer authenticating `system:serviceaccount:<ns>:<sa>`, bound to pod
/// `pod` (with uid `uid`), for audience `istio-ca`.
pub fn review_authenticated(ns: &str, sa: &str, pod: &str, uid: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "status": {
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": "0b5d6e5c-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [pod],
                    "authentication.kubernetes.io/pod-uid": [uid],
                },
            },
            "audiences": ["istio-ca"],
        },
    })
}

/// A TokenReview answer refusing the token with `error`.
pub fn review_refused(error: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "status": { "authenticated": false, "error": error },
    })
}

/// A pod object as the API serves it.
pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    sa: &str,
    node: &str,
    phase: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "app"}]},
        "status": {"phase": phase},
    })
}

/// The pods of a fake cluster, for the node check. Answers what the API answers:
/// `GET /api/v1/pods?fieldSelector=spec.nodeName%3D<node>` (two pods a page, with a
/// `continue` token, as an API server may page at any size at or below the limit; a list of
/// every pod, without the selector, is refused) and `GET /api/v1/namespaces/<ns>/pods/<name>`.
#[derive(Clone, Default)]
pub struct FakePods {
    pods: Arc<Mutex<Vec<serde_json::Value>>>,
}

/// Pods per page the fake answers with.
const FAKE_PAGE: usize = 2;

impl FakePods {
    /// Schedules a pod (see [`pod`]).
    pub fn add(&self, pod: serde_json::Value) {
        self.pods.lock().expect("lock").push(pod);
    }

    /// A handler for [`FakeKubeApi`] serving these pods, and 404 for anything else.
    pub fn handler(&self) -> Arc<Handler> {
        let pods = self.clone();
        Arc::new(move |request| {
            pods.answer(request).unwrap_or((
                404,
                serde_json::json!({"kind": "Status", "reason": "NotFound"}),
            ))
        })
    }

    /// The answer to a pods request; `None` if `request` is not one.
    pub fn answer(&self, request: &ApiRequest) -> Option<(u16, serde_json::Value)> {
        if request.method != "GET" {
            return None;
        }
        let (path, query) = request.path.split_once('?').unwrap_or((&request.path, ""));
        let pods = self.pods.lock().expect("lock");
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["api", "v1", "pods"] => {
                let params: std::collections::HashMap<String, String> = query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                    .collect();
                let Some(node) = params
                    .get("fieldSelector")
                    .and_then(|s| s.strip_prefix("spec.nodeName="))
                else {
                    return Some((
                        400,
                        serde_json::json!({"kind": "Status", "message": "the test cluster lists pods by node only"}),
                    ));
                };
                let on_node: Vec<&serde_json::Value> = pods
                    .iter()
                    .filter(|p| p["spec"]["nodeName"] == *node)
                    .collect();
                let start: usize = params
                    .get("continue")
                    .and_then(|c| c.strip_prefix("from-"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let page: Vec<serde_json::Value> = on_node
                    .iter()
                    .skip(start)
                    .take(FAKE_PAGE)
                    .map(|p| (*p).clone())
                    .collect();
                let next = start + page.len();
                let cont = if next < on_node.len() {
                    format!("from-{next}")
                } else {
                    String::new()
                };
                Some((
                    200,
                    serde_json::json!({
                        "apiVersion": "v1",
                        "kind": "PodList",
                        "metadata": {"resourceVersion": "1", "continue": cont},
                        "items": page,
                    }),
                ))
            }
            ["api", "v1", "namespaces", ns, "pods", name] => Some(
                pods.iter()
                    .find(|p| p["metadata"]["namespace"] == *ns && p["metadata"]["name"] == *name)
                    .map(|p| (200, p.clone()))
                    .unwrap_or((
                        404,
                        serde_json::json!({"kind": "Status", "reason": "NotFound"}),
                    )),
            ),
            _ => None,
        }
    }
}

/// Undoes percent-encoding in a query value.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
