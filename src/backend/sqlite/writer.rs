//! The two threads that write: the writer (group commit of every pending publish) and the
//! housekeeper (trims the log, the tombstones and the idempotency keys, checkpoints the WAL).

use super::{Shared, TaskChange};
use crate::backend::{Accepted, BackendError};
use crate::event::{Event, EventId};
use crate::hub::Hub;
use crate::task::{now_rfc3339, Task, TaskId, TaskPatch};
use log::{debug, error, warn};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Publishes taken into one transaction at most; bounds the time the first of them waits.
const MAX_BATCH: usize = 4096;
/// Events deleted per trimming transaction: the writer waits for at most one of these (about a
/// millisecond), never for a whole trim.
const TRIM_CHUNK: u64 = 2000;
/// How often the housekeeper runs when nothing wakes it earlier.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

pub enum Request {
    Update {
        task_id: TaskId,
        patch: TaskPatch,
        idempotency_key: Option<String>,
        answer: oneshot::Sender<Result<Arc<Accepted>, BackendError>>,
    },
    Delete {
        task_id: TaskId,
        answer: oneshot::Sender<Result<EventId, BackendError>>,
    },
    /// Ends the writer after everything queued before it.
    Stop,
}

/// What a request turned into, answered once the batch is committed.
enum Outcome {
    Update(
        oneshot::Sender<Result<Arc<Accepted>, BackendError>>,
        Result<Arc<Accepted>, BackendError>,
    ),
    Delete(
        oneshot::Sender<Result<EventId, BackendError>>,
        Result<EventId, BackendError>,
    ),
}

impl Outcome {
    fn fail(self, error: &str) {
        let unavailable = || {
            BackendError::Unavailable(format!(
                "the change was not stored: the database refused the commit ({error}); retry"
            ))
        };
        // A dropped receiver is a client that went away: nothing to answer.
        match self {
            Outcome::Update(answer, _) => drop(answer.send(Err(unavailable()))),
            Outcome::Delete(answer, _) => drop(answer.send(Err(unavailable()))),
        }
    }

    fn answer(self) {
        match self {
            Outcome::Update(answer, accepted) => drop(answer.send(accepted)),
            Outcome::Delete(answer, result) => drop(answer.send(result)),
        }
    }
}

/// One batch being built: the changes not yet committed, on top of the shared state.
struct Batch {
    outcomes: Vec<Outcome>,
    events: Vec<Arc<Event>>,
    changes: Vec<TaskChange>,
    /// The batch's own view of the tasks it changed (`None`: deleted in this batch).
    pending: HashMap<TaskId, Option<Arc<Task>>>,
    /// Tasks created minus tasks deleted so far in this batch, for `--max-tasks`.
    added: i64,
    seq: u64,
}

/// The writer thread: takes every queued request (up to `MAX_BATCH`), applies them in one
/// transaction, commits (with `synchronous=FULL` the WAL is fsynced here), then publishes the
/// events to the hub in id order and answers. While one commit is on its way to the disk the next
/// requests queue up, so the batch grows with the load and one fsync serves them all.
pub fn write_loop(
    mut conn: Connection,
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    mut requests: mpsc::Receiver<Request>,
) {
    let mut stopping = false;
    while !stopping {
        let Some(first) = requests.blocking_recv() else {
            break;
        };
        let mut queued = vec![first];
        while queued.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => queued.push(request),
                Err(_) => break,
            }
        }
        if let Some(at) = queued.iter().position(|r| matches!(r, Request::Stop)) {
            // Everything queued before the stop is still written; nothing can be queued after
            // it, because it is sent once every handler has finished.
            queued.truncate(at);
            stopping = true;
        }
        if !queued.is_empty() {
            write_batch(&mut conn, &shared, &hub, queued);
        }
    }
    debug!("sqlite: writer stopped");
}

