//! Issue 16's attacks on the HTTP edge and auth, each against the real binary: unfinished chunked
//! bodies, cross-site WebSocket handshakes, credentials and forged lines in the log, an `exp` out
//! of the clock's range, the listen backlog, WebSocket close codes, the board page's headers and
//! EC curves.

use crate::helpers::{temp_dir, token, TestServer, PATIENCE, SECRET};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn address(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Writes `request` on a fresh connection, then reads until the server closes it, for at most
/// `within`; answers what it read and when the connection ended (`None`: still open).
async fn answer_and_close(
    server: &TestServer,
    request: &[u8],
    within: Duration,
) -> (String, Option<Duration>) {
    let mut socket = TcpStream::connect(address(server)).await.unwrap();
    socket.write_all(request).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout_at((started + within).into(), socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
            Err(_) => break None,
        }
    };
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

#[tokio::test]
async fn an_unfinished_chunked_body_does_not_hold_its_connection() {
    let server = TestServer::start(&["--request-timeout", "2"]).await;
    let bound = Duration::from_secs(2 + 1);
    // A handler that never reads the body answers at once; the connection must not then wait
    // for the rest of a body that never comes.
    let (answer, closed) = answer_and_close(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
        bound,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer:?}"
    );
    assert!(closed.is_some(), "still open {bound:?} after the answer");
    // A handler that reads: 408 at --request-timeout, and the socket closed with it.
    let (answer, closed) = answer_and_close(
        &server,
        b"POST /update_task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\n{\"tas\r\n",
        bound,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let closed = closed.unwrap_or_else(|| panic!("still open {bound:?} after the request"));
    assert!(closed >= Duration::from_millis(1500), "{closed:?}");
    // A chunked body read to its end keeps the connection for the next request.
    let mut socket = TcpStream::connect(address(&server)).await.unwrap();
    let body = br#"{"task_id":1}"#;
    let request = format!(
        "POST /update_task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len(),
        std::str::from_utf8(body).unwrap()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answers = String::new();
    let mut buffer = [0u8; 4096];
    while answers.matches("HTTP/1.1 ").count() < 2 || !answers.ends_with("{\"status\":\"ok\"}") {
        let n = tokio::time::timeout(PATIENCE, socket.read(&mut buffer))
            .await
            .expect("both answers in time")
            .unwrap();
        assert!(n > 0, "closed after {answers:?}");
        answers.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    assert!(answers.starts_with("HTTP/1.1 202"), "{answers:?}");
}

/// The handshake's status: 101, or the refusal's status and JSON body.
async fn ws_handshake(server: &TestServer, origin: Option<&str>) -> (u16, Value) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = server.url("/ws").replacen("http://", "ws://", 1);
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
    {
        Ok((_, response)) => (response.status().as_u16(), Value::Null),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            (
                response.status().as_u16(),
                serde_json::from_slice(body).unwrap_or(Value::Null),
            )
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn a_websocket_handshake_from_another_site_is_refused() {
    let server = TestServer::start(&["--cors-origin", "https://board.example.com"]).await;
    for foreign in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let (status, body) = ws_handshake(&server, Some(foreign)).await;
        assert_eq!(status, 403, "{foreign}");
        assert!(body["error"].as_str().unwrap().contains("Origin"), "{body}");
    }
    let own = server.base.clone();
    for allowed in [Some(own.as_str()), Some("https://board.example.com"), None] {
        let (status, _) = ws_handshake(&server, allowed).await;
        assert_eq!(status, 101, "{allowed:?}");
    }
}

#[tokio::test]
async fn credentials_never_reach_the_log_and_a_sub_cannot_forge_a_line() {
    let server = TestServer::start(&["--jwt-secret", SECRET]).await;
    let jwt = token("ana", &[], &["*"], Duration::from_secs(3600));
    for path in [
        format!("/?transport=websocket&token={jwt}"),
        format!("/tasks?ACCESS_TOKEN={jwt}"),
        format!("/tasks?jwt={jwt}&task_id=1"),
        format!("/tasks;access_token={jwt}"),
        format!("/tasks/{jwt}"),
    ] {
        server.client.get(server.url(&path)).send().await.unwrap();
    }
    // The access log writes a line once its answer is sent: wait for the last one.
    let logs = server.wait_for_log("GET /tasks/[redacted]").await;
    assert!(!logs.contains(&jwt), "{logs}");
    assert!(
        logs.contains("GET /?transport=websocket&token=[redacted]"),
        "{logs}"
    );
    assert!(logs.contains("jwt=[redacted]&task_id=1"), "{logs}");

    let forger = token(
        "ana\n[2026-12-01T00:00:00Z INFO  taskstream] FORGED admin login ok",
        &[],
        &["*"],
        Duration::from_secs(3600),
    );
    let stream = server
        .client
        .get(server.url("/events"))
        .bearer_auth(&forger)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let logs = server.wait_for_log("subscriber connected").await;
    assert!(logs.contains(r"sub=ana\n[2026-12-01"), "{logs}");
    assert!(
        !logs
            .lines()
            .any(|line| line.starts_with("[2026-12-01T00:00:00Z")),
        "{logs}"
    );
}

/// HS256 with the test secret over any claims, `exp` included.
fn signed(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn an_exp_beyond_the_clock_is_refused_not_a_crash() {
    let server = TestServer::start(&["--jwt-secret", SECRET, "--jwt-leeway", "300"]).await;
    for exp in [1u64 << 63, u64::MAX, (1u64 << 63) - 1] {
        let jwt = signed(&json!({"sub": "ana", "exp": exp, "taskstream": {"subscribe": ["*"]}}));
        let response = server
            .client
            .get(server.url("/tasks"))
            .bearer_auth(&jwt)
            .send()
            .await
            .unwrap_or_else(|e| panic!("exp {exp}: no answer: {e}"));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "exp {exp}");
        assert!(response.headers().contains_key("www-authenticate"));
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("exp"), "{body}");
    }
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
    let minted = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args(["token", "--sub", "ana", "--subscribe", "*"])
        .args(["--ttl", "106752000000000d", "--jwt-secret", SECRET])
        .output()
        .unwrap();
    assert!(!minted.status.success(), "minted {:?}", minted.stdout);
    assert!(String::from_utf8_lossy(&minted.stderr).contains("at most"));
}

#[tokio::test]
async fn the_accept_queue_holds_a_reconnect_storm() {
    use nix::sys::signal::Signal;
    // A stopped server accepts nothing: what the kernel completes meanwhile is what the accept
    // queue holds. 128 is std's backlog; somaxconn caps what the server asks for.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(4096, |text| text.trim().parse().unwrap_or(4096));
    let storm = 400.min(somaxconn);
    let server = TestServer::start(&[]).await;
    let address = address(&server);
    server.signal(Signal::SIGSTOP);
    let connects = (0..storm).map(|_| {
        let address = address.clone();
        tokio::spawn(async move {
            // A connect past a full queue has its SYN dropped, retried a second later: waiting
            // 800 ms tells the two apart.
            tokio::time::timeout(Duration::from_millis(800), TcpStream::connect(address))
                .await
                .ok()
                .and_then(Result::ok)
        })
    });
    let mut held = Vec::new();
    for connect in connects.collect::<Vec<_>>() {
        if let Some(socket) = connect.await.unwrap() {
            held.push(socket);
        }
    }
    server.signal(Signal::SIGCONT);
    assert_eq!(
        held.len(),
        storm,
        "the queue took {} of {storm}",
        held.len()
    );
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
}

/// Sends raw frames on /ws and answers the close code the server ends with.
async fn close_code_after(
    server: &TestServer,
    frames: Vec<tokio_tungstenite::tungstenite::protocol::frame::Frame>,
) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Message;
    let mut client = crate::helpers::WsClient::connect(server).await;
    for frame in frames {
        client.send_raw(Message::Frame(frame)).await;
    }
    client.close_code().await
}

#[tokio::test]
async fn websocket_close_codes_name_the_fault() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    // Messages above twice --max-body-bytes (2 KiB here) are refused by the codec.
    let server = TestServer::start(&["--max-body-bytes", "1024"]).await;
    let part = || vec![b'a'; 1500];
    let oversized = vec![
        Frame::message(part(), OpCode::Data(Data::Text), false),
        Frame::message(part(), OpCode::Data(Data::Continue), true),
    ];
    assert_eq!(close_code_after(&server, oversized).await, Some(1009));
    let not_utf8 = vec![Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    )];
    assert_eq!(close_code_after(&server, not_utf8).await, Some(1007));
}

