//! The clients of a fault run: SSE and WebSocket subscribers that drop and resume on random nodes
//! with their last id, and publishers that retry every failed POST with the same
//! Idempotency-Key. Each keeps a `Book` (subscribers) or a `PubBook` (publishers) for `check`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskstream_bench::http::{self, Dechunker, HttpConn};
use taskstream_sse::SseParser;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::check::{Book, Commit, Id, Key, Rec};
use crate::Rng;

/// What every client shares with the controller.
pub struct World {
    /// Each node's address; `None` while it is down (a stopped node keeps its address: reaching
    /// it and getting nothing is the fault).
    pub nodes: RwLock<Vec<Option<SocketAddr>>>,
    /// Every acknowledged event id (the sabotaging subscriber picks its bad resume id here).
    pub acked: Mutex<BTreeSet<Id>>,
    /// Set when the faults are over: subscribers stop dropping by themselves and catch up.
    pub draining: watch::Sender<bool>,
    /// Bumped to make every subscriber drop its connection at once.
    pub drop_all: watch::Sender<u64>,
    /// Set when the run is over: every client returns its book.
    pub stop: watch::Sender<bool>,
    /// No byte for this long on a stream (the nodes send a keep-alive every second): the node is
    /// frozen or the connection half dead; drop it and resume elsewhere.
    pub silence: Duration,
    pub run: u64,
    pub pad: String,
}

impl World {
    pub fn pick(&self, rng: &mut Rng) -> Option<SocketAddr> {
        // Only the controller writes, with nothing that can panic under the lock.
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        let up: Vec<SocketAddr> = nodes.iter().flatten().copied().collect();
        (!up.is_empty()).then(|| up[rng.below(up.len() as u64) as usize])
    }
}

/// What the controller tells one subscriber while it runs, and what it reads back.
#[derive(Default)]
pub struct SubControl {
    /// Slow reader: reads nothing until then.
    pub pause_until: Mutex<Option<Instant>>,
    /// Its position (the last id delivered or reset to), to tell when it has caught up.
    pub position: Mutex<Id>,
    /// Set once it has its snapshot position: publishing starts after every subscriber's.
    pub ready: AtomicBool,
}

