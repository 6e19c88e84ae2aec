//! The request flow as scenarios, natively: one or more `Gateway`s (Envoy workers) over
//! `FakeHost`s that share shared data, with the test playing Envoy (requests, callout answers,
//! ticks, clients going away) and the IdP. Each test is one path through the flow; the property
//! test at the end drives random interleavings against the flow's invariants.

use std::collections::HashMap;

use proxy_wasm::types::Action;
use serde_json::{json, Value};

use crate::cache::Digest32;
use crate::config::parse_policy;
use crate::fake_host::{Callout, FakeHost, Fate, ROOT};
use crate::gateway::{Admission, Admitted, Gateway};
use crate::test_keys;

/// The fake clock's start, ms since the epoch.
pub(crate) const T0_MS: u64 = 1_800_000_000_000;
const ISSUER: &str = "https://idp.example.com/oauth2/mcp";
pub(crate) const SECRET: &str = "s3cret-never-logged";

pub(crate) fn config() -> Value {
    json!({
        "issuer": ISSUER,
        "audiences": ["mcpserver"],
        "required_scopes": ["mcp:tools:call"],
        "jwks": {"inline": test_keys::jwks_json()},
        "exchange": {
            "cluster": "okta", "path": "/oauth2/backend/v1/token", "authority": "idp.example.com",
            "client_id": "gw", "client_secret_env": "SECRET",
            "audience": "backend", "scope": "backend-api:read"
        }
    })
}

/// The same with keys fetched from the `okta` cluster.
pub(crate) fn remote_keys_config() -> Value {
    let mut c = config();
    c["jwks"] = json!({"cluster": "okta", "path": "/oauth2/mcp/v1/keys",
                       "authority": "idp.example.com", "max_wait_ms": 2000,
                       "min_refetch_interval_seconds": 30});
    c
}

pub(crate) fn token_at(now_ms: u64, sub: &str, kid: &str) -> String {
    let now = (now_ms / 1000) as i64;
    test_keys::sign(
        &json!({"alg": "RS256", "kid": kid, "typ": "JWT"}),
        &json!({"iss": ISSUER, "aud": "mcpserver", "sub": sub, "scp": ["mcp:tools:call"],
                "iat": now, "exp": now + 3600, "jti": format!("jti-{sub}")}),
    )
}

pub(crate) fn user_token(sub: &str) -> String {
    token_at(T0_MS, sub, "k1")
}

/// One Envoy worker: a gateway and the test's handle on its host.
pub(crate) struct Worker {
    pub(crate) host: FakeHost,
    pub(crate) gw: Gateway<FakeHost>,
    /// Requests forwarded on the cached path, with the key of their backend token: what
    /// `http.rs` keeps in the request's context for the upstream's answer.
    cached: HashMap<u32, Option<Digest32>>,
}

impl Worker {
    pub(crate) fn new(host: FakeHost, config: &Value, worker_id: u32) -> Self {
        let env = |name: &str| match name {
            "SECRET" => Some(SECRET.to_string()),
            // Fleet store keys (fleet_flow_tests).
            "STORE_KEY" => Some("fleet-store-key-of-at-least-32-bytes!".to_string()),
            "STORE_KEY_2" => Some("another-fleet-store-key-32-bytes-long".to_string()),
            _ => None,
        };
        let policy = match parse_policy(config.to_string().as_bytes(), &env) {
            Ok(p) => p,
            Err(e) => panic!("test configuration refused: {e}"),
        };
        let mut gw = Gateway::new(host.clone(), policy, "test", worker_id);
        gw.prepare_shared_slots();
        Self {
            host,
            gw,
            cached: HashMap::new(),
        }
    }

    pub(crate) fn first(config: &Value) -> Self {
        Self::new(FakeHost::at(T0_MS), config, 1)
    }

    /// Another worker of the same Envoy (same shared data, same clock).
    pub(crate) fn sibling(&self, config: &Value, worker_id: u32) -> Self {
        Self::new(self.host.sibling(), config, worker_id)
    }