#[tokio::test]
async fn the_board_page_forbids_framing_sniffing_and_foreign_code() {
    let server = TestServer::start(&[]).await;
    let response = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {name} header"))
    };
    let csp = header("content-security-policy");
    for directive in [
        "default-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("referrer-policy"), "no-referrer");
    assert_eq!(header("x-frame-options"), "DENY");
}

#[tokio::test]
async fn an_ec_key_on_another_curve_than_p256_is_refused_at_start() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let public = temp_dir().join("p384.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args(["--bind", "127.0.0.1:0", "--jwt-public-key"])
        .arg(&public)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("a P-384 key was accepted: the server started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("P-256"), "{stderr}");
}

#[tokio::test]
async fn a_request_pipelined_behind_a_closing_answer_is_not_served() {
    let server = TestServer::start(&["--publish-rate", "1", "--publish-burst", "1"]).await;
    server.update(json!({"task_id": 1})).await;
    // Over the rate: 429 before the body is read, so actix closes. Behind it, in one write, a
    // request that must not be served (and a body that must never be taken for one).
    let body = "DELETE /tasks/1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "POST /update_task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    let (answer, closed) = answer_and_close(&server, request.as_bytes(), PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert!(closed.is_some(), "the connection stayed open");
    let (status, _) = server.get_json("/tasks/1").await;
    assert_eq!(status, StatusCode::OK, "the body was not run as a DELETE");
    // Plain keep-alive pipelining is untouched.
    let (answer, _) = answer_and_close(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        PATIENCE,
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer:?}");
}

type RawWs = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket whose TCP connection comes from `source` (every 127.x address is this host), so
/// one test can play several clients for the per-IP cap.
async fn ws_from(server: &TestServer, source: [u8; 4]) -> RawWs {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let tcp = socket
        .connect(address(server).parse().unwrap())
        .await
        .unwrap();
    let url = server.url("/ws").replacen("http://", "ws://", 1);
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    ws
}

/// Sends the first fragment of a text message and never the rest: the finding's attack.
async fn hold_fragment(ws: &mut RawWs, bytes: usize) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    let fragment = Frame::message(vec![b'a'; bytes], OpCode::Data(Data::Text), false);
    ws.send(Message::Frame(fragment)).await.unwrap();
}

/// Reads until the server's close frame: its code and reason, and when it came.
async fn closed(ws: &mut RawWs) -> (Option<u16>, String, Instant) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let next = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the server closes in time");
        match next {
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((None, String::new()), |f| {
                    (Some(u16::from(f.code)), f.reason.to_string())
                });
                return (code, reason, Instant::now());
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return (None, String::new(), Instant::now()),
        }
    }
}

