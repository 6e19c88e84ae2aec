//! The claims of a verified token, decoded with a strict schema and read by the rules of the
//! provider that issued it: which claims carry scopes and in which shape, which claim names the
//! client. Registered claims with the wrong type and duplicate claim names are refused, not
//! coerced.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ClaimRules, ClientIdClaim, Provider, ScopeClaim};
use crate::verify::{Principal, TokenError};

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims the filter reads. Scope claims stay raw until a provider's rules say whether and
/// how to read them: a claim the provider does not use never refuses a token.
#[derive(Deserialize)]
pub(crate) struct InboundClaims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<i64>,
    #[serde(default)]
    scp: Option<Value>,
    #[serde(default)]
    scope: Option<Value>,
    #[serde(default)]
    roles: Option<Value>,
    #[serde(default)]
    permissions: Option<Value>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    cid: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// NumericDate as a JSON integer in `0..=i64::MAX`. Floats, strings, negatives and overflow are
/// refused: no issuer we serve emits them, and guessing is how time checks get bypassed.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = Value::deserialize(d)?;
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(t) if t >= 0 => Ok(Some(t)),
            _ => Err(de::Error::custom(
                "NumericDate must be a non-negative integer",
            )),
        },
        _ => Err(de::Error::custom("NumericDate must be a number")),
    }
}

/// The shapes a scope claim may have.
#[derive(Clone, Copy)]
enum Shape {
    /// A JSON array of strings.
    List,
    /// One string, scopes separated by ASCII spaces (RFC 6749 §3.3: a tab is not a separator).
    SpaceSeparated,
    Either,
}

impl ScopeClaim {
    /// As the issuers that write this claim document it: `scp` is Okta's array or (where the
    /// provider allows it) Entra ID's string; `scope` is a string (RFC 9068 §2.2.3); `roles`
    /// (Entra ID) and `permissions` (Auth0) are arrays. Any other shape is a malformed token,
    /// not an empty scope list.
    fn shape(self, rules: &ClaimRules) -> Shape {
        match self {
            Self::Scp if rules.scp_string => Shape::Either,
            Self::Scp | Self::Roles | Self::Permissions => Shape::List,
            Self::Scope => Shape::SpaceSeparated,
        }
    }
}

/// The scopes in `value`, a claim of `shape`, without duplicates.
fn scopes_in(value: &Value, shape: Shape) -> Result<Vec<String>, TokenError> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    };
    match (value, shape) {
        (Value::String(s), Shape::SpaceSeparated | Shape::Either) => s.split(' ').for_each(add),
        (Value::Array(items), Shape::List | Shape::Either) => {
            for item in items {
                add(item.as_str().ok_or(TokenError::MalformedClaims)?);
            }
        }
        _ => return Err(TokenError::MalformedClaims),
    }
    Ok(out)
}

impl InboundClaims {
    pub(crate) fn issuer(&self) -> Option<&str> {
        self.iss.as_deref()
    }

    fn scope_claim(&self, claim: ScopeClaim) -> Option<&Value> {
        match claim {
            ScopeClaim::Scp => self.scp.as_ref(),
            ScopeClaim::Scope => self.scope.as_ref(),
            ScopeClaim::Roles => self.roles.as_ref(),
            ScopeClaim::Permissions => self.permissions.as_ref(),
        }
    }

    fn client_claim(&mut self, claim: ClientIdClaim) -> Option<String> {
        match claim {
            ClientIdClaim::Cid => self.cid.take(),
            ClientIdClaim::ClientId => self.client_id.take(),
            ClientIdClaim::Azp => self.azp.take(),
            ClientIdClaim::Appid => self.appid.take(),
        }
    }

