//! A worker's book: the events taken from its subscription and not yet finished (delivered or
//! dead-lettered), kept in order per task, within a bounded window, and the low-water mark
//! below which everything is finished: the position that is stored.

use crate::event::{Event, EventId};
use crate::task::TaskId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

enum Entry {
    /// Taken at this instant and not finished.
    Open(Instant),
    Finished,
}

pub struct Book {
    position: EventId,
    /// Every id taken and above `position`, finished or not; bounded by `window`.
    taken: BTreeMap<EventId, Entry>,
    /// Per task, its events not finished, oldest first: only the first may be in flight.
    queues: HashMap<TaskId, VecDeque<Arc<Event>>>,
    /// Tasks whose first event waits for a free slot, in the order they became ready.
    ready: VecDeque<TaskId>,
    in_flight: usize,
    concurrency: usize,
    window: usize,
    /// Whether ids at or below the position are duplicates (a subscription's replay overlapping
    /// what was finished). Not on Redis, where an entry handed out again is one still pending:
    /// its acknowledgement was lost, and it must be sent again.
    skip_finished: bool,
}

impl Book {
    /// `position`: everything up to it is finished (where the subscription resumes).
    pub fn new(position: EventId, concurrency: usize, window: usize) -> Book {
        Book {
            position,
            taken: BTreeMap::new(),
            queues: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            concurrency,
            window,
            skip_finished: true,
        }
    }

    /// For a Redis consumer group: every entry handed out is taken (see `skip_finished`).
    pub fn for_group(concurrency: usize, window: usize) -> Book {
        Book {
            skip_finished: false,
            ..Book::new(EventId::START, concurrency, window)
        }
    }

    pub fn position(&self) -> EventId {
        self.position
    }

    /// Whether another event may be taken. When not, the subscription is not read: it falls
    /// behind and later catches up from the log, so memory stays bounded whatever a receiver does.
    pub fn has_room(&self) -> bool {
        self.taken.len() < self.window
    }

    pub fn take(&mut self, event: Arc<Event>) {
        if (self.skip_finished && event.id <= self.position) || self.taken.contains_key(&event.id) {
            return;
        }
        self.taken.insert(event.id, Entry::Open(Instant::now()));
        let queue = self.queues.entry(event.task_id.clone()).or_default();
        if queue.is_empty() {
            self.ready.push_back(event.task_id.clone());
        }
        queue.push_back(event);
    }

    /// The next event to send, if a slot is free: the first of a ready task.
    pub fn next_to_send(&mut self) -> Option<Arc<Event>> {
        if self.in_flight >= self.concurrency {
            return None;
        }
        let task = self.ready.pop_front()?;
        let event = self.queues.get(&task)?.front()?.clone();
        self.in_flight += 1;
        Some(event)
    }

    /// `event` (the first of its task, in flight) is delivered or dead-lettered: the next event of
    /// its task becomes ready, and the position moves past every finished id at the front.
    pub fn finish(&mut self, event: &Event) {
        self.in_flight -= 1;
        if let Some(queue) = self.queues.get_mut(&event.task_id) {
            queue.pop_front();
            if queue.is_empty() {
                self.queues.remove(&event.task_id);
            } else {
                self.ready.push_back(event.task_id.clone());
            }
        }
        if let Some(entry) = self.taken.get_mut(&event.id) {
            *entry = Entry::Finished;
        }
        self.fold();
    }

    /// An event given up without an answer (shutdown): it stays open, so the position stays
    /// before it and it is sent again after a restart.
    pub fn abandon(&mut self) {
        self.in_flight -= 1;
    }

    /// The log skipped to `newest` (a `reset`: the events in between are gone, counted by the
    /// caller): nothing before it can be delivered any more.
    pub fn skip_to(&mut self, newest: EventId) {
        if newest > self.position {
            self.taken.entry(newest).or_insert(Entry::Finished);
            self.fold();
        }
    }

    fn fold(&mut self) {
        while let Some(entry) = self.taken.first_entry() {
            if matches!(entry.get(), Entry::Open(_)) {
                break;
            }
            self.position = *entry.key();
            entry.remove();
        }
    }

