//! Abuse limits: the per-client publish rate, the per-IP cap on open streams, request size and
//! time limits, and CORS; each is a flag, and each refusal is an `ApiError` and a metric.

use crate::auth::Access;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Past this many tracked clients the limiter forgets the ones whose allowance is full again, so
/// a crowd of one-off clients cannot grow its memory without bound...
const RATE_KEYS_BEFORE_CLEANUP: usize = 10_000;
/// ...looking at most once every this many publishes, so the scan (linear in the clients
/// tracked) never runs on every request when many clients are active.
const RATE_CLEANUP_EVERY: u64 = 1024;

pub struct Limits {
    publish: Option<DefaultKeyedRateLimiter<String>>,
    publish_rate: u32,
    publishes: AtomicU64,
    clock: DefaultClock,
    subscribers: Arc<SubscriberCaps>,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    /// How long a client may take to send a body (the head has actix's `client_request_timeout`).
    pub body_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Limits {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Limits {
        let publish = NonZeroU32::new(config.publish_rate).map(|rate| {
            let burst = config
                .publish_burst
                .and_then(NonZeroU32::new)
                .unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Limits {
            publish,
            publish_rate: config.publish_rate,
            publishes: AtomicU64::new(0),
            clock: DefaultClock::default(),
            subscribers: Arc::new(SubscriberCaps {
                per_ip: config.max_subscribers_per_ip as usize,
                open: Mutex::new(HashMap::new()),
            }),
            max_body_bytes: config.max_body_bytes as usize,
            max_header_bytes: config.max_header_bytes as usize,
            body_timeout: config.request_timeout(),
            metrics,
        }
    }

    /// Counts one publish (an update or a delete) against the client's allowance: the token's
    /// subject when it has one, else the peer's IP.
    pub fn check_publish(&self, access: &Access, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(limiter) = &self.publish else {
            return Ok(());
        };
        let key = match access.subject() {
            Some(subject) => format!("sub:{subject}"),
            None => format!(
                "ip:{}",
                peer_ip(req).map_or("unknown".into(), |ip| ip.to_string())
            ),
        };
        let publishes = self.publishes.fetch_add(1, Ordering::Relaxed);
        if publishes.is_multiple_of(RATE_CLEANUP_EVERY) && limiter.len() > RATE_KEYS_BEFORE_CLEANUP
        {
            limiter.retain_recent();
        }
        limiter.check_key(&key).map_err(|not_until| {
            self.metrics
                .rate_limited
                .with_label_values(&["publish"])
                .inc();
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::TooManyRequests {
                message: format!(
                    "publishing too fast: at most {} events per second",
                    self.publish_rate
                ),
                retry_after_secs: whole_seconds(wait),
            }
        })
    }

    /// Takes one place under `--max-subscribers-per-ip`; the place is given back when the slot is
    /// dropped with the stream.
    pub fn subscriber_slot(&self, req: &HttpRequest) -> Result<Option<IpSlot>, ApiError> {
        let caps = &self.subscribers;
        let Some(ip) = peer_ip(req).filter(|_| caps.per_ip > 0) else {
            return Ok(None);
        };
        caps.acquire(ip).map(Some).map_err(|limit| {
            self.metrics
                .rate_limited
                .with_label_values(&["subscribers_per_ip"])
                .inc();
            ApiError::TooManyRequests {
                message: format!("too many open streams from {ip} (the limit is {limit})"),
                // Streams are long-lived: another place frees up on a scale of seconds at best.
                retry_after_secs: 5,
            }
        })
    }
}

/// Retry-After in whole seconds, rounded up, at least 1 (0 would invite an instant retry).
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

pub fn peer_ip(req: &HttpRequest) -> Option<IpAddr> {
    req.peer_addr().map(|a| a.ip())
}

struct SubscriberCaps {
    per_ip: usize,
    /// Only IPs with an open stream are here: the map is bounded by `--max-subscribers`.
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl SubscriberCaps {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Each critical section is one map update: a panic cannot leave it half done.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, usize> {
        let mut open = self.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.per_ip {
            return Err(self.per_ip);
        }
        *count += 1;
        Ok(IpSlot {
            caps: self.clone(),
            ip,
        })
    }
}

/// One open stream counted against its IP for as long as it lives.
pub struct IpSlot {
    caps: Arc<SubscriberCaps>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.caps.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Refuses request heads over `--max-header-bytes` (actix itself stops at 128 KiB), for HTTP/1
/// and HTTP/2 alike.
pub async fn limit_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let limit = req
        .app_data::<web::Data<crate::app::AppState>>()
        .map_or(usize::MAX, |state| state.limits.max_header_bytes);
    let size = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size > limit {
        return Ok(req
            .error_response(ApiError::HeadersTooLarge(limit))
            .map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// CORS for the configured origins, with credentials, so a page on another origin can use
/// `EventSource(url, {withCredentials: true})` and `fetch(..., {credentials: "include"})`.
/// The answer names the one requesting origin (never `*`, which browsers refuse with credentials).
pub fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::POST, Method::DELETE])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::ALLOW])
        .supports_credentials()
        .max_age(600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}

/// `--cors-origin`: `scheme://host[:port]` exactly as browsers send it in `Origin`.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let valid = text.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' ', '*'])
    });
    if !valid {
        return Err(format!(
            "`{text}` is not an origin such as https://board.example.com or http://localhost:5173 (no path, no `*`: credentials need explicit origins)"
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_explicit() {
        assert!(parse_origin("https://board.example.com").is_ok());
        assert!(parse_origin("http://localhost:5173").is_ok());
        for bad in [
            "*",
            "https://*.example.com",
            "example.com",
            "https://a.com/",
            "ftp://a",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }

    #[test]
    fn ip_slots_count_and_give_back() {
        let caps = Arc::new(SubscriberCaps {
            per_ip: 2,
            open: Mutex::new(HashMap::new()),
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = caps.acquire(ip).unwrap();
        let _b = caps.acquire(ip).unwrap();
        assert_eq!(caps.acquire(ip).err(), Some(2));
        let _c = caps.acquire(other).unwrap();
        drop(a);
        let _d = caps.acquire(ip).unwrap();
        drop((_b, _c, _d));
        assert!(caps.lock().is_empty(), "no entry outlives its streams");
    }
}
