//! Bad input: a JSON error naming what is wrong, the right status, and no trace at all.

use crate::helpers::TestServer;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct BadRequest {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    /// Words the error message must contain (the field it names).
    mentions: &'static str,
}

fn row(name: &'static str, body: Value, mentions: &'static str) -> BadRequest {
    BadRequest {
        name,
        content_type: Some("application/json"),
        body: body.to_string().into_bytes(),
        status: StatusCode::BAD_REQUEST,
        mentions,
    }
}

fn rows() -> Vec<BadRequest> {
    let big = "x".repeat(65 * 1024);
    vec![
        BadRequest {
            name: "not JSON",
            content_type: Some("application/json"),
            body: b"{task_id: 1".to_vec(),
            status: StatusCode::BAD_REQUEST,
            mentions: "not valid JSON",
        },
        BadRequest {
            name: "empty body",
            content_type: Some("application/json"),
            body: Vec::new(),
            status: StatusCode::BAD_REQUEST,
            mentions: "empty",
        },
        row("not an object", json!([{"task_id": 1}]), "JSON object"),
        row("missing task_id", json!({"status": "x"}), "task_id"),
        row("task_id boolean", json!({"task_id": true}), "task_id"),
        row("task_id zero", json!({"task_id": 0}), "task_id"),
        row("task_id negative", json!({"task_id": -4}), "task_id"),
        row("task_id fraction", json!({"task_id": 1.5}), "task_id"),
        row(
            "task_id above 2^53-1",
            json!({"task_id": 9007199254740992u64}),
            "task_id",
        ),
        row("task_id empty string", json!({"task_id": ""}), "task_id"),
        row(
            "task_id bad characters",
            json!({"task_id": "a b"}),
            "task_id",
        ),
        row(
            "task_id too long",
            json!({"task_id": "a".repeat(129)}),
            "task_id",
        ),
        row(
            "status not a string",
            json!({"task_id": 1, "status": 5}),
            "status",
        ),
        row(
            "status empty",
            json!({"task_id": 1, "status": ""}),
            "status",
        ),
        row(
            "status too long",
            json!({"task_id": 1, "status": "s".repeat(65)}),
            "status",
        ),
        row(
            "status null",
            json!({"task_id": 1, "status": null}),
            "status",
        ),
        row(
            "title too long",
            json!({"task_id": 1, "title": "t".repeat(257)}),
            "title",
        ),
        row(
            "title not a string",
            json!({"task_id": 1, "title": ["t"]}),
            "title",
        ),
        row(
            "assignee too long",
            json!({"task_id": 1, "assignee": "a".repeat(129)}),
            "assignee",
        ),
        row(
            "assignee a number",
            json!({"task_id": 1, "assignee": 3}),
            "assignee",
        ),
        row(
            "data not an object",
            json!({"task_id": 1, "data": "x"}),
            "data",
        ),
        row(
            "data over 16 KiB",
            json!({"task_id": 1, "data": {"k": "d".repeat(16 * 1024)}}),
            "data",
        ),
        row(
            "unknown field",
            json!({"task_id": 1, "version": 9}),
            "version",
        ),
        BadRequest {
            name: "body over 64 KiB",
            content_type: Some("application/json"),
            body: json!({"task_id": 1, "title": big}).to_string().into_bytes(),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            mentions: "65536",
        },
        BadRequest {
            name: "text/plain body",
            content_type: Some("text/plain"),
            body: br#"{"task_id": 1}"#.to_vec(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            mentions: "application/json",
        },
        BadRequest {
            name: "no content type",
            content_type: None,
            body: br#"{"task_id": 1}"#.to_vec(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            mentions: "application/json",
        },
    ]
}

async fn assert_json_error(
    response: reqwest::Response,
    status: StatusCode,
    mentions: &str,
    name: &str,
) {
    assert_eq!(response.status(), status, "{name}");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{name}"
    );
    let body: Value = response.json().await.unwrap();
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no error field in {body}"));
    assert!(
        error.contains(mentions),
        "{name}: {error:?} should mention {mentions:?}"
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "{name}: only the error field"
    );
}

#[tokio::test]
async fn every_bad_update_gets_its_status_and_a_json_error_naming_the_field_and_changes_nothing() {
    let server = TestServer::start(&[]).await;
    server.update(json!({"task_id": 1, "status": "kept"})).await;
    let before = server.snapshot().await;
    let mut stream = server.subscribe("/events").await;
    for bad in rows() {
        let mut request = server
            .client
            .post(server.url("/update_task"))
            .body(bad.body.clone());
        if let Some(content_type) = bad.content_type {
            request = request.header("content-type", content_type);
        }
        assert_json_error(
            request.send().await.unwrap(),
            bad.status,
            bad.mentions,
            bad.name,
        )
        .await;
        assert_eq!(
            server.snapshot().await,
            before,
            "{}: the snapshot is unchanged",
            bad.name
        );
    }
    // The first event the stream carries after all of that is the sentinel: nothing was published.
    let sentinel = server.update(json!({"task_id": 2})).await;
    assert_eq!(stream.next_event().await.id, Some(sentinel));
    assert_eq!(
        server.metric("taskstream_events_published_total").await,
        2.0
    );
}

#[tokio::test]
async fn a_chunked_body_over_64_kib_is_refused_with_413() {
    let server = TestServer::start(&[]).await;
    let chunks =
        futures_util::stream::iter((0..80).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let response = server
        .client
        .post(server.url("/update_task"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_json_error(response, StatusCode::PAYLOAD_TOO_LARGE, "65536", "chunked").await;
}

#[tokio::test]
async fn a_bad_idempotency_key_is_refused() {
    let server = TestServer::start(&[]).await;
    let response = server
        .client
        .post(server.url("/update_task"))
        .header("Idempotency-Key", "x".repeat(256))
        .json(&json!({"task_id": 1}))
        .send()
        .await
        .unwrap();
    assert_json_error(
        response,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key",
        "long key",
    )
    .await;
    assert_eq!(server.snapshot().await["tasks"], json!([]));
}

#[tokio::test]
async fn unknown_routes_404_and_wrong_methods_405_in_json() {
    let server = TestServer::start(&[]).await;
    let response = server
        .client
        .get(server.url("/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_json_error(
        response,
        StatusCode::NOT_FOUND,
        "/nothing/here",
        "unknown route",
    )
    .await;
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/update_task", "POST"),
        (reqwest::Method::POST, "/tasks", "GET"),
        (reqwest::Method::PUT, "/tasks/1", "GET, DELETE"),
        (reqwest::Method::POST, "/events", "GET"),
        (reqwest::Method::DELETE, "/healthz", "GET, HEAD"),
    ] {
        let response = server
            .client
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["allow"], allowed, "{method} {path}");
        assert_json_error(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            method.as_str(),
            path,
        )
        .await;
    }
}

#[tokio::test]
async fn an_invalid_task_id_in_a_path_is_a_400() {
    let server = TestServer::start(&[]).await;
    let response = server
        .client
        .get(server.url("/tasks/a%20b"))
        .send()
        .await
        .unwrap();
    assert_json_error(response, StatusCode::BAD_REQUEST, "task_id", "path").await;
}
