//! RSA public-key signature verification (RS256/384/512, PS256/384/512), written for Wasm.
//!
//! Why not the `rsa` crate: its verify costs ~350 µs per RSA-2048 signature inside Envoy's V8,
//! and signature verification is the filter's dominant cost on every token it has not cached.
//! A verify is one modular exponentiation by a small public exponent (for e = 65537: 16 Montgomery
//! squarings and 2 Montgomery products), so the whole cost is in the Montgomery inner loops; they
//! are written here for what Wasm has and what V8 makes of it:
//!
//! - Wasm has a native 64×64→64 multiply but no 64×64→128 one, so limbs are at most 32 bits and
//!   every limb product is a single `i64.mul` of two zero-extended limbs. 64-bit limbs would need
//!   four multiplications per limb product (an emulated wide multiply) for no gain.
//! - Limbs are 28 bits (27 above ~3300-bit moduli), held in `u64`, not full 32-bit limbs. A 56-bit
//!   product leaves 8 bits of headroom, so a column of the schoolbook product can absorb every
//!   product that lands in it (≤ 2·limbs of them) with plain 64-bit adds and no carry handling;
//!   carries are resolved once per row of the reduction. With full 32-bit limbs every product must
//!   propagate its carry at once, a serial add→shift chain that V8's code cannot overlap, and each
//!   product costs twice the instructions. Measured in node 20 (V8) on RSA-2048 RS256: 32-bit
//!   limbs with a fused CIOS loop 105 µs/verify; 28-bit lazy-carry limbs 89 µs; with two rows per
//!   inner loop (below) 62–64 µs, although 28-bit limbs need 34 % more limb products than 32-bit
//!   ones. The `rsa` 0.10 crate: 360 µs.
//! - Two rows per inner loop ("2-row blocking"): each pass over the accumulator adds two rows of
//!   products, so each accumulator word is loaded and stored once per two rows.
//! - R = 2^(28·limbs) ≥ 4n, so Montgomery products of inputs below 2n stay below 2n without the
//!   final conditional subtraction ("almost Montgomery multiplication"); one subtraction at the
//!   end of the exponentiation leaves the fully reduced result.
//! - Nothing is constant-time. The modulus, the exponent and the signature are all public, so
//!   there is no secret for timing to leak; data-dependent branches (early exit, conditional
//!   subtraction, skipping zero exponent bits) are safe and make the code simpler and faster.
//!   Never reuse this code for a private-key operation.
//! - Everything that depends only on the key (n's limbs, −n⁻¹ mod 2^r, R² mod n) is computed once
//!   when the JWKS is loaded, not per request.
//!
//! Padding checks build the expected encoded message and compare (PKCS #1 v1.5) or follow RFC 8017
//! §9.1.2 step by step (PSS), on slices whose lengths are checked first: attacker-controlled bytes
//! can make a verify fail, never panic (a panic traps the Wasm VM). The arithmetic indexes only
//! with key-derived lengths that every function checks on entry.

use std::cmp::Ordering;
use std::fmt;

use sha2::{Digest, Sha256, Sha384, Sha512};

/// Smallest RSA modulus accepted. 2048 bits is the floor of every current guideline and what
/// Okta, Entra ID and Google issue.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted: bounds the work one JWKS key can make every request do.
pub const MAX_RSA_BITS: usize = 8192;
/// Largest public exponent accepted, 2³³ − 1: the bound `ring` and the `rsa` crate use against
/// "RSADoS" (a huge exponent makes every verify slow). Real issuers publish 65537.
pub const MAX_PUBLIC_EXPONENT: u64 = (1 << 33) - 1;

/// Limb width for moduli whose limb count at 28 bits stays within [`MAX_LIMBS_28`].
const RADIX_BITS: u32 = 28;
/// A column of a product receives at most 2·limbs products, each at most (2^r − 1)², plus one
/// carry below 2^(64−r); with r = 28 that fits in 64 bits up to 128 limbs (the exact bound,
/// checked at compile time by [`column_fits_u64`]; the rounder 2·limbs < 256 gives 127), so
/// 120 (~3350-bit moduli) keeps a margin. Larger moduli use 27-bit limbs: up to 512 limbs, far
/// above the 304 limbs of an 8192-bit modulus.
const MAX_LIMBS_28: usize = 120;
const RADIX_BITS_LARGE: u32 = 27;
/// Limbs of the largest accepted modulus at 27 bits (`limbs = ⌈(bits + 2) / radix⌉`, as in
/// [`RsaVerifyingKey::from_components`]): the most any key uses at that width.
const MAX_LIMBS_LARGE: usize = (MAX_RSA_BITS + 2).div_ceil(RADIX_BITS_LARGE as usize);

/// The carry bound the lazy-carry Montgomery loops rely on: with `limbs` limbs of `radix` bits,
/// a column of the accumulator receives at most 2·limbs limb products (limbs of the operands
/// and of n times the multipliers m_i, all normalised below 2^radix, so each product is at most
/// (2^radix − 1)²) and at most one carry, taken from a column that itself fits in 64 bits, so
/// below 2^(64 − radix). That sum must fit in a `u64`, or the column silently wraps.
const fn column_fits_u64(radix: u32, limbs: usize) -> bool {
    let limb_max = (1u128 << radix) - 1;
    let products = 2 * (limbs as u128) * limb_max * limb_max;
    let carry_max = (1u128 << (64 - radix)) - 1;
    products + carry_max <= u64::MAX as u128
}

// Every limb count in use: 28-bit limbs up to MAX_LIMBS_28 (larger moduli switch to 27 bits),
// 27-bit limbs up to the largest modulus. Raising a limb count or a width past the bound fails
// the build instead of corrupting verification.
const _: () = assert!(
    column_fits_u64(RADIX_BITS, MAX_LIMBS_28),
    "28-bit limbs: MAX_LIMBS_28 overflows a column of the Montgomery accumulator"
);
const _: () = assert!(
    column_fits_u64(RADIX_BITS_LARGE, MAX_LIMBS_LARGE),
    "27-bit limbs: MAX_RSA_BITS overflows a column of the Montgomery accumulator"
);

