//! Live reconfiguration: Envoy reads the plugin configuration from a watched file (ECDS, as
//! Istio delivers a `WasmPlugin`; LDS, as Envoy Gateway and full-xDS control planes deliver a
//! listener), and the test rewrites it while a bounded concurrent loop sends requests.
//!
//! Every answer must be one the policy in force allows: a request sent after Envoy reported the
//! update is judged by the new policy only; one in flight across the swap by the old or the new.
//! "Through" means the MCP server received the request with a backend token it verified itself
//! (it then answers the loop's sessionless `tools/list` with 400 "Session ID is required") and
//! that token's `sub`, `scp` and `cid` are those the policy asks for. The IdP's recorded
//! exchanges show which exchanged tokens survive a reconfiguration (README "What a
//! reconfiguration keeps and drops").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::harness::{
    merge_patch, ConfigDelivery, Stack, StackOptions, CLIENT_ID, CLIENT_SECRET,
};
use gateway_tests::idp::{
    AuthServerConfig, ClientConfig, ExchangePolicy, IdpConfig, MintRequest, RecordedExchange,
};
use gateway_tests::load::{
    challenge_error, challenge_realm, claim_scopes, jwt_claims, seen_by_id, Load, LoadOptions,
    Pick, Shot,
};
use gateway_tests::mcp::SeenRequest;
use serde_json::{json, Value};

type Result<T = ()> = anyhow::Result<T>;

const CLIENT_2: &str = "gateway-client-2";
const SECRET_2: &str = "gw2-secret-0b5e77d1-never-log-me";
const SECRET_2_ENV: &str = "TOKEN_EXCHANGE_CLIENT_SECRET_2";
/// What the MCP server answers a sessionless `tools/list` once the backend token passed its
/// own check.
const UPSTREAM_STATUS: u16 = 400;
const READ: &str = "backend-api:read";
const READ_WRITE: &str = "backend-api:read backend-api:write";

/// The reference IdP plus a second inbound authorization server `mcp2` (same audience, so only
/// the gateway's `issuer`/`jwks` decide whether its tokens are accepted) and a second gateway
/// client allowed the same exchanges.
fn idp_config() -> IdpConfig {
    let mut idp = IdpConfig::reference(CLIENT_ID, CLIENT_SECRET);
    idp.log_requests = false;
    idp.authorization_servers.push(AuthServerConfig {
        id: "mcp2".into(),
        audience: "mcpserver".into(),
        scopes: vec!["mcp:tools:call".into()],
        trusted_servers: vec![],
        exchange_policies: vec![],
    });
    if let Some(backend) = idp.server_mut("backend") {
        backend.trusted_servers.push("mcp2".into());
        backend.exchange_policies.push(ExchangePolicy {
            client_id: CLIENT_2.into(),
            scopes: vec!["backend-api:read".into(), "backend-api:write".into()],
        });
    }
    idp.clients.push(ClientConfig {
        client_id: CLIENT_2.into(),
        client_secret: SECRET_2.into(),
        token_exchange_enabled: true,
        jwks: None,
    });
    idp
}

async fn start(delivery: ConfigDelivery) -> Result<Stack> {
    Stack::start_with(StackOptions {
        // A short timeout: a lost exchange would show as a 504 within the run.
        plugin_patch: json!({"exchange": {"timeout_ms": 1000}}),
        idp: idp_config(),
        concurrency: 2,
        config_delivery: delivery,
        extra_env: vec![(SECRET_2_ENV.into(), SECRET_2.into())],
        ..StackOptions::default()
    })
    .await
}

/// The kinds of request the loop sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// A valid token of the `mcp` authorization server.
    Mcp,
    /// A valid token of `mcp2`.
    Mcp2,
    /// A valid token of `mcp2` signed with the key `mcp2` rotated to (both stay published).
    Mcp2NewKey,
    Expired,
    WrongAudience,
    BadSignature,
    NoToken,
}

