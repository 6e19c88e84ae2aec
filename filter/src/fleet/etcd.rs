//! etcd's v3 JSON API (the gRPC gateway every etcd server serves over HTTP/1.1), for the calls
//! the fleet store makes: requests are built as JSON bodies for `POST /v3/...`, answers parsed
//! into what the store needs. Keys and values travel base64-encoded; int64 fields (lease ids,
//! TTLs) are sent and received as strings, since lease ids exceed 2^53.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

pub const TXN_PATH: &str = "/v3/kv/txn";
pub const DELETE_PATH: &str = "/v3/kv/deleterange";
pub const LEASE_GRANT_PATH: &str = "/v3/lease/grant";
pub const AUTHENTICATE_PATH: &str = "/v3/auth/authenticate";

/// An etcd answer not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No answer (connection failure or timeout).
    NoAnswer,
    /// 401: the auth token is missing, expired or revoked.
    Unauthenticated,
    /// Another status (with etcd's message when it sent one).
    Status(u16, String),
    /// A 200 whose body is not the answer asked for.
    Garbage(&'static str),
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdError::NoAnswer => f.write_str("no answer"),
            EtcdError::Unauthenticated => f.write_str("401: authentication needed"),
            EtcdError::Status(s, m) if m.is_empty() => write!(f, "status {s}"),
            EtcdError::Status(s, m) => write!(f, "status {s}: {m}"),
            EtcdError::Garbage(what) => write!(f, "unexpected answer: {what}"),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// What a lookup found for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The entry's (sealed) value.
    Value(Vec<u8>),
    /// No value, and this replica now holds the entry's lock.
    LockTaken,
    /// No value; another replica holds the lock (is exchanging).
    Locked,
    /// No value and no lock.
    Free,
}

