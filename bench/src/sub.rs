//! One SSE subscriber: connects, checks the response head, parses frames and
//! tracks loss / duplicates / order / id monotonicity and end-to-end latency.

use std::cell::RefCell;
use std::cmp::Ordering as CmpOrdering;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::http::{self, Dechunker, Node, ResponseHead};
use crate::Transport;
use taskstream_sse::{self as sse, Event, SseParser};

pub const RUN: u8 = 0;
pub const DISCONNECT: u8 = 1;
pub const RECONNECT: u8 = 2;
pub const STOP: u8 = 3;

/// Wall-clock nanoseconds (CLOCK_REALTIME), shared by publisher and subscribers.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// What every subscriber shares with the controller.
pub struct Shared {
    pub connected: AtomicUsize,
    pub failed: AtomicUsize,
    pub disconnected: AtomicUsize,
    pub reconnected: AtomicUsize,
    pub refailed: AtomicUsize,
    pub caught_up: AtomicUsize,
    pub last_caught_up_ns: AtomicU64,
    /// When each subscriber had every replayed event (CLOCK_REALTIME ns).
    pub caught_up_at_ns: Mutex<Vec<u64>>,
    pub last_reconnect_ns: AtomicU64,
    pub delivered: [AtomicU64; 2],
    pub last_delivery_ns: [AtomicU64; 2],
    pub e2e: [Mutex<Histogram<u64>>; 2],
    /// Seqs whose publish was not acknowledged (sorted): not expected.
    pub unpublished: Mutex<Vec<u64>>,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            disconnected: AtomicUsize::new(0),
            reconnected: AtomicUsize::new(0),
            refailed: AtomicUsize::new(0),
            caught_up: AtomicUsize::new(0),
            last_caught_up_ns: AtomicU64::new(0),
            caught_up_at_ns: Mutex::new(Vec::new()),
            last_reconnect_ns: AtomicU64::new(0),
            delivered: [AtomicU64::new(0), AtomicU64::new(0)],
            last_delivery_ns: [AtomicU64::new(0), AtomicU64::new(0)],
            e2e: [Mutex::new(new_hist()), Mutex::new(new_hist())],
            unpublished: Mutex::new(Vec::new()),
        }
    }
}

/// Static configuration of all subscribers.
pub struct SubCfg {
    /// Subscriber `i` connects to node `i % nodes.len()`.
    pub nodes: Vec<Node>,
    pub transport: Transport,
    pub path: String,
    pub run: u64,
    /// Size of the seq space (all events this run may publish).
    pub total_seq: u64,
    /// Storm phase: events with seq below this were seen before the reconnect.
    pub storm_lo: u64,
    /// Storm phase: number of events (from `storm_lo`) that must be replayed.
    pub storm_replay: u64,
    /// Publisher connections per batch (events carry their publisher index).
    pub publishers: usize,
    /// Source addresses to spread connections over (empty: kernel's choice).
    pub source_ips: Vec<Ipv4Addr>,
    pub head_timeout: Duration,
}

impl SubCfg {
    fn node(&self, idx: usize) -> &Node {
        &self.nodes[idx % self.nodes.len()]
    }

    fn source(&self, idx: usize, attempt: usize) -> Option<IpAddr> {
        if self.source_ips.is_empty() {
            None
        } else {
            let k = self.source_ips.len();
            Some(IpAddr::V4(
                self.source_ips[(idx + attempt * (k / 2).max(1)) % k],
            ))
        }
    }
}

/// Counters of one connection (one phase).
#[derive(Debug, Default, Clone, Serialize)]
pub struct PhaseStats {
    /// Events of this run received (including duplicates).
    pub received: u64,
    /// Distinct seqs received inside the expected range.
    pub distinct: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Events whose id was not strictly greater than the previous one.
    pub id_not_increasing: u64,
    /// Events without an `id:` field.
    pub missing_id: u64,
    pub resets: u64,
    /// Events that are not from this run (other publishers, other types).
    pub foreign: u64,
    pub bad_json: u64,
    /// The server closed the stream (EOF) while it should have stayed open.
    pub closed_by_server: bool,
    pub error: Option<String>,
    /// When this connection had received every replayed event (storm phase).
    pub caught_up_ns: Option<u64>,
    /// Expected events that never arrived, by publishing batch: the first
    /// events, the storm's replayed ones, the storm's live ones.
    pub missing_by_batch: [u64; 3],
    /// A few of the missing seqs.
    pub missing_samples: Vec<u64>,
}

