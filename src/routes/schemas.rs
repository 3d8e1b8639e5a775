//! Schema-only types for the OpenAPI document: the shapes the handlers write with `json!`.

use crate::task::{Task, TaskId};
use utoipa::ToSchema;

/// `POST /update_task`'s body: `task_id` plus the fields to replace.
#[allow(dead_code)] // A schema only: the body is parsed by `TaskPatch::parse`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTask {
    task_id: TaskId,
    #[schema(nullable = false, min_length = 1, max_length = 64)]
    status: Option<String>,
    #[schema(nullable = false, max_length = 256)]
    title: Option<String>,
    /// `null` unassigns.
    #[schema(value_type = Option<String>, max_length = 128)]
    assignee: Option<Option<String>>,
    /// Any JSON object, at most 16 KiB serialised; replaces the stored one whole.
    #[schema(value_type = Option<Object>, nullable = false)]
    data: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `202` from `POST /update_task`.
#[allow(dead_code)] // A schema only: the handler writes this shape with `json!`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// The id of the event this update published (`<epoch>-<seq>`).
    #[schema(pattern = "^[0-9]+-[0-9]+$")]
    event_id: String,
    task: Task,
}

/// `202` from `DELETE /tasks/{task_id}`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deleted {
    #[schema(pattern = "^[0-9]+-[0-9]+$")]
    event_id: String,
}

/// `GET /tasks`: every task the caller may see, as of `last_event_id`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// `null` before the first event; subscribe with `last_event_id=0` then.
    #[schema(pattern = "^[0-9]+-[0-9]+$")]
    last_event_id: Option<String>,
    tasks: Vec<Task>,
}

/// Every error, for every status.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What is wrong, naming the field.
    error: String,
}

#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok`, or `degraded` while the store (Redis) is unreachable (with status 503).
    #[schema(pattern = "^(ok|degraded)$")]
    status: String,
    /// Why it is degraded.
    error: Option<String>,
}
