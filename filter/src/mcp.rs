//! What an MCP request asks for: the JSON-RPC methods and tool names in a Streamable HTTP POST
//! body (single message or batch), or in the `Mcp-Method`/`Mcp-Name` headers of MCP 2026-07-28.
//! The body is only read, never changed.

use serde::Deserialize;
use serde_json::Value;

/// One JSON-RPC message's method, and the tool name for `tools/call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub tool: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON (JSON-RPC -32700).
    Parse,
    /// JSON, but not a JSON-RPC message or batch, or a `tools/call` without a tool name
    /// (JSON-RPC -32600).
    InvalidRequest,
    /// Larger than `mcp.max_body_bytes`: it cannot be inspected, so it is refused.
    TooLarge,
    /// The body is not the one call its `Mcp-Method`/`Mcp-Name` headers announce.
    HeaderMismatch,
}

impl BodyError {
    pub fn status(self) -> u32 {
        match self {
            Self::TooLarge => 413,
            _ => 400,
        }
    }

    /// A JSON-RPC error response body (id null: the request could not be read).
    pub fn jsonrpc_body(self) -> String {
        let (code, message) = match self {
            Self::Parse => (-32700, "Parse error"),
            Self::InvalidRequest => (-32600, "Invalid Request"),
            Self::TooLarge => (-32600, "Request body too large for the gateway to inspect"),
            Self::HeaderMismatch => (
                -32600,
                "Mcp-Method/Mcp-Name headers do not match the request body",
            ),
        };
        serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}}).to_string()
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    method: Option<Value>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

fn call_of(message: Value) -> Result<Option<Call>, BodyError> {
    if !message.is_object() {
        return Err(BodyError::InvalidRequest);
    }
    let m: Message = serde_json::from_value(message).map_err(|_| BodyError::InvalidRequest)?;
    let method = match m.method {
        Some(Value::String(s)) => s,
        Some(_) => return Err(BodyError::InvalidRequest),
        // A response to a server-initiated request: no method, no tool.
        None if m.result.is_some() || m.error.is_some() => return Ok(None),
        None => return Err(BodyError::InvalidRequest),
    };
    let tool = if method == "tools/call" {
        match m.params.as_ref().and_then(|p| p.get("name")) {
            Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
            _ => return Err(BodyError::InvalidRequest),
        }
    } else {
        None
    };
    Ok(Some(Call { method, tool }))
}

/// The calls in a JSON-RPC body (a message or a non-empty batch).
pub fn calls_in_body(body: &[u8]) -> Result<Vec<Call>, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| BodyError::Parse)?;
    let messages = match value {
        Value::Array(items) if !items.is_empty() => items,
        Value::Array(_) => return Err(BodyError::InvalidRequest),
        other => vec![other],
    };
    let mut calls = Vec::new();
    for m in messages {
        if let Some(c) = call_of(m)? {
            calls.push(c);
        }
    }
    Ok(calls)
}

/// The call named by MCP 2026-07-28 request headers, if they are present and well-formed.
pub fn call_from_headers(method: Option<&[u8]>, name: Option<&[u8]>) -> Option<Call> {
    let method = std::str::from_utf8(method?).ok()?.trim().to_string();
    if method.is_empty() {
        return None;
    }
    let tool = match name.map(std::str::from_utf8) {
        Some(Ok(n)) if !n.trim().is_empty() => Some(n.trim().to_string()),
        _ => None,
    };
    if method == "tools/call" && tool.is_none() {
        return None;
    }
    Some(Call { method, tool })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(body: &str) -> Result<Vec<Option<String>>, BodyError> {
        calls_in_body(body.as_bytes()).map(|c| c.into_iter().map(|c| c.tool).collect())
    }

    #[test]
    fn single_and_batch_messages() {
        assert_eq!(
            tools(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"whoami"}}"#),
            Ok(vec![Some("whoami".into())])
        );
        assert_eq!(
            tools(
                r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"b"}}]"#
            ),
            Ok(vec![Some("a".into()), None, Some("b".into())])
        );
        // A client's response to a server request carries no method.
        assert_eq!(tools(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#), Ok(vec![]));
    }

    #[test]
    fn malformed_bodies() {
        assert_eq!(tools("{"), Err(BodyError::Parse));
        assert_eq!(tools(""), Err(BodyError::Parse));
        for bad in [
            "[]",
            "3",
            "\"x\"",
            "[1]",
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""}}"#,
        ] {
            assert_eq!(tools(bad), Err(BodyError::InvalidRequest), "{bad}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(tools(&deep).is_err());
    }

    #[test]
    fn jsonrpc_error_bodies() {
        let v: Value = serde_json::from_str(&BodyError::Parse.jsonrpc_body()).unwrap();
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], Value::Null);
        assert_eq!(BodyError::TooLarge.status(), 413);
    }

    #[test]
    fn headers() {
        assert_eq!(
            call_from_headers(Some(b"tools/call"), Some(b"whoami")),
            Some(Call {
                method: "tools/call".into(),
                tool: Some("whoami".into())
            })
        );
        assert_eq!(call_from_headers(Some(b"tools/call"), None), None);
        assert_eq!(
            call_from_headers(Some(b"tools/list"), None).map(|c| c.tool),
            Some(None)
        );
        assert_eq!(call_from_headers(None, Some(b"x")), None);
        assert_eq!(call_from_headers(Some(b"\xff"), None), None);
    }
}