    /// Issuer and time checks, then the principal as `provider`'s rules read it. Audience and
    /// scopes are judged later, per route.
    pub(crate) fn principal(
        mut self,
        provider: &Provider,
        skew: i64,
        now: i64,
    ) -> Result<Principal, TokenError> {
        if self.iss.as_deref() != Some(provider.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        let exp = self.exp.ok_or(TokenError::MissingClaim("exp"))?;
        if now.saturating_sub(skew) >= exp {
            return Err(TokenError::Expired);
        }
        if self.nbf.is_some_and(|nbf| now.saturating_add(skew) < nbf) {
            return Err(TokenError::NotYetValid);
        }
        if self.iat.is_some_and(|iat| now.saturating_add(skew) < iat) {
            return Err(TokenError::IssuedInFuture);
        }
        let sub = match self.sub.take() {
            Some(s) if !s.is_empty() => s,
            _ => return Err(TokenError::MissingClaim("sub")),
        };
        // The first listed claim present carries the scopes; every listed claim present must
        // have its shape, so a mistyped one is refused even when another wins.
        let rules = &provider.claims;
        let mut scopes = None;
        for &claim in &rules.scopes {
            if let Some(value) = self.scope_claim(claim) {
                let found = scopes_in(value, claim.shape(rules))?;
                scopes.get_or_insert(found);
            }
        }
        let scopes = scopes.unwrap_or_default();
        let client_id = provider
            .claims
            .client_id
            .iter()
            .find_map(|&claim| self.client_claim(claim));
        let audiences = match self.aud.take() {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(list)) => list,
            None => Vec::new(),
        };
        Ok(Principal {
            provider: 0,
            sub,
            audiences,
            scopes,
            expires_at: exp,
            jti: self.jti,
            client_id,
            email: self.email,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::KeySource;
    use crate::jwks::KeySet;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://login.microsoftonline.com/t/v2.0";

    fn provider(claims: ClaimRules) -> Provider {
        Provider {
            name: "p".into(),
            issuer: ISS.into(),
            audiences: vec!["api://mcp".into()],
            keys: KeySource::Inline(KeySet::default()),
            claims,
            introspection: None,
        }
    }

    fn read(claims: Value, rules: ClaimRules) -> Result<Principal, TokenError> {
        let mut c = json!({"iss": ISS, "sub": "u", "exp": NOW + 60});
        for (k, v) in claims.as_object().into_iter().flatten() {
            c[k] = v.clone();
        }
        let parsed: InboundClaims =
            serde_json::from_value(c).map_err(|_| TokenError::MalformedClaims)?;
        parsed.principal(&provider(rules), 60, NOW)
    }

    /// As `claims` in the configuration lists them.
    fn rules(scopes: &[ScopeClaim], client_id: &[ClientIdClaim]) -> ClaimRules {
        ClaimRules {
            scopes: scopes.to_vec(),
            scp_string: true,
            client_id: client_id.to_vec(),
            typ: None,
        }
    }

    #[test]
    fn scp_is_an_okta_array_or_where_listed_an_entra_string() {
        let d = rules(&[ScopeClaim::Scp], &[]);
        let okta = read(json!({"scp": ["a", "b"]}), d.clone()).unwrap();
        assert_eq!(okta.scopes, ["a", "b"]);
        let entra = read(json!({"scp": "a  b"}), d.clone()).unwrap();
        assert_eq!(entra.scopes, ["a", "b"], "the shape Entra ID issues");
        // Without `claims`, today's reading: a string in `scp` is a malformed token.
        assert_eq!(
            read(json!({"scp": "a b"}), ClaimRules::default()).unwrap_err(),
            TokenError::MalformedClaims
        );
        // (`null` is an absent claim, as it always was: no scopes, not a refusal.)
        for bad in [json!(1), json!({"a": 1}), json!(["a", 1]), json!(true)] {
            assert_eq!(
                read(json!({ "scp": bad }), d.clone()).unwrap_err(),
                TokenError::MalformedClaims,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_first_listed_scope_claim_present_wins() {
        use ScopeClaim::*;
        let both = json!({"scp": ["okta"], "scope": "rfc9068", "roles": ["App.Role"]});
        let first = |order: &[ScopeClaim]| read(both.clone(), rules(order, &[])).unwrap().scopes;
        assert_eq!(first(&[Scp, Scope]), ["okta"]);
        assert_eq!(first(&[Scope, Scp]), ["rfc9068"]);
        assert_eq!(first(&[Permissions, Roles]), ["App.Role"]);
        assert!(first(&[Permissions]).is_empty());
        // Today's default: `scp` wins over `scope`.
        assert_eq!(read(both, ClaimRules::default()).unwrap().scopes, ["okta"]);
    }

    #[test]
    fn scope_is_a_string_and_roles_and_permissions_are_arrays() {
        use ScopeClaim::*;
        let each = |claim: ScopeClaim| rules(&[claim], &[]);
        let p = read(json!({"scope": "read write read"}), each(Scope)).unwrap();
        assert_eq!(p.scopes, ["read", "write"], "no duplicates");
        let p = read(json!({"roles": ["Admin"]}), each(Roles)).unwrap();
        assert_eq!(p.scopes, ["Admin"]);
        let p = read(
            json!({"permissions": ["read", "delete"]}),
            each(Permissions),
        )
        .unwrap();
        assert_eq!(p.scopes, ["read", "delete"]);
        let all = rules(&[Scope, Roles, Permissions], &[]);
        for (claim, bad) in [
            ("scope", json!(["read"])),
            ("roles", json!("Admin")),
            ("permissions", json!("read")),
            ("scope", json!(5)),
        ] {
            assert_eq!(
                read(json!({ claim: bad }), all.clone()).unwrap_err(),
                TokenError::MalformedClaims,
                "{claim}: {bad}"
            );
        }
        // A tab is no separator: one odd scope, never two.
        assert_eq!(
            read(json!({"scope": "a\tb"}), all.clone()).unwrap().scopes,
            ["a\tb"]
        );
    }

    #[test]
    fn a_listed_claim_of_the_wrong_shape_refuses_the_token_even_when_another_wins() {
        let d = ClaimRules::default();
        assert_eq!(
            read(json!({"scp": ["a"], "scope": 5}), d.clone()).unwrap_err(),
            TokenError::MalformedClaims
        );
        assert_eq!(
            read(json!({"scp": ["a"], "scope": ["b"]}), d).unwrap_err(),
            TokenError::MalformedClaims
        );
    }

    #[test]
    fn claims_a_provider_does_not_read_neither_grant_nor_refuse() {
        let okta_only = rules(&[ScopeClaim::Scp], &[ClientIdClaim::Cid]);
        let p = read(
            json!({"scp": ["a"], "roles": "not an array", "permissions": ["admin"],
                   "scope": ["odd"], "azp": "other"}),
            okta_only.clone(),
        )
        .unwrap();
        assert_eq!(p.scopes, ["a"]);
        let p = read(json!({"roles": ["admin"]}), okta_only).unwrap();
        assert!(p.scopes.is_empty(), "roles are not read");
        let p = read(
            json!({"scp": ["a"], "roles": "not an array", "permissions": ["admin"],
                   "scope": ["odd"], "azp": "other"}),
            rules(&[ScopeClaim::Scp], &[ClientIdClaim::Cid]),
        )
        .unwrap();
        assert_eq!(p.scopes, ["a"]);
        assert_eq!(p.client_id, None, "azp is not read");
    }

    #[test]
    fn the_client_is_the_first_listed_claim_present() {
        use ClientIdClaim::*;
        let c = json!({"cid": "okta-app", "client_id": "rfc9068", "azp": "v2", "appid": "v1"});
        let first = |order: &[ClientIdClaim]| read(c.clone(), rules(&[], order)).unwrap().client_id;
        assert_eq!(first(&[Cid, ClientId]).as_deref(), Some("okta-app"));
        assert_eq!(first(&[Azp, Cid]).as_deref(), Some("v2"));
        assert_eq!(first(&[Appid]).as_deref(), Some("v1"));
        let only_azp = read(json!({"azp": "kc"}), ClaimRules::default()).unwrap();
        assert_eq!(
            only_azp.client_id.as_deref(),
            Some("kc"),
            "the default reads azp too"
        );
        assert_eq!(
            read(json!({"azp": 5}), rules(&[], &[])).unwrap_err(),
            TokenError::MalformedClaims,
            "azp is a string by OIDC"
        );
    }
}
