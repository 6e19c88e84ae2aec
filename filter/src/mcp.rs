//! What an MCP request asks for: the JSON-RPC methods and tool names in a Streamable HTTP POST
//! body (single message or batch), or in the `Mcp-Method`/`Mcp-Name` headers of MCP 2026-07-28.
//! The body is only read, never changed; the headers are only read, never changed or removed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

/// One JSON-RPC message's method, and the value its `Mcp-Name` header mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    /// What `Mcp-Name` carries for this method (see [`mirrored_param`]): the tool of
    /// `tools/call`, the prompt of `prompts/get`, the URI of `resources/read`, …
    pub name: Option<String>,
}

impl Call {
    /// The tool name of a `tools/call`: what per-tool policy is keyed by.
    pub fn tool(&self) -> Option<&str> {
        if self.method == "tools/call" {
            self.name.as_deref()
        } else {
            None
        }
    }
}

/// The `params` member a method's `Mcp-Name` header mirrors (MCP 2026-07-28, SEP-2243), for the
/// methods whose header the gateway checks. Other methods' `Mcp-Name` is not compared: what it
/// would mirror is not known here, and no policy depends on it.
pub fn mirrored_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    }
}

/// A JSON-RPC request body: its calls, and the `id` to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Body {
    /// Every request and notification in it (responses to server requests carry no call).
    pub calls: Vec<Call>,
    /// The `id` (a string or a number) of a body that is one request; `None` for a
    /// notification, a batch, or an `id` of another type.
    pub id: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON (JSON-RPC -32700).
    Parse,
    /// JSON, but not a JSON-RPC message or batch, or a `tools/call` without a tool name
    /// (JSON-RPC -32600).
    InvalidRequest,
    /// Larger than `mcp.max_body_bytes`: it cannot be inspected, so it is refused.
    TooLarge,
    /// The body is not the one call its `Mcp-Method`/`Mcp-Name` headers announce (JSON-RPC
    /// -32020, answered with the body's `id` when it has one).
    HeaderMismatch { id: Option<Value> },
    /// `Mcp-Method`/`Mcp-Name` cannot be read: repeated, `Mcp-Name` without `Mcp-Method`, a
    /// character that must have been encoded, or an `=?base64?…?=` value that is not base64 of
    /// UTF-8 (JSON-RPC -32020; refused before the body is read, so `id` is null).
    HeaderInvalid,
}

impl BodyError {
    pub fn status(&self) -> u32 {
        match self {
            Self::TooLarge => 413,
            _ => 400,
        }
    }

    /// A JSON-RPC error response body. `id` is null unless the body was one request whose `id`
    /// is known (a header mismatch): the other errors are found before or while reading it.
    pub fn jsonrpc_body(&self) -> String {
        let (code, message) = match self {
            Self::Parse => (-32700, "Parse error"),
            Self::InvalidRequest => (-32600, "Invalid Request"),
            Self::TooLarge => (-32600, "Request body too large for the gateway to inspect"),
            Self::HeaderMismatch { .. } => (
                HEADER_MISMATCH,
                "Mcp-Method/Mcp-Name headers do not match the request body",
            ),
            Self::HeaderInvalid => (HEADER_MISMATCH, "Mcp-Method/Mcp-Name headers are malformed"),
        };
        let id = match self {
            Self::HeaderMismatch { id: Some(id) } => id.clone(),
            _ => Value::Null,
        };
        serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            .to_string()
    }
}

