//! `taskstream-bench-webhooks`: the webhook mode of the load tool. Starts a receiver on loopback
//! (HTTP/1.1 keep-alive, answers 200 at once), a taskstream with `--webhook` to it, publishes
//! `--events` events from `--publishers` connections as fast as the server accepts, and reports
//! deliveries per second at the receiver (first to last), whether every event arrived, and the
//! publish latency; then the same publishes to a taskstream without webhooks, for the publish p99
//! with and without. Exits 1 when an event was not delivered.

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskstream_bench::http::HttpConn;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The taskstream binary to start (twice: with and without --webhook).
    #[arg(long, default_value = "target/release/taskstream")]
    server: PathBuf,
    /// Events to publish in each run.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Publishing connections.
    #[arg(long, default_value_t = 8)]
    publishers: u64,
    /// Distinct tasks (events of one task are delivered one after another).
    #[arg(long, default_value_t = 1000)]
    tasks: u64,
    /// --webhook-concurrency of the server.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Extra server arguments, space-separated (for example "--data-dir /tmp/d").
    #[arg(long, default_value = "")]
    server_args: String,
    /// Seconds to wait for the deliveries after the last publish.
    #[arg(long, default_value_t = 60)]
    patience: u64,
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &Args, extra: &[String]) -> Result<Server> {
        let mut child = Command::new(&args.server)
            .args(["--bind", "127.0.0.1:0"])
            .args(args.server_args.split_whitespace())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", args.server.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("piped stdout")?).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("taskstream listening on http://")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(Server { child, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Webhook ids received, and when the first and the last arrived.
#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    requests: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

async fn receiver(received: Arc<Mutex<Received>>) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let _ = serve(stream, received).await;
            });
        }
    });
    Ok(port)
}

async fn serve(stream: tokio::net::TcpStream, received: Arc<Mutex<Received>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = AsyncBufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut id) = (0usize, String::new());
        loop {
            line.clear();
            read.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse()?,
                    "webhook-id" => id = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
        {
            let mut received = received.lock().expect("not poisoned");
            let now = Instant::now();
            received.first.get_or_insert(now);
            received.last = Some(now);
            received.requests += 1;
            received.ids.insert(id);
        }
        write
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

/// Publishes `args.events` events; answers the latency histogram (microseconds), the event ids
/// and the seconds it took.
async fn publish(args: &Args, addr: SocketAddr) -> Result<(Histogram<u64>, Vec<String>, f64)> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.publishers {
        let (next, events, tasks) = (next.clone(), args.events, args.tasks);
        handles.push(tokio::spawn(async move {
            let mut conn = HttpConn::new(addr, None);
            let mut latencies = Histogram::<u64>::new(3).expect("a valid histogram");
            let mut ids = Vec::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= events {
                    return Ok::<_, anyhow::Error>((latencies, ids));
                }
                let body = format!("{{\"task_id\":{},\"data\":{{\"seq\":{seq}}}}}", seq % tasks + 1);
                let request = format!(
                    "POST /update_task HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let sent = Instant::now();
                let answer = conn.round_trip(request.as_bytes()).await?;
                latencies.record(sent.elapsed().as_micros() as u64)?;
                if answer.status != 202 {
                    bail!("publish answered {}", answer.status);
                }
                let answer: serde_json::Value = serde_json::from_slice(&answer.body)?;
                ids.push(answer["event_id"].as_str().context("event_id")?.to_owned());
            }
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    let mut ids = Vec::new();
    for handle in handles {
        let (latencies, some) = handle.await??;
        all.add(latencies)?;
        ids.extend(some);
    }
    Ok((all, ids, started.elapsed().as_secs_f64()))
}

fn line(name: &str, latencies: &Histogram<u64>, seconds: f64, events: u64) {
    println!(
        "{name:<28} {:>8.0} publishes/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms",
        events as f64 / seconds,
        latencies.value_at_quantile(0.5) as f64 / 1000.0,
        latencies.value_at_quantile(0.99) as f64 / 1000.0,
        latencies.max() as f64 / 1000.0
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine load before (1, 5, 15 min): {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let received = Arc::new(Mutex::new(Received::default()));
    let port = receiver(received.clone()).await?;
    let url = format!("http://127.0.0.1:{port}/hook");
    let with = Server::start(
        &args,
        &[
            "--webhook".into(),
            url,
            "--webhook-concurrency".into(),
            args.concurrency.to_string(),
            "--webhook-secret".into(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        ],
    )?;
    let (latencies, ids, seconds) = publish(&args, with.addr).await?;
    let deadline = Instant::now() + Duration::from_secs(args.patience);
    loop {
        let done = {
            let received = received.lock().expect("not poisoned");
            ids.iter().all(|id| received.ids.contains(id))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(with);
    let (missing, span, requests) = {
        let received = received.lock().expect("not poisoned");
        let missing = ids.iter().filter(|id| !received.ids.contains(*id)).count();
        let span = match (received.first, received.last) {
            (Some(first), Some(last)) => (last - first).as_secs_f64(),
            _ => 0.0,
        };
        (missing, span, received.requests)
    };
    line("publish, with a webhook", &latencies, seconds, args.events);
    println!(
        "{:<28} {:>8.0} deliveries/s  ({} requests for {} events in {span:.2} s, {missing} undelivered)",
        "webhook deliveries",
        requests as f64 / span.max(1e-9),
        requests,
        ids.len()
    );

    let without = Server::start(&args, &[])?;
    let (latencies, _, seconds) = publish(&args, without.addr).await?;
    drop(without);
    line(
        "publish, without webhooks",
        &latencies,
        seconds,
        args.events,
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine load after (1, 5, 15 min): {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if missing > 0 {
        std::process::exit(1);
    }
    Ok(())
}
