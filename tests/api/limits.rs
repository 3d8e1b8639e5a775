//! Limits against abuse: the publish rate, the per-IP stream cap, CORS with credentials, and the
//! size and time limits on requests (slow-loris).

use crate::helpers::{token, TestServer, PATIENCE, SECRET};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

async fn post_as(server: &TestServer, bearer: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = server.client.post(server.url("/update_task")).json(&body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn publishing_faster_than_the_rate_is_429_with_retry_after_per_token_subject() {
    let server = TestServer::start(&[
        "--jwt-secret",
        SECRET,
        "--publish-rate",
        "1",
        "--publish-burst",
        "2",
    ])
    .await;
    let ana = token("ana", &["*"], &["*"], HOUR);
    let bob = token("bob", &["*"], &["*"], HOUR);
    for _ in 0..2 {
        assert_eq!(
            post_as(&server, Some(&ana), json!({"task_id": 1}))
                .await
                .status(),
            StatusCode::ACCEPTED
        );
    }
    let refused = post_as(&server, Some(&ana), json!({"task_id": 1})).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("publishing too fast"),
        "{body}"
    );
    // A delete is a publish too.
    let refused = server
        .client
        .delete(server.url("/tasks/1"))
        .bearer_auth(&ana)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another subject has its own allowance.
    assert_eq!(
        post_as(&server, Some(&bob), json!({"task_id": 2}))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        server
            .metric(r#"taskstream_rate_limited_total{limit="publish"}"#)
            .await,
        2.0
    );
    let snapshot = server
        .client
        .get(server.url("/tasks/1"))
        .bearer_auth(&ana)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(snapshot["version"], 2, "the refused update changed nothing");
}

#[tokio::test]
async fn without_auth_the_publish_rate_counts_per_ip() {
    let server = TestServer::start(&["--publish-rate", "1"]).await;
    assert_eq!(
        post_as(&server, None, json!({"task_id": 1})).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        post_as(&server, None, json!({"task_id": 2})).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn streams_beyond_the_per_ip_cap_are_429_and_the_place_comes_back() {
    let server = TestServer::start(&["--max-subscribers-per-ip", "2"]).await;
    let first = server.subscribe("/events").await;
    let _second = server.subscribe("/events").await;
    let refused = server
        .client
        .get(server.url("/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many open streams from 127.0.0.1"),
        "{body}"
    );
    assert_eq!(
        server
            .metric(r#"taskstream_rate_limited_total{limit="subscribers_per_ip"}"#)
            .await,
        1.0
    );
    drop(first);
    server.wait_for_metric("taskstream_subscribers", 1.0).await;
    let _third = server.subscribe("/events").await;
}

const ORIGIN: &str = "https://board.example.com";

#[tokio::test]
async fn cors_preflight_names_the_origin_and_allows_credentials_and_the_token_header() {
    let server = TestServer::start(&[
        "--cors-origin",
        ORIGIN,
        "--cors-origin",
        "http://localhost:5173",
    ])
    .await;
    let preflight = server
        .client
        .request(Method::OPTIONS, server.url("/update_task"))
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for name in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let stranger = server
        .client
        .request(Method::OPTIONS, server.url("/events"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(stranger.status().is_client_error());
    assert!(stranger
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn credentialed_requests_and_streams_get_the_exact_origin_back() {
    let server = TestServer::start(&["--cors-origin", ORIGIN]).await;
    let stream = server
        .subscribe_with("/events", &[("origin", ORIGIN)])
        .await;
    assert_eq!(stream.headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(stream.headers["access-control-allow-credentials"], "true");
    assert!(stream.headers.get("connection").is_none());
    let response = get_tasks_from(&server, ORIGIN).await;
    assert_eq!(response.headers()["access-control-allow-origin"], ORIGIN);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("retry-after") && exposed.contains("www-authenticate"),
        "{exposed}"
    );
    assert!(response.headers()["vary"]
        .to_str()
        .unwrap()
        .to_lowercase()
        .contains("origin"));
    let stranger = get_tasks_from(&server, "https://evil.example").await;
    assert!(stranger
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn without_cors_origins_no_cors_headers_are_sent() {
    let server = TestServer::start(&[]).await;
    let response = get_tasks_from(&server, ORIGIN).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn bodies_and_heads_over_their_limits_are_refused_with_json() {
    let server =
        TestServer::start(&["--max-body-bytes", "1024", "--max-header-bytes", "2048"]).await;
    let big = post_as(
        &server,
        None,
        json!({"task_id": 1, "title": "x".repeat(1100)}),
    )
    .await;
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(big.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("1024"));
    let fat_head = server
        .client
        .get(server.url("/tasks"))
        .header("x-padding", "p".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(
        fat_head.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert!(fat_head.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("2048"));
    assert_eq!(server.snapshot().await["tasks"], json!([]));
}

/// Sends the start of a request and never the rest; answers what the server sent before it
/// closed the connection.
async fn send_part_of_a_request(server: &TestServer, start: &'static [u8]) -> String {
    let address = server.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let mut socket = TcpStream::connect(address).unwrap();
        socket.write_all(start).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_client_that_sends_its_head_too_slowly_is_cut_off() {
    let server = TestServer::start(&["--request-timeout", "1"]).await;
    let started = Instant::now();
    let answer = send_part_of_a_request(&server, b"GET /tasks HTTP/1.1\r\nHost: x\r\n").await;
    let waited = started.elapsed();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
    // actix checks its deadline against a clock it refreshes every 500 ms.
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_client_that_sends_its_body_too_slowly_gets_408_and_nothing_changes() {
    let server = TestServer::start(&["--request-timeout", "1"]).await;
    let started = Instant::now();
    let answer = send_part_of_a_request(
        &server,
        b"POST /update_task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"task_id\": 1,",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        answer.contains(r#"{"error":"the request body did not arrive within 1 seconds"}"#),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(server.snapshot().await["tasks"], json!([]));
}

/// `GET /tasks` as a page from `origin` would send it.
async fn get_tasks_from(server: &TestServer, origin: &str) -> reqwest::Response {
    server
        .client
        .get(server.url("/tasks"))
        .header("origin", origin)
        .send()
        .await
        .unwrap()
}