#[tokio::test]
async fn websockets_that_never_subscribe_count_against_the_caps_and_are_closed_when_idle() {
    use crate::helpers::WsClient;
    let idle = Duration::from_secs(2);
    let server = TestServer::start(&[
        "--max-subscribers",
        "6",
        "--max-subscribers-per-ip",
        "3",
        "--ws-idle-timeout",
        "2",
    ])
    .await;
    let mut subscribed = WsClient::connect(&server).await;
    subscribed.send(json!({"type": "subscribe"})).await;
    let before = server.rss_bytes();
    // 200 sockets from one IP, each with a 60 KiB unfinished fragment: before, all were taken in
    // and held (about 286 kB each), with the caps at 5 and 3. Now the IP's 3 places hold 3.
    let started = Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..200 {
        let mut ws = ws_from(&server, [127, 0, 0, 1]).await;
        hold_fragment(&mut ws, 60 * 1024).await;
        attackers.push(ws);
    }
    // Another IP takes the last 3 places under --max-subscribers; a third finds it full.
    for _ in 0..3 {
        let mut ws = ws_from(&server, [127, 0, 0, 2]).await;
        hold_fragment(&mut ws, 60 * 1024).await;
        attackers.push(ws);
    }
    let mut full = ws_from(&server, [127, 0, 0, 3]).await;
    let (code, reason, _) = closed(&mut full).await;
    assert_eq!(code, Some(1013), "{reason}");
    assert!(reason.contains("too many subscribers"), "{reason}");
    let mut refused = 0;
    let mut held = Vec::new();
    let ends = futures_util::future::join_all(attackers.iter_mut().map(closed)).await;
    let peak = server.rss_bytes();
    for (code, reason, at) in ends {
        match code {
            Some(1013) => {
                assert!(reason.contains("too many open streams"), "{reason}");
                refused += 1;
            }
            Some(1000) => held.push(at.duration_since(started)),
            other => panic!("closed with {other:?} {reason:?}"),
        }
    }
    assert_eq!((refused, held.len()), (198, 5), "one IP holds 3 places");
    // The held ones were closed at the idle deadline, counted from their upgrade.
    for after in &held {
        assert!(
            *after >= idle && *after < idle + PATIENCE / 3,
            "closed after {after:?}"
        );
    }
    let grown = peak.saturating_sub(before);
    assert!(grown < 8 << 20, "RSS grew by {grown} bytes");
    // A subscribed connection has no idle deadline, and the places came back.
    subscribed
        .send(json!({"type": "update_task", "request_id": 1, "task_id": 1}))
        .await;
    assert_eq!(subscribed.json().await["type"], "ack");
    assert_eq!(subscribed.json().await["type"], "event");
    let mut again = WsClient::connect(&server).await;
    again.send(json!({"type": "subscribe"})).await;
    again
        .send(json!({"type": "update_task", "request_id": 2, "task_id": 2}))
        .await;
    assert_eq!(again.json().await["type"], "ack");
}

