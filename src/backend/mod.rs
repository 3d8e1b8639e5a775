//! The storage seam: handlers talk to `Backend`, never to a concrete store. Methods are async
//! because a networked store answers over the network; the memory backend answers at once.

pub mod memory;
pub mod redis;
pub mod sqlite;

use crate::event::EventId;
use crate::filter::TaskFilter;
use crate::hub::{Hub, Resume, SubscribeError, Subscription};
use crate::task::{Task, TaskId, TaskPatch};
use std::sync::Arc;

/// A stored update: what `POST /update_task` answers (again, for a repeated Idempotency-Key).
/// The task is the store's own value, shared: an answer (and a remembered key) costs a pointer
/// for as long as that version is the current one.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub event_id: EventId,
    pub task: Arc<Task>,
}

/// A consistent snapshot: every task as of `last_event_id` (`None` before the first event). The
/// tasks are the store's immutable values, shared: a snapshot costs a pointer per task however
/// many readers take one at once.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub last_event_id: Option<EventId>,
    pub tasks: Vec<Arc<Task>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no task with task_id {0}")]
    NotFound(TaskId),
    /// The store cannot be reached; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// A new task past `--max-tasks`; updates to existing tasks still pass.
    #[error("the store holds its limit of {0} tasks (--max-tasks): a new task is refused until one is deleted; existing tasks can still be updated")]
    Full(u64),
}

pub enum Backend {
    Memory(memory::MemoryBackend),
    /// `--redis-url`: many nodes share one Redis.
    Redis(redis::RedisBackend),
    /// `--data-dir`: one durable node on SQLite.
    Sqlite(sqlite::SqliteBackend),
}

impl Backend {
    pub fn hub(&self) -> &Arc<Hub> {
        match self {
            Backend::Memory(memory) => memory.hub(),
            Backend::Redis(redis) => redis.hub(),
            Backend::Sqlite(sqlite) => sqlite.hub(),
        }
    }

    /// `Err` names what is wrong when the store cannot serve (for `/healthz`).
    pub async fn health(&self) -> Result<(), String> {
        match self {
            Backend::Memory(_) => Ok(()),
            Backend::Redis(redis) => redis.health().await,
            Backend::Sqlite(sqlite) => sqlite.health().await,
        }
    }

    /// Before serving: waits (bounded) until the backend can tell where live events start.
    pub async fn started(&self) {
        match self {
            Backend::Memory(_) => {}
            Backend::Redis(redis) => redis.started().await,
            // The ring is anchored at the newest stored event as the database opens.
            Backend::Sqlite(_) => {}
        }
    }

    /// At shutdown, after the server has stopped taking requests: a store with threads of its
    /// own (the durable store's writer) finishes what is queued and joins them.
    pub async fn stopped(&self) {
        match self {
            Backend::Memory(_) | Backend::Redis(_) => {}
            Backend::Sqlite(sqlite) => sqlite.stopped().await,
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
            Backend::Memory(memory) => memory.update(task_id, patch, idempotency_key),
            Backend::Redis(redis) => redis.update(task_id, patch, idempotency_key).await,
            Backend::Sqlite(sqlite) => sqlite.update(task_id, patch, idempotency_key).await,
        }
    }

    pub async fn delete(&self, task_id: TaskId) -> Result<EventId, BackendError> {
        match self {
            Backend::Memory(memory) => memory.delete(task_id),
            Backend::Redis(redis) => redis.delete(task_id).await,
            Backend::Sqlite(sqlite) => sqlite.delete(task_id).await,
        }
    }

    /// Starts a subscription for any transport: replay after `resume`, then live, no gap. On
    /// Redis a replay older than the node's ring is read from the stream as the subscription is
    /// first polled (the hub's history); a live one reads the stream's head first (at most 1 s).
    pub async fn subscribe(
        &self,
        resume: Resume,
        filter: TaskFilter,
    ) -> Result<Subscription, SubscribeError> {
        match self {
            Backend::Memory(memory) => memory.hub().subscribe(resume, filter),
            Backend::Redis(redis) => redis.subscribe(resume, filter).await,
            Backend::Sqlite(sqlite) => sqlite.subscribe(resume, filter),
        }
    }

    // --- webhook positions (src/webhook/) ---
    /// Whether a webhook position outlives the process (`--data-dir`); in memory it does not.
    pub fn keeps_webhook_positions(&self) -> bool {
        matches!(self, Backend::Sqlite(_) | Backend::Redis(_))
    }

    /// On Redis, the webhook's consumer group (and lease) instead of a stored position.
    pub fn webhook_group(
        &self,
        key: &str,
        lease: std::time::Duration,
    ) -> Option<redis::webhook::WebhookGroup> {
        match self {
            Backend::Redis(redis) => Some(redis.webhook_group(key, lease)),
            Backend::Memory(_) | Backend::Sqlite(_) => None,
        }
    }

    /// The stored position of the webhook worker `key`: every event up to it is finished.
    pub async fn webhook_position(&self, key: &str) -> Result<Option<EventId>, BackendError> {
        match self {
            Backend::Memory(_) | Backend::Redis(_) => Ok(None),
            Backend::Sqlite(sqlite) => sqlite.webhook_position(key).await,
        }
    }

    pub async fn save_webhook_position(
        &self,
        key: &str,
        position: EventId,
    ) -> Result<(), BackendError> {
        match self {
            Backend::Memory(_) | Backend::Redis(_) => Ok(()),
            Backend::Sqlite(sqlite) => sqlite.save_webhook_position(key, position).await,
        }
    }
    // --- end of webhook positions ---

    pub async fn get(&self, task_id: &TaskId) -> Result<Option<Arc<Task>>, BackendError> {
        match self {
            Backend::Memory(memory) => Ok(memory.get(task_id)),
            Backend::Redis(redis) => redis.get(task_id).await,
            Backend::Sqlite(sqlite) => Ok(sqlite.get(task_id)),
        }
    }

    pub async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        match self {
            Backend::Memory(memory) => Ok(memory.snapshot()),
            Backend::Redis(redis) => redis.snapshot().await,
            Backend::Sqlite(sqlite) => Ok(sqlite.snapshot()),
        }
    }
}
