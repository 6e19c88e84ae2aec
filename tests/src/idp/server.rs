//! HTTP/1.1 plumbing: accept loop, routing, fault injection, the admin API, logging.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, PRAGMA, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::introspect;
use super::token::{self, TokenHttpRequest, TokenOutcome};
use super::{AsState, Endpoint, Fault, MintRequest, ScopeStyle, State, TOKEN_EXCHANGE_GRANT};

/// Largest request body read (token requests are a few KiB).
const MAX_BODY: usize = 64 * 1024;

type Resp = Response<Full<Bytes>>;

/// Returned by the service to make hyper drop the connection without answering.
#[derive(Debug)]
struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}

impl std::error::Error for ResetConnection {}

/// Accepts until aborted; aborting also drops every open connection.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("okta-idp: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connections.spawn(connection(stream, state.clone()));
    }
}

async fn connection(stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket, so a `Reset` fault can set SO_LINGER=0 after hyper has
    // taken the stream: when both are closed, the kernel sends RST instead of FIN.
    let (stream, raw) = match split_handle(stream) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("okta-idp: connection setup failed: {e}");
            return;
        }
    };
    let raw = Arc::new(raw);
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let raw = raw.clone();
        async move { route(state, raw, req).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn split_handle(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let raw = std_stream.try_clone()?;
    std_stream.set_nonblocking(true)?;
    Ok((TcpStream::from_std(std_stream)?, raw))
}

async fn route(
    state: Arc<State>,
    raw: Arc<std::net::TcpStream>,
    req: Request<Incoming>,
) -> Result<Resp, ResetConnection> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let result = dispatch(&state, &raw, req).await;
    if state.config.log_requests {
        let ms = started.elapsed().as_millis();
        match &result {
            Ok((resp, note)) => {
                let note = note.as_deref().map(|n| format!(" {n}")).unwrap_or_default();
                eprintln!(
                    "okta-idp: {method} {path} -> {}{note} ({ms} ms)",
                    resp.status().as_u16()
                );
            }
            Err(_) => eprintln!("okta-idp: {method} {path} -> connection reset (fault) ({ms} ms)"),
        }
    }
    result.map(|(resp, _)| resp)
}

/// The response and a note for the log line (never a token or secret).
type Routed = Result<(Resp, Option<String>), ResetConnection>;

async fn dispatch(state: &Arc<State>, raw: &std::net::TcpStream, req: Request<Incoming>) -> Routed {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/__admin/") {
        let rest = rest.to_string();
        return Ok((admin(state, &rest, req).await, None));
    }
    if let Some(tenant) = &state.entra {
        let prefix = format!("/{}/", tenant.config.tenant);
        if let Some(endpoint) = path.strip_prefix(&prefix) {
            return entra_endpoint(state, tenant, endpoint, raw, req).await;
        }
    }
    if let Some(realm) = &state.keycloak {
        let prefix = format!("/realms/{}/protocol/openid-connect/", realm.config.realm);
        if let Some(endpoint) = path.strip_prefix(&prefix) {
            return keycloak_endpoint(state, realm, endpoint, raw, req).await;
        }
    }
    let Some(rest) = path.strip_prefix("/oauth2/") else {
        return Ok((not_found(&path), None));
    };
    let (as_id, endpoint) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(server) = state.servers.get(as_id) else {
        return Ok((okta_not_found(as_id), None));
    };
    match endpoint {
        "v1/token" => token_endpoint(state, server, raw, req).await,
        "v1/introspect" => introspect_endpoint(state, server, raw, req).await,
        "v1/keys" => {
            state.count_keys_request(server);
            if let Some(resp) = apply_fault(state.fault(&Endpoint::Keys(as_id.into())), raw).await?
            {
                return Ok((resp, Some("(fault)".into())));
            }
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return Ok((method_not_allowed("GET"), None));
            }
            Ok((keys_response(state, server), None))
        }
        ".well-known/oauth-authorization-server" | ".well-known/openid-configuration" => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return Ok((method_not_allowed("GET"), None));
            }
            let oidc = endpoint.ends_with("openid-configuration");
            Ok((metadata_response(state, server, oidc), None))
        }
        _ => Ok((not_found(&path), None)),
    }
}

