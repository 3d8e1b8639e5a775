//! The properties both fuzz targets check, shared with the stable-toolchain property test
//! (tests/fuzz.rs), so `cargo fuzz` and `cargo test` exercise the same assertions.

use serde_json::{json, Map, Value};
// `crate::` rather than `taskstream::`: the fuzz targets compile these modules themselves, and
// tests/fuzz.rs imports the library's under the same names.
use crate::event::{reset_frame, Event, EventId};
use crate::task::{TaskId, TaskPatch, MAX_DATA_BYTES};

const FIELDS: [&str; 5] = ["task_id", "status", "title", "assignee", "data"];

/// Any bytes as a `POST /update_task` body: never a panic; a refusal is a short message; an
/// acceptance is a JSON object of known fields within every limit, and the task it makes is
/// itself a body that parses back to the same patch.
pub fn check_task_patch(body: &[u8]) {
    let parsed = TaskPatch::parse(body);
    let (task_id, patch) = match parsed {
        Err(e) => {
            assert!(
                !e.0.is_empty() && e.0.len() <= 300,
                "error messages are short and never echo the body: {e}"
            );
            return;
        }
        Ok(accepted) => accepted,
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        panic!("accepted a body that is not a JSON object: {body:?}");
    };
    assert!(
        fields.keys().all(|k| FIELDS.contains(&k.as_str())),
        "accepted an unknown field: {fields:?}"
    );
    assert_eq!(
        TaskId::parse(&task_id.to_string()),
        Ok(task_id.clone()),
        "task ids are canonical"
    );
    let chars = |s: &Option<String>| s.as_ref().map_or(0, |s| s.chars().count());
    assert!(patch
        .status
        .as_ref()
        .is_none_or(|_| (1..=64).contains(&chars(&patch.status))));
    assert!(chars(&patch.title) <= 256);
    assert!(chars(&patch.assignee.clone().flatten()) <= 128);
    if let Some(data) = &patch.data {
        assert!(serde_json::to_vec(data).unwrap().len() <= MAX_DATA_BYTES);
    }
    let task = patch.clone().apply(task_id.clone(), None, "t".into());
    let mut served = serde_json::to_value(&task).unwrap();
    let served = served.as_object_mut().unwrap();
    served.remove("version");
    served.remove("updated_at");
    let again = serde_json::to_vec(&served).unwrap();
    assert_eq!(
        TaskPatch::parse(&again),
        Ok((task_id, patch)),
        "a served task is a valid body for the same change"
    );
}

/// One input for the frame encoder.
#[derive(Debug, Clone)]
pub struct FrameCase {
    pub epoch: u64,
    pub seq: u64,
    /// 0: task_updated, 1: task_deleted, 2: reset.
    pub kind: usize,
    pub task_id: String,
    pub status: Option<String>,
    pub title: Option<String>,
    /// `None` sets the assignee to null.
    pub assignee: Option<String>,
    pub data: Vec<(String, String)>,
    pub reason: String,
}

/// Whatever a task holds, its frame is one well-formed SSE event of exactly `id`, `event` and
/// one `data` line, which a WHATWG-conformant reader turns back into exactly that JSON.
pub fn check_frame(case: &FrameCase) {
    let id = EventId {
        epoch: case.epoch,
        seq: case.seq,
    };
    let (frame, name, expected, data_slice) = match case.kind % 3 {
        0 => {
            let mut body = Map::new();
            body.insert("task_id".into(), json!(case.task_id));
            for (key, value) in [("status", &case.status), ("title", &case.title)] {
                if let Some(value) = value {
                    body.insert(key.into(), json!(value));
                }
            }
            body.insert("assignee".into(), json!(case.assignee));
            let data: Map<String, Value> = case
                .data
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            body.insert("data".into(), Value::Object(data));
            let Ok((task_id, patch)) = TaskPatch::from_fields(body) else {
                return;
            };
            let task = patch.apply(task_id, None, "2026-11-22T10:00:00.123Z".into());
            let event = Event::updated(id, &task);
            let mut expected = serde_json::to_value(&task).unwrap();
            expected["event"] = json!("task_updated");
            (
                event.frame.clone(),
                "task_updated",
                expected,
                Some(event.data),
            )
        }
        1 => {
            let Ok(task_id) = TaskId::parse(&case.task_id) else {
                return;
            };
            let event = Event::deleted(id, task_id.clone());
            let expected = json!({"event": "task_deleted", "task_id": task_id});
            (
                event.frame.clone(),
                "task_deleted",
                expected,
                Some(event.data),
            )
        }
        _ => {
            let expected =
                json!({"event": "reset", "reason": case.reason, "last_event_id": id.to_string()});
            (reset_frame(id, &case.reason), "reset", expected, None)
        }
    };
    let events = parse_event_stream(&frame);
    assert_eq!(events.len(), 1, "one frame, one event: {frame:?}");
    let event = &events[0];
    assert_eq!(
        event.fields,
        ["id", "event", "data"],
        "exactly these fields, once each: {frame:?}"
    );
    assert_eq!(event.id.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(event.event_type, name);
    let data: Value = serde_json::from_str(&event.data).expect("data is JSON");
    assert_eq!(data, expected, "{frame:?}");
    if let Some(slice) = data_slice {
        assert_eq!(
            slice.as_ref(),
            event.data.as_bytes(),
            "Event::data is the data line"
        );
    }
}

/// One event as the WHATWG "interpret an event stream" algorithm dispatches it, plus the names of
/// the fields that made it, in order.
#[derive(Debug, Default)]
pub struct ParsedEvent {
    pub id: Option<String>,
    pub event_type: String,
    pub data: String,
    pub fields: Vec<String>,
}

/// The HTML standard's event stream parser, written from the spec (not from our encoder): lines
/// end in CRLF, LF or CR; a blank line dispatches; `:` starts a comment; one space after the colon
/// is dropped. Panics on anything a stream must not contain (invalid UTF-8, an unterminated event).
pub fn parse_event_stream(bytes: &[u8]) -> Vec<ParsedEvent> {
    let text = std::str::from_utf8(bytes).expect("an event stream is UTF-8");
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut events = Vec::new();
    let mut current = ParsedEvent::default();
    let mut data = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .find(['\r', '\n'])
            .expect("the stream ends with a line break");
        let line = &rest[..end];
        let break_len = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + break_len..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                current.data = std::mem::take(&mut data);
                if current.event_type.is_empty() {
                    current.event_type = "message".into();
                }
                events.push(std::mem::take(&mut current));
            } else {
                current = ParsedEvent::default();
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        current.fields.push(field.to_owned());
        match field {
            "event" => current.event_type = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => current.id = Some(value.to_owned()),
            _ => {}
        }
    }
    assert!(
        data.is_empty() && current.fields.is_empty(),
        "the stream ended inside an event"
    );
    events
}
