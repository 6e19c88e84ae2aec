//! An adversarial corpus through a real Envoy: several hundred individually named requests to
//! `/mcp` that must all be refused with the right RFC 6750 answer, after which nothing reached the
//! upstream, nothing was exchanged, Envoy still runs with no trapped VM, and a good client still
//! gets through.
//!
//! Requests are written to the socket by hand ([`raw_http`]), so headers can be exactly as
//! malformed as an attacker makes them. The corpus is built by category ([`corpus`]) from tokens
//! made by [`forge`], and every answer is checked against its [`expect::Expect`].

mod corpus;
mod expect;
mod forge;
mod idp_errors;
mod introspection_answers;
mod raw_http;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::client::{bearer, jsonrpc_post};
use gateway_tests::harness::{Stack, StackOptions, CLIENT_ID, CLIENT_SECRET};
use gateway_tests::idp::{AuthServerConfig, Endpoint, Fault, IdpConfig, MintRequest};
use gateway_tests::mcp;
use serde_json::{json, Map, Value};

use corpus::{bearer_header, build_corpus, Case};
use expect::{check, Expect};
use forge::{claims_of, Forge};
use raw_http::send_raw;

type Result<T = ()> = anyhow::Result<T>;

/// A listener that counts connections: a `jku`/`x5u` pointing here must never be followed.
async fn attacker_listener() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/keys", listener.local_addr()?);
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    Ok((url, hits))
}

/// What sending the corpus came to.
struct Sent {
    /// One line per case that got the wrong answer, failed, or reached the upstream.
    failures: Vec<String>,
    /// Cases answered 2xx.
    accepted: usize,
    /// The slowest case and how long it took.
    slowest: (Duration, String),
}

