//! DEK unwrapping under the fixed testing KEK: `Kek::unwrap_dek` must never
//! panic, never return a DEK of a length outside the allowed list, and never
//! return anything but the DEK that the wrapped bytes really encrypt.
//!
//! Input layout: data[0] picks a mode and the allowed-lengths list, the rest is its data.
//! - even mode: the rest is the wrapped DEK itself (any length);
//! - odd mode: the rest is the *encoded message* EM (left-padded with zeros or
//!   cut to the modulus size, 64 bytes); the target RSA-encrypts it with the
//!   public key, so the fuzzer steers the PKCS#1 v1.5 padding checks directly,
//!   and compares the result with an independent reference decoding of EM.
//!
//! The wrapped form of `KNOWN_DEK` (deterministic padding) must unwrap to it.
#![no_main]

mod common;

use std::sync::OnceLock;

use _kmi::errors::KmiError;
use _kmi::kek::Kek;
use libfuzzer_sys::fuzz_target;
use rsa::hazmat::rsa_encrypt;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::{BoxedUint, PrivateKey};

const LENGTHS: [&[usize]; 4] = [&[], &[32], &[32, 128], &[16, 24, 32]];

struct Fixture {
    kek: Kek,
    rsa: PrivateKey,
    k: usize,
    known_wrapped: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let kek = Kek::from_pem(common::TESTING_KEK, b"").unwrap();
        let rsa =
            PrivateKey::from_pkcs1_pem(std::str::from_utf8(common::TESTING_KEK).unwrap()).unwrap();
        let k = rsa.size();
        let mut em = vec![common::KNOWN_PS; k];
        em[0] = 0;
        em[1] = 2;
        em[k - 33] = 0;
        em[k - 32..].copy_from_slice(common::KNOWN_DEK);
        let known_wrapped = raw_encrypt(&rsa, k, &em).unwrap();
        Fixture {
            kek,
            rsa,
            k,
            known_wrapped,
        }
    })
}

/// Raw RSA on the public key: `em^e mod n` as k big-endian bytes, or None if `em >= n`.
fn raw_encrypt(rsa: &PrivateKey, k: usize, em: &[u8]) -> Option<Vec<u8>> {
    let m = BoxedUint::from_be_slice(em, rsa.n_bits_precision()).ok()?;
    if m >= *rsa.n().as_ref() {
        return None;
    }
    let c = rsa_encrypt(rsa.as_public_key(), &m).ok()?.to_be_bytes();
    let mut out = vec![0u8; k];
    let take = c.len().min(k);
    out[k - take..].copy_from_slice(&c[c.len() - take..]);
    Some(out)
}

/// RFC 8017 §7.2.2 step 3, as keas.kmi applies it: 0x00 0x02, at least eight
/// non-zero padding bytes, a 0x00, then a non-empty DEK of an allowed length.
fn reference_decode(em: &[u8], lengths: &[usize]) -> Option<Vec<u8>> {
    if em.len() < 11 || em[0] != 0 || em[1] != 2 {
        return None;
    }
    let sep = 2 + em[2..].iter().position(|b| *b == 0)?;
    if sep - 2 < 8 {
        return None;
    }
    let dek = &em[sep + 1..];
    if dek.is_empty() || (!lengths.is_empty() && !lengths.contains(&dek.len())) {
        return None;
    }
    Some(dek.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let lengths = LENGTHS[(mode >> 1) as usize % LENGTHS.len()];
    if mode & 1 == 0 {
        let result = f.kek.unwrap_dek(rest, lengths);
        if rest == f.known_wrapped.as_slice() {
            let dek = result.as_ref().expect("the known wrapped DEK unwraps");
            assert_eq!(&**dek, common::KNOWN_DEK);
        }
        match result {
            Ok(dek) => {
                assert!(!dek.is_empty(), "an empty DEK was returned");
                assert!(
                    lengths.is_empty() || lengths.contains(&dek.len()),
                    "a {}-byte DEK passed the length list {lengths:?}",
                    dek.len()
                );
                // With no length list it must give the same DEK.
                let again = f
                    .kek
                    .unwrap_dek(rest, &[])
                    .expect("unwraps without a length list");
                assert_eq!(&*again, &*dek);
            }
            Err(e) => assert!(matches!(e, KmiError::BadData(_)), "not BadData: {e:?}"),
        }
    } else {
        let mut em = vec![0u8; f.k];
        let take = rest.len().min(f.k);
        em[f.k - take..].copy_from_slice(&rest[..take]);
        let Some(wrapped) = raw_encrypt(&f.rsa, f.k, &em) else {
            return;
        };
        let got = f.kek.unwrap_dek(&wrapped, lengths);
        let want = reference_decode(&em, lengths);
        match (&got, &want) {
            (Ok(g), Some(w)) => assert_eq!(&**g, w.as_slice(), "wrong DEK for EM {em:02x?}"),
            (Err(KmiError::BadData(_)), None) => {}
            _ => panic!("EM {em:02x?} with lengths {lengths:?}: got {got:?}, want {want:?}"),
        }
    }
});
