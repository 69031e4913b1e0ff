//! The data cipher: AES-256-CBC under a key derived from the DEK, for strings
//! (PKCS#7, caller-supplied IV) and for the chunked file stream format.
//!
//! AES is the `aes` crate, which picks its VAES-512, VAES-256, AES-NI or
//! constant-time software backend at run time. This file only chains blocks
//! (CBC's XORs) around that backend, through the crate's closure interface,
//! instead of going through `cbc::Encryptor`/`Decryptor`: those keep the
//! chaining value in memory, which puts a store and a reload on encryption's
//! dependency chain (0.97 against 1.12 GB/s), and copy each batch of blocks
//! twice when decrypting (14 against 23 GB/s on one core, in cache; a one-off
//! comparison on the VAES-512 backend, 2026-12-01). The legacy PEM ciphers
//! use `cbc` as is. `examples/cipher_speed.rs` measures this file's speed.

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::inout::{InOut, InOutBuf};
use aes::cipher::typenum::Unsigned;
use aes::cipher::{
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit, ParBlocks,
};
use aes::Aes256;
use md5::{Digest, Md5};
use zeroize::Zeroizing;

use crate::errors::{KmiError, KmiResult};

pub const BLOCK: usize = 16;
/// Inputs from this size on are decrypted on several cores,
const PARALLEL_DECRYPT_BYTES: usize = 4 << 20;
/// in parts of this size (a multiple of the block size).
const PARALLEL_PART_BYTES: usize = 2 << 20;
/// File stream header: original size (`<Q`) and the random IV.
pub const FILE_HEADER: usize = 8 + BLOCK;

type Block = Array<u8, U16>;

/// The 32-byte AES key: `md5(dek+salt) + md5(md5(dek+salt) + dek + salt)`.
pub fn derive_cipher_key(dek: &[u8], salt: &[u8]) -> KmiResult<Zeroizing<[u8; 32]>> {
    if salt.len() != 8 {
        return Err(KmiError::BadArgument(format!(
            "_bytesToKeySalt must be 8 bytes, not {}",
            salt.len()
        )));
    }
    let d1: [u8; 16] = Md5::new()
        .chain_update(dek)
        .chain_update(salt)
        .finalize()
        .into();
    let d2: [u8; 16] = Md5::new()
        .chain_update(d1)
        .chain_update(dek)
        .chain_update(salt)
        .finalize()
        .into();
    let mut key = Zeroizing::new([0u8; 32]);
    key[..16].copy_from_slice(&d1);
    key[16..].copy_from_slice(&d2);
    Ok(key)
}

/// `input` and `out` as blocks; CBC works on whole blocks of equal-length buffers.
fn block_pair<'a, 'b>(input: &'a [u8], out: &'b mut [u8]) -> (&'a [Block], &'b mut [Block]) {
    assert_eq!(
        input.len(),
        out.len(),
        "CBC input and output lengths differ"
    );
    assert!(
        input.len().is_multiple_of(BLOCK),
        "CBC input is not whole blocks"
    );
    (
        Block::slice_as_chunks(input).0,
        Block::slice_as_chunks_mut(out).0,
    )
}

fn iv_block(iv: &[u8]) -> KmiResult<[u8; BLOCK]> {
    <[u8; BLOCK]>::try_from(iv).map_err(|_| {
        KmiError::BadArgument(format!(
            "initializationVector must be 16 bytes, not {}",
            iv.len()
        ))
    })
}

/// The last block of `blocks`, or `chain` when there is none: the next CBC chaining value.
fn last_or(blocks: &[u8], chain: &[u8; BLOCK]) -> [u8; BLOCK] {
    *blocks.last_chunk::<BLOCK>().unwrap_or(chain)
}

#[inline(always)]
fn xor_into(block: &mut Block, with: &Block) {
    for i in 0..BLOCK {
        block[i] ^= with[i];
    }
}

/// CBC encryption on the `aes` crate's backend: `out[i] = E(input[i] ^ out[i - 1])`,
/// with `chain` before the first block and the last ciphertext block left in it.
struct CbcEncrypt<'a> {
    chain: &'a mut Block,
    input: &'a [Block],
    out: &'a mut [Block],
}

