//! The chunked file format (`FileDecryptor`): an arbitrary 24-byte header
//! (little-endian size, IV) and body, fed in arbitrary piece sizes. Never a
//! panic; the output never exceeds the header's size; if `finish()` succeeds
//! the output is exactly the header's size, and is the same whatever the piece
//! sizes (compared with a one-piece run), and re-encrypting it with
//! `FileEncryptor` gives back the input body, less any whole blocks after
//! it (an old file's tail, which the reader ignores as the reference does).
//!
//! Input layout: data[0] is the number n of piece-size bytes (mod 8), then n
//! bytes of piece sizes (0 allowed, used in turn), then the header and body.
#![no_main]

use _kmi::cipher::{derive_cipher_key, DataCipher, FILE_HEADER};
use _kmi::errors::KmiError;
use libfuzzer_sys::fuzz_target;

fn run(cipher: &DataCipher, stream: &[u8], pieces: &[u8]) -> Result<Vec<u8>, KmiError> {
    let header = &stream[..FILE_HEADER.min(stream.len())];
    let mut d = cipher.file_decryptor(header)?;
    // Read from the header here, not asked of the decryptor: the oracle
    // stays independent of the code under test.
    let size = u64::from_le_bytes(header[..8].try_into().expect("a whole header"));
    let mut body = &stream[header.len()..];
    let mut out = Vec::new();
    let mut i = 0;
    while !body.is_empty() {
        let mut n = if pieces.is_empty() {
            body.len()
        } else {
            pieces[i % pieces.len()] as usize
        };
        i += 1;
        if n == 0 {
            // An empty read is allowed; then take at least one byte so the loop ends.
            d.update(&[], &mut out)?;
            n = 1;
        }
        let n = n.min(body.len());
        let r = d.update(&body[..n], &mut out);
        assert!(
            out.len() as u64 <= size,
            "{} bytes out, header says {size}",
            out.len()
        );
        r?;
        body = &body[n..];
    }
    d.finish()?;
    assert_eq!(out.len() as u64, size, "finish() accepted a short stream");
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 8).min(rest.len());
    let (pieces, stream) = rest.split_at(n);
    let key = derive_cipher_key(b"keas.kmi fuzzing DEK", b"12345678").unwrap();
    let cipher = DataCipher::new(&key);
    let result = run(&cipher, stream, pieces);
    let whole = run(&cipher, stream, &[]);
    match (&result, &whole) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "output depends on the piece sizes"),
        (Err(_), Err(_)) => {}
        _ => panic!("piece sizes {pieces:?} change the outcome: {result:?} vs {whole:?}"),
    }
    match result {
        Ok(plain) => {
            let iv = &stream[8..FILE_HEADER];
            let mut e = cipher.file_encryptor(iv).unwrap();
            let mut body = Vec::new();
            e.update(&plain, &mut body);
            let size = e.finish(&mut body);
            assert_eq!(size, plain.len() as u64);
            assert_eq!(&size.to_le_bytes()[..], &stream[..8]);
            let input = &stream[FILE_HEADER..];
            assert!(
                input.len() >= body.len() && (input.len() - body.len()) % 16 == 0,
                "{} bytes read for {} bytes written: not a whole-block tail",
                input.len(),
                body.len()
            );
            assert_eq!(
                body,
                &input[..body.len()],
                "re-encryption differs from the input"
            );
        }
        Err(e) => assert!(matches!(e, KmiError::BadData(_)), "not BadData: {e:?}"),
    }
});
