//! taskstream-bench: opens many SSE subscribers from one process, publishes
//! events, and checks and measures the fan-out (loss, duplicates, order, id
//! monotonicity, end-to-end and publish latency, server RSS, CPU).
//!
//! Works against taskstream (`--target taskstream`, the default) and nchan
//! (`--target nchan`) so the two can be compared with the same client.

mod publish;
mod report;
mod sub;
mod sys;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use taskstream_bench::http::{self, Node};
use tokio::sync::{watch, Semaphore};

use crate::publish::{PubCfg, PubResult};
use crate::report::*;
use crate::sub::{now_ns, Shared, SubCfg, SubResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// taskstream: POST /update_task, GET /events
    Taskstream,
    /// nchan: POST /pub?id=CHANNEL, GET /sub?id=CHANNEL (eventsource)
    Nchan,
}

/// How the subscribers receive events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `GET /events` (Server-Sent Events)
    Sse,
    /// `GET /ws` (taskstream only): one `subscribe` message, then event messages
    Ws,
}

impl Transport {
    /// The status of a response that starts a stream.
    pub fn ok_status(self) -> u16 {
        match self {
            Transport::Sse => 200,
            Transport::Ws => 101,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// 1,000 subscribers, 2,000 events at max rate
    A,
    /// 1,000 subscribers, 200 events/s for 10 s
    B,
    /// 10,000 idle subscribers: RSS per subscriber (then 10 events to check they are live)
    C,
    /// 10,000 subscribers, 200 events at max rate
    D,
    /// reconnect storm: 10,000 subscribers drop, 500 events are published, all reconnect at once with Last-Event-ID
    E,
    /// 100 subscribers at 200 events/s for 10 s (p99 target under 2 ms)
    F,
}

/// SSE fan-out load generator and checker for taskstream (and nchan).
///
/// Prints a human summary on stderr; with --json, one JSON object on stdout.
/// Exits 1 when anything was lost, duplicated, out of order, or failed.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Server base URL (loopback only: 127.0.0.0/8, ::1 or localhost).
    /// Default http://127.0.0.1:8080, or http://127.0.0.1:0 with
    /// --spawn-server (port 0: the server picks a free port and prints it).
    /// Several comma-separated URLs (nodes of one cluster): subscriber i
    /// connects to node i mod N, publisher connection k posts to node k mod N.
    #[arg(long, env = "TSB_URL")]
    url: Option<String>,

    /// Publish here instead of to --url (taskstream's --publish-bind listener), e.g.
    /// http://127.0.0.1:18099; with --spawn-server give that address in --spawn-args.
    #[arg(long)]
    publish_url: Option<String>,

    /// How the subscribers receive events: sse (GET /events) or ws (GET /ws).
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,

    /// Kind of server: decides the publish and subscribe requests.
    #[arg(long, value_enum, env = "TSB_TARGET", default_value = "taskstream")]
    target: Target,

    /// Preset workload (flags given explicitly override its values).
    #[arg(long, value_enum)]
    workload: Option<Workload>,

    /// CI preset: 50 subscribers, 200 events; fails on any loss/dup/disorder.
    #[arg(long)]
    smoke: bool,

    /// Number of SSE subscribers.
    #[arg(short = 'n', long)]
    subscribers: Option<usize>,

    /// Number of events to publish (before the storm, for --storm-back).
    #[arg(short = 'm', long)]
    events: Option<u64>,

    /// Events per second; 0 or absent = as fast as the server accepts.
    #[arg(long)]
    rate: Option<f64>,

    /// Concurrent keep-alive publisher connections.
    #[arg(long)]
    publishers: Option<usize>,

    /// Nice value for the publishers' thread (needs CAP_SYS_NICE below 0; kept as it is
    /// when refused, which the report shows as publish.thread_nice null). On a machine
    /// whose cores the server shares with this tool, a publish round trip otherwise
    /// includes the time the tool's own publisher waits for a core behind its readers.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    publisher_nice: i32,

    /// Number of distinct task ids to spread updates over (task_id = seq % tasks + 1).
    #[arg(long, default_value_t = 100)]
    tasks: u64,

    /// Seconds to wait after all subscribers connected before measuring RSS
    /// and publishing.
    #[arg(long)]
    idle: Option<f64>,

    /// Reconnect storm: after the first events, every subscriber disconnects,
    /// this many events are published, then all reconnect at once with their
    /// Last-Event-ID and must receive exactly those (plus live ones).
    #[arg(long)]
    storm_back: Option<u64>,

    /// Storm: events published live while the subscribers reconnect.
    #[arg(long)]
    storm_live: Option<u64>,

    /// Storm: rate of the live events (events/s).
    #[arg(long, default_value_t = 200.0)]
    storm_rate: f64,

    /// Storm: max concurrent reconnects (0 = all at once).
    #[arg(long, default_value_t = 0)]
    storm_concurrency: usize,

    /// Max concurrent connection attempts while opening the subscribers.
    #[arg(long, default_value_t = 1000)]
    connect_concurrency: usize,

    /// Source addresses: "auto" (spread over 127.0.X.2.. when many
    /// connections are needed), "none", or a count of addresses to use.
    #[arg(long, default_value = "auto")]
    source_ips: String,

    /// Connections per source address in auto mode.
    #[arg(long, default_value_t = 5000)]
    per_source_ip: usize,

    /// Server pid(s) to read RSS/CPU from (default: whoever listens on the port).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,

    /// Start this taskstream binary on the URL's port and stop it at the end.
    #[arg(long)]
    spawn_server: Option<PathBuf>,

    /// Arguments for --spawn-server ({port} is replaced).
    #[arg(
        long,
        default_value = "--bind 127.0.0.1:{port} --max-subscribers 20000 --buffer 1024"
    )]
    spawn_args: String,

    /// File for the spawned server's stderr (default: discarded).
    #[arg(long)]
    server_log: Option<PathBuf>,

    /// nchan channel id (default: a fresh one per run).
    #[arg(long)]
    channel: Option<String>,

    /// Seconds without any new delivery after which waiting stops.
    #[arg(long, default_value_t = 5.0)]
    drain_timeout: f64,

    /// Seconds a subscriber waits for its response head.
    #[arg(long, default_value_t = 30.0)]
    head_timeout: f64,

    /// Hard cap on the whole run, seconds.
    #[arg(long, default_value_t = 300.0)]
    max_duration: f64,

    /// Worker threads for the subscribers (1 = current-thread runtime); the publishers always
    /// run on a thread of their own.
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,

    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Server label for reports and tables (default: the target name).
    #[arg(long)]
    label: Option<String>,

    /// Latency goal: warn when e2e p99 exceeds it (milliseconds).
    #[arg(long)]
    p99_target_ms: Option<f64>,

    /// Print a markdown table from JSON reports instead of running.
    #[arg(long, num_args = 1.., value_name = "REPORT.json")]
    table: Vec<PathBuf>,
}

