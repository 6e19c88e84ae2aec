//! A fleet of gateways: three real Envoys with the filter behind a real front Envoy, and a real
//! etcd (Debian's `etcd-server`) as the fleet store.
//!
//! With the store, a token is exchanged once for the whole fleet, whatever replica each of its
//! requests lands on; etcd dying mid-run costs no request, and sharing resumes when it is back;
//! etcd holds no token bytes; a replica with another store key treats the entries as misses, and
//! so does every replica for values that fail authentication. Without the store, a round-robin
//! front makes each replica exchange the same token (× 3), and the shipped consistent-hashing
//! front (`envoy/fleet/front-ring-hash.yaml`) brings it back to one.

use std::time::Duration;

use gateway_tests::client::{bearer, jsonrpc_post};
use gateway_tests::fleet::{Etcd, FrontBalancing, FrontEnvoy};
use gateway_tests::harness::{filter_counter, Envoy, Stack, StackOptions};
use gateway_tests::idp::MintRequest;
use serde_json::json;

type Result<T = ()> = anyhow::Result<T>;

const STORE_KEY_ENV: &str = "MCP_GW_STORE_KEY";
const STORE_KEY: &str = "fleet-e2e-store-key-0123456789abcdef";
const OTHER_STORE_KEY: &str = "another-fleet-store-key-0123456789abc";
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"fleet-test","version":"1"}}}"#;

fn options(etcd_port: Option<u16>, store_key: &str) -> StackOptions {
    let mut opts = StackOptions::default();
    if let Some(port) = etcd_port {
        opts.plugin_patch =
            json!({"fleet_store": {"cluster": "etcd", "secret_env": STORE_KEY_ENV}});
        opts.extra_clusters = vec![("etcd".into(), port)];
        opts.extra_env = vec![(STORE_KEY_ENV.into(), store_key.into())];
    }
    opts
}

struct Fleet {
    stack: Stack,
    /// Replicas 2 and 3 (replica 1 is `stack.envoy`).
    replicas: Vec<Envoy>,
}

impl Fleet {
    async fn start(etcd_port: Option<u16>) -> Result<Fleet> {
        let stack = Stack::start_with(options(etcd_port, STORE_KEY)).await?;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            replicas.push(stack.start_replica(&options(etcd_port, STORE_KEY))?);
        }
        // Each replica has fetched its keys before traffic.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Fleet { stack, replicas })
    }

    fn ports(&self) -> Vec<u16> {
        let mut ports = vec![self.stack.envoy.port];
        ports.extend(self.replicas.iter().map(|r| r.port));
        ports
    }

    fn token(&self, sub: &str) -> String {
        self.stack.mint(&MintRequest {
            sub: sub.into(),
            ..MintRequest::default()
        })
    }

    fn exchanges(&self) -> u64 {
        self.stack.idp.exchange_count()
    }
}

