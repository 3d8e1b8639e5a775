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

use super::{Accepted, BackendError, Snapshot};
use crate::config::Config;
use crate::event::{Event, EventId, EventKind};
use crate::hub::{Backfill, History, Hub, Resume, SubscribeError, Subscription, TaskFilter};
use crate::metrics::Metrics;
use crate::ring::ResetReason;
use crate::task::{now_rfc3339, Task, TaskId, TaskPatch};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use log::{debug, error, info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, Script, Value};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

const STREAM_KEY: &str = "{taskstream}:events";
const TASKS_KEY: &str = "{taskstream}:tasks";
const HEAD_KEY: &str = "{taskstream}:head";
const IDEMPOTENCY_PREFIX: &str = "{taskstream}:idempotency:";

/// A request never waits longer than this for Redis: past it, it answers 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one `XREAD` waits for new entries; also how soon a silently dead connection shows.
const BLOCK: Duration = Duration::from_secs(2);
/// Entries per `XREAD` or replay page: bounds the memory one read holds (entries are < 17 KiB).
const PAGE: usize = 256;
/// Optimistic updates of one task retried at most this often before answering 503.
const MAX_ATTEMPTS: usize = 32;
/// How long a starting node waits for its reader to find the stream's head before it accepts
/// connections anyway (degraded).
const STARTUP_WAIT: Duration = Duration::from_secs(3);

/// Appends an update: `{'ok', id}`, `{'again', first answer}` for a used Idempotency-Key, or
/// `{'conflict'}` when the task changed since the caller read it (the caller reads and retries).
/// KEYS: stream, tasks, head[, idempotency key]. ARGV: task id, the stored task JSON the update
/// was computed from ('' for none), the new task JSON, the event data, MAXLEN, key TTL.
const UPDATE_LUA: &str = r"
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then return {'again', first} end
end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[2] then return {'conflict'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'k', 'u', 't', ARGV[1], 'p', prev, 'd', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], id)
if KEYS[4] then redis.call('SET', KEYS[4], id .. '\n' .. ARGV[3], 'NX', 'EX', ARGV[6]) end
return {'ok', id}
";

/// Removes a task and appends its `task_deleted`: `{'ok', id}` or `{'missing'}`.
/// KEYS: stream, tasks, head. ARGV: task id, the event data, MAXLEN.
const DELETE_LUA: &str = r"
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {'missing'} end
local prev = redis.call('GET', KEYS[3]) or '0-0'
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
  'k', 'd', 't', ARGV[1], 'p', prev, 'd', ARGV[2])
redis.call('SET', KEYS[3], id)
return {'ok', id}
";

