//! The harness: a real `taskstream` process on a random loopback port, and an SSE reader that
//! keeps the exact bytes of every frame.
//!
//! `TASKSTREAM_TEST_BACKEND=redis` runs the same tests on the Redis backend: each `TestServer`
//! then gets a private `redis-server` (Debian's, from PATH) on a random port.
//! `TASKSTREAM_TEST_BACKEND=sqlite` runs them on `--data-dir`: each `TestServer` then gets its own
//! temporary directory, removed when it is dropped.

use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any single awaited thing may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Whether this run of the suite is on the Redis backend (`TASKSTREAM_TEST_BACKEND=redis`).
pub fn on_redis() -> bool {
    std::env::var("TASKSTREAM_TEST_BACKEND").is_ok_and(|backend| backend == "redis")
}

/// Whether this run of the suite is on `--data-dir` (`TASKSTREAM_TEST_BACKEND=sqlite`).
pub fn on_sqlite() -> bool {
    std::env::var("TASKSTREAM_TEST_BACKEND").is_ok_and(|backend| backend == "sqlite")
}

/// For a test whose sentence does not hold on `--data-dir` (the log on disk reaches further back
/// than the ring): there it says why it skips and answers true.
pub fn not_on_sqlite(reason: &str) -> bool {
    if on_sqlite() {
        loud(&format!("skipped on the sqlite backend: {reason}\n"));
    }
    on_sqlite()
}

/// For a test whose sentence only holds in memory: on Redis it says why it skips and answers true.
pub fn memory_only(reason: &str) -> bool {
    if on_redis() {
        loud(&format!("skipped on the Redis backend: {reason}\n"));
    }
    on_redis()
}

/// Writes to stderr past the test harness's capture, so a skip shows even when the test passes.
fn loud(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}

pub struct TestServer {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    logs: Arc<Mutex<String>>,
    /// On the Redis backend, this server's own Redis (dropped after the server).
    _redis: Option<RedisServer>,
    /// On the sqlite backend, this server's own `--data-dir` (removed after the server).
    _data_dir: Option<TempDir>,
}

