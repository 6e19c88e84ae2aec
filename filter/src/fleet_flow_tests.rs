//! Scenario tests of the fleet store through the request flow: several Envoys (gateways with
//! their own fake hosts, so their own shared data) and one etcd, modelled here on the v3 JSON
//! API as `../shared/fleet-notes.md` measured it (txn with CREATE compares, leases, base64 keys
//! and values, empty fields omitted). The IdP counts exchanges.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::fake_host::{Callout, FakeHost, Fate};
use crate::flow_tests::{config, exchanged, token_at, Worker, T0_MS};

/// One etcd member: keys with their lease, leases with their end.
#[derive(Default)]
pub(crate) struct FakeEtcd {
    kv: BTreeMap<Vec<u8>, (Vec<u8>, Option<String>)>,
    leases: HashMap<String, u64>,
    next_lease: u64,
    /// Answers nothing (as a dead member behind Envoy: no response).
    pub(crate) down: bool,
    pub(crate) calls: usize,
}

impl FakeEtcd {
    fn expire(&mut self, now_ms: u64) {
        let dead: HashSet<String> = self
            .leases
            .iter()
            .filter(|(_, end)| **end <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        self.kv
            .retain(|_, (_, lease)| lease.as_ref().is_none_or(|l| !dead.contains(l)));
        self.leases.retain(|id, _| !dead.contains(id));
    }

    fn key(v: &Value) -> Vec<u8> {
        STANDARD.decode(v["key"].as_str().unwrap_or("")).unwrap()
    }

    fn range(&self, key: &[u8]) -> Value {
        match self.kv.get(key) {
            Some((value, _)) => json!({"kvs": [{"key": STANDARD.encode(key),
                "value": STANDARD.encode(value), "create_revision": "2"}], "count": "1"}),
            None => json!({}),
        }
    }

    fn op(&mut self, op: &Value) -> Value {
        if let Some(put) = op.get("request_put") {
            let lease = put["lease"].as_str().map(str::to_string);
            let value = STANDARD
                .decode(put["value"].as_str().unwrap_or(""))
                .unwrap();
            self.kv.insert(Self::key(put), (value, lease));
            json!({"response_put": {}})
        } else if let Some(range) = op.get("request_range") {
            json!({"response_range": self.range(&Self::key(range))})
        } else if let Some(del) = op.get("request_delete_range") {
            self.kv.remove(&Self::key(del));
            json!({"response_delete_range": {}})
        } else {
            panic!("unexpected txn op {op}")
        }
    }

    pub(crate) fn answer(&mut self, path: &str, body: &[u8], now_ms: u64) -> (Option<u16>, String) {
        if self.down {
            return (None, String::new());
        }
        self.calls += 1;
        self.expire(now_ms);
        let req: Value = serde_json::from_slice(body).expect("the filter sends JSON");
        let answer = match path {
            "/v3/kv/txn" => {
                let ok = req["compare"].as_array().is_none_or(|cs| {
                    cs.iter().all(|c| {
                        assert_eq!(c["target"], "CREATE");
                        !self.kv.contains_key(&Self::key(c))
                    })
                });
                let branch = if ok { "success" } else { "failure" };
                let ops: Vec<Value> = req[branch].as_array().cloned().unwrap_or_default();
                let responses: Vec<Value> = ops.iter().map(|o| self.op(o)).collect();
                let mut a = json!({"header": {}, "responses": responses});
                if ok {
                    a["succeeded"] = json!(true);
                }
                a
            }
            "/v3/lease/grant" => {
                self.next_lease += 1;
                let ttl: u64 = req["TTL"].as_str().unwrap().parse().unwrap();
                let id = format!("{}", 7_000_000_000_000_000_000 + self.next_lease);
                self.leases.insert(id.clone(), now_ms + ttl * 1000);
                json!({"header": {}, "ID": id, "TTL": ttl.to_string()})
            }
            "/v3/kv/deleterange" => {
                let deleted = self.kv.remove(&Self::key(&req)).is_some();
                json!({"header": {}, "deleted": if deleted { "1" } else { "0" }})
            }
            other => panic!("unexpected etcd path {other}"),
        };
        (Some(200), answer.to_string())
    }
}

/// Envoys behind one load balancer, one etcd, one IdP.
struct Fleet {
    envoys: Vec<Worker>,
    etcd: FakeEtcd,
    /// (envoy, callout token) answered or lost.
    done: HashSet<(usize, u32)>,
    exchanges: usize,
}

pub(crate) fn fleet_config(secret_env: &str, key_id: &str) -> Value {
    let mut c = config();
    c["fleet_store"] = json!({"cluster": "etcd", "secret_env": secret_env, "key_id": key_id});
    c
}

impl Fleet {
    fn new(n: usize) -> Self {
        Self::with_configs((0..n).map(|_| fleet_config("STORE_KEY", "1")).collect())
    }

