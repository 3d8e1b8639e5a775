//! `taskstream-catchup`: the reconnect storm of issue 15. N clients resume at once from an id far
//! behind the ring; the tool measures the time until every one is current and the server's CPU,
//! for the compacted catch-up and for what a client did before it (a `reset`, then a full
//! `GET /tasks` reload). Each mode runs against a fresh server it starts itself, on loopback only.
//!
//! A client is current when it has read every event of the catch-up the server announced
//! (`: compacted <n> tasks since <id>`, then n frames), or after a `reset` when it has read and
//! parsed the whole snapshot.

#[path = "sys.rs"]
#[allow(dead_code)] // Shared with taskstream-bench; this tool uses only part of it.
mod sys;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taskstream_bench::http::{parse_head, Dechunker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Resume with the old id: the compacted catch-up.
    Compacted,
    /// Resume with an id the server cannot place: `reset`, then `GET /tasks`.
    Reset,
    Both,
}

#[derive(Debug, Parser)]
#[command(about = "Reconnect storm: compacted catch-up vs reset + GET /tasks reload")]
struct Args {
    /// The taskstream binary to start (on 127.0.0.1, a random port) for each mode.
    #[arg(long)]
    spawn_server: PathBuf,
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Clients that resume at once.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Tasks created before the clients' id.
    #[arg(long, default_value_t = 10_000)]
    tasks: u64,
    /// Updates after the clients' id, round-robin over the tasks (so min(tasks, updates) change).
    #[arg(long, default_value_t = 5_000)]
    updates: u64,
    /// The server's --buffer: far fewer than `updates`, so the id has left the ring.
    #[arg(long, default_value_t = 1024)]
    buffer: u64,
    /// Bytes of `data` per task.
    #[arg(long, default_value_t = 200)]
    pad: usize,
    /// Connections opening at the same time (the listen backlog is 8192).
    #[arg(long, default_value_t = 2000)]
    connect_concurrency: usize,
    /// 50 clients, 200 tasks, 120 updates, a ring of 16: a check that both modes work, for CI.
    #[arg(long)]
    smoke: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Outcome {
    mode: Mode,
    clients: usize,
    tasks: u64,
    updates: u64,
    changed: u64,
    buffer: u64,
    /// From the first connect to the last client being current.
    all_current_s: f64,
    p50_client_s: f64,
    p99_client_s: f64,
    /// The server's user + system CPU during the storm.
    server_cpu_s: f64,
    bytes_read: u64,
    /// Events or snapshot tasks each client applied (all equal, else a problem).
    applied_per_client: u64,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.clients = args.clients.min(50);
        args.tasks = args.tasks.min(200);
        args.updates = args.updates.min(120);
        args.buffer = args.buffer.min(16);
    }
    sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let modes = match args.mode {
        Mode::Both => vec![Mode::Compacted, Mode::Reset],
        mode => vec![mode],
    };
    let mut outcomes = Vec::new();
    for mode in modes {
        let outcome = rt.block_on(storm(&args, mode))?;
        eprintln!(
            "{:>9}: {} clients current in {:.3} s (p50 {:.3} s, p99 {:.3} s), server CPU {:.2} s, {:.1} MiB read, {} applied each ({} of {} tasks changed)",
            format!("{:?}", outcome.mode).to_lowercase(),
            outcome.clients,
            outcome.all_current_s,
            outcome.p50_client_s,
            outcome.p99_client_s,
            outcome.server_cpu_s,
            outcome.bytes_read as f64 / (1024.0 * 1024.0),
            outcome.applied_per_client,
            outcome.changed,
            outcome.tasks,
        );
        outcomes.push(outcome);
    }
    if args.json {
        println!("{}", serde_json::to_string(&outcomes)?);
    }
    Ok(())
}

