//! taskstream: real-time task notifications over Server-Sent Events and WebSocket.
//!
//! # Layout
//!
//! The layers, bottom first; a module imports only from its own layer or below
//! (`tests/layers.rs` checks it, docs/architecture.md draws it).
//!
//! 1. Core types: [`task`] (`TaskId`, `Task`, `TaskPatch`), [`event`] (`EventId`, `Event` with
//!    its SSE frame encoded once), [`filter`] (task patterns, `TaskFilter`), [`config`] (flags and
//!    their value types), [`metrics`], [`lifecycle`] (spawns and joins background work),
//!    [`shutdown`] (SIGINT/SIGTERM).
//! 2. Fan-out: [`ring`] (the bounded replay buffer) and [`hub`] (replay then live with no gap; a
//!    position never jumps forward; subscriptions end with a reason).
//! 3. Storage: [`backend`], with [`backend::memory`] (the default) and [`backend::redis`]
//!    (`--redis-url`, split by role: scripts, store, reader, history).
//! 4. Policy: [`auth`] (JWT verification, `Access`, `Denied`, token minting), [`limits`] (rates,
//!    per-IP caps, sizes), [`idempotency`] (keys and their scope).
//! 5. [`service`]: publish and subscribe, once, for every transport; refusals are plain values.
//! 6. Transports and the HTTP edge: [`routes`] (tasks, events = SSE, ws = WebSocket, ops, the
//!    `Access` extractor, schemas), [`state`], [`error`] (statuses), [`middleware`], [`tls`],
//!    [`openapi`], [`http_guard`] (an unread body closes its connection; the board's security
//!    headers), [`origin`] (the `/ws` handshake's `Origin` check), [`log_redact`] (credentials
//!    out of the access log), [`listener`] (the listening socket and its backlog), [`webhook`]
//!    (`--webhook`: a worker per URL, a caller of the service's subscribe like any transport).
//! 7. [`app`]: the route table and `run`.

pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod event;
pub mod filter;
pub mod http_guard;
pub mod hub;
pub mod idempotency;
pub mod lifecycle;
pub mod limits;
pub mod listener;
pub mod log_redact;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod origin;
pub mod ring;
pub mod routes;
pub mod service;
pub mod shutdown;
pub mod state;
pub mod task;
pub mod tls;
pub mod webhook;
