//! Reading one variable: trimming, defaults, numbers, durations, flags, lists of secrets, and
//! the per-role model settings. Each helper names the variable in its [`ConfigError`].

use super::*;

/// A variable's value with surrounding blanks trimmed; empty counts as unset, as in most shells'
/// `VAR=` idiom for "use the default".
pub(super) fn var(src: &dyn Source, name: &str) -> Option<String> {
    src.get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

pub(super) fn parse_or<T: FromStr>(
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
pub(super) fn seconds(
    src: &dyn Source,
    name: &'static str,
) -> Result<Option<Duration>, ConfigError> {
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

pub(super) fn seconds_or(
    src: &dyn Source,
    name: &'static str,
    default: f64,
) -> Result<Duration, ConfigError> {
    Ok(seconds(src, name)?.unwrap_or(Duration::from_secs_f64(default)))
}

/// `AUDIT_BATCH_INTERVAL_MS`: whole milliseconds, 0 to the writer's maximum.
pub(super) fn batch_interval(src: &dyn Source) -> Result<Duration, ConfigError> {
    use crate::audit::writer::{DEFAULT_BATCH_INTERVAL, MAX_BATCH_INTERVAL};
    const NAME: &str = "AUDIT_BATCH_INTERVAL_MS";
    let default = u64::try_from(DEFAULT_BATCH_INTERVAL.as_millis()).unwrap_or(u64::MAX);
    let ms: u64 = parse_or(src, NAME, default, "a whole number of milliseconds")?;
    let interval = Duration::from_millis(ms);
    if interval > MAX_BATCH_INTERVAL {
        return Err(ConfigError::new(
            NAME,
            format!("{ms} is more than {} ms", MAX_BATCH_INTERVAL.as_millis()),
        ));
    }
    Ok(interval)
}

/// A yes/no variable: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
pub(super) fn flag(
    src: &dyn Source,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
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

pub(super) fn positive(
    src: &dyn Source,
    name: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    let n: usize = parse_or(src, name, default, "a whole number")?;
    if n == 0 {
        return Err(ConfigError::new(name, "must be at least 1"));
    }
    Ok(n)
}

/// A cap where `0` means no cap.
pub(super) fn cap(
    src: &dyn Source,
    name: &'static str,
    default: usize,
) -> Result<Option<usize>, ConfigError> {
    let n: usize = parse_or(src, name, default, "a whole number (0 turns the cap off)")?;
    Ok((n > 0).then_some(n))
}

/// Half the soft open-file limit: the other half stays for upstream connections, the database
/// and files, so a flood of idle clients is refused before `accept` fails for every client.
/// Where the limit cannot be read (not Linux), 4096.
pub(super) fn default_max_connections() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| open_files_limit(&text))
        .map_or(4096, |n| (n / 2).max(1))
}

/// The soft limit from the "Max open files" line of `/proc/self/limits`.
pub(super) fn open_files_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(super) fn model_config(src: &dyn Source, role: Role) -> Result<ModelConfig, ConfigError> {
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
                // Not quoted: a value that is not a URL may well be a key pasted into the
                // wrong variable, and keys are never logged.
                return Err(ConfigError::new(
                    names.base_url,
                    "must start with http:// or https:// (the value is not shown)",
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
        prices: Prices {
            input_per_mtok: price(src, names.price_input)?,
            output_per_mtok: price(src, names.price_output)?,
        },
    })
}

/// A price in USD per million tokens: a finite number, 0 or more; unset is unknown.
pub(super) fn price(src: &dyn Source, name: &'static str) -> Result<Option<f64>, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(None);
    };
    match v.parse::<f64>() {
        Ok(usd) if usd.is_finite() && usd >= 0.0 => Ok(Some(usd)),
        _ => Err(ConfigError::new(
            name,
            format!(
                "{v:?} is not a price in USD per million tokens (a number, 0 or more, e.g. 0.3)"
            ),
        )),
    }
}

/// The variable names of one role, spelled out so that errors can name them as `&'static str`.
pub(super) struct RoleVars {
    provider: &'static str,
    model: &'static str,
    base_url: &'static str,
    api_key: &'static str,
    timeout: &'static str,
    ttft_timeout: &'static str,
    sim_first_token: &'static str,
    sim_per_token: &'static str,
    price_input: &'static str,
    price_output: &'static str,
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
                price_input: "FLASH_PRICE_INPUT_PER_MTOK",
                price_output: "FLASH_PRICE_OUTPUT_PER_MTOK",
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
                price_input: "PRO_PRICE_INPUT_PER_MTOK",
                price_output: "PRO_PRICE_OUTPUT_PER_MTOK",
            },
        }
    }
}

