//! An adversarial corpus through a real Envoy: several hundred individually named requests to
//! `/mcp` that must all be refused with the right RFC 6750 answer, after which nothing reached the
//! upstream, nothing was exchanged, Envoy still runs with no trapped VM, and a good client still
//! gets through.
//!
//! Requests are written to the socket by hand (not through an HTTP client library), so headers
//! can be exactly as malformed as an attacker makes them: duplicates, odd whitespace, non-UTF-8.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use gateway_tests::harness::{Stack, StackOptions};
use gateway_tests::idp::{MintRequest, ScopeStyle};
use gateway_tests::mcp;
use rsa::sha2::{Digest as _, Sha256, Sha384, Sha512};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Result<T = ()> = anyhow::Result<T>;

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

const MCP_BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

/// What came back, parsed from the raw response.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request written byte for byte: `POST {path}` with a JSON-RPC body and `headers` exactly as
/// given (each value raw bytes), `Connection: close`, read to EOF.
async fn send_raw(port: u16, path: &str, headers: &[(String, Vec<u8>)]) -> Result<Answer> {
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
    parse_response(&raw)
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

fn parse_response(raw: &[u8]) -> Result<Answer> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow::anyhow!("no end of headers in {:?}", String::from_utf8_lossy(raw))
        })?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 400, `error="invalid_request"`.
    InvalidRequest,
    /// 401, a challenge without `error` (no credentials, or another scheme).
    NoCredentials,
    /// 401, `error="invalid_token"`.
    InvalidToken,
    /// 403, `error="insufficient_scope"`, `scope="mcp:tools:call"`.
    InsufficientScope,
    /// More than one `Authorization` header: 400 `invalid_request` (RFC 6750). Envoy joins
    /// repeated headers into one value with `,` before the filter sees them; the filter
    /// recognises a joined Bearer credential.
    DuplicateAuthorization,
    /// Control bytes in a header value: Envoy's HTTP/1 codec refuses some itself (400 before any
    /// filter runs) and silently drops others (a bare CR), so the filter sees a damaged token and
    /// answers 401 `invalid_token`. Either way: refused.
    EnvoyOrInvalidToken,
}

struct Case {
    name: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    expect: Expect,
}

