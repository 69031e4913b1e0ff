//! The v2 authenticated data format (FORMATS.md section 7): a 26-byte prefix
//! naming the DEK, then a C2SP chunked-encryption v1 message with SHA-256 and
//! AES-256-GCM. One format for `encrypt` output, file streams and ZODB states.
//!
//! A message key, base nonce and key commitment are derived per message from
//! a fresh salt; the commitment binds the DEK, the prefix and the caller's
//! associated data. The plaintext is cut into 16 KiB chunks, each sealed on
//! its own (so large inputs are sealed and opened on several cores), and the
//! final chunk is always shorter than 16 KiB, so that a stream cut at a chunk
//! boundary, extended or reordered does not open.

use std::ops::Range;

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::errors::{KmiError, KmiResult};
use crate::kdf::HmacKey;

pub const MAGIC: [u8; 8] = [0x8B, 0x4B, 0x4D, 0x49, 0x0D, 0x0A, 0x1A, 0x0A];
pub const VERSION: u8 = 2;
/// C2SP chunked-encryption v1, SHA-256, AES-256-GCM.
pub const SUITE: u8 = 1;
pub const KID_LEN: usize = 16;
/// Magic, version, suite and kid: the part the context binds besides AD.
pub const PREFIX_LEN: usize = 10 + KID_LEN;
pub const SALT_LEN: usize = 24;
pub const COMMITMENT_LEN: usize = 32;
/// Prefix, salt and commitment: where the first chunk starts.
pub const HEADER_LEN: usize = PREFIX_LEN + SALT_LEN + COMMITMENT_LEN;
pub const CHUNK: usize = 16 * 1024;
pub const TAG_LEN: usize = 16;
pub const SEALED_CHUNK: usize = CHUNK + TAG_LEN;
/// The shortest message: a header and an empty final chunk.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
/// Chunk indices are 32-bit in C2SP: at most 2^32 chunks (64 TiB) a message.
const MAX_CHUNKS: u64 = 1 << 32;

const KID_SALT: &[u8] = b"keas.kmi/v2";
const KID_INFO: &[u8] = b"input key and kid";
const C2SP_LABEL: &[u8] = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM";

/// SHA-256 of no bytes: the context of every message without associated data.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Inputs from this many chunks on are sealed and opened on several cores.
const PARALLEL_CHUNKS: usize = 64;

