//! The fuzz targets' checks (fuzz/checks.rs) driven by proptest, so the stable toolchain and every
//! `cargo test` run them too; `scripts/fuzz` runs the coverage-guided versions with cargo-fuzz.

#[path = "../fuzz/checks.rs"]
mod checks;

// checks.rs names them `crate::event` and `crate::task`, as the fuzz targets compile them.
use taskstream::{event, task};

use proptest::prelude::*;
use serde_json::{json, Value};

/// Strings that stress SSE framing and the limits: line breaks, NUL, separators, non-ASCII,
/// lengths around the limits.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9_.:-]{1,130}",
        prop::collection::vec(
            prop_oneof![
                Just("\n".to_owned()),
                Just("\r".to_owned()),
                Just("\r\n".to_owned()),
                Just("\u{0}".to_owned()),
                Just("\u{2028}".to_owned()),
                Just("\u{feff}".to_owned()),
                Just("data: x".to_owned()),
                Just("id: 1".to_owned()),
                Just(":".to_owned()),
                Just("é".to_owned()),
                Just("\"".to_owned()),
                Just("\\".to_owned()),
            ],
            0..80
        )
        .prop_map(|parts| parts.concat()),
        (1usize..300).prop_map(|n| "x".repeat(n)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(nasty_string(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly bodies shaped like the real thing, so the checks past parsing get exercised.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        4 => prop::sample::select(vec!["task_id", "status", "title", "assignee", "data"]).prop_map(str::to_owned),
        1 => nasty_string(),
    ];
    let object = prop::collection::btree_map(key, json_value(), 0..6).prop_map(|mut fields| {
        fields.entry("task_id".into()).or_insert(json!(1));
        serde_json::to_vec(&fields).unwrap()
    });
    prop_oneof![
        3 => object,
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => any::<Vec<u8>>(),
    ]
}

fn frame_case() -> impl Strategy<Value = checks::FrameCase> {
    (
        (any::<u64>(), any::<u64>(), 0usize..3),
        prop_oneof![
            nasty_string(),
            "[A-Za-z0-9_.:-]{1,10}",
            (1u64..1000).prop_map(|n| n.to_string())
        ],
        (
            proptest::option::of(nasty_string()),
            proptest::option::of(nasty_string()),
            proptest::option::of(nasty_string()),
        ),
        prop::collection::vec((nasty_string(), nasty_string()), 0..4),
        nasty_string(),
    )
        .prop_map(
            |((epoch, seq, kind), task_id, (status, title, assignee), data, reason)| {
                checks::FrameCase {
                    epoch,
                    seq,
                    kind,
                    task_id,
                    status,
                    title,
                    assignee,
                    data,
                    reason,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn task_patch_parsing_holds_its_properties(body in body()) {
        checks::check_task_patch(&body);
    }

    #[test]
    fn every_frame_reads_back_as_exactly_one_event_with_its_fields(case in frame_case()) {
        checks::check_frame(&case);
    }
}

#[test]
fn the_parser_used_by_the_checks_follows_the_spec() {
    let events = checks::parse_event_stream(
        b"\xef\xbb\xbf: c\r\nid: 1\revent:x\ndata\ndata: a\n\ndata:b\r\n\r\n",
    );
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].fields, ["id", "event", "data", "data"]);
    assert_eq!(
        (
            events[0].id.as_deref(),
            events[0].event_type.as_str(),
            events[0].data.as_str()
        ),
        (Some("1"), "x", "\na")
    );
    assert_eq!(
        (events[1].event_type.as_str(), events[1].data.as_str()),
        ("message", "b")
    );
}
