//! Failures that must lose nothing (issue 11): each test drives one fault deterministically and
//! checks that every acknowledged event reaches the client, or that a `reset` covers it.

use crate::helpers::{id_key, Frame, RedisServer, SseStream, TestServer, PATIENCE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Redis with an AOF (what was acknowledged survives its restart) whose default user may not run
/// `CLIENT SETNAME`. A node's stream reader names its connection before anything else, so this
/// holds every reader back until the test allows the command, while requests and replays (which
/// never name their connection) go through: a deterministic stand-in for a reader whose
/// reconnect backoff has not run out yet. The ACL is a start argument, so it survives the restart.
const HELD_READERS: &[&str] = &[
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--user",
    "default",
    "on",
    "nopass",
    "~*",
    "&*",
    "+@all",
    "-client|setname",
];

/// Lets the held readers connect.
fn release_readers(redis: &RedisServer) {
    redis.cli(&["ACL", "SETUSER", "default", "+client|setname"]);
}

/// POSTs until the update is acknowledged, always with the same Idempotency-Key, so a retry after
/// a lost answer cannot publish twice. Right after an outage the first attempts may answer 503.
async fn publish(node: &TestServer, body: Value, key: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = node
            .client
            .post(node.url("/update_task"))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        if let Ok(answer) = answer {
            if answer.status() == StatusCode::ACCEPTED {
                let answer: Value = answer.json().await.unwrap();
                return answer["event_id"].as_str().unwrap().to_owned();
            }
        }
        assert!(Instant::now() < deadline, "{key} never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads events until `last` arrives (or a reset at or past it); answers the frames read.
async fn events_through(stream: &mut SseStream, last: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let frame = stream.next_event().await;
        let id = frame.id.clone().expect("every event has an id");
        frames.push(frame);
        if id_key(&id) >= id_key(last) {
            return frames;
        }
    }
}

/// The acknowledged ids that a client's frames neither delivered nor covered by a `reset`.
fn missing(acknowledged: &[String], frames: &[Frame]) -> Vec<String> {
    acknowledged
        .iter()
        .filter(|id| {
            !frames.iter().any(|frame| {
                let got = frame.id.as_deref().unwrap();
                got == id.as_str()
                    || (frame.event.as_deref() == Some("reset") && id_key(got) >= id_key(id))
            })
        })
        .cloned()
        .collect()
}

/// The "181 lost" of issue 11. Node B starts while Redis is down and serves degraded; a client
/// resumes on it and is replayed from the stream once Redis is back; node A publishes; only then
/// does B's reader make its first connection. Every event A acknowledged after the client's id
/// must reach the client, or a `reset` must tell it that it missed them.
#[tokio::test]
async fn a_client_resuming_on_a_node_that_started_while_redis_was_down_misses_nothing() {
    if !RedisServer::available() {
        return;
    }
    let mut redis = RedisServer::start(HELD_READERS).await;
    let a = TestServer::start_on(&redis, &[]).await;
    let mut before = Vec::new();
    for n in 0..5 {
        before.push(
            publish(
                &a,
                json!({"task_id": 1, "data": {"n": n}}),
                &format!("a{n}"),
            )
            .await,
        );
    }

    redis.kill();
    let b = TestServer::start_on(&redis, &[]).await;
    b.wait_for_log("unreachable at start").await;
    let mut stream = b
        .subscribe_with("/events", &[("Last-Event-ID", &before[2])])
        .await;
    redis.restart().await;
    let replayed = events_through(&mut stream, &before[4]).await;
    assert_eq!(
        missing(&before[3..], &replayed),
        Vec::<String>::new(),
        "the replay from the stream; got {replayed:?}"
    );

    // Published while B's reader has not yet connected for the first time.
    let mut during = Vec::new();
    for n in 0..2 {
        during.push(
            publish(
                &a,
                json!({"task_id": 2, "data": {"n": n}}),
                &format!("b{n}"),
            )
            .await,
        );
    }
    release_readers(&redis);
    b.wait_for_log("redis: following the event stream after")
        .await;
    let after = publish(&a, json!({"task_id": 3}), "c").await;
    during.push(after.clone());

    let frames = events_through(&mut stream, &after).await;
    let ids: Vec<_> = frames
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f.event.as_deref().unwrap_or("?"),
                f.id.as_deref().unwrap()
            )
        })
        .collect();
    assert_eq!(
        missing(&during, &frames),
        Vec::<String>::new(),
        "acknowledged events the client never got, with no reset: it received {ids:?}"
    );
}