impl BlockSizeUser for CbcEncrypt<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for CbcEncrypt<'_> {
    // Inlined into the backend's `#[target_feature]` function, so that the
    // chaining value stays in a register from one block to the next.
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        let mut chain = *self.chain;
        for (plain, out) in self.input.iter().zip(self.out.iter_mut()) {
            xor_into(&mut chain, plain);
            backend.encrypt_block_inplace(&mut chain);
            *out = chain;
        }
        *self.chain = chain;
    }
}

/// CBC decryption on the `aes` crate's backend: `out[i] = D(input[i]) ^ input[i - 1]`,
/// with `chain` before the first block and the last ciphertext block left in it.
/// Blocks go through the backend as many at a time as it takes (64 with VAES-512).
struct CbcDecrypt<'a> {
    chain: &'a mut Block,
    input: &'a [Block],
    out: &'a mut [Block],
}

impl BlockSizeUser for CbcDecrypt<'_> {
    type BlockSize = U16;
}

/// XOR the decrypted blocks `out`, which are blocks `start..` of `input`,
/// with the ciphertext block before each (`chain` before block 0).
///
/// The XOR runs over `input` shifted back by one block, so that `out` is read
/// in the alignment the backend has just written it in; reading `out` shifted
/// instead (each block with the input block of the same batch before it)
/// made decryption a quarter slower, 22 against 30 GB/s on one core in cache.
/// The XOR is a loop over bytes, which inlines into the backend's function
/// and vectorizes there (an iterator chain over blocks was left out of line,
/// and spilled the round keys around a call for every batch).
#[inline(always)]
fn unchain(out: &mut [Block], input: &[Block], start: usize, chain: &Block) {
    if out.is_empty() {
        return;
    }
    let (out, start) = match start {
        0 => {
            let (first, rest) = out.split_first_mut().expect("not empty");
            xor_into(first, chain);
            (rest, 1)
        }
        _ => (out, start),
    };
    let previous = &input[start - 1..start - 1 + out.len()];
    let (out, previous) = (
        Block::slice_as_flattened_mut(out),
        Block::slice_as_flattened(previous),
    );
    for (o, p) in out.iter_mut().zip(previous) {
        *o ^= p;
    }
}

impl BlockCipherDecClosure for CbcDecrypt<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        let CbcDecrypt { chain, input, out } = self;
        let batch = B::ParBlocksSize::USIZE;
        let (in_batches, in_tail) = ParBlocks::<B>::slice_as_chunks(input);
        let (out_batches, out_tail) = ParBlocks::<B>::slice_as_chunks_mut(out);
        for (i, (batch_in, batch_out)) in in_batches.iter().zip(out_batches).enumerate() {
            backend.decrypt_par_blocks(InOut::from((batch_in, &mut *batch_out)));
            unchain(batch_out, input, i * batch, chain);
        }
        backend.decrypt_tail_blocks(InOutBuf::new(in_tail, out_tail).expect("equal lengths"));
        unchain(out_tail, input, in_batches.len() * batch, chain);
        if let Some(last) = input.last() {
            *chain = *last;
        }
    }
}

/// An expanded AES-256 key: expensive to build, cheap to clone, zeroized on
/// drop (the `aes` crate's `zeroize` feature).
#[derive(Clone)]
pub struct DataCipher {
    aes: Aes256,
}

