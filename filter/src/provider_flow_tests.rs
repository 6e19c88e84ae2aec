//! Several inbound providers on one listener, as scenarios through the fake host: the token's
//! `iss` picks the provider before any key work, routes accept the providers they name, and each
//! provider has its own keys, fetches and waiters.

use proxy_wasm::types::Action;
use serde_json::{json, Value};

use crate::fake_host::{Fate, ROOT};
use crate::flow_tests::{exchanged, Worker, T0_MS};
use crate::test_keys;

const OKTA: &str = "https://okta.example.com/oauth2/mcp";
const ENTRA: &str = "https://login.microsoftonline.com/tenant-1/v2.0";

/// Okta with inline keys on `/mcp`; an Entra-like provider with fetched keys on `/entra/mcp`;
/// `/both/mcp` accepts either.
fn two_providers() -> Value {
    json!({
        "providers": {
            "okta": {"issuer": OKTA, "audiences": ["mcpserver"],
                     "jwks": {"inline": test_keys::jwks_json()}},
            "entra": {"issuer": ENTRA, "audiences": ["api://mcp"],
                      "jwks": {"cluster": "entra", "path": "/tenant-1/discovery/v2.0/keys",
                               "max_wait_ms": 2000}}
        },
        "required_scopes": ["mcp:tools:call"],
        "exchange": {
            "cluster": "okta", "path": "/oauth2/backend/v1/token", "authority": "idp.example.com",
            "client_id": "gw", "client_secret_env": "SECRET",
            "audience": "backend", "scope": "backend-api:read"
        },
        "routes": [
            {"path_prefix": "/mcp", "providers": ["okta"]},
            {"path_prefix": "/entra/mcp", "providers": ["entra"]},
            {"path_prefix": "/both/mcp"}
        ]
    })
}

fn token(iss: &str, aud: &str, sub: &str) -> String {
    let now = (T0_MS / 1000) as i64;
    test_keys::sign(
        &json!({"alg": "RS256", "kid": "k1"}),
        &json!({"iss": iss, "aud": aud, "sub": sub, "scp": ["mcp:tools:call"],
                "iat": now, "exp": now + 3600, "jti": format!("jti-{sub}")}),
    )
}

fn send_to(w: &mut Worker, id: u32, path: &str, token: &str) -> Action {
    let auth = format!("Bearer {token}");
    w.send_headers(
        id,
        &[
            (":method", "POST"),
            (":path", path),
            ("authorization", &auth),
        ],
        true,
    )
}

fn key_fetches(w: &Worker) -> Vec<crate::fake_host::Callout> {
    w.host
        .callouts()
        .into_iter()
        .filter(|c| c.path().ends_with("/keys"))
        .collect()
}

fn assert_invalid_token(w: &Worker, id: u32) {
    let r = w.host.request(id);
    assert_eq!(r.fate, Fate::Replied(401));
    let challenge = r.reply_header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
}

#[test]
fn each_route_accepts_its_own_providers_tokens() {
    let mut w = Worker::first(&two_providers());
    w.tick(20);
    let fetch = key_fetches(&w).pop().expect("the entra keys are fetched");
    assert_eq!(fetch.cluster, "entra");
    assert_eq!(fetch.sdk_owner, ROOT);
    w.answer(&fetch, Some(200), &test_keys::jwks_json());

    send_to(&mut w, 1, "/mcp", &token(OKTA, "mcpserver", "olga"));
    send_to(&mut w, 2, "/entra/mcp", &token(ENTRA, "api://mcp", "emil"));
    send_to(&mut w, 3, "/both/mcp", &token(ENTRA, "api://mcp", "emma"));
    let calls = w.exchanges();
    assert_eq!(calls.len(), 3, "one exchange per accepted token");
    for (i, call) in calls.iter().enumerate() {
        w.answer(call, Some(200), &exchanged(&format!("backend-{i}")));
    }
    for id in 1..=3 {
        assert_eq!(w.host.fate(id), Fate::Forwarded, "request {id}");
        w.end(id);
    }
    w.tick(500);
    assert!(w.gw.is_idle());
}

