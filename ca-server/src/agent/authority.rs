//! Lets gRPC clients built on grpc-core (py-spiffe, C++, Ruby) and grpc-java reach the
//! socket. Over a Unix socket they send the socket's path as HTTP/2 `:authority`
//! (grpc-core percent-encodes it: `run%2Fspiffe%2Fagent.sock`; grpc-java sends it as it is),
//! which is not a valid authority, and h2 resets every such stream (PROTOCOL_ERROR); SPIRE's
//! Go server does not look. The authority means nothing on a local socket, so the inbound
//! bytes pass through [`Rewrite`], which finds those spellings inside HEADERS and
//! CONTINUATION frames and replaces each with a valid name of the same length (`/` and `%`
//! become `-`). Same length: the frame lengths stay right and so does HPACK's table
//! accounting on both sides (a literal the client indexes keeps its size). Both clients send
//! the value as a raw literal, not Huffman-coded; anything else passes untouched.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface, before the first frame.
const PREFACE_LEN: usize = 24;
/// A frame header: 24-bit length, type, flags, stream id.
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
/// The largest header block held back for rewriting: h2's default `SETTINGS_MAX_FRAME_SIZE`,
/// which the socket's server keeps; a longer frame passes untouched and h2 refuses it. So a
/// connection holds at most this much beyond what h2 itself would.
const MAX_BLOCK: usize = 16 * 1024;

/// The spellings of `socket` that clients send as `:authority`, each with its replacement.
pub fn spellings(socket: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let raw = socket.to_string_lossy().into_owned();
    let encoded = raw.trim_start_matches('/').replace('/', "%2F");
    [raw, encoded]
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let valid = s
                .bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => b,
                    _ => b'-',
                })
                .collect();
            (s.into_bytes(), valid)
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    /// The preface, this many bytes of it left.
    Preface(usize),
    /// Waiting for a whole frame header.
    FrameHeader,
    /// A frame's payload passing through, this many bytes left.
    Payload(usize),
    /// A header block of this length, held until whole.
    HeaderBlock(usize),
}

/// The inbound half of a connection with `:authority` spellings rewritten.
#[derive(Debug)]
pub struct Rewrite<S> {
    inner: S,
    spellings: std::sync::Arc<Vec<(Vec<u8>, Vec<u8>)>>,
    unit: Unit,
    /// Read, not yet sorted into units.
    raw: Vec<u8>,
    /// Sorted and rewritten, not yet handed out.
    ready: Vec<u8>,
    eof: bool,
}

impl<S> Rewrite<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S, spellings: std::sync::Arc<Vec<(Vec<u8>, Vec<u8>)>>) -> Self {
        Self {
            inner,
            spellings,
            unit: Unit::Preface(PREFACE_LEN),
            raw: Vec::new(),
            ready: Vec::new(),
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves whole units from `raw` to `ready`, rewriting header blocks.
    fn sort(&mut self) {
        loop {
            match self.unit {
                Unit::Preface(left) | Unit::Payload(left) => {
                    let n = left.min(self.raw.len());
                    self.ready.extend(self.raw.drain(..n));
                    if n < left {
                        self.unit = match self.unit {
                            Unit::Preface(_) => Unit::Preface(left - n),
                            _ => Unit::Payload(left - n),
                        };
                        return;
                    }
                    self.unit = Unit::FrameHeader;
                }
                Unit::FrameHeader => {
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return;
                    }
                    let len = usize::from(self.raw[0]) << 16
                        | usize::from(self.raw[1]) << 8
                        | usize::from(self.raw[2]);
                    let kind = self.raw[3];
                    self.ready.extend(self.raw.drain(..FRAME_HEADER_LEN));
                    self.unit = if matches!(kind, HEADERS | CONTINUATION) && len <= MAX_BLOCK {
                        Unit::HeaderBlock(len)
                    } else {
                        Unit::Payload(len)
                    };
                }
                Unit::HeaderBlock(len) => {
                    if self.raw.len() < len {
                        return;
                    }
                    let start = self.ready.len();
                    self.ready.extend(self.raw.drain(..len));
                    replace_all(&mut self.ready[start..], &self.spellings);
                    self.unit = Unit::FrameHeader;
                }
            }
        }
    }
}

/// Replaces, in place, every occurrence of each spelling with its same-length replacement.
fn replace_all(block: &mut [u8], spellings: &[(Vec<u8>, Vec<u8>)]) {
    for (from, to) in spellings {
        let mut at = 0;
        while at + from.len() <= block.len() {
            if block[at..].starts_with(from) {
                block[at..at + from.len()].copy_from_slice(to);
                at += from.len();
            } else {
                at += 1;
            }
        }
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Rewrite<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The peer is done: what is left goes out as it came.
                this.eof = true;
                this.ready.append(&mut this.raw);
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.sort();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0x4,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn both_spellings_become_valid_names_of_the_same_length() {
        let s = spellings(Path::new("/run/spiffe/agent.sock"));
        assert_eq!(
            s[0],
            (
                b"/run/spiffe/agent.sock".to_vec(),
                b"-run-spiffe-agent.sock".to_vec()
            )
        );
        assert_eq!(
            s[1],
            (
                b"run%2Fspiffe%2Fagent.sock".to_vec(),
                b"run-2Fspiffe-2Fagent.sock".to_vec()
            )
        );
    }

    #[tokio::test]
    async fn only_header_blocks_are_rewritten_however_the_bytes_arrive() {
        let spellings = std::sync::Arc::new(spellings(Path::new("/tmp/a.sock")));
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(0x4, b"settings"));
        input.extend(frame(HEADERS, b"\x41\x0ctmp%2Fa.sock\x83"));
        input.extend(frame(0x0, b"data tmp%2Fa.sock stays"));
        input.extend(frame(CONTINUATION, b"x/tmp/a.sock"));
        let mut expected = input.clone();
        let replace = |v: &mut Vec<u8>, from: &[u8], to: &[u8], nth: usize| {
            let at = v
                .windows(from.len())
                .enumerate()
                .filter(|(_, w)| *w == from)
                .nth(nth)
                .unwrap()
                .0;
            v[at..at + from.len()].copy_from_slice(to);
        };
        replace(&mut expected, b"tmp%2Fa.sock", b"tmp-2Fa.sock", 0);
        replace(&mut expected, b"/tmp/a.sock", b"-tmp-a.sock", 0);
        // Byte by byte and all at once: the same result.
        for step in [1, input.len()] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let mut rewrite = Rewrite::new(server, spellings.clone());
            for chunk in input.chunks(step) {
                client.write_all(chunk).await.unwrap();
            }
            drop(client);
            let mut out = Vec::new();
            rewrite.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, expected, "step {step}");
        }
    }
}
