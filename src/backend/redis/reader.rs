//! The node's one stream reader: follows the stream and feeds the local hub in stream order.

use super::scripts::{BLOCK, HEAD_KEY, PAGE, STREAM_KEY};
use super::store::{parse_id, text, Backoff, Store};
use crate::event::{Event, EventId, EventKind};
use crate::hub::Hub;
use crate::task::TaskId;
use log::{debug, error, info, warn};
use redis::{AsyncConnectionConfig, RedisError, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The node's one reader: follows the stream from where it started, publishes each entry to the
/// hub in stream order, and reconnects with backoff, continuing from the last id it read. Ends
/// when the process stops.
pub(super) async fn follow(store: Arc<Store>, hub: Arc<Hub>, stopping: CancellationToken) {
    let closed = stopping.cancelled_owned();
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
pub(super) struct Entry {
    pub(super) id: EventId,
    pub(super) prev: EventId,
    pub(super) event: Option<Arc<Event>>,
}

/// Parses XRANGE/XREAD entries: `[[id, [field, value, ...]], ...]`.
pub(super) fn entries(reply: Option<&Value>) -> Vec<Entry> {
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
    Event::from_stored(id, task_id, kind, data?)
        .ok()
        .map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> EventId {
        EventId { epoch, seq }
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
