//! Settings: every one is a command-line flag with a `TASKSTREAM_*` environment variable.

use clap::{Args, Parser, Subcommand};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Real-time task notifications over Server-Sent Events.
///
/// Every flag can also be set by the environment variable named in its help
/// (`--keep-alive 1` is `TASKSTREAM_KEEP_ALIVE=1`); a flag wins over its variable.
/// Logging is set with RUST_LOG (default: info). With no subcommand, taskstream serves.
#[derive(Debug, Parser)]
#[command(name = "taskstream", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint a JWT for local use and print it (signed like the server expects).
    Token(TokenArgs),
}

/// `taskstream token --sub ana --subscribe '*' --publish '*' --ttl 1h`
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The token's subject: names the client in logs and in the per-client publish rate.
    #[arg(long)]
    pub sub: String,

    /// Tasks the token may publish to: `*`, a task id, or a prefix ending in `*` (repeatable,
    /// or comma-separated). None by default.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,

    /// Tasks the token may subscribe to and read, as --publish. None by default.
    #[arg(long, value_delimiter = ',')]
    pub subscribe: Vec<String>,

    /// How long the token is valid: 90s, 30m, 1h, 7d (plain numbers are seconds).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// The HS256 secret the server runs with.
    #[arg(
        long,
        env = "TASKSTREAM_JWT_SECRET",
        hide_env_values = true,
        required_unless_present = "jwt_private_key"
    )]
    pub jwt_secret: Option<Secret>,

    /// Or a PEM private key (RSA signs RS256, EC P-256 signs ES256) whose public half the server
    /// has as --jwt-public-key.
    #[arg(
        long,
        env = "TASKSTREAM_JWT_PRIVATE_KEY",
        value_name = "FILE",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_private_key: Option<PathBuf>,
}

