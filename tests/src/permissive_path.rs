//! A model of the most permissive way servers read a request path before routing it, and an
//! upstream that routes by it.
//!
//! The filter decides on a path (public route, protected route, unmatched); the upstream then
//! acts on its own reading of the same bytes. The model does everything servers are known to
//! do: percent-decode repeatedly, read `\` as `/`, cut at a decoded `?`/`#`, strip `;params` from
//! segments (servlet containers), resolve dot segments, merge `//`, trim trailing dots and spaces
//! (Windows) and route ignoring case (Express, ASP.NET). The path-confusion tests hold the
//! filter's decisions against it: a request the filter did not authenticate must never land on a
//! protected handler here.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Percent-decoding rounds the model applies (a server decoding twice is already unusual).
const DECODE_ROUNDS: usize = 4;
/// The largest request head the upstream reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One round of lenient percent-decoding: malformed escapes are kept as they are.
fn decode_once(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn cut_at_query(bytes: &mut Vec<u8>) {
    if let Some(q) = bytes.iter().position(|b| *b == b'?' || *b == b'#') {
        bytes.truncate(q);
    }
}

/// The path (lower case, no query) the most permissive server routes a request target to.
pub fn resolve(target: &[u8]) -> String {
    let mut bytes = target.to_vec();
    cut_at_query(&mut bytes);
    for _ in 0..DECODE_ROUNDS {
        bytes = decode_once(&bytes);
    }
    cut_at_query(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let mut resolved: Vec<String> = Vec::new();
    for segment in text.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        match segment {
            "" | "." => {}
            ".." => {
                resolved.pop();
            }
            s => {
                let s = s.trim_end_matches(['.', ' ']);
                if !s.is_empty() {
                    resolved.push(s.to_ascii_lowercase());
                }
            }
        }
    }
    format!("/{}", resolved.join("/"))
}

/// The first of `prefixes` (longest first) that covers a resolved path on segment boundaries.
pub fn route_of<'a>(resolved: &str, prefixes: &[&'a str]) -> Option<&'a str> {
    prefixes.iter().copied().find(|prefix| {
        let prefix = prefix.trim_end_matches('/').to_ascii_lowercase();
        prefix.is_empty() || resolved == prefix || resolved.starts_with(&format!("{prefix}/"))
    })
}

/// One request as the permissive upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub target: String,
    pub resolved: String,
    pub authorization: Option<String>,
}

/// An HTTP/1.1 upstream that answers every request `200` with the path it resolved, and keeps
/// what it saw. It reads the request line itself (no HTTP library), so no parser's own
/// strictness hides what a permissive server would accept.
pub struct PermissiveUpstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PermissiveUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&log)));
            }
        });
        Ok(Self { port, seen, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for PermissiveUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request per connection: read the head (and a `Content-Length` body), answer, close.
async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_HEAD_BYTES {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_string();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body_read = buf.len() - (head_end + 4);
    while body_read < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body_read += n,
        }
    }
    let resolved = resolve(target.as_bytes());
    let answer = serde_json::json!({ "resolved": resolved }).to_string();
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            target,
            resolved,
            authorization: header("authorization"),
        });
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_every_known_trick() {
        assert_eq!(resolve(b"/healthz/../mcp"), "/mcp");
        assert_eq!(resolve(b"/healthz/%2e%2e/MCP"), "/mcp");
        assert_eq!(resolve(b"/healthz/%252e%252e/mcp"), "/mcp");
        assert_eq!(resolve(b"/healthz\\..\\mcp;jsessionid=1"), "/mcp");
        assert_eq!(resolve(b"/healthz%2F..%2Fmcp"), "/mcp");
        assert_eq!(resolve(b"//mcp//x/./"), "/mcp/x");
        assert_eq!(resolve(b"/mcp.?a=/../b"), "/mcp");
        assert_eq!(resolve(b"/mcp%3F/../healthz"), "/mcp");
        assert_eq!(resolve(b"/mcp%20"), "/mcp");
        assert_eq!(resolve(b"/../../mcp"), "/mcp");
        assert_eq!(resolve(b"/"), "/");
    }

    #[test]
    fn routes_on_segment_boundaries() {
        let routes = ["/crm/mcp", "/mcp", "/healthz"];
        assert_eq!(route_of("/mcp", &routes), Some("/mcp"));
        assert_eq!(route_of("/mcp/x", &routes), Some("/mcp"));
        assert_eq!(route_of("/crm/mcp", &routes), Some("/crm/mcp"));
        assert_eq!(route_of("/mcpx", &routes), None);
        assert_eq!(route_of("/", &routes), None);
    }
}
