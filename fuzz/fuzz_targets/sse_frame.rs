//! Fuzz target: any task (or reset reason) through the SSE frame encoder, read back by a
//! WHATWG-conformant parser (checks in ../checks.rs).
#![no_main]

// The code under test, compiled here rather than through the taskstream library (see
// ../Cargo.toml); `crate::task` and `crate::event` resolve as they do in the library.
#[allow(dead_code)] // Each target uses the checks for its own input.
#[path = "../checks.rs"]
mod checks;
#[allow(dead_code)]
#[path = "../../src/event.rs"]
mod event;
#[allow(dead_code)]
#[path = "../../src/task.rs"]
mod task;

use arbitrary::{Arbitrary, Unstructured};

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    if let Ok(case) = frame_case(&mut u) {
        checks::check_frame(&case);
    }
});

fn frame_case(u: &mut Unstructured<'_>) -> arbitrary::Result<checks::FrameCase> {
    Ok(checks::FrameCase {
        epoch: u.arbitrary()?,
        seq: u.arbitrary()?,
        kind: u.choose_index(3)?,
        task_id: String::arbitrary(u)?,
        status: Option::arbitrary(u)?,
        title: Option::arbitrary(u)?,
        assignee: Option::arbitrary(u)?,
        data: Vec::arbitrary(u)?,
        reason: String::arbitrary(u)?,
    })
}