pub struct SubCfg {
    pub name: String,
    pub websocket: bool,
    pub filter: Option<Vec<u32>>,
    /// A small receive buffer, so a pause makes the server fall behind (a slow reader).
    pub slow_capable: bool,
    /// Resumes with the id of the next acknowledged event after the one it really got.
    pub sabotage: bool,
    pub seed: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain read or assignment: a poisoned lock is still sound.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `GET /tasks` on any node until one answers: the position a board starts from.
async fn snapshot_position(world: &World, rng: &mut Rng, stop: &watch::Receiver<bool>) -> Id {
    while !*stop.borrow() {
        if let Some(addr) = world.pick(rng) {
            let mut conn = HttpConn::new(addr, None);
            let req = format!("GET /tasks HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(3), conn.round_trip(req.as_bytes())).await
            {
                if r.status == 200 {
                    if let Ok(body) = serde_json::from_slice::<Value>(&r.body) {
                        return body["last_event_id"]
                            .as_str()
                            .and_then(Id::parse)
                            .unwrap_or(Id::START);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Id::START
}

/// Reads the task, publish and version an event's data carries.
fn commit_of(data: &Value) -> Option<Commit> {
    Some(Commit {
        task: u32::try_from(data["task_id"].as_u64()?).ok()?,
        key: (
            u32::try_from(data["data"]["p"].as_u64()?).ok()?,
            data["data"]["s"].as_u64()?,
        ),
        version: data["version"].as_u64()?,
    })
}

/// One subscriber's whole run: connect, read for a while, drop, resume elsewhere, until `stop`.
pub async fn subscriber(cfg: SubCfg, world: Arc<World>, control: Arc<SubControl>) -> Book {
    let mut rng = Rng::new(cfg.seed);
    let mut stop = world.stop.subscribe();
    let draining = world.draining.subscribe();
    let start = snapshot_position(&world, &mut rng, &stop).await;
    *lock(&control.position) = start;
    control.ready.store(true, Ordering::Release);
    let mut book = Book {
        name: cfg.name.clone(),
        transport: if cfg.websocket { "ws" } else { "sse" },
        start,
        filter: cfg.filter.clone(),
        ..Book::default()
    };
    let mut position = start;
    while !*stop.borrow() {
        let Some(addr) = world.pick(&mut rng) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut resume = position;
        if cfg.sabotage {
            // The next acknowledged event after what it got: the server rightly never sends it.
            let acked = lock(&world.acked);
            if let Some(next) = acked.range(position..).find(|id| **id > position) {
                resume = *next;
            }
        }
        let session = if *draining.borrow() {
            Duration::from_secs(3600)
        } else if cfg.sabotage {
            // Short sessions, so that even a short run resumes (wrongly) a few times.
            Duration::from_millis(1000 + rng.below(1000))
        } else {
            Duration::from_millis(1000 + rng.below(7000))
        };
        let end = tokio::time::Instant::now() + session;
        book.recs
            .push(Rec::Connect((resume != Id::START).then_some(resume)));
        let mut drops = world.drop_all.subscribe();
        let session = Session {
            cfg: &cfg,
            world: &world,
            control: &control,
            addr,
            resume,
            end,
        };
        let mut ended = Ended {
            stop: &mut stop,
            drops: &mut drops,
        };
        if cfg.websocket {
            ws_session(&session, &mut ended, &mut book).await;
        } else {
            sse_session(&session, &mut ended, &mut book).await;
        }
        if let Some(last) = book.recs.iter().rev().find_map(|r| match r {
            Rec::Event(id) | Rec::Reset(id) => Some(*id),
            Rec::Connect(_) => None,
        }) {
            position = position.max(last);
        }
        // A sabotaging client waits, so that events it will skip are published meanwhile.
        let pause = if cfg.sabotage {
            500
        } else {
            20 + rng.below(200)
        };
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(pause)) => {}
        }
    }
    book
}

/// Waits out a slow reader's pause (or the stop).
async fn paused(control: &SubControl, stop: &mut watch::Receiver<bool>) {
    let until = *lock(&control.pause_until);
    if let Some(until) = until {
        if until > Instant::now() {
            tokio::select! {
                _ = stop.changed() => {}
                () = tokio::time::sleep(until - Instant::now()) => {}
            }
        }
    }
}

async fn connect(addr: SocketAddr, slow: bool) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if slow {
        socket.set_recv_buffer_size(4096)?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(2), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn note(book: &mut Book, control: &SubControl, rec: Rec) {
    if let Rec::Event(id) | Rec::Reset(id) = rec {
        let mut position = lock(&control.position);
        *position = (*position).max(id);
    }
    book.recs.push(rec);
}

/// One event (or reset) as received: checks it against the filter and books it.
fn received(book: &mut Book, control: &SubControl, kind: &str, id: Option<Id>, data: &Value) {
    let Some(id) = id else {
        book.protocol_errors.push(format!("{kind} without an id"));
        return;
    };
    match kind {
        "reset" => note(book, control, Rec::Reset(id)),
        "task_updated" => match commit_of(data) {
            Some(commit) => {
                if !book.wants(commit.task) {
                    book.protocol_errors.push(format!(
                        "event {id} of task {} is outside the filter",
                        commit.task
                    ));
                }
                book.seen.push((id, commit));
                note(book, control, Rec::Event(id));
            }
            None => book
                .protocol_errors
                .push(format!("event {id}: data not from this run: {data}")),
        },
        other => book
            .protocol_errors
            .push(format!("unexpected event {other} {id}")),
    }
}

/// One connection of a subscriber.
struct Session<'a> {
    cfg: &'a SubCfg,
    world: &'a World,
    control: &'a SubControl,
    addr: SocketAddr,
    resume: Id,
    /// When the client drops it by itself.
    end: tokio::time::Instant,
}

/// What ends a connection from outside: the run's end, or a reconnect storm.
struct Ended<'a> {
    stop: &'a mut watch::Receiver<bool>,
    drops: &'a mut watch::Receiver<u64>,
}

impl Ended<'_> {
    async fn wait(&mut self, end: tokio::time::Instant) {
        tokio::select! {
            _ = self.stop.changed() => {}
            _ = self.drops.changed() => {}
            () = tokio::time::sleep_until(end) => {}
        }
    }
}

/// An SSE connection until it breaks, goes silent, its session ends or the run stops; the book
/// gets what it received.
async fn sse_session(session: &Session<'_>, ended: &mut Ended<'_>, book: &mut Book) {
    let Session {
        cfg,
        world,
        control,
        addr,
        resume,
        end,
    } = *session;
    let mut path = "/events".to_string();
    if let Some(tasks) = &cfg.filter {
        let tasks: Vec<String> = tasks.iter().map(u32::to_string).collect();
        path = format!("/events?task_id={}", tasks.join(","));
    }
    let last = if resume == Id::START {
        "0".to_string()
    } else {
        resume.to_string()
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nLast-Event-ID: {last}\r\n\r\n"
    );
    let opened = async {
        let mut stream = connect(addr, cfg.slow_capable).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before the head"));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some((head, used)) = http::parse_head(&buf).map_err(std::io::Error::other)? {
                return Ok((stream, head, buf.split_off(used)));
            }
        }
    };
    let (mut stream, head, rest) = match tokio::time::timeout(Duration::from_secs(3), opened).await
    {
        Ok(Ok((stream, head, rest))) if head.status == 200 => (stream, head, rest),
        _ => {
            book.failed_connects += 1;
            return;
        }
    };
    let mut dechunk = head.chunked().then(Dechunker::new);
    let mut parser = SseParser::new();
    let mut decoded = Vec::new();
    let mut pending = rest;
    loop {
        if !pending.is_empty() {
            decoded.clear();
            let body: &[u8] = match &mut dechunk {
                Some(d) => {
                    if d.feed(&pending, &mut decoded).is_err() {
                        book.protocol_errors.push("bad chunked framing".into());
                        return;
                    }
                    &decoded
                }
                None => &pending,
            };
            let mut frames = Vec::new();
            parser.feed(body, |event| {
                let id = event
                    .had_id
                    .then(|| String::from_utf8_lossy(event.id).into_owned());
                frames.push((
                    String::from_utf8_lossy(event.kind).into_owned(),
                    id,
                    serde_json::from_slice::<Value>(event.data).unwrap_or(Value::Null),
                ));
            });
            for (kind, id, data) in frames {
                received(
                    book,
                    control,
                    &kind,
                    id.as_deref().and_then(Id::parse),
                    &data,
                );
            }
            if dechunk.as_ref().is_some_and(Dechunker::done) {
                return;
            }
            pending.clear();
        }
        paused(control, ended.stop).await;
        let mut chunk = vec![0u8; 16 * 1024];
        tokio::select! {
            () = ended.wait(end) => return,
            read = tokio::time::timeout(world.silence, tokio::io::AsyncReadExt::read(&mut stream, &mut chunk)) => {
                match read {
                    Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
        }
    }
}

/// A `/ws` connection, like `sse_session`.
async fn ws_session(session: &Session<'_>, ended: &mut Ended<'_>, book: &mut Book) {
    let Session {
        cfg,
        world,
        control,
        addr,
        resume,
        end,
    } = *session;
    let opened = async {
        let stream = connect(addr, cfg.slow_capable).await.ok()?;
        let (mut socket, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
            .await
            .ok()?;
        let mut subscribe = json!({"type": "subscribe", "last_event_id": if resume == Id::START { "0".to_string() } else { resume.to_string() }});
        if let Some(tasks) = &cfg.filter {
            subscribe["task_ids"] = json!(tasks);
        }
        socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .ok()?;
        Some(socket)
    };
    let Ok(Some(mut socket)) = tokio::time::timeout(Duration::from_secs(3), opened).await else {
        book.failed_connects += 1;
        return;
    };
    loop {
        paused(control, ended.stop).await;
        let next = tokio::select! {
            () = ended.wait(end) => return,
            next = tokio::time::timeout(world.silence, socket.next()) => next,
        };
        match next {
            Ok(Some(Ok(Message::Text(text)))) => {
                let message: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                match message["type"].as_str() {
                    Some("event") | Some("reset") => {
                        let kind = message["event"].as_str().unwrap_or("?").to_owned();
                        let id = message["id"].as_str().and_then(Id::parse);
                        received(book, control, &kind, id, &message["data"]);
                    }
                    _ => book
                        .protocol_errors
                        .push(format!("unexpected message {text}")),
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                *book.close_codes.entry(code).or_default() += 1;
                return;
            }
            // Pings are answered by tungstenite while reading; they prove the node is alive.
            Ok(Some(Ok(_))) => {}
            _ => return,
        }
    }
}

/// What one publisher did.
#[derive(Default)]
pub struct PubBook {
    pub acks: Vec<(Id, Commit)>,
    pub attempts: u64,
    /// Publishes that needed more than one attempt.
    pub retried: u64,
    /// Keys still unacknowledged when the run gave up on them.
    pub gave_up: Vec<Key>,
    pub statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    /// Answers no retry can fix (4xx): a bug in the run or the server.
    pub refused: Vec<String>,
}

pub struct PubCfg {
    pub index: u32,
    pub tasks: u32,
    pub interval: Duration,
    pub seed: u64,
    /// No new publish after this; retries of the last one continue until `give_up`.
    pub until: Instant,
    pub give_up: Instant,
}

/// Publishes until `until`, every publish retried (other node, same Idempotency-Key) until it is
/// acknowledged.
pub async fn publisher(cfg: PubCfg, world: Arc<World>) -> PubBook {
    let mut rng = Rng::new(cfg.seed);
    let mut book = PubBook::default();
    let mut conns: HashMap<SocketAddr, HttpConn> = HashMap::new();
    let mut seq = 0u64;
    while Instant::now() < cfg.until {
        let task = 1 + rng.below(u64::from(cfg.tasks)) as u32;
        let body = json!({"task_id": task, "data": {"p": cfg.index, "s": seq, "pad": world.pad}})
            .to_string();
        let key = format!("faults-{}-{}-{seq}", world.run, cfg.index);
        let mut attempts = 0;
        loop {
            attempts += 1;
            book.attempts += 1;
            if Instant::now() > cfg.give_up {
                book.gave_up.push((cfg.index, seq));
                break;
            }
            let Some(addr) = world.pick(&mut rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let request = format!(
                "POST /update_task HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let conn = conns
                .entry(addr)
                .or_insert_with(|| HttpConn::new(addr, None));
            let answer =
                tokio::time::timeout(Duration::from_secs(4), conn.round_trip(request.as_bytes()))
                    .await;
            match answer {
                Ok(Ok(response)) => {
                    *book.statuses.entry(response.status).or_default() += 1;
                    if response.status == 202 {
                        let answer: Value =
                            serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                        let id = answer["event_id"].as_str().and_then(Id::parse);
                        let version = answer["task"]["version"].as_u64();
                        match (id, version) {
                            (Some(id), Some(version)) => {
                                book.acks.push((
                                    id,
                                    Commit {
                                        task,
                                        key: (cfg.index, seq),
                                        version,
                                    },
                                ));
                                lock(&world.acked).insert(id);
                            }
                            _ => book.refused.push(format!("202 without an id: {answer}")),
                        }
                        break;
                    }
                    if (400..500).contains(&response.status) && response.status != 429 {
                        book.refused.push(format!(
                            "{}: {}",
                            response.status,
                            String::from_utf8_lossy(&response.body)
                        ));
                        break;
                    }
                }
                Ok(Err(_)) => book.transport_errors += 1,
                Err(_) => {
                    // No answer in time (a frozen node): this connection is unusable.
                    book.transport_errors += 1;
                    conns.remove(&addr);
                }
            }
            tokio::time::sleep(Duration::from_millis(100 + rng.below(200))).await;
        }
        if attempts > 1 {
            book.retried += 1;
        }
        seq += 1;
        tokio::time::sleep(cfg.interval).await;
    }
    book
}
