//! Tasks: `TaskId`, `Task` and `TaskPatch`, with the SPEC's parsing rules and limits (no HTTP here).

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::fmt;

/// The largest integer a JavaScript client can hold exactly; numeric ids above it would be
/// silently rounded in every browser, so they are refused.
pub const MAX_NUMERIC_ID: u64 = (1 << 53) - 1;
const MAX_STRING_ID_CHARS: usize = 128;
const MAX_STATUS_CHARS: usize = 64;
const MAX_TITLE_CHARS: usize = 256;
const MAX_ASSIGNEE_CHARS: usize = 128;
pub const MAX_DATA_BYTES: usize = 16 * 1024;

/// A task's identity. `101` and `"101"` are the same task, so decimal strings without a leading
/// zero are folded into `Number` when parsed; `"0101"` stays a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskId {
    Number(u64),
    Text(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task_id must be a positive integer (at most 2^53-1) or a string of 1 to 128 characters from [A-Za-z0-9_.:-]")]
pub struct InvalidTaskId;

impl TaskId {
    /// Parses the textual form used in paths, query strings and JSON strings.
    pub fn parse(text: &str) -> Result<Self, InvalidTaskId> {
        let valid_chars = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if text.is_empty() || text.len() > MAX_STRING_ID_CHARS || !valid_chars {
            return Err(InvalidTaskId);
        }
        let canonical_number = text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
        if canonical_number {
            if let Ok(n) = text.parse::<u64>() {
                if n <= MAX_NUMERIC_ID {
                    return Ok(TaskId::Number(n));
                }
            }
        }
        Ok(TaskId::Text(text.into()))
    }

    pub fn from_json(value: &Value) -> Result<Self, InvalidTaskId> {
        match value {
            // `101.0` and `1.01e2` are the number 101 in JSON (and an integer to JSON Schema, as
            // schemathesis pointed out); anything with a fraction is not.
            Value::Number(n) => match n.as_u64().or_else(|| integral(n.as_f64()?)) {
                Some(n) if (1..=MAX_NUMERIC_ID).contains(&n) => Ok(TaskId::Number(n)),
                _ => Err(InvalidTaskId),
            },
            Value::String(s) => TaskId::parse(s),
            _ => Err(InvalidTaskId),
        }
    }
}

/// The integer a float holds exactly, if any (within the range of exact integers in an f64).
fn integral(f: f64) -> Option<u64> {
    (f.fract() == 0.0 && (1.0..=MAX_NUMERIC_ID as f64).contains(&f)).then_some(f as u64)
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskId::Number(n) => write!(f, "{n}"),
            TaskId::Text(s) => f.write_str(s),
        }
    }
}

/// Either form, as the SPEC allows it on input; answers use the number when canonical.
impl utoipa::PartialSchema for TaskId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(MAX_NUMERIC_ID)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(format!("^[A-Za-z0-9_.:-]{{1,{MAX_STRING_ID_CHARS}}}$"))),
            )
            .description(Some(
                "A positive integer (at most 2^53-1) or a string of 1 to 128 characters from [A-Za-z0-9_.:-]; 101 and \"101\" name the same task",
            ))
            .into()
    }
}

impl utoipa::ToSchema for TaskId {}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TaskId::Number(n) => serializer.serialize_u64(*n),
            TaskId::Text(s) => serializer.serialize_str(s),
        }
    }
}

/// The stored task. Optional fields stay absent until first set; `assignee` may be set to null.
// The schema attributes describe what `Serialize` below writes; schemathesis checks they agree.
#[derive(Debug, Clone, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub task_id: TaskId,
    #[schema(nullable = false, min_length = 1, max_length = 64)]
    pub status: Option<String>,
    #[schema(nullable = false, max_length = 256)]
    pub title: Option<String>,
    #[schema(value_type = Option<String>, max_length = 128)]
    pub assignee: Option<Option<String>>,
    /// Any JSON object, at most 16 KiB serialised.
    #[schema(value_type = Option<Object>, nullable = false)]
    pub data: Option<Map<String, Value>>,
    #[schema(minimum = 1)]
    pub version: u64,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

