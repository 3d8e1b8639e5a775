//! taskstream: real-time task notifications over Server-Sent Events.
//!
//! # Layout
//!
//! - [`config`] — flags and `TASKSTREAM_*` variables.
//! - [`app`] — shared state, the route table, `run` (serve until a shutdown future resolves).
//! - [`shutdown`] — SIGINT/SIGTERM.
//! - [`error`] — `ApiError`, the one place statuses and `{"error": ...}` bodies are chosen.
//! - [`task`] — `TaskId`, `Task`, `TaskPatch`: parsing and limits.
//! - [`event`] — `EventId`, `Event` with its SSE frame encoded once.
//! - [`ring`] — the bounded replay buffer.
//! - [`hub`] — fan-out; replay then live with no gap; lag recovers or resets.
//! - [`backend`] — the storage seam; [`backend::memory`] is the default, [`backend::redis`] shares
//!   tasks and events between nodes through Redis (`--redis-url`).
//! - [`routes`] — HTTP handlers: tasks, events, ops (healthz, metrics, the board).
//! - [`metrics`] — Prometheus counters.
//! - [`auth`] — JWTs, task patterns, the `Access` extractor (off unless a key is configured).
//! - [`limits`] — publish rate, per-IP streams, head/body size and time limits, CORS.
//! - [`tls`] — rustls for HTTPS and HTTP/2.
//! - [`http_guard`] — an unread request body closes its connection (no unbounded drain); the
//!   board page's security headers.
//! - [`origin`] — the `/ws` handshake's `Origin` check (cross-site WebSocket hijacking).
//! - [`log_redact`] — credentials out of the access log, control characters escaped.
//! - [`listener`] — the listening socket, with its backlog.
//! - [`openapi`] — the OpenAPI document, generated from the handlers' annotations.

pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod event;
pub mod http_guard;
pub mod hub;
pub mod limits;
pub mod listener;
pub mod log_redact;
pub mod metrics;
pub mod openapi;
pub mod origin;
pub mod ring;
pub mod routes;
pub mod shutdown;
pub mod task;
pub mod tls;