const KINDS: [Kind; 7] = [
    Kind::Mcp,
    Kind::Mcp2,
    Kind::Mcp2NewKey,
    Kind::Expired,
    Kind::WrongAudience,
    Kind::BadSignature,
    Kind::NoToken,
];

/// What a request should get under one policy.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    /// Forwarded with a backend token for `sub` with exactly these scopes, obtained by `cid`.
    Through { scopes: Vec<String>, cid: String },
    /// Refused by the filter with this status and challenge error (`None`: no `error`).
    Refused {
        status: u16,
        error: Option<&'static str>,
    },
}

/// One plugin configuration and what it means.
#[derive(Clone, Debug)]
struct Policy {
    name: &'static str,
    plugin: Value,
    realm: String,
    /// The kinds of token that pass.
    accepts: Vec<Kind>,
    scope: &'static str,
    client: &'static str,
    /// `Host` of the token request.
    authority: String,
}

impl Policy {
    fn expect(&self, kind: Kind) -> Expect {
        let invalid = Expect::Refused {
            status: 401,
            error: Some("invalid_token"),
        };
        match kind {
            k if self.accepts.contains(&k) => Expect::Through {
                scopes: self.scope.split(' ').map(str::to_string).collect(),
                cid: self.client.to_string(),
            },
            Kind::NoToken => Expect::Refused {
                status: 401,
                error: None,
            },
            _ => invalid,
        }
    }

    /// What the IdP sees of this policy's exchanges: (scope, client, host).
    fn target(&self) -> (String, String, String) {
        (
            self.scope.to_string(),
            self.client.to_string(),
            self.authority.clone(),
        )
    }
}

/// Every token the loop uses, by kind.
struct Tokens {
    by_kind: BTreeMap<Kind, Vec<String>>,
    /// `sub` of each token.
    sub: HashMap<String, String>,
}

fn tokens(stack: &Stack) -> Tokens {
    let mut by_kind = BTreeMap::new();
    let mut sub = HashMap::new();
    for kind in KINDS {
        if kind == Kind::Mcp2NewKey {
            // Every token of `mcp2` minted so far is signed with its first key.
            stack.idp.rotate_key("mcp2");
        }
        let n = match kind {
            Kind::Mcp => 6,
            Kind::Mcp2 => 3,
            Kind::Mcp2NewKey => 2,
            Kind::NoToken => 1,
            _ => 2,
        };
        let mut list = Vec::new();
        for i in 0..n {
            let user = format!("{kind:?}-{i}@example.com").to_lowercase();
            let mut req = MintRequest {
                sub: user.clone(),
                ..MintRequest::default()
            };
            match kind {
                Kind::Mcp2 | Kind::Mcp2NewKey => req.as_id = "mcp2".into(),
                Kind::Expired => req.ttl_secs = -600,
                Kind::WrongAudience => req.aud = Some("another-resource".into()),
                _ => {}
            }
            let token = match kind {
                Kind::NoToken => String::new(),
                Kind::BadSignature => {
                    let t = stack.mint(&req);
                    // Flip a character in the middle of the signature.
                    let mut b = t.into_bytes();
                    let at = b.len() - 20;
                    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
                    String::from_utf8(b).unwrap_or_default()
                }
                _ => stack.mint(&req),
            };
            sub.insert(token.clone(), user);
            list.push(token);
        }
        by_kind.insert(kind, list);
    }
    Tokens { by_kind, sub }
}

fn picker(tokens: &Tokens) -> gateway_tests::load::Picker {
    // Valid tokens of every issuer are the bulk; each invalid kind shows up regularly.
    let mut schedule: Vec<(usize, String)> = Vec::new();
    for (kind, list) in &tokens.by_kind {
        let idx = KINDS.iter().position(|k| k == kind).unwrap_or(0);
        let weight = match kind {
            Kind::Mcp => 3,
            _ => 1,
        };
        for _ in 0..weight {
            for t in list {
                schedule.push((idx, t.clone()));
            }
        }
    }
    let schedule = Arc::new(schedule);
    Arc::new(move |seq| {
        let (kind, token) = schedule[(seq as usize * 7) % schedule.len()].clone();
        Pick {
            kind,
            token: (!token.is_empty()).then_some(token),
            headers: Vec::new(),
        }
    })
}

