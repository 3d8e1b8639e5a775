//! Events: the ordered `EventId`, and `Event` with its SSE frame encoded once and shared.

use crate::task::{Task, TaskId};
use bytes::Bytes;
use bytestring::ByteString;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// An event id: two decimal groups `<epoch>-<seq>`, compared group by group.
///
/// In memory the first group is the millisecond the process started, so ids never repeat across
/// restarts and an id from an earlier run is never mistaken for one of this run; on Redis the id
/// is the stream entry id, which has the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub epoch: u64,
    pub seq: u64,
}

impl EventId {
    /// The position before every event: `0` asks for everything still buffered.
    pub const START: EventId = EventId { epoch: 0, seq: 0 };
    /// The largest id that parses: no store issues it.
    pub const MAX: EventId = EventId {
        epoch: u64::MAX,
        seq: u64::MAX,
    };
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed event id")]
pub struct MalformedEventId;

impl FromStr for EventId {
    type Err = MalformedEventId;

    /// Accepts `N` (as `N-0`, as Redis does) and `N-M`, each group at most 20 digits.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let group = |s: &str| -> Result<u64, MalformedEventId> {
            if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(MalformedEventId);
            }
            s.parse().map_err(|_| MalformedEventId)
        };
        match text.split_once('-') {
            None => Ok(EventId {
                epoch: group(text)?,
                seq: 0,
            }),
            Some((epoch, seq)) => Ok(EventId {
                epoch: group(epoch)?,
                seq: group(seq)?,
            }),
        }
    }
}

impl serde::Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    TaskUpdated,
    TaskDeleted,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::TaskUpdated => "task_updated",
            EventKind::TaskDeleted => "task_deleted",
        }
    }
}

/// One published event. `frame` is the complete SSE frame, encoded once when the event is
/// published; every subscriber writes these same bytes (a `Bytes` clone is a reference count).
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub task_id: TaskId,
    pub kind: EventKind,
    pub frame: Bytes,
    /// The `data` JSON, a slice of `frame` (no second copy), for transports that frame it their own way.
    pub data: Bytes,
    /// The WebSocket message, built by the first WebSocket subscriber that needs it and shared by
    /// all the others; events nobody reads over WebSocket never pay for it.
    ws_message: OnceLock<ByteString>,
}

impl Event {
    pub fn updated(id: EventId, task: &Task) -> Event {
        let data = Event::updated_data(task);
        Event::new(id, task.task_id.clone(), EventKind::TaskUpdated, data)
    }

    pub fn deleted(id: EventId, task_id: TaskId) -> Event {
        let data = Event::deleted_data(&task_id);
        Event::new(id, task_id, EventKind::TaskDeleted, data)
    }

    /// The `data` line of a `task_updated` event: the whole task plus `"event"`. A store that
    /// assigns the id itself (Redis) keeps these bytes, so every node frames the same event.
    pub fn updated_data(task: &Task) -> Vec<u8> {
        let mut data = Vec::with_capacity(256);
        let mut serializer = serde_json::Serializer::new(&mut data);
        // A `Task` holds only strings, integers and a JSON map: serialising it cannot fail.
        task.serialize_with(&mut serializer, &[("event", EventKind::TaskUpdated.name())])
            .expect("a task always serialises");
        data
    }