/// What a form endpoint (`/v1/token`, `/v1/introspect`) reads of a request: method,
/// `Content-Type`, `Authorization`, `Host`, and the body (`None`: unreadable or too large).
struct FormRequest {
    method: String,
    content_type: Option<String>,
    authorization: Option<String>,
    host: Option<String>,
    body: Option<Bytes>,
}

impl FormRequest {
    async fn read(req: Request<Incoming>) -> Self {
        let header = |name: hyper::header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (content_type, authorization) =
            (header(CONTENT_TYPE), header(hyper::header::AUTHORIZATION));
        let host = header(hyper::header::HOST);
        let method = req.method().as_str().to_string();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => Some(collected.to_bytes()),
            Err(_) => None,
        };
        Self {
            method,
            content_type,
            authorization,
            host,
            body,
        }
    }

    /// The endpoint's outcome, `None` if the body could not be read; recorded with the `Host`.
    fn handle(
        &self,
        handler: impl FnOnce(&TokenHttpRequest<'_>) -> TokenOutcome,
    ) -> Option<TokenOutcome> {
        let body = self.body.as_ref()?;
        let mut outcome = handler(&TokenHttpRequest {
            method: &self.method,
            content_type: self.content_type.as_deref(),
            authorization: self.authorization.as_deref(),
            body,
        });
        outcome.record.host = self.host.clone();
        Some(outcome)
    }
}

async fn token_endpoint(
    state: &State,
    server: &AsState,
    raw: &std::net::TcpStream,
    req: Request<Incoming>,
) -> Routed {
    state.count_token_request();
    let (handler, record) = (token::handle, State::record_exchange);
    form_endpoint(state, server, raw, req, Endpoint::Token, handler, record).await
}

/// `POST /oauth2/{as_id}/v1/introspect` (RFC 7662, see `introspect`).
async fn introspect_endpoint(
    state: &State,
    server: &AsState,
    raw: &std::net::TcpStream,
    req: Request<Incoming>,
) -> Routed {
    state.count_introspection();
    let (handler, record) = (introspect::handle, State::record_introspection);
    form_endpoint(
        state,
        server,
        raw,
        req,
        Endpoint::Introspect,
        handler,
        record,
    )
    .await
}

/// The token and introspection endpoints' common course: read the form, answer it with
/// `handler`, `record` the request, then let a fault set on `endpoint` replace the answer.
async fn form_endpoint(
    state: &State,
    server: &AsState,
    raw: &std::net::TcpStream,
    req: Request<Incoming>,
    endpoint: Endpoint,
    handler: fn(&State, &AsState, &TokenHttpRequest<'_>) -> TokenOutcome,
    record: fn(&State, super::RecordedExchange),
) -> Routed {
    let request = FormRequest::read(req).await;
    let outcome = request.handle(|r| handler(state, server, r));
    if let Some(outcome) = &outcome {
        record(state, outcome.record.clone());
    }
    if let Some(resp) = apply_fault(state.fault(&endpoint), raw).await? {
        return Ok((resp, Some("(fault)".into())));
    }
    Ok(outcome_response(outcome))
}

/// A form endpoint's answer and its log note.
fn outcome_response(outcome: Option<TokenOutcome>) -> (Resp, Option<String>) {
    let Some(outcome) = outcome else {
        return (
            oauth_json(
                400,
                json!({"error": "invalid_request", "error_description": "The request body could not be read or is too large."}).to_string(),
            ),
            Some("invalid_request (body)".into()),
        );
    };
    let mut resp = oauth_json(outcome.status, outcome.body);
    if outcome.www_authenticate_basic {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"okta-idp\""),
        );
    }
    if outcome.allow_post {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
    }
    let mut note = format!(
        "auth={} client={}",
        outcome.record.client_auth,
        outcome.record.client_id.as_deref().unwrap_or("-")
    );
    if let Some(error) = outcome.error {
        note.push_str(&format!(" error={error}"));
    }
    (resp, Some(note))
}

