//! Tokens that play one inbound provider against another (`providers`): the unverified `iss`
//! selects whose keys and rules apply, so every way of lying about it must end in a 401 and
//! never in a key of the other provider being used.

use serde_json::{json, Value};

use super::Corpus;
use crate::expect::Expect::InvalidToken;
use crate::forge::{b64, Forge};

/// Cases for a stack with provider `okta` (AS `mcp`) on `/mcp` and provider `partner`
/// (AS `partner`) on `/partner/mcp`.
pub fn across_providers(c: &mut Corpus, f: &Forge<'_>) {
    let okta_iss = f.stack.idp.issuer("mcp");
    let partner_iss = f.stack.idp.issuer("partner");
    let partner_kid = f.stack.idp.kid("partner");
    let okta_claims = f.good_claims();
    let with = |iss: &str, aud: &str| {
        let mut claims = okta_claims.clone();
        claims.insert("iss".into(), json!(iss));
        claims.insert("aud".into(), json!(aud));
        Value::Object(claims)
    };
    // `partner` requires `typ: at+jwt`: every partner-looking token has it, so that what fails
    // is what the case is about.
    let partner_header = json!({"kid": partner_kid, "alg": "RS256", "typ": "at+jwt"}).to_string();
    let sign_as = |as_id: &str, header: &str, claims: &Value| {
        f.sign_bytes_as(as_id, header.as_bytes(), claims.to_string().as_bytes())
    };

    // Key confusion: signed by one provider's key, claiming the other's issuer.
    let partner_signed_as_okta = sign_as("partner", &partner_header, &with(&okta_iss, "mcpserver"));
    c.add_at(
        "providers: partner's key, okta's iss, on okta's route",
        "/mcp",
        super::bearer_header(&partner_signed_as_okta),
        InvalidToken,
    );
    let okta_header = f.header().to_string();
    let okta_typed = json!({"kid": f.kid, "alg": "RS256", "typ": "at+jwt"}).to_string();
    let okta_signed_as_partner = sign_as("mcp", &okta_typed, &with(&partner_iss, "partner-mcp"));
    c.add_at(
        "providers: okta's key, partner's iss, on partner's route",
        "/partner/mcp",
        super::bearer_header(&okta_signed_as_partner),
        InvalidToken,
    );
    // Genuine tokens on the route of the other provider.
    let partner_genuine = sign_as(
        "partner",
        &partner_header,
        &with(&partner_iss, "partner-mcp"),
    );
    c.add_at(
        "providers: genuine partner token on okta's route",
        "/mcp",
        super::bearer_header(&partner_genuine),
        InvalidToken,
    );
    c.add_at(
        "providers: genuine okta token on partner's route",
        "/partner/mcp",
        super::bearer_header(&f.good()),
        InvalidToken,
    );
    // Two `iss` members: whichever a lenient parser keeps, the token is refused.
    for (name, first, second) in [
        ("okta then partner", &okta_iss, &partner_iss),
        ("partner then okta", &partner_iss, &okta_iss),
    ] {
        let text = Value::Object(okta_claims.clone()).to_string().replacen(
            '{',
            &format!("{{\"iss\":{},\"iss\":{},", json!(first), json!(second)),
            1,
        );
        let token = f.sign_bytes(okta_header.as_bytes(), text.as_bytes());
        for path in ["/mcp", "/partner/mcp"] {
            c.add_at(
                format!("providers: duplicate iss, {name}, at {path}"),
                path,
                super::bearer_header(&token),
                InvalidToken,
            );
        }
    }
    // Issuers that are almost a provider's.
    for (what, iss) in [
        ("partner's in upper case", partner_iss.to_uppercase()),
        ("partner's with a trailing slash", format!("{partner_iss}/")),
        ("both joined", format!("{okta_iss} {partner_iss}")),
        (
            "a prefix of partner's",
            partner_iss[..partner_iss.len() - 1].to_string(),
        ),
    ] {
        let token = sign_as("partner", &partner_header, &with(&iss, "partner-mcp"));
        c.add_at(
            format!("providers: iss {what}"),
            "/partner/mcp",
            super::bearer_header(&token),
            InvalidToken,
        );
    }
    // An unsigned token naming each issuer (`alg: none`, empty signature).
    for (route, iss, aud) in [
        ("/mcp", &okta_iss, "mcpserver"),
        ("/partner/mcp", &partner_iss, "partner-mcp"),
    ] {
        let header = b64(br#"{"alg":"none"}"#);
        let payload = b64(with(iss, aud).to_string().as_bytes());
        c.add_at(
            format!("providers: alg none naming {route}'s issuer"),
            route,
            super::bearer_header(&format!("{header}.{payload}.")),
            InvalidToken,
        );
    }
}

/// Claim shapes and `typ` on `partner` (claims `scp` or `roles`, client from `azp`, `typ:
/// at+jwt`) and on `okta` (the defaults): every malformed shape is a 401, never a pass with no
/// or odd scopes.
pub fn claim_shapes(c: &mut Corpus, f: &Forge<'_>) {
    let partner_iss = f.stack.idp.issuer("partner");
    let partner_kid = f.stack.idp.kid("partner");
    let base = {
        let mut claims = f.good_claims();
        claims.insert("iss".into(), json!(partner_iss));
        claims.insert("aud".into(), json!("partner-mcp"));
        claims.remove("scp");
        claims
    };
    let partner = |typ: Option<&str>, extra: Value| {
        let mut header = json!({"kid": partner_kid, "alg": "RS256"});
        if let Some(t) = typ {
            header["typ"] = json!(t);
        }
        let mut claims = base.clone();
        for (k, v) in extra.as_object().into_iter().flatten() {
            claims.insert(k.clone(), v.clone());
        }
        f.sign_bytes_as(
            "partner",
            header.to_string().as_bytes(),
            Value::Object(claims).to_string().as_bytes(),
        )
    };
    let scp_ok = json!({"scp": "mcp:tools:call"});
    for (what, typ) in [
        ("missing", None),
        ("JWT", Some("JWT")),
        ("at+jwt with a trailing space", Some("at+jwt ")),
        (
            "at+jwt with parameters",
            Some("application/at+jwt; charset=utf-8"),
        ),
        ("another +jwt type", Some("secevent+jwt")),
        ("empty", Some("")),
        ("application/ alone", Some("application/")),
    ] {
        c.add_at(
            format!("claims: partner typ {what}"),
            "/partner/mcp",
            super::bearer_header(&partner(typ, scp_ok.clone())),
            InvalidToken,
        );
    }
    let typed = Some("at+jwt");
    for (what, extra) in [
        ("scp a number", json!({"scp": 5})),
        ("scp an object", json!({"scp": {"mcp:tools:call": true}})),
        (
            "scp an array with a number",
            json!({"scp": ["mcp:tools:call", 1]}),
        ),
        ("roles a string", json!({"roles": "mcp:tools:call"})),
        (
            "roles wrong beside a good scp",
            json!({"scp": "mcp:tools:call", "roles": "x"}),
        ),
        (
            "roles an array of arrays",
            json!({"roles": [["mcp:tools:call"]]}),
        ),
        ("azp a number", json!({"scp": "mcp:tools:call", "azp": 7})),
        ("iss twice, other first", json!({"scp": "mcp:tools:call"})),
    ] {
        let token = if what.starts_with("iss twice") {
            let text = Value::Object(base.clone()).to_string().replacen(
                '{',
                &format!("{{\"iss\":{},", json!(f.stack.idp.issuer("mcp"))),
                1,
            );
            let header = json!({"kid": partner_kid, "alg": "RS256", "typ": "at+jwt"});
            f.sign_bytes_as("partner", header.to_string().as_bytes(), text.as_bytes())
        } else {
            partner(typed, extra)
        };
        c.add_at(
            format!("claims: partner {what}"),
            "/partner/mcp",
            super::bearer_header(&token),
            InvalidToken,
        );
    }
    // `okta` keeps the single-issuer reading: `scp` must be an array.
    c.add_at(
        "claims: okta scp as Entra's string",
        "/mcp",
        super::bearer_header(&f.with_claim("scp", json!("mcp:tools:call"))),
        InvalidToken,
    );
}