/// JSON-RPC error code of MCP 2026-07-28 for headers that do not match the body.
pub const HEADER_MISMATCH: i64 = -32020;

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    method: Option<Value>,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// One message's call (`None` for a response) and its `id` if it is a string or a number.
fn call_of(message: Value) -> Result<(Option<Call>, Option<Value>), BodyError> {
    if !message.is_object() {
        return Err(BodyError::InvalidRequest);
    }
    let m: Message = serde_json::from_value(message).map_err(|_| BodyError::InvalidRequest)?;
    let id = m.id.filter(|id| id.is_string() || id.is_number());
    let method = match m.method {
        Some(Value::String(s)) => s,
        Some(_) => return Err(BodyError::InvalidRequest),
        // A response to a server-initiated request: no method, no tool.
        None if m.result.is_some() || m.error.is_some() => return Ok((None, id)),
        None => return Err(BodyError::InvalidRequest),
    };
    let name = mirrored_param(&method)
        .and_then(|key| m.params.as_ref().and_then(|p| p.get(key)))
        .and_then(Value::as_str)
        .map(str::to_string);
    // A tools/call is always attributed to a tool: per-tool policy cannot be dodged.
    if method == "tools/call" && name.as_deref().is_none_or(str::is_empty) {
        return Err(BodyError::InvalidRequest);
    }
    Ok((Some(Call { method, name }), id))
}

/// The calls in a JSON-RPC body (a message or a non-empty batch).
pub fn calls_in_body(body: &[u8]) -> Result<Body, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| BodyError::Parse)?;
    let (messages, batch) = match value {
        Value::Array(items) if !items.is_empty() => (items, true),
        Value::Array(_) => return Err(BodyError::InvalidRequest),
        other => (vec![other], false),
    };
    let mut out = Body::default();
    for m in messages {
        let (call, id) = call_of(m)?;
        if let Some(c) = call {
            out.calls.push(c);
            if !batch {
                out.id = id;
            }
        }
    }
    Ok(out)
}

/// Prefix and suffix of an encoded header value (MCP 2026-07-28): a value that is not
/// non-empty visible ASCII, or that starts with the prefix itself, travels as
/// `=?base64?{standard base64 of its UTF-8 bytes}?=`.
const ENCODED_PREFIX: &[u8] = b"=?base64?";
const ENCODED_SUFFIX: &[u8] = b"?=";

/// The value an `Mcp-Method`/`Mcp-Name` header carries, decoded. `None`: malformed — an
/// encoded value that is not padded standard base64 of UTF-8, or a plain value with a byte
/// that must have been encoded (a control character or non-ASCII).
///
/// Plain values may contain spaces: the specification asks senders to encode them, but rmcp
/// (3.11) encodes only leading/trailing whitespace, so a plain inner space is taken as itself.
/// A value starting with the prefix is always an encoded one (a literal value with that prefix
/// must itself be encoded), so it is never taken as plain text.
pub fn decode_header_value(raw: &[u8]) -> Option<String> {
    if let Some(rest) = raw.strip_prefix(ENCODED_PREFIX) {
        let payload = rest.strip_suffix(ENCODED_SUFFIX)?;
        let bytes = STANDARD.decode(payload).ok()?;
        return String::from_utf8(bytes).ok();
    }
    if raw.iter().any(|b| !matches!(b, b' ' | b'\t' | b'!'..=b'~')) {
        return None;
    }
    // Only ASCII bytes remain.
    std::str::from_utf8(raw).ok().map(str::to_string)
}

/// The call announced by MCP 2026-07-28 request headers: `Ok(None)` when there are none (a
/// client of an earlier revision), an error when they cannot be read. `methods` and `names`
/// are every value of `Mcp-Method` and of `Mcp-Name`: each may appear at most once, since
/// another hop could act on a second value this gateway never checked.
pub fn call_from_headers(methods: &[&[u8]], names: &[&[u8]]) -> Result<Option<Call>, BodyError> {
    let (method, name) = match (methods, names) {
        ([], []) => return Ok(None),
        ([method], []) => (*method, None),
        ([method], [name]) => (*method, Some(*name)),
        _ => return Err(BodyError::HeaderInvalid),
    };
    let method = decode_header_value(method)
        .filter(|m| !m.is_empty())
        .ok_or(BodyError::HeaderInvalid)?;
    let name = match name {
        Some(raw) => Some(decode_header_value(raw).ok_or(BodyError::HeaderInvalid)?),
        None => None,
    };
    // A name is compared only where the method says what it mirrors.
    let name = name.filter(|_| mirrored_param(&method).is_some());
    Ok(Some(Call { method, name }))
}

