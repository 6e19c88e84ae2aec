//! The upstream MCP server: rmcp's Streamable HTTP service at `/mcp`, behind a recorder and a
//! resource-server token check.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, Json, ServerHandler};
use serde::{Deserialize, Serialize};

use super::auth::{require_token, VerifiedToken, Verifier};
use super::UpstreamConfig;

/// Largest request body the recorder buffers; bigger requests get 413 before reaching rmcp.
const MAX_RECORDED_BODY: usize = 4 * 1024 * 1024;

/// One HTTP request as it reached the upstream, before any check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Path of the request URI (without the query).
    pub path: String,
    /// Every header in arrival order, names lower-case, values decoded lossily.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// Values of every header called `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }

    /// The bearer token of the (first) `Authorization` header, if it uses that scheme.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.header("authorization")?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    }

    /// The JSON-RPC `method` of the body, if the body is a JSON-RPC message.
    pub fn jsonrpc_method(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        value.get("method")?.as_str().map(str::to_string)
    }
}

pub(crate) struct Shared {
    pub(crate) verifier: Verifier,
    seen: Mutex<Vec<SeenRequest>>,
}

/// A running upstream. Cloning shares the same server.
#[derive(Clone)]
pub struct UpstreamHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl UpstreamHandle {
    /// `http://ip:port`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://ip:port/mcp`
    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base_url())
    }

    /// Every request that reached the server so far, in arrival order.
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// From now on, valid tokens of `sub` get 401 `invalid_token` (the backend revoked them).
    pub fn reject_subject(&self, sub: &str) {
        self.shared.verifier.reject_subject(sub);
    }

    /// From now on, this exact (backend) token gets 401 `invalid_token`: revoked at the backend
    /// while new tokens of the same user still work.
    pub fn reject_token(&self, token: &str) {
        self.shared.verifier.reject_token(token);
    }

    /// Forgets the recorded requests and the rejected subjects.
    pub fn clear(&self) {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared.verifier.clear_rejections();
    }
}

/// Starts the upstream on `listen` (port 0 picks a free port) on the current tokio runtime.
pub async fn start_upstream(
    listen: SocketAddr,
    config: UpstreamConfig,
) -> anyhow::Result<UpstreamHandle> {
    let shared = Arc::new(Shared {
        verifier: Verifier::new(config)?,
        seen: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = app(shared.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("mcp-upstream on {addr} stopped: {e}");
        }
    });
    Ok(UpstreamHandle { addr, shared })
}

fn app(shared: Arc<Shared>) -> Router {
    // Stateful (sessions, `Mcp-Session-Id`) like most deployed servers. The Host check is off:
    // behind Envoy the Host header is whatever the route forwards, and this server is only
    // reached on loopback.
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(true)
        .disable_allowed_hosts();
    let mcp = StreamableHttpService::new(
        || Ok(Upstream::new()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let protected = Router::new()
        .nest_service("/mcp", mcp)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(protected)
        .layer(middleware::from_fn_with_state(shared, record))
}

/// Records the request as received (all headers, whole body) before anything else runs.
async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_RECORDED_BODY).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read request body: {e}"),
            )
                .into_response()
        }
    };
    let seen = SeenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: bytes.to_vec(),
    };
    shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(seen);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// What `whoami` returns: the token the upstream validated for this very request.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TokenInfo {
    pub sub: String,
    pub aud: Vec<String>,
    pub scopes: Vec<String>,
    pub iss: String,
    pub client_id: Option<String>,
}

/// What `read_data` and `write_data` return.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DataResult {
    pub ok: bool,
    pub tool: String,
    pub sub: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// Text to send back.
    pub text: String,
}

/// The MCP tools. One instance per session (rmcp's service factory).
#[derive(Debug, Clone)]
pub struct Upstream {
    tool_router: ToolRouter<Self>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

/// The verified token of the HTTP request that carried this tool call.
fn token_of(parts: &http::request::Parts) -> Result<VerifiedToken, ErrorData> {
    parts
        .extensions
        .get::<VerifiedToken>()
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("request carried no verified token", None))
}

#[tool_router(router = tool_router)]
impl Upstream {
    pub fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "whoami",
        description = "Returns the subject, audience, scopes, issuer and client id of the access token this server received"
    )]
    async fn whoami(
        &self,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<TokenInfo>, ErrorData> {
        let token = token_of(&parts)?;
        Ok(Json(TokenInfo {
            sub: token.sub,
            aud: token.aud,
            scopes: token.scopes,
            iss: token.iss,
            client_id: token.client_id,
        }))
    }

    #[tool(name = "echo", description = "Returns the given text")]
    async fn echo(&self, Parameters(args): Parameters<EchoArgs>) -> String {
        args.text
    }

    #[tool(
        name = "read_data",
        description = "Pretends to read data; returns ok and the scopes of the token"
    )]
    async fn read_data(
        &self,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<DataResult>, ErrorData> {
        data_result("read_data", &parts)
    }

    #[tool(
        name = "write_data",
        description = "Pretends to write data; returns ok and the scopes of the token"
    )]
    async fn write_data(
        &self,
        Extension(parts): Extension<http::request::Parts>,
    ) -> Result<Json<DataResult>, ErrorData> {
        data_result("write_data", &parts)
    }
}

fn data_result(tool: &str, parts: &http::request::Parts) -> Result<Json<DataResult>, ErrorData> {
    let token = token_of(parts)?;
    Ok(Json(DataResult {
        ok: true,
        tool: tool.to_string(),
        sub: token.sub,
        scopes: token.scopes,
    }))
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "mcp-upstream",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions("Test upstream: whoami reports the access token it received.")
    }
}
