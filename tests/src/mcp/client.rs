//! A real MCP client (rmcp over Streamable HTTP) that sends `Authorization: Bearer <token>` on
//! every request, used by the end-to-end tests and the demo.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::service::{ClientInitializeError, RunningService};
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, InsufficientScopeError, StreamableHttpClientTransportConfig,
    StreamableHttpError,
};
use rmcp::transport::{DynamicTransportError, StreamableHttpClientTransport};
use rmcp::{RoleClient, ServiceError, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Upper bound for each MCP exchange (initialize, one list, one call).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What `whoami` reports, plus the tool names from `tools/list`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct WhoAmI {
    pub sub: String,
    pub aud: Vec<String>,
    pub scopes: Vec<String>,
    pub iss: String,
    pub client_id: Option<String>,
    /// Names from `tools/list`.
    #[serde(default)]
    pub tools: Vec<String>,
}

/// A failed MCP exchange. Its `Display` always names the step and, when the server or gateway
/// answered with a non-2xx status, `HTTP <status>` and the `WWW-Authenticate` challenge.
#[derive(Debug, Clone)]
pub struct McpClientError {
    /// `initialize`, `tools/list` or `tools/call <name>`.
    pub step: String,
    /// HTTP status of the failing response, when there was one.
    pub status: Option<u16>,
    /// `WWW-Authenticate` of the failing 401/403, when there was one.
    pub www_authenticate: Option<String>,
    /// The underlying error, flattened.
    pub detail: String,
}

impl fmt::Display for McpClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MCP {} failed", self.step)?;
        if let Some(status) = self.status {
            let reason = http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            write!(f, ": HTTP {status} {reason}")?;
        }
        if let Some(challenge) = &self.www_authenticate {
            write!(f, " (WWW-Authenticate: {challenge})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for McpClientError {}

/// The HTTP status carried by an error from this module, if any.
pub fn error_status(error: &anyhow::Error) -> Option<u16> {
    error
        .downcast_ref::<McpClientError>()
        .and_then(|e| e.status)
}

/// Walks an error chain for what rmcp's reqwest client keeps of a failed HTTP response.
///
/// rmcp turns a 401 carrying `WWW-Authenticate` into `AuthRequiredError` and a 403 carrying one
/// into `InsufficientScopeError` (neither keeps the number, so it is restored here); 429/5xx into
/// `HttpStatusError`; any other non-2xx into `UnexpectedServerResponse("HTTP <status>: <body>")`.
fn http_failure(start: &(dyn StdError + 'static)) -> (Option<u16>, Option<String>) {
    let mut current = Some(start);
    while let Some(error) = current {
        if let Some(auth) = error.downcast_ref::<AuthRequiredError>() {
            return (Some(401), Some(auth.www_authenticate_header.clone()));
        }
        if let Some(scope) = error.downcast_ref::<InsufficientScopeError>() {
            return (Some(403), Some(scope.www_authenticate_header.clone()));
        }
        if let Some(http) = error.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            match http {
                StreamableHttpError::HttpStatus(status) => return (Some(status.status), None),
                StreamableHttpError::SessionExpired => return (Some(404), None),
                StreamableHttpError::UnexpectedServerResponse(text) => {
                    if let Some(status) = status_prefix(text) {
                        return (Some(status), None);
                    }
                }
                StreamableHttpError::Client(e) => {
                    if let Some(status) = e.status() {
                        return (Some(status.as_u16()), None);
                    }
                }
                _ => {}
            }
        }
        if let Some(e) = error.downcast_ref::<reqwest::Error>() {
            if let Some(status) = e.status() {
                return (Some(status.as_u16()), None);
            }
        }
        current = error.source();
    }
    (None, None)
}

/// `HTTP 403 Forbidden: …` → 403.
fn status_prefix(text: &str) -> Option<u16> {
    let rest = text.trim_start().strip_prefix("HTTP ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (digits.len() == 3).then(|| digits.parse().ok()).flatten()
}

/// The messages of an error chain, without repeats and without rmcp's transport type names.
fn chain_text(start: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(start);
    while let Some(error) = current {
        // "Transport [<long generic type name>] error: …" says nothing its source does not.
        let wrapper = error.downcast_ref::<DynamicTransportError>().is_some()
            || matches!(
                error.downcast_ref::<ServiceError>(),
                Some(ServiceError::TransportSend(_))
            );
        if !wrapper {
            let text = error.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
        }
        current = error.source();
    }
    parts.join(": ")
}

fn init_error(error: ClientInitializeError) -> McpClientError {
    // The transport error of `TransportError` is a field, not a `source`, so walk from it.
    let (status, www_authenticate) = match &error {
        ClientInitializeError::TransportError { error, .. } => http_failure(error),
        ClientInitializeError::LegacyFallbackFailed { fallback, .. } => match fallback.as_ref() {
            ClientInitializeError::TransportError { error, .. } => http_failure(error),
            other => http_failure(other),
        },
        other => http_failure(other),
    };
    let detail = match &error {
        ClientInitializeError::TransportError { error, context } => {
            format!("{}, when {context}", chain_text(error))
        }
        other => chain_text(other),
    };
    McpClientError {
        step: "initialize".into(),
        status,
        www_authenticate,
        detail,
    }
}

fn service_error(step: &str, error: ServiceError) -> McpClientError {
    let (status, www_authenticate) = http_failure(&error);
    McpClientError {
        step: step.into(),
        status,
        www_authenticate,
        detail: chain_text(&error),
    }
}

fn timeout_error(step: &str) -> McpClientError {
    McpClientError {
        step: step.into(),
        status: None,
        www_authenticate: None,
        detail: format!("no answer within {}s", STEP_TIMEOUT.as_secs()),
    }
}

/// An initialized MCP session over Streamable HTTP with a fixed bearer token.
pub struct McpSession {
    service: RunningService<RoleClient, ClientConfig>,
}

impl McpSession {
    /// Connects and runs the `initialize` handshake. An empty `bearer` sends no `Authorization`
    /// header at all.
    pub async fn connect(mcp_url: &str, bearer: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut config = StreamableHttpClientTransportConfig::with_uri(mcp_url.to_string());
        if !bearer.is_empty() {
            config = config.auth_header(bearer);
        }
        let transport = StreamableHttpClientTransport::with_client(http, config);
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("gateway-tests-mcp-client", env!("CARGO_PKG_VERSION")),
        );
        let service = match tokio::time::timeout(STEP_TIMEOUT, info.serve(transport)).await {
            Ok(Ok(service)) => service,
            Ok(Err(e)) => return Err(init_error(e).into()),
            Err(_) => return Err(timeout_error("initialize").into()),
        };
        Ok(Self { service })
    }

    /// Name and version the server announced in `initialize`.
    pub fn server_name(&self) -> Option<String> {
        let info = self.service.peer_info()?;
        let server = info.server_info.as_ref()?;
        Some(format!("{} {}", server.name, server.version))
    }

    /// Protocol version negotiated in `initialize`.
    pub fn protocol_version(&self) -> Option<String> {
        self.service
            .peer_info()
            .map(|info| info.protocol_version.to_string())
    }

    /// `tools/list` (every page): the tool names.
    pub async fn tools(&self) -> anyhow::Result<Vec<String>> {
        let step = "tools/list";
        match tokio::time::timeout(STEP_TIMEOUT, self.service.list_all_tools()).await {
            Ok(Ok(tools)) => Ok(tools.into_iter().map(|t| t.name.to_string()).collect()),
            Ok(Err(e)) => Err(service_error(step, e).into()),
            Err(_) => Err(timeout_error(step).into()),
        }
    }

    /// `tools/call`: the raw result.
    pub async fn call_raw(&self, tool: &str, args: Value) -> anyhow::Result<CallToolResult> {
        let step = format!("tools/call {tool}");
        let mut params = CallToolRequestParams::new(tool.to_string());
        match args {
            Value::Object(map) => params = params.with_arguments(map),
            Value::Null => {}
            other => anyhow::bail!("{step}: arguments must be a JSON object, not {other}"),
        }
        match tokio::time::timeout(STEP_TIMEOUT, self.service.call_tool(params)).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(service_error(&step, e).into()),
            Err(_) => Err(timeout_error(&step).into()),
        }
    }

    /// `tools/call`: the structured content, else the text content parsed as JSON, else the text
    /// as a JSON string. A result flagged `isError` is an error.
    pub async fn call(&self, tool: &str, args: Value) -> anyhow::Result<Value> {
        let result = self.call_raw(tool, args).await?;
        let text: String = result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
            .collect::<Vec<_>>()
            .join("");
        if result.is_error == Some(true) {
            anyhow::bail!("tool {tool} returned an error: {text}");
        }
        if let Some(structured) = result.structured_content {
            return Ok(structured);
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Ends the session (rmcp sends `DELETE` with the session id).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.service.cancel()).await;
    }
}

/// initialize → tools/list → tools/call `tool` in a fresh session; returns the result as
/// [`McpSession::call`] does.
pub async fn call_tool(
    mcp_url: &str,
    bearer: &str,
    tool: &str,
    args: Value,
) -> anyhow::Result<Value> {
    let session = McpSession::connect(mcp_url, bearer).await?;
    let outcome = async {
        session.tools().await?;
        session.call(tool, args).await
    }
    .await;
    session.close().await;
    outcome
}

/// initialize → tools/list → tools/call `whoami` in a fresh session.
pub async fn whoami(mcp_url: &str, bearer: &str) -> anyhow::Result<WhoAmI> {
    let session = McpSession::connect(mcp_url, bearer).await?;
    let outcome = async {
        let tools = session.tools().await?;
        let value = session.call("whoami", Value::Null).await?;
        let mut who: WhoAmI = serde_json::from_value(value.clone())
            .map_err(|e| anyhow::anyhow!("whoami returned {value}: {e}"))?;
        who.tools = tools;
        Ok(who)
    }
    .await;
    session.close().await;
    outcome
}