/// The server's settings (`taskstream` with no subcommand).
#[derive(Debug, Clone, Parser)]
#[command(name = "taskstream", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed on stdout).
    #[arg(long, env = "TASKSTREAM_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// A second address, served by a worker thread of its own, with the same API: point
    /// publishers (and probes) at it, and a POST there never queues behind the writing of the
    /// streams on --bind. Port 0 picks a free port (printed on stdout).
    #[arg(long, env = "TASKSTREAM_PUBLISH_BIND")]
    pub publish_bind: Option<String>,

    /// Nice value for the --publish-bind worker thread, as nginx's worker_priority: -10 lets a
    /// publish take a core before the threads writing streams do, where the cores are busy.
    /// Below 0 needs CAP_SYS_NICE (or LimitNICE); refused, the worker keeps the default, with a
    /// warning.
    #[arg(long, env = "TASKSTREAM_PUBLISH_PRIORITY", requires = "publish_bind",
          allow_hyphen_values = true, value_name = "NICE",
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub publish_priority: Option<i32>,

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

    /// Bytes the remembered Idempotency-Key answers may hold at most (each weighed by its key
    /// and its task's JSON); the oldest are forgotten first beyond it.
    #[arg(long, env = "TASKSTREAM_IDEMPOTENCY_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub idempotency_bytes: u64,

    /// Tasks the store holds at most; beyond it a new task answers 507 (updates to existing
    /// tasks and deletes still pass). On Redis the count is the cluster's.
    #[arg(long, env = "TASKSTREAM_MAX_TASKS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tasks: u64,

    /// Seconds a /ws connection may stay unsubscribed without sending a message; then it is
    /// closed (1000). An unfinished fragmented message does not count as a message.
    #[arg(long, env = "TASKSTREAM_WS_IDLE_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ws_idle_timeout: u64,

    /// HTTP worker threads (default: one per CPU core).
    #[arg(long, env = "TASKSTREAM_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,

    /// Share tasks and events with other taskstream nodes through this Redis (7 or later), e.g.
    /// redis://127.0.0.1:6379/0 (rediss:// for TLS is not built in). Default: all in memory.
    #[arg(long, env = "TASKSTREAM_REDIS_URL", conflicts_with = "data_dir")]
    pub redis_url: Option<String>,

    // --- the durable single node (--data-dir) ---
    /// Keep tasks, the event log and idempotency keys in DIR/taskstream.db (SQLite, created if
    /// missing), so a restart loses nothing; one process per DIR (see docs/operations.md).
    #[arg(long, env = "TASKSTREAM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// With --data-dir: events the log on disk keeps at most (at least --buffer); older ones are
    /// trimmed in the background.
    #[arg(long, env = "TASKSTREAM_RETENTION", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub retention: u64,

    /// With --data-dir: deletions remembered (task id and event id) for a catch-up that must
    /// know which tasks went away.
    #[arg(long, env = "TASKSTREAM_TOMBSTONES", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tombstones: u64,

    /// With --data-dir: `full` fsyncs every commit before answering 202, so a power cut loses
    /// nothing acknowledged; `normal` survives a process crash only (docs/decisions.md).
    #[arg(long, env = "TASKSTREAM_SYNCHRONOUS", value_enum, default_value_t = Synchronous::Full)]
    pub synchronous: Synchronous,
    // --- end of --data-dir ---
    // --- webhooks (docs/webhooks.md) ---
    /// POST every event to this URL in the background, signed and retried (repeatable;
    /// comma-separated in the variable). Credentials in it never appear in logs or metrics.
    #[arg(id = "webhook", long = "webhook", env = "TASKSTREAM_WEBHOOK", value_name = "URL", value_delimiter = ',',
          value_parser = parse_webhook_url, hide_env_values = true)]
    pub webhooks: Vec<reqwest::Url>,

    /// `whsec_<base64 key>`: signs every webhook (`webhook-signature: v1,...`, Standard Webhooks).
    #[arg(long, env = "TASKSTREAM_WEBHOOK_SECRET", hide_env_values = true,
          value_parser = parse_webhook_secret)]
    pub webhook_secret: Option<WebhookSecret>,

    /// Seconds a receiver has to answer one webhook request before it counts as failed.
    #[arg(long, env = "TASKSTREAM_WEBHOOK_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout: u64,

    /// Seconds an event is retried for (from its first attempt) before it is dead-lettered.
    #[arg(long, env = "TASKSTREAM_WEBHOOK_MAX_AGE", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
    pub webhook_max_age: u64,

    /// Webhook requests in flight at most, per URL (different tasks in parallel).
    #[arg(long, env = "TASKSTREAM_WEBHOOK_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub webhook_concurrency: u32,

    /// The first retry's delay in milliseconds; later ones double up to 600 times it. For tests
    /// and drills (the default is the SPEC's 1 s); at least 10 ms.
    #[arg(long, env = "TASKSTREAM_WEBHOOK_BACKOFF_MS", default_value_t = 1000, hide = true,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub webhook_backoff_ms: u64,

    /// On Redis: milliseconds a node's lease on a webhook lasts unless renewed (once a second);
    /// a dead node's deliveries are taken over this long after its last renewal. For tests.
    #[arg(long, env = "TASKSTREAM_WEBHOOK_LEASE_MS", default_value_t = 10_000, hide = true,
          value_parser = clap::value_parser!(u64).range(1_500..=600_000))]
    pub webhook_lease_ms: u64,
    // --- end of webhooks ---
    /// Seconds to wait on shutdown for connections to finish before closing them.
    #[arg(long, env = "TASKSTREAM_SHUTDOWN_TIMEOUT", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=60))]
    pub shutdown_timeout: u64,

    /// HS256 secret: turns authentication on. Every endpoint but /healthz, /metrics and the board
    /// page then needs a JWT (see docs/security.md).
    #[arg(
        long,
        env = "TASKSTREAM_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    pub jwt_secret: Option<Secret>,

    /// PEM public key (RSA verifies RS256, EC P-256 verifies ES256): turns authentication on.
    #[arg(long, env = "TASKSTREAM_JWT_PUBLIC_KEY", value_name = "FILE",
          value_parser = JwtPublicKey::from_file)]
    pub jwt_public_key: Option<JwtPublicKey>,

    /// Seconds of clock skew allowed on a token's exp and nbf (open streams end at exp + this).
    #[arg(long, env = "TASKSTREAM_JWT_LEEWAY", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=300))]
    pub jwt_leeway: u64,

    /// Events a client may publish per second, counted per token subject, else per IP; beyond it
    /// POST /update_task and DELETE answer 429 with Retry-After. 0 turns the limit off.
    #[arg(long, env = "TASKSTREAM_PUBLISH_RATE", default_value_t = 0)]
    pub publish_rate: u32,

    /// Publishes a client may make in one burst before --publish-rate applies (default: one
    /// second's worth).
    #[arg(long, env = "TASKSTREAM_PUBLISH_BURST", value_parser = clap::value_parser!(u32).range(1..))]
    pub publish_burst: Option<u32>,

    /// Open event streams allowed per client IP; beyond it /events answers 429. 0: no limit.
    #[arg(long, env = "TASKSTREAM_MAX_SUBSCRIBERS_PER_IP", default_value_t = 0)]
    pub max_subscribers_per_ip: u32,

    /// A browser origin allowed to call taskstream with credentials, such as
    /// https://board.example.com (repeatable; comma-separated in the variable). None by default.
    #[arg(long, env = "TASKSTREAM_CORS_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origin: Vec<String>,

    /// Largest request body in bytes; larger ones answer 413.
    #[arg(long, env = "TASKSTREAM_MAX_BODY_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_body_bytes: u32,

    /// Largest request head (request line and headers) in bytes; larger ones answer 431.
    #[arg(long, env = "TASKSTREAM_MAX_HEADER_BYTES", default_value_t = 32_768,
          value_parser = clap::value_parser!(u32).range(1024..=131_072))]
    pub max_header_bytes: u32,

    /// Seconds a client has to send a request's head, then its body, and to finish a TLS
    /// handshake; slower clients are cut off (slow-loris protection).
    // The clock starts at accept, so in a reconnect storm honest heads wait behind the replay
    // work: at 5 s (actix's default) half of a 10,000-client storm got 408 on a busy 2-core host.
    #[arg(long, env = "TASKSTREAM_REQUEST_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout: u64,

    /// PEM certificate chain: serve HTTPS, with HTTP/2 (ALPN h2) and HTTP/1.1. Needs --tls-key.
    #[arg(
        long,
        env = "TASKSTREAM_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(
        long,
        env = "TASKSTREAM_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// SQLite's `synchronous` setting for `--data-dir` (WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// fsync the WAL on every commit: an acknowledged change survives a power cut.
    Full,
    /// fsync only at checkpoints: survives a crash of the process, not of the machine.
    Normal,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
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

    pub fn ws_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.ws_idle_timeout)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout)
    }

    pub fn jwt_leeway(&self) -> Duration {
        Duration::from_secs(self.jwt_leeway)
    }

    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhook_timeout)
    }

    pub fn webhook_max_age(&self) -> Duration {
        Duration::from_secs(self.webhook_max_age)
    }

    pub fn webhook_backoff(&self) -> Duration {
        Duration::from_millis(self.webhook_backoff_ms)
    }

    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    /// The defaults, as `taskstream` with no flags would run (for tests and embedding).
    pub fn defaults() -> Config {
        Config::parse_from(["taskstream"])
    }
}