/// A policy's moment: when its file was written and when Envoy reported taking it.
struct Epoch {
    policy: Policy,
    pushed: Instant,
    applied: Instant,
    /// Exchanges the IdP had recorded when the file was written.
    exchanges_at_push: usize,
}

/// Why a shot's answer is not what any policy in force allowed.
fn judge(
    shot: &Shot,
    epochs: &[Epoch],
    seen: &HashMap<u64, SeenRequest>,
    tokens: &Tokens,
) -> std::result::Result<usize, String> {
    let kind = KINDS[shot.kind];
    // Policies that may have decided: the one Envoy had taken when the request was sent, up to
    // the last one written before its answer came.
    let first = epochs
        .iter()
        .rposition(|e| e.applied <= shot.sent)
        .unwrap_or(0);
    let last = epochs
        .iter()
        .rposition(|e| e.pushed <= shot.done)
        .unwrap_or(0)
        .max(first);
    let upstream = seen.get(&shot.id);
    let mut why = Vec::new();
    for (i, epoch) in epochs.iter().enumerate().take(last + 1).skip(first) {
        let verdict = match (epoch.policy.expect(kind), upstream) {
            (Expect::Through { scopes, cid }, Some(req)) => {
                let backend = req.bearer().unwrap_or_default();
                let claims = jwt_claims(backend).unwrap_or(Value::Null);
                if shot.status != UPSTREAM_STATUS {
                    Err(format!("status {} (upstream)", shot.status))
                } else if backend == shot.token {
                    Err("the client's token reached the upstream".into())
                } else if claim_scopes(&claims) != scopes {
                    Err(format!("backend scopes {:?}", claim_scopes(&claims)))
                } else if claims["cid"] != cid.as_str() {
                    Err(format!("backend cid {}", claims["cid"]))
                } else if claims["sub"].as_str() != tokens.sub.get(&shot.token).map(String::as_str)
                {
                    Err(format!("backend sub {}", claims["sub"]))
                } else {
                    Ok(())
                }
            }
            (Expect::Through { .. }, None) => Err(format!(
                "not forwarded: {} {:?}",
                shot.status, shot.challenge
            )),
            (Expect::Refused { .. }, Some(_)) => Err(format!(
                "forwarded (status {}) though it should be refused",
                shot.status
            )),
            (Expect::Refused { status, error }, None) => {
                let challenge = shot.challenge.as_deref().unwrap_or("");
                if shot.status != status {
                    Err(format!("status {} {:?}", shot.status, shot.transport_error))
                } else if challenge_error(challenge) != error {
                    Err(format!("challenge {challenge}"))
                } else if challenge_realm(challenge) != Some(epoch.policy.realm.as_str()) {
                    Err(format!("realm in {challenge}"))
                } else {
                    Ok(())
                }
            }
        };
        match verdict {
            Ok(()) => return Ok(i),
            Err(e) => why.push(format!("{}: {e}", epoch.policy.name)),
        }
    }
    Err(format!(
        "request {} ({kind:?}, keep-alive {}, sent {:?} after start) matches no policy in force: {}",
        shot.id,
        shot.keep_alive,
        shot.sent.duration_since(epochs[0].applied),
        why.join("; ")
    ))
}

fn exchange_target(x: &RecordedExchange) -> (String, String, String) {
    (
        x.field("scope").unwrap_or_default().to_string(),
        x.client_id.clone().unwrap_or_default(),
        x.host.clone().unwrap_or_default(),
    )
}

/// Signs of a trapped VM (a refused configuration logs "Wasm VM failed … configure", which is
/// Envoy refusing the update, not a trap).
fn trapped(log: &str) -> bool {
    [
        "panicked at",
        "wasm trap",
        "Function: proxy_on_",
        "unreachable",
    ]
    .iter()
    .any(|n| log.contains(n))
}

