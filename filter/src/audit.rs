//! One structured record per decision, so an operator can follow a user's request from the
//! inbound token to the exchanged one. Tokens appear only as fingerprints (or `jti`).
//!
//! By default records are gathered in the VM ([`AuditBatch`]) and written to Envoy's application
//! log many to one log call: on the tick, when a batch fills, and when the VM stops. Handing each
//! record to Envoy on its own costs a host call per request, which was most of what the audit
//! record cost (issue 13: filter state read by the access log ~5k of ~7k instructions per
//! request, a log call per record ~6k; a batch ~0.1k). The other sinks: the request's filter
//! state [`AUDIT_PROPERTY`] (Envoy names it `wasm.mcp_token_exchange.audit`) for an access log
//! with the format `%FILTER_STATE(wasm.mcp_token_exchange.audit:PLAIN)%`, or one log call per
//! record.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::rc::Rc;

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
    out.push(':');
    push_u64(out, value);
}

/// Decimal digits of `value`, without `core::fmt` (whose machinery costs more per number in
/// Wasm than copying a whole pre-rendered record).
fn push_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for d in &digits[start..] {
        out.push(char::from(*d));
    }
}

/// Every record starts with this; the time follows.
const HEAD: &str = "{\"audit\":\"mcp_token_exchange\",\"time_ms\":";

impl AuditRecord<'_> {
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(384);
        self.write_json(&mut out);
        out
    }

    /// Appends the record to `out` (one line: nothing in it is an unescaped newline).
    pub fn write_json(&self, out: &mut String) {
        out.push_str(HEAD);
        push_u64(out, self.time_ms);
        self.push_after_time(out);
    }

    /// Everything after `time_ms`: what a [`RecordTail`] keeps.
    fn push_after_time(&self, out: &mut String) {
        push_field(
            out,
            "decision",
            Some(if self.allowed { "allow" } else { "deny" }),
        );
        push_field(out, "reason", Some(self.reason));
        push_field(out, "detail", self.detail);
        if let Some(s) = self.status {
            push_number(out, "status", u64::from(s));
        }
        push_field(out, "sub", self.sub);
        push_field(out, "client_id", self.client_id);
        push_field(out, "token", self.token.as_deref());
        push_field(out, "route", self.route);
        push_field(out, "tool", self.tool);
        push_field(out, "target_audience", self.target_audience);
        push_field(out, "target_scope", self.target_scope);
        push_field(out, "exchanged_token", self.exchanged);
        push_field(out, "cache", self.cache.map(CacheUse::as_str));
        push_number(out, "latency_ms", self.latency_ms);
        out.push('}');
    }
}

/// A record of the cached path rendered once, but for its time: the cached path decides a
/// repeated request exactly as it decided the last one (same verified token, route and backend
/// token, `cache: hit`, latency 0), so its record differs only in `time_ms`. Rendering a record
/// field by field cost the cached path about as much as the rest of the request (issue 13);
/// this copies two strings and writes one number.
#[derive(Debug)]
pub struct RecordTail {
    route: usize,
    /// The backend token's fingerprint the tail names, compared by pointer: a renewed backend
    /// token is a new `Rc`.
    exchanged: Option<Rc<str>>,
    text: Box<str>,
}

impl RecordTail {
    /// `record` without its time; `record.latency_ms` must be what every later use has (0).
    pub fn new(route: usize, exchanged: Option<Rc<str>>, record: &AuditRecord<'_>) -> Self {
        let mut text = String::with_capacity(320);
        record.push_after_time(&mut text);
        Self {
            route,
            exchanged,
            text: text.into_boxed_str(),
        }
    }

