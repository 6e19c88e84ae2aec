//! `POST /oauth2/{as}/v1/token`: Okta's On-Behalf-Of Token Exchange (RFC 8693).
//!
//! Checks, in order: method and content type, the form, client authentication (secret, or a
//! `private_key_jwt` client assertion), the grant, the request parameters (`subject_token_type`,
//! the actor token, `requested_token_type`, `audience`, `resource`, `scope`), the subject token
//! (issuer known and trusted, signature, expiry, audience, subject), and finally the AS's
//! exchange policy for the client.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;

mod client_auth;

use client_auth::authenticate_client;

use super::client_jwt::{check_client_jwt, JwtRules};
use super::keys::parse_jws;
use super::{
    access_token_claims, now_secs, AccessTokenClaims, AsState, RecordedExchange, State,
    ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT,
};

/// What the HTTP layer hands over.
pub(crate) struct TokenHttpRequest<'a> {
    pub(crate) method: &'a str,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) authorization: Option<&'a str>,
    pub(crate) body: &'a [u8],
}

/// What goes back to the HTTP layer.
pub(crate) struct TokenOutcome {
    pub(crate) status: u16,
    /// JSON body.
    pub(crate) body: String,
    /// Add `WWW-Authenticate: Basic` (the client tried HTTP Basic and failed).
    pub(crate) www_authenticate_basic: bool,
    /// `Allow: POST` (405).
    pub(crate) allow_post: bool,
    pub(crate) record: RecordedExchange,
    /// For the log line: the OAuth error code, if any.
    pub(crate) error: Option<&'static str>,
}

/// An RFC 6749 §5.2 error response.
struct OAuthError {
    status: u16,
    error: &'static str,
    description: String,
    basic_challenge: bool,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", description)
    }

    fn invalid_client(description: impl Into<String>, basic_used: bool) -> Self {
        Self {
            basic_challenge: basic_used,
            ..Self::new(401, "invalid_client", description)
        }
    }

    fn invalid_subject_token() -> Self {
        Self::invalid_request("The 'subject_token' is invalid.")
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

#[derive(Serialize)]
struct SuccessBody<'a> {
    token_type: &'a str,
    expires_in: i64,
    access_token: &'a str,
    scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_token_type: Option<&'a str>,
}

impl TokenOutcome {
    /// A 200 with this JSON body.
    pub(crate) fn ok(body: String, record: RecordedExchange) -> Self {
        Self {
            status: 200,
            body,
            www_authenticate_basic: false,
            allow_post: false,
            record,
            error: None,
        }
    }

    /// An RFC 6749 §5.2 error.
    pub(crate) fn error(
        status: u16,
        error: &'static str,
        description: &str,
        record: RecordedExchange,
    ) -> Self {
        Self::refusal(OAuthError::new(status, error, description), record)
    }

    fn refusal(e: OAuthError, record: RecordedExchange) -> Self {
        let body = serde_json::to_string(&ErrorBody {
            error: e.error,
            error_description: &e.description,
        })
        .unwrap_or_else(|_| format!("{{\"error\":\"{}\"}}", e.error));
        Self {
            status: e.status,
            body,
            www_authenticate_basic: e.basic_challenge,
            allow_post: e.status == 405,
            record,
            error: Some(e.error),
        }
    }
}

/// A request's form fields, in order, and what was recorded of it.
pub(crate) type AuthenticatedForm = (Vec<(String, String)>, RecordedExchange);

/// The form of a request to another endpoint of the AS (introspection) and its authenticated
/// client, by the token endpoint's rules (POST, a form, each field once, one client
/// authentication); else the refusal to send.
pub(crate) fn authenticated_form(
    state: &State,
    server: &AsState,
    req: &TokenHttpRequest<'_>,
) -> Result<AuthenticatedForm, Box<TokenOutcome>> {
    let mut record = RecordedExchange {
        client_auth: "none".into(),
        content_type: req.content_type.map(str::to_string),
        ..RecordedExchange::default()
    };
    let form = match parse_form(req, &mut record) {
        Ok(form) => form,
        Err(e) => return Err(Box::new(TokenOutcome::refusal(e, record))),
    };
    match authenticate_client(
        state,
        server,
        req.authorization,
        &|n| form.param(n),
        &mut record,
    ) {
        Ok(_) => Ok((form.0, record)),
        Err(e) => Err(Box::new(TokenOutcome::refusal(e, record))),
    }
}

pub(crate) fn handle(state: &State, server: &AsState, req: &TokenHttpRequest<'_>) -> TokenOutcome {
    let mut record = RecordedExchange {
        client_auth: "none".into(),
        client_id: None,
        form: Vec::new(),
        content_type: req.content_type.map(str::to_string),
        host: None,
    };
    match exchange(state, server, req, &mut record) {
        Ok(body) => TokenOutcome::ok(body, record),
        Err(e) => TokenOutcome::refusal(e, record),
    }
}