/// Everything a subscriber reports at the end.
#[derive(Debug, Default, Clone)]
pub struct SubResult {
    pub status: Option<u16>,
    pub error: Option<String>,
    pub content_type_ok: bool,
    pub cache_control_ok: bool,
    pub x_accel_ok: bool,
    pub first_field_retry: Option<bool>,
    pub phases: Vec<PhaseStats>,
    pub storm_status: Option<u16>,
    pub storm_error: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    data: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    run: Option<u64>,
    #[serde(rename = "pub")]
    publisher: Option<usize>,
    seq: Option<u64>,
    sent_ns: Option<u64>,
}

/// Reads the bench's own fields (`"run"`, `"pub"`, `"seq"`, `"sent_ns"`, which no
/// other part of an event uses) from an event's JSON without parsing all of it.
/// None when `seq` or `run` is missing.
fn scan_payload(data: &[u8]) -> Option<Inner> {
    fn field(data: &[u8], key: &[u8]) -> Option<u64> {
        let start = memchr::memmem::find(data, key)? + key.len();
        let digits = data[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > 19 {
            return None;
        }
        data[start..start + digits].iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    }
    Some(Inner {
        run: Some(field(data, b"\"run\":")?),
        publisher: field(data, b"\"pub\":").map(|p| p as usize),
        seq: Some(field(data, b"\"seq\":")?),
        sent_ns: field(data, b"\"sent_ns\":"),
    })
}

struct Tracker {
    /// Events whose payload was read (for sampling the full JSON validation).
    parsed: u64,
    seen: Vec<u64>,
    /// Publishing happens in batches (first events, storm replay set, storm
    /// live events); every event of a batch was acknowledged before the next
    /// batch started, and each publisher connection sends one event after the
    /// other. So an event is out of order when a later batch was already seen,
    /// or when its publisher's previous event had a larger seq.
    batch_bounds: [u64; 2],
    max_batch: Option<usize>,
    last_by_pub: Vec<u64>,
    publishers: usize,
    prev_id: Vec<u128>,
    has_prev: bool,
    tmp_id: Vec<u128>,
    st: PhaseStats,
    replay_lo: u64,
    replay_hi: u64,
    replay_got: u64,
    caught_reported: bool,
}

impl Tracker {
    fn new(cfg: &SubCfg, premark_below: u64, replay: u64) -> Self {
        let total = cfg.total_seq;
        let mut seen = vec![0u64; (total as usize).div_ceil(64)];
        for s in 0..premark_below.min(total) {
            seen[(s / 64) as usize] |= 1 << (s % 64);
        }
        let batch_bounds = [cfg.storm_lo, cfg.storm_lo + cfg.storm_replay];
        let publishers = cfg.publishers.max(1);
        Tracker {
            parsed: 0,
            seen,
            batch_bounds,
            max_batch: (premark_below > 0).then_some(0),
            last_by_pub: vec![u64::MAX; 3 * publishers],
            publishers,
            prev_id: Vec::new(),
            has_prev: false,
            tmp_id: Vec::new(),
            st: PhaseStats::default(),
            replay_lo: premark_below,
            replay_hi: premark_below + replay,
            replay_got: 0,
            caught_reported: false,
        }
    }

    fn out_of_order(&mut self, seq: u64, publisher: usize) -> bool {
        let batch = if seq < self.batch_bounds[0] {
            0
        } else if seq < self.batch_bounds[1] {
            1
        } else {
            2
        };
        let mut ooo = matches!(self.max_batch, Some(b) if b > batch);
        self.max_batch = Some(self.max_batch.map_or(batch, |b| b.max(batch)));
        let slot = &mut self.last_by_pub[batch * self.publishers + publisher % self.publishers];
        if *slot != u64::MAX && *slot > seq {
            ooo = true;
        }
        if *slot == u64::MAX || seq > *slot {
            *slot = seq;
        }
        ooo
    }

    /// Returns Some(latency_ns) for an event of this run.
    fn on_event(&mut self, ev: &Event<'_>, run: u64, recv_ns: u64) -> Option<u64> {
        if ev.had_id {
            sse::id_groups(ev.id, &mut self.tmp_id);
            if self.has_prev && sse::cmp_groups(&self.tmp_id, &self.prev_id) != CmpOrdering::Greater
            {
                self.st.id_not_increasing += 1;
            }
            std::mem::swap(&mut self.tmp_id, &mut self.prev_id);
            self.has_prev = true;
        } else {
            self.st.missing_id += 1;
        }
        if ev.kind == b"reset" {
            self.st.resets += 1;
            return None;
        }
        // A full JSON parse of every delivery would make the tool, not the server, the
        // bottleneck (it was 40 % of the tool's CPU in a reconnect storm). Every server
        // encodes an event once for all subscribers, so validating a sample (each
        // stream's first event, then one in 64) still catches a bad encoder; the fields
        // the checks need are read from every event.
        let scanned = scan_payload(ev.data);
        let validate = scanned.is_none() || self.parsed.is_multiple_of(64);
        self.parsed += 1;
        let payload = if validate {
            match serde_json::from_slice::<Payload>(ev.data) {
                Ok(p) => p.data,
                Err(_) => {
                    self.st.bad_json += 1;
                    return None;
                }
            }
        } else {
            scanned
        };
        let Some(Inner {
            run: Some(r),
            publisher,
            seq: Some(seq),
            sent_ns,
        }) = payload
        else {
            self.st.foreign += 1;
            return None;
        };
        if r != run || seq >= self.seen.len() as u64 * 64 {
            self.st.foreign += 1;
            return None;
        }
        self.st.received += 1;
        let (w, b) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.seen[w] & b != 0 {
            self.st.duplicated += 1;
        } else {
            self.seen[w] |= b;
            self.st.distinct += 1;
            if self.out_of_order(seq, publisher.unwrap_or(0)) {
                self.st.out_of_order += 1;
            }
            if seq >= self.replay_lo && seq < self.replay_hi {
                self.replay_got += 1;
                if self.replay_got == self.replay_hi - self.replay_lo {
                    self.st.caught_up_ns = Some(recv_ns);
                }
            }
        }
        Some(recv_ns.saturating_sub(sent_ns.unwrap_or(recv_ns)))
    }
}

/// Per-connection body decoding state.
struct Conn {
    dechunk: Option<Dechunker>,
    decoded: Vec<u8>,
    sse: SseParser,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 64 * 1024]);
}

