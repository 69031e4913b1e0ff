//! PBKDF2-HMAC-SHA256 straight on the SHA-256 compression function: the cost
//! of opening a PKCS#8 KEK (600000 iterations) is two compressions per round.

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

/// PBKDF2 (RFC 8018) with HMAC-SHA256, deriving `len` bytes.
pub fn pbkdf2_hmac_sha256(
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new([0u8; 64]);
    if password.len() > 64 {
        key[..32].copy_from_slice(&sha256(&[password]));
    } else {
        key[..password.len()].copy_from_slice(password);
    }
    let mut ipad = Zeroizing::new([0x36u8; 64]);
    let mut opad = Zeroizing::new([0x5cu8; 64]);
    for i in 0..64 {
        ipad[i] ^= key[i];
        opad[i] ^= key[i];
    }
    let inner = keyed_state(&ipad);
    let outer = keyed_state(&opad);
    // The padding of a 96-byte message (64 key bytes + 32): 0x80, zeros, bit length 768.
    let mut pad = [0u8; 64];
    pad[32] = 0x80;
    pad[62] = 0x03;
    let mut block = pad;
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut index = 1u32;
    while out.len() < len {
        // U1 = HMAC(password, salt || INT(index)): the salt may be any length.
        let first_inner = sha256(&[&ipad[..], salt, &index.to_be_bytes()]);
        let mut u = sha256(&[&opad[..], &first_inner]);
        let mut t = u;
        for _ in 1..rounds {
            let x = finish_32(&inner, &u, &mut block);
            u = finish_32(&outer, &x, &mut block);
            for (a, b) in t.iter_mut().zip(u) {
                *a ^= b;
            }
        }
        out.extend_from_slice(&t);
        index += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn long_passwords_are_hashed_first() {
        let long = [b'p'; 100];
        let short = sha256(&[&long]);
        assert_eq!(
            pbkdf2_hmac_sha256(&long, b"s", 3, 32),
            pbkdf2_hmac_sha256(&short, b"s", 3, 32)
        );
    }
}