/// The hash a signature was made over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// DER of the DigestInfo that precedes the digest in EMSA-PKCS1-v1_5 (RFC 8017 §9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Self::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Self::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Self::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }

    /// Hashes the concatenation of `parts` into `out` and returns the digest (a prefix of `out`).
    fn hash_parts<'a>(self, parts: &[&[u8]], out: &'a mut [u8; 64]) -> &'a [u8] {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8; 64]) -> usize {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let digest = h.finalize();
            let n = digest.len().min(out.len());
            for (o, d) in out.iter_mut().zip(digest.iter()) {
                *o = *d;
            }
            n
        }
        let n = match self {
            Self::Sha256 => run::<Sha256>(parts, out),
            Self::Sha384 => run::<Sha384>(parts, out),
            Self::Sha512 => run::<Sha512>(parts, out),
        };
        out.get(..n).unwrap_or_default()
    }
}

/// Why an RSA public key was refused at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RsaKeyError {
    ModulusSize(usize),
    EvenModulus,
    ExponentTooSmall,
    EvenExponent,
    ExponentTooLarge,
    ExponentNotBelowModulus,
}

impl fmt::Display for RsaKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModulusSize(bits) => write!(
                f,
                "RSA modulus of {bits} bits is outside {MIN_RSA_BITS}..={MAX_RSA_BITS}"
            ),
            Self::EvenModulus => f.write_str("RSA modulus is even"),
            Self::ExponentTooSmall => f.write_str("RSA exponent is below 3"),
            Self::EvenExponent => f.write_str("RSA exponent is even"),
            Self::ExponentTooLarge => {
                write!(f, "RSA exponent too large (above {MAX_PUBLIC_EXPONENT})")
            }
            Self::ExponentNotBelowModulus => f.write_str("RSA exponent is not below the modulus"),
        }
    }
}

impl std::error::Error for RsaKeyError {}

/// An RSA public key prepared for verification.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaVerifyingKey {
    /// The modulus, big-endian, no leading zero: its length is the length of every signature.
    n_be: Vec<u8>,
    /// The modulus in `radix`-bit little-endian limbs, `limbs = ⌈(bits + 2) / radix⌉` of them, so
    /// that R = 2^(radix·limbs) ≥ 4n.
    n: Vec<u64>,
    /// R² mod n (possibly + n): multiplying by it (Montgomery) enters Montgomery form.
    rr: Vec<u64>,
    /// −n⁻¹ mod 2^radix.
    n0_inv: u64,
    radix: u32,
    e: u64,
    /// Bit length of n.
    bits: usize,
}

impl fmt::Debug for RsaVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaVerifyingKey")
            .field("bits", &self.bits)
            .field("e", &self.e)
            .finish_non_exhaustive()
    }
}

