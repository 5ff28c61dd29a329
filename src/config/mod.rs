//! Typed configuration, read once from the environment (and `.env`) and validated at start.
//!
//! Every variable of contract §2 lives here. A bad value is a [`ConfigError`] naming the
//! variable, so the service never starts half-configured.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use crate::domain::{Role, Secret};

pub use self::otel::{BatchSettings, OtlpProtocol, TracesConfig};
use self::parse::*;
pub use self::{
    cidr::Cidr,
    keys::{KeyFile, KeyFileError, NamedKey},
};

mod cidr;
pub mod keys;
mod otel;
mod parse;

/// Which database a `DATABASE_URL` names. The one place that reads the scheme: config
/// refuses any other at start, and the audit store picks its backend by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseBackend {
    Sqlite,
    Postgres,
}

impl DatabaseBackend {
    pub fn of(url: &str) -> Option<DatabaseBackend> {
        if url.starts_with("sqlite:") {
            Some(DatabaseBackend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(DatabaseBackend::Postgres)
        } else {
            None
        }
    }
}

/// Which upstream family answers for a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Simulated,
    Gemini,
    OpenAi,
    Anthropic,
}

impl ProviderKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Simulated => "simulated",
            ProviderKind::Gemini => "gemini",
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }

    fn default_model(self, role: Role) -> &'static str {
        match (self, role) {
            (ProviderKind::Simulated, Role::Flash) => "simulated-flash",
            (ProviderKind::Simulated, Role::Pro) => "simulated-pro",
            (ProviderKind::Gemini, Role::Flash) => "gemini-2.5-flash",
            (ProviderKind::Gemini, Role::Pro) => "gemini-2.5-pro",
            (ProviderKind::OpenAi, Role::Flash) => "gpt-4.1-mini",
            (ProviderKind::OpenAi, Role::Pro) => "gpt-4.1",
            (ProviderKind::Anthropic, Role::Flash) => "claude-haiku-4-5",
            (ProviderKind::Anthropic, Role::Pro) => "claude-sonnet-4-5",
        }
    }

    fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Simulated => "",
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
            ProviderKind::OpenAi => "https://api.openai.com/v1",
            ProviderKind::Anthropic => "https://api.anthropic.com",
        }
    }

    /// The family-wide key variable a role falls back to.
    fn fallback_key_var(self) -> Option<&'static str> {
        match self {
            ProviderKind::Simulated => None,
            ProviderKind::Gemini => Some("GEMINI_API_KEY"),
            ProviderKind::OpenAi => Some("OPENAI_API_KEY"),
            ProviderKind::Anthropic => Some("ANTHROPIC_API_KEY"),
        }
    }
}

impl FromStr for ProviderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "simulated" => Ok(ProviderKind::Simulated),
            "gemini" => Ok(ProviderKind::Gemini),
            "openai" => Ok(ProviderKind::OpenAi),
            "anthropic" => Ok(ProviderKind::Anthropic),
            other => Err(format!(
                "unknown provider {other:?} (expected simulated, gemini, openai or anthropic)"
            )),
        }
    }
}

/// Pacing of the simulated provider for one role.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedTiming {
    /// Delay before the first token.
    pub first_token: Duration,
    /// Delay between later tokens.
    pub per_token: Duration,
}

/// Everything one role needs to reach its model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub role: Role,
    pub provider: ProviderKind,
    pub model: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// Whole-call deadline.
    pub timeout: Duration,
    /// Optional deadline for the first token.
    pub ttft_timeout: Option<Duration>,
    pub simulated: SimulatedTiming,
    /// What the model costs (`FLASH_PRICE_*_PER_MTOK` / `PRO_PRICE_*_PER_MTOK`).
    pub prices: Prices,
}

