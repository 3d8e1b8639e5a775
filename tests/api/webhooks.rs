//! `--webhook`: a real receiver on loopback (a small HTTP/1.1 server on a Tokio listener) gets
//! every event, signed, retried with the same id, in order per task, and across a SIGKILL.

use crate::helpers::{memory_only, temp_dir, RedisServer, TempDir, TestServer, PATIENCE};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

impl Received {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the receiver answers.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 after a random pause of up to this many milliseconds.
    Ok { jitter_ms: u64 },
    /// 503 to the first `n` attempts of each id, then 200.
    FailFirst(usize),
    /// Always 500.
    Fail,
    /// 200 after this many milliseconds; the request is recorded as it arrives.
    Slow(u64),
}

struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    arrived: Arc<tokio::sync::Notify>,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        Self::start_on(0, answer).await
    }

    async fn start_on(port: u16, answer: Answer) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn({
            let (seen, answer, arrived) = (seen.clone(), answer.clone(), arrived.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (seen, answer, arrived) = (seen.clone(), answer.clone(), arrived.clone());
                    tokio::spawn(async move {
                        let _ = serve(stream, seen, answer, arrived).await;
                    });
                }
            }
        });
        Receiver {
            port,
            seen,
            answer,
            arrived,
            _task: task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what was received, at most `PATIENCE`.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let arrived = self.arrived.notified();
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            assert!(
                tokio::time::timeout_at(deadline, arrived).await.is_ok(),
                "the receiver never saw {what}; it got {} request(s)",
                seen.len()
            );
        }
    }

    /// Waits until every id in `ids` was answered 2xx at least once.
    async fn wait_for_ids(&self, ids: &[String]) -> Vec<Received> {
        self.wait_until(&format!("all {} events", ids.len()), |seen| {
            ids.iter()
                .all(|id| delivered(seen).contains_key(id.as_str()))
        })
        .await
    }
}

/// The ids answered 200, with the request that got the 200 (the receiver records the answer in
/// a pseudo-header `x-answered`).
fn delivered(seen: &[Received]) -> BTreeMap<&str, &Received> {
    seen.iter()
        .filter(|r| r.headers.get("x-answered").is_some_and(|s| s == "200"))
        .map(|r| (r.id(), r))
        .collect()
}

async fn serve(
    stream: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<Received>>>,
    answer: Arc<Mutex<Answer>>,
    arrived: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            read.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
        let mode = *answer.lock().unwrap();
        let status = match mode {
            Answer::Ok { jitter_ms } => {
                if jitter_ms > 0 {
                    let pause = fastrand::u64(0..=jitter_ms);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                200
            }
            Answer::FailFirst(n) => {
                let id = headers.get("webhook-id").cloned().unwrap_or_default();
                let earlier = seen.lock().unwrap().iter().filter(|r| r.id() == id).count();
                if earlier < n {
                    503
                } else {
                    200
                }
            }
            Answer::Fail => 500,
            Answer::Slow(ms) => {
                let mut headers = headers.clone();
                headers.insert("x-answered".into(), "200".into());
                seen.lock().unwrap().push(Received {
                    headers,
                    body: body.clone(),
                    at: Instant::now(),
                });
                arrived.notify_waiters();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                write
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await?;
                continue;
            }
        };
        headers.insert("x-answered".into(), status.to_string());
        seen.lock().unwrap().push(Received {
            headers,
            body,
            at: Instant::now(),
        });
        arrived.notify_waiters();
        let reason = if status == 200 { "OK" } else { "Nope" };
        write
            .write_all(
                format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 2\r\n\r\nok").as_bytes(),
            )
            .await?;
    }
}

