use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::config::{EtcdCredentials, FleetStorePolicy};
use seal::StoreKeys;

const NOW: u64 = 1_800_000_000_000;
const KEY: Digest32 = [5; 32];

fn policy(credentials: bool) -> Rc<FleetStorePolicy> {
    Rc::new(FleetStorePolicy {
        cluster: "etcd".into(),
        authority: "etcd".into(),
        timeout: Duration::from_millis(250),
        key_prefix: "/mcp/1/".into(),
        keys: StoreKeys::derive("1", b"0123456789abcdef0123456789abcdef").unwrap(),
        credentials: credentials.then(|| {
            Rc::new(EtcdCredentials {
                username: "envoy".into(),
                password: "pw".into(),
            })
        }),
    })
}

fn body(r: &EtcdRequest) -> Value {
    serde_json::from_str(&r.body).unwrap()
}

/// The lock lease granted, as etcd answers it.
fn with_lock_lease(store: &mut FleetStore) {
    let calls = store.due(NOW);
    assert!(matches!(calls.as_slice(), [(FleetCall::LockLease, _)]));
    store.on_answer(
        FleetCall::LockLease,
        Some(200),
        br#"{"ID":"4242","TTL":"30"}"#,
        NOW,
    );
}

fn range_answer(value: Option<&[u8]>, locked: bool) -> Vec<u8> {
    use base64::Engine as _;
    let kv = |v: &[u8]| json!({"kvs": [{"key": "aw==", "value": base64::engine::general_purpose::STANDARD.encode(v)}], "count": "1"});
    json!({"responses": [
        {"response_range": value.map_or(json!({}), kv)},
        {"response_range": if locked { kv(b"1") } else { json!({}) }},
    ]})
    .to_string()
    .into_bytes()
}

#[test]
fn a_lookup_takes_the_lock_only_with_a_lease_that_outlives_the_exchange() {
    let mut store = FleetStore::new(policy(false));
    let plain = store.lookup(&KEY, Duration::from_secs(6), NOW);
    assert!(body(&plain).get("compare").is_none(), "no lease yet");
    with_lock_lease(&mut store);
    let locking = store.lookup(&KEY, Duration::from_secs(6), NOW);
    assert_eq!(body(&locking)["success"][0]["request_put"]["lease"], "4242");
    let late = store.lookup(&KEY, Duration::from_secs(6), NOW + 25_000);
    assert!(
        body(&late).get("compare").is_none(),
        "the lease ends within the hold"
    );
}

#[test]
fn a_written_value_is_found_by_the_next_lookup_and_names_hide_the_key() {
    let mut store = FleetStore::new(policy(false));
    with_lock_lease(&mut store);
    store.queue_write(&KEY, "backend-token", 1_800_000_600, NOW);
    let calls = store.due(NOW);
    let (call, grant) = calls.into_iter().next().unwrap();
    assert_eq!(grant.path, etcd::LEASE_GRANT_PATH);
    assert_eq!(body(&grant)["TTL"], "600");
    let (write_call, write) = store
        .on_answer(call, Some(200), br#"{"ID":"99","TTL":"600"}"#, NOW)
        .unwrap();
    assert!(matches!(write_call, FleetCall::Write));
    let put = &body(&write)["success"][0]["request_put"];
    assert_eq!(put["lease"], "99");
    assert!(!write.body.contains("backend-token"));
    use base64::Engine as _;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(put["value"].as_str().unwrap())
        .unwrap();
    let found = store.on_lookup(
        false,
        &KEY,
        Some(200),
        &range_answer(Some(&sealed), false),
        NOW,
        "t",
    );
    assert_eq!(
        found,
        Found::Token {
            token: "backend-token".into(),
            until: 1_800_000_600
        }
    );
    let key_name = put["key"].as_str().unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key_name)
        .unwrap();
    assert!(String::from_utf8(raw).unwrap().starts_with("/mcp/1/v/"));
    assert_eq!(store.counts.hits, 1);
}

#[test]
fn unusable_values_are_misses_never_tokens() {
    let mut store = FleetStore::new(policy(false));
    let other = StoreKeys::derive("1", b"a different secret, 32 bytes long").unwrap();
    let name = b"/mcp/1/v/whatever";
    let cases: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        Vec::new(),
        other.seal(name, 1_800_000_600, "tok", [1; 12]),
    ];
    for sealed in cases {
        let found = store.on_lookup(
            false,
            &KEY,
            Some(200),
            &range_answer(Some(&sealed), false),
            NOW,
            "t",
        );
        assert_eq!(found, Found::Exchange);
    }
    assert_eq!(store.counts.unusable_values, 3);
    assert!(!store.is_open(), "a bad value is not a store failure");
}

#[test]
fn an_expired_value_is_a_miss() {
    let mut store = FleetStore::new(policy(false));
    let (name, _) = store.names(&KEY);
    let sealed = store
        .policy
        .keys
        .seal(&name, (NOW / 1000) as i64, "tok", [2; 12]);
    let found = store.on_lookup(
        false,
        &KEY,
        Some(200),
        &range_answer(Some(&sealed), false),
        NOW,
        "t",
    );
    assert_eq!(found, Found::Exchange);
}

