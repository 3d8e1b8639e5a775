//! The task endpoints: POST /update_task, GET /tasks, GET|DELETE /tasks/{id}, idempotency, ops.

use crate::helpers::{id_key, task_ids, TestServer};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn update_task_answers_202_with_the_event_id_and_the_whole_task() {
    let server = TestServer::start(&[]).await;
    let (status, answer) = server
        .post(&json!({"task_id": 101, "status": "completed", "title": "Ship it", "assignee": "ana", "data": {"priority": 2}}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let task = &answer["task"];
    assert_eq!(task["task_id"], json!(101));
    assert_eq!(task["status"], "completed");
    assert_eq!(task["title"], "Ship it");
    assert_eq!(task["assignee"], "ana");
    assert_eq!(task["data"], json!({"priority": 2}));
    assert_eq!(task["version"], 1);
    let updated_at = task["updated_at"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(updated_at).expect("RFC 3339");
    assert_eq!(parsed.offset().local_minus_utc(), 0, "UTC: {updated_at}");
    assert!(updated_at.ends_with('Z'));
    assert!(answer["event_id"].is_string());
}

#[tokio::test]
async fn task_id_alone_bumps_the_version_and_fields_given_replace_stored_ones() {
    let server = TestServer::start(&[]).await;
    server
        .update(json!({"task_id": 7, "status": "open", "assignee": "ana", "title": "t"}))
        .await;
    let (_, answer) = server.post(&json!({"task_id": 7})).await;
    assert_eq!(answer["task"]["version"], 2);
    assert_eq!(answer["task"]["status"], "open");
    let (_, answer) = server
        .post(&json!({"task_id": 7, "assignee": null, "status": "done"}))
        .await;
    assert_eq!(
        answer["task"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [
            "assignee",
            "status",
            "task_id",
            "title",
            "updated_at",
            "version"
        ]
    );
    assert_eq!(answer["task"]["assignee"], json!(null));
    assert_eq!(answer["task"]["status"], "done");
    assert_eq!(answer["task"]["title"], "t");
    assert_eq!(answer["task"]["version"], 3);
}

#[tokio::test]
async fn unset_optional_fields_are_absent() {
    let server = TestServer::start(&[]).await;
    let (_, answer) = server.post(&json!({"task_id": "abc"})).await;
    let keys: Vec<_> = answer["task"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["task_id", "updated_at", "version"]);
}

#[tokio::test]
async fn a_number_and_its_decimal_string_name_the_same_task_but_leading_zeros_do_not() {
    let server = TestServer::start(&[]).await;
    server.update(json!({"task_id": 101, "status": "a"})).await;
    let (_, answer) = server.post(&json!({"task_id": "101", "status": "b"})).await;
    assert_eq!(answer["task"]["version"], 2);
    assert_eq!(answer["task"]["task_id"], json!(101), "carried as a number");
    let (_, answer) = server.post(&json!({"task_id": "0101"})).await;
    assert_eq!(answer["task"]["version"], 1);
    assert_eq!(
        answer["task"]["task_id"],
        json!("0101"),
        "carried as a string"
    );
    let (status, task) = server.get_json("/tasks/101").await;
    assert_eq!(
        (status, task["status"].clone()),
        (StatusCode::OK, json!("b"))
    );
    assert_eq!(
        server.snapshot().await["tasks"].as_array().unwrap().len(),
        2
    );
}

#[tokio::test]
async fn get_task_answers_the_task_or_404() {
    let server = TestServer::start(&[]).await;
    server
        .update(json!({"task_id": "proj-7:a", "title": "x"}))
        .await;
    let (status, task) = server.get_json("/tasks/proj-7:a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(task["title"], "x");
    let (status, body) = server.get_json("/tasks/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
}

#[tokio::test]
async fn delete_removes_the_task_emits_task_deleted_and_404s_when_unknown() {
    let server = TestServer::start(&[]).await;
    server.update(json!({"task_id": 5})).await;
    let mut stream = server.subscribe("/events").await;
    let response = server
        .client
        .delete(server.url("/tasks/5"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let answer: serde_json::Value = response.json().await.unwrap();
    let event = stream.next_event().await;
    assert_eq!(event.event.as_deref(), Some("task_deleted"));
    assert_eq!(event.id.as_deref(), answer["event_id"].as_str());
    assert_eq!(
        event.data.as_deref(),
        Some(r#"{"event":"task_deleted","task_id":5}"#)
    );
    assert_eq!(server.get_json("/tasks/5").await.0, StatusCode::NOT_FOUND);
    let again = server
        .client
        .delete(server.url("/tasks/5"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert!(server.snapshot().await["tasks"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn the_snapshot_names_the_last_event_it_includes() {
    let server = TestServer::start(&[]).await;
    let empty = server.snapshot().await;
    assert_eq!(empty, json!({"last_event_id": null, "tasks": []}));
    server.update(json!({"task_id": 1})).await;
    let last = server.update(json!({"task_id": 2})).await;
    let snapshot = server.snapshot().await;
    assert_eq!(snapshot["last_event_id"], json!(last));
    let ids = task_ids(&snapshot);
    assert_eq!(ids, [json!(1), json!(2)]);
}

#[tokio::test]
async fn event_ids_strictly_increase_group_by_group() {
    let server = TestServer::start(&[]).await;
    let mut previous = Vec::new();
    for n in 0..50 {
        let id = server.update(json!({"task_id": n % 3 + 1})).await;
        assert!(id.bytes().all(|b| b.is_ascii_digit() || b == b'-'), "{id}");
        let key = id_key(&id);
        assert!(key > previous, "{id} after {previous:?}");
        previous = key;
    }
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_the_first_result_and_publishes_nothing() {
    let server = TestServer::start(&[]).await;
    let mut stream = server.subscribe("/events").await;
    let send = |status: &'static str| {
        server
            .client
            .post(server.url("/update_task"))
            .header("Idempotency-Key", "order-42")
            .json(&json!({"task_id": 9, "status": status}))
            .send()
    };
    let first = send("first").await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first_body = first.bytes().await.unwrap();
    let again = send("second").await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(
        again.bytes().await.unwrap(),
        first_body,
        "the first answer, byte for byte"
    );
    let sentinel = server.update(json!({"task_id": 10})).await;
    assert_eq!(stream.next_event().await.json()["status"], "first");
    assert_eq!(
        stream.next_event().await.id.as_deref(),
        Some(sentinel.as_str()),
        "nothing published for the retry"
    );
    assert_eq!(
        server.metric("taskstream_events_published_total").await,
        2.0
    );
    assert_eq!(server.get_json("/tasks/9").await.1["version"], 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_publish_once() {
    let server = TestServer::start(&[]).await;
    let requests = (0..20).map(|n| {
        server
            .client
            .post(server.url("/update_task"))
            .header("Idempotency-Key", "same")
            .json(&json!({"task_id": 1, "title": format!("try {n}")}))
            .send()
    });
    let answers = futures_util::future::join_all(requests).await;
    let bodies: Vec<_> =
        futures_util::future::join_all(answers.into_iter().map(|r| r.unwrap().bytes())).await;
    assert!(bodies
        .windows(2)
        .all(|w| w[0].as_ref().unwrap() == w[1].as_ref().unwrap()));
    assert_eq!(
        server.metric("taskstream_events_published_total").await,
        1.0
    );
}

#[tokio::test]
async fn healthz_metrics_and_the_board_page_answer() {
    let server = TestServer::start(&[]).await;
    assert_eq!(
        server.get_json("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    server.update(json!({"task_id": 1})).await;
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for name in [
        "taskstream_subscribers 0",
        "taskstream_events_published_total 1",
        "taskstream_events_replayed_total 0",
        "taskstream_resets_total 0",
        "taskstream_lagged_subscribers_total 0",
        "taskstream_http_requests_total{status=\"202\"} 1",
        "# TYPE taskstream_subscribers gauge",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }
    let page = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/app.js"));
    for path in ["/", "/healthz"] {
        let head = server.client.head(server.url(path)).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::OK, "HEAD {path}");
        assert!(
            head.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    for asset in ["/app.js", "/app.css"] {
        assert_eq!(
            server
                .client
                .get(server.url(asset))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK,
            "{asset}"
        );
    }
}

#[tokio::test]
async fn each_request_is_logged_once_at_info() {
    let server = TestServer::start(&[]).await;
    server.update(json!({"task_id": 1})).await;
    let _ = server.get_json("/tasks/1").await;
    // actix logs a request once its response is sent, which can be after the client has it.
    let logs = server.wait_for_log("\"GET /tasks/1 HTTP/1.1\" 200").await;
    assert_eq!(
        logs.matches("\"POST /update_task HTTP/1.1\" 202").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("\"GET /tasks/1 HTTP/1.1\" 200").count(),
        1,
        "{logs}"
    );
}
