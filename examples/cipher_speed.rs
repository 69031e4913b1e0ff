//! Throughput of the data cipher on a preallocated 64 MiB buffer (no Python).
use _kmi::cipher::{derive_cipher_key, DataCipher};
use std::time::Instant;

fn main() {
    let n = 64 << 20;
    let data = vec![7u8; n];
    let c = DataCipher::new(&derive_cipher_key(b"dek", b"12345678").unwrap());
    let iv = b"0123456789ABCDEF";
    let mut enc = vec![0u8; DataCipher::padded_len(n)];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        c.encrypt_into(iv, &data, &mut enc).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("encrypt {:.2} GB/s", n as f64 / best / 1e9);
    let mut out = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        c.decrypt_into(iv, &enc, &mut out).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    assert_eq!(out, data);
    println!("decrypt {:.2} GB/s", n as f64 / best / 1e9);
}
