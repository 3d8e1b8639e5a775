//! The stream as the hub's `History`: replays older than a node's ring, page by page, each page
//! checked to continue the one before; where the stream no longer reaches back, the compacted
//! catch-up from the index the write scripts keep.

use super::reader::entries;
use super::reader::Entry;
use super::scripts::{
    CATCHUP_FLOOR_KEY, HEAD_KEY, LATEST_KEY, PADDED_ID, PAGE, POSITIONS_KEY, STREAM_KEY, TASKS_KEY,
    TOMBSTONES_KEY, TOMBSTONE_FLOOR_KEY,
};
use super::store::{parse_id, text, Backoff, Store};
use crate::event::{Event, EventId};
use crate::hub::{Backfill, History};
use crate::ring::ResetReason;
use crate::task::{Task, TaskId};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use log::debug;
use redis::Value;
use std::sync::Arc;

impl Store {
    /// One page of the stream after `after`, with the newest id read in the same script.
    pub(super) async fn read_page(&self, after: EventId) -> Result<(EventId, Vec<Entry>), String> {
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
    pub(super) async fn replay_after(&self, after: EventId) -> Backfill {
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

    /// The compacted catch-up after `after`: each task changed since, at its latest event, read in
    /// one script with the head it is complete up to; a reset when the index began after `after`
    /// (an older version wrote those events) or dropped a tombstone after it.
    pub(super) async fn compacted_after(&self, after: EventId, newest: EventId) -> Backfill {
        let mut backoff = Backoff::new();
        loop {
            match self.read_compacted(after).await {
                Ok(Some(backfill)) => return backfill,
                Ok(None) => {
                    return Backfill::Reset {
                        newest,
                        reason: ResetReason::TooOld,
                    }
                }
                Err(e) => {
                    debug!("redis: the catch-up after {after} failed ({e}); retrying");
                    backoff.sleep().await;
                }
            }
        }
    }

    async fn read_compacted(&self, after: EventId) -> Result<Option<Backfill>, String> {
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self
            .within_timeout(
                self.catch_up
                    .key(HEAD_KEY)
                    .key(TASKS_KEY)
                    .key(POSITIONS_KEY)
                    .key(LATEST_KEY)
                    .key(TOMBSTONES_KEY)
                    .key(CATCHUP_FLOOR_KEY)
                    .key(TOMBSTONE_FLOOR_KEY)
                    .arg(padded(after))
                    .invoke_async(&mut conn),
            )
            .await?;
        let newest = text(reply.first())
            .and_then(parse_id)
            .ok_or("the catch-up script answered no head")?;
        let floor = |at: usize| -> Option<EventId> { text(reply.get(at)).and_then(parse_padded) };
        // No floor: nothing was written with the index yet.
        let Some(catchup_floor) = floor(1) else {
            return Ok(None);
        };
        if after < catchup_floor || floor(2).is_some_and(|dropped| after < dropped) {
            return Ok(None);
        }
        let members = |at: usize| match reply.get(at) {
            Some(Value::Array(members)) => members.as_slice(),
            _ => &[],
        };
        let mut events = Vec::new();
        for (member, json) in members(3).iter().zip(members(5)) {
            let (id, task_id) = parse_member(text(Some(member)))?;
            let task = Task::from_stored(text(Some(json)).unwrap_or_default())
                .map_err(|e| format!("task {task_id}: {e}"))?;
            events.push(Arc::new(Event::updated(id, &task)));
        }
        for member in members(4) {
            let (id, task_id) = parse_member(text(Some(member)))?;
            events.push(Arc::new(Event::deleted(id, task_id)));
        }
        events.sort_by_key(|e| e.id);
        Ok(Some(Backfill::Compacted {
            events,
            through: newest,
        }))
    }

    pub(super) async fn newest_retrying(&self) -> EventId {
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
pub(super) struct RedisHistory(pub(super) Arc<Store>);

impl History for RedisHistory {
    fn after(&self, after: EventId) -> BoxFuture<'static, Backfill> {
        let store = self.0.clone();
        async move {
            match store.replay_after(after).await {
                Backfill::Reset {
                    newest,
                    reason: ResetReason::TooOld,
                } => store.compacted_after(after, newest).await,
                backfill => backfill,
            }
        }
        .boxed()
    }

    fn newest(&self) -> BoxFuture<'static, EventId> {
        let store = self.0.clone();
        async move { store.newest_retrying().await }.boxed()
    }
}

/// Both groups in 20 digits, so that the index's members order by id as strings.
fn padded(id: EventId) -> String {
    format!("{:020}-{:020}", id.epoch, id.seq)
}

fn parse_padded(bytes: &[u8]) -> Option<EventId> {
    parse_id(bytes)
}

/// `<padded id>:<task id>`.
fn parse_member(member: Option<&[u8]>) -> Result<(EventId, TaskId), String> {
    let member = member.ok_or("an index member that is not a string")?;
    let damaged = || {
        format!(
            "a damaged index member {:?}",
            String::from_utf8_lossy(member)
        )
    };
    if member.len() <= PADDED_ID + 1 || member[PADDED_ID] != b':' {
        return Err(damaged());
    }
    let id = parse_padded(&member[..PADDED_ID]).ok_or_else(damaged)?;
    let task_id = std::str::from_utf8(&member[PADDED_ID + 1..])
        .ok()
        .and_then(|t| TaskId::parse(t).ok())
        .ok_or_else(damaged)?;
    Ok((id, task_id))
}

/// Whether the stream continues right after `after`: `first` is the first entry after it (if
/// any) and `newest` the stream's newest id.
pub(super) fn continues(
    after: EventId,
    newest: EventId,
    first: Option<&Entry>,
) -> Result<(), ResetReason> {
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
    fn index_members_order_by_id_as_strings_and_parse_back() {
        let (a, b) = (id(9, 10), id(10, 2));
        assert!(padded(a) < padded(b), "9-10 before 10-2");
        assert_eq!(padded(a).len(), PADDED_ID);
        let member = format!("{}:proj-7:a", padded(b));
        assert_eq!(
            parse_member(Some(member.as_bytes())),
            Ok((b, TaskId::parse("proj-7:a").unwrap()))
        );
        assert!(parse_member(Some(b"12-3:x")).is_err());
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
}
