//! One structured record per decision, so an operator can follow a user's request from the
//! inbound token to the exchanged one. Tokens appear only as fingerprints (or `jti`).
//!
//! By default the record goes to Envoy's access log: the filter stores it as the request's filter
//! state [`AUDIT_PROPERTY`] (Envoy names it `wasm.mcp_token_exchange.audit`), and an access log
//! with the format `%FILTER_STATE(wasm.mcp_token_exchange.audit:PLAIN)%` writes it when the
//! request ends, through Envoy's buffered file writer.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The property (filter state, under Envoy's `wasm.` prefix) that holds a request's record.
pub const AUDIT_PROPERTY: &str = "mcp_token_exchange.audit";

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
    /// Served from the fleet store: another Envoy's exchange.
    Fleet,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::Fleet => "fleet",
        }
    }
}

/// Everything one audit line says.
#[derive(Debug, Default)]
pub struct AuditRecord<'a> {
    pub time_ms: u64,
    pub allowed: bool,
    pub reason: &'a str,
    /// What exactly was wrong, where `reason` names a class (e.g. which path rule).
    pub detail: Option<&'a str>,
    pub status: Option<u32>,
    pub sub: Option<&'a str>,
    pub client_id: Option<&'a str>,
    /// `jti`, or the token fingerprint when the token has none.
    pub token: Option<Cow<'a, str>>,
    pub route: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub target_audience: Option<&'a str>,
    pub target_scope: Option<&'a str>,
    pub exchanged: Option<&'a str>,
    pub cache: Option<CacheUse>,
    pub latency_ms: u64,
}

/// Appends `s` as a JSON string. Written by hand because the line is built on every request:
/// going through `serde_json::Value` costs several times more than the rest of a cached request.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    // Almost every value (names, reasons, fingerprints, sanitized claims) is printable ASCII
    // without quotes or backslashes: copy it whole instead of char by char (which costs more in
    // Wasm than the rest of building the record).
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_field(out: &mut String, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        out.push(',');
        push_str(out, key);
        out.push(':');
        push_str(out, v);
    }
}

fn push_number(out: &mut String, key: &str, value: u64) {
    out.push(',');
    push_str(out, key);
    let _ = write!(out, ":{value}");
}

impl AuditRecord<'_> {
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(384);
        out.push_str("{\"audit\":\"mcp_token_exchange\"");
        push_number(&mut out, "time_ms", self.time_ms);
        push_field(
            &mut out,
            "decision",
            Some(if self.allowed { "allow" } else { "deny" }),
        );
        push_field(&mut out, "reason", Some(self.reason));
        push_field(&mut out, "detail", self.detail);
        if let Some(s) = self.status {
            push_number(&mut out, "status", u64::from(s));
        }
        push_field(&mut out, "sub", self.sub);
        push_field(&mut out, "client_id", self.client_id);
        push_field(&mut out, "token", self.token.as_deref());
        push_field(&mut out, "route", self.route);
        push_field(&mut out, "tool", self.tool);
        push_field(&mut out, "target_audience", self.target_audience);
        push_field(&mut out, "target_scope", self.target_scope);
        push_field(&mut out, "exchanged_token", self.exchanged);
        push_field(&mut out, "cache", self.cache.map(CacheUse::as_str));
        push_number(&mut out, "latency_ms", self.latency_ms);
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_string_survives_the_hand_written_json() {
        let nasty = "q\"b\\n\n r\r t\t nul\u{0} del\u{7f} é ✓ \u{2028}";
        let line = AuditRecord {
            reason: "denied",
            status: Some(403),
            sub: Some(nasty),
            tool: Some("</script>"),
            route: Some(""),
            ..AuditRecord::default()
        }
        .to_json();
        assert!(!line.contains('\n'), "one line: {line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["sub"], nasty);
        assert_eq!(v["tool"], "</script>");
        assert_eq!(v["route"], "");
        assert_eq!(v["status"], 403);
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["audit"], "mcp_token_exchange");
    }

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
