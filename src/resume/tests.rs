//! The run log, the registry's bounds, owners and stored events, without a server.

use super::*;

#[test]
fn parses_ids() {
    let id = Uuid::now_v7();
    assert_eq!(parse_last_event_id(&format!("{id}:7")), Some((id, 7)));
    assert_eq!(parse_last_event_id("nope:1"), None);
    assert_eq!(parse_last_event_id(&format!("{id}")), None);
    assert_eq!(parse_last_event_id(&format!("{id}:-1")), None);
}

fn trace(text: &str) -> crate::audit::ModelTrace {
    crate::audit::ModelTrace {
        provider: "simulated".into(),
        model: "m".into(),
        model_version: None,
        outcome: crate::audit::Outcome::Ok,
        error_type: None,
        error_message: None,
        deadline: None,
        text: text.into(),
        finish_reason: Some("stop".into()),
        latency_ms: 5,
        ttft_ms: Some(1),
        input_tokens: Some(1),
        output_tokens: Some(2),
        cost_usd: None,
    }
}

#[test]
fn stored_frames_are_cut_after_seq_and_answers_rebuilt() {
    let id = "0192d5c4-0000-7000-8000-000000000000";
    let run_id = Uuid::parse_str(id).unwrap();
    // What a run's log keeps: start, an answer, done (deltas in between are not kept).
    let log = RunLog::new(None);
    for (seq, event) in [
        (0, EventKind::Start),
        (4, EventKind::Flash),
        (9, EventKind::Done),
    ] {
        let data = sse::encode_data(&serde_json::json!({"run_id": id, "n": seq}));
        log.push(seq, event, sse::frame(event, id, seq, &data), data.len());
    }
    let record = RunRecord {
        run_id,
        client_request_id: None,
        created_at: chrono::Utc::now(),
        query: "q".into(),
        system: None,
        messages: None,
        params: None,
        status: crate::audit::RunStatus::Ok,
        total_ms: 9,
        service_version: "t".into(),
        flash: trace("the flash text"),
        pro: trace("the pro text"),
        events: log.to_events(),
        owner_fingerprint: None,
        client_id: None,
        cost_usd: None,
        agreement: None,
    };
    assert!(
        record.events[1].data.is_none(),
        "answers are kept without their data"
    );
    // A record from before events were kept as such: SSE text, as a dead-letter line
    // of an older release holds it.
    let mut old = serde_json::to_value(&record).unwrap();
    old["events"] = format!(
        "event: start\nid: {id}:0\ndata: {{\"n\":0,\"run_id\":\"{id}\"}}\n\n\
         event: flash\nid: {id}:4\n\n\
         event: done\nid: {id}:9\ndata: {{\"n\":9,\"run_id\":\"{id}\"}}\n\n"
    )
    .into();
    let old: RunRecord = serde_json::from_str(&old.to_string()).unwrap();
    assert_eq!(old.events, record.events);

    for record in [&record, &old] {
        let after = |seq| {
            stored_frames_after(record, seq)
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect::<Vec<_>>()
        };
        let from_start = after(0);
        assert_eq!(from_start.len(), 2);
        assert!(from_start[0].starts_with(&format!("event: flash\nid: {id}:4\ndata: {{")));
        assert!(from_start[0].contains("\"text\":\"the flash text\""));
        assert_eq!(
            from_start[1],
            format!("event: done\nid: {id}:9\ndata: {{\"n\":9,\"run_id\":\"{id}\"}}\n\n"),
            "sent again byte for byte"
        );
        assert_eq!(after(4).len(), 1);
        assert!(after(9).is_empty());
        assert_eq!(stored_last_seq(record), Some(9));
    }
}