    /// A request's headers arrive (`end_of_stream`: no body follows).
    pub(crate) fn send_headers(
        &mut self,
        id: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Action {
        self.host.arrive(id, headers, b"");
        let action = match self.gw.on_request_headers(id, end_of_stream) {
            Admission::Cached { watched_key } => {
                self.cached.insert(id, watched_key);
                Action::Continue
            }
            Admission::Full(action) => action,
        };
        if action == Action::Continue {
            self.host.continued(id);
        }
        action
    }

    /// `POST /mcp` with this bearer token and no body.
    pub(crate) fn send(&mut self, id: u32, token: &str) -> Action {
        let auth = format!("Bearer {token}");
        self.send_headers(
            id,
            &[
                (":method", "POST"),
                (":path", "/mcp"),
                ("authorization", &auth),
            ],
            true,
        )
    }

    /// The IdP (or JWKS endpoint) answers a callout. `false`: Envoy had cancelled it (the
    /// context it belonged to ended), so the answer never reaches the filter.
    pub(crate) fn answer(&mut self, callout: &Callout, status: Option<u16>, body: &str) -> bool {
        if !self.host.deliverable(callout) {
            return false;
        }
        self.host.enter(callout.sdk_owner);
        self.host.answer_with(status, &[], body.as_bytes());
        let receiver = (callout.sdk_owner != ROOT).then_some(callout.sdk_owner);
        self.gw
            .on_http_call_response(receiver, callout.token, body.len());
        true
    }

    /// The upstream's response headers arrive with this status.
    pub(crate) fn upstream_answers(&mut self, id: u32, status: &str) {
        self.host.upstream_answers(id, status);
        self.gw.on_response_headers(id, self.admitted(id));
    }

    /// What the request's context keeps (see `http.rs`).
    fn admitted(&self, id: u32) -> Admitted {
        match self.cached.get(&id) {
            Some(watched_key) => Admitted::Cached {
                watched_key: *watched_key,
            },
            None => Admitted::Full,
        }
    }

    pub(crate) fn tick(&mut self, ms: u64) {
        self.host.advance(ms);
        self.host.enter_root();
        self.gw.on_tick();
    }

    /// Envoy deletes the request's context (it ended, or the client went away).
    pub(crate) fn end(&mut self, id: u32) {
        let admitted = self.admitted(id);
        self.cached.remove(&id);
        self.host.end(id);
        self.gw.on_request_end(id, admitted);
    }

    pub(crate) fn abandon(&mut self, id: u32) {
        self.host.abandon(id);
        self.end(id);
    }

    pub(crate) fn exchanges(&self) -> Vec<Callout> {
        self.host
            .callouts()
            .into_iter()
            .filter(|c| c.path().ends_with("/v1/token"))
            .collect()
    }

    pub(crate) fn jwks_fetches(&self) -> Vec<Callout> {
        self.host
            .callouts()
            .into_iter()
            .filter(|c| c.path().ends_with("/v1/keys"))
            .collect()
    }

    pub(crate) fn authorization(&self, id: u32) -> Option<String> {
        self.host
            .request(id)
            .header("authorization")
            .map(str::to_string)
    }
}

pub(crate) fn exchanged(access_token: &str) -> String {
    json!({"access_token": access_token, "token_type": "Bearer", "expires_in": 3600,
           "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
           "scope": "backend-api:read"})
    .to_string()
}

pub(crate) fn idp_error(error: &str) -> String {
    json!({"error": error, "error_description": "refused"}).to_string()
}

pub(crate) fn only<T: Clone>(items: &[T]) -> T {
    assert_eq!(items.len(), 1, "expected exactly one");
    items[0].clone()
}

#[test]
fn a_miss_exchanges_once_and_forwards_only_the_backend_token() {
    let mut w = Worker::first(&config());
    let token = user_token("alice");
    assert_eq!(w.send(1, &token), Action::Pause);
    assert_eq!(w.host.fate(1), Fate::Waiting);
    let call = only(&w.exchanges());
    assert_eq!(call.cluster, "okta");
    let form = String::from_utf8_lossy(&call.body).into_owned();
    assert!(form.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"));
    assert!(form.contains(&format!("subject_token={token}")));
    assert!(form.contains("audience=backend"));
    assert!(
        !form.contains(SECRET),
        "client_secret_basic: the secret is not in the body"
    );

    w.answer(&call, Some(200), &exchanged("backend-alice"));
    let r = w.host.request(1);
    assert_eq!(r.fate, Fate::Forwarded);
    assert_eq!(r.decisions, 1);
    assert_eq!(r.header("authorization"), Some("Bearer backend-alice"));
    assert!(r.headers.iter().all(|(_, v)| !v.contains(&token)));
    w.end(1);
    w.tick(500);
    assert!(w.gw.is_idle());
    assert_eq!(w.host.counter("requests.allowed"), 1);
    assert_eq!(w.host.counter("cache.misses"), 1);
}

#[test]
fn a_repeated_token_is_forwarded_from_the_cache_without_a_callout() {
    let mut w = Worker::first(&config());
    let token = user_token("alice");
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-alice"));
    w.end(1);

    assert_eq!(w.send(2, &token), Action::Continue);
    assert_eq!(w.authorization(2).as_deref(), Some("Bearer backend-alice"));
    assert_eq!(w.exchanges().len(), 1, "no second exchange");
    w.end(2);
    w.tick(500);
    assert_eq!(w.host.counter("cache.hits"), 1);
    assert!(w.gw.is_idle());
}

#[test]
fn concurrent_requests_with_one_fresh_token_share_one_exchange() {
    let mut w = Worker::first(&config());
    let token = user_token("bob");
    for id in 1..=8 {
        assert_eq!(w.send(id, &token), Action::Pause);
    }
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-bob"));
    for id in 1..=8 {
        let r = w.host.request(id);
        assert_eq!((r.fate, r.decisions), (Fate::Forwarded, 1), "request {id}");
        assert_eq!(r.header("authorization"), Some("Bearer backend-bob"));
        w.end(id);
    }
    w.tick(500);
    assert_eq!(w.host.counter("cache.coalesced"), 7);
    assert!(w.gw.is_idle());
}

#[test]
fn a_worker_waits_for_the_lease_holder_and_uses_its_token() {
    let cfg = config();
    let mut a = Worker::first(&cfg);
    let mut b = a.sibling(&cfg, 2);
    let token = user_token("carol");
    a.send(1, &token);
    let call = only(&a.exchanges());
    assert_eq!(b.send(1, &token), Action::Pause, "B waits on A's lease");
    assert!(b.exchanges().is_empty());
    assert_eq!(
        b.host.tick_period().as_millis(),
        20,
        "B polls the store quickly"
    );

    a.answer(&call, Some(200), &exchanged("backend-carol"));
    b.tick(20);
    assert_eq!(b.host.fate(1), Fate::Forwarded);
    assert_eq!(b.authorization(1).as_deref(), Some("Bearer backend-carol"));
    assert!(b.exchanges().is_empty(), "B never called the IdP");
    b.end(1);
    a.end(1);
    b.tick(500);
    assert_eq!(
        b.host.tick_period().as_millis(),
        500,
        "back to the normal tick"
    );
    assert!(a.gw.is_idle() && b.gw.is_idle());
}

#[test]
fn a_lease_whose_holder_went_away_is_taken_over() {
    let cfg = config();
    let mut a = Worker::first(&cfg);
    let mut b = a.sibling(&cfg, 2);
    let token = user_token("dave");
    a.send(1, &token);
    let a_call = only(&a.exchanges());
    b.send(1, &token);
    // Worker A never answers again (its VM is gone); its lease runs out (exchange timeout + 1 s).
    let _ = a_call;
    let mut waited = 0;
    while b.exchanges().is_empty() && waited < 10_000 {
        b.tick(20);
        waited += 20;
    }
    let b_call = only(&b.exchanges());
    assert!(
        waited >= 5000,
        "took over only after the lease expired ({waited} ms)"
    );
    b.answer(&b_call, Some(200), &exchanged("backend-dave"));
    assert_eq!(b.host.fate(1), Fate::Forwarded);
    assert_eq!(b.authorization(1).as_deref(), Some("Bearer backend-dave"));
    b.end(1);
    b.tick(500);
    assert!(b.gw.is_idle());
}

#[test]
fn a_failed_exchange_is_shared_for_its_window_then_retried() {
    let cfg = config();
    let mut a = Worker::first(&cfg);
    let mut b = a.sibling(&cfg, 2);
    let token = user_token("erin");
    a.send(1, &token);
    a.send(2, &token);
    let call = only(&a.exchanges());
    a.answer(&call, Some(503), &idp_error("temporarily_unavailable"));
    for id in [1, 2] {
        assert_eq!(a.host.fate(id), Fate::Replied(503));
        assert!(a.host.request(id).reply_header("retry-after").is_some());
    }
    // Within the failure window another worker gets the same answer without calling the IdP.
    b.send(1, &token);
    assert_eq!(b.host.fate(1), Fate::Replied(503));
    assert!(b.exchanges().is_empty());
    // After it, the next request tries again.
    b.host.advance(1001);
    b.send(2, &token);
    let retry = only(&b.exchanges());
    b.answer(&retry, Some(200), &exchanged("backend-erin"));
    assert_eq!(b.host.fate(2), Fate::Forwarded);
    for id in [1, 2] {
        a.end(id);
        b.end(id);
    }
    assert!(a.gw.is_idle() && b.gw.is_idle());
}

#[test]
fn requests_wait_for_the_first_key_set_and_resume_when_it_arrives() {
    let mut w = Worker::first(&remote_keys_config());
    let (ann, ben) = (user_token("frank"), user_token("fred"));
    assert_eq!(w.send(1, &ann), Action::Pause);
    assert_eq!(w.send(2, &ann), Action::Pause);
    assert_eq!(w.send(3, &ben), Action::Pause);
    assert_eq!(
        w.host.tick_period().as_millis(),
        20,
        "the fetch goes out on a fast tick"
    );
    w.tick(20);
    let fetch = only(&w.jwks_fetches());
    assert_eq!(
        fetch.sdk_owner, ROOT,
        "the key set belongs to no one request"
    );
    assert!(
        w.exchanges().is_empty(),
        "nothing is exchanged before the token is verified"
    );

    w.answer(&fetch, Some(200), &test_keys::jwks_json());
    // The resumed requests' exchanges go out from the root context on the next tick.
    w.tick(20);
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2, "one per token");
    assert!(calls
        .iter()
        .all(|c| c.sdk_owner == ROOT && c.envoy_owner == ROOT));
    w.answer(&calls[0], Some(200), &exchanged("backend-1"));
    w.answer(&calls[1], Some(200), &exchanged("backend-2"));
    for id in [1, 2, 3] {
        assert_eq!(w.host.fate(id), Fate::Forwarded);
        w.end(id);
    }
    assert!(w.gw.is_idle());
}

#[test]
fn requests_waiting_for_keys_get_503_after_max_wait() {
    let mut w = Worker::first(&remote_keys_config());
    w.send(1, &user_token("gina"));
    w.tick(20);
    let _fetch = only(&w.jwks_fetches());
    w.tick(500);
    assert_eq!(w.host.fate(1), Fate::Waiting);
    for _ in 0..3 {
        w.tick(500);
    }
    let r = w.host.request(1);
    assert_eq!(r.fate, Fate::Replied(503));
    assert!(r.reply_header("retry-after").is_some());
    w.end(1);
    assert!(w.gw.is_idle());
}

#[test]
fn an_unknown_kid_triggers_one_refetch_per_interval() {
    let mut w = Worker::first(&remote_keys_config());
    w.send(1, &user_token("hank"));
    w.tick(20);
    let first = only(&w.jwks_fetches());
    w.answer(&first, Some(200), &test_keys::jwks_json());
    w.tick(20);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-hank"));
    w.end(1);

    // A token signed under a kid the set does not have: one refetch, then a 401.
    w.tick(31_000);
    let stranger = token_at(w.host.now(), "ivy", "k9");
    assert_eq!(w.send(2, &stranger), Action::Pause);
    w.tick(20);
    let fetches = w.jwks_fetches();
    assert_eq!(fetches.len(), 2, "one refetch");
    w.answer(&fetches[1], Some(200), &test_keys::jwks_json());
    assert_eq!(w.host.fate(2), Fate::Replied(401));
    // More unknown kids within the interval: refused at once, no fetch.
    for id in 3..10 {
        w.send(id, &stranger);
        assert_eq!(w.host.fate(id), Fate::Replied(401));
    }
    w.tick(500);
    assert_eq!(w.jwks_fetches().len(), 2);
    for id in 2..10 {
        w.end(id);
    }
    assert!(w.gw.is_idle());
}

#[test]
fn a_body_that_breaks_tool_policy_is_refused_after_the_headers_went_upstream() {
    let mut cfg = config();
    cfg["routes"] = json!([{"path_prefix": "/mcp", "deny_unlisted_tools": true,
                            "tools": {"whoami": {}}}]);
    let mut w = Worker::first(&cfg);
    let auth = format!("Bearer {}", user_token("jack"));
    let headers = [
        (":method", "POST"),
        (":path", "/mcp"),
        ("authorization", auth.as_str()),
    ];
    w.send_headers(1, &headers, false);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-jack"));
    assert_eq!(
        w.host.fate(1),
        Fate::Forwarded,
        "headers released with the backend token"
    );

    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm_rf"}}"#;
    // The body arrives in request 1's own callback.
    w.host.set_body(1, body);
    w.host.enter(1);
    assert_eq!(
        w.gw.on_request_body(1, Admitted::Full, body.len(), true),
        Action::Pause
    );
    assert_eq!(w.host.request(1).reply_status, Some(403));
    w.end(1);
    assert!(w.gw.is_idle());
}

#[test]
fn a_client_that_leaves_mid_exchange_leaves_nothing_behind() {
    let mut w = Worker::first(&config());
    let token = user_token("kate");
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.abandon(1);
    // Envoy cancels the callout with the request that dispatched it.
    assert!(!w.answer(&call, Some(200), &exchanged("backend-kate")));
    assert_eq!(w.host.fate(1), Fate::Gone);
    assert_eq!(w.host.request(1).decisions, 0);
    // The exchange is given up once its answer cannot come any more: 5 s timeout + 2 s.
    w.tick(7_100);
    assert!(w.gw.is_idle());
    assert_eq!(w.host.counter("requests.abandoned"), 1);
}

#[test]
fn exchanges_for_resumed_requests_survive_the_request_that_fetched_the_keys() {
    // Reconfiguration under load found this: requests parked for keys were resumed in the
    // callback of the request whose callout brought the keys, and their exchanges belonged to
    // that request; when it ended first, Envoy cancelled them and the others got 504.
    let mut w = Worker::first(&remote_keys_config());
    let (ann, ben) = (user_token("ann"), user_token("ben"));
    w.send(1, &ann);
    w.send(2, &ben);
    w.tick(20);
    let fetch = only(&w.jwks_fetches());
    w.answer(&fetch, Some(200), &test_keys::jwks_json());
    w.tick(20);
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2);
    let ann_call = calls
        .iter()
        .find(|c| String::from_utf8_lossy(&c.body).contains(&ann))
        .cloned()
        .unwrap();
    w.answer(&ann_call, Some(200), &exchanged("backend-ann"));
    assert_eq!(w.host.fate(1), Fate::Forwarded);
    w.end(1);
    let ben_call = calls
        .into_iter()
        .find(|c| c.token != ann_call.token)
        .unwrap();
    assert!(
        w.answer(&ben_call, Some(200), &exchanged("backend-ben")),
        "request 2's exchange outlives request 1"
    );
    assert_eq!(w.authorization(2).as_deref(), Some("Bearer backend-ben"));
    w.end(2);
    assert!(w.gw.is_idle());
}

