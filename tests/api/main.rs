//! End-to-end tests: each starts a real `taskstream` on a random loopback port and speaks HTTP.

mod auth;
mod capacity;
mod catchup;
mod durable;
mod errors;
mod events;
mod failures;
mod hardening;
mod helpers;
mod limits;
mod redis;
mod resume;
mod shutdown;
mod slow;
mod tasks;
mod tls;
mod webhooks;
mod ws;