/// Sends every case, one after the other, and checks each answer.
async fn send_all(stack: &Stack, cases: &[Case]) -> Sent {
    let mut failures = Vec::new();
    let mut accepted = 0;
    let mut slowest = (Duration::ZERO, String::new());
    let mut upstream_seen = 0;
    for case in cases {
        let started = std::time::Instant::now();
        let answer = send_raw(stack.envoy.port, &case.path, &case.headers).await;
        if started.elapsed() > slowest.0 {
            slowest = (started.elapsed(), case.name.clone());
        }
        if started.elapsed() > Duration::from_millis(300) {
            eprintln!("slow case {:?}: {:?}", case.name, started.elapsed());
        }
        let upstream_now = stack.upstream.seen_requests().len();
        if upstream_now > upstream_seen {
            failures.push(format!("{}: reached the upstream", case.name));
            upstream_seen = upstream_now;
        }
        match answer {
            Ok(a) => {
                if (200..300).contains(&a.status) {
                    accepted += 1;
                }
                if let Err(why) = check(&a, case.expect) {
                    failures.push(format!("{}: {why}", case.name));
                }
            }
            Err(e) => failures.push(format!("{}: request failed: {e:#}", case.name)),
        }
    }
    Sent {
        failures,
        accepted,
        slowest,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_corpus_is_refused_and_the_gateway_keeps_serving() -> Result {
    // An unknown kid may trigger a JWKS refetch at most once a second here (the default 30 s
    // would keep the rotated key out of reach for half a minute).
    let mut stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"min_refetch_interval_seconds": 1}}),
        ..StackOptions::default()
    })
    .await?;
    // Two published keys, so that a token without `kid` is ambiguous.
    let kid = stack.idp.rotate_key("mcp");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = stack.mint(&MintRequest {
        aud: Some("not-for-us".into()),
        ..MintRequest::default()
    });
    let a = send_raw(stack.envoy.port, "/mcp", &bearer_header(&probe)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    stack
        .wait_for_log("JWKS loaded: 2 key(s)", Duration::from_secs(10))
        .await?;

    let (attacker_url, attacker_hits) = attacker_listener().await?;
    let forge = Forge {
        stack: &stack,
        kid: kid.clone(),
    };
    let corpus = build_corpus(&forge, &attacker_url);
    let total = corpus.cases.len();
    assert!(total >= 150, "only {total} cases");

    let Sent {
        failures,
        accepted,
        slowest,
    } = send_all(&stack, &corpus.cases).await;
    eprintln!(
        "adversarial corpus: {total} cases, {} failed; slowest {:?} ({:?})",
        failures.len(),
        slowest.1,
        slowest.0
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases got the wrong answer:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert_eq!(accepted, 0, "accepted requests");
    assert!(
        stack.upstream.seen_requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        stack
            .upstream
            .seen_requests()
            .iter()
            .map(|r| (
                r.path.clone(),
                r.header("authorization")
                    .map(|a| a.chars().take(60).collect::<String>())
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        stack.idp.exchange_count(),
        0,
        "a refused token was exchanged"
    );
    assert_eq!(
        attacker_hits.load(Ordering::SeqCst),
        0,
        "a jku/x5u was followed"
    );
    assert_eq!(
        stack.idp.keys_fetch_count("backend"),
        0,
        "another AS's JWKS was fetched (jku followed)"
    );
    assert!(stack.envoy.is_running(), "Envoy died");
    assert!(
        !stack.envoy.vm_trapped(),
        "the Wasm VM trapped:\n{}",
        stack.envoy.log_tail(40)
    );

    // And a real client still gets through.
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    assert_eq!(stack.idp.exchange_count(), 1);
    Ok(())
}

/// Two providers on one listener (`okta` = AS `mcp` on `/mcp`, `partner` = AS `partner` on
/// `/partner/mcp`): tokens that lie about their issuer, or carry the other provider's, are all
/// refused, and nothing is exchanged or forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_played_across_providers_are_refused() -> Result {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.authorization_servers.push(AuthServerConfig {
        id: "partner".into(),
        audience: "partner-mcp".into(),
        scopes: vec!["mcp:tools:call".into()],
        trusted_servers: vec![],
        exchange_policies: vec![],
    });
    let provider = |as_id: &str, audience: &str| {
        json!({"issuer": format!("{{idp}}/oauth2/{as_id}"), "audiences": [audience],
               "jwks": {"cluster": "okta", "path": format!("/oauth2/{as_id}/v1/keys"),
                        "min_refetch_interval_seconds": 1}})
    };
    let mut partner = provider("partner", "partner-mcp");
    partner["claims"] = json!({"scopes": ["scp", "roles"], "client_id": ["azp"]});
    partner["typ"] = json!("at+jwt");
    let mut stack = Stack::start_with(StackOptions {
        idp,
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null, "resource": null,
            "providers": {"okta": provider("mcp", "mcpserver"),
                          "partner": partner},
            "routes": [{"path_prefix": "/mcp", "providers": ["okta"]},
                       {"path_prefix": "/partner/mcp", "providers": ["partner"]}]
        }),
        ..StackOptions::default()
    })
    .await?;
    let forge = Forge {
        stack: &stack,
        kid: stack.idp.kid("mcp"),
    };
    let mut corpus = corpus::Corpus { cases: Vec::new() };
    corpus::providers::across_providers(&mut corpus, &forge);
    corpus::providers::claim_shapes(&mut corpus, &forge);
    assert!(
        corpus.cases.len() >= 30,
        "only {} cases",
        corpus.cases.len()
    );
    let Sent {
        failures, accepted, ..
    } = send_all(&stack, &corpus.cases).await;
    assert!(
        failures.is_empty(),
        "{} cases got the wrong answer:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert_eq!(accepted, 0, "accepted requests");
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(
        stack.idp.exchange_count(),
        0,
        "a refused token was exchanged"
    );
    assert!(stack.envoy.is_running() && !stack.envoy.vm_trapped());
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    // A well-formed partner token gets past verification to its exchange: the cases above were
    // refused for what each broke, not for being partner tokens.
    let mut claims = claims_of(&stack.user_token());
    claims.insert("iss".into(), json!(stack.idp.issuer("partner")));
    claims.insert("aud".into(), json!("partner-mcp"));
    claims.insert("scp".into(), json!("mcp:tools:call"));
    let header = json!({"kid": stack.idp.kid("partner"), "alg": "RS256", "typ": "at+jwt"});
    let good = stack.idp.sign_raw(
        "partner",
        header.to_string().as_bytes(),
        Value::Object(claims).to_string().as_bytes(),
    )?;
    send_raw(stack.envoy.port, "/partner/mcp", &bearer_header(&good)).await?;
    assert_eq!(
        stack.idp.exchange_count(),
        2,
        "the good partner token was exchanged"
    );
    Ok(())
}