impl Task {
    /// Serialises the task with extra leading entries (the event's `"event"` field), so the SSE
    /// `data` line is written in one pass without building an intermediate `Value`.
    pub fn serialize_with<S: Serializer>(
        &self,
        serializer: S,
        leading: &[(&str, &str)],
    ) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in leading {
            map.serialize_entry(key, value)?;
        }
        map.serialize_entry("task_id", &self.task_id)?;
        if let Some(status) = &self.status {
            map.serialize_entry("status", status)?;
        }
        if let Some(title) = &self.title {
            map.serialize_entry("title", title)?;
        }
        if let Some(assignee) = &self.assignee {
            map.serialize_entry("assignee", assignee)?;
        }
        if let Some(data) = &self.data {
            map.serialize_entry("data", data)?;
        }
        map.serialize_entry("version", &self.version)?;
        map.serialize_entry("updated_at", &self.updated_at)?;
        map.end()
    }
}

impl Task {
    /// Reads a task back from the JSON its `Serialize` wrote (a store's copy). Stored tasks were
    /// validated on the way in, so this only checks shapes, not the input limits.
    pub fn from_stored(json: &[u8]) -> Result<Task, InvalidStoredTask> {
        let invalid = |what: &str| InvalidStoredTask(what.to_owned());
        let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(json) else {
            return Err(invalid("not a JSON object"));
        };
        let task_id = fields
            .remove("task_id")
            .and_then(|v| TaskId::from_json(&v).ok())
            .ok_or_else(|| invalid("task_id"))?;
        let string = |value: Value, field: &str| match value {
            Value::String(s) => Ok(s),
            _ => Err(invalid(field)),
        };
        let status = fields
            .remove("status")
            .map(|v| string(v, "status"))
            .transpose()?;
        let title = fields
            .remove("title")
            .map(|v| string(v, "title"))
            .transpose()?;
        let assignee = match fields.remove("assignee") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(v) => Some(Some(string(v, "assignee")?)),
        };
        let data = match fields.remove("data") {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => return Err(invalid("data")),
        };
        let version = fields
            .remove("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("version"))?;
        let updated_at = string(
            fields.remove("updated_at").unwrap_or(Value::Null),
            "updated_at",
        )?;
        Ok(Task {
            task_id,
            status,
            title,
            assignee,
            data,
            version,
            updated_at,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stored task is damaged ({0})")]
pub struct InvalidStoredTask(pub String);

impl Serialize for Task {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.serialize_with(serializer, &[])
    }
}

/// A validated `POST /update_task` body: the fields given replace the stored ones.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskPatch {
    pub status: Option<String>,
    pub title: Option<String>,
    pub assignee: Option<Option<String>>,
    pub data: Option<Map<String, Value>>,
}

/// Why a body was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPatch(pub String);

impl TaskPatch {
    /// Parses and validates a request body. Nothing is partially applied: either the whole body is
    /// valid or the first problem found is returned.
    pub fn parse(body: &[u8]) -> Result<(TaskId, TaskPatch), InvalidPatch> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| InvalidPatch(format!("body is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(InvalidPatch("body must be a JSON object".into()));
        };
        Self::from_fields(fields)
    }

    /// Validates the fields of an already parsed JSON object (shared by every transport).
    pub fn from_fields(fields: Map<String, Value>) -> Result<(TaskId, TaskPatch), InvalidPatch> {
        let mut task_id = None;
        let mut patch = TaskPatch::default();
        for (key, value) in fields {
            match key.as_str() {
                "task_id" => {
                    task_id =
                        Some(TaskId::from_json(&value).map_err(|e| InvalidPatch(e.to_string()))?);
                }
                "status" => {
                    patch.status = Some(bounded_string("status", value, 1, MAX_STATUS_CHARS)?)
                }
                "title" => patch.title = Some(bounded_string("title", value, 0, MAX_TITLE_CHARS)?),
                "assignee" => {
                    patch.assignee = Some(match value {
                        Value::Null => None,
                        other => Some(bounded_string("assignee", other, 0, MAX_ASSIGNEE_CHARS)?),
                    })
                }
                "data" => {
                    let Value::Object(data) = value else {
                        return Err(InvalidPatch("data must be a JSON object".into()));
                    };
                    // Serialising a `Map` cannot fail: every key is a string.
                    let size = serde_json::to_vec(&data)
                        .map(|v| v.len())
                        .unwrap_or(usize::MAX);
                    if size > MAX_DATA_BYTES {
                        return Err(InvalidPatch(format!(
                            "data must be at most {MAX_DATA_BYTES} bytes serialized, got {size}"
                        )));
                    }
                    patch.data = Some(data);
                }
                unknown => {
                    return Err(InvalidPatch(format!(
                        "unknown field `{}`; allowed: task_id, status, title, assignee, data",
                        unknown.chars().take(64).collect::<String>()
                    )))
                }
            }
        }
        let task_id = task_id.ok_or_else(|| InvalidPatch("task_id is required".into()))?;
        Ok((task_id, patch))
    }

    /// The task after this patch: a new task starts at version 1.
    pub fn apply(self, task_id: TaskId, previous: Option<&Task>, updated_at: String) -> Task {
        let mut task = previous.cloned().unwrap_or(Task {
            task_id,
            status: None,
            title: None,
            assignee: None,
            data: None,
            version: 0,
            updated_at: String::new(),
        });
        if self.status.is_some() {
            task.status = self.status;
        }
        if self.title.is_some() {
            task.title = self.title;
        }
        if self.assignee.is_some() {
            task.assignee = self.assignee;
        }
        if self.data.is_some() {
            task.data = self.data;
        }
        task.version += 1;
        task.updated_at = updated_at;
        task
    }
}

fn bounded_string(
    field: &str,
    value: Value,
    min: usize,
    max: usize,
) -> Result<String, InvalidPatch> {
    let rule = if min == 0 {
        format!("{field} must be a string of at most {max} characters")
    } else {
        format!("{field} must be a string of {min} to {max} characters")
    };
    let Value::String(s) = value else {
        return Err(InvalidPatch(rule));
    };
    let chars = s.chars().count();
    if chars < min || chars > max {
        return Err(InvalidPatch(format!("{rule}, got {chars}")));
    }
    Ok(s)
}

/// RFC 3339 in UTC with milliseconds, as in the SPEC's example.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimal_strings_fold_into_numbers_but_leading_zeros_do_not() {
        assert_eq!(TaskId::parse("101"), Ok(TaskId::Number(101)));
        assert_eq!(TaskId::from_json(&json!(101)), Ok(TaskId::Number(101)));
        assert_eq!(TaskId::from_json(&json!(101.0)), Ok(TaskId::Number(101)));
        assert_eq!(TaskId::parse("0101"), Ok(TaskId::Text("0101".into())));
        assert_eq!(TaskId::parse("0"), Ok(TaskId::Text("0".into())));
        assert_eq!(
            TaskId::parse("9007199254740992"),
            Ok(TaskId::Text("9007199254740992".into()))
        );
        assert_eq!(
            TaskId::parse("proj-7:a_b.c"),
            Ok(TaskId::Text("proj-7:a_b.c".into()))
        );
    }

