//! GET /ws: the same stream as /events over a WebSocket, plus publishing on the same connection.

use crate::helpers::{id_key, TestServer, WsClient};
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Messages on one connection are handled in order, so an update sent over the same WebSocket
/// after `subscribe` is published after the subscription started: no guessing, no sleeping.
async fn publish_over(ws: &mut WsClient, update: Value) -> (Value, Value) {
    ws.send(update).await;
    let ack = ws.json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let event = ws.json().await;
    (ack, event)
}

#[tokio::test]
async fn nothing_arrives_before_subscribe_then_events_carry_the_same_data_as_sse() {
    let server = TestServer::start(&[]).await;
    let mut ws = WsClient::connect(&server).await;
    let mut sse = server.subscribe("/events").await;
    server
        .update(json!({"task_id": 1, "status": "before"}))
        .await;
    ws.send(json!({"type": "subscribe"})).await;
    let (ack, event) = publish_over(
        &mut ws,
        json!({"type": "update_task", "request_id": 1, "task_id": 1, "status": "after"}),
    )
    .await;
    assert_eq!(event["type"], "event");
    assert_eq!(
        event["id"], ack["event_id"],
        "the first event is the one after subscribe"
    );
    assert_eq!(event["event"], "task_updated");
    assert_eq!(event.as_object().unwrap().len(), 4);
    assert_eq!(sse.next_event().await.json()["status"], "before");
    let frame = sse.next_event().await;
    assert_eq!(Some(frame.id.as_deref().unwrap()), event["id"].as_str());
    assert_eq!(
        event["data"],
        frame.json(),
        "data exactly as in the SSE stream"
    );
}

#[tokio::test]
async fn subscribe_with_last_event_id_replays_then_goes_live() {
    let server = TestServer::start(&[]).await;
    let first = server.update(json!({"task_id": 1})).await;
    let second = server.update(json!({"task_id": 2})).await;
    let third = server.update(json!({"task_id": 3})).await;
    let mut ws = WsClient::connect(&server).await;
    ws.send(json!({"type": "subscribe", "last_event_id": first}))
        .await;
    assert_eq!(ws.json().await["id"], json!(second));
    assert_eq!(ws.json().await["id"], json!(third));
    let live = server.update(json!({"task_id": 4})).await;
    assert_eq!(ws.json().await["id"], json!(live));
}

