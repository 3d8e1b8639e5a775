//! The bounded event log that replay reads (`since(id)` answers the events after `id`, or why
//! not), and `Latest`, the index of each task's latest event that a compacted catch-up reads.

use crate::event::{Event, EventId, EventKind};
use crate::task::TaskId;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

/// Why a replay cannot be served, sent to the client in the `reset` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Events after the id have left the buffer.
    TooOld,
    /// The id is not one this server issued (another run, another server, the future).
    Unknown,
    /// The id is not made of decimal digit groups.
    Malformed,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::TooOld => "events after last_event_id have left the replay buffer",
            ResetReason::Unknown => "last_event_id was not issued by this server",
            ResetReason::Malformed => "last_event_id is malformed",
        }
    }
}

pub struct Ring {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    /// The id after which the buffer is complete: `START` until the first eviction, then the id
    /// of the newest evicted event.
    floor: EventId,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring::starting_after(capacity, EventId::START)
    }

    /// An empty ring that is complete after `floor`: the events that follow `floor` will be pushed
    /// (a node that joins a shared log part-way starts its ring where it starts reading).
    pub fn starting_after(capacity: usize, floor: EventId) -> Ring {
        assert!(capacity > 0, "the ring needs room for at least one event");
        Ring {
            events: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            floor,
        }
    }

    /// Appends an event. Ids must increase; the oldest event leaves when the buffer is full.
    pub fn push(&mut self, event: Arc<Event>) {
        debug_assert!(self.newest().is_none_or(|newest| newest < event.id));
        if self.events.len() == self.capacity {
            if let Some(evicted) = self.events.pop_front() {
                self.floor = evicted.id;
            }
        }
        self.events.push_back(event);
    }

    pub fn newest(&self) -> Option<EventId> {
        self.events.back().map(|e| e.id)
    }

    /// The newest position a client can hold: the newest event, or the floor when there is none.
    pub fn head(&self) -> EventId {
        self.newest().unwrap_or(self.floor)
    }

    /// The events after `id`, oldest first.
    pub fn since(&self, id: EventId) -> Result<impl Iterator<Item = &Arc<Event>>, ResetReason> {
        let start = if id == self.floor {
            0
        } else {
            match self.events.binary_search_by(|e| e.id.cmp(&id)) {
                Ok(index) => index + 1,
                Err(_) if id < self.floor => return Err(ResetReason::TooOld),
                Err(_) => return Err(ResetReason::Unknown),
            }
        };
        Ok(self.events.range(start..))
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// Each task's latest event, ordered by id: the live tasks' latest `task_updated` (which carries
/// the current task) and, for at most `max_tombstones` deletions, the `task_deleted` tombstone.
/// Ids are unique, so an id orders one task's one entry; a range after a client's id is every task
/// changed since, which is what a compacted catch-up sends.
pub struct Latest {
    by_id: BTreeMap<EventId, Arc<Event>>,
    /// Where each task is in `by_id`, so its older entry goes when it changes again.
    position: HashMap<TaskId, EventId>,
    /// The ids of the tombstones kept, the oldest first out.
    tombstones: BTreeSet<EventId>,
    max_tombstones: usize,
    /// The index is complete after this id: the newest dropped tombstone, so a client from before
    /// it may have missed a deletion the index no longer knows.
    floor: EventId,
    /// The newest id pushed (or the id the index was seeded at).
    head: EventId,
}

impl Latest {
    pub fn new(max_tombstones: usize) -> Latest {
        Latest {
            by_id: BTreeMap::new(),
            position: HashMap::new(),
            tombstones: BTreeSet::new(),
            max_tombstones: max_tombstones.max(1),
            floor: EventId::START,
            head: EventId::START,
        }
    }

    /// Records `event` as its task's latest. Ids must increase.
    pub fn push(&mut self, event: &Arc<Event>) {
        debug_assert!(event.id > self.head || self.head == EventId::START);
        if let Some(older) = self.position.insert(event.task_id.clone(), event.id) {
            self.by_id.remove(&older);
            self.tombstones.remove(&older);
        }
        self.by_id.insert(event.id, event.clone());
        if event.kind == EventKind::TaskDeleted {
            self.tombstones.insert(event.id);
            while self.tombstones.len() > self.max_tombstones {
                let Some(oldest) = self.tombstones.pop_first() else {
                    break;
                };
                if let Some(dropped) = self.by_id.remove(&oldest) {
                    self.position.remove(&dropped.task_id);
                }
                self.floor = self.floor.max(oldest);
            }
        }
        self.head = self.head.max(event.id);
    }

    /// A store that keeps the index on disk loads it: the entries (any order), the newest dropped
    /// tombstone's id and the newest id issued.
    pub fn seed(
        &mut self,
        entries: impl IntoIterator<Item = Arc<Event>>,
        floor: EventId,
        head: EventId,
    ) {
        let mut entries: Vec<_> = entries.into_iter().collect();
        entries.sort_by_key(|e| e.id);
        for entry in &entries {
            self.push(entry);
        }
        self.floor = self.floor.max(floor);
        self.head = self.head.max(head);
    }

    /// Whether a catch-up after `since` is complete from this index: `since` is no newer than
    /// the head, not older than a dropped tombstone, and of this id space (the first group of a
    /// store's ids is fixed per run or database; only `START` stands outside it).
    pub fn placeable(&self, since: EventId) -> Result<(), ResetReason> {
        if since > self.head {
            return Err(ResetReason::Unknown);
        }
        if since != EventId::START && since.epoch != self.head.epoch {
            return Err(ResetReason::Unknown);
        }
        if since < self.floor {
            return Err(ResetReason::TooOld);
        }
        Ok(())
    }

    /// At most `limit` entries after `after`, oldest first.
    pub fn page(&self, after: EventId, limit: usize) -> impl Iterator<Item = &Arc<Event>> {
        self.by_id
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(limit)
            .map(|(_, event)| event)
    }

    pub fn head(&self) -> EventId {
        self.head
    }

    pub fn floor(&self) -> EventId {
        self.floor
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskId;

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event::deleted(
            EventId { epoch: 100, seq },
            TaskId::Number(1),
        ))
    }

    fn seqs(ring: &Ring, id: EventId) -> Result<Vec<u64>, ResetReason> {
        ring.since(id)
            .map(|events| events.map(|e| e.id.seq).collect())
    }

    fn id(seq: u64) -> EventId {
        EventId { epoch: 100, seq }
    }

    #[test]
    fn replays_everything_after_a_buffered_id() {
        let mut ring = Ring::new(4);
        (1..=3).for_each(|s| ring.push(event(s)));
        assert_eq!(seqs(&ring, id(1)), Ok(vec![2, 3]));
        assert_eq!(seqs(&ring, id(3)), Ok(vec![]));
        assert_eq!(seqs(&ring, EventId::START), Ok(vec![1, 2, 3]));
    }

    #[test]
    fn keeps_only_the_last_capacity_events() {
        let mut ring = Ring::new(3);
        (1..=5).for_each(|s| ring.push(event(s)));
        assert_eq!(ring.len(), 3);
        assert_eq!(
            seqs(&ring, id(2)),
            Ok(vec![3, 4, 5]),
            "the newest evicted id is still a valid resume point"
        );
        assert_eq!(seqs(&ring, id(1)), Err(ResetReason::TooOld));
        assert_eq!(seqs(&ring, EventId::START), Err(ResetReason::TooOld));
    }

    #[test]
    fn ids_it_never_issued_are_unknown() {
        let mut ring = Ring::new(3);
        (1..=2).for_each(|s| ring.push(event(s)));
        assert_eq!(
            seqs(&ring, id(9)),
            Err(ResetReason::Unknown),
            "from the future"
        );
        assert_eq!(
            seqs(&ring, EventId { epoch: 99, seq: 5 }),
            Err(ResetReason::Unknown),
            "an earlier run"
        );
        assert_eq!(
            seqs(&ring, EventId { epoch: 101, seq: 0 }),
            Err(ResetReason::Unknown),
            "a later run"
        );
    }

    #[test]
    fn a_ring_started_part_way_knows_nothing_before_its_floor() {
        let mut ring = Ring::starting_after(4, id(10));
        assert_eq!(ring.head(), id(10));
        assert_eq!(seqs(&ring, id(10)), Ok(vec![]));
        assert_eq!(seqs(&ring, id(3)), Err(ResetReason::TooOld));
        assert_eq!(seqs(&ring, EventId::START), Err(ResetReason::TooOld));
        ring.push(event(11));
        assert_eq!(seqs(&ring, id(10)), Ok(vec![11]));
    }

    fn deleted(seq: u64, task: u64) -> Arc<Event> {
        Arc::new(Event::deleted(id(seq), TaskId::Number(task)))
    }

    fn latest_ids(latest: &Latest, after: EventId) -> Vec<u64> {
        latest.page(after, usize::MAX).map(|e| e.id.seq).collect()
    }

    #[test]
    fn the_index_keeps_one_entry_per_task_and_its_newest_tombstones() {
        let mut latest = Latest::new(2);
        let update = |seq, task| {
            Arc::new(Event::updated(
                id(seq),
                &crate::task::Task {
                    task_id: TaskId::Number(task),
                    status: None,
                    title: None,
                    assignee: None,
                    data: None,
                    version: seq,
                    updated_at: String::new(),
                },
            ))
        };
        latest.push(&update(1, 1));
        latest.push(&update(2, 2));
        latest.push(&update(3, 1));
        assert_eq!(
            latest_ids(&latest, EventId::START),
            vec![2, 3],
            "1 moved to 3"
        );
        assert_eq!(latest_ids(&latest, id(2)), vec![3]);
        for (seq, task) in [(11, 7), (12, 8), (13, 9)] {
            latest.push(&update(seq, task));
        }
        for (seq, task) in [(14, 7), (15, 8), (16, 9)] {
            latest.push(&deleted(seq, task));
        }
        // Three deletions, two kept: the oldest (at 14) is dropped and is the floor.
        assert_eq!(latest.floor(), id(14));
        assert_eq!(latest_ids(&latest, id(3)), vec![15, 16]);
        assert_eq!(latest.placeable(id(13)), Err(ResetReason::TooOld));
        assert_eq!(latest.placeable(id(14)), Ok(()));
        assert_eq!(latest.placeable(id(17)), Err(ResetReason::Unknown));
        assert_eq!(
            latest.placeable(EventId { epoch: 99, seq: 15 }),
            Err(ResetReason::Unknown),
            "another run"
        );
        latest.push(&update(17, 8));
        assert_eq!(
            latest_ids(&latest, id(3)),
            vec![16, 17],
            "a task created again loses its tombstone"
        );
    }

    #[test]
    fn an_empty_ring_answers_start_with_nothing() {
        let ring = Ring::new(3);
        assert_eq!(ring.head(), EventId::START);
        assert_eq!(seqs(&ring, EventId::START), Ok(vec![]));
        assert_eq!(seqs(&ring, id(1)), Err(ResetReason::Unknown));
    }
}
