//! The OpenTelemetry variables of contract §9 (traces), read as the OpenTelemetry
//! specification defines them, and validated like every other variable: a bad value stops
//! the service at start with a line naming it.
//!
//! Traces are off unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), or when `OTEL_SDK_DISABLED=true`. The headers
//! (`OTEL_EXPORTER_OTLP_HEADERS`, which carry collector keys) are only checked for their
//! shape here; the exporter reads them from the environment itself, so they never pass
//! through a value duet could log.

use std::time::Duration;

use super::{ConfigError, Source, parse::var};

/// How spans travel to the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`, the specification's default: `POST {endpoint}/v1/traces`.
    HttpProtobuf,
    /// `grpc`: the OTLP/gRPC `TraceService`.
    Grpc,
}

impl OtlpProtocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

/// The batch span processor's settings (`OTEL_BSP_*`, the specification's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (default 2048): ended spans waiting for export; past it new ones
    /// are dropped, never waited for.
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` (default 5000 ms): the longest a span waits before its batch goes.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (default 512): spans per export request.
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_EXPORT_TIMEOUT` (default 30000 ms): the longest one export may take.
    pub export_timeout: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

/// Where and how traces are exported; present only when traces are on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracesConfig {
    /// The URL spans are sent to: for `http/protobuf` the general endpoint with `/v1/traces`
    /// added (the traces endpoint as it is); for `grpc` the endpoint as it is.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// `service.name`: `OTEL_SERVICE_NAME`, else a `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, else `duet`.
    pub service_name: String,
    pub batch: BatchSettings,
}

impl TracesConfig {
    /// The collector as logs may show it: scheme, host and port. Never a path, user or
    /// query, which some vendors' endpoints carry keys in.
    pub fn endpoint_for_log(&self) -> String {
        match reqwest::Url::parse(&self.endpoint) {
            Ok(url) => {
                let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
                format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or(""))
            }
            // Checked at load: cannot happen.
            Err(_) => "(not a valid URL)".to_owned(),
        }
    }
}

pub(super) fn traces(src: &dyn Source) -> Result<Option<TracesConfig>, ConfigError> {
    if sdk_disabled(src)? {
        return Ok(None);
    }
    let protocol = protocol(src)?;
    let endpoint = match (
        var(src, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        var(src, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(url), _) => {
            endpoint_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url, protocol, false)?
        }
        (None, Some(url)) => endpoint_url("OTEL_EXPORTER_OTLP_ENDPOINT", &url, protocol, true)?,
        (None, None) => return Ok(None),
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_HEADERS",
    ] {
        check_headers(src, name)?;
    }
    let service_name = var(src, "OTEL_SERVICE_NAME")
        .or_else(|| service_name_attribute(src))
        .unwrap_or_else(|| "duet".to_owned());
    Ok(Some(TracesConfig {
        endpoint,
        protocol,
        service_name,
        batch: batch(src)?,
    }))
}

/// `OTEL_SDK_DISABLED=true` turns OpenTelemetry off whatever else is set.
fn sdk_disabled(src: &dyn Source) -> Result<bool, ConfigError> {
    match var(src, "OTEL_SDK_DISABLED")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ConfigError::new(
            "OTEL_SDK_DISABLED",
            format!("{other:?} is not true or false"),
        )),
    }
}

fn protocol(src: &dyn Source) -> Result<OtlpProtocol, ConfigError> {
    let (name, value) = match var(src, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v),
        None => match var(src, "OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_PROTOCOL", v),
            None => return Ok(OtlpProtocol::HttpProtobuf),
        },
    };
    match value.as_str() {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        other => Err(ConfigError::new(
            name,
            format!("{other:?} is not http/protobuf or grpc (http/json is not supported)"),
        )),
    }
}

