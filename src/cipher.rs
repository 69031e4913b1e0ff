//! The data cipher: AES-256-CBC under a key derived from the DEK, for strings
//! (PKCS#7, caller-supplied IV) and for the chunked file stream format.

use aes::Aes256;
use cbc::cipher::array::Array;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, InnerIvInit, KeyInit};
use md5::{Digest, Md5};
use zeroize::Zeroizing;

use crate::aesni::AesNi;
use crate::errors::{KmiError, KmiResult};

pub const BLOCK: usize = 16;
/// Inputs from this size on are decrypted on several cores.
const PARALLEL_DECRYPT_BYTES: usize = 4 << 20;
/// File stream header: original size (`<Q`) and the random IV.
pub const FILE_HEADER: usize = 8 + BLOCK;

type Block = Array<u8, aes::cipher::consts::U16>;

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

fn as_blocks(buf: &[u8]) -> &[Block] {
    Block::slice_as_chunks(buf).0
}

fn as_blocks_mut(buf: &mut [u8]) -> &mut [Block] {
    Block::slice_as_chunks_mut(buf).0
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

/// The key schedule: for the AES-NI/VAES kernels when the CPU has AES-NI,
/// else for the `aes` crate (software, or its own detection) with `cbc`.
#[derive(Clone)]
// Off x86-64 `Fast` holds an uninhabited type, so the variants differ in size.
#[cfg_attr(not(target_arch = "x86_64"), allow(clippy::large_enum_variant))]
enum Engine {
    Fast(AesNi),
    Soft(Aes256),
}

/// An expanded AES-256 key: expensive to build, cheap to clone, zeroized on drop.
#[derive(Clone)]
pub struct DataCipher {
    engine: Engine,
}

impl DataCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        let engine = match AesNi::new(key) {
            Some(fast) => Engine::Fast(fast),
            None => Engine::Soft(Aes256::new(key.into())),
        };
        DataCipher { engine }
    }

    /// The `aes`/`cbc` crate path regardless of the CPU, to test the two against each other.
    #[cfg(test)]
    fn soft(key: &[u8; 32]) -> Self {
        DataCipher {
            engine: Engine::Soft(Aes256::new(key.into())),
        }
    }

    /// CBC-encrypt whole blocks of `input` into `out` (the same length) from
    /// chaining value `chain`; returns the next chaining value.
    fn encrypt_blocks(&self, chain: &[u8; BLOCK], input: &[u8], out: &mut [u8]) -> [u8; BLOCK] {
        match &self.engine {
            Engine::Fast(keys) => keys.encrypt_cbc(chain, input, out),
            Engine::Soft(aes) => {
                cbc::Encryptor::inner_iv_init(aes.clone(), &Block::from(*chain))
                    .encrypt_blocks_b2b(as_blocks(input), as_blocks_mut(out))
                    .expect("equal lengths");
                last_or(out, chain)
            }
        }
    }

    /// CBC-decrypt whole blocks of `input` into `out` (the same length) from
    /// chaining value `chain`; returns the next chaining value.
    fn decrypt_blocks(&self, chain: &[u8; BLOCK], input: &[u8], out: &mut [u8]) -> [u8; BLOCK] {
        match &self.engine {
            Engine::Fast(keys) => keys.decrypt_cbc(chain, input, out),
            Engine::Soft(aes) => {
                cbc::Decryptor::inner_iv_init(aes.clone(), &Block::from(*chain))
                    .decrypt_blocks_b2b(as_blocks(input), as_blocks_mut(out))
                    .expect("equal lengths");
                last_or(input, chain)
            }
        }
    }

    /// CBC decryption of whole blocks, split across cores for large inputs:
    /// each block needs only its own ciphertext and the one before it, so
    /// every part starts from the ciphertext block preceding it. The output
    /// is the same as `decrypt_blocks`.
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
        let part = input.len().div_ceil(threads).next_multiple_of(BLOCK);
        let (in_first, in_rest) = input.split_at(part);
        let (out_first, out_rest) = out.split_at_mut(part);
        std::thread::scope(|scope| {
            for (i, (inp, outp)) in in_rest
                .chunks(part)
                .zip(out_rest.chunks_mut(part))
                .enumerate()
            {
                let start = part * (i + 1);
                let iv: [u8; BLOCK] = input[start - BLOCK..start].try_into().expect("one block");
                scope.spawn(move || self.decrypt_blocks(&iv, inp, outp));
            }
            // The calling thread takes the first part.
            self.decrypt_blocks(chain, in_first, out_first);
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

    #[test]
    fn the_fast_kernels_match_the_aes_crate_path() {
        let key = derive_cipher_key(b"another dek", b"87654321").unwrap();
        let (fast, soft) = (DataCipher::new(&key), DataCipher::soft(&key));
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 + i / 7) as u8).collect();
        for len in (0..300).chain([1000, 4095, 4096, 4097, 5000]) {
            let enc = fast.encrypt(IV, &data[..len]).unwrap();
            assert_eq!(enc, soft.encrypt(IV, &data[..len]).unwrap(), "{len}");
            assert_eq!(soft.decrypt(IV, &enc).unwrap(), &data[..len]);
            assert_eq!(fast.decrypt(IV, &enc).unwrap(), &data[..len]);
            for piece in [1, 16, 100, 1 << 20] {
                let file = encrypt_stream(&fast, &data[..len], piece);
                assert_eq!(file, encrypt_stream(&soft, &data[..len], piece + 3));
                assert_eq!(decrypt_stream(&soft, &file, piece).unwrap(), &data[..len]);
                assert_eq!(
                    decrypt_stream(&fast, &file, piece + 5).unwrap(),
                    &data[..len]
                );
            }
        }
        let mut bad = fast.encrypt(IV, &data[..100]).unwrap();
        bad[111] ^= 1;
        assert!(fast.decrypt(IV, &bad).is_err() && soft.decrypt(IV, &bad).is_err());
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
        for len in [PARALLEL_DECRYPT_BYTES, PARALLEL_DECRYPT_BYTES * 3 + 17] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let enc = c.encrypt(IV, &plain).unwrap();
            assert_eq!(c.decrypt(IV, &enc).unwrap(), plain);
        }
    }
}
