//! The default backend: tasks in a map, events in the hub's ring buffer, ids `<start ms>-<n>`.

use super::{Accepted, BackendError, Snapshot};
use crate::event::{Event, EventId};
use crate::hub::Hub;
use crate::task::{now_rfc3339, Task, TaskId, TaskPatch};
use moka::policy::EvictionPolicy;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct MemoryBackend {
    /// One lock orders id assignment, the task change and the hub's publish, so ids, the
    /// snapshot and the stream always agree.
    state: Mutex<State>,
    hub: Arc<Hub>,
    /// The millisecond this process started: the first id group, so no id repeats across runs.
    epoch: u64,
    idempotency: moka::sync::Cache<String, Arc<Accepted>>,
}

struct State {
    tasks: BTreeMap<TaskId, Task>,
    last_seq: u64,
}

impl MemoryBackend {
    pub fn new(
        hub: Arc<Hub>,
        idempotency_window: Duration,
        idempotency_keys: u64,
    ) -> MemoryBackend {
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
            // which would silently turn off idempotency for it.
            idempotency: moka::sync::Cache::builder()
                .max_capacity(idempotency_keys)
                .time_to_live(idempotency_window)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
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
    ) -> Arc<Accepted> {
        let mut state = self.lock();
        if let Some(first) = idempotency_key
            .as_ref()
            .and_then(|key| self.idempotency.get(key))
        {
            return first;
        }
        let task = patch.apply(task_id.clone(), state.tasks.get(&task_id), now_rfc3339());
        let event_id = self.next_id(&mut state);
        let event = Arc::new(Event::updated(event_id, &task));
        state.tasks.insert(task_id, task.clone());
        self.publish(event);
        let accepted = Arc::new(Accepted { event_id, task });
        if let Some(key) = idempotency_key {
            self.idempotency.insert(key, accepted.clone());
        }
        accepted
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

    pub fn get(&self, task_id: &TaskId) -> Option<Task> {
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
