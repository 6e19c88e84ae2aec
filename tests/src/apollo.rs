//! The walkthrough's upstream parts, as real processes: Apollo MCP Server (crates.io
//! `apollo-mcp-server`, installed by `make apollo` into `.apollo/`) and the GraphQL API on Apollo
//! Server that verifies every token with `@okta/jwt-verifier` (`tests/apollo/backend`, npm
//! packages installed by `make apollo`). Also a TCP tap, to see every byte Envoy sends upstream.
//!
//! Every failure to start names the part, and the file its output went to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{free_port, workspace_root};

/// Set by `make test-apollo`: the Apollo parts must be there, and a missing one fails the test.
pub const REQUIRED_ENV: &str = "APOLLO_E2E";
/// The Apollo MCP Server binary; default `.apollo/bin/apollo-mcp-server`.
pub const BIN_ENV: &str = "APOLLO_SERVER_BIN";

/// How long a part may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(45);

/// `tests/apollo`: the Apollo MCP Server configuration, schema and operations.
pub fn apollo_dir() -> PathBuf {
    workspace_root().join("tests/apollo")
}

/// First 8 hex digits of the token's SHA-256: what the filter, the backend and the tests print
/// instead of a token.
pub fn fingerprint(token: &str) -> String {
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Where the walkthrough's parts are on this machine.
#[derive(Clone, Debug)]
pub struct Parts {
    pub mcp_server_bin: PathBuf,
    pub node: PathBuf,
    pub backend_dir: PathBuf,
}

impl Parts {
    /// Finds every part (the binary at `$APOLLO_SERVER_BIN` or `.apollo/bin/`, Node.js at
    /// `$NODE` or on `PATH`), or says which are missing and how to install them.
    pub fn locate() -> anyhow::Result<Parts> {
        let mcp_server_bin = std::env::var_os(BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".apollo/bin/apollo-mcp-server"));
        let node = std::env::var_os("NODE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("node"));
        Parts {
            mcp_server_bin,
            node,
            backend_dir: apollo_dir().join("backend"),
        }
        .check()
    }

    /// These parts, if each is there; else which are missing and how to install them.
    pub fn check(self) -> anyhow::Result<Parts> {
        let Parts {
            mcp_server_bin,
            node,
            backend_dir,
        } = &self;
        let mut missing = Vec::new();
        if !mcp_server_bin.is_file() {
            missing.push(format!(
                "Apollo MCP Server binary {} (`make apollo` builds it with cargo install; \
                 or set {BIN_ENV})",
                mcp_server_bin.display()
            ));
        }
        if !backend_dir.join("node_modules/@okta/jwt-verifier").is_dir()
            || !backend_dir.join("node_modules/@apollo/server").is_dir()
        {
            missing.push(format!(
                "the GraphQL backend's npm packages in {}/node_modules (`make apollo` runs npm ci)",
                backend_dir.display()
            ));
        }
        let node_ok = Command::new(node)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !node_ok {
            missing.push(format!("Node.js ({} --version failed)", node.display()));
        }
        if !missing.is_empty() {
            bail!("missing: {}", missing.join("; "));
        }
        Ok(self)
    }
}

/// A directory for one run's logs under `target/apollo-e2e/`, kept after the run so a failure
/// can be read.
pub fn log_dir(name: &str) -> anyhow::Result<PathBuf> {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = workspace_root().join("target/apollo-e2e").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A child process killed on drop, with the file its stdout and stderr go to.
pub struct Process {
    /// What it is, for messages: e.g. "Apollo MCP Server".
    pub what: String,
    child: Child,
    pub port: u16,
    pub log_path: PathBuf,
}

impl Process {
    fn spawn(what: &str, mut cmd: Command, port: u16, log_path: PathBuf) -> anyhow::Result<Self> {
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow!(
                    "{what} did not start: {} {e}; log: {}",
                    cmd.get_program().to_string_lossy(),
                    log_path.display()
                )
            })?;
        Ok(Process {
            what: what.to_string(),
            child,
            port,
            log_path,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The failure message every start error uses: what, why, where the log is, its last lines.
    fn failure(&self, why: &str) -> anyhow::Error {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        anyhow!(
            "{} {why}; log: {}\n--- last lines ---\n{tail}",
            self.what,
            self.log_path.display()
        )
    }

    /// Waits until `ready` holds, failing early if the process exits.
    async fn wait_until(
        &mut self,
        mut ready: impl AsyncFnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("exited during start ({status})")));
            }
            if ready(self).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!(
                    "did not become ready in {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The GraphQL API (Apollo Server + `@okta/jwt-verifier`), with the file where it records what
/// it saw of each request.
pub struct Backend {
    pub process: Process,
    pub seen_path: PathBuf,
}

impl Backend {
    /// Starts `tests/apollo/backend/server.mjs`, trusting `issuer` (audience `backend`, scope
    /// `backend-api:read`), and waits until it listens.
    pub async fn start(parts: &Parts, issuer: &str, logs: &Path) -> anyhow::Result<Backend> {
        let port = free_port()?;
        let seen_path = logs.join("backend-seen.jsonl");
        let mut cmd = Command::new(&parts.node);
        cmd.arg("server.mjs")
            .current_dir(&parts.backend_dir)
            .env("OKTA_ISSUER", issuer)
            .env("OKTA_AUDIENCE", "backend")
            .env("REQUIRED_SCOPES", "backend-api:read")
            .env("PORT", port.to_string())
            .env("SEEN_LOG", &seen_path);
        let mut process = Process::spawn(
            "the GraphQL backend (Apollo Server + @okta/jwt-verifier, tests/apollo/backend)",
            cmd,
            port,
            logs.join("backend.log"),
        )?;
        process
            .wait_until(async |p: &Process| p.log().contains("GraphQL API listening on"))
            .await?;
        Ok(Backend { process, seen_path })
    }

    pub fn url(&self) -> String {
        self.process.url("/")
    }

    /// One record per request the API received, in order: `accepted`, the token's
    /// `fingerprint`, and the claims (`sub`, `aud`, `scp`, `iss`) or the verifier's `error`.
    pub fn seen(&self) -> anyhow::Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.seen_path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("backend record {l:?}")))
            .collect()
    }
}