enum Exit {
    Ctrl(u8),
    Eof,
    Error(String),
}

fn build_get(cfg: &SubCfg, node: &Node, last_id: Option<&[u8]>) -> Vec<u8> {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: taskstream-bench\r\n",
        cfg.path, node.host
    )
    .into_bytes();
    if let Some(id) = last_id {
        req.extend_from_slice(b"Last-Event-ID: ");
        req.extend_from_slice(id);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req
}

/// A connected subscriber's source of events.
enum Link {
    Sse {
        stream: TcpStream,
        conn: Conn,
    },
    /// A `/ws` client, subscribed; `last_id` is the id of the last event or reset it got.
    Ws {
        socket: Box<WebSocketStream<TcpStream>>,
        last_id: Vec<u8>,
    },
}

impl Link {
    fn last_id(&self) -> &[u8] {
        match self {
            Link::Sse { conn, .. } => conn.sse.last_id(),
            Link::Ws { last_id, .. } => last_id,
        }
    }
}

/// Connects subscriber `idx` and reads its response head (the `101` of a WebSocket handshake,
/// after which it sends its `subscribe`). Also returns the body bytes read with the head.
async fn open(
    cfg: &SubCfg,
    idx: usize,
    src: Option<IpAddr>,
    last_id: Option<&[u8]>,
) -> Result<(Link, ResponseHead, Vec<u8>)> {
    let node = cfg.node(idx);
    let fut = async {
        let mut stream = http::connect(node.addr, src)
            .await
            .map_err(|e| anyhow!("connect: {e}"))?;
        if cfg.transport == Transport::Ws {
            return open_ws(stream, node, last_id).await;
        }
        stream
            .write_all(&build_get(cfg, node, last_id))
            .await
            .map_err(|e| anyhow!("write request: {e}"))?;
        let mut buf = Vec::with_capacity(2048);
        loop {
            stream.readable().await.map_err(|e| anyhow!("read: {e}"))?;
            let start = buf.len();
            buf.resize(start + 4096, 0);
            match stream.try_read(&mut buf[start..]) {
                Ok(0) => bail!("connection closed before response head"),
                Ok(n) => buf.truncate(start + n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    buf.truncate(start);
                    continue;
                }
                Err(e) => bail!("read head: {e}"),
            }
            if let Some((head, used)) = http::parse_head(&buf)? {
                let rest = buf.split_off(used);
                let conn = Conn::new(&head);
                return Ok((Link::Sse { stream, conn }, head, rest));
            }
        }
    };
    match tokio::time::timeout(cfg.head_timeout, fut).await {
        Ok(r) => r,
        Err(_) => bail!("no response head within {:?}", cfg.head_timeout),
    }
}