/// The Keycloak realm's endpoints: `certs`, `token` and `token/introspect`.
async fn keycloak_endpoint(
    state: &State,
    realm: &super::keycloak::KeycloakState,
    endpoint: &str,
    raw: &std::net::TcpStream,
    req: Request<Incoming>,
) -> Routed {
    match (endpoint, req.method().clone()) {
        ("certs", Method::GET) => Ok((cacheable(state, json_response(200, &realm.certs())), None)),
        ("token", Method::POST) => {
            let (authorization, form) = recorded_form(state, req).await;
            if let Some(resp) = apply_fault(state.fault(&Endpoint::Token), raw).await? {
                return Ok((resp, Some("(fault)".into())));
            }
            let (status, body) = realm.token(authorization.as_deref(), &form);
            let note = body["error"]
                .as_str()
                .map(|e| format!("keycloak error={e}"));
            Ok((oauth_json(status, body.to_string()), note))
        }
        ("token/introspect", Method::POST) => {
            state.count_introspection();
            let request = FormRequest::read(req).await;
            let body = request.body.clone().unwrap_or_default();
            let form = parse_form(&body);
            state.record_introspection(form_record(
                request.authorization.is_some(),
                &form,
                request.content_type.clone(),
                request.host.clone(),
            ));
            if let Some(resp) = apply_fault(state.fault(&Endpoint::Introspect), raw).await? {
                return Ok((resp, Some("(fault)".into())));
            }
            let (status, body) = realm.introspect(request.authorization.as_deref(), &form);
            let note = body["error"]
                .as_str()
                .map(|e| format!("keycloak error={e}"));
            Ok((oauth_json(status, body.to_string()), note))
        }
        ("certs", _) => Ok((method_not_allowed("GET"), None)),
        ("token" | "token/introspect", _) => Ok((method_not_allowed("POST"), None)),
        _ => Ok((not_found(endpoint), None)),
    }
}

/// A token request's `Authorization` and form, counted and recorded like `/v1/token`'s.
async fn recorded_form(
    state: &State,
    req: Request<Incoming>,
) -> (Option<String>, Vec<(String, String)>) {
    state.count_token_request();
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let authorization = header(hyper::header::AUTHORIZATION);
    let content_type = header(CONTENT_TYPE);
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let form = parse_form(&body);
    state.record_exchange(form_record(
        authorization.is_some(),
        &form,
        content_type,
        None,
    ));
    (authorization, form)
}

/// A form body's pairs, in order.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// How a Keycloak realm request is recorded: Basic when it has an `Authorization`, else the
/// secret in the form; the form without `client_secret`.
fn form_record(
    basic: bool,
    form: &[(String, String)],
    content_type: Option<String>,
    host: Option<String>,
) -> super::RecordedExchange {
    super::RecordedExchange {
        client_auth: if basic {
            "client_secret_basic".into()
        } else {
            "client_secret_post".into()
        },
        client_id: form
            .iter()
            .find(|(k, _)| k == "client_id")
            .map(|(_, v)| v.clone()),
        form: form
            .iter()
            .filter(|(k, _)| k != "client_secret")
            .cloned()
            .collect(),
        content_type,
        host,
    }
}

/// The Entra ID tenant's endpoints: `discovery/v2.0/keys` and `oauth2/v2.0/token`.
async fn entra_endpoint(
    state: &State,
    tenant: &super::entra::EntraState,
    endpoint: &str,
    raw: &std::net::TcpStream,
    req: Request<Incoming>,
) -> Routed {
    match (endpoint, req.method().clone()) {
        ("discovery/v2.0/keys", Method::GET) => {
            Ok((cacheable(state, json_response(200, &tenant.jwks())), None))
        }
        ("oauth2/v2.0/token", Method::POST) => {
            let (authorization, form) = recorded_form(state, req).await;
            if let Some(resp) = apply_fault(state.fault(&Endpoint::Token), raw).await? {
                return Ok((resp, Some("(fault)".into())));
            }
            let (status, body) =
                tenant.token(&state.config.clients, authorization.as_deref(), &form);
            let note = body["error"].as_str().map(|e| format!("entra error={e}"));
            Ok((oauth_json(status, body.to_string()), note))
        }
        ("discovery/v2.0/keys", _) => Ok((method_not_allowed("GET"), None)),
        ("oauth2/v2.0/token", _) => Ok((method_not_allowed("POST"), None)),
        _ => Ok((not_found(endpoint), None)),
    }
}