impl RsaVerifyingKey {
    /// A key from the big-endian magnitudes of `n` and `e` (as in a JWK, leading zeros allowed).
    ///
    /// Accepts what the `rsa` crate accepted here before: a 2048..=8192-bit odd modulus and an odd
    /// exponent 3 ≤ e ≤ 2³³ − 1 (every real issuer uses 65537).
    pub fn from_components(n_be: &[u8], e_be: &[u8]) -> Result<Self, RsaKeyError> {
        let n_be = strip_leading_zeros(n_be);
        let e_be = strip_leading_zeros(e_be);
        let bits = n_be.first().map_or(0, |top| {
            n_be.len() * 8 - usize::try_from(top.leading_zeros()).unwrap_or(0)
        });
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(RsaKeyError::ModulusSize(bits));
        }
        if n_be.last().is_none_or(|b| b & 1 == 0) {
            return Err(RsaKeyError::EvenModulus);
        }
        if e_be.len() > 8 {
            return Err(RsaKeyError::ExponentTooLarge);
        }
        let e = e_be.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        if e < 3 {
            return Err(RsaKeyError::ExponentTooSmall);
        }
        if e & 1 == 0 {
            return Err(RsaKeyError::EvenExponent);
        }
        if e > MAX_PUBLIC_EXPONENT {
            return Err(RsaKeyError::ExponentTooLarge);
        }
        // Unreachable with a 2048-bit floor and a 34-bit exponent ceiling, but it is the RSA
        // definition and costs nothing to state.
        if e_be.len() > n_be.len() || (e_be.len() == n_be.len() && e_be >= n_be) {
            return Err(RsaKeyError::ExponentNotBelowModulus);
        }
        let mut radix = RADIX_BITS;
        if (bits + 2).div_ceil(RADIX_BITS as usize) > MAX_LIMBS_28 {
            radix = RADIX_BITS_LARGE;
        }
        let limbs = (bits + 2).div_ceil(radix as usize);
        let n = to_limbs(n_be, radix, limbs);
        let n0_inv = neg_inverse(n.first().copied().unwrap_or(1), radix);
        let rr = r_squared(&n, n0_inv, radix, bits);
        Ok(Self {
            n_be: n_be.to_vec(),
            n,
            rr,
            n0_inv,
            radix,
            e,
            bits,
        })
    }

    /// Bit length of the modulus.
    pub fn modulus_bits(&self) -> usize {
        self.bits
    }

    /// The modulus, big-endian, without leading zeros (as a JWK's `n` should be).
    pub fn modulus_be(&self) -> &[u8] {
        &self.n_be
    }

    pub fn public_exponent(&self) -> u64 {
        self.e
    }

    /// RSASSA-PKCS1-v1_5 verification (RFC 8017 §8.2.2) of a signature over `digest`.
    pub fn verify_pkcs1v15(&self, hash: HashAlg, digest: &[u8], signature: &[u8]) -> bool {
        if digest.len() != hash.output_len() {
            return false;
        }
        // EM = 0x00 0x01 PS(0xFF × ≥ 8) 0x00 DigestInfo digest, exactly k bytes (§9.2).
        let k = self.n_be.len();
        let prefix = hash.digest_info_prefix();
        let t_len = prefix.len() + digest.len();
        let Some(ps_len) = k.checked_sub(t_len + 3).filter(|n| *n >= 8) else {
            return false;
        };
        let mut expected = Vec::with_capacity(k);
        expected.extend_from_slice(&[0x00, 0x01]);
        expected.resize(2 + ps_len, 0xFF);
        expected.push(0x00);
        expected.extend_from_slice(prefix);
        expected.extend_from_slice(digest);
        // Compare, don't parse: nothing about the recovered message is interpreted.
        self.public_op(signature).is_some_and(|em| em == expected)
    }

    /// RSASSA-PSS verification (RFC 8017 §8.1.2, EMSA-PSS-VERIFY §9.1.2) with MGF1 over the same
    /// hash and a salt as long as the hash output, as JWS PS256/384/512 require (RFC 7518 §3.5).
    pub fn verify_pss(&self, hash: HashAlg, digest: &[u8], signature: &[u8]) -> bool {
        let h_len = hash.output_len();
        if digest.len() != h_len {
            return false;
        }
        let Some(m) = self.public_op(signature) else {
            return false;
        };
        // emBits = modBits − 1; EM = I2OSP(m, emLen), which fails when m needs more than emLen
        // bytes: when modBits ≡ 1 (mod 8) the leading byte of the k-byte m must be zero.
        let em_bits = self.bits - 1;
        let em_len = em_bits.div_ceil(8);
        let Some((lead, em)) = m.split_at_checked(m.len().saturating_sub(em_len)) else {
            return false;
        };
        if lead.iter().any(|b| *b != 0) || em.len() != em_len {
            return false;
        }
        emsa_pss_verify(hash, digest, em, em_bits)
    }

    /// RSAVP1 (RFC 8017 §5.2.2) with the length check of §8.x.2 step 1: s^e mod n as k big-endian
    /// bytes, or `None` if the signature is not exactly k bytes or not below n.
    fn public_op(&self, signature: &[u8]) -> Option<Vec<u8>> {
        // Equal-length big-endian byte strings compare as the numbers they encode.
        if signature.len() != self.n_be.len() || signature >= self.n_be.as_slice() {
            return None;
        }
        let s = to_limbs(signature, self.radix, self.n.len());
        let m = self.pow_e(&s);
        Some(from_limbs(&m, self.radix, self.n_be.len()))
    }

    /// s^e mod n (fully reduced) for s < n, by left-to-right square-and-multiply in Montgomery
    /// form.
    ///
    /// For e = 65537 (every real issuer) that is one product to enter Montgomery form, 16
    /// squarings and one product: the last exponent bit is always 1 (e is odd), and multiplying
    /// by s itself rather than by s·R there leaves Montgomery form for free.
    fn pow_e(&self, s: &[u64]) -> Vec<u64> {
        let (n, n0_inv, radix) = (&self.n[..], self.n0_inv, self.radix);
        let l = n.len();
        let mut scratch = vec![0u64; 2 * l];
        // The Montgomery form of s: s·R mod n (< 2n).
        let mut s_mont = vec![0u64; l];
        mont_mul(&mut s_mont, s, &self.rr, n, n0_inv, radix, &mut scratch);
        let mut x = s_mont.clone();
        let mut tmp = vec![0u64; l];
        let top = 63 - self.e.leading_zeros();
        for i in (0..top).rev() {
            mont_sqr(&mut tmp, &x, n, n0_inv, radix, &mut scratch);
            std::mem::swap(&mut x, &mut tmp);
            if (self.e >> i) & 1 == 1 {
                let by: &[u64] = if i == 0 { s } else { &s_mont };
                mont_mul(&mut tmp, &x, by, n, n0_inv, radix, &mut scratch);
                std::mem::swap(&mut x, &mut tmp);
            }
        }
        // x·s·R⁻¹ with x < 2n, s < n and 4n ≤ R is below 1.5n: one subtraction reduces it.
        if cmp_limbs(&x, n) != Ordering::Less {
            sub_in_place(&mut x, n, radix);
        }
        x
    }
}

/// EMSA-PSS-VERIFY (RFC 8017 §9.1.2) steps 3–14 with sLen = hLen.
fn emsa_pss_verify(hash: HashAlg, m_hash: &[u8], em: &[u8], em_bits: usize) -> bool {
    let h_len = hash.output_len();
    let s_len = h_len;
    let em_len = em.len();
    // 3.
    if em_len < h_len + s_len + 2 {
        return false;
    }
    // 4.
    let Some((&0xbc, rest)) = em.split_last() else {
        return false;
    };
    // 5. maskedDB ‖ H.
    let Some((masked_db, h)) = rest.split_at_checked(em_len - h_len - 1) else {
        return false;
    };
    // 6. The 8·emLen − emBits leftmost bits of maskedDB must be zero.
    let unused_bits = 8 * em_len - em_bits;
    let top_mask = 0xFFu8
        .checked_shr(u32::try_from(unused_bits).unwrap_or(8))
        .unwrap_or(0);
    if masked_db.first().is_none_or(|b| b & !top_mask != 0) {
        return false;
    }
    // 7–9. DB = maskedDB ⊕ MGF1(H), leftmost bits cleared.
    let mut db = masked_db.to_vec();
    mgf1_xor(hash, h, &mut db);
    if let Some(first) = db.first_mut() {
        *first &= top_mask;
    }
    // 10. DB = PS (zeros) ‖ 0x01 ‖ salt.
    let ps_len = em_len - h_len - s_len - 2;
    let Some((ps, rest)) = db.split_at_checked(ps_len) else {
        return false;
    };
    let Some((&0x01, salt)) = rest.split_first() else {
        return false;
    };
    if ps.iter().any(|b| *b != 0) || salt.len() != s_len {
        return false;
    }
    // 12–14. H' = Hash(0x00 × 8 ‖ mHash ‖ salt) must equal H.
    let mut out = [0u8; 64];
    hash.hash_parts(&[&[0u8; 8], m_hash, salt], &mut out) == h
}