async fn open_ws(
    stream: TcpStream,
    node: &Node,
    last_id: Option<&[u8]>,
) -> Result<(Link, ResponseHead, Vec<u8>)> {
    use tokio_tungstenite::tungstenite::Error;
    let url = format!("ws://{}/ws", node.host);
    // tungstenite zero-fills the free part of its read buffer before every read: at its default
    // of 128 KiB that memset was the client's largest cost for messages of a few hundred bytes.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut socket, response) =
        match tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await {
            Ok(open) => open,
            Err(Error::Http(refused)) => bail!("status {}", refused.status().as_u16()),
            Err(e) => bail!("WebSocket handshake: {e}"),
        };
    let head = ResponseHead {
        status: response.status().as_u16(),
        headers: response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
    };
    // Ids are the server's own (digits and dashes): no JSON escaping needed.
    let subscribe = match last_id {
        Some(id) => format!(
            r#"{{"type":"subscribe","last_event_id":"{}"}}"#,
            String::from_utf8_lossy(id)
        ),
        None => r#"{"type":"subscribe"}"#.to_string(),
    };
    socket
        .send(Message::Text(subscribe.into()))
        .await
        .map_err(|e| anyhow!("send subscribe: {e}"))?;
    let link = Link::Ws {
        socket: Box::new(socket),
        last_id: last_id.map(<[u8]>::to_vec).unwrap_or_default(),
    };
    Ok((link, head, Vec::new()))
}

/// A `/ws` `event` or `reset` message as the SSE parser would give it; None for the other
/// messages (heartbeat, compacted, ack, error).
fn ws_event(text: &[u8]) -> Option<Event<'_>> {
    // The searchers are built once: building one per search cost more than the search.
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\""));
    static ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"id\":\""));
    static EVENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"event\":\""));
    static DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"data\":"));
    fn quoted<'a>(text: &'a [u8], after: &Finder<'_>) -> Option<(&'a [u8], usize)> {
        let start = after.find(text)? + after.needle().len();
        let len = memchr::memchr(b'"', &text[start..])?;
        Some((&text[start..start + len], start + len))
    }
    let (kind, _) = quoted(text, &TYPE)?;
    if kind != b"event" && kind != b"reset" {
        return None;
    }
    let (id, _) = quoted(text, &ID)?;
    let (event, _) = quoted(text, &EVENT)?;
    // An event message ends with its `data` object (src/routes/ws.rs writes it last); a reset's
    // data is not read.
    let data = if kind == b"event" {
        let start = DATA.find(text)? + DATA.needle().len();
        text.get(start..text.len().checked_sub(1)?)?
    } else {
        b"{}"
    };
    Some(Event {
        kind: event,
        data,
        id,
        had_id: true,
    })
}

impl Conn {
    fn new(head: &ResponseHead) -> Self {
        Conn {
            dechunk: head.chunked().then(Dechunker::new),
            decoded: Vec::new(),
            sse: SseParser::new(),
        }
    }

