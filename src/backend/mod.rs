//! The storage seam: handlers talk to `Backend`, never to a concrete store. Methods are async
//! because a networked store answers over the network; the memory backend answers at once.

pub mod memory;

use crate::event::EventId;
use crate::hub::{Hub, Resume, SubscribeError, Subscription, TaskFilter};
use crate::task::{Task, TaskId, TaskPatch};
use std::sync::Arc;

/// A stored update: what `POST /update_task` answers (again, for a repeated Idempotency-Key).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub event_id: EventId,
    pub task: Task,
}

/// A consistent snapshot: every task as of `last_event_id` (`None` before the first event).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub last_event_id: Option<EventId>,
    pub tasks: Vec<Task>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no task with task_id {0}")]
    NotFound(TaskId),
    /// The store cannot be reached; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct InvalidIdempotencyKey;

/// Validates an idempotency key, from the HTTP header or a WebSocket message alike.
pub fn idempotency_key(raw: &str) -> Result<String, InvalidIdempotencyKey> {
    let valid = (1..=255).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| raw.to_owned()).ok_or(InvalidIdempotencyKey)
}

pub enum Backend {
    Memory(memory::MemoryBackend),
}

impl Backend {
    pub fn hub(&self) -> &Arc<Hub> {
        match self {
            Backend::Memory(memory) => memory.hub(),
        }
    }

    /// Stores the change and queues its event; never waits for subscribers. A repeated
    /// `idempotency_key` returns the first answer and publishes nothing.
    pub async fn update(
        &self,
        task_id: TaskId,
        patch: TaskPatch,
        idempotency_key: Option<String>,
    ) -> Result<Arc<Accepted>, BackendError> {
        match self {
            Backend::Memory(memory) => Ok(memory.update(task_id, patch, idempotency_key)),
        }
    }

    pub async fn delete(&self, task_id: TaskId) -> Result<EventId, BackendError> {
        match self {
            Backend::Memory(memory) => memory.delete(task_id),
        }
    }

    /// Starts a subscription for any transport: replay after `resume`, then live, no gap.
    pub async fn subscribe(
        &self,
        resume: Resume,
        filter: TaskFilter,
    ) -> Result<Subscription, SubscribeError> {
        match self {
            Backend::Memory(memory) => memory.hub().subscribe(resume, filter),
        }
    }

    pub async fn get(&self, task_id: &TaskId) -> Result<Option<Task>, BackendError> {
        match self {
            Backend::Memory(memory) => Ok(memory.get(task_id)),
        }
    }

    pub async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        match self {
            Backend::Memory(memory) => Ok(memory.snapshot()),
        }
    }
}
