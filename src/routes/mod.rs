//! HTTP handlers, one file per area; the route table itself is `app::routes`.

pub mod events;
pub mod ops;
pub mod tasks;
