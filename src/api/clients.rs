//! `GET /clients` (contract §11): each named key's usage today against its daily budgets,
//! for operators. On PostgreSQL the usage is every replica's (the shared `client_usage`
//! table); on SQLite it is this process's since it started.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{Extensions, HeaderMap},
};
use serde::Serialize;

use super::{ApiError, AppState, admin::admin_auth, error::Context};

/// The body of `GET /clients`.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ClientList {
    /// The keys of `API_KEYS_FILE`, in its order; empty without one. Keys of `API_KEYS`
    /// have no name and are not listed.
    clients: Vec<ClientUsage>,
}

/// One named key.
#[derive(Serialize, utoipa::ToSchema)]
struct ClientUsage {
    /// The key's name (never the key).
    #[schema(value_type = String)]
    name: Arc<str>,
    /// Its usage on the current UTC day.
    today: Today,
    /// Its daily budgets; `null` where it has none.
    budgets: BudgetsBody,
}

#[derive(Serialize, utoipa::ToSchema)]
struct Today {
    /// Runs started today (runs refused by a budget are not counted).
    runs: u64,
    /// Input and output tokens of both models, of the runs that ended.
    tokens: u64,
    /// The runs' cost in US dollars, of the runs that ended; `null` when no prices are set.
    cost_usd: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct BudgetsBody {
    daily_token_budget: Option<u64>,
    daily_cost_budget_usd: Option<f64>,
}

/// Each named API key's usage today (UTC) and its daily budgets.
#[utoipa::path(
    get, path = "/clients", tag = "admin", operation_id = "list_clients",
    summary = "Named API keys: usage today against their daily budgets",
    description = "One entry per key of API_KEYS_FILE, in the file's order (after the last \
        reload). Usage counts the runs started on the current UTC day; tokens and cost are \
        added when a run ends. On PostgreSQL it is every replica's. Without ADMIN_TOKEN \
        configured this answers 404 like any unknown path.",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every named key", body = ClientList),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 404, response = super::openapi::NotFound),
        (status = 429, response = super::openapi::RateLimited),
        (status = 500, response = super::openapi::Internal),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
) -> Result<Json<ClientList>, ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(super::admin::admin_off());
    };
    admin_auth(&state, &extensions, &headers, token)?;
    let keys = state.guard.keys().current();
    let names = keys.names();
    let usage = state
        .usage
        .today(&names, chrono::Utc::now())
        .await
        .context(|| "reading the clients' usage".into())?;
    let priced = state.config.prices_set();
    let clients = keys
        .named()
        .filter_map(|c| {
            let name = c.name()?;
            let used = usage.get(name).copied().unwrap_or_default();
            Some(ClientUsage {
                name: Arc::clone(name),
                today: Today {
                    runs: used.runs,
                    tokens: used.tokens,
                    cost_usd: priced.then_some(used.cost_usd),
                },
                budgets: BudgetsBody {
                    daily_token_budget: c.budgets.daily_token_budget,
                    daily_cost_budget_usd: c.budgets.daily_cost_budget_usd,
                },
            })
        })
        .collect();
    Ok(Json(ClientList { clients }))
}
