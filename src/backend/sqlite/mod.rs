//! The durable single node (`--data-dir DIR`): tasks, the event log and idempotency keys in
//! `DIR/taskstream.db`, an SQLite database in WAL mode.
//!
//! | table | holds |
//! | --- | --- |
//! | `meta` | `epoch` (the first group of every event id), `floor` (the log is complete after this seq), `tombstone_floor` |
//! | `tasks` | task id -> the task's JSON, and the id of its latest event |
//! | `events` | seq -> kind, task id, the SSE `data` JSON: the log, the newest `--retention` events |
//! | `tombstones` | task id -> the event that deleted it, for the last `--tombstones` deletions |
//! | `idempotency` | key -> the first answer (event seq, task JSON) and when it expires |
//! | `webhooks` | SHA-256 of a `--webhook` URL -> its worker's position (`webhooks.rs`) |
//!
//! One writer thread owns the only connection that publishes (group commit, `writer.rs`); a
//! housekeeper thread trims in the background; replays older than the hub's ring read the log
//! through read-only connections, as the hub's `History`. The hub and its ring are the memory
//! backend's; tasks are mirrored in memory so `GET /tasks` never reads the disk.
//!
//! Ids are `<epoch>-<seq>`: `epoch` is fixed when the database is created and `seq` counts every
//! event ever written, so ids keep growing across restarts and an id from another database (or a
//! memory-only run) is recognised as foreign.

mod schema;
mod webhooks;
mod writer;

pub use schema::{OpenError, APPLICATION_ID, DB_FILE, LOCK_FILE, SCHEMA_VERSION};

use super::{Accepted, BackendError, Snapshot};
use crate::config::Config;
use crate::event::{Event, EventId, EventKind, InvalidStoredData, StoredFrames};
use crate::filter::TaskFilter;
use crate::hub::{Backfill, History, Hub, Resume, SubscribeError, Subscription};
use crate::metrics::Metrics;
use crate::ring::ResetReason;
use crate::task::{Task, TaskId, TaskPatch};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use log::{error, info, warn};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use writer::Request;

/// Publishes waiting for the writer at most; beyond it a publisher waits for room (backpressure
/// instead of unbounded memory).
const QUEUE: usize = 16 * 1024;
/// Idle read connections kept for replays.
const READERS: usize = 4;
/// Events read from disk in one go for a replay: a replay holds at most two pages (the one being
/// sent and the next, read meanwhile), so its memory does not grow with the log.
const PAGE: usize = 4096;
/// The page's frames are written into one buffer reserved at about this size (4,096 events of a
/// few hundred bytes); it grows if they are bigger.
const PAGE_DATA_BYTES: usize = 1 << 20;

pub struct SqliteBackend {
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    requests: mpsc::Sender<Request>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dir: PathBuf,
    webhook_positions: webhooks::Positions,
    _lock: schema::DirLock,
}

/// What the writer, the housekeeper, replays and handlers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    epoch: u64,
    path: PathBuf,
    /// The log holds every event after this seq (the housekeeper moves it).
    floor: AtomicU64,
    retention: u64,
    tombstones: u64,
    idempotency_window: u64,
    idempotency_keys: u64,
    /// `--max-tasks`: the writer refuses a new task past it.
    max_tasks: u64,
    /// Serialises the writer's and the housekeeper's transactions in-process: a waiting writer is
    /// woken at once instead of polling SQLite's busy handler.
    write_lock: Mutex<()>,
    readers: Mutex<Vec<Connection>>,
    housekeeper: Housekeeper,
    /// The last commit's failure, for `/healthz`; cleared by the next successful commit.
    last_error: Mutex<Option<String>>,
}

/// The committed state, as the hub has it: tasks and the newest seq change together.
struct State {
    /// Immutable values, replaced on update: a snapshot shares them.
    tasks: BTreeMap<TaskId, Arc<Task>>,
    head: u64,
}

pub(crate) enum TaskChange {
    Set(Arc<Task>),
    Remove(TaskId),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Mutations under this lock are inserts and removals that cannot leave it half done.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn id(&self, seq: u64) -> EventId {
        EventId {
            epoch: self.epoch,
            seq,
        }
    }

    /// The newest id the hub has: what a `reset` names (a snapshot taken after it is as new).
    fn head_id(&self) -> EventId {
        match self.lock().head {
            0 => EventId::START,
            seq => self.id(seq),
        }
    }

