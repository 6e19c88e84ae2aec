//! A bounded concurrent request loop through the gateway, and what a test needs to judge each
//! answer afterwards: every request carries a unique `x-load-id`, so the test finds what the
//! upstream received for it (the backend token) among [`crate::mcp::UpstreamHandle::seen_requests`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::client::{bearer, TOOLS_LIST};
use crate::mcp::SeenRequest;

/// The header that names each request.
pub const LOAD_ID_HEADER: &str = "x-load-id";

/// One request of the loop and its answer.
#[derive(Clone, Debug)]
pub struct Shot {
    pub id: u64,
    /// What the picker said this request is (an index into the test's own table of kinds).
    pub kind: usize,
    /// The bearer token sent (empty when none).
    pub token: String,
    pub sent: Instant,
    pub done: Instant,
    /// 0 when no HTTP answer came (connection error).
    pub status: u16,
    pub challenge: Option<String>,
    /// The body's OAuth `error` member, if any.
    pub error: Option<String>,
    pub retry_after: bool,
    /// Sent on a kept-alive connection (else on a fresh one).
    pub keep_alive: bool,
    /// The transport error, when `status` is 0.
    pub transport_error: Option<String>,
}

/// What a task sends: its kind, its bearer token (`None`: no `Authorization`), extra headers.
pub struct Pick {
    pub kind: usize,
    pub token: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Chooses the next request; called with a sequence number unique across tasks.
pub type Picker = Arc<dyn Fn(u64) -> Pick + Send + Sync>;

/// A running loop: `tasks` tasks, each sending one request at a time until [`Load::stop`], the
/// deadline, or `max_per_task` requests.
pub struct Load {
    stop: Arc<AtomicBool>,
    shots: Arc<Mutex<Vec<Shot>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

pub struct LoadOptions {
    pub url: String,
    pub tasks: usize,
    pub max_per_task: u64,
    pub deadline: Duration,
    /// Tasks with an even index reuse one connection (HTTP/1.1 keep-alive); odd ones open a
    /// fresh connection per request. With `false`, every task opens fresh connections.
    pub keep_alive_half: bool,
    /// Pause between two requests of one task.
    pub pause: Duration,
    pub timeout: Duration,
}

impl Load {
    pub fn start(opts: LoadOptions, picker: Picker) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shots = Arc::new(Mutex::new(Vec::new()));
        let seq = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + opts.deadline;
        let mut handles = Vec::new();
        for task in 0..opts.tasks {
            let keep_alive = opts.keep_alive_half && task % 2 == 0;
            let (stop, shots, seq, picker) =
                (stop.clone(), shots.clone(), seq.clone(), picker.clone());
            let url = opts.url.clone();
            let (max, pause, timeout) = (opts.max_per_task, opts.pause, opts.timeout);
            handles.push(tokio::spawn(async move {
                let shared = reqwest::Client::builder()
                    .timeout(timeout)
                    .build()
                    .unwrap_or_default();
                for _ in 0..max {
                    if stop.load(Ordering::SeqCst) || Instant::now() > until {
                        break;
                    }
                    let id = seq.fetch_add(1, Ordering::SeqCst);
                    let pick = picker(id);
                    let client = if keep_alive {
                        shared.clone()
                    } else {
                        reqwest::Client::builder()
                            .timeout(timeout)
                            .pool_max_idle_per_host(0)
                            .build()
                            .unwrap_or_default()
                    };
                    let mut req = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("accept", "application/json, text/event-stream")
                        .header(LOAD_ID_HEADER, id.to_string())
                        .body(TOOLS_LIST);
                    if let Some(t) = &pick.token {
                        req = req.header("authorization", bearer(t));
                    }
                    for (n, v) in &pick.headers {
                        req = req.header(n.as_str(), v.as_str());
                    }
                    let sent = Instant::now();
                    let mut shot = Shot {
                        id,
                        kind: pick.kind,
                        token: pick.token.clone().unwrap_or_default(),
                        sent,
                        done: sent,
                        status: 0,
                        challenge: None,
                        error: None,
                        retry_after: false,
                        keep_alive,
                        transport_error: None,
                    };
                    match req.send().await {
                        Ok(resp) => {
                            shot.status = resp.status().as_u16();
                            let h = resp.headers();
                            shot.challenge = h
                                .get("www-authenticate")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            shot.retry_after = h.contains_key("retry-after");
                            let body = resp.text().await.unwrap_or_default();
                            if shot.status != 200 {
                                shot.error = serde_json::from_str::<Value>(&body)
                                    .ok()
                                    .and_then(|v| v["error"].as_str().map(str::to_string));
                            }
                        }
                        Err(e) => shot.transport_error = Some(format!("{e:#}")),
                    }
                    shot.done = Instant::now();
                    shots.lock().unwrap_or_else(|e| e.into_inner()).push(shot);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }));
        }
        Load {
            stop,
            shots,
            handles,
        }
    }

    /// Requests answered so far.
    pub fn count(&self) -> usize {
        self.shots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops every task after its current request and returns all shots, in id order.
    pub async fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.await;
        }
        let mut shots = std::mem::take(&mut *self.shots.lock().unwrap_or_else(|e| e.into_inner()));
        shots.sort_by_key(|s| s.id);
        shots
    }
}

/// What the upstream received, by `x-load-id`.
pub fn seen_by_id(seen: &[SeenRequest]) -> HashMap<u64, SeenRequest> {
    seen.iter()
        .filter_map(|r| {
            r.header(LOAD_ID_HEADER)
                .and_then(|v| v.parse().ok())
                .map(|id| (id, r.clone()))
        })
        .collect()
}

/// The claims of a JWT, unverified (the upstream verifies the backend token itself).
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The scopes of a token's claims (`scp` array or `scope` string), in order.
pub fn claim_scopes(claims: &Value) -> Vec<String> {
    match (&claims["scp"], &claims["scope"]) {
        (Value::Array(a), _) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        (_, Value::String(s)) => s.split(' ').map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// The `realm` of a challenge, if any.
pub fn challenge_realm(challenge: &str) -> Option<&str> {
    let rest = &challenge[challenge.find("realm=\"")? + 7..];
    rest.split('"').next()
}

/// The `error` of a challenge, if any.
pub fn challenge_error(challenge: &str) -> Option<&str> {
    let rest = &challenge[challenge.find("error=\"")? + 7..];
    rest.split('"').next()
}