#[tokio::test]
async fn an_unusable_last_event_id_gets_a_reset_naming_the_newest_id() {
    // One tombstone kept, and two deletions after `first`: no catch-up from it can be complete.
    let server = TestServer::start(&["--buffer", "2", "--tombstones", "1"]).await;
    let first = server.update(json!({"task_id": 1})).await;
    for task_id in [5, 6] {
        server.update(json!({"task_id": task_id})).await;
    }
    for task_id in [5, 6] {
        let response = reqwest::Client::new()
            .delete(server.url(&format!("/tasks/{task_id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    // Enough that Redis's approximate trimming (whole nodes of up to 100 entries) drops the first
    // event too; in memory 4 would do.
    for n in 0..150 {
        server
            .update(json!({"task_id": 2, "title": format!("{n}")}))
            .await;
    }
    let mut cases = vec![
        (json!(first), "left the replay buffer"),
        (json!("garbage"), "malformed"),
        (json!(12), "malformed"),
    ];
    if crate::helpers::not_on_sqlite(
        "(the trimmed-id case only) the log on disk still holds it: durable::retention_trims_the_log_in_the_background",
    ) {
        cases.remove(0);
    }
    for (last_event_id, reason) in cases {
        let newest = server.snapshot().await["last_event_id"].clone();
        let mut ws = WsClient::connect(&server).await;
        ws.send(json!({"type": "subscribe", "last_event_id": last_event_id}))
            .await;
        let reset = ws.json().await;
        assert_eq!(reset["type"], "reset", "{reset}");
        assert_eq!(reset["id"], newest);
        assert_eq!(reset["data"]["last_event_id"], newest);
        assert!(
            reset["data"]["reason"].as_str().unwrap().contains(reason),
            "{reset}"
        );
        let live = server.update(json!({"task_id": 9})).await;
        assert_eq!(ws.json().await["id"], json!(live));
    }
}

#[tokio::test]
async fn the_task_ids_filter_applies_to_replay_and_live_and_resubscribe_replaces_it() {
    let server = TestServer::start(&[]).await;
    let start = server.update(json!({"task_id": 100})).await;
    server.update(json!({"task_id": 1})).await;
    server.update(json!({"task_id": "abc"})).await;
    server.update(json!({"task_id": 2})).await;
    let mut ws = WsClient::connect(&server).await;
    ws.send(json!({"type": "subscribe", "task_ids": [1, "abc"], "last_event_id": start}))
        .await;
    assert_eq!(ws.json().await["data"]["task_id"], json!(1));
    assert_eq!(ws.json().await["data"]["task_id"], json!("abc"));
    server.update(json!({"task_id": 3})).await;
    server.update(json!({"task_id": "1"})).await;
    assert_eq!(ws.json().await["data"]["task_id"], json!(1));
    ws.send(json!({"type": "subscribe", "task_ids": [3]})).await;
    ws.send(json!({"type": "update_task", "request_id": "a", "task_id": 1}))
        .await;
    assert_eq!(ws.json().await["type"], "ack");
    let (_, event) = publish_over(
        &mut ws,
        json!({"type": "update_task", "request_id": "b", "task_id": 3}),
    )
    .await;
    assert_eq!(
        event["data"]["task_id"],
        json!(3),
        "the new filter replaced the old one: {event}"
    );
}

#[tokio::test]
async fn update_task_messages_are_acked_and_published_like_post() {
    let server = TestServer::start(&[]).await;
    let mut sse = server.subscribe("/events").await;
    let mut ws = WsClient::connect(&server).await;
    ws.send(json!({"type": "update_task", "request_id": "r1", "task_id": 101, "status": "done"}))
        .await;
    let ack = ws.json().await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["request_id"], "r1");
    assert_eq!(ack["task"]["status"], "done");
    assert_eq!(ack["task"]["version"], 1);
    let frame = sse.next_event().await;
    assert_eq!(Some(ack["event_id"].as_str().unwrap()), frame.id.as_deref());
    assert_eq!(server.get_json("/tasks/101").await.1["status"], "done");
}

#[tokio::test]
async fn every_bad_message_gets_an_error_and_the_connection_stays_open() {
    let server = TestServer::start(&[]).await;
    let mut ws = WsClient::connect(&server).await;
    let cases: Vec<(Message, Value, &str)> = vec![
        (Message::Text("{not json".into()), Value::Null, "not valid JSON"),
        (Message::Text("[1]".into()), Value::Null, "JSON object"),
        (Message::Text(json!({"request_id": 1}).to_string().into()), json!(1), "type is required"),
        (Message::Text(json!({"type": "dance", "request_id": "a"}).to_string().into()), json!("a"), "unknown message type"),
        (Message::Text(json!({"type": "update_task", "request_id": 2}).to_string().into()), json!(2), "task_id is required"),
        (Message::Text(json!({"type": "update_task", "request_id": 3, "task_id": 0}).to_string().into()), json!(3), "task_id must be"),
        (Message::Text(json!({"type": "update_task", "request_id": 4, "task_id": 1, "status": ""}).to_string().into()), json!(4), "status must be"),
        (Message::Text(json!({"type": "update_task", "request_id": 5, "task_id": 1, "colour": "red"}).to_string().into()), json!(5), "unknown field `colour`"),
        (Message::Text(json!({"type": "update_task", "request_id": 6, "task_id": 1, "data": {"k": "x".repeat(17_000)}}).to_string().into()), json!(6), "data must be at most"),
        (Message::Text(json!({"type": "update_task", "task_id": 1, "title": "t".repeat(70_000)}).to_string().into()), Value::Null, "larger than 65536"),
        (Message::Text(json!({"type": "update_task", "request_id": 7, "task_id": 1, "idempotency_key": ""}).to_string().into()), json!(7), "Idempotency-Key"),
        (Message::Text(json!({"type": "subscribe", "request_id": 8, "task_ids": "1"}).to_string().into()), json!(8), "task_ids must be an array"),
        (Message::Text(json!({"type": "subscribe", "request_id": 9, "task_ids": [0]}).to_string().into()), json!(9), "task_ids"),
        (Message::Text(json!({"type": "subscribe", "request_id": 10, "from": 1}).to_string().into()), json!(10), "unknown field `from`"),
        (Message::Binary(vec![1, 2, 3].into()), Value::Null, "binary messages are not supported"),
    ];
    for (message, request_id, mentions) in cases {
        ws.send_raw(message).await;
        let error = ws.json().await;
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["request_id"], request_id, "{error}");
        assert!(
            error["error"].as_str().unwrap().contains(mentions),
            "{error} should mention {mentions}"
        );
    }
    assert_eq!(
        server.metric("taskstream_events_published_total").await,
        0.0,
        "nothing was published"
    );
    assert_eq!(server.snapshot().await["tasks"], json!([]));
    ws.send(json!({"type": "update_task", "request_id": "ok", "task_id": 1}))
        .await;
    assert_eq!(
        ws.json().await["type"],
        "ack",
        "the connection is still open and working"
    );
}

#[tokio::test]
async fn an_idempotency_key_in_a_message_publishes_once() {
    let server = TestServer::start(&[]).await;
    let mut ws = WsClient::connect(&server).await;
    let update =
        json!({"type": "update_task", "request_id": 1, "task_id": 5, "idempotency_key": "k-1"});
    ws.send(update.clone()).await;
    let first = ws.json().await;
    ws.send(update).await;
    let second = ws.json().await;
    assert_eq!(first["event_id"], second["event_id"]);
    assert_eq!(first["task"], second["task"]);
    // The same key through HTTP answers the same first result.
    let response = server
        .client
        .post(server.url("/update_task"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({"task_id": 5}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["event_id"], first["event_id"]);
    assert_eq!(
        server.metric("taskstream_events_published_total").await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_one_that_does_not_is_closed_and_freed() {
    let server = TestServer::start(&["--keep-alive", "1"]).await;
    let mut answering = WsClient::connect(&server).await;
    // This client never reads, so it never answers a ping.
    let _silent = WsClient::connect(&server).await;
    server.wait_for_metric("taskstream_ws_clients", 2.0).await;
    // After two unanswered pings (about 3 s at --keep-alive 1) the silent one is closed, while
    // the other keeps reading and so answering.
    tokio::select! {
        () = server.wait_for_metric("taskstream_ws_clients", 1.0) => {}
        received = answering.receive() => panic!("unexpected {received:?}"),
    }
    answering.send(json!({"type": "subscribe"})).await;
    // Published over the same socket, so after the subscribe: the event must come back too.
    let (ack, event) = publish_over(
        &mut answering,
        json!({"type": "update_task", "request_id": 1, "task_id": 1}),
    )
    .await;
    assert_eq!(event["id"], ack["event_id"]);
    assert!(
        answering.pings >= 2,
        "the server pinged the answering client ({} pings) and kept it",
        answering.pings
    );
    assert_eq!(server.metric("taskstream_ws_clients").await, 1.0);
    assert_eq!(
        server.metric("taskstream_subscribers").await,
        0.0,
        "WebSocket clients are counted apart"
    );
}

#[tokio::test]
async fn the_subscriber_limit_closes_with_1013() {
    let server = TestServer::start(&["--max-subscribers", "1"]).await;
    let _sse = server.subscribe("/events").await;
    let mut ws = WsClient::connect(&server).await;
    assert_eq!(ws.close_code().await, Some(1013));
}

#[tokio::test]
async fn shutdown_closes_with_1001() {
    let mut server = TestServer::start(&[]).await;
    let mut subscribed = WsClient::connect(&server).await;
    subscribed.send(json!({"type": "subscribe"})).await;
    let mut idle = WsClient::connect(&server).await;
    server.wait_for_metric("taskstream_ws_clients", 2.0).await;
    server.signal(Signal::SIGTERM);
    assert_eq!(subscribed.close_code().await, Some(1001));
    assert_eq!(idle.close_code().await, Some(1001));
    assert_eq!(
        server.wait_exit(Duration::from_secs(5)).await.code(),
        Some(0)
    );
}

#[tokio::test]
async fn a_plain_get_on_ws_is_a_json_400() {
    let server = TestServer::start(&[]).await;
    let (status, body) = server.get_json("/ws").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("WebSocket upgrade"));
}

/// Clients resubscribe over and over with the last id they saw while events are published:
/// every event exactly once, in order.
#[tokio::test]
async fn resubscribing_during_concurrent_publishing_loses_and_repeats_nothing() {
    let server = Arc::new(TestServer::start(&["--buffer", "4096"]).await);
    const EVENTS: u64 = 1000;
    let start = server.update(json!({"task_id": "start"})).await;
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                server
                    .update(json!({"task_id": "p", "data": {"n": n}}))
                    .await;
            }
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let server = server.clone();
            let start = start.clone();
            tokio::spawn(async move {
                let mut last = start;
                let mut seen = Vec::new();
                let mut reconnects = 0;
                while seen.len() < EVENTS as usize {
                    let mut ws = WsClient::connect(&server).await;
                    ws.send(json!({"type": "subscribe", "last_event_id": last}))
                        .await;
                    for _ in 0..(9 + c * 4) {
                        if seen.len() == EVENTS as usize {
                            break;
                        }
                        let message = ws.json().await;
                        assert_eq!(message["type"], "event", "no reset expected: {message}");
                        seen.push(message["data"]["data"]["n"].as_u64().unwrap());
                        last = message["id"].as_str().unwrap().to_owned();
                    }
                    reconnects += 1;
                }
                (seen, reconnects)
            })
        })
        .collect();
    publisher.await.unwrap();
    for client in clients {
        let (seen, reconnects) = client.await.unwrap();
        assert!(reconnects > 10);
        assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
    }
}

/// Updates sent over WebSocket reach SSE subscribers and the reverse, and both transports see one
/// order.
#[tokio::test]
async fn websocket_and_http_publishers_reach_both_transports_in_one_order() {
    let server = TestServer::start(&[]).await;
    let mut sse = server.subscribe("/events").await;
    let mut watcher = WsClient::connect(&server).await;
    watcher
        .send(json!({"type": "subscribe", "last_event_id": "0"}))
        .await;
    let mut publisher = WsClient::connect(&server).await;
    let over_ws = async {
        let mut acks = 0;
        for n in 0..100 {
            publisher.send(json!({"type": "update_task", "request_id": n, "task_id": "ws", "data": {"n": n}})).await;
            assert_eq!(publisher.json().await["type"], "ack");
            acks += 1;
        }
        acks
    };
    let over_http = async {
        for n in 0..100 {
            server
                .update(json!({"task_id": "http", "data": {"n": n}}))
                .await;
        }
    };
    let (acks, ()) = tokio::join!(over_ws, over_http);
    assert_eq!(acks, 100);
    let sse_ids: Vec<String> = sse
        .events(200)
        .await
        .into_iter()
        .map(|f| f.id.unwrap())
        .collect();
    let mut ws_ids = Vec::new();
    for _ in 0..200 {
        ws_ids.push(watcher.json().await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ws_ids, sse_ids);
    assert!(sse_ids.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])));
}

