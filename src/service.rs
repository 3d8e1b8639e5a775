//! The use cases every transport shares, written once: publish (rate limit, idempotency key,
//! parse, permission, store, fan-out) and subscribe (permission, filter, per-IP cap, resume).
//! Each returns a plain `Refusal` that the transport answers in its own way: an HTTP status and
//! JSON body (`error.rs`), or a WebSocket `error` message or close code (`routes/ws.rs`).

use crate::auth::{Access, Denied};
use crate::backend::{Accepted, Backend, BackendError, Snapshot};
use crate::event::EventId;
use crate::hub::{Resume, SubscribeError, Subscription};
use crate::idempotency::{IdempotencyKey, InvalidIdempotencyKey};
use crate::limits::{IpSlot, Limited, Limits};
use crate::task::{InvalidPatch, Task, TaskId, TaskPatch};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

/// Why a request is refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadInput(String),
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Limited(#[from] Limited),
    #[error(transparent)]
    Store(#[from] BackendError),
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
}

impl From<InvalidPatch> for Refusal {
    fn from(error: InvalidPatch) -> Refusal {
        Refusal::BadInput(error.0)
    }
}

impl From<InvalidIdempotencyKey> for Refusal {
    fn from(error: InvalidIdempotencyKey) -> Refusal {
        Refusal::BadInput(error.to_string())
    }
}

/// An update as a transport received it, within `--max-body-bytes` (each transport enforces the
/// limit as it reads, so it can stop reading).
pub enum PatchInput {
    /// A JSON body (`POST /update_task`).
    Json(bytes::BytesMut),
    /// The fields of a message already parsed as JSON (`/ws`).
    Fields(Map<String, Value>),
}

/// A subscription and what it holds for as long as it is open.
pub struct Open {
    pub subscription: Subscription,
    /// Its place under `--max-subscribers-per-ip`.
    pub ip_slot: Option<IpSlot>,
}

pub struct Service {
    backend: Backend,
    limits: Limits,
}

impl Service {
    pub fn new(backend: Backend, limits: Limits) -> Service {
        Service { backend, limits }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Stores one update and queues its event, in this order: the caller's rate, the key, the
    /// body (read only then, so a refused caller's body is never waited for), its size and
    /// fields, the permission, then the store. A repeated key answers the first answer.
    ///
    /// The answer shows the whole task only to a caller that may see it: a publish-only token
    /// learns the event id and the version, never the task's content.
    pub async fn publish<E: From<Refusal>>(
        &self,
        access: &Access,
        peer: Option<IpAddr>,
        idempotency_key: Option<&str>,
        body: impl Future<Output = Result<PatchInput, E>>,
    ) -> Result<Arc<Accepted>, E> {
        self.limits
            .check_publish(access.subject(), peer)
            .map_err(Refusal::from)?;
        let key = idempotency_key
            .map(IdempotencyKey::parse)
            .transpose()
            .map_err(Refusal::from)?;
        let (task_id, patch) = match body.await? {
            PatchInput::Json(body) => TaskPatch::parse(&body),
            PatchInput::Fields(fields) => TaskPatch::from_fields(fields),
        }
        .map_err(Refusal::from)?;
        access.check_publish(&task_id).map_err(Refusal::from)?;
        let key = key.map(|key| key.scoped(access, &task_id));
        let accepted = self
            .backend
            .update(task_id, patch, key)
            .await
            .map_err(Refusal::from)?;
        Ok(visible(access, &accepted))
    }

    pub async fn delete(
        &self,
        access: &Access,
        peer: Option<IpAddr>,
        task_id: TaskId,
    ) -> Result<EventId, Refusal> {
        self.limits.check_publish(access.subject(), peer)?;
        access.check_publish(&task_id)?;
        Ok(self.backend.delete(task_id).await?)
    }

    /// Opens a subscription for any transport: `ids` (empty: all) within what the token may see,
    /// replay after `resume`, then live.
    pub async fn subscribe(
        &self,
        access: &Access,
        peer: Option<IpAddr>,
        resume: Resume,
        ids: HashSet<TaskId>,
    ) -> Result<Open, Refusal> {
        let filter = access.task_filter(ids)?;
        let ip_slot = self.limits.subscriber_slot(peer)?;
        let subscription = self.backend.subscribe(resume, filter).await?;
        Ok(Open {
            subscription,
            ip_slot,
        })
    }

    /// Every task the caller may see; `last_event_id` stays the global position (resuming from
    /// it replays only this caller's tasks anyway, since the subscription filters the same way).
    pub async fn snapshot(&self, access: &Access) -> Result<Snapshot, Refusal> {
        access.check_subscribe_any()?;
        let mut snapshot = self.backend.snapshot().await?;
        snapshot.tasks.retain(|task| access.may_see(&task.task_id));
        Ok(snapshot)
    }

    pub async fn get(&self, access: &Access, task_id: TaskId) -> Result<Arc<Task>, Refusal> {
        // Refused before the lookup, so a 403 never tells whether the task exists.
        access.check_subscribe(&task_id)?;
        match self.backend.get(&task_id).await? {
            Some(task) => Ok(task),
            None => Err(BackendError::NotFound(task_id).into()),
        }
    }
}

/// The answer to a publish as `access` may see it.
fn visible(access: &Access, accepted: &Arc<Accepted>) -> Arc<Accepted> {
    let task = &accepted.task;
    if access.may_see(&task.task_id) {
        return accepted.clone();
    }
    Arc::new(Accepted {
        event_id: accepted.event_id,
        task: Arc::new(Task {
            task_id: task.task_id.clone(),
            status: None,
            title: None,
            assignee: None,
            data: None,
            version: task.version,
            updated_at: task.updated_at.clone(),
        }),
    })
}