const PHASE: Duration = Duration::from_millis(3000);

/// A new configuration starts without keys, so right after a swap under load many requests
/// are parked for the key set at once, and the exchanges they need start when it arrives. That
/// once lost 2-3 exchanges per run (504 after `timeout_ms` + 2 s): they were dispatched inside
/// another request's callback and cancelled when that request ended. Exchanges started for
/// other requests now go out from the root context; no 5xx is tolerated here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ecds_swaps_under_load_keep_every_answer_right() -> Result {
    ecds_scenario().await
}

async fn ecds_scenario() -> Result {
    let stack = start(ConfigDelivery::Ecds).await?;
    // Before the policies: minting rotates `mcp2`'s key, which p7 names.
    let tokens = tokens(&stack);
    let idp_port = stack.idp.port();
    let base = stack.envoy.plugin_config()?;
    let with = |patch: Value| {
        let mut p = base.clone();
        merge_patch(&mut p, &patch);
        p
    };
    let host = format!("127.0.0.1:{idp_port}");
    let p0 = Policy {
        name: "initial",
        plugin: base.clone(),
        realm: "mcp".into(),
        accepts: vec![Kind::Mcp],
        scope: READ,
        client: CLIENT_ID,
        authority: host.clone(),
    };
    let p1 = Policy {
        name: "scope changed",
        plugin: with(json!({"exchange": {"scope": READ_WRITE}})),
        scope: READ_WRITE,
        ..p0.clone()
    };
    let p2 = Policy {
        name: "realm changed (target unchanged)",
        plugin: with(json!({"exchange": {"scope": READ_WRITE}, "realm": "mcp-reconfigured"})),
        realm: "mcp-reconfigured".into(),
        ..p1.clone()
    };
    let p3 = Policy {
        name: "client changed",
        plugin: with(
            json!({"exchange": {"scope": READ_WRITE, "client_id": CLIENT_2,
            "client_secret_env": SECRET_2_ENV}, "realm": "mcp-reconfigured"}),
        ),
        client: CLIENT_2,
        ..p2.clone()
    };
    let p4 = Policy {
        name: "token endpoint authority changed",
        plugin: with(
            json!({"exchange": {"scope": READ_WRITE, "client_id": CLIENT_2,
            "client_secret_env": SECRET_2_ENV, "authority": format!("localhost:{idp_port}")},
            "realm": "mcp-reconfigured"}),
        ),
        authority: format!("localhost:{idp_port}"),
        ..p3.clone()
    };
    let p5 = Policy {
        name: "back to the initial configuration (same bytes)",
        ..p0.clone()
    };
    let mcp2 = stack.idp.issuer("mcp2");
    let p6 = Policy {
        name: "issuer and key set changed to mcp2",
        plugin: with(json!({"issuer": mcp2, "jwks": {"path": "/oauth2/mcp2/v1/keys"}})),
        accepts: vec![Kind::Mcp2, Kind::Mcp2NewKey],
        ..p0.clone()
    };
    let p7 = Policy {
        name: "key set changed to mcp2's new key only (inline)",
        plugin: with(
            json!({"issuer": mcp2, "jwks": {"cluster": null, "path": null,
            "authority": null, "inline": {"keys": [stack.idp.public_jwk("mcp2")]}}}),
        ),
        accepts: vec![Kind::Mcp2NewKey],
        ..p0.clone()
    };
    let refused = with(json!({"exchange": {"timeout_ms": "soon"}}));

    let started = Instant::now();
    let load = Load::start(
        LoadOptions {
            url: stack.mcp_url(),
            tasks: 4,
            // The phases end the load (`stop`), not a count: on an idle machine 4 × 5,000
            // requests were over before the last configuration had any (fresh-clone run).
            max_per_task: 60_000,
            deadline: Duration::from_secs(90),
            keep_alive_half: true,
            pause: Duration::ZERO,
            timeout: Duration::from_secs(10),
        },
        picker(&tokens),
    );
    let mut epochs = vec![Epoch {
        policy: p0,
        pushed: started,
        applied: started,
        exchanges_at_push: 0,
    }];
    let mut rejected_at = None;
    for policy in [p1, p2, p3, p4, p5, p6, p7] {
        tokio::time::sleep(PHASE).await;
        if epochs.len() == 5 {
            // A configuration the filter refuses: Envoy keeps the one in force.
            let before = stack.idp.exchanges().len();
            assert!(
                !stack.envoy.push_plugin_config(&refused).await?,
                "Envoy took a configuration the filter refuses"
            );
            rejected_at = Some((Instant::now(), before));
            tokio::time::sleep(PHASE).await;
        }
        let exchanges_at_push = stack.idp.exchanges().len();
        let pushed = Instant::now();
        assert!(
            stack.envoy.push_plugin_config(&policy.plugin).await?,
            "Envoy refused {}",
            policy.name
        );
        epochs.push(Epoch {
            policy,
            pushed,
            applied: Instant::now(),
            exchanges_at_push,
        });
    }
    tokio::time::sleep(PHASE).await;
    let shots = load.stop().await;
    let elapsed = started.elapsed();

    for e in &epochs {
        eprintln!(
            "{}: pushed at {:?}, taken {:?} later",
            e.policy.name,
            e.pushed.duration_since(started),
            e.applied.duration_since(e.pushed)
        );
    }
    // Every answer is one a policy in force allows.
    let seen = seen_by_id(&stack.upstream.seen_requests());
    let mut by_epoch = vec![0usize; epochs.len()];
    let mut wrong = Vec::new();
    for shot in &shots {
        match judge(shot, &epochs, &seen, &tokens) {
            Ok(i) => by_epoch[i] += 1,
            Err(e) => wrong.push(e),
        }
    }
    let through = shots.iter().filter(|s| seen.contains_key(&s.id)).count();
    let kept_alive = shots.iter().filter(|s| s.keep_alive).count();
    eprintln!(
        "{} requests in {elapsed:?} ({through} forwarded, {kept_alive} on kept-alive connections); judged by policy: {:?}",
        shots.len(),
        epochs
            .iter()
            .zip(&by_epoch)
            .map(|(e, n)| format!("{}: {n}", e.policy.name))
            .collect::<Vec<_>>()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} answers wrong, e.g.:\n{}",
        wrong.len(),
        shots.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    assert!(shots.len() >= 200, "the loop barely ran: {}", shots.len());
    // Each policy decided requests of its own.
    for (e, n) in epochs.iter().zip(&by_epoch) {
        assert!(*n >= 20, "only {n} requests judged under {}", e.policy.name);
    }
    assert!(
        shots.iter().all(|s| s.status != 0 && s.status < 500),
        "no 5xx or dropped connection during the swaps"
    );
    // Nothing the client sent as a token reached the upstream, in any header.
    let client_tokens: HashSet<&str> = tokens.sub.keys().map(String::as_str).collect();
    for req in seen.values() {
        for (_, v) in &req.headers {
            assert!(
                !client_tokens.iter().any(|t| !t.is_empty() && v.contains(t)),
                "a client token reached the upstream"
            );
        }
    }

    // Exchanges: which survive a reconfiguration. Count, per policy window (from its push to the
    // next one), the exchanges of that policy's own target.
    let exchanges = stack.idp.exchanges();
    let users = |kind: Kind| tokens.by_kind[&kind].len();
    let about = |got: usize, want: usize, what: &str| {
        assert_eq!(got, want, "{what}: {got} exchanges, expected {want}");
    };
    let mut per_window = Vec::new();
    for (i, e) in epochs.iter().enumerate() {
        let end = epochs
            .get(i + 1)
            .map(|n| n.exchanges_at_push)
            .unwrap_or(exchanges.len());
        let target = e.policy.target();
        let own = exchanges[e.exchanges_at_push..end]
            .iter()
            .filter(|x| exchange_target(x) == target)
            .count();
        per_window.push(own);
    }
    eprintln!(
        "exchanges per policy window: {:?}",
        epochs
            .iter()
            .zip(&per_window)
            .map(|(e, n)| format!("{}: {n}", e.policy.name))
            .collect::<Vec<_>>()
    );
    // One exchange per user and target, coalesced over both workers and every request.
    about(per_window[0], users(Kind::Mcp), "initial");
    // A changed target is exchanged afresh for every user (never reused).
    about(per_window[1], users(Kind::Mcp), "scope changed");
    about(per_window[3], users(Kind::Mcp), "client changed");
    about(per_window[4], users(Kind::Mcp), "authority changed");
    // Measured: a change elsewhere in the configuration (here `realm`) also exchanges afresh:
    // the shared store is keyed by a digest of the whole configuration.
    about(per_window[2], users(Kind::Mcp), "realm changed");
    // Measured: returning to a configuration byte for byte finds its exchanged tokens again (its
    // shared-data namespace is still there): no exchange at all.
    about(per_window[5], 0, "back to the initial configuration");
    about(
        per_window[6],
        users(Kind::Mcp2) + users(Kind::Mcp2NewKey),
        "issuer mcp2",
    );
    about(per_window[7], users(Kind::Mcp2NewKey), "key set changed");
    // The refused configuration changed nothing: no exchange in its window beyond the policy
    // in force's own (already cached).
    let (_, before) = rejected_at.expect("the refused push ran");
    let during_refused = exchanges[before..epochs[5].exchanges_at_push].len();
    about(during_refused, 0, "after the refused push");
    // Every exchange is one of those: none for a target no longer in force.
    assert_eq!(
        exchanges.len(),
        per_window.iter().sum::<usize>(),
        "exchanges outside their policy's window"
    );
    assert!(!trapped(&stack.envoy.log()), "{}", stack.envoy.log_tail(40));
    Ok(())
}