/// Whether `data` is in the v2 format (and must be read strictly as such).
pub fn is_v2(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// The sealed length of `n` plaintext bytes: 82 + n + 16 per chunk.
pub fn sealed_len(n: u64) -> KmiResult<u64> {
    let chunks = n / CHUNK as u64 + 1;
    if chunks > MAX_CHUNKS {
        return Err(KmiError::BadArgument(format!(
            "{n} bytes need more than 2^32 chunks, the v2 limit (64 TiB)"
        )));
    }
    Ok(HEADER_LEN as u64 + n + TAG_LEN as u64 * chunks)
}

/// The plaintext length of a sealed message of `len` bytes, or why that
/// length cannot be one: the final chunk holds 0 to 16 KiB - 1 bytes, so a
/// body that ends on a chunk boundary, or in a piece shorter than a tag, was cut.
pub fn opened_len(len: u64) -> KmiResult<u64> {
    if len < MIN_LEN as u64 {
        return Err(truncated(len));
    }
    let body = len - HEADER_LEN as u64;
    let full = body / SEALED_CHUNK as u64;
    let last = body % SEALED_CHUNK as u64;
    if last < TAG_LEN as u64 {
        return Err(truncated(len));
    }
    if full + 1 > MAX_CHUNKS {
        return Err(KmiError::bad_data(
            "v2 data has more than 2^32 chunks, the limit",
        ));
    }
    Ok(full * CHUNK as u64 + last - TAG_LEN as u64)
}

fn truncated(len: u64) -> KmiError {
    KmiError::bad_data(format!(
        "v2 data is truncated: {len} bytes do not end in a final chunk"
    ))
}

fn damaged(chunk: u64) -> KmiError {
    KmiError::bad_data(format!(
        "v2 data is damaged: chunk {chunk} fails its authentication tag"
    ))
}

/// How many threads a parallel seal or open of `chunks` chunks uses.
fn threads_for(chunks: usize) -> usize {
    if chunks < PARALLEL_CHUNKS {
        return 1;
    }
    // Asked once: the call reads cgroup files and costs microseconds.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
}

/// The keys of one DEK: the C2SP input key (kept as its keyed HMAC states,
/// so a message costs no re-keying) and the kid.
#[derive(Clone)]
pub struct V2Key {
    input_key: HmacKey,
    kid: [u8; KID_LEN],
}

impl V2Key {
    /// IK || kid = HKDF-SHA256(IKM = DEK, salt = "keas.kmi/v2", info = "input key and kid").
    pub fn new(dek: &[u8]) -> V2Key {
        let mut okm = Zeroizing::new([0u8; 32 + KID_LEN]);
        Hkdf::<Sha256>::new(Some(KID_SALT), dek)
            .expand(KID_INFO, &mut *okm)
            .expect("48 bytes is a valid HKDF length");
        let input_key = HmacKey::new(&okm[..32]);
        let kid = okm[32..].try_into().expect("16 bytes");
        V2Key { input_key, kid }
    }

    /// The 16 bytes naming this DEK in every message sealed under it.
    pub fn kid(&self) -> &[u8; KID_LEN] {
        &self.kid
    }

    fn prefix(&self) -> [u8; PREFIX_LEN] {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..8].copy_from_slice(&MAGIC);
        prefix[8] = VERSION;
        prefix[9] = SUITE;
        prefix[10..].copy_from_slice(&self.kid);
        prefix
    }

    /// The per-message key, base nonce and commitment for `salt` and `ad`;
    /// `long`: a message of more than `LONG_MESSAGE` bytes, or a stream.
    fn message(&self, salt: &[u8; SALT_LEN], ad: &[u8], long: bool) -> Message {
        let ad_hash: [u8; 32] = if ad.is_empty() {
            EMPTY_SHA256
        } else {
            Sha256::digest(ad).into()
        };
        let mut okm = Zeroizing::new([0u8; 32 + 12 + COMMITMENT_LEN]);
        self.input_key.expand(
            &[C2SP_LABEL, &[0], salt, &self.prefix(), &ad_hash],
            &mut *okm,
        );
        Message {
            aead: ChunkCipher::new(okm[..32].try_into().expect("32 bytes"), long),
            base_nonce: okm[32..44].try_into().expect("12 bytes"),
            commitment: okm[44..].try_into().expect("32 bytes"),
        }
    }

    /// The header of a new message: prefix, `salt` and commitment.
    fn header(&self, salt: &[u8; SALT_LEN], message: &Message) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[..PREFIX_LEN].copy_from_slice(&self.prefix());
        header[PREFIX_LEN..PREFIX_LEN + SALT_LEN].copy_from_slice(salt);
        header[PREFIX_LEN + SALT_LEN..].copy_from_slice(&message.commitment);
        header
    }

    /// Steps 1-4 of FORMATS.md 7 "Reading" on the first 82 bytes of a
    /// message: magic, version and suite, kid, commitment (in constant time).
    fn check_header(&self, header: &[u8], ad: &[u8], long: bool) -> KmiResult<Message> {
        if !is_v2(header) {
            return Err(KmiError::bad_data("not v2 data: the magic is missing"));
        }
        if header.len() < HEADER_LEN {
            return Err(truncated(header.len() as u64));
        }
        if header[8] != VERSION || header[9] != SUITE {
            return Err(KmiError::bad_data(format!(
                "malformed v2 header: unsupported v2 version or suite ({}, {})",
                header[8], header[9]
            )));
        }
        if header[10..PREFIX_LEN] != self.kid {
            return Err(KmiError::bad_data(format!(
                "v2 data is encrypted under another key (kid {}, this DEK's is {})",
                hex::encode(&header[10..PREFIX_LEN]),
                hex::encode(self.kid)
            )));
        }
        let salt = header[PREFIX_LEN..PREFIX_LEN + SALT_LEN]
            .try_into()
            .expect("24 bytes");
        let message = self.message(salt, ad, long);
        let stored = &header[PREFIX_LEN + SALT_LEN..HEADER_LEN];
        if !bool::from(stored.ct_eq(&message.commitment)) {
            return Err(KmiError::bad_data(
                "v2 header altered, or other associated data: the key commitment does not match",
            ));
        }
        Ok(message)
    }

    /// Seal `plain` with a fresh salt from the OS CSPRNG.
    pub fn seal(&self, plain: &[u8], ad: &[u8]) -> KmiResult<Vec<u8>> {
        let mut out = vec![0u8; sealed_len(plain.len() as u64)? as usize];
        self.seal_into(&fresh_salt()?, ad, plain, &mut out)?;
        Ok(out)
    }

    /// Seal `plain` under `salt` into `out`, which is `sealed_len(plain.len())` long.
    pub fn seal_into(
        &self,
        salt: &[u8; SALT_LEN],
        ad: &[u8],
        plain: &[u8],
        out: &mut [u8],
    ) -> KmiResult<()> {
        if out.len() as u64 != sealed_len(plain.len() as u64)? {
            return Err(KmiError::BadArgument(
                "v2 output buffer has the wrong size".into(),
            ));
        }
        let message = self.message(salt, ad, plain.len() > LONG_MESSAGE);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        header.copy_from_slice(&self.header(salt, &message));
        message.seal_chunks(0, plain, body, true);
        Ok(())
    }

    /// Open a whole message. Every tag is checked before any plaintext is returned.
    pub fn open(&self, data: &[u8], ad: &[u8]) -> KmiResult<Vec<u8>> {
        let mut out = vec![0u8; self.opened_len(data)?];
        self.open_into(data, ad, &mut out)?;
        Ok(out)
    }

    /// The plaintext length of `data`, checking what the length alone shows.
    pub fn opened_len(&self, data: &[u8]) -> KmiResult<usize> {
        if !is_v2(data) {
            return Err(KmiError::bad_data("not v2 data: the magic is missing"));
        }
        if data.len() >= 10 && (data[8] != VERSION || data[9] != SUITE) {
            // Said before the length, which a future version may lay out otherwise.
            return Err(KmiError::bad_data(format!(
                "malformed v2 header: unsupported v2 version or suite ({}, {})",
                data[8], data[9]
            )));
        }
        Ok(opened_len(data.len() as u64)? as usize)
    }

    /// Open `data` into `out`, which is `opened_len(data)` long. On error,
    /// `out` holds unverified bytes and must be discarded.
    pub fn open_into(&self, data: &[u8], ad: &[u8], out: &mut [u8]) -> KmiResult<()> {
        if out.len() != self.opened_len(data)? {
            return Err(KmiError::BadArgument(
                "v2 output buffer has the wrong size".into(),
            ));
        }
        let message = self.check_header(&data[..HEADER_LEN], ad, out.len() > LONG_MESSAGE)?;
        message.open_chunks(0, &data[HEADER_LEN..], out, true)
    }

    /// A streaming sealer: its `header()` first, then what `update` and `finish` give.
    pub fn sealer(&self, ad: &[u8]) -> KmiResult<Sealer> {
        let salt = fresh_salt()?;
        let message = self.message(&salt, ad, true);
        let header = self.header(&salt, &message);
        Ok(Sealer {
            header,
            state: SealerState::Body {
                message: Box::new(message),
                next: 0,
                pending: Vec::with_capacity(CHUNK),
            },
        })
    }

    /// A streaming opener for one message under `ad`.
    pub fn opener(&self, ad: &[u8]) -> Opener {
        Opener {
            state: OpenerState::Header {
                key: Box::new(self.clone()),
                ad: ad.to_vec(),
                header: Vec::with_capacity(HEADER_LEN),
            },
        }
    }
}

