//! `AppState`: what every handler shares, built once from the flags.

use crate::auth::Authenticator;
use crate::backend::{
    memory::IdempotencyBounds, memory::MemoryBackend, redis::RedisBackend, sqlite::SqliteBackend,
    Backend,
};
use crate::config::Config;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::service::Service;
use std::sync::Arc;
use std::time::Duration;

pub struct AppState {
    pub service: Service,
    pub metrics: Arc<Metrics>,
    pub retry: Duration,
    pub keep_alive: Duration,
    /// `None`: auth is off and every request may do everything.
    pub auth: Option<Arc<Authenticator>>,
}

impl AppState {
    /// Fails on an unusable `--redis-url`, and on a `--data-dir` that is locked by another process
    /// or holds a database that is not taskstream's. Must run inside the Tokio runtime:
    /// background tasks (the Redis stream reader) start here, under `lifecycle`.
    pub fn new(config: &Config, lifecycle: &Lifecycle) -> std::io::Result<AppState> {
        let metrics = Arc::new(Metrics::new());
        let backend =
            match &config.redis_url {
                // clap refuses --data-dir with --redis-url.
                None if config.data_dir.is_some() => {
                    let dir = config
                        .data_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("."));
                    Backend::Sqlite(SqliteBackend::open(dir, config, metrics.clone()).map_err(
                        |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
                    )?)
                }
                None => {
                    metrics.backend_up.set(1);
                    Backend::Memory(MemoryBackend::new(
                        Arc::new(
                            Hub::new(
                                config.buffer as usize,
                                config.max_subscribers as usize,
                                metrics.clone(),
                            )
                            .with_latest(config.tombstones as usize),
                        ),
                        IdempotencyBounds {
                            window: config.idempotency_window(),
                            keys: config.idempotency_keys,
                            bytes: config.idempotency_bytes,
                        },
                        config.max_tasks,
                    ))
                }
                Some(url) => Backend::Redis(
                    RedisBackend::start(url, config, metrics.clone(), lifecycle).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("--redis-url: {e}"),
                        )
                    })?,
                ),
            };
        let auth = match (&config.jwt_secret, &config.jwt_public_key) {
            (Some(secret), _) => Some(Authenticator::hs256(secret, config.jwt_leeway())),
            (None, Some(key)) => Some(Authenticator::public_key(key, config.jwt_leeway())),
            (None, None) => None,
        };
        Ok(AppState {
            service: Service::new(backend, Limits::new(config, metrics.clone(), lifecycle)),
            metrics,
            retry: config.retry(),
            keep_alive: config.keep_alive(),
            auth: auth.map(Arc::new),
        })
    }
}

impl AppState {
    pub fn hub(&self) -> &Arc<Hub> {
        self.service.backend().hub()
    }
}