/// Two workers that both hold `backend-<user>-1` for `user`'s token: A exchanged it (request 1),
/// B found it in the store (its request 1).
fn two_workers_holding_a_backend_token(user: &str) -> (Worker, Worker, String) {
    let cfg = config();
    let mut a = Worker::first(&cfg);
    let mut b = a.sibling(&cfg, 2);
    let token = user_token(user);
    let backend = format!("backend-{user}-1");
    a.send(1, &token);
    let call = only(&a.exchanges());
    a.answer(&call, Some(200), &exchanged(&backend));
    a.end(1);
    b.send(1, &token);
    assert_eq!(
        b.authorization(1).as_deref(),
        Some(format!("Bearer {backend}").as_str())
    );
    b.end(1);
    (a, b, token)
}

#[test]
fn an_upstream_401_drops_the_backend_token_on_every_worker() {
    let (mut a, mut b, token) = two_workers_holding_a_backend_token("liam");
    // B now holds the backend token in front of the store; the upstream rejects it on A.
    a.send(2, &token);
    a.upstream_answers(2, "401");
    a.end(2);
    b.tick(500);

    b.send(3, &token);
    assert_eq!(b.host.fate(3), Fate::Waiting, "B exchanges afresh");
    let fresh = only(&b.exchanges());
    b.answer(&fresh, Some(200), &exchanged("backend-liam-2"));
    assert_eq!(b.authorization(3).as_deref(), Some("Bearer backend-liam-2"));
    b.end(3);
    a.tick(500);
    assert_eq!(a.host.counter("cache.invalidated"), 1);
    assert!(a.gw.is_idle() && b.gw.is_idle());
}