/// 24 fresh bytes from the OS CSPRNG, never handed out twice.
pub fn fresh_salt() -> KmiResult<[u8; SALT_LEN]> {
    let mut salt = [0u8; SALT_LEN];
    crate::salt::fill(&mut salt)?;
    Ok(salt)
}

/// Messages longer than this are sealed and opened by `ring`, shorter ones
/// by `aes-gcm`: the same AES-256-GCM, byte for byte (the tests check).
///
/// Measured here (2-core AMD EPYC, VAES and VPCLMULQDQ): `ring` (BoringSSL's
/// assembly) seals 9.4 GB/s on one core, `aes-gcm` 3.1 GB/s, its GHASH
/// (the `polyval` crate) taking most of the time; but setting up a key takes
/// `ring` 200 ns and `aes-gcm` 140 ns, which a 15-byte message notices. The
/// two break even near 300 bytes.
const LONG_MESSAGE: usize = 1024;

/// AES-256-GCM under one message key, by the library that does that length best.
// One per message, on the stack or in a boxed stream state: no allocation
// for a short message is worth the variants' difference in size.
#[allow(clippy::large_enum_variant)]
enum ChunkCipher {
    /// Zeroized on drop (the `zeroize` feature of aes-gcm).
    Short(Aes256Gcm),
    /// `ring` keeps its key schedule to itself and does not zeroize it: a
    /// message key unlocks that message only.
    Long(ring::aead::LessSafeKey),
}

