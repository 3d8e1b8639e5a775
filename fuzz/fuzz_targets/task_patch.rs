//! Fuzz target: any request body through `TaskPatch::parse` (checks in ../checks.rs).
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

libfuzzer_sys::fuzz_target!(|body: &[u8]| checks::check_task_patch(body));