/// Two workers sent the same backend token; B's 401 came first and B exchanged a fresh one.
/// A's late 401 to the old token must not drop the fresh one from the store (it did: the drop
/// was by key), which cost every worker another exchange.
#[test]
fn a_late_401_to_an_old_backend_token_leaves_the_fresh_one() {
    let (mut a, mut b, token) = two_workers_holding_a_backend_token("mia");
    a.send(2, &token);
    assert_eq!(a.authorization(2).as_deref(), Some("Bearer backend-mia-1"));

    b.send(2, &token);
    b.upstream_answers(2, "401");
    b.end(2);
    b.send(3, &token);
    let fresh = only(&b.exchanges());
    b.answer(&fresh, Some(200), &exchanged("backend-mia-2"));
    assert_eq!(b.authorization(3).as_deref(), Some("Bearer backend-mia-2"));
    b.end(3);

    a.upstream_answers(2, "401");
    a.end(2);
    a.tick(500);
    a.send(3, &token);
    assert_eq!(
        a.exchanges().len(),
        1,
        "A exchanged only the first time: the fresh token is still in the store"
    );
    assert_eq!(a.authorization(3).as_deref(), Some("Bearer backend-mia-2"));
    a.end(3);
    b.tick(500);
    assert_eq!(a.host.counter("cache.invalidated"), 0);
    assert_eq!(b.host.counter("cache.invalidated"), 1);
}