/// The exchange in Okta's order: the HTTP request and its form, the client, the exchange's
/// parameters and subject token, the AS's policy for the client, and then the token. The first
/// failing check is the answer, so the order of the steps (and of the checks inside them) is what
/// decides which error a request with several faults gets.
fn exchange(
    state: &State,
    server: &AsState,
    req: &TokenHttpRequest<'_>,
    record: &mut RecordedExchange,
) -> Result<String, OAuthError> {
    let form = parse_form(req, record)?;
    let client = authenticate_client(state, server, req.authorization, &|n| form.param(n), record)?;
    let request = exchange_request(state, server, &client, &form)?;
    check_policy(server, &client, &request.scopes)?;
    issue(state, server, &client, request)
}

/// The fields of a token request's form, each at most once.
struct Form(Vec<(String, String)>);

impl Form {
    fn param(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A POST of a form, each field once. Records the fields (but the client secret) for the tests.
fn parse_form(
    req: &TokenHttpRequest<'_>,
    record: &mut RecordedExchange,
) -> Result<Form, OAuthError> {
    if req.method != "POST" {
        return Err(OAuthError::new(
            405,
            "invalid_request",
            "The endpoint only accepts POST.",
        ));
    }
    let is_form = req.content_type.is_some_and(|ct| {
        ct.split(';').next().is_some_and(|mt| {
            mt.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "The request must be sent as application/x-www-form-urlencoded.",
        ));
    }

    let form: Vec<(String, String)> = form_urlencoded::parse(req.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    record.form = form
        .iter()
        .filter(|(k, _)| k != "client_secret")
        .cloned()
        .collect();
    let mut seen = HashSet::new();
    for (k, _) in &form {
        if !seen.insert(k.as_str()) {
            return Err(OAuthError::invalid_request(format!(
                "The '{k}' parameter was included more than once."
            )));
        }
    }
    Ok(Form(form))
}

/// A token exchange the authenticated client may ask for, with its subject token verified.
struct ExchangeRequest<'f> {
    subject: Subject,
    /// The actor's id, when an actor token was sent and accepted.
    actor: Option<String>,
    /// The requested scopes, each once, in request order.
    scopes: Vec<&'f str>,
}

/// The grant and the exchange's parameters, then the subject token.
fn exchange_request<'f>(
    state: &State,
    server: &AsState,
    client: &Client,
    form: &'f Form,
) -> Result<ExchangeRequest<'f>, OAuthError> {
    check_grant(form, client)?;
    let subject_token = subject_token_param(form)?;
    let actor = actor(
        state,
        server,
        client,
        form.param("actor_token"),
        form.param("actor_token_type"),
    )?;
    check_target(server, form)?;
    let scopes = requested_scopes(server, form)?;
    let subject = verify_subject_token(state, server, subject_token)?;
    Ok(ExchangeRequest {
        subject,
        actor,
        scopes,
    })
}

/// RFC 8693 token exchange, which the client must be allowed to use.
fn check_grant(form: &Form, client: &Client) -> Result<(), OAuthError> {
    match form.param("grant_type") {
        None | Some("") => {
            return Err(OAuthError::invalid_request(
                "The 'grant_type' parameter is required.",
            ))
        }
        Some(TOKEN_EXCHANGE_GRANT) => {}
        Some(_) => {
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                format!(
                    "The authorization grant type is not supported by the authorization server. \
                     Configured grant types: [{TOKEN_EXCHANGE_GRANT}]."
                ),
            ))
        }
    }
    if !client.token_exchange_enabled {
        return Err(OAuthError::new(
            400,
            "unauthorized_client",
            "The client is not authorized to use the provided grant type.",
        ));
    }
    Ok(())
}

/// The subject token (not yet verified), of the one type Okta exchanges.
fn subject_token_param(form: &Form) -> Result<&str, OAuthError> {
    match form.param("subject_token_type") {
        None | Some("") => {
            return Err(OAuthError::invalid_request(
                "The 'subject_token_type' parameter is required.",
            ))
        }
        Some(ACCESS_TOKEN_TYPE) => {}
        Some(_) => {
            return Err(OAuthError::invalid_request(format!(
                "The 'subject_token_type' is not supported; it must be {ACCESS_TOKEN_TYPE}."
            )))
        }
    }
    match form.param("subject_token") {
        None | Some("") => Err(OAuthError::invalid_request(
            "The 'subject_token' parameter is required.",
        )),
        Some(t) => Ok(t),
    }
}