/// `{newest id, entries after ARGV[1]}`, read together. KEYS: stream, head. ARGV: id, COUNT.
const READ_LUA: &str = r"
return {redis.call('GET', KEYS[2]) or '0-0',
        redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
";

/// `{newest id or '', [task id, task JSON, ...]}`, read together. KEYS: tasks, head.
const SNAPSHOT_LUA: &str = r"
return {redis.call('GET', KEYS[2]) or '', redis.call('HGETALL', KEYS[1])}
";

pub struct RedisBackend {
    store: Arc<Store>,
    hub: Arc<Hub>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// What requests, replays and the reader share: one client and one multiplexed connection (the
/// `ConnectionManager` reconnects by itself) per process, never one per request.
struct Store {
    client: Client,
    conn: ConnectionManager,
    update: Script,
    delete: Script,
    read: Script,
    snapshot: Script,
    max_len: u32,
    idempotency_window_secs: u64,
    /// Whether the reader is connected and following the stream.
    following: AtomicBool,
    /// Notified when the reader starts following.
    followed: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

impl RedisBackend {
    /// Connects lazily, so a node starts (degraded) while Redis is down, and spawns the reader.
    /// Fails only on a URL that cannot be used. Must run inside the Tokio runtime.
    pub fn start(url: &str, config: &Config, metrics: Arc<Metrics>) -> RedisResult<RedisBackend> {
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
            update: Script::new(UPDATE_LUA),
            delete: Script::new(DELETE_LUA),
            read: Script::new(READ_LUA),
            snapshot: Script::new(SNAPSHOT_LUA),
            max_len: config.buffer,
            idempotency_window_secs: config.idempotency_window,
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
        let reader = tokio::spawn(follow(store.clone(), hub.clone()));
        Ok(RedisBackend {
            store,
            hub,
            reader: Mutex::new(Some(reader)),
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

    /// Waits (briefly) for the reader to end; it ends when the hub closes.
    pub async fn stopped(&self) {
        // The lock is only held to take the handle; a poisoned one still holds it.
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(reader) = reader {
            if tokio::time::timeout(Duration::from_secs(2), reader)
                .await
                .is_err()
            {
                warn!("redis: the stream reader did not stop in time");
            }
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
            let task = patch
                .clone()
                .apply(task_id.clone(), previous.as_ref(), now_rfc3339());
            // A `Task` holds only strings, integers and a JSON map: serialising it cannot fail.
            let task_json = serde_json::to_vec(&task).expect("a task always serialises");
            let mut invocation = store.update.prepare_invoke();
            invocation.key(STREAM_KEY).key(TASKS_KEY).key(HEAD_KEY);
            if let Some(key) = &idempotency_key {
                invocation.key(key);
            }
            invocation
                .arg(&field)
                .arg(stored.as_deref().unwrap_or_default())
                .arg(&task_json)
                .arg(Event::updated_data(&task))
                .arg(store.max_len)
                .arg(store.idempotency_window_secs);
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
        let reply: Vec<Value> = store
            .write(
                store
                    .delete
                    .key(STREAM_KEY)
                    .key(TASKS_KEY)
                    .key(HEAD_KEY)
                    .arg(task_id.to_string())
                    .arg(Event::deleted_data(&task_id))
                    .arg(store.max_len)
                    .invoke_async(&mut conn),
            )
            .await?;
        match text(reply.first()) {
            Some(b"ok") => {
                store.metrics.events_published.inc();
                event_id(reply.get(1))
            }
            Some(b"missing") => Err(BackendError::NotFound(task_id)),
            _ => Err(unexpected("the delete script", &reply)),
        }
    }

    pub async fn get(&self, task_id: &TaskId) -> Result<Option<Task>, BackendError> {
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
            .map(Task::from_stored)
            .transpose()
            .map_err(|e| BackendError::Unavailable(format!("task {task_id}: {e}")))
    }

    pub async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        let store = &self.store;
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
                Task::from_stored(json).map_err(|e| BackendError::Unavailable(e.to_string()))
            })
            .collect::<Result<Vec<Task>, BackendError>>()?;
        tasks.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(Snapshot {
            last_event_id,
            tasks,
        })
    }
}

impl Store {
    /// Runs a write within `COMMAND_TIMEOUT`; a failure becomes a 503 that says the change was
    /// not acknowledged (it may or may not have been applied if the answer was lost on the way).
    async fn write<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.within_timeout(command).await.map_err(|e| {
            BackendError::Unavailable(format!(
                "the change was not stored: Redis did not confirm it ({e}); retry (with an Idempotency-Key a retry cannot apply it twice)"
            ))
        })
    }

    async fn read<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.within_timeout(command)
            .await
            .map_err(|e| BackendError::Unavailable(format!("Redis is unreachable: {e}")))
    }

    async fn within_timeout<T>(
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
    async fn wake_shared_connection(&self) {
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
    fn set_following(&self, following: bool) -> bool {
        self.metrics.backend_up.set(following.into());
        let changed = self.following.swap(following, Ordering::AcqRel) != following;
        if following {
            self.followed.notify_waiters();
        }
        changed
    }

    /// One page of the stream after `after`, with the newest id read in the same script.
    async fn read_page(&self, after: EventId) -> Result<(EventId, Vec<Entry>), String> {
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .within_timeout(
                self.read
                    .key(STREAM_KEY)
                    .key(HEAD_KEY)
                    .arg(after.to_string())
                    .arg(PAGE)
                    .invoke_async(&mut conn),
            )
            .await?;
        let newest = text(reply.first())
            .and_then(parse_id)
            .ok_or("the read script answered no head")?;
        Ok((newest, entries(reply.get(1))))
    }

    /// Every event after `after` (page by page, each page checked to continue the last), or the
    /// reset the client needs. Retries while Redis is unreachable: the stream stays open and
    /// resumes when Redis is back.
    async fn replay_after(&self, after: EventId) -> Backfill {
        let mut backoff = Backoff::new();
        let mut events = Vec::new();
        let mut cursor = after;
        loop {
            if cursor == EventId::MAX {
                // Beyond every id Redis can issue, and XRANGE refuses to read after it.
                return Backfill::Reset {
                    newest: self.newest_retrying().await,
                    reason: ResetReason::Unknown,
                };
            }
            let (newest, page) = match self.read_page(cursor).await {
                Ok(answer) => answer,
                Err(e) => {
                    debug!("redis: replay after {cursor} failed ({e}); retrying");
                    backoff.sleep().await;
                    continue;
                }
            };
            if let Err(reason) = continues(cursor, newest, page.first()) {
                // Also when a later page no longer continues the previous one (trimmed
                // meanwhile): the events already read would leave a hole.
                return Backfill::Reset { newest, reason };
            }
            let full = page.len() == PAGE;
            if let Some(last) = page.last() {
                cursor = last.id;
            }
            events.extend(page.into_iter().filter_map(|entry| entry.event));
            if !full {
                return Backfill::Events {
                    events,
                    through: cursor,
                };
            }
        }
    }

    async fn newest_retrying(&self) -> EventId {
        let mut backoff = Backoff::new();
        loop {
            let mut conn = self.conn.clone();
            let head = self
                .within_timeout(
                    redis::cmd("GET")
                        .arg(HEAD_KEY)
                        .query_async::<Option<String>>(&mut conn),
                )
                .await;
            match head {
                Ok(head) => {
                    return head
                        .and_then(|id| id.parse().ok())
                        .unwrap_or(EventId::START)
                }
                Err(e) => {
                    debug!("redis: reading the newest id failed ({e}); retrying");
                    backoff.sleep().await;
                }
            }
        }
    }
}

/// The stream as the hub's history.
struct RedisHistory(Arc<Store>);

impl History for RedisHistory {
    fn after(&self, after: EventId) -> BoxFuture<'static, Backfill> {
        let store = self.0.clone();
        async move { store.replay_after(after).await }.boxed()
    }

    fn newest(&self) -> BoxFuture<'static, EventId> {
        let store = self.0.clone();
        async move { store.newest_retrying().await }.boxed()
    }
}

/// Whether the stream continues right after `after`: `first` is the first entry after it (if
/// any) and `newest` the stream's newest id.
fn continues(after: EventId, newest: EventId, first: Option<&Entry>) -> Result<(), ResetReason> {
    match first {
        None if after == newest => Ok(()),
        // Nothing after it, yet it is not the newest: from the future, or another stream.
        None => Err(ResetReason::Unknown),
        Some(first) if first.prev == after => Ok(()),
        // The entry before the first one left is newer than `after`: events after `after` were
        // trimmed.
        Some(first) if after < first.prev => Err(ResetReason::TooOld),
        // `after` falls between two consecutive entries: never issued here.
        Some(_) => Err(ResetReason::Unknown),
    }
}

/// The node's one reader: follows the stream from where it started, publishes each entry to the
/// hub in stream order, and reconnects with backoff, continuing from the last id it read. Ends
/// when the hub closes.
async fn follow(store: Arc<Store>, hub: Arc<Hub>) {
    let closed = hub.closed();
    tokio::pin!(closed);
    let mut last = None;
    let mut backoff = Backoff::new();
    loop {
        let error = tokio::select! {
            () = &mut closed => break,
            error = follow_once(&store, &hub, &mut last, &mut backoff) => error,
        };
        if store.set_following(false) {
            warn!("redis: lost the event stream ({error}); reconnecting with backoff, streams stay open");
        } else {
            debug!("redis: still unreachable ({error})");
        }
        tokio::select! {
            () = &mut closed => break,
            () = backoff.sleep() => {}
        }
    }
    store.set_following(false);
    info!("redis: stream reader stopped");
}

/// Connects and follows until an error, which it returns.
async fn follow_once(
    store: &Store,
    hub: &Hub,
    last: &mut Option<EventId>,
    backoff: &mut Backoff,
) -> RedisError {
    // Its own connection: a blocking XREAD would hold up every command queued behind it on the
    // shared multiplexed one.
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(2)));
    let mut conn = match store
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(conn) => conn,
        Err(e) => return e,
    };
    // Named, so `CLIENT LIST` shows which node each reader belongs to.
    let name = format!("taskstream-reader-{}", std::process::id());
    if let Err(e) = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut conn)
        .await
    {
        return e;
    }
    let head: Option<String> = match redis::cmd("GET").arg(HEAD_KEY).query_async(&mut conn).await {
        Ok(head) => head,
        Err(e) => return e,
    };
    let head = head
        .and_then(|id| id.parse().ok())
        .unwrap_or(EventId::START);
    let mut cursor = match *last {
        // The first connection: this node's ring starts here.
        None => {
            hub.restart_at(head, false);
            head
        }
        Some(seen) if head < seen => {
            error!("redis: the event stream now ends at {head}, before {seen} which this node already delivered: Redis lost events (restarted without persistence, or failed over to a replica that was behind); streams past it get a reset");
            hub.restart_at(head, true);
            head
        }
        Some(seen) => seen,
    };
    *last = Some(cursor);
    backoff.reset();
    store.wake_shared_connection().await;
    if store.set_following(true) {
        info!("redis: following the event stream after {cursor}");
    }
    loop {
        let reply: Value = match redis::cmd("XREAD")
            .arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM_KEY)
            .arg(cursor.to_string())
            .query_async(&mut conn)
            .await
        {
            Ok(reply) => reply,
            Err(e) => return e,
        };
        // [[stream, [entry, ...]]], or nil when BLOCK passed with nothing new.
        let page = match &reply {
            Value::Array(streams) => streams
                .first()
                .and_then(|stream| match stream {
                    Value::Array(parts) => Some(entries(parts.get(1))),
                    _ => None,
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        for entry in page {
            if entry.prev != cursor {
                error!("redis: the events between {cursor} and {} are no longer in the stream (trimmed before this node read them, or lost by Redis); open streams read them from the stream or get a reset", entry.prev);
                hub.restart_at(entry.prev, true);
            }
            if let Some(event) = entry.event {
                hub.publish(event);
            }
            cursor = entry.id;
            *last = Some(cursor);
        }
    }
}

/// One stream entry. `event` is `None` for an entry whose fields are damaged (logged): the
/// position still counts, so the entries after it are not taken for a hole.
struct Entry {
    id: EventId,
    prev: EventId,
    event: Option<Arc<Event>>,
}

/// Parses XRANGE/XREAD entries: `[[id, [field, value, ...]], ...]`.
fn entries(reply: Option<&Value>) -> Vec<Entry> {
    let Some(Value::Array(items)) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let id = text(parts.first()).and_then(parse_id)?;
            let Some(Value::Array(fields)) = parts.get(1) else {
                return None;
            };
            let field = |name: &[u8]| {
                fields
                    .chunks(2)
                    .find(|pair| text(pair.first()) == Some(name))
                    .and_then(|pair| text(pair.get(1)))
            };
            let prev = field(b"p").and_then(parse_id).unwrap_or(EventId::START);
            let event = stored_event(id, field(b"k"), field(b"t"), field(b"d"));
            if event.is_none() {
                error!("redis: stream entry {id} is damaged and cannot be delivered");
            }
            Some(Entry { id, prev, event })
        })
        .collect()
}