// Value types and parsers of the flags above.

/// The key of `--webhook-secret`, decoded.
#[derive(Clone)]
pub struct WebhookSecret(pub(crate) Vec<u8>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Standard Webhooks secrets are `whsec_` and the base64 of the key (at least 16 bytes here, so
/// a typo such as a truncated paste is refused rather than signing with a weak key).
pub fn parse_webhook_secret(text: &str) -> Result<WebhookSecret, String> {
    use base64::Engine;
    let encoded = text
        .strip_prefix("whsec_")
        .ok_or("the webhook secret must start with whsec_ (then the base64 of the key)")?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the webhook secret after whsec_ is not valid base64".to_owned())?;
    if key.len() < 16 {
        return Err(format!(
            "the webhook secret's key is {} bytes; at least 16 are needed",
            key.len()
        ));
    }
    Ok(WebhookSecret(key))
}

/// An http or https URL with a host. The error never repeats the URL: it may hold a credential.
pub fn parse_webhook_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("a webhook URL must be http:// or https:// with a host".into());
    }
    Ok(url)
}

/// A secret that never shows in `Debug` output, `--help` or logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = String;

    fn from_str(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(text.to_owned()))
    }
}

/// `--jwt-public-key`: a PEM public key, read and checked when the flags are parsed.
#[derive(Clone)]
pub struct JwtPublicKey {
    pub(crate) key: DecodingKey,
    pub(crate) algorithms: &'static [Algorithm],
    path: PathBuf,
}

impl fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JwtPublicKey({}, {:?})",
            self.path.display(),
            self.algorithms
        )
    }
}

