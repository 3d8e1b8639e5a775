//! taskstream-faults: a bounded, seeded fault-injection run (issue 11).
//!
//! Starts its own redis-server and taskstream nodes on loopback, runs subscribers (SSE and
//! WebSocket, dropping and resuming on random nodes with their last id, some filtered, some slow)
//! and publishers (retrying every failed POST with the same Idempotency-Key) while it injects
//! faults, then checks every subscriber's deliveries, the idempotency keys and every node's final
//! `GET /tasks`. Prints a table on stderr and a JSON report on stdout; exits 1 when anything was
//! lost, duplicated, out of order or mismatched, 2 when the run itself could not be done.
//!
//! ```sh
//! cargo build -p taskstream -p taskstream-bench
//! target/debug/taskstream-faults --backend redis --seconds 120 --seed 1
//! ```

mod check;
mod clients;
mod procs;
mod receiver;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use taskstream_bench::http::HttpConn;
use tokio::sync::watch;

use crate::check::{Book, Id, Shown, SubCheck};
use crate::clients::{PubBook, PubCfg, SubCfg, SubControl, World};
use crate::procs::{Node, Redis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    /// Three nodes on one redis-server (AOF, appendfsync always): every fault, combined ones too.
    Redis,
    /// One node in memory: stop/cont, client drops, slow readers (a restart loses everything by
    /// design, so none).
    Memory,
    /// One node with --data-dir: SIGKILL and restart too, and not a single reset is allowed.
    Sqlite,
}

/// A bounded, seeded fault-injection run against real taskstream nodes on loopback.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(long, value_enum, default_value = "redis")]
    backend: Backend,
    /// Seconds of faults (the final catch-up and checks come after).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seeds every random choice: faults, their targets and timing, clients' nodes and sessions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The taskstream binary.
    #[arg(long, default_value = "target/debug/taskstream")]
    taskstream: PathBuf,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    #[arg(long, default_value_t = 40)]
    sse: usize,
    #[arg(long, default_value_t = 10)]
    ws: usize,
    #[arg(long, default_value_t = 4)]
    publishers: u32,
    /// Milliseconds between two publishes of one publisher.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Distinct tasks the updates go to.
    #[arg(long, default_value_t = 20)]
    tasks: u32,
    /// Bytes of padding in each update, so a paused reader makes its node fall behind quickly.
    #[arg(long, default_value_t = 512)]
    pad: usize,
    /// Mean seconds between two faults.
    #[arg(long, default_value_t = 3.0)]
    fault_every: f64,
    /// Only these faults (comma separated), of those the backend gets: to reproduce one.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Fault>,
    /// Deliberately break one subscriber (it resumes with an id one past what it got), to show
    /// that the run detects a loss: the run must then fail.
    #[arg(long)]
    sabotage: bool,
    /// With `--backend sqlite`: the first node SIGKILL also deletes the node's WAL before the
    /// restart, so the commits since the last checkpoint are gone, as on a disk that ignored
    /// fsync. Shows that the run detects lost acknowledged changes: the run must then fail.
    #[arg(long)]
    sabotage_disk: bool,
    /// Where node and Redis logs go (default: a fresh directory under /tmp, removed after a
    /// clean run, kept after a failed one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Every node also delivers to a webhook receiver that answers 503 at random (see
    /// --webhook-fail-per-mille) and goes down for a while (the receiver_down fault); the run
    /// fails if an acknowledged event was never delivered to it.
    #[arg(long)]
    webhook: bool,
    /// With --webhook: requests the receiver answers 503, per mille, while it is up.
    #[arg(long, default_value_t = 200)]
    webhook_fail_per_mille: u64,
}

/// SplitMix64: small, seeded, and the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    NodeKill,
    NodeStop,
    RedisTerm,
    RedisKill,
    /// Redis SIGKILLed, then a node restarted while Redis is down, then Redis back.
    Combined,
    SlowReaders,
    ClientDrops,
    /// With --webhook: the receiver closes every connection unanswered for a while.
    ReceiverDown,
}