#[tokio::test]
async fn the_task_store_is_capped_and_updates_to_existing_tasks_still_pass() {
    let server = TestServer::start(&["--max-tasks", "3"]).await;
    for id in 1..=3 {
        server.update(json!({"task_id": id})).await;
    }
    let (status, body) = server
        .post(&json!({"task_id": 4, "title": "one too many"}))
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("--max-tasks") && error.contains('3'),
        "{error}"
    );
    let (_, missing) = server.get_json("/tasks/4").await;
    assert!(missing["error"].is_string(), "nothing stored: {missing}");
    // Existing tasks still take updates, over HTTP and /ws alike; /ws refuses a new one too.
    server
        .update(json!({"task_id": 2, "title": "still fine"}))
        .await;
    let mut ws = crate::helpers::WsClient::connect(&server).await;
    ws.send(json!({"type": "update_task", "request_id": 1, "task_id": 3}))
        .await;
    assert_eq!(ws.json().await["type"], "ack");
    ws.send(json!({"type": "update_task", "request_id": 2, "task_id": "new"}))
        .await;
    let refused = ws.json().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("--max-tasks"),
        "{refused}"
    );
    // A delete makes room.
    let deleted = server
        .client
        .delete(server.url("/tasks/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    server.update(json!({"task_id": 4})).await;
    let ids: Vec<Value> = crate::helpers::task_ids(&server.snapshot().await);
    assert_eq!(ids, [json!(2), json!(3), json!(4)]);
}

/// The server's peak resident memory since the last `reset_peak_memory`, in bytes.
fn peak_memory(server: &TestServer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc status");
    kib * 1024
}

/// Sets the peak to the current RSS (proc(5), clear_refs: "5").
fn reset_peak_memory(server: &TestServer) {
    std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5").unwrap();
}

#[tokio::test]
async fn concurrent_snapshots_share_the_tasks_instead_of_copying_the_store() {
    // 100 tasks of 16 KiB: a 1.6 MB answer. Before, every snapshot copied the store, then built
    // a JSON value and the whole answer from it (the peak rose 5 MiB for one reader, 6 for three);
    // now a reader holds the shared tasks' pointers and one 32 KiB piece of the answer at a time.
    // On Redis every read brings the tasks over the network, so there the bound is per read.
    let server = TestServer::start(&[]).await;
    let pad = "x".repeat(16 * 1024 - 16);
    let ids: Vec<u64> = (1..=100).collect();
    for batch in ids.chunks(16) {
        futures_util::future::join_all(
            batch
                .iter()
                .map(|id| server.update(json!({"task_id": id, "data": {"pad": pad}}))),
        )
        .await;
    }
    let last = server.update(json!({"task_id": 1})).await;
    let peak_growth = |readers: usize| {
        reset_peak_memory(&server);
        let before = server.rss_bytes();
        let server = &server;
        async move {
            let snapshots =
                futures_util::future::join_all((0..readers).map(|_| server.snapshot())).await;
            (peak_memory(server).saturating_sub(before), snapshots)
        }
    };
    let (one, _) = peak_growth(1).await;
    let (eight, snapshots) = peak_growth(8).await;
    if crate::helpers::on_redis() {
        // Each read of Redis holds its reply and the tasks parsed from it; concurrent readers
        // share one read, and at most two run at once.
        assert!(
            eight < 2 * one + (1 << 20),
            "one snapshot raised the peak by {one} bytes, eight at once by {eight}"
        );
    } else {
        assert!(
            one < 1 << 20 && eight < 1 << 20,
            "one snapshot raised the peak by {one} bytes, eight at once by {eight}"
        );
    }
    for snapshot in snapshots {
        assert_eq!(snapshot["last_event_id"], json!(last));
        let tasks = snapshot["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 100);
        assert_eq!(tasks[0]["version"], 2);
        assert_eq!(tasks[99]["data"]["pad"].as_str().unwrap().len(), pad.len());
    }
}

#[tokio::test]
async fn the_idempotency_cache_is_bounded_in_bytes_not_only_in_keys() {
    if crate::helpers::on_redis() || crate::helpers::on_sqlite() {
        eprintln!("skipped: --idempotency-bytes bounds the memory backend's cache; Redis and SQLite keep keys in the store, by TTL");
        return;
    }
    // 256 KiB of answers: about 15 of 16 KiB tasks. Before, the cache kept 100,000 keys whatever
    // their size, so all 60 stayed (about 17 KB each).
    let server = TestServer::start(&["--idempotency-bytes", "262144"]).await;
    let pad = "x".repeat(16 * 1024 - 16);
    let post = |key: String| {
        server
            .client
            .post(server.url("/update_task"))
            .header("idempotency-key", key)
            .json(&json!({"task_id": 1, "data": {"pad": pad}}))
            .send()
    };
    let mut first = Vec::new();
    for n in 0..60 {
        let answer: Value = post(format!("k{n}")).await.unwrap().json().await.unwrap();
        first.push(answer["event_id"].as_str().unwrap().to_owned());
    }
    let replayed: Value = post("k59".into()).await.unwrap().json().await.unwrap();
    assert_eq!(
        replayed["event_id"],
        json!(first[59]),
        "a recent key replays"
    );
    let forgotten: Value = post("k0".into()).await.unwrap().json().await.unwrap();
    assert_ne!(
        forgotten["event_id"],
        json!(first[0]),
        "the oldest key is forgotten once the answers pass 256 KiB"
    );
    assert_eq!(forgotten["task"]["version"], 61);
}
