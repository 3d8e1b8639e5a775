//! SIGTERM and SIGINT: every open stream ends cleanly after a complete frame, and the process
//! exits 0 within a few seconds.

use crate::helpers::TestServer;
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::{Duration, Instant};

async fn streams_end_cleanly_and_the_process_exits_0(signal: Signal) {
    let mut server = TestServer::start(&[]).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(server.subscribe("/events").await);
    }
    server.update(json!({"task_id": 1})).await;
    for stream in &mut streams {
        stream.next_event().await;
    }
    let signalled = Instant::now();
    server.signal(signal);
    for stream in &mut streams {
        // next_frame asserts that the body ends on a frame boundary and without an error.
        while stream.next_frame().await.is_some() {}
        assert!(stream.ended);
    }
    let status = server.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", server.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_0() {
    streams_end_cleanly_and_the_process_exits_0(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_ends_open_streams_and_exits_0() {
    streams_end_cleanly_and_the_process_exits_0(Signal::SIGINT).await;
}