impl ChunkCipher {
    fn new(key: &[u8; 32], long: bool) -> ChunkCipher {
        if long {
            let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
                .expect("a 32-byte AES-256-GCM key");
            ChunkCipher::Long(ring::aead::LessSafeKey::new(key))
        } else {
            ChunkCipher::Short(Aes256Gcm::new(key.into()))
        }
    }

    /// Seal `input` into `body` (as long) and return its tag.
    fn seal(&self, nonce: [u8; 12], input: &[u8], body: &mut [u8]) -> [u8; TAG_LEN] {
        match self {
            ChunkCipher::Short(aead) => aead
                .encrypt_inout_detached(
                    &Nonce::from(nonce),
                    b"",
                    InOutBuf::new(input, body).expect("equal lengths"),
                )
                .expect("a chunk is far below the GCM limit")
                .into(),
            ChunkCipher::Long(key) => {
                body.copy_from_slice(input);
                let tag = key
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::empty(),
                        body,
                    )
                    .expect("a chunk is far below the GCM limit");
                tag.as_ref().try_into().expect("16 bytes")
            }
        }
    }

    /// Open `body` with `tag` into `out` (as long); `out` holds no
    /// plaintext to rely on when this fails.
    fn open(
        &self,
        nonce: [u8; 12],
        body: &[u8],
        tag: &[u8; TAG_LEN],
        out: &mut [u8],
    ) -> Result<(), ()> {
        match self {
            ChunkCipher::Short(aead) => aead
                .decrypt_inout_detached(
                    &Nonce::from(nonce),
                    b"",
                    InOutBuf::new(body, out).expect("equal lengths"),
                    &Tag::from(*tag),
                )
                .map_err(|_| ()),
            ChunkCipher::Long(key) => {
                out.copy_from_slice(body);
                key.open_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::empty(),
                    ring::aead::Tag::from(*tag),
                    out,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| ())
            }
        }
    }
}

/// One message's AEAD key, base nonce and commitment.
struct Message {
    aead: ChunkCipher,
    base_nonce: [u8; 12],
    commitment: [u8; COMMITMENT_LEN],
}

impl Drop for Message {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.base_nonce.zeroize();
    }
}

impl Message {
    /// The nonce of chunk `index`: the base nonce XOR the index, big-endian.
    fn nonce(&self, index: u64) -> [u8; 12] {
        let mut nonce = self.base_nonce;
        for (n, i) in nonce[4..].iter_mut().zip(index.to_be_bytes()) {
            *n ^= i;
        }
        nonce
    }

    /// Seal `plain` as chunks `first`, `first + 1`, ... into `out`. With
    /// `last`, the final (short, maybe empty) chunk ends `plain`; without,
    /// `plain` is whole chunks only.
    fn seal_chunks(&self, first: u64, plain: &[u8], out: &mut [u8], last: bool) {
        let chunks = plain.len() / CHUNK + usize::from(last);
        debug_assert!(last || plain.len().is_multiple_of(CHUNK));
        debug_assert_eq!(out.len(), plain.len() + chunks * TAG_LEN);
        in_parallel(chunks, out, SEALED_CHUNK, |range, out| {
            for (j, i) in range.enumerate() {
                let input = &plain[i * CHUNK..((i + 1) * CHUNK).min(plain.len())];
                let (body, tag) = out[j * SEALED_CHUNK..].split_at_mut(input.len());
                let t = self.aead.seal(self.nonce(first + i as u64), input, body);
                tag[..TAG_LEN].copy_from_slice(&t);
            }
            Ok(())
        })
        .expect("sealing does not fail");
    }

    /// Open sealed chunks `first`, ... from `data` into `out`; with `last`,
    /// the final chunk ends `data`. Reports the lowest damaged chunk.
    fn open_chunks(&self, first: u64, data: &[u8], out: &mut [u8], last: bool) -> KmiResult<()> {
        let chunks = data.len().div_ceil(SEALED_CHUNK).max(usize::from(last));
        debug_assert!(last || data.len().is_multiple_of(SEALED_CHUNK));
        in_parallel(chunks, out, CHUNK, |range, out| {
            for (j, i) in range.enumerate() {
                let sealed = &data[i * SEALED_CHUNK..((i + 1) * SEALED_CHUNK).min(data.len())];
                let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                let target = &mut out[j * CHUNK..j * CHUNK + body.len()];
                let tag = tag.try_into().expect("16 bytes");
                self.aead
                    .open(self.nonce(first + i as u64), body, tag, target)
                    .map_err(|_| damaged(first + i as u64))?;
            }
            Ok(())
        })
    }
}

