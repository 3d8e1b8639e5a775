//! The default backend: tasks in a map, events in the hub's ring buffer, ids `<start ms>-<n>`.

use super::{Accepted, BackendError, Snapshot};
use crate::event::{Event, EventId};
use crate::hub::Hub;
use crate::task::{now_rfc3339, Task, TaskId, TaskPatch};
use moka::policy::EvictionPolicy;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the idempotency cache remembers per key: the first answer (its task shared with the
/// store) and its weight, the bytes it would hold once the store has moved on to a newer version.
#[derive(Clone)]
struct Remembered {
    accepted: Arc<Accepted>,
    weight: u32,
}

/// The cache's bounds: `--idempotency-bytes` in total and `--idempotency-keys` in count.
pub struct IdempotencyBounds {
    pub window: std::time::Duration,
    pub keys: u64,
    pub bytes: u64,
}

/// Per entry beyond its key and its task's JSON: the `Accepted`, the `Arc`s, moka's own node.
const ENTRY_OVERHEAD: u64 = 256;

pub struct MemoryBackend {
    /// One lock orders id assignment, the task change and the hub's publish, so ids, the
    /// snapshot and the stream always agree.
    state: Mutex<State>,
    hub: Arc<Hub>,
    /// The millisecond this process started: the first id group, so no id repeats across runs.
    epoch: u64,
    idempotency: moka::sync::Cache<String, Remembered>,
    /// `--max-tasks`: new tasks past it are refused.
    max_tasks: u64,
    /// Each entry weighs at least this, so `--idempotency-bytes` also caps the count at
    /// `--idempotency-keys`.
    min_weight: u64,
}

struct State {
    /// Immutable values, replaced on update: a snapshot or an answer shares them.
    tasks: BTreeMap<TaskId, Arc<Task>>,
    last_seq: u64,
}

impl MemoryBackend {
    pub fn new(hub: Arc<Hub>, idempotency: IdempotencyBounds, max_tasks: u64) -> MemoryBackend {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
        MemoryBackend {
            state: Mutex::new(State {
                tasks: BTreeMap::new(),
                last_seq: 0,
            }),
            hub,
            epoch,
            // LRU rather than moka's default TinyLFU: TinyLFU may refuse to admit a new key,
            // which would silently turn off idempotency for it. Weighed in bytes, since a task
            // can be 17 KB: counted in keys alone, the default 100,000 could hold 1.6 GiB.
            idempotency: moka::sync::Cache::builder()
                .max_capacity(idempotency.bytes)
                .weigher(|_, remembered: &Remembered| remembered.weight)
                .time_to_live(idempotency.window)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
            max_tasks,
            min_weight: idempotency.bytes.div_ceil(idempotency.keys),
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation under this lock is completed before anything that can panic runs
        // (serialisation happens after the map is updated and cannot fail), so recover.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_id(&self, state: &mut State) -> EventId {
        state.last_seq += 1;
        EventId {
            epoch: self.epoch,
            seq: state.last_seq,
        }
    }

    pub fn update(
        &self,
        task_id: TaskId,
        patch: TaskPatch,
        idempotency_key: Option<String>,
    ) -> Result<Arc<Accepted>, BackendError> {
        let mut state = self.lock();
        if let Some(first) = idempotency_key
            .as_ref()
            .and_then(|key| self.idempotency.get(key))
        {
            return Ok(first.accepted);
        }
        let previous = state.tasks.get(&task_id);
        if previous.is_none() && state.tasks.len() as u64 >= self.max_tasks {
            return Err(BackendError::Full(self.max_tasks));
        }
        let task = Arc::new(patch.apply(task_id.clone(), previous.map(|t| &**t), now_rfc3339()));
        let event_id = self.next_id(&mut state);
        let event = Arc::new(Event::updated(event_id, &task));
        state.tasks.insert(task_id, task.clone());
        // The event's data is the task's JSON plus `"event"`: the task's size, already measured.
        let task_bytes = event.data.len() as u64;
        self.publish(event);
        let accepted = Arc::new(Accepted { event_id, task });
        if let Some(key) = idempotency_key {
            let weight = (key.len() as u64 + task_bytes + ENTRY_OVERHEAD)
                .max(self.min_weight)
                .min(u64::from(u32::MAX)) as u32;
            let accepted = accepted.clone();
            self.idempotency
                .insert(key, Remembered { accepted, weight });
        }
        Ok(accepted)
    }

    pub fn delete(&self, task_id: TaskId) -> Result<EventId, BackendError> {
        let mut state = self.lock();
        if state.tasks.remove(&task_id).is_none() {
            return Err(BackendError::NotFound(task_id));
        }
        let event_id = self.next_id(&mut state);
        self.publish(Arc::new(Event::deleted(event_id, task_id)));
        Ok(event_id)
    }

    fn publish(&self, event: Arc<Event>) {
        self.hub.publish(event);
        self.hub.metrics().events_published.inc();
    }

    pub fn get(&self, task_id: &TaskId) -> Option<Arc<Task>> {
        self.lock().tasks.get(task_id).cloned()
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            last_event_id: (state.last_seq > 0).then_some(EventId {
                epoch: self.epoch,
                seq: state.last_seq,
            }),
            tasks: state.tasks.values().cloned().collect(),
        }
    }
}