impl Fault {
    /// The faults a run gets, with weights: the backend's, and the receiver's with --webhook.
    fn menu_for(backend: Backend, webhook: bool) -> Vec<(Fault, u64)> {
        let mut menu = Fault::menu(backend).to_vec();
        if webhook {
            menu.push((Fault::ReceiverDown, 2));
        }
        menu
    }

    /// The faults each backend gets, with weights.
    fn menu(backend: Backend) -> &'static [(Fault, u64)] {
        match backend {
            Backend::Redis => &[
                (Fault::NodeKill, 3),
                (Fault::NodeStop, 2),
                (Fault::RedisTerm, 1),
                (Fault::RedisKill, 2),
                (Fault::Combined, 2),
                (Fault::SlowReaders, 2),
                (Fault::ClientDrops, 1),
            ],
            Backend::Memory => &[
                (Fault::NodeStop, 2),
                (Fault::SlowReaders, 2),
                (Fault::ClientDrops, 1),
            ],
            Backend::Sqlite => &[
                (Fault::NodeKill, 3),
                (Fault::NodeStop, 2),
                (Fault::SlowReaders, 2),
                (Fault::ClientDrops, 1),
            ],
        }
    }

    /// The next round of faults, shuffled: the first round has each fault once, so that even a
    /// short run meets every kind; later rounds have each as often as its weight.
    fn deal(
        backend: Backend,
        webhook: bool,
        only: &[Fault],
        first: bool,
        rng: &mut Rng,
    ) -> Vec<Fault> {
        let mut deck: Vec<Fault> = Fault::menu_for(backend, webhook)
            .iter()
            .filter(|(f, _)| only.is_empty() || only.contains(f))
            .flat_map(|&(f, weight)| {
                std::iter::repeat_n(f, if first { 1 } else { weight as usize })
            })
            .collect();
        for i in (1..deck.len()).rev() {
            deck.swap(i, rng.below(i as u64 + 1) as usize);
        }
        deck
    }
}

/// The processes under test, owned by the fault loop.
struct Cluster {
    backend: Backend,
    redis: Option<Redis>,
    nodes: Vec<Node>,
    world: Arc<World>,
    controls: Vec<Arc<SubControl>>,
    /// (seconds since the start, Unix milliseconds, fault, what it hit)
    timeline: Vec<(f64, u64, Fault, String)>,
    started: Instant,
    /// Nodes that died without being killed.
    crashes: Vec<String>,
    receiver: Option<Arc<receiver::Receiver>>,
    /// `--sabotage-disk`: the data directory whose WAL the next node SIGKILL deletes.
    lose_wal: Option<std::path::PathBuf>,
}

impl Cluster {
    fn publish_addresses(&self) {
        let mut nodes = self.world.nodes.write().unwrap_or_else(|p| p.into_inner());
        *nodes = self.nodes.iter().map(|n| n.addr).collect();
    }

    fn note(&mut self, fault: Fault, what: String) {
        let at = self.started.elapsed().as_secs_f64();
        eprintln!("[{at:6.1}s] {fault:?}: {what}");
        self.timeline.push((at, unix_ms(), fault, what));
    }

