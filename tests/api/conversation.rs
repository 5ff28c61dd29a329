//! Conversations and generation parameters (contract §7): `messages` instead of `query`,
//! `max_tokens`, `temperature`, `thinking` for both models and per model, strict bodies whose
//! refusals name the field in words for people, and what the audit trail keeps of them on
//! SQLite and PostgreSQL (also under `AUDIT_STORE_TEXT=none`).

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use duet::{
    audit::{
        StartedRun, Store, StoredRun, WriterOptions,
        privacy::{PLACEHOLDER_PREFIX, strip_started},
    },
    config::StoreText,
    conversation::{Conversation, GenParams, Message, RunParams, Speaker, Thinking},
    domain::Role,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{db, helpers::*};

/// The fields a body may have, as the unknown-field message lists them.
const FIELDS: &str =
    "query, messages, system, deltas, max_tokens, temperature, thinking, flash, pro";

/// A two-turn conversation with a system prompt.
fn two_turns() -> Value {
    json!([
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering of sunlight."},
        {"role": "user", "content": "And why are sunsets red?"}
    ])
}

/// Every refusal of issue 14 item 3, with the exact message a person gets.
fn refused() -> Vec<(String, String)> {
    let unknown = format!("unknown field \"foo\"; the fields are {FIELDS}");
    let range_tokens = "\"max_tokens\" must be an integer from 1 to 1000000";
    let thinking = "\"flash.thinking\" must be one of \"off\", \"low\", \"medium\", \"high\"";
    let msg =
        |extra: &str| format!(r#"{{"messages": [{{"role": "user", "content": "hi"{extra}}}]}}"#);
    let long = "x".repeat(40);
    let cases: Vec<(String, &str)> = vec![
        // Not an object.
        (r#"["hello","sys"]"#.into(), "the body must be a JSON object (with \"query\" or \"messages\"), not an array"),
        ("\"hello\"".into(), "the body must be a JSON object (with \"query\" or \"messages\"), not a string"),
        ("null".into(), "the body must be a JSON object (with \"query\" or \"messages\"), not null"),
        // Not JSON: where, never serde's own words.
        (r#"{"query": tru}"#.into(), "the body is not valid JSON: a syntax error at character 14"),
        ("{\"query\":\n \"hi\",\n x}".into(), "the body is not valid JSON: a syntax error at line 3, character 2"),
        (r#"{"query": "hi""#.into(), "the body is not valid JSON: it ends before the JSON is complete"),
        ("".into(), "the body is not valid JSON: it ends before the JSON is complete"),
        (r#"{"query": "hi"} {"query": "again"}"#.into(), "the body is not valid JSON: there is more after the JSON value (at character 17)"),
        // Unknown fields, at the top, in flash/pro, in a message.
        (r#"{"query": "hi", "foo": 1}"#.into(), unknown.as_str()),
        (format!(r#"{{"query": "hi", "{long}": 1}}"#), "unknown field (a name too long or unprintable to repeat); the fields are query, messages, system, deltas, max_tokens, temperature, thinking, flash, pro"),
        (r#"{"query": "hi", "pro": {"temp": 1}}"#.into(), "unknown field \"pro.temp\"; the fields of \"pro\" are max_tokens, temperature, thinking"),
        (r#"{"query": "hi", "flash": {"query": "x"}}"#.into(), "unknown field \"flash.query\"; the fields of \"flash\" are max_tokens, temperature, thinking"),
        (msg(r#", "name": "bob""#), "unknown field \"messages[0].name\"; a message has \"role\" and \"content\""),
        // Mistyped fields.
        (r#"{"query": 42}"#.into(), "\"query\" must be a string: the question"),
        (r#"{"query": null}"#.into(), "\"query\" must be a string: the question"),
        (r#"{"query": "hi", "system": 5}"#.into(), "\"system\" must be a string: the system prompt"),
        (r#"{"query": "hi", "deltas": "yes"}"#.into(), "\"deltas\" must be true or false"),
        (r#"{"query": "hi", "flash": 5}"#.into(), "\"flash\" must be an object with \"max_tokens\", \"temperature\" or \"thinking\""),
        (r#"{"messages": "hi"}"#.into(), "\"messages\" must be an array of {\"role\", \"content\"} objects"),
        (r#"{"messages": ["hi"]}"#.into(), "\"messages[0]\" must be an object with \"role\" and \"content\""),
        (r#"{"messages": [{"role": "bot", "content": "hi"}]}"#.into(), "\"messages[0].role\" must be \"system\", \"user\" or \"assistant\""),
        (r#"{"messages": [{"role": "user", "content": 5}]}"#.into(), "\"messages[0].content\" must be a string"),
        (r#"{"messages": [{"role": "user"}]}"#.into(), "\"messages[0].content\" is missing"),
        (r#"{"messages": [{"content": "hi"}]}"#.into(), "\"messages[0].role\" is missing"),
        // Parameters mistyped or out of range.
        (r#"{"query": "hi", "max_tokens": 0}"#.into(), range_tokens),
        (r#"{"query": "hi", "max_tokens": 1000001}"#.into(), range_tokens),
        (r#"{"query": "hi", "max_tokens": 1.5}"#.into(), range_tokens),
        (r#"{"query": "hi", "max_tokens": -3}"#.into(), range_tokens),
        (r#"{"query": "hi", "max_tokens": "10"}"#.into(), range_tokens),
        (r#"{"query": "hi", "temperature": 2.5}"#.into(), "\"temperature\" must be a number from 0 to 2"),
        (r#"{"query": "hi", "temperature": "hot"}"#.into(), "\"temperature\" must be a number from 0 to 2"),
        (r#"{"query": "hi", "pro": {"temperature": -0.1}}"#.into(), "\"pro.temperature\" must be a number from 0 to 2"),
        (r#"{"query": "hi", "pro": {"max_tokens": 0}}"#.into(), "\"pro.max_tokens\" must be an integer from 1 to 1000000"),
        (r#"{"query": "hi", "flash": {"thinking": "max"}}"#.into(), thinking),
        (r#"{"query": "hi", "thinking": true}"#.into(), "\"thinking\" must be one of \"off\", \"low\", \"medium\", \"high\""),
        // query and messages: exactly one.
        (r#"{"query": "hi", "messages": [{"role": "user", "content": "hi"}]}"#.into(), "\"query\" and \"messages\" cannot both be given: send one of them"),
        ("{}".into(), "the body needs \"query\" (a question) or \"messages\" (a conversation)"),
        (r#"{"deltas": true, "max_tokens": 5}"#.into(), "the body needs \"query\" (a question) or \"messages\" (a conversation)"),
        // The conversation's own rules.
        (r#"{"messages": [{"role": "user", "content": "hi"}], "system": "s"}"#.into(), "\"system\" cannot be given with \"messages\"; put a \"system\" message first"),
        (r#"{"messages": [{"role": "user", "content": "hi"}], "system": null}"#.into(), "\"system\" cannot be given with \"messages\"; put a \"system\" message first"),
        (r#"{"messages": []}"#.into(), "\"messages\" must hold at least one message"),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#.into(), "the last message of \"messages\" must have role \"user\""),
        (r#"{"messages": [{"role": "system", "content": "s"}]}"#.into(), "the last message of \"messages\" must have role \"user\""),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}"#.into(), "\"messages[1]\" has role \"system\", which may only be the first message"),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": " \n\t"}]}"#.into(), "\"messages[2].content\" must not be blank"),
        (r#"{"messages": [{"role": "system", "content": "  "}, {"role": "user", "content": "a"}]}"#.into(), "\"messages[0].content\" must not be blank"),
        (r#"{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}"#.into(), "\"messages[0].content\" must not be blank"),
        (r#"{"query": "   "}"#.into(), "\"query\" must not be blank"),
    ];
    cases
        .into_iter()
        .map(|(body, message)| (body, message.to_owned()))
        .collect()
}

#[tokio::test]
async fn every_refused_body_is_400_with_a_message_naming_the_field() {
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &[]).await;
    for path in ["/query/stream", "/query"] {
        for (body, expected) in refused() {
            let resp = app
                .client
                .post(app.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path} {body}");
            assert!(resp.headers().get("x-run-id").is_none(), "{path} {body}");
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["type"], "invalid_request", "{path} {body}");
            let message = err["error"]["message"].as_str().unwrap();
            assert_eq!(message, expected, "{path} {body}");
            for internal in [
                "expected",
                "invalid type",
                "ident",
                "line 1 column",
                "serde",
            ] {
                assert!(!message.contains(internal), "{path} {body}: {message}");
            }
        }
    }
    assert_eq!(app.flash.started(), 0, "no run started");
    assert!(app.sink.records().is_empty());
}

#[tokio::test]
async fn a_conversation_over_the_size_limit_is_413() {
    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[("MAX_QUERY_BYTES", "100")],
    )
    .await;
    // Each content is under the limit, all of them together are over it.
    let body = json!({"messages": [
        {"role": "user", "content": "a".repeat(40)},
        {"role": "assistant", "content": "b".repeat(40)},
        {"role": "user", "content": "c".repeat(40)}
    ]});
    let resp = app.post_query(body).await;
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(
        err["error"]["message"],
        "the text of the request is 120 bytes; the limit is 100"
    );
    assert_eq!(app.flash.started(), 0);
}

#[tokio::test(start_paused = true)]
async fn both_models_get_the_whole_conversation_and_their_own_parameters() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let body = json!({
        "messages": two_turns(),
        "max_tokens": 300,
        "temperature": 0.2,
        "flash": {"thinking": "off", "max_tokens": 100},
        "pro": {"thinking": "high", "temperature": null}
    });
    let events = app.stream(body).await;
    assert_eq!(done(&events)["status"], "ok");
    let expected = Conversation::new(
        serde_json::from_value::<Vec<Message>>(two_turns()).unwrap(),
        usize::MAX,
    )
    .unwrap();
    let flash = app.flash.requests();
    let pro = app.pro.requests();
    assert_eq!((flash.len(), pro.len()), (1, 1));
    assert_eq!(flash[0].role, Role::Flash);
    assert_eq!(*flash[0].conversation, expected);
    assert!(
        Arc::ptr_eq(&flash[0].conversation, &pro[0].conversation),
        "one conversation shared by both calls, not copied"
    );
    assert_eq!(
        flash[0].conversation.system(),
        Some("Answer in one sentence.")
    );
    assert_eq!(flash[0].conversation.turns().len(), 3);
    assert_eq!(
        flash[0].params,
        GenParams {
            max_tokens: Some(100),
            temperature: Some(0.2),
            thinking: Some(Thinking::Off),
        }
    );
    assert_eq!(
        pro[0].params,
        GenParams {
            max_tokens: Some(300),
            temperature: Some(0.2),
            thinking: Some(Thinking::High),
        },
        "a null override means unset: the value for both applies"
    );

    let record = &app.records(1).await[0];
    assert_eq!(
        record.query, "And why are sunsets red?",
        "query is the last user message"
    );
    assert_eq!(record.system.as_deref(), Some("Answer in one sentence."));
    assert_eq!(
        serde_json::to_value(&record.messages).unwrap(),
        two_turns(),
        "the whole conversation as sent, the system prompt first"
    );
    assert_eq!(
        serde_json::to_value(&record.params).unwrap(),
        json!({"max_tokens": 300, "temperature": 0.2,
               "flash": {"max_tokens": 100, "thinking": "off"},
               "pro": {"thinking": "high"}})
    );
}

#[tokio::test(start_paused = true)]
async fn a_query_still_works_and_keeps_no_messages_copy() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .post_query(json!({"query": "hi", "system": "be brief", "thinking": "low"}))
        .await;
    assert_eq!(resp.status(), 200);
    let record = &app.records(1).await[0];
    assert_eq!(record.query, "hi");
    assert_eq!(
        record.messages, None,
        "a plain query is stored as query and system"
    );
    assert_eq!(
        serde_json::to_value(&record.params).unwrap(),
        json!({"thinking": "low"})
    );
    let resp = app.post_query(json!({"query": "no params"})).await;
    assert_eq!(resp.status(), 200);
    let records = app.records(2).await;
    assert_eq!(records[1].params, None, "no parameters sent, none stored");
    // One message sent as `messages` is kept as such.
    let resp = app
        .post_query(json!({"messages": [{"role": "user", "content": "just one"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let records = app.records(3).await;
    assert_eq!(
        serde_json::to_value(&records[2].messages).unwrap(),
        json!([{"role": "user", "content": "just one"}])
    );
}

/// What the column holds, as JSON (PostgreSQL's `jsonb` read as text).
async fn json_column(store: &Store, column: &str, run_id: &str) -> Option<Value> {
    let sql = match store {
        Store::Sqlite(_) => format!("SELECT {column} FROM dual_runs WHERE run_id = '{run_id}'"),
        Store::Postgres(_) => {
            format!("SELECT {column}::text FROM dual_runs WHERE run_id = '{run_id}'")
        }
    };
    db::text(store, &sql)
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
}

/// Waits until the run's row is final (the writer works in the background).
async fn wait_ended(store: &Store, run_id: &str) -> StoredRun {
    for _ in 0..500 {
        if let Some(run @ StoredRun::Ended(_)) =
            store.fetch_stored(run_id.parse().unwrap()).await.unwrap()
        {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {run_id} never reached the database");
}

fn quick(text: &'static str) -> Vec<Step> {
    vec![Step::Delta(text), Step::Finish]
}

async fn messages_and_params_are_stored(store: &Store, dir: &std::path::Path) {
    let options = WriterOptions::new(dir.join("deadletter.jsonl"));
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick("fast")),
        Scripted::new("pro-m", quick("slow")),
        &[("ADMIN_TOKEN", "admin-secret")],
        store.clone(),
        options,
    )
    .await;
    let params = json!({"max_tokens": 64, "pro": {"thinking": "medium", "temperature": 1.5}});
    let mut body = params.clone();
    body["messages"] = two_turns();
    let resp = app.post_query(body).await;
    assert_eq!(resp.status(), 200);
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let plain = app.post_query(json!({"query": "plain"})).await;
    let plain_id = plain.headers()["x-run-id"].to_str().unwrap().to_owned();

    let StoredRun::Ended(ended) = wait_ended(store, &run_id).await else {
        unreachable!()
    };
    assert_eq!(ended.record.query, "And why are sunsets red?");
    assert_eq!(
        serde_json::to_value(&ended.record.messages).unwrap(),
        two_turns()
    );
    assert_eq!(serde_json::to_value(ended.record.params).unwrap(), params);
    // The columns themselves, as operators query them (docs/audit.md).
    assert_eq!(
        json_column(store, "messages", &run_id).await,
        Some(two_turns())
    );
    assert_eq!(
        json_column(store, "params", &run_id).await,
        Some(params.clone())
    );
    // And as operators read the record over HTTP.
    let shown: Value = app
        .client
        .get(app.url(&format!("/runs/{run_id}")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["messages"], two_turns());
    assert_eq!(shown["params"], params);
    wait_ended(store, &plain_id).await;
    assert_eq!(json_column(store, "messages", &plain_id).await, None);
    assert_eq!(json_column(store, "params", &plain_id).await, None);
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;

    // A start row (contract §8) carries them too, and reads back as an open run.
    let conversation = Arc::new(
        Conversation::new(serde_json::from_value(two_turns()).unwrap(), usize::MAX).unwrap(),
    );
    let started = StartedRun {
        run_id: Uuid::now_v7(),
        client_request_id: None,
        created_at: Utc::now(),
        query: conversation.last_user().into(),
        system: conversation.system().map(Into::into),
        conversation: Some(Arc::clone(&conversation)),
        params: Some(RunParams {
            both: GenParams {
                thinking: Some(Thinking::Low),
                ..GenParams::default()
            },
            ..RunParams::default()
        }),
        owner_fingerprint: None,
        instance_id: None,
        client_id: None,
    };
    store
        .write(None, std::slice::from_ref(&started), &[])
        .await
        .unwrap();
    let Some(StoredRun::Open(open)) = store.fetch_stored(started.run_id).await.unwrap() else {
        panic!("the start row reads back as an open run");
    };
    assert_eq!(serde_json::to_value(&open.messages).unwrap(), two_turns());
    assert_eq!(
        serde_json::to_value(open.params).unwrap(),
        json!({"thinking": "low"})
    );
}

#[tokio::test]
async fn messages_and_params_are_stored_sqlite() {
    let db = db::sqlite().await;
    messages_and_params_are_stored(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn messages_and_params_are_stored_postgres() {
    let Some(db) = db::postgres("messages_and_params_are_stored").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    messages_and_params_are_stored(&db.store, dir.path()).await;
}

/// PostgreSQL's `jsonb` cannot hold NUL, not even escaped: a conversation carrying one is
/// stored with U+FFFD instead, like every other text column there.
#[tokio::test]
async fn a_nul_in_a_message_is_stored_on_postgres() {
    let Some(db) = db::postgres("a_nul_in_a_message_is_stored").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick("fast")),
        Scripted::new("pro-m", quick("slow")),
        &[],
        db.store.clone(),
        WriterOptions::new(dir.path().join("deadletter.jsonl")),
    )
    .await;
    let resp = app
        .post_query(json!({"messages": [{"role": "user", "content": "a\u{0}b \\u0000"}]}))
        .await;
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    wait_ended(&db.store, &run_id).await;
    assert_eq!(
        json_column(&db.store, "messages", &run_id).await,
        Some(json!([{"role": "user", "content": "a\u{FFFD}b \\u0000"}]))
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
}

/// Nor can a `stop` string's NUL reach `params` on PostgreSQL: such a run's record failed
/// every retry of its batch, taking the other runs' records in it to the dead-letter file,
/// where replay failed them again. Now it is stored with U+FFFD, next to a plain run.
#[tokio::test]
async fn a_nul_in_a_stop_string_is_stored_on_postgres() {
    let Some(db) = db::postgres("a_nul_in_a_stop_string_is_stored").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let deadletter = dir.path().join("deadletter.jsonl");
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick("fast")),
        Scripted::new("pro-m", quick("slow")),
        &[],
        db.store.clone(),
        WriterOptions::new(&deadletter),
    )
    .await;
    let poisoned = app
        .client
        .post(format!("http://{}/v1/chat/completions", app.addr))
        .json(&json!({
            "model": "duet",
            "messages": [{"role": "user", "content": "hi"}],
            "stop": ["\u{0}", "end"],
        }));
    let plain = app.post_query(json!({"query": "innocent neighbour"}));
    let (poisoned, plain) = tokio::join!(poisoned.send(), plain);
    let poisoned = poisoned.unwrap();
    assert_eq!(poisoned.status(), 200);
    let poisoned_id = poisoned.headers()["x-run-id"].to_str().unwrap().to_owned();
    let plain_id = plain.headers()["x-run-id"].to_str().unwrap().to_owned();
    wait_ended(&db.store, &plain_id).await;
    wait_ended(&db.store, &poisoned_id).await;
    assert_eq!(
        json_column(&db.store, "params", &poisoned_id).await,
        Some(json!({"stop": ["\u{FFFD}", "end"]}))
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
    assert!(!deadletter.exists(), "nothing dead-lettered");
}

async fn store_text_none_strips_every_message(store: &Store, dir: &std::path::Path) {
    let options = WriterOptions::new(dir.join("deadletter.jsonl")).with_store_text(StoreText::None);
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick("fast")),
        Scripted::new("pro-m", quick("slow")),
        &[],
        store.clone(),
        options,
    )
    .await;
    let resp = app
        .post_query(json!({"messages": two_turns(), "temperature": 0.5}))
        .await;
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    wait_ended(store, &run_id).await;
    let stored = json_column(store, "messages", &run_id).await.unwrap();
    let text = stored.to_string();
    for secret in ["Answer in one sentence", "sky", "Rayleigh", "sunsets"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let sent = two_turns();
    for (i, message) in stored.as_array().unwrap().iter().enumerate() {
        assert_eq!(message["role"], sent[i]["role"], "roles stay");
        let content = message["content"].as_str().unwrap();
        assert_eq!(
            content,
            duet::audit::privacy::redact(sent[i]["content"].as_str().unwrap()),
            "length and SHA-256 of the text instead"
        );
    }
    assert_eq!(
        json_column(store, "params", &run_id).await,
        Some(json!({"temperature": 0.5})),
        "parameters hold no text and stay"
    );
    // But for `stop` (OpenAI's route): a client's text, stripped like the rest.
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(
            &json!({"model": "duet", "messages": two_turns(), "top_p": 0.5,
            "stop": ["SECRET-STOP"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    resp.bytes().await.unwrap();
    wait_ended(store, &run_id).await;
    assert_eq!(
        json_column(store, "params", &run_id).await,
        Some(json!({"top_p": 0.5, "stop": [duet::audit::privacy::redact("SECRET-STOP")]}))
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn store_text_none_strips_every_message_sqlite() {
    let db = db::sqlite().await;
    store_text_none_strips_every_message(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn store_text_none_strips_every_message_postgres() {
    let Some(db) = db::postgres("store_text_none_strips_every_message").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    store_text_none_strips_every_message(&db.store, dir.path()).await;
}

/// The start row is stripped at the writer's door too, whichever of the two reaches the
/// database first.
#[test]
fn a_start_row_is_stripped_of_its_conversation() {
    let conversation = Arc::new(
        Conversation::new(serde_json::from_value(two_turns()).unwrap(), usize::MAX).unwrap(),
    );
    let mut run = StartedRun {
        run_id: Uuid::now_v7(),
        client_request_id: None,
        created_at: Utc::now(),
        query: conversation.last_user().into(),
        system: conversation.system().map(Into::into),
        conversation: Some(Arc::clone(&conversation)),
        params: None,
        owner_fingerprint: None,
        instance_id: None,
        client_id: None,
    };
    strip_started(&mut run);
    let stripped = run.conversation.unwrap();
    assert_eq!(stripped.messages().count(), 4);
    for ((role, content), (sent_role, sent)) in stripped.messages().zip(conversation.messages()) {
        assert_eq!(role, sent_role);
        assert!(content.starts_with(PLACEHOLDER_PREFIX), "{content}");
        assert!(!content.contains(sent));
    }
    assert_eq!(stripped.turns().last().map(|m| m.role), Some(Speaker::User));
    assert!(run.query.starts_with(PLACEHOLDER_PREFIX));
}

/// The record's byte count, which bounds the audit queue, counts the conversation.
#[test]
fn the_queue_counts_the_bytes_of_the_messages() {
    let mut record = db::record(1);
    let without = record.approx_bytes();
    record.messages = Some(vec![Message {
        role: Speaker::User,
        content: "x".repeat(10_000),
    }]);
    assert!(record.approx_bytes() >= without + 10_000);
    let conversation = Arc::new(
        Conversation::new(
            vec![Message {
                role: Speaker::User,
                content: "y".repeat(10_000),
            }],
            usize::MAX,
        )
        .unwrap(),
    );
    let started = |conversation| StartedRun {
        run_id: Uuid::now_v7(),
        client_request_id: None,
        created_at: Utc::now(),
        query: "y".into(),
        system: None,
        conversation,
        params: None,
        owner_fingerprint: None,
        instance_id: None,
        client_id: None,
    };
    assert!(started(Some(conversation)).approx_bytes() >= started(None).approx_bytes() + 10_000);
}

/// The API description says what the body takes: `query` or `messages` (exactly one, no
/// `system` with `messages`), closed objects everywhere, and the configured size limit on
/// every text.
#[tokio::test]
async fn the_api_description_has_the_conversation_rules() {
    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[("MAX_QUERY_BYTES", "1000")],
    )
    .await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    let body = &schemas["QueryRequest"];
    assert_eq!(body["additionalProperties"], false);
    assert_eq!(
        body["oneOf"],
        json!([
            {"required": ["query"], "not": {"required": ["messages"]}},
            {"required": ["messages"],
             "not": {"anyOf": [{"required": ["query"]}, {"required": ["system"]}]}}
        ])
    );
    for field in [
        "query",
        "messages",
        "max_tokens",
        "temperature",
        "thinking",
        "flash",
        "pro",
    ] {
        assert!(body["properties"].get(field).is_some(), "{field}");
    }
    assert_eq!(
        body["properties"]["query"]["type"], "string",
        "null is refused"
    );
    assert_eq!(
        body["properties"]["messages"]["type"], "array",
        "null is refused"
    );
    assert_eq!(
        body["properties"]["pro"]["oneOf"][1]["$ref"],
        "#/components/schemas/ModelParams"
    );
    assert_eq!(schemas["ModelParams"]["additionalProperties"], false);
    assert_eq!(schemas["ChatMessage"]["additionalProperties"], false);
    assert_eq!(
        schemas["ChatMessage"]["properties"]["content"]["maxLength"],
        1000
    );
    assert_eq!(body["properties"]["query"]["maxLength"], 1000);
    assert_eq!(body["properties"]["temperature"]["maximum"], 2);
    assert_eq!(body["properties"]["max_tokens"]["maximum"], 1_000_000);
}
