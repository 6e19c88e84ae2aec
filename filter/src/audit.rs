//! One structured log line per decision, so an operator can follow a user's request from the
//! inbound token to the exchanged one. Tokens appear only as fingerprints (or `jti`).

use serde_json::{json, Map, Value};

/// How the backend token for an allowed request was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// No exchange was involved (denied before it, or a public route).
    None,
    /// Served from the shared cache.
    Hit,
    /// This request's own exchange.
    Miss,
    /// Waited on another request's exchange (this worker or another).
    Coalesced,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
        }
    }
}

/// Everything one audit line says.
#[derive(Debug, Default)]
pub struct AuditRecord<'a> {
    pub time_ms: u64,
    pub allowed: bool,
    pub reason: &'a str,
    pub status: Option<u32>,
    pub sub: Option<&'a str>,
    pub client_id: Option<&'a str>,
    /// `jti`, or the token fingerprint when the token has none.
    pub token: Option<String>,
    pub route: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub target_audience: Option<&'a str>,
    pub target_scope: Option<&'a str>,
    pub exchanged: Option<&'a str>,
    pub cache: Option<CacheUse>,
    pub latency_ms: u64,
}

fn put(map: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        map.insert(key.to_string(), Value::String(v.to_string()));
    }
}

impl AuditRecord<'_> {
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        m.insert("audit".into(), json!("mcp_token_exchange"));
        m.insert("time_ms".into(), json!(self.time_ms));
        m.insert(
            "decision".into(),
            json!(if self.allowed { "allow" } else { "deny" }),
        );
        m.insert("reason".into(), json!(self.reason));
        if let Some(s) = self.status {
            m.insert("status".into(), json!(s));
        }
        put(&mut m, "sub", self.sub);
        put(&mut m, "client_id", self.client_id);
        put(&mut m, "token", self.token.as_deref());
        put(&mut m, "route", self.route);
        put(&mut m, "tool", self.tool);
        put(&mut m, "target_audience", self.target_audience);
        put(&mut m, "target_scope", self.target_scope);
        put(&mut m, "exchanged_token", self.exchanged);
        if let Some(c) = self.cache {
            m.insert("cache".into(), json!(c.as_str()));
        }
        m.insert("latency_ms".into(), json!(self.latency_ms));
        Value::Object(m).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_json_object_without_absent_fields() {
        let line = AuditRecord {
            time_ms: 5,
            allowed: true,
            reason: "exchanged",
            sub: Some("alice\"\n"),
            token: Some("abcd1234".into()),
            cache: Some(CacheUse::Hit),
            ..AuditRecord::default()
        }
        .to_json();
        assert!(!line.contains('\n'), "one line: {line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["sub"], "alice\"\n");
        assert_eq!(v["cache"], "hit");
        assert!(v.get("tool").is_none());
    }
}