    fn check_crashes(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(status) = node.exited() {
                self.crashes
                    .push(format!("node {i} exited by itself: {status}"));
                node.addr = None;
            }
        }
    }

    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<()> {
        let n = rng.below(self.nodes.len() as u64) as usize;
        match fault {
            Fault::NodeKill => {
                self.nodes[n].kill().await;
                self.publish_addresses();
                if let Some(data) = self.lose_wal.take() {
                    let mut lost = Vec::new();
                    for file in ["taskstream.db-wal", "taskstream.db-shm"] {
                        if std::fs::remove_file(data.join(file)).is_ok() {
                            lost.push(file);
                        }
                    }
                    self.note(fault, format!("sabotage: node {n}'s {lost:?} deleted"));
                }
                let down = rng.millis(200, 1500);
                self.note(fault, format!("node {n} SIGKILL, restarted after {down:?}"));
                tokio::time::sleep(down).await;
                self.nodes[n].restart().await?;
                self.publish_addresses();
            }
            Fault::NodeStop => {
                let hold = rng.millis(1000, 4000);
                self.note(fault, format!("node {n} SIGSTOP for {hold:?}"));
                self.nodes[n].stop();
                tokio::time::sleep(hold).await;
                self.nodes[n].cont();
            }
            Fault::RedisTerm | Fault::RedisKill => {
                let (sig, name) = if fault == Fault::RedisTerm {
                    (libc::SIGTERM, "SIGTERM")
                } else {
                    (libc::SIGKILL, "SIGKILL")
                };
                let down = rng.millis(300, 3000);
                self.note(
                    fault,
                    format!("redis {name}, restarted from its AOF after {down:?}"),
                );
                let redis = self.redis.as_mut().context("a Redis fault needs Redis")?;
                redis.stop(sig).await;
                tokio::time::sleep(down).await;
                redis.restart().await?;
            }
            Fault::Combined => {
                let down = rng.millis(500, 2000);
                self.note(
                    fault,
                    format!("redis SIGKILL, node {n} restarted while it is down, redis back after another {down:?}"),
                );
                let redis = self.redis.as_mut().context("a Redis fault needs Redis")?;
                redis.stop(libc::SIGKILL).await;
                self.nodes[n].kill().await;
                self.publish_addresses();
                self.nodes[n].restart().await?;
                self.publish_addresses();
                // Past the node's 3 s wait for Redis: it now serves degraded, and clients resume
                // on it.
                tokio::time::sleep(Duration::from_millis(3500) + down).await;
                self.redis
                    .as_mut()
                    .context("a Redis fault needs Redis")?
                    .restart()
                    .await?;
            }
            Fault::SlowReaders => {
                let hold = rng.millis(4000, 9000);
                let slow: Vec<usize> = (0..self.controls.len()).filter(|i| i % 5 == 1).collect();
                let mut picked = Vec::new();
                for _ in 0..3.min(slow.len()) {
                    let s = slow[rng.below(slow.len() as u64) as usize];
                    if picked.contains(&s) {
                        continue;
                    }
                    let mut pause = self.controls[s]
                        .pause_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    *pause = Some(Instant::now() + hold);
                    picked.push(s);
                }
                self.note(
                    fault,
                    format!("subscribers {picked:?} read nothing for {hold:?}"),
                );
            }
            Fault::ReceiverDown => {
                let down = rng.millis(500, 2500);
                self.note(fault, format!("webhook receiver down for {down:?}"));
                let receiver = self
                    .receiver
                    .clone()
                    .context("--webhook starts a receiver")?;
                receiver.down.store(true, Ordering::Release);
                tokio::time::sleep(down).await;
                receiver.down.store(false, Ordering::Release);
            }
            Fault::ClientDrops => {
                // Every subscriber drops its connection at once and resumes: a reconnect storm.
                self.note(fault, "every subscriber drops and resumes at once".into());
                self.world
                    .drop_all
                    .send_modify(|generation| *generation += 1);
            }
        }
        self.check_crashes();
        Ok(())
    }

    /// Everything up and running again, for the final catch-up and checks.
    async fn heal(&mut self) -> Result<()> {
        if let Some(redis) = &mut self.redis {
            if !redis.is_up() {
                redis.restart().await?;
            }
        }
        if let Some(receiver) = &self.receiver {
            receiver.down.store(false, Ordering::Release);
        }
        for node in &mut self.nodes {
            if node.stopped {
                node.cont();
            }
            if node.addr.is_none() {
                node.restart().await?;
            }
        }
        self.publish_addresses();
        for control in &self.controls {
            *control
                .pause_until
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
        Ok(())
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// On Redis an id's first group is the millisecond Redis stored the event (same clock as this
/// tool's): each lost event is put down to the last fault that began before it. Answers, per
/// fault kind, (faults followed by a loss, faults, distinct events lost).
fn losses_by_fault(
    timeline: &[(f64, u64, Fault, String)],
    lost: &std::collections::BTreeSet<Id>,
) -> BTreeMap<Fault, (u64, u64, u64)> {
    let mut out: BTreeMap<Fault, (u64, u64, u64)> = BTreeMap::new();
    let mut hit = vec![false; timeline.len()];
    for id in lost {
        if let Some(i) = timeline.iter().rposition(|(_, ms, _, _)| *ms <= id.0) {
            hit[i] = true;
            out.entry(timeline[i].2).or_default().2 += 1;
        }
    }
    for (i, (_, _, fault, _)) in timeline.iter().enumerate() {
        let entry = out.entry(*fault).or_default();
        entry.1 += 1;
        entry.0 += u64::from(hit[i]);
    }
    out
}

/// `GET path` on one node: status and JSON body.
async fn get_json(addr: std::net::SocketAddr, path: &str) -> Option<(u16, Value)> {
    let mut conn = HttpConn::new(addr, None);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response =
        tokio::time::timeout(Duration::from_secs(3), conn.round_trip(request.as_bytes()))
            .await
            .ok()?
            .ok()?;
    Some((
        response.status,
        serde_json::from_slice(&response.body).ok()?,
    ))
}

/// A node's resets and lagged subscribers, from `/metrics` (since the process started).
async fn metrics(addr: std::net::SocketAddr) -> Value {
    let mut conn = HttpConn::new(addr, None);
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let Ok(Ok(response)) =
        tokio::time::timeout(Duration::from_secs(3), conn.round_trip(request.as_bytes())).await
    else {
        return Value::Null;
    };
    let text = String::from_utf8_lossy(&response.body);
    let value = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    json!({
        "resets": value("taskstream_resets_total"),
        "lagged_subscribers": value("taskstream_lagged_subscribers_total"),
        "events_replayed": value("taskstream_events_replayed_total"),
    })
}

fn node_args(
    backend: Backend,
    redis: Option<&Redis>,
    dir: &std::path::Path,
    webhook: Option<&str>,
) -> Vec<String> {
    let mut args: Vec<String> = ["--buffer", "256", "--keep-alive", "1", "--retry", "200"]
        .map(String::from)
        .to_vec();
    if let Some(url) = webhook {
        // Retries 10 ms apart at first, so the backoff's cap (600 times that: 6 s) keeps the
        // final wait for deliveries short; and a dead node's URL taken over 2 s after its
        // last renewal, so the run's faults are met within its seconds.
        args.extend(
            [
                "--webhook",
                url,
                "--webhook-backoff-ms",
                "10",
                "--webhook-lease-ms",
                "2000",
            ]
            .map(String::from),
        );
    }
    match backend {
        Backend::Redis => {
            args.push("--redis-url".into());
            args.push(redis.map(Redis::url).unwrap_or_default());
        }
        Backend::Memory => {}
        Backend::Sqlite => {
            args.push("--data-dir".into());
            args.push(dir.join("data").display().to_string());
        }
    }
    args
}

async fn run(args: &Args, dir: &std::path::Path) -> Result<Value> {
    let started = Instant::now();
    let mut rng = Rng::new(args.seed);
    if args.backend == Backend::Sqlite {
        let help = std::process::Command::new(&args.taskstream)
            .arg("--help")
            .output()
            .with_context(|| format!("run {} --help", args.taskstream.display()))?;
        if !String::from_utf8_lossy(&help.stdout).contains("--data-dir") {
            bail!(
                "{} has no --data-dir yet: the sqlite fault run needs the durable backend",
                args.taskstream.display()
            );
        }
    }
    if args.sabotage_disk && args.backend != Backend::Sqlite {
        bail!("--sabotage-disk needs --backend sqlite: only that node keeps a WAL to lose");
    }
    if let Some(f) = args.only.iter().find(|f| {
        !Fault::menu_for(args.backend, args.webhook)
            .iter()
            .any(|(m, _)| m == *f)
    }) {
        bail!(
            "--only {f:?}: the {:?} backend gets no such fault",
            args.backend
        );
    }
    let redis = match args.backend {
        Backend::Redis => Some(Redis::start(&args.redis_server, &dir.join("redis")).await?),
        _ => None,
    };
    let receiver = match args.webhook {
        true => Some(receiver::Receiver::start(rng.next_u64(), args.webhook_fail_per_mille).await?),
        false => None,
    };
    let webhook_url = receiver.as_ref().map(|r| r.url());
    let node_count = if args.backend == Backend::Redis { 3 } else { 1 };
    let mut nodes = Vec::new();
    for i in 0..node_count {
        nodes.push(
            Node::start(
                &args.taskstream,
                node_args(args.backend, redis.as_ref(), dir, webhook_url.as_deref()),
                dir,
                format!("node{i}"),
            )
            .await?,
        );
    }
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let world = Arc::new(World {
        nodes: RwLock::new(nodes.iter().map(|n| n.addr).collect()),
        acked: Mutex::new(Default::default()),
        draining: watch::channel(false).0,
        drop_all: watch::channel(0).0,
        stop: watch::channel(false).0,
        silence: Duration::from_secs(3),
        run: run_id,
        pad: "x".repeat(args.pad),
    });
    // Readiness: every node answers /healthz 200 before the clients start.
    for node in &nodes {
        let addr = node.addr.context("a started node has an address")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(get_json(addr, "/healthz").await, Some((200, _))) {
            if Instant::now() > deadline {
                bail!("node at {addr} not healthy within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let subscribers = args.sse + args.ws;
    // Every fourth subscriber follows only two tasks.
    let filters: Vec<Option<Vec<u32>>> = (0..subscribers)
        .map(|i| {
            (i % 4 == 3).then(|| {
                let a = 1 + (i as u32 % args.tasks);
                vec![a, 1 + (a % args.tasks)]
            })
        })
        .collect();
    let mut controls = Vec::new();
    let mut subs = Vec::new();
    for (i, filter) in filters.iter().enumerate() {
        let control = Arc::new(SubControl::default());
        let websocket = i >= args.sse;
        let cfg = SubCfg {
            name: format!("{}{}", if websocket { "ws" } else { "sse" }, i),
            websocket,
            filter: filter.clone(),
            slow_capable: i % 5 == 1,
            sabotage: args.sabotage && i == 0,
            seed: rng.next_u64(),
        };
        subs.push(tokio::spawn(clients::subscriber(
            cfg,
            world.clone(),
            control.clone(),
        )));
        controls.push(control);
    }
    // Subscribers take their snapshot position before anything is published.
    let deadline = Instant::now() + Duration::from_secs(20);
    while controls.iter().any(|c| !c.ready.load(Ordering::Acquire)) {
        if Instant::now() > deadline {
            bail!("subscribers found no node answering GET /tasks within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fault_until = Instant::now() + Duration::from_secs(args.seconds);
    let mut pubs = Vec::new();
    for p in 0..args.publishers {
        pubs.push(tokio::spawn(clients::publisher(
            PubCfg {
                index: p,
                tasks: args.tasks,
                interval: Duration::from_millis(args.interval_ms),
                seed: rng.next_u64(),
                until: fault_until,
                give_up: fault_until + Duration::from_secs(30),
            },
            world.clone(),
        )));
    }

    let mut cluster = Cluster {
        backend: args.backend,
        redis,
        nodes,
        world: world.clone(),
        controls: controls.clone(),
        timeline: Vec::new(),
        started,
        crashes: Vec::new(),
        receiver: receiver.clone(),
        lose_wal: (args.sabotage_disk && args.backend == Backend::Sqlite).then(|| dir.join("data")),
    };
    let mean = args.fault_every.max(0.2);
    let mut deck = Vec::new();
    let mut rounds = 0;
    while Instant::now() < fault_until {
        let gap = Duration::from_secs_f64(mean * (0.5 + rng.below(1000) as f64 / 1000.0));
        tokio::time::sleep(gap.min(fault_until.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= fault_until {
            break;
        }
        if deck.is_empty() {
            deck = Fault::deal(
                cluster.backend,
                args.webhook,
                &args.only,
                rounds == 0,
                &mut rng,
            );
            rounds += 1;
        }
        let Some(fault) = deck.pop() else { break };
        cluster.inject(fault, &mut rng).await?;
    }
    eprintln!(
        "[{:6.1}s] faults over: healing, then the publishers' last retries and the catch-up",
        started.elapsed().as_secs_f64()
    );
    cluster.heal().await?;
    world.draining.send_replace(true);

    let mut pub_books: Vec<PubBook> = Vec::new();
    for p in pubs {
        pub_books.push(p.await.context("a publisher panicked")?);
    }
    // Every node healthy again (on Redis: its reader follows the stream).
    for node in &cluster.nodes {
        if let Some(addr) = node.addr {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !matches!(get_json(addr, "/healthz").await, Some((200, _)))
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Catch-up: wait (bounded) until every subscriber is at or past the newest event it wants.
    let acked: Vec<(Id, check::Commit)> = pub_books
        .iter()
        .flat_map(|b| b.acks.iter().copied())
        .collect();
    let newest_for = |filter: &Option<Vec<u32>>| {
        acked
            .iter()
            .filter(|(_, c)| filter.as_ref().is_none_or(|f| f.contains(&c.task)))
            .map(|(id, _)| *id)
            .max()
            .unwrap_or(Id::START)
    };
    let targets: Vec<Id> = filters.iter().map(newest_for).collect();
    let catch_up_started = Instant::now();
    let catch_up_deadline = catch_up_started + Duration::from_secs(20);
    let behind = loop {
        let behind = controls
            .iter()
            .zip(&targets)
            .filter(|(c, t)| *c.position.lock().unwrap_or_else(|p| p.into_inner()) < **t)
            .count();
        if behind == 0 || Instant::now() > catch_up_deadline {
            break behind;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let catch_up_seconds = catch_up_started.elapsed().as_secs_f64();
    // The webhook: every acknowledged event delivered at least once. The wait is bounded, and
    // longer than the backoff's cap (6 s) several times over: an event that met the receiver's random
    // 503s several times in a row waits that long between attempts.
    let undelivered = match &receiver {
        None => Vec::new(),
        Some(receiver) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let missing = receiver.undelivered(acked.iter().map(|(id, _)| *id));
                if missing.is_empty() || Instant::now() > deadline {
                    break missing;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    world.stop.send_replace(true);
    let mut books: Vec<Book> = Vec::new();
    for s in subs {
        books.push(s.await.context("a subscriber panicked")?);
    }

    // The books.
    let (committed, conflicts) = check::committed(
        acked.iter().copied(),
        books.iter().flat_map(|b| b.seen.iter()),
    );
    let checks: Vec<SubCheck> = books.iter().map(|b| check::check(b, &committed)).collect();
    let idempotency = check::idempotency_duplicates(&committed);
    let mut mismatches = conflicts;
    mismatches.extend(check::version_gaps(&committed));
    for (i, node) in cluster.nodes.iter().enumerate() {
        let Some(addr) = node.addr else { continue };
        match get_json(addr, "/tasks").await {
            Some((200, snapshot)) => {
                let last = snapshot["last_event_id"].as_str().and_then(Id::parse);
                let tasks: BTreeMap<u32, Shown> = snapshot["tasks"]
                    .as_array()
                    .map(|tasks| {
                        tasks
                            .iter()
                            .filter_map(|t| {
                                Some((
                                    u32::try_from(t["task_id"].as_u64()?).ok()?,
                                    Shown {
                                        version: t["version"].as_u64()?,
                                        key: t["data"]["p"]
                                            .as_u64()
                                            .zip(t["data"]["s"].as_u64())
                                            .map(|(p, s)| (p as u32, s)),
                                    },
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                mismatches.extend(check::state_mismatches(
                    &format!("node {i}"),
                    last,
                    &tasks,
                    &committed,
                ));
            }
            other => mismatches.push(format!(
                "node {i}: GET /tasks answered {:?}",
                other.map(|o| o.0)
            )),
        }
    }
    cluster.check_crashes();
    mismatches.extend(cluster.crashes.iter().cloned());

    let total = |f: fn(&SubCheck) -> u64| checks.iter().map(f).sum::<u64>();
    let lost = total(|c| c.lost);
    let duplicated = total(|c| c.duplicated);
    let out_of_order = total(|c| c.out_of_order);
    let resets = total(|c| c.resets);
    let protocol_errors = total(|c| c.protocol_errors);
    let sqlite_resets = if args.backend == Backend::Sqlite {
        resets
    } else {
        0
    };
    let gave_up: Vec<String> = pub_books
        .iter()
        .flat_map(|b| b.gave_up.iter().map(|(p, s)| format!("{p}-{s}")))
        .collect();
    let refused: Vec<String> = pub_books
        .iter()
        .flat_map(|b| b.refused.iter().cloned())
        .collect();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, fault, _) in &cluster.timeline {
        *faults
            .entry(
                serde_json::to_value(fault)?
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let mut close_codes: BTreeMap<u16, u64> = BTreeMap::new();
    for c in &checks {
        for (code, n) in &c.close_codes {
            *close_codes.entry(*code).or_default() += n;
        }
    }
    let lost_ids: std::collections::BTreeSet<Id> = checks
        .iter()
        .flat_map(|c| c.lost_ids.iter().copied())
        .collect();
    let by_fault = (args.backend == Backend::Redis).then(|| {
        losses_by_fault(&cluster.timeline, &lost_ids)
            .into_iter()
            .map(|(fault, (followed, of, events))| {
                (
                    serde_json::to_value(fault).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
                    json!({"followed_by_loss": followed, "faults": of, "distinct_events_lost": events}),
                )
            })
            .collect::<BTreeMap<String, Value>>()
    });
    let mut node_metrics = Vec::new();
    for node in &cluster.nodes {
        if let Some(addr) = node.addr {
            node_metrics.push(metrics(addr).await);
        }
    }
    let mut problems = Vec::new();
    for (what, n) in [
        ("lost", lost),
        ("duplicated", duplicated),
        ("out of order", out_of_order),
        ("protocol errors", protocol_errors),
        ("idempotency duplicates", idempotency.len() as u64),
        ("final-state mismatches", mismatches.len() as u64),
        ("publishes never acknowledged", gave_up.len() as u64),
        ("publishes refused", refused.len() as u64),
        ("resets (none allowed with --data-dir)", sqlite_resets),
        (
            "events never delivered to the webhook",
            undelivered.len() as u64,
        ),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }

    let report = json!({
        "backend": args.backend,
        "seed": args.seed,
        "seconds": args.seconds,
        "sabotage": args.sabotage,
        "sabotage_disk": args.sabotage_disk,
        "wall_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "nodes": cluster.nodes.len(),
        "subscribers": {"sse": args.sse, "ws": args.ws},
        "publishers": args.publishers,
        "faults": faults,
        "timeline": cluster.timeline.iter().map(|(at, _, f, what)| json!({"at": (at * 10.0).round() / 10.0, "fault": f, "what": what})).collect::<Vec<_>>(),
        "published": {
            "acknowledged": acked.len(),
            "committed": committed.len(),
            "attempts": pub_books.iter().map(|b| b.attempts).sum::<u64>(),
            "retried": pub_books.iter().map(|b| b.retried).sum::<u64>(),
            "transport_errors": pub_books.iter().map(|b| b.transport_errors).sum::<u64>(),
            "statuses": pub_books.iter().fold(BTreeMap::<u16, u64>::new(), |mut all, b| { for (s, n) in &b.statuses { *all.entry(*s).or_default() += n; } all }),
            "gave_up": gave_up,
            "refused": refused,
        },
        "deliveries": total(|c| c.received),
        "connects": total(|c| c.connects),
        "failed_connects": total(|c| c.failed_connects),
        "resets": resets,
        "excused_by_resets": total(|c| c.excused),
        "lost": lost,
        "distinct_events_lost": lost_ids.len(),
        "losses_by_fault": by_fault,
        "node_metrics_since_last_start": node_metrics,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "protocol_errors": protocol_errors,
        "idempotency_duplicates": idempotency,
        "mismatches": mismatches,
        "ws_close_codes": close_codes,
        "webhook": receiver.as_ref().map(|r| json!({
            "requests": r.requests.load(Ordering::Relaxed),
            "failed_or_refused": r.refused.load(Ordering::Relaxed),
            "delivered_distinct": r.delivered.lock().unwrap_or_else(|p| p.into_inner()).len(),
            "undelivered": undelivered.len(),
            "undelivered_samples": undelivered.iter().take(10).map(|id| id.to_string()).collect::<Vec<_>>(),
        })),
        "catch_up": {"seconds": (catch_up_seconds * 10.0).round() / 10.0, "still_behind": behind},
        "subscribers_detail": checks.iter().filter(|c| c.failed() || c.resets > 0).collect::<Vec<_>>(),
        "problems": problems,
    });
    print_table(&report, &checks);
    drop(cluster);
    Ok(report)
}

fn print_table(report: &Value, checks: &[SubCheck]) {
    eprintln!();
    eprintln!(
        "{:<8} {:>6} {:>9} {:>8} {:>7} {:>8} {:>6} {:>6} {:>6}",
        "subs", "count", "connects", "received", "resets", "excused", "lost", "dup", "order"
    );
    for (label, pick) in [
        (
            "sse",
            Box::new(|c: &&SubCheck| c.transport == "sse" && !c.filtered)
                as Box<dyn Fn(&&SubCheck) -> bool>,
        ),
        (
            "sse/filt",
            Box::new(|c: &&SubCheck| c.transport == "sse" && c.filtered),
        ),
        (
            "ws",
            Box::new(|c: &&SubCheck| c.transport == "ws" && !c.filtered),
        ),
        (
            "ws/filt",
            Box::new(|c: &&SubCheck| c.transport == "ws" && c.filtered),
        ),
    ] {
        let rows: Vec<&SubCheck> = checks.iter().filter(pick).collect();
        let sum = |f: fn(&SubCheck) -> u64| rows.iter().map(|c| f(c)).sum::<u64>();
        eprintln!(
            "{:<8} {:>6} {:>9} {:>8} {:>7} {:>8} {:>6} {:>6} {:>6}",
            label,
            rows.len(),
            sum(|c| c.connects),
            sum(|c| c.received),
            sum(|c| c.resets),
            sum(|c| c.excused),
            sum(|c| c.lost),
            sum(|c| c.duplicated),
            sum(|c| c.out_of_order)
        );
    }
    for c in checks.iter().filter(|c| c.failed()) {
        eprintln!(
            "  {}: lost {} (e.g. {:?}), duplicated {}, out of order {}, protocol errors {}",
            c.name, c.lost, c.lost_samples, c.duplicated, c.out_of_order, c.protocol_errors
        );
    }
    eprintln!(
        "faults {}; published {} acknowledged ({} retried); idempotency duplicates {}; mismatches {}; ws close codes {}\nlosses by the fault before them: {}",
        report["faults"],
        report["published"]["acknowledged"],
        report["published"]["retried"],
        report["idempotency_duplicates"].as_array().map_or(0, Vec::len),
        report["mismatches"].as_array().map_or(0, Vec::len),
        report["ws_close_codes"],
        report["losses_by_fault"],
    );
    for m in report["mismatches"]
        .as_array()
        .into_iter()
        .flatten()
        .take(10)
    {
        eprintln!("  mismatch: {}", m.as_str().unwrap_or_default());
    }
    if let Some(webhook) = report["webhook"].as_object() {
        eprintln!(
            "webhook: {} requests, {} failed or refused by the receiver, {} events delivered, {} never delivered",
            webhook["requests"], webhook["failed_or_refused"], webhook["delivered_distinct"], webhook["undelivered"]
        );
    }
    match report["problems"].as_array() {
        Some(p) if !p.is_empty() => eprintln!(
            "FAILED: {}",
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => eprintln!("OK: nothing lost, duplicated, out of order or mismatched"),
    }
}

fn main() {
    let args = Args::parse();
    // However the run ends, no child outlives it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        procs::kill_all();
        default_hook(info);
    }));
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "taskstream-faults-{}-{}",
            std::process::id(),
            args.seed
        ))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = runtime.block_on(async {
        std::fs::create_dir_all(&dir)?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            report = run(&args, &dir) => report,
            _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT)"),
            _ = terminate.recv() => bail!("interrupted (SIGTERM)"),
        }
    });
    procs::kill_all();
    runtime.shutdown_background();
    let code = match outcome {
        Ok(report) => {
            let json = report.to_string();
            println!("{json}");
            if let Some(out) = &args.out {
                if let Err(e) = std::fs::write(out, format!("{json}\n")) {
                    eprintln!("error: write {}: {e}", out.display());
                }
            }
            let failed = report["problems"].as_array().is_some_and(|p| !p.is_empty());
            if failed {
                eprintln!("logs kept in {}", dir.display());
                1
            } else {
                if args.dir.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                0
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}\nlogs kept in {}", dir.display());
            2
        }
    };
    std::process::exit(code);
}