#[test]
fn an_unknown_issuer_is_refused_without_any_key_work() {
    let mut w = Worker::first(&two_providers());
    // No key set is held for `entra` yet: a token naming another issuer must not fetch one,
    // wait for one, or reach an exchange.
    let stranger = token("https://evil.example.com/", "api://mcp", "mallory");
    assert_eq!(
        send_to(&mut w, 1, "/both/mcp", &stranger),
        Action::Pause,
        "answered locally"
    );
    assert_invalid_token(&w, 1);
    let prefix_of_a_real_issuer = token("https://login.microsoftonline.com/tenant-1/", "x", "m");
    send_to(&mut w, 2, "/both/mcp", &prefix_of_a_real_issuer);
    assert_invalid_token(&w, 2);
    assert!(w.exchanges().is_empty());
    assert_ne!(
        w.host.tick_period().as_millis(),
        20,
        "no fetch was asked for (that would speed the tick up)"
    );
    for id in [1, 2] {
        w.end(id);
    }
    assert!(w.gw.is_idle());
}

#[test]
fn a_route_refuses_tokens_of_providers_it_does_not_name_even_from_the_cache() {
    let mut w = Worker::first(&two_providers());
    let okta = token(OKTA, "mcpserver", "oscar");
    send_to(&mut w, 1, "/mcp", &okta);
    let call = w.exchanges().pop().expect("one exchange");
    w.answer(&call, Some(200), &exchanged("backend-oscar"));
    w.end(1);

    // The token is now verified and cached; `/entra/mcp` accepts only `entra`.
    send_to(&mut w, 2, "/entra/mcp", &okta);
    assert_invalid_token(&w, 2);
    w.end(2);
    // And before keys exist, an okta token on the entra route never waits for entra's keys.
    let fresh = token(OKTA, "mcpserver", "otto");
    send_to(&mut w, 3, "/entra/mcp", &fresh);
    assert_invalid_token(&w, 3);
    w.end(3);
    // The cached path still serves the route that accepts it.
    assert_eq!(send_to(&mut w, 4, "/mcp", &okta), Action::Continue);
    assert_eq!(w.authorization(4).as_deref(), Some("Bearer backend-oscar"));
    w.end(4);
    assert_eq!(w.exchanges().len(), 1);
}

#[test]
fn audiences_are_the_providers_unless_the_route_sets_its_own() {
    let mut cfg = two_providers();
    cfg["routes"][2]["audiences"] = json!(["shared"]);
    let mut w = Worker::first(&cfg);
    // `mcpserver` is okta's audience: good on `/mcp`, not on `/both/mcp` which wants `shared`.
    send_to(&mut w, 1, "/both/mcp", &token(OKTA, "mcpserver", "pia"));
    assert_invalid_token(&w, 1);
    // An okta token carrying entra's audience is not for okta's route.
    send_to(&mut w, 2, "/mcp", &token(OKTA, "api://mcp", "pete"));
    assert_invalid_token(&w, 2);
    send_to(&mut w, 3, "/both/mcp", &token(OKTA, "shared", "paul"));
    assert_eq!(w.host.fate(3), Fate::Waiting, "exchanging");
    for id in 1..=3 {
        w.end(id);
    }
}

#[test]
fn waiting_for_one_providers_keys_does_not_hold_up_another() {
    let mut w = Worker::first(&two_providers());
    send_to(&mut w, 1, "/entra/mcp", &token(ENTRA, "api://mcp", "erin"));
    assert_eq!(w.host.fate(1), Fate::Waiting, "parked for entra's keys");
    send_to(&mut w, 2, "/mcp", &token(OKTA, "mcpserver", "owen"));
    let call = w.exchanges().pop().expect("okta's request goes on at once");
    w.answer(&call, Some(200), &exchanged("backend-owen"));
    assert_eq!(w.host.fate(2), Fate::Forwarded);

    w.tick(20);
    let fetch = key_fetches(&w).pop().expect("entra's keys");
    assert_eq!(fetch.path(), "/tenant-1/discovery/v2.0/keys");
    w.answer(&fetch, Some(200), &test_keys::jwks_json());
    w.tick(20);
    let calls = w.exchanges();
    assert_eq!(calls.len(), 2);
    w.answer(&calls[1], Some(200), &exchanged("backend-erin"));
    assert_eq!(w.host.fate(1), Fate::Forwarded);
    for id in [1, 2] {
        w.end(id);
    }
    w.tick(500);
    assert!(w.gw.is_idle());
}

/// Both providers with fetched keys, each its own cluster and refetch throttle.
fn two_remote() -> Value {
    let mut cfg = two_providers();
    cfg["providers"]["okta"]["jwks"] = json!({"cluster": "okta", "path": "/oauth2/mcp/v1/keys",
        "max_wait_ms": 2000, "min_refetch_interval_seconds": 30});
    cfg
}

fn unknown_kid(iss: &str, aud: &str) -> String {
    let now = (T0_MS / 1000) as i64;
    test_keys::sign(
        &json!({"alg": "RS256", "kid": "k9"}),
        &json!({"iss": iss, "aud": aud, "sub": "u", "scp": ["mcp:tools:call"], "exp": now + 60}),
    )
}

