//! GET /events: headers, framing, keep-alive, filters, fan-out and disconnects.

use crate::helpers::{id_key, TestServer};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn the_stream_opens_at_once_with_sse_headers_and_the_retry_field_first() {
    let server = TestServer::start(&["--retry", "1234"]).await;
    // No event exists: the headers and the first frame must still arrive.
    let mut stream = server.subscribe("/events").await;
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["cache-control"], "no-cache");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    assert!(
        stream.headers.get("connection").is_none(),
        "a Connection header breaks HTTP/2 clients"
    );
    assert!(
        stream
            .headers
            .get("content-encoding")
            .is_none_or(|v| v == "identity"),
        "never compressed"
    );
    let first = stream.next_frame().await.unwrap();
    assert_eq!(first.raw, "retry: 1234\n\n");
}

#[tokio::test]
async fn the_stream_is_not_compressed_even_when_the_client_asks() {
    let server = TestServer::start(&[]).await;
    let stream = server
        .subscribe_with("/events", &[("accept-encoding", "gzip, br, zstd")])
        .await;
    assert!(stream
        .headers
        .get("content-encoding")
        .is_none_or(|v| v == "identity"));
}

#[tokio::test]
async fn each_event_is_one_frame_with_id_type_and_the_whole_task_as_one_data_line() {
    let server = TestServer::start(&[]).await;
    let mut stream = server.subscribe("/events").await;
    let (_, answer) = server
        .post(&json!({"task_id": 101, "status": "completed", "data": {"priority": 2}}))
        .await;
    let frame = stream.next_event().await;
    let id = answer["event_id"].as_str().unwrap();
    let task = &answer["task"];
    assert_eq!(
        frame.raw,
        format!(
            "id: {id}\nevent: task_updated\ndata: {{\"event\":\"task_updated\",\"task_id\":101,\"status\":\"completed\",\"data\":{{\"priority\":2}},\"version\":1,\"updated_at\":{}}}\n\n",
            task["updated_at"]
        )
    );
    let mut expected = task.clone();
    expected["event"] = json!("task_updated");
    assert_eq!(frame.json(), expected);
}

#[tokio::test]
async fn line_breaks_in_values_never_add_fields_or_events() {
    let server = TestServer::start(&[]).await;
    let mut stream = server.subscribe("/events").await;
    let title = "a\n\nevent: reset\ndata: {}\r\nid: 999\r";
    server
        .update(json!({"task_id": "x", "title": title, "data": {"k\n\n": "\r\n"}}))
        .await;
    let frame = stream.next_event().await;
    assert_eq!(frame.event.as_deref(), Some("task_updated"));
    assert_eq!(frame.json()["title"], title);
    assert_eq!(
        frame.raw.matches('\n').count(),
        4,
        "three field lines and the blank line"
    );
}

#[tokio::test]
async fn keep_alive_comments_flow_every_second_while_idle() {
    let server = TestServer::start(&["--keep-alive", "1"]).await;
    let mut stream = server.subscribe("/events").await;
    let opened = Instant::now();
    let mut arrivals = vec![opened];
    while arrivals.len() < 4 {
        let frame = stream.next_frame().await.unwrap();
        if frame.raw.starts_with(':') {
            assert_eq!(frame.raw, ": keep-alive\n\n");
            arrivals.push(frame.at.unwrap());
        }
    }
    for gap in arrivals.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap >= Duration::from_millis(700) && gap <= Duration::from_millis(1600),
            "gap {gap:?}"
        );
    }
}

#[tokio::test]
async fn the_task_id_filter_takes_repeated_and_comma_separated_ids() {
    let server = TestServer::start(&[]).await;
    let mut repeated = server.subscribe("/events?task_id=101&task_id=abc").await;
    let mut commas = server.subscribe("/events?task_id=101,abc").await;
    for task_id in [
        json!(1),
        json!(101),
        json!("abc"),
        json!("101"),
        json!(2),
        json!("abc"),
    ] {
        server.update(json!({"task_id": task_id})).await;
    }
    for stream in [&mut repeated, &mut commas] {
        let got: Vec<_> = stream
            .events(4)
            .await
            .iter()
            .map(|f| f.json()["task_id"].clone())
            .collect();
        assert_eq!(got, [json!(101), json!("abc"), json!(101), json!("abc")]);
    }
}