/// Apollo MCP Server with `tests/apollo/apollo-mcp.yaml`.
pub struct ApolloMcpServer {
    pub process: Process,
}

impl ApolloMcpServer {
    /// Starts it on `port` against `auth_server` (the backend authorization server) and the
    /// GraphQL API at `graphql`, announcing `resource` (the URL clients reach it at), and waits
    /// for its health check.
    pub async fn start(
        parts: &Parts,
        port: u16,
        auth_server: &str,
        graphql: &str,
        resource: &str,
        logs: &Path,
    ) -> anyhow::Result<ApolloMcpServer> {
        let mut cmd = Command::new(&parts.mcp_server_bin);
        cmd.arg("apollo-mcp.yaml")
            .current_dir(apollo_dir())
            .env("WALKTHROUGH_AUTH_SERVER", auth_server)
            .env("WALKTHROUGH_GRAPHQL_ENDPOINT", graphql)
            .env("WALKTHROUGH_MCP_PORT", port.to_string())
            .env("WALKTHROUGH_MCP_RESOURCE", resource)
            // No GraphOS: schema and operations are local files.
            .env_remove("APOLLO_KEY")
            .env_remove("APOLLO_GRAPH_REF")
            // Its error at exit, not a backtrace, belongs in the last lines of its log.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        // Apollo MCP Server reads every `APOLLO_MCP_*` variable as configuration.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("APOLLO_MCP_") {
                cmd.env_remove(name);
            }
        }
        let mut process = Process::spawn(
            &format!("Apollo MCP Server ({})", parts.mcp_server_bin.display()),
            cmd,
            port,
            logs.join("apollo-mcp-server.log"),
        )?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let health = process.url("/health");
        process
            .wait_until(async |_: &Process| {
                matches!(http.get(&health).send().await, Ok(r) if r.status().is_success())
            })
            .await?;
        Ok(ApolloMcpServer { process })
    }

    pub fn mcp_url(&self) -> String {
        self.process.url("/mcp")
    }
}

/// A TCP relay that keeps every byte its clients sent (here: what Envoy sent upstream), so a test
/// can show which bearer tokens crossed it. Stops with its runtime.
pub struct Tap {
    pub port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    /// Listens on a free loopback port and relays each connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Tap> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(relay(inbound, target, record.clone()));
            }
        });
        Ok(Tap { port, sent })
    }

    /// Whether `needle` appears in what was sent through the tap.
    pub fn saw(&self, needle: &str) -> bool {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        !needle.is_empty()
            && sent
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
    }

    /// Fingerprints of the bearer tokens in the `authorization` headers sent through the tap.
    pub fn bearer_fingerprints(&self) -> Vec<String> {
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&sent)
            .split("\r\n")
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                if !name.trim().eq_ignore_ascii_case("authorization") {
                    return None;
                }
                let token = value.trim().strip_prefix("Bearer ")?;
                Some(fingerprint(token.trim()))
            })
            .collect()
    }
}

async fn relay(mut inbound: TcpStream, target: SocketAddr, record: Arc<Mutex<Vec<u8>>>) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut in_read, mut in_write) = inbound.split();
    let (mut out_read, mut out_write) = outbound.split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match in_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
            if out_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = out_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
        let _ = in_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// The lines of `log` that contain `needle`.
pub fn log_lines(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}