/// A model's prices in USD per million tokens; `None` is unknown (the variable is unset), and
/// a cost that needs an unknown price is itself unknown (`null`), never 0. See `crate::cost`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Prices {
    /// USD per million input (prompt) tokens.
    pub input_per_mtok: Option<f64>,
    /// USD per million output (completion) tokens.
    pub output_per_mtok: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bind_addr: SocketAddr,
    pub database_url: String,
    pub flash: ModelConfig,
    pub pro: ModelConfig,
    pub stall_timeout: Duration,
    pub max_query_bytes: usize,
    pub max_concurrent_streams: usize,
    pub sse_keepalive: Duration,
    pub shutdown_grace: Duration,
    pub audit_deadletter_path: PathBuf,
    /// Bytes of run records the audit queue may hold (`AUDIT_QUEUE_MAX_BYTES`); a record that
    /// does not fit is dead-lettered, as when the queue is full by count.
    pub audit_queue_max_bytes: usize,
    /// `AUDIT_BATCH_INTERVAL_MS`: audit transactions start at least this far apart while
    /// records keep coming (fewer commits; responses wait longer for their start rows, and
    /// final records longer in memory); 0 to 100 ms.
    pub audit_batch_interval: Duration,
    /// `SERVE_THREADS`: how many serving threads (single-threaded runtimes) client
    /// connections and their runs are spread over; 0 (the default) serves them on the main
    /// runtime.
    pub serve_threads: usize,
    pub api_keys: Vec<Secret>,
    /// `API_KEYS_FILE`: where the named keys are (contract §11), read again on `SIGHUP`.
    pub api_keys_file: Option<PathBuf>,
    /// The named keys as read at start; `None` without `API_KEYS_FILE`.
    pub key_file: Option<KeyFile>,
    pub admin_token: Option<Secret>,
    /// `METRICS_TOKEN`: when set, `GET /metrics` needs it as a bearer token (the exposition
    /// names each `API_KEYS_FILE` client and counts its requests); unset, it is open.
    pub metrics_token: Option<Secret>,
    pub log_format: LogFormat,
    /// Sustained requests per minute per client (API key, or client address without keys;
    /// on PostgreSQL one budget for all replicas); `None` (the default,
    /// `RATE_LIMIT_PER_MINUTE=0`) turns the limit off.
    pub rate_limit_per_minute: Option<u32>,
    /// Requests a client may make at once before the sustained rate applies.
    pub rate_limit_burst: u32,
    /// Wrong API keys or admin tokens one client address may present per
    /// `auth_failure_window` before it is refused for the rest of that window; `None`
    /// (`AUTH_FAILURE_LIMIT=0`) turns the throttle off.
    pub auth_failure_limit: Option<u32>,
    /// How long failed attempts are counted from an address's first one, and so how long an
    /// address that reached the limit is refused.
    pub auth_failure_window: Duration,
    /// Origins allowed to call the API from a browser (`*` for any), each exactly as browsers
    /// send it in `Origin`; empty means same-origin only.
    pub cors_allowed_origins: Vec<http::HeaderValue>,
    /// Longest time a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// How long an ended run's events stay in memory for `Last-Event-ID` resumes.
    pub resume_retention: Duration,
    /// `RESUME_STORE_MAX_BYTES`: the most bytes of ended runs' events kept in memory for
    /// resumes; past it the oldest ended runs leave (and are resumed from the database).
    pub resume_store_max_bytes: usize,
    /// A client that takes no event for this long is treated as gone.
    pub client_write_timeout: Duration,
    /// `UPSTREAM_HTTP2`: speak HTTP/2 to `http://` upstreams without asking first (h2c prior
    /// knowledge), so that calls to one upstream share connections instead of one connection
    /// each. `https://` upstreams negotiate HTTP/2 by ALPN either way.
    pub upstream_http2: bool,
    /// `UPSTREAM_STREAMS_PER_CONNECTION`: calls one HTTP/2 connection to an upstream carries
    /// at once; the next call opens another connection. Servers refuse or queue streams
    /// past their `SETTINGS_MAX_CONCURRENT_STREAMS`, commonly 100.
    pub upstream_streams_per_connection: usize,
    /// `FIRST_REQUEST_TIMEOUT_S`: a new connection (either protocol) must have sent its first
    /// whole request within this, or it is closed.
    pub first_request_timeout: Duration,
    /// `HTTP2_IDLE_TIMEOUT_S`: an HTTP/2 connection with no open stream for this long gets
    /// GOAWAY and is closed. (HTTP/1.1 has `HEADER_READ_TIMEOUT_S` between requests.)
    pub http2_idle_timeout: Duration,
    /// `MAX_CONNECTIONS_PER_CLIENT`: open connections one TCP peer address may hold; new ones
    /// past it are closed at accept. `None` (`0`) turns the cap off.
    pub max_connections_per_client: Option<usize>,
    /// `MAX_CONNECTIONS`: open connections in all; new ones past it are closed at accept, so
    /// idle clients cannot use up the descriptors runs need upstream. `None` (`0`) turns the
    /// cap off. Default: half the process's open-file limit where it can be read.
    pub max_connections: Option<usize>,
    /// `INSTANCE_LEASE_S`: on PostgreSQL, a replica whose heartbeat is older than this is
    /// dead, and any live replica finalizes its runs in flight as `interrupted`. Each
    /// replica refreshes its heartbeat every third of it (at most every 5 s).
    pub instance_lease: Duration,
    /// `INSTANCE_ID`: this replica's name among those sharing a database, stamped on each of
    /// its runs (`dual_runs.instance_id`). `None` (unset, the default): the host name and the
    /// port the service listens on, decided once it is bound (see `audit::instance`).
    pub instance_id: Option<String>,
    /// `TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client (contract §8).
    /// Empty (the default): every peer is the client, and the header is ignored.
    pub trusted_proxies: Vec<Cidr>,
    /// `AUDIT_STORE_TEXT`: whether the texts of a run (query, system prompt, answers, error
    /// messages) reach the database, the journal and the dead-letter file (contract §10).
    pub audit_store_text: StoreText,
    /// `AUDIT_RETENTION_DAYS`: ended runs older than this many days are purged in the
    /// background; `None` (unset, the default) keeps them for ever.
    pub audit_retention_days: Option<u32>,
    /// The OpenTelemetry variables (contract §9): `None`, the default, when no OTLP endpoint
    /// is set, and then no span is made at all.
    pub traces: Option<TracesConfig>,
}