/// A directory removed (with everything in it) when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestServer {
    pub async fn start(args: &[&str]) -> TestServer {
        Self::start_with_env(args, &[]).await
    }

    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> TestServer {
        if on_redis() {
            assert!(
                RedisServer::available(),
                "TASKSTREAM_TEST_BACKEND=redis needs redis-server on PATH (apt-get install redis-server)"
            );
            let redis = RedisServer::start(&[]).await;
            let mut server = Self::spawn(args, env, Some(&redis.url())).await;
            server._redis = Some(redis);
            server
        } else if on_sqlite() {
            let dir = TempDir(temp_dir());
            let data_dir = dir.0.to_str().expect("a UTF-8 temporary path").to_owned();
            let args: Vec<&str> = ["--data-dir", data_dir.as_str()]
                .into_iter()
                .chain(args.iter().copied())
                .collect();
            let mut server = Self::spawn(&args, env, None).await;
            server._data_dir = Some(dir);
            server
        } else {
            Self::spawn(args, env, None).await
        }
    }

    /// A durable node on `dir` (kept after the server is dropped, for restarts on it).
    pub async fn start_in(dir: &std::path::Path, args: &[&str]) -> TestServer {
        Self::start_in_with_env(dir, args, &[]).await
    }

    pub async fn start_in_with_env(
        dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let data_dir = dir.to_str().expect("a UTF-8 path").to_owned();
        let args: Vec<&str> = ["--data-dir", data_dir.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Self::spawn(&args, env, None).await
    }

    /// Runs the binary with `args`, expecting it to exit by itself (a refusal); answers its exit
    /// status and stderr. Killed and failed if it is still running after `PATIENCE`.
    pub async fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_taskstream"))
            .args(["--bind", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the taskstream binary");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                // What it printed says where it stopped (a refusal that should have exited).
                let stderr = reader.join().unwrap_or_default();
                panic!("taskstream {args:?} did not exit by itself within {PATIENCE:?}; stderr:\n{stderr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (status, reader.join().unwrap())
    }

    /// A node on a shared Redis, for the multi-node tests.
    pub async fn start_on(redis: &RedisServer, args: &[&str]) -> TestServer {
        Self::spawn(args, &[], Some(&redis.url())).await
    }

    /// A server on the memory backend started through `wrapper`, a program (and its arguments)
    /// that runs the binary given as its last argument, such as `setpriv` dropping a capability.
    pub async fn start_via(wrapper: &[&str], args: &[&str]) -> TestServer {
        Self::spawn_via(wrapper, args, &[], None).await
    }

    async fn spawn(args: &[&str], env: &[(&str, &str)], redis_url: Option<&str>) -> TestServer {
        Self::spawn_via(&[], args, env, redis_url).await
    }

    async fn spawn_via(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        redis_url: Option<&str>,
    ) -> TestServer {
        install_crypto_provider();
        let binary = env!("CARGO_BIN_EXE_taskstream");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        if let Some(url) = redis_url {
            command.args(["--redis-url", url]);
        }
        let mut child = command
            .args(["--bind", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the taskstream binary");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(PATIENCE, first_line)
            .await
            .expect("taskstream printed its address in time")
            .unwrap()
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("taskstream listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; logs:\n{}",
                    logs.lock().unwrap()
                )
            })
            .to_owned();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(8)
            .build()
            .unwrap();
        TestServer {
            child,
            base,
            client,
            logs,
            _redis: None,
            _data_dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until the server has logged a line containing `needle`; answers all logs so far.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POSTs a JSON body; answers the status and the JSON answer.
    pub async fn post(&self, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url("/update_task"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// Publishes an update that must be accepted; answers its event id.
    pub async fn update(&self, body: Value) -> String {
        let (status, answer) = self.post(&body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        answer["event_id"]
            .as_str()
            .expect("event_id is a string")
            .to_owned()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub async fn snapshot(&self) -> Value {
        let (status, body) = self.get_json("/tasks").await;
        assert_eq!(status, StatusCode::OK);
        body
    }

    /// The value of one unlabelled metric.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("metric {name} missing in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Polls a metric until it has the wanted value: there is no event to await for a gauge.
    pub async fn wait_for_metric(&self, name: &str, wanted: f64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let value = self.metric(name).await;
            if value == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} stayed at {value}, wanted {wanted}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn subscribe(&self, path: &str) -> SseStream {
        self.subscribe_with(path, &[]).await
    }

    pub async fn subscribe_with(&self, path: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut request = self.client.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(PATIENCE, request.send())
            .await
            .expect("stream headers in time")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        SseStream::new(response)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "taskstream still running after {within:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc status");
        kib * 1024
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private `redis-server` on a random loopback port with its own directory, stopped and removed
/// when dropped. Without persistence unless a test asks (`--appendonly yes`).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

impl RedisServer {
    /// Whether `redis-server` is on PATH. Missing, it says so loudly, and under `CI=true` (where
    /// the CI script installs it) its absence fails the test instead.
    pub fn available() -> bool {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed, and CI=true: install it (apt-get install redis-server)"
            );
            loud(
                "\n==========================================================\n\
                 redis-server not found: SKIPPING a Redis scale-out test\n\
                 (apt-get install redis-server to run it)\n\
                 ==========================================================\n",
            );
        }
        found
    }

    pub async fn start(extra: &[&str]) -> RedisServer {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "taskstream-redis-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = RedisServer {
            child: None,
            port: 0,
            dir,
            args: extra.iter().map(|a| a.to_string()).collect(),
        };
        // A port found free can be taken before redis-server binds it: then try another.
        for _ in 0..5 {
            redis.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if redis.launch().await {
                return redis;
            }
        }
        panic!("redis-server did not start; see {}", redis.dir.display());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on `self.port` and waits until it answers PING; false if it exited.
    async fn launch(&mut self) -> bool {
        let port = self.port.to_string();
        let dir = self.dir.to_str().unwrap().to_owned();
        let mut child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir])
            .args(["--save", "", "--appendonly", "no", "--logfile", "redis.log"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if self.ping().await {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server on port {port} did not answer in time");
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut answer = [0u8; 7];
        socket.write_all(b"PING\r\n").await.is_ok()
            && socket.read_exact(&mut answer).await.is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Runs one command with redis-cli (Debian's redis-server package brings it) and answers its
    /// output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(output.status.success(), "redis-cli {args:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    /// SIGKILL: no shutdown save, so only what the AOF already holds survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (so an AOF is loaded).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        assert!(
            self.launch().await,
            "redis-server restarted on {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One SSE frame as received: the exact text and its parsed fields.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub raw: String,
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<String>,
    pub comments: Vec<String>,
    /// When the frame was complete, to check keep-alive timing.
    pub at: Option<Instant>,
}

impl Frame {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("a data field")).expect("data is JSON")
    }

    pub fn is_event(&self) -> bool {
        self.data.is_some()
    }

    fn parse(raw: String) -> Frame {
        use taskstream_sse::Line;
        let mut frame = Frame {
            at: Some(Instant::now()),
            ..Frame::default()
        };
        // The frame is UTF-8 (checked by the caller), and the parser splits only at ASCII bytes.
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("UTF-8 field");
        for line in taskstream_sse::lines(raw.as_bytes()) {
            let (name, value) = match line {
                Line::Blank => continue,
                Line::Comment(value) => {
                    frame.comments.push(text(value));
                    continue;
                }
                Line::Field { name, value } => (name, text(value)),
            };
            match name {
                b"id" => frame.id = Some(value),
                b"event" => frame.event = Some(value),
                b"retry" => frame.retry = Some(value),
                b"data" => {
                    assert!(frame.data.is_none(), "data must stay one line: {raw:?}");
                    frame.data = Some(value);
                }
                other => panic!(
                    "unexpected field {:?} in {raw:?}",
                    String::from_utf8_lossy(other)
                ),
            }
        }
        frame.raw = raw;
        frame
    }
}

pub struct SseStream {
    pub headers: HeaderMap,
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
    /// Set once the server ended the body cleanly (the chunked terminator arrived).
    pub ended: bool,
}

impl SseStream {
    pub fn new(response: reqwest::Response) -> SseStream {
        SseStream {
            headers: response.headers().clone(),
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
            ended: false,
        }
    }

    fn take_frame(&mut self) -> Option<Frame> {
        let end = taskstream_sse::frame_end(&self.buffer)?;
        let raw: Vec<u8> = self.buffer.drain(..end).collect();
        assert!(!raw.contains(&b'\r'), "frames use LF only: {raw:?}");
        Some(Frame::parse(String::from_utf8(raw).expect("UTF-8 frame")))
    }

    /// The next complete frame, or `None` once the connection ends or breaks (its server was
    /// killed); a frame cut off by the break is dropped, as EventSource does.
    pub async fn next_frame_until_broken(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Some(frame);
            }
            match tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("a frame or the break in time")
            {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next frame (event, comment or retry), or `None` when the server ended the stream.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Some(frame);
            }
            match tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("a frame in time")
            {
                Some(chunk) => self
                    .buffer
                    .extend_from_slice(&chunk.expect("the stream continues cleanly")),
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "the stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// The next frame that carries data, skipping `retry:` and keep-alive comments.
    pub async fn next_event(&mut self) -> Frame {
        loop {
            let frame = self.next_frame().await.expect("the stream is still open");
            if frame.is_event() {
                return frame;
            }
        }
    }

    pub async fn events(&mut self, count: usize) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            frames.push(self.next_event().await);
        }
        frames
    }
}

/// A body that is big enough to make the stream's bytes add up fast.
/// The `task_id`s of a `GET /tasks` snapshot, in its order.
pub fn task_ids(snapshot: &Value) -> Vec<Value> {
    snapshot["tasks"]
        .as_array()
        .expect("a snapshot has tasks")
        .iter()
        .map(|t| t["task_id"].clone())
        .collect()
}

pub fn padded(task_id: u64, seq: u64, pad: usize) -> Value {
    json!({"task_id": task_id, "data": {"seq": seq, "pad": "x".repeat(pad)}})
}

/// Event ids are opaque strings of digit groups; compare them group by group.
pub fn id_key(id: &str) -> Vec<u64> {
    id.split('-')
        .map(|g| g.parse().expect("decimal digit group"))
        .collect()
}

/// A real WebSocket client on `/ws`.
pub struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Pings seen so far (tungstenite answers them by itself while we read).
    pub pings: usize,
}

/// What the server sent: a JSON message, or the close frame's code and reason.
#[derive(Debug)]
pub enum WsReceived {
    Json(Value),
    Closed(Option<(u16, String)>),
}

impl WsClient {
    pub async fn connect(server: &TestServer) -> WsClient {
        Self::connect_to(server, "/ws").await
    }

    /// `path` is `/ws` with a query, such as `?access_token=...`.
    pub async fn connect_to(server: &TestServer, path: &str) -> WsClient {
        let url = server.url(path).replacen("http://", "ws://", 1);
        let (socket, response) =
            tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
                .await
                .expect("WebSocket handshake in time")
                .expect("WebSocket handshake");
        assert_eq!(response.status(), 101);
        WsClient { socket, pings: 0 }
    }

    pub async fn send(&mut self, message: Value) {
        use futures_util::SinkExt;
        self.send_raw(tokio_tungstenite::tungstenite::Message::Text(
            message.to_string().into(),
        ))
        .await;
        let _ = &mut self.socket.flush().await;
    }

    pub async fn send_raw(&mut self, message: tokio_tungstenite::tungstenite::Message) {
        use futures_util::SinkExt;
        self.socket
            .send(message)
            .await
            .expect("send on the WebSocket");
    }

    pub async fn receive(&mut self) -> WsReceived {
        use tokio_tungstenite::tungstenite::Message;
        // One deadline for the whole wait: pings arrive every --keep-alive and must not keep
        // extending it.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a WebSocket message in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return WsReceived::Json(serde_json::from_str(&text).expect("JSON text"))
                }
                Some(Ok(Message::Ping(_))) => self.pings += 1,
                Some(Ok(Message::Close(frame))) => {
                    return WsReceived::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    )
                }
                Some(Ok(other)) => panic!("unexpected WebSocket message {other:?}"),
                Some(Err(_)) | None => return WsReceived::Closed(None),
            }
        }
    }

    /// The next JSON message; fails the test if the connection closes instead.
    pub async fn json(&mut self) -> Value {
        match self.receive().await {
            WsReceived::Json(value) => value,
            WsReceived::Closed(frame) => panic!("connection closed: {frame:?}"),
        }
    }

    /// After a close frame: how long until the server ends the TCP connection (RFC 6455 7.1.1:
    /// the server closes it first, at once).
    pub async fn time_to_eof(&mut self) -> Duration {
        let started = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => return started.elapsed(),
                Err(_) => panic!("the server kept the connection open for {PATIENCE:?}"),
            }
        }
    }

    /// Reads until the server closes; answers the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            if let WsReceived::Closed(frame) = self.receive().await {
                return frame.map(|(code, _)| code);
            }
        }
    }
}

/// reqwest is built without a TLS provider of its own; the tests use ring, as the server does.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HS256 secret the auth tests run the server with.
pub const SECRET: &str = "integration-test-secret";

/// A token signed with `SECRET`, minted the way `taskstream token` does.
pub fn token(sub: &str, publish: &[&str], subscribe: &[&str], ttl: Duration) -> String {
    let owned = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    taskstream::auth::mint::mint(
        &taskstream::auth::mint::Mint {
            subject: sub,
            publish: &owned(publish),
            subscribe: &owned(subscribe),
            ttl,
        },
        Some(&SECRET.parse().unwrap()),
        None,
    )
    .unwrap()
}

/// A token for everything, for an hour.
pub fn admin_token() -> String {
    token("admin", &["*"], &["*"], Duration::from_secs(3600))
}

/// A fresh directory for files a test writes (keys, certificates).
pub fn temp_dir() -> std::path::PathBuf {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let made = MADE.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "taskstream-test-{}-{nanos}-{made}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
