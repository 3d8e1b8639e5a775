//! Fuzz target: any request body through `TaskPatch::parse` (checks in ../checks.rs).
#![no_main]

#[allow(dead_code)] // Each target uses the checks for its own input.
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|body: &[u8]| checks::check_task_patch(body));
