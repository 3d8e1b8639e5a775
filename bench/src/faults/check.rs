//! The books of a fault run and the rules they are checked by: per subscriber lost, duplicated
//! and out-of-order deliveries (a `reset` excuses exactly the events it covers), idempotency
//! duplicates, and the final state every node must show.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::Bound::{Excluded, Unbounded};

/// An event id: taskstream's are two decimal groups (`<ms>-<n>` on Redis, `<epoch>-<n>` in
/// memory), compared group by group.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Id(pub u64, pub u64);

impl Id {
    /// Before every event.
    pub const START: Id = Id(0, 0);

    pub fn parse(text: &str) -> Option<Id> {
        let (a, b) = text.split_once('-').unwrap_or((text, "0"));
        Some(Id(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Which publish an event came from: (publisher, its sequence number). Each has its own
/// Idempotency-Key, reused on every retry.
pub type Key = (u32, u64);

/// What one event says about the state: which task, which publish, which version.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Commit {
    pub task: u32,
    pub key: Key,
    pub version: u64,
}

/// What a subscriber did, in order.
#[derive(Clone, Debug)]
pub enum Rec {
    /// A new connection, resuming after this id (`None`: after `START`).
    Connect(Option<Id>),
    Event(Id),
    Reset(Id),
}

/// One subscriber's whole run.
#[derive(Clone, Debug, Default)]
pub struct Book {
    pub name: String,
    pub transport: &'static str,
    /// The snapshot id it started after.
    pub start: Id,
    /// `?task_id=` / `task_ids`: only these tasks.
    pub filter: Option<Vec<u32>>,
    pub recs: Vec<Rec>,
    /// Every event received, as its data told.
    pub seen: Vec<(Id, Commit)>,
    /// Connections that did not open (refused, timed out, status not 200).
    pub failed_connects: u64,
    /// WebSocket close codes received, and how often.
    pub close_codes: BTreeMap<u16, u64>,
    /// Events of a task outside the filter, error messages, unparseable frames.
    pub protocol_errors: Vec<String>,
}

impl Book {
    pub fn wants(&self, task: u32) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|tasks| tasks.contains(&task))
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SubCheck {
    pub name: String,
    pub transport: &'static str,
    pub filtered: bool,
    pub connects: u64,
    /// Connections that resumed after an id the client had not reached: the client's own
    /// fault (only `--sabotage` does it).
    pub resumed_ahead: u64,
    pub failed_connects: u64,
    pub received: u64,
    pub resets: u64,
    /// Events a reset excused.
    pub excused: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub protocol_errors: u64,
    pub lost_samples: Vec<String>,
    #[serde(skip)]
    pub lost_ids: Vec<Id>,
    pub close_codes: BTreeMap<u16, u64>,
}

impl SubCheck {
    pub fn failed(&self) -> bool {
        self.lost + self.duplicated + self.out_of_order + self.protocol_errors > 0
    }
}

/// Checks one subscriber against every committed event: each one after its start that its filter
/// wants must have arrived once, in id order, or lie inside a reset's span (after the position
/// the subscriber had when the reset came, up to the reset's id).
pub fn check(book: &Book, committed: &BTreeMap<Id, Commit>) -> SubCheck {
    let mut out = SubCheck {
        name: book.name.clone(),
        transport: book.transport,
        filtered: book.filter.is_some(),
        failed_connects: book.failed_connects,
        protocol_errors: book.protocol_errors.len() as u64,
        close_codes: book.close_codes.clone(),
        ..SubCheck::default()
    };
    let mut seen = HashSet::new();
    let mut position = book.start;
    let mut spans = Vec::new();
    for rec in &book.recs {
        match *rec {
            Rec::Connect(resume) => {
                out.connects += 1;
                if resume.unwrap_or(Id::START) > position {
                    out.resumed_ahead += 1;
                }
            }
            Rec::Event(id) => {
                out.received += 1;
                if !seen.insert(id) {
                    out.duplicated += 1;
                } else if id <= position {
                    out.out_of_order += 1;
                } else {
                    position = id;
                }
            }
            Rec::Reset(newest) => {
                out.resets += 1;
                if newest > position {
                    spans.push((position, newest));
                    position = newest;
                }
            }
        }
    }
    for (id, commit) in committed.range((Excluded(book.start), Unbounded)) {
        if !book.wants(commit.task) || seen.contains(id) {
            continue;
        }
        if spans.iter().any(|&(low, high)| low < *id && *id <= high) {
            out.excused += 1;
        } else {
            out.lost += 1;
            out.lost_ids.push(*id);
            if out.lost_samples.len() < 5 {
                out.lost_samples.push(id.to_string());
            }
        }
    }
    out
}

/// Every committed event, from the publishers' acknowledgements and from what subscribers
/// received (an event whose `202` was lost is committed all the same). Answers the conflicts:
/// one id that two sources describe differently.
pub fn committed<'a>(
    acks: impl Iterator<Item = (Id, Commit)>,
    seen: impl Iterator<Item = &'a (Id, Commit)>,
) -> (BTreeMap<Id, Commit>, Vec<String>) {
    let mut all = BTreeMap::new();
    let mut conflicts = Vec::new();
    for (id, commit) in acks.chain(seen.copied()) {
        match all.insert(id, commit) {
            Some(before) if before != commit => {
                conflicts.push(format!("event {id} is {before:?} and {commit:?}"));
            }
            _ => {}
        }
    }
    (all, conflicts)
}

/// Idempotency-Keys that produced more than one event.
pub fn idempotency_duplicates(committed: &BTreeMap<Id, Commit>) -> Vec<String> {
    let mut by_key: HashMap<Key, BTreeSet<Id>> = HashMap::new();
    for (id, commit) in committed {
        by_key.entry(commit.key).or_default().insert(*id);
    }
    let mut out: Vec<String> = by_key
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|((p, s), ids)| {
            let ids: Vec<String> = ids.iter().map(Id::to_string).collect();
            format!("key {p}-{s}: events {}", ids.join(", "))
        })
        .collect();
    out.sort();
    out
}

/// A task as a node's `GET /tasks` shows it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Shown {
    pub version: u64,
    pub key: Option<Key>,
}