fn write_batch(conn: &mut Connection, shared: &Shared, hub: &Hub, queued: Vec<Request>) {
    let committed_seq = shared.lock().head;
    let mut batch = Batch {
        outcomes: Vec::with_capacity(queued.len()),
        events: Vec::with_capacity(queued.len()),
        changes: Vec::with_capacity(queued.len()),
        pending: HashMap::new(),
        added: 0,
        seq: committed_seq,
    };
    // The housekeeper trims under the same lock, between two batches.
    let guard = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for request in queued {
            apply(&tx, shared, &mut batch, request)?;
        }
        tx.commit()
    })();
    drop(guard);
    if let Err(e) = result {
        // The transaction rolled back: no id was used, nothing changed in memory either.
        error!(
            "sqlite: a commit of {} changes failed: {e}",
            batch.outcomes.len()
        );
        *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        let text = e.to_string();
        batch.outcomes.into_iter().for_each(|o| o.fail(&text));
        return;
    }
    shared
        .last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    {
        // Under the state lock, as the memory backend does: a snapshot, a subscriber and the hub
        // see the batch all at once or not at all.
        let mut state = shared.lock();
        for change in batch.changes {
            match change {
                TaskChange::Set(task) => {
                    state.tasks.insert(task.task_id.clone(), task);
                }
                TaskChange::Remove(task_id) => {
                    state.tasks.remove(&task_id);
                }
            }
        }
        state.head = batch.seq;
        for event in batch.events {
            hub.publish(event);
            hub.metrics().events_published.inc();
        }
    }
    let floor = shared.floor.load(Ordering::Acquire);
    if batch.seq.saturating_sub(floor) > shared.retention + TRIM_CHUNK {
        shared.housekeeper.wake();
    }
    batch.outcomes.into_iter().for_each(Outcome::answer);
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    batch: &mut Batch,
    request: Request,
) -> rusqlite::Result<()> {
    match request {
        Request::Update {
            task_id,
            patch,
            idempotency_key,
            answer,
        } => {
            if let Some(key) = &idempotency_key {
                if let Some(first) = first_answer(tx, shared, key)? {
                    batch
                        .outcomes
                        .push(Outcome::Update(answer, Ok(Arc::new(first))));
                    return Ok(());
                }
            }
            let previous = current(shared, batch, &task_id);
            if previous.is_none() {
                let stored = shared.lock().tasks.len() as i64 + batch.added;
                if stored >= shared.max_tasks as i64 {
                    let full = Err(BackendError::Full(shared.max_tasks));
                    batch.outcomes.push(Outcome::Update(answer, full));
                    return Ok(());
                }
                batch.added += 1;
            }
            let task = Arc::new(patch.apply(task_id.clone(), previous.as_deref(), now_rfc3339()));
            batch.seq += 1;
            let event_id = shared.id(batch.seq);
            let event = Arc::new(Event::updated(event_id, &task));
            let key = task_id.to_string();
            let json = task_json(&event.data);
            debug_assert_eq!(json, serde_json::to_vec(&*task).unwrap());
            tx.prepare_cached(
                "INSERT INTO events (seq, kind, task_id, data) VALUES (?1, 0, ?2, ?3)",
            )?
            .execute(params![batch.seq, key, &event.data[..]])?;
            tx.prepare_cached(
                "INSERT INTO tasks (task_id, task, event) VALUES (?1, ?2, ?3)
                 ON CONFLICT (task_id) DO UPDATE SET task = excluded.task, event = excluded.event",
            )?
            .execute(params![key, json, batch.seq])?;
            if previous.is_none() {
                // Only a task that did not exist can have a tombstone.
                tx.prepare_cached("DELETE FROM tombstones WHERE task_id = ?1")?
                    .execute([&key])?;
            }
            if let Some(idempotency_key) = idempotency_key {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO idempotency (key, event, task, expires) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![idempotency_key, batch.seq, json, now_secs() + shared.idempotency_window])?;
            }
            batch.pending.insert(task_id, Some(task.clone()));
            batch.changes.push(TaskChange::Set(task.clone()));
            batch.events.push(event);
            batch.outcomes.push(Outcome::Update(
                answer,
                Ok(Arc::new(Accepted { event_id, task })),
            ));
        }
        Request::Delete { task_id, answer } => {
            if current(shared, batch, &task_id).is_none() {
                batch.outcomes.push(Outcome::Delete(
                    answer,
                    Err(BackendError::NotFound(task_id)),
                ));
                return Ok(());
            }
            batch.seq += 1;
            let event_id = shared.id(batch.seq);
            let event = Arc::new(Event::deleted(event_id, task_id.clone()));
            let key = task_id.to_string();
            tx.prepare_cached(
                "INSERT INTO events (seq, kind, task_id, data) VALUES (?1, 1, ?2, ?3)",
            )?
            .execute(params![batch.seq, key, &event.data[..]])?;
            tx.prepare_cached("DELETE FROM tasks WHERE task_id = ?1")?
                .execute([&key])?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO tombstones (task_id, event) VALUES (?1, ?2)",
            )?
            .execute(params![key, batch.seq])?;
            batch.pending.insert(task_id.clone(), None);
            batch.added -= 1;
            batch.changes.push(TaskChange::Remove(task_id));
            batch.events.push(event);
            batch.outcomes.push(Outcome::Delete(answer, Ok(event_id)));
        }
        Request::Stop => {}
    }
    Ok(())
}

/// The task's own JSON, as `serde_json::to_vec(&task)` writes it, cut from its event's `data`
/// (`{"event":"task_updated",` then the task's fields): the writer serialises each task once.
fn task_json(data: &[u8]) -> Vec<u8> {
    const LEADING: &[u8] = b"{\"event\":\"task_updated\",";
    debug_assert!(data.starts_with(LEADING));
    let mut json = Vec::with_capacity(data.len() + 1 - LEADING.len());
    json.push(b'{');
    json.extend_from_slice(&data[LEADING.len()..]);
    json
}

