//! The v2 reader (`V2Key::open` and the streaming `Opener`) on arbitrary
//! messages under a fixed DEK: never a panic, never a wrong plaintext. When a
//! message opens, sealing its plaintext again under its own salt gives back
//! exactly the message (AES-GCM has one valid ciphertext per key, nonce and
//! plaintext), and the streaming opener, fed in pieces, agrees; when it does
//! not open, the error is `BadData` and the streaming opener fails too.
//!
//! Input layout: data[0]: bit 0 picks the associated data (none, or "ad"),
//! bits 1-7 the piece size fed to the streaming opener; the rest is the message.
#![no_main]

use _kmi::errors::KmiError;
use _kmi::v2::{V2Key, HEADER_LEN, PREFIX_LEN, SALT_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, message)) = data.split_first() else {
        return;
    };
    let ad: &[u8] = if choice & 1 == 0 { b"" } else { b"ad" };
    let piece = 1 + (choice as usize >> 1) * 997;
    let key = V2Key::new(b"keas.kmi fuzzing DEK for the v2 format");
    let whole = key.open(message, ad);
    let mut opener = key.opener(ad);
    let mut streamed = Vec::new();
    let stream = message
        .chunks(piece)
        .try_for_each(|p| opener.update(p, &mut streamed))
        .and_then(|()| opener.finish(&mut streamed));
    match whole {
        Ok(plain) => {
            assert!(message.len() >= HEADER_LEN + 16);
            let salt = message[PREFIX_LEN..PREFIX_LEN + SALT_LEN].try_into().unwrap();
            let mut again = vec![0u8; message.len()];
            key.seal_into(salt, ad, &plain, &mut again).unwrap();
            assert_eq!(again, message, "the message is not the sealing of its plaintext");
            stream.expect("the streaming opener refused what open accepted");
            assert_eq!(streamed, plain);
        }
        Err(KmiError::BadData(_)) => {
            assert!(stream.is_err(), "the streaming opener accepted what open refused");
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
