//! `duet bench`: the load generator against the mock directly and through duet (with and
//! without HTTP/2 to the upstream), with the fault mix, and the audit-writer benchmark.
//! Counts only: the numbers themselves are machine-dependent and live in docs/benchmarks.md.

use std::{collections::HashMap, sync::Arc, time::Duration};

use duet::{
    audit::MemorySink,
    config::Config,
    devtools::{
        bench::{
            self,
            streams::{Mix, Options, Target},
        },
        mock::MockConfig,
    },
    server::{Parts, Server},
};

use crate::db;

async fn start_mock() -> std::net::SocketAddr {
    crate::helpers::start_mock(MockConfig {
        ttft: Duration::from_millis(10),
        token_interval: Duration::from_millis(1),
        tokens: 8,
        ..MockConfig::default()
    })
    .await
}

/// duet with both roles on the OpenAI adapter against the mock, as `duet serve` builds it.
async fn start_duet(mock: std::net::SocketAddr, extra: &[(&str, &str)]) -> (Server, MemorySink) {
    let base = format!("http://{mock}/v1");
    let mut vars: HashMap<&str, &str> = HashMap::from([
        ("BIND_ADDR", "127.0.0.1:0"),
        ("LOG_FORMAT", "pretty"),
        ("FLASH_PROVIDER", "openai"),
        ("PRO_PROVIDER", "openai"),
        ("FLASH_BASE_URL", base.as_str()),
        ("PRO_BASE_URL", base.as_str()),
        ("FLASH_API_KEY", "mock"),
        ("PRO_API_KEY", "mock"),
        ("RATE_LIMIT_PER_MINUTE", "0"),
    ]);
    vars.extend(extra.iter().copied());
    let config = Config::from_source(&vars).unwrap();
    let sink = MemorySink::new();
    let parts = Parts::from_config(config, Arc::new(sink.clone())).unwrap();
    (Server::start(parts).await.unwrap(), sink)
}

fn options(url: String, target: Target, requests: u64) -> Options {
    Options {
        url,
        target,
        concurrency: 3,
        requests: Some(requests),
        duration: None,
        query: "Write a haiku about the sea.".into(),
        history_bytes: 0,
        deltas: true,
        timeout: Duration::from_secs(20),
        warmup: 1,
        ramp: Duration::ZERO,
        mix: Mix::default(),
        slow_read: Duration::from_millis(5),
        run_ids: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_workload_direct_and_through_duet() {
    let mock = start_mock().await;
    let direct = bench::streams::run(options(
        format!("http://{mock}/v1/chat/completions"),
        Target::Openai,
        9,
    ))
    .await
    .unwrap();
    assert_eq!((direct.ended, direct.errors_total), (9, 0), "{direct}");
    assert_eq!(direct.warmup, 3);
    assert_eq!(direct.first_token.count, 6);

    for http2 in ["0", "1"] {
        let (server, sink) = start_duet(mock, &[("UPSTREAM_HTTP2", http2)]).await;
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("ids.txt");
        let mut opts = options(
            format!("http://{}/query/stream", server.addr),
            Target::Duet,
            9,
        );
        opts.run_ids = Some(ids.clone());
        let relayed = bench::streams::run(opts).await.unwrap();
        assert_eq!((relayed.ended, relayed.errors_total), (9, 0), "{relayed}");
        assert_eq!(relayed.statuses.get("ok"), Some(&9), "{relayed}");
        assert_eq!(relayed.first_flash.count + relayed.first_pro.count, 12);
        let lines = std::fs::read_to_string(&ids).unwrap();
        assert_eq!(lines.lines().filter(|l| l.ends_with(" done")).count(), 9);
        server.stop().await.unwrap();
        assert_eq!(sink.records().len(), 9, "UPSTREAM_HTTP2={http2}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mix_through_duet_ends_every_stream() {
    let mock = start_mock().await;
    let (server, sink) = start_duet(
        mock,
        &[
            ("FLASH_TIMEOUT_S", "0.5"),
            ("PRO_TIMEOUT_S", "1.5"),
            ("STALL_TIMEOUT_S", "0.3"),
        ],
    )
    .await;
    let mut opts = options(
        format!("http://{}/query/stream", server.addr),
        Target::Duet,
        14,
    );
    opts.mix = "normal:1,hang:1,error:1,midstream:1,stall:1,disconnect:1,slow:1"
        .parse()
        .unwrap();
    let report = bench::streams::run(opts).await.unwrap();
    assert_eq!(report.errors_total, 0, "{report}");
    assert_eq!((report.ended, report.disconnected), (12, 2), "{report}");
    assert_eq!(report.statuses.get("failed"), Some(&8), "{report}");
    server.stop().await.unwrap();
    assert_eq!(sink.records().len(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_bench_writes_every_record() {
    let db = db::sqlite().await;
    let report = bench::audit::run(bench::audit::Options {
        database_url: db.url.clone(),
        records: 300,
        text_bytes: 100,
        deadletter: db.dir.path().join("dl.jsonl"),
    })
    .await
    .unwrap();
    assert_eq!((report.records, report.deadlettered), (300, 0));
    assert_eq!(db::count(&db.store, "dual_runs").await, 300);
    assert_eq!(db::count(&db.store, "model_traces").await, 600);
}