#[test]
fn refetch_throttles_are_per_provider() {
    let mut w = Worker::first(&two_remote());
    w.tick(20);
    let first = key_fetches(&w);
    assert_eq!(first.len(), 2, "each provider fetches its own keys");
    for f in &first {
        w.answer(f, Some(200), &test_keys::jwks_json());
    }
    w.tick(31_000);
    // An unknown kid at okta refetches okta's keys, and only those.
    send_to(&mut w, 1, "/mcp", &unknown_kid(OKTA, "mcpserver"));
    w.tick(20);
    let fetches = key_fetches(&w);
    assert_eq!(fetches.len(), 3);
    assert_eq!(fetches[2].path(), "/oauth2/mcp/v1/keys");
    w.answer(&fetches[2], Some(200), &test_keys::jwks_json());
    assert_invalid_token(&w, 1);
    // okta's throttle is spent; entra's is not: an unknown kid there still refetches.
    send_to(&mut w, 2, "/mcp", &unknown_kid(OKTA, "mcpserver"));
    assert_invalid_token(&w, 2);
    send_to(&mut w, 3, "/entra/mcp", &unknown_kid(ENTRA, "api://mcp"));
    assert_eq!(w.host.fate(3), Fate::Waiting, "parked for entra's refetch");
    w.tick(20);
    let fetches = key_fetches(&w);
    assert_eq!(fetches.len(), 4);
    assert_eq!(fetches[3].path(), "/tenant-1/discovery/v2.0/keys");
    w.answer(&fetches[3], Some(200), &test_keys::jwks_json());
    assert_invalid_token(&w, 3);
    for id in 1..=3 {
        w.end(id);
    }
    assert!(w.gw.is_idle());
}

#[test]
fn an_unknown_kid_refetches_only_its_providers_keys() {
    let mut w = Worker::first(&two_providers());
    w.tick(20);
    let first = key_fetches(&w).pop().expect("entra's first fetch");
    w.answer(&first, Some(200), &test_keys::jwks_json());
    // Okta's keys are inline: an unknown kid there is final, with no fetch of anyone's keys.
    let now = (T0_MS / 1000) as i64;
    let unknown_kid = test_keys::sign(
        &json!({"alg": "RS256", "kid": "k9"}),
        &json!({"iss": OKTA, "aud": "mcpserver", "sub": "u", "exp": now + 60}),
    );
    send_to(&mut w, 1, "/mcp", &unknown_kid);
    assert_invalid_token(&w, 1);
    w.tick(20);
    assert_eq!(key_fetches(&w).len(), 1, "no fetch for inline keys");
    w.end(1);
}

/// An Entra ID v2 access token as documented: `scp` a space-separated string, `roles` an array,
/// the client in `azp`, header `typ: JWT`.
fn entra_token(claims: Value) -> String {
    let now = (T0_MS / 1000) as i64;
    let mut c = json!({"iss": ENTRA, "aud": "api://mcp", "sub": "entra-sub", "ver": "2.0",
                       "tid": "tenant-1", "oid": "00000000-0000-0000-0000-000000000001",
                       "azp": "vscode-app", "iat": now, "exp": now + 3600});
    for (k, v) in claims.as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    test_keys::sign(&json!({"alg": "RS256", "kid": "k1", "typ": "JWT"}), &c)
}

fn with_entra_keys(cfg: &Value) -> Worker {
    let mut w = Worker::first(cfg);
    w.tick(20);
    let fetch = key_fetches(&w).pop().expect("entra's keys");
    w.answer(&fetch, Some(200), &test_keys::jwks_json());
    w
}

#[test]
fn entra_shaped_scopes_and_client_are_read_by_the_providers_rules() {
    let mut cfg = two_providers();
    cfg["providers"]["entra"]["claims"] =
        json!({"scopes": ["scp", "roles"], "client_id": ["azp", "appid"]});
    cfg["identity_headers"] = json!({"x-client": "client_id", "x-scopes": "scope"});
    let mut w = with_entra_keys(&cfg);
    send_to(
        &mut w,
        1,
        "/entra/mcp",
        &entra_token(json!({"scp": "User.Read mcp:tools:call"})),
    );
    let call = w.exchanges().pop().expect("the Entra-shaped token passes");
    w.answer(&call, Some(200), &exchanged("backend-entra"));
    let r = w.host.request(1);
    assert_eq!(r.fate, Fate::Forwarded);
    assert_eq!(r.header("x-client"), Some("vscode-app"));
    assert_eq!(r.header("x-scopes"), Some("User.Read mcp:tools:call"));
    // An app-only token: its app roles are its scopes.
    send_to(
        &mut w,
        2,
        "/entra/mcp",
        &entra_token(json!({"roles": ["mcp:tools:call"]})),
    );
    assert_eq!(w.exchanges().len(), 2);
    // Without the scope, 403 insufficient_scope (not a malformed token).
    send_to(
        &mut w,
        3,
        "/entra/mcp",
        &entra_token(json!({"scp": "User.Read"})),
    );
    assert_eq!(w.host.fate(3), Fate::Replied(403));
    for id in 1..=3 {
        w.end(id);
    }
}

