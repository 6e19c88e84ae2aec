//! Requests written to the socket by hand (not through an HTTP client library), so headers can be
//! exactly as malformed as an attacker makes them: duplicates, odd whitespace, non-UTF-8.

use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::client::{Answer, TOOLS_LIST};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::Result;

/// The JSON-RPC body of every corpus request.
const MCP_BODY: &str = TOOLS_LIST;

/// One request written byte for byte: `POST {path}` with a JSON-RPC body and `headers` exactly as
/// given (each value raw bytes), `Connection: close`, read to EOF.
pub async fn send_raw(port: u16, path: &str, headers: &[(String, Vec<u8>)]) -> Result<Answer> {
    let mut req = Vec::new();
    req.extend_from_slice(format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n").as_bytes());
    req.extend_from_slice(b"Content-Type: application/json\r\n");
    req.extend_from_slice(b"Accept: application/json, text/event-stream\r\n");
    req.extend_from_slice(b"Connection: close\r\n");
    for (name, value) in headers {
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", MCP_BODY.len()).as_bytes());
    req.extend_from_slice(MCP_BODY.as_bytes());

    let io = async {
        let mut stream =
            tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        stream.write_all(&req).await?;
        // Read until the response is complete (by Content-Length), not until EOF: after a local
        // reply Envoy waits up to its delayed-close timeout (1 s) for the client to close first.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if response_complete(&raw) {
                break;
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(15), io).await??;
    Answer::parse_raw(&raw)
}

/// Whether `raw` holds the whole head and a body of the announced `Content-Length`.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|len| raw.len() >= end + 4 + len)
}
