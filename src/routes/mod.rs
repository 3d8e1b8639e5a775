//! HTTP handlers, one file per area; the route table itself is `app::routes`.

pub mod access;
pub mod connection;
pub mod events;
pub mod ops;
pub mod schemas;
pub mod tasks;
pub mod ws;
