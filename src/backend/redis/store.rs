//! The connection every request, replay and the reader share, its timeouts, and the parsing of
//! Redis's answers.

use super::scripts::COMMAND_TIMEOUT;
use crate::backend::{Accepted, BackendError};
use crate::event::EventId;
use crate::metrics::Metrics;
use crate::task::Task;
use log::error;
use redis::aio::ConnectionManager;
use redis::{Client, RedisResult, Script, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What requests, replays and the reader share: one client and one multiplexed connection (the
/// `ConnectionManager` reconnects by itself) per process, never one per request.
pub(super) struct Store {
    pub(super) client: Client,
    pub(super) conn: ConnectionManager,
    pub(super) update: Script,
    pub(super) delete: Script,
    pub(super) read: Script,
    pub(super) snapshot: Script,
    pub(super) catch_up: Script,
    /// `--tombstones`: deletions the index keeps.
    pub(super) tombstones: u64,
    pub(super) max_len: u32,
    pub(super) idempotency_window_secs: u64,
    /// `--max-tasks`, checked against the cluster's count inside the update script.
    pub(super) max_tasks: u64,
    /// Whether the reader is connected and following the stream.
    pub(super) following: AtomicBool,
    /// Notified when the reader starts following.
    pub(super) followed: tokio::sync::Notify,
    pub(super) metrics: Arc<Metrics>,
}

impl Store {
    /// Runs a write within `COMMAND_TIMEOUT`; a failure becomes a 503 that says the change was
    /// not acknowledged (it may or may not have been applied if the answer was lost on the way).
    pub(super) async fn write<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.within_timeout(command).await.map_err(|e| {
            BackendError::Unavailable(format!(
                "the change was not stored: Redis did not confirm it ({e}); retry (with an Idempotency-Key a retry cannot apply it twice)"
            ))
        })
    }

    pub(super) async fn read<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.within_timeout(command)
            .await
            .map_err(|e| BackendError::Unavailable(format!("Redis is unreachable: {e}")))
    }

    pub(super) async fn within_timeout<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
        }
    }

    /// After an outage the `ConnectionManager` hands out its last failed reconnect once more
    /// before it tries again; a PING takes that failure (and starts the reconnect) instead of the
    /// next request, and a second one waits for the fresh connection.
    pub(super) async fn wake_shared_connection(&self) {
        for _ in 0..2 {
            let mut conn = self.conn.clone();
            let ping = redis::cmd("PING");
            let answer = self.within_timeout(ping.query_async::<()>(&mut conn)).await;
            if answer.is_ok() {
                return;
            }
        }
    }

    /// Marks the reader connected or not; answers whether that changed.
    pub(super) fn set_following(&self, following: bool) -> bool {
        self.metrics.backend_up.set(following.into());
        let changed = self.following.swap(following, Ordering::AcqRel) != following;
        if following {
            self.followed.notify_waiters();
        }
        changed
    }
}

/// The stored first answer of an Idempotency-Key: `<event id>\n<task JSON>`.
pub(super) fn first_answer(value: Option<&Value>) -> Result<Accepted, BackendError> {
    let stored = text(value).unwrap_or_default();
    let (id, task) = stored
        .iter()
        .position(|&b| b == b'\n')
        .map(|at| (&stored[..at], &stored[at + 1..]))
        .ok_or_else(|| BackendError::Unavailable("a stored idempotent answer is damaged".into()))?;
    Ok(Accepted {
        event_id: parse_id(id).ok_or_else(|| {
            BackendError::Unavailable("a stored idempotent answer is damaged".into())
        })?,
        task: Task::from_stored(task)
            .map(Arc::new)
            .map_err(|e| BackendError::Unavailable(e.to_string()))?,
    })
}

pub(super) fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn parse_id(bytes: &[u8]) -> Option<EventId> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

pub(super) fn event_id(value: Option<&Value>) -> Result<EventId, BackendError> {
    text(value).and_then(parse_id).ok_or_else(|| {
        BackendError::Unavailable("Redis answered an event id that is not one".into())
    })
}

pub(super) fn unexpected(what: &str, reply: &[Value]) -> BackendError {
    error!("redis: {what} answered {reply:?}");
    BackendError::Unavailable(format!("{what} answered something unexpected"))
}

/// Exponential backoff from 50 ms to 2 s between attempts to reach Redis.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    pub(super) fn new() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    pub(super) async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Backoff::MAX);
    }
}
