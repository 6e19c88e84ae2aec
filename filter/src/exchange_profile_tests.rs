//! Exchange profiles beyond RFC 8693: Entra ID's on-behalf-of request, and how its answers and
//! errors land in the answer table. The wire facts are Microsoft's documented ones
//! (v2-oauth2-on-behalf-of-flow, reference-error-codes, claims-challenge), not the filter's.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use crate::config::{ClientAuth, ExchangeProfile, ExchangeTarget};
use crate::exchange::tests::{form, target};
use crate::exchange::{parse_response, ExchangeError, ExchangeRequest};
use crate::reply::Denial;

fn obo(auth: ClientAuth) -> ExchangeTarget {
    let mut t = target(auth);
    t.profile = ExchangeProfile::EntraObo;
    t.path = "/tenant-1/oauth2/v2.0/token".into();
    t.audience = None;
    t.scope = Some("api://backend/.default".into());
    t.with_identity()
}

#[test]
fn the_on_behalf_of_request_is_a_jwt_bearer_grant_with_the_token_as_assertion() {
    let r = ExchangeRequest::build(&obo(ClientAuth::ClientSecretPost), "eyJ.user.token", 0, "n")
        .unwrap();
    let fields = form(&r.body);
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "grant_type",
            "assertion",
            "requested_token_use",
            "scope",
            "client_id",
            "client_secret"
        ]
    );
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        get("grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(get("assertion"), Some("eyJ.user.token"));
    assert_eq!(get("requested_token_use"), Some("on_behalf_of"));
    assert_eq!(get("scope"), Some("api://backend/.default"));
    assert!(get("subject_token").is_none() && get("audience").is_none());
    let path = r
        .headers
        .iter()
        .find(|(k, _)| *k == ":path")
        .map(|(_, v)| v.as_str());
    assert_eq!(path, Some("/tenant-1/oauth2/v2.0/token"));
    // Basic authentication keeps the secret out of the body, as for RFC 8693.
    let basic = ExchangeRequest::build(&obo(ClientAuth::ClientSecretBasic), "t", 0, "n").unwrap();
    assert!(form(&basic.body).iter().all(|(k, _)| k != "client_secret"));
}

#[test]
fn profiles_never_share_cached_tokens() {
    let rfc = target(ClientAuth::ClientSecretPost);
    let mut same_fields = rfc.clone();
    same_fields.profile = ExchangeProfile::EntraObo;
    assert_ne!(rfc.cache_identity(), same_fields.cache_identity());
}

#[test]
fn an_entra_obo_answer_is_a_backend_token() {
    let body = json!({"token_type": "Bearer", "scope": "api://backend/read", "expires_in": 3599,
                      "ext_expires_in": 3599, "access_token": "eyJ.backend.token"})
    .to_string();
    let exchanged = parse_response(Some(200), body.as_bytes(), None).unwrap();
    assert_eq!(exchanged.access_token, "eyJ.backend.token");
    assert_eq!(exchanged.expires_in, Some(3599));
}

fn entra_error(status: u16, error: &str, codes: &[u64], claims: Option<&str>) -> ExchangeError {
    let mut body = json!({"error": error,
        "error_description": "AADSTS00000: described. Trace ID: x Correlation ID: y",
        "error_codes": codes, "timestamp": "2026-12-05 13:00:00Z",
        "trace_id": "x", "correlation_id": "y"});
    if let Some(c) = claims {
        body["claims"] = json!(c);
    }
    parse_response(Some(status), body.to_string().as_bytes(), None).unwrap_err()
}

const CLAIMS: &str = r#"{"access_token":{"capolids":{"essential":true,"values":["c1"]}}}"#;

