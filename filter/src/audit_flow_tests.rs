//! Audit records through the request flow: one per decision, handed to the host, and the cached
//! path's pre-rendered record equal to the record the full path renders (issue 13).

use serde_json::{json, Value};

use crate::fake_host::Fate;
use crate::flow_tests::{config, exchanged, only, remote_keys_config, user_token, Worker, SECRET};

/// The one audit record the host was handed for request `id`, parsed.
fn audit_record(w: &Worker, id: u32) -> Value {
    let records = w.host.request(id).audit;
    assert_eq!(
        records.len(),
        1,
        "request {id}: one record, got {records:?}"
    );
    match serde_json::from_str(&records[0]) {
        Ok(v) => v,
        Err(e) => panic!("request {id}: record is not JSON ({e}): {}", records[0]),
    }
}

#[test]
fn every_decision_hands_one_audit_record_to_the_host() {
    let mut w = Worker::first(&config());
    let token = user_token("alice");
    // 1: exchanged (resumed from the callout answer); 2: the cached path; 3: no token;
    // 4: a forged token; 5: a path the filter refuses before any route.
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-alice"));
    w.send(2, &token);
    w.send_headers(3, &[(":method", "POST"), (":path", "/mcp")], true);
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    w.send(4, &forged);
    let auth = format!("Bearer {token}");
    let headers = [
        (":method", "POST"),
        (":path", "/a/../mcp"),
        ("authorization", auth.as_str()),
    ];
    w.send_headers(5, &headers, true);

    let miss = audit_record(&w, 1);
    assert_eq!(miss["decision"], "allow");
    assert_eq!(miss["cache"], "miss");
    assert_eq!(miss["token"], "jti-alice");
    assert_eq!(miss["sub"], "alice");
    assert!(miss["exchanged_token"]
        .as_str()
        .is_some_and(|f| f.len() == 8));
    let hit = audit_record(&w, 2);
    assert_eq!(hit["decision"], "allow");
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["exchanged_token"], miss["exchanged_token"]);
    let missing = audit_record(&w, 3);
    assert_eq!(missing["decision"], "deny");
    assert_eq!(missing["reason"], "missing_token");
    assert_eq!(missing["status"], 401);
    let bad = audit_record(&w, 4);
    assert_eq!(bad["decision"], "deny");
    assert_eq!(bad["status"], 401);
    let path = audit_record(&w, 5);
    assert_eq!(path["reason"], "invalid_path");
    assert_eq!(path["status"], 400);
    for id in 1..=5 {
        let record = &w.host.request(id).audit[0];
        assert!(!record.contains(&token[token.len() - 40..]), "{record}");
        assert!(!record.contains("backend-alice"), "{record}");
        assert!(!record.contains(SECRET), "{record}");
    }
}

#[test]
fn a_request_refused_from_the_tick_gets_its_record() {
    let mut w = Worker::first(&remote_keys_config());
    w.send(1, &user_token("gina"));
    for _ in 0..5 {
        w.tick(500);
    }
    assert_eq!(w.host.fate(1), Fate::Replied(503));
    let record = audit_record(&w, 1);
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["status"], 503);
}

#[test]
fn only_the_access_log_sink_hands_records_to_the_host() {
    for sink in [json!("envoy_log"), json!(false)] {
        let mut cfg = config();
        cfg["audit_log"] = sink.clone();
        let mut w = Worker::first(&cfg);
        w.send_headers(1, &[(":method", "POST"), (":path", "/mcp")], true);
        assert_eq!(w.host.fate(1), Fate::Replied(401));
        assert!(w.host.request(1).audit.is_empty(), "{sink}");
    }
    let mut cfg = config();
    cfg["audit_log"] = json!(true);
    let mut w = Worker::first(&cfg);
    w.send_headers(1, &[(":method", "POST"), (":path", "/mcp")], true);
    assert_eq!(audit_record(&w, 1)["reason"], "missing_token");
}

/// A record without its time, which is all a cached-path record may differ in.
fn timeless(mut record: Value) -> Value {
    record
        .as_object_mut()
        .map(|fields| fields.remove("time_ms"));
    record
}

#[test]
fn the_cached_path_renders_a_record_once_and_only_its_time_changes() {
    let mut cfg = config();
    cfg["routes"] = json!([{"path_prefix": "/mcp"}, {"path_prefix": "/other"}]);
    let mut w = Worker::first(&cfg);
    let token = user_token("alice");
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-alice"));

    w.send(2, &token);
    w.host.advance(1_234);
    w.send(3, &token);
    let (first, second) = (audit_record(&w, 2), audit_record(&w, 3));
    assert_eq!(first["cache"], "hit");
    assert_eq!(first["time_ms"], json!(w.host.now() - 1_234));
    assert_eq!(second["time_ms"], json!(w.host.now()));
    assert_eq!(timeless(first.clone()), timeless(second));
    // Field by field what the full path's record of the same decision says.
    let miss = audit_record(&w, 1);
    for field in [
        "decision",
        "reason",
        "sub",
        "token",
        "route",
        "target_audience",
        "target_scope",
        "exchanged_token",
    ] {
        assert_eq!(first[field], miss[field], "{field}");
    }
    assert_eq!(first["latency_ms"], 0);
    assert_eq!(first["route"], "/mcp");

    // Another route: its own name, then back to the first route's record.
    let auth = format!("Bearer {token}");
    let on_other = [
        (":method", "POST"),
        (":path", "/other"),
        ("authorization", auth.as_str()),
    ];
    w.send_headers(4, &on_other, true);
    assert_eq!(audit_record(&w, 4)["route"], "/other");
    // Due a status check (see `STATUS_CHECK_INTERVAL_MS`), so its 401 below is read.
    w.host.advance(crate::cache::STATUS_CHECK_INTERVAL_MS);
    w.send(5, &token);
    assert_eq!(timeless(audit_record(&w, 5)), timeless(first.clone()));

    // The upstream refuses the backend token: the next exchange's token is named, not the old.
    w.upstream_answers(5, "401");
    w.send(6, &token);
    let renewal = w
        .exchanges()
        .into_iter()
        .find(|c| c.token != call.token)
        .expect("a second exchange after the 401");
    w.answer(&renewal, Some(200), &exchanged("backend-alice-2"));
    w.send(7, &token);
    let renewed = audit_record(&w, 7);
    assert_eq!(renewed["cache"], "hit");
    assert_eq!(
        renewed["exchanged_token"],
        audit_record(&w, 6)["exchanged_token"]
    );
    assert_ne!(renewed["exchanged_token"], first["exchanged_token"]);
}

#[test]
fn the_cached_path_record_keeps_every_string_escaped() {
    // A `sub` that needs escaping, rendered once and reused.
    let mut w = Worker::first(&config());
    let now = (crate::flow_tests::T0_MS / 1000) as i64;
    let token = crate::test_keys::sign(
        &json!({"alg": "RS256", "kid": "k1", "typ": "JWT"}),
        &json!({"iss": "https://idp.example.com/oauth2/mcp", "aud": "mcpserver",
                "sub": "mallory\"},{\"decision\":\"deny", "scp": ["mcp:tools:call"],
                "iat": now, "exp": now + 3600}),
    );
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-mallory"));
    w.send(2, &token);
    w.send(3, &token);
    for id in [2, 3] {
        let record = audit_record(&w, id);
        assert_eq!(record["decision"], "allow", "{record}");
        assert_eq!(record["cache"], "hit", "{record}");
        assert!(record["sub"]
            .as_str()
            .is_some_and(|s| s.starts_with("mallory")));
    }
}