/// Hostile token-endpoint error bodies (`idp_errors`): each gets its row of the answer table,
/// a claims challenge only ever reaches the client base64-encoded, nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_token_endpoint_errors_get_table_answers() -> Result {
    let mut stack = Stack::start().await?;
    let mut failures = Vec::new();
    for (i, (name, status, body, expect)) in
        idp_errors::hostile_error_bodies().into_iter().enumerate()
    {
        stack.idp.set_fault(
            Endpoint::Token,
            Fault::Respond {
                status,
                content_type: "application/json".into(),
                body,
            },
        );
        // A token of its own per case: a failure is shared for its token's failure window.
        let token = stack.mint(&MintRequest {
            sub: format!("hostile-{i}@example.com"),
            ..MintRequest::default()
        });
        let a = send_raw(stack.envoy.port, "/mcp", &bearer_header(&token)).await?;
        let challenge = a.header("www-authenticate").unwrap_or_default().to_string();
        let claims_ok = challenge.split("claims=\"").nth(1).is_none_or(|rest| {
            rest.split('"').next().is_some_and(|v| {
                v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
            })
        });
        if a.status != expect || !claims_ok || a.header("x-injected").is_some() {
            failures.push(format!("{name}: {} {challenge} {}", a.status, a.body));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(stack.upstream.seen_requests().is_empty());
    assert!(stack.envoy.is_running() && !stack.envoy.vm_trapped());
    stack.idp.clear_faults();
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    Ok(())
}

/// Hostile introspection answers for opaque tokens (introspection_answers.rs): each gets its
/// table answer, nothing reaches the upstream or the exchange, the VM survives, and a good
/// opaque token and a JWT still pass afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_introspection_answers_get_table_answers() -> Result {
    let mut stack = Stack::start_with(StackOptions {
        plugin_patch: json!({
            "issuer": null, "audiences": null, "jwks": null,
            "providers": {"okta": {
                "issuer": "{idp}/oauth2/mcp", "audiences": ["mcpserver"],
                "jwks": {"cluster": "okta", "path": "/oauth2/mcp/v1/keys"},
                "introspection": {"cluster": "okta", "path": "/oauth2/mcp/v1/introspect",
                                  "client_id": CLIENT_ID,
                                  "client_secret_env": "TOKEN_EXCHANGE_CLIENT_SECRET"}
            }}
        }),
        ..StackOptions::default()
    })
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let cases = introspection_answers::hostile_answers(&stack.idp.issuer("mcp"), now);
    let mut failures = Vec::new();
    for (name, status, body, expect) in &cases {
        stack.idp.set_fault(
            Endpoint::Introspect,
            Fault::Respond {
                status: *status,
                content_type: "application/json".into(),
                body: body.clone(),
            },
        );
        // A token of its own per case: nothing cached from the case before.
        let token = stack.idp.mint_opaque(&MintRequest::default())?;
        let a = send_raw(stack.envoy.port, "/mcp", &bearer_header(&token)).await?;
        let challenge = a.header("www-authenticate").unwrap_or_default().to_string();
        let error_ok = match expect {
            401 => challenge.contains("error=\"invalid_token\""),
            403 => challenge.contains("error=\"insufficient_scope\""),
            _ => challenge.is_empty(),
        };
        if a.status != *expect || !error_ok {
            failures.push(format!("{name}: {} {challenge} {}", a.status, a.body));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        stack.idp.introspection_count(),
        cases.len() as u64,
        "each answer was asked for"
    );
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(stack.idp.exchange_count(), 0);
    assert!(stack.envoy.is_running() && !stack.envoy.vm_trapped());
    stack.idp.clear_faults();
    let opaque = stack.idp.mint_opaque(&MintRequest::default())?;
    assert_eq!(
        mcp::whoami(&stack.mcp_url(), &opaque).await?.sub,
        "user@example.com"
    );
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    Ok(())
}

/// RFC 6750 §3.1 / MCP: more than one `Authorization` header is a malformed request (400
/// `invalid_request`). Envoy presents repeated `Authorization` headers to the filter as ONE value
/// joined with "," (an inline header in Envoy's header map); the filter must still see two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_invalid_request() -> Result {
    let stack = Stack::start().await?;
    let good = stack.user_token();
    let auth = |v: String| ("Authorization".to_string(), v.into_bytes());
    for (name, headers) in [
        (
            "two identical",
            vec![
                auth(format!("Bearer {good}")),
                auth(format!("Bearer {good}")),
            ],
        ),
        (
            "Bearer then Basic",
            vec![auth(format!("Bearer {good}")), auth("Basic dTpw".into())],
        ),
        (
            "Basic then Bearer",
            vec![auth("Basic dTpw".into()), auth(format!("Bearer {good}"))],
        ),
        (
            "names differing in case",
            vec![
                (
                    "authorization".into(),
                    format!("Bearer {good}").into_bytes(),
                ),
                ("AUTHORIZATION".into(), b"Bearer other".to_vec()),
            ],
        ),
    ] {
        let a = send_raw(stack.envoy.port, "/mcp", &headers).await?;
        check(&a, Expect::InvalidRequest).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    Ok(())
}

/// Base64url text of `n` bytes is `ceil(4n/3)` characters long.
fn b64_len(n: usize) -> usize {
    (4 * n).div_ceil(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_max_token_bytes_is_enforced_at_the_byte() -> Result {
    const LIMIT: usize = 1024;
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"max_token_bytes": LIMIT}),
        ..StackOptions::default()
    })
    .await?;
    let kid = stack.idp.kid("mcp");
    let claims = Value::Object(claims_of(&stack.user_token()));
    // Pads the header and the claims with JSON whitespace until the token is exactly `len` long.
    let exactly = |len: usize| -> String {
        let sig_len = b64_len(256);
        for hpad in 0..4 {
            let header = format!(
                "{{\"kid\":\"{kid}\",{}\"alg\":\"RS256\"}}",
                " ".repeat(hpad)
            );
            let claims_text = claims.to_string();
            let fixed = b64_len(header.len()) + 2 + sig_len;
            for ppad in 0..1024 {
                if fixed + b64_len(claims_text.len() + ppad) == len {
                    let padded = claims_text.replacen('{', &format!("{{{}", " ".repeat(ppad)), 1);
                    let t = stack
                        .idp
                        .sign_raw("mcp", header.as_bytes(), padded.as_bytes())
                        .expect("sign_raw");
                    assert_eq!(t.len(), len);
                    return t;
                }
            }
        }
        panic!("cannot build a token of {len} bytes");
    };
    let over = exactly(LIMIT + 1);
    let a = send_raw(stack.envoy.port, "/mcp", &bearer_header(&over)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    assert!(a.body.contains("too large"), "{}", a.body);
    let far_over = exactly(LIMIT + 700);
    let a = send_raw(stack.envoy.port, "/mcp", &bearer_header(&far_over)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(stack.idp.exchange_count(), 0);

    // Exactly at the limit is fine: a real client gets through with it.
    let at = exactly(LIMIT);
    let who = mcp::whoami(&stack.mcp_url(), &at).await?;
    assert_eq!(who.sub, "user@example.com");
    Ok(())
}

/// The backend token the upstream received on its last request, and its claims.
fn upstream_bearer(stack: &Stack) -> (String, Map<String, Value>) {
    let seen = stack.upstream.seen_requests();
    let last = seen.last().expect("the upstream saw a request");
    let auth = last.header_values("authorization");
    assert_eq!(
        auth.len(),
        1,
        "exactly one Authorization upstream: {auth:?}"
    );
    let token = last.bearer().expect("a bearer token upstream").to_string();
    let claims = claims_of(&token);
    (token, claims)
}

async fn post_initialize(
    stack: &Stack,
    authorization: &str,
    extra: &[(&str, &str)],
) -> Result<reqwest::StatusCode> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "adversarial", "version": "1"}}});
    let mut req = jsonrpc_post(&stack.mcp_url(), Some(authorization), body.to_string());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    Ok(req.send().await?.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme_case_and_spacing_are_accepted_and_smuggled_tokens_are_ignored() -> Result {
    let stack = Stack::start().await?;
    let inbound = stack.user_token();
    let backend_issuer = stack.idp.issuer("backend");

    // RFC 6750 / RFC 7235: the scheme is case-insensitive and 1*SP separates it from the token.
    for (what, value) in [
        ("lower-case bearer", format!("bearer {inbound}")),
        ("upper-case BEARER", format!("BEARER {inbound}")),
        ("mixed-case BeArEr", format!("BeArEr {inbound}")),
        (
            "several spaces after the scheme",
            format!("Bearer    {inbound}"),
        ),
    ] {
        let status = post_initialize(&stack, &value, &[]).await?;
        assert!(status.is_success(), "{what}: {status}");
        let (token, claims) = upstream_bearer(&stack);
        assert_ne!(token, inbound, "{what}: the inbound token went upstream");
        assert_eq!(claims["iss"], json!(backend_issuer), "{what}");
        assert_eq!(claims["sub"], json!("user@example.com"), "{what}");
    }

    // A client that brings its own upstream credentials in side headers: a real backend token for
    // another user, and the gateway's headers' usual names. The upstream must still get exactly
    // the exchanged token of the caller in Authorization.
    let mallory_backend = stack.mint(&MintRequest {
        as_id: "backend".into(),
        sub: "mallory@example.com".into(),
        scopes: vec!["backend-api:read".into(), "backend-api:write".into()],
        ..MintRequest::default()
    });
    let smuggled: Vec<(&str, String)> = vec![
        ("x-forwarded-access-token", mallory_backend.clone()),
        ("x-auth-request-access-token", mallory_backend.clone()),
        ("x-amzn-oidc-accesstoken", mallory_backend.clone()),
        (
            "x-forwarded-authorization",
            format!("Bearer {mallory_backend}"),
        ),
        (
            "x-original-authorization",
            format!("Bearer {mallory_backend}"),
        ),
        ("proxy-authorization", format!("Bearer {mallory_backend}")),
        ("x-id-token", mallory_backend.clone()),
    ];
    let extra: Vec<(&str, &str)> = smuggled.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let expected_backend = upstream_bearer(&stack).0;
    let status = post_initialize(&stack, &bearer(&inbound), &extra).await?;
    assert!(status.is_success(), "{status}");
    let (token, claims) = upstream_bearer(&stack);
    assert_eq!(
        token, expected_backend,
        "the exchanged (cached) token, nothing else"
    );
    assert_ne!(token, mallory_backend);
    assert_eq!(claims["sub"], json!("user@example.com"));
    assert_eq!(claims["aud"], json!("backend"));

    // The same through a full MCP session with a fresh token (a new exchange).
    let fresh = stack.mint(&MintRequest {
        sub: "carol@example.com".into(),
        ..MintRequest::default()
    });
    let status = post_initialize(&stack, &bearer(&fresh), &extra).await?;
    assert!(status.is_success(), "{status}");
    let (token, claims) = upstream_bearer(&stack);
    assert_ne!(token, mallory_backend);
    assert_ne!(token, fresh);
    assert_eq!(claims["sub"], json!("carol@example.com"));
    assert_eq!(claims["iss"], json!(backend_issuer));
    for r in stack.upstream.seen_requests() {
        for (name, value) in &r.headers {
            assert!(
                !value.contains(&inbound) && !value.contains(&fresh),
                "an inbound token reached the upstream in {name}"
            );
        }
    }
    assert_eq!(stack.idp.exchange_count(), 2);
    Ok(())
}