/// What is asked for: an access token for this AS's audience (`audience`, and `resource` if
/// sent).
fn check_target(server: &AsState, form: &Form) -> Result<(), OAuthError> {
    if let Some(t) = form.param("requested_token_type") {
        if t != ACCESS_TOKEN_TYPE {
            return Err(OAuthError::invalid_request(format!(
                "The 'requested_token_type' is not supported; it must be {ACCESS_TOKEN_TYPE}."
            )));
        }
    }
    let audience = &server.config.audience;
    match form.param("audience") {
        None | Some("") => {
            return Err(OAuthError::invalid_request(
                "The 'audience' parameter is required.",
            ))
        }
        Some(a) if a == audience => {}
        Some(_) => {
            return Err(OAuthError::new(
                400,
                "invalid_target",
                "The 'audience' is not the audience of this authorization server.",
            ))
        }
    }
    if let Some(r) = form.param("resource") {
        if r != audience {
            return Err(OAuthError::new(
                400,
                "invalid_target",
                "The 'resource' is not the audience of this authorization server.",
            ));
        }
    }
    Ok(())
}

/// The `scope` parameter's scopes, each once: at least one, all configured at this AS, and none
/// that a token exchange cannot grant.
fn requested_scopes<'f>(server: &AsState, form: &'f Form) -> Result<Vec<&'f str>, OAuthError> {
    let mut scopes: Vec<&str> = Vec::new();
    for s in form
        .param("scope")
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
    {
        if !scopes.contains(&s) {
            scopes.push(s);
        }
    }
    if scopes.is_empty() {
        return Err(OAuthError::new(
            400,
            "invalid_scope",
            "The 'scope' parameter is required for a token exchange.",
        ));
    }
    for s in &scopes {
        if *s == "openid" || *s == "offline_access" {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                format!("The scope '{s}' cannot be requested in a token exchange."),
            ));
        }
        if !server.config.scopes.iter().any(|d| d == s) {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                "One or more scopes are not configured for the authorization server resource.",
            ));
        }
    }
    Ok(scopes)
}

/// The AS's exchange policy: one for the client, granting every requested scope.
fn check_policy(server: &AsState, client: &Client, scopes: &[&str]) -> Result<(), OAuthError> {
    let denied = || {
        OAuthError::new(
            400,
            "access_denied",
            "Policy evaluation failed for this request, please check the policy configurations.",
        )
    };
    let policy = server
        .config
        .exchange_policies
        .iter()
        .find(|p| p.client_id == client.client_id)
        .ok_or_else(denied)?;
    if !scopes.iter().all(|s| policy.scopes.iter().any(|p| p == s)) {
        return Err(denied());
    }
    Ok(())
}

/// The backend token for the subject, signed by this AS, and the success body around it.
fn issue(
    state: &State,
    server: &AsState,
    client: &Client,
    request: ExchangeRequest<'_>,
) -> Result<String, OAuthError> {
    let ExchangeRequest {
        subject,
        actor,
        scopes,
    } = request;
    let now = now_secs();
    let ttl = state.config.exchange_ttl_secs;
    let mut claims = access_token_claims(AccessTokenClaims {
        issuer: &server.issuer,
        audience: &server.config.audience,
        iat: now,
        exp: now.saturating_add(ttl),
        client_id: &client.client_id,
        uid: subject.uid.as_deref(),
        scopes: ("scp", Value::from(scopes.clone())),
        sub: &subject.sub,
    });
    if let Some(actor) = actor {
        // RFC 8693 §4.1: the party acting on behalf of the subject.
        claims.insert("act".into(), serde_json::json!({ "sub": actor }));
    }
    let token = server
        .signing_key()
        .sign_claims(&claims)
        .map_err(|_| OAuthError::new(500, "server_error", "The token could not be signed."))?;
    let granted = scopes.join(" ");
    let body = SuccessBody {
        token_type: "Bearer",
        expires_in: ttl,
        access_token: &token,
        scope: &granted,
        issued_token_type: (!state.config.omit_issued_token_type).then_some(ACCESS_TOKEN_TYPE),
    };
    serde_json::to_string(&body)
        .map_err(|_| OAuthError::new(500, "server_error", "The response could not be encoded."))
}

/// The authenticated client.
struct Client {
    client_id: String,
    token_exchange_enabled: bool,
}

/// `aud` values a client-signed JWT may carry at this AS: the token endpoint URL (what RFC 7523
/// and Okta ask for) or the AS issuer (which Okta accepts too).
fn client_jwt_audiences(server: &AsState) -> [String; 2] {
    [format!("{}/v1/token", server.issuer), server.issuer.clone()]
}

