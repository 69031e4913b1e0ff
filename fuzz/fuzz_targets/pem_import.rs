//! KEK import: arbitrary bytes through `Kek::from_pem` (and so
//! `pem::decode_private_key`, the PKCS#1/PKCS#8/PBES2/legacy parsers and the
//! `rsa` key checks). Must never panic; an accepted key must be usable.
//!
//! Input layout: the first byte picks a mode, the rest is its data.
//! - mode 0: the data is the PEM text, the passphrase is fixed;
//! - mode 1: data[0] is a passphrase length n, data[1..1+n] the passphrase,
//!   the rest the PEM text;
//! - mode 2: data[0] picks a label (RSA PRIVATE KEY, PRIVATE KEY, ENCRYPTED
//!   PRIVATE KEY), the rest is the DER body the target armours, so the
//!   fuzzer works on DER rather than on base64;
//! - mode 3: data[0] picks a legacy OpenSSL cipher, the rest is PKCS#1 DER that
//!   the target encrypts under the fixed passphrase (fixed IV) and armours
//!   with Proc-Type/DEK-Info headers, so the DER parser is reached through
//!   the legacy decryption.
#![no_main]

mod common;

use _kmi::errors::KmiError;
use _kmi::kek::{Kek, MAX_MODULUS_BITS};
use _kmi::pem::bytes_to_key;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockCipherEncrypt, BlockModeEncrypt, KeyInit, KeyIvInit};
use libfuzzer_sys::fuzz_target;

const LABELS: [&str; 3] = ["RSA PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY"];
const LEGACY: [(&str, usize, usize); 5] = [
    ("DES-CBC", 8, 8),
    ("DES-EDE3-CBC", 24, 8),
    ("AES-128-CBC", 16, 16),
    ("AES-192-CBC", 24, 16),
    ("AES-256-CBC", 32, 16),
];

fn cbc_encrypt<C: BlockCipherEncrypt + KeyInit>(key: &[u8], iv: &[u8], data: &[u8]) -> Vec<u8> {
    cbc::Encryptor::<C>::new_from_slices(key, iv)
        .unwrap()
        .encrypt_padded_vec::<Pkcs7>(data)
}

fn legacy_pem(choice: u8, der: &[u8]) -> Vec<u8> {
    let (name, key_len, iv_len) = LEGACY[choice as usize % LEGACY.len()];
    let iv: Vec<u8> = (1..=iv_len as u8).collect();
    let key = bytes_to_key(common::PASSPHRASE, &iv[..8], key_len);
    let body = match (key_len, iv_len) {
        (8, _) => cbc_encrypt::<des::Des>(&key, &iv, der),
        (24, 8) => cbc_encrypt::<des::TdesEde3>(&key, &iv, der),
        (16, _) => cbc_encrypt::<aes::Aes128>(&key, &iv, der),
        (24, _) => cbc_encrypt::<aes::Aes192>(&key, &iv, der),
        _ => cbc_encrypt::<aes::Aes256>(&key, &iv, der),
    };
    let hex: String = iv.iter().map(|b| format!("{b:02X}")).collect();
    common::armour(
        "RSA PRIVATE KEY",
        &[
            ("Proc-Type", "4,ENCRYPTED".into()),
            ("DEK-Info", format!("{name},{hex}")),
        ],
        &body,
    )
}

/// An accepted KEK must be within the size limit and, when small enough to be
/// cheap, must survive the legacy PEM round trip and wrap/unwrap a DEK.
fn check_accepted(kek: &Kek) {
    let bits = kek.bits();
    assert!(bits <= MAX_MODULUS_BITS + 8, "accepted a {bits}-bit KEK");
    if bits > 2048 {
        return;
    }
    let pem = kek
        .to_legacy_pem(b"round trip")
        .expect("re-armour an accepted KEK");
    let again = Kek::from_pem(&pem, b"round trip").expect("re-import an accepted KEK");
    assert_eq!(again.bits(), bits);
    let dek = [0xa5u8; 16];
    // A key too small for a 16-byte DEK under PKCS#1 v1.5 may refuse to wrap.
    if let Ok(wrapped) = kek.wrap_dek(&dek) {
        let back = again
            .unwrap_dek(&wrapped, &[16])
            .expect("an accepted KEK unwraps what it wrapped");
        assert_eq!(&*back, &dek);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Kek::from_pem turns a parser panic into BadKey with catch_unwind, but
    // libfuzzer-sys's panic hook aborts first, so such a panic still counts here.
    match import(mode, rest) {
        Ok(kek) => check_accepted(&kek),
        // Every refusal of a KEK is a BadKey (ValueError in Python), never I/O or a panic.
        Err(e) => assert!(matches!(e, KmiError::BadKey(_)), "not BadKey: {e:?}"),
    }
});

fn import(mode: u8, rest: &[u8]) -> Result<Kek, KmiError> {
    match mode % 4 {
        0 => Kek::from_pem(rest, common::PASSPHRASE),
        1 => {
            let Some((&n, rest)) = rest.split_first() else {
                return Kek::from_pem(b"", common::PASSPHRASE);
            };
            let n = (n as usize).min(rest.len());
            let (passphrase, pem) = rest.split_at(n);
            Kek::from_pem(pem, passphrase)
        }
        2 => {
            let Some((&label, der)) = rest.split_first() else {
                return Kek::from_pem(b"", common::PASSPHRASE);
            };
            let pem = common::armour(LABELS[label as usize % LABELS.len()], &[], der);
            Kek::from_pem(&pem, common::PASSPHRASE)
        }
        _ => {
            let Some((&choice, der)) = rest.split_first() else {
                return Kek::from_pem(b"", common::PASSPHRASE);
            };
            Kek::from_pem(&legacy_pem(choice, der), common::PASSPHRASE)
        }
    }
}
