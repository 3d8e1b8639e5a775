//! Task endpoints: `POST /update_task`, `GET /tasks`, `GET|DELETE /tasks/{task_id}`.

use crate::auth::Access;
use crate::backend::Snapshot;
use crate::error::ApiError;
use crate::middleware::peer_ip;
use crate::service::PatchInput;
use crate::state::AppState;
use crate::task::TaskId;
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;

#[utoipa::path(
    post, path = "/update_task", tag = "tasks",
    description = "Creates or updates one task; the fields given replace the stored ones. Answers as soon as the change is stored and its event queued.",
    request_body(content = crate::routes::schemas::UpdateTask, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
            description = "1 to 255 visible ASCII characters; a key accepted within --idempotency-window gets the first answer again and publishes nothing")),
    responses(
        (status = 202, description = "stored and queued", body = crate::routes::schemas::Accepted),
        (status = 400, description = "invalid body or Idempotency-Key", body = crate::routes::schemas::ErrorBody),
        (status = 408, description = "the body did not arrive within --request-timeout", body = crate::routes::schemas::ErrorBody),
        (status = 413, description = "body over --max-body-bytes", body = crate::routes::schemas::ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = crate::routes::schemas::ErrorBody),
        (status = 429, description = "over --publish-rate", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
        (status = 503, description = "the store is unavailable; nothing was changed", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
        (status = 507, description = "a new task while the store holds --max-tasks; updates to existing tasks still pass", body = crate::routes::schemas::ErrorBody),
    )
)]
pub async fn update_task(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let limits = state.service.limits();
    let body = async {
        let body = tokio::time::timeout(
            limits.body_timeout,
            read_json_body(&req, payload, limits.max_body_bytes),
        )
        .await
        .map_err(|_| ApiError::RequestTimeout(limits.body_timeout.as_secs()))??;
        Ok::<_, ApiError>(PatchInput::Json(body))
    };
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|value| value.to_str().unwrap_or(""));
    let accepted = state
        .service
        .publish(&access, peer_ip(&req), key, body)
        .await?;
    Ok(HttpResponse::Accepted()
        .json(json!({ "event_id": accepted.event_id, "task": &*accepted.task })))
}

#[utoipa::path(
    get, path = "/tasks", tag = "tasks",
    description = "A snapshot of every task the caller may see, and the id of the last event it includes. Streamed (chunked) from the store's shared task values.",
    responses(
        (status = 200, description = "the snapshot", body = crate::routes::schemas::Snapshot),
        (status = 503, description = "the store is unavailable", body = crate::routes::schemas::ErrorBody),
    )
)]
pub async fn list_tasks(
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let snapshot = state.service.snapshot(&access).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .streaming(snapshot_body(snapshot)))
}

/// Bytes of JSON written per piece of a snapshot's answer (a piece ends after the task that
/// crosses it).
const SNAPSHOT_PIECE: usize = 32 * 1024;

/// `{"last_event_id": ID, "tasks": [TASK, ...]}`, written a piece at a time as the connection
/// drains: a reader holds one piece, never the whole answer (78 MiB for 5,000 tasks of 16 KiB),
/// and the tasks themselves are the store's shared values, so concurrent snapshots cost about
/// nothing each beyond their socket buffers.
fn snapshot_body(
    snapshot: Snapshot,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + 'static {
    let Snapshot {
        last_event_id,
        tasks,
    } = snapshot;
    // An `EventId` serialises as a string, or `null`: this cannot fail.
    let head = format!(
        r#"{{"last_event_id":{},"tasks":["#,
        serde_json::to_string(&last_event_id).expect("an id serialises")
    );
    futures_util::stream::unfold(
        (Some(head), tasks.into_iter().enumerate(), false),
        |(head, mut tasks, done)| async move {
            if done {
                return None;
            }
            let mut piece = head.map(String::into_bytes).unwrap_or_default();
            let mut ended = true;
            for (index, task) in tasks.by_ref() {
                if index > 0 {
                    piece.push(b',');
                }
                // A `Task` holds only strings, integers and a JSON map: serialising it cannot fail.
                serde_json::to_writer(&mut piece, &*task).expect("a task always serialises");
                if piece.len() >= SNAPSHOT_PIECE {
                    ended = false;
                    break;
                }
            }
            if ended {
                piece.extend_from_slice(b"]}");
            }
            Some((Ok(Bytes::from(piece)), (None, tasks, ended)))
        },
    )
}

#[utoipa::path(
    get, path = "/tasks/{task_id}", tag = "tasks",
    params(("task_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$", description = "the task id")),
    responses(
        (status = 200, description = "the task", body = crate::task::Task),
        (status = 400, description = "not a valid task id", body = crate::routes::schemas::ErrorBody),
        (status = 404, description = "no such task", body = crate::routes::schemas::ErrorBody),
        (status = 503, description = "the store is unavailable", body = crate::routes::schemas::ErrorBody),
    )
)]
pub async fn get_task(
    path: web::Path<String>,
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let task = state.service.get(&access, path_task_id(&path)?).await?;
    Ok(HttpResponse::Ok().json(&*task))
}

#[utoipa::path(
    delete, path = "/tasks/{task_id}", tag = "tasks",
    description = "Removes the task and publishes task_deleted.",
    params(("task_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$", description = "the task id")),
    responses(
        (status = 202, description = "removed; task_deleted queued", body = crate::routes::schemas::Deleted),
        (status = 400, description = "not a valid task id", body = crate::routes::schemas::ErrorBody),
        (status = 404, description = "no such task", body = crate::routes::schemas::ErrorBody),
        (status = 429, description = "over --publish-rate", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
        (status = 503, description = "the store is unavailable; nothing was changed", body = crate::routes::schemas::ErrorBody,
         headers(("Retry-After" = u64, description = "whole seconds"))),
    )
)]
pub async fn delete_task(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    access: Access,
) -> Result<HttpResponse, ApiError> {
    let task_id = path_task_id(&path)?;
    let event_id = state
        .service
        .delete(&access, peer_ip(&req), task_id)
        .await?;
    Ok(HttpResponse::Accepted().json(json!({ "event_id": event_id })))
}

fn path_task_id(raw: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Reads at most `max` bytes, then insists on a JSON content type.
async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(ApiError::PayloadTooLarge(max));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            PayloadError::Overflow => ApiError::PayloadTooLarge(max),
            other => ApiError::BadRequest(format!("could not read the body: {other}")),
        })?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "body is empty; expected a JSON object with task_id".into(),
        ));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let is_json = content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType(
            content_type.unwrap_or("none").chars().take(100).collect(),
        ));
    }
    Ok(body)
}