/// The fully resolved plan of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub workload: String,
    pub transport: Transport,
    pub nodes: usize,
    pub subscribers: usize,
    pub events: u64,
    pub rate: Option<f64>,
    pub publishers: usize,
    pub tasks: u64,
    pub idle_s: f64,
    pub storm_back: u64,
    pub storm_live: u64,
    pub storm_rate: f64,
    pub storm_concurrency: usize,
    pub connect_concurrency: usize,
    pub threads: usize,
    pub p99_target_ms: Option<f64>,
}

fn plan(a: &Args) -> Plan {
    // (name, subscribers, events, rate, publishers, idle, storm_back, storm_live, p99 target)
    type Preset = (
        &'static str,
        usize,
        u64,
        Option<f64>,
        usize,
        f64,
        u64,
        u64,
        Option<f64>,
    );
    let p: Preset = if a.smoke {
        ("smoke", 50, 200, None, 2, 0.2, 0, 0, None)
    } else {
        match a.workload {
            Some(Workload::A) => ("a", 1000, 2000, None, 4, 0.5, 0, 0, None),
            Some(Workload::B) => ("b", 1000, 2000, Some(200.0), 8, 0.5, 0, 0, None),
            Some(Workload::C) => ("c", 10_000, 10, None, 1, 3.0, 0, 0, None),
            Some(Workload::D) => ("d", 10_000, 200, None, 4, 1.0, 0, 0, None),
            Some(Workload::E) => ("e", 10_000, 10, None, 4, 1.0, 500, 100, None),
            Some(Workload::F) => ("f", 100, 2000, Some(200.0), 4, 0.5, 0, 0, Some(2.0)),
            None => ("custom", 100, 1000, None, 2, 0.5, 0, 0, None),
        }
    };
    let rate = match a.rate {
        Some(r) if r > 0.0 => Some(r),
        Some(_) => None,
        None => p.3,
    };
    Plan {
        workload: p.0.to_string(),
        transport: a.transport,
        nodes: a.url.as_deref().map_or(1, |u| u.split(',').count()),
        subscribers: a.subscribers.unwrap_or(p.1),
        events: a.events.unwrap_or(p.2),
        rate,
        publishers: a.publishers.unwrap_or(p.4).max(1),
        tasks: a.tasks.max(1),
        idle_s: a.idle.unwrap_or(p.5),
        storm_back: a.storm_back.unwrap_or(p.6),
        storm_live: a
            .storm_live
            .unwrap_or(if a.storm_back.is_some() && p.6 == 0 {
                100
            } else {
                p.7
            }),
        storm_rate: a.storm_rate,
        storm_concurrency: a.storm_concurrency,
        connect_concurrency: a.connect_concurrency.max(1),
        threads: a.threads.max(1),
        p99_target_ms: a.p99_target_ms.or(p.8),
    }
}

