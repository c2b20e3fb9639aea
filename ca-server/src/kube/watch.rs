//! A watch: the API server's stream of JSON lines, one event each, read as they arrive with
//! a cap on each line and a deadline between bytes, so that a stalled or hostile stream
//! costs neither memory nor a hung task.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;

use super::Error;
use super::types::{Status, WatchEvent};

/// The longest event read (an object with a 100 KiB chain is far below it).
pub const MAX_EVENT: usize = 4 << 20;

/// An open watch.
pub struct Watch {
    body: hyper::body::Incoming,
    pending: BytesMut,
    idle: Duration,
    /// When the stream counts as dead: `idle` after the last bytes. Kept here rather than
    /// started per call, so that a caller's `select!` cancelling [`Watch::next`] (a timer
    /// beside it) does not restart it.
    deadline: tokio::time::Instant,
    url: String,
    path: String,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("path", &self.path).finish()
    }
}

impl Watch {
    pub(super) fn new(
        body: hyper::body::Incoming,
        idle: Duration,
        url: String,
        path: String,
    ) -> Self {
        Self {
            body,
            pending: BytesMut::new(),
            idle,
            deadline: tokio::time::Instant::now() + idle,
            url,
            path,
        }
    }

    /// The next event; `None` when the API server ended the stream (its `timeoutSeconds`):
    /// watch again from the last version seen. A watch `ERROR` with code 410 is
    /// [`Error::Gone`]; nothing within the idle deadline is [`Error::Stalled`].
    pub async fn next(&mut self) -> Result<Option<WatchEvent>, Error> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line = self.pending.split_to(end + 1);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return self.event(line).map(Some);
            }
            if self.pending.len() > MAX_EVENT {
                return Err(self.decode(format!("a watch event longer than {MAX_EVENT} bytes")));
            }
            let frame = match tokio::time::timeout_at(self.deadline, self.body.frame()).await {
                Err(_) => {
                    return Err(Error::Stalled {
                        url: self.url.clone(),
                        path: self.path.clone(),
                        idle: self.idle,
                    });
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    return Err(Error::Call(crate::outbound::Error::Failed {
                        method: http::Method::GET,
                        url: format!("{}{}", self.url, self.path),
                        cause: crate::outbound::cause(&e),
                    }));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            self.deadline = tokio::time::Instant::now() + self.idle;
            if let Ok(mut data) = frame.into_data() {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    self.pending.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
    }

    fn event(&self, line: &[u8]) -> Result<WatchEvent, Error> {
        let event: WatchEvent =
            serde_json::from_slice(line).map_err(|e| self.decode(e.to_string()))?;
        if event.type_ == "ERROR" {
            let status: Status = serde_json::from_value(event.object.clone()).unwrap_or_default();
            if status.code == 410 || matches!(status.reason.as_str(), "Expired" | "Gone") {
                return Err(Error::Gone {
                    url: self.url.clone(),
                    path: self.path.clone(),
                });
            }
            return Err(self.decode(format!(
                "the watch ended with an error: {} {}",
                status.code,
                crate::untrusted::cut(&status.message, 256)
            )));
        }
        Ok(event)
    }

    fn decode(&self, reason: String) -> Error {
        Error::Decode {
            url: self.url.clone(),
            path: self.path.clone(),
            reason,
        }
    }
}