/// Checks the signature as a receiver would: recompute the HMAC of `id.timestamp.body` with
/// the decoded key and compare it with every `v1,` signature of the header.
fn verify(received: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    let h = &received.headers;
    mac.update(format!("{}.{}.", h["webhook-id"], h["webhook-timestamp"]).as_bytes());
    mac.update(&received.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    h.get("webhook-signature").is_some_and(|header| {
        header
            .split(' ')
            .any(|sig| sig.strip_prefix("v1,") == Some(expected.as_str()))
    })
}

/// The `--data-dir` tests start their own durable node: on the Redis run of the suite they would
/// only repeat themselves.
fn skip_on_redis() -> bool {
    memory_only("it runs --data-dir itself, the same on every run of the suite")
}

#[tokio::test]
async fn every_event_arrives_signed_and_in_order_per_task() {
    let receiver = Receiver::start(Answer::Ok { jitter_ms: 15 }).await;
    let url = receiver.url();
    let server = TestServer::start(&[
        "--webhook",
        &url,
        "--webhook-secret",
        SECRET,
        "--webhook-concurrency",
        "8",
    ])
    .await;
    let mut ids = Vec::new();
    for version in 0..10 {
        for task in 1..=6 {
            ids.push(
                server
                    .update(json!({"task_id": task, "status": format!("v{version}")}))
                    .await,
            );
        }
    }
    let seen = receiver.wait_for_ids(&ids).await;
    assert!(seen.iter().all(verify), "every request verifies");
    for received in &seen {
        assert_eq!(received.headers["content-type"], "application/json");
        let timestamp: u64 = received.headers["webhook-timestamp"].parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(timestamp) < 60, "the timestamp is now");
    }
    // A tampered body does not verify: the check above can fail.
    let mut tampered = seen[0].clone();
    tampered.body.push(b' ');
    assert!(!verify(&tampered));
    // Per task, the receiver saw the versions in order, although requests ran in parallel.
    let mut versions: HashMap<i64, Vec<i64>> = HashMap::new();
    for received in &seen {
        let data = received.json();
        versions
            .entry(data["task_id"].as_i64().unwrap())
            .or_default()
            .push(data["version"].as_i64().unwrap());
    }
    for (task, versions) in &versions {
        assert_eq!(versions, &(1..=10).collect::<Vec<_>>(), "task {task}");
    }
    assert_eq!(seen.len(), ids.len(), "each event once in a calm run");
    server
        .wait_for_metric("taskstream_webhook_deliveries_total{webhook=\"0\"}", 60.0)
        .await;
    server
        .wait_for_metric("taskstream_webhook_backlog{webhook=\"0\"}", 0.0)
        .await;
}

