//! `ConnectionLog`: one open client connection (SSE or WebSocket) in its gauge and in the log.

use log::info;
use prometheus::IntGauge;
use std::time::Instant;

/// Counts the connection in `gauge` and logs it; on drop (the client went away or the server
/// ended it) logs the disconnect with what was sent, and gives the gauge back.
pub struct ConnectionLog {
    kind: &'static str,
    peer: String,
    gauge: IntGauge,
    since: Instant,
    pub events: u64,
}

impl ConnectionLog {
    pub fn open(
        kind: &'static str,
        peer: String,
        gauge: IntGauge,
        detail: std::fmt::Arguments,
    ) -> ConnectionLog {
        gauge.inc();
        // The detail holds the token's `sub`, which the token's issuer may have copied from input.
        let detail = crate::log_redact::escape_controls(&detail.to_string()).into_owned();
        info!("{kind} connected: peer={peer} {detail}");
        ConnectionLog {
            kind,
            peer,
            gauge,
            since: Instant::now(),
            events: 0,
        }
    }
}

impl Drop for ConnectionLog {
    fn drop(&mut self) {
        self.gauge.dec();
        info!(
            "{} disconnected: peer={} events={} after={:.1}s",
            self.kind,
            self.peer,
            self.events,
            self.since.elapsed().as_secs_f64()
        );
    }
}

pub fn peer(req: &actix_web::HttpRequest) -> String {
    req.peer_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}
