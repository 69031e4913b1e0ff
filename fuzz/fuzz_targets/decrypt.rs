//! String decryption (`DataCipher::decrypt`, AES-256-CBC with PKCS#7) of
//! arbitrary ciphertext under a fixed key: never a panic; if it succeeds,
//! `plaintext_len` agrees and re-encrypting the plaintext under the same IV
//! gives back exactly the input (the padding check accepts only canonical
//! padding); if it fails, `plaintext_len` fails too.
//!
//! Input layout: data[0] picks the IV (the fixed 16-byte IV, or one of the
//! wrong lengths 0, 15, 17); the rest is the ciphertext.
#![no_main]

use _kmi::cipher::{derive_cipher_key, DataCipher};
use _kmi::errors::KmiError;
use libfuzzer_sys::fuzz_target;

const IV: &[u8; 17] = b"0123456789ABCDEFG";

fuzz_target!(|data: &[u8]| {
    let Some((&choice, ciphertext)) = data.split_first() else {
        return;
    };
    let key = derive_cipher_key(b"keas.kmi fuzzing DEK", b"12345678").unwrap();
    let cipher = DataCipher::new(&key);
    let iv = match choice % 8 {
        0 => &IV[..0],
        1 => &IV[..15],
        2 => &IV[..17],
        _ => &IV[..16],
    };
    match cipher.decrypt(iv, ciphertext) {
        Ok(plain) => {
            assert_eq!(iv.len(), 16);
            assert_eq!(cipher.plaintext_len(iv, ciphertext).unwrap(), plain.len());
            assert!(ciphertext.len() - plain.len() >= 1 && ciphertext.len() - plain.len() <= 16);
            let again = cipher.encrypt(iv, &plain).unwrap();
            assert_eq!(again, ciphertext, "re-encryption differs from the input");
        }
        Err(e) => {
            assert!(cipher.plaintext_len(iv, ciphertext).is_err());
            match e {
                KmiError::BadData(_) => {}
                KmiError::BadArgument(_) => assert_ne!(iv.len(), 16),
                other => panic!("unexpected error {other:?}"),
            }
        }
    }
});
