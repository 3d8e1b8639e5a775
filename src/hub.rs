//! Fan-out: one broadcast channel of shared events; each subscription replays, then goes live with
//! no gap, and recovers from lag through the ring buffer or by a `reset`, never by skipping.

use crate::auth::Patterns;
use crate::event::{Event, EventId};
use crate::metrics::Metrics;
use crate::ring::{ResetReason, Ring};
use crate::task::TaskId;
use futures_util::{Stream, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Live events only.
    Live,
    /// Everything after this id, then live.
    After(EventId),
    /// The client sent an id that cannot be parsed: it gets a `reset`, never an error status,
    /// because a browser's EventSource gives up for good on one.
    Malformed,
}

/// Which events reach a subscriber, and until when. Applied inside the `Subscription`, to replay,
/// live events and catch-up alike, so every transport gets the same rules.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// The tasks the client asked for (`?task_id=`); `None`: all.
    pub ids: Option<Arc<HashSet<TaskId>>>,
    /// The tasks its token may see; `None` when auth is off. Intersected with `ids`.
    pub patterns: Option<Patterns>,
    /// When its token expires: the subscription ends then, between two deliveries.
    pub until: Option<tokio::time::Instant>,
}

impl TaskFilter {
    /// Every task, for ever.
    pub fn all() -> TaskFilter {
        TaskFilter::default()
    }

    /// Only these tasks (all when the set is empty).
    pub fn ids(ids: HashSet<TaskId>) -> TaskFilter {
        TaskFilter {
            ids: (!ids.is_empty()).then(|| Arc::new(ids)),
            ..TaskFilter::default()
        }
    }

    pub fn allows(&self, task_id: &TaskId) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(task_id))
            && self.patterns.as_ref().is_none_or(|p| p.matches(task_id))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("too many subscribers (the limit is {0})")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
}

pub struct Hub {
    inner: Mutex<Inner>,
    subscribers: AtomicUsize,
    max_subscribers: usize,
    metrics: Arc<Metrics>,
}

struct Inner {
    ring: Ring,
    /// `None` once the hub is closed: every live stream then ends after its last complete frame.
    sender: Option<broadcast::Sender<Arc<Event>>>,
}