/// The task as this batch would leave it so far.
fn current(shared: &Shared, batch: &Batch, task_id: &TaskId) -> Option<Arc<Task>> {
    match batch.pending.get(task_id) {
        Some(pending) => pending.clone(),
        None => shared.lock().tasks.get(task_id).cloned(),
    }
}

/// The stored first answer of an unexpired Idempotency-Key (inside the batch's transaction, so a
/// key used earlier in the same batch is found too).
fn first_answer(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    key: &str,
) -> rusqlite::Result<Option<Accepted>> {
    let row: Option<(u64, Vec<u8>)> = tx
        .prepare_cached("SELECT event, task FROM idempotency WHERE key = ?1 AND expires > ?2")?
        .query_row(params![key, now_secs()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((seq, task)) = row else {
        return Ok(None);
    };
    let task = Task::from_stored(&task).map_err(|e| {
        super::schema::damaged(format!("a stored idempotent answer is damaged: {e}"))
    })?;
    Ok(Some(Accepted {
        event_id: shared.id(seq),
        task: Arc::new(task),
    }))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The housekeeper thread: every second, or when the writer finds the log past `--retention`,
/// trims the oldest events (in chunks), the oldest tombstones beyond `--tombstones` and expired
/// or surplus idempotency keys, then checkpoints the WAL (PASSIVE: never waits for a reader and
/// never blocks the writer).
pub fn housekeeping_loop(conn: Connection, shared: Arc<Shared>) {
    let mut tick = 0u64;
    while shared.housekeeper.wait(HOUSEKEEPING_EVERY) {
        if let Err(e) = trim_events(&conn, &shared) {
            warn!("sqlite: trimming the event log failed: {e}");
        }
        // Tombstones and keys change slowly and need a count: every tenth pass is enough.
        if tick.is_multiple_of(10) {
            if let Err(e) = trim_tombstones_and_keys(&conn, &shared) {
                warn!("sqlite: trimming tombstones and idempotency keys failed: {e}");
            }
        }
        tick += 1;
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            warn!("sqlite: checkpoint failed: {e}");
        }
    }
    debug!("sqlite: housekeeper stopped");
}

/// Keeps the newest `--retention` events; the ring (`--buffer` <= `--retention`) is always inside.
fn trim_events(conn: &Connection, shared: &Shared) -> rusqlite::Result<()> {
    let head = shared.lock().head;
    let target = head.saturating_sub(shared.retention);
    let mut floor = shared.floor.load(Ordering::Acquire);
    let trims = floor < target;
    while floor < target {
        let through = (floor + TRIM_CHUNK).min(target);
        {
            let _guard = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.unchecked_transaction()?;
            tx.execute("DELETE FROM events WHERE seq <= ?1", [through])?;
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'floor'", [through])?;
            tx.commit()?;
        }
        floor = through;
        shared.floor.store(floor, Ordering::Release);
    }
    if trims {
        debug!("sqlite: trimmed the log through {}", shared.id(floor));
    }
    Ok(())
}

fn trim_tombstones_and_keys(conn: &Connection, shared: &Shared) -> rusqlite::Result<()> {
    let _guard = shared.write_lock.lock().unwrap_or_else(|p| p.into_inner());
    let tx = conn.unchecked_transaction()?;
    // The newest dropped tombstone's event id is kept: a catch-up from before it cannot know
    // which tasks were deleted (issue 15 answers those with a reset).
    let dropped: Option<u64> = tx
        .query_row(
            "SELECT event FROM tombstones ORDER BY event DESC LIMIT 1 OFFSET ?1",
            [shared.tombstones],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(dropped) = dropped {
        tx.execute("DELETE FROM tombstones WHERE event <= ?1", [dropped])?;
        tx.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'tombstone_floor'",
            [dropped],
        )?;
    }
    tx.execute("DELETE FROM idempotency WHERE expires <= ?1", [now_secs()])?;
    let surplus: Option<u64> = tx
        .query_row(
            "SELECT expires FROM idempotency ORDER BY expires DESC LIMIT 1 OFFSET ?1",
            [shared.idempotency_keys],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(expires) = surplus {
        tx.execute("DELETE FROM idempotency WHERE expires <= ?1", [expires])?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_task_json_cut_from_the_event_is_the_tasks_own() {
        for body in [
            r#"{"task_id": 7}"#,
            r#"{"task_id": "a:b", "status": "x\"y", "title": "{\"event\":1}", "assignee": null,
                "data": {"event": "task_updated", "n": [1, 2]}}"#,
        ] {
            let (id, patch) = TaskPatch::parse(body.as_bytes()).unwrap();
            let task = patch.apply(id, None, "2026-12-02T00:00:00.000Z".into());
            let event = Event::updated(EventId { epoch: 1, seq: 1 }, &task);
            let json = task_json(&event.data);
            assert_eq!(json, serde_json::to_vec(&task).unwrap(), "{body}");
            assert_eq!(Task::from_stored(&json), Ok(task));
        }
    }
}
