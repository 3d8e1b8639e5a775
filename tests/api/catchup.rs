//! The compacted catch-up (SPEC, "Resume without reload"): a client whose id has left the log but
//! is still placeable gets each changed task's latest event, announced, then live; on /events and
//! /ws, filtered and not, with and without auth. One server per test, several subscribers each.

use crate::helpers::{admin_token, on_redis, on_sqlite, token, SseStream, TestServer, WsClient};
use serde_json::{json, Value};
use std::time::Duration;

/// A server whose log keeps as little as each backend allows: the ring of 4 (and on `--data-dir`
/// a retained log of 4 too; on Redis the stream is capped near 4, trimmed in nodes of 100).
async fn small_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--buffer", "4"];
    if on_sqlite() {
        args.extend(["--retention", "4"]);
    }
    args.extend(extra);
    TestServer::start_with_env(
        &args,
        &[("RUST_LOG", "info,taskstream::backend::sqlite=debug")],
    )
    .await
}

/// What the history below leaves: the client's id, and the latest event of each task changed
/// after it, in id order, as (id, task id, event, version).
struct History {
    since: String,
    latest: Vec<(String, Value, &'static str, Option<u64>)>,
}

async fn delete(server: &TestServer, task_id: u64, bearer: Option<&str>) -> String {
    let mut request = server
        .client
        .delete(server.url(&format!("/tasks/{task_id}")));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["event_id"].as_str().unwrap().to_owned()
}

async fn update(server: &TestServer, body: Value, bearer: Option<&str>) -> String {
    let Some(bearer) = bearer else {
        return server.update(body).await;
    };
    let response = server
        .client
        .post(server.url("/update_task"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["event_id"].as_str().unwrap().to_owned()
}

/// Updates that push the client's id out of the log: Redis trims its stream in whole nodes of up
/// to 100 entries, the ring and the retained log of 4 need only a few more than 4.
fn filler() -> u64 {
    if on_redis() {
        150
    } else {
        12
    }
}

/// Task 1 changes three times, 2 is created and deleted, 3 created, then updates of 4 push
/// everything after the client's id out of the log.
async fn history(server: &TestServer, bearer: Option<&str>) -> History {
    let since = update(server, json!({"task_id": 1, "title": "a"}), bearer).await;
    update(server, json!({"task_id": 2, "title": "b"}), bearer).await;
    update(server, json!({"task_id": 1, "title": "a2"}), bearer).await;
    let third = update(server, json!({"task_id": 3}), bearer).await;
    let gone = delete(server, 2, bearer).await;
    let first = update(server, json!({"task_id": 1, "title": "a3"}), bearer).await;
    let mut fourth = String::new();
    for n in 0..filler() {
        fourth = update(server, json!({"task_id": 4, "data": {"n": n}}), bearer).await;
    }
    if on_sqlite() {
        // The housekeeper trims the retained log within a second.
        server.wait_for_log("trimmed the log through").await;
    }
    History {
        since,
        latest: vec![
            (third, json!(3), "task_updated", Some(1)),
            (gone, json!(2), "task_deleted", None),
            (first, json!(1), "task_updated", Some(3)),
            (fourth, json!(4), "task_updated", Some(filler())),
        ],
    }
}

impl History {
    fn only(&self, tasks: &[u64]) -> Vec<(String, Value, &'static str, Option<u64>)> {
        self.latest
            .iter()
            .filter(|(_, task, _, _)| tasks.iter().any(|t| json!(t) == *task))
            .cloned()
            .collect()
    }
}

/// The comment (and with `heartbeat` the named event) announcing `n` tasks since `since`, then
/// exactly `expected`, then the live event `live` (published by the caller after this reads the
/// catch-up).
async fn assert_sse_catch_up(
    stream: &mut SseStream,
    since: &str,
    expected: &[(String, Value, &'static str, Option<u64>)],
    heartbeat: bool,
) {
    let comment = format!("compacted {} tasks since {since}", expected.len());
    loop {
        let frame = stream.next_frame().await.expect("the stream is open");
        assert!(
            !frame.is_event() || frame.event.as_deref() == Some("heartbeat"),
            "an event before the announcement: {}",
            frame.raw
        );
        if frame.comments.iter().any(|c| c.trim() == comment) {
            break;
        }
    }
    if heartbeat {
        let named = stream.next_frame().await.expect("the named announcement");
        assert_eq!(named.event.as_deref(), Some("compacted"), "{}", named.raw);
        assert_eq!(named.id, None, "no id: the client's last id stays");
        assert_eq!(
            named.json(),
            json!({"event": "compacted", "since": since, "tasks": expected.len()})
        );
    }
    for (id, task_id, event, version) in expected {
        let frame = stream.next_event().await;
        assert_eq!(frame.id.as_deref(), Some(id.as_str()), "{}", frame.raw);
        assert_eq!(frame.event.as_deref(), Some(*event), "{}", frame.raw);
        let data = frame.json();
        assert_eq!(data["task_id"], *task_id);
        assert_eq!(
            data["version"].as_u64(),
            *version,
            "the current task: {data}"
        );
    }
}

/// The next event that is not a heartbeat.
async fn next_task_event(stream: &mut SseStream) -> crate::helpers::Frame {
    loop {
        let frame = stream.next_event().await;
        if frame.event.as_deref() != Some("heartbeat") {
            return frame;
        }
    }
}

async fn assert_ws_catch_up(
    ws: &mut WsClient,
    since: &str,
    expected: &[(String, Value, &'static str, Option<u64>)],
) {
    let first = ws.json().await;
    assert_eq!(
        first,
        json!({"type": "compacted", "since": since, "tasks": expected.len()}),
        "the announcement comes first"
    );
    for (id, task_id, event, version) in expected {
        let message = ws.json().await;
        assert_eq!(message["type"], "event", "{message}");
        assert_eq!(message["id"], json!(id), "{message}");
        assert_eq!(message["event"], *event);
        assert_eq!(message["data"]["task_id"], *task_id);
        assert_eq!(message["data"]["version"].as_u64(), *version);
    }
}

#[tokio::test]
async fn a_resume_the_log_no_longer_covers_gets_the_compacted_catch_up_then_live_on_sse_and_ws() {
    let server = small_server(&[]).await;
    let history = history(&server, None).await;
    let since = history.since.as_str();
    let header = [("Last-Event-ID", since)];

    let mut all = server.subscribe_with("/events", &header).await;
    assert_sse_catch_up(&mut all, since, &history.latest, false).await;
    let mut some = server
        .subscribe(&format!(
            "/events?task_id=1,2&heartbeat=1&last_event_id={since}"
        ))
        .await;
    assert_sse_catch_up(&mut some, since, &history.only(&[1, 2]), true).await;

    let mut ws_all = WsClient::connect(&server).await;
    ws_all
        .send(json!({"type": "subscribe", "last_event_id": since}))
        .await;
    assert_ws_catch_up(&mut ws_all, since, &history.latest).await;
    let mut ws_some = WsClient::connect(&server).await;
    ws_some
        .send(json!({"type": "subscribe", "last_event_id": since, "task_ids": [3]}))
        .await;
    assert_ws_catch_up(&mut ws_some, since, &history.only(&[3])).await;

    // Live follows with no gap and no duplicate: the next event each gets is the new one.
    let three = server.update(json!({"task_id": 3, "title": "live"})).await;
    let one = server.update(json!({"task_id": 1, "title": "live"})).await;
    assert_eq!(next_task_event(&mut all).await.id, Some(three.clone()));
    assert_eq!(
        next_task_event(&mut some).await.id,
        Some(one),
        "3 is not in its filter"
    );
    assert_eq!(ws_all.json().await["id"], json!(three));
    assert_eq!(ws_some.json().await["id"], json!(three));

    let compacted = server
        .metric("taskstream_catch_ups_total{kind=\"compacted\"}")
        .await;
    assert_eq!(compacted, 4.0, "each of the four resumes was compacted");
    assert_eq!(server.metric("taskstream_resets_total").await, 0.0);
    assert_eq!(
        server.metric("taskstream_compacted_events_total").await,
        (4 + 2 + 4 + 1) as f64
    );
}

#[tokio::test]
async fn with_auth_the_catch_up_and_its_count_hold_only_the_tokens_tasks() {
    let server = small_server(&["--jwt-secret", crate::helpers::SECRET]).await;
    let admin = admin_token();
    let history = history(&server, Some(&admin)).await;
    let since = history.since.as_str();
    let narrow = token("n", &[], &["1", "3"], Duration::from_secs(3600));

    let mut stream = server
        .subscribe_with(
            &format!("/events?access_token={narrow}&heartbeat=1"),
            &[("Last-Event-ID", since)],
        )
        .await;
    assert_sse_catch_up(&mut stream, since, &history.only(&[1, 3]), true).await;
    // Its filter narrows the token's tasks further.
    let mut ws = WsClient::connect_to(&server, &format!("/ws?access_token={narrow}")).await;
    ws.send(json!({"type": "subscribe", "last_event_id": since, "task_ids": [3]}))
        .await;
    assert_ws_catch_up(&mut ws, since, &history.only(&[3])).await;

    update(&server, json!({"task_id": 4}), Some(&admin)).await;
    let live = update(&server, json!({"task_id": 3}), Some(&admin)).await;
    assert_eq!(
        next_task_event(&mut stream).await.id,
        Some(live.clone()),
        "4 is not its task"
    );
    assert_eq!(ws.json().await["id"], json!(live));
}

/// Applies an SSE event to a client's view, task id -> version.
fn apply(view: &mut std::collections::BTreeMap<String, u64>, frame: &crate::helpers::Frame) {
    let data = frame.json();
    let task = data["task_id"].to_string();
    match frame.event.as_deref() {
        Some("task_updated") => {
            view.insert(task, data["version"].as_u64().unwrap());
        }
        Some("task_deleted") => {
            view.remove(&task);
        }
        other => panic!("unexpected {other:?}: {}", frame.raw),
    }
}

#[tokio::test]
async fn resuming_during_concurrent_publishing_ends_at_the_current_state_with_ids_only_increasing()
{
    let server = small_server(&[]).await;
    let since = server.update(json!({"task_id": 1})).await;
    for n in 0..filler() {
        server.update(json!({"task_id": 2 + n % 5})).await;
    }
    if on_sqlite() {
        server.wait_for_log("trimmed the log through").await;
    }
    // Updates, deletes and re-creations go on while three clients resume.
    let publisher = {
        let (base, client) = (server.base.clone(), server.client.clone());
        tokio::spawn(async move {
            for n in 0..120u64 {
                let task = 1 + n % 6;
                let response = if n % 7 == 3 {
                    client.delete(format!("{base}/tasks/{task}")).send().await
                } else {
                    client
                        .post(format!("{base}/update_task"))
                        .json(&json!({"task_id": task}))
                        .send()
                        .await
                };
                assert!(response.unwrap().status().as_u16() < 500);
            }
        })
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(
            server
                .subscribe_with("/events", &[("Last-Event-ID", &since)])
                .await,
        );
    }
    publisher.await.unwrap();
    let end = server.update(json!({"task_id": "end"})).await;
    let snapshot = server.snapshot().await;
    let current: std::collections::BTreeMap<String, u64> = snapshot["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task_id"].to_string(), t["version"].as_u64().unwrap()))
        .collect();
    for mut stream in streams {
        let mut view = std::collections::BTreeMap::from([("1".to_owned(), 1)]);
        let mut last = crate::helpers::id_key(&since);
        loop {
            let frame = stream.next_event().await;
            let id = frame.id.clone().expect("events carry ids");
            let key = crate::helpers::id_key(&id);
            assert!(
                key > last,
                "{id} after {last:?}: a duplicate or out of order"
            );
            last = key;
            apply(&mut view, &frame);
            if id == end {
                break;
            }
        }
        assert_eq!(
            view, current,
            "the catch-up and live end at the current state"
        );
    }
    assert_eq!(server.metric("taskstream_resets_total").await, 0.0);
}