#[tokio::test]
async fn with_auth_on_a_bad_token_closes_with_1008_and_a_token_limits_what_the_socket_sees_and_publishes(
) {
    use crate::helpers::{admin_token, token, SECRET};
    let server = TestServer::start(&["--jwt-secret", SECRET]).await;
    for path in ["/ws".to_owned(), "/ws?access_token=not.a.jwt".to_owned()] {
        let mut refused = WsClient::connect_to(&server, &path).await;
        assert_eq!(refused.close_code().await, Some(1008), "{path}");
    }

    let narrow = token(
        "ana",
        &["proj-7:*"],
        &["proj-7:*"],
        Duration::from_secs(3600),
    );
    let mut ws = WsClient::connect_to(&server, &format!("/ws?access_token={narrow}")).await;
    ws.send(json!({"type": "subscribe", "task_ids": [101], "request_id": "s"}))
        .await;
    let refused = ws.json().await;
    assert_eq!(
        (refused["type"].as_str(), refused["request_id"].as_str()),
        (Some("error"), Some("s"))
    );
    ws.send(json!({"type": "update_task", "request_id": "p", "task_id": 101}))
        .await;
    let refused = ws.json().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("may not publish"),
        "{refused}"
    );

    ws.send(json!({"type": "subscribe"})).await;
    let admin = WsClient::connect_to(&server, &format!("/ws?access_token={}", admin_token())).await;
    let mut admin = admin;
    for task_id in [json!(101), json!("proj-7:a")] {
        admin
            .send(json!({"type": "update_task", "request_id": 1, "task_id": task_id}))
            .await;
        assert_eq!(admin.json().await["type"], "ack");
    }
    // Its own publish comes after both of the admin's: of the three, it sees proj-7:a then its own.
    ws.send(json!({"type": "update_task", "request_id": 2, "task_id": "proj-7:b"}))
        .await;
    let mut seen = Vec::new();
    let mut acked = false;
    while !(acked && seen.last() == Some(&json!("proj-7:b"))) {
        let message = ws.json().await;
        match message["type"].as_str() {
            Some("ack") => acked = true,
            Some("event") => seen.push(message["data"]["task_id"].clone()),
            _ => panic!("unexpected {message}"),
        }
    }
    assert_eq!(
        seen,
        [json!("proj-7:a"), json!("proj-7:b")],
        "101 is never delivered"
    );
}