#[test]
fn a_provider_that_requires_at_jwt_refuses_plain_jwts() {
    let mut cfg = two_providers();
    cfg["providers"]["entra"]["typ"] = json!("at+jwt");
    let mut w = with_entra_keys(&cfg);
    send_to(
        &mut w,
        1,
        "/entra/mcp",
        &entra_token(json!({"scp": "mcp:tools:call"})),
    );
    assert_invalid_token(&w, 1);
    // The other provider does not require it.
    send_to(&mut w, 2, "/mcp", &token(OKTA, "mcpserver", "olaf"));
    assert_eq!(w.exchanges().len(), 1);
    for id in [1, 2] {
        w.end(id);
    }
}

/// The `entra` provider's tokens exchanged by Entra ID's on-behalf-of flow.
fn entra_obo() -> Value {
    let mut cfg = two_providers();
    cfg["providers"]["entra"]["claims"] = json!({"scopes": ["scp"], "client_id": ["azp"]});
    cfg["routes"][1]["exchange"] = json!({
        "profile": "entra_obo", "cluster": "entra", "path": "/tenant-1/oauth2/v2.0/token",
        "authority": "login.microsoftonline.com", "audience": null,
        "scope": "api://backend/.default"
    });
    cfg
}

fn obo_requests(w: &Worker) -> Vec<crate::fake_host::Callout> {
    w.host
        .callouts()
        .into_iter()
        .filter(|c| c.path().ends_with("/oauth2/v2.0/token"))
        .collect()
}

#[test]
fn an_entra_token_is_exchanged_on_behalf_of_the_user() {
    let mut w = with_entra_keys(&entra_obo());
    let user = entra_token(json!({"scp": "mcp:tools:call"}));
    send_to(&mut w, 1, "/entra/mcp", &user);
    let call = obo_requests(&w).pop().expect("no OBO request");
    assert_eq!(call.cluster, "entra");
    assert_eq!(call.path(), "/tenant-1/oauth2/v2.0/token");
    let form = String::from_utf8_lossy(&call.body).into_owned();
    assert!(form.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"));
    assert!(form.contains(&format!("assertion={user}")));
    assert!(form.contains("requested_token_use=on_behalf_of"));
    let reply = json!({"token_type": "Bearer", "scope": "api://backend/read",
                       "expires_in": 3599, "access_token": "backend-for-entra"});
    w.answer(&call, Some(200), &reply.to_string());
    assert_eq!(
        w.authorization(1).as_deref(),
        Some("Bearer backend-for-entra")
    );
    w.end(1);
    // Cached like any exchanged token.
    assert_eq!(send_to(&mut w, 2, "/entra/mcp", &user), Action::Continue);
    w.end(2);
}

#[test]
fn a_conditional_access_challenge_sends_the_user_back_with_the_claims() {
    let mut w = with_entra_keys(&entra_obo());
    send_to(
        &mut w,
        1,
        "/entra/mcp",
        &entra_token(json!({"scp": "mcp:tools:call"})),
    );
    let call = obo_requests(&w).pop().expect("no OBO request");
    let claims = r#"{"access_token":{"capolids":{"essential":true,"values":["p1"]}}}"#;
    let error = json!({"error": "interaction_required",
        "error_description": "AADSTS50079: Due to a configuration change ... must enroll in MFA",
        "error_codes": [50079], "claims": claims});
    w.answer(&call, Some(400), &error.to_string());
    let r = w.host.request(1);
    assert_eq!(r.fate, Fate::Replied(401), "the user's to fix, not a 502");
    let challenge = r.reply_header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_claims\""),
        "{challenge}"
    );
    assert!(challenge.contains("claims=\""), "{challenge}");
    w.end(1);
}

