//! HMAC-SHA256 key derivation straight on the SHA-256 compression function:
//! PBKDF2, where opening a PKCS#8 KEK (600000 iterations) costs two
//! compressions per round, and HKDF-Expand, which every v2 message runs.

use sha2::block_api::compress256;
use zeroize::Zeroizing;

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The SHA-256 state after absorbing one 64-byte block.
fn keyed_state(block: &[u8; 64]) -> [u32; 8] {
    let mut state = IV;
    compress256(&mut state, std::slice::from_ref(block));
    state
}

/// Finish a hash whose state has absorbed exactly one block, with 32 more bytes.
fn finish_32(state: &[u32; 8], msg: &[u8; 32], block: &mut [u8; 64]) -> [u8; 32] {
    block[..32].copy_from_slice(msg);
    let mut s = *state;
    compress256(&mut s, std::slice::from_ref(block));
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(s) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// One-shot SHA-256 through the `sha2` digest API, for the key and first block.
fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// `T = U1 ^ U2 ^ ... ^ U_rounds` from the keyed inner and outer states and
/// `U1`, one `compress256` per hash (the loop on CPUs without SHA-NI).
fn iterate(inner: &[u32; 8], outer: &[u32; 8], u1: &[u8; 32], rounds: u32) -> [u8; 32] {
    // The padding of a 96-byte message (64 key bytes + 32): 0x80, zeros, bit length 768.
    let mut block = [0u8; 64];
    block[32] = 0x80;
    block[62] = 0x03;
    let (mut u, mut t) = (*u1, *u1);
    for _ in 1..rounds {
        let x = finish_32(inner, &u, &mut block);
        u = finish_32(outer, &x, &mut block);
        for (a, b) in t.iter_mut().zip(u) {
            *a ^= b;
        }
    }
    t
}

/// An HMAC-SHA256 key as its two keyed states: the inner hash after
/// `key ^ ipad`, the outer after `key ^ opad` (zeroized on drop).
#[derive(Clone)]
pub struct HmacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Drop for HmacKey {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.inner.zeroize();
        self.outer.zeroize();
    }
}

/// The HMAC key blocks `key ^ ipad` and `key ^ opad` (RFC 2104).
fn pads(key: &[u8]) -> (Zeroizing<[u8; 64]>, Zeroizing<[u8; 64]>) {
    let mut block = Zeroizing::new([0u8; 64]);
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(&[key]));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let (mut ipad, mut opad) = (Zeroizing::new([0u8; 64]), Zeroizing::new([0u8; 64]));
    for i in 0..64 {
        ipad[i] = block[i] ^ 0x36;
        opad[i] = block[i] ^ 0x5c;
    }
    (ipad, opad)
}

impl HmacKey {
    pub fn new(key: &[u8]) -> HmacKey {
        let (ipad, opad) = pads(key);
        HmacKey {
            inner: keyed_state(&ipad),
            outer: keyed_state(&opad),
        }
    }