#[test]
fn the_cached_path_reads_the_upstream_status_at_most_once_an_interval() {
    use crate::verified_tokens::STATUS_CHECK_INTERVAL_MS;
    let mut w = Worker::first(&config());
    let token = user_token("lena");
    w.send(1, &token);
    let call = only(&w.exchanges());
    w.answer(&call, Some(200), &exchanged("backend-lena-1"));
    w.upstream_answers(1, "200");
    // The first cached request is checked; others within the interval are not: a 401 to one
    // of them is not read (it costs a host call that calls back into the VM).
    w.send(2, &token);
    w.upstream_answers(2, "200");
    w.host.advance(STATUS_CHECK_INTERVAL_MS - 1);
    w.send(3, &token);
    w.upstream_answers(3, "401");
    w.send(4, &token);
    assert_eq!(w.authorization(4).as_deref(), Some("Bearer backend-lena-1"));
    assert_eq!(w.exchanges().len(), 1);
    // An interval after the last check the next answer is read, and its 401 drops the token.
    w.host.advance(1);
    w.send(5, &token);
    w.upstream_answers(5, "401");
    w.send(6, &token);
    assert_eq!(w.host.fate(6), Fate::Waiting, "exchanges afresh");
    assert_eq!(w.exchanges().len(), 2);
    for id in 1..=6 {
        w.end(id);
    }
    w.tick(500);
    assert_eq!(w.host.counter("cache.invalidated"), 1);
}

