//! Where a cold DEK lookup spends its time: PEM decode, key construction, RSA.
use _kmi::kek::Kek;
use _kmi::pem;
use std::time::Instant;

fn main() {
    let kek = Kek::generate(2048, 65537).unwrap();
    let pem_bytes = kek.to_legacy_pem(b"key management facility").unwrap();
    let wrapped = kek.wrap_dek(&[5u8; 128]).unwrap();
    let n = 50;
    let t = Instant::now();
    for _ in 0..n {
        pem::decode_private_key(&pem_bytes, b"key management facility").unwrap();
    }
    println!(
        "pem decode   {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
    let t = Instant::now();
    let mut k = None;
    for _ in 0..n {
        k = Some(Kek::from_pem(&pem_bytes, b"key management facility").unwrap());
    }
    println!(
        "from_pem     {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
    let k = k.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        k.unwrap_dek(&wrapped, &[128]).unwrap();
    }
    println!(
        "unwrap       {:8.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    );
}