/// `Ok(Some(resp))`: answer this instead; `Ok(None)`: go on normally (possibly after a delay).
async fn apply_fault(
    fault: Option<Fault>,
    raw: &std::net::TcpStream,
) -> Result<Option<Resp>, ResetConnection> {
    match fault {
        None => Ok(None),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            Ok(None)
        }
        Some(Fault::Status(status)) => Ok(Some(text(
            status,
            format!("injected fault: HTTP {status}\n"),
        ))),
        Some(Fault::Reset) => {
            let _ = socket2::SockRef::from(raw).set_linger(Some(Duration::ZERO));
            Err(ResetConnection)
        }
        Some(Fault::MalformedBody) => Ok(Some(response(
            200,
            "application/json",
            "{\"token_type\":\"Bearer\",\"access_token\":<html>not json".into(),
        ))),
        Some(Fault::Respond {
            status,
            content_type,
            body,
        }) => Ok(Some(response(status, &content_type, body))),
    }
}

fn response(status: u16, content_type: &str, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(ct) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp
}

fn text(status: u16, body: String) -> Resp {
    response(status, "text/plain; charset=utf-8", body)
}

fn json_response(status: u16, body: &Value) -> Resp {
    response(status, "application/json", body.to_string())
}

/// JSON with the no-store headers RFC 6749 requires for token responses.
fn oauth_json(status: u16, body: String) -> Resp {
    let mut resp = response(status, "application/json", body);
    let headers = resp.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn cacheable(state: &State, mut resp: Resp) -> Resp {
    let value = format!(
        "max-age={}, must-revalidate",
        state.config.keys_max_age_secs
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(CACHE_CONTROL, v);
    }
    resp
}

fn keys_response(state: &State, server: &AsState) -> Resp {
    cacheable(state, json_response(200, &server.jwks()))
}

fn metadata_response(state: &State, server: &AsState, oidc: bool) -> Resp {
    let issuer = &server.issuer;
    let mut doc = json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/v1/token"),
        "jwks_uri": format!("{issuer}/v1/keys"),
        "response_types_supported": [],
        "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
        "scopes_supported": server.config.scopes,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
        "claims_supported": ["ver", "jti", "iss", "aud", "iat", "exp", "cid", "uid", "scp", "sub"],
    });
    if oidc {
        if let Some(map) = doc.as_object_mut() {
            map.insert("subject_types_supported".into(), json!(["public"]));
            map.insert(
                "id_token_signing_alg_values_supported".into(),
                json!(["RS256"]),
            );
        }
    }
    cacheable(state, json_response(200, &doc))
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut resp = text(405, "method not allowed\n".into());
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

fn not_found(path: &str) -> Resp {
    json_response(
        404,
        &json!({
            "errorCode": "E0000022",
            "errorSummary": format!("The endpoint does not support the provided HTTP method or path: {path}"),
            "errorCauses": [],
        }),
    )
}

