//! How the end-to-end tests talk to the gateway and see what it answered: one [`Answer`] for
//! every test file, whether the request went out through reqwest or was written to the socket by
//! hand (the adversarial corpus), and the MCP client's POST they all send.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde_json::Value;

/// A JSON-RPC request that needs no MCP session.
pub const TOOLS_LIST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

/// An HTTP answer as a test sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// In the order received; names lower-case, values with non-UTF-8 bytes replaced.
    pub headers: Vec<(String, String)>,
    /// Empty when the answer was read with [`Answer::read_refusal`] and was a 200.
    pub body: String,
    /// From sending the request to having read the answer (zero for a parsed raw response).
    pub elapsed: Duration,
}

impl Answer {
    /// Status, headers and the whole body.
    pub async fn read(resp: reqwest::Response, started: Instant) -> anyhow::Result<Answer> {
        let (status, headers) = head(&resp);
        let body = resp.text().await?;
        Ok(Answer {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// Status and headers, and the body only when the gateway refused: a 200 is the upstream's
    /// MCP answer, which a test of the gateway's refusals does not read.
    pub async fn read_refusal(resp: reqwest::Response, started: Instant) -> anyhow::Result<Answer> {
        let (status, headers) = head(&resp);
        let body = if status == 200 {
            String::new()
        } else {
            resp.text().await?
        };
        Ok(Answer {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// A complete HTTP/1.1 response as read from the socket: status line, headers, body.
    pub fn parse_raw(raw: &[u8]) -> anyhow::Result<Answer> {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
        let head = String::from_utf8_lossy(&raw[..split]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
        Ok(Answer {
            status,
            headers,
            body,
            elapsed: Duration::ZERO,
        })
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `WWW-Authenticate` challenge, if any.
    pub fn challenge(&self) -> Option<&str> {
        self.header("www-authenticate")
    }

    /// The body as JSON; a body that is not JSON as a JSON string, so a failing assertion still
    /// shows it.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }

    /// The body's `error` member (the OAuth / RFC 6750 error code), `Null` when there is none.
    pub fn error(&self) -> Value {
        self.json()["error"].clone()
    }
}

fn head(resp: &reqwest::Response) -> (u16, Vec<(String, String)>) {
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    (resp.status().as_u16(), headers)
}

/// An MCP client's JSON-RPC POST of `body` to `url`, with `authorization` as the whole header
/// value when given. A new client each time, so each request opens its own connection (with
/// several Envoy workers, the kernel spreads connections, not requests).
pub fn jsonrpc_post(
    url: &str,
    authorization: Option<&str>,
    body: impl Into<String>,
) -> reqwest::RequestBuilder {
    let req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.into());
    match authorization {
        Some(a) => req.header("authorization", a),
        None => req,
    }
}

/// `Bearer {token}`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