fn stored_event(
    id: EventId,
    kind: Option<&[u8]>,
    task_id: Option<&[u8]>,
    data: Option<&[u8]>,
) -> Option<Arc<Event>> {
    let kind = match kind? {
        b"u" => EventKind::TaskUpdated,
        b"d" => EventKind::TaskDeleted,
        _ => return None,
    };
    let task_id = TaskId::parse(std::str::from_utf8(task_id?).ok()?).ok()?;
    Event::from_stored(id, task_id, kind, data?.to_vec())
        .ok()
        .map(Arc::new)
}

/// The stored first answer of an Idempotency-Key: `<event id>\n<task JSON>`.
fn first_answer(value: Option<&Value>) -> Result<Accepted, BackendError> {
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
        task: Task::from_stored(task).map_err(|e| BackendError::Unavailable(e.to_string()))?,
    })
}

fn text(value: Option<&Value>) -> Option<&[u8]> {
    match value? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn parse_id(bytes: &[u8]) -> Option<EventId> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn event_id(value: Option<&Value>) -> Result<EventId, BackendError> {
    text(value).and_then(parse_id).ok_or_else(|| {
        BackendError::Unavailable("Redis answered an event id that is not one".into())
    })
}

fn unexpected(what: &str, reply: &[Value]) -> BackendError {
    error!("redis: {what} answered {reply:?}");
    BackendError::Unavailable(format!("{what} answered something unexpected"))
}

/// Exponential backoff from 50 ms to 2 s between attempts to reach Redis.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Backoff::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> EventId {
        EventId { epoch, seq }
    }

    fn entry(id: EventId, prev: EventId) -> Entry {
        Entry {
            id,
            prev,
            event: None,
        }
    }

    #[test]
    fn a_replay_continues_exactly_when_the_next_entry_names_the_id() {
        let newest = id(9, 0);
        assert_eq!(
            continues(id(5, 0), newest, Some(&entry(id(6, 0), id(5, 0)))),
            Ok(())
        );
        assert_eq!(continues(newest, newest, None), Ok(()), "up to date");
        assert_eq!(
            continues(EventId::START, EventId::START, None),
            Ok(()),
            "0 on an empty stream"
        );
        assert_eq!(
            continues(
                EventId::START,
                newest,
                Some(&entry(id(1, 0), EventId::START))
            ),
            Ok(()),
            "0 when nothing was ever trimmed"
        );
    }

    #[test]
    fn trimmed_ids_are_too_old_and_foreign_ids_unknown() {
        let newest = id(9, 0);
        // The stream starts at 7-0, whose predecessor 6-0 was trimmed.
        let first = entry(id(7, 0), id(6, 0));
        assert_eq!(
            continues(id(6, 0), newest, Some(&first)),
            Ok(()),
            "the newest trimmed id"
        );
        assert_eq!(
            continues(id(5, 0), newest, Some(&first)),
            Err(ResetReason::TooOld)
        );
        assert_eq!(
            continues(EventId::START, newest, Some(&first)),
            Err(ResetReason::TooOld)
        );
        assert_eq!(
            continues(id(6, 5), newest, Some(&first)),
            Err(ResetReason::Unknown),
            "between two consecutive entries"
        );
        assert_eq!(
            continues(id(10, 0), newest, None),
            Err(ResetReason::Unknown),
            "the future"
        );
        // Another stream (Redis emptied, then new events): the first entry has no predecessor.
        assert_eq!(
            continues(id(5, 0), newest, Some(&entry(id(8, 0), EventId::START))),
            Err(ResetReason::Unknown)
        );
    }

    #[test]
    fn entries_parse_and_damaged_ones_keep_their_place() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![
                    bulk("k"),
                    bulk("d"),
                    bulk("t"),
                    bulk("abc"),
                    bulk("p"),
                    bulk("5-0"),
                    bulk("d"),
                    bulk(r#"{"event":"task_deleted","task_id":"abc"}"#),
                ]),
            ]),
            Value::Array(vec![
                bulk("5-2"),
                Value::Array(vec![bulk("k"), bulk("x"), bulk("p"), bulk("5-1")]),
            ]),
        ]);
        let parsed = entries(Some(&reply));
        assert_eq!(parsed.len(), 2);
        let event = parsed[0].event.as_ref().unwrap();
        assert_eq!(
            &event.frame[..],
            b"id: 5-1\nevent: task_deleted\ndata: {\"event\":\"task_deleted\",\"task_id\":\"abc\"}\n\n"
        );
        assert_eq!(parsed[0].prev, id(5, 0));
        assert!(parsed[1].event.is_none());
        assert_eq!(parsed[1].prev, id(5, 1));
    }
}
