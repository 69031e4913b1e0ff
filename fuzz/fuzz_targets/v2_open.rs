//! The v2 reader (`V2Key::open` and the streaming `Opener`) on arbitrary
//! messages under the DEKs of the known-answer vectors: never a panic, never
//! a wrong plaintext. When a message opens, sealing its plaintext again under
//! its own salt gives back exactly the message (AES-GCM has one valid
//! ciphertext per key, nonce and plaintext), and the streaming opener, fed in
//! pieces, agrees; when it does not open, the error is `BadData` and the
//! streaming opener fails too.
//!
//! Input layout: data[0] % 8 picks a vector (its DEK and associated data; 5
//! to 7 take vector 0's DEK with no associated data), data[0] / 8 the piece
//! size the streaming opener is fed; the rest is the message. The seeds
//! (fuzz/make_seeds.py) are the vectors' ciphertexts.
#![no_main]

use std::sync::OnceLock;

use _kmi::errors::KmiError;
use _kmi::v2::{V2Key, HEADER_LEN, PREFIX_LEN, SALT_LEN};
use libfuzzer_sys::fuzz_target;

/// (key, associated data) of each vector in tests/vectors/v2.json.
fn vectors() -> &'static [(V2Key, Vec<u8>)] {
    static VECTORS: OnceLock<Vec<(V2Key, Vec<u8>)>> = OnceLock::new();
    VECTORS.get_or_init(|| {
        let text = include_str!("../../tests/vectors/v2.json");
        text.split('{')
            .skip(1)
            .map(|object| {
                let field = |name: &str| {
                    let at = object.find(&format!("\"{name}\"")).expect(name) + name.len() + 2;
                    let start = at + object[at..].find('"').unwrap() + 1;
                    let end = start + object[start..].find('"').unwrap();
                    hex::decode(&object[start..end]).unwrap()
                };
                (V2Key::new(&field("dek")), field("associated_data"))
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, message)) = data.split_first() else {
        return;
    };
    let all = vectors();
    let (key, ad) = match all.get((choice % 8) as usize) {
        Some((key, ad)) => (key, &ad[..]),
        None => (&all[0].0, &b""[..]),
    };
    let piece = 1 + (choice as usize >> 3) * 1337;
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
            let salt = message[PREFIX_LEN..PREFIX_LEN + SALT_LEN]
                .try_into()
                .unwrap();
            let mut again = vec![0u8; message.len()];
            key.seal_into(salt, ad, &plain, &mut again).unwrap();
            assert_eq!(
                again, message,
                "the message is not the sealing of its plaintext"
            );
            stream.expect("the streaming opener refused what open accepted");
            assert_eq!(streamed, plain);
        }
        Err(KmiError::BadData(_)) => {
            assert!(
                stream.is_err(),
                "the streaming opener accepted what open refused"
            );
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
