//! A small load probe for docs/scaling.md: N raw SSE subscribers (or, with `--transport ws`,
//! WebSocket clients) spread over the nodes, a paced publisher spread over the nodes,
//! deliveries/s and publish-to-delivery latency percentiles.
//!
//! ```sh
//! cargo run --release --example fanout_probe -- \
//!     --nodes 127.0.0.1:8080,127.0.0.1:8081 --subscribers 1000 --rate 200 --seconds 15
//! ```
//!
//! Each update carries the send time (`data.t`, ns since the epoch) and every subscriber notes
//! when its frame arrived, so latency covers the POST, the store, the fan-out and the socket. It
//! runs on the same machine as the servers, so it also competes with them for the CPU.
//! (The project's load tool is `taskstream-bench`; this probe only measures what scaling.md
//! reports.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    nodes: Vec<String>,
    subscribers: usize,
    rate: u64,
    seconds: u64,
    websocket: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        nodes: vec!["127.0.0.1:8080".into()],
        subscribers: 1000,
        rate: 200,
        seconds: 15,
        websocket: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => args.nodes = value.split(',').map(str::to_owned).collect(),
            "--subscribers" => args.subscribers = value.parse().expect("--subscribers N"),
            "--rate" => args.rate = value.parse().expect("--rate events/s"),
            "--seconds" => args.seconds = value.parse().expect("--seconds S"),
            "--transport" => args.websocket = value == "ws",
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos() as u64
}

/// The `"t":<ns>` that each update's data carries, found in one frame's bytes.
fn sent_at(frame: &[u8]) -> Option<u64> {
    let at = frame.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// One `/ws` client: subscribes live, then times each event message like an SSE frame.
async fn websocket_subscriber(
    node: &str,
    received: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<u64>>>,
    measuring: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{node}/ws"))
        .await
        .expect("WebSocket handshake");
    socket
        .send(Message::Text(r#"{"type":"subscribe"}"#.into()))
        .await
        .expect("a fresh socket takes the subscribe");
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let arrived = now_ns();
            if let Message::Text(text) = message {
                if let Some(sent) = sent_at(text.as_bytes()) {
                    if measuring.load(Ordering::Relaxed) {
                        received.fetch_add(1, Ordering::Relaxed);
                        // Only these pushes hold the lock; none can panic while holding it.
                        latencies
                            .lock()
                            .expect("no panic under this lock")
                            .push(arrived.saturating_sub(sent));
                    }
                }
            }
        }
    })
}

#[tokio::main]
async fn main() {
    // reqwest is built without a TLS provider of its own (the tests install ring too); fails only
    // when one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = parse_args();
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut subscribers = Vec::new();
    for n in 0..args.subscribers {
        let node = args.nodes[n % args.nodes.len()].clone();
        let (received, latencies, measuring) =
            (received.clone(), latencies.clone(), measuring.clone());
        if args.websocket {
            subscribers.push(websocket_subscriber(&node, received, latencies, measuring).await);
            continue;
        }
        let mut socket = tokio::net::TcpStream::connect(&node)
            .await
            .expect("connect");
        socket
            .write_all(b"GET /events HTTP/1.1\r\nHost: probe\r\n\r\n")
            .await
            .expect("a fresh connection takes the request");
        subscribers.push(tokio::spawn(async move {
            let mut buffer = Vec::with_capacity(64 * 1024);
            let mut chunk = vec![0u8; 64 * 1024];
            let mut local = Vec::new();
            loop {
                let read = match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                let arrived = now_ns();
                buffer.extend_from_slice(&chunk[..read]);
                // Each complete frame ends with a blank line; chunked framing adds only lines
                // of hex lengths, which carry no `"t":`.
                while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                    if let Some(sent) = sent_at(&buffer[..end]) {
                        if measuring.load(Ordering::Relaxed) {
                            received.fetch_add(1, Ordering::Relaxed);
                            local.push(arrived.saturating_sub(sent));
                        }
                    }
                    buffer.drain(..end + 2);
                }
                // Handed over per read: the task is aborted at the end, not joined.
                if !local.is_empty() {
                    // Only these appends hold the lock; none can panic while holding it.
                    latencies
                        .lock()
                        .expect("no panic under this lock")
                        .append(&mut local);
                }
            }
        }));
    }
    eprintln!(
        "{} subscribers connected over {} node(s)",
        args.subscribers,
        args.nodes.len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let client = reqwest::Client::new();
    let published = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let period = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut n = 0u64;
    let mut posts = Vec::new();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        ticker.tick().await;
        let url = format!(
            "http://{}/update_task",
            args.nodes[n as usize % args.nodes.len()]
        );
        let body = format!(
            r#"{{"task_id": {}, "data": {{"t": {}}}}}"#,
            n % 100 + 1,
            now_ns()
        );
        let (client, published, failed) = (client.clone(), published.clone(), failed.clone());
        posts.push(tokio::spawn(async move {
            let answer = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match answer {
                Ok(r) if r.status() == 202 => published.fetch_add(1, Ordering::Relaxed),
                _ => failed.fetch_add(1, Ordering::Relaxed),
            };
        }));
        n += 1;
    }
    for post in posts {
        let _ = post.await;
    }
    let expected = published.load(Ordering::Relaxed) * args.subscribers as u64;
    // Let the tail arrive, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    measuring.store(false, Ordering::Relaxed);
    for subscriber in &subscribers {
        subscriber.abort();
    }
    for subscriber in subscribers {
        let _ = subscriber.await;
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("no panic under this lock"));
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1e6)
    };
    let got = received.load(Ordering::Relaxed);
    println!(
        "published {} ({} failed) at {}/s for {}s; deliveries {got} of {expected} ({:.0}/s); latency ms p50 {:.1} p99 {:.1} max {:.1}",
        published.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        args.rate,
        args.seconds,
        got as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
}