async fn storm(args: &Args, mode: Mode) -> Result<Outcome> {
    let server = sys::Spawned::start(
        &args.spawn_server,
        &[
            "--bind".into(),
            "127.0.0.1:0".into(),
            "--buffer".into(),
            args.buffer.to_string(),
            "--max-subscribers".into(),
            (args.clients + 100).to_string(),
        ],
        None,
    )?;
    let url = server
        .url()
        .ok_or_else(|| anyhow!("no URL in {:?}", server.ready_line))?;
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("address of {url}"))?;
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address");
    }
    let pad = "x".repeat(args.pad);
    let mut publisher = Publisher::connect(addr).await?;
    for task in 1..=args.tasks {
        publisher
            .post(&format!(r#"{{"task_id":{task},"data":{{"pad":"{pad}"}}}}"#))
            .await?;
    }
    let since = publisher.last.clone();
    for n in 0..args.updates {
        let task = n % args.tasks.max(1) + 1;
        publisher
            .post(&format!(r#"{{"task_id":{task},"status":"s{n}"}}"#))
            .await?;
    }
    let changed = args.updates.min(args.tasks);
    // An id of another epoch: the server cannot place it and answers `reset`.
    let resume = match mode {
        Mode::Reset => "1-1".to_owned(),
        _ => since,
    };
    let cpu_before = sys::pid_cpu(server.pid()).unwrap_or(0.0);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (gate, resume) = (gate.clone(), resume.clone());
            tokio::spawn(async move { client(addr, &resume, mode, gate, started).await })
        })
        .collect();
    let mut times = Vec::with_capacity(clients.len());
    let mut bytes_read = 0;
    let mut applied = None;
    for client in clients {
        let (at, bytes, count) = client.await??;
        times.push(at);
        bytes_read += bytes;
        match applied {
            None => applied = Some(count),
            Some(seen) if seen != count => bail!("clients applied {seen} and {count}"),
            Some(_) => {}
        }
    }
    let all_current_s = started.elapsed().as_secs_f64();
    let server_cpu_s = sys::pid_cpu(server.pid()).unwrap_or(0.0) - cpu_before;
    server.stop(Duration::from_secs(5));
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let applied = applied.unwrap_or(0);
    if mode == Mode::Compacted && applied != changed {
        bail!("the catch-up announced {applied} tasks, {changed} changed");
    }
    Ok(Outcome {
        mode,
        clients: args.clients,
        tasks: args.tasks,
        updates: args.updates,
        changed,
        buffer: args.buffer,
        all_current_s,
        p50_client_s: at(0.5),
        p99_client_s: at(0.99),
        server_cpu_s,
        bytes_read,
        applied_per_client: applied,
    })
}

/// One keep-alive connection for the setup's publishes; remembers the last event id.
struct Publisher {
    stream: TcpStream,
    buffer: Vec<u8>,
    last: String,
}

impl Publisher {
    async fn connect(addr: SocketAddr) -> Result<Publisher> {
        Ok(Publisher {
            stream: TcpStream::connect(addr).await?,
            buffer: Vec::new(),
            last: String::new(),
        })
    }

    async fn post(&mut self, body: &str) -> Result<()> {
        let request = format!(
            "POST /update_task HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await?;
        loop {
            if let Some((head, at)) = parse_head(&self.buffer)? {
                let length = head.content_length().unwrap_or(0);
                if self.buffer.len() >= at + length {
                    if head.status != 202 {
                        bail!(
                            "publish answered {}: {}",
                            head.status,
                            String::from_utf8_lossy(&self.buffer[at..at + length])
                        );
                    }
                    let answer: serde_json::Value =
                        serde_json::from_slice(&self.buffer[at..at + length])?;
                    self.last = answer["event_id"].as_str().unwrap_or_default().to_owned();
                    self.buffer.drain(..at + length);
                    return Ok(());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the server closed the publishing connection");
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Resumes, and answers (seconds from the storm's start until current, bytes read, events or
/// tasks applied).
async fn client(
    addr: SocketAddr,
    resume: &str,
    mode: Mode,
    gate: Arc<Semaphore>,
    started: Instant,
) -> Result<(f64, u64, u64)> {
    let permit = gate.acquire().await?;
    let mut stream = TcpStream::connect(addr).await?;
    drop(permit);
    let request = format!("GET /events HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {resume}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    let deadline = Duration::from_secs(120);
    loop {
        let n = tokio::time::timeout(deadline, stream.read(&mut chunk))
            .await
            .context("no data for 120 s")??;
        if n == 0 {
            bail!("the stream ended before the client was current");
        }
        bytes += n as u64;
        raw.extend_from_slice(&chunk[..n]);
        if mode == Mode::Reset {
            if memchr::memmem::find(&raw, b"event: reset\n").is_some() {
                let (read, tasks) = reload(addr).await?;
                return Ok((started.elapsed().as_secs_f64(), bytes + read, tasks));
            }
            continue;
        }
        let Some(at) = memchr::memmem::find(&raw, b": compacted ") else {
            continue;
        };
        let line_end = match memchr::memchr(b'\n', &raw[at..]) {
            Some(end) => at + end,
            None => continue,
        };
        let announced: u64 = std::str::from_utf8(&raw[at + 12..line_end])?
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("a malformed announcement"))?;
        let frames = memchr::memmem::find_iter(&raw[line_end..], b"\nid: ").count() as u64;
        if frames >= announced {
            return Ok((started.elapsed().as_secs_f64(), bytes, announced));
        }
    }
}

/// `GET /tasks` on a new connection, read to the end and parsed as a client would.
async fn reload(addr: SocketAddr) -> Result<(u64, u64)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /tasks HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let (head, at) = parse_head(&raw)?.ok_or_else(|| anyhow!("no answer to GET /tasks"))?;
    let body = if head.chunked() {
        let mut body = Vec::new();
        Dechunker::new().feed(&raw[at..], &mut body)?;
        body
    } else {
        raw[at..].to_vec()
    };
    let snapshot: serde_json::Value = serde_json::from_slice(&body)?;
    let tasks = snapshot["tasks"].as_array().map_or(0, Vec::len) as u64;
    Ok((raw.len() as u64, tasks))
}