impl JwtPublicKey {
    /// An RSA key verifies RS256; an EC P-256 key ES256. Other curves are refused, as the docs and
    /// `taskstream token` (which signs ES256) know no other.
    pub fn from_file(path: &str) -> Result<JwtPublicKey, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let (key, algorithms): (_, &'static [Algorithm]) = match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => (key, &[Algorithm::RS256]),
            Err(_) => match DecodingKey::from_ec_pem(&pem) {
                Ok(_) if !is_p256(&pem) => {
                    return Err(format!(
                        "{path} holds an EC key on another curve than P-256: only ES256 (P-256) is supported"
                    ))
                }
                Ok(key) => (key, &[Algorithm::ES256]),
                Err(_) => {
                    return Err(format!(
                    "{path} holds no RSA or EC public key in PEM (\"-----BEGIN PUBLIC KEY-----\")"
                ))
                }
            },
        };
        Ok(JwtPublicKey {
            key,
            algorithms,
            path: path.into(),
        })
    }
}

/// Whether a PEM EC public key (SubjectPublicKeyInfo) names the P-256 curve: its DER holds the
/// curve's OID, 1.2.840.10045.3.1.7.
fn is_p256(pem: &[u8]) -> bool {
    const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pem::parse(pem).is_ok_and(|block| {
        block
            .contents()
            .windows(P256_OID.len())
            .any(|w| w == P256_OID)
    })
}

/// The longest `--ttl` of `taskstream token`: a token valid longer is a key that never expires,
/// and beyond about 2^63 s `exp` no longer fits a time at all.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 366 * 86_400);

/// `90`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 30m, 1h or 7d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    if seconds == 0 {
        return Err("the time to live must be at least 1s".into());
    }
    if seconds > MAX_TTL.as_secs() {
        return Err(format!(
            "`{text}`: the time to live must be at most {}d (100 years)",
            MAX_TTL.as_secs() / 86_400
        ));
    }
    Ok(Duration::from_secs(seconds))
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
    fn ttls_take_units() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
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

    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Config::command().debug_assert();
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_serves_and_token_mints() {
        let cli = Cli::parse_from(["taskstream", "--buffer", "8"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.config.buffer, 8);
        let cli = Cli::parse_from([
            "taskstream",
            "token",
            "--sub",
            "ana",
            "--subscribe",
            "101,proj-7:*",
            "--publish",
            "*",
            "--ttl",
            "2s",
            "--jwt-secret",
            "s",
        ]);
        let Some(Command::Token(token)) = cli.command else {
            panic!("the token subcommand");
        };
        assert_eq!(token.subscribe, ["101", "proj-7:*"]);
        assert_eq!(token.ttl, Duration::from_secs(2));
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let config = Config::parse_from(["taskstream", "--jwt-secret", "hunter2"]);
        assert!(config.auth_enabled());
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn tls_needs_both_files_and_origins_are_checked() {
        assert!(Config::try_parse_from(["taskstream", "--tls-cert", "c.pem"]).is_err());
        assert!(Config::try_parse_from(["taskstream", "--cors-origin", "*"]).is_err());
        let config = Config::parse_from([
            "taskstream",
            "--cors-origin",
            "https://a.example",
            "--cors-origin",
            "http://b:1",
        ]);
        assert_eq!(config.cors_origin, ["https://a.example", "http://b:1"]);
    }

    #[test]
    fn data_dir_and_redis_exclude_each_other() {
        let refused = Config::try_parse_from([
            "taskstream",
            "--data-dir",
            "/tmp/x",
            "--redis-url",
            "redis://127.0.0.1",
        ]);
        assert!(refused.is_err());
        let config = Config::parse_from(["taskstream", "--data-dir", "/tmp/x"]);
        assert_eq!(config.retention, 1_000_000);
        assert_eq!(config.tombstones, 100_000);
        assert_eq!(config.synchronous, Synchronous::Full);
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
    fn webhook_flags_parse_and_refuse_bad_values() {
        let config = Config::parse_from([
            "taskstream",
            "--webhook",
            "http://127.0.0.1:9/a",
            "--webhook",
            "https://hooks.example.com/b?k=v",
        ]);
        assert_eq!(config.webhooks.len(), 2);
        assert_eq!(config.webhook_concurrency, 16);
        assert_eq!(config.webhook_max_age(), Duration::from_secs(86_400));
        assert_eq!(config.webhook_backoff(), Duration::from_secs(1));
        for bad in ["ftp://example.com/", "not a url", "http://"] {
            let refused = Config::try_parse_from(["taskstream", "--webhook", bad]);
            assert!(refused.is_err(), "{bad}");
        }
        let refused = Config::try_parse_from([
            "taskstream",
            "--webhook",
            "https://user:hunter2@example.com/x",
            "--webhook-secret",
            "nope",
        ])
        .unwrap_err()
        .to_string();
        assert!(!refused.contains("hunter2"), "{refused}");
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
