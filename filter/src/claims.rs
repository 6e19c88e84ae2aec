//! The claims of a verified token, decoded with a strict schema and read by the rules of the
//! provider that issued it: which claims carry scopes and in which shape, which claim names the
//! client. Registered claims with the wrong type and duplicate claim names are refused, not
//! coerced.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ClientIdClaim, Provider, ScopeClaim};
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
    /// As the issuers that write this claim document it: `scp` is Okta's array or Entra ID's
    /// string; `scope` is a string (RFC 9068 §2.2.3); `roles` (Entra ID) and `permissions`
    /// (Auth0) are arrays. Any other shape is a malformed token, not an empty scope list.
    fn shape(self) -> Shape {
        match self {
            Self::Scp => Shape::Either,
            Self::Scope => Shape::SpaceSeparated,
            Self::Roles | Self::Permissions => Shape::List,
        }
    }
}

/// Adds the scopes in `value` (a claim of `shape`) to `out`, skipping ones already there.
fn add_scopes(value: &Value, shape: Shape, out: &mut Vec<String>) -> Result<(), TokenError> {
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
    Ok(())
}

impl InboundClaims {
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
        let mut scopes = Vec::new();
        for &claim in &provider.claims.scopes {
            if let Some(value) = self.scope_claim(claim) {
                add_scopes(value, claim.shape(), &mut scopes)?;
            }
        }
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
    use crate::config::{ClaimRules, KeySource};
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

    fn rules(scopes: &[ScopeClaim], client_id: &[ClientIdClaim]) -> ClaimRules {
        ClaimRules {
            scopes: scopes.to_vec(),
            client_id: client_id.to_vec(),
            typ: None,
        }
    }

    #[test]
    fn scp_is_an_okta_array_or_an_entra_string() {
        let d = ClaimRules::default();
        let okta = read(json!({"scp": ["a", "b"]}), d.clone()).unwrap();
        assert_eq!(okta.scopes, ["a", "b"]);
        let entra = read(json!({"scp": "a  b"}), d.clone()).unwrap();
        assert_eq!(entra.scopes, ["a", "b"], "the shape Entra ID issues");
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
    fn scope_is_a_string_and_roles_and_permissions_are_arrays() {
        use ScopeClaim::*;
        let all = rules(&[Scope, Roles, Permissions], &[]);
        let p = read(
            json!({"scope": "read write", "roles": ["Admin"], "permissions": ["read", "delete"]}),
            all.clone(),
        )
        .unwrap();
        assert_eq!(
            p.scopes,
            ["read", "write", "Admin", "delete"],
            "union, no duplicates"
        );
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
    fn claims_a_provider_does_not_read_neither_grant_nor_refuse() {
        let okta_only = rules(&[ScopeClaim::Scp], &[ClientIdClaim::Cid]);
        let p = read(
            json!({"scp": ["a"], "roles": "not an array", "permissions": ["admin"],
                   "scope": ["odd"], "azp": "other"}),
            okta_only,
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
