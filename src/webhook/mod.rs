//! Webhooks (`--webhook URL`): a worker per URL, a caller of the service layer's subscribe like
//! any other transport, that POSTs every event signed, in order per task, retried with backoff,
//! and keeps a durable position (docs/webhooks.md, docs/decisions.md).
//!
//! - [`sign`]: the Standard Webhooks signature.
//! - [`book`]: what a worker has taken from its subscription and not finished: per-task order,
//!   the bounded window, and the low-water mark that is stored as its position.
//! - [`worker`]: the loop, the attempts and the backoff.

pub mod book;
pub mod sign;
pub mod worker;

use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::state::AppState;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// One configured URL, with the names it may be shown under.
#[derive(Clone)]
pub struct Target {
    /// Its place among the `--webhook` flags: the `webhook` label of its metrics.
    pub index: usize,
    pub url: reqwest::Url,
    /// For logs and the `webhook_info` metric: scheme, host and port only, since user info, the
    /// path (Slack-style hook URLs are the credential) and the query may all hold a secret.
    pub shown: String,
    /// Where its position is stored: the SHA-256 of the URL, so the store holds no credential and
    /// a changed URL starts afresh rather than inheriting another receiver's position.
    pub key: String,
}

impl Target {
    pub fn new(index: usize, url: reqwest::Url) -> Target {
        let host = url.host_str().unwrap_or("?");
        let shown = match url.port() {
            Some(port) => format!("#{index} {}://{host}:{port}", url.scheme()),
            None => format!("#{index} {}://{host}", url.scheme()),
        };
        let key = Sha256::digest(url.as_str().as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Target {
            index,
            url,
            shown,
            key,
        }
    }
}

/// What every worker of this process shares.
pub struct Settings {
    pub client: reqwest::Client,
    pub signer: Option<sign::Signer>,
    pub max_age: Duration,
    pub backoff: Duration,
    pub concurrency: usize,
    pub shutdown_timeout: Duration,
    /// On Redis: how long a node's lease on a URL lasts unless renewed.
    pub lease: Duration,
}

/// Starts a worker per `--webhook` under `lifecycle`, before the server takes its first publish.
/// Fails only when the HTTP client cannot be built (no usable TLS roots).
pub async fn start(
    state: Arc<AppState>,
    config: &Config,
    lifecycle: &Lifecycle,
) -> std::io::Result<()> {
    if config.webhooks.is_empty() {
        return Ok(());
    }
    let settings = Arc::new(Settings {
        client: client(config)?,
        signer: config.webhook_secret.as_ref().map(sign::Signer::new),
        max_age: config.webhook_max_age(),
        backoff: config.webhook_backoff(),
        concurrency: config.webhook_concurrency as usize,
        shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
        lease: Duration::from_millis(config.webhook_lease_ms),
    });
    for (index, url) in config.webhooks.iter().enumerate() {
        let target = Target::new(index, url.clone());
        let metrics = &state.metrics;
        let label = index.to_string();
        metrics
            .webhook_info
            .with_label_values(&[&label, &target.shown])
            .set(1);
        // Every series from the start, so dashboards and alerts see 0 rather than nothing.
        for counter in [
            &metrics.webhook_deliveries,
            &metrics.webhook_failed_attempts,
            &metrics.webhook_retries,
            &metrics.webhook_dead_letters,
            &metrics.webhook_gaps,
            &metrics.webhook_lost,
        ] {
            counter.with_label_values(&[&label]);
        }
        for gauge in [&metrics.webhook_backlog, &metrics.webhook_oldest_seconds] {
            gauge.with_label_values(&[&label]);
        }
        // On Redis the group is created here, not when a worker first leads: the group starts at
        // the stream's end, and an event published in between would never reach this URL.
        let on_redis = state
            .service
            .backend()
            .webhook_group(&target.key, settings.lease);
        if let Some(group) = &on_redis {
            if let Err(e) = group.create().await {
                log::warn!(
                    "webhook {}: cannot create its consumer group yet ({e}); it is created when Redis answers, and starts there",
                    target.shown
                );
            }
        }
        log::info!("webhook {}: delivering every event", target.shown);
        let worker = worker::Worker::new(
            state.clone(),
            settings.clone(),
            target,
            lifecycle.stopping(),
        );
        let log = match on_redis {
            Some(_) => None,
            None => match worker.open_log().await {
                Some(log) => Some(log),
                None => continue,
            },
        };
        lifecycle.spawn("webhook worker", worker.run(log));
    }
    Ok(())
}

/// One client for every URL: it keeps connections alive per host (as many idle ones as requests
/// may be in flight to it), follows no redirect (a receiver that moved must be reconfigured, not
/// followed to wherever it points) and verifies TLS with the system's roots.
fn client(config: &Config) -> std::io::Result<reqwest::Client> {
    use rustls_platform_verifier::BuilderVerifierExt;
    // ring, as for the server (src/tls.rs): never whichever provider is installed as default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_platform_verifier())
        .map_err(|e| std::io::Error::other(format!("webhooks: TLS setup: {e}")))?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(config.webhook_timeout())
        .connect_timeout(config.webhook_timeout())
        .pool_max_idle_per_host(config.webhook_concurrency as usize)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("taskstream/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| std::io::Error::other(format!("webhooks: HTTP client: {e}")))
}
