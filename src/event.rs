//! Events: the ordered `EventId`, and `Event` with its SSE frame encoded once and shared.

use crate::task::{Task, TaskId};
use bytes::Bytes;
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
    /// `ws_frame`'s cache.
    ws_frame: OnceLock<Bytes>,
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
        data: impl AsRef<[u8]>,
    ) -> Result<Event, InvalidStoredData> {
        let data = data.as_ref();
        let mut frames = StoredFrames::with_capacity(1, data.len());
        frames.push(id, task_id, kind, data)?;
        Ok(frames.finish().pop().expect("one event was pushed"))
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
            ws_frame: OnceLock::new(),
        }
    }

    /// The event as one complete WebSocket frame, header and all: a server's frames are not
    /// masked, so the same bytes suit every socket, as `frame` does for SSE. Encoded by the first
    /// WebSocket subscriber and shared by all the others; events nobody reads that way never pay
    /// for it. The format itself belongs to the transport, which passes its encoder in.
    pub fn ws_frame(&self, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.ws_frame.get_or_init(|| encode(self)).clone()
    }
}

/// Frames many stored events into one buffer: a replay from a log on disk rebuilds thousands of
/// events a page, and one allocation for all their frames (each event's `frame` and `data` are
/// slices of it) costs far less than one each. Once `data` is checked to be one line, the frame is
/// written directly, byte for byte what `encode_frame` (russe) writes (the tests compare them).
pub struct StoredFrames {
    buffer: Vec<u8>,
    /// (id, task id, kind, where its frame starts, where its data starts)
    parts: Vec<(EventId, TaskId, EventKind, usize, usize)>,
}

impl StoredFrames {
    /// Room for `events` events whose `data` add up to about `data_bytes`.
    pub fn with_capacity(events: usize, data_bytes: usize) -> StoredFrames {
        StoredFrames {
            buffer: Vec::with_capacity(data_bytes + events * 80),
            parts: Vec::with_capacity(events),
        }
    }

    /// Adds one event; refuses `data` that is not one line of UTF-8.
    pub fn push(
        &mut self,
        id: EventId,
        task_id: TaskId,
        kind: EventKind,
        data: &[u8],
    ) -> Result<(), InvalidStoredData> {
        // `contains` on bytes scans a word at a time, unlike a byte-by-byte `any`.
        if data.contains(&b'\n') || data.contains(&b'\r') || std::str::from_utf8(data).is_err() {
            return Err(InvalidStoredData);
        }
        let frame = &mut self.buffer;
        let frame_start = frame.len();
        frame.extend_from_slice(b"id: ");
        push_decimal(frame, id.epoch);
        frame.push(b'-');
        push_decimal(frame, id.seq);
        frame.extend_from_slice(b"\nevent: ");
        frame.extend_from_slice(kind.name().as_bytes());
        frame.extend_from_slice(b"\ndata: ");
        let data_start = frame.len();
        frame.extend_from_slice(data);
        frame.extend_from_slice(b"\n\n");
        self.parts
            .push((id, task_id, kind, frame_start, data_start));
        Ok(())
    }

    /// The events, in the order pushed.
    pub fn finish(self) -> Vec<Event> {
        let buffer = Bytes::from(self.buffer);
        // Each frame ends where the next one starts.
        let ends: Vec<usize> = self
            .parts
            .iter()
            .skip(1)
            .map(|&(_, _, _, frame_start, _)| frame_start)
            .chain([buffer.len()])
            .collect();
        self.parts
            .into_iter()
            .zip(ends)
            .map(
                |((id, task_id, kind, frame_start, data_start), frame_end)| Event {
                    id,
                    task_id,
                    kind,
                    data: buffer.slice(data_start..frame_end - b"\n\n".len()),
                    frame: buffer.slice(frame_start..frame_end),
                    ws_frame: OnceLock::new(),
                },
            )
            .collect()
    }
}

/// `n` in decimal, without `fmt`'s machinery (a replay writes two of these per event).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
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
    fn stored_events_frame_as_new_ones_do() {
        let id = EventId {
            epoch: 1_764_633_600_000,
            seq: 18_446_744_073_709_551_615,
        };
        let (mut batch, mut originals) = (StoredFrames::with_capacity(0, 0), Vec::new());
        for event in [
            Event::deleted(EventId { epoch: 0, seq: 10 }, TaskId::Number(0)),
            Event::updated(
                id,
                &task(r#"{"task_id": "x.1", "title": "é a\nb", "data": {"k": "\u2028"}}"#),
            ),
            Event::deleted(id, TaskId::parse("abc").unwrap()),
        ] {
            let stored =
                Event::from_stored(event.id, event.task_id.clone(), event.kind, &event.data[..])
                    .unwrap();
            assert_eq!(stored.frame, event.frame);
            assert_eq!(stored.data, event.data);
            batch
                .push(event.id, event.task_id.clone(), event.kind, &event.data)
                .unwrap();
            originals.push(event);
        }
        // Several in one buffer: each event's slices are its own.
        let rebuilt = batch.finish();
        assert_eq!(rebuilt.len(), originals.len());
        for (rebuilt, event) in rebuilt.iter().zip(&originals) {
            assert_eq!((rebuilt.id, &rebuilt.task_id), (event.id, &event.task_id));
            assert_eq!(rebuilt.frame, event.frame);
            assert_eq!(rebuilt.data, event.data);
        }
        for bad in [&b"{\"a\":\n1}"[..], b"{\"a\":\r1}", b"\xff"] {
            assert_eq!(
                Event::from_stored(id, TaskId::Number(1), EventKind::TaskDeleted, bad).err(),
                Some(InvalidStoredData)
            );
        }
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
    fn reset_frames() {
        assert_eq!(
            &reset_frame(EventId { epoch: 9, seq: 1 }, "too old")[..],
            &b"id: 9-1\nevent: reset\ndata: {\"event\":\"reset\",\"last_event_id\":\"9-1\",\"reason\":\"too old\"}\n\n"[..]
        );
    }
}
