//! `deploy/`: the dashboard and the alert rules ask only for metrics and labels duet
//! exposes; promtool accepts the rules, the Prometheus config and the dashboard's queries;
//! the compose file, the Dockerfile and the systemd unit have what they promise; and
//! `duet healthcheck`, the image's probe, tells a live service from a dead one.
//!
//! No container engine runs here, so the image is never built nor compose brought up by
//! these tests (deploy/README.md says what was and was not verified).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::helpers::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// What /metrics exposes.

/// A metric family as the exposition shows it: its type and every label name any of its
/// samples carries (`le` of histogram buckets left out).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// Labels Prometheus adds to every scraped series (the target's), not in the exposition.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Parses a text exposition into families.
fn families(text: &str, into: &mut BTreeMap<String, Family>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            into.entry(name.to_owned()).or_default().kind = kind.to_owned();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let name = &line[..name_end];
        let family = std::iter::once(name)
            .chain(
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find(|f| into.contains_key(*f))
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE line"))
            .to_owned();
        if line[name_end..].starts_with('{') {
            let labels = &line[name_end + 1..line.rfind('}').expect("closing brace")];
            let labels = tokenize(&format!("{{{labels}}}")).expect("labels tokenize");
            let family = into.get_mut(&family).expect("known family");
            for w in labels.windows(2) {
                if let [Tok::Ident(label), Tok::Op(op)] = w
                    && op == "="
                    && label != "le"
                {
                    family.labels.insert(label.clone());
                }
            }
        }
    }
}

/// Runs the service through what makes its labelled families appear (ok runs, a timeout of
/// each kind, provider errors, a refused stream, a refused connection) and returns the
/// families of its scrapes.
async fn exposed() -> BTreeMap<String, Family> {
    let mut found = BTreeMap::new();

    // An ok run with prices set (so `duet_cost_usd_total` has series), a Flash preview
    // skipped, requests refused (415).
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[
            ("FLASH_PRICE_INPUT_PER_MTOK", "0.3"),
            ("FLASH_PRICE_OUTPUT_PER_MTOK", "2.5"),
            ("PRO_PRICE_INPUT_PER_MTOK", "1.25"),
            ("PRO_PRICE_OUTPUT_PER_MTOK", "10"),
        ],
    )
    .await;
    app.stream(json!({"query": "q", "deltas": true})).await;
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    families(&scrape(&app).await, &mut found);

    // Timeouts of every kind and a provider error.
    let app = spawn_app(
        vec![ms(10), Step::Delta("a"), Step::Hang],
        vec![Step::Hang],
        &[
            ("PRO_TIMEOUT_S", "1"),
            ("STALL_TIMEOUT_S", "0.5"),
            ("FLASH_TTFT_TIMEOUT_S", "2"),
        ],
    )
    .await;
    app.stream(json!({"query": "q"})).await;
    families(&scrape(&app).await, &mut found);
    let app = spawn_app(
        vec![Step::Hang],
        vec![
            ms(100),
            Step::Fail(duet::providers::ErrorType::RateLimited, false),
        ],
        &[("FLASH_TTFT_TIMEOUT_S", "0.5")],
    )
    .await;
    app.stream(json!({"query": "q"})).await;
    families(&scrape(&app).await, &mut found);

    // A stream refused at MAX_CONCURRENT_STREAMS, and a connection refused at
    // MAX_CONNECTIONS_PER_CLIENT.
    let app = spawn_app(
        vec![Step::Hang],
        vec![Step::Hang],
        &[("MAX_CONCURRENT_STREAMS", "1"), ("PRO_TIMEOUT_S", "30")],
    )
    .await;
    let open = app.post_stream(json!({"query": "q"})).await;
    assert_eq!(open.status(), 200);
    let refused = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(app.url("/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    drop(open);
    families(&scrape(&app).await, &mut found);

    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[("MAX_CONNECTIONS_PER_CLIENT", "1")],
    )
    .await;
    let held = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // Let the server accept the first connection before the second comes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let second = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(app.url("/healthz"))
        .send()
        .await;
    assert!(second.is_err(), "the second connection is closed at accept");
    drop(held);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    families(&scrape(&app).await, &mut found);

    // The audit writer's families need a real writer on a real database, whose I/O runs on
    // threads of its own: on a runtime of its own with a real clock, so that the paused
    // clock here cannot jump the writer's timers while SQLite works.
    let audited = tokio::task::spawn_blocking(|| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(audited_scrape())
    })
    .await
    .unwrap();
    families(&audited, &mut found);
    found
}