/// Checks an endpoint and makes the URL spans go to. `general`: the endpoint is the base of
/// every signal, and traces go to its `v1/traces` (the specification's rule for
/// `OTEL_EXPORTER_OTLP_ENDPOINT` over HTTP).
fn endpoint_url(
    name: &'static str,
    value: &str,
    protocol: OtlpProtocol,
    general: bool,
) -> Result<String, ConfigError> {
    // Only the shape is told back: an endpoint may carry credentials in its user part.
    let url = reqwest::Url::parse(value).map_err(|e| {
        ConfigError::new(
            name,
            format!("is not a URL ({e}); expected http(s)://host:port"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError::new(
            name,
            "must be an http:// or https:// URL with a host",
        ));
    }
    if protocol == OtlpProtocol::HttpProtobuf && general {
        let base = value.trim_end_matches('/');
        return Ok(format!("{base}/v1/traces"));
    }
    Ok(value.to_owned())
}

/// `key=value` pairs separated by commas. The values are never told back, not even in
/// this error: they are collector keys.
fn check_headers(src: &dyn Source, name: &'static str) -> Result<(), ConfigError> {
    let Some(value) = var(src, name) else {
        return Ok(());
    };
    for (i, item) in value.split(',').enumerate() {
        if item.trim().is_empty() {
            continue;
        }
        let well_formed = item
            .split_once('=')
            .is_some_and(|(key, _)| !key.trim().is_empty());
        if !well_formed {
            return Err(ConfigError::new(
                name,
                format!(
                    "item {} is not key=value (values not shown: they may be keys)",
                    i + 1
                ),
            ));
        }
    }
    Ok(())
}

/// A `service.name=...` inside `OTEL_RESOURCE_ATTRIBUTES`, which the specification ranks
/// below `OTEL_SERVICE_NAME` and above the default.
fn service_name_attribute(src: &dyn Source) -> Option<String> {
    var(src, "OTEL_RESOURCE_ATTRIBUTES")?
        .split(',')
        .filter_map(|item| item.split_once('='))
        .find(|(key, _)| key.trim() == "service.name")
        .map(|(_, value)| {
            percent_encoding::percent_decode_str(value.trim())
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|name| !name.is_empty())
}

fn batch(src: &dyn Source) -> Result<BatchSettings, ConfigError> {
    let defaults = BatchSettings::default();
    let settings = BatchSettings {
        max_queue_size: count(src, "OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size)?,
        schedule_delay: millis(src, "OTEL_BSP_SCHEDULE_DELAY", defaults.schedule_delay)?,
        max_export_batch_size: count(
            src,
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size,
        )?,
        export_timeout: millis(src, "OTEL_BSP_EXPORT_TIMEOUT", defaults.export_timeout)?,
    };
    if settings.max_export_batch_size > settings.max_queue_size {
        return Err(ConfigError::new(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            format!(
                "{} is more than OTEL_BSP_MAX_QUEUE_SIZE ({})",
                settings.max_export_batch_size, settings.max_queue_size
            ),
        ));
    }
    Ok(settings)
}

/// A whole number from 1 to 1,000,000 (the queue is allocated up front, so an absurd size
/// is refused rather than tried).
fn count(src: &dyn Source, name: &'static str, default: usize) -> Result<usize, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(default);
    };
    match v.parse::<usize>() {
        Ok(n @ 1..=1_000_000) => Ok(n),
        _ => Err(ConfigError::new(
            name,
            format!("{v:?} is not a whole number from 1 to 1000000"),
        )),
    }
}

/// Milliseconds, as the specification gives every `OTEL_BSP_*` duration.
fn millis(
    src: &dyn Source,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = var(src, name) else {
        return Ok(default);
    };
    match v.parse::<u64>() {
        Ok(n @ 1..=86_400_000) => Ok(Duration::from_millis(n)),
        _ => Err(ConfigError::new(
            name,
            format!("{v:?} is not a whole number of milliseconds from 1 to 86400000"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Option<TracesConfig>, ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        traces(&map)
    }

    #[test]
    fn off_without_an_endpoint_whatever_else_is_set() {
        assert_eq!(load(&[]), Ok(None));
        assert_eq!(
            load(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_BSP_SCHEDULE_DELAY", "10"),
            ]),
            Ok(None)
        );
        assert_eq!(
            load(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true"),
            ]),
            Ok(None)
        );
    }

    #[test]
    fn http_protobuf_is_the_default_and_the_general_endpoint_gets_v1_traces() {
        let c = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.service_name, "duet");
        assert_eq!(c.batch, BatchSettings::default());
        assert_eq!(c.endpoint_for_log(), "http://collector:4318");
        let c = load(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://user:PLANTED@t.example/PLANTED/v1/traces?k=PLANTED",
        )])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint_for_log(), "https://t.example");

        // The traces endpoint wins and is used as it is.
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://t.example/otlp/spans",
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "https://t.example/otlp/spans");
    }

    #[test]
    fn grpc_uses_the_endpoint_as_it_is() {
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
        assert_eq!(c.endpoint, "http://collector:4317");
        // The traces variable wins over the general one.
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn service_name_precedence() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let attrs = (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod,service.name=gw%20a",
        );
        let c = load(&[endpoint, attrs]).unwrap().unwrap();
        assert_eq!(c.service_name, "gw a");
        let c = load(&[endpoint, attrs, ("OTEL_SERVICE_NAME", "duet-eu")])
            .unwrap()
            .unwrap();
        assert_eq!(c.service_name, "duet-eu");
    }

    #[test]
    fn bad_values_name_the_variable_and_never_show_a_header_value() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                &[endpoint, ("OTEL_BSP_SCHEDULE_DELAY", "5s")],
                "OTEL_BSP_SCHEDULE_DELAY",
            ),
            (
                &[endpoint, ("OTEL_BSP_MAX_QUEUE_SIZE", "0")],
                "OTEL_BSP_MAX_QUEUE_SIZE",
            ),
            (
                &[endpoint, ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")],
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            ),
            (
                &[endpoint, ("OTEL_BSP_EXPORT_TIMEOUT", "-1")],
                "OTEL_BSP_EXPORT_TIMEOUT",
            ),
            (
                &[endpoint, ("OTEL_SDK_DISABLED", "maybe")],
                "OTEL_SDK_DISABLED",
            ),
        ];
        for (pairs, var) in cases {
            let e = load(pairs).unwrap_err();
            assert_eq!(e.var, *var, "{pairs:?}");
        }
        let e = load(&[
            endpoint,
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-honeycomb-team=PLANTED-key,broken-PLANTED",
            ),
        ])
        .unwrap_err();
        assert_eq!(e.var, "OTEL_EXPORTER_OTLP_HEADERS");
        assert!(!e.to_string().contains("PLANTED"), "{e}");
        let ok = load(&[
            endpoint,
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%3Db,x-team=t"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(ok.batch.schedule_delay, Duration::from_millis(100));
    }
}
