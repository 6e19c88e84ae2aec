//! A fleet for end-to-end tests: a real etcd (Debian's `etcd-server`, started on loopback with
//! its own data directory) and a real front Envoy spreading requests over gateway replicas.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::{envoy_bin, free_port, workspace_root};

/// The etcd binary: `ETCD_BIN`, else `etcd` on PATH (`make etcd` installs it).
pub fn etcd_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("etcd not found (set ETCD_BIN or run `make etcd`, which installs Debian's etcd-server)")
}

/// One etcd member on loopback; killed on drop, its data directory removed.
pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Etcd {
    pub async fn start() -> anyhow::Result<Etcd> {
        let dir = std::env::temp_dir().join(format!(
            "mcp-gw-etcd-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let mut etcd = Etcd {
            child: None,
            port: free_port()?,
            peer_port: free_port()?,
            dir,
            http: reqwest::Client::new(),
        };
        etcd.spawn().await?;
        Ok(etcd)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(etcd_bin()?)
            .args(["--name", "e2e", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("e2e={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = self
                .http
                .get(format!("{client}/health"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy; log {}:\n{}",
                    self.log_path().display(),
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the member (as a crash: no graceful stop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the member (SIGSTOP): connections are accepted by the kernel but nothing
    /// answers, as with a hung or partitioned etcd.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("etcd is not running"))?;
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// Starts the member again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Every key and value in the store.
    pub async fn dump(&self) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let answer: Value = self
            .http
            .post(format!("http://127.0.0.1:{}/v3/kv/range", self.port))
            .body(
                json!({"key": STANDARD.encode([0u8]), "range_end": STANDARD.encode([0u8])})
                    .to_string(),
            )
            .send()
            .await?
            .json()
            .await?;
        let mut out = Vec::new();
        for kv in answer["kvs"].as_array().cloned().unwrap_or_default() {
            let field = |name: &str| -> anyhow::Result<Vec<u8>> {
                Ok(STANDARD.decode(kv[name].as_str().unwrap_or(""))?)
            };
            out.push((field("key")?, field("value")?));
        }
        Ok(out)
    }

    /// Turns on etcd's RBAC with a `root` user and `user`, who may read and write only keys
    /// under `prefix` (what envoy/README.md tells operators to grant the gateway).
    pub async fn enable_auth(
        &self,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let steps = [
            (
                "/v3/auth/user/add",
                json!({"name": "root", "password": "root-e2e"}),
            ),
            ("/v3/auth/role/add", json!({"name": "root"})),
            (
                "/v3/auth/user/grant",
                json!({"user": "root", "role": "root"}),
            ),
            (
                "/v3/auth/user/add",
                json!({"name": user, "password": password}),
            ),
            ("/v3/auth/role/add", json!({"name": "tokencache"})),
            (
                "/v3/auth/role/grant",
                json!({"name": "tokencache", "perm": {"key": STANDARD.encode(prefix),
                    "range_end": STANDARD.encode(&end), "permType": "READWRITE"}}),
            ),
            (
                "/v3/auth/user/grant",
                json!({"user": user, "role": "tokencache"}),
            ),
            ("/v3/auth/enable", json!({})),
        ];
        for (path, body) in steps {
            let resp = self
                .http
                .post(format!("http://127.0.0.1:{}{path}", self.port))
                .body(body.to_string())
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!(
                    "etcd {path} answered {}: {}",
                    resp.status(),
                    resp.text().await?
                );
            }
        }
        Ok(())
    }

    /// Writes `value` at `key` (to plant garbage).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let status = self
            .http
            .post(format!("http://127.0.0.1:{}/v3/kv/put", self.port))
            .body(json!({"key": STANDARD.encode(key), "value": STANDARD.encode(value)}).to_string())
            .send()
            .await?
            .status();
        if !status.is_success() {
            bail!("etcd put answered {status}");
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("KEEP_E2E_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How the front tier picks a replica.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FrontBalancing {
    /// What a plain L4/L7 load balancer does.
    RoundRobin,
    /// `envoy/fleet/front-ring-hash.yaml` as shipped: one token, one replica.
    RingHashOnAuthorization,
}

/// The shipped front-tier bootstrap, `envoy/fleet/front-ring-hash.yaml`.
pub fn front_bootstrap() -> anyhow::Result<Value> {
    let path = workspace_root().join("envoy/fleet/front-ring-hash.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A real Envoy in front of the gateway replicas.
pub struct FrontEnvoy {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl FrontEnvoy {
    pub fn start(replica_ports: &[u16], balancing: FrontBalancing) -> anyhow::Result<FrontEnvoy> {
        let mut b = front_bootstrap()?;
        let port = free_port()?;
        let admin = free_port()?;
        b["admin"]["address"]["socket_address"]["port_value"] = admin.into();
        b["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
            port.into();
        let cluster = b
            .pointer_mut("/static_resources/clusters/0")
            .ok_or_else(|| anyhow!("front-ring-hash.yaml has no cluster"))?;
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = replica_ports
            .iter()
            .map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
            .collect();
        cluster["type"] = json!("STATIC");
        if balancing == FrontBalancing::RoundRobin {
            cluster["lb_policy"] = json!("ROUND_ROBIN");
            if let Some(o) = cluster.as_object_mut() {
                o.remove("ring_hash_lb_config");
            }
        }
        let dir = std::env::temp_dir().join(format!("mcp-gw-front-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("front.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&b)?)?;
        let log = std::fs::File::create(dir.join("front.log"))?;
        let child = Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .args(["--base-id", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the front envoy")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "front envoy did not listen; log:\n{}",
                    std::fs::read_to_string(dir.join("front.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(FrontEnvoy { child, port, dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for FrontEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("KEEP_E2E_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