    /// Decode raw body bytes and run every event through the tracker.
    fn process(
        &mut self,
        raw: &[u8],
        tracker: &mut Tracker,
        run: u64,
        recv_ns: u64,
        lat: &mut Vec<u64>,
    ) -> Result<()> {
        let mut on = |ev: Event<'_>| {
            if let Some(l) = tracker.on_event(&ev, run, recv_ns) {
                lat.push(l);
            }
        };
        match &mut self.dechunk {
            Some(d) => {
                self.decoded.clear();
                d.feed(raw, &mut self.decoded)?;
                self.sse.feed(&self.decoded, &mut on);
                if d.done() {
                    bail!("server ended the chunked stream");
                }
            }
            None => self.sse.feed(raw, &mut on),
        }
        Ok(())
    }
}

fn flush_latencies(
    shared: &Shared,
    tracker: &mut Tracker,
    phase: usize,
    lat: &mut Vec<u64>,
    recv_ns: u64,
) {
    if let (false, Some(t)) = (tracker.caught_reported, tracker.st.caught_up_ns) {
        tracker.caught_reported = true;
        shared.caught_up.fetch_add(1, Ordering::Relaxed);
        shared.last_caught_up_ns.fetch_max(t, Ordering::Relaxed);
        shared
            .caught_up_at_ns
            .lock()
            .expect("caught_up_at_ns lock")
            .push(t);
    }
    if lat.is_empty() {
        return;
    }
    shared.delivered[phase].fetch_add(lat.len() as u64, Ordering::Relaxed);
    shared.last_delivery_ns[phase].fetch_max(recv_ns, Ordering::Relaxed);
    let mut h = shared.e2e[phase].lock().expect("histogram lock");
    for &ns in lat.iter() {
        h.saturating_record((ns / 1000).max(1));
    }
    lat.clear();
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    link: &mut Link,
    tracker: &mut Tracker,
    initial: Vec<u8>,
    cfg: &SubCfg,
    shared: &Shared,
    phase: usize,
    ctrl: &mut watch::Receiver<u8>,
    current: u8,
) -> Exit {
    let mut lat = Vec::with_capacity(64);
    match link {
        Link::Sse { stream, conn } => {
            if !initial.is_empty() {
                let now = now_ns();
                let r = conn.process(&initial, tracker, cfg.run, now, &mut lat);
                flush_latencies(shared, tracker, phase, &mut lat, now);
                if let Err(e) = r {
                    return Exit::Error(e.to_string());
                }
            }
            loop {
                tokio::select! {
                    biased;
                    c = ctrl.changed() => {
                        if let Some(exit) = ctrl_exit(c, ctrl, current) {
                            return exit;
                        }
                    }
                    r = stream.readable() => {
                        if let Err(e) = r {
                            return Exit::Error(e.to_string());
                        }
                        loop {
                            let res = SCRATCH.with(|s| {
                                let mut s = s.borrow_mut();
                                match stream.try_read(&mut s) {
                                    Ok(0) => Ok(0),
                                    Ok(n) => {
                                        let now = now_ns();
                                        let r = conn.process(&s[..n], tracker, cfg.run, now, &mut lat);
                                        flush_latencies(shared, tracker, phase, &mut lat, now);
                                        r.map(|_| n).map_err(|e| std::io::Error::other(e.to_string()))
                                    }
                                    Err(e) => Err(e),
                                }
                            });
                            match res {
                                Ok(0) => return Exit::Eof,
                                Ok(n) if n < 64 * 1024 => break,
                                Ok(_) => continue,
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                                Err(e) => return Exit::Error(e.to_string()),
                            }
                        }
                    }
                }
            }
        }
        Link::Ws { socket, last_id } => loop {
            tokio::select! {
                biased;
                c = ctrl.changed() => {
                    if let Some(exit) = ctrl_exit(c, ctrl, current) {
                        return exit;
                    }
                }
                message = socket.next() => {
                    // Every message already read is taken in this turn, and their latencies
                    // recorded under one lock, as the SSE side does per read: a lock and a
                    // `select!` per message made the client, not the server, the bound.
                    let now = now_ns();
                    let mut next = Some(message);
                    while let Some(message) = next {
                        if let Some(exit) = on_ws_message(message, last_id, tracker, cfg, now, &mut lat) {
                            flush_latencies(shared, tracker, phase, &mut lat, now);
                            return exit;
                        }
                        next = socket.next().now_or_never();
                    }
                    flush_latencies(shared, tracker, phase, &mut lat, now);
                }
            }
        },
    }
}