/// RFC 6455 7.1.1: once close frames are exchanged the server closes the TCP connection at once,
/// so a client that reconnects does not wait on a timer first (it waited about 0.9 s for actix's
/// linger). The best of three must be under 50 ms and none near the old timer, so a loaded
/// machine's scheduling noise does not fail the run.
#[tokio::test]
async fn the_tcp_connection_ends_right_after_the_close_handshake() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let server = TestServer::start(&[]).await;
    let full = TestServer::start(&["--max-subscribers", "1"]).await;
    let _sse = full.subscribe("/events").await;
    let (mut by_client, mut by_server) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut ws = WsClient::connect(&server).await;
        ws.send(json!({"type": "subscribe"})).await;
        ws.send_raw(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await;
        by_client.push(ws.time_to_eof().await);
        // Closed by the server (full: 1013), the client answering its close frame.
        let mut ws = WsClient::connect(&full).await;
        assert_eq!(ws.close_code().await, Some(1013));
        by_server.push(ws.time_to_eof().await);
    }
    for (who, times) in [("client", &by_client), ("server", &by_server)] {
        let best = times.iter().min().unwrap();
        let worst = times.iter().max().unwrap();
        assert!(
            *best < Duration::from_millis(50) && *worst < Duration::from_millis(500),
            "closed by the {who}: {times:?}"
        );
    }
}