/// Resolve the URL to a loopback socket address; refuse anything else.
fn resolve(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let with_port = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolve {hostport}"))?
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| {
            anyhow!("{hostport} is not a loopback address: load tests may only target 127.0.0.0/8 or ::1")
        })?;
    Ok((addr, hostport.to_string()))
}

fn source_ips(a: &Args, plan: &Plan, run: u64, target: SocketAddr) -> Result<Vec<Ipv4Addr>> {
    if !target.is_ipv4() {
        return Ok(Vec::new());
    }
    let conns = plan.subscribers * if plan.storm_back > 0 { 2 } else { 1 };
    let k = match a.source_ips.as_str() {
        "none" => 0,
        "auto" => {
            if conns > 1000 {
                conns.div_ceil(a.per_source_ip.max(1))
            } else {
                0
            }
        }
        n => n
            .parse::<usize>()
            .map_err(|_| anyhow!("--source-ips: auto, none or a number"))?,
    };
    if k > 250 {
        bail!("--source-ips: at most 250 addresses");
    }
    // A third octet that changes from run to run, so that TIME_WAIT sockets
    // left by earlier runs never collide with this one.
    let third = 1 + (run % 250) as u8;
    Ok((0..k)
        .map(|i| Ipv4Addr::new(127, 0, third, 2 + i as u8))
        .collect())
}