/// Run `work(chunk range, its part of out)` over `chunks` chunks, splitting
/// `out` every `stride` bytes per chunk: on the calling thread alone for
/// small inputs, else on up to one thread per core. The error of the lowest
/// failing range wins, so messages do not depend on scheduling.
fn in_parallel(
    chunks: usize,
    out: &mut [u8],
    stride: usize,
    work: impl Fn(Range<usize>, &mut [u8]) -> KmiResult<()> + Sync,
) -> KmiResult<()> {
    let threads = threads_for(chunks);
    if threads < 2 {
        return work(0..chunks, out);
    }
    let per = chunks.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut rest = out;
        let mut handles = Vec::new();
        let mut start = 0;
        let mut first_part = None;
        while start < chunks {
            let end = (start + per).min(chunks);
            let take = ((end - start) * stride).min(rest.len());
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            let range = start..end;
            if start == 0 {
                first_part = Some((range, part));
            } else {
                let work = &work;
                handles.push(scope.spawn(move || work(range, part)));
            }
            start = end;
        }
        // The calling thread takes the first part.
        let (range, part) = first_part.expect("at least one chunk");
        let mut result = work(range, part);
        for handle in handles {
            let r = handle.join().expect("a chunk worker does not panic");
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// A streaming sealer. Full chunks are sealed as soon as they are complete
/// (a chunk of exactly 16 KiB is never the final one); `finish` seals the
/// rest as the final chunk. After an error, or `finish`, it takes nothing more.
pub struct Sealer {
    header: [u8; HEADER_LEN],
    state: SealerState,
}

enum SealerState {
    Body {
        message: Box<Message>,
        /// The index of the next chunk to seal.
        next: u64,
        /// Plaintext of the chunk being filled: always shorter than a chunk.
        pending: Vec<u8>,
    },
    Finalized,
}

impl Sealer {
    /// The 82 bytes that start the message.
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// Seal every chunk `data` completes, appending the sealed bytes to `out`.
    pub fn update(&mut self, data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        let result = self.step(data, out);
        if result.is_err() {
            self.state = SealerState::Finalized;
        }
        result
    }

    fn step(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        let SealerState::Body {
            message,
            next,
            pending,
        } = &mut self.state
        else {
            return Err(KmiError::BadArgument("the v2 sealer is finished".into()));
        };
        if !pending.is_empty() {
            let take = (CHUNK - pending.len()).min(data.len());
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if pending.len() < CHUNK {
                return Ok(());
            }
            seal_whole(message, next, pending, out)?;
            pending.clear();
        }
        let whole = data.len() / CHUNK * CHUNK;
        seal_whole(message, next, &data[..whole], out)?;
        pending.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Seal what is left as the final chunk.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> KmiResult<()> {
        let SealerState::Body {
            message,
            next,
            pending,
        } = std::mem::replace(&mut self.state, SealerState::Finalized)
        else {
            return Err(KmiError::BadArgument("the v2 sealer is finished".into()));
        };
        let start = out.len();
        out.resize(start + pending.len() + TAG_LEN, 0);
        message.seal_chunks(next, &pending, &mut out[start..], true);
        Ok(())
    }
}

/// Seal whole chunks `plain` from chunk `*next` on, appending to `out`. The
/// chunk limit is checked before anything is written.
fn seal_whole(message: &Message, next: &mut u64, plain: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
    let chunks = (plain.len() / CHUNK) as u64;
    // One more chunk always follows: the final one.
    if *next + chunks + 1 > MAX_CHUNKS {
        return Err(KmiError::BadArgument(
            "more than 2^32 chunks, the v2 limit (64 TiB)".into(),
        ));
    }
    let start = out.len();
    out.resize(start + plain.len() + chunks as usize * TAG_LEN, 0);
    message.seal_chunks(*next, plain, &mut out[start..], false);
    *next += chunks;
    Ok(())
}

/// A streaming opener: it checks the header once 82 bytes have come, then
/// opens each sealed chunk as soon as it is complete (a piece of 16 KiB + 16
/// bytes is never the final chunk), and `finish` opens the final one. Any
/// error finalizes it, so a failed stream cannot be fed more data.
pub struct Opener {
    state: OpenerState,
}

enum OpenerState {
    Header {
        key: Box<V2Key>,
        ad: Vec<u8>,
        header: Vec<u8>,
    },
    Body {
        message: Box<Message>,
        next: u64,
        /// Sealed bytes of the chunk being filled: shorter than a sealed chunk.
        pending: Vec<u8>,
    },
    Finalized,
}

impl Opener {
    /// Open every chunk `data` completes, appending verified plaintext to `out`.
    pub fn update(&mut self, data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        let result = self.step(data, out);
        if result.is_err() {
            self.state = OpenerState::Finalized;
        }
        result
    }

    fn step(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
        if let OpenerState::Header { key, ad, header } = &mut self.state {
            let take = (HEADER_LEN - header.len()).min(data.len());
            header.extend_from_slice(&data[..take]);
            data = &data[take..];
            if header.len() >= 10 && !is_v2(header) {
                return Err(KmiError::bad_data("not v2 data: the magic is missing"));
            }
            if header.len() < HEADER_LEN {
                return Ok(());
            }
            let message = key.check_header(header, ad, true)?;
            self.state = OpenerState::Body {
                message: Box::new(message),
                next: 0,
                pending: Vec::with_capacity(SEALED_CHUNK),
            };
        }
        let OpenerState::Body {
            message,
            next,
            pending,
        } = &mut self.state
        else {
            return Err(KmiError::BadArgument("the v2 opener is finished".into()));
        };
        if !pending.is_empty() {
            let take = (SEALED_CHUNK - pending.len()).min(data.len());
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if pending.len() < SEALED_CHUNK {
                return Ok(());
            }
            open_whole(message, next, pending, out)?;
            pending.clear();
        }
        let whole = data.len() / SEALED_CHUNK * SEALED_CHUNK;
        open_whole(message, next, &data[..whole], out)?;
        pending.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// Open the final chunk: what is left must be one.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> KmiResult<()> {
        match std::mem::replace(&mut self.state, OpenerState::Finalized) {
            OpenerState::Header { header, .. } => Err(truncated(header.len() as u64)),
            OpenerState::Body {
                message,
                next,
                pending,
            } => {
                if pending.len() < TAG_LEN {
                    let len = HEADER_LEN as u64 + next * SEALED_CHUNK as u64 + pending.len() as u64;
                    return Err(truncated(len));
                }
                if next + 1 > MAX_CHUNKS {
                    return Err(KmiError::bad_data("v2 data has more than 2^32 chunks"));
                }
                let start = out.len();
                out.resize(start + pending.len() - TAG_LEN, 0);
                let result = message.open_chunks(next, &pending, &mut out[start..], true);
                if result.is_err() {
                    out.truncate(start);
                }
                result
            }
            OpenerState::Finalized => {
                Err(KmiError::BadArgument("the v2 opener is finished".into()))
            }
        }
    }
}

/// Open whole sealed chunks from chunk `*next` on, appending to `out`; on
/// error nothing of them stays in `out`.
fn open_whole(message: &Message, next: &mut u64, data: &[u8], out: &mut Vec<u8>) -> KmiResult<()> {
    let chunks = (data.len() / SEALED_CHUNK) as u64;
    if chunks == 0 {
        return Ok(());
    }
    if *next + chunks + 1 > MAX_CHUNKS {
        return Err(KmiError::bad_data("v2 data has more than 2^32 chunks"));
    }
    let start = out.len();
    out.resize(start + chunks as usize * CHUNK, 0);
    if let Err(e) = message.open_chunks(*next, data, &mut out[start..], false) {
        out.truncate(start);
        return Err(e);
    }
    *next += chunks;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> V2Key {
        V2Key::new(&[0x42; 128])
    }

    const SALT: [u8; SALT_LEN] = [7; SALT_LEN];

    fn sealed(plain: &[u8], ad: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; sealed_len(plain.len() as u64).unwrap() as usize];
        key().seal_into(&SALT, ad, plain, &mut out).unwrap();
        out
    }

    #[test]
    fn known_answers_from_the_shared_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/v2.json");
        let text = std::fs::read_to_string(path).expect("tests/vectors/v2.json");
        let mut seen = 0;
        // A tiny reader for the flat vector objects: "field": "hex".
        for object in text.split('{').skip(1) {
            let field = |name: &str| -> Vec<u8> {
                let at = object.find(&format!("\"{name}\"")).expect(name);
                let rest = &object[at + name.len() + 2..];
                let start = rest.find('"').unwrap() + 1;
                let end = start + rest[start..].find('"').unwrap();
                hex::decode(&rest[start..end]).expect("hex")
            };
            let (dek, salt, ad) = (field("dek"), field("salt"), field("associated_data"));
            let (plain, kid, expected) = (field("plaintext"), field("kid"), field("ciphertext"));
            let key = V2Key::new(&dek);
            assert_eq!(&key.kid()[..], &kid[..]);
            let mut out = vec![0u8; sealed_len(plain.len() as u64).unwrap() as usize];
            key.seal_into(&salt.try_into().unwrap(), &ad, &plain, &mut out)
                .unwrap();
            assert_eq!(out, expected);
            assert_eq!(key.open(&expected, &ad).unwrap(), plain);
            seen += 1;
        }
        assert_eq!(seen, 5);
    }

    #[test]
    fn the_empty_hash_is_sha256_of_nothing() {
        assert_eq!(EMPTY_SHA256, <[u8; 32]>::from(Sha256::digest(b"")));
    }

    #[test]
    fn sizes() {
        assert_eq!(sealed_len(0).unwrap(), 98);
        assert_eq!(sealed_len(15).unwrap(), 113);
        assert_eq!(sealed_len(1 << 30).unwrap() - (1 << 30), 1_048_674);
        for n in [0u64, 1, 16383, 16384, 16385, 32768, 32769, 1 << 30] {
            assert_eq!(opened_len(sealed_len(n).unwrap()).unwrap(), n);
        }
        // A body ending on a chunk boundary, or in less than a tag, was cut.
        assert!(opened_len(97).is_err());
        assert!(opened_len(82 + SEALED_CHUNK as u64).is_err());
        assert!(opened_len(82 + SEALED_CHUNK as u64 + 15).is_err());
        assert!(sealed_len(MAX_CHUNKS * CHUNK as u64).is_err());
    }

    #[test]
    fn round_trips_at_chunk_boundaries_whole_and_streamed() {
        let data: Vec<u8> = (0..(3 * CHUNK + 100))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for n in [0, 1, 16383, 16384, 16385, 32768, 32769, 3 * CHUNK + 100] {
            let plain = &data[..n];
            let blob = key().seal(plain, b"ad").unwrap();
            assert_eq!(blob.len() as u64, sealed_len(n as u64).unwrap());
            assert_eq!(key().open(&blob, b"ad").unwrap(), plain);
            for piece in [1, 1000, CHUNK, SEALED_CHUNK + 1, 1 << 20] {
                let mut sealer = key().sealer(b"ad").unwrap();
                let mut streamed = sealer.header().to_vec();
                for p in plain.chunks(piece) {
                    sealer.update(p, &mut streamed).unwrap();
                }
                sealer.finish(&mut streamed).unwrap();
                assert_eq!(streamed.len(), blob.len());
                assert_eq!(key().open(&streamed, b"ad").unwrap(), plain, "{n} {piece}");
                let mut opener = key().opener(b"ad");
                let mut out = Vec::new();
                for p in streamed.chunks(piece) {
                    opener.update(p, &mut out).unwrap();
                }
                opener.finish(&mut out).unwrap();
                assert_eq!(out, plain);
            }
        }
    }

    #[test]
    fn both_gcm_libraries_seal_and_open_alike() {
        let data: Vec<u8> = (0..(2 * CHUNK + 77))
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        for n in [0, 1, 15, 16, 17, 1000, CHUNK, CHUNK + 1, 2 * CHUNK + 77] {
            let (short, long) = (
                key().message(&SALT, b"x", false),
                key().message(&SALT, b"x", true),
            );
            let chunks = n / CHUNK + 1;
            let mut a = vec![0u8; n + chunks * TAG_LEN];
            let mut b = a.clone();
            short.seal_chunks(0, &data[..n], &mut a, true);
            long.seal_chunks(0, &data[..n], &mut b, true);
            assert_eq!(a, b, "{n}");
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            long.open_chunks(0, &a, &mut x, true).unwrap();
            short.open_chunks(0, &b, &mut y, true).unwrap();
            assert_eq!((&x[..], &y[..]), (&data[..n], &data[..n]));
            a[n / 2] ^= 1;
            assert!(long.open_chunks(0, &a, &mut x, true).is_err());
            assert!(short.open_chunks(0, &a, &mut y, true).is_err());
        }
    }

    #[test]
    fn parallel_sealing_matches_serial() {
        let n = PARALLEL_CHUNKS * 3 * CHUNK + 5;
        let plain: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        let whole = sealed(&plain, b"");
        let mut out = vec![0u8; whole.len() - HEADER_LEN];
        // One chunk at a time never takes the parallel path.
        let message = key().message(&SALT, b"", true);
        for (i, c) in plain.chunks(CHUNK).enumerate() {
            let end = (i * SEALED_CHUNK + c.len() + TAG_LEN).min(out.len());
            message.seal_chunks(
                i as u64,
                c,
                &mut out[i * SEALED_CHUNK..end],
                c.len() < CHUNK,
            );
        }
        assert_eq!(&whole[HEADER_LEN..], &out[..]);
        assert_eq!(key().open(&whole, b"").unwrap(), plain);
    }

    fn refused(blob: &[u8], ad: &[u8], what: &str) {
        match key().open(blob, ad) {
            Err(KmiError::BadData(m)) => assert!(m.contains(what), "{m:?} lacks {what:?}"),
            Ok(p) => panic!("opened to {} bytes", p.len()),
            Err(e) => panic!("{e:?}"),
        }
        let mut opener = key().opener(ad);
        let mut out = Vec::new();
        let streamed = opener
            .update(blob, &mut out)
            .and_then(|_| opener.finish(&mut out));
        assert!(streamed.is_err(), "the streaming opener accepted it");
    }

    #[test]
    fn every_damage_is_refused_with_its_reason() {
        let plain: Vec<u8> = (0..(2 * CHUNK + 10)).map(|i| i as u8).collect();
        let blob = sealed(&plain, b"ad");
        for i in [8, 9] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            refused(&bad, b"ad", "unsupported v2 version or suite");
        }
        for i in [10, 25] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            refused(&bad, b"ad", "another key");
        }
        for i in [26, 49, 50, 81] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            refused(&bad, b"ad", "header altered");
        }
        refused(&blob, b"other", "other associated data");
        refused(&blob, b"", "other associated data");
        for (i, chunk) in [(82, 0), (82 + SEALED_CHUNK, 1), (blob.len() - 1, 2)] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            refused(&bad, b"ad", &format!("chunk {chunk} fails"));
        }
        // Cut at and between chunk boundaries, and extended.
        for cut in [82, 97, 82 + SEALED_CHUNK, 82 + 2 * SEALED_CHUNK] {
            refused(&blob[..cut], b"ad", "truncated");
        }
        // Cut inside a chunk: that piece is taken for the final chunk, and fails.
        refused(&blob[..82 + 100], b"ad", "chunk 0 fails");
        refused(&blob[..blob.len() - 1], b"ad", "chunk 2 fails");
        let mut longer = blob.clone();
        longer.extend_from_slice(&[0; 16]);
        refused(&longer, b"ad", "fails");
        // Chunks swapped or repeated.
        let (a, b) = (
            82..82 + SEALED_CHUNK,
            82 + SEALED_CHUNK..82 + 2 * SEALED_CHUNK,
        );
        let mut swapped = blob[..82].to_vec();
        swapped.extend_from_slice(&blob[b.clone()]);
        swapped.extend_from_slice(&blob[a.clone()]);
        swapped.extend_from_slice(&blob[b.end..]);
        refused(&swapped, b"ad", "chunk 0 fails");
        let mut repeated = blob[..b.end].to_vec();
        repeated.extend_from_slice(&blob[a]);
        repeated.extend_from_slice(&blob[b.end..]);
        refused(&repeated, b"ad", "chunk 2 fails");
        // Another DEK.
        let other = V2Key::new(&[0x43; 128]);
        assert!(
            matches!(other.open(&blob, b"ad"), Err(KmiError::BadData(m)) if m.contains("another key"))
        );
    }

    #[test]
    fn a_finished_stream_takes_nothing_more() {
        let mut opener = key().opener(b"");
        let mut out = Vec::new();
        assert!(opener.update(&[0u8; 100], &mut out).is_err());
        assert!(opener.update(&sealed(b"x", b""), &mut out).is_err());
        let mut sealer = key().sealer(b"").unwrap();
        sealer.finish(&mut out).unwrap();
        assert!(sealer.update(b"x", &mut out).is_err());
        assert!(sealer.finish(&mut out).is_err());
    }
}