    fn reader(&self) -> rusqlite::Result<Connection> {
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => schema::open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if readers.len() < READERS {
            readers.push(conn);
        }
    }

    /// The events after `after` that the log holds, at most `PAGE` of them, read in one read
    /// transaction (a consistent view while the writer and the housekeeper go on); a full page
    /// with more behind it is a `Backfill::Page`, and the hub asks again after its last id.
    fn read_after(&self, after: EventId) -> Result<Backfill, rusqlite::Error> {
        let newest = self.head_id();
        let after_seq = match after {
            EventId::START => 0,
            EventId { epoch, seq } if epoch == self.epoch => seq,
            _ => {
                return Ok(Backfill::Reset {
                    newest,
                    reason: ResetReason::Unknown,
                })
            }
        };
        let conn = self.reader()?;
        let read = (|| {
            let tx = conn.unchecked_transaction()?;
            let floor: u64 =
                tx.query_row("SELECT value FROM meta WHERE key = 'floor'", [], |r| {
                    r.get(0)
                })?;
            let head: Option<u64> =
                tx.query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))?;
            let head = head.unwrap_or(0).max(floor);
            if after_seq > head {
                return Ok(Backfill::Reset {
                    newest,
                    reason: ResetReason::Unknown,
                });
            }
            if after_seq < floor {
                return Ok(Backfill::Reset {
                    newest,
                    reason: ResetReason::TooOld,
                });
            }
            let mut statement = tx.prepare_cached(
                "SELECT seq, kind, task_id, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut rows = statement.query(params![after_seq, PAGE as u64])?;
            let mut frames =
                StoredFrames::with_capacity(PAGE.min((head - after_seq) as usize), PAGE_DATA_BYTES);
            let mut through = after;
            while let Some(row) = rows.next()? {
                let id = self.id(row.get(0)?);
                through = id;
                let task_id = row.get_ref(2)?.as_str().ok().map(TaskId::parse);
                let data = row.get_ref(3)?.as_blob().ok();
                let stored = match (stored_kind(row.get(1)?), task_id, data) {
                    (Some(kind), Some(Ok(task_id)), Some(data)) => {
                        frames.push(id, task_id, kind, data)
                    }
                    _ => Err(InvalidStoredData),
                };
                // Its position still counts: the events after it are no hole.
                if stored.is_err() {
                    error!("sqlite: event {id} is damaged and cannot be delivered");
                }
            }
            let events = frames.finish().into_iter().map(Arc::new).collect();
            Ok(if through.seq < head && through != after {
                Backfill::Page { events, through }
            } else {
                Backfill::Events { events, through }
            })
        })();
        self.give_back(conn);
        read
    }
}

fn stored_kind(kind: i64) -> Option<EventKind> {
    match kind {
        0 => Some(EventKind::TaskUpdated),
        1 => Some(EventKind::TaskDeleted),
        _ => None,
    }
}

/// Wakes the housekeeper early, and stops it.
struct Housekeeper {
    /// (woken, stopping)
    flags: Mutex<(bool, bool)>,
    signal: Condvar,
}

impl Housekeeper {
    fn new() -> Housekeeper {
        Housekeeper {
            flags: Mutex::new((false, false)),
            signal: Condvar::new(),
        }
    }

    fn wake(&self) {
        self.flags.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        self.signal.notify_one();
    }

    fn stop(&self) {
        self.flags.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.signal.notify_one();
    }

    /// Waits up to `every` or until woken; false once stopping.
    fn wait(&self, every: Duration) -> bool {
        let flags = self.flags.lock().unwrap_or_else(|p| p.into_inner());
        let (mut flags, _) = self
            .signal
            .wait_timeout_while(flags, every, |(woken, stopping)| !*woken && !*stopping)
            .unwrap_or_else(|p| p.into_inner());
        flags.0 = false;
        !flags.1
    }
}

/// The log on disk as the hub's history.
struct SqliteHistory(Arc<Shared>);

