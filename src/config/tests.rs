//! The configuration's defaults and its refusals, one variable at a time.

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

/// A key no client can send in a header stops the service at start, named by its variable
/// and place but never quoted; so does a base URL that is not one (it may be a pasted key).
#[test]
fn keys_that_cannot_be_sent_stop_the_service_without_being_shown() {
    for (var, value, place) in [
        ("API_KEYS", "good-key, k\u{e9}y-secret", "entry 2"),
        ("API_KEYS", "sp ace-secret", "entry 1"),
        ("ADMIN_TOKEN", "t\u{f6}k-secret", "the value"),
        ("ADMIN_TOKEN", "tab\tsecret", "the value"),
        ("METRICS_TOKEN", "m\u{e9}trics-secret", "the value"),
    ] {
        let e = load(&[(var, value)]).unwrap_err();
        assert_eq!(e.var, var, "{value:?}");
        let shown = e.to_string();
        assert!(shown.contains(place), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }
    let e = load(&[("FLASH_BASE_URL", "sk-proj-PLANTEDsecret")]).unwrap_err();
    assert_eq!(e.var, "FLASH_BASE_URL");
    assert!(!e.to_string().contains("PLANTED"), "{e}");
}

#[test]
fn trusted_proxies_are_ranges_and_a_bad_one_is_named() {
    assert!(load(&[]).unwrap().trusted_proxies.is_empty());
    let c = load(&[("TRUSTED_PROXIES", " 10.0.0.0/8, ,192.0.2.7,2001:db8::/32 ")]).unwrap();
    let shown: Vec<String> = c.trusted_proxies.iter().map(Cidr::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    for bad in [
        "10.0.0.0/33",
        "10.0.0.0/8,proxy.internal",
        "10.0.0.0/8;10.1.0.0/16",
    ] {
        let e = load(&[("TRUSTED_PROXIES", bad)]).unwrap_err();
        assert_eq!(e.var, "TRUSTED_PROXIES", "{bad}");
        assert!(e.to_string().lines().count() == 1, "{e}");
    }
    let e = load(&[("TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal")]).unwrap_err();
    assert!(e.problem.contains("\"proxy.internal\""), "{e}");
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

#[test]
fn instance_id_is_unset_by_default_and_refuses_bad_values() {
    assert_eq!(Config::defaults().instance_id, None);
    assert_eq!(
        load(&[("INSTANCE_ID", " duet-0.eu-west:8080 ")])
            .unwrap()
            .instance_id
            .as_deref(),
        Some("duet-0.eu-west:8080")
    );
    for bad in ["two words", "tab\there", "é", &"x".repeat(129)] {
        let err = load(&[("INSTANCE_ID", bad)]).unwrap_err();
        assert_eq!(err.var, "INSTANCE_ID", "{bad}");
        assert_eq!(err.to_string().lines().count(), 1, "{err}");
    }
}

#[test]
fn store_text_and_retention_default_and_refuse_bad_values() {
    let c = load(&[]).unwrap();
    assert_eq!(c.audit_store_text, StoreText::Full);
    assert_eq!(c.audit_retention_days, None);
    let c = load(&[("AUDIT_STORE_TEXT", "None"), ("AUDIT_RETENTION_DAYS", "30")]).unwrap();
    assert_eq!(c.audit_store_text, StoreText::None);
    assert_eq!(c.audit_retention_days, Some(30));
    assert_eq!(
        load(&[("AUDIT_STORE_TEXT", "hash")]).unwrap_err().var,
        "AUDIT_STORE_TEXT"
    );
    for bad in ["0", "-1", "7d", "36501"] {
        let e = load(&[("AUDIT_RETENTION_DAYS", bad)]).unwrap_err();
        assert_eq!(e.var, "AUDIT_RETENTION_DAYS", "{bad}");
    }
}

#[test]
fn prices_are_unknown_unless_set_and_refused_unless_finite_and_not_negative() {
    let c = Config::defaults();
    assert_eq!(c.flash.prices, Prices::default());
    assert_eq!(c.pro.prices.input_per_mtok, None);
    let c = load(&[
        ("FLASH_PRICE_INPUT_PER_MTOK", "0.3"),
        ("FLASH_PRICE_OUTPUT_PER_MTOK", " 2.5 "),
        ("PRO_PRICE_INPUT_PER_MTOK", "0"),
        ("PRO_PRICE_OUTPUT_PER_MTOK", ""),
    ])
    .unwrap();
    assert_eq!(c.flash.prices.input_per_mtok, Some(0.3));
    assert_eq!(c.flash.prices.output_per_mtok, Some(2.5));
    assert_eq!(c.pro.prices.input_per_mtok, Some(0.0));
    // Empty counts as unset, as for every variable.
    assert_eq!(c.pro.prices.output_per_mtok, None);
    for (var, value) in [
        ("FLASH_PRICE_INPUT_PER_MTOK", "-0.1"),
        ("FLASH_PRICE_OUTPUT_PER_MTOK", "NaN"),
        ("PRO_PRICE_INPUT_PER_MTOK", "inf"),
        ("PRO_PRICE_OUTPUT_PER_MTOK", "$3"),
    ] {
        let err = load(&[(var, value)]).unwrap_err();
        assert_eq!(err.var, var);
        let line = err.to_string();
        assert!(
            line.starts_with(&format!("configuration error: {var}: ")),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }
}

#[test]
fn batch_interval_defaults_to_two_ms_and_refuses_more_than_a_hundred() {
    assert_eq!(
        load(&[]).unwrap().audit_batch_interval,
        Duration::from_millis(2)
    );
    let c = load(&[("AUDIT_BATCH_INTERVAL_MS", "0")]).unwrap();
    assert_eq!(c.audit_batch_interval, Duration::ZERO);
    let c = load(&[("AUDIT_BATCH_INTERVAL_MS", "100")]).unwrap();
    assert_eq!(c.audit_batch_interval, Duration::from_millis(100));
    for bad in ["101", "-1", "2.5", "10ms"] {
        let e = load(&[("AUDIT_BATCH_INTERVAL_MS", bad)]).unwrap_err();
        assert_eq!(e.var, "AUDIT_BATCH_INTERVAL_MS", "{bad}");
    }
}

#[test]
fn serve_threads_are_off_unless_set() {
    assert_eq!(load(&[]).unwrap().serve_threads, 0);
    assert_eq!(load(&[("SERVE_THREADS", "2")]).unwrap().serve_threads, 2);
    assert_eq!(load(&[("SERVE_THREADS", "16")]).unwrap().serve_threads, 16);
    for bad in ["1025", "-1", "two"] {
        let e = load(&[("SERVE_THREADS", bad)]).unwrap_err();
        assert_eq!(e.var, "SERVE_THREADS", "{bad}");
    }
}