/// Compares a node's snapshot with the committed events: every task at the version and data of
/// its last event, the snapshot's id the newest event's. Also checks that each task's versions
/// run 1, 2, 3... in id order: a gap is a committed event nobody saw or acknowledged.
pub fn state_mismatches(
    node: &str,
    last_event_id: Option<Id>,
    tasks: &BTreeMap<u32, Shown>,
    committed: &BTreeMap<Id, Commit>,
) -> Vec<String> {
    let mut out = Vec::new();
    let newest = committed.keys().next_back().copied();
    if last_event_id != newest {
        out.push(format!(
            "{node}: last_event_id {last_event_id:?}, the newest event is {newest:?}"
        ));
    }
    let mut expected: BTreeMap<u32, Commit> = BTreeMap::new();
    for commit in committed.values() {
        expected.insert(commit.task, *commit);
    }
    for (task, commit) in &expected {
        let want = Shown {
            version: commit.version,
            key: Some(commit.key),
        };
        match tasks.get(task) {
            Some(shown) if *shown == want => {}
            Some(shown) => out.push(format!(
                "{node}: task {task} is {shown:?}, expected {want:?}"
            )),
            None => out.push(format!("{node}: task {task} is missing")),
        }
    }
    for task in tasks.keys().filter(|t| !expected.contains_key(t)) {
        out.push(format!("{node}: task {task} has no committed event"));
    }
    out
}

