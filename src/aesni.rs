//! AES-256-CBC kernels on AES-NI and VAES, chosen at run time.
//!
//! The crate is built for a baseline x86-64 (wheels run anywhere), so every
//! kernel is a `#[target_feature]` function and [`Level::detect`] picks the
//! best one the CPU offers, once. [`AesNi::new`] returns `None` when there is
//! no AES-NI (or off x86-64); the caller then falls back to the `aes` crate.
//!
//! CBC encryption is serial: one block at a time, all fifteen round keys in
//! registers. Decryption is parallel: 16 blocks per iteration as four zmm
//! registers with VAES + AVX-512F, or as eight ymm registers with VAES + AVX2,
//! or 8 blocks in xmm registers with plain AES-NI.
//!
//! The kernels take whole blocks, input and output in different buffers, and
//! the chaining value; they return the next chaining value so that streams
//! can be processed piece by piece.

#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::AesNi;

/// Off x86-64 there is no fast path: `new` always says so.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) use portable::AesNi;

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    /// Uninhabited: never constructed off x86-64.
    #[derive(Clone)]
    pub(crate) enum AesNi {}

    impl AesNi {
        pub(crate) fn new(_key: &[u8; 32]) -> Option<Self> {
            None
        }

        pub(crate) fn encrypt_cbc(&self, _: &[u8; 16], _: &[u8], _: &mut [u8]) -> [u8; 16] {
            match *self {}
        }

        pub(crate) fn decrypt_cbc(&self, _: &[u8; 16], _: &[u8], _: &mut [u8]) -> [u8; 16] {
            match *self {}
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::cipher::BLOCK;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;
    use zeroize::Zeroize;

    /// Which decryption kernel a CPU can run. Encryption is the same AES-NI
    /// loop on all of them: it is latency-bound, wider registers do not help.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Level {
        /// AES-NI on xmm registers, 8 blocks at a time.
        AesNi,
        /// VAES on ymm registers (AVX2), 16 blocks at a time.
        Vaes256,
        /// VAES on zmm registers (AVX-512F), 16 blocks at a time.
        Vaes512,
    }

    impl Level {
        #[cfg(test)]
        pub(crate) const ALL: [Level; 3] = [Level::AesNi, Level::Vaes256, Level::Vaes512];

        /// Whether this CPU (and its OS, for the wider registers) runs this level's kernels.
        pub(crate) fn supported(self) -> bool {
            let aes = is_x86_feature_detected!("aes");
            match self {
                Level::AesNi => aes,
                Level::Vaes256 => {
                    aes && is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx2")
                }
                Level::Vaes512 => {
                    aes && is_x86_feature_detected!("vaes") && is_x86_feature_detected!("avx512f")
                }
            }
        }

        /// The best supported level, detected once per process.
        pub(crate) fn detect() -> Option<Level> {
            static LEVEL: OnceLock<Option<Level>> = OnceLock::new();
            *LEVEL.get_or_init(|| {
                [Level::Vaes512, Level::Vaes256, Level::AesNi]
                    .into_iter()
                    .find(|level| level.supported())
            })
        }
    }

    /// Fifteen round keys, as bytes so that they can be zeroized.
    #[derive(Clone)]
    #[repr(C, align(64))]
    struct RoundKeys([[u8; 16]; 15]);

    /// An AES-256 key schedule for the AES-NI kernels; zeroized on drop.
    #[derive(Clone)]
    pub(crate) struct AesNi {
        enc: RoundKeys,
        dec: RoundKeys,
        /// Checked by `with_level`: the CPU supports it.
        level: Level,
    }

    impl Drop for AesNi {
        fn drop(&mut self) {
            self.enc.0.zeroize();
            self.dec.0.zeroize();
        }
    }

    impl AesNi {
        /// The key schedule for the best kernels this CPU has, or `None` without AES-NI.
        pub(crate) fn new(key: &[u8; 32]) -> Option<Self> {
            Self::with_level(key, Level::detect()?)
        }

        /// The key schedule for a given level, `None` if the CPU does not support it.
        pub(crate) fn with_level(key: &[u8; 32], level: Level) -> Option<Self> {
            if !level.supported() {
                return None;
            }
            let mut keys = AesNi {
                enc: RoundKeys([[0; 16]; 15]),
                dec: RoundKeys([[0; 16]; 15]),
                level,
            };
            // SAFETY: every level includes AES-NI, and `level.supported()` checked it.
            unsafe { expand_key(key, &mut keys.enc.0, &mut keys.dec.0) };
            Some(keys)
        }

        #[cfg(test)]
        pub(crate) fn level(&self) -> Level {
            self.level
        }

        #[cfg(test)]
        pub(crate) fn round_key(&self, i: usize) -> [u8; 16] {
            self.enc.0[i]
        }

        /// CBC-encrypt whole blocks of `input` into `out` (of the same length)
        /// starting from chaining value `iv`; returns the next chaining value.
        pub(crate) fn encrypt_cbc(&self, iv: &[u8; 16], input: &[u8], out: &mut [u8]) -> [u8; 16] {
            check_lengths(input, out);
            // SAFETY: every level includes AES-NI, checked at construction.
            unsafe { encrypt_aesni(&self.enc, iv, input, out) };
            last_or(out, iv)
        }

        /// CBC-decrypt whole blocks of `input` into `out` (of the same length)
        /// starting from chaining value `iv`; returns the next chaining value.
        pub(crate) fn decrypt_cbc(&self, iv: &[u8; 16], input: &[u8], out: &mut [u8]) -> [u8; 16] {
            check_lengths(input, out);
            match self.level {
                // SAFETY: `with_level` checked that the CPU supports this level.
                Level::Vaes512 => unsafe { decrypt_vaes512(&self.dec, iv, input, out) },
                // SAFETY: `with_level` checked that the CPU supports this level.
                Level::Vaes256 => unsafe { decrypt_vaes256(&self.dec, iv, input, out) },
                // SAFETY: `with_level` checked that the CPU supports this level.
                Level::AesNi => unsafe { decrypt_aesni(&self.dec, iv, input, out) },
            }
            last_or(input, iv)
        }
    }

    /// Equal lengths, whole blocks: the kernels rely on it for their bounds.
    fn check_lengths(input: &[u8], out: &[u8]) {
        assert_eq!(
            input.len(),
            out.len(),
            "CBC input and output lengths differ"
        );
        assert!(
            input.len().is_multiple_of(BLOCK),
            "CBC input is not whole blocks"
        );
    }

    /// The last block of `blocks`, or `iv` when there is none.
    fn last_or(blocks: &[u8], iv: &[u8; 16]) -> [u8; 16] {
        match blocks.last_chunk::<16>() {
            Some(last) => *last,
            None => *iv,
        }
    }

    #[inline]
    fn load128(b: &[u8; 16]) -> __m128i {
        // SAFETY: `b` is 16 readable bytes; the load is unaligned; SSE2 is baseline on x86-64.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[inline]
    fn store128(b: &mut [u8; 16], v: __m128i) {
        // SAFETY: `b` is 16 writable bytes; the store is unaligned; SSE2 is baseline on x86-64.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn load256(b: &[u8; 32]) -> __m256i {
        // SAFETY: `b` is 32 readable bytes; the load is unaligned; AVX is enabled here.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn store256(b: &mut [u8; 32], v: __m256i) {
        // SAFETY: `b` is 32 writable bytes; the store is unaligned; AVX is enabled here.
        unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load512(b: &[u8; 64]) -> __m512i {
        // SAFETY: `b` is 64 readable bytes; the load is unaligned; AVX-512F is enabled here.
        unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store512(b: &mut [u8; 64], v: __m512i) {
        // SAFETY: `b` is 64 writable bytes; the store is unaligned; AVX-512F is enabled here.
        unsafe { _mm512_storeu_si512(b.as_mut_ptr().cast(), v) }
    }

    fn load_keys(rk: &RoundKeys) -> [__m128i; 15] {
        rk.0.map(|k| load128(&k))
    }

    /// `a ^ a<<32 ^ a<<64 ^ a<<96`: the running XOR of a round key's words.
    #[inline]
    #[target_feature(enable = "aes")]
    fn spread(a: __m128i) -> __m128i {
        let a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
        let a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
        _mm_xor_si128(a, _mm_slli_si128::<4>(a))
    }

    /// Even round key `2i`: from keys `2i-2` and `2i-1`, with RotWord, SubWord and Rcon.
    #[inline]
    #[target_feature(enable = "aes")]
    fn even_key<const RCON: i32>(a: __m128i, b: __m128i) -> __m128i {
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<RCON>(b));
        _mm_xor_si128(spread(a), t)
    }

    /// Odd round key `2i+1`: from keys `2i-1` and `2i`, with SubWord only.
    #[inline]
    #[target_feature(enable = "aes")]
    fn odd_key(a: __m128i, b: __m128i) -> __m128i {
        let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(b));
        _mm_xor_si128(spread(a), t)
    }

    /// The AES-256 key expansion (FIPS-197 5.2), and the decryption keys for
    /// the equivalent inverse cipher: reversed, with InvMixColumns on 1..=13.
    #[target_feature(enable = "aes")]
    fn expand_key(key: &[u8; 32], enc: &mut [[u8; 16]; 15], dec: &mut [[u8; 16]; 15]) {
        let (lo, hi) = key.split_at(16);
        let mut k = [_mm_setzero_si128(); 15];
        k[0] = load128(lo.try_into().expect("16 bytes"));
        k[1] = load128(hi.try_into().expect("16 bytes"));
        k[2] = even_key::<0x01>(k[0], k[1]);
        k[3] = odd_key(k[1], k[2]);
        k[4] = even_key::<0x02>(k[2], k[3]);
        k[5] = odd_key(k[3], k[4]);
        k[6] = even_key::<0x04>(k[4], k[5]);
        k[7] = odd_key(k[5], k[6]);
        k[8] = even_key::<0x08>(k[6], k[7]);
        k[9] = odd_key(k[7], k[8]);
        k[10] = even_key::<0x10>(k[8], k[9]);
        k[11] = odd_key(k[9], k[10]);
        k[12] = even_key::<0x20>(k[10], k[11]);
        k[13] = odd_key(k[11], k[12]);
        k[14] = even_key::<0x40>(k[12], k[13]);
        for (i, rk) in k.iter().enumerate() {
            store128(&mut enc[i], *rk);
            let d = match i {
                0 | 14 => *rk,
                _ => _mm_aesimc_si128(*rk),
            };
            store128(&mut dec[14 - i], d);
        }
    }

    /// CBC encryption: serial, one block at a time, the round keys in registers.
    ///
    /// The chain is only AES rounds: the last round's key addition also adds
    /// the next plaintext block and the first round key (`aesenclast(y, k14 ^
    /// p ^ k0)` is `aesenclast(y, k14) ^ p ^ k0`), so the next block's state
    /// comes out of the same instruction that the ciphertext does, and no XOR
    /// waits between two blocks.
    #[target_feature(enable = "aes")]
    fn encrypt_aesni(ek: &RoundKeys, iv: &[u8; 16], input: &[u8], out: &mut [u8]) {
        let k = load_keys(ek);
        let src = input.as_chunks::<16>().0;
        let dst = out.as_chunks_mut::<16>().0;
        let Some(first) = src.first() else {
            return;
        };
        let last_k0 = _mm_xor_si128(k[14], k[0]);
        let mut x = _mm_xor_si128(load128(iv), _mm_xor_si128(load128(first), k[0]));
        for (i, d) in dst.iter_mut().enumerate() {
            let mut y = _mm_aesenc_si128(x, k[1]);
            for rk in &k[2..14] {
                y = _mm_aesenc_si128(y, *rk);
            }
            store128(d, _mm_aesenclast_si128(y, k[14]));
            if let Some(next) = src.get(i + 1) {
                x = _mm_aesenclast_si128(y, _mm_xor_si128(last_k0, load128(next)));
            }
        }
    }

    /// One block through the inverse cipher (no chaining).
    #[inline]
    #[target_feature(enable = "aes")]
    fn decrypt1(k: &[__m128i; 15], c: __m128i) -> __m128i {
        let mut b = _mm_xor_si128(c, k[0]);
        for rk in &k[1..14] {
            b = _mm_aesdec_si128(b, *rk);
        }
        _mm_aesdeclast_si128(b, k[14])
    }

    /// Single blocks with xmm AES-NI: the tails of the wide kernels.
    #[inline]
    #[target_feature(enable = "aes")]
    fn decrypt_tail(k: &[__m128i; 15], mut prev: __m128i, input: &[u8], out: &mut [u8]) {
        let src = input.as_chunks::<16>().0;
        let dst = out.as_chunks_mut::<16>().0;
        for (s, d) in src.iter().zip(dst) {
            let c = load128(s);
            store128(d, _mm_xor_si128(decrypt1(k, c), prev));
            prev = c;
        }
    }

    /// CBC decryption with AES-NI: 8 blocks in flight.
    #[target_feature(enable = "aes")]
    fn decrypt_aesni(dk: &RoundKeys, iv: &[u8; 16], input: &[u8], out: &mut [u8]) {
        const N: usize = 8;
        let k = load_keys(dk);
        let mut prev = load128(iv);
        let (src, src_tail) = input.as_chunks::<{ N * 16 }>();
        let (dst, dst_tail) = out.as_chunks_mut::<{ N * 16 }>();
        for (s, d) in src.iter().zip(dst) {
            let s = s.as_chunks::<16>().0;
            let d = d.as_chunks_mut::<16>().0;
            let mut c = [_mm_setzero_si128(); N];
            let mut b = [_mm_setzero_si128(); N];
            for j in 0..N {
                c[j] = load128(&s[j]);
                b[j] = _mm_xor_si128(c[j], k[0]);
            }
            for rk in &k[1..14] {
                for x in &mut b {
                    *x = _mm_aesdec_si128(*x, *rk);
                }
            }
            for j in 0..N {
                let p = if j == 0 { prev } else { c[j - 1] };
                store128(
                    &mut d[j],
                    _mm_xor_si128(_mm_aesdeclast_si128(b[j], k[14]), p),
                );
            }
            prev = c[N - 1];
        }
        decrypt_tail(&k, prev, src_tail, dst_tail);
    }

    /// CBC decryption with VAES on ymm registers: 2 blocks a register, 8 registers in flight.
    #[target_feature(enable = "vaes,avx2")]
    fn decrypt_vaes256(dk: &RoundKeys, iv: &[u8; 16], input: &[u8], out: &mut [u8]) {
        const N: usize = 8;
        let k = load_keys(dk);
        let kk = k.map(|x| _mm256_broadcastsi128_si256(x));
        let all_rounds = |b: &mut [__m256i], c: &[__m256i]| {
            for j in 0..b.len() {
                b[j] = _mm256_xor_si256(c[j], kk[0]);
            }
            for rk in &kk[1..14] {
                for x in b.iter_mut() {
                    *x = _mm256_aesdec_epi128(*x, *rk);
                }
            }
            for x in b.iter_mut() {
                *x = _mm256_aesdeclast_epi128(*x, kk[14]);
            }
        };
        // The previous ciphertext block sits in the high lane.
        let mut prev = _mm256_broadcastsi128_si256(load128(iv));
        let (src, rest) = input.as_chunks::<{ N * 32 }>();
        let (dst, dst_rest) = out.as_chunks_mut::<{ N * 32 }>();
        for (s, d) in src.iter().zip(dst) {
            let s = s.as_chunks::<32>().0;
            let d = d.as_chunks_mut::<32>().0;
            let mut c = [_mm256_setzero_si256(); N];
            for j in 0..N {
                c[j] = load256(&s[j]);
            }
            let mut b = [_mm256_setzero_si256(); N];
            all_rounds(&mut b, &c);
            for j in 0..N {
                let p =
                    _mm256_permute2x128_si256::<0x21>(if j == 0 { prev } else { c[j - 1] }, c[j]);
                store256(&mut d[j], _mm256_xor_si256(b[j], p));
            }
            prev = c[N - 1];
        }
        let (src, src_tail) = rest.as_chunks::<32>();
        let (dst, dst_tail) = dst_rest.as_chunks_mut::<32>();
        for (s, d) in src.iter().zip(dst) {
            let c = [load256(s)];
            let mut b = [_mm256_setzero_si256()];
            all_rounds(&mut b, &c);
            let p = _mm256_permute2x128_si256::<0x21>(prev, c[0]);
            store256(d, _mm256_xor_si256(b[0], p));
            prev = c[0];
        }
        decrypt_tail(&k, _mm256_extracti128_si256::<1>(prev), src_tail, dst_tail);
    }

    /// CBC decryption with VAES on zmm registers: 4 blocks a register, 4 registers in flight.
    #[target_feature(enable = "vaes,avx512f")]
    fn decrypt_vaes512(dk: &RoundKeys, iv: &[u8; 16], input: &[u8], out: &mut [u8]) {
        const N: usize = 4;
        let kk = load_keys(dk).map(|x| _mm512_broadcast_i32x4(x));
        let all_rounds = |b: &mut [__m512i], c: &[__m512i]| {
            for j in 0..b.len() {
                b[j] = _mm512_xor_si512(c[j], kk[0]);
            }
            for rk in &kk[1..14] {
                for x in b.iter_mut() {
                    *x = _mm512_aesdec_epi128(*x, *rk);
                }
            }
            for x in b.iter_mut() {
                *x = _mm512_aesdeclast_epi128(*x, kk[14]);
            }
        };
        // The previous ciphertext block sits in the high lane; `alignr` by six
        // quadwords shifts it in below the four blocks of the next register.
        let mut prev = _mm512_broadcast_i32x4(load128(iv));
        let (src, rest) = input.as_chunks::<{ N * 64 }>();
        let (dst, dst_rest) = out.as_chunks_mut::<{ N * 64 }>();
        for (s, d) in src.iter().zip(dst) {
            let s = s.as_chunks::<64>().0;
            let d = d.as_chunks_mut::<64>().0;
            let mut c = [_mm512_setzero_si512(); N];
            for j in 0..N {
                c[j] = load512(&s[j]);
            }
            let mut b = [_mm512_setzero_si512(); N];
            all_rounds(&mut b, &c);
            for j in 0..N {
                let p = _mm512_alignr_epi64::<6>(c[j], if j == 0 { prev } else { c[j - 1] });
                store512(&mut d[j], _mm512_xor_si512(b[j], p));
            }
            prev = c[N - 1];
        }
        let (src, src_tail) = rest.as_chunks::<64>();
        let (dst, dst_tail) = dst_rest.as_chunks_mut::<64>();
        for (s, d) in src.iter().zip(dst) {
            let c = [load512(s)];
            let mut b = [_mm512_setzero_si512()];
            all_rounds(&mut b, &c);
            store512(
                d,
                _mm512_xor_si512(b[0], _mm512_alignr_epi64::<6>(c[0], prev)),
            );
            prev = c[0];
        }
        // The last one to three blocks, with masked loads and stores.
        debug_assert_eq!(src_tail.len(), dst_tail.len());
        debug_assert!(src_tail.len() < 64 && src_tail.len().is_multiple_of(16));
        if !src_tail.is_empty() {
            let mask: __mmask16 = (1u16 << (src_tail.len() / 4)) - 1;
            // SAFETY: the mask covers the first `src_tail.len() / 4` dwords, that is
            // exactly `src_tail`; masked-off lanes are neither read nor faulted on.
            let c = unsafe { _mm512_maskz_loadu_epi32(mask, src_tail.as_ptr().cast()) };
            let mut b = [_mm512_setzero_si512()];
            all_rounds(&mut b, &[c]);
            let p = _mm512_alignr_epi64::<6>(c, prev);
            // SAFETY: `dst_tail` has the length of `src_tail`, so the same mask
            // writes exactly `dst_tail` and nothing past it.
            unsafe {
                _mm512_mask_storeu_epi32(
                    dst_tail.as_mut_ptr().cast(),
                    mask,
                    _mm512_xor_si512(b[0], p),
                )
            };
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::x86::Level;
    use super::*;
    use aes::Aes256;
    use cbc::cipher::array::Array;
    use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};

    type Block = Array<u8, aes::cipher::consts::U16>;

    /// splitmix64: reproducible test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn fill(&mut self, buf: &mut [u8]) {
            buf.iter_mut().for_each(|b| *b = self.next() as u8);
        }

        fn array<const N: usize>(&mut self) -> [u8; N] {
            let mut a = [0; N];
            self.fill(&mut a);
            a
        }
    }

    fn reference_encrypt(key: &[u8; 32], iv: &[u8; 16], data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let blocks = Block::slice_as_chunks_mut(&mut out).0;
        cbc::Encryptor::<Aes256>::new(key.into(), iv.into()).encrypt_blocks(blocks);
        out
    }

    fn reference_decrypt(key: &[u8; 32], iv: &[u8; 16], data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let blocks = Block::slice_as_chunks_mut(&mut out).0;
        cbc::Decryptor::<Aes256>::new(key.into(), iv.into()).decrypt_blocks(blocks);
        out
    }

    /// Every kernel this CPU runs, for one key.
    fn all_levels(key: &[u8; 32]) -> Vec<AesNi> {
        let keys: Vec<AesNi> = Level::ALL
            .iter()
            .filter_map(|level| AesNi::with_level(key, *level))
            .collect();
        assert!(!keys.is_empty(), "this CPU has no AES-NI: nothing tested");
        keys
    }

    #[test]
    fn detection_picks_a_supported_level() {
        let best = Level::detect().expect("AES-NI");
        assert!(best.supported());
        let key = [7u8; 32];
        assert_eq!(AesNi::new(&key).unwrap().level(), best);
        for level in Level::ALL {
            assert_eq!(AesNi::with_level(&key, level).is_some(), level.supported());
        }
        eprintln!("AES kernels: best level {best:?}");
    }

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn nist_sp800_38a_cbc_aes256() {
        // SP 800-38A F.2.5 (CBC-AES256.Encrypt) and F.2.6 (CBC-AES256.Decrypt).
        let key: [u8; 32] =
            unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let iv: [u8; 16] = unhex("000102030405060708090a0b0c0d0e0f");
        let plain = hex::decode(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51",
            "30c81c46a35ce411e5fbc1191a0a52ef",
            "f69f2445df4f9b17ad2b417be66c3710",
        ))
        .unwrap();
        let cipher = hex::decode(concat!(
            "f58c4c04d6e5f1ba779eabfb5f7bfbd6",
            "9cfc4e967edb808d679f777bc6702c7d",
            "39f23369a9d9bacfa530e26304231461",
            "b2eb05e2c39be9fcda6c19078c6a9d1b",
        ))
        .unwrap();
        for aes in all_levels(&key) {
            let mut enc = vec![0u8; 64];
            let mut dec = vec![0u8; 64];
            assert_eq!(aes.encrypt_cbc(&iv, &plain, &mut enc), cipher[48..]);
            assert_eq!(enc, cipher, "{:?}", aes.level());
            assert_eq!(aes.decrypt_cbc(&iv, &cipher, &mut dec), cipher[48..]);
            assert_eq!(dec, plain, "{:?}", aes.level());
            // Block by block, chaining through the returned values.
            let mut chain = iv;
            for i in 0..4 {
                let r = i * 16..i * 16 + 16;
                chain = aes.encrypt_cbc(&chain, &plain[r.clone()], &mut enc[r.clone()]);
            }
            assert_eq!(enc, cipher);
        }
    }

    #[test]
    fn fips197_c3_aes256_block() {
        // FIPS-197 C.3: one block, so CBC with a zero IV is the bare cipher.
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let plain: [u8; 16] = unhex("00112233445566778899aabbccddeeff");
        let cipher: [u8; 16] = unhex("8ea2b7ca516745bfeafc49904b496089");
        for aes in all_levels(&key) {
            let mut out = [0u8; 16];
            aes.encrypt_cbc(&[0; 16], &plain, &mut out);
            assert_eq!(out, cipher);
            aes.decrypt_cbc(&[0; 16], &cipher, &mut out);
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn key_expansion_matches_fips197_a3() {
        let key: [u8; 32] =
            unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        for aes in all_levels(&key) {
            assert_eq!(aes.round_key(0), key[..16]);
            assert_eq!(aes.round_key(1), key[16..]);
            // w[8..12], w[12..16] and w[56..60].
            assert_eq!(aes.round_key(2), unhex("9ba354118e6925afa51a8b5f2067fcde"));
            assert_eq!(aes.round_key(3), unhex("a8b09c1a93d194cdbe49846eb75d5b9a"));
            assert_eq!(aes.round_key(14), unhex("fe4890d1e6188d0b046df344706c631e"));
        }
    }

    #[test]
    fn matches_the_aes_and_cbc_crates() {
        let mut rng = Rng(0x6b65_6173);
        for blocks in 0..=300usize {
            let key: [u8; 32] = rng.array();
            let iv: [u8; 16] = rng.array();
            let mut data = vec![0u8; blocks * 16];
            rng.fill(&mut data);
            let want_enc = reference_encrypt(&key, &iv, &data);
            let want_dec = reference_decrypt(&key, &iv, &data);
            for aes in all_levels(&key) {
                let mut out = vec![0u8; data.len()];
                let chain = aes.encrypt_cbc(&iv, &data, &mut out);
                assert_eq!(out, want_enc, "encrypt {blocks} blocks, {:?}", aes.level());
                assert_eq!(chain[..], *want_enc.last_chunk::<16>().unwrap_or(&iv));
                let mut back = vec![0u8; data.len()];
                aes.decrypt_cbc(&iv, &out, &mut back);
                assert_eq!(back, data, "round trip {blocks} blocks, {:?}", aes.level());
                let chain = aes.decrypt_cbc(&iv, &data, &mut out);
                assert_eq!(out, want_dec, "decrypt {blocks} blocks, {:?}", aes.level());
                assert_eq!(chain[..], *data.last_chunk::<16>().unwrap_or(&iv));
            }
        }
    }

    #[test]
    fn streams_in_pieces() {
        let mut rng = Rng(0x6b6d_6921);
        let key: [u8; 32] = rng.array();
        let iv: [u8; 16] = rng.array();
        let mut data = vec![0u8; 16 * 300];
        rng.fill(&mut data);
        let want_enc = reference_encrypt(&key, &iv, &data);
        let want_dec = reference_decrypt(&key, &iv, &data);
        for aes in all_levels(&key) {
            for piece in [
                1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 299,
            ] {
                let mut enc = vec![0u8; data.len()];
                let mut dec = vec![0u8; data.len()];
                let (mut ce, mut cd) = (iv, iv);
                let mut at = 0;
                // Varying piece sizes: piece, piece+1, piece+2, piece, ...
                for n in (0..).map(|i| (piece + i % 3) * 16) {
                    if at == data.len() {
                        break;
                    }
                    let r = at..(at + n).min(data.len());
                    ce = aes.encrypt_cbc(&ce, &data[r.clone()], &mut enc[r.clone()]);
                    cd = aes.decrypt_cbc(&cd, &data[r.clone()], &mut dec[r.clone()]);
                    at = r.end;
                }
                assert_eq!(
                    enc,
                    want_enc,
                    "encrypt pieces of {piece}, {:?}",
                    aes.level()
                );
                assert_eq!(
                    dec,
                    want_dec,
                    "decrypt pieces of {piece}, {:?}",
                    aes.level()
                );
            }
        }
    }

    #[test]
    fn decryption_does_not_write_past_the_output() {
        let key = [3u8; 32];
        let data = [9u8; 16 * 19];
        for aes in all_levels(&key) {
            for blocks in 0..=19 {
                let mut out = vec![0xeeu8; 16 * 20];
                aes.decrypt_cbc(&[0; 16], &data[..blocks * 16], &mut out[..blocks * 16]);
                assert!(out[blocks * 16..].iter().all(|b| *b == 0xee));
                aes.encrypt_cbc(&[0; 16], &data[..blocks * 16], &mut out[..blocks * 16]);
                assert!(out[blocks * 16..].iter().all(|b| *b == 0xee));
            }
        }
    }

    /// `cargo test --release -- --ignored --nocapture kernel_speed`: every level, in cache.
    #[test]
    #[ignore]
    fn kernel_speed() {
        let data = vec![7u8; 16 * 1024];
        let mut out = vec![0u8; data.len()];
        for aes in all_levels(&[1; 32]) {
            for (name, decrypt) in [("encrypt", false), ("decrypt", true)] {
                let mut best = 0f64;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..20_000 {
                        match decrypt {
                            false => aes.encrypt_cbc(&[0; 16], &data, &mut out),
                            true => aes.decrypt_cbc(&[0; 16], &data, &mut out),
                        };
                    }
                    let rate = 20_000.0 * data.len() as f64 / t.elapsed().as_secs_f64();
                    best = best.max(rate / 1e9);
                }
                eprintln!("{:?} {name}: {best:.2} GB/s", aes.level());
            }
        }
    }

    #[test]
    #[should_panic(expected = "whole blocks")]
    fn partial_blocks_are_refused() {
        let aes = AesNi::new(&[0; 32]).unwrap();
        aes.decrypt_cbc(&[0; 16], &[0; 17], &mut [0; 17]);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn unequal_lengths_are_refused() {
        let aes = AesNi::new(&[0; 32]).unwrap();
        aes.encrypt_cbc(&[0; 16], &[0; 32], &mut [0; 16]);
    }
}