/// The body of a request whose headers announced `announced` must be exactly that one call.
pub fn check_announced(announced: &Call, body: &Body) -> Result<(), BodyError> {
    match body.calls.as_slice() {
        [call] if call == announced => Ok(()),
        _ => Err(BodyError::HeaderMismatch {
            id: body.id.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(body: &str) -> Result<Vec<Option<String>>, BodyError> {
        calls_in_body(body.as_bytes()).map(|b| {
            b.calls
                .iter()
                .map(|c| c.tool().map(str::to_string))
                .collect()
        })
    }

    fn call(method: &str, name: Option<&str>) -> Call {
        Call {
            method: method.into(),
            name: name.map(str::to_string),
        }
    }

    fn headers(method: Option<&str>, name: Option<&str>) -> Result<Option<Call>, BodyError> {
        let methods: Vec<&[u8]> = method.iter().map(|m| m.as_bytes()).collect();
        let names: Vec<&[u8]> = name.iter().map(|n| n.as_bytes()).collect();
        call_from_headers(&methods, &names)
    }

    fn encode(value: &str) -> String {
        format!("=?base64?{}?=", STANDARD.encode(value))
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
    fn the_name_each_method_mirrors() {
        let body = |s: &str| calls_in_body(s.as_bytes()).map(|b| b.calls);
        assert_eq!(
            body(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#),
            Ok(vec![call("prompts/get", Some("p"))])
        );
        assert_eq!(
            body(
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}"#
            ),
            Ok(vec![call("resources/read", Some("file:///a"))])
        );
        // Only tools/call names a tool.
        assert_eq!(call("prompts/get", Some("p")).tool(), None);
        assert_eq!(call("tools/call", Some("t")).tool(), Some("t"));
        // A method that mirrors nothing carries no name, whatever its params hold.
        assert_eq!(
            body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"x"}}"#),
            Ok(vec![call("tools/list", None)])
        );
    }

    #[test]
    fn the_id_of_a_single_request_only() {
        let id = |s: &str| calls_in_body(s.as_bytes()).map(|b| b.id);
        let req = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a"}}"#;
        assert_eq!(id(req), Ok(Some(Value::from(7))));
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","id":"x-1","method":"tools/list"}"#),
            Ok(Some(Value::from("x-1")))
        );
        // A notification has none; neither has a batch (there is no one id to answer with), nor
        // an id that is not a string or a number.
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Ok(None)
        );
        assert_eq!(id(&format!("[{req}]")), Ok(None));
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","id":{"a":1},"method":"tools/list"}"#),
            Ok(None)
        );
        assert_eq!(
            id(r#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#),
            Ok(None)
        );
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
        let parse = |e: &BodyError| -> Value { serde_json::from_str(&e.jsonrpc_body()).unwrap() };
        let v = parse(&BodyError::Parse);
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], Value::Null);
        assert_eq!(BodyError::TooLarge.status(), 413);

        // A mismatch is -32020 (HEADER_MISMATCH), answered with the request's id.
        let v = parse(&BodyError::HeaderMismatch {
            id: Some(Value::from(7)),
        });
        assert_eq!(
            (v["error"]["code"].clone(), v["id"].clone()),
            (Value::from(-32020), Value::from(7))
        );
        let v = parse(&BodyError::HeaderMismatch {
            id: Some(Value::from("req-7")),
        });
        assert_eq!(v["id"], "req-7");
        let v = parse(&BodyError::HeaderMismatch { id: None });
        assert_eq!(
            (v["error"]["code"].clone(), v["id"].clone()),
            (Value::from(-32020), Value::Null)
        );
        let v = parse(&BodyError::HeaderInvalid);
        assert_eq!(
            (v["error"]["code"].clone(), v["id"].clone()),
            (Value::from(-32020), Value::Null)
        );
        assert_eq!(BodyError::HeaderInvalid.status(), 400);
        assert_eq!(BodyError::HeaderMismatch { id: None }.status(), 400);
    }

    #[test]
    fn announced_calls() {
        assert_eq!(
            headers(Some("tools/call"), Some("whoami")),
            Ok(Some(call("tools/call", Some("whoami"))))
        );
        // No headers: a client of an earlier revision.
        assert_eq!(headers(None, None), Ok(None));
        // tools/call without Mcp-Name announces a call without a name: no body matches it.
        assert_eq!(
            headers(Some("tools/call"), None),
            Ok(Some(call("tools/call", None)))
        );
        assert_eq!(
            headers(Some("tools/list"), None),
            Ok(Some(call("tools/list", None)))
        );
        // Mcp-Name of a method that mirrors nothing is not compared.
        assert_eq!(
            headers(Some("tools/list"), Some("x")),
            Ok(Some(call("tools/list", None)))
        );
        assert_eq!(
            headers(Some("notifications/initialized"), None),
            Ok(Some(call("notifications/initialized", None)))
        );
        // Unreadable: a name without a method, an empty or non-UTF-8 method, repeated headers.
        assert_eq!(headers(None, Some("x")), Err(BodyError::HeaderInvalid));
        assert_eq!(headers(Some(""), None), Err(BodyError::HeaderInvalid));
        assert_eq!(
            call_from_headers(&[b"\xff"], &[]),
            Err(BodyError::HeaderInvalid)
        );
        assert_eq!(
            call_from_headers(&[b"tools/call", b"tools/call"], &[b"a"]),
            Err(BodyError::HeaderInvalid)
        );
        assert_eq!(
            call_from_headers(&[b"tools/call"], &[b"a", b"b"]),
            Err(BodyError::HeaderInvalid)
        );
    }

    #[test]
    fn encoded_header_values_are_decoded() {
        // The example of the issue: a tool name that is not ASCII.
        assert_eq!(
            headers(Some("tools/call"), Some(&encode("weather/東京"))),
            Ok(Some(call("tools/call", Some("weather/東京"))))
        );
        assert_eq!(
            headers(Some("tools/call"), Some("=?base64?d2VhdGhlci/mnbHkuqw=?=")),
            Ok(Some(call("tools/call", Some("weather/東京"))))
        );
        // A literal value that starts with the prefix travels encoded, and decodes to itself.
        assert_eq!(
            decode_header_value(encode("=?base64?x?=").as_bytes()).as_deref(),
            Some("=?base64?x?=")
        );
        // Whitespace at the ends, which HTTP would strip, survives encoding.
        assert_eq!(
            decode_header_value(encode(" t ").as_bytes()).as_deref(),
            Some(" t ")
        );
        assert_eq!(decode_header_value(b"=?base64??=").as_deref(), Some(""));
        // Plain values: visible ASCII (inner spaces as rmcp sends them).
        assert_eq!(
            decode_header_value(b"read_data").as_deref(),
            Some("read_data")
        );
        assert_eq!(decode_header_value(b"my tool").as_deref(), Some("my tool"));
        // The method header is decoded the same way.
        assert_eq!(
            headers(Some(&encode("tools/call")), Some("t")),
            Ok(Some(call("tools/call", Some("t"))))
        );
    }

    #[test]
    fn undecodable_header_values_are_refused() {
        for bad in [
            // Not base64, or not its padded standard alphabet.
            "=?base64?***?=",
            "=?base64?d2VhdGhlcg?=",
            "=?base64?d2VhdGhlci_mnbHkuqw=?=",
            // Non-canonical trailing bits.
            "=?base64?YR==?=",
            // No closing `?=`: still an encoded value (the prefix says so), and a broken one.
            "=?base64?d2VhdGhlcg==",
            "=?base64?",
        ] {
            assert_eq!(decode_header_value(bad.as_bytes()), None, "{bad}");
            assert_eq!(
                headers(Some("tools/call"), Some(bad)),
                Err(BodyError::HeaderInvalid),
                "{bad}"
            );
        }
        // Valid base64 of bytes that are not UTF-8.
        let not_utf8 = format!("=?base64?{}?=", STANDARD.encode([0xff, 0xfe, 0x41]));
        assert_eq!(
            headers(Some("tools/call"), Some(&not_utf8)),
            Err(BodyError::HeaderInvalid)
        );
        // Plain values with bytes that must have been encoded.
        assert_eq!(
            call_from_headers(&[b"tools/call"], &["weather/東京".as_bytes()]),
            Err(BodyError::HeaderInvalid)
        );
        assert_eq!(
            call_from_headers(&[b"tools/call"], &[b"a\x01b"]),
            Err(BodyError::HeaderInvalid)
        );
        // Even where the name is not compared, an unreadable one is refused.
        assert_eq!(
            headers(Some("tools/list"), Some("=?base64?***?=")),
            Err(BodyError::HeaderInvalid)
        );
    }

    fn body(s: &str) -> Body {
        calls_in_body(s.as_bytes()).unwrap()
    }

    #[test]
    fn the_body_must_be_the_announced_call() {
        let read =
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"read_data"}}"#;
        let write =
            r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"write_data"}}"#;
        let announced = call("tools/call", Some("read_data"));
        assert_eq!(check_announced(&announced, &body(read)), Ok(()));
        // Another tool: answered with the body's id.
        assert_eq!(
            check_announced(&announced, &body(write)),
            Err(BodyError::HeaderMismatch {
                id: Some(Value::from(6))
            })
        );
        // Another method.
        assert_eq!(
            check_announced(
                &call("tools/list", None),
                &body(
                    r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"read_data"}}"#
                )
            ),
            Err(BodyError::HeaderMismatch {
                id: Some(Value::from("a"))
            })
        );
        // tools/call announced without Mcp-Name.
        assert!(check_announced(&call("tools/call", None), &body(read)).is_err());
        // A batch is never the one call the headers announce, even one holding it: id null.
        assert_eq!(
            check_announced(&announced, &body(&format!("[{read},{write}]"))),
            Err(BodyError::HeaderMismatch { id: None })
        );
        assert_eq!(
            check_announced(&announced, &body(&format!("[{read}]"))),
            Ok(()),
            "a batch of exactly the announced call is that call"
        );
        // A notification has no id to answer with.
        let note =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#;
        assert_eq!(
            check_announced(&announced, &body(note)),
            Err(BodyError::HeaderMismatch { id: None })
        );
        assert_eq!(
            check_announced(&call("notifications/cancelled", None), &body(note)),
            Ok(())
        );
        // prompts/get and resources/read are compared by their own mirrored value.
        let prompt = r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#;
        assert_eq!(
            check_announced(&call("prompts/get", Some("p")), &body(prompt)),
            Ok(())
        );
        assert!(check_announced(&call("prompts/get", Some("q")), &body(prompt)).is_err());
    }

    #[test]
    fn an_encoded_name_matches_the_body_it_encodes() {
        let body = body(
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"weather/東京"}}"#,
        );
        let announced = headers(Some("tools/call"), Some(&encode("weather/東京")))
            .unwrap()
            .unwrap();
        assert_eq!(check_announced(&announced, &body), Ok(()));
        // The encoded text itself is not the name.
        assert!(
            check_announced(&call("tools/call", Some(&encode("weather/東京"))), &body).is_err()
        );
        // Another name, encoded: a mismatch answered with id 3.
        let other = headers(Some("tools/call"), Some(&encode("weather/大阪")))
            .unwrap()
            .unwrap();
        assert_eq!(
            check_announced(&other, &body),
            Err(BodyError::HeaderMismatch {
                id: Some(Value::from(3))
            })
        );
    }
}
