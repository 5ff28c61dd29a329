//! Typed configuration, read once from the environment (and `.env`) and validated at start.
//!
//! Every variable of contract §2 lives here. A bad value is a [`ConfigError`] naming the
//! variable, so the service never starts half-configured.

use std::{
    collections::HashMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration,
};

use serde::Serialize;

/// The two models of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Flash,
    Pro,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Flash => "flash",
            Role::Pro => "pro",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// A secret that cannot be printed by accident: `Debug` shows `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to read the value; grep for it when auditing where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
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
    pub api_keys: Vec<Secret>,
    pub admin_token: Option<Secret>,
    pub log_format: LogFormat,
    /// Sustained requests per minute per client (API key, or peer address without keys);
    /// `None` (the default, `RATE_LIMIT_PER_MINUTE=0`) turns the limit off.
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

/// A variable's value with surrounding blanks trimmed; empty counts as unset, as in most shells'
/// `VAR=` idiom for "use the default".
fn var(src: &dyn Source, name: &str) -> Option<String> {
    src.get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn parse_or<T: FromStr>(
    src: &dyn Source,
    name: &'static str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match var(src, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ConfigError::new(name, format!("{v:?} is not {expected}"))),
    }
}

/// Seconds as a positive, finite decimal (`0.25`, `5`, `45`).
fn seconds(src: &dyn Source, name: &'static str) -> Result<Option<Duration>, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(None);
    };
    let secs: f64 = v.parse().map_err(|_| {
        ConfigError::new(name, format!("{v:?} is not a number of seconds (e.g. 2.5)"))
    })?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(ConfigError::new(
            name,
            format!("{v:?} must be more than 0 and at most 86400 seconds"),
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

fn seconds_or(src: &dyn Source, name: &'static str, default: f64) -> Result<Duration, ConfigError> {
    Ok(seconds(src, name)?.unwrap_or(Duration::from_secs_f64(default)))
}

/// A yes/no variable: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
fn flag(src: &dyn Source, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match var(src, name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None => Ok(default),
        Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::new(
            name,
            format!("{other:?} is not 1 or 0 (true/false, yes/no, on/off)"),
        )),
    }
}

fn positive(src: &dyn Source, name: &'static str, default: usize) -> Result<usize, ConfigError> {
    let n: usize = parse_or(src, name, default, "a whole number")?;
    if n == 0 {
        return Err(ConfigError::new(name, "must be at least 1"));
    }
    Ok(n)
}

/// A cap where `0` means no cap.
fn cap(src: &dyn Source, name: &'static str, default: usize) -> Result<Option<usize>, ConfigError> {
    let n: usize = parse_or(src, name, default, "a whole number (0 turns the cap off)")?;
    Ok((n > 0).then_some(n))
}

/// Half the soft open-file limit: the other half stays for upstream connections, the database
/// and files, so a flood of idle clients is refused before `accept` fails for every client.
/// Where the limit cannot be read (not Linux), 4096.
fn default_max_connections() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| open_files_limit(&text))
        .map_or(4096, |n| (n / 2).max(1))
}

/// The soft limit from the "Max open files" line of `/proc/self/limits`.
fn open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn model_config(src: &dyn Source, role: Role) -> Result<ModelConfig, ConfigError> {
    let names = RoleVars::of(role);
    let provider = match var(src, names.provider) {
        None => ProviderKind::Simulated,
        Some(v) => v.parse().map_err(|e| ConfigError::new(names.provider, e))?,
    };
    let model = var(src, names.model).unwrap_or_else(|| provider.default_model(role).to_owned());
    let base_url = match var(src, names.base_url) {
        None => provider.default_base_url().to_owned(),
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    names.base_url,
                    format!("{url:?} must start with http:// or https://"),
                ));
            }
            url.trim_end_matches('/').to_owned()
        }
    };
    let api_key = var(src, names.api_key)
        .or_else(|| provider.fallback_key_var().and_then(|k| var(src, k)))
        .map(Secret::new);
    if api_key.is_none() && provider != ProviderKind::Simulated {
        let fallback = provider.fallback_key_var().unwrap_or("");
        return Err(ConfigError::new(
            names.api_key,
            format!(
                "{} needs an API key: set {} or {fallback}",
                provider.as_str(),
                names.api_key
            ),
        ));
    }
    let (default_timeout, default_first, default_per) = match role {
        Role::Flash => (5.0, 0.3, 0.015),
        Role::Pro => (45.0, 2.0, 0.03),
    };
    Ok(ModelConfig {
        role,
        provider,
        model,
        base_url,
        api_key,
        timeout: seconds_or(src, names.timeout, default_timeout)?,
        ttft_timeout: seconds(src, names.ttft_timeout)?,
        simulated: SimulatedTiming {
            first_token: seconds_or(src, names.sim_first_token, default_first)?,
            per_token: seconds_or(src, names.sim_per_token, default_per)?,
        },
    })
}