    /// Events taken and not finished.
    pub fn open(&self) -> usize {
        self.taken
            .values()
            .filter(|entry| matches!(entry, Entry::Open(_)))
            .count()
    }

    /// When the oldest unfinished event was taken.
    pub fn oldest(&self) -> Option<Instant> {
        self.taken.values().find_map(|entry| match entry {
            Entry::Open(at) => Some(*at),
            Entry::Finished => None,
        })
    }

    /// The newest id taken, or the position.
    pub fn newest_taken(&self) -> EventId {
        self.taken
            .last_key_value()
            .map_or(self.position, |(id, _)| *id)
            .max(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, task: u64) -> Arc<Event> {
        Arc::new(Event::deleted(
            EventId { epoch: 1, seq },
            TaskId::Number(task),
        ))
    }

    #[test]
    fn a_task_waits_for_its_earlier_event_and_others_do_not() {
        let mut book = Book::new(EventId { epoch: 1, seq: 0 }, 4, 100);
        book.take(event(1, 7));
        book.take(event(2, 7));
        book.take(event(3, 8));
        let first = book.next_to_send().unwrap();
        assert_eq!(first.id.seq, 1);
        let other = book.next_to_send().unwrap();
        assert_eq!(other.id.seq, 3, "task 8 does not wait for task 7");
        assert!(
            book.next_to_send().is_none(),
            "event 2 waits for event 1 of its task"
        );
        book.finish(&first);
        assert_eq!(book.next_to_send().unwrap().id.seq, 2);
    }

    #[test]
    fn the_position_is_the_low_water_mark() {
        let mut book = Book::new(EventId { epoch: 1, seq: 0 }, 4, 100);
        for (seq, task) in [(1, 1), (2, 2), (3, 3)] {
            book.take(event(seq, task));
        }
        let (a, b, c) = (
            book.next_to_send().unwrap(),
            book.next_to_send().unwrap(),
            book.next_to_send().unwrap(),
        );
        book.finish(&b);
        book.finish(&c);
        assert_eq!(book.position().seq, 0, "event 1 is still open");
        assert_eq!(book.open(), 1);
        book.finish(&a);
        assert_eq!(book.position().seq, 3);
        assert_eq!(book.open(), 0);
    }

    #[test]
    fn a_group_book_takes_an_entry_handed_out_again() {
        let mut book = Book::for_group(2, 10);
        book.take(event(5, 1));
        let sent = book.next_to_send().unwrap();
        book.finish(&sent);
        book.take(event(3, 2));
        assert_eq!(book.open(), 1, "still pending in Redis: sent again");
        let mut book = Book::new(EventId { epoch: 1, seq: 0 }, 2, 10);
        book.take(event(5, 1));
        let sent = book.next_to_send().unwrap();
        book.finish(&sent);
        book.take(event(3, 2));
        assert_eq!(book.open(), 0, "below the position: a replay's duplicate");
    }

    #[test]
    fn concurrency_and_window_bound_the_book() {
        let mut book = Book::new(EventId { epoch: 1, seq: 0 }, 2, 3);
        for seq in 1..=3 {
            book.take(event(seq, seq));
        }
        assert!(!book.has_room());
        assert!(book.next_to_send().is_some());
        assert!(book.next_to_send().is_some());
        assert!(book.next_to_send().is_none(), "two in flight at most");
        book.abandon();
        assert_eq!(
            book.position().seq,
            0,
            "an abandoned event keeps the position"
        );
    }

    #[test]
    fn a_skip_moves_past_the_gap_but_not_past_open_events() {
        let mut book = Book::new(EventId { epoch: 1, seq: 0 }, 2, 10);
        book.skip_to(EventId { epoch: 1, seq: 50 });
        assert_eq!(book.position().seq, 50);
        book.take(event(51, 1));
        book.skip_to(EventId { epoch: 1, seq: 90 });
        assert_eq!(book.position().seq, 50);
        let open = book.next_to_send().unwrap();
        book.finish(&open);
        assert_eq!(book.position().seq, 90);
    }
}