/// One `/ws` message through the tracker; `Some` when the connection is over.
fn on_ws_message(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    last_id: &mut Vec<u8>,
    tracker: &mut Tracker,
    cfg: &SubCfg,
    now: u64,
    lat: &mut Vec<u64>,
) -> Option<Exit> {
    match message {
        None | Some(Ok(Message::Close(_))) => Some(Exit::Eof),
        Some(Err(e)) => Some(Exit::Error(e.to_string())),
        Some(Ok(Message::Text(text))) => {
            if let Some(ev) = ws_event(text.as_bytes()) {
                last_id.clear();
                last_id.extend_from_slice(ev.id);
                if let Some(l) = tracker.on_event(&ev, cfg.run, now) {
                    lat.push(l);
                }
            }
            None
        }
        Some(Ok(_)) => None,
    }
}

/// What a change of the controller's signal means for a connection in state `current`.
fn ctrl_exit(
    changed: Result<(), watch::error::RecvError>,
    ctrl: &mut watch::Receiver<u8>,
    current: u8,
) -> Option<Exit> {
    let v = if changed.is_err() {
        STOP
    } else {
        *ctrl.borrow_and_update()
    };
    (v != current).then_some(Exit::Ctrl(v))
}

async fn wait_ctrl(ctrl: &mut watch::Receiver<u8>, current: u8) -> u8 {
    loop {
        let v = *ctrl.borrow_and_update();
        if v != current {
            return v;
        }
        if ctrl.changed().await.is_err() {
            return STOP;
        }
    }
}

fn check_head(res: &mut SubResult, head: &ResponseHead) {
    res.content_type_ok = head
        .header("content-type")
        .map(|v| v.to_ascii_lowercase().starts_with("text/event-stream"))
        .unwrap_or(false);
    res.cache_control_ok = head
        .header("cache-control")
        .map(|v| v.to_ascii_lowercase().contains("no-cache"))
        .unwrap_or(false);
    res.x_accel_ok = head
        .header("x-accel-buffering")
        .map(|v| v.trim().eq_ignore_ascii_case("no"))
        .unwrap_or(false);
}

/// Close a phase's books: which expected seqs (`lo..hi`, minus the ones whose
/// publish failed) never arrived.
fn finish_phase(tracker: Tracker, exit: &Exit, shared: &Shared, lo: u64, hi: u64) -> PhaseStats {
    let unpublished = shared.unpublished.lock().expect("unpublished lock").clone();
    let mut st = tracker.st;
    for seq in lo..hi.min(tracker.seen.len() as u64 * 64) {
        if tracker.seen[(seq / 64) as usize] & (1 << (seq % 64)) != 0
            || unpublished.binary_search(&seq).is_ok()
        {
            continue;
        }
        let batch = if seq < tracker.batch_bounds[0] {
            0
        } else if seq < tracker.batch_bounds[1] {
            1
        } else {
            2
        };
        st.missing_by_batch[batch] += 1;
        if st.missing_samples.len() < 5 {
            st.missing_samples.push(seq);
        }
    }
    match exit {
        Exit::Eof => st.closed_by_server = true,
        Exit::Error(e) => st.error = Some(e.clone()),
        Exit::Ctrl(_) => {}
    }
    st
}

