//! Bodies a careless or hostile client sends to `POST /query*` that the parser must refuse in
//! words naming the field, never by quietly picking one reading (review of issue 14).

use serde_json::Value;

use crate::helpers::*;

/// Each body with the exact message a person gets.
fn refused() -> Vec<(&'static str, &'static str)> {
    vec![
        // A duplicate name: RFC 8259 leaves its meaning open (serde keeps the last, a proxy
        // or log reader in front of duet may keep the first), so the question a run answers
        // and the one an operator sees could differ. Refused at every level.
        (
            r#"{"query": "harmless", "query": "the real question"}"#,
            "the field \"query\" is given twice",
        ),
        (
            r#"{"query": "hi", "max_tokens": 5, "max_tokens": 500000}"#,
            "the field \"max_tokens\" is given twice",
        ),
        (
            r#"{"query": "hi", "pro": {"thinking": "off", "thinking": "high"}}"#,
            "the field \"thinking\" is given twice",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a", "role": "system"}]}"#,
            "the field \"role\" is given twice",
        ),
        // A number past what a 64-bit float holds: out of range for the field it is in, not
        // a "syntax error".
        (
            r#"{"query": "hi", "max_tokens": 1e400}"#,
            "\"max_tokens\" is a number out of range (at character 35)",
        ),
        (
            r#"{"query": "hi", "pro": {"temperature": -1e400}}"#,
            "\"temperature\" is a number out of range (at character 45)",
        ),
        (
            r#"{"query": "hi", "flash": [1e999]}"#,
            "the body holds a number out of range (at character 31)",
        ),
    ]
}

#[tokio::test]
async fn duplicate_fields_and_huge_numbers_are_400_naming_the_field() {
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &[]).await;
    for path in ["/query/stream", "/query"] {
        for (body, expected) in refused() {
            let resp = app
                .client
                .post(app.url(path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path} {body}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["type"], "invalid_request", "{path} {body}");
            assert_eq!(err["error"]["message"], expected, "{path} {body}");
        }
    }
    assert_eq!(app.flash.started(), 0, "no run started");
}