/// LDS: a new plugin configuration is a new listener. Measured on Envoy 1.40: the update is
/// an in-place filter-chain update (`listener_manager.listener_in_place_updated`); new
/// connections get the new chain at once, and an idle kept-alive connection of the old chain is
/// closed by its drain, so the client's next request (reqwest reconnects) is decided by the new
/// policy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lds_swap_applies_to_the_next_request_on_new_and_kept_alive_connections() -> Result {
    let stack = start(ConfigDelivery::Lds).await?;
    let realm = |a: &reqwest::Response| {
        a.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .and_then(challenge_realm)
            .map(str::to_string)
    };
    let kept = reqwest::Client::new();
    let send = |client: &reqwest::Client| {
        client
            .post(stack.mcp_url())
            .header("content-type", "application/json")
            .body(gateway_tests::client::TOOLS_LIST)
            .send()
    };
    let before = send(&kept).await?;
    assert_eq!(realm(&before).as_deref(), Some("mcp"));
    assert!(
        stack
            .envoy
            .push_plugin_patch(&json!({"realm": "mcp-reconfigured"}))
            .await?
    );
    // Give the workers the new listener.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    for _ in 0..5 {
        assert_eq!(
            realm(&send(&fresh).await?).as_deref(),
            Some("mcp-reconfigured"),
            "a new connection gets the new listener"
        );
    }
    let mut old = 0;
    for _ in 0..10 {
        if realm(&send(&kept).await?).as_deref() == Some("mcp") {
            old += 1;
        }
    }
    eprintln!("kept-alive connection: {old} of 10 requests after the swap under the old policy");
    assert_eq!(old, 0, "requests after the swap under the old policy");
    assert_eq!(
        stack
            .envoy
            .stat("listener_manager.listener_in_place_updated")
            .await?,
        1,
        "the swap was an in-place filter-chain update"
    );
    Ok(())
}