/// The whole life of one subscriber, driven by the controller through `ctrl`.
pub async fn run_sub(
    idx: usize,
    cfg: Arc<SubCfg>,
    shared: Arc<Shared>,
    mut ctrl: watch::Receiver<u8>,
    sem: Arc<Semaphore>,
    storm_sem: Option<Arc<Semaphore>>,
) -> SubResult {
    let mut res = SubResult::default();
    let opened = {
        let _permit = sem.acquire().await;
        open(&cfg, idx, cfg.source(idx, 0), None).await
    };
    let (mut link, head, rest) = match opened {
        Ok(x) => x,
        Err(e) => {
            res.error = Some(e.to_string());
            shared.failed.fetch_add(1, Ordering::Relaxed);
            if wait_ctrl(&mut ctrl, RUN).await == DISCONNECT {
                shared.disconnected.fetch_add(1, Ordering::Relaxed);
            }
            return res;
        }
    };
    res.status = Some(head.status);
    check_head(&mut res, &head);
    if head.status != cfg.transport.ok_status() {
        res.error = Some(format!("status {}", head.status));
        shared.failed.fetch_add(1, Ordering::Relaxed);
        drop(link);
        if wait_ctrl(&mut ctrl, RUN).await == DISCONNECT {
            shared.disconnected.fetch_add(1, Ordering::Relaxed);
        }
        return res;
    }
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut tracker = Tracker::new(&cfg, 0, 0);
    let exit = read_loop(
        &mut link,
        &mut tracker,
        rest,
        &cfg,
        &shared,
        0,
        &mut ctrl,
        RUN,
    )
    .await;
    if let Link::Sse { conn, .. } = &link {
        res.first_field_retry = conn.sse.first_field_retry;
    }
    res.phases
        .push(finish_phase(tracker, &exit, &shared, 0, cfg.storm_lo));
    let next = match exit {
        Exit::Ctrl(v) => v,
        _ => wait_ctrl(&mut ctrl, RUN).await,
    };
    if next != DISCONNECT {
        return res;
    }
    // Storm: drop the connection, wait for the signal, reconnect with the last
    // id we saw.
    let last_id = link.last_id().to_vec();
    drop(link);
    shared.disconnected.fetch_add(1, Ordering::Relaxed);
    if wait_ctrl(&mut ctrl, DISCONNECT).await != RECONNECT {
        return res;
    }
    let opened = {
        let _permit = match &storm_sem {
            Some(s) => Some(s.acquire().await),
            None => None,
        };
        open(&cfg, idx, cfg.source(idx, 1), Some(&last_id)).await
    };
    let (mut link, head, rest) = match opened {
        Ok(x) if x.1.status == cfg.transport.ok_status() => x,
        Ok(x) => {
            res.storm_status = Some(x.1.status);
            res.storm_error = Some(format!("status {}", x.1.status));
            shared.refailed.fetch_add(1, Ordering::Relaxed);
            return res;
        }
        Err(e) => {
            res.storm_error = Some(e.to_string());
            shared.refailed.fetch_add(1, Ordering::Relaxed);
            return res;
        }
    };
    res.storm_status = Some(head.status);
    shared
        .last_reconnect_ns
        .fetch_max(now_ns(), Ordering::Relaxed);
    shared.reconnected.fetch_add(1, Ordering::Relaxed);
    let mut tracker = Tracker::new(&cfg, cfg.storm_lo, cfg.storm_replay);
    let exit = read_loop(
        &mut link,
        &mut tracker,
        rest,
        &cfg,
        &shared,
        1,
        &mut ctrl,
        RECONNECT,
    )
    .await;
    res.phases.push(finish_phase(
        tracker,
        &exit,
        &shared,
        cfg.storm_lo,
        cfg.total_seq,
    ));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(events: u64, back: u64, live: u64, publishers: usize) -> SubCfg {
        SubCfg {
            nodes: vec![Node {
                addr: "127.0.0.1:1".parse().unwrap(),
                host: "127.0.0.1:1".into(),
            }],
            transport: Transport::Sse,
            path: "/events".into(),
            run: 7,
            total_seq: events + back + live,
            storm_lo: events,
            storm_replay: back,
            publishers,
            source_ips: Vec::new(),
            head_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn ws_event_reads_event_and_reset_messages_and_skips_the_others() {
        let event =
            br#"{"type":"event","id":"5-12","event":"task_updated","data":{"task_id":1,"data":{"seq":3}}}"#;
        let ev = ws_event(event).expect("an event message");
        assert_eq!(
            (ev.id, ev.kind, ev.data),
            (
                &b"5-12"[..],
                &b"task_updated"[..],
                &br#"{"task_id":1,"data":{"seq":3}}"#[..]
            )
        );
        // serde_json writes a reset's keys in alphabetical order.
        let reset = br#"{"data":{"event":"reset","last_event_id":"5-20","reason":"gone"},"event":"reset","id":"5-20","type":"reset"}"#;
        let ev = ws_event(reset).expect("a reset message");
        assert_eq!((ev.id, ev.kind), (&b"5-20"[..], &b"reset"[..]));
        assert!(ws_event(br#"{"type":"heartbeat","keep_alive_ms":15000}"#).is_none());
        assert!(ws_event(br#"{"type":"ack","request_id":1,"event_id":"5-21"}"#).is_none());
    }

    #[test]
    fn scan_payload_reads_the_bench_fields_in_any_order() {
        for data in [
            &br#"{"event":"task_updated","task_id":3,"data":{"pub":2,"run":7,"sent_ns":99,"seq":41},"version":1}"#[..],
            br#"{"task_id":3,"data":{"run":7,"pub":2,"seq":41,"sent_ns":99}}"#,
        ] {
            let p = scan_payload(data).expect("fields");
            assert_eq!(
                (p.run, p.publisher, p.seq, p.sent_ns),
                (Some(7), Some(2), Some(41), Some(99))
            );
        }
        assert!(scan_payload(br#"{"task_id":3,"data":{"run":7}}"#).is_none());
        assert!(scan_payload(br#"{"data":{"run":7,"seq":"x"}}"#).is_none());
        assert!(scan_payload(br#"{"data":{"run":7,"seq":99999999999999999999}}"#).is_none());
    }

    #[test]
    fn bad_json_is_counted_on_the_sampled_events() {
        let mut t = Tracker::new(&cfg(10, 0, 0, 1), 0, 0);
        let ev = |data: &'static [u8]| Event {
            kind: b"task_updated",
            data,
            id: b"1",
            had_id: true,
        };
        // The first event of a stream is always fully parsed.
        t.on_event(
            &ev(br#"{"data":{"run":7,"pub":0,"seq":0,"sent_ns":1}"#),
            7,
            2,
        );
        assert_eq!(t.st.bad_json, 1);
        // Fields the scanner cannot find send the event to the full parser too.
        t.on_event(&ev(b"not json"), 7, 2);
        assert_eq!(t.st.bad_json, 2);
    }

    fn feed(t: &mut Tracker, id: &str, run: u64, publisher: usize, seq: u64) {
        let data = format!(
            r#"{{"event":"task_updated","task_id":1,"data":{{"run":{run},"pub":{publisher},"seq":{seq},"sent_ns":1}}}}"#
        );
        let ev = Event {
            kind: b"task_updated",
            data: data.as_bytes(),
            id: id.as_bytes(),
            had_id: true,
        };
        t.on_event(&ev, 7, 2);
    }

    #[test]
    fn counts_dups_disorder_ids_and_foreign() {
        let c = cfg(10, 0, 0, 2);
        let mut t = Tracker::new(&c, 0, 0);
        feed(&mut t, "1-1", 7, 0, 0);
        feed(&mut t, "1-2", 7, 1, 3); // other publisher ahead: fine
        feed(&mut t, "1-3", 7, 0, 1);
        feed(&mut t, "1-4", 7, 1, 2); // publisher 1 went backwards
        feed(&mut t, "1-5", 7, 0, 1); // duplicate
        feed(&mut t, "1-5", 7, 0, 4); // id did not increase
        feed(&mut t, "1-6", 8, 0, 5); // another run
        assert_eq!(t.st.received, 6);
        assert_eq!(t.st.distinct, 5);
        assert_eq!(t.st.duplicated, 1);
        assert_eq!(t.st.out_of_order, 1);
        assert_eq!(t.st.id_not_increasing, 1);
        assert_eq!(t.st.foreign, 1);
    }

    #[test]
    fn storm_phase_premarks_and_catches_up() {
        let c = cfg(10, 3, 2, 1);
        let mut t = Tracker::new(&c, 10, 3);
        feed(&mut t, "2-1", 7, 0, 9); // replayed from before Last-Event-ID
        assert_eq!(t.st.duplicated, 1);
        feed(&mut t, "2-2", 7, 0, 10);
        feed(&mut t, "2-3", 7, 0, 11);
        assert!(t.st.caught_up_ns.is_none());
        feed(&mut t, "2-4", 7, 0, 13); // live event before the replay ended
        feed(&mut t, "2-5", 7, 0, 12);
        assert_eq!(t.st.out_of_order, 1);
        assert!(t.st.caught_up_ns.is_some());
    }
}
