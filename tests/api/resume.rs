//! Resume with Last-Event-ID: replay, the gapless join with live events, and `reset`.

use crate::helpers::{id_key, memory_only, not_on_sqlite, TestServer};
use serde_json::json;
use std::sync::Arc;

async fn publish(server: &TestServer, count: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(
            server
                .update(json!({"task_id": 1, "title": format!("n{n}")}))
                .await,
        );
    }
    ids
}

fn ids(frames: &[crate::helpers::Frame]) -> Vec<String> {
    frames.iter().map(|f| f.id.clone().unwrap()).collect()
}

#[tokio::test]
async fn the_last_event_id_header_replays_every_later_event_then_live() {
    let server = TestServer::start(&[]).await;
    let published = publish(&server, 5).await;
    let mut stream = server
        .subscribe_with("/events", &[("Last-Event-ID", &published[1])])
        .await;
    assert_eq!(ids(&stream.events(3).await), &published[2..]);
    let live = server.update(json!({"task_id": 2})).await;
    assert_eq!(stream.next_event().await.id, Some(live));
    assert_eq!(server.metric("taskstream_events_replayed_total").await, 3.0);
}

#[tokio::test]
async fn the_last_event_id_query_parameter_replays_too() {
    let server = TestServer::start(&[]).await;
    let published = publish(&server, 4).await;
    let mut stream = server
        .subscribe(&format!("/events?last_event_id={}", published[2]))
        .await;
    assert_eq!(ids(&stream.events(1).await), &published[3..]);
}

#[tokio::test]
async fn the_header_wins_over_the_query_parameter() {
    let server = TestServer::start(&[]).await;
    let published = publish(&server, 4).await;
    let path = format!("/events?last_event_id={}", published[0]);
    let mut stream = server
        .subscribe_with(&path, &[("Last-Event-ID", &published[2])])
        .await;
    let live = server.update(json!({"task_id": 3})).await;
    assert_eq!(ids(&stream.events(2).await), [published[3].clone(), live]);
}

#[tokio::test]
async fn zero_replays_everything_still_buffered() {
    let server = TestServer::start(&[]).await;
    let published = publish(&server, 3).await;
    let mut stream = server.subscribe("/events?last_event_id=0").await;
    assert_eq!(ids(&stream.events(3).await), published);
}

#[tokio::test]
async fn the_filter_applies_to_the_replay() {
    let server = TestServer::start(&[]).await;
    let first = server.update(json!({"task_id": 1})).await;
    server.update(json!({"task_id": 2})).await;
    let wanted = server.update(json!({"task_id": 3})).await;
    let mut stream = server
        .subscribe(&format!("/events?task_id=3&last_event_id={first}"))
        .await;
    assert_eq!(stream.next_event().await.id, Some(wanted));
}

/// The reset frame names the newest id, and live events follow it.
async fn assert_reset_then_live(server: &TestServer, last_event_id: &str, reason: &str) {
    let newest = server.snapshot().await["last_event_id"].clone();
    let mut stream = server
        .subscribe_with("/events", &[("Last-Event-ID", last_event_id)])
        .await;
    let reset = stream.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{}", reset.raw);
    let newest = newest.as_str().unwrap_or("0-0").to_owned();
    assert_eq!(reset.id.as_deref(), Some(newest.as_str()));
    let data = reset.json();
    assert_eq!(data["event"], "reset");
    assert_eq!(data["last_event_id"], json!(newest));
    assert!(data["reason"].as_str().unwrap().contains(reason), "{data}");
    let live = server.update(json!({"task_id": 77})).await;
    assert_eq!(stream.next_event().await.id, Some(live));
}

#[tokio::test]
async fn an_id_that_left_the_buffer_and_is_older_than_a_dropped_tombstone_gets_reset() {
    if not_on_sqlite(
        "the log on disk keeps --retention events, not --buffer: durable::retention_trims_the_log_in_the_background",
    ) {
        return;
    }
    // One tombstone kept: the second deletion below drops the first, so no catch-up from before
    // it can be complete (a younger id gets the compacted catch-up: catchup.rs).
    let server = TestServer::start(&["--buffer", "4", "--tombstones", "1"]).await;
    // Enough that Redis's approximate trimming (whole nodes of up to 100 entries) drops the third
    // event too; in memory 10 would do.
    let published = publish(&server, 150).await;
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
    assert_reset_then_live(&server, &published[2], "left the replay buffer").await;
    assert_eq!(server.metric("taskstream_resets_total").await, 1.0);
}