/// Okta's answer for an authorization server that does not exist.
fn okta_not_found(as_id: &str) -> Resp {
    json_response(
        404,
        &json!({
            "errorCode": "E0000007",
            "errorSummary": format!("Not found: Resource not found: {as_id} (AuthorizationServer)"),
            "errorCauses": [],
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Admin API (test-only, outside Okta's paths)

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct AdminMint {
    as_id: Option<String>,
    sub: Option<String>,
    aud: Option<String>,
    scopes: Option<Vec<String>>,
    scope_style: Option<String>,
    ttl_secs: Option<i64>,
    extra: Option<Map<String, Value>>,
    /// An opaque token (answered by `/v1/introspect`) instead of a JWT.
    opaque: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminRevoke {
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFault {
    endpoint: String,
    fault: AdminFaultKind,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum AdminFaultKind {
    Delay {
        ms: u64,
    },
    Status {
        status: u16,
    },
    Reset,
    MalformedBody,
    Respond {
        status: u16,
        #[serde(default = "default_content_type")]
        content_type: String,
        #[serde(default)]
        body: String,
    },
}

fn default_content_type() -> String {
    "application/json".into()
}

/// A JSON admin request body; an empty body is `{}`.
fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

fn admin_error(status: u16, message: impl fmt::Display) -> Resp {
    json_response(status, &json!({ "error": message.to_string() }))
}

async fn admin(state: &Arc<State>, rest: &str, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return admin_error(400, "request body unreadable or too large"),
    };
    match (method, rest) {
        (Method::POST, "mint") => {
            let m: AdminMint = match parse_json(&body) {
                Ok(m) => m,
                Err(e) => return admin_error(400, e),
            };
            let defaults = MintRequest::default();
            let scope_style = match m.scope_style.as_deref() {
                None | Some("scp") => ScopeStyle::Scp,
                Some("scope") => ScopeStyle::Scope,
                Some(other) => {
                    return admin_error(
                        400,
                        format!("scope_style must be scp or scope, not {other:?}"),
                    )
                }
            };
            let mint = MintRequest {
                as_id: m.as_id.unwrap_or(defaults.as_id),
                sub: m.sub.unwrap_or(defaults.sub),
                aud: m.aud,
                scopes: m.scopes.unwrap_or(defaults.scopes),
                scope_style,
                ttl_secs: m.ttl_secs.unwrap_or(defaults.ttl_secs),
                extra: m.extra.unwrap_or_default(),
            };
            let minted = match m.opaque {
                Some(true) => state.mint_opaque(&mint),
                _ => state.mint(&mint),
            };
            match minted {
                Ok(token) => json_response(200, &json!({ "access_token": token })),
                Err(e) => admin_error(400, format!("{e:#}")),
            }
        }
        (Method::GET, "stats") => json_response(200, &state.stats()),
        (Method::POST, "revoke") => {
            let r: AdminRevoke = match parse_json(&body) {
                Ok(r) => r,
                Err(e) => return admin_error(400, e),
            };
            match state.revoke(&r.token) {
                true => json_response(200, &json!({ "ok": true })),
                false => admin_error(404, "no opaque token issued by this IdP"),
            }
        }
        (Method::POST, "faults") => {
            let f: AdminFault = match parse_json(&body) {
                Ok(f) => f,
                Err(e) => return admin_error(400, e),
            };
            let endpoint = match f.endpoint.as_str() {
                "token" => Endpoint::Token,
                "introspect" => Endpoint::Introspect,
                other => match other.strip_prefix("keys:") {
                    Some(id) if state.servers.contains_key(id) => Endpoint::Keys(id.into()),
                    _ => {
                        return admin_error(
                            400,
                            format!(
                                "endpoint must be \"token\", \"introspect\" or \"keys:<as_id>\", not {other:?}"
                            ),
                        )
                    }
                },
            };
            let fault = match f.fault {
                AdminFaultKind::Delay { ms } => Fault::Delay(Duration::from_millis(ms)),
                AdminFaultKind::Status { status } => Fault::Status(status),
                AdminFaultKind::Reset => Fault::Reset,
                AdminFaultKind::MalformedBody => Fault::MalformedBody,
                AdminFaultKind::Respond {
                    status,
                    content_type,
                    body,
                } => Fault::Respond {
                    status,
                    content_type,
                    body,
                },
            };
            state.set_fault(endpoint, fault);
            json_response(200, &json!({ "ok": true }))
        }
        (Method::DELETE, "faults") => {
            state.clear_faults();
            json_response(200, &json!({ "ok": true }))
        }
        (Method::POST, path) if path.starts_with("rotate/") => {
            let as_id = path.trim_start_matches("rotate/").to_string();
            if !state.servers.contains_key(&as_id) {
                return admin_error(404, format!("unknown authorization server {as_id:?}"));
            }
            // Key generation is CPU-bound; keep the runtime responsive.
            let state = state.clone();
            match tokio::task::spawn_blocking(move || state.rotate(&as_id)).await {
                Ok(Ok(kid)) => json_response(200, &json!({ "kid": kid })),
                Ok(Err(e)) => admin_error(500, format!("{e:#}")),
                Err(e) => admin_error(500, e),
            }
        }
        _ => admin_error(404, format!("no admin endpoint {rest:?} for this method")),
    }
}