/// The variable names of one role, spelled out so that errors can name them as `&'static str`.
struct RoleVars {
    provider: &'static str,
    model: &'static str,
    base_url: &'static str,
    api_key: &'static str,
    timeout: &'static str,
    ttft_timeout: &'static str,
    sim_first_token: &'static str,
    sim_per_token: &'static str,
}

impl RoleVars {
    const fn of(role: Role) -> RoleVars {
        match role {
            Role::Flash => RoleVars {
                provider: "FLASH_PROVIDER",
                model: "FLASH_MODEL",
                base_url: "FLASH_BASE_URL",
                api_key: "FLASH_API_KEY",
                timeout: "FLASH_TIMEOUT_S",
                ttft_timeout: "FLASH_TTFT_TIMEOUT_S",
                sim_first_token: "SIMULATED_FLASH_TTFT_S",
                sim_per_token: "SIMULATED_FLASH_TOKEN_S",
            },
            Role::Pro => RoleVars {
                provider: "PRO_PROVIDER",
                model: "PRO_MODEL",
                base_url: "PRO_BASE_URL",
                api_key: "PRO_API_KEY",
                timeout: "PRO_TIMEOUT_S",
                ttft_timeout: "PRO_TTFT_TIMEOUT_S",
                sim_first_token: "SIMULATED_PRO_TTFT_S",
                sim_per_token: "SIMULATED_PRO_TOKEN_S",
            },
        }
    }
}

fn secrets_list(src: &dyn Source, name: &'static str) -> Result<Vec<Secret>, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(Vec::new());
    };
    let keys: Vec<Secret> = v
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(Secret::new)
        .collect();
    if keys.is_empty() {
        return Err(ConfigError::new(name, "lists no key"));
    }
    Ok(keys)
}

/// Every entry must be an origin that can match: the CORS layer compares `Origin` byte for
/// byte, so an entry browsers never send (with a path, upper case, a default port) would
/// leave the browser page refused with nothing in the log. Such an entry stops the service
/// at start like any other bad setting.
fn cors_origins(src: &dyn Source) -> Result<Vec<http::HeaderValue>, ConfigError> {
    let Some(v) = var(src, "CORS_ALLOWED_ORIGINS") else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        // A stray comma (`a,,b`, a trailing one) names no origin.
        .filter(|o| !o.is_empty())
        .map(|o| {
            cors_origin(o).map_err(|why| {
                ConfigError::new(
                    "CORS_ALLOWED_ORIGINS",
                    format!("{o:?} is not an origin like https://example.com (or *): {why}"),
                )
            })
        })
        .collect()
}

/// `*`, or `scheme://host[:port]` as a browser serializes it.
fn cors_origin(o: &str) -> Result<http::HeaderValue, &'static str> {
    let value = http::HeaderValue::from_str(o).map_err(|_| "it cannot be a header value")?;
    if o == "*" {
        return Ok(value);
    }
    let (authority, default_port) = if let Some(rest) = o.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = o.strip_prefix("https://") {
        (rest, 443)
    } else {
        return Err("it must start with http:// or https://");
    };
    if authority.contains(['/', '?', '#']) {
        return Err("an origin has no path, not even a trailing /");
    }
    if authority.contains('@') {
        return Err("an origin has no user name or password");
    }
    if o.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("browsers send origins in lower case");
    }
    let parsed: http::uri::Authority = authority.parse().map_err(|_| "the host is not valid")?;
    if parsed.host().is_empty() {
        return Err("the host is missing");
    }
    // The text after the last `:`, unless that colon is inside an IPv6 address's brackets.
    let port = authority
        .rfind(':')
        .filter(|&i| !authority[i..].contains(']'))
        .map(|i| &authority[i + 1..]);
    if let Some(port) = port {
        let port: u16 = port.parse().map_err(|_| "the port is not valid")?;
        if port == default_port {
            return Err("browsers leave the scheme's default port out");
        }
    }
    Ok(value)
}

