//! What `duet serve` says at start: one `configuration` line naming providers, models, base
//! URLs, the database, limits and deadlines, and no secret; and what an upstream's HTTP error
//! names (its host and path, never the key or the query).

use std::process::Stdio;

use duet::providers::{Provider, http::BodyLimits};
use serde_json::Value;

use crate::{helpers::*, upstream::*};

/// `url` with `password` as its password when it has none; otherwise `url` and the password
/// it already carries (which then must stay out of the log just the same).
fn with_password(url: &str, password: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => (
            url.to_owned(),
            userinfo.split_once(':').unwrap().1.to_owned(),
        ),
        Some((user, host)) => (
            format!(
                "{scheme}://{user}:{password}@{host}{}",
                &rest[authority_end..]
            ),
            password.to_owned(),
        ),
        None => (
            format!("{scheme}://postgres:{password}@{rest}"),
            password.to_owned(),
        ),
    }
}

#[tokio::test]
async fn the_start_line_names_the_configuration_and_no_secret() {
    const FLASH_KEY: &str = "sk-planted-flash-key-0123456789";
    const PRO_KEY: &str = "AIzaPlantedProKey0123456789abcdef";
    const CLIENT_KEYS: [&str; 2] = ["planted-client-one-8c1d", "planted-client-two-4e7a"];
    let Some(db) = crate::db::postgres("start_line").await else {
        return;
    };
    let (database_url, password) = with_password(&db.url, "planted-db-password-93f1");
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &database_url)
        .env("FLASH_PROVIDER", "openai")
        .env("FLASH_MODEL", "gpt-4.1-mini")
        .env(
            "FLASH_BASE_URL",
            "https://proxyuser:planted-userinfo-pw@llm.example:8443/v1?api-key=planted-query-key",
        )
        .env("FLASH_API_KEY", FLASH_KEY)
        .env("FLASH_TTFT_TIMEOUT_S", "2.5")
        .env("FLASH_PRICE_INPUT_PER_MTOK", "0.3")
        .env("FLASH_PRICE_OUTPUT_PER_MTOK", "2.5")
        .env("PRO_PRICE_INPUT_PER_MTOK", "1.25")
        .env("PRO_PROVIDER", "gemini")
        .env("PRO_BASE_URL", "https://gemini.example/v1beta")
        .env("PRO_API_KEY", PRO_KEY)
        .env("API_KEYS", CLIENT_KEYS.join(","))
        .env("MAX_CONCURRENT_STREAMS", "17")
        .env("MAX_QUERY_BYTES", "4096")
        .env("STALL_TIMEOUT_S", "9")
        .env("AUDIT_STORE_TEXT", "none")
        .env("AUDIT_RETENTION_DAYS", "30")
        .env("RATE_LIMIT_PER_MINUTE", "120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (_addr, log) = listening(&mut child);
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();

    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v["message"] == "configuration")
        .collect();
    assert_eq!(lines.len(), 1, "one start line: {log}");
    let line = &lines[0];
    let host = database_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap();
    let db_name = database_url.rsplit('/').next().unwrap().split('?').next();
    let expected = [
        ("flash_provider", Value::from("openai")),
        ("flash_model", "gpt-4.1-mini".into()),
        ("flash_base_url", "https://llm.example:8443/v1".into()),
        ("flash_ttft_timeout_s", "2.5".into()),
        ("flash_timeout_s", 5.0.into()),
        ("pro_provider", "gemini".into()),
        ("pro_model", "gemini-2.5-pro".into()),
        ("pro_base_url", "https://gemini.example/v1beta".into()),
        ("pro_ttft_timeout_s", "off".into()),
        ("flash_price_input_per_mtok", "0.3".into()),
        ("flash_price_output_per_mtok", "2.5".into()),
        ("pro_price_input_per_mtok", "1.25".into()),
        ("pro_price_output_per_mtok", "unset".into()),
        ("stall_timeout_s", 9.0.into()),
        (
            "database",
            format!("postgres {host}/{}", db_name.unwrap()).into(),
        ),
        ("max_concurrent_streams", 17.into()),
        ("max_query_bytes", 4096.into()),
        ("audit_store_text", "none".into()),
        ("audit_retention_days", "30".into()),
        ("rate_limit", true.into()),
        ("rate_limit_per_minute", "120".into()),
        ("api_keys", 2.into()),
    ];
    for (field, value) in expected {
        assert_eq!(line[field], value, "{field} in {line}");
    }
    assert!(line["instance_lease_s"].as_f64().unwrap() > 0.0, "{line}");
    assert!(line["instance_id"].is_string(), "{line}");
    for secret in [
        FLASH_KEY,
        PRO_KEY,
        CLIENT_KEYS[0],
        CLIENT_KEYS[1],
        &password,
        "planted-userinfo-pw",
        "proxyuser",
        "planted-query-key",
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log: {log}");
    }
}

#[tokio::test]
async fn an_upstream_404_names_host_and_path_but_not_the_key_or_query() {
    for family in ["openai", "gemini", "anthropic"] {
        let server = FixtureServer::start(vec![status(404, Vec::new())]).await;
        let p: Box<dyn Provider> = match family {
            "gemini" => Box::new(gemini(&server, BodyLimits::default())),
            "openai" => Box::new(openai(&server, BodyLimits::default())),
            _ => Box::new(anthropic(&server, BodyLimits::default())),
        };
        let (_, done) = run(&*p, &request("q", None)).await;
        let e = done.unwrap_err();
        let path = match family {
            "gemini" => "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            "openai" => "/v1/chat/completions",
            _ => "/v1/messages",
        };
        assert!(
            e.detail
                .contains(&format!("{family} HTTP 404 from {}{path}", server.addr)),
            "{family}: {}",
            e.detail
        );
        assert!(!e.detail.contains(KEY), "{}", e.detail);
        assert!(!e.detail.contains("alt=sse"), "no query: {}", e.detail);
        // The client's message stays free of internal addresses.
        assert!(!e.message.contains("127.0.0.1"), "{}", e.message);
    }
}