impl History for SqliteHistory {
    fn after(&self, after: EventId) -> BoxFuture<'static, Backfill> {
        let shared = self.0.clone();
        let read = {
            let shared = shared.clone();
            move || shared.read_after(after)
        };
        // Started now, not when first polled: the hub asks for the next page while it still
        // sends the one before, so the disk read overlaps the sending. Outside a runtime (no
        // caller does that today) it starts when first polled.
        let started = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.spawn_blocking(read.clone()))
            .ok();
        async move {
            let read = match started {
                Some(started) => started.await,
                None => tokio::task::spawn_blocking(read).await,
            };
            match read {
                Ok(Ok(backfill)) => backfill,
                // The client reloads the snapshot rather than wait on a disk that fails.
                Ok(Err(e)) => {
                    error!("sqlite: replay after {after} failed: {e}");
                    Backfill::Reset {
                        newest: shared.head_id(),
                        reason: ResetReason::Unknown,
                    }
                }
                Err(e) => {
                    error!("sqlite: replay after {after} panicked: {e}");
                    Backfill::Reset {
                        newest: shared.head_id(),
                        reason: ResetReason::Unknown,
                    }
                }
            }
        }
        .boxed()
    }

    fn newest(&self) -> BoxFuture<'static, EventId> {
        futures_util::future::ready(self.0.head_id()).boxed()
    }
}

impl SqliteBackend {
    /// Locks `dir`, opens (or creates) the database, loads the tasks, and starts the writer and
    /// the housekeeper threads. Refuses a directory another process holds and a database that is
    /// not a taskstream database of a known version, without changing it.
    pub fn open(
        dir: &Path,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<SqliteBackend, OpenError> {
        if config.retention < config.buffer.into() {
            return Err(OpenError(format!(
                "--retention {} is below --buffer {}: the log on disk must hold at least what the ring holds",
                config.retention, config.buffer
            )));
        }
        let lock = schema::lock(dir)?;
        let synchronous = config.synchronous.pragma();
        let (writer_conn, meta) = schema::open(dir, synchronous)?;
        let path = schema::db_path(dir);
        let tasks =
            load_tasks(&writer_conn).map_err(|e| OpenError(format!("{}: {e}", path.display())))?;
        let (latest, tombstone_floor) = load_latest(&writer_conn, meta.epoch, &tasks)
            .map_err(|e| OpenError(format!("{}: {e}", path.display())))?;
        let housekeeper_conn = Connection::open(&path)
            .and_then(|conn| schema::configure(&conn, synchronous).map(|()| conn))
            .map_err(|e| OpenError(format!("{}: {e}", path.display())))?;
        info!(
            "backend: sqlite at {} ({} tasks, log after {}-{} through {}-{}, synchronous={synchronous}, retention {} events)",
            path.display(),
            tasks.len(),
            meta.epoch,
            meta.floor,
            meta.epoch,
            meta.head,
            config.retention
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tasks,
                head: meta.head,
            }),
            epoch: meta.epoch,
            path,
            floor: AtomicU64::new(meta.floor),
            retention: config.retention,
            tombstones: config.tombstones,
            idempotency_window: config.idempotency_window,
            idempotency_keys: config.idempotency_keys,
            max_tasks: config.max_tasks,
            write_lock: Mutex::new(()),
            readers: Mutex::new(Vec::new()),
            housekeeper: Housekeeper::new(),
            last_error: Mutex::new(None),
        });
        let hub = Arc::new(
            Hub::with_history(
                config.buffer as usize,
                config.max_subscribers as usize,
                metrics.clone(),
                Arc::new(SqliteHistory(shared.clone())),
            )
            .with_latest(config.tombstones as usize),
        );
        // The ring starts empty after the newest stored event; anything older is on disk.
        hub.restart_at(shared.head_id(), false);
        // Each task's latest event and the tombstones, for compacted catch-ups from ids older
        // than the retained log (the tables keep them; the hub keeps them in memory from here).
        hub.seed_latest(latest, tombstone_floor, shared.head_id());
        let (requests, receiver) = mpsc::channel(QUEUE);
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(body)
                .map_err(|e| OpenError(format!("cannot start the {name} thread: {e}")))
        };
        let writer = spawn("sqlite-writer", {
            let (shared, hub) = (shared.clone(), hub.clone());
            Box::new(move || writer::write_loop(writer_conn, shared, hub, receiver))
        })?;
        let housekeeper = spawn("sqlite-housekeeper", {
            let shared = shared.clone();
            Box::new(move || writer::housekeeping_loop(housekeeper_conn, shared))
        })?;
        metrics.backend_up.set(1);
        Ok(SqliteBackend {
            shared,
            hub,
            requests,
            threads: Mutex::new(vec![writer, housekeeper]),
            dir: dir.to_owned(),
            webhook_positions: webhooks::Positions::new(synchronous),
            _lock: lock,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn health(&self) -> Result<(), String> {
        match self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            None => Ok(()),
            Some(e) => Err(format!(
                "the last commit to {} failed: {e}",
                self.shared.path.display()
            )),
        }
    }

    /// Ends the writer once everything queued is committed and answered, stops the housekeeper,
    /// and joins both. For shutdown, after every handler has finished.
    pub async fn stopped(&self) {
        if self.requests.send(Request::Stop).await.is_err() {
            warn!("sqlite: the writer had already stopped");
        }
        self.shared.housekeeper.stop();
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let joined = tokio::task::spawn_blocking(move || {
            threads.into_iter().all(|thread| thread.join().is_ok())
        })
        .await;
        if !matches!(joined, Ok(true)) {
            error!("sqlite: a database thread panicked");
        }
        info!("sqlite: closed {}", self.shared.path.display());
    }

    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, BackendError> {
        let (answer, answered) = oneshot::channel();
        let stopped = || {
            BackendError::Unavailable(
                "the server is shutting down: the change was not stored".into(),
            )
        };
        self.requests
            .send(request(answer))
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())
    }

    /// Answers once the change (and its event) is committed to disk.
    pub async fn update(
        &self,
        task_id: TaskId,
        patch: TaskPatch,
        idempotency_key: Option<String>,
    ) -> Result<Arc<Accepted>, BackendError> {
        self.call(|answer| Request::Update {
            task_id,
            patch,
            idempotency_key,
            answer,
        })
        .await?
    }

    pub async fn delete(&self, task_id: TaskId) -> Result<EventId, BackendError> {
        self.call(|answer| Request::Delete { task_id, answer })
            .await?
    }

    pub fn subscribe(
        &self,
        resume: Resume,
        filter: TaskFilter,
    ) -> Result<Subscription, SubscribeError> {
        self.hub.subscribe(resume, filter)
    }

    pub fn get(&self, task_id: &TaskId) -> Option<Arc<Task>> {
        self.shared.lock().tasks.get(task_id).cloned()
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.shared.lock();
        Snapshot {
            last_event_id: (state.head > 0).then(|| self.shared.id(state.head)),
            tasks: state.tasks.values().cloned().collect(),
        }
    }
}

