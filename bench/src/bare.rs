//! taskstream-bare: the bare-socket limit, a peer for `bench/compare.sh` (issue 18).
//!
//! What the machine can do with no HTTP framework and no features: it accepts, answers a
//! `GET` with a minimal `text/event-stream` head and a `POST` with `202`, encodes each posted
//! body once as an SSE frame (`id`, `event: task_updated`, `data`: the body as it came) and
//! writes that frame to every open socket, coalescing whatever frames are ready into one write.
//! No replay, no filter, no keep-alive comments, no auth: a subscriber that falls more than the
//! channel behind is closed. Speaks just enough HTTP/1.1 for `taskstream-bench --target
//! taskstream` (the tool's requests, `Content-Length` bodies, keep-alive publishers).
//!
//! ```sh
//! taskstream-bare --bind 127.0.0.1:18070
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Frames a subscriber may fall behind before it is closed (taskstream's `--buffer` default).
const CHANNEL: usize = 1024;
/// At most this much is written in one go when frames are ready together.
const COALESCE_BYTES: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// Publishing takes the next id and sends under one lock, so every subscriber sees ids rise.
struct Feed {
    next_id: Mutex<u64>,
    frames: broadcast::Sender<Arc<[u8]>>,
}

impl Feed {
    fn publish(&self, body: &[u8]) -> u64 {
        let mut next_id = self.next_id.lock().expect("no panic holds this lock");
        *next_id += 1;
        let id = *next_id;
        let mut frame = format!("id: {id}\nevent: task_updated\ndata: ").into_bytes();
        // The bench's bodies are one line of JSON; anything else is cut at the first newline
        // rather than break the framing.
        let line = body
            .split(|&b| b == b'\n' || b == b'\r')
            .next()
            .unwrap_or(b"");
        frame.extend_from_slice(line);
        frame.extend_from_slice(b"\n\n");
        // No receivers is fine: nobody is listening yet.
        let _ = self.frames.send(frame.into());
        id
    }
}

fn bind_address() -> SocketAddr {
    let mut args = std::env::args().skip(1);
    let mut bind = "127.0.0.1:0".to_string();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bind" => bind = args.next().expect("--bind ADDRESS:PORT"),
            "-h" | "--help" => {
                println!("usage: taskstream-bare [--bind 127.0.0.1:PORT]");
                std::process::exit(0);
            }
            other => {
                eprintln!("taskstream-bare: unknown argument {other} (only --bind)");
                std::process::exit(2);
            }
        }
    }
    let address: SocketAddr = bind.parse().expect("--bind takes ADDRESS:PORT");
    assert!(
        address.ip().is_loopback(),
        "taskstream-bare only listens on loopback addresses"
    );
    address
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = TcpListener::bind(bind_address()).await?;
    println!(
        "taskstream-bare listening on http://{}",
        listener.local_addr()?
    );
    let feed = Arc::new(Feed {
        next_id: Mutex::new(0),
        frames: broadcast::channel(CHANNEL).0,
    });
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                let _ = socket.set_nodelay(true);
                tokio::spawn(connection(socket, feed.clone()));
            }
            _ = &mut stop => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// Serves requests on one connection until it closes or becomes a subscriber.
async fn connection(mut socket: TcpStream, feed: Arc<Feed>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEAD {
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let read = socket.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..read]);
        };
        if buf.starts_with(b"GET ") {
            return subscriber(socket, &feed).await;
        }
        let length = content_length(&buf[..head_end]).unwrap_or(0);
        if length > MAX_BODY {
            return Ok(());
        }
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let read = socket.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..read]);
        }
        let id = feed.publish(&buf[head_end..head_end + length]);
        let answer = format!(r#"{{"event_id":"{id}"}}"#);
        let response = format!(
            "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        socket.write_all(response.as_bytes()).await?;
        buf.drain(..head_end + length);
    }
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

async fn subscriber(mut socket: TcpStream, feed: &Feed) -> std::io::Result<()> {
    // Subscribed before the head goes out: whatever is published after the client sees the
    // head reaches it.
    let mut frames = feed.frames.subscribe();
    socket
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              x-accel-buffering: no\r\nconnection: close\r\n\r\nretry: 3000\n\n",
        )
        .await?;
    let mut out = Vec::with_capacity(COALESCE_BYTES);
    loop {
        let frame = match frames.recv().await {
            Ok(frame) => frame,
            Err(_) => return Ok(()),
        };
        out.extend_from_slice(&frame);
        while out.len() < COALESCE_BYTES {
            match frames.try_recv() {
                Ok(frame) => out.extend_from_slice(&frame),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(_) => return Ok(()),
            }
        }
        socket.write_all(&out).await?;
        out.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_read_whatever_its_case() {
        let head = b"POST /update_task HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n";
        assert_eq!(content_length(head), Some(42));
        assert_eq!(
            content_length(b"POST / HTTP/1.1\r\ncontent-length:7\r\n\r\n"),
            Some(7)
        );
        assert_eq!(content_length(b"GET / HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn ids_rise_in_the_order_frames_are_sent() {
        let feed = Feed {
            next_id: Mutex::new(0),
            frames: broadcast::channel(8).0,
        };
        let mut frames = feed.frames.subscribe();
        assert_eq!(feed.publish(br#"{"task_id":1}"#), 1);
        assert_eq!(feed.publish(b"{\"task_id\":2}\nforged: line"), 2);
        assert_eq!(
            &*frames.try_recv().unwrap(),
            b"id: 1\nevent: task_updated\ndata: {\"task_id\":1}\n\n"
        );
        assert_eq!(
            &*frames.try_recv().unwrap(),
            b"id: 2\nevent: task_updated\ndata: {\"task_id\":2}\n\n"
        );
    }
}