/// `okta` also introspects opaque tokens (RFC 7662) at its introspection endpoint.
fn introspecting() -> Value {
    let mut cfg = two_providers();
    cfg["providers"]["okta"]["introspection"] = json!({
        "cluster": "okta", "path": "/oauth2/mcp/v1/introspect", "authority": "okta.example.com",
        "client_id": "gw", "client_secret_env": "SECRET", "cache_max_seconds": 60
    });
    cfg
}

fn introspections(w: &Worker) -> Vec<crate::fake_host::Callout> {
    w.host
        .callouts()
        .into_iter()
        .filter(|c| c.path().ends_with("/introspect"))
        .collect()
}

fn active(sub: &str) -> String {
    let now = (T0_MS / 1000) as i64;
    json!({"active": true, "sub": sub, "scope": "mcp:tools:call", "client_id": "vscode",
           "aud": "mcpserver", "exp": now + 3600, "iss": OKTA, "token_type": "Bearer"})
    .to_string()
}

#[test]
fn requests_with_one_opaque_token_share_one_introspection_from_the_root_context() {
    let mut w = Worker::first(&introspecting());
    assert_eq!(send_to(&mut w, 1, "/mcp", "opaque-token-1"), Action::Pause);
    assert_eq!(send_to(&mut w, 2, "/mcp", "opaque-token-1"), Action::Pause);
    assert!(
        introspections(&w).is_empty(),
        "dispatched from the tick, not a request's callback"
    );
    w.tick(20);
    let calls = introspections(&w);
    assert_eq!(calls.len(), 1, "coalesced");
    assert_eq!(calls[0].sdk_owner, ROOT);
    assert_eq!(calls[0].envoy_owner, ROOT);
    let form = String::from_utf8_lossy(&calls[0].body).into_owned();
    assert_eq!(form, "token=opaque-token-1&token_type_hint=access_token");
    w.answer(&calls[0], Some(200), &active("ann"));
    w.tick(20);
    let exchange = w
        .exchanges()
        .pop()
        .expect("the principal goes on to its exchange");
    assert!(String::from_utf8_lossy(&exchange.body).contains("subject_token=opaque-token-1"));
    w.answer(&exchange, Some(200), &exchanged("backend-ann"));
    for id in [1, 2] {
        assert_eq!(w.host.fate(id), Fate::Forwarded, "request {id}");
        w.end(id);
    }
    // Kept: no second introspection within cache_max_seconds…
    send_to(&mut w, 3, "/mcp", "opaque-token-1");
    assert_eq!(
        w.host.fate(3),
        Fate::Forwarded,
        "{:?}",
        w.host.request(3).reply_body
    );
    assert_eq!(w.authorization(3).as_deref(), Some("Bearer backend-ann"));
    w.end(3);
    assert_eq!(introspections(&w).len(), 1);
    // …and asked again after it, though the token's exp is an hour away.
    w.tick(61_000);
    send_to(&mut w, 4, "/mcp", "opaque-token-1");
    w.tick(20);
    assert_eq!(introspections(&w).len(), 2);
    w.end(4);
    w.tick(6_500);
    assert!(w.gw.is_idle());
}

#[test]
fn an_inactive_or_unusable_answer_is_never_a_pass() {
    let mut w = Worker::first(&introspecting());
    let cases = [
        (r#"{"active": false}"#, 401),
        ("<html>sign in</html>", 502),
        (r#"{"sub": "ann"}"#, 502),
        (r#"{"active": "true", "sub": "ann"}"#, 502),
        (r#"{"active": true}"#, 401),
    ];
    for (i, (body, status)) in cases.iter().enumerate() {
        let id = i as u32 + 1;
        send_to(&mut w, id, "/mcp", &format!("opaque-{id}"));
        w.tick(20);
        let call = introspections(&w).pop().expect("introspected");
        w.answer(&call, Some(200), body);
        assert_eq!(w.host.fate(id), Fate::Replied(*status), "{body}");
        w.end(id);
    }
    assert!(w.exchanges().is_empty());
    // A route that does not accept the introspecting provider never introspects.
    send_to(&mut w, 10, "/entra/mcp", "opaque-10");
    assert_invalid_token(&w, 10);
    w.end(10);
    w.tick(20);
    assert_eq!(introspections(&w).len(), cases.len());
    assert!(w.gw.is_idle());
}

#[test]
fn a_client_gone_before_the_tick_leaves_no_introspection_behind() {
    let mut w = Worker::first(&introspecting());
    send_to(&mut w, 1, "/mcp", "opaque-gone");
    w.abandon(1);
    w.tick(20);
    assert!(introspections(&w).is_empty());
    assert!(w.gw.is_idle());
}