#[tokio::test]
async fn an_invalid_filter_is_a_400() {
    let server = TestServer::start(&[]).await;
    let response = server
        .client
        .get(server.url("/events?task_id=a%20b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("task_id"));
}

#[tokio::test]
async fn every_subscriber_gets_every_event_in_publish_order() {
    let server = TestServer::start(&[]).await;
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(server.subscribe("/events").await);
    }
    let publishers = (0..4).map(|p| {
        let server = &server;
        async move {
            for n in 0..50 {
                server.update(json!({"task_id": p * 1000 + n + 1})).await;
            }
        }
    });
    futures_util::future::join_all(publishers).await;
    let reference: Vec<String> = streams[0]
        .events(200)
        .await
        .into_iter()
        .map(|f| f.id.unwrap())
        .collect();
    assert!(reference.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])));
    for stream in &mut streams[1..] {
        let ids: Vec<String> = stream
            .events(200)
            .await
            .into_iter()
            .map(|f| f.id.unwrap())
            .collect();
        assert_eq!(ids, reference);
    }
}

#[tokio::test]
async fn a_subscriber_that_disconnects_is_noticed_and_freed_promptly() {
    let server = TestServer::start(&[]).await;
    let stream = server.subscribe("/events").await;
    assert_eq!(server.metric("taskstream_subscribers").await, 1.0);
    drop(stream);
    let dropped = Instant::now();
    // No event and no keep-alive (15 s by default) flows: only the closed socket tells.
    server.wait_for_metric("taskstream_subscribers", 0.0).await;
    assert!(
        dropped.elapsed() < Duration::from_secs(2),
        "noticed after {:?}",
        dropped.elapsed()
    );
    // The log line comes from the same drop as the metric, but through the server's stderr.
    let logs = server.wait_for_log("subscriber disconnected").await;
    assert!(logs.contains("subscriber connected"), "{logs}");
}

#[tokio::test]
async fn ten_thousand_subscribers_connect_and_all_receive_an_event() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // This process holds one socket per subscriber too.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let server = TestServer::start(&["--max-subscribers", "10000"]).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    const COUNT: usize = 10_000;
    let mut sockets = Vec::with_capacity(COUNT);
    let started = Instant::now();
    for chunk in 0..COUNT / 500 {
        let connects = (0..500).map(|n| {
            let address = address.clone();
            async move {
                // Spread over source addresses so 10,000 sockets never exhaust one address's ports.
                let source = format!("127.0.0.{}:0", 2 + (chunk * 500 + n) % 8);
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(source.parse().unwrap()).unwrap();
                let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
                stream
                    .write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
                    .await
                    .unwrap();
                let mut head = vec![0u8; 512];
                let n = stream.read(&mut head).await.unwrap();
                assert!(
                    head[..n].starts_with(b"HTTP/1.1 200"),
                    "{:?}",
                    String::from_utf8_lossy(&head[..n])
                );
                stream
            }
        });
        sockets.extend(futures_util::future::join_all(connects).await);
    }
    eprintln!("10,000 subscribers connected in {:?}", started.elapsed());
    assert_eq!(server.metric("taskstream_subscribers").await, COUNT as f64);
    let id = server
        .update(json!({"task_id": 1, "status": "to all"}))
        .await;
    let needle = format!("id: {id}\n");
    let reads = sockets.into_iter().map(|mut stream| {
        let needle = needle.clone();
        async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(&needle) {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "stream closed early");
                seen.extend_from_slice(&buf[..n]);
            }
        }
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(reads),
    )
    .await
    .expect("all got the event");
}

#[tokio::test]
async fn with_heartbeat_1_idle_ticks_are_named_events_without_an_id() {
    let server = TestServer::start(&["--keep-alive", "1"]).await;
    let mut stream = server.subscribe("/events?heartbeat=1").await;
    assert!(stream.next_frame().await.unwrap().retry.is_some());
    let heartbeat = "event: heartbeat\ndata: {\"event\":\"heartbeat\",\"keep_alive_ms\":1000}\n\n";
    let first = stream.next_frame().await.unwrap();
    assert_eq!(
        first.raw, heartbeat,
        "at once, so the client learns the period"
    );
    let id = server.update(json!({"task_id": 1})).await;
    let event = loop {
        let frame = stream.next_frame().await.unwrap();
        if frame.id.is_some() {
            break frame;
        }
    };
    assert_eq!(event.id.as_deref(), Some(id.as_str()));
    let started = Instant::now();
    let next = stream.next_frame().await.unwrap();
    assert_eq!(next.raw, heartbeat, "no id line: lastEventId stays {id}");
    assert!(started.elapsed() < Duration::from_millis(1700));
    // Plain clients keep the comment.
    let mut plain = server.subscribe("/events").await;
    plain.next_frame().await.unwrap();
    let comment = plain.next_frame().await.unwrap();
    assert!(
        comment.data.is_none() && comment.comments.contains(&"keep-alive".to_owned()),
        "{comment:?}"
    );
}