impl Hub {
    /// `buffer` events stay replayable. The live channel holds half as many, so a subscriber that
    /// falls behind by more than the channel holds usually still finds its place in the ring.
    pub fn new(buffer: usize, max_subscribers: usize, metrics: Arc<Metrics>) -> Hub {
        let (sender, _) = broadcast::channel((buffer / 2).max(1));
        Hub {
            inner: Mutex::new(Inner {
                ring: Ring::new(buffer),
                sender: Some(sender),
            }),
            subscribers: AtomicUsize::new(0),
            max_subscribers,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding this lock, but if something did the ring is still
        // consistent (every mutation is a single push), so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records and fans out an event. Never waits for a subscriber: a full channel overwrites its
    /// oldest slot and the subscribers that had not read it recover through the ring.
    /// Callers publish in id order (the backend holds its own lock around id assignment and this).
    pub fn publish(&self, event: Arc<Event>) {
        let mut inner = self.lock();
        inner.ring.push(event.clone());
        if let Some(sender) = &inner.sender {
            // An error only means nobody is subscribed right now.
            let _ = sender.send(event);
        }
        self.metrics.events_published.inc();
    }

    /// The newest position: the id of the newest event, or `START` before the first.
    pub fn head(&self) -> EventId {
        self.lock().ring.head()
    }

    /// Starts a subscription: it registers for live events and reads the replay under one lock,
    /// so the live part begins exactly after the replayed part (no gap, no duplicate).
    pub fn subscribe(
        self: &Arc<Self>,
        resume: Resume,
        filter: TaskFilter,
    ) -> Result<Subscription, SubscribeError> {
        let count = self.subscribers.fetch_add(1, Ordering::AcqRel) + 1;
        // From here on, dropping `slot` gives the place back, on every early return too.
        let slot = SubscriberSlot { hub: self.clone() };
        if count > self.max_subscribers {
            return Err(SubscribeError::Full(self.max_subscribers));
        }
        let inner = self.lock();
        let sender = inner.sender.as_ref().ok_or(SubscribeError::Closed)?;
        let live = BroadcastStream::new(sender.subscribe());
        let head = inner.ring.head();
        let mut backlog = VecDeque::new();
        let mut pending_reset = None;
        match resume {
            Resume::Live => {}
            Resume::Malformed => pending_reset = Some(ResetReason::Malformed),
            Resume::After(id) => match inner.ring.since(id) {
                Ok(events) => backlog.extend(events.cloned()),
                Err(reason) => pending_reset = Some(reason),
            },
        }
        drop(inner);
        self.metrics.subscribers.inc();
        Ok(Subscription {
            expiry: filter
                .until
                .map(|until| Box::pin(tokio::time::sleep_until(until))),
            hub: self.clone(),
            live,
            backlog,
            pending_reset: pending_reset.map(|reason| (head, reason)),
            last_id: head,
            filter,
            _slot: slot,
        })
    }

    /// Ends every live stream (after the frames already queued) and refuses new subscribers.
    pub fn close(&self) {
        self.lock().sender = None;
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }
}

/// Holds one place under `--max-subscribers` for as long as it lives.
struct SubscriberSlot {
    hub: Arc<Hub>,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.hub.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a subscription yields, in order.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<Event>),
    /// Events were missed: the client must reload the snapshot; live events follow `newest`.
    Reset {
        newest: EventId,
        reason: ResetReason,
    },
}

/// One subscriber's view of the hub. Dropping it frees its place and its channel cursor.
pub struct Subscription {
    hub: Arc<Hub>,
    live: BroadcastStream<Arc<Event>>,
    /// Replayed or caught-up events not yet delivered; bounded by the ring's capacity.
    backlog: VecDeque<Arc<Event>>,
    pending_reset: Option<(EventId, ResetReason)>,
    /// Every event up to here was delivered, filtered out or covered by a reset; live events at or
    /// below it are duplicates of the backlog.
    last_id: EventId,
    filter: TaskFilter,
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: SubscriberSlot,
}

impl Subscription {
    fn wants(&self, event: &Event) -> bool {
        self.filter.allows(&event.task_id)
    }

