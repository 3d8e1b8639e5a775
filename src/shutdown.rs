//! SIGINT/SIGTERM: taskstream owns the signals (actix's own handling would force-stop on SIGINT
//! and wait up to 30 s for open streams), so it can end every stream cleanly first.

use log::info;
use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal_received() {
    // Installing a handler only fails when the signal number is invalid; these two always exist.
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!("{name} received: ending event streams and shutting down");
}