/// An MCP `initialize` through `url` on its own connection: 200 only if the upstream accepted
/// a backend token (it verifies `aud=backend` itself).
async fn initialize(url: &str, token: &str) -> Result<u16> {
    let resp = jsonrpc_post(url, Some(&bearer(token)), INITIALIZE)
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

async fn all_ok(url: &str, token: &str, times: usize, concurrent: bool) -> Result {
    if concurrent {
        let mut tasks = Vec::new();
        for _ in 0..times {
            let (url, token) = (url.to_string(), token.to_string());
            tasks.push(tokio::spawn(async move { initialize(&url, &token).await }));
        }
        for t in tasks {
            assert_eq!(t.await??, 200);
        }
    } else {
        for _ in 0..times {
            assert_eq!(initialize(url, token).await?, 200);
        }
    }
    Ok(())
}

/// No token bytes and no plaintext in etcd: neither `eyJ` nor any 12-byte piece of a token
/// anywhere, and values that are sealed bytes, not text.
async fn assert_store_holds_no_tokens(etcd: &Etcd, tokens: &[String]) -> Result {
    let dump = etcd.dump().await?;
    assert!(!dump.is_empty(), "the store was used");
    for (key, value) in &dump {
        for hay in [key, value] {
            assert!(
                !hay.windows(3).any(|w| w == b"eyJ"),
                "a JWT in etcd: {}",
                String::from_utf8_lossy(key)
            );
            for t in tokens {
                assert!(
                    !t.as_bytes()
                        .windows(12)
                        .any(|piece| hay.windows(12).any(|w| w == piece)),
                    "a piece of a token in etcd under {}",
                    String::from_utf8_lossy(key)
                );
            }
        }
        let key = String::from_utf8_lossy(key);
        assert!(key.starts_with("/mcp-token-exchange/1/"), "{key}");
        if key.contains("/v/") {
            assert!(
                std::str::from_utf8(value).is_err(),
                "value under {key} reads as text"
            );
        }
    }
    Ok(())
}

fn backend_tokens(fleet: &Fleet) -> Vec<String> {
    fleet
        .stack
        .upstream
        .seen_requests()
        .iter()
        .flat_map(|r| {
            r.header_values("authorization")
                .into_iter()
                .map(str::to_string)
        })
        .filter_map(|a| a.strip_prefix("Bearer ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_store_a_token_is_exchanged_once_for_the_fleet() -> Result {
    let mut etcd = Etcd::start().await?;
    let fleet = Fleet::start(Some(etcd.port)).await?;
    let front = FrontEnvoy::start(&fleet.ports(), FrontBalancing::RoundRobin)?;
    let url = front.url("/mcp");

    // Sequential: each token's three requests land on the three replicas in turn.
    let mut tokens = Vec::new();
    for i in 0..5 {
        let t = fleet.token(&format!("seq-{i}"));
        all_ok(&url, &t, 3, false).await?;
        tokens.push(t);
    }
    assert_eq!(
        fleet.exchanges(),
        5,
        "one exchange per token, not per replica"
    );
    // Concurrent: six requests at once per token, on all replicas.
    for i in 0..4 {
        let t = fleet.token(&format!("burst-{i}"));
        all_ok(&url, &t, 6, true).await?;
        tokens.push(t);
    }
    assert_eq!(fleet.exchanges(), 9);
    tokens.extend(backend_tokens(&fleet));
    assert_store_holds_no_tokens(&etcd, &tokens).await?;

    // etcd dies mid-run: every request is still answered, by exchanging directly.
    let before = fleet.exchanges();
    let load = {
        let url = url.clone();
        let tokens: Vec<String> = (0..6)
            .map(|i| fleet.token(&format!("outage-{i}")))
            .collect();
        tokio::spawn(async move {
            for round in 0..4 {
                for t in &tokens {
                    assert_eq!(initialize(&url, t).await?, 200, "round {round}");
                }
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    etcd.kill();
    load.await??;
    let during = fleet.exchanges() - before;
    assert!(
        (6..=18).contains(&during),
        "{during} exchanges for 6 tokens on 3 replicas"
    );
    let t = fleet.token("while-down");
    all_ok(&url, &t, 3, false).await?;

    // Back: after the breaker's cooldown, sharing resumes.
    etcd.restart().await?;
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let before = fleet.exchanges();
    let t = fleet.token("after-restart");
    all_ok(&url, &t, 3, false).await?;
    assert_eq!(fleet.exchanges() - before, 1, "sharing resumed");

    // A replica with another store key (a rotation half done): the entries are misses to it,
    // never garbage forwarded.
    let stranger = fleet
        .stack
        .start_replica(&options(Some(etcd.port), OTHER_STORE_KEY))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fleet.exchanges();
    assert_eq!(initialize(&stranger.url("/mcp"), &t).await?, 200);
    assert_eq!(
        fleet.exchanges() - before,
        1,
        "exchanged: another key sees nothing"
    );

    // Values that fail authentication (cut here) are misses too, on a replica that must look.
    for (key, value) in etcd.dump().await? {
        if key.windows(3).any(|w| w == b"/v/") {
            etcd.put(&key, &value[..value.len() / 2]).await?;
        }
    }
    let fresh = fleet
        .stack
        .start_replica(&options(Some(etcd.port), STORE_KEY))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fleet.exchanges();
    assert_eq!(initialize(&fresh.url("/mcp"), &t).await?, 200);
    assert_eq!(
        fleet.exchanges() - before,
        1,
        "a cut value is a miss, then exchanged"
    );
    // Counters reach Envoy's stats on the filter's next tick.
    let mut unusable = 0;
    for _ in 0..20 {
        unusable = filter_counter(&fresh.filter_stats().await?, "fleet.unusable_values");
        if unusable > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(unusable, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_store_each_replica_exchanges_unless_the_front_hashes() -> Result {
    let fleet = Fleet::start(None).await?;
    let round_robin = FrontEnvoy::start(&fleet.ports(), FrontBalancing::RoundRobin)?;
    for i in 0..4 {
        let t = fleet.token(&format!("rr-{i}"));
        all_ok(&round_robin.url("/mcp"), &t, 3, false).await?;
    }
    assert_eq!(
        fleet.exchanges(),
        12,
        "× 3: each replica exchanged each token"
    );

    let hashing = FrontEnvoy::start(&fleet.ports(), FrontBalancing::RingHashOnAuthorization)?;
    for i in 0..4 {
        let t = fleet.token(&format!("hash-{i}"));
        all_ok(&hashing.url("/mcp"), &t, 3, false).await?;
    }
    assert_eq!(
        fleet.exchanges(),
        16,
        "one token, one replica, one exchange"
    );
    Ok(())
}

/// A `fleet_store.cluster` Envoy does not have: the filter cannot refuse it at configuration
/// (`envoy --mode validate` refuses every callout, so such a check would fail valid
/// configurations), so requests are served by exchanging directly and the log names the field.
#[tokio::test]
async fn a_missing_store_cluster_is_named_in_the_log_and_costs_no_request() -> Result {
    let mut opts = options(Some(1), STORE_KEY);
    opts.extra_clusters.clear();
    let stack = Stack::start_with(opts).await?;
    let token = stack.user_token();
    for _ in 0..2 {
        assert_eq!(initialize(&stack.mcp_url(), &token).await?, 200);
    }
    stack
        .wait_for_log(
            "fleet_store.cluster: Envoy refused a callout to cluster \"etcd\"",
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(stack.idp.exchange_count(), 1, "the local cache still works");
    Ok(())
}

/// etcd with RBAC: the gateway's user may touch only the store's prefix. The filter
/// authenticates, and the fleet shares; with a wrong password nothing is shared but every
/// request is still served.
#[tokio::test]
async fn with_etcd_authentication_the_fleet_shares_and_a_wrong_password_costs_no_request() -> Result
{
    let etcd = Etcd::start().await?;
    etcd.enable_auth("envoy", "envoy-e2e-pw", "/mcp-token-exchange/")
        .await?;
    let with_password = |password: &str| {
        let mut opts = options(Some(etcd.port), STORE_KEY);
        opts.plugin_patch["fleet_store"]["username"] = json!("envoy");
        opts.plugin_patch["fleet_store"]["password_env"] = json!("MCP_GW_ETCD_PASSWORD");
        opts.extra_env
            .push(("MCP_GW_ETCD_PASSWORD".into(), password.into()));
        opts
    };
    let stack = Stack::start_with(with_password("envoy-e2e-pw")).await?;
    let replica = stack.start_replica(&with_password("envoy-e2e-pw"))?;
    // Each replica authenticates on its first tick; until then it exchanges without sharing.
    for envoy in [&stack.envoy, &replica] {
        wait_for(envoy, "authenticated to the fleet store").await?;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let token = stack.user_token();
    assert_eq!(initialize(&stack.mcp_url(), &token).await?, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(initialize(&replica.url("/mcp"), &token).await?, 200);
    assert_eq!(
        stack.idp.exchange_count(),
        1,
        "shared through the authenticated store"
    );

    let wrong = stack.start_replica(&with_password("not-the-password"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = stack.mint(&MintRequest {
        sub: "someone-else".into(),
        ..MintRequest::default()
    });
    assert_eq!(initialize(&wrong.url("/mcp"), &other).await?, 200);
    assert_eq!(initialize(&wrong.url("/mcp"), &token).await?, 200);
    assert_eq!(
        stack.idp.exchange_count(),
        3,
        "nothing shared without authentication"
    );
    wait_for(&wrong, "fleet store authentication failed").await?;
    Ok(())
}

/// A hung etcd (frozen: connections open, no answers) costs one lookup timeout, after which the
/// breaker sends requests straight to the IdP; a store that answers garbage (here the IdP's own
/// port: 404s) is the same. Every request is served either way.
#[tokio::test]
async fn a_hung_or_garbage_store_costs_one_failure_not_one_per_request() -> Result {
    let etcd = Etcd::start().await?;
    let stack = Stack::start_with(options(Some(etcd.port), STORE_KEY)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let warm = stack.user_token();
    assert_eq!(initialize(&stack.mcp_url(), &warm).await?, 200);
    // Its write goes out on the next ticks.
    tokio::time::sleep(Duration::from_millis(300)).await;

    etcd.freeze(true)?;
    for i in 0..8 {
        let t = stack.mint(&MintRequest {
            sub: format!("hung-{i}"),
            ..MintRequest::default()
        });
        assert_eq!(initialize(&stack.mcp_url(), &t).await?, 200);
    }
    etcd.freeze(false)?;
    wait_for(&stack.envoy, "fleet store lookup failed").await?;
    let errors = wait_counter(&stack.envoy, "fleet.errors").await?;
    assert_eq!(
        errors, 1,
        "one timeout, then the breaker: not one per request"
    );

    // A "store" that answers garbage: the IdP's port, whose 404s are not etcd answers.
    let mut garbage = options(Some(stack.idp.port()), STORE_KEY);
    garbage.extra_clusters = vec![("etcd".into(), stack.idp.port())];
    let replica = stack.start_replica(&garbage)?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..3 {
        let t = stack.mint(&MintRequest {
            sub: format!("garbage-{i}"),
            ..MintRequest::default()
        });
        assert_eq!(initialize(&replica.url("/mcp"), &t).await?, 200);
    }
    wait_for(&replica, "fleet store").await?;
    assert!(wait_counter(&replica, "fleet.errors").await? >= 1);
    Ok(())
}

/// The filter counter `name` once it is reported (counters reach Envoy on the filter's tick).
async fn wait_counter(envoy: &Envoy, name: &str) -> Result<u64> {
    let mut value = 0;
    for _ in 0..30 {
        value = filter_counter(&envoy.filter_stats().await?, name);
        if value > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(value)
}

async fn wait_for(envoy: &Envoy, needle: &str) -> Result {
    for _ in 0..100 {
        if envoy.log().contains(needle) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("Envoy never logged {needle:?}:\n{}", envoy.log_tail(30))
}