    fn with_configs(configs: Vec<Value>) -> Self {
        let envoys = configs
            .iter()
            .map(|c| Worker::new(FakeHost::at(T0_MS), c, 1))
            .collect();
        let mut fleet = Self {
            envoys,
            etcd: FakeEtcd::default(),
            done: HashSet::new(),
            exchanges: 0,
        };
        fleet.tick(20);
        fleet
    }

    fn now(&self) -> u64 {
        self.envoys[0].host.now()
    }

    fn pending(&self, e: usize) -> Vec<Callout> {
        self.envoys[e]
            .host
            .callouts()
            .into_iter()
            .filter(|c| !self.done.contains(&(e, c.token)))
            .collect()
    }

    /// Answers every callout (and those the answers cause) until none is left; the IdP's
    /// exchanges only if `idp` is set.
    fn settle(&mut self, idp: bool) {
        loop {
            let mut any = false;
            for e in 0..self.envoys.len() {
                for call in self.pending(e) {
                    if call.cluster == "okta" && !idp {
                        continue;
                    }
                    any = true;
                    self.done.insert((e, call.token));
                    let (status, body) = if call.cluster == "etcd" {
                        let now = self.now();
                        let a = self.etcd.answer(call.path(), &call.body, now);
                        if std::env::var("FLEET_DEBUG").is_ok() {
                            eprintln!(
                                "{now} envoy {e} {} {} -> {}",
                                call.path(),
                                String::from_utf8_lossy(&call.body),
                                a.1
                            );
                        }
                        a
                    } else {
                        self.exchanges += 1;
                        (Some(200), exchanged(&format!("backend-{}", self.exchanges)))
                    };
                    self.envoys[e].answer(&call, status, &body);
                }
            }
            if !any {
                return;
            }
        }
    }

    /// Every Envoy's root tick after `ms`, then everything answered.
    fn tick(&mut self, ms: u64) {
        for e in &mut self.envoys {
            e.tick(ms);
        }
        self.settle(true);
    }