#[test]
fn the_number_of_requests_waiting_for_keys_is_capped() {
    let mut w = Worker::first(&remote_keys_config());
    let token = user_token("mia");
    const CAP: u32 = 4096;
    for id in 1..=CAP {
        assert_eq!(w.send(id, &token), Action::Pause);
    }
    assert_eq!(w.host.fate(CAP), Fate::Waiting);
    w.send(CAP + 1, &token);
    assert_eq!(w.host.fate(CAP + 1), Fate::Replied(503));
    for id in 1..=CAP + 1 {
        w.end(id);
    }
    assert!(w.gw.is_idle());
}

#[test]
fn a_dispatch_the_host_refuses_is_a_503_not_a_pass() {
    let mut w = Worker::first(&config());
    w.host.refuse_dispatch(true);
    w.send(1, &user_token("noah"));
    assert_eq!(w.host.fate(1), Fate::Replied(503));
    w.end(1);
    assert!(w.gw.is_idle());
}

#[test]
fn remote_keys_are_fetched_on_the_first_tick_and_refreshed_on_schedule() {
    let mut w = Worker::first(&remote_keys_config());
    w.tick(500);
    let first = only(&w.jwks_fetches());
    w.answer(&first, Some(200), &test_keys::jwks_json());
    w.tick(500);
    assert_eq!(
        w.jwks_fetches().len(),
        1,
        "no refetch before the refresh interval"
    );
    // The default refresh interval is 600 s.
    w.tick(600_000);
    assert_eq!(w.jwks_fetches().len(), 2, "refreshed");
    assert!(w.gw.is_idle());
}

