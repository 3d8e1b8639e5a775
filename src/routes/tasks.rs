//! Task endpoints: `POST /update_task`, `GET /tasks`, `GET|DELETE /tasks/{task_id}`.

use crate::app::AppState;
use crate::backend::{idempotency_key, BackendError};
use crate::error::ApiError;
use crate::task::{TaskId, TaskPatch};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::json;

/// Larger bodies answer 413 without being read further.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub async fn update_task(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let idempotency_key = idempotency_key_header(&req)?;
    let body = read_json_body(&req, payload).await?;
    let (task_id, patch) = TaskPatch::parse(&body).map_err(|e| ApiError::BadRequest(e.0))?;
    let accepted = state
        .backend
        .update(task_id, patch, idempotency_key)
        .await?;
    Ok(HttpResponse::Accepted()
        .json(json!({ "event_id": accepted.event_id, "task": accepted.task })))
}

pub async fn list_tasks(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let snapshot = state.backend.snapshot().await?;
    Ok(HttpResponse::Ok()
        .json(json!({ "last_event_id": snapshot.last_event_id, "tasks": snapshot.tasks })))
}

pub async fn get_task(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let task_id = path_task_id(&path)?;
    match state.backend.get(&task_id).await? {
        Some(task) => Ok(HttpResponse::Ok().json(task)),
        None => Err(BackendError::NotFound(task_id).into()),
    }
}

pub async fn delete_task(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let event_id = state.backend.delete(path_task_id(&path)?).await?;
    Ok(HttpResponse::Accepted().json(json!({ "event_id": event_id })))
}

fn path_task_id(raw: &str) -> Result<TaskId, ApiError> {
    TaskId::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn idempotency_key_header(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let raw = value.to_str().unwrap_or("");
    idempotency_key(raw)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Reads at most `MAX_BODY_BYTES`, then insists on a JSON content type.
async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            PayloadError::Overflow => ApiError::PayloadTooLarge(MAX_BODY_BYTES),
            other => ApiError::BadRequest(format!("could not read the body: {other}")),
        })?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
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