/// A scrape of a service whose runs went through the audit writer into SQLite.
async fn audited_scrape() -> String {
    let db = crate::db::sqlite().await;
    let quick = || vec![ms(10), Step::Delta("a"), Step::Finish];
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick()),
        Scripted::new("pro-m", quick()),
        &[],
        db.store.clone(),
        duet::audit::WriterOptions::new(db.dir.path().join("deadletter.jsonl")),
    )
    .await;
    app.stream(json!({"query": "q"})).await;
    // The record reaches the database off the response path: wait for its write.
    let mut text = scrape(&app).await;
    for _ in 0..500 {
        if text.contains("duet_audit_writes_total{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        text = scrape(&app).await;
    }
    app.stop().await;
    writer.shutdown(std::time::Duration::from_secs(5)).await;
    text
}

// ---------------------------------------------------------------------------------------
// PromQL, as far as checking names goes.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// A number, a duration, or a range or subquery `[...]` (none names a metric).
    Num,
    Open(char),
    Close(char),
    /// An operator or a comma: `=`, `!~`, `/`, `,`, ...
    Op(String),
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => {
                let mut s = String::new();
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    s.extend(chars.get(i));
                    i += 1;
                }
                if i == chars.len() {
                    return Err(format!("unterminated string in {expr}"));
                }
                i += 1;
                toks.push(Tok::Str(s));
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                toks.push(Tok::Num);
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
                toks.push(Tok::Num);
            }
            '(' | '{' => {
                toks.push(Tok::Open(c));
                i += 1;
            }
            ')' | '}' => {
                toks.push(Tok::Close(c));
                i += 1;
            }
            _ => {
                let start = i;
                i += 1;
                while i < chars.len() && "=~!<>".contains(chars[i]) && "=!<>".contains(c) {
                    i += 1;
                }
                toks.push(Tok::Op(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(toks)
}

/// Words that are followed by `(` but are not functions, or stand alone, and name no metric.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// One vector selector: `name{label="...", ...}` at token `at`.
#[derive(Debug)]
struct Selector {
    at: usize,
    name: String,
    matchers: Vec<String>,
}

/// A `by (...)`, `without (...)`, `on (...)`... clause and the tokens it applies to.
#[derive(Debug)]
struct Grouping {
    labels: Vec<String>,
    scope: std::ops::Range<usize>,
}

/// The index of the token that closes the group opened at `open`.
fn closing(toks: &[Tok], open: usize) -> Result<usize, String> {
    let mut depth = 0;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open(_) => depth += 1,
            Tok::Close(_) => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
    }
    Err("unbalanced brackets".into())
}

/// The index of the token that opens the group closed at `close`.
fn opening(toks: &[Tok], close: usize) -> Result<usize, String> {
    let mut depth = 0;
    for i in (0..=close).rev() {
        match toks[i] {
            Tok::Close(_) => depth += 1,
            Tok::Open(_) => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
    }
    Err("unbalanced brackets".into())
}

fn parse_promql(expr: &str) -> Result<(Vec<Selector>, Vec<Grouping>), String> {
    let toks = tokenize(expr)?;
    let mut selectors = Vec::new();
    let mut groupings = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let Tok::Ident(word) = &toks[i] else {
            if toks[i] == Tok::Open('{') {
                return Err(format!("a selector without a metric name in {expr}"));
            }
            i += 1;
            continue;
        };
        let next_is_paren = toks.get(i + 1) == Some(&Tok::Open('('));
        if KEYWORDS.contains(&word.as_str()) {
            if next_is_paren {
                let close = closing(&toks, i + 1)?;
                let labels: Vec<String> = toks[i + 2..close]
                    .iter()
                    .filter_map(|t| match t {
                        Tok::Ident(l) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                let scope = match word.as_str() {
                    // `sum by (l) (EXPR)` or `sum (EXPR) by (l)`.
                    "by" | "without" => {
                        if i > 0 && matches!(toks[i - 1], Tok::Ident(_)) {
                            let open = close + 1;
                            open..closing(&toks, open)?
                        } else if i > 0 && toks[i - 1] == Tok::Close(')') {
                            opening(&toks, i - 1)?..i - 1
                        } else {
                            return Err(format!("cannot tell what `{word}` groups in {expr}"));
                        }
                    }
                    // Vector matching: the labels must be on both sides.
                    _ => 0..toks.len(),
                };
                groupings.push(Grouping { labels, scope });
                i = close + 1;
                continue;
            }
            i += 1;
            continue;
        }
        if next_is_paren {
            // A function or an aggregation.
            i += 1;
            continue;
        }
        let mut matchers = Vec::new();
        let mut end = i + 1;
        if toks.get(i + 1) == Some(&Tok::Open('{')) {
            let close = closing(&toks, i + 1)?;
            for w in toks[i + 2..close].windows(3) {
                if let [Tok::Ident(label), Tok::Op(_), Tok::Str(_)] = w {
                    matchers.push(label.clone());
                }
            }
            end = close + 1;
        }
        selectors.push(Selector {
            at: i,
            name: word.clone(),
            matchers,
        });
        i = end;
    }
    Ok((selectors, groupings))
}

/// What the checks know: the families this build exposes.
struct Known {
    families: BTreeMap<String, Family>,
}

impl Known {
    fn new(families: BTreeMap<String, Family>) -> Self {
        Known { families }
    }

    /// The family `name` belongs to and the labels a query may use on it; or what is wrong.
    fn resolve(&self, name: &str) -> Result<(String, BTreeSet<String>), String> {
        let (family, bucket) = match self.families.get(name) {
            Some(f) if f.kind != "histogram" => (name, false),
            Some(f) => {
                return Err(format!(
                    "{name} is a {} (use _bucket, _sum or _count)",
                    f.kind
                ));
            }
            None => ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    let f = self.families.get(base)?;
                    (f.kind == "histogram").then_some((base, *suffix == "_bucket"))
                })
                .ok_or_else(|| format!("{name} is not a metric duet exposes"))?,
        };
        let mut labels = self.families[family].labels.clone();
        labels.extend(TARGET_LABELS.iter().map(|l| (*l).to_owned()));
        if bucket {
            labels.insert("le".into());
        }
        Ok((family.to_owned(), labels))
    }

    /// Every problem with one PromQL expression: unknown `duet_*` metrics, labels a
    /// matcher or grouping names that its metrics do not have.
    fn check(&self, expr: &str, legend: Option<&str>) -> Vec<String> {
        let (selectors, groupings) = match parse_promql(expr) {
            Ok(parsed) => parsed,
            Err(e) => return vec![e],
        };
        let mut problems = Vec::new();
        let mut resolved = Vec::new();
        for s in &selectors {
            if !s.name.starts_with("duet_") {
                // Prometheus's own series (`up`) and process_* are not this test's business.
                continue;
            }
            match self.resolve(&s.name) {
                Err(e) => problems.push(format!("{e}, in: {expr}")),
                Ok((family, labels)) => {
                    for m in &s.matchers {
                        if !labels.contains(m) {
                            problems.push(format!("{family} has no label {m:?}, in: {expr}"));
                        }
                    }
                    resolved.push((s.at, family, labels));
                }
            }
        }
        for g in &groupings {
            for (at, family, labels) in &resolved {
                if g.scope.contains(at) {
                    for l in &g.labels {
                        if !labels.contains(l) {
                            problems.push(format!(
                                "{family} has no label {l:?} to group by, in: {expr}"
                            ));
                        }
                    }
                }
            }
        }
        if let Some(legend) = legend {
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap_or_default().trim();
                if !resolved.iter().any(|(_, _, labels)| labels.contains(label)) {
                    problems.push(format!(
                        "legend {{{{{label}}}}} is no label of the query: {expr}"
                    ));
                }
            }
        }
        problems
    }

    /// A Grafana variable query: `label_values(metric, label)` or PromQL.
    fn check_variable(&self, query: &str) -> Vec<String> {
        let Some(args) = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            return self.check(query, None);
        };
        let Some((metric, label)) = args.rsplit_once(',') else {
            return vec![format!("label_values needs a metric and a label: {query}")];
        };
        self.check(
            &format!("sum by ({}) ({})", label.trim(), metric.trim()),
            None,
        )
    }
}

