//! Audit records through the request flow: one per decision, handed to the host, and the cached
//! path's pre-rendered record equal to the record the full path renders (issue 13). Tests that
//! follow one request's record use the access-log sink, which hands each record to its request;
//! the default sink's batches are tested at the end.

use serde_json::{json, Value};

use crate::audit::{BATCH_HEADER, BATCH_MAX_RECORDS};
use crate::fake_host::{Callout, Fate};
use crate::flow_tests::{config, exchanged, only, remote_keys_config, user_token, Worker, SECRET};

/// `cfg` with each record handed to its request as filter state (for Envoy's access log).
fn per_request(mut cfg: Value) -> Value {
    cfg["audit_log"] = json!("access_log");
    cfg
}

/// A worker with `cfg` whose request 1 carried alice's token and got it exchanged for
/// `backend-alice`; the token, and the exchange callout.
fn alice_exchanged(cfg: &Value) -> (Worker, String, Callout) {
    let mut w = Worker::first(cfg);
    let token = user_token("alice");
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-alice"));
    (w, token, call)
}

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
    // 1: exchanged (resumed from the callout answer); 2: the cached path; 3: no token;
    // 4: a forged token; 5: a path the filter refuses before any route.
    let (mut w, token, _) = alice_exchanged(&per_request(config()));
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
    let mut w = Worker::first(&per_request(remote_keys_config()));
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
fn each_sink_gets_the_record_and_no_other_does() {
    // (sink, records on the request, log messages before the tick, after it)
    for (sink, on_request, logged_at_once, logged_after_tick) in [
        (json!("access_log"), 1, 0, 0),
        (json!("envoy_log"), 0, 1, 1),
        (json!(true), 0, 0, 1),
        (json!("envoy_log_batched"), 0, 0, 1),
        (json!(false), 0, 0, 0),
    ] {
        let mut cfg = config();
        cfg["audit_log"] = sink.clone();
        let mut w = Worker::first(&cfg);
        w.send_headers(1, &[(":method", "POST"), (":path", "/mcp")], true);
        assert_eq!(w.host.fate(1), Fate::Replied(401));
        assert_eq!(w.host.request(1).audit.len(), on_request, "{sink}");
        assert_eq!(w.host.logged().len(), logged_at_once, "{sink}");
        w.tick(500);
        let logged = w.host.logged();
        assert_eq!(logged.len(), logged_after_tick, "{sink}");
        let record = match (on_request, logged.last()) {
            (1, _) => w.host.request(1).audit[0].clone(),
            (_, Some(text)) => text.lines().last().unwrap_or_default().to_string(),
            (_, None) => continue,
        };
        let record: Value = serde_json::from_str(&record).expect("a JSON record");
        assert_eq!(record["reason"], "missing_token", "{sink}");
    }
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
    let mut cfg = per_request(config());
    cfg["routes"] = json!([{"path_prefix": "/mcp"}, {"path_prefix": "/other"}]);
    let (mut w, token, call) = alice_exchanged(&cfg);

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
    w.host
        .advance(crate::verified_tokens::STATUS_CHECK_INTERVAL_MS);
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
    let mut w = Worker::first(&per_request(config()));
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

/// The records of the batches written to the worker's log so far, in order; each message must be
/// the header and then one JSON record per line.
fn batched_records(w: &Worker) -> Vec<Value> {
    let mut records = Vec::new();
    for message in w.host.logged() {
        let mut lines = message.split('\n');
        assert_eq!(lines.next(), Some(BATCH_HEADER), "{message}");
        for line in lines {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.is_object() => records.push(v),
                _ => panic!("not one JSON record: {line:?}"),
            }
        }
    }
    records
}

/// Sends `n` requests with `token` (cached after the first), ids from `first`.
fn send_many(w: &mut Worker, token: &str, first: u32, n: u32) {
    for id in first..first + n {
        w.send(id, token);
        w.end(id);
    }
}

#[test]
fn the_default_batches_records_and_writes_them_when_full_on_the_tick_and_when_the_vm_stops() {
    let (mut w, token, _) = alice_exchanged(&config());
    w.end(1);
    let full = BATCH_MAX_RECORDS as u32;
    // A full batch is written at once, from the request that fills it, without a tick.
    send_many(&mut w, &token, 2, full - 1);
    assert_eq!(w.host.logged().len(), 1, "one log call for a full batch");
    assert_eq!(batched_records(&w).len(), BATCH_MAX_RECORDS);
    // Fewer wait for the tick.
    send_many(&mut w, &token, 100, 3);
    assert_eq!(w.host.logged().len(), 1, "held until the tick");
    w.tick(500);
    assert_eq!(w.host.logged().len(), 2);
    assert_eq!(batched_records(&w).len(), BATCH_MAX_RECORDS + 3);
    w.tick(500);
    assert_eq!(w.host.logged().len(), 2, "an empty batch writes nothing");
    // The VM stops (or a new configuration replaces this gateway): what it holds is written.
    send_many(&mut w, &token, 200, 2);
    let host = w.host.clone();
    drop(w);
    assert_eq!(host.logged().len(), 3);
    let last = host.logged().pop().unwrap_or_default();
    assert_eq!(last.lines().count(), 1 + 2, "{last}");
    assert!(!last.contains(&token[token.len() - 40..]), "{last}");
    assert!(!last.contains("backend-alice"), "{last}");
}

#[test]
fn a_batched_record_is_the_record_the_access_log_gets() {
    let run = |cfg: Value| {
        let (mut w, token, _) = alice_exchanged(&cfg);
        w.send(2, &token);
        w.send_headers(3, &[(":method", "POST"), (":path", "/mcp")], true);
        w.send(4, "not.a.jwt");
        w.tick(500);
        w
    };
    let batched = run(config());
    let per_request = run(per_request(config()));
    let handed: Vec<Value> = (1..=4).map(|id| audit_record(&per_request, id)).collect();
    assert_eq!(batched_records(&batched), handed);
    assert_eq!(handed.len(), 4);
}

#[test]
fn records_dropped_by_envoys_log_level_are_reported_once() {
    let mut w = Worker::first(&config());
    w.host.drop_info_logs(true);
    assert!(w.gw.check_audit_log_level(), "said when it starts");
    assert!(!w.gw.check_audit_log_level(), "not again on every tick");
    w.host.drop_info_logs(false);
    assert!(!w.gw.check_audit_log_level());
    w.host.drop_info_logs(true);
    assert!(
        w.gw.check_audit_log_level(),
        "said again when it starts again"
    );
    // The access log does not depend on Envoy's log level.
    let mut w = Worker::first(&per_request(config()));
    w.host.drop_info_logs(true);
    assert!(!w.gw.check_audit_log_level());
}
