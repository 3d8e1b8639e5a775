//! Settings: every one is a command-line flag with a `TASKSTREAM_*` environment variable.

use clap::Parser;
use std::time::Duration;

/// Real-time task notifications over Server-Sent Events.
///
/// Every flag can also be set by the environment variable named in its help
/// (`--keep-alive 1` is `TASKSTREAM_KEEP_ALIVE=1`); a flag wins over its variable.
/// Logging is set with RUST_LOG (default: info).
#[derive(Debug, Clone, Parser)]
#[command(name = "taskstream", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed on stdout).
    #[arg(long, env = "TASKSTREAM_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// Events kept for replay with Last-Event-ID (the ring buffer's capacity).
    #[arg(long, env = "TASKSTREAM_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub buffer: u32,

    /// Seconds between keep-alive comments on an idle stream.
    #[arg(long, env = "TASKSTREAM_KEEP_ALIVE", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keep_alive: u64,

    /// Milliseconds sent as the SSE `retry:` field (how long browsers wait before reconnecting).
    #[arg(long, env = "TASKSTREAM_RETRY", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub retry: u64,

    /// Open event streams allowed at once; beyond it /events answers 503 with Retry-After.
    #[arg(long, env = "TASKSTREAM_MAX_SUBSCRIBERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribers: u32,

    /// Seconds an Idempotency-Key is remembered (the SPEC asks for at least 600).
    #[arg(long, env = "TASKSTREAM_IDEMPOTENCY_WINDOW", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_window: u64,

    /// Idempotency keys remembered at most; the oldest are forgotten first beyond it.
    #[arg(long, env = "TASKSTREAM_IDEMPOTENCY_KEYS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_keys: u64,

    /// HTTP worker threads (default: one per CPU core).
    #[arg(long, env = "TASKSTREAM_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,

    /// Share tasks and events with other taskstream nodes through this Redis (7 or later), e.g.
    /// redis://127.0.0.1:6379/0 (rediss:// for TLS is not built in). Default: all in memory.
    #[arg(long, env = "TASKSTREAM_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Seconds to wait on shutdown for connections to finish before closing them.
    #[arg(long, env = "TASKSTREAM_SHUTDOWN_TIMEOUT", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=60))]
    pub shutdown_timeout: u64,
}

impl Config {
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive)
    }

    pub fn retry(&self) -> Duration {
        Duration::from_millis(self.retry)
    }

    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window)
    }

    /// The defaults, as `taskstream` with no flags would run (for tests and embedding).
    pub fn defaults() -> Config {
        Config::parse_from(["taskstream"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = Config::parse_from(["taskstream"]);
        assert_eq!(config.bind, "127.0.0.1:8080");
        assert_eq!(config.buffer, 1024);
        assert_eq!(config.keep_alive(), Duration::from_secs(15));
        assert_eq!(config.retry(), Duration::from_millis(3000));
        assert_eq!(config.max_subscribers, 10_000);
        assert!(config.idempotency_window() >= Duration::from_secs(600));
    }

    #[test]
    fn every_flag_has_a_taskstream_variable() {
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let expected = format!("TASKSTREAM_{}", id.to_uppercase());
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "--{id}"
            );
        }
    }
}