/// Every PromQL expression of the dashboard, with its legend: targets of panels at any depth
/// (rows keep their panels inside them when collapsed), and the variables' queries.
fn dashboard_queries(dashboard: &Value) -> (Vec<(String, Option<String>)>, Vec<String>) {
    fn walk(v: &Value, out: &mut Vec<(String, Option<String>)>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    let legend = map
                        .get("legendFormat")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    out.push((expr.clone(), legend));
                }
                for (key, child) in map {
                    if key != "templating" {
                        walk(child, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dashboard, &mut exprs);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("a variable query")
                .to_owned()
        })
        .collect();
    (exprs, variables)
}

fn alert_rules() -> Vec<serde_yaml_ng::Value> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

/// The dashboard's and the alert rules' metrics and labels are what the service exposes.
#[tokio::test(start_paused = true)]
async fn dashboard_and_alerts_use_only_exposed_metrics_and_labels() {
    let known = Known::new(exposed().await);
    let mut problems: Vec<String> = Vec::new();

    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/duet.json")).unwrap();
    let (exprs, variables) = dashboard_queries(&dashboard);
    assert!(exprs.len() >= 25, "found the panels' queries: {exprs:?}");
    assert!(
        exprs.iter().any(|(e, _)| e.contains("duet_build_info")),
        "the queries of the panels inside the collapsed row are found too"
    );
    for (expr, legend) in &exprs {
        assert!(
            !expr.contains("[5m]") && !expr.contains("[1m]"),
            "rates use $__rate_interval: {expr}"
        );
        problems.extend(known.check(expr, legend.as_deref()));
    }
    assert!(!variables.is_empty());
    for query in &variables {
        problems.extend(known.check_variable(query));
    }

    let rules = alert_rules();
    assert!(rules.len() >= 10);
    for rule in &rules {
        let expr = rule["expr"].as_str().expect("every rule has an expr");
        problems.extend(known.check(expr, None));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The checker itself catches what it must (so a pass above means something).
#[test]
fn the_checker_finds_unknown_names_and_labels() {
    let mut exposition = BTreeMap::new();
    families(
        "# TYPE duet_x_total counter\nduet_x_total{model=\"a\"} 1\n\
         # TYPE duet_h_seconds histogram\nduet_h_seconds_bucket{model=\"a\",le=\"1\"} 1\n\
         duet_h_seconds_sum{model=\"a\"} 1\nduet_h_seconds_count{model=\"a\"} 1\n",
        &mut exposition,
    );
    let known = Known::new(exposition);
    let ok = [
        "sum by (model) (rate(duet_x_total{model=\"a\",instance=~\"$instance\"}[5m]))",
        "histogram_quantile(0.99, sum by (le, model) (rate(duet_h_seconds_bucket[5m])))",
        "sum(rate(duet_h_seconds_count[5m])) by (model) / 2",
        "up{job=\"duet\"} == 0",
    ];
    for expr in ok {
        assert_eq!(known.check(expr, None), Vec::<String>::new(), "{expr}");
    }
    let bad = [
        "rate(duet_y_total[5m])",
        "duet_x_total{kind=\"b\"}",
        "sum by (kind) (rate(duet_x_total[5m]))",
        "sum(rate(duet_h_seconds_count[5m])) by (le)",
        "duet_h_seconds",
        "sum(rate(duet_x_total[5m])) without (nope)",
    ];
    for expr in bad {
        assert_eq!(known.check(expr, None).len(), 1, "{expr}");
    }
    assert_eq!(known.check("sum(duet_x_total)", Some("{{model}}")).len(), 0);
    assert_eq!(known.check("sum(duet_x_total)", Some("{{kind}}")).len(), 1);
    assert_eq!(
        known
            .check_variable("label_values(duet_x_total, kind)")
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------
// The alert rules and the runbook.

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_section_and_the_rules_are_the_documented_ones() {
    let runbook = read("RUNBOOK_DUAL_MODEL.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let prefix = "{{ $externalLabels.runbook_base_url }}RUNBOOK_DUAL_MODEL.md#";
    let mut names = BTreeSet::new();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().expect("alerting rules only");
        assert!(names.insert(name.to_owned()), "{name} twice");
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has a runbook_url"));
        let fragment = url
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{name}: runbook_url starts with {prefix}"));
        assert!(
            anchors.contains(fragment),
            "{name}: #{fragment} is a heading of RUNBOOK_DUAL_MODEL.md"
        );
        assert!(rule["annotations"]["summary"].as_str().is_some());
        assert!(
            ["page", "ticket"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        // The runbook's alert index names every alert.
        assert!(
            runbook.contains(&format!("`{name}`")),
            "{name} is in the runbook"
        );
    }
    let expr = |alert: &str| {
        alert_rules()
            .into_iter()
            .find(|r| r["alert"].as_str() == Some(alert))
            .and_then(|r| r["expr"].as_str().map(|e| e.trim().to_owned()))
    };
    assert_eq!(expr("DuetNotReady").as_deref(), Some("duet_ready == 0"));
    assert_eq!(expr("DuetDown").as_deref(), Some("up{job=\"duet\"} == 0"));
    // The scrape job the alert names is the one prometheus.yml defines.
    let config = yaml("deploy/prometheus/prometheus.yml");
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    assert!(jobs.contains(&"duet"));
    assert_eq!(config["rule_files"][0].as_str(), Some("alerts.yml"));
    assert!(
        config["global"]["external_labels"]["runbook_base_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://") && u.ends_with('/'))
    );
    // docs/operations.md points to the file instead of copying it.
    let ops = read("docs/operations.md");
    assert!(ops.contains("deploy/prometheus/alerts.yml"));
    assert!(
        !ops.contains("groups:\n"),
        "no copy of the rules in the docs"
    );
}

// ---------------------------------------------------------------------------------------
// promtool.

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip("promtool is not installed, so the deploy/ files cannot be checked with it");
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str], file: &Path) {
    let out = std::process::Command::new(promtool)
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Grafana variables in `expr` replaced by what Prometheus would get.
fn concrete(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "3h");
    while let Some(start) = out.find('$') {
        let rest = &out[start + 1..];
        let len = if let Some(inner) = rest.strip_prefix('{') {
            inner.find('}').map_or(rest.len(), |e| e + 2)
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        out.replace_range(start..start + 1 + len, ".*");
    }
    out
}

#[test]
fn promtool_accepts_the_rules_their_tests_the_config_and_the_dashboard_queries() {
    let Some(promtool) = promtool() else {
        return;
    };
    run_promtool(
        &promtool,
        &["check", "rules"],
        &repo("deploy/prometheus/alerts.yml"),
    );
    // check config reads rule_files relative to the config file, so this checks both.
    run_promtool(
        &promtool,
        &["check", "config"],
        &repo("deploy/prometheus/prometheus.yml"),
    );
    // The rules' unit tests: the alerts fire when they should, and only then.
    run_promtool(
        &promtool,
        &["test", "rules"],
        &repo("deploy/prometheus/alerts.test.yml"),
    );
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/duet.json")).unwrap();
    let (exprs, _) = dashboard_queries(&dashboard);
    let rules: Vec<_> = exprs
        .iter()
        .enumerate()
        .map(|(i, (expr, _))| json!({"record": format!("dashboard:query_{i}"), "expr": concrete(expr)}))
        .collect();
    let file = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yml");
    // JSON is YAML, and promtool parses the expressions exactly as Prometheus would.
    std::fs::write(&path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    run_promtool(&promtool, &["check", "rules"], &path);
}

#[test]
fn grafana_variables_are_replaced_with_concrete_values() {
    assert_eq!(
        concrete(r#"rate(x{instance=~"$instance"}[$__rate_interval]) + y{a=~"${a}"}"#),
        r#"rate(x{instance=~".*"}[1m]) + y{a=~".*"}"#
    );
}

/// CI runs the same promtool checks on its own, before the tests.
#[test]
fn ci_runs_the_promtool_checks() {
    let ci = read(".ci/run");
    let position = |needle: &str| {
        ci.find(needle)
            .unwrap_or_else(|| panic!(".ci/run has {needle:?}"))
    };
    let install = position("apt-get install -y -qq --no-install-recommends prometheus");
    let rules = position("promtool check rules deploy/prometheus/alerts.yml");
    let config = position("promtool check config deploy/prometheus/prometheus.yml");
    let unit = position("promtool test rules deploy/prometheus/alerts.test.yml");
    assert!(install < unit && unit < ci.rfind("\ncargo test").unwrap());
    let test = ci.rfind("\ncargo test").expect("cargo test");
    assert!(install < rules && install < config, "after the install");
    assert!(rules < test && config < test, "before cargo test");
}

// ---------------------------------------------------------------------------------------
// compose.yaml, Grafana's provisioning, the Dockerfile, the systemd unit.

#[test]
fn compose_wires_duet_postgres_prometheus_and_grafana() {
    let compose = yaml("deploy/compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["duet", "postgres", "prometheus", "grafana"])
    );
    for (name, service) in services {
        assert!(
            service["healthcheck"]["test"].as_sequence().is_some(),
            "{name:?} has a healthcheck"
        );
    }
    let duet = &compose["services"]["duet"];
    let url = duet["environment"]["DATABASE_URL"].as_str().unwrap();
    assert!(
        url.starts_with("postgres://duet:${POSTGRES_PASSWORD") && url.contains("@postgres:5432/"),
        "{url}"
    );
    assert_eq!(
        duet["environment"]["BIND_ADDR"].as_str(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        duet["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(
        duet["healthcheck"]["test"][1].as_str(),
        Some("/usr/local/bin/duet")
    );
    assert_eq!(duet["healthcheck"]["test"][2].as_str(), Some("healthcheck"));
    assert_eq!(duet["build"]["context"].as_str(), Some(".."));
    assert!(repo(duet["build"]["dockerfile"].as_str().unwrap()).is_file());
    // The drain (SHUTDOWN_GRACE_S, 30 s by default) ends before compose's SIGKILL.
    let grace = duet["stop_grace_period"].as_str().unwrap();
    assert!(grace.trim_end_matches('s').parse::<u32>().unwrap() > 30);
    for (service, on) in [("prometheus", "duet"), ("grafana", "prometheus")] {
        assert_eq!(
            compose["services"][service]["depends_on"][on]["condition"].as_str(),
            Some("service_healthy"),
            "{service} waits for {on}"
        );
    }
    // Secrets come from the environment (.env), required, never written here.
    let text = read("deploy/compose.yaml");
    for secret in ["POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"] {
        assert!(
            text.contains(&format!("${{{secret}:?")),
            "{secret} is required"
        );
        assert!(read("deploy/env.example").contains(&format!("{secret}=\n")));
    }
    // Every bind mount's source exists, and Grafana's provisioning points where compose
    // mounts the dashboards.
    let mut targets = BTreeMap::new();
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            let (source, target) = volume.split_once(':').unwrap();
            if let Some(relative) = source.strip_prefix("./") {
                assert!(
                    repo(&format!("deploy/{relative}")).exists(),
                    "{name:?}: {source}"
                );
                targets.insert(target.trim_end_matches(":ro").to_owned(), source.to_owned());
            }
        }
    }
    assert_eq!(targets["/etc/prometheus"], "./prometheus");
    assert_eq!(
        targets["/etc/grafana/provisioning"],
        "./grafana/provisioning"
    );
    let provider = yaml("deploy/grafana/provisioning/dashboards/duet.yml");
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(targets[path], "./grafana/dashboards");
    // The dashboard's default datasource is the provisioned one.
    let datasource = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasource["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let uid = datasource["datasources"][0]["uid"].as_str().unwrap();
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/duet.json")).unwrap();
    assert_eq!(dashboard["templating"]["list"][0]["current"]["value"], uid);
    // Prometheus scrapes the compose service by name and port.
    let config = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(
        config["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("duet:8080")
    );
}

#[test]
fn dockerfile_builds_in_stages_and_runs_unprivileged_with_a_healthcheck() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<(String, String)> = dockerfile
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    assert!(instructions[stages[0]].1.starts_with("rust:"));
    let last = &instructions[*stages.last().unwrap()..];
    let get = |op: &str| {
        last.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, rest)| rest.as_str())
            .collect::<Vec<_>>()
    };
    let user = get("USER");
    assert_eq!(user.len(), 1, "the runtime stage sets a USER");
    assert!(!["root", "0", "0:0"].contains(&user[0]), "non-root");
    assert_eq!(get("EXPOSE"), ["8080"]);
    assert!(get("HEALTHCHECK")[0].contains(r#"CMD ["/usr/local/bin/duet", "healthcheck"]"#));
    assert!(get("ENV")[0].contains("BIND_ADDR=0.0.0.0:8080"));
    assert!(get("VOLUME")[0].contains("/var/lib/duet"));
    assert_eq!(get("STOPSIGNAL"), ["SIGTERM"]);
    // What the build copies from the context is what .dockerignore lets in.
    let ignore = read(".dockerignore");
    for (op, rest) in &instructions {
        if op == "COPY" && !rest.starts_with("--from") {
            for source in rest.split_whitespace().rev().skip(1) {
                assert!(
                    ignore.contains(&format!("!{source}\n"))
                        || ignore.contains(&format!("!{source}/\n")),
                    ".dockerignore lets {source} in"
                );
            }
        }
    }
}

#[test]
fn systemd_unit_is_hardened_and_outlasts_the_drain() {
    let unit = read("deploy/systemd/duet.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= is set"))
    };
    assert_eq!(value("EnvironmentFile"), "/etc/duet/duet.env");
    assert_eq!(value("DynamicUser"), "yes");
    assert_eq!(value("StateDirectory"), "duet");
    assert_eq!(value("ProtectSystem"), "strict");
    assert_eq!(value("NoNewPrivileges"), "yes");
    assert_eq!(value("Restart"), "on-failure");
    assert_eq!(value("KillSignal"), "SIGTERM");
    assert!(value("TimeoutStopSec").parse::<u32>().unwrap() > 30);
    assert!(read("deploy/systemd/duet.env.example").contains("BIND_ADDR="));

    // `systemd-analyze verify` where it exists, with ExecStart pointed at this build (it
    // checks that the program is there). Not installed everywhere CI could run, and what it
    // checks is syntax the assertions above do not need, so its absence is only a notice.
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        use std::io::Write;
        let _ = std::io::stderr()
            .write_all(b"notice: systemd-analyze is not installed: unit not verified\n");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("duet.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/duet", env!("CARGO_BIN_EXE_duet")),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// `duet healthcheck`.

async fn healthcheck(envs: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = duet_command(dir.path());
    cmd.arg("healthcheck").args(args).envs(envs.iter().copied());
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn healthcheck_passes_on_a_live_service_and_fails_otherwise() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let port = app.addr.port().to_string();
    // BIND_ADDR as the image sets it: every interface, probed on loopback.
    let out = healthcheck(&[("BIND_ADDR", &format!("0.0.0.0:{port}"))], &[]).await;
    assert!(out.status.success(), "{out:?}");
    let out = healthcheck(&[], &["--addr", &app.addr.to_string()]).await;
    assert!(out.status.success(), "{out:?}");

    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let out = healthcheck(&[("BIND_ADDR", &closed.to_string())], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("duet: GET http://{closed}/healthz: ")),
        "{stderr}"
    );

    // Something that answers, but not 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let out = healthcheck(&[], &["--addr", &other.to_string()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503 Service Unavailable\", not 200"),
        "{out:?}"
    );

    // A listener that never answers: the timeout, not a hang.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = healthcheck(
        &[],
        &[
            "--addr",
            &silent.local_addr().unwrap().to_string(),
            "--timeout-s",
            "0.5",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer within"));

    // Port 0 cannot be probed.
    let out = healthcheck(&[("BIND_ADDR", "127.0.0.1:0")], &[]).await;
    assert_eq!(out.status.code(), Some(1));
}