    /// Whether this tail is the record of a request on `route` forwarded with `exchanged`.
    pub fn fits(&self, route: usize, exchanged: Option<&Rc<str>>) -> bool {
        self.route == route
            && match (&self.exchanged, exchanged) {
                (None, None) => true,
                (Some(a), Some(b)) => Rc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// The whole record, decided at `time_ms`.
    #[cfg(test)]
    pub fn with_time(&self, time_ms: u64) -> String {
        let mut out = String::new();
        self.write_with_time(&mut out, time_ms);
        out
    }

    /// Appends the whole record, decided at `time_ms`, to `out`.
    pub fn write_with_time(&self, out: &mut String, time_ms: u64) {
        out.reserve(HEAD.len() + 20 + self.text.len());
        out.push_str(HEAD);
        push_u64(out, time_ms);
        out.push_str(&self.text);
    }
}

/// The first line of every batch: Envoy puts its log prefix before it, and each record follows
/// on a line of its own, so every record line is exactly one JSON object.
pub const BATCH_HEADER: &str = "audit records:";
/// Records written in one log call at most. One call costs about as much as ~60 records cost to
/// gather, so 64 makes the call ~1/64 of what it was per record, and a batch that fills between
/// two ticks is written at once rather than held: under load, records leave the VM within
/// milliseconds, and what a crash can lose stays under 64 records per worker.
pub const BATCH_MAX_RECORDS: usize = 64;
/// Bytes of records in one log call at most (long claims make long records): bounds the memory a
/// batch holds and the size of one log message.
pub const BATCH_MAX_BYTES: usize = 32 * 1024;

/// Records of this worker not yet written: one buffer, reused, so gathering a record allocates
/// nothing once the buffer has grown.
#[derive(Debug)]
pub struct AuditBatch {
    /// `BATCH_HEADER`, then `\n` and a record for each record held.
    text: String,
    records: usize,
}

impl Default for AuditBatch {
    fn default() -> Self {
        let mut text = String::with_capacity(BATCH_HEADER.len() + BATCH_MAX_BYTES + 1024);
        text.push_str(BATCH_HEADER);
        Self { text, records: 0 }
    }
}

impl AuditBatch {
    /// Adds the record `write` appends (one line, no newline); `true` when the batch is full
    /// and must be written now.
    pub fn push(&mut self, write: impl FnOnce(&mut String)) -> bool {
        self.text.push('\n');
        write(&mut self.text);
        self.records += 1;
        self.records >= BATCH_MAX_RECORDS || self.text.len() >= BATCH_MAX_BYTES
    }

    /// How many records it holds.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Hands the records held to `write` as one message, header first, and empties the batch
    /// (keeping its memory). Nothing when it holds no record.
    pub fn drain(&mut self, write: impl FnOnce(&str)) {
        if self.records == 0 {
            return;
        }
        write(&self.text);
        self.text.truncate(BATCH_HEADER.len());
        self.records = 0;
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
    fn numbers_are_written_in_decimal_without_fmt() {
        for n in [0, 7, 10, 1_800_000_000_123, u64::MAX] {
            let mut out = String::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn a_tail_with_its_time_is_the_whole_record() {
        let record = AuditRecord {
            time_ms: 1_800_000_000_123,
            allowed: true,
            reason: "exchanged",
            sub: Some("alice"),
            route: Some("/mcp"),
            exchanged: Some("abcd1234"),
            cache: Some(CacheUse::Hit),
            ..AuditRecord::default()
        };
        let fingerprint: Rc<str> = Rc::from("abcd1234");
        let tail = RecordTail::new(3, Some(Rc::clone(&fingerprint)), &record);
        assert_eq!(tail.with_time(record.time_ms), record.to_json());
        let later = AuditRecord {
            time_ms: 1_800_000_009_999,
            ..record
        };
        assert_eq!(tail.with_time(later.time_ms), later.to_json());
        assert!(tail.fits(3, Some(&fingerprint)));
        // Another route, another backend token (even with the same text), or none.
        assert!(!tail.fits(4, Some(&fingerprint)));
        assert!(!tail.fits(3, Some(&Rc::from("abcd1234"))));
        assert!(!tail.fits(3, None));
        assert!(RecordTail::new(3, None, &later).fits(3, None));
    }

    fn record(n: u64) -> AuditRecord<'static> {
        AuditRecord {
            time_ms: n,
            allowed: true,
            reason: "exchanged",
            sub: Some("alice"),
            ..AuditRecord::default()
        }
    }

    #[test]
    fn a_batch_is_its_header_then_one_record_per_line() {
        let mut batch = AuditBatch::default();
        let mut written = Vec::new();
        batch.drain(|t| written.push(t.to_string()));
        assert!(written.is_empty(), "an empty batch writes nothing");
        for n in 1..=3 {
            assert!(!batch.push(|out| record(n).write_json(out)));
        }
        assert_eq!(batch.records(), 3);
        batch.drain(|t| written.push(t.to_string()));
        assert_eq!(batch.records(), 0);
        let expected = [1, 2, 3].map(|n| record(n).to_json()).join("\n");
        assert_eq!(written, [format!("{BATCH_HEADER}\n{expected}")]);
        // Emptied, and reused from its header on.
        batch.push(|out| record(4).write_json(out));
        batch.drain(|t| written.push(t.to_string()));
        assert_eq!(
            written[1],
            format!("{BATCH_HEADER}\n{}", record(4).to_json())
        );
    }

    #[test]
    fn a_batch_is_full_at_its_record_or_byte_bound() {
        let mut batch = AuditBatch::default();
        for n in 1..BATCH_MAX_RECORDS {
            assert!(!batch.push(|out| record(n as u64).write_json(out)), "{n}");
        }
        assert!(batch.push(|out| record(0).write_json(out)));
        let mut long = AuditBatch::default();
        let sub = "x".repeat(BATCH_MAX_BYTES / 4);
        let big = AuditRecord {
            sub: Some(&sub),
            ..record(1)
        };
        let pushes = (1..=5)
            .find(|_| long.push(|out| big.write_json(out)))
            .expect("full by its bytes");
        assert_eq!(pushes, 4);
        assert!(long.records() < BATCH_MAX_RECORDS);
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
