//! v2 seal and open speed: 15-byte messages (per call) and 64 MiB (GB/s, on
//! every core), to compare with `openssl speed -evp aes-256-gcm`.
//! `cargo run --release --example v2_speed`
use std::time::Instant;

use _kmi::v2::V2Key;

fn main() {
    let key = V2Key::new(&[0x42; 128]);
    let small = b"a secret string";
    let n = 200_000;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(key.seal(small, b"").unwrap());
        }
        let seal = t.elapsed().as_secs_f64() / n as f64;
        let blob = key.seal(small, b"").unwrap();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(key.open(&blob, b"").unwrap());
        }
        let open = t.elapsed().as_secs_f64() / n as f64;
        println!("15 B: seal {:.2} us, open {:.2} us", seal * 1e6, open * 1e6);
    }
    let big = vec![7u8; 64 << 20];
    let mut sealed = key.seal(&big, b"").unwrap();
    let mut opened = key.open(&sealed, b"").unwrap();
    for _ in 0..5 {
        let t = Instant::now();
        let salt = [1u8; 24];
        key.seal_into(&salt, b"", &big, &mut sealed).unwrap();
        let seal = t.elapsed().as_secs_f64();
        let t = Instant::now();
        key.open_into(&sealed, b"", &mut opened).unwrap();
        let open = t.elapsed().as_secs_f64();
        println!(
            "64 MiB into preallocated buffers: seal {:.2} GB/s, open {:.2} GB/s",
            big.len() as f64 / seal / 1e9,
            big.len() as f64 / open / 1e9
        );
    }
}