    /// HKDF-Expand (RFC 5869) with this key as the PRK, into `out` (at most
    /// 255 * 32 bytes). `info` is the concatenation of its parts, at most
    /// 191 bytes in all. Each block `T(i) = HMAC(PRK, T(i-1) || info || i)` is
    /// laid out once in a stack buffer and compressed in place, with no
    /// hasher to clone or buffer through: a v2 message's key, nonce and
    /// commitment are 12 compressions, and the rest was a fifth of the time.
    pub fn expand(&self, info: &[&[u8]], out: &mut [u8]) {
        let info_len: usize = info.iter().map(|p| p.len()).sum();
        assert!(
            info_len <= 191 && out.len() <= 255 * 32,
            "HKDF-Expand limits"
        );
        // T(i-1) (32, absent for T(1)), info, the counter, padding: 4 blocks at most.
        let mut message = Zeroizing::new([0u8; 256]);
        let mut previous: Option<[u8; 32]> = None;
        let mut outer_block = [0u8; 64];
        outer_block[32] = 0x80;
        outer_block[62] = 0x03; // 64 + 32 bytes = 768 bits
        for (i, piece) in out.chunks_mut(32).enumerate() {
            let mut at = 0;
            if let Some(t) = &previous {
                message[..32].copy_from_slice(t);
                at = 32;
            }
            for part in info {
                message[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            message[at] = i as u8 + 1;
            at += 1;
            let bits = ((64 + at) as u64) * 8;
            let blocks = (at + 9).div_ceil(64);
            message[at..blocks * 64].fill(0);
            message[at] = 0x80;
            message[blocks * 64 - 8..blocks * 64].copy_from_slice(&bits.to_be_bytes());
            let mut state = self.inner;
            let (chunks, _) = message[..blocks * 64].as_chunks::<64>();
            compress256(&mut state, chunks);
            let mut digest = [0u8; 32];
            for (o, w) in digest.chunks_exact_mut(4).zip(state) {
                o.copy_from_slice(&w.to_be_bytes());
            }
            let t = finish_32(&self.outer, &digest, &mut outer_block);
            piece.copy_from_slice(&t[..piece.len()]);
            previous = Some(t);
        }
    }
}

/// PBKDF2 (RFC 8018) with HMAC-SHA256, deriving `len` bytes.
pub fn pbkdf2_hmac_sha256(
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let (ipad, opad) = pads(password);
    let key = HmacKey::new(password);
    let (inner, outer) = (&key.inner, &key.outer);
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut index = 1u32;
    while out.len() < len {
        // U1 = HMAC(password, salt || INT(index)): the salt may be any length.
        let first_inner = sha256(&[&ipad[..], salt, &index.to_be_bytes()]);
        let u = sha256(&[&opad[..], &first_inner]);
        let t = shani::iterate(inner, outer, &u, rounds)
            .unwrap_or_else(|| iterate(inner, outer, &u, rounds));
        out.extend_from_slice(&t);
        index += 1;
    }
    out.truncate(len);
    out
}

/// The PBKDF2 loop on SHA-NI, with the whole chain in registers.
///
/// Every round hashes a 32-byte digest under a keyed state, so its message is
/// the previous digest's eight words followed by constant padding: there is no
/// byte order to convert and nothing to store between the 1.2 million
/// compressions of a 600000-round KEK. Through `compress256` each compression
/// also paid for loading, byte-swapping and storing its block and state,
/// about a third more time per round.
#[cfg(target_arch = "x86_64")]
mod shani {
    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// `T = U1 ^ U2 ^ ... ^ U_rounds`, from the keyed inner and outer states
    /// and `U1`; `None` without SHA-NI (the caller then uses `compress256`).
    pub fn iterate(
        inner: &[u32; 8],
        outer: &[u32; 8],
        u1: &[u8; 32],
        rounds: u32,
    ) -> Option<[u8; 32]> {
        let detected = is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse4.1")
            && is_x86_feature_detected!("ssse3");
        // SAFETY: the instructions the function is compiled for were detected.
        detected.then(|| unsafe { iterate_shani(inner, outer, u1, rounds) })
    }

    /// Natural word order [A B C D], [E F G H] to the instructions' [A B E F], [C D G H].
    #[inline(always)]
    unsafe fn to_abef_cdgh(abcd: __m128i, efgh: __m128i) -> (__m128i, __m128i) {
        let cdab = _mm_shuffle_epi32(abcd, 0xB1);
        let hgfe = _mm_shuffle_epi32(efgh, 0x1B);
        (
            _mm_alignr_epi8(cdab, hgfe, 8),
            _mm_blend_epi16(hgfe, cdab, 0xF0),
        )
    }

    /// The reverse of `to_abef_cdgh`.
    #[inline(always)]
    unsafe fn to_abcd_efgh(abef: __m128i, cdgh: __m128i) -> (__m128i, __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        (
            _mm_blend_epi16(feba, dchg, 0xF0),
            _mm_alignr_epi8(dchg, feba, 8),
        )
    }

    #[inline(always)]
    unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(t, w3)
    }

    #[inline(always)]
    unsafe fn rounds4(abef: &mut __m128i, cdgh: &mut __m128i, w: __m128i, i: usize) {
        let k = _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i);
        let wk = _mm_add_epi32(w, k);
        *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
        *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32(wk, 0x0E));
    }

    /// One compression of the block `m0..m3` (message words in natural
    /// order) into the state `(abef, cdgh)`; the result in natural order.
    #[inline(always)]
    unsafe fn compress(
        state: (__m128i, __m128i),
        m0: __m128i,
        m1: __m128i,
        m2: __m128i,
        m3: __m128i,
    ) -> (__m128i, __m128i) {
        let (mut abef, mut cdgh) = state;
        let (mut w0, mut w1, mut w2, mut w3) = (m0, m1, m2, m3);
        rounds4(&mut abef, &mut cdgh, w0, 0);
        rounds4(&mut abef, &mut cdgh, w1, 1);
        rounds4(&mut abef, &mut cdgh, w2, 2);
        rounds4(&mut abef, &mut cdgh, w3, 3);
        for i in (4..16).step_by(4) {
            w0 = schedule(w0, w1, w2, w3);
            rounds4(&mut abef, &mut cdgh, w0, i);
            w1 = schedule(w1, w2, w3, w0);
            rounds4(&mut abef, &mut cdgh, w1, i + 1);
            w2 = schedule(w2, w3, w0, w1);
            rounds4(&mut abef, &mut cdgh, w2, i + 2);
            w3 = schedule(w3, w0, w1, w2);
            rounds4(&mut abef, &mut cdgh, w3, i + 3);
        }
        to_abcd_efgh(_mm_add_epi32(abef, state.0), _mm_add_epi32(cdgh, state.1))
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn iterate_shani(
        inner: &[u32; 8],
        outer: &[u32; 8],
        u1: &[u8; 32],
        rounds: u32,
    ) -> [u8; 32] {
        let load = |w: &[u32]| _mm_loadu_si128(w.as_ptr() as *const __m128i);
        let inner = to_abef_cdgh(load(&inner[..4]), load(&inner[4..]));
        let outer = to_abef_cdgh(load(&outer[..4]), load(&outer[4..]));
        let mut words = [0u32; 8];
        for (w, b) in words.iter_mut().zip(u1.chunks_exact(4)) {
            *w = u32::from_be_bytes(b.try_into().unwrap());
        }
        let (mut u0, mut u1) = (load(&words[..4]), load(&words[4..]));
        let (mut t0, mut t1) = (u0, u1);
        // The padding of a 96-byte message: 0x80 after the digest, bit length 768.
        let pad0 = _mm_set_epi32(0, 0, 0, 0x8000_0000u32 as i32);
        let pad1 = _mm_set_epi32(768, 0, 0, 0);
        for _ in 1..rounds {
            let (x0, x1) = compress(inner, u0, u1, pad0, pad1);
            (u0, u1) = compress(outer, x0, x1, pad0, pad1);
            t0 = _mm_xor_si128(t0, u0);
            t1 = _mm_xor_si128(t1, u1);
        }
        _mm_storeu_si128(words.as_mut_ptr() as *mut __m128i, t0);
        _mm_storeu_si128(words.as_mut_ptr().add(4) as *mut __m128i, t1);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// Elsewhere, the `compress256` loop.
#[cfg(not(target_arch = "x86_64"))]
mod shani {
    pub fn iterate(_: &[u32; 8], _: &[u32; 8], _: &[u8; 32], _: u32) -> Option<[u8; 32]> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_expand_matches_the_hkdf_crate() {
        for prk_len in [32, 48, 100] {
            let prk: Vec<u8> = (0..prk_len as u8).collect();
            let info: Vec<u8> = (0..191u8).map(|i| i.wrapping_mul(7)).collect();
            let reference = hkdf::Hkdf::<sha2::Sha256>::from_prk(&prk).unwrap();
            for info_len in [0, 1, 55, 56, 87, 88, 131, 150, 191] {
                for out_len in [1, 32, 33, 48, 76, 200] {
                    let mut want = vec![0u8; out_len];
                    reference.expand(&info[..info_len], &mut want).unwrap();
                    let mut got = vec![0u8; out_len];
                    let (a, b) = info[..info_len].split_at(info_len / 3);
                    HmacKey::new(&prk).expand(&[a, b], &mut got);
                    assert_eq!(got, want, "prk {prk_len} info {info_len} out {out_len}");
                }
            }
        }
    }

    #[test]
    fn rfc_7914_test_vectors() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256.
        let out = pbkdf2_hmac_sha256(b"passwd", b"salt", 1, 64);
        assert_eq!(
            hex::encode(&out[..]),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
        let out = pbkdf2_hmac_sha256(b"Password", b"NaCl", 80000, 64);
        assert_eq!(
            hex::encode(&out[..]),
            "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56\
             a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d"
        );
    }

    #[test]
    fn shani_loop_matches_the_compress256_loop() {
        // Both paths from the same inputs, whichever the CPU runs by default.
        let inner = keyed_state(&[0x36; 64]);
        let outer = keyed_state(&[0x5c; 64]);
        let u1 = [0xa5u8; 32];
        for rounds in [1, 2, 3, 1000] {
            let t = iterate(&inner, &outer, &u1, rounds);
            if let Some(fast) = shani::iterate(&inner, &outer, &u1, rounds) {
                assert_eq!(fast, t, "rounds {rounds}");
            }
        }
    }

    #[test]
    fn long_passwords_are_hashed_first() {
        let long = [b'p'; 100];
        let short = sha256(&[&long]);
        assert_eq!(
            pbkdf2_hmac_sha256(&long, b"s", 3, 32),
            pbkdf2_hmac_sha256(&short, b"s", 3, 32)
        );
    }
}