pub(super) fn secrets_list(
    src: &dyn Source,
    name: &'static str,
) -> Result<Vec<Secret>, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(Vec::new());
    };
    let keys: Vec<Secret> = v
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .enumerate()
        .map(|(i, k)| header_secret(name, Some(i + 1), k))
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err(ConfigError::new(name, "lists no key"));
    }
    Ok(keys)
}

/// A key or token clients send as `Authorization: Bearer ...`: printable ASCII without
/// spaces, or no client could ever send it (a header value with other bytes is refused
/// before it is compared) and every request would be a 401 with nothing in the log. Checked
/// at start, as `API_KEYS_FILE`'s keys are. The error never quotes the value.
pub(super) fn header_secret(
    name: &'static str,
    position: Option<usize>,
    value: &str,
) -> Result<Secret, ConfigError> {
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(Secret::new(value));
    }
    let which = position.map_or_else(|| "the value".to_owned(), |n| format!("entry {n}"));
    Err(ConfigError::new(
        name,
        format!(
            "{which} must be printable ASCII without spaces: it is sent in an Authorization \
             header (the value is not shown)"
        ),
    ))
}

/// Every entry must be an origin that can match: the CORS layer compares `Origin` byte for
/// byte, so an entry browsers never send (with a path, upper case, a default port) would
/// leave the browser page refused with nothing in the log. Such an entry stops the service
/// at start like any other bad setting.
pub(super) fn cors_origins(src: &dyn Source) -> Result<Vec<http::HeaderValue>, ConfigError> {
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
pub(super) fn cors_origin(o: &str) -> Result<http::HeaderValue, &'static str> {
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

/// `TRUSTED_PROXIES`: comma-separated ranges or addresses. A bad entry stops the service at
/// start: trusting the wrong peers would let any client choose its own address.
pub(super) fn trusted_proxies(src: &dyn Source) -> Result<Vec<Cidr>, ConfigError> {
    let Some(v) = var(src, "TRUSTED_PROXIES") else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse()
                .map_err(|why| ConfigError::new("TRUSTED_PROXIES", format!("{entry:?} is {why}")))
        })
        .collect()
}

/// The longest `INSTANCE_ID`.
pub(super) const MAX_INSTANCE_ID_BYTES: usize = 128;

/// `INSTANCE_ID`: 1 to 128 printable ASCII characters without spaces, since it goes into
/// logs and rows, and operators type it in queries.
pub(super) fn instance_id(src: &dyn Source) -> Result<Option<String>, ConfigError> {
    let Some(id) = var(src, "INSTANCE_ID") else {
        return Ok(None);
    };
    if id.len() > MAX_INSTANCE_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "INSTANCE_ID",
            format!(
                "must be 1 to {MAX_INSTANCE_ID_BYTES} printable ASCII characters without spaces"
            ),
        ));
    }
    Ok(Some(id))
}

/// `INSTANCE_LEASE_S`: at least a second, since a live replica whose heartbeat is late by
/// more than the lease (a pause, a slow database) has its runs marked interrupted.
pub(super) fn instance_lease(src: &dyn Source) -> Result<Duration, ConfigError> {
    let lease = seconds_or(src, "INSTANCE_LEASE_S", 30.0)?;
    if lease < Duration::from_secs(1) {
        return Err(ConfigError::new(
            "INSTANCE_LEASE_S",
            format!("{} s is less than the minimum of 1 s", lease.as_secs_f64()),
        ));
    }
    Ok(lease)
}

/// `AUDIT_STORE_TEXT`: `full` (default) or `none`.
pub(super) fn store_text(src: &dyn Source) -> Result<StoreText, ConfigError> {
    match var(src, "AUDIT_STORE_TEXT")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("full") => Ok(StoreText::Full),
        Some("none") => Ok(StoreText::None),
        Some(other) => Err(ConfigError::new(
            "AUDIT_STORE_TEXT",
            format!("{other:?} is not full or none"),
        )),
    }
}

/// `AUDIT_RETENTION_DAYS`: unset keeps runs for ever; else a whole number of days from 1 to
/// 36500 (0 would purge every ended run, which is `duet audit purge`'s job, not a setting's).
pub(super) fn retention_days(src: &dyn Source) -> Result<Option<u32>, ConfigError> {
    let Some(v) = var(src, "AUDIT_RETENTION_DAYS") else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        Ok(n @ 1..=36_500) => Ok(Some(n)),
        _ => Err(ConfigError::new(
            "AUDIT_RETENTION_DAYS",
            format!(
                "{v:?} is not a whole number of days from 1 to 36500 (unset keeps runs for ever)"
            ),
        )),
    }
}
