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
    let partner_header = json!({"kid": partner_kid, "alg": "RS256"}).to_string();
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
    let okta_signed_as_partner = sign_as("mcp", &okta_header, &with(&partner_iss, "partner-mcp"));
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