#[tokio::test]
async fn failures_are_retried_with_the_same_id_and_backoff_then_dead_lettered() {
    let flaky = Receiver::start(Answer::FailFirst(3)).await;
    let dead = Receiver::start(Answer::Fail).await;
    // A URL with a password, a secret path and a secret query, pointing at a closed port.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let secret_url = format!(
        "http://hookuser:pa55word@127.0.0.1:{closed_port}/T0/B0/pathsecret?token=querysecret"
    );
    let (flaky_url, dead_url) = (flaky.url(), dead.url());
    let server = TestServer::start_with_env(
        &[
            "--webhook",
            &flaky_url,
            "--webhook",
            &dead_url,
            "--webhook",
            &secret_url,
            "--webhook-max-age",
            "1",
        ],
        &[
            ("TASKSTREAM_WEBHOOK_BACKOFF_MS", "100"),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let id = server.update(json!({"task_id": 1, "status": "a"})).await;
    let seen = flaky
        .wait_until("a delivery after three failures", |seen| seen.len() >= 4)
        .await;
    assert!(
        seen.iter().all(|r| r.id() == id),
        "the same webhook-id on every retry"
    );
    let answers: Vec<_> = seen
        .iter()
        .map(|r| r.headers["x-answered"].as_str())
        .collect();
    assert_eq!(answers, ["503", "503", "503", "200"]);
    // Backoff 100 ms, doubling, each within 75-125 %: at least 75, 150 and 300 ms apart.
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (gap, least) in gaps.iter().zip([75, 150, 300]) {
        assert!(
            *gap >= Duration::from_millis(least),
            "retry gaps {gaps:?} below the backoff"
        );
    }
    assert!(gaps[2] > gaps[0], "the backoff grows: {gaps:?}");
    server
        .wait_for_metric("taskstream_webhook_retries_total{webhook=\"0\"}", 3.0)
        .await;
    // The always-failing receiver: given up once --webhook-max-age (1 s) has passed.
    server
        .wait_for_metric("taskstream_webhook_dead_letters_total{webhook=\"1\"}", 1.0)
        .await;
    assert!(dead.seen().len() >= 2, "retried before giving up");
    let logs = server.wait_for_log("dead-lettered").await;
    server
        .wait_for_metric("taskstream_webhook_dead_letters_total{webhook=\"2\"}", 1.0)
        .await;
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logs = logs + &server.logs();
    assert!(
        logs.contains(&format!("#2 http://127.0.0.1:{closed_port}")),
        "{logs}"
    );
    for secret in ["pa55word", "hookuser", "pathsecret", "querysecret"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
    }
}

#[tokio::test]
async fn publishing_does_not_wait_for_a_receiver_that_is_down() {
    let receiver = Receiver::start(Answer::Fail).await;
    let url = receiver.url();
    let server = TestServer::start_with_env(
        &["--webhook", &url],
        &[("TASKSTREAM_WEBHOOK_BACKOFF_MS", "50")],
    )
    .await;
    let mut slowest = Duration::ZERO;
    let mut ids = Vec::new();
    for n in 0..100 {
        let started = Instant::now();
        ids.push(
            server
                .update(json!({"task_id": n % 10 + 1, "status": "x"}))
                .await,
        );
        slowest = slowest.max(started.elapsed());
    }
    // The worker is retrying (and would hold a publish that waited for it for seconds).
    receiver
        .wait_until("a retry", |seen| seen.len() >= 20)
        .await;
    assert!(
        slowest < Duration::from_millis(500),
        "a publish took {slowest:?} while the receiver was down"
    );
    // A gauge, refreshed once a second: polled, as there is no event to await.
    let deadline = Instant::now() + PATIENCE;
    while server
        .metric(r#"taskstream_webhook_backlog{webhook="0"}"#)
        .await
        < 100.0
    {
        assert!(
            Instant::now() < deadline,
            "the undelivered events are the backlog; logs:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let oldest = server
        .metric(r#"taskstream_webhook_oldest_undelivered_seconds{webhook="0"}"#)
        .await;
    assert!(oldest < 60.0);
    // It comes back: every event is delivered, nothing was dropped meanwhile.
    receiver.set(Answer::Ok { jitter_ms: 0 });
    receiver.wait_for_ids(&ids).await;
    server
        .wait_for_metric("taskstream_webhook_backlog{webhook=\"0\"}", 0.0)
        .await;
}

#[tokio::test]
async fn the_backlog_survives_sigkill_with_data_dir() {
    if skip_on_redis() {
        return;
    }
    let dir = TempDir(temp_dir());
    let receiver = Receiver::start(Answer::Fail).await;
    let url = receiver.url();
    let args = ["--webhook", url.as_str()];
    let env = [("TASKSTREAM_WEBHOOK_BACKOFF_MS", "50")];
    let mut server = TestServer::start_in_with_env(&dir.0, &args, &env).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            server
                .update(json!({"task_id": n % 4 + 1, "status": "x"}))
                .await,
        );
    }
    receiver
        .wait_until("attempts", |seen| seen.len() >= 8)
        .await;
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait_exit(PATIENCE).await;
    drop(server);
    // The receiver is back; a new process on the same directory delivers what was stored.
    receiver.set(Answer::Ok { jitter_ms: 0 });
    let server = TestServer::start_in_with_env(&dir.0, &args, &env).await;
    let seen = receiver.wait_for_ids(&ids).await;
    server.wait_for_log("resuming after").await;
    let got = delivered(&seen);
    assert_eq!(got.len(), ids.len());
    // And a restart after the delivery does not send them again: the position was stored.
    server
        .wait_for_metric("taskstream_webhook_backlog{webhook=\"0\"}", 0.0)
        .await;
    let before = receiver.seen().len();
    let mut server = server;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_exit(PATIENCE).await;
    drop(server);
    let server = TestServer::start_in_with_env(&dir.0, &args, &env).await;
    let id = server.update(json!({"task_id": 99, "status": "new"})).await;
    let seen = receiver
        .wait_until("the new event", |seen| seen.iter().any(|r| r.id() == id))
        .await;
    assert_eq!(
        seen.len(),
        before + 1,
        "only the new event after a clean restart"
    );
}

#[tokio::test]
async fn a_version_1_database_is_upgraded_and_then_keeps_positions() {
    if skip_on_redis() {
        return;
    }
    let dir = TempDir(temp_dir());
    let mut server = TestServer::start_in(&dir.0, &[]).await;
    server
        .update(json!({"task_id": 1, "status": "before"}))
        .await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_exit(PATIENCE).await;
    drop(server);
    // Made into what a version 1 build wrote: the same, without the webhook positions.
    let db = rusqlite::Connection::open(dir.0.join("taskstream.db")).unwrap();
    db.execute_batch("DROP TABLE webhooks; PRAGMA user_version = 1;")
        .unwrap();
    drop(db);
    let receiver = Receiver::start(Answer::Ok { jitter_ms: 0 }).await;
    let url = receiver.url();
    let server = TestServer::start_in(&dir.0, &["--webhook", &url]).await;
    server
        .wait_for_log("upgraded the schema from version 1 to 2")
        .await;
    let id = server
        .update(json!({"task_id": 1, "status": "after"}))
        .await;
    receiver.wait_for_ids(std::slice::from_ref(&id)).await;
    let db = rusqlite::Connection::open(dir.0.join("taskstream.db")).unwrap();
    let version: u32 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    let positions: u32 = db
        .query_row("SELECT COUNT(*) FROM webhooks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(positions, 1, "the worker stored its position");
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_within_the_timeout() {
    let quick = Receiver::start(Answer::Slow(300)).await;
    let stuck = Receiver::start(Answer::Slow(10_000)).await;
    let (quick_url, stuck_url) = (quick.url(), stuck.url());
    let mut server = TestServer::start(&[
        "--webhook",
        &quick_url,
        "--webhook",
        &stuck_url,
        "--shutdown-timeout",
        "1",
    ])
    .await;
    server.update(json!({"task_id": 1, "status": "x"})).await;
    quick
        .wait_until("the request", |seen| !seen.is_empty())
        .await;
    stuck
        .wait_until("the request", |seen| !seen.is_empty())
        .await;
    let stopping = Instant::now();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_exit(PATIENCE).await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    // The stuck one was given up at the deadline; the quick one was answered during the shutdown.
    let port = stuck.port;
    let logs = server
        .wait_for_log(&format!(
            "webhook #1 http://127.0.0.1:{port}: stopped with 1 event(s) undelivered"
        ))
        .await;
    let quick_port = quick.port;
    assert!(
        !logs.contains(&format!("127.0.0.1:{quick_port}: stopped with")),
        "{logs}"
    );
    assert_eq!(quick.seen().len(), 1);
}

#[tokio::test]
async fn two_redis_nodes_deliver_each_event_once_and_take_over_a_dead_nodes_pending() {
    // It starts its own Redis: the Redis run of the suite would only repeat it.
    if memory_only("it starts its own Redis, the same on every run of the suite")
        || !RedisServer::available()
    {
        return;
    }
    let redis = RedisServer::start(&[]).await;
    let receiver = Receiver::start(Answer::Ok { jitter_ms: 0 }).await;
    let url = receiver.url();
    let args = [
        "--webhook",
        url.as_str(),
        "--webhook-lease-ms",
        "3000",
        "--webhook-backoff-ms",
        "50",
    ];
    let mut first = TestServer::start_on(&redis, &args).await;
    first.wait_for_log("delivers it now").await;
    let second = TestServer::start_on(&redis, &args).await;
    // A calm run: events published on both nodes reach the receiver once each, from the cluster.
    let mut ids = Vec::new();
    for n in 0..20 {
        for node in [&first, &second] {
            ids.push(
                node.update(json!({"task_id": n % 5 + 1, "status": "x"}))
                    .await,
            );
        }
    }
    let seen = receiver.wait_for_ids(&ids).await;
    assert_eq!(seen.len(), ids.len(), "each event once, not once per node");
    // The receiver fails; the delivering node holds the new events pending, and dies.
    receiver.set(Answer::Fail);
    let mut pending = Vec::new();
    for n in 0..10 {
        pending.push(
            second
                .update(json!({"task_id": n + 1, "status": "y"}))
                .await,
        );
    }
    receiver
        .wait_until("an attempt of each new event", |seen| {
            pending.iter().all(|id| seen.iter().any(|r| r.id() == id))
        })
        .await;
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(PATIENCE).await;
    receiver.set(Answer::Ok { jitter_ms: 0 });
    // The other node takes the lease once it expires, and claims what the dead one left pending.
    receiver.wait_for_ids(&pending).await;
    let logs = second.wait_for_log("taken over").await;
    assert!(logs.contains("10 pending event(s) taken over"), "{logs}");
}