fn check(a: &Answer, expect: Expect) -> std::result::Result<(), String> {
    if expect == Expect::EnvoyOrInvalidToken {
        if a.status == 400 && a.header("www-authenticate").is_none() && a.body == "Bad Request" {
            return Ok(());
        }
        return check(a, Expect::InvalidToken)
            .map_err(|e| format!("neither Envoy's own 400 nor the filter's 401: {e}"));
    }
    if expect == Expect::DuplicateAuthorization {
        return check(a, Expect::InvalidRequest);
    }
    let (status, error) = match expect {
        Expect::DuplicateAuthorization | Expect::EnvoyOrInvalidToken => unreachable!(),
        Expect::InvalidRequest => (400, Some("invalid_request")),
        Expect::NoCredentials => (401, None),
        Expect::InvalidToken => (401, Some("invalid_token")),
        Expect::InsufficientScope => (403, Some("insufficient_scope")),
    };
    if a.status != status {
        return Err(format!(
            "expected {status}, got {} (body {})",
            a.status, a.body
        ));
    }
    let challenge = a
        .header("www-authenticate")
        .ok_or_else(|| format!("{status} without WWW-Authenticate (body {})", a.body))?;
    if !challenge.starts_with("Bearer") || !challenge.contains("realm=\"mcp\"") {
        return Err(format!("unexpected challenge {challenge:?}"));
    }
    let body: Value =
        serde_json::from_str(&a.body).map_err(|e| format!("body {:?}: {e}", a.body))?;
    match error {
        Some(e) => {
            if !challenge.contains(&format!("error=\"{e}\"")) {
                return Err(format!("challenge {challenge:?} lacks error=\"{e}\""));
            }
            if body["error"] != e {
                return Err(format!("body error {} instead of {e}", body["error"]));
            }
        }
        None => {
            if challenge.contains("error=") {
                return Err(format!(
                    "no-credentials challenge carries an error: {challenge:?}"
                ));
            }
        }
    }
    if expect == Expect::InsufficientScope && !challenge.contains("scope=\"mcp:tools:call\"") {
        return Err(format!("403 does not name the scope: {challenge:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token building
// ---------------------------------------------------------------------------------------------

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn segments(token: &str) -> Vec<String> {
    token.split('.').map(str::to_string).collect()
}

/// The claims of a minted token, to alter and re-sign.
fn claims_of(token: &str) -> Map<String, Value> {
    let payload = URL_SAFE_NO_PAD
        .decode(&segments(token)[1])
        .expect("payload is base64url");
    serde_json::from_slice(&payload).expect("payload is a JSON object")
}

/// HMAC (RFC 2104) over the SHA-2 family, so HS* forgeries need no extra dependency.
fn hmac(alg: &str, key: &[u8], msg: &[u8]) -> Vec<u8> {
    type Hash = fn(&[u8]) -> Vec<u8>;
    let (block, hash): (usize, Hash) = match alg {
        "HS256" => (64, |d| Sha256::digest(d).to_vec()),
        "HS384" => (128, |d| Sha384::digest(d).to_vec()),
        _ => (128, |d| Sha512::digest(d).to_vec()),
    };
    let mut k = if key.len() > block {
        hash(key)
    } else {
        key.to_vec()
    };
    k.resize(block, 0);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(hash(&inner)).collect();
    hash(&outer)
}

fn der_len(len: usize) -> Vec<u8> {
    match len {
        0..=127 => vec![len as u8],
        128..=255 => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if v.first().is_some_and(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// The RSA public key of a JWK as PKCS#1 DER and SubjectPublicKeyInfo DER.
fn public_key_der(jwk: &Value) -> (Vec<u8>, Vec<u8>) {
    let n = URL_SAFE_NO_PAD
        .decode(jwk["n"].as_str().expect("n"))
        .expect("n is base64url");
    let e = URL_SAFE_NO_PAD
        .decode(jwk["e"].as_str().expect("e"))
        .expect("e is base64url");
    let pkcs1 = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
    let rsa_oid = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0u8];
    bit_string.extend_from_slice(&pkcs1);
    let spki = der(
        0x30,
        &[der(0x30, &rsa_oid), der(0x03, &bit_string)].concat(),
    );
    (pkcs1, spki)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b = STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Makes tokens against a running stack.
struct Forge<'a> {
    stack: &'a Stack,
    kid: String,
}

impl Forge<'_> {
    fn mint(&self, req: MintRequest) -> String {
        self.stack.mint(&req)
    }

    fn good(&self) -> String {
        self.stack.user_token()
    }

    fn good_claims(&self) -> Map<String, Value> {
        claims_of(&self.good())
    }

    fn header(&self) -> Value {
        json!({"kid": self.kid, "alg": "RS256"})
    }

    /// RS256 by the `mcp` authorization server's current key over exactly these bytes.
    fn sign_bytes(&self, header: &[u8], claims: &[u8]) -> String {
        self.sign_bytes_as("mcp", header, claims)
    }

    fn sign_bytes_as(&self, as_id: &str, header: &[u8], claims: &[u8]) -> String {
        self.stack
            .idp
            .sign_raw(as_id, header, claims)
            .expect("sign_raw")
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_bytes(header.to_string().as_bytes(), claims.to_string().as_bytes())
    }

    /// A good token with one claim changed (`Value::Null` removes it).
    fn with_claim(&self, name: &str, value: Value) -> String {
        let mut c = self.good_claims();
        if value.is_null() {
            c.remove(name);
        } else {
            c.insert(name.into(), value);
        }
        self.sign(&self.header(), &Value::Object(c))
    }

    /// Good claims as JSON text with `raw` spliced in as the first members (for duplicates,
    /// literals serde_json would not produce, deep nesting).
    fn with_raw_members(&self, raw: &str) -> String {
        let claims = Value::Object(self.good_claims()).to_string();
        let text = claims.replacen('{', &format!("{{{raw},"), 1);
        self.sign_bytes(self.header().to_string().as_bytes(), text.as_bytes())
    }

    /// Good claims with `name` replaced by the literal JSON text `raw`.
    fn with_raw_claim(&self, name: &str, raw: &str) -> String {
        let mut c = self.good_claims();
        c.remove(name);
        let text = Value::Object(c)
            .to_string()
            .replacen('{', &format!("{{\"{name}\":{raw},"), 1);
        self.sign_bytes(self.header().to_string().as_bytes(), text.as_bytes())
    }

    fn with_header(&self, header: &Value) -> String {
        self.sign(header, &Value::Object(self.good_claims()))
    }

    /// A token whose signature is HMAC with `key` as the secret.
    fn hmac_token(&self, alg: &str, key: &[u8]) -> String {
        let h = json!({"kid": self.kid, "alg": alg}).to_string();
        let c = Value::Object(self.good_claims()).to_string();
        let input = format!("{}.{}", b64(h.as_bytes()), b64(c.as_bytes()));
        let sig = hmac(alg, key, input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    /// Header `alg` replaced, the signature left as the real RS256 one.
    fn with_alg_keeping_signature(&self, alg: Value, kid: bool) -> String {
        let good = self.good();
        let s = segments(&good);
        let mut h = Map::new();
        if kid {
            h.insert("kid".into(), json!(self.kid));
        }
        if !alg.is_null() {
            h.insert("alg".into(), alg);
        }
        format!(
            "{}.{}.{}",
            b64(Value::Object(h).to_string().as_bytes()),
            s[1],
            s[2]
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

fn bearer(token: &str) -> Vec<(String, Vec<u8>)> {
    vec![(
        "Authorization".into(),
        format!("Bearer {token}").into_bytes(),
    )]
}

struct Corpus {
    cases: Vec<Case>,
}

impl Corpus {
    fn add(&mut self, name: impl Into<String>, headers: Vec<(String, Vec<u8>)>, expect: Expect) {
        self.add_at(name, "/mcp", headers, expect);
    }

    fn add_at(
        &mut self,
        name: impl Into<String>,
        path: &str,
        headers: Vec<(String, Vec<u8>)>,
        expect: Expect,
    ) {
        let name = name.into();
        assert!(
            !self.cases.iter().any(|c| c.name == name),
            "duplicate case name {name}"
        );
        self.cases.push(Case {
            name,
            path: path.to_string(),
            headers,
            expect,
        });
    }

    fn token(&mut self, name: impl Into<String>, token: &str, expect: Expect) {
        self.add(name, bearer(token), expect);
    }
}

/// Every way of breaking a token's structure, applied to a validly signed token.
fn structural_mutations(token: &str, other: &str, kid: &str) -> Vec<(&'static str, String)> {
    let s = segments(token);
    let (h, p, sig) = (&s[0], &s[1], &s[2]);
    let sig_bytes = URL_SAFE_NO_PAD.decode(sig).expect("signature is base64url");
    let jwe_header = b64(json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kid})
        .to_string()
        .as_bytes());
    let mid = p.len() / 2;
    let flip = |seg: &str, at: usize| -> String {
        let mut c: Vec<char> = seg.chars().collect();
        c[at] = if c[at] == 'A' { 'B' } else { 'A' };
        c.into_iter().collect()
    };
    let standard = STANDARD_NO_PAD.encode(&sig_bytes);
    assert_ne!(&standard, sig, "signature has no - or _ to re-encode");
    vec![
        ("two segments", format!("{h}.{p}")),
        ("one segment", h.clone()),
        ("four segments", format!("{h}.{p}.{sig}.{sig}")),
        ("four segments, last empty", format!("{h}.{p}.{sig}.")),
        ("six segments", format!("{h}.{p}.{sig}.{h}.{p}.{sig}")),
        (
            "JWE-shaped five segments",
            format!(
                "{jwe_header}.{}.{}.{p}.{}",
                b64(&[7; 256]),
                b64(&[1; 12]),
                b64(&[2; 16])
            ),
        ),
        (
            "five segments from the token",
            format!("{h}.{p}.{sig}.{p}.{sig}"),
        ),
        ("empty header segment", format!(".{p}.{sig}")),
        ("empty payload segment", format!("{h}..{sig}")),
        ("empty signature segment", format!("{h}.{p}.")),
        ("only dots", "..".into()),
        ("padding on the header", format!("{h}=.{p}.{sig}")),
        ("padding on the payload", format!("{h}.{p}==.{sig}")),
        (
            "base64url signature with padding",
            format!("{h}.{p}.{}", URL_SAFE.encode(&sig_bytes)),
        ),
        ("standard base64 signature", format!("{h}.{p}.{standard}")),
        (
            "standard base64 padded signature",
            format!("{h}.{p}.{}", STANDARD.encode(&sig_bytes)),
        ),
        (
            "space inside the payload",
            format!("{h}.{} {}.{sig}", &p[..mid], &p[mid..]),
        ),
        (
            "tab inside the payload",
            format!("{h}.{}\t{}.{sig}", &p[..mid], &p[mid..]),
        ),
        ("space before the signature", format!("{h}.{p}. {sig}")),
        ("comma inside", format!("{h},{p}.{sig}")),
        ("quoted token", format!("\"{token}\"")),
        ("trailing semicolon", format!("{token};")),
        ("token twice", format!("{token} {token}")),
        ("percent-encoded dots", format!("{h}%2E{p}%2E{sig}")),
        (
            "truncated signature",
            format!("{h}.{p}.{}", &sig[..sig.len() - 4]),
        ),
        (
            "signature of another token",
            format!("{h}.{p}.{}", segments(other)[2]),
        ),
        (
            "payload of another token",
            format!("{h}.{}.{sig}", segments(other)[1]),
        ),
        (
            "one payload character changed",
            format!("{h}.{}.{sig}", flip(p, mid)),
        ),
        (
            "one header character changed",
            format!("{}.{p}.{sig}", flip(h, 3)),
        ),
        (
            "one signature character changed",
            format!("{h}.{p}.{}", flip(sig, 100)),
        ),
        (
            "signature reversed",
            format!("{h}.{p}.{}", sig.chars().rev().collect::<String>()),
        ),
        ("token lower-cased", token.to_lowercase()),
        ("segments swapped", format!("{p}.{h}.{sig}")),
    ]
}

fn build_corpus(f: &Forge<'_>, attacker_url: &str) -> Corpus {
    use Expect::*;
    let mut c = Corpus { cases: Vec::new() };
    let good = f.good();
    let kid = f.kid.clone();
    let now = now();

    // --- no credentials, other schemes ---------------------------------------------------------
    c.add("no Authorization header", vec![], NoCredentials);
    let basic = STANDARD.encode("user:pass");
    for (name, value) in [
        ("Basic scheme", format!("Basic {basic}")),
        ("Basic scheme carrying the JWT", format!("Basic {good}")),
        (
            "Digest scheme",
            "Digest username=\"u\", realm=\"mcp\", nonce=\"n\"".to_string(),
        ),
        ("DPoP scheme with the JWT", format!("DPoP {good}")),
        ("Token scheme with the JWT", format!("Token {good}")),
        ("MAC scheme", format!("MAC {good}")),
        ("Negotiate scheme", "Negotiate YIIBhwYGKwYBBQUC".to_string()),
        ("Bearer glued to the token", format!("Bearer{good}")),
        ("Bearer with a tab separator", format!("Bearer\t{good}")),
        ("Bearer- prefix", format!("Bearer-{good}")),
        ("Bear (truncated scheme)", format!("Bear {good}")),
        ("token without any scheme", good.clone()),
    ] {
        c.add(
            name,
            vec![("Authorization".into(), value.into_bytes())],
            NoCredentials,
        );
    }
    for (name, header) in [
        ("token only in X-Access-Token", "X-Access-Token"),
        ("token only in Proxy-Authorization", "Proxy-Authorization"),
        (
            "token only in X-Forwarded-Access-Token",
            "X-Forwarded-Access-Token",
        ),
    ] {
        let v = if header == "Proxy-Authorization" {
            format!("Bearer {good}")
        } else {
            good.clone()
        };
        c.add(name, vec![(header.into(), v.into_bytes())], NoCredentials);
    }
    c.add(
        "token only in a cookie",
        vec![("Cookie".into(), format!("access_token={good}").into_bytes())],
        NoCredentials,
    );

    // --- malformed requests ----------------------------------------------------------------------
    let auth = |v: &str| ("Authorization".to_string(), v.as_bytes().to_vec());
    c.add(
        "two identical Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Bearer and Basic Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Basic {basic}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Basic then Bearer Authorization headers",
        vec![
            auth(&format!("Basic {basic}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "Authorization headers differing in case",
        vec![
            (
                "authorization".into(),
                format!("Bearer {good}").into_bytes(),
            ),
            ("AUTHORIZATION".into(), b"Bearer smuggled".to_vec()),
        ],
        DuplicateAuthorization,
    );
    c.add(
        "three Authorization headers",
        vec![
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
            auth(&format!("Bearer {good}")),
        ],
        DuplicateAuthorization,
    );
    c.add("Bearer with no token", vec![auth("Bearer")], InvalidRequest);
    c.add(
        "Bearer with trailing spaces only",
        vec![auth("Bearer    ")],
        InvalidRequest,
    );
    c.add(
        "lower-case bearer with no token",
        vec![auth("bearer")],
        InvalidRequest,
    );
    let q = |token: &str| format!("/mcp?access_token={token}");
    c.add_at(
        "access_token in the query only",
        &q(&good),
        vec![],
        InvalidRequest,
    );
    c.add_at(
        "access_token in the query and a good header",
        &q(&good),
        bearer(&good),
        InvalidRequest,
    );
    c.add_at(
        "access_token after another query parameter",
        &format!("/mcp?session=1&access_token={good}"),
        bearer(&good),
        InvalidRequest,
    );
    c.add_at(
        "percent-encoded access_token name",
        &format!("/mcp?access%5Ftoken={good}"),
        bearer(&good),
        InvalidRequest,
    );
    c.add_at(
        "empty access_token parameter",
        "/mcp?access_token=",
        bearer(&good),
        InvalidRequest,
    );
    c.add_at(
        "bare access_token parameter",
        "/mcp?access_token",
        bearer(&good),
        InvalidRequest,
    );

    // --- structure × several base tokens ---------------------------------------------------------
    let bases = [
        ("Okta token", good.clone()),
        (
            "scope-string token",
            f.mint(MintRequest {
                scope_style: ScopeStyle::Scope,
                ..MintRequest::default()
            }),
        ),
        (
            "other user's token",
            f.mint(MintRequest {
                sub: "mallory@example.com".into(),
                ..MintRequest::default()
            }),
        ),
    ];
    let other = f.mint(MintRequest {
        sub: "admin@example.com".into(),
        ..MintRequest::default()
    });
    for (base, token) in &bases {
        for (mutation, mutated) in structural_mutations(token, &other, &kid) {
            // A comma cannot be told apart from two Authorization headers that Envoy joined
            // with ",": the filter answers it as a duplicate (400 invalid_request).
            let expect = if mutation == "comma inside" {
                InvalidRequest
            } else {
                InvalidToken
            };
            c.token(format!("{mutation} ({base})"), &mutated, expect);
        }
    }

    // --- algorithms ----------------------------------------------------------------------------
    let claims_seg = b64(Value::Object(f.good_claims()).to_string().as_bytes());
    let real_sig = segments(&good)[2].clone();
    for alg in ["none", "None", "NONE", "nOnE"] {
        for with_kid in [true, false] {
            let mut h = json!({"alg": alg});
            if with_kid {
                h["kid"] = json!(kid);
            }
            let h = b64(h.to_string().as_bytes());
            let k = if with_kid { "with kid" } else { "without kid" };
            c.token(
                format!("alg {alg}, {k}, empty signature"),
                &format!("{h}.{claims_seg}."),
                InvalidToken,
            );
            if alg == "none" {
                c.token(
                    format!("alg {alg}, {k}, a real signature of other bytes"),
                    &format!("{h}.{claims_seg}.{real_sig}"),
                    InvalidToken,
                );
            }
        }
    }
    let jwk = f.stack.idp.public_jwk("mcp");
    let (pkcs1, spki) = public_key_der(&jwk);
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        (
            "JWK n as text",
            jwk["n"].as_str().unwrap_or_default().as_bytes().to_vec(),
        ),
        (
            "JWK n decoded",
            URL_SAFE_NO_PAD
                .decode(jwk["n"].as_str().unwrap_or_default())
                .unwrap_or_default(),
        ),
        (
            "JWK e as text",
            jwk["e"].as_str().unwrap_or_default().as_bytes().to_vec(),
        ),
        ("JWK JSON", jwk.to_string().into_bytes()),
        ("PKCS#1 DER", pkcs1.clone()),
        ("SPKI DER", spki.clone()),
        ("PKCS#1 PEM", pem("RSA PUBLIC KEY", &pkcs1).into_bytes()),
        ("SPKI PEM", pem("PUBLIC KEY", &spki).into_bytes()),
        (
            "SPKI PEM without final newline",
            pem("PUBLIC KEY", &spki).trim_end().as_bytes().to_vec(),
        ),
    ];
    for alg in ["HS256", "HS384", "HS512"] {
        for (what, secret) in &secrets {
            c.token(
                format!("{alg} keyed with the public key ({what})"),
                &f.hmac_token(alg, secret),
                InvalidToken,
            );
        }
    }
    for alg in [
        "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256", "rs256",
        " RS256",
    ] {
        c.token(
            format!("alg {alg:?} over a real RS256 signature"),
            &f.with_alg_keeping_signature(json!(alg), true),
            InvalidToken,
        );
    }
    for (what, alg) in [
        ("missing", Value::Null),
        ("array", json!(["RS256"])),
        ("number", json!(256)),
        ("object", json!({"alg": "RS256"})),
    ] {
        c.token(
            format!("alg {what} over a real RS256 signature"),
            &f.with_alg_keeping_signature(alg, true),
            InvalidToken,
        );
    }

    // --- kid -------------------------------------------------------------------------------------
    // The JWKS holds two keys (rotated before the corpus): a token must say which.
    c.token(
        "kid missing with two keys published",
        &f.with_header(&json!({"alg": "RS256"})),
        InvalidToken,
    );
    c.token(
        "kid null with two keys published",
        &f.with_header(&json!({"alg": "RS256", "kid": null})),
        InvalidToken,
    );
    let long_kid = "k".repeat(10 * 1024);
    let mid_kid = "k".repeat(4 * 1024);
    for (what, k) in [
        ("unknown", json!("no-such-key")),
        ("path traversal ../", json!("../../../../etc/passwd")),
        ("relative path", json!("../keys")),
        ("URL", json!("https://evil.example/keys")),
        ("percent-encoded traversal", json!("%2e%2e%2f%2e%2e%2f")),
        ("empty", json!("")),
        ("upper-cased real kid", json!(kid.to_uppercase())),
        ("real kid with trailing space", json!(format!("{kid} "))),
        ("real kid with NUL", json!(format!("{kid}\u{0}"))),
        ("real kid with newline", json!(format!("{kid}\nX"))),
        ("4 KiB long", json!(mid_kid)),
        ("10 KiB long", json!(long_kid)),
        ("number", json!(1)),
        ("zero", json!(0)),
        ("object", json!({"kid": kid})),
        ("array", json!([kid])),
        ("boolean", json!(true)),
        ("backend AS kid", json!(f.stack.idp.kid("backend"))),
    ] {
        c.token(
            format!("kid {what}"),
            &f.with_header(&json!({"alg": "RS256", "kid": k})),
            InvalidToken,
        );
    }

    // --- keys from elsewhere: jku / x5u / jwk / x5c, signed by a key NOT in the JWKS -------------
    let backend_jwk = f.stack.idp.public_jwk("backend");
    let backend_kid = f.stack.idp.kid("backend");
    let claims = Value::Object(f.good_claims()).to_string();
    let foreign =
        |h: Value| f.sign_bytes_as("backend", h.to_string().as_bytes(), claims.as_bytes());
    for (what, h) in [
        (
            "jku to the attacker, real kid",
            json!({"alg": "RS256", "kid": kid, "jku": attacker_url}),
        ),
        (
            "jku to the attacker, attacker kid",
            json!({"alg": "RS256", "kid": backend_kid, "jku": attacker_url}),
        ),
        (
            "jku to the attacker, no kid",
            json!({"alg": "RS256", "jku": attacker_url}),
        ),
        (
            "jku to another AS's JWKS",
            json!({"alg": "RS256", "kid": backend_kid, "jku": f.stack.idp.jwks_uri("backend")}),
        ),
        (
            "x5u to the attacker",
            json!({"alg": "RS256", "kid": kid, "x5u": attacker_url}),
        ),
        (
            "embedded jwk, its kid",
            json!({"alg": "RS256", "kid": backend_kid, "jwk": backend_jwk}),
        ),
        (
            "embedded jwk, real kid",
            json!({"alg": "RS256", "kid": kid, "jwk": backend_jwk}),
        ),
        (
            "embedded jwk, no kid",
            json!({"alg": "RS256", "jwk": backend_jwk}),
        ),
        (
            "x5c chain",
            json!({"alg": "RS256", "kid": kid, "x5c": [STANDARD.encode(&spki)]}),
        ),
    ] {
        c.token(format!("foreign key: {what}"), &foreign(h), InvalidToken);
    }

    // --- crit, enc -------------------------------------------------------------------------------
    for (what, extra) in [
        (
            "unknown crit extension",
            json!({"crit": ["x-unknown"], "x-unknown": 1}),
        ),
        ("crit naming a registered claim", json!({"crit": ["exp"]})),
        ("crit b64 false", json!({"crit": ["b64"], "b64": false})),
        ("empty crit", json!({"crit": []})),
        ("crit as a string", json!({"crit": "x-unknown"})),
        (
            "enc member (JWE header on a JWS)",
            json!({"enc": "A256GCM"}),
        ),
    ] {
        let mut h = f.header();
        for (k, v) in extra.as_object().into_iter().flatten() {
            h[k] = v.clone();
        }
        c.token(what, &f.with_header(&h), InvalidToken);
    }

    // --- header / payload JSON that is not an object or not JSON -----------------------------------
    let good_claims_text = Value::Object(f.good_claims()).to_string();
    for (what, header) in [
        ("array", b"[]".to_vec()),
        ("string", b"\"RS256\"".to_vec()),
        ("number", b"1".to_vec()),
        ("null", b"null".to_vec()),
        ("true", b"true".to_vec()),
        (
            "truncated JSON",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"").into_bytes(),
        ),
        ("empty", Vec::new()),
        (
            "non-UTF-8 bytes",
            b"{\"kid\":\"\xff\xfe\",\"alg\":\"RS256\"}".to_vec(),
        ),
        (
            "trailing garbage",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"}}x").into_bytes(),
        ),
        (
            "two objects",
            format!("{{\"kid\":\"{kid}\",\"alg\":\"RS256\"}}{{}}").into_bytes(),
        ),
    ] {
        c.token(
            format!("header JSON {what}"),
            &f.sign_bytes(&header, good_claims_text.as_bytes()),
            InvalidToken,
        );
    }
    let header_text = f.header().to_string();
    for (what, claims) in [
        ("array", b"[1]".to_vec()),
        ("string", b"\"claims\"".to_vec()),
        ("number", b"1".to_vec()),
        ("null", b"null".to_vec()),
        ("true", b"true".to_vec()),
        (
            "truncated JSON",
            good_claims_text.as_bytes()[..good_claims_text.len() - 1].to_vec(),
        ),
        ("empty", Vec::new()),
        (
            "non-UTF-8 bytes",
            good_claims_text
                .replacen("user@", "us\u{1}r@", 1)
                .into_bytes()
                .into_iter()
                .map(|b| if b == 1 { 0xff } else { b })
                .collect(),
        ),
        (
            "trailing garbage",
            format!("{good_claims_text}x").into_bytes(),
        ),
        (
            "two objects",
            format!("{good_claims_text}{{}}").into_bytes(),
        ),
    ] {
        c.token(
            format!("payload JSON {what}"),
            &f.sign_bytes(header_text.as_bytes(), &claims),
            InvalidToken,
        );
    }

    // --- duplicate names --------------------------------------------------------------------------
    let issuer = f.stack.idp.issuer("mcp");
    for (what, raw) in [
        (
            "sub (second wins would be admin)",
            r#""sub":"admin@example.com""#.to_string(),
        ),
        ("exp (expired first)", format!("\"exp\":{}", now - 3600)),
        (
            "exp (far future first)",
            format!("\"exp\":{}", now + 10 * 365 * 86400),
        ),
        (
            "iss (evil first)",
            r#""iss":"https://evil.example.com/oauth2/mcp""#.to_string(),
        ),
        ("iss (same value)", format!("\"iss\":\"{issuer}\"")),
        ("aud", r#""aud":"other""#.to_string()),
        ("scp", r#""scp":["mcp:tools:admin"]"#.to_string()),
    ] {
        c.token(
            format!("duplicate claim {what}"),
            &f.with_raw_members(&raw),
            InvalidToken,
        );
    }
    for (what, header) in [
        (
            "alg none then RS256",
            format!("{{\"alg\":\"none\",\"alg\":\"RS256\",\"kid\":\"{kid}\"}}"),
        ),
        (
            "alg RS256 then none",
            format!("{{\"alg\":\"RS256\",\"alg\":\"none\",\"kid\":\"{kid}\"}}"),
        ),
        (
            "kid twice",
            format!("{{\"alg\":\"RS256\",\"kid\":\"other\",\"kid\":\"{kid}\"}}"),
        ),
    ] {
        c.token(
            format!("duplicate header member {what}"),
            &f.sign_bytes(header.as_bytes(), good_claims_text.as_bytes()),
            InvalidToken,
        );
    }

    // --- nesting and size --------------------------------------------------------------------------
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    c.token(
        "2,500 nested arrays in a claim",
        &f.with_raw_members(&format!("\"deep\":{}", nested(2_500))),
        InvalidToken,
    );
    c.token(
        "1,000 nested objects in a claim",
        &f.with_raw_members(&format!(
            "\"deep\":{}1{}",
            "{\"a\":".repeat(1_000),
            "}".repeat(1_000)
        )),
        InvalidToken,
    );
    c.token(
        "10,000 nested arrays in a claim",
        &f.with_raw_members(&format!("\"deep\":{}", nested(10_000))),
        InvalidToken,
    );
    c.token(
        "2,500 nested arrays in the header",
        &f.sign_bytes(
            format!(
                "{{\"alg\":\"RS256\",\"kid\":\"{kid}\",\"deep\":{}}}",
                nested(2_500)
            )
            .as_bytes(),
            good_claims_text.as_bytes(),
        ),
        InvalidToken,
    );
    let mut big = f.good_claims();
    big.insert("pad".into(), json!("x".repeat(6_200)));
    let big = f.sign(&f.header(), &Value::Object(big));
    assert!(big.len() > 8 * 1024, "{}", big.len());
    c.token(
        format!("validly signed token of {} bytes (over 8 KiB)", big.len()),
        &big,
        InvalidToken,
    );
    c.token("20 KiB of base64url", &"A".repeat(20 * 1024), InvalidToken);

    // --- claims ------------------------------------------------------------------------------------
    let claim_cases: Vec<(&str, &str, Value)> = vec![
        ("exp", "missing", Value::Null),
        ("exp", "a string", json!((now + 3600).to_string())),
        ("exp", "a float", json!(now as f64 + 3600.5)),
        ("exp", "an integral float", json!((now + 3600) as f64)),
        ("exp", "negative", json!(-1)),
        ("exp", "zero", json!(0)),
        ("exp", "u64::MAX", json!(u64::MAX)),
        ("exp", "true", json!(true)),
        ("exp", "an array", json!([now + 3600])),
        ("exp", "an object", json!({"exp": now + 3600})),
        ("exp", "an hour ago", json!(now - 3600)),
        ("exp", "just beyond the skew", json!(now - 61)),
        ("nbf", "two minutes ahead", json!(now + 120)),
        ("nbf", "an hour ahead", json!(now + 3600)),
        ("nbf", "a string", json!(now.to_string())),
        ("nbf", "a float", json!(now as f64 - 0.5)),
        ("nbf", "negative", json!(-5)),
        ("nbf", "null", json!("__null__")),
        ("iat", "an hour ahead", json!(now + 3600)),
        ("iat", "a string", json!(now.to_string())),
        ("aud", "an empty array", json!([])),
        ("aud", "an array of numbers", json!([1, 2])),
        ("aud", "the audience plus a number", json!(["mcpserver", 1])),
        ("aud", "a superstring", json!("xmcpserverx")),
        ("aud", "a longer name", json!("mcpserver2")),
        ("aud", "a prefix", json!("mcpserve")),
        ("aud", "upper case", json!("MCPSERVER")),
        ("aud", "capitalised", json!("Mcpserver")),
        ("aud", "upper case in an array", json!(["MCPSERVER"])),
        ("aud", "a trailing space", json!("mcpserver ")),
        ("aud", "a leading space", json!(" mcpserver")),
        ("aud", "empty", json!("")),
        ("aud", "missing", Value::Null),
        ("aud", "an object", json!({"0": "mcpserver"})),
        ("aud", "the backend", json!("backend")),
        ("aud", "comma-joined", json!("mcpserver,backend")),
        ("aud", "space-joined", json!("backend mcpserver")),
        ("iss", "a trailing slash", json!(format!("{issuer}/"))),
        (
            "iss",
            "upper-case scheme and host",
            json!(issuer.replace("http://127.0.0.1", "HTTP://127.0.0.1")),
        ),
        (
            "iss",
            "an upper-case path",
            json!(issuer.replace("/oauth2/mcp", "/OAUTH2/MCP")),
        ),
        (
            "iss",
            "https instead of http",
            json!(issuer.replace("http://", "https://")),
        ),
        ("iss", "missing", Value::Null),
        ("iss", "empty", json!("")),
        (
            "iss",
            "the backend AS",
            json!(f.stack.idp.issuer("backend")),
        ),
        ("iss", "a query appended", json!(format!("{issuer}?x=1"))),
        ("iss", "a trailing space", json!(format!("{issuer} "))),
        ("iss", "a number", json!(1)),
        ("iss", "an array", json!([issuer])),
        ("sub", "missing", Value::Null),
        ("sub", "empty", json!("")),
        ("sub", "a number", json!(1)),
        ("sub", "an array", json!(["user@example.com"])),
        ("sub", "an object", json!({})),
        (
            "scp",
            "a string instead of an array",
            json!("mcp:tools:call"),
        ),
        ("scp", "an array of numbers", json!([1])),
        ("scp", "an object", json!({"0": "mcp:tools:call"})),
        ("scope", "a number", json!(5)),
    ];
    for (claim, what, value) in claim_cases {
        let token = if value == json!("__null__") {
            f.with_raw_claim(claim, "null")
        } else {
            f.with_claim(claim, value)
        };
        c.token(format!("{claim} {what}"), &token, InvalidToken);
    }
    c.token(
        "exp beyond i64",
        &f.with_raw_claim("exp", "99999999999999999999999"),
        InvalidToken,
    );
    c.token(
        "exp in exponent notation",
        &f.with_raw_claim("exp", &format!("{}e0", now + 3600)),
        InvalidToken,
    );
    c.token(
        "exp with a fraction of zero",
        &f.with_raw_claim("exp", &format!("{}.0", now + 3600)),
        InvalidToken,
    );

    // --- scopes: valid token, wrong scopes --------------------------------------------------------
    let scp = |list: Value| f.with_claim("scp", list);
    let scope_string = |s: &str| {
        let mut claims = f.good_claims();
        claims.remove("scp");
        claims.insert("scope".into(), json!(s));
        f.sign(&f.header(), &Value::Object(claims))
    };
    for (what, token) in [
        (
            "scp with the scope only as a prefix",
            scp(json!(["mcp:tools:call-all"])),
        ),
        ("scp with a shorter scope", scp(json!(["mcp:tools"]))),
        ("scp upper-cased", scp(json!(["MCP:TOOLS:CALL"]))),
        ("scp with a trailing space", scp(json!(["mcp:tools:call "]))),
        ("scp with a leading tab", scp(json!(["\tmcp:tools:call"]))),
        ("scp empty", scp(json!([]))),
        ("scp another scope", scp(json!(["mcp:tools:admin"]))),
        (
            "scp space-joined in one entry",
            scp(json!(["openid mcp:tools:call"])),
        ),
        (
            "scope string with the scope only as a prefix",
            scope_string("mcp:tools:call-all"),
        ),
        (
            "scope string tab-separated",
            scope_string("openid\tmcp:tools:call"),
        ),
        (
            "scope string tabs around the scope",
            scope_string("\tmcp:tools:call\t"),
        ),
        (
            "scope string spaces around a wrong scope",
            scope_string("   mcp:tools:admin   "),
        ),
        (
            "scope string repeated spaces and tabs",
            scope_string("openid  \t mcp:tools:admin\t\tmcp:tools:callx"),
        ),
        (
            "scope string comma-separated",
            scope_string("openid,mcp:tools:call"),
        ),
        ("scope string empty", scope_string("")),
        ("scp wrong, scope string right (scp wins)", {
            let mut claims = f.good_claims();
            claims.insert("scp".into(), json!(["openid"]));
            claims.insert("scope".into(), json!("mcp:tools:call"));
            f.sign(&f.header(), &Value::Object(claims))
        }),
        ("no scope claim at all", scp(Value::Null)),
    ] {
        c.token(what, &token, InsufficientScope);
    }

    // --- bytes an HTTP client library would refuse to send --------------------------------------------
    let s = segments(&good);
    for (what, value) in [
        (
            "non-UTF-8 bytes inside the token",
            [
                format!("Bearer {}.", s[0]).as_bytes(),
                b"\xff\xfe",
                format!(".{}", s[2]).as_bytes(),
            ]
            .concat(),
        ),
        (
            "a Latin-1 byte inside the token",
            [
                format!("Bearer {}", &good[..40]).as_bytes(),
                b"\xe9",
                &good.as_bytes()[40..],
            ]
            .concat(),
        ),
        (
            "UTF-8 non-ASCII inside the token",
            format!("Bearer {}\u{e9}{}", &good[..40], &good[40..]).into_bytes(),
        ),
    ] {
        c.add(what, vec![("Authorization".into(), value)], InvalidToken);
    }
    // A control byte in place of one token character (inserting it would not do: Envoy drops a
    // bare CR, and the genuine token would arrive).
    for (what, byte) in [
        ("a vertical tab", 0x0b),
        ("a NUL", 0),
        ("a bare CR", b'\r'),
        ("an escape", 0x1b),
    ] {
        let mut value = format!("Bearer {good}").into_bytes();
        value[50] = byte;
        c.add(
            format!("{what} in place of a token character"),
            vec![("Authorization".into(), value)],
            EnvoyOrInvalidToken,
        );
    }
    c
}

/// A listener that counts connections: a `jku`/`x5u` pointing here must never be followed.
async fn attacker_listener() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/keys", listener.local_addr()?);
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    Ok((url, hits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_corpus_is_refused_and_the_gateway_keeps_serving() -> Result {
    // An unknown kid may trigger a JWKS refetch at most once a second here (the default 30 s
    // would keep the rotated key out of reach for half a minute).
    let mut stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"jwks": {"min_refetch_interval_seconds": 1}}),
        ..StackOptions::default()
    })
    .await?;
    // Two published keys, so that a token without `kid` is ambiguous.
    let kid = stack.idp.rotate_key("mcp");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = stack.mint(&MintRequest {
        aud: Some("not-for-us".into()),
        ..MintRequest::default()
    });
    let a = send_raw(stack.envoy.port, "/mcp", &bearer(&probe)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    stack
        .wait_for_log("JWKS loaded: 2 key(s)", Duration::from_secs(10))
        .await?;

    let (attacker_url, attacker_hits) = attacker_listener().await?;
    let forge = Forge {
        stack: &stack,
        kid: kid.clone(),
    };
    let corpus = build_corpus(&forge, &attacker_url);
    let total = corpus.cases.len();
    assert!(total >= 150, "only {total} cases");

    let mut failures = Vec::new();
    let mut accepted = 0;
    let mut slowest = (Duration::ZERO, String::new());
    let mut upstream_seen = 0;
    for case in &corpus.cases {
        let started = std::time::Instant::now();
        let answer = send_raw(stack.envoy.port, &case.path, &case.headers).await;
        if started.elapsed() > slowest.0 {
            slowest = (started.elapsed(), case.name.clone());
        }
        if started.elapsed() > Duration::from_millis(300) {
            eprintln!("slow case {:?}: {:?}", case.name, started.elapsed());
        }
        let upstream_now = stack.upstream.seen_requests().len();
        if upstream_now > upstream_seen {
            failures.push(format!("{}: reached the upstream", case.name));
            upstream_seen = upstream_now;
        }
        match answer {
            Ok(a) => {
                if (200..300).contains(&a.status) {
                    accepted += 1;
                }
                if let Err(why) = check(&a, case.expect) {
                    failures.push(format!("{}: {why}", case.name));
                }
            }
            Err(e) => failures.push(format!("{}: request failed: {e:#}", case.name)),
        }
    }
    eprintln!(
        "adversarial corpus: {total} cases, {} failed; slowest {:?} ({:?})",
        failures.len(),
        slowest.1,
        slowest.0
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases got the wrong answer:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert_eq!(accepted, 0, "accepted requests");
    assert!(
        stack.upstream.seen_requests().is_empty(),
        "a refused request reached the upstream: {:?}",
        stack
            .upstream
            .seen_requests()
            .iter()
            .map(|r| (
                r.path.clone(),
                r.header("authorization")
                    .map(|a| a.chars().take(60).collect::<String>())
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        stack.idp.exchange_count(),
        0,
        "a refused token was exchanged"
    );
    assert_eq!(
        attacker_hits.load(Ordering::SeqCst),
        0,
        "a jku/x5u was followed"
    );
    assert_eq!(
        stack.idp.keys_fetch_count("backend"),
        0,
        "another AS's JWKS was fetched (jku followed)"
    );
    assert!(stack.envoy.is_running(), "Envoy died");
    assert!(
        !stack.envoy.vm_trapped(),
        "the Wasm VM trapped:\n{}",
        stack.envoy.log_tail(40)
    );

    // And a real client still gets through.
    let who = mcp::whoami(&stack.mcp_url(), &stack.user_token()).await?;
    assert_eq!(who.sub, "user@example.com");
    assert_eq!(stack.idp.exchange_count(), 1);
    Ok(())
}

/// RFC 6750 §3.1 / MCP: more than one `Authorization` header is a malformed request (400
/// `invalid_request`). Envoy presents repeated `Authorization` headers to the filter as ONE value
/// joined with "," (an inline header in Envoy's header map); the filter must still see two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_invalid_request() -> Result {
    let stack = Stack::start().await?;
    let good = stack.user_token();
    let auth = |v: String| ("Authorization".to_string(), v.into_bytes());
    for (name, headers) in [
        (
            "two identical",
            vec![
                auth(format!("Bearer {good}")),
                auth(format!("Bearer {good}")),
            ],
        ),
        (
            "Bearer then Basic",
            vec![auth(format!("Bearer {good}")), auth("Basic dTpw".into())],
        ),
        (
            "Basic then Bearer",
            vec![auth("Basic dTpw".into()), auth(format!("Bearer {good}"))],
        ),
        (
            "names differing in case",
            vec![
                (
                    "authorization".into(),
                    format!("Bearer {good}").into_bytes(),
                ),
                ("AUTHORIZATION".into(), b"Bearer other".to_vec()),
            ],
        ),
    ] {
        let a = send_raw(stack.envoy.port, "/mcp", &headers).await?;
        check(&a, Expect::InvalidRequest).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    Ok(())
}

/// Base64url text of `n` bytes is `ceil(4n/3)` characters long.
fn b64_len(n: usize) -> usize {
    (4 * n).div_ceil(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_max_token_bytes_is_enforced_at_the_byte() -> Result {
    const LIMIT: usize = 1024;
    let stack = Stack::start_with(StackOptions {
        plugin_patch: json!({"max_token_bytes": LIMIT}),
        ..StackOptions::default()
    })
    .await?;
    let kid = stack.idp.kid("mcp");
    let claims = Value::Object(claims_of(&stack.user_token()));
    // Pads the header and the claims with JSON whitespace until the token is exactly `len` long.
    let exactly = |len: usize| -> String {
        let sig_len = b64_len(256);
        for hpad in 0..4 {
            let header = format!(
                "{{\"kid\":\"{kid}\",{}\"alg\":\"RS256\"}}",
                " ".repeat(hpad)
            );
            let claims_text = claims.to_string();
            let fixed = b64_len(header.len()) + 2 + sig_len;
            for ppad in 0..1024 {
                if fixed + b64_len(claims_text.len() + ppad) == len {
                    let padded = claims_text.replacen('{', &format!("{{{}", " ".repeat(ppad)), 1);
                    let t = stack
                        .idp
                        .sign_raw("mcp", header.as_bytes(), padded.as_bytes())
                        .expect("sign_raw");
                    assert_eq!(t.len(), len);
                    return t;
                }
            }
        }
        panic!("cannot build a token of {len} bytes");
    };
    let over = exactly(LIMIT + 1);
    let a = send_raw(stack.envoy.port, "/mcp", &bearer(&over)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    assert!(a.body.contains("too large"), "{}", a.body);
    let far_over = exactly(LIMIT + 700);
    let a = send_raw(stack.envoy.port, "/mcp", &bearer(&far_over)).await?;
    check(&a, Expect::InvalidToken).map_err(anyhow::Error::msg)?;
    assert!(stack.upstream.seen_requests().is_empty());
    assert_eq!(stack.idp.exchange_count(), 0);

    // Exactly at the limit is fine: a real client gets through with it.
    let at = exactly(LIMIT);
    let who = mcp::whoami(&stack.mcp_url(), &at).await?;
    assert_eq!(who.sub, "user@example.com");
    Ok(())
}

/// The backend token the upstream received on its last request, and its claims.
fn upstream_bearer(stack: &Stack) -> (String, Map<String, Value>) {
    let seen = stack.upstream.seen_requests();
    let last = seen.last().expect("the upstream saw a request");
    let auth = last.header_values("authorization");
    assert_eq!(
        auth.len(),
        1,
        "exactly one Authorization upstream: {auth:?}"
    );
    let token = last.bearer().expect("a bearer token upstream").to_string();
    let claims = claims_of(&token);
    (token, claims)
}

async fn post_initialize(
    stack: &Stack,
    authorization: &str,
    extra: &[(&str, &str)],
) -> Result<reqwest::StatusCode> {
    let mut req = reqwest::Client::new()
        .post(stack.mcp_url())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", authorization)
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "adversarial", "version": "1"}}})
            .to_string(),
        );
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    Ok(req.send().await?.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme_case_and_spacing_are_accepted_and_smuggled_tokens_are_ignored() -> Result {
    let stack = Stack::start().await?;
    let inbound = stack.user_token();
    let backend_issuer = stack.idp.issuer("backend");

    // RFC 6750 / RFC 7235: the scheme is case-insensitive and 1*SP separates it from the token.
    for (what, value) in [
        ("lower-case bearer", format!("bearer {inbound}")),
        ("upper-case BEARER", format!("BEARER {inbound}")),
        ("mixed-case BeArEr", format!("BeArEr {inbound}")),
        (
            "several spaces after the scheme",
            format!("Bearer    {inbound}"),
        ),
    ] {
        let status = post_initialize(&stack, &value, &[]).await?;
        assert!(status.is_success(), "{what}: {status}");
        let (token, claims) = upstream_bearer(&stack);
        assert_ne!(token, inbound, "{what}: the inbound token went upstream");
        assert_eq!(claims["iss"], json!(backend_issuer), "{what}");
        assert_eq!(claims["sub"], json!("user@example.com"), "{what}");
    }

    // A client that brings its own upstream credentials in side headers: a real backend token for
    // another user, and the gateway's headers' usual names. The upstream must still get exactly
    // the exchanged token of the caller in Authorization.
    let mallory_backend = stack.mint(&MintRequest {
        as_id: "backend".into(),
        sub: "mallory@example.com".into(),
        scopes: vec!["backend-api:read".into(), "backend-api:write".into()],
        ..MintRequest::default()
    });
    let smuggled: Vec<(&str, String)> = vec![
        ("x-forwarded-access-token", mallory_backend.clone()),
        ("x-auth-request-access-token", mallory_backend.clone()),
        ("x-amzn-oidc-accesstoken", mallory_backend.clone()),
        (
            "x-forwarded-authorization",
            format!("Bearer {mallory_backend}"),
        ),
        (
            "x-original-authorization",
            format!("Bearer {mallory_backend}"),
        ),
        ("proxy-authorization", format!("Bearer {mallory_backend}")),
        ("x-id-token", mallory_backend.clone()),
    ];
    let extra: Vec<(&str, &str)> = smuggled.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let expected_backend = upstream_bearer(&stack).0;
    let status = post_initialize(&stack, &format!("Bearer {inbound}"), &extra).await?;
    assert!(status.is_success(), "{status}");
    let (token, claims) = upstream_bearer(&stack);
    assert_eq!(
        token, expected_backend,
        "the exchanged (cached) token, nothing else"
    );
    assert_ne!(token, mallory_backend);
    assert_eq!(claims["sub"], json!("user@example.com"));
    assert_eq!(claims["aud"], json!("backend"));

    // The same through a full MCP session with a fresh token (a new exchange).
    let fresh = stack.mint(&MintRequest {
        sub: "carol@example.com".into(),
        ..MintRequest::default()
    });
    let status = post_initialize(&stack, &format!("Bearer {fresh}"), &extra).await?;
    assert!(status.is_success(), "{status}");
    let (token, claims) = upstream_bearer(&stack);
    assert_ne!(token, mallory_backend);
    assert_ne!(token, fresh);
    assert_eq!(claims["sub"], json!("carol@example.com"));
    assert_eq!(claims["iss"], json!(backend_issuer));
    for r in stack.upstream.seen_requests() {
        for (name, value) in &r.headers {
            assert!(
                !value.contains(&inbound) && !value.contains(&fresh),
                "an inbound token reached the upstream in {name}"
            );
        }
    }
    assert_eq!(stack.idp.exchange_count(), 2);
    Ok(())
}

#[test]
fn hmac_matches_rfc_4231() {
    let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (key, data) = (b"Jefe", b"what do ya want for nothing?");
    assert_eq!(
        hex(hmac("HS256", key, data)),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        hex(hmac("HS384", key, data)),
        "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649"
    );
    // A key longer than the block is hashed first (RFC 4231 test case 6).
    assert_eq!(
        hex(hmac(
            "HS256",
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

#[test]
fn der_encoding_of_the_public_key_is_well_formed() {
    let jwk = json!({"n": b64(&[0xc5; 256]), "e": "AQAB"});
    let (pkcs1, spki) = public_key_der(&jwk);
    // SEQUENCE, long form length of 2 bytes, INTEGER n with a leading zero (high bit set).
    assert_eq!(&pkcs1[..4], &[0x30, 0x82, 0x01, 0x0a]);
    assert_eq!(&pkcs1[4..8], &[0x02, 0x82, 0x01, 0x01]);
    assert_eq!(pkcs1[8], 0);
    assert_eq!(&pkcs1[pkcs1.len() - 5..], &[0x02, 0x03, 0x01, 0x00, 0x01]);
    assert_eq!(spki.len(), pkcs1.len() + 24);
    assert!(pem("PUBLIC KEY", &spki)
        .starts_with("-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"));
}
