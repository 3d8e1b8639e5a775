//! Abuse limits: the per-client publish rate, the per-IP cap on open streams, and the request
//! size and time limits; each is a flag, and each refusal is a `Limited` and a metric. The HTTP
//! side of them (header size, CORS) is in `middleware`.

use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the limiter forgets the clients whose allowance is full again, so a crowd of
/// one-off clients cannot grow its memory without bound. In the background rather than inline in
/// a publish, so no request pays for the scan (linear in the clients tracked).
const RATE_CLEANUP_EVERY: Duration = Duration::from_secs(10);

pub struct Limits {
    publish: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    publish_rate: u32,
    clock: DefaultClock,
    subscribers: Arc<SubscriberCaps>,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    /// How long a client may take to send a body (the head has actix's `client_request_timeout`).
    pub body_timeout: Duration,
    /// How long a `/ws` connection may stay unsubscribed without sending a message.
    pub ws_idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// Starts the limiter's cleanup under `lifecycle` (only when a publish rate is set).
    pub fn new(config: &Config, metrics: Arc<Metrics>, lifecycle: &Lifecycle) -> Limits {
        let publish = NonZeroU32::new(config.publish_rate).map(|rate| {
            let burst = config
                .publish_burst
                .and_then(NonZeroU32::new)
                .unwrap_or(rate);
            Arc::new(DefaultKeyedRateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        if let Some(limiter) = &publish {
            lifecycle.spawn(
                "limiter cleanup",
                forget_idle_clients(limiter.clone(), lifecycle.stopping()),
            );
        }
        Limits {
            publish,
            publish_rate: config.publish_rate,
            clock: DefaultClock::default(),
            subscribers: Arc::new(SubscriberCaps {
                per_ip: config.max_subscribers_per_ip as usize,
                open: Mutex::new(HashMap::new()),
            }),
            max_body_bytes: config.max_body_bytes as usize,
            max_header_bytes: config.max_header_bytes as usize,
            body_timeout: config.request_timeout(),
            ws_idle_timeout: config.ws_idle_timeout(),
            metrics,
        }
    }

    /// Counts one publish (an update or a delete) against the client's allowance: the token's
    /// subject when it has one, else the peer's IP.
    pub fn check_publish(
        &self,
        subject: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<(), Limited> {
        let Some(limiter) = &self.publish else {
            return Ok(());
        };
        let key = match subject {
            Some(subject) => format!("sub:{subject}"),
            None => format!("ip:{}", peer.map_or("unknown".into(), |ip| ip.to_string())),
        };
        limiter.check_key(&key).map_err(|not_until| {
            self.metrics
                .rate_limited
                .with_label_values(&["publish"])
                .inc();
            let wait = not_until.wait_time_from(self.clock.now());
            Limited {
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
    pub fn subscriber_slot(&self, peer: Option<IpAddr>) -> Result<Option<IpSlot>, Limited> {
        let caps = &self.subscribers;
        let Some(ip) = peer.filter(|_| caps.per_ip > 0) else {
            return Ok(None);
        };
        caps.acquire(ip).map(Some).map_err(|limit| {
            self.metrics
                .rate_limited
                .with_label_values(&["subscribers_per_ip"])
                .inc();
            Limited {
                message: format!("too many open streams from {ip} (the limit is {limit})"),
                // Streams are long-lived: another place frees up on a scale of seconds at best.
                retry_after_secs: 5,
            }
        })
    }
}

/// Every `RATE_CLEANUP_EVERY` until the process stops: forgets the clients that could publish a
/// full burst again, which is exactly what a forgotten client gets anyway.
async fn forget_idle_clients(
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    stopping: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(RATE_CLEANUP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = every.tick() => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }
}

/// Over a limit: answered 429 over HTTP, with how long to wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Limited {
    pub message: String,
    pub retry_after_secs: u64,
}

/// Retry-After in whole seconds, rounded up, at least 1 (0 would invite an instant retry).
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cleanup_forgets_idle_clients_in_the_background_and_stops_with_the_lifecycle() {
        use clap::Parser;
        let config = Config::parse_from(["taskstream", "--publish-rate", "1000"]);
        let lifecycle = Lifecycle::new();
        let limits = Limits::new(&config, Arc::new(Metrics::new()), &lifecycle);
        limits.check_publish(Some("one-off"), None).unwrap();
        let tracked = || limits.publish.as_ref().map(|limiter| limiter.len());
        assert_eq!(tracked(), Some(1));
        // The limiter's clock is real time (tokio's is paused): one publish at 1,000/s is
        // forgotten once a millisecond has really passed.
        std::thread::sleep(Duration::from_millis(5));
        tokio::time::sleep(RATE_CLEANUP_EVERY * 2).await;
        assert_eq!(tracked(), Some(0), "forgotten without another publish");
        lifecycle.stop(Duration::from_secs(1)).await;
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
