//! A subscriber that stops reading: publishers and other subscribers are unaffected, server memory
//! stays bounded, and when it reads again it continues without loss, with an announced compacted
//! catch-up, or is told to reset.

use crate::helpers::{padded, TestServer};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Parses raw SSE bytes into (event type, id, data JSON) triples; the comment announcing a
/// compacted catch-up counts as a `compacted` event without id or data.
fn events_in(raw: &str) -> Vec<(String, String, serde_json::Value)> {
    // Only whole frames: whatever follows the last blank line is still arriving.
    let complete = raw.rfind("\n\n").map_or("", |end| &raw[..end]);
    complete
        .split("\n\n")
        .filter_map(|frame| {
            if frame.lines().any(|l| l.starts_with(": compacted ")) {
                return Some(("compacted".into(), String::new(), serde_json::Value::Null));
            }
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::to_owned)
            };
            Some((
                field("event: ")?,
                field("id: ")?,
                serde_json::from_str(&field("data: ")?).unwrap(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_never_slows_others_and_memory_stays_bounded() {
    if crate::helpers::not_on_sqlite(
        "it needs the ring to run out; the log on disk catches the stalled subscriber up instead",
    ) {
        return;
    }
    let server = TestServer::start(&["--buffer", "64"]).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = stalled.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    let mut reader = server.subscribe("/events").await;
    let rss_before = server.rss_bytes();

    // 4,000 events of ~8 KiB: about 32 MiB, far more than socket buffers hold.
    const EVENTS: u64 = 4000;
    let publish_started = Instant::now();
    let reading = tokio::spawn(async move {
        let mut last = 0;
        for expected in 0..EVENTS {
            let frame = reader.next_event().await;
            let seq = frame.json()["data"]["seq"].as_u64().unwrap();
            assert_eq!(
                seq, expected,
                "the reading subscriber sees every event in order"
            );
            last = seq;
        }
        last
    });
    let mut peak_rss = rss_before;
    for seq in 0..EVENTS {
        server.update(padded(1, seq, 8 * 1024)).await;
        if seq % 200 == 0 {
            peak_rss = peak_rss.max(server.rss_bytes());
        }
    }
    let publish_time = publish_started.elapsed();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), reading)
            .await
            .unwrap()
            .unwrap(),
        EVENTS - 1
    );
    peak_rss = peak_rss.max(server.rss_bytes());
    let growth = peak_rss.saturating_sub(rss_before);
    eprintln!(
        "published {EVENTS} events in {publish_time:?}; server RSS grew by {} KiB",
        growth / 1024
    );
    // The ring holds 64 events (~0.5 MiB) and the stalled socket's buffers are bounded; 32 MiB
    // went by. Allow allocator slack, but not a copy of what was published.
    assert!(
        growth < 16 * 1024 * 1024,
        "server RSS grew by {growth} bytes"
    );

    // Now the stalled subscriber reads again: in order, and any missing stretch is announced (a
    // compacted catch-up or a reset).
    let newest = server.update(padded(1, EVENTS, 0)).await;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Until the newest event's frame has arrived whole (a read can end inside a frame).
    let newest_frame_complete = |raw: &[u8]| {
        let text = String::from_utf8_lossy(raw);
        text.find(&format!("id: {newest}\n"))
            .is_some_and(|at| text[at..].contains("\n\n"))
    };
    while !newest_frame_complete(&raw) {
        let n = tokio::time::timeout(Duration::from_secs(15), stalled.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stalled stream was closed instead of continued");
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let events = events_in(&text);
    let mut expected: Option<u64> = Some(0);
    let mut resets = 0;
    for (kind, id, data) in &events {
        match kind.as_str() {
            // Only task 1 changed: the catch-up is its latest event, any later seq.
            "compacted" => {
                resets += 1;
                expected = None;
            }
            "reset" => {
                resets += 1;
                assert_eq!(data["last_event_id"], serde_json::json!(id));
                // A reset naming the newest id means nothing is missing after it.
                expected = (*id == newest).then_some(EVENTS + 1);
            }
            "task_updated" => {
                let seq = data["data"]["seq"].as_u64().unwrap();
                if let Some(expected) = expected {
                    assert_eq!(seq, expected, "an event was skipped without a reset");
                }
                expected = Some(seq + 1);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(
        expected,
        Some(EVENTS + 1),
        "the stream reached the newest event"
    );
    assert!(
        resets >= 1,
        "64 buffered events cannot cover 4,000: a compacted catch-up or a reset must say so"
    );
    assert!(server.metric("taskstream_lagged_subscribers_total").await >= 1.0);
}

#[tokio::test]
async fn a_briefly_slow_subscriber_catches_up_from_the_buffer_without_a_reset() {
    let server = TestServer::start(&["--buffer", "4096"]).await;
    let mut slow = server.subscribe("/events").await;
    // 3,000 events of 8 KiB (24 MiB) pile up while the subscriber does not read: more than the
    // socket buffers hold, so its place in the live channel (2,048) is overwritten; the ring
    // (4,096) still covers the gap.
    for seq in 0..3000 {
        server.update(padded(2, seq, 8 * 1024)).await;
    }
    for expected in 0..3000 {
        let frame = slow.next_event().await;
        assert_eq!(
            frame.event.as_deref(),
            Some("task_updated"),
            "no reset: {}",
            &frame.raw[..frame.raw.len().min(200)]
        );
        assert_eq!(frame.json()["data"]["seq"], expected);
    }
    assert_eq!(server.metric("taskstream_resets_total").await, 0.0);
    assert!(
        server.metric("taskstream_lagged_subscribers_total").await >= 1.0,
        "the catch-up path ran"
    );
}