#[tokio::test]
async fn a_publish_on_the_publish_listener_reaches_the_streams_of_the_main_one() {
    let mut server = TestServer::start(&["--publish-bind", "127.0.0.1:0"]).await;
    let logs = server.wait_for_log("publish listener on ").await;
    let publish_base = logs
        .lines()
        .find_map(|line| line.split("publish listener on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the publish listener's address in the log")
        .to_owned();
    assert_ne!(publish_base, server.base);
    let mut stream = server.subscribe("/events").await;
    let answer = server
        .client
        .post(format!("{publish_base}/update_task"))
        .json(&json!({"task_id": 7, "status": "done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let accepted: serde_json::Value = answer.json().await.unwrap();
    let event = stream.next_event().await;
    assert_eq!(event.id.as_deref(), accepted["event_id"].as_str());
    assert_eq!(event.json()["status"], "done");
    // The same API and state there: the snapshot, and the probes a balancer would ask.
    let tasks: serde_json::Value = server
        .client
        .get(format!("{publish_base}/tasks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["last_event_id"], accepted["event_id"]);
    // A stop ends both listeners.
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).await.success());
    assert!(server
        .client
        .get(format!("{publish_base}/healthz"))
        .send()
        .await
        .is_err());
}

/// Each thread of a process by name, with its nice value (`/proc/PID/task/TID/stat`, the 19th
/// field; the name in parentheses may hold spaces, so fields count from its closing one).
fn thread_nice_values(pid: i32) -> Vec<(String, i32)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the server's threads in /proc")
        .map(|task| {
            let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
            let (head, tail) = stat.rsplit_once(')').unwrap();
            let name = head.split_once('(').unwrap().1.to_owned();
            let nice = tail.split_whitespace().nth(16).unwrap().parse().unwrap();
            (name, nice)
        })
        .collect()
}

#[tokio::test]
async fn publish_priority_sets_the_nice_value_of_the_publish_worker_alone() {
    // Above 0, which needs no privilege, so the test means the same as root or not.
    let server =
        TestServer::start(&["--publish-bind", "127.0.0.1:0", "--publish-priority", "7"]).await;
    server.wait_for_log("publish worker at nice 7").await;
    let threads = thread_nice_values(server.pid());
    let workers: Vec<i32> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("actix-rt|system"))
        .map(|(_, nice)| *nice)
        .collect();
    assert_eq!(
        workers.iter().filter(|nice| **nice == 7).count(),
        1,
        "one worker, the publish listener's, at nice 7: {threads:?}"
    );
    assert!(
        workers.iter().filter(|nice| **nice == 0).count() >= 1,
        "the stream workers keep the default: {threads:?}"
    );
    // Still served.
    assert_eq!(
        server.post(&json!({"task_id": 1, "status": "ok"})).await.0,
        202
    );
}

#[tokio::test]
async fn a_publish_priority_the_kernel_refuses_is_a_warning_and_the_server_runs_at_the_default() {
    // Below 0 needs CAP_SYS_NICE: as root, start the server without it; any other user has none.
    let as_root = unsafe { libc::geteuid() } == 0;
    let wrapper: &[&str] = if as_root {
        assert!(
            std::path::Path::new("/usr/bin/setpriv").exists(),
            "this test drops root's CAP_SYS_NICE with setpriv: apt-get install util-linux"
        );
        &[
            "/usr/bin/setpriv",
            "--bounding-set=-sys_nice",
            "--inh-caps=-sys_nice",
        ]
    } else {
        &[]
    };
    let server = TestServer::start_via(
        wrapper,
        &["--publish-bind", "127.0.0.1:0", "--publish-priority", "-5"],
    )
    .await;
    server
        .wait_for_log("cannot set the publish worker's nice to -5")
        .await;
    let threads = thread_nice_values(server.pid());
    assert!(
        threads.iter().all(|(_, nice)| *nice == 0),
        "every thread at the default (a user whose LimitNICE allows -5 cannot run this test): {threads:?}"
    );
    assert_eq!(
        server.post(&json!({"task_id": 1, "status": "ok"})).await.0,
        202
    );
}

#[tokio::test]
async fn publish_priority_without_a_publish_listener_is_refused() {
    let (status, stderr) = TestServer::run_to_exit(&["--publish-priority", "-5"]).await;
    assert!(!status.success());
    assert!(stderr.contains("--publish-bind"), "{stderr}");
}