#[tokio::test]
async fn with_heartbeat_1_the_socket_says_it_is_alive_at_once_and_every_keep_alive() {
    let server = TestServer::start(&["--keep-alive", "1"]).await;
    let mut ws = WsClient::connect_to(&server, "/ws?heartbeat=1").await;
    let first = ws.json().await;
    assert_eq!(first, json!({"type": "heartbeat", "keep_alive_ms": 1000}));
    let started = Instant::now();
    assert_eq!(ws.json().await["type"], "heartbeat");
    let period = started.elapsed();
    assert!(
        (Duration::from_millis(700)..Duration::from_millis(1700)).contains(&period),
        "the next heartbeat came after {period:?}"
    );
    // Without the parameter: none (the protocol pings only).
    let mut plain = WsClient::connect(&server).await;
    plain.send(json!({"type": "subscribe"})).await;
    let id = server.update(json!({"task_id": 1})).await;
    assert_eq!(plain.json().await["id"], id.as_str());
}

#[tokio::test]
async fn update_task_messages_honour_max_body_bytes() {
    let server = TestServer::start(&["--max-body-bytes", "2000"]).await;
    let mut ws = WsClient::connect(&server).await;
    let big = json!({"type": "update_task", "request_id": 1, "task_id": 1, "title": "x".repeat(200), "data": {"pad": "y".repeat(2000)}});
    ws.send(big).await;
    let error = ws.json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("2000 bytes"),
        "{error}"
    );
    ws.send(json!({"type": "update_task", "request_id": 2, "task_id": 1}))
        .await;
    assert_eq!(ws.json().await["type"], "ack");
    assert_eq!(
        server.snapshot().await["tasks"].as_array().unwrap().len(),
        1,
        "only the small one"
    );
}

/// SPEC, `/ws`: "Slow clients ... behave as on `/events`": a socket that stops reading never holds
/// up publishers or other sockets, and the server closes it rather than keep it for good (here its
/// unanswered pings end it; with the send timeout switched off it is still closed, so this test
/// does not single out that timeout).
#[tokio::test]
async fn a_socket_that_stops_reading_is_closed_and_never_slows_the_others() {
    let server = TestServer::start(&["--keep-alive", "1", "--buffer", "64"]).await;
    let mut stalled = WsClient::connect(&server).await;
    stalled.send(json!({"type": "subscribe"})).await;
    let mut reader = WsClient::connect(&server).await;
    reader.send(json!({"type": "subscribe"})).await;
    server.wait_for_metric("taskstream_ws_clients", 2.0).await;

    // 1,000 events of ~8 KiB: 8 MiB, far more than the stalled socket's buffers and queue hold.
    const EVENTS: u64 = 1000;
    let reading = tokio::spawn(async move {
        let mut seen = 0;
        while seen < EVENTS {
            let message = reader.json().await;
            if message["type"] == "event" {
                assert_eq!(
                    message["data"]["data"]["seq"].as_u64(),
                    Some(seen),
                    "in order, none lost"
                );
                seen += 1;
            }
        }
    });
    let started = Instant::now();
    for seq in 0..EVENTS {
        server
            .update(crate::helpers::padded(1, seq, 8 * 1024))
            .await;
    }
    let publishing = started.elapsed();
    tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("the reading socket got every event within 30 s")
        .unwrap();
    assert!(
        publishing < Duration::from_secs(20),
        "publishing took {publishing:?}"
    );
    // The stalled one is closed by the server, not kept for good.
    server.wait_for_metric("taskstream_ws_clients", 0.0).await;
    drop(stalled);
}