    #[test]
    fn invalid_task_ids_are_refused() {
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(0.0),
            json!(9007199254740992u64),
            json!(9007199254740992.0),
            json!(1e300),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(TaskId::from_json(&bad), Err(InvalidTaskId), "{bad}");
        }
        for bad in ["", "a b", "ä", "x\n", &"a".repeat(129)] {
            assert_eq!(TaskId::parse(bad), Err(InvalidTaskId), "{bad:?}");
        }
        assert!(TaskId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn task_ids_serialize_as_numbers_only_when_canonical() {
        assert_eq!(
            serde_json::to_string(&TaskId::parse("101").unwrap()).unwrap(),
            "101"
        );
        assert_eq!(
            serde_json::to_string(&TaskId::parse("0101").unwrap()).unwrap(),
            "\"0101\""
        );
    }

    #[test]
    fn patch_limits_name_the_field() {
        let cases = [
            (json!({"status": "x"}), "task_id is required"),
            (
                json!({"task_id": 1, "status": ""}),
                "status must be a string of 1 to 64",
            ),
            (
                json!({"task_id": 1, "status": "x".repeat(65)}),
                "status must be a string of 1 to 64",
            ),
            (
                json!({"task_id": 1, "status": 3}),
                "status must be a string",
            ),
            (
                json!({"task_id": 1, "title": "x".repeat(257)}),
                "title must be a string of at most 256",
            ),
            (
                json!({"task_id": 1, "assignee": "x".repeat(129)}),
                "assignee must be",
            ),
            (
                json!({"task_id": 1, "data": [1]}),
                "data must be a JSON object",
            ),
            (
                json!({"task_id": 1, "data": {"k": "x".repeat(16 * 1024)}}),
                "data must be at most",
            ),
            (
                json!({"task_id": 1, "colour": "red"}),
                "unknown field `colour`",
            ),
            (json!({"task_id": true}), "task_id must be"),
        ];
        for (body, expected) in cases {
            let err = TaskPatch::parse(body.to_string().as_bytes()).unwrap_err();
            assert!(err.0.contains(expected), "{body}: {err}");
        }
        assert!(TaskPatch::parse(b"[1]")
            .unwrap_err()
            .0
            .contains("JSON object"));
        assert!(TaskPatch::parse(b"{")
            .unwrap_err()
            .0
            .contains("not valid JSON"));
    }

    /// Found by the fuzz checks: without serde_json's `float_roundtrip`, this number changed on
    /// its way through taskstream.
    #[test]
    fn numbers_in_data_come_back_exactly() {
        let body = br#"{"task_id": 1, "data": {"x": 2.857975898750237e-233, "y": 0.1}}"#;
        let (id, patch) = TaskPatch::parse(body).unwrap();
        let task = patch.apply(id, None, "t".into());
        let served = serde_json::to_string(&task.data).unwrap();
        assert_eq!(served, r#"{"x":2.857975898750237e-233,"y":0.1}"#);
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let body = json!({"task_id": 1, "status": "é".repeat(64)}).to_string();
        assert!(TaskPatch::parse(body.as_bytes()).is_ok());
    }

    #[test]
    fn a_stored_task_reads_back_as_it_was() {
        for body in [
            r#"{"task_id": 7}"#,
            r#"{"task_id": "0101", "status": "s", "title": "", "assignee": null, "data": {"n": 1.5, "big": 18446744073709551615, "o": {}}}"#,
            r#"{"task_id": 9, "assignee": "ana"}"#,
        ] {
            let (id, patch) = TaskPatch::parse(body.as_bytes()).unwrap();
            let task = patch.apply(id, None, "2026-11-22T10:00:00.123Z".into());
            let stored = serde_json::to_vec(&task).unwrap();
            assert_eq!(Task::from_stored(&stored), Ok(task), "{body}");
        }
        assert!(
            Task::from_stored(b"{\"task_id\": 1}").is_err(),
            "no version"
        );
        assert!(Task::from_stored(b"[]").is_err());
    }

    #[test]
    fn patches_replace_given_fields_and_bump_the_version() {
        let (id, first) =
            TaskPatch::parse(br#"{"task_id": 7, "status": "open", "assignee": "ana"}"#).unwrap();
        let task = first.apply(id.clone(), None, "t1".into());
        assert_eq!(task.version, 1);
        let (_, second) = TaskPatch::parse(br#"{"task_id": 7, "assignee": null}"#).unwrap();
        let task = second.apply(id, Some(&task), "t2".into());
        assert_eq!(
            serde_json::to_value(&task).unwrap(),
            json!({"task_id": 7, "status": "open", "assignee": null, "version": 2, "updated_at": "t2"})
        );
    }
}
