//! Minimal HTTP/1.1 client pieces over a raw tokio `TcpStream`: connect with an
//! optional source address, a response-head parser, a chunked-transfer decoder,
//! and a keep-alive connection for request/response round trips.

use std::io;
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connect to `addr`, binding the local end to `src` (port chosen by the
/// kernel) when given, so that many connections can be spread over several
/// loopback source addresses.
pub async fn connect(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One server the tool talks to: where to connect and what to send as `Host`.
#[derive(Debug, Clone)]
pub struct Node {
    pub addr: SocketAddr,
    pub host: String,
}

/// Status line and headers of a response.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// First header value named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false)
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .map(|v| v.to_ascii_lowercase().contains("close"))
            .unwrap_or(false)
    }
}

fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    // Returns (end of head, length of terminator).
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) if b + 2 <= a + 4 && b < a => Some((b, 2)),
        (Some(a), _) => Some((a, 4)),
        (None, Some(b)) => Some((b, 2)),
        (None, None) => None,
    }
}

/// Parse a response head from the start of `buf`. Returns the head and the
/// number of bytes it took, or `None` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>> {
    let Some((end, term)) = find_head_end(buf) else {
        if buf.len() > 64 * 1024 {
            bail!("response head larger than 64 KiB");
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((ResponseHead { status, headers }, end + term)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

/// Incremental decoder for `Transfer-Encoding: chunked`.
#[derive(Debug)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for Dechunker {
    fn default() -> Self {
        Self::new()
    }
}

impl Dechunker {
    pub fn new() -> Self {
        Dechunker {
            state: ChunkState::Size,
            line: Vec::with_capacity(16),
        }
    }

    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feed raw bytes; decoded payload bytes are appended to `out`. Returns the
    /// number of input bytes consumed (less than `input.len()` only once the
    /// terminating chunk has been read).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let rest = &input[i..];
                    let nl = rest.iter().position(|&b| b == b'\n');
                    let take = nl.map(|p| p + 1).unwrap_or(rest.len());
                    self.line.extend_from_slice(&rest[..take]);
                    i += take;
                    if self.line.len() > 4096 {
                        bail!("chunk framing line too long");
                    }
                    if nl.is_none() {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let trimmed = trim_crlf(&line);
                    match self.state {
                        ChunkState::Size => {
                            let hex = trimmed.split(|&b| b == b';').next().unwrap_or(b"");
                            let hex = std::str::from_utf8(hex)
                                .map_err(|_| anyhow!("bad chunk size"))?
                                .trim();
                            let size = usize::from_str_radix(hex, 16)
                                .map_err(|_| anyhow!("bad chunk size {hex:?}"))?;
                            self.state = if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            };
                        }
                        ChunkState::DataEnd => {
                            if !trimmed.is_empty() {
                                bail!("missing CRLF after chunk data");
                            }
                            self.state = ChunkState::Size;
                        }
                        ChunkState::Trailer => {
                            if trimmed.is_empty() {
                                self.state = ChunkState::Done;
                                return Ok(i);
                            }
                        }
                        _ => unreachable!(),
                    }
                    self.line = line;
                    self.line.clear();
                }
                ChunkState::Data(n) => {
                    let take = n.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.state = if take == n {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(n - take)
                    };
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let mut l = line;
    while let Some((&last, rest)) = l.split_last() {
        if last == b'\n' || last == b'\r' {
            l = rest;
        } else {
            break;
        }
    }
    l
}

/// A keep-alive HTTP/1.1 connection used for request/response round trips.
pub struct HttpConn {
    addr: SocketAddr,
    src: Option<IpAddr>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// Outcome of one round trip.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpConn {
    pub fn new(addr: SocketAddr, src: Option<IpAddr>) -> Self {
        HttpConn {
            addr,
            src,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Send a full request (head and body already serialized) and read the
    /// response. A request on a reused connection that the server had closed
    /// is retried once on a fresh connection.
    pub async fn round_trip(&mut self, req: &[u8]) -> Result<Response> {
        let reused = self.stream.is_some();
        match self.try_round_trip(req).await {
            Ok(r) => Ok(r),
            Err(e) if reused && is_stale(&e) => {
                self.stream = None;
                self.try_round_trip(req).await
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    async fn try_round_trip(&mut self, req: &[u8]) -> Result<Response> {
        if self.stream.is_none() {
            self.stream = Some(
                connect(self.addr, self.src)
                    .await
                    .with_context(|| format!("connect {}", self.addr))?,
            );
            self.buf.clear();
        }
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(req).await.map_err(Stale::wrap)?;
        self.buf.clear();
        let mut got_any = false;
        let (head, used) = loop {
            if let Some(h) = parse_head(&self.buf)? {
                break h;
            }
            let n = read_more(stream, &mut self.buf).await?;
            if n == 0 {
                if got_any {
                    bail!("connection closed inside response head");
                }
                return Err(Stale::wrap(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before response",
                )));
            }
            got_any = true;
        };
        let mut rest = self.buf.split_off(used);
        let mut body = Vec::new();
        if head.chunked() {
            let mut d = Dechunker::new();
            d.feed(&rest, &mut body)?;
            while !d.done() {
                rest.clear();
                let n = read_more(stream, &mut rest).await?;
                if n == 0 {
                    bail!("connection closed inside chunked body");
                }
                d.feed(&rest, &mut body)?;
            }
        } else if let Some(len) = head.content_length() {
            while rest.len() < len {
                let n = read_more(stream, &mut rest).await?;
                if n == 0 {
                    bail!("connection closed inside body");
                }
            }
            rest.truncate(len);
            body = rest;
        } else if head.status >= 200 && head.status != 204 && head.status != 304 {
            // Body delimited by connection close.
            loop {
                let n = read_more(stream, &mut rest).await?;
                if n == 0 {
                    break;
                }
            }
            body = rest;
            self.stream = None;
        }
        if head.connection_close() {
            self.stream = None;
        }
        Ok(Response {
            status: head.status,
            body,
        })
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize> {
    let start = buf.len();
    buf.resize(start + 8192, 0);
    let r = stream.read(&mut buf[start..]).await;
    match r {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(n)
        }
        Err(e) => {
            buf.truncate(start);
            Err(Stale::wrap(e))
        }
    }
}

/// Marks I/O errors that may come from a keep-alive connection that the server
/// closed while idle (safe to retry once).
#[derive(Debug)]
struct Stale(io::Error);

impl Stale {
    fn wrap(e: io::Error) -> anyhow::Error {
        anyhow::Error::new(Stale(e))
    }
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for Stale {}

fn is_stale(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Stale>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parses() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nabc";
        let (h, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert!(h.chunked());
        assert_eq!(h.header("content-type"), Some("text/event-stream"));
        assert_eq!(&raw[used..], b"abc");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nX: y\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn dechunks_split_anywhere() {
        let raw = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\nNEXT";
        for split in 0..=raw.len() - 4 {
            let mut d = Dechunker::new();
            let mut out = Vec::new();
            let a = d.feed(&raw[..split], &mut out).unwrap();
            assert_eq!(a, split);
            let b = d.feed(&raw[split..], &mut out).unwrap();
            assert_eq!(out, b"hello, world");
            assert!(d.done());
            assert_eq!(&raw[split + b..], b"NEXT");
        }
    }
}