/// MGF1 (RFC 8017 §B.2.1) with `hash`, XORed into `out`.
fn mgf1_xor(hash: HashAlg, seed: &[u8], out: &mut [u8]) {
    let mut counter: u32 = 0;
    for chunk in out.chunks_mut(hash.output_len()) {
        let mut buf = [0u8; 64];
        let mask = hash.hash_parts(&[seed, &counter.to_be_bytes()], &mut buf);
        for (o, m) in chunk.iter_mut().zip(mask) {
            *o ^= m;
        }
        counter = counter.wrapping_add(1);
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.get(first..).unwrap_or_default()
}

/// Big-endian bytes to `limbs` little-endian `radix`-bit limbs (bits beyond them are dropped:
/// callers pass values that fit).
fn to_limbs(bytes: &[u8], radix: u32, limbs: usize) -> Vec<u64> {
    let mask = (1u64 << radix) - 1;
    let mut out = Vec::with_capacity(limbs);
    let (mut acc, mut acc_bits) = (0u64, 0u32);
    for b in bytes.iter().rev() {
        acc |= u64::from(*b) << acc_bits;
        acc_bits += 8;
        if acc_bits >= radix {
            out.push(acc & mask);
            acc >>= radix;
            acc_bits -= radix;
        }
    }
    if acc_bits > 0 {
        out.push(acc);
    }
    out.resize(limbs, 0);
    out
}

/// The low `len` bytes of a value in normalised little-endian `radix`-bit limbs, big-endian.
fn from_limbs(limbs: &[u64], radix: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut limbs = limbs.iter();
    let (mut acc, mut acc_bits) = (0u64, 0u32);
    for byte in out.iter_mut().rev() {
        if acc_bits < 8 {
            acc |= limbs.next().copied().unwrap_or(0) << acc_bits;
            acc_bits += radix;
        }
        *byte = acc as u8;
        acc >>= 8;
        acc_bits -= 8;
    }
    out
}

/// Compares two values in normalised limbs of equal count.
fn cmp_limbs(a: &[u64], b: &[u64]) -> Ordering {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        match x.cmp(y) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

/// a −= b (mod 2^(radix·limbs)), normalised limbs.
fn sub_in_place(a: &mut [u64], b: &[u64], radix: u32) {
    let mask = (1u64 << radix) - 1;
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        let d = x.wrapping_sub(*y).wrapping_sub(borrow);
        *x = d & mask;
        borrow = d >> 63;
    }
}

/// −n₀⁻¹ mod 2^radix for odd n₀, by Newton's iteration (each step doubles the correct low bits;
/// n₀ is its own inverse mod 8, so four steps reach 48 ≥ 32 bits).
fn neg_inverse(n0: u64, radix: u32) -> u64 {
    let n0 = n0 as u32;
    let mut inv = n0;
    for _ in 0..4 {
        inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
    }
    u64::from(inv.wrapping_neg()) & ((1u64 << radix) - 1)
}

/// R² mod n (below 2n), R = 2^(radix·limbs). With radix·limbs = t·2^k: start from 2^(bits−1) < n,
/// double up to 2^(radix·limbs + t) mod n (the Montgomery form of 2^t), then square k times in
/// Montgomery form: (2^t)^(2^k) = R, whose Montgomery form is R².
fn r_squared(n: &[u64], n0_inv: u64, radix: u32, bits: usize) -> Vec<u64> {
    let l = n.len();
    let mask = (1u64 << radix) - 1;
    let radix_bits = radix as usize;
    let rl = radix_bits * l;
    let k = rl.trailing_zeros().min(6);
    let t = rl >> k;
    let top = bits - 1;
    let mut x = vec![0u64; l];
    if let Some(limb) = x.get_mut(top / radix_bits) {
        *limb = 1 << (top % radix_bits);
    }
    for _ in top..rl + t {
        let mut carry = 0u64;
        for limb in x.iter_mut() {
            let v = *limb << 1 | carry;
            *limb = v & mask;
            carry = v >> radix;
        }
        if carry != 0 || cmp_limbs(&x, n) != Ordering::Less {
            sub_in_place(&mut x, n, radix);
        }
    }
    let mut tmp = vec![0u64; l];
    let mut scratch = vec![0u64; 2 * l];
    for _ in 0..k {
        mont_sqr(&mut tmp, &x, n, n0_inv, radix, &mut scratch);
        std::mem::swap(&mut x, &mut tmp);
    }
    x
}

/// Carries the 2·limbs-column accumulator's upper half into normalised limbs: the result of a
/// Montgomery reduction.
#[inline(always)]
fn normalise_upper(out: &mut [u64], acc: &[u64], radix: u32) {
    let mask = (1u64 << radix) - 1;
    let l = out.len();
    let mut carry = 0u64;
    for (o, w) in out.iter_mut().zip(acc.iter().skip(l)) {
        let v = w + carry;
        *o = v & mask;
        carry = v >> radix;
    }
}

/// out = a·b·R⁻¹ mod n, below 2n, for a, b < 2n (normalised limbs; `acc` holds 2·limbs words).
///
/// Finely interleaved Montgomery multiplication over a column accumulator: `acc[k]` collects
/// every product of weight 2^(radix·k) without carrying (see the module comment for the bound).
/// Rows i and i + 1 (the products by b[i] and b[i+1] and the reductions by m_i and m_{i+1}) are
/// added in one pass: m_{i+1} needs only column i + 1, which is computed ahead.
#[inline(always)]
fn mont_mul(
    out: &mut [u64],
    a: &[u64],
    b: &[u64],
    n: &[u64],
    n0_inv: u64,
    radix: u32,
    acc: &mut [u64],
) {
    let l = n.len();
    if l < 4 || a.len() != l || b.len() != l || out.len() != l || acc.len() != 2 * l {
        return;
    }
    let mask = (1u64 << radix) - 1;
    let ([a0, a1, a_rest @ ..], [n0, n1, n_rest @ ..]) = (a, n) else {
        return;
    };
    let (Some(&a_top), Some(&n_top)) = (a_rest.last(), n_rest.last()) else {
        return;
    };
    let (a0, a1, n0, n1) = (*a0, *a1, *n0, *n1);
    acc.fill(0);
    let mut pairs = b.chunks_exact(2);
    for (i, bs) in pairs.by_ref().enumerate() {
        let [b0, b1] = *bs else {
            continue;
        };
        // Columns 2i .. 2i + l of the accumulator.
        let Some([c0, c1, mid @ .., c_top]) = acc.get_mut(2 * i..=2 * i + l) else {
            return;
        };
        let t0 = *c0 + a0 * b0;
        let m0 = t0.wrapping_mul(n0_inv) & mask;
        let t1 = *c1 + a1 * b0 + m0 * n1 + a0 * b1 + ((t0 + m0 * n0) >> radix);
        let m1 = t1.wrapping_mul(n0_inv) & mask;
        let carry = (t1 + m1 * n0) >> radix;
        // a[j−1] and n[j−1] ride along in registers: three loads per column, not five.
        let (mut a_lo, mut n_lo) = (a1, n1);
        for ((c, &a_hi), &n_hi) in mid.iter_mut().zip(a_rest).zip(n_rest) {
            *c += a_hi * b0 + n_hi * m0 + a_lo * b1 + n_lo * m1;
            (a_lo, n_lo) = (a_hi, n_hi);
        }
        *c_top += a_top * b1 + n_top * m1;
        if let Some(c2) = mid.first_mut() {
            *c2 += carry;
        }
    }
    // An odd limb count leaves one row.
    if let [bi] = *pairs.remainder() {
        let i = l - 1;
        if let Some([c0, rest @ ..]) = acc.get_mut(i..i + l) {
            let t0 = *c0 + a0 * bi;
            let m = t0.wrapping_mul(n0_inv) & mask;
            let carry = (t0 + m * n0) >> radix;
            let a_tail = a.iter().skip(1);
            for ((c, aj), nj) in rest.iter_mut().zip(a_tail).zip(n.iter().skip(1)) {
                *c += aj * bi + nj * m;
            }
            if let Some(c1) = rest.first_mut() {
                *c1 += carry;
            }
        }
    }
    normalise_upper(out, acc, radix);
}

/// out = a²·R⁻¹ mod n, below 2n, for a < 2n: each cross product once (doubled afterwards), the
/// squares, then the Montgomery reduction, two rows per pass throughout. About 1.5·limbs² limb
/// products against 2·limbs² for [`mont_mul`].
#[inline(always)]
fn mont_sqr(out: &mut [u64], a: &[u64], n: &[u64], n0_inv: u64, radix: u32, acc: &mut [u64]) {
    let l = n.len();
    if l < 4 || a.len() != l || out.len() != l || acc.len() != 2 * l {
        return;
    }
    acc.fill(0);
    // Cross products a[i]·a[j], i < j, into column i + j; rows i and i + 1 together.
    for i in (0..l - 1).step_by(2) {
        let Some([x0, x1, rest @ ..]) = a.get(i..) else {
            continue;
        };
        let Some([c1, cols @ ..]) = acc.get_mut(2 * i + 1..=i + l) else {
            continue;
        };
        // Column 2i + 1: a[i]·a[i+1]. Then for j ≥ i + 2, column i + j gets a[i]·a[j] and, from
        // j ≥ i + 3, a[i+1]·a[j−1]; finally column i + l gets a[i+1]·a[l−1].
        *c1 += x0 * x1;
        let Some((c_top, cols)) = cols.split_last_mut() else {
            continue;
        };
        if let (Some((c2, mid)), Some(first)) = (cols.split_first_mut(), rest.first()) {
            *c2 += x0 * first;
            let mut lo = *first;
            for (c, &hi) in mid.iter_mut().zip(rest.iter().skip(1)) {
                *c += x0 * hi + x1 * lo;
                lo = hi;
            }
        }
        if let Some(last) = rest.last() {
            *c_top += x1 * last;
        }
    }
    for (pair, ai) in acc.chunks_exact_mut(2).zip(a) {
        if let [even, odd] = pair {
            *even = 2 * *even + ai * ai;
            *odd *= 2;
        }
    }
    reduce(acc, n, n0_inv, radix);
    normalise_upper(out, acc, radix);
}

/// Montgomery reduction of the column accumulator in place (two rows per pass): afterwards the
/// upper `limbs` columns hold the result, unnormalised.
#[inline(always)]
fn reduce(acc: &mut [u64], n: &[u64], n0_inv: u64, radix: u32) {
    let l = n.len();
    if l < 4 || acc.len() != 2 * l {
        return;
    }
    let mask = (1u64 << radix) - 1;
    let [n0, n1, n_rest @ ..] = n else {
        return;
    };
    let Some(&n_top) = n_rest.last() else {
        return;
    };
    let (n0, n1) = (*n0, *n1);
    for i in (0..l - 1).step_by(2) {
        let Some([c0, c1, mid @ .., c_top]) = acc.get_mut(i..=i + l) else {
            return;
        };
        let m0 = c0.wrapping_mul(n0_inv) & mask;
        let t1 = *c1 + m0 * n1 + ((*c0 + m0 * n0) >> radix);
        let m1 = t1.wrapping_mul(n0_inv) & mask;
        let carry = (t1 + m1 * n0) >> radix;
        let mut lo = n1;
        for (c, &hi) in mid.iter_mut().zip(n_rest) {
            *c += m0 * hi + m1 * lo;
            lo = hi;
        }
        *c_top += m1 * n_top;
        if let Some(c2) = mid.first_mut() {
            *c2 += carry;
        }
    }
    if l % 2 == 1 {
        let i = l - 1;
        if let Some([c0, rest @ ..]) = acc.get_mut(i..i + l) {
            let m = c0.wrapping_mul(n0_inv) & mask;
            let carry = (*c0 + m * n0) >> radix;
            for (c, nj) in rest.iter_mut().zip(n.iter().skip(1)) {
                *c += m * nj;
            }
            if let Some(c1) = rest.first_mut() {
                *c1 += carry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use rand::rngs::ChaCha8Rng;
    use rand::{Rng, SeedableRng};
    use rsa::traits::PublicKeyParts;
    use rsa::{BoxedUint, Pkcs1v15Sign, PrivateKey, Pss};
    use sha2::{Digest, Sha256, Sha384, Sha512};

    use super::*;

    fn strip(bytes: &[u8]) -> Vec<u8> {
        strip_leading_zeros(bytes).to_vec()
    }

    fn generate(bits: usize, e: u64, seed: u8) -> PrivateKey {
        let mut rng = ChaCha8Rng::from_seed([seed; 32]);
        PrivateKey::new_with_exp(&mut rng, bits, BoxedUint::from(e)).unwrap()
    }

    /// Oracle keys, generated once: the usual sizes, an odd size where PSS's emLen is k − 1
    /// (modBits ≡ 1 mod 8), and a small exponent for the general exponentiation path.
    fn keys() -> &'static [(&'static str, PrivateKey)] {
        static KEYS: OnceLock<Vec<(&'static str, PrivateKey)>> = OnceLock::new();
        KEYS.get_or_init(|| {
            vec![
                ("2048", generate(2048, 65537, 1)),
                ("3072", generate(3072, 65537, 2)),
                ("4096", generate(4096, 65537, 3)),
                ("2049", generate(2049, 65537, 4)),
                ("2048 e=3", generate(2048, 3, 5)),
            ]
        })
    }

    fn public(key: &PrivateKey) -> RsaVerifyingKey {
        let p = key.to_public_key();
        RsaVerifyingKey::from_components(&p.n().to_be_bytes(), &p.e().to_be_bytes()).unwrap()
    }

    const ALGS: [HashAlg; 3] = [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512];

    fn digest(alg: HashAlg, msg: &[u8]) -> Vec<u8> {
        match alg {
            HashAlg::Sha256 => Sha256::digest(msg).to_vec(),
            HashAlg::Sha384 => Sha384::digest(msg).to_vec(),
            HashAlg::Sha512 => Sha512::digest(msg).to_vec(),
        }
    }

    fn sign_pkcs1(key: &PrivateKey, alg: HashAlg, digest: &[u8]) -> Vec<u8> {
        let scheme = match alg {
            HashAlg::Sha256 => Pkcs1v15Sign::new::<Sha256>(),
            HashAlg::Sha384 => Pkcs1v15Sign::new::<Sha384>(),
            HashAlg::Sha512 => Pkcs1v15Sign::new::<Sha512>(),
        };
        key.sign(scheme, digest).unwrap()
    }

    fn sign_pss(key: &PrivateKey, alg: HashAlg, digest: &[u8]) -> Vec<u8> {
        let mut rng = ChaCha8Rng::from_seed([11; 32]);
        match alg {
            HashAlg::Sha256 => key.sign_with_rng(&mut rng, Pss::<Sha256>::new(), digest),
            HashAlg::Sha384 => key.sign_with_rng(&mut rng, Pss::<Sha384>::new(), digest),
            HashAlg::Sha512 => key.sign_with_rng(&mut rng, Pss::<Sha512>::new(), digest),
        }
        .unwrap()
    }

    type Verify = fn(&RsaVerifyingKey, HashAlg, &[u8], &[u8]) -> bool;

    /// Everything that must fail for a valid (key, alg, digest, signature).
    fn assert_only_the_genuine_signature_verifies(
        name: &str,
        verify: Verify,
        key: &RsaVerifyingKey,
        alg: HashAlg,
        d: &[u8],
        sig: &[u8],
    ) {
        assert!(verify(key, alg, d, sig), "{name}: genuine signature");
        let k = sig.len();
        for bit in [0, 7, 8 * k / 2 + 3, 8 * k - 1] {
            let mut bad = sig.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!verify(key, alg, d, &bad), "{name}: signature bit {bit}");
        }
        let mut bad_digest = d.to_vec();
        bad_digest[0] ^= 0x80;
        assert!(!verify(key, alg, &bad_digest, sig), "{name}: digest");
        assert!(!verify(key, alg, &d[1..], sig), "{name}: short digest");
        for other in ALGS.into_iter().filter(|a| *a != alg) {
            let other_digest = digest(other, b"message");
            assert!(!verify(key, other, &other_digest, sig), "{name}: {other:?}");
            assert!(
                !verify(key, other, d, sig),
                "{name}: {other:?}, wrong length"
            );
        }
        assert!(!verify(key, alg, d, &sig[1..]), "{name}: one byte short");
        assert!(!verify(key, alg, d, &sig[..k - 1]), "{name}: truncated");
        let mut long = vec![0];
        long.extend_from_slice(sig);
        assert!(!verify(key, alg, d, &long), "{name}: leading zero byte");
        let mut long = sig.to_vec();
        long.push(0);
        assert!(!verify(key, alg, d, &long), "{name}: one byte long");
        assert!(!verify(key, alg, d, &[]), "{name}: empty");
        let n = key.modulus_be().to_vec();
        assert_eq!(n.len(), k);
        assert!(!verify(key, alg, d, &n), "{name}: s = n");
        let mut above = n.clone();
        *above.last_mut().unwrap() += 1; // n is odd: no carry
        assert!(!verify(key, alg, d, &above), "{name}: s = n + 1");
        assert!(!verify(key, alg, d, &vec![0xFF; k]), "{name}: all 0xFF");
        assert!(!verify(key, alg, d, &vec![0; k]), "{name}: s = 0");
        let mut one = vec![0; k];
        one[k - 1] = 1;
        assert!(!verify(key, alg, d, &one), "{name}: s = 1");
    }

    #[test]
    fn rsa_crate_signatures_verify_and_nothing_else_does() {
        let keys = keys();
        let wrong = public(&keys[1].1);
        for (size, key) in keys {
            let vk = public(key);
            assert_eq!(
                vk.modulus_bits(),
                key.to_public_key().n().bit_width() as usize
            );
            for alg in ALGS {
                let d = digest(alg, b"message");
                let pkcs = sign_pkcs1(key, alg, &d);
                let pss = sign_pss(key, alg, &d);
                let name = format!("{size} {alg:?}");
                assert_only_the_genuine_signature_verifies(
                    &format!("PKCS1 {name}"),
                    RsaVerifyingKey::verify_pkcs1v15,
                    &vk,
                    alg,
                    &d,
                    &pkcs,
                );
                assert_only_the_genuine_signature_verifies(
                    &format!("PSS {name}"),
                    RsaVerifyingKey::verify_pss,
                    &vk,
                    alg,
                    &d,
                    &pss,
                );
                // One padding is never taken for the other.
                assert!(!vk.verify_pss(alg, &d, &pkcs), "{name}");
                assert!(!vk.verify_pkcs1v15(alg, &d, &pss), "{name}");
                if vk != wrong {
                    assert!(!wrong.verify_pkcs1v15(alg, &d, &pkcs), "{name}: wrong key");
                    assert!(!wrong.verify_pss(alg, &d, &pss), "{name}: wrong key");
                }
            }
        }
    }

    #[test]
    fn pss_with_another_salt_length_is_refused() {
        let key = &keys()[0].1;
        let vk = public(key);
        let d = digest(HashAlg::Sha256, b"message");
        let mut rng = ChaCha8Rng::from_seed([12; 32]);
        for salt in [0, 20, 33] {
            let sig = key
                .sign_with_rng(&mut rng, Pss::<Sha256>::new_with_salt(salt), &d)
                .unwrap();
            assert!(!vk.verify_pss(HashAlg::Sha256, &d, &sig), "salt {salt}");
        }
    }

    #[test]
    fn the_filter_test_keys_verify() {
        let set = crate::test_keys::key_set();
        let crate::jwks::PublicKeyMaterial::Rsa(key) = &set.keys[0].key else {
            panic!("k1 is an RSA key");
        };
        let token =
            crate::test_keys::sign(&serde_json::json!({"alg": "RS256"}), &serde_json::json!({}));
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
        let d = digest(HashAlg::Sha256, input.as_bytes());
        assert!(key.verify_pkcs1v15(HashAlg::Sha256, &d, &sig));
        assert!(!key.verify_pkcs1v15(HashAlg::Sha256, &digest(HashAlg::Sha256, b"x"), &sig));
    }

    #[test]
    fn key_validation() {
        let key = keys()[0].1.to_public_key();
        let n = strip(&key.n().to_be_bytes());
        let e = [1, 0, 1];
        let ok = |n: &[u8], e: &[u8]| RsaVerifyingKey::from_components(n, e);
        assert!(ok(&n, &e).is_ok());
        // Leading zeros are the same number.
        let mut padded = vec![0, 0];
        padded.extend_from_slice(&n);
        assert_eq!(ok(&padded, &[0, 0, 1, 0, 1]).unwrap(), ok(&n, &e).unwrap());
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xFE;
        assert_eq!(ok(&even, &e), Err(RsaKeyError::EvenModulus));
        assert!(matches!(
            ok(&n[1..], &e),
            Err(RsaKeyError::ModulusSize(2033..=2040))
        ));
        assert_eq!(ok(&[], &e), Err(RsaKeyError::ModulusSize(0)));
        let mut small = n.clone();
        small[0] = 0x7F;
        assert_eq!(ok(&small, &e), Err(RsaKeyError::ModulusSize(2047)));
        let mut huge = vec![1];
        huge.extend_from_slice(&[0xFF; 1024]);
        assert_eq!(ok(&huge, &e), Err(RsaKeyError::ModulusSize(8193)));
        let max = vec![0xFF; 1024];
        assert_eq!(ok(&max, &e).unwrap().modulus_bits(), 8192);
        for (e, err) in [
            (&[][..], RsaKeyError::ExponentTooSmall),
            (&[0], RsaKeyError::ExponentTooSmall),
            (&[1], RsaKeyError::ExponentTooSmall),
            (&[2], RsaKeyError::ExponentTooSmall),
            (&[4], RsaKeyError::EvenExponent),
            (&[1, 0, 0], RsaKeyError::EvenExponent),
            (&[2, 0, 0, 0, 1], RsaKeyError::ExponentTooLarge),
            (&[1; 9], RsaKeyError::ExponentTooLarge),
            (&[0xFF; 8], RsaKeyError::ExponentTooLarge),
        ] {
            assert_eq!(ok(&n, e), Err(err), "{e:?}");
        }
        for e in [
            &[3][..],
            &[1, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
        ] {
            assert!(ok(&n, e).is_ok(), "{e:?}");
        }
        // Messages name the limits, for the JWKS skip log.
        assert_eq!(
            RsaKeyError::ModulusSize(1024).to_string(),
            "RSA modulus of 1024 bits is outside 2048..=8192"
        );
    }

    fn big(bytes: &[u8], precision: u32) -> BoxedUint {
        BoxedUint::from_be_slice(bytes, precision).unwrap()
    }

    /// Random odd moduli of assorted sizes with random exponents: s^e mod n against
    /// square-and-multiply over the `rsa` crate's `BoxedUint::mul_mod`, and the Montgomery
    /// product and square against each other.
    #[test]
    fn modular_exponentiation_matches_a_reference() {
        let mut rng = ChaCha8Rng::from_seed([3; 32]);
        // Both radixes, odd and even limb counts, the largest modulus.
        for bits in [
            2048usize, 2049, 2055, 2079, 2080, 2081, 3072, 3358, 3359, 4096, 8192,
        ] {
            let k = bits.div_ceil(8);
            let precision = u32::try_from(k * 8).unwrap().next_multiple_of(64);
            let mut n = vec![0u8; k];
            rng.fill_bytes(&mut n);
            n[0] &= (0xFFu16 >> (8 * k - bits)) as u8;
            n[0] |= 0x80 >> (8 * k - bits);
            n[k - 1] |= 1;
            for e in [3u64, 65537, (rng.next_u64() % MAX_PUBLIC_EXPONENT) | 1] {
                let vk = RsaVerifyingKey::from_components(&n, &e.to_be_bytes()).unwrap();
                assert_eq!(vk.modulus_bits(), bits);
                let modulus =
                    rsa::PublicKey::new_unchecked(big(&n, precision), BoxedUint::from(3u64));
                let modulus = modulus.n();
                let (l, radix) = (vk.n.len(), vk.radix);
                let mut inputs: Vec<Vec<u8>> = (0..3)
                    .map(|_| {
                        let mut s = vec![0u8; k];
                        rng.fill_bytes(&mut s);
                        s[0] &= (0xFFu16 >> (8 * k - bits + 1)) as u8; // s < 2^(bits-1) < n
                        s
                    })
                    .collect();
                // The extremes: 0, 1, n − 1.
                inputs.push(vec![0; k]);
                inputs.push(one(k));
                let mut n_minus_1 = n.clone();
                n_minus_1[k - 1] -= 1;
                inputs.push(n_minus_1);
                for s in inputs {
                    let s_limbs = to_limbs(&s, radix, l);
                    assert_eq!(from_limbs(&s_limbs, radix, k), s);
                    let got = from_limbs(&vk.pow_e(&s_limbs), radix, k);
                    let base = big(&s, precision);
                    let mut want = big(&[1], precision);
                    for i in (0..64).rev() {
                        want = want.mul_mod(&want, modulus);
                        if e >> i & 1 == 1 {
                            want = want.mul_mod(&base, modulus);
                        }
                    }
                    assert_eq!(
                        strip(&got),
                        strip(&want.to_be_bytes()),
                        "{bits} bits, e {e}"
                    );

                    // The Montgomery square equals the Montgomery product of a value with itself,
                    // also for inputs up to 2n − 1 (the "almost Montgomery" range), and stays
                    // below 2n.
                    let mut acc = vec![0u64; 2 * l];
                    let mut a = s_limbs.clone();
                    for _ in 0..2 {
                        let mut sq = vec![0u64; l];
                        let mut mul = vec![0u64; l];
                        mont_sqr(&mut sq, &a, &vk.n, vk.n0_inv, radix, &mut acc);
                        mont_mul(&mut mul, &a, &a, &vk.n, vk.n0_inv, radix, &mut acc);
                        assert_eq!(sq, mul, "{bits} bits");
                        let mut reduced = sq.clone();
                        if cmp_limbs(&reduced, &vk.n) != Ordering::Less {
                            sub_in_place(&mut reduced, &vk.n, radix);
                        }
                        assert_eq!(cmp_limbs(&reduced, &vk.n), Ordering::Less, "below 2n");
                        // a + n (< 2n) as the next input.
                        a = add(&s_limbs, &vk.n, radix);
                    }
                }
            }
        }
    }

    fn one(k: usize) -> Vec<u8> {
        let mut v = vec![0; k];
        v[k - 1] = 1;
        v
    }

    fn add(a: &[u64], b: &[u64], radix: u32) -> Vec<u64> {
        let mut carry = 0;
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let v = x + y + carry;
                carry = v >> radix;
                v & ((1 << radix) - 1)
            })
            .collect()
    }

    #[test]
    fn limb_helpers() {
        for n0 in [1u64, 3, 0xFFF_FFFF, 0x234_5677, 65537] {
            for radix in [27, 28] {
                let mask = (1u64 << radix) - 1;
                assert_eq!((n0 * neg_inverse(n0, radix)) & mask, mask, "{n0}");
            }
        }
        let bytes = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11];
        assert_eq!(to_limbs(&bytes, 28, 3), vec![0xcdef011, 0x56789ab, 0x1234]);
        assert_eq!(from_limbs(&[0xcdef011, 0x56789ab, 0x1234], 28, 9), bytes);
        assert_eq!(to_limbs(&[1], 27, 4), vec![1, 0, 0, 0]);
    }

    #[test]
    fn random_signatures_never_verify() {
        let vk = public(&keys()[0].1);
        let d = digest(HashAlg::Sha256, b"message");
        let mut rng = ChaCha8Rng::from_seed([5; 32]);
        for len in [0, 1, 255, 256, 257, 512] {
            for _ in 0..4 {
                let mut sig = vec![0u8; len];
                rng.fill_bytes(&mut sig);
                for alg in ALGS {
                    assert!(!vk.verify_pkcs1v15(alg, &d, &sig));
                    assert!(!vk.verify_pss(alg, &d, &sig));
                }
            }
        }
    }
}
