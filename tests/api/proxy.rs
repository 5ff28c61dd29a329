//! Behind a proxy (issue 13, item 4; contract §8): which address is the client's with and
//! without `TRUSTED_PROXIES`, a forged `X-Forwarded-For`, rate limits keyed on the client,
//! one budget shared by replicas on PostgreSQL, and what happens when it cannot be reached.

use std::{process::Stdio, sync::Arc};

use duet::{
    audit::{MemorySink, Store},
    metrics::Metrics,
    server::{Parts, Server},
};
use serde_json::{Value, json};

use crate::{db, helpers::*};

/// A client bound to another loopback address (Linux routes all of 127.0.0.0/8 to the
/// loopback interface), so that the server sees another TCP peer.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(Some(ip.parse().unwrap()))
        .build()
        .unwrap()
}

/// `POST /query` from `peer`, claiming `forwarded` in `X-Forwarded-For`, with `key`.
async fn query(
    addr: impl std::fmt::Display,
    peer: &str,
    forwarded: Option<&str>,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = client_from(peer)
        .post(format!("http://{addr}/query"))
        .json(&json!({"query": "q"}));
    if let Some(xff) = forwarded {
        req = req.header("x-forwarded-for", xff);
    }
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

async fn status(
    addr: impl std::fmt::Display,
    peer: &str,
    forwarded: Option<&str>,
    key: Option<&str>,
) -> u16 {
    query(addr, peer, forwarded, key).await.status().as_u16()
}

async fn metrics_of(addr: impl std::fmt::Display) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

const LIMITED: [(&str, &str); 2] = [("RATE_LIMIT_PER_MINUTE", "1"), ("RATE_LIMIT_BURST", "2")];

/// Without `TRUSTED_PROXIES` a client cannot escape its limit or the wrong-key throttle by
/// writing a new `X-Forwarded-For` on each request: the header is ignored and the TCP peer
/// is the client.
#[tokio::test(start_paused = true)]
async fn a_forged_forwarded_for_is_ignored_without_trusted_proxies() {
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &LIMITED).await;
    let a = app.addr;
    assert_eq!(status(a, "127.0.0.1", Some("203.0.113.1"), None).await, 200);
    assert_eq!(status(a, "127.0.0.1", Some("203.0.113.2"), None).await, 200);
    let refused = query(a, "127.0.0.1", Some("203.0.113.3"), None).await;
    assert_eq!(refused.status(), 429, "one bucket: the peer's");
    assert_eq!(
        refused.headers()["retry-after"],
        "60",
        "one request a minute"
    );
    // Another peer has its own bucket.
    assert_eq!(status(a, "127.0.0.2", Some("203.0.113.3"), None).await, 200);

    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[("API_KEYS", "right-key"), ("AUTH_FAILURE_LIMIT", "2")],
    )
    .await;
    let a = app.addr;
    assert_eq!(
        status(a, "127.0.0.1", Some("198.51.100.1"), Some("g1")).await,
        401
    );
    assert_eq!(
        status(a, "127.0.0.1", Some("198.51.100.2"), Some("g2")).await,
        401
    );
    let forged = Some("198.51.100.3");
    assert_eq!(status(a, "127.0.0.1", forged, Some("right-key")).await, 429);
    assert_eq!(status(a, "127.0.0.2", forged, Some("right-key")).await, 200);
}

