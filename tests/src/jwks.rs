//! A JWKS endpoint over HTTPS, as a cluster's API server serves `/openid/v1/jwks`: with a CA
//! of its own (for `--token-jwks-ca`), a body a test can change, and a count of fetches.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A JWKS server on loopback, running until the test ends.
pub struct JwksServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it answers with.
    pub body: Arc<Mutex<String>>,
    /// How many requests it answered.
    pub hits: Arc<Mutex<u32>>,
    /// The CA (PEM file) its certificate chains to.
    pub ca_file: PathBuf,
}

impl JwksServer {
    /// Serves `body` over HTTPS with a certificate for 127.0.0.1 from a new CA, whose
    /// certificate goes into `dir`.
    pub fn start(dir: &Path, body: String) -> Self {
        let (config, ca_pem) = crate::kube::loopback_tls("jwks ca");
        std::fs::create_dir_all(dir).expect("dir");
        let ca_file = dir.join("jwks-ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write ca");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(Mutex::new(0));
        let (b, h) = (Arc::clone(&body), Arc::clone(&hits));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut tcp) = stream else { return };
                let Ok(mut conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
                    continue;
                };
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                if tls.read(&mut buf).is_err() {
                    continue; // A client that did not trust us.
                }
                *h.lock().expect("lock") += 1;
                let body = b.lock().expect("lock").clone();
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
                conn.send_close_notify();
                let _ = conn.complete_io(&mut tcp);
            }
        });
        Self {
            addr,
            body,
            hits,
            ca_file,
        }
    }

    /// `https://127.0.0.1:PORT/openid/v1/jwks`.
    pub fn url(&self) -> String {
        format!("https://{}/openid/v1/jwks", self.addr)
    }

    /// How many fetches it answered.
    pub fn hits(&self) -> u32 {
        *self.hits.lock().expect("lock")
    }

    /// Serves `body` from now on.
    pub fn set_body(&self, body: String) {
        *self.body.lock().expect("lock") = body;
    }
}