/// The RFC 8693 actor token, if one was sent and is acceptable: the actor's id (the
/// authenticated client's). Okta refuses actor tokens altogether; with
/// [`super::IdpConfig::accept_actor_tokens`] the IdP accepts a JWT the client signed itself.
fn actor(
    state: &State,
    server: &AsState,
    client: &Client,
    token: Option<&str>,
    token_type: Option<&str>,
) -> Result<Option<String>, OAuthError> {
    if token.is_none() && token_type.is_none() {
        return Ok(None);
    }
    if !state.config.accept_actor_tokens {
        return Err(OAuthError::invalid_request(
            "Actor tokens are not supported for this token exchange.",
        ));
    }
    let token = match (token, token_type) {
        (None | Some(""), _) => {
            return Err(OAuthError::invalid_request(
                "The 'actor_token_type' parameter must not be sent without an 'actor_token'.",
            ))
        }
        (Some(_), None | Some("")) => {
            return Err(OAuthError::invalid_request(
                "The 'actor_token_type' parameter is required with an 'actor_token'.",
            ))
        }
        (Some(t), Some(JWT_TOKEN_TYPE)) => t,
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_request(format!(
                "The 'actor_token_type' is not supported; it must be {JWT_TOKEN_TYPE}."
            )))
        }
    };
    let Some(keys) = state.client_keys.get(&client.client_id) else {
        return Err(OAuthError::invalid_request(
            "The 'actor_token' cannot be verified: the client has no registered keys.",
        ));
    };
    let audiences = client_jwt_audiences(server);
    check_client_jwt(
        keys,
        token,
        &JwtRules {
            client_id: &client.client_id,
            audiences: &audiences,
            now: now_secs(),
            max_lifetime_secs: None,
            require_jti: false,
        },
    )
    .map_err(|why| OAuthError::invalid_request(format!("The 'actor_token' is invalid: {why}.")))?;
    Ok(Some(client.client_id.clone()))
}

/// The parts of a verified subject token the new token carries over.
struct Subject {
    sub: String,
    uid: Option<String>,
}

fn verify_subject_token(
    state: &State,
    server: &AsState,
    token: &str,
) -> Result<Subject, OAuthError> {
    if let Some(opaque) = state.introspection.get(token) {
        return opaque_subject(state, server, &opaque);
    }
    let jws = parse_jws(token).ok_or_else(OAuthError::invalid_subject_token)?;
    if jws.header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(OAuthError::invalid_subject_token());
    }
    let kid = jws
        .header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    let issuer = jws
        .claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    let issuing = state
        .server_by_issuer(issuer)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    if !server.trusts(&issuing.config.id) {
        return Err(OAuthError::new(
            403,
            "access_denied",
            "The subject token's issuer is not a trusted server of this authorization server.",
        ));
    }
    let key = issuing
        .key_by_kid(kid)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    if !key.verify(jws.signing_input.as_bytes(), &jws.signature) {
        return Err(OAuthError::invalid_subject_token());
    }

    let now = now_secs();
    let exp = jws
        .claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    if exp <= now {
        return Err(OAuthError::new(
            400,
            "invalid_grant",
            "The 'subject_token' is expired.",
        ));
    }
    if let Some(nbf) = jws.claims.get("nbf") {
        if nbf.as_i64().is_none_or(|nbf| nbf > now) {
            return Err(OAuthError::invalid_subject_token());
        }
    }
    let aud_ok = match jws.claims.get("aud") {
        Some(Value::String(a)) => *a == issuing.config.audience,
        Some(Value::Array(list)) => list
            .iter()
            .any(|a| a.as_str() == Some(issuing.config.audience.as_str())),
        _ => false,
    };
    if !aud_ok {
        return Err(OAuthError::invalid_subject_token());
    }
    let sub = jws
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(OAuthError::invalid_subject_token)?;
    let uid = jws.claims.get("uid").and_then(Value::as_str);
    Ok(Subject {
        sub: sub.to_string(),
        uid: uid.map(str::to_string),
    })
}

/// One of the IdP's opaque access tokens as a subject token: what its introspection says, by
/// the same rules as a JWT's claims (issuer trusted, active, the issuing AS's audience).
fn opaque_subject(
    state: &State,
    server: &AsState,
    token: &super::introspect::OpaqueToken,
) -> Result<Subject, OAuthError> {
    let issuing = state
        .servers
        .get(&token.as_id)
        .ok_or_else(OAuthError::invalid_subject_token)?;
    if !server.trusts(&issuing.config.id) {
        return Err(OAuthError::new(
            403,
            "access_denied",
            "The subject token's issuer is not a trusted server of this authorization server.",
        ));
    }
    if !token.is_active(now_secs()) {
        return Err(OAuthError::new(
            400,
            "invalid_grant",
            "The 'subject_token' is expired or revoked.",
        ));
    }
    if token.aud != issuing.config.audience || token.sub.is_empty() {
        return Err(OAuthError::invalid_subject_token());
    }
    Ok(Subject {
        sub: token.sub.clone(),
        uid: Some(super::user_id_for(&token.sub)),
    })
}
