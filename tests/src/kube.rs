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
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake kubernetes ca");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        let ca_file = dir.join("kube-ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        let token_file = dir.join("kube-token");
        std::fs::write(&token_file, format!("{}\n", Self::CA_TOKEN)).expect("write token");

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
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Mutex::new(handler));
        {
            let requests = Arc::clone(&requests);
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
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

/// Serves HTTP/1.1 requests on one connection until it closes.
fn serve<S: Read + Write>(
    stream: S,
    requests: &Mutex<Vec<ApiRequest>>,
    handler: &Mutex<Arc<Handler>>,
) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut length = 0usize;
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
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
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = ApiRequest {
            method,
            path,
            authorization,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
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