#[tokio::test]
async fn garbage_ids_get_reset_never_an_error_status() {
    let server = TestServer::start(&[]).await;
    publish(&server, 2).await;
    for garbage in ["garbage", "-1", "1-2-3", "99999999999999999999999", "１２"] {
        assert_reset_then_live(&server, garbage, "malformed").await;
    }
    let encoded = "/events?last_event_id=%00%0A";
    let mut stream = server.subscribe(encoded).await;
    assert_eq!(stream.next_event().await.event.as_deref(), Some("reset"));
}

#[tokio::test]
async fn ids_this_server_never_issued_get_reset() {
    let server = TestServer::start(&[]).await;
    let published = publish(&server, 2).await;
    let key = id_key(&published[1]);
    let future = format!("{}-{}", key[0], key[1] + 100);
    assert_reset_then_live(&server, &future, "not issued by this server").await;
}

#[tokio::test]
async fn an_id_from_a_previous_run_gets_reset_not_wrong_events() {
    if memory_only(
        "on Redis the log outlives a node's run: redis::a_restarted_node_replays_ids_from_before_its_restart",
    ) {
        return;
    }
    let first_run = TestServer::start(&[]).await;
    let old = publish(&first_run, 3).await;
    drop(first_run);
    let second_run = TestServer::start(&[]).await;
    let new = publish(&second_run, 5).await;
    assert!(
        new.iter().all(|id| !old.contains(id)),
        "ids are never reused across restarts"
    );
    assert!(id_key(&new[0]) > id_key(&old[2]), "and keep increasing");
    assert_reset_then_live(&second_run, &old[0], "not issued by this server").await;
}

#[tokio::test]
async fn a_fresh_server_answers_an_unknown_id_with_a_reset_to_the_start() {
    let server = TestServer::start(&[]).await;
    assert_reset_then_live(&server, "1234-5", "not issued").await;
}

/// Many clients reconnect over and over, each time with the last id they saw, while events are
/// published without pause: each must see every event exactly once, in order.
#[tokio::test]
async fn reconnecting_during_concurrent_publishing_loses_and_repeats_nothing() {
    let server = Arc::new(TestServer::start(&["--buffer", "4096"]).await);
    const EVENTS: u64 = 1500;
    let start = server
        .update(json!({"task_id": "seq", "data": {"n": 0}}))
        .await;
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let server = server.clone();
            tokio::spawn(async move {
                for n in 0..EVENTS / 2 {
                    server
                        .update(json!({"task_id": format!("p{p}"), "data": {"n": n}}))
                        .await;
                }
            })
        })
        .collect();
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let server = server.clone();
            let start = start.clone();
            tokio::spawn(async move {
                let mut last = start;
                let mut seen = Vec::new();
                let mut reconnects = 0;
                while seen.len() < EVENTS as usize {
                    let mut stream = server
                        .subscribe_with("/events", &[("Last-Event-ID", &last)])
                        .await;
                    // Read a few events, then drop the connection mid-stream.
                    for _ in 0..(7 + c * 5) {
                        if seen.len() == EVENTS as usize {
                            break;
                        }
                        let frame = stream.next_event().await;
                        assert_eq!(
                            frame.event.as_deref(),
                            Some("task_updated"),
                            "no reset expected: {}",
                            frame.raw
                        );
                        let data = frame.json();
                        seen.push((
                            data["task_id"].as_str().unwrap().to_owned(),
                            data["data"]["n"].as_u64().unwrap(),
                        ));
                        last = frame.id.unwrap();
                    }
                    reconnects += 1;
                }
                (seen, reconnects)
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for client in clients {
        let (seen, reconnects) = client.await.unwrap();
        assert!(reconnects > 10, "the client reconnected {reconnects} times");
        for p in 0..2 {
            let ns: Vec<u64> = seen
                .iter()
                .filter(|(t, _)| *t == format!("p{p}"))
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(
                ns,
                (0..EVENTS / 2).collect::<Vec<_>>(),
                "publisher p{p}: every event once, in order"
            );
        }
    }
}