/// `INSTANCE_LEASE_S`: at least a second, since a live replica whose heartbeat is late by
/// more than the lease (a pause, a slow database) has its runs marked interrupted.
fn instance_lease(src: &dyn Source) -> Result<Duration, ConfigError> {
    let lease = seconds_or(src, "INSTANCE_LEASE_S", 30.0)?;
    if lease < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "INSTANCE_LEASE_S",
            format!("{} s is less than the minimum of 1 s", lease.as_secs_f64()),
        ));
    }
    Ok(lease)
}

impl Config {
    /// How the providers reach their upstreams: enough connections for every stream this
    /// service may hold, at `upstream_streams_per_connection` calls each.
    pub fn upstream_pool(&self) -> crate::providers::pool::PoolConfig {
        let per = self.upstream_streams_per_connection;
        crate::providers::pool::PoolConfig {
            http2_prior_knowledge: self.upstream_http2,
            streams_per_connection: per,
            max_connections: self.max_concurrent_streams.div_ceil(per),
        }
    }

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
        Ok(Config {
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
            api_keys: secrets_list(src, "API_KEYS")?,
            admin_token: var(src, "ADMIN_TOKEN").map(Secret::new),
            log_format,
            rate_limit_per_minute: match parse_or(
                src,
                "RATE_LIMIT_PER_MINUTE",
                // Off by default: keyed on the TCP peer, one backend client or everyone behind
                // a reverse proxy would share one bucket and be refused under ordinary load.
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
        })
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
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Config::from_source(&map)
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::defaults();
        assert_eq!(c.bind_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://duet.db");
        assert_eq!(c.flash.provider, ProviderKind::Simulated);
        assert_eq!(c.pro.provider, ProviderKind::Simulated);
        assert_eq!(c.flash.timeout, Duration::from_secs(5));
        assert_eq!(c.pro.timeout, Duration::from_secs(45));
        assert_eq!(c.flash.ttft_timeout, None);
        assert_eq!(c.stall_timeout, Duration::from_secs(15));
        assert_eq!(c.max_query_bytes, 32_768);
        assert_eq!(c.max_concurrent_streams, 10_000);
        assert_eq!(c.resume_store_max_bytes, 32 * 1024 * 1024);
        assert_eq!(c.upstream_streams_per_connection, 100);
        assert_eq!(c.sse_keepalive, Duration::from_secs(15));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(
            c.audit_deadletter_path,
            PathBuf::from("duet-deadletter.jsonl")
        );
        assert!(c.api_keys.is_empty());
        assert!(c.admin_token.is_none());
        // Contract §8: rate limits are off unless asked for.
        assert_eq!(c.rate_limit_per_minute, None);
        assert_eq!(c.auth_failure_limit, Some(10));
        assert_eq!(c.auth_failure_window, Duration::from_secs(60));
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let c = load(&[("FLASH_TIMEOUT_S", "0.25"), ("PRO_TTFT_TIMEOUT_S", "1.5")]).unwrap();
        assert_eq!(c.flash.timeout, Duration::from_millis(250));
        assert_eq!(c.pro.ttft_timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn upstream_http2_is_a_flag() {
        assert!(!load(&[]).unwrap().upstream_http2);
        assert!(load(&[("UPSTREAM_HTTP2", "1")]).unwrap().upstream_http2);
        assert!(load(&[("UPSTREAM_HTTP2", "TRUE")]).unwrap().upstream_http2);
        assert!(!load(&[("UPSTREAM_HTTP2", "off")]).unwrap().upstream_http2);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("FLASH_TIMEOUT_S", "soon"),
            ("PRO_TIMEOUT_S", "-1"),
            ("PRO_TIMEOUT_S", "NaN"),
            ("STALL_TIMEOUT_S", "0"),
            ("MAX_QUERY_BYTES", "lots"),
            ("MAX_CONCURRENT_STREAMS", "0"),
            ("BIND_ADDR", "localhost"),
            ("FLASH_PROVIDER", "skynet"),
            ("DATABASE_URL", "mysql://x"),
            ("LOG_FORMAT", "xml"),
            ("FLASH_BASE_URL", "ftp://x"),
            ("RATE_LIMIT_PER_MINUTE", "-3"),
            ("AUTH_FAILURE_LIMIT", "ten"),
            ("AUTH_FAILURE_WINDOW_S", "0"),
            ("CORS_ALLOWED_ORIGINS", "example.com"),
            ("HEADER_READ_TIMEOUT_S", "0"),
            ("MAX_CONCURRENT_STREAMS", "99999999999"),
            ("CLIENT_WRITE_TIMEOUT_S", "x"),
            ("UPSTREAM_HTTP2", "maybe"),
            ("UPSTREAM_STREAMS_PER_CONNECTION", "0"),
            ("FIRST_REQUEST_TIMEOUT_S", "0"),
            ("HTTP2_IDLE_TIMEOUT_S", "-1"),
            ("MAX_CONNECTIONS_PER_CLIENT", "-1"),
            ("MAX_CONNECTIONS", "many"),
        ];
        for (name, value) in cases {
            let err = load(&[(name, value)]).unwrap_err();
            assert_eq!(err.var, name, "{name}={value}");
            assert!(err.to_string().contains(name), "{err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn cors_origins_must_be_origins_as_browsers_send_them() {
        let c = load(&[(
            "CORS_ALLOWED_ORIGINS",
            " https://app.example, http://localhost:3000,,http://[::1]:8080 ",
        )])
        .unwrap();
        assert_eq!(
            c.cors_allowed_origins,
            [
                "https://app.example",
                "http://localhost:3000",
                "http://[::1]:8080"
            ]
        );
        assert_eq!(
            load(&[("CORS_ALLOWED_ORIGINS", "*")])
                .unwrap()
                .cors_allowed_origins,
            ["*"]
        );
        // Each would never match an `Origin` header: refused, never dropped.
        for bad in [
            "example.com",
            "https://app.example/",
            "https://app.example/page",
            "https://app.example?x",
            "https://App.Example",
            "HTTPS://app.example",
            "https://user@app.example",
            "https://app.example:443",
            "http://app.example:80",
            "https://app.example:99999",
            "https://",
            "https://exa mple.com",
            "ftp://app.example",
            "null",
        ] {
            let value = format!("https://fine.example,{bad}");
            let err = load(&[("CORS_ALLOWED_ORIGINS", value.as_str())]).unwrap_err();
            assert_eq!(err.var, "CORS_ALLOWED_ORIGINS", "{bad}");
            assert!(err.problem.contains(&format!("{bad:?}")), "{bad}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn connection_caps_default_on_and_zero_turns_them_off() {
        let c = Config::defaults();
        assert_eq!(c.max_connections_per_client, Some(1024));
        assert!(c.max_connections.is_some_and(|n| n >= 1));
        assert_eq!(c.first_request_timeout, Duration::from_secs(10));
        assert_eq!(c.http2_idle_timeout, Duration::from_secs(60));
        let off = load(&[
            ("MAX_CONNECTIONS_PER_CLIENT", "0"),
            ("MAX_CONNECTIONS", "0"),
        ])
        .unwrap();
        assert_eq!(
            (off.max_connections_per_client, off.max_connections),
            (None, None)
        );
    }

    #[test]
    fn open_files_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(open_files_limit(text), Some(1024));
        assert_eq!(
            open_files_limit("Max open files unlimited unlimited files"),
            None
        );
        assert_eq!(open_files_limit(""), None);
    }

    #[test]
    fn real_provider_without_key_is_refused() {
        let err = load(&[("PRO_PROVIDER", "gemini")]).unwrap_err();
        assert_eq!(err.var, "PRO_API_KEY");
        assert!(err.problem.contains("GEMINI_API_KEY"));
        let ok = load(&[("PRO_PROVIDER", "gemini"), ("GEMINI_API_KEY", "k")]).unwrap();
        assert_eq!(ok.pro.api_key.as_ref().map(Secret::expose), Some("k"));
        assert_eq!(ok.pro.model, "gemini-2.5-pro");
        let own = load(&[
            ("FLASH_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "shared"),
            ("FLASH_API_KEY", "own"),
        ])
        .unwrap();
        assert_eq!(own.flash.api_key.as_ref().map(Secret::expose), Some("own"));
    }

    #[test]
    fn secrets_do_not_print() {
        let c = load(&[("API_KEYS", "a1, b2"), ("ADMIN_TOKEN", "topsecret")]).unwrap();
        assert_eq!(c.api_keys.len(), 2);
        let shown = format!("{c:?}");
        assert!(!shown.contains("topsecret") && !shown.contains("a1"));
    }

    #[test]
    fn instance_lease_defaults_to_30_s_and_refuses_bad_values() {
        assert_eq!(Config::defaults().instance_lease, Duration::from_secs(30));
        assert_eq!(
            load(&[("INSTANCE_LEASE_S", "2.5")]).unwrap().instance_lease,
            Duration::from_millis(2500)
        );
        for bad in ["0", "0.5", "-3", "soon", "NaN", "100000"] {
            let err = load(&[("INSTANCE_LEASE_S", bad)]).unwrap_err();
            assert_eq!(err.var, "INSTANCE_LEASE_S", "{bad}");
        }
    }
}