    /// The `data` line of a `task_deleted` event.
    pub fn deleted_data(task_id: &TaskId) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event": EventKind::TaskDeleted.name(),
            "task_id": task_id,
        }))
        .expect("a task id always serialises")
    }

    /// Rebuilds an event from stored parts (`data` as made by `updated_data`/`deleted_data`).
    /// Refuses bytes that could not be one `data:` line, so a damaged store cannot break framing.
    pub fn from_stored(
        id: EventId,
        task_id: TaskId,
        kind: EventKind,
        data: Vec<u8>,
    ) -> Result<Event, InvalidStoredData> {
        if std::str::from_utf8(&data).is_err() || data.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return Err(InvalidStoredData);
        }
        Ok(Event::new(id, task_id, kind, data))
    }

    fn new(id: EventId, task_id: TaskId, kind: EventKind, data: Vec<u8>) -> Event {
        let data_len = data.len();
        let frame = encode_frame(&id.to_string(), kind.name(), data);
        // The frame ends with the one `data:` line and the blank line.
        let data_end = frame.len() - b"\n\n".len();
        let data = frame.slice(data_end - data_len..data_end);
        Event {
            id,
            task_id,
            kind,
            frame,
            data,
            ws_message: OnceLock::new(),
        }
    }

    /// `{"type":"event","id":ID,"event":KIND,"data":DATA}`, encoded once per event.
    pub fn ws_message(&self) -> ByteString {
        self.ws_message
            .get_or_init(|| {
                // `data` is serde_json's output, so it is valid UTF-8 and valid JSON.
                let data = std::str::from_utf8(&self.data).expect("event data is UTF-8");
                let (id, kind) = (self.id, self.kind.name());
                format!(r#"{{"type":"event","id":"{id}","event":"{kind}","data":{data}}}"#).into()
            })
            .clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored event data is not one line of UTF-8")]
pub struct InvalidStoredData;

/// Frames one SSE message with russe, the encoder actix-web-lab's `sse` module uses.
///
/// `data` is compact JSON, which escapes CR and LF inside strings, so it always stays one
/// `data:` line and nothing a client sends can start another field or event.
pub fn encode_frame(id: &str, event: &str, data: Vec<u8>) -> Bytes {
    // serde_json only produces UTF-8.
    let data = String::from_utf8(data).expect("serde_json writes UTF-8");
    debug_assert!(!data.contains(['\n', '\r']));
    let message = russe::Message {
        data: data.into(),
        event: Some(event.to_owned().into()),
        id: Some(id.to_owned().into()),
        retry: None,
    };
    // russe refuses only ids and event names with CR/LF/NUL; ours are digits and fixed names.
    russe::Event::Message(message)
        .into_bytestring()
        .expect("ids and event names never contain line breaks")
        .into_bytes()
}

/// The `reset` frame: the client missed events and must reload `GET /tasks`.
pub fn reset_frame(newest: EventId, reason: &str) -> Bytes {
    let data = serde_json::to_vec(&serde_json::json!({
        "event": "reset",
        "reason": reason,
        "last_event_id": newest,
    }))
    .expect("a reset always serialises");
    encode_frame(&newest.to_string(), "reset", data)
}

pub fn retry_frame(retry: std::time::Duration) -> Bytes {
    russe::Event::Retry(retry)
        .into_bytestring()
        .expect("retry always encodes")
        .into_bytes()
}

/// The WebSocket form of a `reset`: the same fields as an event message, so clients handle both alike.
pub fn reset_ws_message(newest: EventId, reason: &str) -> ByteString {
    serde_json::json!({
        "type": "reset",
        "id": newest,
        "event": "reset",
        "data": {"event": "reset", "last_event_id": newest, "reason": reason},
    })
    .to_string()
    .into()
}

/// `event: heartbeat` with no id (so a client's last event id stays), for clients that watch for
/// silence: a browser's EventSource never sees comments. `keep_alive_ms` tells it the period.
pub fn heartbeat_frame(keep_alive: std::time::Duration) -> Bytes {
    let message = russe::Message {
        data: heartbeat_data(keep_alive).into(),
        event: Some("heartbeat".into()),
        id: None,
        retry: None,
    };
    russe::Event::Message(message)
        .into_bytestring()
        .expect("a fixed event name never contains line breaks")
        .into_bytes()
}

fn heartbeat_data(keep_alive: std::time::Duration) -> String {
    format!(
        r#"{{"event":"heartbeat","keep_alive_ms":{}}}"#,
        keep_alive.as_millis()
    )
}

/// The WebSocket form of the heartbeat.
pub fn heartbeat_ws_message(keep_alive: std::time::Duration) -> ByteString {
    format!(
        r#"{{"type":"heartbeat","keep_alive_ms":{}}}"#,
        keep_alive.as_millis()
    )
    .into()
}

pub const KEEP_ALIVE_FRAME: Bytes = Bytes::from_static(b": keep-alive\n\n");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskPatch;

    fn task(body: &str) -> Task {
        let (id, patch) = TaskPatch::parse(body.as_bytes()).unwrap();
        patch.apply(id, None, "2026-11-22T10:00:00.123Z".into())
    }

    #[test]
    fn ids_order_group_by_group_and_round_trip() {
        let a: EventId = "1700000000000-3".parse().unwrap();
        let b: EventId = "1700000000000-10".parse().unwrap();
        let c: EventId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "1700000000000-3");
        assert_eq!(
            "42".parse::<EventId>().unwrap(),
            EventId { epoch: 42, seq: 0 }
        );
        assert_eq!("0".parse::<EventId>().unwrap(), EventId::START);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "abc",
            "1.5",
            " 1",
            "+1",
            "123456789012345678901",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn update_frame_is_byte_exact() {
        let event = Event::updated(
            EventId { epoch: 5, seq: 7 },
            &task(r#"{"task_id": 101, "status": "completed"}"#),
        );
        assert_eq!(
            &event.frame[..],
            &b"id: 5-7\nevent: task_updated\ndata: {\"event\":\"task_updated\",\"task_id\":101,\"status\":\"completed\",\"version\":1,\"updated_at\":\"2026-11-22T10:00:00.123Z\"}\n\n"[..]
        );
        assert!(
            event.data.starts_with(b"{\"event\":\"task_updated\"") && event.data.ends_with(b"}")
        );
    }

    #[test]
    fn delete_frame_is_byte_exact() {
        let event = Event::deleted(EventId { epoch: 5, seq: 8 }, TaskId::parse("abc").unwrap());
        assert_eq!(
            &event.frame[..],
            &b"id: 5-8\nevent: task_deleted\ndata: {\"event\":\"task_deleted\",\"task_id\":\"abc\"}\n\n"[..]
        );
    }

    #[test]
    fn line_breaks_in_values_cannot_inject_fields() {
        let event = Event::updated(
            EventId { epoch: 1, seq: 1 },
            &task(
                r#"{"task_id": "x", "title": "a\n\nevent: evil\r\ndata: x\r", "data": {"k\n": "\u2028"}}"#,
            ),
        );
        let text = std::str::from_utf8(&event.frame).unwrap();
        assert_eq!(text.matches('\n').count(), 4, "{text}");
        assert!(!text.contains('\r'));
        assert!(text.ends_with("}\n\n"));
    }

    #[test]
    fn the_websocket_message_wraps_the_same_data_and_is_built_once() {
        let event = Event::updated(EventId { epoch: 5, seq: 7 }, &task(r#"{"task_id": 101}"#));
        let message = event.ws_message();
        let parsed: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(parsed["type"], "event");
        assert_eq!(parsed["id"], "5-7");
        assert_eq!(parsed["event"], "task_updated");
        assert_eq!(
            parsed["data"],
            serde_json::from_slice::<serde_json::Value>(&event.data).unwrap()
        );
        assert_eq!(
            event.ws_message().as_bytes().as_ptr(),
            message.as_bytes().as_ptr(),
            "shared, not rebuilt"
        );
    }

    #[test]
    fn reset_and_retry_frames() {
        assert_eq!(
            &reset_frame(EventId { epoch: 9, seq: 1 }, "too old")[..],
            &b"id: 9-1\nevent: reset\ndata: {\"event\":\"reset\",\"last_event_id\":\"9-1\",\"reason\":\"too old\"}\n\n"[..]
        );
        assert_eq!(
            &retry_frame(std::time::Duration::from_millis(3000))[..],
            b"retry: 3000\n\n"
        );
    }
}
