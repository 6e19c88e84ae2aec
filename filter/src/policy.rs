//! The claims policy: what a verified principal may do on a route and with a tool.
//! Exact string matches only: an audience or scope that merely contains or starts with the
//! required one (`mcpserver2`, `mcp:tools:call-all`) is a different value.

use std::rc::Rc;

use crate::config::{ExchangeTarget, Route};
use crate::mcp::Call;
use crate::verify::Principal;

/// What the tools named in a request add to the route's requirements.
#[derive(Debug, Clone, Default)]
pub struct ToolRequirements {
    /// Scopes the tools require beyond the route's.
    pub scopes: Vec<String>,
    /// A narrower exchange target, when every tool call in the request has the same one.
    pub target: Option<Rc<ExchangeTarget>>,
    /// A tool the route does not list while `deny_unlisted_tools` is set.
    pub unlisted: Option<String>,
    /// The tool names, for audit (comma-separated).
    pub label: Option<String>,
}

/// Combines the policies of every `tools/call` in the request. Any other method in the request
/// (or a tool without its own target) keeps the route's default exchange target.
pub fn tool_requirements(route: &Route, calls: &[Call]) -> ToolRequirements {
    let mut req = ToolRequirements::default();
    let mut names: Vec<&str> = Vec::new();
    let mut targets: Vec<Option<Rc<ExchangeTarget>>> = Vec::new();
    for call in calls {
        let Some(tool) = call.tool() else {
            targets.push(None);
            continue;
        };
        names.push(tool);
        match route.tools.get(tool) {
            Some(policy) => {
                for s in &policy.required_scopes {
                    if !req.scopes.contains(s) {
                        req.scopes.push(s.clone());
                    }
                }
                targets.push(policy.target.clone());
            }
            None => {
                if route.deny_unlisted_tools && req.unlisted.is_none() {
                    req.unlisted = Some(tool.to_string());
                }
                targets.push(None);
            }
        }
    }
    if let Some(Some(first)) = targets.first() {
        if targets
            .iter()
            .all(|t| t.as_ref().is_some_and(|t| Rc::ptr_eq(t, first)))
        {
            req.target = Some(Rc::clone(first));
        }
    }
    if !names.is_empty() {
        req.label = Some(names.join(","));
    }
    req
}

/// Whether the token was issued for this route: one of its `aud` values is accepted here.
pub fn audience_allowed(principal: &Principal, accepted: &[String]) -> bool {
    principal.audiences.iter().any(|a| accepted.contains(a))
}

/// Required scopes the principal lacks, in the order given, without duplicates.
pub fn missing_scopes<'a>(
    principal: &Principal,
    required: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    for r in required {
        if !principal.scopes.iter().any(|s| s == r) && !missing.contains(r) {
            missing.push(r.clone());
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(aud: &[&str], scopes: &[&str]) -> Principal {
        Principal {
            provider: 0,
            sub: "u".into(),
            audiences: aud.iter().map(|s| s.to_string()).collect(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at: 0,
            jti: None,
            client_id: None,
            email: None,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn audience_must_match_exactly() {
        let accepted = strings(&["mcpserver"]);
        assert!(audience_allowed(
            &principal(&["other", "mcpserver"], &[]),
            &accepted
        ));
        for aud in [
            &[][..],
            &["mcpserver2"],
            &["xmcpserverx"],
            &["MCPSERVER"],
            &["backend"],
        ] {
            assert!(
                !audience_allowed(&principal(aud, &[]), &accepted),
                "{aud:?}"
            );
        }
    }

    #[test]
    fn scope_check_is_exact_and_lists_every_missing_scope() {
        let p = principal(&[], &["mcp:tools:call-all", "mcp:tools", "read"]);
        let required = strings(&["mcp:tools:call", "read", "write", "write"]);
        assert_eq!(
            missing_scopes(&p, &required),
            strings(&["mcp:tools:call", "write"])
        );
        assert!(missing_scopes(&p, &strings(&["read"])).is_empty());
    }

    fn route() -> Route {
        let config = serde_json::json!({
            "issuer": "https://idp/oauth2/mcp", "audiences": ["mcpserver"],
            "required_scopes": ["mcp:tools:call"],
            "jwks": {"inline": {"keys": []}},
            "exchange": {"cluster": "c", "path": "/t", "authority": "a", "client_id": "gw",
                         "client_secret_env": "S", "audience": "backend", "scope": "read write"},
            "routes": [{"path_prefix": "/mcp", "deny_unlisted_tools": true, "tools": {
                "read": {"exchange_scope": "read"},
                "also_read": {"exchange_scope": "read"},
                "write": {"required_scopes": ["admin"]},
                "plain": {}
            }}]
        });
        // Inline JWKS needs a real key; swap in the test one.
        let mut config = config;
        config["jwks"]["inline"] = serde_json::from_str(&crate::test_keys::jwks_json()).unwrap();
        let env = |_: &str| Some("secret".to_string());
        crate::config::parse_policy(config.to_string().as_bytes(), &env)
            .unwrap()
            .routes
            .remove(0)
    }

    fn call(method: &str, tool: Option<&str>) -> Call {
        Call {
            method: method.into(),
            name: tool.map(str::to_string),
        }
    }

    #[test]
    fn a_tool_with_its_own_target_narrows_the_exchange() {
        let r = route();
        let req = tool_requirements(&r, &[call("tools/call", Some("read"))]);
        assert_eq!(
            req.target.as_ref().and_then(|t| t.scope.as_deref()),
            Some("read")
        );
        assert!(req.scopes.is_empty());
        assert_eq!(req.label.as_deref(), Some("read"));
    }

    #[test]
    fn mixed_calls_keep_the_route_target_and_add_up_scopes() {
        let r = route();
        let req = tool_requirements(
            &r,
            &[
                call("tools/call", Some("read")),
                call("tools/call", Some("write")),
            ],
        );
        assert!(req.target.is_none());
        assert_eq!(req.scopes, strings(&["admin"]));
        assert_eq!(req.label.as_deref(), Some("read,write"));
        // A non-tool message next to a tool call also keeps the route's target.
        let req = tool_requirements(&r, &[call("tools/call", Some("read")), call("ping", None)]);
        assert!(req.target.is_none());
        // Two tools that share a narrower target do get it... only if it is the same target.
        let req = tool_requirements(
            &r,
            &[
                call("tools/call", Some("read")),
                call("tools/call", Some("also_read")),
            ],
        );
        assert!(
            req.target.is_none(),
            "distinct (if equal) targets are not merged"
        );
    }

    #[test]
    fn unlisted_tools_are_flagged_when_the_route_denies_them() {
        let r = route();
        assert_eq!(
            tool_requirements(&r, &[call("tools/call", Some("rm_rf"))])
                .unlisted
                .as_deref(),
            Some("rm_rf")
        );
        assert!(tool_requirements(&r, &[call("tools/call", Some("plain"))])
            .unlisted
            .is_none());
        assert!(tool_requirements(&r, &[call("tools/list", None)])
            .unlisted
            .is_none());
    }
}