#[test]
fn entra_errors_land_in_the_answer_table() {
    use ExchangeError::*;
    let interaction = |claims: Option<&str>| InteractionRequired {
        code: "interaction_required".into(),
        claims: claims.map(str::to_string),
    };
    assert_eq!(
        entra_error(400, "interaction_required", &[50079], Some(CLAIMS)),
        interaction(Some(CLAIMS))
    );
    assert_eq!(
        entra_error(400, "interaction_required", &[50076], None),
        interaction(None)
    );
    assert!(matches!(
        entra_error(400, "invalid_grant", &[50079], Some(CLAIMS)),
        InteractionRequired {
            claims: Some(_),
            ..
        }
    ));
    assert!(matches!(
        entra_error(400, "consent_required", &[65001], Some(CLAIMS)),
        InteractionRequired {
            claims: Some(_),
            ..
        }
    ));
    // Consent missing, sent as invalid_grant: an admin's to grant, not a bad token.
    assert!(matches!(
        entra_error(400, "invalid_grant", &[65001], None),
        TargetRefused { .. }
    ));
    assert!(matches!(
        entra_error(400, "consent_required", &[], None),
        TargetRefused { .. }
    ));
    // A bad or expired assertion is the client's token.
    for code in [50013, 500133] {
        assert!(matches!(
            entra_error(400, "invalid_grant", &[code], None),
            SubjectRejected { .. }
        ));
    }
    // RFC 8693 sent to Entra ID (AADSTS70003), or a wrong secret: the operator's.
    assert!(matches!(
        entra_error(400, "unsupported_grant_type", &[70003], None),
        GatewayMisconfigured { .. }
    ));
    assert!(matches!(
        entra_error(401, "invalid_client", &[7000215], None),
        GatewayMisconfigured { .. }
    ));
    // An oversized challenge is not relayed; the user still gets sent back to sign in.
    let huge = format!(r#"{{"access_token":{{"x":"{}"}}}}"#, "a".repeat(4096));
    assert_eq!(
        entra_error(400, "interaction_required", &[50079], Some(&huge)),
        interaction(None)
    );
    // `error_codes` of another shape is ignored, not trusted.
    assert!(matches!(
        parse_response(
            Some(400),
            br#"{"error":"invalid_grant","error_codes":"65001"}"#,
            None
        ),
        Err(SubjectRejected { .. })
    ));
}

#[test]
fn interaction_required_is_a_401_relaying_the_claims_challenge() {
    let cfg = crate::config::ChallengeConfig {
        realm: Some("mcp".into()),
        resource_metadata_url: None,
    };
    let header = |d: &Denial| {
        let r = d.reply(&cfg, &["mcp:tools:call".to_string()]);
        let h = r
            .headers
            .iter()
            .find(|(k, _)| *k == "www-authenticate")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        (r.status, h, r.body)
    };
    let with_claims = Denial::Exchange(ExchangeError::InteractionRequired {
        code: "interaction_required".into(),
        claims: Some(CLAIMS.into()),
    });
    let (status, challenge, body) = header(&with_claims);
    assert_eq!(status, 401);
    assert!(
        challenge.contains(r#"error="insufficient_claims""#),
        "{challenge}"
    );
    let encoded = format!(r#"claims="{}""#, STANDARD.encode(CLAIMS));
    assert!(challenge.contains(&encoded), "{challenge}");
    assert!(
        !body.contains("capolids"),
        "the challenge is not echoed in the body"
    );
    let (status, challenge, _) = header(&Denial::Exchange(ExchangeError::InteractionRequired {
        code: "interaction_required".into(),
        claims: None,
    }));
    assert_eq!(status, 401);
    assert!(challenge.contains(r#"error="invalid_token""#) && !challenge.contains("claims="));
    assert_eq!(with_claims.reason(), "exchange_interaction_required");
}

mod config {
    use serde_json::{json, Value};

    use crate::config::{parse_policy, ConfigError, ExchangeProfile, Policy};

    fn parse(v: &Value) -> Result<Policy, ConfigError> {
        let env = |name: &str| (name == "SECRET").then(|| "s3cret".to_string());
        parse_policy(v.to_string().as_bytes(), &env)
    }

    fn entra() -> Value {
        json!({
            "issuer": "https://login.microsoftonline.com/t/v2.0", "audiences": ["api://mcp"],
            "jwks": {"cluster": "entra", "path": "/t/discovery/v2.0/keys"},
            "exchange": {"profile": "entra_obo", "cluster": "entra",
                         "path": "/t/oauth2/v2.0/token", "authority": "login.microsoftonline.com",
                         "client_id": "gw", "client_secret_env": "SECRET",
                         "client_auth": "client_secret_post",
                         "scope": "api://backend/.default"}
        })
    }

    #[test]
    fn an_entra_obo_target_needs_a_scope_and_takes_no_rfc8693_fields() {
        let p = parse(&entra()).unwrap();
        let target = p.routes[0].target.as_deref().unwrap();
        assert_eq!(target.profile, ExchangeProfile::EntraObo);
        assert_eq!(target.scope.as_deref(), Some("api://backend/.default"));

        let cases: Vec<(&str, Value)> = vec![
            ("exchange.scope", json!({"scope": null})),
            ("exchange.scope", json!({"scope": "a  b"})),
            ("exchange.audience", json!({"audience": "backend"})),
            ("exchange.resource", json!({"resource": "https://backend"})),
            (
                "exchange.requested_token_type",
                json!({"requested_token_type": "x"}),
            ),
            ("exchange.profile", json!({"profile": "obo"})),
            ("exchange.profile", json!({"profile": 1})),
        ];
        for (field, patch) in cases {
            let mut v = entra();
            for (k, val) in patch.as_object().into_iter().flatten() {
                if val.is_null() {
                    v["exchange"].as_object_mut().map(|o| o.remove(k));
                } else {
                    v["exchange"][k] = val.clone();
                }
            }
            assert_eq!(parse(&v).expect_err(field).field, field);
        }
        // A route may switch profile; its merged target is checked as a whole.
        let mut v = entra();
        v["exchange"]["profile"] = json!("rfc8693");
        v["exchange"]["audience"] = json!("backend");
        v["routes"] = json!([{"path_prefix": "/obo", "exchange": {"profile": "entra_obo"}}]);
        assert_eq!(parse(&v).unwrap_err().field, "routes[0].exchange.audience");
    }
}