/// Each stored task's latest event (`task_updated` with the task as it is, under its own id), the
/// tombstones, and the newest dropped tombstone's id (`meta.tombstone_floor`).
fn load_latest(
    conn: &Connection,
    epoch: u64,
    tasks: &BTreeMap<TaskId, Arc<Task>>,
) -> rusqlite::Result<(Vec<Arc<Event>>, EventId)> {
    let id = |seq: u64| EventId { epoch, seq };
    let mut latest = Vec::with_capacity(tasks.len());
    let mut statement = conn.prepare("SELECT task_id, event FROM tasks")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let task_id = TaskId::parse(row.get_ref(0)?.as_str()?)
            .map_err(|e| schema::damaged(format!("a stored task id is damaged: {e}")))?;
        if let Some(task) = tasks.get(&task_id) {
            latest.push(Arc::new(Event::updated(id(row.get(1)?), task)));
        }
    }
    let mut statement = conn.prepare("SELECT task_id, event FROM tombstones")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let task_id = TaskId::parse(row.get_ref(0)?.as_str()?)
            .map_err(|e| schema::damaged(format!("a stored tombstone is damaged: {e}")))?;
        latest.push(Arc::new(Event::deleted(id(row.get(1)?), task_id)));
    }
    let floor: Option<u64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'tombstone_floor'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let floor = match floor.unwrap_or(0) {
        0 => EventId::START,
        seq => id(seq),
    };
    Ok((latest, floor))
}

fn load_tasks(conn: &Connection) -> rusqlite::Result<BTreeMap<TaskId, Arc<Task>>> {
    let mut statement = conn.prepare("SELECT task_id, task FROM tasks")?;
    let mut rows = statement.query([])?;
    let mut tasks = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let json: Vec<u8> = row.get(1)?;
        let task = TaskId::parse(&id)
            .ok()
            .and_then(|_| Task::from_stored(&json).ok())
            .ok_or_else(|| schema::damaged(format!("the stored task {id:?} is damaged")))?;
        tasks.insert(task.task_id.clone(), Arc::new(task));
    }
    Ok(tasks)
}
