//! The scale-out backend: task state and the event log in one Redis shared by every node; each
//! node's one reader follows the log (a Redis Stream) and feeds its local hub.
//!
//! Keys (one hash tag, so every script's keys share a Redis Cluster slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{taskstream}:events` | stream | one entry per event: `k` (`u`pdated/`d`eleted), `t` (task id), `p` (the previous event's id), `d` (the SSE `data` JSON) |
//! | `{taskstream}:tasks` | hash | task id -> the task's JSON |
//! | `{taskstream}:head` | string | the newest event id |
//! | `{taskstream}:idempotency:<key>` | string, with a TTL | `<event id>\n<task JSON>`, the first answer |
//!
//! Each write is one Lua script, so the task, the stream entry, the head and the idempotency key
//! change together or not at all, and `GET /tasks` reads tasks and head in one script too.
//!
//! Every entry names its predecessor (`p`). Redis does not record which ids its trimming removed,
//! so without that link "the client's id was trimmed, and was the newest trimmed" (replayable) and
//! "ids after the client's were trimmed" (not) look alike; with it, a replay is gapless exactly
//! when the first entry after the client's id names that id, and the reader sees a hole the same
//! way.

mod history;
mod reader;
mod scripts;
mod store;
pub mod webhook;

use super::{Accepted, BackendError, Snapshot};
use crate::config::Config;
use crate::event::{Event, EventId};
use crate::filter::TaskFilter;
use crate::hub::{Hub, Resume, SubscribeError, Subscription};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::task::{now_rfc3339, Task, TaskId, TaskPatch};
use history::RedisHistory;
use log::{info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult, Script, Value};
use scripts::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::{event_id, first_answer, parse_id, text, unexpected, Store};

/// The keys of the compacted catch-up's index, in the order the write scripts take them.
fn index_keys(invocation: &mut redis::ScriptInvocation<'_>) {
    invocation
        .key(POSITIONS_KEY)
        .key(LATEST_KEY)
        .key(TOMBSTONES_KEY)
        .key(CATCHUP_FLOOR_KEY)
        .key(TOMBSTONE_FLOOR_KEY);
}

pub struct RedisBackend {
    store: Arc<Store>,
    hub: Arc<Hub>,
    reads: Arc<SnapshotReads>,
}

/// Concurrent `GET /tasks` on a node share one read of Redis, so a snapshot's memory does not
/// grow with its readers: a reader joins the read that has not started yet (it waits for the one
/// running), never one already running, which could miss an update acknowledged before the
/// reader arrived. At most two reads exist at once, however many readers wait.
#[derive(Default)]
struct SnapshotReads {
    /// The read the next readers join, and its number.
    next: std::sync::Mutex<Option<(u64, SharedRead)>>,
    /// Held by the running read.
    reading: Arc<tokio::sync::Mutex<()>>,
    numbers: std::sync::atomic::AtomicU64,
}

impl SnapshotReads {
    /// Read `number` has started: readers from now on wait for the next one.
    fn started(&self, number: u64) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if next.as_ref().is_some_and(|(n, _)| *n == number) {
            *next = None;
        }
    }
}

type SharedRead = futures_util::future::Shared<
    futures_util::future::BoxFuture<'static, Result<Snapshot, String>>,
>;