/// With the peer trusted, the forwarded address is the client: each has its own budget and
/// its own wrong-key count, for the query routes and the admin API alike. Entries a client
/// puts on the left of the header are skipped; an untrusted peer's header is still ignored.
#[tokio::test(start_paused = true)]
async fn with_trusted_proxies_the_forwarded_address_is_the_client() {
    let mut vars = LIMITED.to_vec();
    vars.push(("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"));
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &vars).await;
    let a = app.addr;
    let proxy = "127.0.0.1";
    assert_eq!(status(a, proxy, Some("203.0.113.1"), None).await, 200);
    assert_eq!(status(a, proxy, Some("203.0.113.1"), None).await, 200);
    assert_eq!(status(a, proxy, Some("203.0.113.1"), None).await, 429);
    // Another client behind the same proxy, and the same one behind a second trusted hop.
    assert_eq!(status(a, proxy, Some("203.0.113.2"), None).await, 200);
    assert_eq!(
        status(a, proxy, Some("203.0.113.2, 10.9.8.7"), None).await,
        200
    );
    assert_eq!(status(a, proxy, Some("203.0.113.2"), None).await, 429);
    // The refused client writes an address of its own to the left: the proxy appended the
    // real one, which is what counts.
    let forged = Some("198.51.100.77, 203.0.113.1");
    assert_eq!(status(a, proxy, forged, None).await, 429);
    // An untrusted peer's header is ignored: its budget is its own address's.
    let untrusted = "127.0.0.2";
    assert_eq!(status(a, untrusted, Some("203.0.113.3"), None).await, 200);
    assert_eq!(status(a, untrusted, Some("203.0.113.4"), None).await, 200);
    assert_eq!(status(a, untrusted, Some("203.0.113.5"), None).await, 429);
    // ... and does not spend the forwarded address's.
    assert_eq!(status(a, proxy, Some("203.0.113.3"), None).await, 200);
    // No header from a trusted peer: the peer is the client.
    assert_eq!(status(a, proxy, None, None).await, 200);

    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[
            ("API_KEYS", "right-key"),
            ("ADMIN_TOKEN", "admin-secret"),
            ("AUTH_FAILURE_LIMIT", "2"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    let a = app.addr;
    let guesser = Some("198.51.100.1");
    assert_eq!(status(a, proxy, guesser, Some("g1")).await, 401);
    assert_eq!(status(a, proxy, guesser, Some("g2")).await, 401);
    assert_eq!(status(a, proxy, guesser, Some("right-key")).await, 429);
    // Its neighbours behind the proxy are not held to its guesses.
    assert_eq!(
        status(a, proxy, Some("198.51.100.2"), Some("right-key")).await,
        200
    );
    let admin = |forwarded: &'static str| {
        client_from(proxy)
            .get(format!(
                "http://{a}/runs/0192d5c4-0000-7000-8000-000000000000"
            ))
            .header("x-forwarded-for", forwarded)
            .bearer_auth("admin-secret")
            .send()
    };
    assert_eq!(admin("198.51.100.1").await.unwrap().status(), 429);
    assert_eq!(
        admin("198.51.100.2").await.unwrap().status(),
        404,
        "no such run"
    );
}

/// Issue 13: with the defaults (600/min, burst 100, keyed on the TCP peer) one backend client
/// doing 300 concurrent streams got 429 on two thirds of them. With the defaults now every
/// one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_streams_from_one_client_all_succeed_with_the_defaults() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let streams = (0..300).map(|i| {
        let (client, url) = (app.client.clone(), app.url("/query/stream"));
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&json!({"query": format!("q{i}")}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let events = read_events(resp).await;
            (status, done(&events)["status"].clone())
        })
    });
    let ended = futures::future::join_all(streams).await;
    let ok = ended
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|(status, done)| *status == 200 && done == "ok")
        .count();
    assert_eq!(ok, 300);
}

/// A replica whose shared budget cannot be reached decides alone (its own in-memory bucket),
/// counts it, and does not ask the database again at once.
#[tokio::test]
async fn an_unreachable_shared_budget_falls_back_to_the_replicas_own() {
    // Nothing listens on port 1: every connection attempt is refused at once.
    let store = Store::connect_lazy("postgres://duet@127.0.0.1:1/duet").unwrap();
    let parts = Parts {
        config: config(&LIMITED),
        flash: Scripted::new("flash-m", vec![Step::Finish]),
        pro: Scripted::new("pro-m", vec![Step::Finish]),
        sink: Arc::new(MemorySink::new()),
        metrics: Metrics::new().unwrap(),
        store: Some(store),
        instance: None,
    };
    let server = Server::start(parts).await.unwrap();
    let a = server.addr;
    assert_eq!(status(a, "127.0.0.1", None, None).await, 200);
    assert_eq!(status(a, "127.0.0.1", None, None).await, 200);
    assert_eq!(status(a, "127.0.0.1", None, None).await, 429);
    let m = metrics_of(a).await;
    let count = |reason: &str| -> u64 {
        let prefix = format!("duet_rate_limit_fallbacks_total{{reason=\"{reason}\"}} ");
        let line = m.lines().find(|l| l.starts_with(&prefix)).expect(&prefix);
        line[prefix.len()..].parse().unwrap()
    };
    assert!(count("error") + count("timeout") == 1, "{m}");
    assert_eq!(count("backoff"), 2, "{m}");
    server.stop().await.unwrap();
}

