//! Making tokens against a running stack: validly signed ones with one thing changed, forgeries
//! (HMAC keyed with the public key, other algorithms over a real signature), and the DER/PEM forms
//! of the public key an attacker would try as an HMAC secret.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use gateway_tests::harness::Stack;
use gateway_tests::idp::MintRequest;
use rsa::sha2::{Digest as _, Sha256, Sha384, Sha512};
use serde_json::{json, Map, Value};

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn segments(token: &str) -> Vec<String> {
    token.split('.').map(str::to_string).collect()
}

/// The claims of a minted token, to alter and re-sign.
pub fn claims_of(token: &str) -> Map<String, Value> {
    let payload = URL_SAFE_NO_PAD
        .decode(&segments(token)[1])
        .expect("payload is base64url");
    serde_json::from_slice(&payload).expect("payload is a JSON object")
}

/// HMAC (RFC 2104) over the SHA-2 family, so HS* forgeries need no extra dependency.
pub fn hmac(alg: &str, key: &[u8], msg: &[u8]) -> Vec<u8> {
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
pub fn public_key_der(jwk: &Value) -> (Vec<u8>, Vec<u8>) {
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

pub fn pem(label: &str, der: &[u8]) -> String {
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
pub struct Forge<'a> {
    pub stack: &'a Stack,
    pub kid: String,
}

impl Forge<'_> {
    pub fn mint(&self, req: MintRequest) -> String {
        self.stack.mint(&req)
    }

    pub fn good(&self) -> String {
        self.stack.user_token()
    }

    pub fn good_claims(&self) -> Map<String, Value> {
        claims_of(&self.good())
    }

    pub fn header(&self) -> Value {
        json!({"kid": self.kid, "alg": "RS256"})
    }

    /// RS256 by the `mcp` authorization server's current key over exactly these bytes.
    pub fn sign_bytes(&self, header: &[u8], claims: &[u8]) -> String {
        self.sign_bytes_as("mcp", header, claims)
    }

    pub fn sign_bytes_as(&self, as_id: &str, header: &[u8], claims: &[u8]) -> String {
        self.stack
            .idp
            .sign_raw(as_id, header, claims)
            .expect("sign_raw")
    }

    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_bytes(header.to_string().as_bytes(), claims.to_string().as_bytes())
    }

    /// A good token with one claim changed (`Value::Null` removes it).
    pub fn with_claim(&self, name: &str, value: Value) -> String {
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
    pub fn with_raw_members(&self, raw: &str) -> String {
        let claims = Value::Object(self.good_claims()).to_string();
        let text = claims.replacen('{', &format!("{{{raw},"), 1);
        self.sign_bytes(self.header().to_string().as_bytes(), text.as_bytes())
    }

    /// Good claims with `name` replaced by the literal JSON text `raw`.
    pub fn with_raw_claim(&self, name: &str, raw: &str) -> String {
        let mut c = self.good_claims();
        c.remove(name);
        let text = Value::Object(c)
            .to_string()
            .replacen('{', &format!("{{\"{name}\":{raw},"), 1);
        self.sign_bytes(self.header().to_string().as_bytes(), text.as_bytes())
    }

    pub fn with_header(&self, header: &Value) -> String {
        self.sign(header, &Value::Object(self.good_claims()))
    }

    /// A token whose signature is HMAC with `key` as the secret.
    pub fn hmac_token(&self, alg: &str, key: &[u8]) -> String {
        let h = json!({"kid": self.kid, "alg": alg}).to_string();
        let c = Value::Object(self.good_claims()).to_string();
        let input = format!("{}.{}", b64(h.as_bytes()), b64(c.as_bytes()));
        let sig = hmac(alg, key, input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    /// Header `alg` replaced, the signature left as the real RS256 one.
    pub fn with_alg_keeping_signature(&self, alg: Value, kid: bool) -> String {
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