impl DataCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        DataCipher {
            aes: Aes256::new(key.into()),
        }
    }

    /// CBC-encrypt whole blocks of `input` into `out` (the same length) from
    /// chaining value `chain`; returns the next chaining value.
    fn encrypt_blocks(&self, chain: &[u8; BLOCK], input: &[u8], out: &mut [u8]) -> [u8; BLOCK] {
        let (input, out) = block_pair(input, out);
        let mut chain = Block::from(*chain);
        self.aes.encrypt_with_backend(CbcEncrypt {
            chain: &mut chain,
            input,
            out,
        });
        chain.into()
    }

    /// CBC-decrypt whole blocks of `input` into `out` (the same length) from
    /// chaining value `chain`; returns the next chaining value.
    fn decrypt_blocks(&self, chain: &[u8; BLOCK], input: &[u8], out: &mut [u8]) -> [u8; BLOCK] {
        let (input, out) = block_pair(input, out);
        let mut chain = Block::from(*chain);
        self.aes.decrypt_with_backend(CbcDecrypt {
            chain: &mut chain,
            input,
            out,
        });
        chain.into()
    }

    /// CBC decryption of whole blocks, split across cores for large inputs:
    /// each block needs only its own ciphertext and the one before it, so
    /// every part starts from the ciphertext block preceding it. The output
    /// is the same as `decrypt_blocks`.
    ///
    /// The parts are small and go, in order, to whichever thread is free: a
    /// thread that the scheduler holds back (another process on its core)
    /// then delays only the part it holds, not half of the work.
    fn decrypt_blocks_parallel(&self, chain: &[u8; BLOCK], input: &[u8], out: &mut [u8]) {
        if input.len() < PARALLEL_DECRYPT_BYTES {
            self.decrypt_blocks(chain, input, out);
            return;
        }
        // Asked once: the call reads cgroup files and costs microseconds.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = *CORES
            .get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)));
        if threads < 2 {
            self.decrypt_blocks(chain, input, out);
            return;
        }
        let parts = std::sync::Mutex::new(
            input
                .chunks(PARALLEL_PART_BYTES)
                .zip(out.chunks_mut(PARALLEL_PART_BYTES))
                .enumerate(),
        );
        let work = || loop {
            let next = parts.lock().expect("no panic while held").next();
            let Some((i, (part_in, part_out))) = next else {
                return;
            };
            let start = i * PARALLEL_PART_BYTES;
            let iv = match start {
                0 => *chain,
                _ => input[start - BLOCK..start].try_into().expect("one block"),
            };
            self.decrypt_blocks(&iv, part_in, part_out);
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work(); // the calling thread works too
        });
    }

    /// Length of `encrypt`'s output for `n` plaintext bytes (PKCS#7 always adds 1..=16).
    pub fn padded_len(n: usize) -> usize {
        (n / BLOCK + 1) * BLOCK
    }

    /// PKCS#7-pad and encrypt `plain` into `out`, which must be `padded_len(plain.len())` long.
    pub fn encrypt_into(&self, iv: &[u8], plain: &[u8], out: &mut [u8]) -> KmiResult<()> {
        let iv = iv_block(iv)?;
        debug_assert_eq!(out.len(), Self::padded_len(plain.len()));
        let full = plain.len() / BLOCK * BLOCK;
        let pad = (out.len() - plain.len()) as u8;
        let chain = self.encrypt_blocks(&iv, &plain[..full], &mut out[..full]);
        let mut last = [pad; BLOCK];
        last[..plain.len() - full].copy_from_slice(&plain[full..]);
        self.encrypt_blocks(&chain, &last, &mut out[full..]);
        Ok(())
    }

    pub fn encrypt(&self, iv: &[u8], plain: &[u8]) -> KmiResult<Vec<u8>> {
        let mut out = vec![0u8; Self::padded_len(plain.len())];
        self.encrypt_into(iv, plain, &mut out)?;
        Ok(out)
    }

    /// Decrypt the last block alone to learn the plaintext length, checking
    /// the ciphertext length and the PKCS#7 padding on the way.
    pub fn plaintext_len(&self, iv: &[u8], data: &[u8]) -> KmiResult<usize> {
        let last = self.last_block(iv, data)?;
        let n = last[BLOCK - 1] as usize;
        let padding_ok =
            (1..=BLOCK).contains(&n) && last[BLOCK - n..].iter().all(|b| *b as usize == n);
        if !padding_ok {
            return Err(KmiError::bad_data(
                "bad padding: the data is not encrypted with this key, or is corrupt",
            ));
        }
        Ok(data.len() - n)
    }

    fn last_block(&self, iv: &[u8], data: &[u8]) -> KmiResult<[u8; BLOCK]> {
        let iv = iv_block(iv)?;
        if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
            return Err(KmiError::bad_data(format!(
                "ciphertext length {} is not a positive multiple of 16",
                data.len()
            )));
        }
        let full = data.len() - BLOCK;
        let chain = last_or(&data[..full], &iv);
        let mut last = [0u8; BLOCK];
        self.decrypt_blocks(&chain, &data[full..], &mut last);
        Ok(last)
    }

    /// Decrypt into `out`, which must be `plaintext_len(iv, data)` long, so the
    /// plaintext is written once, straight into its final buffer.
    pub fn decrypt_into(&self, iv: &[u8], data: &[u8], out: &mut [u8]) -> KmiResult<()> {
        let last = self.last_block(iv, data)?;
        let full = data.len() - BLOCK;
        debug_assert!(out.len() >= full && out.len() <= data.len());
        self.decrypt_blocks_parallel(&iv_block(iv)?, &data[..full], &mut out[..full]);
        let rest = out.len() - full;
        out[full..].copy_from_slice(&last[..rest]);
        Ok(())
    }

    pub fn decrypt(&self, iv: &[u8], data: &[u8]) -> KmiResult<Vec<u8>> {
        let mut out = vec![0u8; self.plaintext_len(iv, data)?];
        self.decrypt_into(iv, data, &mut out)?;
        Ok(out)
    }

    pub fn file_encryptor(&self, iv: &[u8]) -> KmiResult<FileEncryptor> {
        Ok(FileEncryptor {
            chain: iv_block(iv)?,
            cipher: self.clone(),
            tail: Vec::with_capacity(BLOCK),
            size: 0,
        })
    }

    /// A decryptor for a stream whose 24-byte header has been read.
    pub fn file_decryptor(&self, header: &[u8]) -> KmiResult<FileDecryptor> {
        if header.len() != FILE_HEADER {
            return Err(KmiError::bad_data(format!(
                "encrypted file is truncated: {} of {FILE_HEADER} header bytes",
                header.len()
            )));
        }
        let size = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        Ok(FileDecryptor {
            chain: iv_block(&header[8..])?,
            cipher: self.clone(),
            size,
            written: 0,
            tail: Vec::with_capacity(BLOCK),
        })
    }
}

