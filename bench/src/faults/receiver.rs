//! `--webhook`: a receiver on loopback that the nodes deliver to, which fails at random (503) and
//! goes down for a while (the `receiver_down` fault: every connection is closed unanswered), and
//! records every `webhook-id` it answered 200. The verdict: every acknowledged event delivered.

use crate::check::Id;
use crate::Rng;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub struct Receiver {
    pub port: u16,
    pub delivered: Mutex<BTreeSet<Id>>,
    pub requests: AtomicU64,
    pub refused: AtomicU64,
    pub down: AtomicBool,
    rng: Mutex<Rng>,
    /// Per mille of requests answered 503 while it is up.
    fail_per_mille: u64,
}

impl Receiver {
    pub async fn start(seed: u64, fail_per_mille: u64) -> std::io::Result<Arc<Receiver>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let receiver = Arc::new(Receiver {
            port: listener.local_addr()?.port(),
            delivered: Mutex::default(),
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            down: AtomicBool::new(false),
            rng: Mutex::new(Rng::new(seed)),
            fail_per_mille,
        });
        let serving = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let receiver = serving.clone();
                tokio::spawn(async move {
                    let _ = receiver.serve(stream).await;
                });
            }
        });
        Ok(receiver)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Acknowledged ids never answered 200.
    pub fn undelivered(&self, acked: impl Iterator<Item = Id>) -> Vec<Id> {
        let delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        acked.filter(|id| !delivered.contains(id)).collect()
    }

    async fn serve(&self, stream: tokio::net::TcpStream) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let (mut length, mut id) = (0usize, None);
            loop {
                line.clear();
                read.read_line(&mut line).await?;
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    match name.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "webhook-id" => id = Id::parse(value.trim()),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            read.read_exact(&mut body).await?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Acquire) {
                // Down: the connection closes without an answer.
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let fail = self
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .below(1000)
                < self.fail_per_mille;
            let answer: &[u8] = if fail {
                self.refused.fetch_add(1, Ordering::Relaxed);
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            } else {
                if let Some(id) = id {
                    self.delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id);
                }
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
            };
            write.write_all(answer).await?;
        }
    }
}
