//! The API description (`GET /openapi.json`): OpenAPI 3.1, every served route documented,
//! and the events a real stream sends match their schemas.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::*;

async fn document(app: &TestApp) -> Value {
    let resp = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).expect("the document is JSON")
}

/// `(method, path)` of every route `api::router` registers, read from its source: axum cannot
/// list a router's routes, and a route added without docs must fail this test.
fn served_routes() -> BTreeSet<(String, String)> {
    let source = include_str!("../../src/api/mod.rs");
    let mut routes = BTreeSet::new();
    for chunk in source.split(".route(\"").skip(1) {
        let (path, rest) = chunk.split_once('"').unwrap();
        // The handlers of this route: up to the `)` that closes `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(i, _)| i)
            .unwrap();
        let handlers = &rest[..end];
        for method in [
            "get", "post", "put", "patch", "delete", "head", "options", "any",
        ] {
            let calls = [format!(" {method}("), format!(".{method}(")];
            if calls.iter().any(|c| handlers.contains(c.as_str())) {
                routes.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_lists_every_route() {
    let app = spawn_app(normal_flash(), normal_pro(), &[("MAX_QUERY_BYTES", "1000")]).await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "duet");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let served = served_routes();
    assert!(
        served.len() >= 11,
        "the route scan found too little: {served:?}"
    );
    assert_eq!(
        served, documented,
        "served routes (left) and documented operations (right) differ"
    );

    // Every operation says what it answers, and every error answer is the JSON error shape.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("200"), "{method} {path}");
            for (status, response) in responses {
                if status.starts_with('4') || status == "500" {
                    assert!(response["$ref"].is_string(), "{method} {path} {status}");
                }
            }
        }
    }
    for name in [
        "BadRequest",
        "Unauthorized",
        "RateLimited",
        "Overloaded",
        "TooLarge",
    ] {
        let r = &doc["components"]["responses"][name];
        assert_eq!(
            r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody",
            "{name}"
        );
    }
    for name in ["RateLimited", "Overloaded"] {
        assert!(doc["components"]["responses"][name]["headers"]["Retry-After"].is_object());
    }
    let kinds = &doc["components"]["schemas"]["ErrorDetail"]["properties"]["type"]["enum"];
    assert!(
        kinds
            .as_array()
            .unwrap()
            .contains(&json!("invalid_request"))
    );

    // The configured limit, not a default, is what the document states.
    assert_eq!(
        doc["components"]["schemas"]["QueryRequest"]["properties"]["query"]["maxLength"],
        1000
    );
    assert_eq!(
        doc["paths"]["/query"]["post"]["responses"]["200"]["links"]["GetRun"]["operationId"],
        "get_run"
    );
    let security = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(security.contains_key("api_key") && security.contains_key("admin_token"));

    // Every $ref points at something that exists.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r);
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.strip_prefix('#').unwrap();
        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
    }
}

/// Checks `data` against an object schema of the document: required fields present, no
/// field the schema does not know.
fn conforms(doc: &Value, schema: &str, data: &Value) {
    let schema = &doc["components"]["schemas"][schema];
    let properties = schema["properties"].as_object().unwrap();
    for key in data.as_object().unwrap().keys() {
        assert!(
            properties.contains_key(key),
            "{key} is not described in {schema}"
        );
    }
    for key in schema["required"].as_array().unwrap() {
        assert!(
            data.get(key.as_str().unwrap()).is_some(),
            "{key} missing from {data}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_events_of_a_stream_match_their_schemas() {
    let pro = vec![
        ms(100),
        Step::Fail(duet::providers::ErrorType::ProviderError, false),
    ];
    let app = spawn_app(normal_flash(), pro, &[]).await;
    let doc = document(&app).await;
    let events = app.stream(json!({"query": "hi", "deltas": true})).await;
    let stream = &doc["components"]["responses"]["EventStream"]["content"]["text/event-stream"];
    assert_eq!(
        stream["schema"]["$ref"],
        "#/components/schemas/ServerSentEvent"
    );
    let variants = doc["components"]["schemas"]["ServerSentEvent"]["oneOf"]
        .as_array()
        .unwrap();
    let mut seen = BTreeSet::new();
    for ev in &events {
        let variant = variants
            .iter()
            .find(|v| v["properties"]["event"]["const"] == ev.event.as_str())
            .unwrap_or_else(|| panic!("event {} is not described", ev.event));
        let schema = variant["properties"]["data"]["contentSchema"]["$ref"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap();
        conforms(&doc, schema, &ev.data);
        seen.insert(ev.event.as_str());
    }
    for name in ["start", "delta", "flash", "error", "done"] {
        assert!(seen.contains(name), "{name} not seen in {seen:?}");
    }
}

/// The `error` and `done` that end a reconnect to a run whose replica died are described
/// too, `interrupted` values included.
#[tokio::test]
async fn the_events_of_an_interrupted_run_match_their_schemas() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let doc = document(&app).await;
    let frames = duet::resume::remote::interrupted(uuid::Uuid::now_v7(), 3);
    assert_eq!(frames.len(), 2);
    for (frame, (schema, field)) in frames
        .iter()
        .zip([("ErrorEvent", "error_type"), ("DoneEvent", "status")])
    {
        let text = std::str::from_utf8(frame).unwrap();
        let data: Value = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .unwrap();
        conforms(&doc, schema, &data);
        let allowed = doc["components"]["schemas"][schema]["properties"][field]["enum"]
            .as_array()
            .unwrap();
        assert!(
            allowed.contains(&data[field]),
            "{} not in {allowed:?}",
            data[field]
        );
        assert_eq!(data[field], "interrupted");
    }
}