/// Streaming encryption for the file format: whole blocks as they come, the
/// final partial block padded with spaces.
pub struct FileEncryptor {
    cipher: DataCipher,
    /// The CBC chaining value: the last ciphertext block so far, or the IV.
    chain: [u8; BLOCK],
    tail: Vec<u8>,
    size: u64,
}

impl FileEncryptor {
    /// Encrypt as much of `data` as makes whole blocks, appending ciphertext to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        self.size += data.len() as u64;
        if !self.tail.is_empty() {
            let take = (BLOCK - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() < BLOCK {
                return;
            }
            self.encrypt_tail(out);
        }
        let full = data.len() / BLOCK * BLOCK;
        let start = out.len();
        out.resize(start + full, 0);
        self.chain = self
            .cipher
            .encrypt_blocks(&self.chain, &data[..full], &mut out[start..]);
        self.tail.extend_from_slice(&data[full..]);
    }

    /// Encrypt the (full) held-back block and empty it.
    fn encrypt_tail(&mut self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + BLOCK, 0);
        self.chain = self
            .cipher
            .encrypt_blocks(&self.chain, &self.tail, &mut out[start..]);
        self.tail.clear();
    }

    /// Pad the last partial block with spaces; returns the plaintext size for the header.
    pub fn finish(mut self, out: &mut Vec<u8>) -> u64 {
        if !self.tail.is_empty() {
            self.tail.resize(BLOCK, b' ');
            self.encrypt_tail(out);
        }
        self.size
    }
}

/// Streaming decryption for the file format. It holds back the final block
/// until the end of the stream so that it can check the length and the padding.
pub struct FileDecryptor {
    cipher: DataCipher,
    /// The CBC chaining value: the last ciphertext block so far, or the IV.
    chain: [u8; BLOCK],
    size: u64,
    written: u64,
    tail: Vec<u8>,
}

impl FileDecryptor {
    /// The ciphertext length the header promises (u128: a corrupt header may say 2^64 - 1).
    fn padded_size(&self) -> u128 {
        u128::from(self.size).div_ceil(BLOCK as u128) * BLOCK as u128
    }