#[test]
fn lock_states_are_told_apart() {
    let mut store = FleetStore::new(policy(false));
    assert_eq!(
        store.on_lookup(false, &KEY, Some(200), &range_answer(None, true), NOW, "t"),
        Found::Locked
    );
    assert_eq!(
        store.on_lookup(false, &KEY, Some(200), &range_answer(None, false), NOW, "t"),
        Found::Exchange
    );
    assert_eq!(
        store.on_lookup(
            false,
            &KEY,
            Some(200),
            br#"{"succeeded":true,"responses":[{"response_put":{}}]}"#,
            NOW,
            "t"
        ),
        Found::LockTaken
    );
}

#[test]
fn a_failure_opens_the_breaker_for_the_cooldown_then_one_request_probes() {
    let mut store = FleetStore::new(policy(false));
    assert!(store.usable(NOW));
    assert_eq!(
        store.on_lookup(false, &KEY, None, b"", NOW, "t"),
        Found::Exchange,
        "no answer: exchange directly"
    );
    assert!(store.is_open());
    assert!(!store.usable(NOW + 1));
    let after = NOW + ms(BREAKER_COOLDOWN);
    assert!(store.usable(after), "the probe");
    assert!(!store.usable(after), "only one probe at a time");
    let lost = after + ms(BREAKER_COOLDOWN);
    assert!(store.usable(lost), "a probe never answered is replaced");
    let after = lost;
    store.on_lookup(
        false,
        &KEY,
        Some(200),
        &range_answer(None, false),
        after + 1,
        "t",
    );
    assert!(!store.is_open());
    assert!(store.usable(after + 2));
    assert_eq!(store.counts.errors, 1);
}

#[test]
fn garbage_and_errors_count_as_failures() {
    for (status, body) in [
        (Some(200), &b"<html>"[..]),
        (Some(500), &br#"{"message":"boom"}"#[..]),
        (Some(200), &b"{}"[..]),
    ] {
        let mut store = FleetStore::new(policy(false));
        assert_eq!(
            store.on_lookup(false, &KEY, status, body, NOW, "t"),
            Found::Exchange
        );
        assert!(store.is_open(), "{status:?}");
    }
}

#[test]
fn queued_work_is_dropped_while_the_breaker_is_open() {
    let mut store = FleetStore::new(policy(false));
    store.on_lookup(false, &KEY, None, b"", NOW, "t");
    store.queue_delete(&KEY);
    assert!(store.due(NOW + 1).is_empty());
    assert!(!store.has_work());
}

#[test]
fn with_credentials_nothing_is_used_until_authenticated_and_a_401_authenticates_again() {
    let mut store = FleetStore::new(policy(true));
    assert!(!store.usable(NOW));
    let calls = store.due(NOW);
    assert!(
        matches!(calls.as_slice(), [(FleetCall::Authenticate, r)] if body(r)["name"] == "envoy")
    );
    assert!(store.due(NOW).is_empty(), "one authentication at a time");
    store.on_answer(
        FleetCall::Authenticate,
        Some(200),
        br#"{"token":"abc.1"}"#,
        NOW,
    );
    assert_eq!(store.auth_header(), Some("abc.1"));
    assert!(store.usable(NOW));
    store.on_lookup(
        false,
        &KEY,
        Some(401),
        br#"{"error":"invalid auth token","code":16}"#,
        NOW,
        "t",
    );
    assert!(!store.is_open(), "an expired auth token is not an outage");
    assert!(!store.usable(NOW));
    assert!(matches!(
        store.due(NOW).as_slice(),
        [(FleetCall::Authenticate, _)]
    ));
}

#[test]
fn a_failed_authentication_opens_the_breaker() {
    let mut store = FleetStore::new(policy(true));
    store.due(NOW);
    store.on_answer(
        FleetCall::Authenticate,
        Some(400),
        br#"{"message":"authentication failed, invalid user ID or password"}"#,
        NOW,
    );
    assert!(store.is_open());
    assert!(store.due(NOW + 1).is_empty());
    assert!(matches!(
        store.due(NOW + ms(BREAKER_COOLDOWN)).as_slice(),
        [(FleetCall::Authenticate, _)]
    ));
}

#[test]
fn deletes_and_unlocks_name_the_entry_and_its_lock() {
    let mut store = FleetStore::new(policy(false));
    with_lock_lease(&mut store);
    store.queue_delete(&KEY);
    store.queue_unlock(&KEY);
    let calls = store.due(NOW);
    let keys: Vec<String> = calls
        .iter()
        .map(|(_, r)| {
            use base64::Engine as _;
            let k = body(r)["key"].as_str().unwrap().to_string();
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(k).unwrap()).unwrap()
        })
        .collect();
    assert!(keys[0].starts_with("/mcp/1/v/"), "{keys:?}");
    assert!(keys[1].starts_with("/mcp/1/l/"), "{keys:?}");
    assert_eq!(keys[0][9..], keys[1][9..]);
}

#[test]
fn a_refused_password_waits_for_the_breaker_instead_of_asking_every_tick() {
    let mut store = FleetStore::new(policy(true));
    store.due(NOW);
    store.on_answer(
        FleetCall::Authenticate,
        Some(401),
        br#"{"error":"etcdserver: authentication failed, invalid user ID or password","code":16}"#,
        NOW,
    );
    assert!(store.is_open());
    assert!(store.due(NOW + 500).is_empty());
}