/// What `AUDIT_STORE_TEXT` asks the audit trail to keep of a run's texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreText {
    /// Every text as it was (the default).
    #[default]
    Full,
    /// No text: each is replaced by its length and SHA-256 before the record is queued.
    None,
}

/// A configuration value that cannot be used; its `Display` is the one line printed at start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("configuration error: {var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            var,
            problem: problem.into(),
        }
    }
}

/// Where variables come from: the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, var: &str) -> Option<String>;
}

/// The process environment. Call [`load_dotenv`] first to include `.env`.
pub struct Env;

impl Source for Env {
    fn get(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, var: &str) -> Option<String> {
        HashMap::get(self, var).cloned()
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, var: &str) -> Option<String> {
        HashMap::get(self, var).map(|v| (*v).to_owned())
    }
}

/// Reads `.env` from the working directory when present; real environment variables win.
pub fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(ConfigError::new(".env", e.to_string())),
    }
}

impl Config {
    /// Reads the process environment (after `.env`).
    pub fn from_env() -> Result<Config, ConfigError> {
        load_dotenv()?;
        Config::from_source(&Env)
    }

    /// Reads and validates every variable of contract §2 from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let database_url = var(src, "DATABASE_URL").unwrap_or_else(|| "sqlite://duet.db".into());
        if DatabaseBackend::of(&database_url).is_none() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must start with sqlite:// or postgres://",
            ));
        }
        let log_format = match var(src, "LOG_FORMAT").as_deref() {
            None => {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    LogFormat::Pretty
                } else {
                    LogFormat::Json
                }
            }
            Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("{other:?} is not pretty or json"),
                ));
            }
        };
        let mut config = Config {
            bind_addr: parse_or(
                src,
                "BIND_ADDR",
                SocketAddr::from(([127, 0, 0, 1], 8080)),
                "an address like 127.0.0.1:8080",
            )?,
            database_url,
            flash: model_config(src, Role::Flash)?,
            pro: model_config(src, Role::Pro)?,
            stall_timeout: seconds_or(src, "STALL_TIMEOUT_S", 15.0)?,
            max_query_bytes: positive(src, "MAX_QUERY_BYTES", 32_768)?,
            max_concurrent_streams: match positive(src, "MAX_CONCURRENT_STREAMS", 10_000)? {
                n if n > 1_000_000 => {
                    return Err(ConfigError::new(
                        "MAX_CONCURRENT_STREAMS",
                        format!("{n} is more than 1000000"),
                    ));
                }
                n => n,
            },
            sse_keepalive: seconds_or(src, "SSE_KEEPALIVE_S", 15.0)?,
            shutdown_grace: seconds_or(src, "SHUTDOWN_GRACE_S", 30.0)?,
            audit_deadletter_path: var(src, "AUDIT_DEADLETTER_PATH")
                .unwrap_or_else(|| "duet-deadletter.jsonl".into())
                .into(),
            audit_queue_max_bytes: positive(src, "AUDIT_QUEUE_MAX_BYTES", 64 << 20)?,
            audit_batch_interval: batch_interval(src)?,
            serve_threads: match parse_or(src, "SERVE_THREADS", 0, "a number")? {
                n if n > 1024 => {
                    return Err(ConfigError::new(
                        "SERVE_THREADS",
                        format!("{n} is more than 1024"),
                    ));
                }
                n => n,
            },
            api_keys: secrets_list(src, "API_KEYS")?,
            admin_token: var(src, "ADMIN_TOKEN")
                .map(|t| header_secret("ADMIN_TOKEN", None, &t))
                .transpose()?,
            metrics_token: var(src, "METRICS_TOKEN")
                .map(|t| header_secret("METRICS_TOKEN", None, &t))
                .transpose()?,
            log_format,
            rate_limit_per_minute: match parse_or(
                src,
                "RATE_LIMIT_PER_MINUTE",
                // Off by default: one backend client doing many streams at once, or everyone
                // behind a proxy not in TRUSTED_PROXIES, shares one bucket and would be
                // refused under ordinary load.
                0u32,
                "a whole number (0 turns the limit off)",
            )? {
                0 => None,
                n => Some(n),
            },
            rate_limit_burst: positive(src, "RATE_LIMIT_BURST", 100)?
                .try_into()
                .map_err(|_| ConfigError::new("RATE_LIMIT_BURST", "is too large"))?,
            auth_failure_limit: match parse_or(
                src,
                "AUTH_FAILURE_LIMIT",
                10u32,
                "a whole number (0 turns the throttle off)",
            )? {
                0 => None,
                n => Some(n),
            },
            auth_failure_window: seconds_or(src, "AUTH_FAILURE_WINDOW_S", 60.0)?,
            cors_allowed_origins: cors_origins(src)?,
            header_read_timeout: seconds_or(src, "HEADER_READ_TIMEOUT_S", 10.0)?,
            resume_retention: seconds_or(src, "RESUME_RETENTION_S", 300.0)?,
            // 0 is allowed: no ended run is kept in memory, every resume reads the database.
            resume_store_max_bytes: parse_or(
                src,
                "RESUME_STORE_MAX_BYTES",
                32 * 1024 * 1024,
                "a whole number of bytes",
            )?,
            client_write_timeout: seconds_or(src, "CLIENT_WRITE_TIMEOUT_S", 30.0)?,
            upstream_http2: flag(src, "UPSTREAM_HTTP2", false)?,
            upstream_streams_per_connection: positive(src, "UPSTREAM_STREAMS_PER_CONNECTION", 100)?,
            first_request_timeout: seconds_or(src, "FIRST_REQUEST_TIMEOUT_S", 10.0)?,
            http2_idle_timeout: seconds_or(src, "HTTP2_IDLE_TIMEOUT_S", 60.0)?,
            max_connections_per_client: cap(src, "MAX_CONNECTIONS_PER_CLIENT", 1024)?,
            max_connections: cap(src, "MAX_CONNECTIONS", default_max_connections())?,
            instance_lease: instance_lease(src)?,
            instance_id: instance_id(src)?,
            trusted_proxies: trusted_proxies(src)?,
            audit_store_text: store_text(src)?,
            audit_retention_days: retention_days(src)?,
            api_keys_file: var(src, "API_KEYS_FILE").map(PathBuf::from),
            key_file: None,
            traces: otel::traces(src)?,
        };
        config.key_file = config
            .load_key_file()
            .map_err(|e| ConfigError::new("API_KEYS_FILE", e.to_string()))?;
        Ok(config)
    }

    /// Reads `API_KEYS_FILE` (at start, and again on `SIGHUP`), checked against the rest of
    /// this configuration; `None` when it is unset.
    pub fn load_key_file(&self) -> Result<Option<KeyFile>, KeyFileError> {
        let Some(path) = &self.api_keys_file else {
            return Ok(None);
        };
        KeyFile::load(path, &self.key_file_context()).map(Some)
    }

    /// What the key file is checked against (`API_KEYS`, the prices).
    pub fn key_file_context(&self) -> keys::Context<'_> {
        keys::Context {
            api_keys: &self.api_keys,
            prices_set: self.prices_set(),
        }
    }

    /// Whether runs have a cost in dollars (contract §9), so that a daily cost budget can be
    /// counted: all four prices are set. With one missing, a run whose model reported tokens
    /// has no cost (`crate::cost::of_run`), and a cost budget would never move.
    pub fn prices_set(&self) -> bool {
        [self.flash.prices, self.pro.prices]
            .iter()
            .all(|p| p.input_per_mtok.is_some() && p.output_per_mtok.is_some())
    }

    /// The defaults, as `cargo run` with an empty environment would see them.
    pub fn defaults() -> Config {
        // The empty source cannot fail validation: every default is valid by construction.
        match Config::from_source(&HashMap::<&str, &str>::new()) {
            Ok(c) => c,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }

    pub fn model(&self, role: Role) -> &ModelConfig {
        match role {
            Role::Flash => &self.flash,
            Role::Pro => &self.pro,
        }
    }
}

#[cfg(test)]
mod tests;