impl RedisBackend {
    /// Connects lazily, so a node starts (degraded) while Redis is down, and spawns the reader.
    /// Fails only on a URL that cannot be used. Must run inside the Tokio runtime.
    pub fn start(
        url: &str,
        config: &Config,
        metrics: Arc<Metrics>,
        lifecycle: &Lifecycle,
    ) -> RedisResult<RedisBackend> {
        let client = Client::open(url)?;
        // One reconnect attempt per failed command keeps a POST during an outage from waiting
        // through a long backoff: it answers 503 within about a second.
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        info!(
            "backend: redis at {} (stream capped near {} events)",
            client.get_connection_info().addr(),
            config.buffer
        );
        metrics.backend_up.set(0);
        let store = Arc::new(Store {
            client,
            conn,
            update: Script::new(&update_lua()),
            delete: Script::new(&delete_lua()),
            catch_up: Script::new(CATCH_UP_LUA),
            tombstones: config.tombstones,
            read: Script::new(READ_LUA),
            snapshot: Script::new(SNAPSHOT_LUA),
            max_len: config.buffer,
            idempotency_window_secs: config.idempotency_window,
            max_tasks: config.max_tasks,
            following: AtomicBool::new(false),
            followed: tokio::sync::Notify::new(),
            metrics: metrics.clone(),
        });
        let hub = Arc::new(Hub::with_history(
            config.buffer as usize,
            config.max_subscribers as usize,
            metrics,
            Arc::new(RedisHistory(store.clone())),
        ));
        lifecycle.spawn(
            "redis: stream reader",
            reader::follow(store.clone(), hub.clone(), lifecycle.stopping()),
        );
        Ok(RedisBackend {
            store,
            hub,
            reads: Arc::default(),
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Waits, at most `STARTUP_WAIT`, for the reader to find where the stream ends. A live
    /// subscriber that arrived before that could miss an event published meanwhile (the reader
    /// would start after it), so the node does not accept connections until then, unless Redis
    /// stays unreachable.
    pub async fn started(&self) {
        let store = &self.store;
        let following = async {
            loop {
                let notified = store.followed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if store.following.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(STARTUP_WAIT, following).await.is_err() {
            warn!("redis: unreachable at start; serving degraded (publishing answers 503) until it is reachable");
        }
    }

    /// A live subscription starts after the stream's head, not after what this node's reader has
    /// read so far: an event acknowledged before the client subscribed (on any node) is not sent
    /// to it as live. The head is read after registering, so nothing after it can be missed. If
    /// Redis does not answer quickly the subscription starts where the node is; while Redis is
    /// down nothing new can be published anyway.
    pub async fn subscribe(
        &self,
        resume: Resume,
        filter: TaskFilter,
    ) -> Result<Subscription, SubscribeError> {
        let mut subscription = self.hub.subscribe(resume, filter)?;
        if resume == Resume::Live {
            let mut conn = self.store.conn.clone();
            let mut get = redis::cmd("GET");
            get.arg(HEAD_KEY);
            let head = tokio::time::timeout(
                Duration::from_secs(1),
                get.query_async::<Option<String>>(&mut conn),
            )
            .await;
            if let Ok(Ok(Some(head))) = head {
                if let Ok(head) = head.parse() {
                    subscription.starts_after(head);
                }
            }
        }
        Ok(subscription)
    }

    /// Healthy when the reader follows the stream and Redis answers a PING.
    pub async fn health(&self) -> Result<(), String> {
        if !self.store.following.load(Ordering::Acquire) {
            return Err("not following the Redis event stream: Redis is unreachable".into());
        }
        let mut conn = self.store.conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(Duration::from_secs(1), ping.query_async::<()>(&mut conn)).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Redis does not answer: {e}")),
            Err(_) => Err("Redis does not answer: no PONG within 1 s".into()),
        }
    }

    pub async fn update(
        &self,
        task_id: TaskId,
        patch: TaskPatch,
        idempotency_key: Option<String>,
    ) -> Result<Arc<Accepted>, BackendError> {
        let store = &self.store;
        let field = task_id.to_string();
        let idempotency_key = idempotency_key.map(|key| format!("{IDEMPOTENCY_PREFIX}{key}"));
        // Optimistic: compute the new task from the stored one, and let the script apply it only
        // if the stored one is still the same. The patch logic stays in Rust (one implementation
        // for both backends) and the event JSON is byte-for-byte the memory backend's.
        for _ in 0..MAX_ATTEMPTS {
            let mut conn = store.conn.clone();
            let stored: Option<Vec<u8>> = store
                .write(
                    redis::cmd("HGET")
                        .arg(TASKS_KEY)
                        .arg(&field)
                        .query_async(&mut conn),
                )
                .await?;
            let previous = stored
                .as_deref()
                .map(Task::from_stored)
                .transpose()
                .map_err(|e| BackendError::Unavailable(format!("task {task_id}: {e}")))?;
            let task = Arc::new(patch.clone().apply(
                task_id.clone(),
                previous.as_ref(),
                now_rfc3339(),
            ));
            // A `Task` holds only strings, integers and a JSON map: serialising it cannot fail.
            let task_json = serde_json::to_vec(&*task).expect("a task always serialises");
            let mut invocation = store.update.prepare_invoke();
            invocation.key(STREAM_KEY).key(TASKS_KEY).key(HEAD_KEY);
            index_keys(&mut invocation);
            if let Some(key) = &idempotency_key {
                invocation.key(key);
            }
            invocation
                .arg(&field)
                .arg(stored.as_deref().unwrap_or_default())
                .arg(&task_json)
                .arg(Event::updated_data(&task))
                .arg(store.max_len)
                .arg(store.idempotency_window_secs)
                .arg(store.tombstones)
                .arg(store.max_tasks);
            let reply: Vec<Value> = store.write(invocation.invoke_async(&mut conn)).await?;
            match (text(reply.first()), reply.get(1)) {
                (Some(b"ok"), id) => {
                    store.metrics.events_published.inc();
                    return Ok(Arc::new(Accepted {
                        event_id: event_id(id)?,
                        task,
                    }));
                }
                (Some(b"again"), first) => return first_answer(first).map(Arc::new),
                (Some(b"conflict"), _) => continue,
                (Some(b"full"), _) => return Err(BackendError::Full(store.max_tasks)),
                _ => return Err(unexpected("the update script", &reply)),
            }
        }
        Err(BackendError::Unavailable(format!(
            "task {task_id} changed {MAX_ATTEMPTS} times while this update was being applied; retry"
        )))
    }

    pub async fn delete(&self, task_id: TaskId) -> Result<EventId, BackendError> {
        let store = &self.store;
        let mut conn = store.conn.clone();
        let mut invocation = store.delete.prepare_invoke();
        invocation.key(STREAM_KEY).key(TASKS_KEY).key(HEAD_KEY);
        index_keys(&mut invocation);
        invocation
            .arg(task_id.to_string())
            .arg(Event::deleted_data(&task_id))
            .arg(store.max_len)
            .arg(store.tombstones);
        let reply: Vec<Value> = store.write(invocation.invoke_async(&mut conn)).await?;
        match text(reply.first()) {
            Some(b"ok") => {
                store.metrics.events_published.inc();
                event_id(reply.get(1))
            }
            Some(b"missing") => Err(BackendError::NotFound(task_id)),
            _ => Err(unexpected("the delete script", &reply)),
        }
    }

    pub async fn get(&self, task_id: &TaskId) -> Result<Option<Arc<Task>>, BackendError> {
        let mut conn = self.store.conn.clone();
        let stored: Option<Vec<u8>> = self
            .store
            .read(
                redis::cmd("HGET")
                    .arg(TASKS_KEY)
                    .arg(task_id.to_string())
                    .query_async(&mut conn),
            )
            .await?;
        stored
            .as_deref()
            .map(|json| Task::from_stored(json).map(Arc::new))
            .transpose()
            .map_err(|e| BackendError::Unavailable(format!("task {task_id}: {e}")))
    }

    pub async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        use futures_util::FutureExt;
        let read = {
            // Each critical section is one take or put of the slot: a panic cannot break it.
            let mut next = self.reads.next.lock().unwrap_or_else(|p| p.into_inner());
            match &*next {
                Some((_, read)) => read.clone(),
                None => {
                    let number = self.reads.numbers.fetch_add(1, Ordering::Relaxed);
                    let (store, reads) = (self.store.clone(), self.reads.clone());
                    let read = async move {
                        let _reading = reads.reading.clone().lock_owned().await;
                        reads.started(number);
                        read_snapshot(&store).await.map_err(|e| e.to_string())
                    }
                    .boxed()
                    .shared();
                    *next = Some((number, read.clone()));
                    read
                }
            }
        };
        read.await.map_err(BackendError::Unavailable)
    }
}

/// Tasks and head, read together in one script.
async fn read_snapshot(store: &Store) -> Result<Snapshot, BackendError> {
    let mut conn = store.conn.clone();
    let reply: Vec<Value> = store
        .read(
            store
                .snapshot
                .key(TASKS_KEY)
                .key(HEAD_KEY)
                .invoke_async(&mut conn),
        )
        .await?;
    let (Some(head), Some(Value::Array(pairs))) = (text(reply.first()), reply.get(1)) else {
        return Err(unexpected("the snapshot script", &reply));
    };
    let last_event_id = match head {
        b"" => None,
        id => Some(parse_id(id).ok_or_else(|| unexpected("the head", &reply))?),
    };
    let mut tasks = pairs
        .chunks(2)
        .map(|pair| {
            let json = text(pair.get(1)).unwrap_or_default();
            Task::from_stored(json)
                .map(Arc::new)
                .map_err(|e| BackendError::Unavailable(e.to_string()))
        })
        .collect::<Result<Vec<_>, BackendError>>()?;
    tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    Ok(Snapshot {
        last_event_id,
        tasks,
    })
}
