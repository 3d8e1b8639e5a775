//! Auth: 401 and 403 on every protected route, tokens by header, query and cookie, per-task
//! rights for publishing and for every way of reading (live, replay, snapshot, reset), expiry
//! ending a stream, public keys, the token subcommand, and no token in the logs.

use crate::helpers::{
    admin_token, not_on_sqlite, task_ids, temp_dir, token, Frame, SseStream, TestServer, SECRET,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

async fn auth_server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// Sends a request with an optional bearer token; answers status, headers and JSON body.
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = server.client.request(method, server.url(path));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

async fn publish(server: &TestServer, bearer: &str, body: Value) -> String {
    let (status, _, answer) = call(
        server,
        Method::POST,
        "/update_task",
        Some(bearer),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
}

fn protected_requests() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/events", None),
        (Method::GET, "/tasks", None),
        (Method::GET, "/tasks/101", None),
        (Method::DELETE, "/tasks/101", None),
        (Method::POST, "/update_task", Some(json!({"task_id": 101}))),
    ]
}

#[tokio::test]
async fn without_a_token_every_protected_route_is_401_and_the_open_ones_stay_open() {
    let server = auth_server(&[]).await;
    for (method, path, body) in protected_requests() {
        let (status, headers, answer) = call(&server, method.clone(), path, None, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(headers["www-authenticate"], r#"Bearer realm="taskstream""#);
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("token is required"),
            "{answer}"
        );
    }
    for path in [
        "/healthz",
        "/metrics",
        "/",
        "/app.js",
        "/app.css",
        "/openapi.json",
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let (_, _, snapshot) = call(&server, Method::GET, "/tasks", Some(&admin_token()), None).await;
    assert_eq!(
        snapshot["tasks"],
        json!([]),
        "the refused POST changed nothing"
    );
}

#[tokio::test]
async fn malformed_expired_and_wrongly_signed_tokens_are_401_invalid_token() {
    let server = auth_server(&[]).await;
    let other_key = taskstream::auth::mint::mint(
        &taskstream::auth::mint::Mint {
            subject: "eve",
            publish: &["*".into()],
            subscribe: &["*".into()],
            ttl: HOUR,
        },
        Some(&"another-secret".parse().unwrap()),
        None,
    )
    .unwrap();
    // Signed right, but its exp is in the past (a TTL of 1 s, waited out).
    let expired = token("ana", &["*"], &["*"], Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cases = [
        ("not-a-jwt", "malformed"),
        ("a.b.c", "malformed"),
        (other_key.as_str(), "signature is invalid"),
        (expired.as_str(), "expired"),
    ];
    for (bad, reason) in cases {
        for (method, path, body) in protected_requests() {
            let (status, headers, answer) =
                call(&server, method.clone(), path, Some(bad), body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} {reason}");
            let challenge = headers["www-authenticate"].to_str().unwrap();
            assert!(
                challenge.starts_with(r#"Bearer realm="taskstream", error="invalid_token""#),
                "{challenge}"
            );
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(reason), "{error}");
            assert!(!error.contains(bad), "the error never echoes the token");
        }
    }
}

#[tokio::test]
async fn the_token_comes_from_the_header_else_the_query_else_the_cookie() {
    let server = auth_server(&[]).await;
    let good = admin_token();
    let get = |path: String, header: Option<(&'static str, String)>| {
        let mut request = server.client.get(server.url(&path));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(
        get(
            "/tasks".into(),
            Some(("authorization", format!("Bearer {good}")))
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        get(
            "/tasks".into(),
            Some(("authorization", format!("bearer {good}")))
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        get(format!("/tasks?access_token={good}"), None).await,
        StatusCode::OK
    );
    assert_eq!(
        get(
            "/tasks".into(),
            Some(("cookie", format!("theme=dark; taskstream_token={good}")))
        )
        .await,
        StatusCode::OK
    );
    // The header wins: a bad bearer token is not rescued by a good one in the query.
    assert_eq!(
        get(
            format!("/tasks?access_token={good}"),
            Some(("authorization", "Bearer nope".into()))
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    // EventSource's way: the query parameter opens the stream.
    let mut stream = server
        .subscribe(&format!("/events?access_token={good}"))
        .await;
    publish(&server, &good, json!({"task_id": 1})).await;
    assert_eq!(stream.next_event().await.json()["task_id"], 1);
}

#[tokio::test]
async fn publish_rights_are_per_task_and_a_refusal_changes_nothing() {
    let server = auth_server(&[]).await;
    let writer = token("w", &["101", "proj-7:*"], &["*"], HOUR);
    let reader = token("r", &[], &["*"], HOUR);
    let admin = admin_token();
    publish(&server, &writer, json!({"task_id": 101})).await;
    publish(&server, &writer, json!({"task_id": "proj-7:a"})).await;
    publish(&server, &admin, json!({"task_id": 102})).await;
    let mut stream = server
        .subscribe(&format!("/events?access_token={admin}"))
        .await;
    for (bearer, method, path, body) in [
        (
            &writer,
            Method::POST,
            "/update_task",
            Some(json!({"task_id": 102, "status": "x"})),
        ),
        (
            &writer,
            Method::POST,
            "/update_task",
            Some(json!({"task_id": "proj-8:a"})),
        ),
        (&writer, Method::DELETE, "/tasks/102", None),
        (
            &reader,
            Method::POST,
            "/update_task",
            Some(json!({"task_id": 101})),
        ),
        (&reader, Method::DELETE, "/tasks/101", None),
    ] {
        let (status, headers, answer) =
            call(&server, method.clone(), path, Some(bearer), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("may not publish"),
            "{answer}"
        );
        assert!(headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
    }
    // Nothing was published: the next event on the stream is the one sent after the refusals.
    let (status, _, _) = call(
        &server,
        Method::DELETE,
        "/tasks/proj-7:a",
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let next = stream.next_event().await;
    assert_eq!(
        next.json(),
        json!({"event": "task_deleted", "task_id": "proj-7:a"})
    );
    let (_, _, task) = call(&server, Method::GET, "/tasks/102", Some(&admin), None).await;
    assert_eq!(task["version"], 1);
    assert!(task.get("status").is_none());
}

#[tokio::test]
async fn subscribe_rights_decide_what_can_be_read() {
    let server = auth_server(&[]).await;
    let admin = admin_token();
    let publisher_only = token("p", &["*"], &[], HOUR);
    let narrow = token("n", &[], &["101"], HOUR);
    publish(&server, &admin, json!({"task_id": 102})).await;
    for (bearer, path, expected) in [
        (&publisher_only, "/events", "no subscribe rights"),
        (&publisher_only, "/tasks", "no subscribe rights"),
        (&narrow, "/tasks/102", "may not subscribe to task_id 102"),
        (&narrow, "/tasks/999", "may not subscribe to task_id 999"),
        (
            &narrow,
            "/events?task_id=101,102",
            "may not subscribe to task_id 102",
        ),
    ] {
        let (status, _, answer) = call(&server, Method::GET, path, Some(bearer), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            answer["error"].as_str().unwrap().contains(expected),
            "{path}: {answer}"
        );
    }
    let (status, _, _) = call(&server, Method::GET, "/tasks/101", Some(&narrow), None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "allowed, and simply not there"
    );
    server
        .subscribe(&format!("/events?task_id=101&access_token={narrow}"))
        .await;
}

/// Task ids of the data frames up to (and including) the first event for `last`.
async fn task_ids_until(stream: &mut SseStream, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let frame: Frame = stream.next_event().await;
        let data = frame.json();
        let id = match &data["task_id"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => format!("{}:{}", data["event"].as_str().unwrap(), frame.id.unwrap()),
        };
        seen.push(id.clone());
        if id == last {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_restricted_subscriber_only_ever_sees_its_tasks_live_replayed_in_the_snapshot_and_after_a_reset(
) {
    // One tombstone kept: the two deletions before the last part make its id unplaceable.
    let server = auth_server(&["--buffer", "6", "--tombstones", "1"]).await;
    let admin = admin_token();
    let narrow = token("n", &[], &["101", "proj-7:*"], HOUR);
    let mixed = [
        json!(101),
        json!(102),
        json!("proj-7:a"),
        json!("proj-8:b"),
        json!(1010),
    ];

    // Live: the others' events published in between never show up.
    let mut live = server
        .subscribe(&format!("/events?access_token={narrow}"))
        .await;
    let mut first_id = None;
    for task_id in &mixed {
        let id = publish(&server, &admin, json!({"task_id": task_id})).await;
        first_id.get_or_insert(id);
    }
    publish(&server, &admin, json!({"task_id": "proj-7:end"})).await;
    assert_eq!(
        task_ids_until(&mut live, "proj-7:end").await,
        ["101", "proj-7:a", "proj-7:end"]
    );

    // Snapshot: only its tasks.
    let (_, _, snapshot) = call(&server, Method::GET, "/tasks", Some(&narrow), None).await;
    let ids = task_ids(&snapshot);
    assert_eq!(ids, [json!(101), json!("proj-7:a"), json!("proj-7:end")]);

    // Replay after a reconnect, by header (the browser's way) and by query.
    let first_id = first_id.unwrap();
    let mut by_header = server
        .subscribe_with(
            &format!("/events?access_token={narrow}"),
            &[("last-event-id", &first_id)],
        )
        .await;
    let mut by_query = server
        .subscribe(&format!(
            "/events?access_token={narrow}&last_event_id={first_id}"
        ))
        .await;
    publish(&server, &admin, json!({"task_id": 102})).await;
    publish(&server, &admin, json!({"task_id": 101, "status": "live"})).await;
    for stream in [&mut by_header, &mut by_query] {
        // The replay starts after 101's first event: proj-7:a and proj-7:end, then live 101.
        assert_eq!(
            task_ids_until(stream, "101").await,
            ["proj-7:a", "proj-7:end", "101"]
        );
    }

    if not_on_sqlite("the log on disk still holds the id: durable::retention_trims_the_log_in_the_background covers the reset") {
        return;
    }
    // A resume from an id that has left the buffer and is older than a dropped tombstone: `reset`,
    // then only its tasks. Enough events that Redis's approximate trimming (whole nodes of up to
    // 100 entries) drops it too. (Younger ids get a compacted catch-up: catchup.rs.)
    for task_id in ["proj-8:b", "1010"] {
        let (status, _, _) = call(
            &server,
            Method::DELETE,
            &format!("/tasks/{task_id}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(status, 202);
    }
    for task_id in mixed.iter().cycle().take(150) {
        publish(&server, &admin, json!({"task_id": task_id})).await;
    }
    let mut after_reset = server
        .subscribe_with(
            &format!("/events?access_token={narrow}"),
            &[("last-event-id", &first_id)],
        )
        .await;
    let reset = after_reset.next_event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"));
    for task_id in &mixed {
        publish(&server, &admin, json!({"task_id": task_id})).await;
    }
    publish(&server, &admin, json!({"task_id": "proj-7:end"})).await;
    assert_eq!(
        task_ids_until(&mut after_reset, "proj-7:end").await,
        ["101", "proj-7:a", "proj-7:end"]
    );
}

#[tokio::test]
async fn a_stream_ends_cleanly_when_its_token_expires_and_the_token_is_then_refused() {
    let server = auth_server(&["--keep-alive", "1"]).await;
    let short = token("ana", &["*"], &["*"], Duration::from_secs(2));
    let opened = Instant::now();
    let mut stream = server
        .subscribe(&format!("/events?access_token={short}"))
        .await;
    publish(&server, &admin_token(), json!({"task_id": 7})).await;
    assert_eq!(stream.next_event().await.json()["task_id"], 7);
    // `exp` has whole seconds, so the 2 s token expires 1 to 2 s after it was minted.
    while stream.next_frame().await.is_some() {}
    let lasted = opened.elapsed();
    assert!(
        stream.ended,
        "the body ended with its terminator, after a complete frame"
    );
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(4),
        "{lasted:?}"
    );
    let (status, _, answer) = call(&server, Method::GET, "/events", Some(&short), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(answer["error"].as_str().unwrap().contains("expired"));
    server.wait_for_metric("taskstream_subscribers", 0.0).await;
}

#[tokio::test]
async fn an_es256_public_key_verifies_tokens_and_an_hs256_token_is_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = temp_dir();
    let public = dir.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let server = TestServer::start(&["--jwt-public-key", public.to_str().unwrap()]).await;
    let signed = taskstream::auth::mint::mint(
        &taskstream::auth::mint::Mint {
            subject: "ana",
            publish: &["*".into()],
            subscribe: &["*".into()],
            ttl: HOUR,
        },
        None,
        Some(key.serialize_pem().as_bytes()),
    )
    .unwrap();
    let (status, _, _) = call(&server, Method::GET, "/tasks", Some(&signed), None).await;
    assert_eq!(status, StatusCode::OK);
    // The classic confusion: HS256 "signed" with the public key's text must not pass.
    let confused = taskstream::auth::mint::mint(
        &taskstream::auth::mint::Mint {
            subject: "eve",
            publish: &["*".into()],
            subscribe: &["*".into()],
            ttl: HOUR,
        },
        Some(&key.public_key_pem().parse().unwrap()),
        None,
    )
    .unwrap();
    let (status, _, answer) = call(&server, Method::GET, "/tasks", Some(&confused), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        answer["error"].as_str().unwrap().contains("algorithm"),
        "{answer}"
    );
}

#[tokio::test]
async fn the_token_subcommand_mints_what_the_server_accepts() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args([
            "token",
            "--sub",
            "ana",
            "--subscribe",
            "101",
            "--publish",
            "*",
            "--ttl",
            "1h",
        ])
        .env("TASKSTREAM_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let minted = String::from_utf8(output.stdout).unwrap();
    let minted = minted.trim();
    assert_eq!(minted.split('.').count(), 3, "{minted}");
    let server = auth_server(&[]).await;
    publish(&server, minted, json!({"task_id": 5})).await;
    let (status, _, _) = call(&server, Method::GET, "/tasks/101", Some(minted), None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "may read 101, which does not exist"
    );
    let (status, _, _) = call(&server, Method::GET, "/tasks/5", Some(minted), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_taskstream"))
        .args([
            "token",
            "--sub",
            "ana",
            "--subscribe",
            "a b",
            "--jwt-secret",
            "s",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a task pattern"));
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let server = auth_server(&[]).await;
    let secret_looking = admin_token();
    let response = server
        .client
        .get(server.url(&format!("/tasks?x=1&access_token={secret_looking}&y=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    publish(&server, &secret_looking, json!({"task_id": 1})).await;
    let stream = server
        .subscribe(&format!("/events?access_token={secret_looking}"))
        .await;
    drop(stream);
    server.wait_for_log("subscriber disconnected").await;
    let logs = server
        .wait_for_log("GET /events?access_token=[redacted]")
        .await;
    assert!(
        logs.contains("GET /tasks?x=1&access_token=[redacted]&y=2"),
        "{logs}"
    );
    assert!(logs.contains("sub=admin"), "{logs}");
    assert!(
        !logs.contains(&secret_looking),
        "a token in the logs:\n{logs}"
    );
    assert!(!logs.contains(SECRET));
    // Nor in a refusal.
    let (status, _, _) = call(
        &server,
        Method::GET,
        "/tasks?access_token=abc.def.ghi",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let logs = server.wait_for_log("\" 401 ").await;
    assert!(!logs.contains("abc.def.ghi"), "{logs}");
}

#[tokio::test]
async fn idempotency_keys_are_per_subject() {
    let server = auth_server(&[]).await;
    let ana = token("ana", &["*"], &["a*"], HOUR);
    let bob = token("bob", &["*"], &["b*"], HOUR);
    let post = |bearer: String, body: Value| {
        let request = server
            .client
            .post(server.url("/update_task"))
            .bearer_auth(bearer)
            .header("idempotency-key", "same-key")
            .json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let first = post(ana.clone(), json!({"task_id": "a1", "title": "ana's"})).await;
    let other = post(bob.clone(), json!({"task_id": "b1"})).await;
    assert_eq!(
        other["task"]["task_id"], "b1",
        "bob never gets ana's answer"
    );
    assert_eq!(post(ana, json!({"task_id": "a1"})).await, first);
}

/// The probe's finding: a token limited to task 101 reused a key and got task 102's content back,
/// since tokens without `sub` shared one key space and the key did not name the task.
#[tokio::test]
async fn an_idempotency_key_never_replays_an_answer_for_another_task_or_token() {
    let server = auth_server(&[]).await;
    let wide = token("", &["*"], &["*"], HOUR);
    let narrow = token("", &["101"], &["101"], HOUR);
    let post = |bearer: String, body: Value| {
        let request = server
            .client
            .post(server.url("/update_task"))
            .bearer_auth(bearer)
            .header("idempotency-key", "k-1")
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (_, secret) = post(
        wide.clone(),
        json!({"task_id": 102, "title": "secret plans"}),
    )
    .await;
    assert_eq!(secret["task"]["title"], "secret plans");
    let (status, answer) = post(narrow, json!({"task_id": 101})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        answer["task"]["task_id"], 101,
        "a new publish, not 102's answer: {answer}"
    );
    assert_ne!(answer["event_id"], secret["event_id"]);
    // The same key for another task by the same token is a new publish too; for the same task,
    // the first answer again.
    let (_, again) = post(
        wide.clone(),
        json!({"task_id": 102, "title": "secret plans"}),
    )
    .await;
    assert_eq!(again, secret);
    let (_, other_task) = post(wide, json!({"task_id": 103})).await;
    assert_eq!(other_task["task"]["task_id"], 103);
}

/// A token that may publish to a task but not read it learns the event id and the version from
/// the answer, never the task's content (REST and `/ws` alike).
#[tokio::test]
async fn a_publish_only_token_is_answered_without_the_tasks_content() {
    let server = auth_server(&[]).await;
    let admin = admin_token();
    let writer = token("writer", &["*"], &[], HOUR);
    let (status, _, _) = call(
        &server,
        Method::POST,
        "/update_task",
        Some(&admin),
        Some(json!({"task_id": 7, "title": "confidential", "data": {"k": 1}})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, answer) = call(
        &server,
        Method::POST,
        "/update_task",
        Some(&writer),
        Some(json!({"task_id": 7, "status": "done"})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["task"]["version"], 2);
    assert_eq!(answer["task"]["task_id"], 7);
    for hidden in ["title", "data", "status"] {
        assert!(
            answer["task"].get(hidden).is_none(),
            "{hidden} leaked: {answer}"
        );
    }
    let mut ws =
        crate::helpers::WsClient::connect_to(&server, &format!("/ws?access_token={writer}")).await;
    ws.send(json!({"type": "update_task", "request_id": 1, "task_id": 7}))
        .await;
    let ack = ws.json().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(ack["task"].get("title").is_none(), "{ack}");
    assert_eq!(ack["task"]["version"], 3);
}