    /// Decrypt whole blocks of `data`, appending at most the declared size of plaintext to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        if !self.tail.is_empty() {
            let take = (BLOCK - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.tail.len() < BLOCK {
                return Ok(());
            }
            let block = std::mem::take(&mut self.tail);
            self.decrypt_blocks(&block, out)?;
            self.tail = block;
            self.tail.clear();
        }
        let full = data.len() / BLOCK * BLOCK;
        self.decrypt_blocks(&data[..full], out)?;
        self.tail.extend_from_slice(&data[full..]);
        Ok(())
    }

    fn decrypt_blocks(&mut self, data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        // Whole blocks past the stated size are ignored, as keas.kmi always
        // did: encrypt_file over a longer old file, not truncated, leaves the
        // old tail there. (A length that is no whole number of blocks, or a
        // stream shorter than its size, is still an error: see `finish`.)
        let seen = u128::from(self.written).div_ceil(BLOCK as u128) * BLOCK as u128;
        let room = self.padded_size().saturating_sub(seen);
        let data = &data[..(data.len() as u128).min(room) as usize];
        if data.is_empty() {
            return Ok(());
        }
        let start = out.len();
        out.resize(start + data.len(), 0);
        self.chain = self
            .cipher
            .decrypt_blocks(&self.chain, data, &mut out[start..]);
        let keep = (self.size - self.written).min(data.len() as u64) as usize;
        let pad = &out[start + keep..];
        if !pad.iter().all(|b| *b == b' ') {
            out.truncate(start);
            return Err(KmiError::bad_data(
                "encrypted file has bad padding: wrong key, or corrupt",
            ));
        }
        out.truncate(start + keep);
        self.written += keep as u64;
        Ok(())
    }

    /// Check that the stream ended exactly where its header said.
    pub fn finish(self) -> KmiResult<()> {
        if !self.tail.is_empty() {
            return Err(KmiError::bad_data(format!(
                "encrypted file is truncated: {} stray bytes after the last whole block",
                self.tail.len()
            )));
        }
        if self.written != self.size {
            return Err(KmiError::bad_data(format!(
                "encrypted file is truncated: {} of {} bytes present",
                self.written, self.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IV: &[u8] = b"0123456789ABCDEF";

    fn cipher() -> DataCipher {
        DataCipher::new(&derive_cipher_key(b"some dek", b"12345678").unwrap())
    }

    #[test]
    fn derived_key_matches_the_formula() {
        let k = derive_cipher_key(b"dek", b"12345678").unwrap();
        let d1: [u8; 16] = Md5::digest(b"dek12345678").into();
        let mut second = d1.to_vec();
        second.extend_from_slice(b"dek12345678");
        let d2: [u8; 16] = Md5::digest(&second).into();
        assert_eq!(&k[..16], &d1);
        assert_eq!(&k[16..], &d2);
        assert!(derive_cipher_key(b"dek", b"short").is_err());
    }

    #[test]
    fn matches_openssl_aes_256_cbc() {
        // printf 'Stephan Richter' | openssl enc -aes-256-cbc -K 00..1f -iv 30..46 | xxd -p
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let c = DataCipher::new(&key)
            .encrypt(IV, b"Stephan Richter")
            .unwrap();
        assert_eq!(hex::encode(&c), "8d231279e1fa7ac07fdc1384a4aa22ce");
    }

    #[test]
    fn string_round_trip_and_lengths() {
        let c = cipher();
        for n in 0..70 {
            let plain: Vec<u8> = (0..n as u8).collect();
            let enc = c.encrypt(IV, &plain).unwrap();
            assert_eq!(enc.len(), 16 * (n / 16 + 1));
            assert_eq!(c.decrypt(IV, &enc).unwrap(), plain);
        }
    }

    #[test]
    fn bad_ciphertexts_are_errors() {
        let c = cipher();
        assert!(c.decrypt(IV, b"").is_err());
        assert!(c.decrypt(IV, &[0u8; 15]).is_err());
        let enc = c.encrypt(IV, b"hello").unwrap();
        let mut bad = enc.clone();
        bad[15] ^= 1;
        assert!(c.decrypt(IV, &bad).is_err());
    }

    fn encrypt_stream(c: &DataCipher, data: &[u8], piece: usize) -> Vec<u8> {
        let mut e = c.file_encryptor(IV).unwrap();
        let mut out = Vec::new();
        for chunk in data.chunks(piece.max(1)) {
            e.update(chunk, &mut out);
        }
        let size = e.finish(&mut out);
        let mut file = size.to_le_bytes().to_vec();
        file.extend_from_slice(IV);
        file.extend_from_slice(&out);
        file
    }

    fn decrypt_stream(c: &DataCipher, file: &[u8], piece: usize) -> KmiResult<Vec<u8>> {
        let mut d = c.file_decryptor(&file[..FILE_HEADER.min(file.len())])?;
        let mut out = Vec::new();
        for chunk in file[FILE_HEADER..].chunks(piece.max(1)) {
            d.update(chunk, &mut out)?;
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn file_stream_is_independent_of_read_sizes() {
        let c = cipher();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for len in [0, 1, 15, 16, 17, 999, 1000] {
            let reference = encrypt_stream(&c, &data[..len], 1 << 20);
            assert_eq!(reference.len(), FILE_HEADER + len.div_ceil(16) * 16);
            for piece in [1, 5, 16, 33] {
                assert_eq!(encrypt_stream(&c, &data[..len], piece), reference);
                assert_eq!(decrypt_stream(&c, &reference, piece).unwrap(), &data[..len]);
            }
        }
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
        let c = DataCipher::new(&key);
        let (mut enc, mut dec) = (vec![0u8; 64], vec![0u8; 64]);
        assert_eq!(c.encrypt_blocks(&iv, &plain, &mut enc), cipher[48..]);
        assert_eq!(enc, cipher);
        assert_eq!(c.decrypt_blocks(&iv, &cipher, &mut dec), cipher[48..]);
        assert_eq!(dec, plain);
        // Block by block, chaining through the returned values.
        let (mut ce, mut cd) = (iv, iv);
        for i in 0..4 {
            let r = i * 16..i * 16 + 16;
            ce = c.encrypt_blocks(&ce, &plain[r.clone()], &mut enc[r.clone()]);
            cd = c.decrypt_blocks(&cd, &cipher[r.clone()], &mut dec[r.clone()]);
        }
        assert_eq!((enc, dec), (cipher, plain));
    }

    #[test]
    fn fips197_c3_aes256_block() {
        // FIPS-197 C.3: one block, so CBC with a zero IV is the bare cipher.
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let plain: [u8; 16] = unhex("00112233445566778899aabbccddeeff");
        let cipher: [u8; 16] = unhex("8ea2b7ca516745bfeafc49904b496089");
        let c = DataCipher::new(&key);
        let mut out = [0u8; 16];
        c.encrypt_blocks(&[0; 16], &plain, &mut out);
        assert_eq!(out, cipher);
        c.decrypt_blocks(&[0; 16], &cipher, &mut out);
        assert_eq!(out, plain);
    }

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

    /// The `cbc` crate over the same `aes` crate: an independent CBC to check ours against.
    fn cbc_crate(decrypt: bool, key: &[u8; 32], iv: &[u8; 16], data: &[u8]) -> Vec<u8> {
        use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
        let mut out = data.to_vec();
        let blocks = Block::slice_as_chunks_mut(&mut out).0;
        match decrypt {
            false => cbc::Encryptor::<Aes256>::new(key.into(), iv.into()).encrypt_blocks(blocks),
            true => cbc::Decryptor::<Aes256>::new(key.into(), iv.into()).decrypt_blocks(blocks),
        }
        out
    }

    #[test]
    fn chaining_matches_the_cbc_crate() {
        // Every length up to 300 blocks: below, at and across the backend's
        // batches of blocks (64 with VAES-512, 8 with AES-NI), with a tail.
        let mut rng = Rng(0x6b65_6173);
        for blocks in 0..=300usize {
            let key: [u8; 32] = rng.array();
            let iv: [u8; 16] = rng.array();
            let mut data = vec![0u8; blocks * 16];
            rng.fill(&mut data);
            let c = DataCipher::new(&key);
            let mut out = vec![0u8; data.len()];
            let chain = c.encrypt_blocks(&iv, &data, &mut out);
            let want = cbc_crate(false, &key, &iv, &data);
            assert_eq!(out, want, "encrypt {blocks} blocks");
            assert_eq!(chain, last_or(&want, &iv));
            let chain = c.decrypt_blocks(&iv, &data, &mut out);
            assert_eq!(
                out,
                cbc_crate(true, &key, &iv, &data),
                "decrypt {blocks} blocks"
            );
            assert_eq!(chain, last_or(&data, &iv));
        }
    }

    #[test]
    fn chaining_carries_across_pieces() {
        let mut rng = Rng(0x6b6d_6921);
        let key: [u8; 32] = rng.array();
        let iv: [u8; 16] = rng.array();
        let mut data = vec![0u8; 16 * 300];
        rng.fill(&mut data);
        let c = DataCipher::new(&key);
        let want_enc = cbc_crate(false, &key, &iv, &data);
        let want_dec = cbc_crate(true, &key, &iv, &data);
        for piece in [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128, 129, 299] {
            let (mut enc, mut dec) = (vec![0u8; data.len()], vec![0u8; data.len()]);
            let (mut ce, mut cd) = (iv, iv);
            let mut at = 0;
            // Varying piece sizes: piece, piece+1, piece+2, piece, ...
            for n in (0..).map(|i| (piece + i % 3) * 16) {
                if at == data.len() {
                    break;
                }
                let r = at..(at + n).min(data.len());
                ce = c.encrypt_blocks(&ce, &data[r.clone()], &mut enc[r.clone()]);
                cd = c.decrypt_blocks(&cd, &data[r.clone()], &mut dec[r.clone()]);
                at = r.end;
            }
            assert_eq!(enc, want_enc, "encrypt in pieces of {piece} blocks");
            assert_eq!(dec, want_dec, "decrypt in pieces of {piece} blocks");
        }
    }

    #[test]
    fn nothing_is_written_past_the_output() {
        let c = DataCipher::new(&[3u8; 32]);
        let data = [9u8; 16 * 70];
        for blocks in 0..=70 {
            let n = blocks * 16;
            let mut out = vec![0xeeu8; 16 * 71];
            c.decrypt_blocks(&[0; 16], &data[..n], &mut out[..n]);
            assert!(out[n..].iter().all(|b| *b == 0xee));
            c.encrypt_blocks(&[0; 16], &data[..n], &mut out[..n]);
            assert!(out[n..].iter().all(|b| *b == 0xee));
        }
    }

    #[test]
    #[should_panic(expected = "whole blocks")]
    fn partial_blocks_are_refused() {
        cipher().decrypt_blocks(&[0; 16], &[0; 17], &mut [0; 17]);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn unequal_lengths_are_refused() {
        cipher().encrypt_blocks(&[0; 16], &[0; 32], &mut [0; 16]);
    }

    #[test]
    fn damaged_file_streams_are_errors() {
        let c = cipher();
        let file = encrypt_stream(&c, b"some file content", 7);
        assert!(decrypt_stream(&c, &file[..file.len() - 1], 5).is_err());
        assert!(decrypt_stream(&c, &file[..file.len() - 16], 5).is_err());
        // Whole blocks after the stated size are an old file's tail: ignored.
        let mut longer = file.clone();
        longer.extend_from_slice(&[0u8; 32]);
        assert_eq!(
            decrypt_stream(&c, &longer, 5).unwrap(),
            b"some file content"
        );
        longer.push(0);
        assert!(decrypt_stream(&c, &longer, 5).is_err(), "not a whole block");
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        assert!(decrypt_stream(&c, &bad, 5).is_err());
        assert!(c.file_decryptor(&file[..10]).is_err());
        // Found by fuzz/file_stream: a size near 2^64 overflowed the length check.
        let mut huge = file.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decrypt_stream(&c, &huge, 5).is_err());
    }

    #[test]
    fn parallel_decryption_matches_serial() {
        let c = cipher();
        // Below the threshold, at it, and a last part shorter than the others.
        for len in [
            PARALLEL_DECRYPT_BYTES - BLOCK,
            PARALLEL_DECRYPT_BYTES,
            PARALLEL_DECRYPT_BYTES + 3 * PARALLEL_PART_BYTES + 5 * BLOCK,
        ] {
            let mut data = vec![0u8; len];
            Rng(len as u64).fill(&mut data);
            let iv: [u8; 16] = Rng(7).array();
            let (mut serial, mut parallel) = (vec![0u8; len], vec![0u8; len]);
            c.decrypt_blocks(&iv, &data, &mut serial);
            c.decrypt_blocks_parallel(&iv, &data, &mut parallel);
            assert!(serial == parallel, "{len} bytes");
            let plain = &data[..len - 17];
            assert_eq!(
                c.decrypt(IV, &c.encrypt(IV, plain).unwrap()).unwrap(),
                plain
            );
        }
    }
}