#[test]
fn an_exchange_started_for_another_request_never_belongs_to_a_request_that_may_end_first() {
    // Keys arrive for two parked requests: the first finds its backend token in the store
    // (another worker exchanged it) and is forwarded at once, which makes it the effective
    // context; the second must exchange. Its callout must not be tied to the first request.
    let cfg = remote_keys_config();
    let mut a = Worker::first(&cfg);
    let mut b = a.sibling(&cfg, 2);
    // The issuer publishes a new kid ("k1b", for k1's key) that worker A has not seen yet.
    let rotated = {
        let mut doc: Value = serde_json::from_str(&test_keys::jwks_json()).unwrap();
        let keys = doc["keys"].as_array_mut().unwrap();
        let mut k1b = keys[0].clone();
        k1b["kid"] = json!("k1b");
        keys.push(k1b);
        doc.to_string()
    };
    a.tick(20);
    a.answer(&only(&a.jwks_fetches()), Some(200), &test_keys::jwks_json());
    b.tick(20);
    b.answer(&only(&b.jwks_fetches()), Some(200), &rotated);
    a.tick(31_000);
    let (stored, fresh) = (
        token_at(a.host.now(), "sue", "k1b"),
        token_at(a.host.now(), "tom", "k1b"),
    );
    b.send(1, &stored);
    b.answer(&only(&b.exchanges()), Some(200), &exchanged("backend-sue"));
    b.end(1);

    a.send(1, &stored);
    a.send(2, &fresh);
    a.tick(20);
    let refetch = a.jwks_fetches()[1].clone();
    a.answer(&refetch, Some(200), &rotated);
    assert_eq!(a.authorization(1).as_deref(), Some("Bearer backend-sue"));
    a.tick(20);
    let call = only(&a.exchanges());
    a.end(1);
    assert!(
        a.answer(&call, Some(200), &exchanged("backend-tom")),
        "request 2's exchange was cancelled with request 1"
    );
    assert_eq!(a.authorization(2).as_deref(), Some("Bearer backend-tom"));
    a.end(2);
    assert!(a.gw.is_idle() && b.gw.is_idle());
}