/// Tasks whose committed versions do not run 1, 2, 3... in id order.
pub fn version_gaps(committed: &BTreeMap<Id, Commit>) -> Vec<String> {
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for (id, commit) in committed {
        let want = next.entry(commit.task).or_insert(1);
        if commit.version != *want {
            out.push(format!(
                "task {}: event {id} has version {}, expected {}",
                commit.task, commit.version, want
            ));
        }
        *want = commit.version + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(task: u32, seq: u64, version: u64) -> Commit {
        Commit {
            task,
            key: (0, seq),
            version,
        }
    }

    fn log(n: u64) -> BTreeMap<Id, Commit> {
        (1..=n)
            .map(|s| (Id(1, s), commit((s % 2) as u32, s, s.div_ceil(2))))
            .collect()
    }

    fn book(recs: Vec<Rec>) -> Book {
        Book {
            start: Id(1, 0),
            recs,
            ..Book::default()
        }
    }

    #[test]
    fn every_event_once_in_order_is_clean() {
        let c = check(
            &book((1..=5).map(|s| Rec::Event(Id(1, s))).collect()),
            &log(5),
        );
        assert_eq!(
            (c.received, c.lost, c.duplicated, c.out_of_order),
            (5, 0, 0, 0)
        );
        assert!(!c.failed());
    }

    #[test]
    fn a_gap_is_lost_and_a_reset_excuses_exactly_its_span() {
        let recs = vec![
            Rec::Event(Id(1, 1)),
            Rec::Connect(Some(Id(1, 2))),
            Rec::Event(Id(1, 3)),
            Rec::Reset(Id(1, 5)),
            Rec::Event(Id(1, 7)),
        ];
        let c = check(&book(recs), &log(7));
        // 2 skipped by the resume, 4 and 5 under the reset, 6 after it and never sent.
        assert_eq!(c.excused, 2);
        assert_eq!(c.lost, 2);
        assert_eq!(c.lost_samples, vec!["1-2", "1-6"]);
    }

    #[test]
    fn duplicates_and_disorder_are_counted_apart() {
        let recs = vec![
            Rec::Event(Id(1, 1)),
            Rec::Event(Id(1, 3)),
            Rec::Event(Id(1, 2)),
            Rec::Event(Id(1, 3)),
        ];
        let c = check(&book(recs), &log(3));
        assert_eq!((c.lost, c.duplicated, c.out_of_order), (0, 1, 1));
    }

    #[test]
    fn a_filter_only_expects_its_tasks() {
        let mut b = book(vec![Rec::Event(Id(1, 2)), Rec::Event(Id(1, 4))]);
        b.filter = Some(vec![0]);
        assert_eq!(check(&b, &log(5)).lost, 0);
        b.filter = Some(vec![1]);
        assert_eq!(check(&b, &log(5)).lost, 3);
    }

    #[test]
    fn one_key_two_events_is_an_idempotency_duplicate() {
        let mut c = log(3);
        assert!(idempotency_duplicates(&c).is_empty());
        c.insert(Id(1, 9), commit(1, 2, 3));
        assert_eq!(idempotency_duplicates(&c), vec!["key 0-2: events 1-2, 1-9"]);
    }

    #[test]
    fn the_final_state_is_each_tasks_last_event() {
        let c = log(4);
        let shown = |v, s| Shown {
            version: v,
            key: Some((0, s)),
        };
        let mut tasks = BTreeMap::from([(0, shown(2, 4)), (1, shown(2, 3))]);
        assert!(state_mismatches("n", Some(Id(1, 4)), &tasks, &c).is_empty());
        assert_eq!(state_mismatches("n", Some(Id(1, 3)), &tasks, &c).len(), 1);
        tasks.insert(1, shown(1, 1));
        assert_eq!(state_mismatches("n", Some(Id(1, 4)), &tasks, &c).len(), 1);
        assert!(version_gaps(&c).is_empty());
        let mut gap = c.clone();
        gap.remove(&Id(1, 2));
        assert_eq!(version_gaps(&gap).len(), 1);
    }

    #[test]
    fn acknowledged_and_seen_agree_or_conflict() {
        let ack = vec![(Id(1, 1), commit(1, 1, 1))];
        let seen = [(Id(1, 1), commit(1, 1, 1)), (Id(1, 2), commit(1, 2, 2))];
        let (all, conflicts) = committed(ack.into_iter(), seen.iter());
        assert_eq!(all.len(), 2);
        assert!(conflicts.is_empty());
        let other = [(Id(1, 1), commit(2, 1, 1))];
        let (_, conflicts) = committed(all.clone().into_iter(), other.iter());
        assert_eq!(conflicts.len(), 1);
    }
}