    fn forwarded_with(&self, e: usize, id: u32) -> String {
        let r = self.envoys[e].host.request(id);
        assert_eq!(r.fate, Fate::Forwarded, "envoy {e} request {id}: {r:?}");
        r.header("authorization").unwrap_or_default().to_string()
    }
}

fn user(sub: &str) -> String {
    token_at(T0_MS, sub, "k1")
}

#[test]
fn a_token_is_exchanged_once_across_the_fleet() {
    let mut f = Fleet::new(3);
    let alice = user("alice");
    f.envoys[0].send(1, &alice);
    f.settle(true);
    let backend = f.forwarded_with(0, 1);
    f.tick(20);
    for e in 1..3 {
        f.envoys[e].send(1, &alice);
        f.settle(true);
        assert_eq!(f.forwarded_with(e, 1), backend);
    }
    assert_eq!(f.exchanges, 1, "one exchange for the fleet");
    f.tick(500);
    assert_eq!(f.envoys[1].host.counter("fleet.hits"), 1);
    assert_eq!(f.envoys[0].host.counter("fleet.writes"), 1);
    let dump = format!("{:?}", f.etcd.kv);
    assert!(!dump.contains("backend-1") && !dump.contains("eyJ"));
}

#[test]
fn concurrent_requests_on_three_envoys_wait_for_one_exchange() {
    let mut f = Fleet::new(3);
    let bob = user("bob");
    for e in 0..3 {
        f.envoys[e].send(7, &bob);
    }
    // The lookups race: one Envoy takes the lock, the others wait on it.
    f.settle(false);
    assert_eq!(
        f.envoys.iter().map(|w| w.exchanges().len()).sum::<usize>(),
        1
    );
    f.settle(true);
    for _ in 0..5 {
        f.tick(25);
    }
    let backend = f.forwarded_with(0, 7);
    for e in 1..3 {
        assert_eq!(f.forwarded_with(e, 7), backend);
    }
    assert_eq!(f.exchanges, 1);
    f.tick(500);
    assert_eq!(f.envoys[1].host.counter("fleet.waits"), 1);
}

#[test]
fn a_dead_store_costs_one_failed_lookup_then_requests_go_to_the_idp() {
    let mut f = Fleet::new(2);
    f.etcd.down = true;
    let (carol, dave) = (user("carol"), user("dave"));
    f.envoys[0].send(1, &carol);
    f.settle(true);
    assert!(f.forwarded_with(0, 1).starts_with("Bearer backend-"));
    let etcd_calls = f.envoys[0]
        .host
        .callouts()
        .iter()
        .filter(|c| c.cluster == "etcd")
        .count();
    f.envoys[0].send(2, &dave);
    f.settle(true);
    f.forwarded_with(0, 2);
    let after = f.envoys[0]
        .host
        .callouts()
        .iter()
        .filter(|c| c.cluster == "etcd")
        .count();
    assert_eq!(after, etcd_calls, "breaker open: no lookup");
    assert_eq!(f.exchanges, 2);
    // The store comes back: after the cooldown one request probes it and sharing resumes.
    f.etcd.down = false;
    f.tick(crate::fleet::BREAKER_COOLDOWN.as_millis() as u64);
    let erin = user("erin");
    f.envoys[0].send(3, &erin);
    f.settle(true);
    f.tick(20);
    f.envoys[1].send(3, &erin);
    f.settle(true);
    assert_eq!(f.forwarded_with(0, 3), f.forwarded_with(1, 3));
    f.tick(500);
    assert_eq!(f.envoys[0].host.counter("fleet.errors"), 1);
}

#[test]
fn an_upstream_401_deletes_the_entry_for_the_fleet() {
    let mut f = Fleet::new(2);
    let alice = user("alice");
    f.envoys[0].send(1, &alice);
    f.settle(true);
    f.tick(20);
    let values = |f: &Fleet| {
        f.etcd
            .kv
            .keys()
            .filter(|k| k.windows(3).any(|w| w == b"/v/"))
            .count()
    };
    assert_eq!(values(&f), 1);
    f.envoys[0].upstream_answers(1, "401");
    f.tick(20);
    assert_eq!(values(&f), 0, "deleted in etcd too");
    f.envoys[1].send(1, &alice);
    f.settle(true);
    assert_eq!(f.exchanges, 2, "exchanged afresh");
}

#[test]
fn values_that_do_not_open_are_misses_and_are_replaced() {
    let mut f = Fleet::new(2);
    let alice = user("alice");
    f.envoys[0].send(1, &alice);
    f.settle(true);
    f.tick(20);
    for (value, _) in f.etcd.kv.values_mut() {
        if value.len() > 1 {
            value.truncate(value.len() - 3);
        }
    }
    f.envoys[1].send(1, &alice);
    f.settle(true);
    let backend = f.forwarded_with(1, 1);
    assert_eq!(
        backend, "Bearer backend-2",
        "exchanged, never the cut value"
    );
    f.tick(500);
    assert_eq!(f.envoys[1].host.counter("fleet.unusable_values"), 1);
}

#[test]
fn another_store_key_or_key_id_sees_nothing_of_the_old_entries() {
    let mut f = Fleet::with_configs(vec![
        fleet_config("STORE_KEY", "1"),
        fleet_config("STORE_KEY_2", "1"),
        fleet_config("STORE_KEY", "2"),
    ]);
    let alice = user("alice");
    f.envoys[0].send(1, &alice);
    f.settle(true);
    f.tick(20);
    for e in 1..3 {
        f.envoys[e].send(1, &alice);
        f.settle(true);
        assert_ne!(f.forwarded_with(e, 1), f.forwarded_with(0, 1));
    }
    assert_eq!(f.exchanges, 3);
}

#[test]
fn a_local_hit_never_reaches_the_store() {
    let mut f = Fleet::new(1);
    let alice = user("alice");
    f.envoys[0].send(1, &alice);
    f.settle(true);
    f.tick(20);
    let calls = f.etcd.calls;
    f.envoys[0].send(2, &alice);
    f.settle(true);
    f.forwarded_with(0, 2);
    assert_eq!(f.etcd.calls, calls);
}