fn main() {
    let args = Args::parse();
    if !args.table.is_empty() {
        match report::print_table(&args.table) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        }
    }
    let plan = plan(&args);
    let rt = if plan.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(plan.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    match rt.block_on(run(&args, plan)) {
        Ok(rep) => {
            eprint!("{}", report::human(&rep));
            let json = serde_json::to_string(&rep).expect("serialize report");
            if args.json {
                println!("{json}");
            }
            if let Some(p) = &args.out {
                if let Err(e) = std::fs::write(p, format!("{json}\n")) {
                    eprintln!("error: write {}: {e}", p.display());
                }
            }
            // Drop the runtime without waiting for anything still open.
            rt.shutdown_background();
            std::process::exit(if rep.problems.is_empty() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            rt.shutdown_background();
            std::process::exit(2);
        }
    }
}

struct Deadline(Instant);

impl Deadline {
    fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Poll until `done()` or no progress of `progress()` for `idle`, or the
/// deadline. Returns true when done.
async fn wait_until(
    deadline: &Deadline,
    idle: Duration,
    mut progress: impl FnMut() -> u64,
    mut done: impl FnMut() -> bool,
) -> bool {
    let mut last = progress();
    let mut last_change = Instant::now();
    loop {
        if done() {
            return true;
        }
        if deadline.left().is_zero() || last_change.elapsed() > idle {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let p = progress();
        if p != last {
            last = p;
            last_change = Instant::now();
        }
    }
}

/// Wait until `progress` has not changed for 1 s (or the deadline).
async fn settle(deadline: &Deadline, progress: impl FnMut() -> u64) {
    wait_until(deadline, Duration::from_secs(1), progress, || false).await;
}

async fn run(a: &Args, plan: Plan) -> Result<Report> {
    let wall = Instant::now();
    let deadline = Deadline(wall + Duration::from_secs_f64(a.max_duration));
    let cpu0 = sys::own_cpu();
    let load0 = sys::loadavg();
    let machine0 = sys::machine_cpu();
    let url = a.url.clone().unwrap_or_else(|| {
        if a.spawn_server.is_some() {
            "http://127.0.0.1:0".into()
        } else {
            "http://127.0.0.1:8080".into()
        }
    });
    if a.transport == Transport::Ws && a.target != Target::Taskstream {
        bail!("--transport ws needs --target taskstream");
    }
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    if urls.len() > 1 && a.spawn_server.is_some() {
        bail!("--spawn-server starts one node: give one --url, or start the nodes yourself");
    }
    let (mut addr, mut host) = resolve(urls[0])?;
    let nofile = sys::raise_nofile();
    let needed = plan.subscribers + plan.publishers + 64;
    if (nofile as usize) < needed {
        bail!(
            "open-file limit {nofile} is too low for {} subscribers (hard limit; raise it with ulimit -Hn)",
            plan.subscribers
        );
    }
    let run_id = now_ns() / 1000 % 1_000_000_000_000;
    let label = a
        .label
        .clone()
        .unwrap_or_else(|| format!("{:?}", a.target).to_lowercase());
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    let spawned = match &a.spawn_server {
        Some(path) => {
            let args: Vec<String> = a
                .spawn_args
                .replace("{port}", &addr.port().to_string())
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Some(sys::Spawned::start(path, &args, a.server_log.as_deref())?)
        }
        None => None,
    };
    // With port 0 the spawned server picks a free port and prints it.
    if let Some(url) = spawned.as_ref().and_then(|s| s.url()) {
        if addr.port() == 0 {
            (addr, host) = resolve(&url)?;
        }
    }
    if addr.port() == 0 {
        bail!("port 0 needs --spawn-server (the server prints the port it picked)");
    }
    let mut nodes = vec![Node { addr, host }];
    for other in &urls[1..] {
        let (addr, host) = resolve(other)?;
        nodes.push(Node { addr, host });
    }
    let url = nodes
        .iter()
        .map(|n| format!("http://{}", n.host))
        .collect::<Vec<_>>()
        .join(",");
    let pids = if let Some(s) = &spawned {
        vec![s.pid()]
    } else if !a.server_pid.is_empty() {
        a.server_pid.clone()
    } else {
        nodes
            .iter()
            .flat_map(|n| sys::pids_listening_on(n.addr.port()))
            .collect()
    };
    if pids.is_empty() {
        warnings.push(format!(
            "no server pid found for port {}: RSS and server CPU not measured",
            addr.port()
        ));
    }

    let channel = a
        .channel
        .clone()
        .unwrap_or_else(|| format!("bench-{run_id}"));
    let (sub_path, pub_path) = match a.target {
        Target::Taskstream => ("/events".to_string(), "/update_task".to_string()),
        Target::Nchan => (format!("/sub?id={channel}"), format!("/pub?id={channel}")),
    };
    let srcs = source_ips(a, &plan, run_id, addr)?;
    let storm = plan.storm_back > 0;
    let total_seq = plan.events + plan.storm_back + plan.storm_live;
    let sub_cfg = Arc::new(SubCfg {
        nodes: nodes.clone(),
        transport: a.transport,
        path: sub_path,
        run: run_id,
        total_seq,
        storm_lo: plan.events,
        storm_replay: plan.storm_back,
        publishers: plan.publishers,
        source_ips: srcs.clone(),
        head_timeout: Duration::from_secs_f64(a.head_timeout).min(deadline.left()),
    });
    let publish_nodes = match &a.publish_url {
        Some(url) => {
            let (addr, host) = resolve(url)?;
            vec![Node { addr, host }]
        }
        None => nodes,
    };
    let pub_cfg = Arc::new(PubCfg {
        nodes: publish_nodes,
        path: pub_path,
        run: run_id,
        tasks: plan.tasks,
        publishers: plan.publishers,
        thread_nice: a.publisher_nice,
    });

    tokio::time::sleep(Duration::from_millis(200)).await;
    let mem_before = Mem::read(&pids);
    let server_cpu0 = sys::sum_cpu(&pids);

    // Connect every subscriber.
    let shared = Arc::new(Shared::new());
    let (ctrl_tx, ctrl_rx) = watch::channel(sub::RUN);
    let sem = Arc::new(Semaphore::new(plan.connect_concurrency));
    let storm_sem =
        (plan.storm_concurrency > 0).then(|| Arc::new(Semaphore::new(plan.storm_concurrency)));
    let n = plan.subscribers;
    let t_connect = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        handles.push(tokio::spawn(sub::run_sub(
            i,
            sub_cfg.clone(),
            shared.clone(),
            ctrl_rx.clone(),
            sem.clone(),
            storm_sem.clone(),
        )));
    }
    let all_answered = wait_until(
        &deadline,
        Duration::from_secs(60),
        || {
            (shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed))
                as u64
        },
        || shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= n,
    )
    .await;
    let connect_seconds = t_connect.elapsed().as_secs_f64();
    if !all_answered {
        problems.push("not every subscriber got an answer to its GET".to_string());
    }
    let connected = shared.connected.load(Ordering::Relaxed);
    eprintln!(
        "[{:.1}s] {connected}/{n} subscribers connected in {connect_seconds:.2}s",
        wall.elapsed().as_secs_f64()
    );

    tokio::time::sleep(Duration::from_secs_f64(plan.idle_s).min(deadline.left())).await;
    let mem_connected = Mem::read(&pids);
    let fds_connected = pids.first().and_then(|&p| sys::fd_count(p));

    // Phase 0: publish and wait for every delivery.
    let pub0 = publish::publish(pub_cfg.clone(), 0, plan.events, plan.rate, deadline.0).await;
    eprintln!(
        "[{:.1}s] published {}/{} events in {:.2}s",
        wall.elapsed().as_secs_f64(),
        pub0.ok,
        plan.events,
        pub0.seconds
    );
    shared
        .unpublished
        .lock()
        .expect("unpublished lock")
        .extend(&pub0.failed_seqs);
    let expected0 = connected as u64 * pub0.ok;
    wait_until(
        &deadline,
        Duration::from_secs_f64(a.drain_timeout),
        || shared.delivered[0].load(Ordering::Relaxed),
        || shared.delivered[0].load(Ordering::Relaxed) >= expected0,
    )
    .await;
    // The count can reach the target early when a publish that timed out
    // was delivered anyway: wait until nothing more arrives for a moment.
    settle(&deadline, || shared.delivered[0].load(Ordering::Relaxed)).await;
    eprintln!(
        "[{:.1}s] phase 1: {} of {expected0} deliveries",
        wall.elapsed().as_secs_f64(),
        shared.delivered[0].load(Ordering::Relaxed)
    );

    // Storm.
    let mut storm_run = None;
    if storm {
        ctrl_tx.send_replace(sub::DISCONNECT);
        wait_until(
            &deadline,
            Duration::from_secs(30),
            || shared.disconnected.load(Ordering::Relaxed) as u64,
            || shared.disconnected.load(Ordering::Relaxed) >= n,
        )
        .await;
        let pub_back = publish::publish(
            pub_cfg.clone(),
            plan.events,
            plan.storm_back,
            None,
            deadline.0,
        )
        .await;
        eprintln!(
            "[{:.1}s] all disconnected; published {} events while they were away",
            wall.elapsed().as_secs_f64(),
            pub_back.ok
        );
        shared
            .unpublished
            .lock()
            .expect("unpublished lock")
            .extend(&pub_back.failed_seqs);
        // Let the server notice the closed connections.
        tokio::time::sleep(Duration::from_secs(1).min(deadline.left())).await;
        let mem_storm_before = Mem::read(&pids);
        let storm_start_ns = now_ns();
        let t_storm = Instant::now();
        ctrl_tx.send_replace(sub::RECONNECT);
        let live = tokio::spawn(publish::publish(
            pub_cfg.clone(),
            plan.events + plan.storm_back,
            plan.storm_live,
            Some(plan.storm_rate),
            deadline.0,
        ));
        let all_back = wait_until(
            &deadline,
            Duration::from_secs(60),
            || {
                (shared.reconnected.load(Ordering::Relaxed)
                    + shared.refailed.load(Ordering::Relaxed)) as u64
            },
            || {
                shared.reconnected.load(Ordering::Relaxed) + shared.refailed.load(Ordering::Relaxed)
                    >= connected
            },
        )
        .await;
        if !all_back {
            problems.push("storm: not every subscriber got an answer to its reconnect".into());
        }
        let reconnected = shared.reconnected.load(Ordering::Relaxed);
        wait_until(
            &deadline,
            Duration::from_secs_f64(a.drain_timeout),
            || shared.delivered[1].load(Ordering::Relaxed),
            || shared.caught_up.load(Ordering::Relaxed) >= reconnected,
        )
        .await;
        let caught_up = shared.caught_up.load(Ordering::Relaxed);
        let catch_up_seconds = if caught_up >= reconnected && reconnected > 0 {
            Some(
                shared
                    .last_caught_up_ns
                    .load(Ordering::Relaxed)
                    .saturating_sub(storm_start_ns) as f64
                    / 1e9,
            )
        } else {
            None
        };
        let mut catch_up_us = sub::new_hist();
        for &t in shared
            .caught_up_at_ns
            .lock()
            .expect("caught_up_at_ns lock")
            .iter()
        {
            catch_up_us.saturating_record((t.saturating_sub(storm_start_ns) / 1000).max(1));
        }
        let pub_live = live.await.map_err(|e| anyhow!("live publisher: {e}"))?;
        {
            let mut u = shared.unpublished.lock().expect("unpublished lock");
            u.extend(&pub_live.failed_seqs);
            u.sort_unstable();
        }
        let expected1 = reconnected as u64 * (pub_back.ok + pub_live.ok);
        wait_until(
            &deadline,
            Duration::from_secs_f64(a.drain_timeout),
            || shared.delivered[1].load(Ordering::Relaxed),
            || shared.delivered[1].load(Ordering::Relaxed) >= expected1,
        )
        .await;
        settle(&deadline, || shared.delivered[1].load(Ordering::Relaxed)).await;
        eprintln!(
            "[{:.1}s] storm: {reconnected} reconnected, {caught_up} caught up, {} of {expected1} deliveries",
            wall.elapsed().as_secs_f64(),
            shared.delivered[1].load(Ordering::Relaxed)
        );
        let complete_seconds = shared.last_delivery_ns[1]
            .load(Ordering::Relaxed)
            .saturating_sub(storm_start_ns) as f64
            / 1e9;
        storm_run = Some(StormRun {
            pub_back,
            pub_live,
            reconnected,
            refailed: shared.refailed.load(Ordering::Relaxed),
            reconnect_seconds: shared
                .last_reconnect_ns
                .load(Ordering::Relaxed)
                .saturating_sub(storm_start_ns) as f64
                / 1e9,
            caught_up,
            catch_up_seconds,
            catch_up_us,
            complete_seconds,
            storm_wall: t_storm.elapsed().as_secs_f64(),
            mem_before: mem_storm_before,
        });
    }

    let cut_short = deadline.left().is_zero();
    if cut_short {
        eprintln!(
            "[{:.1}s] run cut at --max-duration {} s",
            wall.elapsed().as_secs_f64(),
            a.max_duration
        );
    }
    let mem_end = Mem::read(&pids);
    let server_cpu1 = sys::sum_cpu(&pids);
    ctrl_tx.send_replace(sub::STOP);
    let mut results: Vec<SubResult> = Vec::with_capacity(n);
    for h in handles {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => results.push(SubResult {
                error: Some(format!("subscriber task failed: {e}")),
                ..Default::default()
            }),
            Err(_) => results.push(SubResult {
                error: Some("subscriber did not stop".into()),
                ..Default::default()
            }),
        }
    }
    let server_exit = spawned.map(|s| s.stop(Duration::from_secs(10)));
    let cpu1 = sys::own_cpu();
    let machine1 = sys::machine_cpu();
    let wall_s = wall.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let server_total = match (server_cpu0, server_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    // Whatever ran besides the server and this tool (their CPU is in the
    // user/system columns; loopback networking mostly shows as softirq,
    // which is left out on both sides).
    let others = match (machine0, machine1, server_total) {
        (Some(m0), Some(m1), Some(srv)) => {
            Some((m1.0 - m0.0 - srv - (cpu1.0 - cpu0.0) - (cpu1.1 - cpu0.1)).max(0.0))
        }
        _ => None,
    };
    let steal = match (machine0, machine1) {
        (Some(m0), Some(m1)) => Some(m1.1 - m0.1),
        _ => None,
    };

    let inputs = Inputs {
        label,
        target: a.target,
        url,
        plan,
        pids,
        srcs: srcs.iter().map(|ip| IpAddr::V4(*ip).to_string()).collect(),
        connect_seconds,
        mem_before,
        mem_connected,
        mem_end,
        fds_connected,
        server_cpu: server_total,
        server_exit,
        pub0,
        first_delivery_phase0_last_ns: shared.last_delivery_ns[0].load(Ordering::Relaxed),
        e2e0: shared.e2e[0].lock().expect("hist").clone(),
        e2e1: shared.e2e[1].lock().expect("hist").clone(),
        storm: storm_run,
        results,
        tool_cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
        wall_s,
        nofile,
        cut_short,
        max_duration: a.max_duration,
        machine: MachineRep {
            cores,
            mem_total_kb: sys::mem_total_kb(),
            loadavg_start: load0,
            loadavg_end: sys::loadavg(),
            others_cpu_s: others.map(|v| (v * 10.0).round() / 10.0),
            others_share: others.map(|v| ((v / (cores as f64 * wall_s)) * 1000.0).round() / 1000.0),
            steal_s: steal.map(|v| (v * 10.0).round() / 10.0),
        },
        problems,
        warnings,
    };
    Ok(report::build(inputs))
}

/// Memory of the server processes at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Mem {
    pub rss_kb: Option<u64>,
    pub pss_kb: Option<u64>,
}

impl Mem {
    fn read(pids: &[u32]) -> Mem {
        Mem {
            rss_kb: sys::sum_over(pids, sys::rss_kb),
            pss_kb: sys::sum_over(pids, sys::pss_kb),
        }
    }
}

/// What the storm phase measured.
pub struct StormRun {
    pub pub_back: PubResult,
    pub pub_live: PubResult,
    pub reconnected: usize,
    pub refailed: usize,
    pub reconnect_seconds: f64,
    pub caught_up: usize,
    pub catch_up_seconds: Option<f64>,
    /// Per subscriber: from the reconnect signal until it had every replayed event.
    pub catch_up_us: hdrhistogram::Histogram<u64>,
    pub complete_seconds: f64,
    pub storm_wall: f64,
    pub mem_before: Mem,
}
