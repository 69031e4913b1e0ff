//! Throughput of the data cipher (no Python), to set beside
//! `openssl speed -evp aes-256-cbc [-decrypt] -bytes 16384` run in the same minutes:
//! a 16 KiB buffer that stays in cache, as openssl speed measures it (one
//! core), 64 MiB between preallocated buffers (decryption on every core), and
//! 64 MiB into a new buffer per call, as `encrypt`/`decrypt` return it.
//!
//!     cargo run --release --example cipher_speed
use _kmi::cipher::{derive_cipher_key, DataCipher};
use std::time::Instant;

/// Best of `rounds` timings of `f`, as GB/s for `bytes` per call.
fn gbps(bytes: usize, calls: usize, rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
    }
    bytes as f64 / best / 1e9
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    println!(
        "aes crate, hardware backend: {} (cpu: aes {}, vaes {}, avx512f {})",
        aes::hardware_accelerated(),
        std::arch::is_x86_feature_detected!("aes"),
        std::arch::is_x86_feature_detected!("vaes"),
        std::arch::is_x86_feature_detected!("avx512f"),
    );
    let c = DataCipher::new(&derive_cipher_key(b"dek", b"12345678").unwrap());
    let iv = b"0123456789ABCDEF";
    for (label, n, calls) in [
        ("16 KiB, in cache", 16 << 10, 4000),
        ("64 MiB", 64 << 20, 1),
    ] {
        // n - 1 bytes: with PKCS#7 the ciphertext is exactly n bytes.
        let data: Vec<u8> = (0..n - 1).map(|i| (i % 251) as u8).collect();
        let mut enc = vec![0u8; DataCipher::padded_len(data.len())];
        let mut out = vec![0u8; data.len()];
        let e = gbps(n, calls, 7, || c.encrypt_into(iv, &data, &mut enc).unwrap());
        let d = gbps(n, calls, 7, || c.decrypt_into(iv, &enc, &mut out).unwrap());
        assert_eq!(out, data);
        println!("{label:>16}: encrypt {e:.2} GB/s, decrypt {d:.2} GB/s");
    }
    // As the Python bindings return it: every call writes a new buffer, whose
    // pages the kernel maps and zeroes on first touch (calloc'd, untouched).
    let data: Vec<u8> = (0..(64 << 20) - 1).map(|i| (i % 251) as u8).collect();
    let enc = c.encrypt(iv, &data).unwrap();
    let e = gbps(enc.len(), 1, 7, || drop(c.encrypt(iv, &data).unwrap()));
    let d = gbps(enc.len(), 1, 7, || drop(c.decrypt(iv, &enc).unwrap()));
    println!("64 MiB, new output: encrypt {e:.2} GB/s, decrypt {d:.2} GB/s");
}
