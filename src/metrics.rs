//! Counters and gauges, exposed at `/metrics` in the Prometheus text format.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub subscribers: IntGauge,
    pub ws_clients: IntGauge,
    pub events_published: IntCounter,
    pub events_replayed: IntCounter,
    pub resets: IntCounter,
    pub lagged_subscribers: IntCounter,
    /// By `kind`: `replay` (event by event), `compacted`, `reset`.
    pub catch_ups: IntCounterVec,
    pub compacted_events: IntCounter,
    pub rejected_subscribers: IntCounter,
    pub http_requests: IntCounterVec,
    pub backend_up: IntGauge,
    pub rate_limited: IntCounterVec,
    // Webhooks, labelled by the URL's index among the --webhook flags (never by the URL, which
    // may hold a credential); `webhook_info` maps an index to scheme, host and port.
    pub webhook_info: IntGaugeVec,
    pub webhook_deliveries: IntCounterVec,
    pub webhook_failed_attempts: IntCounterVec,
    pub webhook_retries: IntCounterVec,
    pub webhook_dead_letters: IntCounterVec,
    pub webhook_gaps: IntCounterVec,
    pub webhook_lost: IntCounterVec,
    pub webhook_backlog: IntGaugeVec,
    pub webhook_oldest_seconds: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("taskstream".into()), None)
            .expect("a fixed, valid metric prefix");
        // The names and help texts below are constants: registration can only fail on a
        // duplicate name, which would be a programming error caught by every test.
        let register = |collector: Box<dyn prometheus::core::Collector>| {
            registry
                .register(collector)
                .expect("metric names are unique");
        };
        let subscribers =
            IntGauge::new("subscribers", "Open SSE event streams (GET /events)").unwrap();
        let ws_clients =
            IntGauge::new("ws_clients", "Open WebSocket connections (GET /ws)").unwrap();
        let events_published = IntCounter::new(
            "events_published_total",
            "Events published through this node (accepted updates and deletes)",
        )
        .unwrap();
        let events_replayed = IntCounter::new(
            "events_replayed_total",
            "Events sent from the replay buffer (resume or catch-up)",
        )
        .unwrap();
        let resets = IntCounter::new("resets_total", "reset events sent to subscribers").unwrap();
        let lagged_subscribers = IntCounter::new(
            "lagged_subscribers_total",
            "Times a subscriber fell behind the live channel and caught up from the buffer or got a reset",
        )
        .unwrap();
        let catch_ups = IntCounterVec::new(
            Opts::new(
                "catch_ups_total",
                "Resumes and lag recoveries served, by kind: replay (every event after the id), compacted (each changed task's latest event), reset (the client reloads GET /tasks)",
            ),
            &["kind"],
        )
        .unwrap();
        for kind in ["replay", "compacted", "reset"] {
            catch_ups.with_label_values(&[kind]);
        }
        let compacted_events = IntCounter::new(
            "compacted_events_total",
            "Events sent in compacted catch-ups (each a task's latest event)",
        )
        .unwrap();
        let rejected_subscribers = IntCounter::new(
            "rejected_subscribers_total",
            "Subscribers refused by --max-subscribers",
        )
        .unwrap();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests answered, by status code",
            ),
            &["status"],
        )
        .unwrap();
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests refused with 429, by limit (publish: --publish-rate; subscribers_per_ip: --max-subscribers-per-ip)",
            ),
            &["limit"],
        )
        .unwrap();
        // Both series exist from the start, so dashboards and alerts see 0 rather than nothing.
        for limit in ["publish", "subscribers_per_ip"] {
            rate_limited.with_label_values(&[limit]);
        }
        register(Box::new(subscribers.clone()));
        register(Box::new(ws_clients.clone()));
        register(Box::new(events_published.clone()));
        register(Box::new(events_replayed.clone()));
        register(Box::new(resets.clone()));
        register(Box::new(lagged_subscribers.clone()));
        register(Box::new(catch_ups.clone()));
        register(Box::new(compacted_events.clone()));
        register(Box::new(rejected_subscribers.clone()));
        let backend_up = IntGauge::new(
            "backend_up",
            "1 while the store is reachable (in memory: always), 0 while Redis is not",
        )
        .unwrap();
        register(Box::new(http_requests.clone()));
        register(Box::new(backend_up.clone()));
        register(Box::new(rate_limited.clone()));
        let webhook_info = IntGaugeVec::new(
            Opts::new(
                "webhook_info",
                "1 for each --webhook: its index (the label of the other webhook metrics) and its scheme, host and port",
            ),
            &["webhook", "target"],
        )
        .unwrap();
        let webhook_counter = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), &["webhook"]).unwrap();
            register(Box::new(counter.clone()));
            counter
        };
        let webhook_deliveries = webhook_counter(
            "webhook_deliveries_total",
            "Events delivered to a webhook (answered 2xx)",
        );
        let webhook_failed_attempts = webhook_counter(
            "webhook_failed_attempts_total",
            "Webhook attempts that failed (not 2xx, no connection, or no answer in time)",
        );
        let webhook_retries = webhook_counter(
            "webhook_retries_total",
            "Webhook attempts scheduled again after a failure",
        );
        let webhook_dead_letters = webhook_counter(
            "webhook_dead_letters_total",
            "Events given up for a webhook after --webhook-max-age of failures",
        );
        let webhook_gaps = webhook_counter(
            "webhook_gaps_total",
            "Times a webhook worker fell further behind than the log reaches and skipped events (logged at warn)",
        );
        let webhook_lost = webhook_counter(
            "webhook_lost_total",
            "Events undelivered when the process stopped, in memory only (they are not kept)",
        );
        let webhook_gauge = |name: &str, help: &str| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), &["webhook"]).unwrap();
            register(Box::new(gauge.clone()));
            gauge
        };
        let webhook_backlog = webhook_gauge(
            "webhook_backlog",
            "Events published and not yet delivered or dead-lettered, per webhook",
        );
        let webhook_oldest_seconds = webhook_gauge(
            "webhook_oldest_undelivered_seconds",
            "Seconds since the oldest undelivered event was taken up by its webhook worker (0: none)",
        );
        register(Box::new(webhook_info.clone()));
        Metrics {
            registry,
            webhook_info,
            webhook_deliveries,
            webhook_failed_attempts,
            webhook_retries,
            webhook_dead_letters,
            webhook_gaps,
            webhook_lost,
            webhook_backlog,
            webhook_oldest_seconds,
            subscribers,
            ws_clients,
            events_published,
            events_replayed,
            resets,
            lagged_subscribers,
            catch_ups,
            compacted_events,
            rejected_subscribers,
            http_requests,
            backend_up,
            rate_limited,
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which the registry refuses.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
