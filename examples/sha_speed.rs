//! Cost of one SHA-256 compression (one 64-byte block per call), the unit of PBKDF2.
use std::time::Instant;

fn main() {
    let mut state = [0u32; 8];
    let block = [[7u8; 64]];
    let n = 1_200_000;
    let t = Instant::now();
    for _ in 0..n {
        sha2::block_api::compress256(&mut state, &block);
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{:.1} ns per compression ({:.1} ms for {n}) {:?}",
        dt * 1e9 / n as f64,
        dt * 1e3,
        state[0]
    );
    println!("sha_ni detected: {}", std::is_x86_feature_detected!("sha"));
}