/// A `duet serve` process on `database_url` with rate limits on and `extra` settings.
fn replica(database_url: &str, extra: &[(&str, &str)]) -> (std::process::Child, String) {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut cmd = duet_command(&dir);
    cmd.env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", database_url)
        .env("RATE_LIMIT_PER_MINUTE", "1")
        .env("RATE_LIMIT_BURST", "3")
        .env("SIMULATED_FLASH_TTFT_S", "0.01")
        .env("SIMULATED_PRO_TTFT_S", "0.02")
        .env("SIMULATED_FLASH_TOKEN_S", "0.001")
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let (addr, _log) = listening(&mut child);
    (child, addr)
}

/// Contract §8: on PostgreSQL the limit is one budget for all replicas, not one each: keyed
/// on the API key (whichever replica a request lands on) and, without keys, on the client
/// address a trusted proxy forwarded.
#[tokio::test]
async fn two_replicas_share_one_rate_budget_on_postgres() {
    let Some(db) = db::postgres("two_replicas_share_one_rate_budget").await else {
        return;
    };
    let keys = [("API_KEYS", "sk-test-alpha,sk-test-beta")];
    let (a_child, a) = replica(&db.url, &keys);
    // The other replica lists the keys in another order: the budget follows the key.
    let (b_child, b) = replica(&db.url, &[("API_KEYS", "sk-test-beta,sk-test-alpha")]);
    let alpha = Some("sk-test-alpha");
    assert_eq!(status(&a, "127.0.0.1", None, alpha).await, 200);
    assert_eq!(status(&b, "127.0.0.2", None, alpha).await, 200);
    assert_eq!(status(&a, "127.0.0.3", None, alpha).await, 200);
    for (replica, peer) in [(&b, "127.0.0.1"), (&a, "127.0.0.4")] {
        let refused = query(replica, peer, None, alpha).await;
        assert_eq!(refused.status(), 429);
        let retry: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], "rate_limited");
    }
    assert_eq!(
        status(&b, "127.0.0.1", None, Some("sk-test-beta")).await,
        200
    );
    // The table names keys by a fingerprint, never the key.
    let buckets = match &db.store {
        Store::Postgres(pool) => {
            sqlx::query_scalar::<_, String>("SELECT bucket FROM rate_limit_buckets")
                .fetch_all(pool)
                .await
                .unwrap()
        }
        Store::Sqlite(_) => unreachable!(),
    };
    assert_eq!(buckets.len(), 2, "{buckets:?}");
    assert!(
        buckets
            .iter()
            .all(|b| b.starts_with("key:") && !b.contains("alpha") && !b.contains("beta")),
        "{buckets:?}"
    );
    for addr in [&a, &b] {
        let m = metrics_of(addr).await;
        assert!(
            m.contains(r#"duet_rate_limit_fallbacks_total{reason="error"} 0"#),
            "{m}"
        );
    }
    assert_eq!(terminate(a_child).await, Some(0));
    assert_eq!(terminate(b_child).await, Some(0));

    // Without keys, behind a trusted proxy: the forwarded address's budget, across replicas.
    let behind = [("TRUSTED_PROXIES", "127.0.0.1")];
    let (a_child, a) = replica(&db.url, &behind);
    let (b_child, b) = replica(&db.url, &behind);
    let user = Some("203.0.113.1");
    assert_eq!(status(&a, "127.0.0.1", user, None).await, 200);
    assert_eq!(status(&b, "127.0.0.1", user, None).await, 200);
    assert_eq!(status(&b, "127.0.0.1", user, None).await, 200);
    assert_eq!(status(&a, "127.0.0.1", user, None).await, 429);
    assert_eq!(
        status(&b, "127.0.0.1", Some("203.0.113.2"), None).await,
        200
    );
    assert_eq!(terminate(a_child).await, Some(0));
    assert_eq!(terminate(b_child).await, Some(0));
}

/// A bad `TRUSTED_PROXIES` stops the service at start with one line naming it: trusting the
/// wrong peers would let any client pick its own address.
#[test]
fn bad_trusted_proxies_stop_the_service_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = duet_command(dir.path())
        .env("TRUSTED_PROXIES", "10.0.0.0/8, nginx.internal")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("TRUSTED_PROXIES") && stderr.contains("\"nginx.internal\""),
        "{stderr}"
    );
}