    /// After a lag, refills the backlog from the ring, or turns into a reset when the ring no
    /// longer reaches back to `last_id`.
    fn catch_up(&mut self) {
        self.hub.metrics.lagged_subscribers.inc();
        let inner = self.hub.lock();
        match inner.ring.since(self.last_id) {
            Ok(events) => self.backlog.extend(events.cloned()),
            Err(reason) => self.pending_reset = Some((inner.ring.head(), reason)),
        }
        self.last_id = inner.ring.head();
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        // Checked before every delivery: once the token has expired nothing more goes out, and
        // the stream ends between two complete deliveries.
        if let Some(expiry) = &mut this.expiry {
            if expiry.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        loop {
            if let Some((newest, reason)) = this.pending_reset.take() {
                this.hub.metrics.resets.inc();
                this.backlog.clear();
                return Poll::Ready(Some(Delivery::Reset { newest, reason }));
            }
            while let Some(event) = this.backlog.pop_front() {
                if this.wants(&event) {
                    this.hub.metrics.events_replayed.inc();
                    return Poll::Ready(Some(Delivery::Event(event)));
                }
            }
            match ready!(this.live.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(event)) => {
                    if event.id <= this.last_id {
                        continue;
                    }
                    this.last_id = event.id;
                    if this.wants(&event) {
                        return Poll::Ready(Some(Delivery::Event(event)));
                    }
                }
                Some(Err(BroadcastStreamRecvError::Lagged(_))) => this.catch_up(),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.metrics.subscribers.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use proptest::prelude::*;

    fn hub(buffer: usize) -> Arc<Hub> {
        Arc::new(Hub::new(buffer, 100, Arc::new(Metrics::new())))
    }

    fn publish(hub: &Hub, seq: u64) {
        hub.publish(Arc::new(Event::deleted(
            EventId { epoch: 1, seq },
            TaskId::Number(seq % 3 + 1),
        )));
    }

    /// Everything the subscription can deliver without waiting.
    fn drain(sub: &mut Subscription) -> Vec<Delivery> {
        std::iter::from_fn(|| sub.next().now_or_never().flatten()).collect()
    }

    fn seqs(deliveries: &[Delivery]) -> Vec<u64> {
        deliveries
            .iter()
            .map(|d| match d {
                Delivery::Event(e) => e.id.seq,
                Delivery::Reset { .. } => 0,
            })
            .collect()
    }

    #[test]
    fn replay_joins_live_without_gap_or_duplicate() {
        let hub = hub(8);
        (1..=3).for_each(|s| publish(&hub, s));
        let mut sub = hub
            .subscribe(
                Resume::After(EventId { epoch: 1, seq: 1 }),
                TaskFilter::all(),
            )
            .unwrap();
        (4..=5).for_each(|s| publish(&hub, s));
        assert_eq!(seqs(&drain(&mut sub)), vec![2, 3, 4, 5]);
    }

    #[test]
    fn a_lagging_subscriber_catches_up_from_the_ring() {
        let hub = hub(16); // channel of 8
        let mut sub = hub.subscribe(Resume::Live, TaskFilter::all()).unwrap();
        (1..=14).for_each(|s| publish(&hub, s));
        assert_eq!(seqs(&drain(&mut sub)), (1..=14).collect::<Vec<_>>());
    }

    #[test]
    fn a_subscriber_lagging_past_the_ring_gets_a_reset_then_live() {
        let hub = hub(4);
        let mut sub = hub.subscribe(Resume::Live, TaskFilter::all()).unwrap();
        (1..=10).for_each(|s| publish(&hub, s));
        let got = drain(&mut sub);
        assert!(
            matches!(got[0], Delivery::Reset { newest, reason: ResetReason::TooOld } if newest.seq == 10),
            "{got:?}"
        );
        publish(&hub, 11);
        assert_eq!(seqs(&drain(&mut sub)), vec![11]);
    }

    #[test]
    fn the_filter_applies_to_replay_and_live() {
        let hub = hub(8);
        (1..=3).for_each(|s| publish(&hub, s)); // tasks 2, 3, 1
        let filter = TaskFilter::ids(HashSet::from([TaskId::Number(1)]));
        let mut sub = hub
            .subscribe(Resume::After(EventId::START), filter)
            .unwrap();
        (4..=6).for_each(|s| publish(&hub, s)); // tasks 2, 3, 1
        assert_eq!(seqs(&drain(&mut sub)), vec![3, 6]);
    }

    #[test]
    fn token_patterns_intersect_the_requested_ids_in_replay_catch_up_and_live() {
        let hub = hub(4); // channel of 2: the live part below overflows it and catches up
        (1..=3).for_each(|s| publish(&hub, s)); // tasks 2, 3, 1
        let filter = TaskFilter {
            ids: Some(Arc::new(HashSet::from([
                TaskId::Number(1),
                TaskId::Number(2),
            ]))),
            patterns: Some(Patterns::parse(&["1", "3"]).unwrap()),
            until: None,
        };
        let mut sub = hub
            .subscribe(Resume::After(EventId::START), filter)
            .unwrap();
        (4..=6).for_each(|s| publish(&hub, s)); // tasks 2, 3, 1
        assert_eq!(seqs(&drain(&mut sub)), vec![3, 6], "only task 1 is in both");
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_ends_when_its_token_expires() {
        let hub = hub(4);
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut sub = hub
            .subscribe(
                Resume::Live,
                TaskFilter {
                    until: Some(until),
                    ..TaskFilter::all()
                },
            )
            .unwrap();
        publish(&hub, 1);
        assert_eq!(seqs(&[sub.next().await.unwrap()]), vec![1]);
        assert!(sub.next().await.is_none(), "ends at expiry, with no event");
        assert_eq!(tokio::time::Instant::now(), until);
        drop(sub);
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn the_subscriber_limit_counts_live_subscriptions() {
        let hub = Arc::new(Hub::new(4, 1, Arc::new(Metrics::new())));
        let first = hub.subscribe(Resume::Live, TaskFilter::all()).unwrap();
        assert_eq!(
            hub.subscribe(Resume::Live, TaskFilter::all()).err(),
            Some(SubscribeError::Full(1))
        );
        drop(first);
        assert!(hub.subscribe(Resume::Live, TaskFilter::all()).is_ok());
        assert_eq!(hub.subscriber_count(), 0);
    }

    #[test]
    fn closing_ends_streams_after_queued_events() {
        let hub = hub(4);
        let mut sub = hub.subscribe(Resume::Live, TaskFilter::all()).unwrap();
        publish(&hub, 1);
        hub.close();
        assert_eq!(seqs(&drain(&mut sub)), vec![1]);
        assert!(
            matches!(sub.next().now_or_never(), Some(None)),
            "the stream ends"
        );
        assert_eq!(
            hub.subscribe(Resume::Live, TaskFilter::all()).err(),
            Some(SubscribeError::Closed)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish(u8),
        /// Subscribe resuming from the n-th published event back (0 = live only).
        Subscribe(u8),
        /// Let subscriber i read up to n deliveries.
        Read(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..20).prop_map(Op::Publish),
            1 => (0u8..24).prop_map(Op::Subscribe),
            3 => (any::<u8>(), 1u8..40).prop_map(|(i, n)| Op::Read(i, n)),
        ]
    }

    proptest! {
        /// Whatever the interleaving of publishing, subscribing with an id and reading (slowly
        /// enough to lag), every subscriber sees each later event exactly once and in order, and a
        /// reset only ever replaces missing events, after which delivery continues in order.
        #[test]
        fn no_interleaving_loses_or_duplicates_an_event(ops in proptest::collection::vec(op(), 1..120)) {
            let hub = hub(16);
            let mut published = 0u64;
            // Per subscriber: the subscription, what it has seen, and the seq it started after.
            let mut subs: Vec<(Subscription, Vec<Delivery>, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Publish(n) => for _ in 0..n {
                        published += 1;
                        publish(&hub, published);
                    },
                    Op::Subscribe(back) => {
                        let resume = match u64::from(back) {
                            0 => Resume::Live,
                            back => Resume::After(EventId { epoch: if back > published { 0 } else { 1 }, seq: published.saturating_sub(back) }),
                        };
                        let start = match resume { Resume::After(id) => id.seq, _ => published };
                        subs.push((hub.subscribe(resume, TaskFilter::all()).unwrap(), Vec::new(), start));
                    }
                    Op::Read(i, n) => if !subs.is_empty() {
                        let index = usize::from(i) % subs.len();
                        let (sub, seen, _) = &mut subs[index];
                        for _ in 0..n {
                            match sub.next().now_or_never().flatten() { Some(d) => seen.push(d), None => break }
                        }
                    },
                }
            }
            for (mut sub, mut seen, start) in subs {
                seen.extend(drain(&mut sub));
                let mut expected_next = start + 1;
                for delivery in &seen {
                    match delivery {
                        Delivery::Event(e) => {
                            prop_assert_eq!(e.id.seq, expected_next, "gap or duplicate in {:?}", seqs(&seen));
                            expected_next += 1;
                        }
                        Delivery::Reset { newest, .. } => {
                            prop_assert!(newest.seq + 1 >= expected_next, "a reset went backwards");
                            expected_next = newest.seq + 1;
                        }
                    }
                }
                prop_assert_eq!(expected_next, published + 1, "events missing at the end: {:?}", seqs(&seen));
            }
        }
    }
}
