//! The one line logged at start that says what this process was configured with, so that a
//! wrong base URL, model or limit shows before the first request does. It names no secret:
//! URLs are cut to scheme, host, port and path, the database to its kind and location, and
//! the API keys to their count.

use tracing::info;

use crate::{
    config::{Config, DatabaseBackend, ModelConfig, ProviderKind, StoreText, TracesConfig},
    providers::http::url_for_log,
};

/// Logs the start-up line for `config`, as the process `instance_id`.
pub(super) fn log(config: &Config, instance_id: &str) {
    let flash = Role::of(&config.flash);
    let pro = Role::of(&config.pro);
    info!(
        flash_provider = flash.provider,
        flash_model = %config.flash.model,
        flash_base_url = %flash.base_url,
        flash_timeout_s = config.flash.timeout.as_secs_f64(),
        flash_ttft_timeout_s = flash.ttft_timeout_s,
        flash_price_input_per_mtok = flash.price_input,
        flash_price_output_per_mtok = flash.price_output,
        pro_provider = pro.provider,
        pro_model = %config.pro.model,
        pro_base_url = %pro.base_url,
        pro_timeout_s = config.pro.timeout.as_secs_f64(),
        pro_ttft_timeout_s = pro.ttft_timeout_s,
        pro_price_input_per_mtok = pro.price_input,
        pro_price_output_per_mtok = pro.price_output,
        stall_timeout_s = config.stall_timeout.as_secs_f64(),
        database = %database(&config.database_url),
        max_concurrent_streams = config.max_concurrent_streams,
        max_query_bytes = config.max_query_bytes,
        audit_store_text = match config.audit_store_text {
            StoreText::Full => "full",
            StoreText::None => "none",
        },
        audit_retention_days = %config
            .audit_retention_days
            .map_or_else(|| "forever".to_owned(), |d| d.to_string()),
        instance_id,
        instance_lease_s = config.instance_lease.as_secs_f64(),
        rate_limit = config.rate_limit_per_minute.is_some(),
        rate_limit_per_minute = %config
            .rate_limit_per_minute
            .map_or_else(|| "off".to_owned(), |n| n.to_string()),
        api_keys = config.api_keys.len(),
        named_keys = config.key_file.as_ref().map_or(0, |f| f.keys.len()),
        // The collector as scheme, host and port, and the protocol; never its headers.
        traces = %config
            .traces
            .as_ref()
            .map_or_else(|| "off".to_owned(), TracesConfig::endpoint_for_log),
        traces_protocol = config.traces.as_ref().map_or("off", |t| t.protocol.as_str()),
        "configuration"
    );
}

/// The parts of one role that need shaping before they are logged.
struct Role {
    provider: &'static str,
    base_url: String,
    ttft_timeout_s: String,
    /// USD per million tokens, or `unset` (cost unknown).
    price_input: String,
    price_output: String,
}

impl Role {
    fn of(model: &ModelConfig) -> Role {
        Role {
            provider: model.provider.as_str(),
            // The simulated provider calls nothing; its (default) base URL would mislead.
            base_url: match model.provider {
                ProviderKind::Simulated => "none".to_owned(),
                _ => url_for_log(&model.base_url),
            },
            ttft_timeout_s: model
                .ttft_timeout
                .map_or_else(|| "off".to_owned(), |d| d.as_secs_f64().to_string()),
            price_input: price(model.prices.input_per_mtok),
            price_output: price(model.prices.output_per_mtok),
        }
    }
}

fn price(usd_per_mtok: Option<f64>) -> String {
    usd_per_mtok.map_or_else(|| "unset".to_owned(), |p| p.to_string())
}

/// The database's kind and where it is: the file of SQLite, the host, port and database
/// name of PostgreSQL. Never the user or password a `DATABASE_URL` may carry.
fn database(url: &str) -> String {
    match DatabaseBackend::of(url) {
        Some(DatabaseBackend::Sqlite) => {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or("");
            format!("sqlite {path}")
        }
        Some(DatabaseBackend::Postgres) => match reqwest::Url::parse(url) {
            Ok(u) => format!(
                "postgres {}:{}/{}",
                u.host_str().unwrap_or("(socket)"),
                u.port().unwrap_or(5432),
                u.path().trim_start_matches('/')
            ),
            Err(_) => "postgres (unparsable URL)".to_owned(),
        },
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::database;

    #[test]
    fn database_names_kind_and_place_but_no_credentials() {
        assert_eq!(
            database("postgres://duet:s3cret-PLANTED@db.internal:6543/audit?sslmode=require"),
            "postgres db.internal:6543/audit"
        );
        assert_eq!(
            database("postgresql://u:p@localhost/duet"),
            "postgres localhost:5432/duet"
        );
        assert_eq!(database("sqlite://duet.db?mode=rwc"), "sqlite duet.db");
        assert_eq!(
            database("sqlite:/var/lib/duet/a.db"),
            "sqlite /var/lib/duet/a.db"
        );
    }
}