#[tokio::test(start_paused = true)]
async fn ended_runs_expire() {
    let reg = Registry::new(Duration::from_secs(5), usize::MAX);
    let id = Uuid::now_v7();
    let log = reg.open(id, None);
    log.push(0, EventKind::Start, Bytes::from_static(b"a"), 0);
    reg.close(id, &log);
    assert!(reg.get(&id).is_some());
    tokio::time::advance(Duration::from_secs(6)).await;
    reg.sweep();
    assert!(reg.get(&id).is_none());
}

#[test]
fn ended_runs_are_bounded_in_bytes_oldest_first() {
    // Room for two runs of 1000-byte frames (with their overhead), not three.
    let cost = 1000 + RUN_OVERHEAD_BYTES;
    let reg = Registry::new(Duration::from_secs(3600), 2 * cost);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let live = Uuid::now_v7();
    let live_log = reg.open(live, None);
    live_log.push(0, EventKind::Start, Bytes::from(vec![b'x'; 5000]), 0);
    for id in &ids {
        let log = reg.open(*id, None);
        log.push(0, EventKind::Start, Bytes::from(vec![b'x'; 400]), 0);
        log.push(1, EventKind::Start, Bytes::from(vec![b'x'; 600]), 0);
        reg.close(*id, &log);
    }
    assert!(reg.get(&ids[0]).is_none(), "the oldest ended run left");
    assert!(reg.get(&ids[1]).is_some());
    assert!(reg.get(&ids[2]).is_some());
    assert!(reg.get(&live).is_some(), "a live run is never evicted");
    assert_eq!(reg.ended(), (2, 2 * cost));

    // A run bigger than the whole bound is not kept at all once it ends.
    let big = Uuid::now_v7();
    let log = reg.open(big, None);
    log.push(0, EventKind::Start, Bytes::from(vec![b'x'; 3 * cost]), 0);
    reg.close(big, &log);
    assert!(reg.get(&big).is_none());
    assert_eq!(reg.ended(), (0, 0));
}

#[test]
fn a_run_belongs_to_the_key_that_started_it() {
    let run = Uuid::now_v7();
    let k1 = Secret::new("k1");
    let k2 = Secret::new("k2");
    let owner = Owner::of(run, &k1);
    assert!(Owner::allows(Some(owner), run, Some(&k1)));
    assert!(!Owner::allows(Some(owner), run, Some(&k2)));
    assert!(!Owner::allows(Some(owner), run, None));
    // Salted by the run: the same key gives another fingerprint on another run.
    let other = Uuid::now_v7();
    assert!(Owner::of(other, &k1) != owner);
    assert!(!Owner::allows(Some(owner), other, Some(&k1)));
    // Without API_KEYS, runs have no owner.
    assert!(Owner::allows(None, run, None));
    assert!(Owner::allows(None, run, Some(&k2)));

    let hex = owner.to_hex();
    assert_eq!(hex.len(), 64);
    assert!(!hex.contains("k1"));
    assert!(Owner::from_hex(&hex) == Some(owner));
    assert!(Owner::allows_stored(Some(&hex), run, Some(&k1)));
    assert!(!Owner::allows_stored(Some(&hex), run, Some(&k2)));
    assert!(!Owner::allows_stored(Some("not hex"), run, Some(&k1)));
    assert!(!Owner::allows_stored(Some(&"é".repeat(32)), run, Some(&k1)));
    assert!(Owner::allows_stored(None, run, Some(&k1)));
}

#[test]
fn frames_after_never_include_seq_or_earlier() {
    let log = RunLog::new(None);
    log.push(0, EventKind::Start, Bytes::from_static(b"start"), 0);
    log.mark_issued(1);
    log.mark_issued(2);
    log.push(3, EventKind::Start, Bytes::from_static(b"flash"), 0);
    assert_eq!(log.issued(), 3);
    let seqs = |after| {
        log.frames_after(after)
            .0
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(0), [3]);
    assert_eq!(seqs(2), [3]);
    assert!(seqs(3).is_empty());
    assert!(seqs(99_999).is_empty());
}