/// One round trip that reads the entry and, when `lock_lease` is given and neither the value nor
/// a lock exists, takes the lock (a key attached to that lease, so a replica that dies while
/// holding it frees it when the lease ends).
pub fn lookup(value_key: &[u8], lock_key: &[u8], lock_lease: Option<&str>) -> String {
    let ranges = json!([
        {"request_range": {"key": b64(value_key)}},
        {"request_range": {"key": b64(lock_key)}},
    ]);
    let body = match lock_lease {
        Some(lease) => json!({
            "compare": [
                {"key": b64(value_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                {"key": b64(lock_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
            ],
            "success": [{"request_put": {"key": b64(lock_key), "value": b64(b"1"), "lease": lease}}],
            "failure": ranges,
        }),
        None => json!({ "success": ranges }),
    };
    body.to_string()
}

/// Parses a [`lookup`] answer.
pub fn parse_lookup(status: Option<u16>, body: &[u8]) -> Result<Lookup, EtcdError> {
    let doc = answer(status, body)?;
    let responses = doc
        .get("responses")
        .and_then(Value::as_array)
        .ok_or(EtcdError::Garbage("a transaction answer without responses"))?;
    if responses
        .first()
        .is_some_and(|r| r.get("response_put").is_some())
    {
        return Ok(Lookup::LockTaken);
    }
    let range = |i: usize| -> Result<Option<Vec<u8>>, EtcdError> {
        let r = responses
            .get(i)
            .and_then(|r| r.get("response_range"))
            .ok_or(EtcdError::Garbage(
                "a transaction answer without its ranges",
            ))?;
        let Some(kv) = r
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|k| k.first())
        else {
            return Ok(None);
        };
        // etcd omits empty fields: a key with an empty value has no "value".
        let value = kv.get("value").and_then(Value::as_str).unwrap_or("");
        STANDARD
            .decode(value)
            .map(Some)
            .map_err(|_| EtcdError::Garbage("a value that is not base64"))
    };
    if let Some(value) = range(0)? {
        return Ok(Lookup::Value(value));
    }
    Ok(if range(1)?.is_some() {
        Lookup::Locked
    } else {
        Lookup::Free
    })
}

/// `POST /v3/lease/grant` for a lease of `ttl_secs`.
pub fn lease_grant(ttl_secs: u64) -> String {
    json!({ "TTL": ttl_secs.to_string() }).to_string()
}

/// A granted lease: its id (kept as etcd's decimal string) and TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub ttl_secs: u64,
}

pub fn parse_lease(status: Option<u16>, body: &[u8]) -> Result<Lease, EtcdError> {
    let doc = answer(status, body)?;
    let id = doc
        .get("ID")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(EtcdError::Garbage("a lease answer without its ID"))?;
    let ttl_secs = doc
        .get("TTL")
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok())
        .ok_or(EtcdError::Garbage("a lease answer without its TTL"))?;
    Ok(Lease {
        id: id.to_string(),
        ttl_secs,
    })
}

/// Writes the entry's value under `lease` and drops its lock, in one transaction.
pub fn write(value_key: &[u8], sealed: &[u8], lease: &str, lock_key: &[u8]) -> String {
    json!({
        "success": [
            {"request_put": {"key": b64(value_key), "value": b64(sealed), "lease": lease}},
            {"request_delete_range": {"key": b64(lock_key)}},
        ],
    })
    .to_string()
}

/// `POST /v3/kv/deleterange` of one key.
pub fn delete(key: &[u8]) -> String {
    json!({ "key": b64(key) }).to_string()
}

/// `POST /v3/auth/authenticate`.
pub fn authenticate(user: &str, password: &str) -> String {
    json!({ "name": user, "password": password }).to_string()
}

pub fn parse_auth_token(status: Option<u16>, body: &[u8]) -> Result<String, EtcdError> {
    let doc = answer(status, body)?;
    doc.get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .ok_or(EtcdError::Garbage("an authenticate answer without a token"))
}

/// Any 200 answer with a JSON object body (writes and deletes need nothing more).
pub fn parse_ok(status: Option<u16>, body: &[u8]) -> Result<(), EtcdError> {
    answer(status, body).map(|_| ())
}

/// A 200 with a JSON object, or the error it is.
fn answer(status: Option<u16>, body: &[u8]) -> Result<Value, EtcdError> {
    match status {
        None => return Err(EtcdError::NoAnswer),
        Some(200) => {}
        Some(401) => return Err(EtcdError::Unauthenticated),
        Some(s) => {
            let message = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(sanitize))
                .unwrap_or_default();
            return Err(EtcdError::Status(s, message));
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(EtcdError::Garbage("a body that is not a JSON object")),
    }
}

/// etcd's message as a log may show it: printable ASCII, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(120)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = r#""header":{"cluster_id":"1","member_id":"2","revision":"9","raft_term":"2"}"#;

    #[test]
    fn lookup_takes_the_lock_only_when_value_and_lock_are_absent() {
        let body: Value = serde_json::from_str(&lookup(b"v", b"l", Some("77"))).unwrap();
        assert_eq!(body["compare"].as_array().unwrap().len(), 2);
        assert_eq!(body["compare"][0]["key"], b64(b"v"));
        assert_eq!(body["compare"][1]["key"], b64(b"l"));
        assert_eq!(body["success"][0]["request_put"]["lease"], "77");
        assert_eq!(body["failure"][0]["request_range"]["key"], b64(b"v"));
        let plain: Value = serde_json::from_str(&lookup(b"v", b"l", None)).unwrap();
        assert!(plain.get("compare").is_none());
        assert!(plain["success"][0].get("request_range").is_some());
    }

    #[test]
    fn lookup_answers_as_etcd_gives_them() {
        let won = format!(
            r#"{{{H},"succeeded":true,"responses":[{{"response_put":{{"header":{{"revision":"9"}}}}}}]}}"#
        );
        assert_eq!(
            parse_lookup(Some(200), won.as_bytes()),
            Ok(Lookup::LockTaken)
        );
        let value = format!(
            r#"{{{H},"responses":[{{"response_range":{{"header":{{}},"kvs":[{{"key":"dg==","value":"b3du","lease":"5"}}],"count":"1"}}}},{{"response_range":{{"header":{{}}}}}}]}}"#
        );
        assert_eq!(
            parse_lookup(Some(200), value.as_bytes()),
            Ok(Lookup::Value(b"own".to_vec()))
        );
        let locked = format!(
            r#"{{{H},"responses":[{{"response_range":{{"header":{{}}}}}},{{"response_range":{{"kvs":[{{"key":"bA==","value":"MQ=="}}],"count":"1"}}}}]}}"#
        );
        assert_eq!(
            parse_lookup(Some(200), locked.as_bytes()),
            Ok(Lookup::Locked)
        );
        let free = format!(
            r#"{{{H},"succeeded":true,"responses":[{{"response_range":{{}}}},{{"response_range":{{}}}}]}}"#
        );
        assert_eq!(parse_lookup(Some(200), free.as_bytes()), Ok(Lookup::Free));
    }

    #[test]
    fn bad_answers_are_errors_never_values() {
        assert_eq!(parse_lookup(None, b""), Err(EtcdError::NoAnswer));
        assert_eq!(
            parse_lookup(Some(401), br#"{"error":"invalid auth token","code":16}"#),
            Err(EtcdError::Unauthenticated)
        );
        assert_eq!(
            parse_lookup(
                Some(400),
                br#"{"error":"x","message":"key is not provided","code":3}"#
            ),
            Err(EtcdError::Status(400, "key is not provided".into()))
        );
        assert!(matches!(
            parse_lookup(Some(200), b"<html>"),
            Err(EtcdError::Garbage(_))
        ));
        assert!(matches!(
            parse_lookup(Some(200), b"{}"),
            Err(EtcdError::Garbage(_))
        ));
        assert!(matches!(
            parse_lookup(
                Some(200),
                br#"{"responses":[{"response_range":{"kvs":[{"value":"%%%"}]}},{"response_range":{}}]}"#
            ),
            Err(EtcdError::Garbage(_))
        ));
        assert!(matches!(
            parse_lookup(Some(200), br#"{"responses":[{"response_range":{}}]}"#),
            Err(EtcdError::Garbage(_))
        ));
    }

    #[test]
    fn leases_and_tokens_parse_from_strings() {
        let lease = format!(r#"{{{H},"ID":"2324035814286351896","TTL":"5"}}"#);
        assert_eq!(
            parse_lease(Some(200), lease.as_bytes()),
            Ok(Lease {
                id: "2324035814286351896".into(),
                ttl_secs: 5
            })
        );
        assert!(parse_lease(Some(200), br#"{"ID":2324035814286351896,"TTL":"5"}"#).is_err());
        assert!(parse_lease(Some(200), br#"{"ID":"-1","TTL":"5"}"#).is_err());
        assert_eq!(lease_grant(7), r#"{"TTL":"7"}"#);
        assert_eq!(
            parse_auth_token(Some(200), br#"{"token":"zOAp.2178"}"#),
            Ok("zOAp.2178".into())
        );
        assert!(parse_auth_token(Some(200), br#"{"token":"a b"}"#).is_err());
    }

    #[test]
    fn write_puts_under_the_lease_and_drops_the_lock() {
        let body: Value = serde_json::from_str(&write(b"v", b"sealed", "9", b"l")).unwrap();
        assert_eq!(body["success"][0]["request_put"]["value"], b64(b"sealed"));
        assert_eq!(body["success"][0]["request_put"]["lease"], "9");
        assert_eq!(body["success"][1]["request_delete_range"]["key"], b64(b"l"));
    }
}
